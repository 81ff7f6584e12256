"""Sparse MeZO: MeZO restricted to the small-magnitude weights of each tensor.

Liu et al., "Sparse MeZO: Less Parameters for Better Performance in Zeroth-Order LLM Fine-Tuning"
(arXiv 2402.15751). With a 0/1 mask ``m`` per parameter tensor,

    m = 1[|w| <= h]       h = the (1 - sparsity) quantile of |w| over that tensor
    g = (L(w + eps m*z) - L(w - eps m*z)) / (2 eps),      w <- decay w - lr g (m*z)

(``q`` queries averaged as in MeZO). It is MeZO-SGD with a perturbation mask
(``ZOSGD.set_mask``) whose rule is ``magnitude_mask(sparsity)``: the threshold and the mask are
computed from the weights at the first ``bind`` (the initial, pretrained weights) and kept; the
paper recomputes the mask from the current weights with those thresholds (see docs/optimizers.md
for this deviation). State: one bool per trained parameter (1 B/param) and nothing else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zoft.optim.zo_sgd import ZOSGD, MaskRule, ZOConfig


def magnitude_mask(sparsity: float) -> MaskRule:
    """The rule ``fn(key, w) -> bool mask``: the ``ceil((1 - sparsity) * numel)`` smallest |w| of
    the tensor (and any tied with the largest of them) are 1, the rest 0."""
    def rule(key: str, w: torch.Tensor) -> torch.Tensor:
        a = w.detach().abs().flatten()
        k = max(1, math.ceil((1.0 - sparsity) * a.numel()))
        h = torch.kthvalue(a.float(), k).values if k < a.numel() else a.max()
        return (w.detach().abs() <= h.to(w.dtype)).reshape(w.shape)
    return rule


@dataclass
class SparseMeZOConfig(ZOConfig):
    """sparsity: the fraction of each trained tensor's entries (its largest |w|) never perturbed."""

    sparsity: float = 0.75

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError("sparsity must be in [0, 1) (the fraction of each tensor left untouched)")


class SparseMeZO(ZOSGD):
    name = "sparse-mezo"
    config_cls = SparseMeZOConfig
    paper = ("Liu et al., Sparse MeZO: Less Parameters for Better Performance in Zeroth-Order LLM "
             "Fine-Tuning (arXiv 2402.15751)")
    mask_bytes = 1

    def mask_rule(self):
        return super().mask_rule() or magnitude_mask(self.config.sparsity)
