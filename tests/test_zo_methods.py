"""ZO methods beyond the ZO-SGD family (LOZO, SubZero): each against a hand-written reference of its
published update on a tiny fp64 model, and replay through ``zoft finetune`` /
``zoft replay``. Descent on least squares over seeds: ``DESCENT`` in ``tests/test_optim_family.py``;
streamed == resident: ``tests/test_offload.py``; data-parallel: ``tests/test_distributed.py``."""
import copy

import pytest
import torch

from test_engine import make_batch
from test_optim_family import BASE, TokenNLL64, assert_matches_reference, one_thread, plain_loss  # noqa: F401  (autouse fixture)
from test_train_cli import finetune_args, lm_data, tiny_dir  # noqa: F401  (fixtures)
from tiny_models import tiny_model
from zoft.engine import ZOEngine
from zoft.noise import make_noise, mix, step_seed
from zoft.optim import make_optimizer, step


def engine_steps(name: str, cfg: dict, steps: int = 3):
    """``steps`` engine steps of optimizer ``name`` on a tiny fp64 OPT and the make_batch("opt")
    batch; returns (trained model, untouched initial copy, a second copy for the hand reference,
    batch, objective, optimizer)."""
    model = tiny_model("opt", dtype=torch.float64)
    init, ref = copy.deepcopy(model), copy.deepcopy(model)
    batch, obj = make_batch("opt"), TokenNLL64(True)
    opt = make_optimizer(name, cfg, seed=3, total_steps=10)
    with ZOEngine(model) as engine:
        for t in range(steps):
            step(engine, opt, batch, obj, t)
    return model, init, ref, batch, obj, opt


