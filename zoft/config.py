"""The run configuration: one dataclass whose field names are the CLI flags and config-file keys.

``--config FILE`` (YAML or TOML) sets fields by name (``lr`` or ``--lr`` style ``gpu-mem`` both
accepted); command-line flags override the file. Unknown keys and values outside a ``Literal``
are errors that name the valid choices.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from zoft.errors import UsageError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from ``"18GB"`` (powers of 1000), ``"16GiB"`` (powers of 1024) or a plain integer."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"cannot read size '{text}'; write e.g. 18GB (10^9 bytes), 16GiB (2^30) or 500000000")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise UsageError(f"size '{text}' must be positive")
    return int(value)


@dataclass(frozen=True)
class Range:
    """The interval a numeric flag must lie in: ``lo`` (exclusive when ``lo_open``) to ``hi``
    (inclusive); None leaves that side open."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def __str__(self) -> str:
        parts = [f"{'>' if self.lo_open else '>='} {self.lo:g}"] if self.lo is not None else []
        return " and ".join(parts + ([f"<= {self.hi:g}"] if self.hi is not None else []))


AT_LEAST_1, NON_NEGATIVE, POSITIVE, FRACTION = Range(1), Range(0), Range(0, lo_open=True), Range(0, 1)


def check_numbers(values: dict[str, Any], ranges: dict[str, Range]) -> None:
    """The one rule for every number a user gives (a flag of any command or a config-file key):
    it is finite and inside its ``Range``; otherwise one ``UsageError`` naming the flag. Names
    missing from ``values`` or set to None (an optional flag not given) pass."""
    for name, rng in ranges.items():
        v = values.get(name)
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue  # absent, or a type error that the type check reports
        ok = math.isfinite(v) and (rng.lo is None or (v > rng.lo if rng.lo_open else v >= rng.lo)) \
            and (rng.hi is None or v <= rng.hi)
        if not ok:
            finite = "" if isinstance(v, int) else " and finite"
            raise UsageError(f"--{name.replace('_', '-')} must be {rng}{finite}, not {v!r}")


