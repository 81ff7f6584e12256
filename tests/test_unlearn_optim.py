"""Unlearning optimizers: Q(x; N), sign-SGD / sign-Adam against their formulas, the hybrid's
FO/ZO step sequence, ZO steps through the engine, randomized smoothing."""
from __future__ import annotations

import itertools

import pytest
import torch
from eval_helpers import one_torch_thread, tiny_eval_opt, tok_fixture  # noqa: F401

from zoft.errors import UsageError
from zoft.unlearn import (
    CompressedFO,
    Runner,
    hybrid_phases,
    make_batch,
    make_objective,
    make_zo_engine,
    parse_optimizer_options,
    quantize_update,
)


def test_quantize_update_formula():
    x = torch.tensor([0.5, -1.0, 0.2, 0.0, 0.25])
    assert quantize_update(x, 1).tolist() == [1.0, -1.0, 1.0, 0.0, 1.0]
    # N = 3: L = 3 levels per side; 3x/max|x| = [1.5, -3, 0.6, 0, 0.75] -> round (half to even) [2, -3, 1, 0, 1]
    assert quantize_update(x, 3).tolist() == pytest.approx([2 / 3, -1.0, 1 / 3, 0.0, 1 / 3])
    # N = 2: L = 1: {-1, 0, 1}; 0.5 rounds to 0 (half to even)
    assert quantize_update(x, 2).tolist() == [0.0, -1.0, 0.0, 0.0, 0.0]
    assert quantize_update(torch.zeros(3), 4).tolist() == [0.0, 0.0, 0.0]
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    q = quantize_update(g, 8)
    assert len(torch.unique(q)) <= 2 ** 8 - 1 and (q - g / g.abs().max()).abs().max() <= 0.5 / 127 + 1e-7


def test_sign_sgd_step():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, -3.0, 0.5]))
    opt = CompressedFO([w], lr=0.1, base="sgd", bits=1, weight_decay=0.01)
    w0 = w.detach().clone()
    w.grad = torch.tensor([0.3, -0.0001, 0.0, -5.0])
    opt.step()
    assert torch.allclose(w.detach(), w0 - 0.1 * (torch.tensor([1.0, -1.0, 0.0, -1.0]) + 0.01 * w0))


def test_sign_adam_4bit_numbers_by_hand():
    """Two 4-bit sign-Adam steps (L = 2^3 - 1 = 7) against numbers worked out by hand from
    Q(x; N) = round(L x / max|x|) / L applied to Adam's direction d = m^/(sqrt(v^) + eps).

    step 1: d = g / (|g| + eps) = [1, -1, 0.99999]           -> 7 d / max|d| = [7, -7, 6.9999] -> Q = [1, -1, 1]
    step 2: m^ = (0.09 g1 + 0.1 g2) / 0.19 = [0.0895, -0.3053, 1.0531]
            v^ = (0.000999 g1^2 + 0.001 g2^2) / 0.001999 = [0.04998, 0.1000, 2.0010]
            d = [0.4002, -0.9652, 0.7445]                   -> 7 d / max|d| = [2.90, -7, 5.40] -> Q = [3, -7, 5] / 7
    w = [1, -2, 0.5] - 0.05 ([1, -1, 1] + [3/7, -1, 5/7]) = [1 - 0.5/7, -1.9, 0.5 - 0.6/7]
    (N = 5 would give [6, -15, 12]/15 in step 2, a floor [2, -7, 5]/7, a mean-scale other levels.)"""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = CompressedFO([w], lr=0.05, base="adam", bits=4, betas=(0.9, 0.999), eps=1e-8)
    for g in ([0.3, -0.2, 1e-3], [-0.1, -0.4, 2.0]):
        w.grad = torch.tensor(g)
        opt.step()
    assert w.detach().tolist() == pytest.approx([1 - 0.5 / 7, -1.9, 0.5 - 0.6 / 7], abs=1e-6)