def loss_at(model, batch, obj, direction):
    """The plain model's loss at ``w + direction`` ({name: tensor})."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in m.named_parameters():
            p.add_(direction[k])
    return plain_loss(m, batch, obj)


def lowrank_direction(name, cfg, noise, seed, t, s, k, p):
    """The direction of seed ``s`` (step t) for parameter k, written from the papers / official code."""
    if p.ndim != 2:
        return noise.sample(s, k, p)
    block = mix(seed * 1_000_003 + t // cfg["interval"], f"{name}-block")
    (m, n), r = p.shape, cfg["rank"]
    if name == "lozo":  # U fresh per step and query, V per block
        u = noise.sample(s, k + "/lozo-u", torch.empty(m, r, dtype=p.dtype))
        v = noise.sample(block, k + "/lozo-v", torch.empty(n, r, dtype=p.dtype))
        return u @ v.T
    # subzero: orthonormal U, V per block (QR of Gaussians), an r x r Gaussian core per step and query
    r = min(r, m, n)
    u, _ = torch.linalg.qr(noise.sample(block, k + "/subzero-u", torch.empty(m, r, dtype=p.dtype)))
    v, _ = torch.linalg.qr(noise.sample(block, k + "/subzero-v", torch.empty(n, r, dtype=p.dtype)))
    z0 = noise.sample(s, k + "/subzero-z", torch.empty(r, r, dtype=p.dtype))
    return u @ z0 @ v.T * (m * n / r ** 2) ** 0.5


def lowrank_reference(name, cfg, model, batch, obj, seed, steps):
    """LOZO's Algorithm 1 (= the official lowrank_zo_step / lowrank_zo_update) and SubZero's
    (zo_subspace_step / zo_subspace_update) on dense tensors: g_i from +-eps Z_i, then
    w <- w - lr ((1/q) sum_i g_i Z_i + wd w), decay only on non-bias/norm weights."""
    noise = make_noise()
    params = dict(model.named_parameters())
    q, eps, lr = cfg["n_queries"], cfg["eps"], cfg["lr"]
    for t in range(steps):
        seeds = [step_seed(seed, t, i) for i in range(q)]
        dirs = {s: {k: lowrank_direction(name, cfg, noise, seed, t, s, k, p) for k, p in params.items()}
                for s in seeds}
        g = {s: (loss_at(model, batch, obj, {k: eps * d for k, d in dirs[s].items()})
                 - loss_at(model, batch, obj, {k: -eps * d for k, d in dirs[s].items()})) / (2 * eps) for s in seeds}
        with torch.no_grad():
            for k, p in params.items():
                decays = not any(x in k.lower() for x in ("bias", "norm", "ln_"))
                p.sub_(lr * (sum(g[s] * dirs[s][k] for s in seeds) / q + (cfg["weight_decay"] * p if decays else 0)))


@pytest.mark.parametrize("name", ["lozo", "subzero"])
def test_lowrank_step_matches_hand_written_reference(name):
    """Three steps across a factor refresh (interval 2), rank 2, two queries, weight decay, on a
    tiny OPT in fp64. What differs is the reduction order of batched vs plain matmuls (~1e-16)
    times 1/(2 eps): atol 1e-11 (as the ZO-SGD family's reference test)."""
    cfg = {**BASE, "lr": 1e-2, "n_queries": 2, "rank": 2, "interval": 2}
    model, init, ref, batch, obj, opt = engine_steps(name, cfg)
    lowrank_reference(name, cfg, ref, batch, obj, seed=3, steps=3)
    assert_matches_reference(model, ref, init)


@pytest.mark.parametrize("name", ["lozo", "subzero"])
def test_lowrank_directions_have_rank_r_and_lazy_factors(name):
    """A matrix's direction has rank r; within an interval its row space (V) is shared, across
    intervals it is not."""
    model = tiny_model("opt", dtype=torch.float64)
    opt = make_optimizer(name, {"rank": 2, "interval": 3}, seed=0, total_steps=10)
    with ZOEngine(model) as engine:
        from zoft.optim import bind
        noise = bind(opt, engine)
        key = next(k for k, p in engine.params.items() if p.ndim == 2 and min(p.shape) > 4)
        w = engine.params[key]
        z = {t: noise.sample(opt.seeds(t)[0], key, w) for t in (0, 2, 3)}
    assert all(torch.linalg.matrix_rank(d).item() == 2 for d in z.values())

    def same_rowspace(a, b):
        return torch.linalg.matrix_rank(torch.cat([a, b])).item() == 2

    assert same_rowspace(z[0], z[2]) and not same_rowspace(z[0], z[3])


def test_fzoo_matches_hand_written_reference():
    """FZOO as the official zo_step / zo_update compute it, on dense tensors: l0 = L(w), l_i =
    L(w + eps u_i) with u_i = sign(z_i) (Rademacher), sigma = population std of the l_i, w <- w -
    lr (sum_i (l_i - l0) / (N sigma) u_i + wd w). Three steps, N = 4, tiny OPT in fp64; atol 1e-11
    (batched vs plain matmul reduction order, ~1e-16, divided by sigma)."""
    cfg = {**BASE, "lr": 1e-2, "n": 4}
    model, init, ref, batch, obj, opt = engine_steps("fzoo", cfg)
    noise, params = make_noise(), dict(ref.named_parameters())
    for t in range(3):
        seeds = [step_seed(3, t, i) for i in range(cfg["n"])]
        u = {s: {k: noise.sample(s, k, p).sign() for k, p in params.items()} for s in seeds}
        l0 = plain_loss(ref, batch, obj)
        li = torch.tensor([loss_at(ref, batch, obj, {k: cfg["eps"] * v for k, v in u[s].items()}) for s in seeds],
                          dtype=torch.float64)
        coef = (li - l0) / (cfg["n"] * li.std(unbiased=False))
        with torch.no_grad():
            for k, p in params.items():
                decays = not any(x in k.lower() for x in ("bias", "norm", "ln_"))
                p.sub_(cfg["lr"] * (sum(c * u[s][k] for s, c in zip(seeds, coef.tolist()))
                                    + (cfg["weight_decay"] * p if decays else 0)))
    assert_matches_reference(model, ref, init)


def test_fzoo_refuses_data_parallel_and_bad_options():
    from zoft.config import TrainConfig
    from zoft.distributed import check_supported
    from zoft.errors import UsageError

    with pytest.raises(UsageError, match="fzoo.*--nproc 1"):
        check_supported(TrainConfig(optimizer="fzoo"), 2)
    with pytest.raises(UsageError, match="n must be >= 2"):
        make_optimizer("fzoo", {"n": 1}, 0, 1)


@pytest.mark.parametrize("name", ["lozo", "subzero", "fzoo", "mezo-sgd+sparse", "zo-adam+sparse"])
def test_finetune_with_defaults_and_replay_equals_trained_weights(name, tiny_dir, lm_data, tmp_path):
    """``zoft finetune --optimizer NAME`` with the method's defaults (only lr raised so that 6 steps
    move fp32 weights visibly; ``+sparse``: ``gradient_sparsity: 0.75`` from a config file), then
    ``zoft replay``: bit-identical weights."""
    from safetensors.torch import load_file

    from zoft.cli import main

    out, extra = tmp_path / "run", []
    if name.endswith("+sparse"):
        (tmp_path / "sparse.yaml").write_text("optimizer_options: {gradient_sparsity: 0.75}\n")
        extra = ["--config", str(tmp_path / "sparse.yaml")]
    opt = name.split("+")[0]
    assert main(finetune_args(tiny_dir, lm_data, out, "--optimizer", opt, *extra)) == 0
    assert ("gradient_sparsity: 0.75" in (out / "config.yaml").read_text()) == bool(extra)
    assert main(["replay", str(out), "--output", str(tmp_path / "replayed")]) == 0
    a = load_file(str(out / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "replayed" / "model.safetensors"))
    init = load_file(str(tiny_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], init[k]) for k in a)