@dataclass
class TrainConfig:
    """Everything a ``zoft finetune`` run needs. Units: lr and eps are absolute; steps count
    optimizer steps; batch_size counts examples; max_length counts tokens."""

    # model
    model: str | None = None  # alias, directory, hub id; None: the embedded default (MiniLM)
    random_init: bool = False
    tokenizer: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: the checkpoint's on CUDA, fp32 on CPU
    gpu_mem: str | None = None  # "18GB" = 18e9 bytes, "16GiB" = 16 * 2^30 bytes
    transfer: Literal["same", "bf16", "fp16", "int8"] = "same"  # codec of streamed blocks (with gpu_mem)
    writeback_every: int | None = None  # streamed blocks: write back once per K updates (None: planned)
    # task and data
    task: Literal["lm", "sst2", "classify", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad",
                  "drop", "sst5", "snli", "mnli", "trec"] = "sst2"
    task_options: dict[str, Any] = field(default_factory=dict)
    train: str | None = None  # JSONL/CSV/TSV/JSON file or hf:NAME[:CONFIG]:SPLIT; None: built-in set
    eval: str | None = None
    eval_limit: int | None = None
    max_length: int = 128
    # MeZO's protocol (docs/tasks.md): train and dev drawn from --train, test from --eval, by --seed
    num_train: int | None = None
    num_dev: int | None = None  # with a dev set: validation every 1/5 of training, test at the best
    num_eval: int | None = None
    k_shot: int | None = None  # masked-LM k-shot (MeZO medium_models): k train + k dev rows per label, by --seed
    objective: Literal["loss", "accuracy", "f1"] = "loss"  # accuracy / f1: non-differentiable ZO losses
    select_by: Literal["loss", "score"] = "loss"  # the best dev checkpoint: lowest loss (MeZO) or best score
    # optimizer
    optimizer: str = "mezo-sgd"
    # None: the optimizer's own default (``zoft optimizers``; mezo-sgd: lr 1e-6, eps 1e-3, 0, false)
    lr: float | None = None
    eps: float | None = None
    weight_decay: float | None = None
    n_queries: int = 1
    one_sided: bool | None = None
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    noise: str = "auto"  # resolved per device (``zoft.noise.default_noise``); a resumed run keeps its own
    trainable: list[str] = field(default_factory=list)  # name substrings to train (empty: all)
    freeze: list[str] = field(default_factory=list)  # name substrings kept frozen (after trainable)
    distribution: Literal["gaussian", "rademacher", "sphere"] = "gaussian"
    peft: Literal["none", "lora", "prefix"] = "none"  # train a peft adapter only (base frozen)
    peft_options: dict[str, Any] = field(default_factory=dict)  # LoraConfig / PrefixTuningConfig keys
    quant: Literal["none", "4bit", "8bit"] = "none"  # bitsandbytes-quantized frozen base (needs peft)
    quant_options: dict[str, Any] = field(default_factory=dict)  # BitsAndBytesConfig keys (with quant)
    # loop
    steps: int = 1000
    batch_size: int = 16
    seed: int = 0
    eval_every: int = 0  # 0: evaluate only before and after training
    eval_batch_size: int = 32
    save_every: int = 0  # 0: checkpoint only at the end
    max_nan_steps: int = 5
    output_dir: str = "runs/zoft"
    resume: bool = False
    progress: bool = True
    # data-parallel (docs/distributed.md); neither changes a rank's data or seeds at a given world size
    nproc: int = 1  # local worker processes to launch (under torchrun: leave 1, WORLD_SIZE decides)
    dist_timeout: float = 600.0  # seconds a rank waits for its peers in one collective before stopping

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        check_numbers(vars(self), TRAIN_RANGES)
        if self.gpu_mem is not None:
            try:
                parse_size(self.gpu_mem)
            except UsageError as e:
                raise UsageError(f"--gpu-mem: {e}") from None
        elif self.transfer != "same":
            raise UsageError(f"--transfer {self.transfer} is the codec of blocks streamed under --gpu-mem; "
                             "give --gpu-mem SIZE too, or drop --transfer")
        if self.quant != "none" and self.peft == "none":
            raise UsageError(f"--quant {self.quant} needs --peft lora|prefix: a quantized base is packed integers "
                             "that a ZO step cannot perturb or update in place, so only an adapter on it can train")
        if self.k_shot is not None and self.num_train is not None:
            raise UsageError("--k-shot and --num-train are two samplings; give one")
        if (self.num_dev or self.num_eval) and self.num_train is None:
            raise UsageError("--num-dev/--num-eval sample MeZO-style and need --num-train too")
        if self.task == "lm" and self.train is None:
            raise UsageError("--task lm needs --train FILE (JSONL lines with a \"text\" field)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        clean = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(clean) - names)
        if unknown:
            raise UsageError(f"unknown config key(s) {unknown}; valid keys are the finetune flags: {sorted(names)}")
        return cls(**clean)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TRAIN_RANGES = {**dict.fromkeys(("steps", "batch_size", "max_length", "n_queries", "max_nan_steps",
                                 "eval_batch_size", "nproc", "eval_limit", "num_train", "num_dev", "num_eval",
                                 "k_shot", "writeback_every"), AT_LEAST_1),
                **dict.fromkeys(("eval_every", "save_every", "warmup_steps", "lr", "weight_decay"),
                                NON_NEGATIVE),
                "eps": POSITIVE, "dist_timeout": POSITIVE}


def _check_type(name: str, value: Any, tp: Any) -> None:
    tp = typing.get_type_hints(TrainConfig)[name] if isinstance(tp, str) else tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise UsageError(f"--{name.replace('_', '-')} must be one of {', '.join(map(str, args))}, not '{value}'")
        return
    allowed = tuple(a for a in (args if args else (tp,)) if isinstance(a, type))
    if origin in (dict, list):
        allowed = (origin,)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return
    if allowed and not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool)):
        raise UsageError(f"config key '{name}' must be {' or '.join(a.__name__ for a in allowed)}, not {value!r}")


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file into a dict of config keys."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise UsageError(f"config file '{path}' {what}; pass a .yaml, .toml or .json file")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise UsageError(f"config file '{path}' must end in .yaml, .yml, .toml or .json")
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - parser errors of three libraries
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"config file '{path}' cannot be parsed: {first}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file '{path}' must hold a mapping of keys to values")
    return data
