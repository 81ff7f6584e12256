"""Shared helpers: whether a tensor runs on the Triton path, and the launch block size."""
from __future__ import annotations

import os

import torch
from zoft.kernels import HAS_TRITON

BLOCK = 1024  # elements per program: 4 KiB of fp32, a full wave of 128-bit loads per warp


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Triton for CUDA tensors; the CPU only under the interpreter (tests)."""
    return HAS_TRITON and (t.is_cuda or interpreting())