@pytest.mark.parametrize("name,every", [("mezo-sgd", 1), ("zo-adam", 1), ("lozo", 1), ("lozo", 8), ("fzoo", 8)])
def test_gradient_sparsity_streamed_equals_resident(name, every):
    """ZO-Bench's sparse directions (a keyed mask per direction) under block streaming, also with
    a deferred write-back (``writeback_every``: updates re-applied steps later, so LOZO's seed ->
    step map must reach back): the same losses and weights as resident (rtol 1e-5, the
    Equivalence invariant of tests/test_offload.py)."""
    opts = {"gradient_sparsity": 0.75, **({"interval": 2} if name == "lozo" else {})}
    assert_streamed_equals_resident(name, opts, steps=12, every=every)


def assert_streamed_equals_resident(name, opts, steps, every):
    """``steps`` steps of optimizer ``name`` on a tiny Llama, resident and streamed (one resident
    block, write-back every ``every`` updates): the same losses and weights (rtol 1e-5)."""
    from test_engine import TokenNLL
    from test_offload import RTOL, assert_same_weights, deep_model
    from zoft.engine import Streaming
    from zoft.optim import bind, evaluate_step

    batch, obj, results = make_batch("llama"), TokenNLL(True), []
    for offload in (None, Streaming("cpu", resident_blocks=1, prefetch=2, writeback_every=every)):
        model = deep_model("llama")
        eng = ZOEngine(model, offload=offload)
        opt = make_optimizer(name, {"lr": 1e-3, "eps": 1e-3, **opts}, seed=3, total_steps=4)
        bind(opt, eng)
        losses = []
        for t in range(steps):
            loss = evaluate_step(eng, opt, t, batch, obj)
            eng.set_update(opt.update(t, loss)[0])
            losses.append(loss)
        eng.close()
        results.append((torch.cat(losses), model))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=RTOL, atol=0)
    assert_same_weights(results[1][1], results[0][1])


def test_gradient_sparsity_zeroes_the_documented_fraction():
    """Entries zeroed where a second keyed N(0, 1) draw < s: a fraction Phi(s) (0.773 at 0.75)."""
    model = tiny_model("opt")
    opt = make_optimizer("mezo-sgd", {"gradient_sparsity": 0.75}, seed=0, total_steps=1)
    with ZOEngine(model) as engine:
        from zoft.optim import bind
        noise = bind(opt, engine)
        zs = [noise.sample(opt.seeds(0)[0], k, p) for k, p in engine.params.items()]
    frac = sum(int((z == 0).sum()) for z in zs) / sum(z.numel() for z in zs)
    assert abs(frac - 0.7734) < 0.01, frac  # d ~ 30k: s.d. of the fraction ~ 0.0024