def test_sign_adam_two_steps_match_formula():
    """1-bit sign-Adam = sign of Adam's bias-corrected direction (the N-bit Q: the test above)."""
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 0.05
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = CompressedFO([w], lr=lr, base="adam", bits=1, betas=(b1, b2), eps=eps)
    grads = [torch.tensor([0.3, -0.2, 1e-3]), torch.tensor([-0.1, -0.4, 2.0])]
    ref = w.detach().clone()
    m = torch.zeros(3)
    v = torch.zeros(3)
    for t, g in enumerate(grads, 1):
        w.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        d = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
        ref = ref - lr * torch.sign(d)
    assert torch.allclose(w.detach(), ref, atol=1e-7)


def test_hybrid_phases_pattern():
    assert hybrid_phases(8, 2, 2) == ["fo", "fo", "zo", "zo"] * 2
    assert hybrid_phases(6, 2, 1) == ["fo", "fo", "zo"] * 2
    # not a multiple: the first block is the partial one, the run still ends on a whole ZO block
    assert hybrid_phases(5, 2, 2) == ["zo", "fo", "fo", "zo", "zo"]
    assert hybrid_phases(40, 20, 20) == ["fo"] * 20 + ["zo"] * 20
    assert hybrid_phases(3, 1, 2) == ["fo", "zo", "zo"]


@pytest.fixture(scope="module")
def batch(tok):
    f = [tok(t)["input_ids"] for t in ["the movie was great", "a fine film with a lovely cast"]]
    r = [tok(t)["input_ids"] for t in ["an awful waste of time"]]
    return make_batch(tok, f, r)


def test_hybrid_runner_alternates_and_autograd_works_after_zo(tok, batch):
    model = tiny_eval_opt(tok)
    obj = make_objective("graddiff")
    opts = parse_optimizer_options("hybrid", {"fo_block": 2, "zo_block": 1, "q": 2, "mu": 1e-2})
    r = Runner("hybrid", model, obj, lr=1e-3, steps=6, options=opts)
    try:
        seen, snaps = [], []
        for t in range(6):
            seen.append(r.step(t, batch)["phase"])
            r.flush()
            snaps.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
        assert seen == ["fo", "fo", "zo"] * 2
        assert all(not torch.equal(a, b) for a, b in itertools.pairwise(snaps))  # every step moved the weights
        assert all(p.grad is None for p in model.parameters())  # FO steps clean up their gradients
    finally:
        r.close()
    # the engine's hooks are gone: the model is the plain model (autograd works, one-row outputs)
    with torch.enable_grad():
        obj.fo_loss(model, batch).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_zo_step_lr0_restores_and_uses_sphere(tok, batch):
    model = tiny_eval_opt(tok)
    w0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    opts = parse_optimizer_options("zo", {"q": 3, "mu": 1e-2})
    obj = make_objective("npo")
    obj.setup(model)  # the frozen copy is made before the engine hooks the model
    r = Runner("zo", model, obj, lr=0.0, steps=2, options=opts)
    try:
        assert r.zo.config.sphere and r.zo.config.n_queries == 3 and r.zo.name == "r-adazo"
        m = r.step(0, obj.prepare(batch))
        r.flush()
    finally:
        r.close()
    assert m["phase"] == "zo" and m["loss"] is not None
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), w0[k]), k


def test_zo_step_moves_along_sphere_estimate(tok, batch):
    """One ZO-SGD step (mezo-sgd, sphere, q = 1) equals w - lr g u with u = z/||z|| and
    g = (L(w + mu u) - L(w - mu u)) / (2 mu) computed by hand from the engine's noise."""
    model = tiny_eval_opt(tok)
    obj = make_objective("ga")
    opts = parse_optimizer_options("zo", {"zo_optimizer": "mezo-sgd", "q": 1, "mu": 1e-3})
    r = Runner("zo", model, obj, lr=1e-2, steps=1, options=opts, seed=5)
    w0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    seed = r.zo.seeds(0)[0]
    z = {k: r.engine.noise.sample(seed, k, p).clone() for k, p in r.engine.params.items()}
    r.step(0, batch)
    r.close()
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in z.values())).item()

    def loss_at(scale):
        m = tiny_eval_opt(tok)
        with torch.no_grad():
            for k, p in m.named_parameters():
                p.add_(scale * z[k] / norm)
            return obj.fo_loss(m, batch).item()

    g = (loss_at(1e-3) - loss_at(-1e-3)) / 2e-3
    for k, p in model.named_parameters():
        assert torch.allclose(p.detach(), w0[k] - 1e-2 * g * z[k] / norm, atol=1e-6), k


