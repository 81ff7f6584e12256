"""Block streaming on a GPU: correctness, peak memory, step time against all-resident and the
planner's lower bound. One script, meant to finish in < 8 minutes on one H200.

  1. equivalence: a tiny OPT (8 blocks, fp32) streamed (0 and 3 resident blocks, codec ``same``)
     against the all-resident engine, 3 MeZO steps: per-step losses and final weights (rel 1e-5).
  2. peak memory, ZO2's setting: OPT-6.7B shape, random fp16 weights, batch 1 x 2048 tokens,
     2 probes, streamed under the smallest budget the planner accepts, run as ``zoft finetune``
     runs that plan (the device's default noise backend, the plan's head chunk and groups);
     ``torch.cuda.max_memory_allocated`` against that budget and ZO2's published 4.99 GB.
  3. step time: OPT-2.7B and OPT-6.7B shapes (fp16), all-resident vs streamed under the smallest
     budget, at batch 1 x 2048 (transfer-bound) and 16 x 512 (more compute); the pinned
     host-to-device bandwidth and the fp16 matmul throughput are measured first and fed to the
     planner, and each streamed step is reported as a multiple of the planner's lower bound.
  4. link bytes (deferred write-back): the first model and batch, streamed under the smallest
     budget with write-back every step (k = 1, before) and every planned k (after): bytes over the
     link per step (host-to-device + device-to-host, the final flush apart) against the streamed
     bytes, the planner's per-step bytes, and the step time of each.

    python bench/gpu_offload.py [--json FILE] [--models opt-2.7b,opt-6.7b] [--batches 1x2048,16x512] [--steps 4]
    python bench/gpu_offload.py --device cpu --tiny     # smoke test of this script on a CPU
    python bench/gpu_offload.py --device cpu --tiny --steps 16 --writeback-every 8   # link bytes, k 1 vs 8
    python bench/gpu_offload.py --device cpu --models opt-125m --batches 4x128   # the CPU twin's overhead

Prints one table; ``--json`` also writes every number.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, OPTConfig

from zoft.engine import Probe, Streaming, Update, ZOEngine
from zoft.engine.plan import make_plan
from zoft.models import resolve
from zoft.noise import default_noise, make_noise
from zoft.tasks.base import Batch
from zoft.tasks.lm import LMTask

ZO2_PEAK_GB = {"opt-6.7b": 4.99}  # ZO2 paper (arXiv 2503.12668): OPT-6.7B, batch 1 x 2048, fp16


class NextTokenLoss:
    """Mean next-token NLL per probe: shape (P,)."""

    def forward(self, model, batch):
        return model(input_ids=batch["input_ids"])

    def loss(self, out, batch, P):
        logits = out.logits[:, :-1].float()
        ids = batch["input_ids"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
        return nll.reshape(P, -1).mean(1)


class Rows(dict):
    """The engine's batch protocol over a dict of tensors."""

    def repeat(self, n):
        return Rows({k: v.repeat(n, *([1] * (v.ndim - 1))) for k, v in self.items()})

    @property
    def inputs(self):
        return self


def random_model(config, dtype, device="cpu"):
    """Random weights fast: built on the meta device, storage allocated on ``device`` and filled
    N(0, 0.02) there (on a GPU: one kernel per tensor, not the CPU's serial generator)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    model.config.use_cache = False
    return model.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps(engine, batch, n, device, obj=None):
    """``n`` MeZO steps; returns (losses (n, 2), median seconds per step after the first)."""
    obj, out, times = obj or NextTokenLoss(), [], []
    for t in range(n):
        sync(device)
        t0 = time.perf_counter()
        losses = engine.evaluate([Probe(t, 1e-3), Probe(t, -1e-3)], batch, obj)
        g = (losses[0] - losses[1]).item() / 2e-3
        engine.set_update(Update([(t, -1e-6 * g)]))
        sync(device)
        times.append(time.perf_counter() - t0)
        out.append(losses)
    engine.flush()
    return torch.stack(out), sorted(times[1:])[len(times[1:]) // 2] if n > 1 else times[0]


def h2d_gbps(device, nbytes=1 << 30):
    if device.type != "cuda":
        return 25.0
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        dev.copy_(host, non_blocking=True)
    sync(device)
    return 5 * nbytes / (time.perf_counter() - t0) / 1e9


def matmul_tflops(device, n=8192):
    if device.type != "cuda":
        return 0.1
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    a @ a
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12


def equivalence(device, tiny):
    cfg = OPTConfig(vocab_size=512, hidden_size=64, ffn_dim=256, num_hidden_layers=8, num_attention_heads=4,
                    max_position_embeddings=128, use_cache=False)
    batch = Rows(input_ids=token_ids(512, 3, 32, device, seed=1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(cfg).eval()
    ref_model = copy.deepcopy(base).to(device)
    ref = ZOEngine(ref_model)
    ref_losses, _ = steps(ref, batch, 3, device)
    rows = []
    for resident in (0, 3):
        model = copy.deepcopy(base)
        eng = ZOEngine(model, offload=Streaming(str(device), resident_blocks=resident, prefetch=2))
        losses, _ = steps(eng, batch, 3, device)
        eng.close()
        loss_rel = ((losses - ref_losses).abs() / ref_losses.abs()).max().item()
        w_rel = max(((p.detach().to(device) - q.detach()).abs().max() / q.detach().abs().max()).item()
                    for p, q in zip(model.parameters(), ref_model.parameters()))
        rows.append({"resident_blocks": resident, "loss_rel": loss_rel, "weight_rel": w_rel,
                     "ok": loss_rel <= 1e-5 and w_rel <= 1e-5})
    return rows


def token_ids(vocab, B, T, device, seed):
    """(B, T) random token ids drawn by a keyed CPU generator, then moved: a CPU generator cannot
    draw on CUDA (``torch.randint(..., generator=cpu_gen, device=cuda)`` raises)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, T), generator=g).to(device)


