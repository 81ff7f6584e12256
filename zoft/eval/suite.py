"""``zoft eval task``: zero-shot and in-context baselines on MeZO's task suite, as MeZO's
``icl.sh`` runs them (``run.py --num_train SHOTS --num_eval N``, no training).

Test examples: the first N of the validation split under NumPy's permutation with ``--seed``
(MeZO: seed 0). Demonstrations: each test example gets its own ``--shots`` rows of the training
split, drawn with a per-example seed from ``RandomState(seed).randint(0, 10000, N)`` (MeZO's
"one train set per eval sample"), joined before the example by a blank line
(``zoft.tasks.mezo.render``). ``--shots 0`` is the zero-shot baseline.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from zoft.errors import UsageError


def add_task_parser(sub: Any) -> None:
    t = sub.add_parser("task", help="zero-shot / in-context baseline on a MeZO task (docs/tasks.md)",
                       description="Score a causal LM on a task of MeZO's suite without training: zero-shot "
                                   "(--shots 0) or with --shots demonstrations per test example (MeZO: 32).")
    t.add_argument("--task", required=True, help="sst2, rte, cb, boolq, wsc, wic, multirc, copa, record, squad, drop")
    t.add_argument("--model", required=True, help="alias, local directory or hub id of a causal LM")
    t.add_argument("--eval", required=True, metavar="FILE", help="the validation split (JSONL/CSV, save_to_disk folder, hf:...)")
    t.add_argument("--train", default=None, metavar="FILE", help="the training split (demonstrations; needed with --shots)")
    t.add_argument("--shots", type=int, default=0, help="demonstrations per test example (MeZO's ICL: 32)")
    t.add_argument("--num-eval", type=int, default=1000, help="test examples drawn from --eval (MeZO: 1000)")
    t.add_argument("--seed", type=int, default=0, help="sampling seed (MeZO: 0); also --random-init's")
    t.add_argument("--max-length", type=int, default=2048, help="tokens per sequence; longer prompts lose "
                   "demonstrations from the left (MeZO: 2048)")
    t.add_argument("--batch-size", type=int, default=8, help="examples per forward")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    t.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    t.add_argument("--random-init", action="store_true", help="random weights from the config (smoke tests)")
    t.add_argument("--output", default=None, metavar="FILE.json", help="also write the result as JSON")


def icl_sample(train: list[dict] | None, valid: list[dict], shots: int, num_eval: int | None,
               seed: int) -> tuple[list[dict], list[list[dict]]]:
    """(test rows, demonstrations of each) as MeZO's ``sample_train_sets`` without a train-set seed."""
    n = len(valid) if num_eval is None else min(num_eval, len(valid))
    test = [valid[i] for i in np.random.RandomState(seed).permutation(len(valid)).tolist()[:n]]
    if shots == 0:
        return test, [[] for _ in test]
    if train is None or shots > len(train):
        raise UsageError(f"--shots {shots} needs --train with at least {shots} rows")
    seeds = np.random.RandomState(seed).randint(0, 10000, len(test) if num_eval is not None else len(valid))
    demos = [[train[j] for j in np.random.RandomState(int(s)).permutation(len(train)).tolist()[:shots]]
             for s in seeds[:len(test)]]
    return test, demos


def run_task(args: argparse.Namespace) -> int:
    from zoft.eval.cli import _load_model
    from zoft.tasks import MEZO_TASKS, load_examples, make_task

    if args.task not in MEZO_TASKS:
        raise UsageError(f"unknown task {args.task!r}; choose one of: {', '.join(MEZO_TASKS)}")
    for name in ("shots", "num_eval", "batch_size", "max_length"):
        if getattr(args, name) < (0 if name == "shots" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be >= {0 if name == 'shots' else 1}")
    valid = load_examples(args.eval)
    train = load_examples(args.train) if args.train else None
    model, tok = _load_model(args)
    task = make_task(args.task, tok, "causal", args.max_length)
    task.validate(valid)
    if train is not None:
        task.validate(train)
    test, demos = icl_sample(train, valid, args.shots, args.num_eval, args.seed)
    res = task.evaluate(model, test, args.batch_size, demos=demos)
    out = {"task": args.task, "model": args.model, "shots": args.shots, "num_eval": len(test), "seed": args.seed,
           **res}
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()))
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    return 0
