"""DeepZero on the engine: the generic layout, CGE, feature reuse, ZO-GraSP, sparse training, replay.

Every reference here is computed by hand on a copy of the model (weights written directly,
one forward per query), never by the code under test. fp64 throughout: the finite differences
divide loss differences (~1e-16 relative error) by mu ~ 1e-3, so 1e-10 is a safe tolerance.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from eval_helpers import one_torch_thread  # noqa: F401  (tiny convolutions: one intra-op thread)
from test_train_cli import lm_data, tiny_dir  # noqa: F401  (fixtures)
from torch import nn
from torch.nn.utils import prune
from torch.utils.flop_counter import FlopCounterMode

from zoft.engine.core import ZOEngine
from zoft.engine.probes import Probe
from zoft.models.layout import discover_layout
from zoft.noise import make_noise, step_seed
from zoft.optim import bind, make_optimizer, step
from zoft.optim.cge import CGE, CGEConfig
from zoft.optim.zo_grasp import LayerwiseRandomMask, global_mask, layer_ratios, prunable_keys, zo_grasp_scores
from zoft.optim.zo_sgd import update_record
from zoft.tasks.tensor import TensorClassify, tensor_batch

OBJ = TensorClassify()


def seeded(build, seed: int):
    """``build()`` with torch's default initialisation drawn from ``seed`` (global RNG left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().double()


def cnn(seed: int = 0) -> nn.Sequential:
    """(R, 1, 6, 6) -> (R, 3): conv 1->2, relu, maxpool, conv 2->2, tanh, flatten, linear."""
    return seeded(lambda: nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)), seed)


def data(rows: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (rows,), generator=g)
    return tensor_batch(x, y)


@torch.no_grad()
def loss_at(model: nn.Module, batch, change: dict[str, torch.Tensor] | None = None) -> float:
    """The loss of a copy of ``model`` with ``change`` added to its parameters (by name)."""
    m = copy.deepcopy(model)
    for n, p in m.named_parameters():
        if change and n in change:
            p.add_(change[n])
    return OBJ.fo_loss(m, batch).item()


def unit_vec(p: torch.Tensor, idx) -> torch.Tensor:
    e = torch.zeros(p.numel(), dtype=p.dtype)
    e[torch.as_tensor(idx)] = 1.0
    return e.view(p.shape)


# -- the generic layout ------------------------------------------------------------------------
def test_generic_layout_sequential_cnn_equals_separate_perturbed_forwards():
    model, batch = cnn(), data()
    layout = discover_layout(model)
    assert [u.name for u in layout.units] == ["0", "3", "6"]
    assert [[k for k, _ in u.params] for u in layout.units] == [["0.weight", "0.bias"], ["3.weight", "3.bias"],
                                                                 ["6.weight", "6.bias"]]
    noise = make_noise()
    probes = [Probe(11, 1e-2), Probe(11, -1e-2), Probe(None, 0.0), Probe(12, 3e-2)]
    ref = []
    for pr in probes:  # P separate forwards, weights written by hand
        change = None if pr.seed is None else {
            n: pr.scale * noise.sample(pr.seed, n, p) for n, p in model.named_parameters()}
        ref.append(loss_at(model, batch, change))
    with ZOEngine(model) as eng:
        got = eng.evaluate(probes, batch, OBJ)
    # same kernels on the same R rows per probe: equal up to summation order (seen: bitwise)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-13, atol=0)


def test_generic_layout_outermost_parameter_owner_is_one_unit():
    class Scaled(nn.Module):  # owns a parameter and has a child with parameters: one unit, no nesting
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.scale * self.lin(x)

    model = nn.Sequential(nn.Linear(2, 2), Scaled())
    units = discover_layout(model).units
    assert [u.name for u in units] == ["0", "1"]
    assert [k for k, _ in units[1].params] == ["1.scale", "1.lin.weight", "1.lin.bias"]


