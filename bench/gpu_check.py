"""The first thing to run on a lent GPU: zoft's CUDA paths checked end to end, in < 8 minutes on one
H200. Prints one table (section, check, value, expected, ok) and exits 1 on any failure.

  1. environment   versions; the Triton backend present (triton >= 3.4, the ``triton`` noise backend)
  2. link          pinned host-to-device and device-to-host bandwidth (1 GiB); a non-blocking copy
                   returns before it completes (the scheduler's overlap depends on it); a refused
                   page-lock falls back without leaving a CUDA error behind
  3. equivalence   a tiny OPT streamed (0 resident blocks) against the all-resident engine, 3 MeZO
                   steps: fp32, fp16 and bf16 weights with codec ``same`` (rel 1e-5), the bf16 and
                   int8 codecs (lossy uploads: looser, stated per row), unit-sphere directions
                   (norms drawn on the device); zero stalls after the first step; after ``close()``
                   every parameter on one device
  4. kernels       each compiled Triton kernel against its torch reference (Philox z, fused axpy in
                   fp32/bf16/fp16, stochastic rounding, int8 decode), also on tensors past 2^31
                   elements (compared on windows around 2^31: 64-bit offsets)
  5. memory        an OPT-1.3B-shaped streamed step (random fp16 weights, 1 x 2048 tokens) at the
                   smallest plan: ``max_memory_allocated`` / ``max_memory_reserved`` next to the plan
  6. step time     the same shape at 1 x 2048 and 8 x 512: streamed vs resident vs the planner's
                   lower bound (fed the bandwidth of section 2 and a measured fp16 matmul rate)

    python bench/gpu_check.py [--json FILE]          # on a GPU
    python bench/gpu_check.py --sanitize             # section 3, tiny, under TORCH_CUDA_SANITIZER=1
    python bench/gpu_check.py --dry-run              # every section on the CPU with tiny shapes

``--dry-run`` walks every section on the CPU (the CPU twin, the torch references, tiny shapes); the
GPU-only facts (bandwidth, non-blocking copies, compiled kernels) are reported as ``n/a``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import OPTConfig


def _sibling(name: str):
    """``bench/<name>.py`` as a module (its helpers: random weights, the MeZO step loop)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


go = _sibling("gpu_offload")
ROWS: list[dict] = []


def check(section: str, name: str, value, expected: str, ok: bool | None) -> bool:
    """One table row; ``ok=None``: reported, not checked (n/a on this device)."""
    ROWS.append({"section": section, "check": name, "value": value, "expected": expected, "ok": ok})
    mark = "n/a" if ok is None else ("ok" if ok else "FAIL")
    print(f"[{section}] {name}: {value} (expected {expected}) -> {mark}", flush=True)
    return bool(ok) or ok is None


def guarded(section: str):
    """Run a section; an exception is one failed row (the other sections still run)."""
    def wrap(fn):
        def run(*a, **kw):
            try:
                return fn(*a, **kw)
            except Exception as e:  # noqa: BLE001 - reported in the table, then the exit code
                check(section, "raised", f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}",
                      "no exception", False)
        return run
    return wrap


# -- 1. environment ------------------------------------------------------------------------------
@guarded("environment")
def environment(device: torch.device) -> None:
    import transformers

    from zoft.kernels import HAS_TRITON, TRITON_MIN
    from zoft.noise import BACKENDS

    check("environment", "python / torch / transformers",
          f"{platform.python_version()} / {torch.__version__} / {transformers.__version__}", "-", None)
    cuda = device.type == "cuda"
    check("environment", "device", torch.cuda.get_device_name(device) if cuda else "cpu",
          "a CUDA device" if cuda else "cpu (dry run)", True if cuda else None)
    if cuda:
        check("environment", "CUDA runtime / capability",
              f"{torch.version.cuda} / sm_{''.join(map(str, torch.cuda.get_device_capability(device)))}", "-", None)
    try:
        from importlib.metadata import version
        tv = version("triton")
    except Exception:  # noqa: BLE001
        tv = "absent"
    want = ".".join(map(str, TRITON_MIN))
    check("environment", "triton", tv, f">= {want}", HAS_TRITON if cuda else None)
    check("environment", "noise backends", ",".join(sorted(BACKENDS)), "includes triton",
          "triton" in BACKENDS if cuda else None)


