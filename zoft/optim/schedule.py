"""Learning-rate schedules: a multiplier in [0, 1] of the base lr at a 0-based step."""
from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["constant", "linear", "cosine"]


def lr_at(step: int, base_lr: float, schedule: Schedule, total_steps: int, warmup_steps: int = 0) -> float:
    """``base_lr`` times linear warm-up over ``warmup_steps``, then the schedule over the rest.

    linear: decays to 0 at ``total_steps``; cosine: half a cosine period to 0 at ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    frac = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "linear":
        return base_lr * (1.0 - frac)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown lr schedule {schedule!r}; use constant, linear or cosine")
