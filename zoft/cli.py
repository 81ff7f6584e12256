"""``zoft`` command line: a thin layer over the Python API.

    zoft finetune [--model M] [--config FILE] [flags]   (no --model: the embedded default demo)
    zoft replay RUN_DIR --output DIR
    zoft plan --model M --gpu-mem SIZE [--batch-size 16] [--max-length 256] [--json FILE]
    zoft eval {muse,wmdp,mmlu} ...
    zoft unlearn --model M --forget FILE [--retain FILE] --objective O --optimizer OPT [--config FILE]
    zoft data preview --task NAME --data FILE [--limit N] [--json OUT]

Errors in user input print one line and exit 2; runtime failures print one line and exit 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from zoft.errors import UsageError, ZoftError

_HELP = {
    "model": "alias (opt-125m ... opt-175b, llama-2-7b, qwen3-0.6b, ...), local directory or hub id; "
             "default: the embedded pretrained MiniLM demo",
    "random_init": "build the weights from the config alone (benchmarks, tests)",
    "gpu_mem": "device memory budget: 18GB (10^9 bytes), 16GiB (2^30 bytes) or plain bytes; blocks that do "
               "not fit stream from CPU RAM (on --device cpu: the CPU twin with byte accounting)",
    "transfer": "codec of streamed blocks: same (master bytes), bf16/fp16 (fp32 masters), int8 (per-block "
                "absmax; the forward sees the codec's rounding, updates reach the master exactly)",
    "train": "JSONL/CSV/TSV/JSON file, datasets save_to_disk folder or hf:NAME[:CONFIG]:SPLIT (default: the "
             "built-in sentiment set)",
    "task": "lm (causal-LM loss on {\"text\"}), sst2 (built-in template), classify (template from --config), or "
            "MeZO's suite: rte, cb, boolq, wsc, wic, multirc, copa, record, squad, drop (causal LMs); sst5, snli, "
            "mnli, trec, sst2, rte (masked LMs, k-shot) (docs/tasks.md)",
    "num_train": "MeZO sampling: train on N examples drawn from --train with --seed (MeZO: 1000)",
    "num_dev": "MeZO sampling: N more from --train as dev; validate every 1/5 of training (or --eval-every) and "
               "report the test score of the best dev checkpoint (MeZO: 500; CB, COPA: 100)",
    "num_eval": "MeZO sampling: test on N examples drawn from --eval (MeZO: 1000)",
    "k_shot": "masked-LM k-shot (MeZO medium_models: 16 or 512): K train and K dev rows per label from --train "
              "with --seed (13, 21, 42, 87, 100); --eval is the test set",
    "objective": "loss (MeZO's training loss), or a non-differentiable ZO loss: accuracy (candidate tasks), "
                 "f1 (squad, drop: F1 of greedy generations)",
    "select_by": "best dev checkpoint by the lowest dev loss (MeZO, Hugging Face's default) or the best dev score",
    "eval_every": "evaluate every N steps (0: only before and after training)",
    "resume": "continue the run in --output-dir from its last checkpoint",
    "tokenizer": "where to load the tokenizer from (default: the model's own)",
    "device": "auto: CUDA when visible, else CPU",
    "dtype": "weights' dtype (fp32 recommended on CPU)",
    "eval": "held-out file, same formats as --train",
    "eval_limit": "evaluate on the first N held-out examples",
    "max_length": "truncate inputs to N tokens",
    "optimizer": "mezo-sgd, zo-sgd-sign, zo-sgd-mmt, zo-sgd-cons, zo-adam, r-adazo, zo-ranksgd",
    "lr": "learning rate (MeZO OPT-13B full: 1e-6 / 1e-7)",
    "eps": "perturbation scale (MeZO: 1e-3)",
    "weight_decay": "decoupled weight decay (not on bias / norm parameters)",
    "n_queries": "directions per step, averaged",
    "one_sided": "(L(w+eps z) - L(w)) / eps instead of the two-sided difference",
    "schedule": "learning-rate schedule after warm-up",
    "noise": "perturbation backend: torch (default, reference), table (fast), triton (CUDA)",
    "distribution": "direction distribution",
    "steps": "optimizer steps",
    "batch_size": "examples per step (data-parallel: per rank, like DDP; zo-ranksgd: the batch all ranks share)",
    "nproc": "data-parallel: launch N local worker processes (gloo on CPU, NCCL on CUDA); multi-node: torchrun "
             "--nnodes ... -m zoft finetune; see docs/distributed.md",
    "dist_timeout": "data-parallel: seconds a rank waits for its peers (per collective; must exceed a checkpoint "
                    "write) before stopping with an error",
    "seed": "run seed: data order, probe seeds, --random-init weights",
    "eval_batch_size": "examples per evaluation batch",
    "save_every": "checkpoint every N steps (0: only at the end)",
    "max_nan_steps": "stop after N consecutive NaN/inf losses (their updates are skipped)",
    "output_dir": "run directory (metrics, trajectory, checkpoint, loss.png)",
    "trainable": "comma-separated substrings of parameter names to train (default: all parameters)",
    "peft": "train a peft adapter on a frozen base: lora (r=8, alpha=16 on q/v) or prefix (5 virtual "
            "tokens); the checkpoint is the adapter (PeftModel.from_pretrained); options: peft_options in --config",
    "quant": "load the frozen base quantized by bitsandbytes (4bit: nf4, 8bit: LLM.int8) and train the --peft "
             "adapter on it (ZO-QLoRA); options: quant_options in --config (BitsAndBytesConfig keys)",
    "freeze": "comma-separated substrings of parameter names to keep frozen (e.g. word_embeddings)",
}
_SKIP = {"task_options", "optimizer_options", "peft_options", "quant_options", "progress"}


def _add_finetune(sub) -> None:
    from zoft.config import TrainConfig

    p = sub.add_parser("finetune", help="zeroth-order fine-tuning",
                       description="Fine-tune a model with zeroth-order (MeZO-style) steps.")
    p.add_argument("--config", help="YAML or TOML file whose keys are these flags' names")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        args = typing.get_args(tp)
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": _HELP.get(f.name)}
        if tp is bool:
            kw["action"] = "store_true"
        elif typing.get_origin(tp) is list:
            kw["type"] = lambda s: [x.strip() for x in s.split(",") if x.strip()]
        elif typing.get_origin(tp) is typing.Literal:
            kw["choices"] = args
        else:
            base = next((a for a in (args or (tp,)) if a is not type(None)), str)
            kw["type"] = base if base in (int, float) else str
        p.add_argument(flag, **kw)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="no progress bar")
    p.set_defaults(func=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    from zoft.config import TrainConfig, load_config_file
    from zoft.models import configs_dir
    from zoft.train import finetune

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    if args.config:
        base = load_config_file(args.config)
    elif "model" not in given:
        base = load_config_file(str(configs_dir() / "demo.yaml"))  # the embedded default recipe
    else:
        base = {}
    cfg = TrainConfig.from_dict({**base, **given})
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:  # launch the ranks here; they do the run
        from zoft.distributed import launch_local
        from zoft.train import read_run

        code = launch_local(cfg)
        if code == 0:
            _print_done(cfg, *read_run(cfg.output_dir, cfg.steps))
        return code
    res = finetune(cfg)
    if os.environ.get("RANK", "0") == "0" and os.environ.get("ZOFT_LAUNCHED") != "1":  # data-parallel: once
        _print_done(cfg, res.metrics, res.final_eval)
    return 0


def _print_done(cfg, metrics: list, final_eval: dict) -> None:
    from pathlib import Path

    ev = ", ".join(f"{k}={v:.4f}" for k, v in final_eval.items() if isinstance(v, float))
    print(f"done: {cfg.steps} steps in {Path(cfg.output_dir)}" + (f"; {ev}" if ev else ""))
    first = next((m for m in metrics if "eval_accuracy" in m), None)
    if first and "eval_accuracy" in final_eval:
        print(f"held-out accuracy: {first['eval_accuracy']:.3f} (step 0) -> {final_eval['eval_accuracy']:.3f}")


def _add_replay(sub) -> None:
    p = sub.add_parser("replay", help="rebuild a run's weights from its initial weights and seed trajectory")
    p.add_argument("run_dir")
    p.add_argument("--output", required=True, help="folder for the rebuilt model (save_pretrained)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="default: the device type the run used (needed for bit-identical weights)")
    p.add_argument("--merge", action="store_true",
                   help="--peft lora runs: write the base with the adapter merged in (a plain model)")
    p.set_defaults(func=lambda a: _run_replay(a))


def _run_replay(args: argparse.Namespace) -> int:
    from zoft.train import replay

    replay(args.run_dir, args.output, device=args.device, merge=args.merge)
    print(f"replayed {args.run_dir} -> {args.output}")
    return 0


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="plan a streamed step under a device budget (offline, no weights)",
                       description="Print which units stay resident, the stream slots, prefetch depth and "
                                   "micro-batch, predicted peak device bytes, CPU RAM and a step-time lower "
                                   "bound. GB = 10^9 bytes, GiB = 2^30.")
    p.add_argument("--model", required=True, help=_HELP["model"])
    p.add_argument("--gpu-mem", required=True, help=_HELP["gpu_mem"])
    p.add_argument("--batch-size", type=int, default=16, help="examples per step")
    p.add_argument("--max-length", type=int, default=256, help="tokens per example")
    p.add_argument("--num-probes", type=int, default=2, help="perturbed evaluations per step (MeZO: 2)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="compute and master dtype")
    p.add_argument("--transfer", choices=("same", "bf16", "fp16", "int8"), default="same", help="host-to-device codec")
    p.add_argument("--h2d-gbps", type=float, default=25.0, help="pinned host-to-device GB/s (PCIe Gen4 x16: 25)")
    p.add_argument("--tflops", type=float, default=312.0, help="device dense TFLOP/s in the compute dtype")
    p.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa",
                   help="eager materialises the attention scores")
    p.add_argument("--scratch", choices=("unit", "fused"), default="unit",
                   help="perturbation scratch: unit (today's engine: z + perturbed copy) or fused (copy only)")
    p.add_argument("--peft", action="store_true",
                   help="adapter training: the base is frozen, streamed blocks are never written back")
    p.add_argument("--quant", choices=("none", "4bit", "8bit"), default="none",
                   help="bitsandbytes-packed base (implies --peft): blocks move in their packed form")
    p.add_argument("--json", help="also write the plan as JSON to this file")
    p.set_defaults(func=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zoft.engine.plan import format_plan, make_plan, plan_json

    plan = make_plan(args.model, args.gpu_mem, batch_size=args.batch_size, max_length=args.max_length,
                     num_probes=args.num_probes, dtype=args.dtype, transfer=args.transfer,
                     h2d_gbps=args.h2d_gbps, tflops=args.tflops, attention=args.attention,
                     scratch=args.scratch, adapters=args.peft, quant=args.quant)
    print(format_plan(plan))
    if args.json:
        Path(args.json).write_text(plan_json(plan) + "\n")
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="inspect a task's data: the exact strings the model sees")
    dsub = p.add_subparsers(dest="data_command", metavar="{preview}")
    dsub.required = True
    v = dsub.add_parser("preview", help="render rows with a MeZO task's template (docs/tasks.md)",
                        description="Print, per row, the prompt, the full text of every candidate as scored and "
                                    "the correct index (generation tasks: the teacher-forced target and the "
                                    "answers). Strings are JSON-quoted so that whitespace shows.")
    v.add_argument("--task", required=True, help="sst2, rte, cb, boolq, wsc, wic, multirc, copa, record, squad, drop")
    v.add_argument("--data", required=True, metavar="FILE", help="JSONL/CSV/TSV/JSON file, save_to_disk folder or "
                   "hf:NAME[:CONFIG]:SPLIT, in the Hugging Face dataset's fields")
    v.add_argument("--limit", type=int, default=5, metavar="N", help="first N rows (default 5)")
    v.add_argument("--json", default=None, metavar="OUT", help="also write the records as a JSON list to OUT")
    v.set_defaults(func=_run_data_preview)


def _run_data_preview(args: argparse.Namespace) -> int:
    import json

    from zoft.tasks import MEZO_TASKS, load_examples
    from zoft.tasks.data import Examples
    from zoft.tasks.mezo import preview, validate_rows

    if args.task not in MEZO_TASKS:
        raise UsageError(f"unknown task {args.task!r}; choose one of: {', '.join(MEZO_TASKS)}")
    if args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    ex = load_examples(args.data)
    rows = Examples(ex[: args.limit], ex.source, ex.lines[: args.limit], ex.unit)
    spec = MEZO_TASKS[args.task]
    validate_rows(spec, rows)
    records = preview(spec, rows)
    for rec in records:
        print(f"== {rec['row']}")
        print(f"prompt:      {json.dumps(rec['prompt'], ensure_ascii=False)}")
        if spec.generation:
            print(f"target:      {json.dumps(rec['target'], ensure_ascii=False)}")
            print(f"answers:     {json.dumps(rec['answers'], ensure_ascii=False)}")
            continue
        right = rec["correct"] if isinstance(rec["correct"], list) else [rec["correct"]]
        for i, c in enumerate(rec["candidates"]):
            print(f"candidate {i}: {json.dumps(c, ensure_ascii=False)}" + ("  <- correct" if i in right else ""))
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(records, f, ensure_ascii=False, indent=1)
                f.write("\n")
        except OSError as e:
            raise UsageError(f"cannot write {args.json}: {e.strerror or e}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoft", description="Memory-constrained zeroth-order fine-tuning.")
    sub = parser.add_subparsers(dest="command", metavar="{finetune,replay,plan,eval,unlearn,data}")
    sub.required = True
    _add_finetune(sub)
    _add_replay(sub)
    _add_plan(sub)
    from zoft.eval.cli import add_parser as add_eval

    add_eval(sub)
    from zoft.unlearn.cli import add_parser as add_unlearn

    add_unlearn(sub)
    _add_data(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # zoft shows its own progress; HF's load/save bars are noise
    try:
        return args.func(args)
    except UsageError as e:
        print(f"zoft: error: {e}", file=sys.stderr)
        return 2
    except ZoftError as e:
        print(f"zoft: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk or a vanished file outside the guarded writes
        print(f"zoft: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
