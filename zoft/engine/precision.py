"""Stochastic rounding of fp32 values to bf16/fp16 (low-precision weights and master copies), and
the device bytes an update of one parameter takes.

Round-to-nearest drops a ZO update whose size is below half an ulp of the weight (for bf16, 2^-9
of |w|: a MeZO step of lr=1e-6 on |w|~0.05 is ~1e-4 of an ulp), so a low-precision weight would
never move. Stochastic rounding picks the lower or the upper neighbour with probabilities that
make the result unbiased, ``E[round(x)] = x``, so small updates accumulate in expectation.
The random draws come from a keyed ``torch.Generator`` (``seed``) on the weight's device: replay
rounds identically on the same device type (CPU and CUDA generators draw different streams, so a
bf16/fp16 trajectory is bit-replayable only there; ``zoft.kernels.sround``'s Philox rounding,
alike on both, is not what the engine uses).

Rounding runs over chunks of ``SROUND_CHUNK`` elements written straight into the weight, so its
temporaries are bounded (``SROUND_TEMP_BYTES`` per element of one chunk), whatever the parameter's
size; no step of it reads a value back to the host. A seed-form update of a low-precision weight
(``apply_update_``) runs piece by piece too: each piece's fp32 copy takes the update and is
rounded back, so no fp32 copy of a whole parameter, and no persistent scratch, exists.
"""
from __future__ import annotations

import torch

SROUND_CHUNK = 1 << 20  # elements rounded at once
# bytes per element of one chunk's temporaries: the nearest value (2) and the other neighbour (2),
# both in fp32 (4 + 4), the gap (4), the probability (4), the uniform draw (4), masks (3); rounded up
SROUND_TEMP_BYTES = 32


def update_bytes(numel: int, element_size: int, z: str = "pieces", chunk: int = SROUND_CHUNK) -> int:
    """Device bytes, beyond the weight itself, of applying a seed-form update to one parameter of
    ``numel`` elements stored in ``element_size`` bytes (``zoft.noise``'s ``axpy``):

    ``z``: how the backend makes z. "pieces": one piece of ``chunk`` elements at a time (the
    table on any device, torch on the CPU, Philox off CUDA); "fused": in registers (the Philox
    kernel on CUDA); "whole": drawn for the whole tensor (the torch generator on CUDA, whose
    stream cannot be cut). A 2-byte weight is updated a piece at a time in fp32 and rounded back
    (its piece's fp32 copy and one chunk of rounding temporaries), except with "whole" z, where
    it takes an fp32 copy of the whole tensor. fp32 z (fp64 for an fp64 weight).
    ``zoft.engine.plan`` and the engine's meter both count this."""
    piece = min(numel, chunk)
    zb = max(4, element_size)
    n = {"pieces": zb * piece, "fused": 0, "whole": zb * numel}[z]
    if element_size == 2:
        n += 4 * (numel if z == "whole" else piece) + SROUND_TEMP_BYTES * piece
    return n


def perturb_bytes(numel: int, element_size: int, z: str = "pieces", chunk: int = SROUND_CHUNK) -> int:
    """Device bytes, beyond the perturbed copy itself, of ``perturb_into`` on a parameter of
    ``numel`` elements (``update_bytes``'s ``z``): one piece of z in fp32 and its cast to the
    weight's dtype ("pieces"), z of the whole tensor and a piece's cast ("whole"), none ("fused")."""
    piece = min(numel, chunk)
    cast = element_size * piece if element_size != 4 else 0
    return {"pieces": 4 * piece + cast, "fused": 0, "whole": 4 * numel + cast}[z]


def perturb_z_mode(noise, w0: torch.Tensor, seed: int) -> str:
    """How ``noise.perturb_into`` makes z for ``w0`` under ``seed`` (``perturb_bytes``'s ``z``):
    the backend's way (``noise.z_mode``; a shaped direction, ``zoft.optim.directions``, is
    "whole"), or "whole" for a virtual seed (a composite direction, drawn whole), a strided ``w0``
    or a backend that does not say."""
    mode = getattr(noise, "z_mode", None)
    if mode is None or seed < 0 or not w0.is_contiguous():
        return "whole"
    return mode(w0)


def apply_update_(update, key: str, w: torch.Tensor, noise, decays: bool, sround_seed: int) -> None:
    """Apply ``update`` (``zoft.engine.Update``) to the weight ``w`` in place. A bf16/fp16 weight
    is updated in fp32 and stochastically rounded back, keyed by ``sround_seed`` (round to nearest
    would drop ZO-sized updates, |lr*g*z| << half an ulp of w): a seed-form update by a backend
    that rounds in place (``rounds_in_place``) does it a piece at a time, any other update (a
    stateful optimizer's, a wrapper's) on a whole fp32 copy."""
    from zoft.engine.probes import Update

    if w.dtype not in (torch.bfloat16, torch.float16):
        update.apply(key, w, noise, decays)
    elif type(update).apply is Update.apply and getattr(noise, "rounds_in_place", False):
        noise.axpy(w, update.terms, key, update.decay if decays else 1.0, sround_seed=sround_seed)
    else:
        w32 = w.float()
        update.apply(key, w32, noise, decays)
        stochastic_round_(w, w32, sround_seed)


def z_mode(update, noise, w: torch.Tensor) -> str:
    """How ``apply_update_`` makes z for ``w`` (``update_bytes``'s ``z``): the backend's way
    (``noise.z_mode``) for a seed-form update by a backend that rounds in place, else "whole"."""
    from zoft.engine.probes import Update

    if type(update).apply is not Update.apply or not getattr(noise, "rounds_in_place", False):
        return "whole"
    return noise.z_mode(w)


class KeyedRounder:
    """Stochastic rounding of one tensor in consecutive pieces, keyed by ``seed``: the pieces,
    taken in order from element 0, round exactly as ``stochastic_round_`` rounds the whole."""

    def __init__(self, seed: int, device: torch.device):
        self.g = torch.Generator(device=device)
        self.g.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        self.inf: dict[torch.dtype, torch.Tensor] = {}
        self.device = device

    def round_(self, out: torch.Tensor, x: torch.Tensor, lo: int = 0) -> None:
        """Write ``x`` (fp32, flat: elements ``lo ..`` of the tensor) rounded into ``out`` (flat,
        bf16 or fp16, contiguous), in ``SROUND_CHUNK`` chunks of the whole tensor."""
        inf = self.inf.get(out.dtype)
        if inf is None:  # no host-to-device copy
            inf = self.inf[out.dtype] = torch.full((), float("inf"), dtype=out.dtype, device=self.device)
        edges = [lo, *range((lo // SROUND_CHUNK + 1) * SROUND_CHUNK, lo + x.numel(), SROUND_CHUNK), lo + x.numel()]
        for a, b in zip(edges[:-1], edges[1:]):
            _round_chunk(out[a - lo:b - lo], x[a - lo:b - lo], self.g, inf)


def stochastic_round_(out: torch.Tensor, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Write ``x`` (fp32) rounded to ``out.dtype`` (bf16 or fp16) into ``out`` (same shape),
    unbiased, keyed by ``seed``; chunk by chunk. Returns ``out``.

    Non-finite values and values that are exactly representable round to nearest (unchanged).
    """
    if out.shape != x.shape:
        raise ValueError(f"stochastic_round_: output shape {tuple(out.shape)} != input {tuple(x.shape)}")
    if not out.is_contiguous():  # a strided view: round into a contiguous buffer, then copy
        return out.copy_(stochastic_round(x, out.dtype, seed))
    KeyedRounder(seed, x.device).round_(out.view(-1), x.reshape(-1))
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
