"""Noise backends: statistics, keyed determinism, independence, and convergence parity with the
reference backend (``torch``) on a fixed small problem."""
import copy
import math

import pytest
import torch
from test_engine import PROBE_SETS, TokenNLL, make_batch, reference_losses
from tiny_models import tiny_model

from zoft.engine import Update, ZOEngine
from zoft.noise import (
    BACKENDS,
    ZCHUNK,
    chunk_bounds,
    DISTRIBUTIONS,
    NoiseTable,
    TorchGeneratorNoise,
    make_noise,
)

N = 20_000  # elements per statistics check: 5 sigma of the mean is 0.035


def backend(name, dist):
    # a small table keeps the tests fast; the default (2^26 entries) behaves the same
    return NoiseTable(dist, size=1 << 18) if name == "table" else make_noise(name, dist)


CPU_BACKENDS = ["torch", "table"]
CASES = [(b, d) for b in CPU_BACKENDS for d in DISTRIBUTIONS]


@pytest.mark.parametrize("name,dist", CASES)
def test_statistics(name, dist):
    z = backend(name, dist).sample(123, "layer.weight", torch.empty(100, N // 100))
    assert z.shape == (100, N // 100) and z.dtype == torch.float32
    assert abs(z.mean().item()) < 5 / math.sqrt(N)
    if dist == "rademacher":
        assert set(z.unique().tolist()) == {-1.0, 1.0}
    elif dist == "sphere":
        assert math.isclose(z.double().pow(2).sum().item(), N, rel_tol=1e-5)  # |z|^2 = numel
    else:
        assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / N)
        assert abs(((z ** 3).mean()).item()) < 5 * math.sqrt(15 / N)  # symmetric
        assert abs((z ** 4).mean().item() - 3) < 5 * math.sqrt(96 / N)  # Gaussian kurtosis


@pytest.mark.parametrize("name,dist", CASES)
def test_keyed_determinism_and_independence(name, dist):
    like = torch.empty(N)
    a, b = backend(name, dist), backend(name, dist)  # two instances: nothing depends on history
    z = a.sample(7, "k1", like)
    b.sample(8, "k2", like)  # other draws in between, in another order, change nothing
    assert torch.equal(z, b.sample(7, "k1", like))
    assert torch.equal(z, a.sample(7, "k1", like))
    bound = 5 / math.sqrt(N)
    for other in (a.sample(8, "k1", like), a.sample(7, "k2", like), a.sample(7 + 2**40, "k1", like)):
        assert not torch.equal(z, other)
        corr = torch.corrcoef(torch.stack([z, other]))[0, 1].item()
        assert abs(corr) < bound  # independent across seeds and across tensors
    # neighbouring elements of one z are uncorrelated too (a table window is not smooth)
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < bound


@pytest.mark.parametrize("name,dist", CASES)
def test_axpy_is_decay_plus_terms(name, dist):
    nb = backend(name, dist)
    w = torch.randn(33, 17)
    want = 0.9 * w + 0.5 * nb.sample(1, "w", w) - 2.0 * nb.sample(2, "w", w)
    nb.axpy(w, [(1, 0.5), (2, -2.0), (3, 0.0)], "w", decay=0.9)
    torch.testing.assert_close(w, want, rtol=1e-6, atol=1e-6)


def test_registry_and_errors():
    assert {"torch", "table"} <= set(BACKENDS)
    assert isinstance(make_noise(), TorchGeneratorNoise) and make_noise().distribution == "gaussian"
    t = make_noise("table", "rademacher")
    assert isinstance(t, NoiseTable) and t.size == 1 << 26 and not t._tables  # built lazily
    with pytest.raises(ValueError, match="unknown noise backend"):
        make_noise("nope")
    with pytest.raises(ValueError, match="unknown distribution"):
        make_noise("table", "uniform")
    # the Philox backend exists everywhere (its torch reference off CUDA): a GPU run replays anywhere
    assert "triton" in BACKENDS


def test_default_noise_per_device():
    """The default of each device is the fastest backend that replays on any device: the table on
    the CPU; on CUDA the fused Philox kernels (no table on the device), the table without triton."""
    import importlib.util

    from zoft.noise import default_noise

    assert default_noise("cpu") == "table"
    assert default_noise("cuda") == ("triton" if importlib.util.find_spec("triton") else "table")


def test_torch_backend_gaussian_stream_is_unchanged():
    """The reference stream (and so every recorded trajectory) is what it was: randn per key."""
    from zoft.noise import mix
    g = torch.Generator().manual_seed(mix(5, "a.weight"))
    assert torch.equal(make_noise().sample(5, "a.weight", torch.empty(4, 3)), torch.randn(4, 3, generator=g))


def test_table_windows_are_views_identical_across_dtypes():
    nt = NoiseTable(size=1 << 16)
    t = nt.table()
    z = nt.sample(3, "w", torch.empty(64, 32))
    assert z.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()  # a view: no copy, no RNG
    o = nt.offset(3, "w", z.numel())
    assert o % NoiseTable.ALIGN == 0 and torch.equal(z.reshape(-1), t[o:o + z.numel()])
    zb = nt.sample(3, "w", torch.empty(64, 32, dtype=torch.bfloat16))
    assert zb.dtype == torch.float32 and torch.equal(zb, z)  # z is fp32 for narrow parameters
    assert torch.equal(nt.table("cpu", torch.bfloat16), t.to(torch.bfloat16))
    # same seed -> same table: a trajectory replays on any device that builds it
    assert torch.equal(NoiseTable(size=1 << 16).table(), t)
    assert not torch.equal(NoiseTable(size=1 << 16, table_seed=1).table(), t)


def test_table_tensor_larger_than_the_table():
    nt = NoiseTable(size=4096)
    z = nt.sample(1, "big", torch.empty(3, 5000))  # 15000 > 4096: four keyed windows
    assert z.shape == (3, 5000) and torch.equal(z, NoiseTable(size=4096).sample(1, "big", torch.empty(3, 5000)))
    t = nt.table().tolist()
    o = nt.offset(1, "big", 4096)
    assert z.reshape(-1)[:4096].tolist() == t[o:o + 4096]
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())


def test_engine_with_table_equals_separate_perturbed_passes():
    """The engine is backend-agnostic: the equivalence test of test_engine, with the table."""
    noise = NoiseTable(size=1 << 16)
    model = tiny_model("opt")  # tied embedding / lm_head
    ref = copy.deepcopy(model)
    obj, batch = TokenNLL(causal=True), make_batch("opt")
    engine = ZOEngine(model, noise=noise)
    upd = Update(terms=[(3, -1e-3), (4, 2e-3)], decay=1 - 1e-2)
    engine.set_update(upd)
    with torch.no_grad():
        for k, p in ref.named_parameters():
            decay = upd.decay if not any(s in k.lower() for s in ("bias", "norm", "ln_")) else 1.0
            p.copy_(decay * p + sum(c * noise.sample(s, k, p) for s, c in upd.terms))
    losses = engine.evaluate(PROBE_SETS["nquery+plain"], batch, obj)
    torch.testing.assert_close(losses, reference_losses(ref, PROBE_SETS["nquery+plain"], batch, obj, noise),
                               rtol=1e-5, atol=0)
    for (k, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=k)
    engine.close()


# -- convergence parity ---------------------------------------------------------------------
def mezo_regression(nb, seed: int, steps: int = 250, lr: float = 1e-2, eps: float = 1e-3) -> float:
    """MeZO-SGD (two-sided, one seed per step, update w -= lr * g * z) on a fixed least-squares
    problem through the backend's ``sample``/``axpy``; returns the final loss."""
    g = torch.Generator().manual_seed(0)  # the problem is fixed; ``seed`` only drives z
    X = torch.randn(64, 8, generator=g)  # (N, D)
    W_true, b_true = torch.randn(8, 4, generator=g), torch.randn(4, generator=g)
    Y = X @ W_true + b_true + 0.1 * torch.randn(64, 4, generator=g)  # (N, O)
    params = {"w": torch.zeros(8, 4), "b": torch.zeros(4)}

    def loss() -> float:
        return ((X @ params["w"] + params["b"] - Y) ** 2).mean().item()

    for t in range(steps):
        s = seed * 100_003 + t
        for k, p in params.items():
            nb.axpy(p, [(s, eps)], k)
        lp = loss()
        for k, p in params.items():
            nb.axpy(p, [(s, -2 * eps)], k)
        lm = loss()
        grad = (lp - lm) / (2 * eps)
        for k, p in params.items():
            nb.axpy(p, [(s, eps), (s, -lr * grad)], k)  # restore, then the update (one call)
    return loss()


def test_convergence_parity_across_backends():
    """Every backend/distribution reaches the reference's final loss within the run-to-run spread."""
    seeds = range(5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: OpenMP threads on a busy machine only wait on each other
    try:
        finals = {c: [mezo_regression(backend(*c), s) for s in seeds] for c in CASES}
    finally:
        torch.set_num_threads(threads)
    ref = torch.tensor(finals[("torch", "gaussian")])
    start = mezo_regression(backend("torch", "gaussian"), 0, steps=0)
    assert ref.mean() < 0.2 * start  # the problem is actually being optimised
    for case, vals in finals.items():
        v = torch.tensor(vals)
        spread = max(ref.std().item(), v.std().item())
        assert abs(v.mean().item() - ref.mean().item()) <= 3 * spread, (case, vals, ref.tolist())


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces (and rounding chunks) of 64 elements: many pieces on small tensors, fast."""
    import zoft.engine.precision as precision
    import zoft.noise as noise

    monkeypatch.setattr(noise, "ZCHUNK", 64)
    monkeypatch.setattr(precision, "SROUND_CHUNK", 64)
    return 64


def _pieces_backend(name, dist):
    # a table smaller than the tensors below: windows of several parts, pieces across them
    return NoiseTable(dist, size=160) if name == "table" else make_noise(name, dist)


# sizes (pieces of 64): one short piece; pieces plus a tail of < 16 elements (joined to the last
# piece: the CPU generator's block of 16); pieces plus a longer tail
PIECE_SIZES = [37, 3 * 64 + 5, 5 * 64 + 40]
ALL_CASES = [(b, d) for b in [*CPU_BACKENDS, "triton"] for d in DISTRIBUTIONS]


@pytest.mark.parametrize("name,dist", ALL_CASES)
def test_perturb_into_equals_w0_plus_scaled_sample(name, dist, small_pieces):
    """``perturb_into`` makes ``w0 + s z`` piece by piece (the Philox backend off CUDA: its torch
    reference at each piece's offset): equal to the whole draw, bit for bit (sphere: its norm is
    summed piece by piece, so up to a few ulps)."""
    nb = _pieces_backend(name, dist)
    for n in PIECE_SIZES:
        for dtype in (torch.float32, torch.bfloat16):
            w0 = torch.randn(n).to(dtype)
            out = torch.empty_like(w0)
            nb.perturb_into(out, w0, 3, "k", 0.25)
            want = torch.add(w0, nb.sample(3, "k", w0).to(dtype), alpha=0.25)
            if dist == "sphere":
                torch.testing.assert_close(out, want, rtol=2e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)
            else:
                assert torch.equal(out, want), (n, dtype)


@pytest.mark.parametrize("name", [*CPU_BACKENDS, "triton"])
def test_chunked_rounded_update_equals_the_whole_one(name, small_pieces):
    """A bf16/fp16 weight updated in fp32 pieces and rounded back piece by piece equals the
    whole-tensor path (an fp32 copy + ``stochastic_round_``) bit for bit (same keyed rounding
    draws), and an fp32 weight updated in pieces equals the whole update."""
    from zoft.engine.precision import stochastic_round_

    nb = _pieces_backend(name, "gaussian")
    terms = [(1, 0.5), (2, -0.25), (3, 0.0)]
    for n in PIECE_SIZES:
        for dtype in (torch.bfloat16, torch.float16):
            w0 = torch.randn(n).to(dtype)
            w32 = w0.float().mul_(0.9)
            for s, c in terms:
                w32.add_(nb.sample(s, "k", w32), alpha=c)
            want = stochastic_round_(torch.empty_like(w0), w32, 99)
            w = w0.clone()
            nb.axpy(w, terms, "k", 0.9, sround_seed=99)
            assert torch.equal(w, want), (n, dtype)
        w = torch.randn(n)
        want = w * 0.9 + 0.5 * nb.sample(1, "k", w) - 0.25 * nb.sample(2, "k", w)
        nb.axpy(w, terms, "k", 0.9)
        torch.testing.assert_close(w, want, rtol=0, atol=2e-7)


def test_rounding_in_pieces_is_rounding_the_whole():
    """``KeyedRounder`` over pieces of ``chunk_bounds`` (tail joined) draws what one
    ``stochastic_round_`` of the whole tensor draws, at the real chunk sizes."""
    from zoft.engine.precision import KeyedRounder, stochastic_round_

    x = torch.randn(ZCHUNK + 7) * 3
    want = stochastic_round_(torch.empty(x.shape, dtype=torch.bfloat16), x, 5)
    out, r = torch.empty_like(want), KeyedRounder(5, x.device)
    for lo, hi in chunk_bounds(x.numel()):
        r.round_(out[lo:hi], x[lo:hi], lo)
    assert chunk_bounds(x.numel()) == [(0, ZCHUNK + 7)] and torch.equal(out, want)


def test_cpu_generator_pieces_are_its_single_draw():
    """The torch backend cuts its CPU stream only because pieces of ``chunk_bounds`` drawn in turn
    equal one draw (torch.randn fills blocks of 16 and redraws a short tail); if a torch release
    changes that, this fails and ``TorchGeneratorNoise.chunked`` must return False on the CPU."""
    g = torch.Generator()
    for n in (15, 17, 2 * ZCHUNK + 5, ZCHUNK + 100_001):
        assert all((hi - lo) % 16 == 0 or hi == n for lo, hi in chunk_bounds(n))
        for dtype in (torch.float32, torch.float64):
            whole = torch.randn(n, generator=g.manual_seed(7), dtype=dtype)
            g.manual_seed(7)
            assert torch.equal(torch.cat([torch.randn(hi - lo, generator=g, dtype=dtype) for lo, hi in chunk_bounds(n)]),
                               whole)
    assert chunk_bounds(ZCHUNK + 5) == [(0, ZCHUNK + 5)] and chunk_bounds(ZCHUNK + 16) == [(0, ZCHUNK), (ZCHUNK, ZCHUNK + 16)]
