"""Each Triton kernel of ``zoft.kernels`` against its pure-torch reference, on the CPU under the
Triton interpreter (``TRITON_INTERPRET=1``), over odd shapes and the dtypes the engine uses.

Tolerances, and why:
- Philox words, Rademacher signs, stochastic rounding, int8 dequantisation to fp32/fp16: bitwise
  (integer arithmetic, or one correctly rounded multiply on both sides). NaN payloads are not
  compared (numpy and torch pick different quiet NaNs), only NaN positions.
- Any fp32 -> bf16 cast in a kernel: one bf16 ulp. The interpreter emulates that cast by
  truncation (``triton/runtime/interpreter.py``, ``_convert_float``), GPUs round to nearest-even
  like torch; measured here: dequantisation to bf16 differs from torch by exactly 0 or 1 ulp.
- Gaussian z: 4e-6 absolute. Both sides run the same fp32 Box-Muller; log/sqrt/cos come from
  numpy (interpreter) and torch (reference), each within ~1 ulp (measured max 3.6e-7).
- fused axpy: fp32 within 1e-5 absolute + 1e-6 relative (z's ulps times |c| <= 1, plus one fp32
  rounding of the accumulator); bf16/fp16 results within one ulp of the output dtype (an fp32
  ulp of difference can flip a round-to-nearest).
"""
import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton): the interpreter tests need it",
                allow_module_level=True)


SESSION_INTERPRETS = os.environ.get("TRITON_INTERPRET") == "1"  # set by whoever started pytest