def test_smoothing_tends_to_plain_gradient(tok, batch):
    obj = make_objective("ga")

    def after_one_step(name, **o):
        model = tiny_eval_opt(tok)
        r = Runner(name, model, obj, lr=1e-3, steps=1, options=parse_optimizer_options(name, o), seed=1)
        r.step(0, batch)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    w0 = torch.cat([p.detach().flatten() for p in tiny_eval_opt(tok).parameters()])
    adam = after_one_step("adam")
    tiny = after_one_step("smooth", smoothing_sigma=1e-7, smoothing_samples=2)
    wide = after_one_step("smooth", smoothing_sigma=0.5, smoothing_samples=2)
    # Adam's first step is lr * sign(g) up to eps: compare moved coordinates
    assert ((tiny - adam).abs() > 1e-5).float().mean() < 0.01
    assert ((wide - adam).abs() > 1e-5).float().mean() > 0.05
    assert torch.equal(wide, after_one_step("smooth", smoothing_sigma=0.5, smoothing_samples=2))  # seeded
    assert not torch.equal(w0, tiny)


class _Vector(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(d))


class _Quadratic:
    """L(w) = 0.5 ||w||^2 + <a, w>: grad L(w + sigma e) = w + sigma e + a."""

    def __init__(self, a):
        self.a = a

    def fo_loss(self, model, batch):
        return 0.5 * model.w.square().sum() + (self.a * model.w).sum()


def test_smoothing_averages_s_gradients_at_sigma():
    """The smoothed gradient g~ (read from Adam's first moment, m_1 = (1 - b1) g~) and the logged
    loss at w = 0, d = 4096, sigma 0.1, S = 4, against their expected sizes:
    g~ = a + sigma mean_s e_s, so ||g~ - a||^2 ~ sigma^2 d / S = 10.24 (relative s.d. sqrt(2 / d)
    = 2.2%: 10% tolerance) and its mean coordinate is a's, 0.01 (s.d. 0.0008); the logged loss
    mean_s L(sigma e_s) = 0.5 sigma^2 mean_s ||e_s||^2 + sigma <a, mean e> ~ 0.5 sigma^2 d = 20.48
    (s.d. 1.1%: 5%). Summing instead of averaging multiplies both by S; a wrong sigma moves them
    by its square."""
    d, sigma, S = 4096, 0.1, 4
    a = torch.full((d,), 0.01)
    model = _Vector(d)
    opts = parse_optimizer_options("smooth", {"smoothing_sigma": sigma, "smoothing_samples": S})
    r = Runner("smooth", model, _Quadratic(a), lr=1e-3, steps=1, options=opts, seed=3)
    m = r.step(0, None)
    g = r.fo.state[model.w]["exp_avg"] / (1 - opts.betas[0])  # (d,) the smoothed gradient
    assert m["loss"] == pytest.approx(0.5 * sigma ** 2 * d, rel=0.05)
    assert (g - a).square().sum().item() == pytest.approx(sigma ** 2 * d / S, rel=0.1)
    assert g.mean().item() == pytest.approx(0.01, abs=0.004)


def test_hybrid_zo_phases_stream_with_the_resident_results(tok, batch):
    """The hybrid's ZO phases through the streaming engine (CPU twin, both blocks streamed) give
    the same per-step losses and final weights as resident; FO phases run on the same model
    (with write-back every 3 updates too: ``paused()`` writes every lagging block back first)."""
    from zoft.engine import Streaming

    out = []
    for offload in (None, Streaming("cpu", resident_blocks=0, prefetch=1),
                    Streaming("cpu", resident_blocks=0, prefetch=1, writeback_every=3)):
        model = tiny_eval_opt(tok)
        opts = parse_optimizer_options("hybrid", {"fo_block": 1, "zo_block": 2, "q": 2, "mu": 1e-2})
        obj = make_objective("npo")
        obj.setup(model)  # the frozen reference, before the engine's hooks (as zoft.unlearn.run does)
        r = Runner("hybrid", model, obj, lr=1e-3, steps=6, options=opts, offload=offload)
        try:
            losses = [r.step(t, r.objective.prepare(batch))["loss"] for t in range(6)]
            r.flush()
            if offload is not None:
                assert r.engine.offload.stats.uploads >= 4 * 2  # 4 ZO steps x 2 streamed blocks
        finally:
            r.close()
        out.append((losses, model))
    for streamed in out[1:]:
        assert streamed[0] == pytest.approx(out[0][0], rel=1e-5)
        for p, q in zip(streamed[1].parameters(), out[0][1].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=0)


