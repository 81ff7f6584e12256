"""``zoft eval {muse,wmdp,mmlu}``: argument parsing, model loading, table and JSON output.

The lead's CLI calls :func:`add_parser` with its subparsers object and dispatches to
``args.func`` (= :func:`run`), which returns the exit code. Errors in user input raise
``zoft.errors.UsageError`` (exit 2), runtime failures ``zoft.errors.ZoftError`` (exit 1).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from zoft.errors import UsageError

_DTYPES = ("fp32", "bf16", "fp16")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="alias, local directory or hub id of a causal LM")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder (official layout)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N items of each subset/file")
    p.add_argument("--output", default=None, metavar="FILE.json", help="write the results as one JSON object")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward/generate call (default 8)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=_DTYPES, default="fp32")
    p.add_argument("--random-init", action="store_true", help="random weights from the config (smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init and the bootstrap CIs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` with sub-commands ``muse``, ``wmdp``, ``mmlu`` to ``subparsers``."""
    p = subparsers.add_parser(
        "eval", help="MUSE / WMDP / MMLU evaluation (official protocols)",
        description="Evaluate a causal LM with the official MUSE, WMDP and MMLU protocols.",
    )
    sub = p.add_subparsers(dest="eval_command", metavar="{muse,wmdp,mmlu,task}")
    sub.required = True

    m = sub.add_parser("muse", help="VerbMem, KnowMem, PrivLeak (MUSE News/Books)")
    _common(m)
    m.add_argument("--corpus", choices=("news", "books"), default="news")
    m.add_argument("--retrain-auc", type=float, default=None, metavar="F",
                   help="retrain model's Min-40%% AUC (default: official News 0.4772 / Books 0.5393)")
    m.add_argument("--metrics", default=None, help="comma list of verbmem_f,knowmem_f,knowmem_r,privleak "
                   "(default: every metric whose files exist)")

    w = sub.add_parser("wmdp", help="WMDP zero-shot multiple choice")
    _common(w)
    w.add_argument("--subsets", default="bio,cyber,chem", help="comma list of bio,cyber,chem")
    w.add_argument("--no-bos", action="store_true", help="encode prompts without special tokens "
                   "(older lm-eval releases); default: the tokenizer's default, like lm-eval 0.4.13")

    u = sub.add_parser("mmlu", help="MMLU zero-shot multiple choice")
    _common(u)
    u.add_argument("--subsets", default=None, help="comma list of subjects (default: all found)")
    u.add_argument("--split", default="test")
    u.add_argument("--no-bos", action="store_true", help="encode prompts without special tokens")

    from zoft.eval.suite import add_task_parser

    add_task_parser(sub)
    p.set_defaults(func=run)
    return p


def _csv(s: str | None) -> list[str] | None:
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available")
    return name


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer) through zoft.models (imported here so the eval API does not need it)."""
    from zoft.models import load_model

    lm = load_model(args.model, random_init=args.random_init, dtype=args.dtype,
                    device=_device(args.device), seed=args.seed)
    if lm.kind != "causal":
        raise UsageError(f"'{args.model}' is a {lm.kind} model; eval needs a causal LM")
    if lm.tokenizer is None:
        raise UsageError(f"no tokenizer found for '{args.model}' (offline random-init alias?); "
                         "use a local model directory that includes tokenizer files")
    return lm.model, lm.tokenizer


def _check(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not os.path.isdir(args.data):
        raise UsageError(f"data directory '{args.data}' does not exist")


def _fmt(x: float | None, digits: int) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_table(results: dict) -> str:
    """A small fixed-width table of a results dict (MCQ accuracies in %, MUSE metrics as reported)."""
    rows = []
    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        if "acc" in r:
            rows.append((name, _fmt(100 * r["acc"], 2), f"± {_fmt(100 * r['acc_stderr'], 2)}", str(r["n"])))
        elif "value" in r:
            d = 4 if name == "auc" else 2
            ci = f"[{_fmt(r['ci_lo'], d)}, {_fmt(r['ci_hi'], d)}]"
            n = str(r["n"]) if "n" in r else (f"{r['n_forget']}/{r['n_holdout']}" if "n_forget" in r
                                               else f"ref {r['auc_retrain']:.4f}")
            rows.append((name, _fmt(r["value"], d), ci, n))
    mcq = any("acc" in r for r in results.values() if isinstance(r, dict))
    head = ("subset", "acc %", "stderr", "n") if mcq else ("metric", "value", "95% CI", "n")
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in rows])


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def run(args: argparse.Namespace) -> int:
    """Run ``zoft eval muse|wmdp|mmlu``; print the table, write ``--output``; return 0."""
    from zoft.eval import mcq, muse

    if args.eval_command == "task":  # MeZO's suite: zero-shot / in-context baselines
        from zoft.eval.suite import run_task

        return run_task(args)
    _check(args)
    progress = False if args.no_progress else None
    cmd = args.eval_command
    # Validate the data before spending minutes loading a model.
    if cmd == "muse":
        metrics = muse.check_muse_data(args.data, args.corpus, _csv(args.metrics))  # warns once on skips
    elif cmd == "wmdp":
        subsets = _csv(args.subsets) or []
        mcq.load_wmdp(args.data, subsets=subsets, limit=1)
    elif cmd == "mmlu":
        subjects = _csv(args.subsets)
        mcq.load_mmlu(args.data, subjects=subjects, split=args.split, limit=1)
    else:
        raise UsageError(f"unknown eval command '{cmd}'; use muse, wmdp or mmlu")

    model, tok = _load_model(args)
    common = {"limit": args.limit, "batch_size": args.batch_size, "progress": progress}
    if cmd == "muse":
        res = muse.eval_muse(model, tok, args.data, corpus=args.corpus, metrics=metrics,
                             retrain_auc=args.retrain_auc, seed=args.seed, **common)
    elif cmd == "wmdp":
        res = mcq.eval_wmdp(model, tok, args.data, subsets=subsets,
                            add_special_tokens=False if args.no_bos else None, **common)
    else:
        res = mcq.eval_mmlu(model, tok, args.data, subjects=subjects, split=args.split,
                            add_special_tokens=False if args.no_bos else None, **common)

    print(format_table(res))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_jsonable(res), indent=2) + "\n", encoding="utf-8")
    return 0
