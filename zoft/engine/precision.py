"""Stochastic rounding of fp32 values to bf16/fp16 (low-precision weights and master copies).

Round-to-nearest drops a ZO update whose size is below half an ulp of the weight (for bf16, 2^-9
of |w|: a MeZO step of lr=1e-6 on |w|~0.05 is ~1e-4 of an ulp), so a low-precision weight would
never move. Stochastic rounding picks the lower or the upper neighbour with probabilities that
make the result unbiased, ``E[round(x)] = x``, so small updates accumulate in expectation.
The random draws come from a keyed ``torch.Generator`` (``seed``): replay rounds identically.
"""
from __future__ import annotations

import torch


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``x`` (fp32, any shape) rounded to ``dtype`` (bf16 or fp16), unbiased, keyed by ``seed``.

    Non-finite values and values that are exactly representable round to nearest (unchanged).
    """
    near = x.to(dtype)
    n32 = near.float()
    # the representable neighbour on the other side of x than ``near``
    toward = torch.where(n32 > x, torch.tensor(float("-inf"), dtype=dtype, device=x.device),
                         torch.tensor(float("inf"), dtype=dtype, device=x.device))
    other = torch.nextafter(near, toward)
    gap = (other.float() - n32).abs()
    p = torch.where(gap > 0, (x - n32).abs() / gap, torch.zeros_like(x))  # P(other), in [0, 1/2]
    g = torch.Generator(device=x.device)
    g.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    u = torch.rand(x.shape, generator=g, device=x.device, dtype=torch.float32)
    out = torch.where(u < p, other, near)
    return torch.where(torch.isfinite(x) & torch.isfinite(other.float()), out, near)