def test_make_zo_engine_plans_under_gpu_mem(tok):
    model = tiny_eval_opt(tok)
    eng = make_zo_engine(model)
    assert eng.offload is None
    eng.close()
    eng = make_zo_engine(model, gpu_mem="1GB", num_probes=4, batch_rows=2, max_length=16)
    assert eng.offload is not None and len(eng.offload.streamed) == 0  # 2 blocks: all fit, all resident
    eng.close()
    with pytest.raises(UsageError, match="smallest plan needs"):
        make_zo_engine(tiny_eval_opt(tok), gpu_mem="1KB")


@pytest.mark.parametrize("zo_optimizer", ["r-adazo", "sparse-mezo"])
def test_zo_phases_under_gpu_mem_are_planned_for_a_stateful_optimizer(tok, batch, monkeypatch, zo_optimizer):
    """R-AdaZO (the ZO phases' default) and Sparse MeZO with re-masking hand out updates that are
    not seed-form (``optimizer.stateful``): under --gpu-mem the engine builder plans them so, with
    write-back every step and the update's whole fp32 copy (``make_plan(stateful=True)``), and the
    run streamed under that plan (both blocks streamed at the smallest budget) equals the resident
    run."""
    import zoft.engine.plan as planner

    made = []

    def spy(*args, **kw):
        made.append((args, kw, planner_make(*args, **kw)))
        return made[-1][2]

    planner_make = planner.make_plan
    monkeypatch.setattr(planner, "make_plan", spy)
    # Sparse MeZO re-derives its masks as updates land: sphere (the ZO phases' default) is refused with it
    sphere = zo_optimizer != "sparse-mezo"
    opts = parse_optimizer_options("zo", {"q": 1, "mu": 1e-2, "zo_optimizer": zo_optimizer, "sphere": sphere})
    rows, length = 3, 16
    kw = dict(batch_size=rows, max_length=length, num_probes=2, dtype="fp32", noise="torch", device="cpu")
    model = tiny_eval_opt(tok)
    budget = planner_make(model.config, "1GB", stateful=True, **kw).min_budget_bytes
    out = []
    for gpu_mem in (None, budget):
        model = tiny_eval_opt(tok)
        r = Runner("zo", model, make_objective("ga"), lr=1e-3, steps=3, options=opts, gpu_mem=gpu_mem,
                   batch_rows=rows, max_length=length)
        try:
            assert r.zo.stateful
            if gpu_mem is not None:
                (_, plan_kw, plan), = made
                assert plan_kw["stateful"] is True and plan == planner_make(model.config, budget, stateful=True, **kw)
                assert plan.writeback_every == 1 and r.engine.offload.writeback_every == 1
                assert plan.streamed_blocks == 2 and r.engine.offload.streamed
            losses = [r.step(t, r.objective.prepare(batch))["loss"] for t in range(3)]
            r.flush()
        finally:
            r.close()
        out.append((losses, model))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-5)
    for p, q in zip(out[1][1].parameters(), out[0][1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=0)


def test_bad_optimizer_options():
    with pytest.raises(UsageError, match="unknown option.*for optimizer"):
        parse_optimizer_options("hybrid", {"fo_blok": 3})
    with pytest.raises(UsageError, match="fo_block"):
        parse_optimizer_options("hybrid", {"fo_block": 0})
    with pytest.raises(UsageError, match="unknown optimizer"):
        parse_optimizer_options("lion", {})
