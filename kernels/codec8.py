"""8-bit transfer codec: symmetric int8 with one fp32 absmax scale per block of elements.

``quantize8`` (torch, runs where the master copy lives) -> (q int8 (n,), scales fp32 (ceil(n/B),));
``dequantize8`` restores ``q * scale`` in the forward's dtype: one multiply per element, so the
kernel and the reference agree bitwise in fp32 and fp16, and in bf16 on hardware (round to
nearest-even; the Triton interpreter truncates fp32 -> bf16, one bf16 ulp). Worst-case error of the round trip: half a step, absmax / 254 per block.
"""
from __future__ import annotations

import torch
from zoft.kernels import HAS_TRITON
from zoft.kernels._triton import BLOCK, use_triton


def quantize8(x: torch.Tensor, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    nb = -(-n // block)
    padded = torch.zeros(nb * block, dtype=torch.float32, device=x.device)
    padded[:n] = flat
    absmax = padded.view(nb, block).abs().amax(1)  # (nb,)
    scales = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.round(padded.view(nb, block) / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.view(-1)[:n].contiguous(), scales


def dequantize8_ref(q: torch.Tensor, scales: torch.Tensor, block: int, shape, dtype=torch.float32) -> torch.Tensor:
    idx = torch.arange(q.numel(), device=q.device) // block
    return (q.to(torch.float32) * scales[idx]).to(dtype).view(shape)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dequant_kernel(q_ptr, s_ptr, out_ptr, n, block, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        q = tl.load(q_ptr + offs, mask=mask).to(tl.float32)
        s = tl.load(s_ptr + offs // block, mask=mask)
        tl.store(out_ptr + offs, (q * s).to(out_ptr.dtype.element_ty), mask=mask)

    def dequantize8_triton(q: torch.Tensor, scales: torch.Tensor, block: int, shape, dtype=torch.float32) -> torch.Tensor:
        out = torch.empty(shape, device=q.device, dtype=dtype)
        n = q.numel()
        _dequant_kernel[(triton.cdiv(n, BLOCK),)](q, scales, out, n, block, BLOCK=BLOCK)
        return out


def dequantize8(q: torch.Tensor, scales: torch.Tensor, block: int, shape, dtype=torch.float32) -> torch.Tensor:
    if use_triton(q):
        return dequantize8_triton(q, scales, block, shape, dtype)
    return dequantize8_ref(q, scales, block, shape, dtype)
