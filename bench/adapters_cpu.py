"""CPU memory and step time of ZO fine-tuning: full-parameter vs LoRA vs LoRA on a 4-bit / 8-bit base.

One OPT-125M-shaped model (random weights from the ``opt-125m`` alias config, seed 0), one MeZO-SGD
step = ``ZOEngine.evaluate(opt.probes(step))`` + ``MeZOSGD.update`` + ``engine.set_update`` on the
same batch (8 x 64 random token ids, causal-LM loss), 2 threads, four configurations:

  full        every parameter trained (fp32 base)
  lora        LoRA r=8, alpha=16 on q_proj / v_proj (MeZO's recipe), fp32 base frozen
  lora-4bit   the same adapter on an NF4 base (bitsandbytes, fp32 compute)  -- ``--quant 4bit``
  lora-8bit   the same adapter on an LLM.int8 base (bitsandbytes)           -- ``--quant 8bit``

Each configuration runs in its own child process, one after the other in this run (so each peak
RSS is its own: RSS never goes down in a shared process), and reports:

  trainable     parameters the engine perturbs and updates, and their bytes (what a ZO step writes)
  weights       bytes of every parameter of the model as loaded (packed uint8/int8 for quantized
                weights; bitsandbytes' quant states, a few % more, not included)
  rss_base      resident set size (psutil) after the imports (torch, transformers, peft, bitsandbytes
                in every configuration), before any model exists, in bytes
  rss_loaded    RSS once the model is built and wrapped, in bytes
  rss_peak      peak RSS while stepping (psutil, sampled every 2 ms from a thread), in bytes
  step_s        median wall seconds of one steady-state step (the first step is a warm-up)
  loss0         unperturbed loss: identical for full and lora (LoRA B starts at 0), the quantized
                bases' differ by their quantization error

and the ratios of each to ``full``. Building a quantized random model writes the fp32 model to a
temporary folder and loads it back quantized (``zoft.models.loading.load_model(random_init=True,
quant=...)``): the load-time peak includes the fp32 model; ``rss_loaded`` is measured after it,
once the freed heap is handed back to the OS (``malloc_trim``; every configuration alike).

    python bench/adapters_cpu.py [--reps 5] [--threads 2] [--json FILE] [--quick] [--only lora,lora-4bit]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median

CONFIGS = {
    "full": {"peft": None, "quant": "none", "lr": 1e-6, "eps": 1e-3},
    "lora": {"peft": "lora", "quant": "none", "lr": 1e-4, "eps": 1e-2},
    "lora-4bit": {"peft": "lora", "quant": "4bit", "lr": 1e-4, "eps": 1e-2},
    "lora-8bit": {"peft": "lora", "quant": "8bit", "lr": 1e-4, "eps": 1e-2},
}
BATCH, SEQ = 8, 64
ROOT = Path(__file__).resolve().parents[1]


class PeakRSS:
    """Samples this process's RSS (psutil) every ``period_s`` seconds on a thread; ``peak`` in bytes."""

    def __init__(self, period_s: float = 0.002):
        import psutil

        self.proc, self.period_s, self.peak = psutil.Process(), period_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.period_s)

    def __enter__(self) -> "PeakRSS":
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def release_freed_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so that RSS after building a
    quantized model measures the model, not the freed fp32 build it was quantized from."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def model_config(quick: bool):
    """The ``opt-125m`` alias config (offline); ``quick``: the same family shrunk to a toy size."""
    from zoft.models import resolve

    _, config = resolve("opt-125m")
    config.use_cache = False
    if quick:
        for k, v in dict(vocab_size=512, hidden_size=64, word_embed_proj_dim=64, ffn_dim=256,
                         num_hidden_layers=2, num_attention_heads=4).items():
            setattr(config, k, v)
    return config


