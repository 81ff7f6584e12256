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


def masked_mezo_reference(model, batch, obj, cfg, seed, steps, mask_of, unit_of=None, n_units=1, thresholds=None):
    """MeZO-SGD written out on dense tensors with u_i = m * z_i (``mask_of(k, s)``: a 0/1 tensor or None),
    and with ``unit_of`` (module-wise) u_i zero outside unit (t + i) mod B, each unit's coefficient
    averaged over the queries that perturbed it; decay on non-bias/norm weights. With ``thresholds``
    (Sparse MeZO) the mask of step t is ``|w_t| <= h`` of the step's own weights, and the last
    step's masks are returned."""
    noise, params = make_noise(), dict(model.named_parameters())
    q, eps, lr = cfg["n_queries"], cfg["eps"], cfg["lr"]
    for t in range(steps):
        if thresholds is not None:
            current = {k: (p.detach().abs() <= thresholds[k]).to(p.dtype) for k, p in params.items()}
            mask_of = lambda k, s, current=current: current[k]  # noqa: E731
        units = [(t + i) % n_units for i in range(q)]
        seeds = [step_seed(seed, t, i) for i in range(q)]
        if unit_of is not None:  # the seed is moved so that seed mod B names its unit
            seeds = [s - s % n_units + u for s, u in zip(seeds, units)]
        u = {}
        for i, s in enumerate(seeds):
            u[s] = {}
            for k, p in params.items():
                z = noise.sample(s, k, p)
                m = mask_of(k, s)
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
    return {k: mask_of(k, None) for k in params} if thresholds is not None else None


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
    masked_mezo_reference(ref, batch, obj, cfg, 3, 3, lambda k, s: masks.get(k))
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


def threshold_by_hand(p, sparsity):
    """h such that 1[|w| <= h] keeps the ceil((1 - s) n) smallest |w| of the tensor (and ties)."""
    a = sorted(p.detach().abs().flatten().tolist())
    return a[max(1, math.ceil((1 - sparsity) * len(a))) - 1]


@pytest.mark.parametrize("remask", [True, False])
def test_sparse_mezo_matches_hand_written_reference(remask):
    """Sparse MeZO (sparsity 0.6): thresholds from the initial weights by sorting each tensor, the
    mask of every step from that step's weights (``remask``; else the initial mask throughout), MeZO
    on m * z; four steps, two queries, weight decay, fp64, atol 1e-11. lr 0.3 so that the mask
    really changes between steps (asserted)."""
    cfg = {**BASE, "lr": 0.3, "n_queries": 2, "sparsity": 0.6, "remask": remask}
    model = tiny_model("opt", dtype=torch.float64)
    init, ref = copy.deepcopy(model), copy.deepcopy(model)
    h = {k: threshold_by_hand(p, 0.6) for k, p in model.named_parameters()}
    first = {k: (p.detach().abs() <= h[k]).double() for k, p in model.named_parameters()}
    fc1 = next(k for k in h if k.endswith("fc1.weight"))
    assert abs(first[fc1].mean().item() - 0.4) < 0.01
    batch, obj = make_batch("opt"), TokenNLL64(True)
    opt = make_optimizer("sparse-mezo", cfg, seed=3, total_steps=10)
    with ZOEngine(model) as engine:
        for t in range(4):
            step(engine, opt, batch, obj, t)
    last = masked_mezo_reference(ref, batch, obj, cfg, 3, 4, lambda k, s: first[k],
                                 thresholds=h if remask else None)
    assert_matches_reference(model, ref, init)
    assert opt.thresholds == h
    final = {k: (p.detach().abs() <= h[k]).double() for k, p in ref.named_parameters()}
    assert sum(int((final[k] != first[k]).sum()) for k in h) > 0  # the weights cross the thresholds
    if remask:  # the reference's last step used a mask other than the first
        assert sum(int((last[k] != first[k]).sum()) for k in h) > 0


def test_sparse_mezo_sphere_needs_the_initial_mask():
    """Sphere directions' norm is taken when a step's probes are built, before the previous update
    re-derives the masks (``remask``): refused in one line at construction (it used to wait ten
    minutes for a mask no thread would bring, then fail); with ``remask: false`` (fixed masks)
    sphere steps run and move only masked-in weights."""
    with pytest.raises(UsageError, match="sphere with remask") as e:
        make_optimizer("sparse-mezo", {"sphere": True}, seed=0, total_steps=2)
    assert "\n" not in str(e.value)
    model = tiny_model("opt")
    w0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = make_optimizer("sparse-mezo", {"sphere": True, "remask": False, "lr": 1e-2}, seed=0, total_steps=2)
    with ZOEngine(model) as engine:
        for t in range(2):
            assert torch.isfinite(step(engine, opt, make_batch("opt"), TokenNLL(True), t).losses).all()
        masks = opt.masks
    moved = {k: (p.detach() != w0[k]) for k, p in model.named_parameters()}
    assert any(m.any() for m in moved.values())
    assert all(not (m & ~masks[k]).any() for k, m in moved.items() if k in masks)


