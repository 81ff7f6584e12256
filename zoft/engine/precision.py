"""Stochastic rounding of fp32 values to bf16/fp16 (low-precision weights and master copies), and
the device bytes an update of one parameter takes.

Round-to-nearest drops a ZO update whose size is below half an ulp of the weight (for bf16, 2^-9
of |w|: a MeZO step of lr=1e-6 on |w|~0.05 is ~1e-4 of an ulp), so a low-precision weight would
never move. Stochastic rounding picks the lower or the upper neighbour with probabilities that
make the result unbiased, ``E[round(x)] = x``, so small updates accumulate in expectation.
The random draws come from a keyed ``torch.Generator`` (``seed``): replay rounds identically.

Rounding runs over chunks of ``SROUND_CHUNK`` elements written straight into the weight, so its
temporaries are bounded (``SROUND_TEMP_BYTES`` per element of one chunk), whatever the parameter's
size; no step of it reads a value back to the host.
"""
from __future__ import annotations

import torch

SROUND_CHUNK = 1 << 20  # elements rounded at once
# bytes per element of one chunk's temporaries: the nearest value (2) and the other neighbour (2),
# both in fp32 (4 + 4), the gap (4), the probability (4), the uniform draw (4), masks (3); rounded up
SROUND_TEMP_BYTES = 32


def update_bytes(numel: int, element_size: int, fused: bool = False) -> int:
    """Device bytes, beyond the weight itself, of applying a seed-form update to one parameter of
    ``numel`` elements stored in ``element_size`` bytes: its z, drawn whole in fp32 (fp64 for an
    fp64 weight: a keyed stream is drawn for the whole tensor; none when ``fused``: the Philox
    kernel generates z in registers), and for a 2-byte weight the fp32 copy it is updated in plus
    one chunk of stochastic rounding. ``zoft.engine.plan`` and the engine's meter both count this."""
    n = 0 if fused else numel * max(4, element_size)
    if element_size == 2:
        n += 4 * numel + SROUND_TEMP_BYTES * min(numel, SROUND_CHUNK)
    return n


def stochastic_round_(out: torch.Tensor, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Write ``x`` (fp32) rounded to ``out.dtype`` (bf16 or fp16) into ``out`` (same shape),
    unbiased, keyed by ``seed``; chunk by chunk. Returns ``out``.

    Non-finite values and values that are exactly representable round to nearest (unchanged).
    """
    if out.shape != x.shape:
        raise ValueError(f"stochastic_round_: output shape {tuple(out.shape)} != input {tuple(x.shape)}")
    if not out.is_contiguous():  # a strided view: round into a contiguous buffer, then copy
        return out.copy_(stochastic_round(x, out.dtype, seed))
    g = torch.Generator(device=x.device)
    g.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    inf = torch.full((), float("inf"), dtype=out.dtype, device=x.device)  # no host-to-device copy
    xf, of = x.reshape(-1), out.view(-1)
    for lo in range(0, xf.numel(), SROUND_CHUNK):
        _round_chunk(of[lo:lo + SROUND_CHUNK], xf[lo:lo + SROUND_CHUNK], g, inf)
    return out


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``x`` (fp32, any shape) rounded to ``dtype`` (bf16 or fp16), unbiased, keyed by ``seed``."""
    return stochastic_round_(torch.empty(x.shape, dtype=dtype, device=x.device), x, seed)


def _round_chunk(out: torch.Tensor, x: torch.Tensor, g: torch.Generator, inf: torch.Tensor) -> None:
    near = x.to(out.dtype)
    n32 = near.float()
    # the representable neighbour on the other side of x than ``near``
    other = torch.nextafter(near, torch.where(n32 > x, -inf, inf))
    o32 = other.float()
    gap = (o32 - n32).abs_()
    p = (x - n32).abs_().div_(gap)  # P(other), in [0, 1/2]; 0/0 (exact x) is NaN: never taken
    u = torch.rand(x.shape, generator=g, device=x.device, dtype=torch.float32)
    take = (u < p).logical_and_(torch.isfinite(x)).logical_and_(torch.isfinite(o32))
    torch.where(take, other, near, out=out)
