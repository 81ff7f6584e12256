"""Perturbation masks (``ZOSGD.set_mask``), Sparse MeZO and ZO-Bench's module-wise perturbation:
each against a hand-written reference of its update on a tiny fp64 model, masked coordinates never
moving, streamed == resident, and ``zoft finetune`` + ``zoft replay`` bit-identical. Descent on least
squares over seeds: ``DESCENT`` in ``tests/test_optim_family.py``."""
import copy
import math

import pytest
import torch

from test_engine import TokenNLL, make_batch
from test_optim_family import BASE, TokenNLL64, assert_matches_reference, ls_problem, MSE, one_thread, plain_loss  # noqa: F401
from test_train_cli import finetune_args, lm_data, tiny_dir  # noqa: F401  (fixtures)
from test_zo_methods import assert_streamed_equals_resident, loss_at
from tiny_models import tiny_model
from zoft.engine import ZOEngine
from zoft.errors import UsageError
from zoft.noise import make_noise, step_seed
from zoft.optim import bind, make_optimizer, step


def masked_mezo_reference(model, batch, obj, cfg, seed, steps, mask_of, unit_of=None, n_units=1):
    """MeZO-SGD written out on dense tensors with u_i = m * z_i (``mask_of(k)``: a 0/1 tensor or None),
    and with ``unit_of`` (module-wise) u_i zero outside unit (t + i) mod B, each unit's coefficient
    averaged over the queries that perturbed it; decay on non-bias/norm weights."""
    noise, params = make_noise(), dict(model.named_parameters())
    q, eps, lr = cfg["n_queries"], cfg["eps"], cfg["lr"]
    for t in range(steps):
        units = [(t + i) % n_units for i in range(q)]
        seeds = [step_seed(seed, t, i) for i in range(q)]
        if unit_of is not None:  # the seed is moved so that seed mod B names its unit
            seeds = [s - s % n_units + u for s, u in zip(seeds, units)]
        u = {}
        for i, s in enumerate(seeds):
            u[s] = {}
            for k, p in params.items():
                z = noise.sample(s, k, p)
                m = mask_of(k)
                if m is not None:
                    z = z * m
                if unit_of is not None and unit_of[k] != units[i]:
                    z = torch.zeros_like(z)
                u[s][k] = z
        g = {s: (loss_at(model, batch, obj, {k: eps * v for k, v in u[s].items()})
                 - loss_at(model, batch, obj, {k: -eps * v for k, v in u[s].items()})) / (2 * eps) for s in seeds}
        n = {s: (units.count(units[i]) if unit_of is not None else q) for i, s in enumerate(seeds)}
        with torch.no_grad():
            for k, p in params.items():
                decays = not any(x in k.lower() for x in ("bias", "norm", "ln_"))
                p.sub_(lr * (sum(g[s] / n[s] * u[s][k] for s in seeds) + (cfg["weight_decay"] * p if decays else 0)))


