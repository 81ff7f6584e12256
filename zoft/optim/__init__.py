"""ZO optimizers, by name: each maps a step's probe losses to a seed-form ``Update``."""
from __future__ import annotations

import dataclasses
from typing import Any

from zoft.errors import UsageError
from zoft.optim.mezo import MeZOConfig, MeZOSGD
from zoft.optim.schedule import lr_at

# name -> (config dataclass, implementation)
OPTIMIZERS: dict[str, tuple[type, type]] = {"mezo-sgd": (MeZOConfig, MeZOSGD)}


def make_optimizer(name: str, options: dict[str, Any], seed: int, total_steps: int):
    """Build optimizer ``name`` from a dict of its config fields (unknown keys are an error)."""
    if name not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer '{name}'; choose one of {', '.join(OPTIMIZERS)}")
    cfg_cls, impl = OPTIMIZERS[name]
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise UsageError(f"unknown option(s) {unknown} for optimizer '{name}'; valid: {sorted(fields)}")
    try:
        cfg = cfg_cls(**options)
    except (TypeError, ValueError) as e:
        raise UsageError(f"optimizer '{name}': {e}") from None
    return impl(cfg, seed=seed, total_steps=total_steps)


__all__ = ["OPTIMIZERS", "MeZOConfig", "MeZOSGD", "lr_at", "make_optimizer"]
