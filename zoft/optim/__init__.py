"""ZO optimizers, by name: each maps a step's probe losses to a seed-form ``Update``.

``OPTIMIZERS[name] = (config dataclass, implementation)``; every implementation carries
``memory_copies``, the parameter-sized buffers it keeps (table in ``docs/optimizers.md``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from zoft.errors import UsageError
from zoft.optim.api import StepResult, evaluate_step, split_candidates, step
from zoft.optim.cge import CGE, CGEConfig
from zoft.optim.directions import CompositeNoise, bind, whole_z
from zoft.optim.forward_grad import ForwardGrad, ForwardGradConfig
from zoft.optim.fzoo import FZOO, FZOOConfig
from zoft.optim.hizoo import HiZOO, HiZOOConfig
from zoft.optim.mezo import MeZOConfig, MeZOSGD
from zoft.optim.rank import (
    CallableOracle,
    Comparison,
    LossOracle,
    RankOracle,
    RankSGDConfig,
    RewardOracle,
    ZORankSGD,
    greedy_generate,
)
from zoft.optim.schedule import lr_at
from zoft.optim.sparse import SparseMeZO, SparseMeZOConfig, magnitude_threshold
from zoft.optim.subspace import LOZO, LOZOConfig, SubZero, SubZeroConfig
from zoft.optim.svrg import MeZOSVRG, SVRGConfig
from zoft.optim.zo_sgd import (
    ZOSGD,
    AdamConfig,
    MomentumConfig,
    RAdaZO,
    RAdaZOConfig,
    ZOAdam,
    ZOConfig,
    ZOSGDCons,
    ZOSGDMomentum,
    ZOSGDSign,
    update_record,
)

# name -> (config dataclass, implementation)
OPTIMIZERS: dict[str, tuple[type, type]] = {
    "mezo-sgd": (ZOConfig, ZOSGD),  # = MeZOSGD, plus sphere directions
    "zo-sgd-sign": (ZOConfig, ZOSGDSign),
    "zo-sgd-mmt": (MomentumConfig, ZOSGDMomentum),
    "zo-sgd-cons": (ZOConfig, ZOSGDCons),
    "zo-adam": (AdamConfig, ZOAdam),
    "r-adazo": (RAdaZOConfig, RAdaZO),
    "zo-ranksgd": (RankSGDConfig, ZORankSGD),
    "lozo": (LOZOConfig, LOZO),
    "subzero": (SubZeroConfig, SubZero),
    "fzoo": (FZOOConfig, FZOO),
    "sparse-mezo": (SparseMeZOConfig, SparseMeZO),
    "forward-grad": (ForwardGradConfig, ForwardGrad),
    "hizoo": (HiZOOConfig, HiZOO),
    "mezo-svrg": (SVRGConfig, MeZOSVRG),
    "cge": (CGEConfig, CGE),  # DeepZero; explicit (not seed-form) updates, small coordinate sets only
}


def describe(name: str) -> dict[str, Any]:
    """What ``zoft optimizers`` prints for ``name``: its paper, options with defaults, state memory
    per trained parameter (fp32 buffers: 4 bytes per copy) and where it runs."""
    cfg_cls, impl = OPTIMIZERS[name]
    options = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
               for f in dataclasses.fields(cfg_cls)}
    return {"name": name, "paper": impl.paper, "options": options,
            "state_bytes_per_param": 4 * impl.memory_copies + getattr(impl, "mask_bytes", 0), "state": impl.state_kind(),
            "streams": impl.streams, "replays": impl.replays, "data_parallel": impl.data_parallel}


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


__all__ = [
    "OPTIMIZERS",
    "ZOSGD",
    "AdamConfig",
    "CGE",
    "CGEConfig",
    "CallableOracle",
    "Comparison",
    "CompositeNoise",
    "FZOO",
    "ForwardGrad",
    "ForwardGradConfig",
    "FZOOConfig",
    "HiZOO",
    "HiZOOConfig",
    "LOZO",
    "LOZOConfig",
    "LossOracle",
    "MeZOConfig",
    "MeZOSGD",
    "MeZOSVRG",
    "MomentumConfig",
    "RAdaZO",
    "RAdaZOConfig",
    "RankOracle",
    "RankSGDConfig",
    "SparseMeZO",
    "SparseMeZOConfig",
    "RewardOracle",
    "StepResult",
    "SubZero",
    "SubZeroConfig",
    "SVRGConfig",
    "ZOAdam",
    "ZOConfig",
    "ZORankSGD",
    "ZOSGDCons",
    "ZOSGDMomentum",
    "ZOSGDSign",
    "bind",
    "evaluate_step",
    "greedy_generate",
    "lr_at",
    "describe",
    "magnitude_threshold",
    "make_optimizer",
    "split_candidates",
    "step",
    "update_record",
    "whole_z",
]
