"""Philox4x32-10 noise: Triton's ``tl.randint4x`` / ``tl.randn`` stream, and the same in torch.

Element i of z(seed) is a function of (seed, i) only: counter (i_lo, i_hi, 0, 0), key
(seed_lo, seed_hi), 10 rounds (Salmon et al. 2011, as in ``triton/language/random.py``).
``randint4x_ref`` is bit-exact; ``randn_ref`` applies the same Box-Muller transform in fp32, so
it matches the kernel up to the ulps of log/cos (measured < 2e-6 absolute under the interpreter).
"""
from __future__ import annotations

import torch
from zoft.kernels import HAS_TRITON
from zoft.kernels._triton import BLOCK, use_triton

M32 = 0xFFFFFFFF
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
U32_TO_UNIT = 4.6566127342e-10  # Triton's scale: max int32 * scale < 1.0 in fp32


def _umulhi(a: int, b: torch.Tensor) -> torch.Tensor:
    """High 32 bits of a * b for a < 2^32 and b in [0, 2^32) held in int64 (no overflow)."""
    hi, lo = b >> 16, b & 0xFFFF
    return (a * hi + ((a * lo) >> 16)) >> 16


def _mullo(a: int, b: torch.Tensor) -> torch.Tensor:
    hi, lo = b >> 16, b & 0xFFFF
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & M32


def philox4x32_ref(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox4x32 on int64 tensors holding uint32 words (Random123's counter/key layout)."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & M32 for c in (c0, c1, c2, c3))
    for _ in range(rounds):
        _c0, _c2 = c0, c2
        c0 = _umulhi(ROUND_B, _c2) ^ c1 ^ k0
        c2 = _umulhi(ROUND_A, _c0) ^ c3 ^ k1
        c1 = _mullo(ROUND_B, _c2)
        c3 = _mullo(ROUND_A, _c0)
        k0, k1 = (k0 + KEY_A) & M32, (k1 + KEY_B) & M32
    return c0, c1, c2, c3


def randint4x_ref(seed: int, offsets: torch.Tensor, rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Four uint32 words (as int64 in [0, 2^32)) per offset: ``tl.randint4x(seed, offsets)``."""
    offsets = offsets.to(torch.int64)
    zero = torch.zeros_like(offsets)
    return philox4x32_ref(offsets & M32, (offsets >> 32) & M32, zero, zero, seed & M32, (seed >> 32) & M32, rounds)


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """``uint_to_uniform_float``: uint32 -> fp32 in [0, 1)."""
    x = torch.where(x >= 1 << 31, x - (1 << 32), x)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * torch.tensor(U32_TO_UNIT, dtype=torch.float32)


def randn_ref(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.randn(seed, offsets)`` in fp32: Box-Muller on the first two words."""
    i1, i2, _, _ = randint4x_ref(seed, offsets)
    u1 = _uniform(i1).clamp_min(1.0e-7)
    th = torch.tensor(6.283185307179586, dtype=torch.float32) * _uniform(i2)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(th)


def rademacher_ref(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """+-1 from the low bit of the first word."""
    i1, _, _, _ = randint4x_ref(seed, offsets)
    return 1.0 - 2.0 * (i1 & 1).to(torch.float32)


def sample_ref(seed: int, n: int, device: torch.device | str = "cpu", distribution: str = "gaussian",
               offset: int = 0) -> torch.Tensor:
    """Elements ``offset .. offset + n - 1`` of z(seed)."""
    offsets = torch.arange(offset, offset + n, device=device, dtype=torch.int64)
    return rademacher_ref(seed, offsets) if distribution == "rademacher" else randn_ref(seed, offsets)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def philox_z(seed, offs, RADEMACHER: tl.constexpr):
        """z at ``offs`` (int64) for ``seed``: N(0, 1), or +-1 when RADEMACHER."""
        if RADEMACHER:
            r = tl.randint(seed, offs)
            z = 1.0 - 2.0 * (r & 1).to(tl.float32)
        else:
            z = tl.randn(seed, offs)
        return z

    @triton.jit
    def _sample_kernel(out_ptr, n, seed, base, RADEMACHER: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + offs, philox_z(seed, offs + base, RADEMACHER), mask=mask)

    def sample_triton(seed: int, n: int, device: torch.device | str, distribution: str = "gaussian",
                      offset: int = 0) -> torch.Tensor:
        out = torch.empty(n, device=device, dtype=torch.float32)
        _sample_kernel[(triton.cdiv(n, BLOCK),)](out, n, seed, offset, RADEMACHER=distribution == "rademacher",
                                                 BLOCK=BLOCK)
        return out


def sample(seed: int, n: int, device: torch.device | str = "cpu", distribution: str = "gaussian",
           offset: int = 0) -> torch.Tensor:
    """(n,) fp32 z for ``seed`` on ``device``, its elements ``offset ..``: the Triton kernel on
    CUDA, the torch reference elsewhere."""
    if use_triton(torch.empty(0, device=device)):
        return sample_triton(seed, n, device, distribution, offset)
    return sample_ref(seed, n, device, distribution, offset)
