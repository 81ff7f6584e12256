"""Keyed perturbation directions.

The direction z for (step seed, parameter key) is a pure function of those two values: no
global RNG state is read or written, and the order in which units are visited, or which of
them are resident, cannot change it. A parameter tied into two units (input embeddings shared
with the LM head) has one key, so both places see the same z.

A backend generates z and applies the fused element-wise update that every ZO step needs:

    w <- a * w + sum_k c_k * z(seed_k, key)

(decay, pending update and next perturbation in one call). Backends register by name in
``BACKENDS``; faster ones (noise tables, Triton Philox) plug in behind the same two methods.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Literal, Protocol, Sequence

import torch

Distribution = Literal["gaussian", "rademacher"]
Term = tuple[int, float]  # (seed, coefficient)

_MASK63 = (1 << 63) - 1


@lru_cache(maxsize=65536)
def key_hash(key: str) -> int:
    """Stable 64-bit hash of a parameter key (independent of Python's hash randomisation)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def mix(seed: int, key: str) -> int:
    """SplitMix64 finaliser of (seed, key): a 63-bit generator seed, well spread for nearby seeds."""
    x = (seed * 0x9E3779B97F4A7C15 + key_hash(key)) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & _MASK63


def step_seed(run_seed: int, step: int, index: int = 0) -> int:
    """The seed of probe direction ``index`` at ``step`` of a run: a pure function of the three."""
    return mix(run_seed * 1_000_003 + step, f"step-seed/{index}")


class NoiseBackend(Protocol):
    name: str
    distribution: Distribution

    def sample(self, seed: int, key: str, like: torch.Tensor) -> torch.Tensor:
        """z(seed, key) with the shape and device of ``like`` (fp32, or ``like``'s dtype if wider)."""
        ...

    def axpy(self, w: torch.Tensor, terms: Sequence[Term], key: str, decay: float = 1.0) -> None:
        """In place: ``w <- decay * w + sum_k c_k z(seed_k, key)``."""
        ...


class TorchGeneratorNoise:
    """Reference backend: one ``torch.Generator`` seeded per (seed, key), on the tensor's device.

    Bit-reproducible on a given device type; CPU and CUDA give different (equally valid) streams.
    """

    name = "torch"

    def __init__(self, distribution: Distribution = "gaussian"):
        if distribution not in ("gaussian", "rademacher"):
            raise ValueError(f"unknown distribution {distribution!r}")
        self.distribution = distribution
        self._gens: dict[torch.device, torch.Generator] = {}

    def _gen(self, device: torch.device, seed: int, key: str) -> torch.Generator:
        g = self._gens.get(device)
        if g is None:
            g = self._gens[device] = torch.Generator(device=device)
        g.manual_seed(mix(seed, key))
        return g

    def sample(self, seed: int, key: str, like: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        g = self._gen(like.device, seed, key)
        if self.distribution == "gaussian":
            return torch.randn(like.shape, generator=g, device=like.device, dtype=dtype)
        bits = torch.randint(0, 2, like.shape, generator=g, device=like.device, dtype=torch.int8)
        return bits.to(dtype).mul_(2).sub_(1)

    def axpy(self, w: torch.Tensor, terms: Sequence[Term], key: str, decay: float = 1.0) -> None:
        if decay != 1.0:
            w.mul_(decay)
        for seed, coef in terms:
            if coef != 0.0:
                w.add_(self.sample(seed, key, w).to(w.dtype), alpha=coef)


BACKENDS: dict[str, type] = {"torch": TorchGeneratorNoise}


def make_noise(name: str = "torch", distribution: Distribution = "gaussian") -> NoiseBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown noise backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name](distribution)