def random_masks(model, density=0.3, seed=0):
    """A fixed 0/1 mask for every other parameter (the rest stay dense)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(p.shape, generator=g) < density
            for i, (k, p) in enumerate(model.named_parameters()) if i % 2 == 0}


def test_masked_step_matches_hand_written_masked_mezo():
    """Three steps, two queries, weight decay, a fixed dict mask on half of the tensors: the hand
    computation of MeZO with u = m * z (atol 1e-11: batched vs plain matmul order, ~1e-16 / eps)."""
    cfg = {**BASE, "lr": 1e-2, "n_queries": 2}
    model = tiny_model("opt", dtype=torch.float64)
    init, ref = copy.deepcopy(model), copy.deepcopy(model)
    masks = random_masks(model)
    batch, obj = make_batch("opt"), TokenNLL64(True)
    opt = make_optimizer("mezo-sgd", cfg, seed=3, total_steps=10)
    opt.set_mask(masks)
    with ZOEngine(model) as engine:
        for t in range(3):
            step(engine, opt, batch, obj, t)
    masked_mezo_reference(ref, batch, obj, cfg, 3, 3, lambda k: masks.get(k))
    assert_matches_reference(model, ref, init)


@pytest.mark.parametrize("name", ["mezo-sgd", "zo-adam", "zo-sgd-cons", "lozo"])
def test_masked_coordinates_never_change(name):
    """With weight decay 0, every coordinate outside the mask keeps its exact initial bytes after
    5 steps, for a stateless, a stateful, a two-phase and a structured member; the masked-in ones
    move. A rule ``fn(key, w)`` gives the same trajectory as the dict it computes."""
    model = tiny_model("opt")
    masks = random_masks(model)
    batch, obj = make_batch("opt"), TokenNLL(True)
    runs = []
    for spec in (masks, lambda k, w: masks.get(k)):
        m = copy.deepcopy(model)
        opt = make_optimizer(name, {"lr": 1e-2 if name != "zo-adam" else 1e-3, "n_queries": 2}, seed=0,
                             total_steps=5)
        opt.set_mask(spec)
        with ZOEngine(m) as engine:
            for t in range(5):
                step(engine, opt, batch, obj, t)
        runs.append(m)
    w0 = dict(model.named_parameters())
    for k, p in runs[0].named_parameters():
        if k in masks:
            assert torch.equal(p[~masks[k]], w0[k][~masks[k]]), k
            assert not torch.equal(p[masks[k]], w0[k][masks[k]]), k
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(a, b)


def test_bad_masks_are_refused_in_one_line():
    model = tiny_model("opt")
    for bad, what in [({"nope": torch.ones(3)}, "not a trainable parameter"),
                      ({"model.decoder.embed_tokens.weight": torch.ones(3)}, "has shape")]:
        opt = make_optimizer("mezo-sgd", {}, seed=0, total_steps=1)
        opt.set_mask(bad)
        with ZOEngine(copy.deepcopy(model)) as engine, pytest.raises(UsageError, match=what):
            bind(opt, engine)


def magnitude_mask_by_hand(p, sparsity):
    """1 on the ceil((1 - s) n) smallest |w| of the tensor (ties at the threshold included)."""
    a = sorted(p.detach().abs().flatten().tolist())
    h = a[max(1, math.ceil((1 - sparsity) * len(a))) - 1]
    return (p.detach().abs() <= h).to(p.dtype)


def test_sparse_mezo_matches_hand_written_reference():
    """Sparse MeZO (sparsity 0.6): the magnitude mask of the initial weights, computed by sorting
    each tensor, then MeZO on m * z; three steps, two queries, weight decay, fp64, atol 1e-11."""
    cfg = {**BASE, "lr": 1e-2, "n_queries": 2, "sparsity": 0.6}
    model = tiny_model("opt", dtype=torch.float64)
    init, ref = copy.deepcopy(model), copy.deepcopy(model)
    masks = {k: magnitude_mask_by_hand(p, 0.6) for k, p in model.named_parameters()}
    batch, obj = make_batch("opt"), TokenNLL64(True)
    opt = make_optimizer("sparse-mezo", cfg, seed=3, total_steps=10)
    with ZOEngine(model) as engine:
        for t in range(3):
            step(engine, opt, batch, obj, t)
    w = next(p for k, p in init.named_parameters() if k.endswith("fc1.weight"))
    assert abs(masks[next(k for k, _ in init.named_parameters() if k.endswith("fc1.weight"))].mean().item()
               - 0.4) < 0.01 and w.numel() > 100
    masked_mezo_reference(ref, batch, obj, cfg, 3, 3, lambda k: masks[k])
    assert_matches_reference(model, ref, init)


@pytest.mark.parametrize("q", [1, 3])
def test_module_wise_matches_hand_written_reference(q):
    """ZO-Bench's module-wise perturbation (``zo_step_with_module_wise_perturbation``): query i of
    step t perturbs only layout unit (t + i) mod B; a unit's update averages its queries (q = 1:
    one unit per step in turn; q = 3 covers 3 of the tiny OPT's units per step). Four steps, fp64,
    atol 1e-11."""
    cfg = {**BASE, "lr": 1e-2, "n_queries": q, "module_wise": True}
    model = tiny_model("opt", dtype=torch.float64)
    init, ref = copy.deepcopy(model), copy.deepcopy(model)
    batch, obj = make_batch("opt"), TokenNLL64(True)
    opt = make_optimizer("mezo-sgd", cfg, seed=3, total_steps=10)
    with ZOEngine(model) as engine:
        unit_of, seen = {}, 0
        for u in engine.layout.units:
            new = [k for k, _ in u.params if k in engine.params and k not in unit_of]
            unit_of.update({k: seen for k in new})
            seen += bool(new)
        for t in range(4):
            step(engine, opt, batch, obj, t)
    assert seen >= 4
    masked_mezo_reference(ref, batch, obj, cfg, 3, 4, lambda k: None, unit_of, seen)
    assert_matches_reference(model, ref, init)


@pytest.mark.parametrize("name,opts", [("sparse-mezo", {}), ("mezo-sgd", {"module_wise": True, "n_queries": 2}),
                                       ("zo-adam", {"module_wise": True})])
def test_masks_and_module_wise_streamed_equal_resident(name, opts):
    """Block streaming with a deferred write-back (4): the same losses and weights as resident
    (rtol 1e-5, the Equivalence invariant of tests/test_offload.py)."""
    assert_streamed_equals_resident(name, opts, steps=6, every=4)


@pytest.mark.parametrize("name", ["sparse-mezo", "mezo-sgd+module", "zo-adam+module"])
def test_finetune_then_replay_and_resume_equal_trained_weights(name, tiny_dir, lm_data, tmp_path):
    """``zoft finetune --optimizer NAME`` with its defaults (lr raised so 6 steps move fp32 weights;
    ``+module``: ``module_wise: true`` from a config file), then ``zoft replay``: bit-identical;
    a run stopped at step 3 and resumed to 6 ends with the same weights (the mask comes back from
    the checkpoint, not from the step-3 weights)."""
    from safetensors.torch import load_file

    from zoft.cli import main

    extra = []
    if name.endswith("+module"):
        (tmp_path / "mw.yaml").write_text("optimizer_options: {module_wise: true}\n")
        extra = ["--config", str(tmp_path / "mw.yaml")]
    opt = name.split("+")[0]
    out = tmp_path / "run"
    assert main(finetune_args(tiny_dir, lm_data, out, "--optimizer", opt, *extra)) == 0
    assert main(["replay", str(out), "--output", str(tmp_path / "replayed")]) == 0
    a = load_file(str(out / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "replayed" / "model.safetensors"))
    init = load_file(str(tiny_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], init[k]) for k in a)
    if name == "sparse-mezo":  # large weights never move
        moved = [k for k in a if not torch.equal(a[k], init[k])]
        assert all(torch.equal(a[k][init[k].abs() > init[k].abs().median()], init[k][init[k].abs() > init[k].abs().median()])
                   for k in moved)
    half = tmp_path / "half"
    args = finetune_args(tiny_dir, lm_data, half, "--optimizer", opt, *extra)
    steps_at = args.index("--steps") + 1
    assert main([*args[:steps_at], "3", *args[steps_at + 1:]]) == 0
    assert main([*args, "--resume"]) == 0
    c = load_file(str(half / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_module_wise_refused_where_it_does_not_apply():
    for name in ("fzoo", "zo-ranksgd"):
        with pytest.raises(UsageError, match="module_wise"):
            make_optimizer(name, {"module_wise": True}, 0, 1)
