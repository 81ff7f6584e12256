"""``zoft`` command line: a thin layer over the Python API.

    zoft finetune [--model M] [--config FILE] [flags] [--dry-run]   (no --model: the embedded default demo)
    zoft replay RUN_DIR --output DIR
    zoft plan --model M --gpu-mem SIZE [finetune's flags that shape the plan] [--json FILE]
    zoft optimizers [--json]
    zoft eval {muse,wmdp,mmlu} ...
    zoft unlearn --model M --forget FILE [--retain FILE] --objective O --optimizer OPT [--config FILE]
    zoft data preview --task NAME --data FILE [--model M] [--limit N] [--json OUT]

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
    "model": "alias (opt-125m ... opt-175b, llama-2-7b, qwen3-0.6b, ...), local directory or hub id",
    "random_init": "build the weights from the config alone (benchmarks, tests)",
    "gpu_mem": "device memory budget: 18GB (10^9 bytes), 16GiB (2^30 bytes) or plain bytes; blocks that do "
               "not fit stream from CPU RAM (on --device cpu: the CPU twin with byte accounting)",
    "transfer": "codec of streamed blocks: same (master bytes), bf16/fp16 (fp32 masters), int8 (per-block "
                "absmax; the forward sees the codec's rounding, updates reach the master exactly)",
    "writeback_every": "write a streamed block back to its CPU master once per K updates (the device "
                       "re-applies the missing ones after each upload; default: the planner's K)",
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
    "dtype": "weights' and compute dtype; auto: the checkpoint's own on CUDA (fp16 for OPT), fp32 on CPU",
    "eval": "held-out file, same formats as --train",
    "eval_limit": "evaluate on the first N held-out examples",
    "max_length": "truncate inputs to N tokens",
    "optimizer": "mezo-sgd (default) or another name of zoft optimizers, which lists them with their options",
    "lr": "learning rate (default: the optimizer's, zoft optimizers; MeZO OPT-13B full: 1e-6 / 1e-7)",
    "eps": "perturbation scale (default: the optimizer's; MeZO: 1e-3)",
    "weight_decay": "decoupled weight decay, not on bias / norm parameters (default: the optimizer's, 0 but cge)",
    "n_queries": "directions per step, averaged",
    "one_sided": "(L(w+eps z) - L(w)) / eps instead of the two-sided difference",
    "schedule": "learning-rate schedule after warm-up",
    "noise": "perturbation backend: auto (default: table on CPU, triton on CUDA), torch (reference), table, triton",
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
# finetune's flags that `zoft plan` takes too: they shape the plan, and resolve the same way
_PLAN_FLAGS = ("model", "device", "dtype", "gpu_mem", "transfer", "task", "train", "max_length", "optimizer",
               "n_queries", "one_sided", "peft", "quant", "batch_size", "writeback_every", "noise")


def _add_config_flags(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """``--config FILE`` and one flag per ``TrainConfig`` field (or those in ``only``), typed by the
    field; a flag not given leaves the field to the config file or its default."""
    from zoft.config import TrainConfig

    p.add_argument("--config", help="YAML or TOML file whose keys are these flags' names")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SKIP or (only is not None and f.name not in only):
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        args = typing.get_args(tp)
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": _HELP.get(f.name)}
        if f.name == "model":
            kw["help"] += "; default: the embedded pretrained MiniLM demo"
        if tp is bool or set(args) == {bool, type(None)}:  # bool | None: unset keeps the optimizer's default
            kw["action"] = "store_true"
        elif typing.get_origin(tp) is list:
            kw["type"] = lambda s: [x.strip() for x in s.split(",") if x.strip()]
        elif typing.get_origin(tp) is typing.Literal:
            kw["choices"] = args
        else:
            base = next((a for a in (args or (tp,)) if a is not type(None)), str)
            kw["type"] = base if base in (int, float) else str
        p.add_argument(flag, **kw)


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="zeroth-order fine-tuning",
                       description="Fine-tune a model with zeroth-order (MeZO-style) steps.")
    _add_config_flags(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve every default for the chosen device, print the settings and the plan, load "
                        "nothing; exit 0 if the run would start, else 2 with the reason")
    p.set_defaults(func=_run_finetune)


def _train_config(args: argparse.Namespace, cli_only: tuple[str, ...] = ()):
    """The ``TrainConfig`` of the parsed flags: over ``--config FILE``, or over the embedded demo
    recipe when neither a file nor ``--model`` is given. ``cli_only``: parsed names that are not
    config keys."""
    from zoft.config import TrainConfig, load_config_file
    from zoft.models import configs_dir

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", *cli_only)}
    if args.config:
        base = load_config_file(args.config)
    elif "model" not in given:
        base = load_config_file(str(configs_dir() / "demo.yaml"))  # the embedded default recipe
    else:
        base = {}
    return TrainConfig.from_dict({**base, **given})


def _run_finetune(args: argparse.Namespace) -> int:
    from zoft.train import finetune

    cfg = _train_config(args, ("dry_run",))
    if args.dry_run:
        return _dry_run(cfg)
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


def _dry_run(cfg) -> int:
    """Print what ``zoft finetune`` would run: resolved settings and plan; nothing loads."""
    import torch

    from zoft.resolve import format_run, resolve_run

    run = resolve_run(cfg)
    print(format_run(run))
    where = ("" if run.cfg.device == "cpu" or torch.cuda.is_available()
             else " on a machine with a CUDA device (none is visible here)")
    print(f"dry run: the run would start{where}; no weights were loaded")
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
    _add_config_flags(p, _PLAN_FLAGS)
    p.add_argument("--num-probes", type=int, default=None,
                   help="what-if: perturbed evaluations per step (default: the optimizer's; mezo-sgd: 2)")
    p.add_argument("--h2d-gbps", type=float, default=25.0, help="pinned host-to-device GB/s (PCIe Gen4 x16: 25)")
    p.add_argument("--tflops", type=float, default=312.0, help="device dense TFLOP/s in the compute dtype")
    p.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa",
                   help="eager materialises the attention scores")
    p.add_argument("--scratch", choices=("leaf", "unit"), default="leaf",
                   help="perturbation scratch: leaf (the engine's default: one leaf's perturbed copy at a time) "
                        "or unit (a whole unit's)")
    p.add_argument("--regen-gbps", type=float, default=800.0,
                   help="GB of weights per second the device re-applies one update to (deferred write-back)")
    p.add_argument("--json", help="also write the plan as JSON to this file")
    p.set_defaults(func=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zoft.engine.plan import plan_json
    from zoft.resolve import format_run, resolve_run

    what_if = ("num_probes", "h2d_gbps", "tflops", "attention", "scratch", "regen_gbps", "json")
    cfg = _train_config(args, what_if)
    if cfg.gpu_mem is None:
        raise UsageError("zoft plan needs --gpu-mem SIZE (e.g. 18GB)")
    run = resolve_run(cfg, args.num_probes, h2d_gbps=args.h2d_gbps, tflops=args.tflops,
                      attention=args.attention, scratch=args.scratch, regen_gbps=args.regen_gbps)
    print(format_run(run))
    if args.json:
        Path(args.json).write_text(plan_json(run.plan) + "\n")
    return 0


def _add_optimizers(sub) -> None:
    p = sub.add_parser("optimizers", help="list the registered ZO optimizers",
                       description="Each optimizer's paper, options with defaults, state memory per trained "
                                   "parameter, and whether it streams, replays and runs data-parallel.")
    p.add_argument("--json", action="store_true", help="print the registry as JSON (for scripts)")
    p.set_defaults(func=_run_optimizers)


def _run_optimizers(args: argparse.Namespace) -> int:
    import json

    from zoft.optim import OPTIMIZERS, describe

    rows = [describe(n) for n in OPTIMIZERS]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    yes = {True: "yes", False: "no"}
    for r in rows:
        print(f"{r['name']}: {r['paper']}")
        print(f"  state: {r['state_bytes_per_param']} B per trained parameter; {r['state']}")
        print(f"  streams: {yes[r['streams']]}; replays: {yes[r['replays']]}; data-parallel: {r['data_parallel']}")
        print("  options: " + ", ".join(f"{k}={v}" for k, v in r["options"].items()))
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="inspect a task's data: the exact strings the model sees")
    dsub = p.add_subparsers(dest="data_command", metavar="{preview}")
    dsub.required = True
    v = dsub.add_parser("preview", help="render rows with a MeZO task's template (docs/tasks.md)",
                        description="Print, per row, the prompt, the full text of every candidate as scored and "
                                    "the correct index (generation tasks: the teacher-forced target and the "
                                    "answers). Strings are JSON-quoted so that whitespace shows.")
    v.add_argument("--task", required=True, help="sst2, rte, cb, boolq, wsc, wic, multirc, copa, record, squad, drop; "
                   "on a masked LM (--model): sst2, sst5, snli, mnli, rte, trec (k-shot)")
    v.add_argument("--model", default=None, metavar="NAME", help="the model whose tokenizer builds the prompt: needed "
                   "for the masked-LM k-shot tasks (e.g. roberta-large); sst2 and rte are k-shot on a masked LM")
    v.add_argument("--max-length", type=int, default=None, metavar="N", help="k-shot tasks: the run's --max-length "
                   "(default: LM-BFF's for the task, 128; MNLI, SNLI, RTE 256)")
    v.add_argument("--data", required=True, metavar="FILE", help="JSONL/CSV/TSV/JSON file, save_to_disk folder or "
                   "hf:NAME[:CONFIG]:SPLIT, in the Hugging Face dataset's fields")
    v.add_argument("--limit", type=int, default=5, metavar="N", help="first N rows (default 5)")
    v.add_argument("--json", default=None, metavar="OUT", help="also write the records as a JSON list to OUT")
    v.set_defaults(func=_run_data_preview)


def _preview_task(args: argparse.Namespace):
    """The masked-LM k-shot task to preview (a ``ClassifyTask``), or None for the causal-LM suite."""
    from zoft.tasks import KSHOT_TASKS, MEZO_TASKS, make_task

    if args.task not in MEZO_TASKS and args.task not in KSHOT_TASKS:
        raise UsageError(f"unknown task {args.task!r}; choose one of: {', '.join([*MEZO_TASKS, *KSHOT_TASKS])}")
    kind = None
    if args.model is not None:
        from zoft.models import model_kind, resolve
        from zoft.models.loading import kind_phrase

        source, config = resolve(args.model)
        kind = model_kind(config)
    if args.task not in KSHOT_TASKS or (args.task in MEZO_TASKS and kind != "masked"):
        if kind not in (None, "causal"):
            raise UsageError(f"task {args.task!r} needs a causal LM (or, for sst2 and rte, a masked LM); "
                             f"--model {args.model} is {kind_phrase(kind)}")
        return None
    if kind is None:
        raise UsageError(f"task {args.task!r} is a masked-LM k-shot task whose prompt is built from the model's "
                         "tokens: give --model (e.g. --model roberta-large)")
    if kind != "masked":
        raise UsageError(f"task {args.task!r} is a masked-LM k-shot task; --model {args.model} is {kind_phrase(kind)}")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except Exception:  # noqa: BLE001 - offline/hub errors have many types
        raise UsageError(f"could not load the tokenizer of --model {args.model} ({source}); "
                         "give a local folder or a model in the Hugging Face cache") from None
    length = args.max_length if args.max_length is not None else KSHOT_TASKS[args.task].max_length
    return make_task(args.task, tok, "masked", length)


def _run_data_preview(args: argparse.Namespace) -> int:
    import json

    from zoft.config import AT_LEAST_1, Range, check_numbers
    from zoft.tasks import MEZO_TASKS, load_examples
    from zoft.tasks.data import Examples
    from zoft.tasks.mezo import preview, validate_rows

    check_numbers(vars(args), {"limit": AT_LEAST_1, "max_length": Range(2)})
    kshot = _preview_task(args)
    ex = load_examples(args.data)
    rows = Examples(ex[: args.limit], ex.source, ex.lines[: args.limit], ex.unit)
    if kshot is not None:
        records = kshot.preview(rows)
        generation = False
    else:
        spec = MEZO_TASKS[args.task]
        validate_rows(spec, rows)
        records = preview(spec, rows)
        generation = spec.generation
    for rec in records:
        print(f"== {rec['row']}")
        print(f"prompt:      {json.dumps(rec['prompt'], ensure_ascii=False)}")
        if generation:
            print(f"target:      {json.dumps(rec['target'], ensure_ascii=False)}")
            print(f"answers:     {json.dumps(rec['answers'], ensure_ascii=False)}")
            continue
        right = rec["correct"] if isinstance(rec["correct"], list) else [rec["correct"]]
        for i, c in enumerate(rec["candidates"]):
            token = f" (token {json.dumps(rec['tokens'][i], ensure_ascii=False)})" if "tokens" in rec else ""
            print(f"candidate {i}: {json.dumps(c, ensure_ascii=False)}{token}" + ("  <- correct" if i in right else ""))
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
    sub = parser.add_subparsers(dest="command", metavar="{finetune,replay,plan,optimizers,eval,unlearn,data}")
    sub.required = True
    _add_finetune(sub)
    _add_replay(sub)
    _add_plan(sub)
    _add_optimizers(sub)
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

    from zoft.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # a step's activations reused from the heap, not faulted in anew (zoft.runtime)

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