# -- 2. link -------------------------------------------------------------------------------------
@guarded("link")
def link(device: torch.device, nbytes: int) -> float:
    """Pinned H2D and D2H GB/s (10^9 B/s); returns H2D for the planner (25 on the CPU)."""
    if device.type != "cuda":
        host, dev = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
        dev.copy_(host)
        check("link", "pinned H2D / D2H GB/s", "n/a", "> 10", None)
        check("link", "non-blocking copy returns before it completes", "n/a", "yes", None)
        return 25.0
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rates = []
    for dst, src in ((dev, host), (host, dev)):
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(5):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        rates.append(5 * nbytes / (time.perf_counter() - t0) / 1e9)
    check("link", "pinned H2D / D2H GB/s", f"{rates[0]:.1f} / {rates[1]:.1f}", "> 10 each", min(rates) > 10)
    done = torch.cuda.Event()
    t0 = time.perf_counter()
    dev.copy_(host, non_blocking=True)
    done.record()
    returned_s = time.perf_counter() - t0
    early = not done.query()
    torch.cuda.synchronize(device)
    check("link", "non-blocking copy returns before it completes",
          f"returned after {returned_s * 1e3:.2f} ms, pending: {early}", "pending", early)
    # a refused page-lock (here: registering the same buffer twice) falls back without leaving a
    # CUDA error behind for the next kernel launch to report
    from zoft.engine.offload import HostPins

    buf, pins = torch.empty(1 << 20, dtype=torch.uint8), HostPins()
    first, second = pins.pin(buf), pins.pin(buf)
    torch.ones(1024, device=device).sum().item()  # raises if the refusal's error were still pending
    pins.release()
    check("link", "refused page-lock falls back, no stale CUDA error", f"pinned {first}, twice {second}",
          "True, False", first and not second)
    return rates[0]


# -- 3. equivalence ------------------------------------------------------------------------------
TINY = dict(vocab_size=512, hidden_size=64, ffn_dim=256, num_hidden_layers=5, num_attention_heads=4,
            max_position_embeddings=128, use_cache=False)


