"""Peak host memory of ``zoft.integrations.ZOTrainer`` against ``transformers.Trainer`` with AdamW (CPU).

Same model (OPT-125M-shaped, random weights from the ``opt-125m`` alias config, seed 0, fp32), same
batch (``--batch-size`` x ``--seq-len`` random token ids, labels = ids), same ``TrainingArguments``
(``--steps`` steps, constant lr, no saving, no eval), one run of this script. Each configuration
is a fresh child process, one after the other; the parent reads the child's peak resident set
size from the kernel when it exits (``os.wait4`` -> ``ru_maxrss``: the high-water mark of the
child's RSS, every page it ever had resident), so nothing inside a run samples or instruments it:

  load       imports, the model built, one batch made: the floor every other row starts from
  inference  load + one no-grad forward of 2 x the batch (what a 2-probe ZO step forwards)
  zoft-loop  zoft's own step (``zoft.optim.step`` over ``ZOEngine``, the LM task), mezo-sgd: the
             reference for what the integration adds
  zo         ZOTrainer, mezo-sgd, ``--steps`` steps
  adamw      transformers.Trainer, AdamW (torch), ``--steps`` steps

Reported: peak RSS, and peak minus ``load`` (what training adds on top of the loaded model), in
MiB (2^20 bytes), and the ratios zo / adamw. ``zo`` and ``zoft-loop`` both hold the engine's
perturbation scratch (about two units' worth, the largest being the tied embedding) and the
logits of both probes; AdamW holds gradients and two moments, three model-sized buffers.

    python bench/trainer_memory.py [--steps 3] [--batch-size 4] [--seq-len 64] [--threads 2] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

RUNS = ("load", "inference", "zoft-loop", "zo", "adamw")


def child(run: str, a: argparse.Namespace) -> None:
    """One configuration, in this process (the parent measures it from outside)."""
    import torch
    import transformers
    from transformers import Trainer, TrainingArguments

    from zoft.integrations import ZOTrainer
    from zoft.models import load_model

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    model = load_model("opt-125m", random_init=True, seed=0).model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (a.batch_size, a.seq_len), generator=g)  # (B, T)
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    if run == "load":
        return
    if run == "inference":
        with torch.no_grad():
            model(input_ids=torch.cat([ids, ids]), use_cache=False)  # (2B, T): two probes' rows
        return
    if run == "zoft-loop":
        from zoft.engine import ZOEngine
        from zoft.optim import make_optimizer, step
        from zoft.tasks import Batch, LMTask

        engine = ZOEngine(model)
        opt = make_optimizer("mezo-sgd", {"lr": 1e-6, "eps": 1e-3}, seed=0, total_steps=a.steps)
        batch = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, {"labels": ids}, a.batch_size)
        for t in range(a.steps):
            step(engine, opt, batch, LMTask(None, "causal", a.seq_len), t)
        return
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=a.steps, per_device_train_batch_size=a.batch_size,
                             learning_rate=1e-6, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to=[], seed=0, disable_tqdm=True, use_cpu=True, optim="adamw_torch")
    rows = rows * a.steps  # one pass: step t sees the same batch in both trainers
    if run == "zo":
        ZOTrainer(model=model, args=args, train_dataset=rows, zo_options={"eps": 1e-3}).train()
    else:
        Trainer(model=model, args=args, train_dataset=rows).train()


def measure(run: str, argv: list[str]) -> int:
    """Peak RSS of one child, in bytes (Linux reports ru_maxrss in KiB)."""
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", run, *argv])
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"trainer_memory: the {run} run failed (exit {p.returncode})")
    return usage.ru_maxrss * 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", choices=RUNS, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child, a)
        return 0
    passed = ["--steps", str(a.steps), "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len),
              "--threads", str(a.threads)]
    peak = {run: measure(run, passed) for run in RUNS}
    mib = 2 ** 20
    print(f"OPT-125M-shaped fp32, batch {a.batch_size} x {a.seq_len} tokens, {a.steps} steps, CPU "
          "(peak RSS of each child from os.wait4)")
    print(f"{'run':10s} {'peak MiB':>9s} {'peak - load MiB':>16s}")
    for run in RUNS:
        print(f"{run:10s} {peak[run] / mib:9.0f} {(peak[run] - peak['load']) / mib:16.0f}")
    ratio = peak["zo"] / peak["adamw"]
    above = (peak["zo"] - peak["load"]) / max(peak["adamw"] - peak["load"], 1)
    print(f"zo / adamw: peak {ratio:.2f}x, above the loaded model {above:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"peak_rss_bytes": peak, "args": vars(a), "ratio_peak": ratio, "ratio_above_load": above}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
