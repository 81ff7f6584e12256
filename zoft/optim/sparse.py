"""Sparse MeZO: MeZO restricted to the small-magnitude weights of each tensor.

Liu et al., "Sparse MeZO: Less Parameters for Better Performance in Zeroth-Order LLM Fine-Tuning"
(arXiv 2402.15751). Per trained tensor a threshold h, fixed from the initial (pretrained) weights,
and at every step t the mask of the current weights:

    h = the k-th smallest |w_0| of the tensor, k = ceil((1 - sparsity) n)
    m_t = 1[|w_t| <= h]
    g_i = (L(w_t + eps m_t*z_i) - L(w_t - eps m_t*z_i)) / (2 eps),   w_{t+1} = decay w_t - lr (1/q) sum_i g_i m_t*z_i

It is MeZO-SGD with a perturbation mask (``ZOSGD.masks``, 1 bool per trained parameter). The
mask of step t+1 is computed where update t lands: the update's ``apply`` writes the key's new
weights, then its new mask, and marks the key (``zoft.optim.landing.KeyClock``); a probe direction
of step t+1 checks that mark (the engine applies a module's pending update in its pre-hook before
it builds the perturbed copies, so the mark is there; a direction drawn earlier is an error). The
update is therefore not deferrable under streaming (a unit is written back in the residency that
applied it) and the engine moves a streamed key's mask with its unit (``store``). ``remask: false``
keeps the mask of the initial weights instead (a plain seed-form update); ``sphere`` directions need
it (their norm is taken when step t+1's probes are built, before update t re-derives the masks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from zoft.engine.probes import Probe, Update
from zoft.optim.landing import KeyClock, LandingUpdate
from zoft.optim.zo_sgd import ZOSGD, ZOConfig


def magnitude_threshold(w: torch.Tensor, sparsity: float) -> float:
    """The k-th smallest |w|, k = ceil((1 - sparsity) * numel): ``|w| <= h`` keeps at least k entries."""
    a = w.detach().abs().flatten()
    k = max(1, math.ceil((1.0 - sparsity) * a.numel()))
    return float(torch.kthvalue(a, k).values) if k < a.numel() else float(a.max())


@dataclass
class SparseMeZOConfig(ZOConfig):
    """sparsity: the fraction of each trained tensor's entries (its largest |w| at the start) not
    perturbed. remask: recompute the mask from the current weights every step (the paper); false
    keeps the initial weights' mask (what ``sphere`` needs)."""

    sparsity: float = 0.75
    remask: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError("sparsity must be in [0, 1) (the fraction of each tensor left untouched)")
        if self.sphere and self.remask:
            raise ValueError("sphere with remask: the sphere norm of a step's masked directions is taken before the "
                             "previous update re-derives the masks; set remask: false or sphere: false")


class RemaskUpdate(LandingUpdate):
    """MeZO's seed-form step (along the masks it was estimated with), then the key's next mask;
    the key is marked landed (or failed) on ``opt.clock``."""

    def __init__(self, terms, decay: float, opt: "SparseMeZO"):
        super().__init__(terms=terms, decay=decay)
        self.opt = opt
        self.store = {"mask": opt.masks}  # the engine brings a streamed key's mask to its unit and back

    def _apply(self, key, w, noise, decays):
        # CompositeNoise.axpy's arithmetic, along the masks of this update's own step (no wait: this
        # is the update the next step's draws wait for)
        inner = getattr(noise, "inner", noise)
        if decays and self.decay != 1.0:
            w.mul_(self.decay)
        for s, c in self.terms:
            if c != 0.0:
                w.add_(ZOSGD.shaped_direction(self.opt, inner, s, key, w).to(w.dtype), alpha=c)
        h = self.opt.thresholds.get(key)
        if h is not None:
            self.opt.masks[key] = w.abs() <= h

    def record(self) -> dict:
        return {"terms": [[s, c] for s, c in self.terms], "decay": self.decay, "remask": True}


class SparseMeZO(ZOSGD):
    name = "sparse-mezo"
    config_cls = SparseMeZOConfig
    paper = ("Liu et al., Sparse MeZO: Less Parameters for Better Performance in Zeroth-Order LLM "
             "Fine-Tuning (arXiv 2402.15751)")
    mask_bytes = 1

    def __init__(self, config, seed: int = 0, total_steps: int = 1):
        super().__init__(config, seed, total_steps)
        self.thresholds: dict[str, float] = {}  # key -> h, from the first bind's weights
        self.clock = KeyClock()
        self._need = 0  # updates the current step's directions must see

    @property
    def stateful(self) -> bool:
        """With ``remask`` each update re-derives its keys' masks from the new weights
        (``RemaskUpdate.apply``): not seed-form (``ZOSGD.stateful``); without, plain MeZO updates."""
        return self.config.remask

    def set_mask(self, mask):
        raise TypeError("sparse-mezo builds its own magnitude mask; pass a mask to mezo-sgd instead")

    def mask_rule(self):
        return self._magnitude_mask

    def _magnitude_mask(self, key: str, w: torch.Tensor) -> torch.Tensor:
        h = self.thresholds.setdefault(key, magnitude_threshold(w, self.config.sparsity))
        return w.abs() <= h

    def shaped_direction(self, noise: Any, seed: int, key: str, like: torch.Tensor) -> torch.Tensor:
        if self.config.remask:
            self.clock.check(key, self._need)  # the mask of the weights after the pending update
        return super().shaped_direction(noise, seed, key, like)

    def probes(self, step: int) -> list[Probe]:
        self._need = self.clock.handed
        return super().probes(step)

    def make_update(self, step, grads, lr, decay):
        upd = super().make_update(step, grads, lr, decay)
        if not self.config.remask:
            return upd
        self.clock.hand_out()
        return RemaskUpdate(upd.terms, upd.decay, self)

    def update_from_record(self, record: dict) -> Update:
        if not record.get("remask"):  # remask off, or a skipped (NaN) step: the masks did not move
            return super().update_from_record(record)
        self.clock.hand_out()
        return RemaskUpdate([(int(s), float(c)) for s, c in record["terms"]], float(record["decay"]), self)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "thresholds": dict(self.thresholds)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "thresholds" in state:
            self.thresholds = {k: float(v) for k, v in state["thresholds"].items()}
        self.clock.reset(self.clock.handed)

    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_tensor_state(tensors)
        self.clock.reset(self.clock.handed)