def test_global_gradient_sparsity_matches_hand_written_reference():
    """ZO-Bench's ``sparse_gradient_group: global``: h = the 0.6 quantile of |w| over all the model's
    weights, each parameter's threshold = the fraction of its |w| <= h, z zeroed where its keyed
    N(0, 1) mask draw is below that threshold (fresh per direction); then MeZO. Three steps, fp64,
    atol 1e-11; the thresholds are kept in the optimizer's state (resume)."""
    cfg = {**BASE, "lr": 1e-2, "n_queries": 2, "gradient_sparsity": 0.6, "sparse_gradient_group": "global"}
    model = tiny_model("opt", dtype=torch.float64)
    init, ref = copy.deepcopy(model), copy.deepcopy(model)
    allw = torch.cat([p.detach().abs().flatten() for p in model.parameters()])
    h = torch.quantile(allw.float(), 0.6).item()
    frac = {k: (p.detach().abs() <= h).double().mean().item() for k, p in model.named_parameters()}
    batch, obj, noise = make_batch("opt"), TokenNLL64(True), make_noise()
    opt = make_optimizer("mezo-sgd", cfg, seed=3, total_steps=10)
    with ZOEngine(model) as engine:
        for t in range(3):
            step(engine, opt, batch, obj, t)
    assert opt.state_dict()["grad_sparsity"] == pytest.approx(frac, abs=1e-12)
    assert len({round(v, 3) for v in frac.values()}) > 2  # the thresholds differ per parameter
    params = dict(ref.named_parameters())
    masked_mezo_reference(ref, batch, obj, cfg, 3, 3,
                          lambda k, s: (noise.sample(s, k + "/grad-mask", params[k]) >= frac[k]).double())
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
    masked_mezo_reference(ref, batch, obj, cfg, 3, 4, lambda k, s: None, unit_of, seen)
    assert_matches_reference(model, ref, init)


@pytest.mark.parametrize("name,opts", [("sparse-mezo", {}), ("mezo-sgd", {"module_wise": True, "n_queries": 2}),
                                       ("zo-adam", {"module_wise": True}),
                                       ("mezo-sgd", {"gradient_sparsity": 0.6, "sparse_gradient_group": "global"})])
def test_masks_and_module_wise_streamed_equal_resident(name, opts):
    """Block streaming with a deferred write-back (4): the same losses and weights as resident
    (rtol 1e-5, the Equivalence invariant of tests/test_offload.py)."""
    assert_streamed_equals_resident(name, opts, steps=6, every=4)


@pytest.mark.parametrize("name", ["sparse-mezo", "mezo-sgd+module", "zo-adam+module", "mezo-sgd+global",
                                  "forward-grad", "sparse-mezo+lora", "forward-grad+lora"])
def test_finetune_then_replay_and_resume_equal_trained_weights(name, tiny_dir, lm_data, tmp_path):
    """``zoft finetune --optimizer NAME`` with its defaults (lr raised so 6 steps move fp32 weights;
    ``+module``: ``module_wise: true`` from a config file, ``+global``: ZO-Bench's global gradient
    sparsity; ``+lora``: ``--peft lora``), then ``zoft replay``: bit-identical; a run stopped at step 3
    and resumed to 6 ends with the same weights (Sparse MeZO's mask and the global thresholds come
    back from the checkpoint, not from the step-3 weights)."""
    from safetensors.torch import load_file

    from zoft.cli import main

    extra = []
    yaml = {"module": "{module_wise: true}", "global": "{gradient_sparsity: 0.6, sparse_gradient_group: global}"}
    if name.split("+")[-1] in yaml:
        (tmp_path / "opts.yaml").write_text(f"optimizer_options: {yaml[name.split('+')[-1]]}\n")
        extra = ["--config", str(tmp_path / "opts.yaml")]
    if name.endswith("+lora"):
        extra = ["--peft", "lora"]
    opt = name.split("+")[0]
    out = tmp_path / "run"
    args = finetune_args(tiny_dir, lm_data, out, "--optimizer", opt, *extra)
    if extra[:1] == ["--peft"]:
        args[args.index("--lr") + 1] = "1e-1"
    assert main(args) == 0
    assert main(["replay", str(out), "--output", str(tmp_path / "replayed")]) == 0
    file = "adapter_model.safetensors" if name.endswith("+lora") else "model.safetensors"
    a = load_file(str(out / "checkpoint" / file))
    b = load_file(str(tmp_path / "replayed" / file))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if not name.endswith("+lora"):
        init = load_file(str(tiny_dir / "model.safetensors"))
        assert any(not torch.equal(a[k], init[k]) for k in a)
        if opt == "sparse-mezo":  # the 75% largest |w| of every tensor never move
            for k in a:
                big = init[k].abs() > init[k].abs().flatten().kthvalue(math.ceil(init[k].numel() / 4)).values
                assert torch.equal(a[k][big], init[k][big]), k
    else:
        assert any("lora_B" in k and torch.count_nonzero(v) > 0 for k, v in a.items())
    half = tmp_path / "half"
    args = [half if x == str(out) else x for x in args]
    args = [str(x) for x in args]
    steps_at = args.index("--steps") + 1
    assert main([*args[:steps_at], "3", *args[steps_at + 1:]]) == 0
    assert main([*args, "--resume"]) == 0
    c = load_file(str(half / "checkpoint" / file))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_module_wise_refused_where_it_does_not_apply():
    for name in ("fzoo", "zo-ranksgd", "hizoo", "mezo-svrg"):
        with pytest.raises(UsageError, match="module_wise"):
            make_optimizer(name, {"module_wise": True}, 0, 1)