def _package():
    """``zoft.kernels``; in a source checkout without ``pip install -e .`` it is ``kernels/``
    (setuptools ``package-dir`` maps it at install time), so load it from there under its name."""
    try:
        import zoft.kernels as pkg
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parents[1] / "kernels"
        spec = importlib.util.spec_from_file_location("zoft.kernels", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["zoft.kernels"] = pkg
        spec.loader.exec_module(pkg)
    return pkg


@contextlib.contextmanager
def _interpreter():
    """``TRITON_INTERPRET=1`` while the block runs (``triton.jit`` reads it when it decorates)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def _interpreted_kernels() -> dict:
    """Private copies of the kernel modules, decorated under the interpreter. The environment and
    ``sys.modules`` are restored afterwards, so the rest of a session (on a GPU machine: the
    compiled kernels, ``pytest -m gpu``) never sees an interpreted kernel."""
    pkg = _package()
    if not pkg.HAS_TRITON:
        pytest.skip(f"triton < {'.'.join(map(str, pkg.TRITON_MIN))}: the kernels fall back to torch",
                    allow_module_level=True)
    with _interpreter():
        import triton.language as tl
    if type(tl.randint4x).__name__ != "InterpretedFunction":
        # triton was imported compiled (a GPU session: conftest imports it interpreted only without
        # CUDA); its library functions cannot run under the interpreter. The compiled kernels are
        # checked against the same references by `pytest -m gpu` and bench/gpu_check.py.
        pytest.skip("triton was imported in compiled mode in this session; run "
                    "`TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py` for the interpreter tests",
                    allow_module_level=True)
    root = Path(pkg.__file__).parent
    names = ("_triton", "philox", "axpy", "sround", "codec8")
    saved = {n: sys.modules.get(f"zoft.kernels.{n}") for n in names}
    mods = {}
    with _interpreter():
        try:
            for n in names:  # in dependency order: each copy imports the copies before it
                spec = importlib.util.spec_from_file_location(f"zoft.kernels.{n}", root / f"{n}.py")
                mods[n] = importlib.util.module_from_spec(spec)
                sys.modules[f"zoft.kernels.{n}"] = mods[n]
                spec.loader.exec_module(mods[n])
            mods["words"] = _words_kernel()
        finally:
            for n, m in saved.items():
                if m is None:
                    sys.modules.pop(f"zoft.kernels.{n}", None)
                else:
                    sys.modules[f"zoft.kernels.{n}"] = m
    return mods


def _words_kernel():
    """Test-only kernel: the four raw Philox words, to compare the integer stream bit for bit."""
    import triton
    import triton.language as tl

    @triton.jit
    def words(out_ptr, n, seed, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        r0, r1, r2, r3 = tl.randint4x(seed, offs)
        tl.store(out_ptr + offs * 4 + 0, r0.to(tl.int32, bitcast=True), mask=mask)
        tl.store(out_ptr + offs * 4 + 1, r1.to(tl.int32, bitcast=True), mask=mask)
        tl.store(out_ptr + offs * 4 + 2, r2.to(tl.int32, bitcast=True), mask=mask)
        tl.store(out_ptr + offs * 4 + 3, r3.to(tl.int32, bitcast=True), mask=mask)

    return words


K = _interpreted_kernels()
philox, axpy, sround, codec8 = K["philox"], K["axpy"], K["sround"], K["codec8"]
import triton  # noqa: E402

import zoft.kernels.philox as installed_philox  # noqa: E402  (what the rest of a session imports)


@pytest.fixture(autouse=True)
def _interpreting(monkeypatch):
    """The interpreter reads ``TRITON_INTERPRET`` while it runs too: set for each test of this
    module only, never for the session."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

SHAPES = [(1,), (7,), (1023,), (1025,), (33, 65), (3, 5, 7)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SEEDS = [0, 1, 2**31 + 5, 2**62 + 12345]  # small, > 32 bits: both key words matter


def test_philox_reference_matches_random123_known_answers():
    # Random123 kat_vectors, philox4x32_10: (counter words, key words) -> output words
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((M := 0xFFFFFFFF, M, M, M), (M, M), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, want in kat:
        got = philox.philox4x32_ref(*[torch.tensor([c]) for c in ctr], *key)
        assert [int(g) for g in got] == list(want)


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_words_bitwise(seed):
    n = 1500
    out = torch.empty(n, 4, dtype=torch.int32)
    K["words"][(triton.cdiv(n, 512),)](out, n, seed, BLOCK=512)
    ref = torch.stack(philox.randint4x_ref(seed, torch.arange(n)), 1)  # (n, 4) in [0, 2^32)
    assert torch.equal(out.to(torch.int64) & philox.M32, ref)


@pytest.mark.parametrize("seed", SEEDS[1:])
def test_sample_kernel_vs_reference(seed):
    n = 2049
    zt = philox.sample_triton(seed, n, "cpu", "gaussian")
    zr = philox.sample_ref(seed, n, "cpu", "gaussian")
    torch.testing.assert_close(zt, zr, rtol=0, atol=4e-6)
    assert abs(zr.mean().item()) < 5 / n ** 0.5 and abs(zr.var().item() - 1) < 0.15
    rt = philox.sample_triton(seed, n, "cpu", "rademacher")
    assert torch.equal(rt, philox.sample_ref(seed, n, "cpu", "rademacher"))
    assert set(rt.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_axpy_kernel_vs_reference(shape, dtype):
    g = torch.Generator().manual_seed(hash((shape, str(dtype))) % 1000)
    w0 = torch.randn(shape, generator=g).to(dtype)
    terms = [(SEEDS[2], -0.3), (SEEDS[3], 1e-3), (7, 0.5)]  # update term, perturbation, another
    for dist in ("gaussian", "rademacher"):
        wt, wr = w0.clone(), w0.clone()
        axpy.fused_axpy_triton(wt, 0.99, terms, dist)
        axpy.fused_axpy_ref(wr, 0.99, terms, dist)
        assert wt.dtype == dtype and wt.shape == w0.shape
        if dtype == torch.float32:
            torch.testing.assert_close(wt, wr, rtol=1e-6, atol=1e-5)
        else:
            ulp = torch.finfo(dtype).eps * wr.float().abs().clamp_min(torch.finfo(dtype).tiny)
            assert ((wt.float() - wr.float()).abs() <= ulp * 1.01).all()


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_kernels_at_an_offset_and_the_perturbed_copy(dist):
    """A piece of a tensor updated on its own (``offset``) sees the same z as the whole tensor;
    ``fused_perturb`` writes ``w0 + s z`` in one pass (w0 untouched), like its reference."""
    n, lo = 3000, 1024
    zt = philox.sample_triton(SEEDS[2], n - lo, "cpu", dist, offset=lo)
    torch.testing.assert_close(zt, philox.sample_ref(SEEDS[2], n, "cpu", dist)[lo:], rtol=0, atol=4e-6)
    torch.testing.assert_close(philox.sample_ref(SEEDS[2], n - lo, "cpu", dist, offset=lo),
                               philox.sample_ref(SEEDS[2], n, "cpu", dist)[lo:], rtol=0, atol=0)
    w = torch.randn(n)
    whole, piece = w.clone(), w[lo:].clone()
    axpy.fused_axpy_triton(whole, 0.9, [(SEEDS[3], 0.25)], dist)
    axpy.fused_axpy_triton(piece, 0.9, [(SEEDS[3], 0.25)], dist, offset=lo)
    torch.testing.assert_close(piece, whole[lo:], rtol=0, atol=0)
    for dtype in DTYPES:
        w0 = torch.randn(33, 65).to(dtype)
        keep = w0.clone()
        ot, orf = torch.empty_like(w0), torch.empty_like(w0)
        axpy.fused_perturb_triton(ot, w0, SEEDS[1], -1e-3, dist)
        axpy.fused_perturb_ref(orf, w0, SEEDS[1], -1e-3, dist)
        assert torch.equal(w0, keep)
        ulp = torch.finfo(dtype).eps * orf.float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((ot.float() - orf.float()).abs() <= ulp * 1.01 + 1e-6).all()


def test_fused_axpy_no_terms_is_the_decay():
    w = torch.randn(1025)
    want = w * torch.tensor(0.5)
    axpy.fused_axpy_triton(w, 0.5, [])
    assert torch.equal(w, want)


@pytest.mark.parametrize("shape", SHAPES)
def test_stochastic_rounding_kernel_bitwise(shape):
    x = torch.randn(shape) * 3
    x.view(-1)[0] = float("nan")
    if x.numel() > 2:
        x.view(-1)[1], x.view(-1)[2] = float("inf"), -float("inf")
    yt, yr = sround.sround_bf16_triton(x, 11), sround.sround_bf16_ref(x, 11)
    assert yt.dtype == torch.bfloat16 and yt.shape == x.shape
    nan = torch.isnan(yr)
    assert torch.equal(torch.isnan(yt), nan) and bool(nan.view(-1)[0])
    assert torch.equal(yt[~nan].view(torch.int16), yr[~nan].view(torch.int16))  # bitwise
    if x.numel() > 2:
        assert yt.view(-1)[1] == float("inf") and yt.view(-1)[2] == -float("inf")


def test_stochastic_rounding_is_unbiased_and_keeps_tiny_updates():
    # 1 + 2^-10: a quarter of a bf16 ulp above 1; round-to-nearest would always give 1.0
    x = torch.full((4096,), 1 + 2 ** -10)
    y = sround.sround_bf16_triton(x, 3).float()
    assert set(y.unique().tolist()) <= {1.0, 1 + 2 ** -7}
    frac_up = (y > 1).float().mean().item()
    assert abs(frac_up - 0.125) < 0.03  # P(up) = 2^-10 / 2^-7; 5 sigma at n=4096 is ~0.026
    assert x.to(torch.bfloat16).float().eq(1.0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [64, 100])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize8_kernel_bitwise(shape, block, dtype):
    x = torch.randn(shape) * torch.logspace(-3, 1, shape[-1]).expand(shape)
    q, s = codec8.quantize8(x, block)
    assert q.dtype == torch.int8 and s.numel() == -(-x.numel() // block)
    yt = codec8.dequantize8_triton(q, s, block, x.shape, dtype)
    yr = codec8.dequantize8_ref(q, s, block, x.shape, dtype)
    assert yt.dtype == dtype
    if dtype == torch.bfloat16:  # interpreter truncates fp32 -> bf16 (see the module docstring)
        ulp = torch.finfo(dtype).eps * yr.float().abs()
        assert ((yt.float() - yr.float()).abs() <= ulp * 1.01).all()
    else:
        assert torch.equal(yt, yr)
    # round trip: at most half a quantisation step (absmax / 254) per block, before the cast
    err = (codec8.dequantize8_ref(q, s, block, x.shape) - x).abs().reshape(-1)
    step = s.repeat_interleave(block)[: x.numel()]
    assert (err <= step / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("dist", ["gaussian", "rademacher", "sphere"])
def test_philox_noise_backend_on_the_interpreter(dist, monkeypatch):
    """The ``triton`` backend class (registered only with CUDA) draws the kernel's stream."""
    from zoft.noise import PhiloxNoise, mix

    pkg = _package()  # the backend imports ``zoft.kernels.philox``/``axpy``: the interpreted copies,
    for n in ("_triton", "philox", "axpy"):  # for this test only
        monkeypatch.setitem(sys.modules, f"zoft.kernels.{n}", K[n])
        monkeypatch.setattr(pkg, n, K[n], raising=False)

    nb = PhiloxNoise(dist)
    like = torch.empty(41, 50)
    z = nb.sample(5, "w", like)
    assert z.shape == like.shape and torch.equal(z, PhiloxNoise(dist).sample(5, "w", like))
    assert not torch.equal(z, nb.sample(6, "w", like)) and not torch.equal(z, nb.sample(5, "v", like))
    if dist == "sphere":
        assert abs(z.double().norm().item() ** 2 - like.numel()) < 1e-2
    else:
        ref = philox.sample_ref(mix(5, "w"), like.numel(), "cpu", dist).view(like.shape)
        torch.testing.assert_close(z, ref, rtol=0, atol=4e-6)
    w = torch.randn(41, 50)
    want = 0.5 * w + 0.25 * z
    nb.axpy(w, [(5, 0.25)], "w", decay=0.5)
    torch.testing.assert_close(w, want, rtol=1e-6, atol=1e-6)


def test_the_session_keeps_compiled_kernels():
    """Loading the interpreted copies leaves ``zoft.kernels`` as installed: on a GPU machine the
    rest of the session (``pytest -m gpu``) runs compiled kernels, not the interpreter."""
    if SESSION_INTERPRETS:
        pytest.skip("TRITON_INTERPRET=1: this session interprets every kernel by request")
    real = installed_philox
    assert real is not K["philox"] and sys.modules["zoft.kernels.philox"] is real
    assert type(real._sample_kernel).__name__ == "JITFunction"
    assert type(K["philox"]._sample_kernel).__name__ == "InterpretedFunction"
