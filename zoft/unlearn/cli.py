"""``zoft unlearn``: flags -> ``UnlearnConfig`` -> ``zoft.unlearn.unlearn``.

The lead's CLI calls :func:`add_parser` with its subparsers object and dispatches to ``args.func``
(= :func:`run`), which returns the exit code. Flag names are the config keys (``--config FILE``
gives the rest, e.g. ``objective_options``); flags given on the command line win over the file.
"""
from __future__ import annotations

import argparse
from typing import Any

S = argparse.SUPPRESS


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``unlearn`` to ``subparsers``."""
    p = subparsers.add_parser(
        "unlearn", help="LLM unlearning (GA/GradDiff/NPO/SimNPO/RMU; Adam, sign, ZO, hybrid) + robustness report",
        description="Unlearn a forget set from a causal LM, save the model (save_pretrained) in --output-dir, and "
                    "evaluate before, after and after each --attacks entry (robustness.md/.json/.png).")
    a = p.add_argument
    a("--config", help="YAML/TOML recipe whose keys are these flags' names (see configs/unlearn/)")
    a("--model", default=S, help="alias, local directory or hub id of a causal LM")
    a("--random-init", dest="random_init", action="store_true", default=S, help="random weights (smoke tests)")
    a("--tokenizer", default=S, help="where to load the tokenizer from")
    a("--forget", default=S, metavar="FILE", help=".txt (raw corpus, chunked), .json (list of strings/objects), .jsonl")
    a("--retain", default=S, metavar="FILE", help="same formats as --forget")
    a("--objective", default=S, choices=("ga", "graddiff", "npo", "simnpo", "rmu"))
    a("--optimizer", default=S, choices=("adam", "adamw", "sign-sgd", "sign-adam", "smooth", "zo", "hybrid"))
    a("--steps", type=int, default=S)
    a("--lr", type=float, default=S, help="first-order learning rate (ZO: optimizer_options.zo_lr, default the same)")
    a("--batch-size", dest="batch_size", type=int, default=S, help="forget rows per step")
    a("--retain-batch-size", dest="retain_batch_size", type=int, default=S)
    a("--max-length", dest="max_length", type=int, default=S, help="tokens per row")
    a("--params", type=_csv, default=S, help="comma list of substrings of the parameter names to update")
    a("--schedule", choices=("constant", "linear", "cosine"), default=S)
    a("--seed", type=int, default=S)
    a("--output-dir", dest="output_dir", default=S)
    a("--save-every", dest="save_every", type=int, default=S)
    a("--eval-every", dest="eval_every", type=int, default=S)
    a("--resume", action="store_true", default=S)
    a("--gpu-mem", dest="gpu_mem", default=S, help="device budget for the ZO phases (block streaming)")
    a("--device", choices=("auto", "cpu", "cuda"), default=S)
    a("--dtype", choices=("fp32", "bf16", "fp16"), default=S)
    a("--eval", choices=("lm", "muse", "wmdp", "none"), default=S,
      help="lm: forget/retain NLL and token accuracy; muse / wmdp: zoft.eval on --eval-data")
    a("--eval-data", dest="eval_data", default=S, metavar="DIR")
    a("--attacks", type=_csv, default=S, help="comma list of nf4, fp4, int8, relearn")
    a("--no-progress", dest="progress", action="store_false", default=S)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from zoft.config import load_config_file
    from zoft.unlearn.config import UnlearnConfig
    from zoft.unlearn.run import unlearn

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    base = load_config_file(args.config) if args.config else {}
    cfg = UnlearnConfig.from_dict({**base, **given})
    res = unlearn(cfg)
    print(f"done: {cfg.objective} / {cfg.optimizer}, {cfg.steps} steps; model saved in {res.output_dir}")
    if res.stages:
        from zoft.unlearn.report import format_table

        print(format_table(res.stages))
        print(f"report: {res.output_dir / 'robustness.md'} (+ .json, .png)")
    return 0