# -- Forward-Grad ------------------------------------------------------------------------------
def test_forward_grad_matches_hand_written_reference():
    """Forward-Grad (ZO-Bench's forward_grad_step): d_i = grad L . z_i, here from a plain
    *backward* pass (autograd's reverse mode, an independent computation), then w <- w - lr ((1/q)
    sum_i d_i z_i + wd w) with decay on non-bias/norm weights. Three steps, two directions, tiny OPT
    in fp64; the two modes differ by summation order only (~1e-16 relative): atol 1e-11."""
    cfg = {**BASE, "lr": 1e-2, "n_queries": 2}
    model = tiny_model("opt", dtype=torch.float64)
    init, ref = copy.deepcopy(model), copy.deepcopy(model)
    batch, obj = make_batch("opt"), TokenNLL64(True)
    opt = make_optimizer("forward-grad", cfg, seed=3, total_steps=10)
    losses = []
    with ZOEngine(model) as engine:
        for t in range(3):
            losses.append(step(engine, opt, batch, obj, t).losses)
    noise, params = make_noise(), dict(ref.named_parameters())
    ref.eval()
    for t in range(3):
        seeds = [step_seed(3, t, i) for i in range(2)]
        loss = obj.loss(obj.forward(ref, batch), batch, 1)[0]
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        z = {s: {k: noise.sample(s, k, p) for k, p in params.items()} for s in seeds}
        d = {s: sum((grads[k] * z[s][k]).sum() for k in params) for s in seeds}
        torch.testing.assert_close(losses[t], torch.stack([loss.detach(), *d.values()]), rtol=0, atol=1e-11)
        with torch.no_grad():
            for k, p in params.items():
                decays = not any(x in k.lower() for x in ("bias", "norm", "ln_"))
                p.sub_(cfg["lr"] * (sum(d[s] * z[s][k] for s in seeds) / 2 + (cfg["weight_decay"] * p if decays else 0)))
    assert_matches_reference(model, ref, init)


def test_forward_grad_with_a_mask_moves_only_masked_coordinates():
    """Forward-Grad's directions go through the same shaping as the ZO-SGD family: with a mask,
    the tangent is m * z and the coordinates outside it keep their bytes."""
    model = tiny_model("opt")
    masks = random_masks(model)
    opt = make_optimizer("forward-grad", {"lr": 1e-2}, seed=0, total_steps=3)
    opt.set_mask(masks)
    m = copy.deepcopy(model)
    with ZOEngine(m) as engine:
        for t in range(3):
            step(engine, opt, make_batch("opt"), TokenNLL(True), t)
    w0 = dict(model.named_parameters())
    for k, p in m.named_parameters():
        if k in masks:
            assert torch.equal(p[~masks[k]], w0[k][~masks[k]]) and not torch.equal(p, w0[k]), k


def test_forward_grad_refuses_streaming_data_parallel_and_callables():
    from zoft.config import TrainConfig
    from zoft.distributed import check_supported
    from zoft.engine import Streaming

    from test_offload import deep_model

    opt = make_optimizer("forward-grad", {}, 0, 1)
    with ZOEngine(deep_model("llama"), offload=Streaming("cpu", resident_blocks=1)) as engine:
        with pytest.raises(UsageError, match="cannot stream; drop --gpu-mem"):
            bind(opt, engine)
    with pytest.raises(UsageError, match="forward-grad.*--nproc 1"):
        check_supported(TrainConfig(optimizer="forward-grad"), 2)
    with ZOEngine(tiny_model("opt")) as engine, pytest.raises(UsageError, match="differentiates a loss"):
        step(engine, opt, make_batch("opt"), lambda out, b: 0.0, 0)
    class Detached(TokenNLL):  # a loss the jvp cannot see through: refused, not a silent zero step
        def loss(self, outputs, batch, num_probes):
            return super().loss(outputs, batch, num_probes).detach()

    with ZOEngine(tiny_model("opt")) as engine, pytest.raises(UsageError, match="exactly 0"):
        step(engine, opt, make_batch("opt"), Detached(True), 0)
    for bad in ({"sphere": True}, {"one_sided": True}):
        with pytest.raises(UsageError):
            make_optimizer("forward-grad", bad, 0, 1)
