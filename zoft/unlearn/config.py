"""``UnlearnConfig``: one dataclass whose field names are the ``zoft unlearn`` flags and the keys of
the YAML recipes in ``configs/unlearn/`` (an unknown key is an error)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from zoft.config import AT_LEAST_1, NON_NEGATIVE, Range, check_numbers
from zoft.errors import UsageError
from zoft.optim.schedule import Schedule

ObjectiveName = Literal["ga", "graddiff", "npo", "simnpo", "rmu"]
OptimizerName = Literal["adam", "adamw", "sign-sgd", "sign-adam", "smooth", "zo", "hybrid"]
EvalKind = Literal["lm", "muse", "wmdp", "none"]

# Keys that change the trajectory: a resumed run must keep them.
TRAJECTORY_KEYS = ("model", "random_init", "forget", "retain", "objective", "objective_options", "optimizer",
                   "optimizer_options", "lr", "steps", "batch_size", "retain_batch_size", "seed", "schedule",
                   "warmup_steps", "max_length", "params", "txt_mode", "text_field", "dtype")


@dataclass
class UnlearnConfig:
    """model: alias / directory / hub id (the API also takes an ``nn.Module``). forget / retain:
    data files (``zoft.unlearn.data``). lr: FO learning rate (ZO: ``optimizer_options.zo_lr``, default
    lr). batch_size: forget rows per step; retain_batch_size: retain rows per step (default
    batch_size). params: substrings of the parameter names to update (default: the objective's
    choice: all, or RMU's three MLP output projections). attacks: any of nf4, fp4, int8, relearn."""

    forget: str | None = None
    retain: str | None = None
    model: str | None = None
    random_init: bool = False
    tokenizer: str | None = None
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    objective: ObjectiveName = "npo"
    objective_options: dict[str, Any] = field(default_factory=dict)
    optimizer: OptimizerName = "adam"
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-5
    steps: int = 100
    batch_size: int = 4
    retain_batch_size: int | None = None
    schedule: Schedule = "constant"
    warmup_steps: int = 0
    max_length: int = 256
    txt_mode: Literal["chunk", "lines"] = "chunk"
    text_field: str = "text"
    params: list[str] = field(default_factory=list)
    seed: int = 0
    output_dir: str = "runs/unlearn"
    save_every: int = 0
    eval_every: int = 0
    resume: bool = False
    gpu_mem: str | None = None
    eval: EvalKind = "lm"
    eval_data: str | None = None
    eval_options: dict[str, Any] = field(default_factory=dict)
    attacks: list[str] = field(default_factory=list)
    attack_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self):
        _check_types(self)
        for name, tp in [("objective", ObjectiveName), ("optimizer", OptimizerName), ("eval", EvalKind),
                         ("dtype", Literal["fp32", "bf16", "fp16"]), ("schedule", Schedule),
                         ("device", Literal["auto", "cpu", "cuda"]), ("txt_mode", Literal["chunk", "lines"])]:
            allowed = tp.__args__
            if getattr(self, name) not in allowed:
                raise UsageError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                 f"not '{getattr(self, name)}'")
        check_numbers(vars(self), UNLEARN_RANGES)
        for a in self.attacks:
            if a not in ("nf4", "fp4", "int8", "relearn"):
                raise UsageError(f"unknown attack '{a}'; use nf4, fp4, int8, relearn")
        for k in ("objective_options", "optimizer_options", "eval_options", "attack_options"):
            if not isinstance(getattr(self, k), dict):
                raise UsageError(f"config key '{k}' must be a mapping")
        bad = sorted(set(self.attack_options) - set(RELEARN_DEFAULTS))
        if bad:
            raise UsageError(f"unknown attack option(s) {bad}; valid: {sorted(RELEARN_DEFAULTS)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnlearnConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        clean = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(clean) - names)
        if unknown:
            raise UsageError(f"unknown config key(s) {unknown}; valid keys are the unlearn flags: {sorted(names)}")
        for k in ("params", "attacks"):
            if isinstance(clean.get(k), str):
                clean[k] = [x.strip() for x in clean[k].split(",") if x.strip()]
        return cls(**clean)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_types(cfg: UnlearnConfig) -> None:
    """One-line errors for values of the wrong type (YAML ``steps: ten``); ints pass as floats."""
    import typing

    hints = typing.get_type_hints(UnlearnConfig)
    for f in dataclasses.fields(cfg):
        v, tp = getattr(cfg, f.name), hints[f.name]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Literal:
            continue  # checked with the allowed values
        allowed = tuple(a for a in (args or (tp,)) if isinstance(a, type))
        if origin in (dict, list):
            allowed = (origin,)
        if v is None and type(None) in allowed:
            continue
        if float in allowed and isinstance(v, int) and not isinstance(v, bool):
            continue
        if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
            raise UsageError(f"config key '{f.name}' must be {' or '.join(a.__name__ for a in allowed if a is not type(None))}, "
                             f"not {v!r}")


UNLEARN_RANGES = {**dict.fromkeys(("steps", "save_every", "eval_every", "warmup_steps", "lr"), NON_NEGATIVE),
                  "batch_size": AT_LEAST_1, "retain_batch_size": AT_LEAST_1, "max_length": Range(2)}

# relearning attack: AdamW, the paper's lr; steps / samples / batch configurable
RELEARN_DEFAULTS: dict[str, Any] = {"relearn_lr": 1e-5, "relearn_steps": 50, "relearn_samples": None,
                                    "relearn_batch_size": 4, "relearn_weight_decay": 0.01}
