"""Stochastic rounding fp32 -> bf16 for write-back of low-precision master copies.

Round-to-nearest loses ZO-sized updates (|lr * g * z| far below half a bf16 ulp of w); adding 16
random bits below bf16's last mantissa bit and truncating rounds up with probability equal to the
discarded fraction, so E[round(x)] = x. The bits come from Philox (seed, element index): the CPU
reference and the Triton kernel round every element the same way. NaN stays NaN.
"""
from __future__ import annotations

import torch
from zoft.kernels import HAS_TRITON
from zoft.kernels._triton import BLOCK, use_triton
from zoft.kernels.philox import M32, randint4x_ref


def sround_bf16_ref(x: torch.Tensor, seed: int) -> torch.Tensor:
    flat = x.detach().reshape(-1).to(torch.float32)
    r, _, _, _ = randint4x_ref(seed, torch.arange(flat.numel(), device=x.device))
    bits = (flat.view(torch.int32).to(torch.int64) & M32) + (r & 0xFFFF)
    bits = bits & 0xFFFF0000
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)  # back to int32
    y = bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero
    return torch.where(torch.isnan(flat), flat.to(torch.bfloat16), y).view(x.shape)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _sround_kernel(x_ptr, out_ptr, n, seed, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        r = tl.randint(seed, offs) & 0xFFFF
        bits = (x.to(tl.uint32, bitcast=True) + r) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
        y = tl.where(x != x, x, y)  # noqa: PLR0124 (x != x: NaN test)
        tl.store(out_ptr + offs, y.to(tl.bfloat16), mask=mask)

    def sround_bf16_triton(x: torch.Tensor, seed: int) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty(x.shape, device=x.device, dtype=torch.bfloat16)
        n = x.numel()
        _sround_kernel[(triton.cdiv(n, BLOCK),)](x, out, n, seed, BLOCK=BLOCK)
        return out


def sround_bf16(x: torch.Tensor, seed: int) -> torch.Tensor:
    """bf16 copy of ``x`` with stochastic rounding keyed by ``seed``."""
    return sround_bf16_triton(x, seed) if use_triton(x) else sround_bf16_ref(x, seed)