# -- CGE against finite differences by hand --------------------------------------------------------
@pytest.mark.parametrize("one_sided", [True, False])
@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("block", [1, 3])
def test_cge_equals_finite_differences_by_hand(one_sided, reuse, block):
    model, batch, mu = cnn(), data(), 1e-3
    base = loss_at(model, batch)
    expected = {}
    for n, p in model.named_parameters():
        g = torch.zeros(p.numel(), dtype=torch.float64)
        for lo in range(0, p.numel(), block):  # a block: consecutive flat coordinates of one tensor
            e = unit_vec(p, list(range(lo, min(lo + block, p.numel()))))
            plus = loss_at(model, batch, {n: mu * e})
            other = base if one_sided else loss_at(model, batch, {n: -mu * e})
            g[lo:lo + block] = (plus - other) / (mu if one_sided else 2 * mu)
        expected[n] = g
    with ZOEngine(model) as eng:
        opt = CGE(CGEConfig(eps=mu, one_sided=one_sided, block=block, feature_reuse=reuse))
        res = step(eng, opt, batch, OBJ, 0)
        got = opt.gradient(res.losses)
    d = sum(p.numel() for p in model.parameters())
    n_blocks = sum(-(-p.numel() // block) for p in model.parameters())
    assert len(res.losses) == (n_blocks + 1 if one_sided else 2 * n_blocks) and d == 115
    for n, g in expected.items():
        idx, vals = got[n]
        assert torch.equal(idx, torch.arange(g.numel()))
        torch.testing.assert_close(vals, g, rtol=1e-10, atol=1e-10)


def test_cge_steps_match_deepzero_sgd_with_momentum_by_hand():
    """Three CGE steps with DeepZero's update (``param.grad = g`` handed to torch SGD with momentum:
    b <- m b + g, b starting at g) and zoft's decoupled decay on weights (not biases): w <- (1 - lr
    wd) w - lr b, every coordinate by hand (fp64, rtol/atol 1e-10 as above)."""
    model, batch = cnn(), data()
    ref = copy.deepcopy(model)
    lr, mu, mom, wd = 0.05, 1e-3, 0.9, 0.1
    opt = make_optimizer("cge", {"lr": lr, "eps": mu, "momentum": mom, "weight_decay": wd}, seed=0, total_steps=3)
    with ZOEngine(model) as eng:
        for t in range(3):
            step(eng, opt, batch, OBJ, t)
    buf = {}
    for t in range(3):
        base = loss_at(ref, batch)
        grads = {}
        for n, p in ref.named_parameters():
            g = torch.zeros(p.numel(), dtype=torch.float64)
            for i in range(p.numel()):
                g[i] = (loss_at(ref, batch, {n: mu * unit_vec(p, [i])}) - base) / mu  # one-sided, DeepZero's
            grads[n] = g.view(p.shape)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                buf[n] = grads[n].clone() if t == 0 else mom * buf[n] + grads[n]
                p.mul_(1.0 if "bias" in n else 1 - lr * wd).sub_(lr * buf[n])
    moved = max((p - q).abs().max().item() for p, q in zip(ref.parameters(), cnn().parameters()))
    assert moved > 1e-3
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10, msg=n)


# -- feature reuse -------------------------------------------------------------------------------
def test_feature_reuse_equals_full_forwards_and_counts_fewer_flops():
    model, batch = cnn(), data(rows=5)
    R = 5
    w = dict(model.named_parameters())
    noise = make_noise()
    probes = [Probe(None, 0.0)] + [Probe(s, 1e-2) for s in range(4)]
    P = len(probes)

    class LastLayerOnly:  # directions that perturb only the linear head (unit "6")
        def direction_shaper(self):
            return lambda nz, seed, key, like: (nz.sample(seed, key, like) if key.startswith("6.")
                                                else torch.zeros_like(like))

    with ZOEngine(model) as eng:
        bind(LastLayerOnly(), eng)
        with FlopCounterMode(display=False) as full:
            l_full = eng.evaluate(probes, batch, OBJ)
        with FlopCounterMode(display=False) as reuse:
            l_reuse = eng.evaluate(probes, batch, OBJ, fan_out_at="6")
    ref = [loss_at(model, batch, None if p.seed is None else {
        "6.weight": p.scale * noise.sample(p.seed, "6.weight", w["6.weight"]),
        "6.bias": p.scale * noise.sample(p.seed, "6.bias", w["6.bias"])}) for p in probes]
    torch.testing.assert_close(l_reuse, torch.tensor(ref, dtype=torch.float64), rtol=1e-13, atol=0)
    torch.testing.assert_close(l_reuse, l_full, rtol=1e-13, atol=0)
    # FLOPs by hand (multiply-adds x 2; torch's counter counts convolutions and matmuls)
    conv1 = 2 * R * 2 * 6 * 6 * (1 * 3 * 3)  # out channels 2, 6x6 outputs, 1x3x3 inputs each
    conv2 = 2 * R * 2 * 3 * 3 * (2 * 3 * 3)
    head = 2 * R * 18 * 3
    assert full.get_total_flops() == P * (conv1 + conv2 + head)
    assert reuse.get_total_flops() == conv1 + conv2 + P * head


def test_fan_out_unit_must_exist_and_run():
    model, batch = cnn(), data()
    with ZOEngine(model) as eng:
        with pytest.raises(ValueError, match="no unit named"):
            eng.evaluate([Probe(None, 0.0)], batch, OBJ, fan_out_at="nope")
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        eng.evaluate([Probe(1, 1e-2), Probe(None, 0.0)], batch, OBJ, fan_out_at="0")  # still usable
        assert all(torch.equal(w0[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("reuse", [False, True])
def test_cge_probes_are_batched_one_forward_per_phase(reuse):
    """A CGE step is batched through the engine: one model forward per phase (one phase per unit with
    feature reuse, one in all without) that returns the phase's P_k probes as P_k * R rows; with
    feature reuse the model takes the batch's R rows once and fans out inside."""
    model, batch = cnn(), data()
    R = 4
    calls: list[list[int]] = []
    model.register_forward_pre_hook(lambda m, a: calls.append([a[0].shape[0]]))  # rows in, rows out
    model.register_forward_hook(lambda m, a, out: calls[-1].append(out.shape[0]))
    with ZOEngine(model) as eng:
        res = step(eng, CGE(CGEConfig(feature_reuse=reuse)), batch, OBJ, 0)
    # coordinates per unit: conv 1->2 (18 + 2), conv 2->2 (36 + 2), linear 18->3 (54 + 3); the base rides in phase 0
    if reuse:
        assert calls == [[R, 21 * R], [R, 38 * R], [R, 57 * R]]
    else:
        assert calls == [[116 * R, 116 * R]]
    assert len(res.losses) == 116


def test_cge_feature_reuse_counts_fewer_flops_per_step():
    model, batch = cnn(), data()
    flops = {}
    for reuse in (False, True):
        with ZOEngine(copy.deepcopy(model)) as eng:
            opt = CGE(CGEConfig(feature_reuse=reuse))
            with FlopCounterMode(display=False) as fc:
                res = step(eng, opt, batch, OBJ, 0)
            flops[reuse] = (fc.get_total_flops(), res.losses)
    torch.testing.assert_close(flops[True][1], flops[False][1], rtol=1e-13, atol=0)
    assert flops[True][0] < 0.75 * flops[False][0]


@pytest.mark.parametrize("family,gran", [("opt", "param"), ("opt", "unit"), ("llama", "param"), ("llama", "unit"),
                                         ("bloom", "param"), ("bert", "param")])
def test_cge_defaults_on_a_padded_lm_batch_equal_no_feature_reuse(family, gran):
    """CGE's default feature reuse on a Hugging Face model with a padded batch (the last row ends in
    2 pad tokens): the model builds its attention mask (BLOOM: and ALiBi) from the R rows before the
    first block and hands it to every block, so a phase fanned out at block 0 ran block 1 (nothing
    of it trained: the engine runs it whole) on P*R hidden rows with the R-row mask, a shape error
    on either granularity. Now only the last block and the units after it fan out, and the estimate
    equals ``feature_reuse=False``'s over every norm weight but block 1's (units before, in and after
    the blocks) and BERT's head bias (its head unit holds it twice, as ``decoder.bias``: queried
    once). Not bitwise: the phases run other row counts than the one no-reuse forward, so matmuls
    may round differently (fp64, 1e-10 as above)."""
    from test_engine import TokenNLL, make_batch
    from tiny_models import ENCODERS, tiny_model

    grads, fans = {}, {}
    for reuse in (True, False):
        model = tiny_model(family, dtype=torch.float64, layers=3)
        for n, p in model.named_parameters():
            norm = "norm" in n.lower() or "ln_" in n
            p.requires_grad_(p.ndim == 1 and ".1." not in n and (norm or n == "cls.predictions.bias"))
        with ZOEngine(model, granularity=gran) as eng:
            opt = CGE(CGEConfig()) if reuse else CGE(CGEConfig(feature_reuse=False))  # defaults: reuse
            res = step(eng, opt, make_batch(family), TokenNLL(causal=family not in ENCODERS), 0)
            assert len(res.losses) == sum(p.numel() for p in eng.params.values()) + 1  # each coordinate once
            grads[reuse] = opt.gradient(res.losses)
            fans[reuse] = [opt.fan_out_at(0, i) for i in range(len(opt._phases))]
            blocks = [u.name for u in eng.layout.blocks]
    assert blocks[2] in fans[True] and blocks[0] not in fans[True] and fans[False] == [None]
    assert grads[True].keys() == grads[False].keys()
    for k, (idx, g) in grads[False].items():
        assert torch.equal(grads[True][k][0], idx)
        torch.testing.assert_close(grads[True][k][1], g, rtol=1e-10, atol=1e-10, msg=k)



def test_cge_finetune_on_padded_lm_batches_equals_no_feature_reuse(tiny_dir, lm_data, tmp_path):
    """``zoft finetune --optimizer cge`` (feature reuse on) on the tiny OPT's padded LM batches,
    training a norm of block 0 (its phase runs whole) and one of block 1 (the last: fanned out):
    it stopped with a shape error; now it trains the weights of ``feature_reuse: false`` (bitwise
    equal on this CPU; held to 1e-6, as the two runs' forwards have other row counts)."""
    from safetensors.torch import load_file
    from zoft.cli import main

    off = tmp_path / "off.yaml"
    off.write_text("optimizer_options:\n  feature_reuse: false\n")
    w = {}
    for name, extra in (("reuse", []), ("off", ["--config", str(off)])):
        out = tmp_path / name
        assert main(["finetune", "--model", str(tiny_dir), "--task", "lm", "--train", str(lm_data), "--steps", "2",
                     "--batch-size", "2", "--max-length", "16", "--output-dir", str(out), "--no-progress",
                     "--optimizer", "cge", "--trainable", "layers.0.final_layer_norm,layers.1.final_layer_norm",
                     *extra]) == 0
        w[name] = load_file(str(out / "checkpoint" / "model.safetensors"))
    init = load_file(str(tiny_dir / "model.safetensors"))
    moved = [k for k in init if not torch.equal(w["reuse"][k], init[k])]
    assert len(moved) == 4  # weight and bias of both norms
    for k in init:
        torch.testing.assert_close(w["reuse"][k], w["off"][k], rtol=0, atol=1e-6, msg=k)

# -- ZO-GraSP ------------------------------------------------------------------------------------
def test_zo_grasp_scores_match_a_hand_computation():
    model = seeded(lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), 3)
    g = torch.Generator().manual_seed(4)
    batch = tensor_batch(torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (6,), generator=g))
    q, mu, seed = 3, 1e-2, 7
    keys = ["0.weight", "2.weight"]
    assert prunable_keys(model) == keys  # biases are never scored (DeepZero)
    noise = make_noise()
    w = {n: p.detach().clone() for n, p in model.named_parameters()}

    def u(phase, i, k):
        z = noise.sample(step_seed(seed, phase, i), k, w[k])
        return z / (z.norm() + 1e-8)

    def rge(phase, shift):
        f0 = loss_at(model, batch, shift)
        out = {k: torch.zeros_like(w[k]) for k in keys}
        for i in range(q):
            fi = loss_at(model, batch, {k: shift.get(k, 0) + mu * u(phase, i, k) for k in keys})
            for k in keys:
                out[k] += (fi - f0) / mu * u(phase, i, k) / q
        return out

    g0 = rge(0, {})
    g1 = rge(1, {k: mu * g0[k] for k in keys})
    expected = {k: -w[k] * (g1[k] - g0[k]) / mu for k in keys}
    with ZOEngine(model) as eng:
        scores = zo_grasp_scores(eng, batch, OBJ, queries=q, eps=mu, seed=seed)
    assert set(scores) == set(keys)
    for k in keys:
        torch.testing.assert_close(scores[k], expected[k], rtol=1e-8, atol=1e-9)
    assert all(torch.equal(w[n], p) for n, p in model.named_parameters())  # no weight was written
    # the mask at sparsity 0.5 keeps the 10 of 20 weights with the largest |S| by hand (no ties here)
    flat = torch.cat([expected[k].abs().reshape(-1) for k in keys])
    cut = flat.sort(descending=True).values[flat.numel() - round(0.5 * flat.numel()) - 1]
    mask = global_mask(scores, 0.5)
    assert all(torch.equal(mask[k], expected[k].abs() >= cut) for k in keys)


def test_global_mask_is_torch_global_l1_pruning_and_ratios_follow():
    g = torch.Generator().manual_seed(5)
    scores = {"a": torch.randn(4, 5, generator=g), "b": torch.randn(7, generator=g)}
    mask = global_mask(scores, 0.6)
    # torch's own global pruning of the same scores (what DeepZero's global_prune calls)
    mods = {k: nn.Module() for k in scores}
    for k, m in mods.items():
        m.register_parameter("weight", nn.Parameter(torch.ones_like(scores[k])))
    prune.global_unstructured([(m, "weight") for m in mods.values()], pruning_method=prune.L1Unstructured,
                              amount=0.6, importance_scores={(mods[k], "weight"): scores[k] for k in scores})
    for k in scores:
        assert torch.equal(mask[k], mods[k].weight_mask.bool())
    assert sum(int(m.sum()) for m in mask.values()) == 27 - round(0.6 * 27)
    # DeepZero's layer_sparsity: the fraction of exact zeros in each pruned weight (weights of ones here)
    ratios = layer_ratios(mask)
    assert ratios == {k: float(torch.sum(mods[k].weight == 0)) / mods[k].weight.numel() for k in scores}


def test_layerwise_random_masks_keep_ratios_and_redraw_per_interval():
    shapes = {"a": torch.Size([10, 10]), "b": torch.Size([33])}
    lm = LayerwiseRandomMask({"a": 0.9, "b": 0.5}, shapes, seed=1, interval=3)
    m0, m2, m3 = lm(0), lm(2), lm(3)
    assert int(m0["a"].sum()) == 10 and int(m0["b"].sum()) == 33 - round(0.5 * 33)
    assert all(torch.equal(m0[k], m2[k]) for k in shapes)  # one draw per interval
    assert not torch.equal(m0["a"], m3["a"]) and int(m3["a"].sum()) == 10
    again = LayerwiseRandomMask({"a": 0.9, "b": 0.5}, shapes, seed=1, interval=3)(4)
    assert all(torch.equal(again[k], m3[k]) for k in shapes)  # a pure function of (seed, period, key)
    for k, r in {"a": 0.9, "b": 0.5}.items():  # as many kept as DeepZero's prune.random_unstructured keeps
        m = nn.Module()
        m.register_parameter("weight", nn.Parameter(torch.ones(shapes[k])))
        prune.random_unstructured(m, "weight", r)
        assert int(m.weight_mask.sum()) == int(m0[k].sum())


# -- sparse training and replay -------------------------------------------------------------------
def test_sparse_cge_never_changes_unmasked_coordinates():
    model, batch = cnn(), data()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    shapes = {k: w0[k].shape for k in ("0.weight", "3.weight", "6.weight")}
    masks = LayerwiseRandomMask({"0.weight": 0.5, "3.weight": 0.8, "6.weight": 0.9}, shapes, seed=2, interval=2)
    ever = {k: torch.zeros(s, dtype=torch.bool) for k, s in shapes.items()}
    with ZOEngine(model) as eng:
        opt = CGE(CGEConfig(lr=0.5, weight_decay=0.1, momentum=0.9), mask=masks)
        for t in range(4):
            res = step(eng, opt, batch, OBJ, t)
            assert len(res.losses) == 1 + sum(int(m.sum()) for m in masks(t).values()) + 2 + 2 + 3  # biases dense
            for k in shapes:
                ever[k] |= masks(t)[k]
        eng.flush()
    for k in shapes:
        p = dict(model.named_parameters())[k].detach()
        assert torch.equal(p[~ever[k]], w0[k][~ever[k]])  # bitwise untouched
        assert (p[ever[k]] != w0[k][ever[k]]).float().mean() > 0.9


def test_cge_run_replays_bitwise_from_its_stored_updates():
    batch = data()
    model = cnn()
    lines = []
    with ZOEngine(model) as eng:
        opt = CGE(CGEConfig(lr=0.3, momentum=0.9, weight_decay=0.01, one_sided=False))
        for t in range(3):
            res = step(eng, opt, batch, OBJ, t)
            lines.append(json.dumps(update_record(res.update)))  # what trajectory.jsonl stores
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(json.loads(line)["coords"] for line in lines)  # explicit values, no seeds
    fresh = cnn()
    with ZOEngine(fresh) as eng:
        reader = CGE(CGEConfig())
        for line in lines:
            eng.set_update(reader.update_from_record(json.loads(line)))
        eng.flush()
    for n, p in fresh.named_parameters():
        assert torch.equal(p.detach(), trained[n]), n


# -- the demo ------------------------------------------------------------------------------------
def test_digits_demo_quick_run(tmp_path):
    from test_bench_smoke import load_bench
    threads = torch.get_num_threads()
    try:
        rc = load_bench("deepzero_digits").main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    res = json.loads((tmp_path / "deepzero_digits.json").read_text())
    assert set(res["results"]) == {"fo-sgd", "mezo-sgd", "zo-sgd-mmt", "cge", "sparse-cge", "sparse-cge-fixed",
                                   "mezo-sgd-grasp"}
    for name, r in res["results"].items():
        passes = [q for q, _ in r["curve"]]
        assert passes == sorted(passes) and all(0.0 <= a <= 1.0 for _, a in r["curve"])
        assert passes[-1] >= (20 if name == "fo-sgd" else 200)  # --quick: 200 passes, FO stops at 20 steps
    sparse = res["results"]["sparse-cge"]
    assert set(sparse["layer_ratios"]) == {"0.weight", "3.weight", "7.weight"}
    sizes = {"0.weight": 72, "3.weight": 1152, "7.weight": 640}  # round(0.9 * 1864) pruned in all
    assert round(sum(sizes[k] * r for k, r in sparse["layer_ratios"].items())) == round(0.9 * 1864)
    assert sparse["queries_per_step"] == 1 + (1864 - round(0.9 * 1864)) + 8 + 16 + 10  # base, kept weights, biases
    assert res["flops"]["cge_reuse"] < res["flops"]["cge_full"] == res["flops"]["forward"]
    assert (tmp_path / "deepzero_digits.png").stat().st_size > 0


def grasp_masked_mezo(model, batch, obj, sparsity: float, queries: int, steps: int, lr: float):
    """ZO-GraSP's global mask of ``model``, then ``steps`` MeZO-SGD steps restricted to it through
    the ZO-SGD family's ``set_mask``; returns (initial weights, mask)."""
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ZOEngine(model) as eng:
        mask = global_mask(zo_grasp_scores(eng, batch, obj, queries=queries, seed=1), sparsity)
        opt = make_optimizer("mezo-sgd", {"lr": lr, "eps": 1e-3}, seed=0, total_steps=steps)
        opt.set_mask(mask)
        for t in range(steps):
            step(eng, opt, batch, obj, t)
    return w0, mask


def test_zo_grasp_mask_goes_through_the_zo_sgd_family_mask():
    """The ZO-GraSP mask restricts MeZO's random directions through ``set_mask`` (the family's
    perturbation mask): coordinates outside it keep their bytes, the kept ones move."""
    model = cnn()
    w0, mask = grasp_masked_mezo(model, data(), OBJ, sparsity=0.7, queries=4, steps=3, lr=1e-2)
    for n, p in model.named_parameters():
        p = p.detach()
        if n in mask:
            assert torch.equal(p[~mask[n]], w0[n][~mask[n]]) and bool((p[mask[n]] != w0[n][mask[n]]).all())
        else:  # biases: not scored, dense
            assert bool((p != w0[n]).all())


def test_cge_mask_naming_no_parameter_is_one_clear_error():
    from zoft.errors import UsageError
    with ZOEngine(cnn()) as eng:
        opt = CGE(CGEConfig(), mask={"0.weigth": torch.ones(2, 1, 3, 3, dtype=torch.bool)})
        with pytest.raises(UsageError, match="0.weigth"):
            step(eng, opt, data(), OBJ, 0)


def test_zo_grasp_mask_on_a_language_model_through_set_mask():
    """ZO-GraSP on a (tiny) Hugging Face LM: every Linear weight scored, the mask handed to MeZO-SGD."""
    from test_engine import TokenNLL, make_batch
    from tiny_models import tiny_model
    model = tiny_model("opt")
    w0, mask = grasp_masked_mezo(model, make_batch("opt"), TokenNLL(causal=True), sparsity=0.9, queries=2, steps=2,
                                 lr=1e-3)
    n_blocks = len(discover_layout(model).blocks)
    assert len(mask) == 1 + 6 * n_blocks  # q, k, v, out, fc1, fc2 per block; lm_head (tied to the embedding)
    for n, p in model.named_parameters():
        if n in mask:
            assert torch.equal(p.detach()[~mask[n]], w0[n][~mask[n]]), n
    kept = sum(int(m.sum()) for m in mask.values())
    assert kept == sum(m.numel() for m in mask.values()) - round(0.9 * sum(m.numel() for m in mask.values()))


def test_cli_optimizers_lists_cge(capsys):
    """``zoft optimizers`` names CGE with its paper and CGEConfig's defaults (an --optimizer whose
    step is refused above ``max_queries`` coordinates: tests/test_registry.py)."""
    from zoft.cli import main
    from zoft.optim import OPTIMIZERS
    assert "cge" in OPTIMIZERS
    assert main(["optimizers"]) == 0
    tail = capsys.readouterr().out.split("\ncge: ", 1)[1]
    assert tail.startswith("Chen et al., DeepZero")
    options = tail.split("options: ", 1)[1].split("\n", 1)[0]
    for kv in ("lr=0.1", "eps=0.005", "momentum=0.9", "weight_decay=0.0005", "one_sided=True", "block=1"):
        assert kv in options.split(", "), (kv, options)