def measure(name, config, model, device, B, T, gbps, tflops, n_steps, resident_too=True):
    """Streamed at the smallest budget (and all-resident when it fits the device). ``model`` is
    built once per shape (``random_model``, on the device) and reused across batch shapes: the
    resident run uses it in place, the streamed engine takes it, and its close leaves it whole on
    the host, from where the next shape's resident run moves it back."""
    dtype = next(model.parameters()).dtype
    dname = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    kw = dict(batch_size=B, max_length=T, num_probes=2, dtype=dname, h2d_gbps=gbps, tflops=tflops,
              device=device.type, noise=default_noise(device.type))
    smallest = make_plan(config, 10**15, **kw).min_budget_bytes
    plan = make_plan(config, smallest, **kw)
    ids = token_ids(config.vocab_size, B, T, device, seed=2)
    batch = Rows(input_ids=ids)
    # the streamed step runs the plan as ``zoft finetune`` does: its noise backend, its head chunk
    lm = LMTask(tokenizer=None, kind="causal", max_length=T, head_chunk=plan.head_chunk)
    lm_batch = Batch({"input_ids": ids}, {"labels": ids}, size=B)
    row = {"model": name, "batch": f"{B}x{T}", "budget_gb": smallest / 1e9, "resident_blocks": plan.resident_blocks,
           "streamed_blocks": plan.streamed_blocks, "lower_bound_s": plan.step_time_lb_s, "bound": plan.bound}
    if resident_too:
        eng = ZOEngine(model.to(device))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _, row["resident_s"] = steps(eng, batch, n_steps, device)
        row["resident_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        eng.close()
        del eng
        if device.type == "cuda":
            torch.cuda.empty_cache()
    eng = ZOEngine(model, noise=make_noise(plan.noise), offload=Streaming.from_plan(plan, str(device)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, row["streamed_s"] = steps(eng, lm_batch, n_steps, device, lm)
    row["streamed_peak_gb"] = (torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda"
                               else eng.device_peak_bytes / 1e9)
    row["accounted_peak_gb"] = eng.device_peak_bytes / 1e9
    row["stalls"] = eng.offload.stats.stalls
    eng.close()
    row["x_lower_bound"] = row["streamed_s"] / plan.step_time_lb_s
    if "resident_s" in row:
        row["x_resident"] = row["streamed_s"] / row["resident_s"]
    row["within_budget"] = row["streamed_peak_gb"] * 1e9 <= smallest
    if name in ZO2_PEAK_GB and (B, T) == (1, 2048):
        row["zo2_peak_gb"] = ZO2_PEAK_GB[name]
    del eng
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def link_bytes(name, config, device, B, T, gbps, tflops, n_steps, after=None):
    """Streamed at the smallest budget with write-back every step and every planned k: link bytes
    per step over the ``n_steps`` timed steps (the final flush apart) and the step time."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    kw = dict(batch_size=B, max_length=T, num_probes=2, dtype="fp16" if dtype == torch.float16 else "fp32",
              h2d_gbps=gbps, tflops=tflops)
    smallest = make_plan(config, 10**15, **kw).min_budget_bytes
    g = torch.Generator().manual_seed(2)
    batch = Rows(input_ids=torch.randint(3, config.vocab_size, (B, T), generator=g, device=device))
    rows = []
    for every in (1, after):
        plan = make_plan(config, smallest, **kw, writeback_every=every)
        model = random_model(config, dtype)
        eng = ZOEngine(model, offload=Streaming.from_plan(plan, str(device)))
        obj, times = NextTokenLoss(), []
        for t in range(n_steps):
            sync(device)
            t0 = time.perf_counter()
            losses = eng.evaluate([Probe(t, 1e-3), Probe(t, -1e-3)], batch, obj)
            eng.set_update(Update([(t, -1e-6 * (losses[0] - losses[1]).item() / 2e-3)]))
            sync(device)
            times.append(time.perf_counter() - t0)
        st = eng.offload.stats
        streamed = sum(s.numel * s.master.element_size() for s in eng.offload.streamed)
        rows.append({"model": name, "batch": f"{B}x{T}", "writeback_every": plan.writeback_every,
                     "h2d_bytes_per_step": st.upload_bytes / n_steps, "d2h_bytes_per_step": st.writeback_bytes / n_steps,
                     "x_streamed_bytes": (st.upload_bytes + st.writeback_bytes) / n_steps / streamed,
                     "plan_bytes_per_step": plan.upload_bytes_per_step + plan.writeback_bytes_per_step,
                     "step_s": sorted(times[1:])[len(times[1:]) // 2] if n_steps > 1 else times[0],
                     "lower_bound_s": plan.step_time_lb_s})
        eng.close()
        del eng, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small shapes (smoke test of the script)")
    ap.add_argument("--models", default="opt-2.7b,opt-6.7b", help="comma-separated aliases")
    ap.add_argument("--batches", default="1x2048,16x512", help="comma-separated BxT")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--writeback-every", type=int, default=None,
                    help="write-back interval of the link-bytes run after k = 1 (default: the planner's)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --tiny for a smoke test", file=sys.stderr)
        return 2
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__}
    report["h2d_gbps"] = gbps = h2d_gbps(device)
    report["fp16_tflops"] = tflops = matmul_tflops(device)
    print(f"{report['device']}: pinned H2D {gbps:.1f} GB/s, fp16 matmul {tflops:.0f} TFLOP/s", flush=True)
    report["equivalence"] = equivalence(device, args.tiny)
    for r in report["equivalence"]:
        print(f"equivalence, {r['resident_blocks']} resident blocks: losses rel {r['loss_rel']:.1e}, "
              f"weights rel {r['weight_rel']:.1e} -> {'ok' if r['ok'] else 'FAIL'}", flush=True)
    if args.tiny:
        shapes = [("tiny-opt", OPTConfig(vocab_size=1000, hidden_size=128, ffn_dim=512, num_hidden_layers=8,
                                         num_attention_heads=4, max_position_embeddings=512), [(1, 256), (4, 64)])]
    else:
        batches = [tuple(int(v) for v in b.split("x")) for b in args.batches.split(",")]
        shapes = [(m, resolve(m)[1], batches) for m in args.models.split(",")]
    report["rows"] = []
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    for name, config, batches in shapes:
        model = random_model(config, dtype, device)  # on the device, once per shape
        for B, T in batches:
            t0 = time.perf_counter()
            row = measure(name, config, model, device, B, T, gbps, tflops, args.steps)
            row["wall_s"] = time.perf_counter() - t0
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
        del model
    hdr = ("model", "batch", "budget GB", "res/str blocks", "peak GB", "ZO2 GB", "resident s", "streamed s",
           "x resident", "x bound")
    print("\n| " + " | ".join(hdr) + " |\n|" + "---|" * len(hdr))
    for r in report["rows"]:
        print(f"| {r['model']} | {r['batch']} | {r['budget_gb']:.2f} | {r['resident_blocks']}/{r['streamed_blocks']} | "
              f"{r['streamed_peak_gb']:.2f} | {r.get('zo2_peak_gb', '')} | {r.get('resident_s', float('nan')):.3f} | "
              f"{r['streamed_s']:.3f} | {r.get('x_resident', float('nan')):.2f} | {r['x_lower_bound']:.2f} ({r['bound']}) |")
    name, config, batches = shapes[0]
    report["link_bytes"] = link_bytes(name, config, device, *batches[0], gbps, tflops, args.steps, args.writeback_every)
    print("\n| model | batch | write-back every | H2D MB/step | D2H MB/step | x streamed bytes | plan MB/step | "
          "step s | bound s |\n|" + "---|" * 9)
    for r in report["link_bytes"]:
        print(f"| {r['model']} | {r['batch']} | {r['writeback_every']} | {r['h2d_bytes_per_step'] / 1e6:.1f} | "
              f"{r['d2h_bytes_per_step'] / 1e6:.1f} | {r['x_streamed_bytes']:.3f} | {r['plan_bytes_per_step'] / 1e6:.1f} | "
              f"{r['step_s']:.3f} | {r['lower_bound_s']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    ok = all(r["ok"] for r in report["equivalence"]) and all(r["within_budget"] for r in report["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