def measure(name: str, quick: bool, reps: int, threads: int, seed: int) -> dict:
    """Build configuration ``name``, time ``reps`` steady-state MeZO steps; runs in a child process."""
    import logging

    import bitsandbytes  # noqa: F401 - imported by every configuration: the same baseline RSS
    import peft  # noqa: F401
    import psutil
    import torch

    from zoft.engine import ZOEngine
    from zoft.engine.probes import Probe
    from zoft.models.adapters import apply_peft
    from zoft.models.loading import load_model
    from zoft.optim import MeZOConfig, MeZOSGD
    from zoft.tasks.base import Batch
    from zoft.tasks.lm import LMTask

    logging.getLogger("transformers").setLevel(logging.ERROR)  # no load-progress chatter in the table
    torch.set_num_threads(threads)
    rss_base = psutil.Process().memory_info().rss
    spec = CONFIGS[name]
    config = model_config(quick)
    with tempfile.TemporaryDirectory(prefix="zoft-bench-") as tmp:
        config.save_pretrained(tmp)  # a config-only folder: load_model(random_init=True) builds from it
        t0 = time.perf_counter()
        model = load_model(tmp, random_init=True, seed=seed, quant=spec["quant"]).model
    if spec["peft"]:
        model = apply_peft(model, spec["peft"], {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
                       seed=seed)
    model.eval()
    engine = ZOEngine(model)
    build_s = time.perf_counter() - t0
    gc.collect()
    release_freed_heap()
    rss_loaded = psutil.Process().memory_info().rss
    trainable = sum(p.numel() for p in engine.params.values())
    trainable_bytes = sum(p.numel() * p.element_size() for p in engine.params.values())
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied counted once

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=gen)  # (B, T)
    mask = torch.ones_like(ids)  # (B, T), no padding
    batch = Batch({"input_ids": ids, "attention_mask": mask}, {"labels": ids}, size=BATCH)
    task = LMTask(tokenizer=None, kind="causal", max_length=SEQ)
    opt = MeZOSGD(MeZOConfig(lr=spec["lr"], eps=spec["eps"]), seed=seed, total_steps=reps + 2)
    loss0 = engine.evaluate([Probe(None, 0.0)], batch, task).item()

    def step(t: int) -> None:
        losses = engine.evaluate(opt.probes(t), batch, task)  # (2,): L(w + eps z), L(w - eps z)
        upd, _ = opt.update(t, losses)
        engine.set_update(upd)

    times = []
    with PeakRSS() as peak:
        step(0)  # warm-up: no pending update yet
        for t in range(1, reps + 1):
            s = time.perf_counter()
            step(t)
            times.append(time.perf_counter() - s)
        engine.flush()
    engine.close()
    return {"config": name, "peft": spec["peft"], "quant": spec["quant"], "trainable": trainable,
            "trainable_bytes": trainable_bytes, "weights_bytes": weights_bytes, "rss_base": rss_base,
            "rss_loaded": rss_loaded,
            "rss_peak": peak.peak, "step_s": median(times), "times_s": times, "build_s": build_s, "loss0": loss0}


def run(names: list[str], quick: bool, reps: int, threads: int, seed: int) -> dict:
    """Every configuration in its own child process, in order; the parent only collects."""
    load_before = os.getloadavg()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    results = {}
    for name in names:
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--reps", str(reps),
                "--threads", str(threads), "--seed", str(seed)] + (["--quick"] if quick else [])
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"configuration {name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        results[name] = json.loads(line[len("RESULT "):])
    import torch

    base = results.get("full")
    ratios = {}
    if base:
        for name, r in results.items():
            ratios[name] = {k: r[k] / base[k] for k in ("step_s", "rss_peak", "rss_loaded", "weights_bytes",
                                                         "trainable_bytes")}
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": "opt-125m shape (random init)" if not quick else "tiny opt (quick)",
            "batch": [BATCH, SEQ], "threads": threads, "reps": reps, "torch": torch.__version__,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "results": results, "ratios": ratios}


def report(res: dict) -> str:
    mb = 1e6
    lines = [f"{res['model']}, batch {res['batch'][0]}x{res['batch'][1]}, {res['threads']} threads, {res['reps']} reps, "
             f"torch {res['torch']}, {res['date']}, load avg {res['loadavg_before'][0]:.2f} -> {res['loadavg_after'][0]:.2f}",
             f"{'':10s}{'trainable':>12s}{'train MB':>10s}{'weights MB':>11s}{'base MB':>8s}{'RSS MB':>8s}{'peak MB':>9s}"
             f"{'s/step':>8s}{'x full':>8s}{'peak x':>8s}{'loss0':>9s}"]
    for name, r in res["results"].items():
        q = res["ratios"].get(name, {})
        lines.append(f"{name:10s}{r['trainable']:12,d}{r['trainable_bytes'] / mb:10.2f}{r['weights_bytes'] / mb:11.1f}"
                     f"{r['rss_base'] / mb:8.0f}{r['rss_loaded'] / mb:8.0f}{r['rss_peak'] / mb:9.0f}{r['step_s']:8.3f}"
                     f"{q.get('step_s', float('nan')):8.2f}{q.get('rss_peak', float('nan')):8.2f}{r['loss0']:9.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=None, help="timed steps per configuration (default 5; 2 with --quick)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the benchmark's setting is 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny OPT config (smoke test)")
    ap.add_argument("--only", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    ap.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    ap.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    reps = args.reps if args.reps is not None else (2 if args.quick else 5)
    if reps < 1:
        ap.error("--reps must be >= 1")
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, args.quick, reps, args.threads, args.seed)))
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if not names or unknown:
        ap.error(f"--only: unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    res = run(names, args.quick, reps, args.threads, args.seed)
    print(report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    full, lora = res["results"].get("full"), res["results"].get("lora")
    if full and lora and abs(full["loss0"] - lora["loss0"]) > 1e-5 * abs(full["loss0"]):
        print("FAIL: a fresh LoRA adapter (B = 0) changed the unperturbed loss", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
