"""One pass ``w <- a*w + sum_k c_k z(seed_k)`` with Philox z generated in registers, and the
perturbed copy ``out <- w0 + s*z(seed)`` in one pass too.

The decay, the pending update and the next perturbation of a ZO step in one read and one write
of w, whatever the number of terms; z is never stored. Accumulates in fp32 and writes w's dtype
(round to nearest; see ``sround`` for low-precision master copies). ``offset``: w is elements
``offset ..`` of a larger tensor's flat z (a piece of it, updated on its own).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from zoft.kernels import HAS_TRITON
from zoft.kernels._triton import BLOCK, use_triton
from zoft.kernels.philox import sample_ref

Term = tuple[int, float]  # (Philox seed, coefficient)


def fused_axpy_ref(w: torch.Tensor, decay: float, terms: Sequence[Term], distribution: str = "gaussian",
                   offset: int = 0) -> None:
    """Reference: the same arithmetic in the same order, in fp32, with the torch Philox stream."""
    acc = w.detach().reshape(-1).to(torch.float32) * torch.tensor(decay, dtype=torch.float32)
    for seed, coef in terms:
        z = sample_ref(seed, w.numel(), w.device, distribution, offset)
        acc = acc + torch.tensor(coef, dtype=torch.float32) * z
    w.copy_(acc.view(w.shape).to(w.dtype))


def fused_perturb_ref(out: torch.Tensor, w0: torch.Tensor, seed: int, scale: float,
                      distribution: str = "gaussian") -> None:
    """Reference of ``fused_perturb``: ``out <- w0 + scale * z(seed)`` in fp32, rounded to out's dtype."""
    z = sample_ref(seed, w0.numel(), w0.device, distribution).view(w0.shape)
    out.copy_(w0.to(torch.float32) + torch.tensor(scale, dtype=torch.float32) * z)


if HAS_TRITON:
    import triton
    import triton.language as tl
    from zoft.kernels.philox import philox_z

    @triton.jit
    def _axpy_kernel(w_ptr, n, decay, seeds_ptr, coefs_ptr, K, base, RADEMACHER: tl.constexpr,
                     BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc = tl.load(w_ptr + offs, mask=mask).to(tl.float32) * decay
        for k in range(K):
            seed = tl.load(seeds_ptr + k)
            coef = tl.load(coefs_ptr + k)
            acc += coef * philox_z(seed, offs + base, RADEMACHER)
        tl.store(w_ptr + offs, acc.to(w_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _perturb_kernel(w0_ptr, out_ptr, n, seed, scale, RADEMACHER: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        w = tl.load(w0_ptr + offs, mask=mask).to(tl.float32)
        tl.store(out_ptr + offs, (w + scale * philox_z(seed, offs, RADEMACHER)).to(out_ptr.dtype.element_ty), mask=mask)

    def fused_axpy_triton(w: torch.Tensor, decay: float, terms: Sequence[Term], distribution: str = "gaussian",
                          offset: int = 0) -> None:
        if not w.is_contiguous():
            raise ValueError("fused_axpy_triton needs a contiguous tensor")
        seeds = _to_device(torch.tensor([s for s, _ in terms] or [0], dtype=torch.int64), w.device)
        coefs = _to_device(torch.tensor([c for _, c in terms] or [0.0], dtype=torch.float32), w.device)
        n = w.numel()
        _axpy_kernel[(triton.cdiv(n, BLOCK),)](w, n, float(decay), seeds, coefs, len(terms), offset,
                                                RADEMACHER=distribution == "rademacher", BLOCK=BLOCK)

    def fused_perturb_triton(out: torch.Tensor, w0: torch.Tensor, seed: int, scale: float,
                             distribution: str = "gaussian") -> None:
        if not (w0.is_contiguous() and out.is_contiguous()):
            raise ValueError("fused_perturb_triton needs contiguous tensors")
        n = w0.numel()
        _perturb_kernel[(triton.cdiv(n, BLOCK),)](w0, out, n, seed, float(scale),
                                                   RADEMACHER=distribution == "rademacher", BLOCK=BLOCK)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A few host values on ``device`` without a host synchronisation: staged in page-locked memory
    and copied in stream order (``torch.tensor(..., device=cuda)`` copies from pageable memory,
    which waits for the device)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_axpy(w: torch.Tensor, decay: float, terms: Sequence[Term], distribution: str = "gaussian",
               offset: int = 0) -> None:
    """In place; terms are (Philox seed, coefficient). Triton on CUDA, the reference elsewhere."""
    if use_triton(w) and w.is_contiguous() and w.dtype in _KERNEL_DTYPES:
        fused_axpy_triton(w, decay, terms, distribution, offset)
    else:
        fused_axpy_ref(w, decay, terms, distribution, offset)


def fused_perturb(out: torch.Tensor, w0: torch.Tensor, seed: int, scale: float, distribution: str = "gaussian") -> None:
    """``out <- w0 + scale * z(seed)`` (Philox seed; same shape and dtype): one read of w0, one write
    of out, z in registers. Triton on CUDA, the reference elsewhere."""
    if use_triton(w0) and w0.is_contiguous() and out.is_contiguous() and w0.dtype in _KERNEL_DTYPES:
        fused_perturb_triton(out, w0, seed, scale, distribution)
    else:
        fused_perturb_ref(out, w0, seed, scale, distribution)