def _tiny_model(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(OPTConfig(**TINY)).to(dtype).eval()


def _run(model, device, batch, offload, sphere: bool):
    """3 steps; returns (losses, stalls after step 1, stalls after step 3). Unit-sphere runs go
    through ``zoft.optim`` (its norms); the others apply a fixed seed-form update with decay, so a
    lossy codec's run applies the same terms as the resident one and any codec error that reached
    the master would show in the weights."""
    from zoft.engine import Probe, Update, ZOEngine
    from zoft.optim import bind, evaluate_step, make_optimizer

    eng = ZOEngine(model if offload else model.to(device), offload=offload)
    opt = make_optimizer("mezo-sgd", {"lr": 1e-3, "eps": 1e-3, "sphere": True}, seed=5, total_steps=3)
    bind(opt, eng)
    losses, stalls = [], []
    for t in range(3):
        if sphere:
            loss = evaluate_step(eng, opt, t, batch, go.NextTokenLoss())
            upd, _ = opt.update(t, loss)
        else:
            loss = eng.evaluate([Probe(t, 1e-3), Probe(t, -1e-3)], batch, go.NextTokenLoss())
            upd = Update([(t, -1e-3)], decay=0.999)
        eng.set_update(upd)
        losses.append(loss)
        stalls.append(eng.offload.stats.stalls if eng.offload else 0)
    eng.close()
    return torch.cat(losses), stalls[0], stalls[-1]


@guarded("equivalence")
def equivalence(device: torch.device) -> None:
    from zoft.engine import Streaming

    batch = go.Rows(input_ids=go.token_ids(TINY["vocab_size"], 2, 16, device, seed=1))
    cases = [  # (name, weight dtype, codec, sphere, loss rtol, weight rtol)
        ("fp32", torch.float32, "same", False, 1e-5, 1e-5),
        ("fp16", torch.float16, "same", False, 1e-5, 1e-5),
        ("bf16", torch.bfloat16, "same", False, 1e-5, 1e-5),
        # lossy uploads: the forward sees bf16 / int8 weights (losses within ~2^-9 / 1/254); the
        # fp32 master receives the device's change, which differs from the resident one only by
        # (1 - decay) x the codec error per step: bf16's is relative to each element (weights
        # within 1e-5), int8's to a 256-element block's absmax, which can be a much larger
        # neighbour (a LayerNorm weight of 1 beside its ~1e-3 bias): within 1e-3 (measured on the
        # CPU: 1.4e-4; codec error reaching the master would be ~1e-2)
        ("fp32, bf16 codec", torch.float32, "bf16", False, 1e-2, 1e-5),
        ("fp32, int8 codec", torch.float32, "int8", False, 5e-2, 1e-3),
        ("fp32, unit sphere", torch.float32, "same", True, 1e-5, 1e-5),
    ]
    for name, dtype, codec, sphere, ltol, wtol in cases:
        ref_model, model = _tiny_model(dtype), _tiny_model(dtype)
        ref, _, _ = _run(ref_model, device, batch, None, sphere)
        got, s1, s3 = _run(model, device, batch, Streaming(str(device), 0, 2, codec), sphere)
        loss_rel = ((got - ref).abs() / ref.abs()).max().item()
        w_rel = max(((p.detach().float().cpu() - q.detach().float().cpu()).abs().max()
                     / q.detach().float().abs().max().cpu()).item()
                    for p, q in zip(model.parameters(), ref_model.parameters()))
        check("equivalence", f"{name}: losses / weights rel", f"{loss_rel:.1e} / {w_rel:.1e}",
              f"<= {ltol:g} / {wtol:g}", loss_rel <= ltol and w_rel <= wtol)
        check("equivalence", f"{name}: stalls after step 1", s3 - s1, "0", s3 == s1)
        devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
        check("equivalence", f"{name}: devices after close", ",".join(sorted(map(str, devices))), "one",
              len(devices) == 1)


# -- 4. kernels ----------------------------------------------------------------------------------
@guarded("kernels")
def kernels(device: torch.device, big: int) -> None:
    """Compiled kernels (through the dispatching functions: CUDA tensors take Triton) against the
    torch references; ``big`` elements for the 64-bit-offset case, compared on a window at 2^31."""
    from zoft.kernels import HAS_TRITON, axpy, codec8, philox, sround

    compiled = device.type == "cuda" and HAS_TRITON
    tag = "" if compiled else " (torch reference on both sides: dry run)"
    seed = 2**62 + 12345
    n = 1_000_003 if compiled else 10_007
    z = philox.sample(seed, n, device)
    err = (z.cpu() - philox.sample_ref(seed, n)).abs().max().item()
    check("kernels", "Philox z vs reference, max abs" + tag, f"{err:.1e}", "<= 4e-6", err <= 4e-6)
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(n, generator=g)
    terms = [(seed, -0.3), (7, 1e-3)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w, r = w0.to(dtype).to(device), w0.to(dtype)
        axpy.fused_axpy(w, 0.99, terms)
        axpy.fused_axpy_ref(r, 0.99, terms)
        ulp = torch.finfo(dtype).eps * r.float().abs().clamp_min(torch.finfo(dtype).tiny)
        bad = int(((w.cpu().float() - r.float()).abs() > torch.maximum(ulp * 1.01, torch.full_like(ulp, 1e-5))).sum())
        check("kernels", f"fused axpy {str(dtype)[6:]} vs reference, elements off by > 1 ulp" + tag, bad, "0", bad == 0)
    x = w0 * 3
    yt, yr = sround.sround_bf16(x.to(device), 11), sround.sround_bf16_ref(x, 11)
    same = torch.equal(yt.cpu().view(torch.int16), yr.view(torch.int16))
    check("kernels", "stochastic rounding vs reference" + tag, "bitwise" if same else "differs", "bitwise", same)
    q, s = codec8.quantize8(w0, 256)
    dt = codec8.dequantize8(q.to(device), s.to(device), 256, w0.shape, torch.float32)
    same = torch.equal(dt.cpu(), codec8.dequantize8_ref(q, s, 256, w0.shape, torch.float32))
    check("kernels", "int8 decode vs reference" + tag, "bitwise" if same else "differs", "bitwise", same)
    # past 2^31 elements: compare a window straddling 2^31 (and the tail) with the reference
    lo = max(big - 4096, 0)
    win = torch.arange(lo, big, dtype=torch.int64)
    zb = philox.sample(seed, big, device)
    err = (zb[lo:].cpu() - philox.randn_ref(seed, win)).abs().max().item()
    check("kernels", f"Philox z at {big:,} elements, tail vs reference", f"{err:.1e}", "<= 4e-6", err <= 4e-6)
    mid = max(min(2**31, big) - 2048, 0)
    hi = min(mid + 4096, big)
    err = (zb[mid:hi].cpu() - philox.randn_ref(seed, torch.arange(mid, hi))).abs().max().item()
    check("kernels", "Philox z around element 2^31 vs reference", f"{err:.1e}", "<= 4e-6", err <= 4e-6)
    del zb
    wb = torch.zeros(big, dtype=torch.bfloat16, device=device)
    axpy.fused_axpy(wb, 1.0, [(seed, 1.0)])
    ref = philox.randn_ref(seed, win).to(torch.bfloat16)
    off = ((wb[lo:].cpu().float() - ref.float()).abs() > torch.finfo(torch.bfloat16).eps * ref.float().abs() * 1.01).sum()
    check("kernels", f"fused axpy bf16 at {big:,} elements, tail vs reference", f"{int(off)} off", "0", int(off) == 0)
    del wb


# -- 5. memory and 6. step time ------------------------------------------------------------------
def _opt13b(dry: bool):
    if dry:
        return "tiny-opt", OPTConfig(vocab_size=512, hidden_size=64, ffn_dim=256, num_hidden_layers=5,
                                     num_attention_heads=4, max_position_embeddings=128)
    from zoft.models import resolve

    return "opt-1.3b", resolve("opt-1.3b")[1]


@guarded("memory")
def memory(device: torch.device, dry: bool, gbps: float, tflops: float) -> None:
    from zoft.engine import Streaming, ZOEngine
    from zoft.engine.plan import make_plan

    name, cfg = _opt13b(dry)
    B, T = (1, 32) if dry else (1, 2048)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    dname = "fp16" if dtype == torch.float16 else "fp32"
    kw = dict(batch_size=B, max_length=T, num_probes=2, dtype=dname, h2d_gbps=gbps, tflops=tflops)
    smallest = make_plan(cfg, 10**15, **kw).min_budget_bytes
    plan = make_plan(cfg, smallest, **kw)
    model = go.random_model(cfg, dtype, device)
    eng = ZOEngine(model, offload=Streaming.from_plan(plan, str(device)))
    batch = go.Rows(input_ids=go.token_ids(cfg.vocab_size, B, T, device, seed=2))
    go.steps(eng, batch, 1, device)  # first step: pool and allocator warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    go.steps(eng, batch, 2, device)
    metered = eng.device_peak_bytes
    eng.close()
    if device.type == "cuda":
        alloc, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    else:
        alloc = reserved = metered
    gb = 1e9
    check("memory", f"{name} {B}x{T}: plan peak / budget GB", f"{plan.peak_device_bytes / gb:.3f} / {smallest / gb:.3f}",
          "plan <= budget", plan.peak_device_bytes <= smallest)
    check("memory", "max allocated / reserved GB" + ("" if device.type == "cuda" else " (meter: dry run)"),
          f"{alloc / gb:.3f} / {reserved / gb:.3f}", f"allocated <= {smallest / gb:.3f}", alloc <= smallest)
    check("memory", "engine meter peak GB", f"{metered / gb:.3f}", f"<= {smallest / gb:.3f}", metered <= smallest)
    del model


@guarded("step time")
def step_time(device: torch.device, dry: bool, gbps: float, tflops: float, n_steps: int) -> None:
    name, cfg = _opt13b(dry)
    batches = [(1, 32), (2, 16)] if dry else [(1, 2048), (8, 512)]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = go.random_model(cfg, dtype, device)
    for B, T in batches:
        r = go.measure(name, cfg, model, device, B, T, gbps, tflops, n_steps)
        check("step time", f"{name} {B}x{T}: streamed / resident / bound s",
              f"{r['streamed_s']:.3f} / {r['resident_s']:.3f} / {r['lower_bound_s']:.3f}",
              "-", None)
        check("step time", f"{name} {B}x{T}: x resident, x bound ({r['bound']})",
              f"{r['x_resident']:.2f}, {r['x_lower_bound']:.2f}", "stalls 0", r["stalls"] == 0)
    del model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every section on the CPU, tiny shapes")
    ap.add_argument("--sanitize", action="store_true", help="section 3 (tiny) under TORCH_CUDA_SANITIZER=1")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.sanitize and os.environ.get("TORCH_CUDA_SANITIZER") != "1":
        # the sanitizer hooks CUDA calls from the first one on: start a fresh interpreter with it
        env = {**os.environ, "TORCH_CUDA_SANITIZER": "1"}
        return subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])],
                              env=env).returncode
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("zoft: error: no CUDA device; run `python bench/gpu_check.py --dry-run` on a CPU", file=sys.stderr)
        return 2
    ROWS.clear()
    t0 = time.perf_counter()
    environment(device)
    if args.sanitize:
        equivalence(device)
    else:
        gbps = link(device, (1 << 20) if args.dry_run else (1 << 30)) or 25.0
        tflops = go.matmul_tflops(device) if device.type == "cuda" else 0.1
        check("link", "fp16 matmul TFLOP/s (for the planner)", f"{tflops:.0f}", "-", None)
        equivalence(device)
        kernels(device, (1 << 12) + 17 if args.dry_run else (1 << 31) + 4097)
        memory(device, args.dry_run, gbps, tflops)
        step_time(device, args.dry_run, gbps, tflops, 2 if args.dry_run else args.steps)
    wall = time.perf_counter() - t0
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\ngpu_check {date}, {wall:.0f} s" + (" (dry run on the CPU)" if args.dry_run else ""))
    print("| section | check | value | expected | ok |\n|---|---|---|---|---|")
    for r in ROWS:
        ok = "n/a" if r["ok"] is None else ("ok" if r["ok"] else "**FAIL**")
        print(f"| {r['section']} | {r['check']} | {r['value']} | {r['expected']} | {ok} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": date, "wall_s": wall, "dry_run": args.dry_run,
                                               "rows": ROWS}, indent=1, default=str))
    failed = [r for r in ROWS if r["ok"] is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
