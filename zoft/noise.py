"""Keyed perturbation directions.

The direction z for (step seed, parameter key) is a pure function of those two values: no
global RNG state is read or written, and the order in which units are visited, or which of
them are resident, cannot change it. A parameter tied into two units (input embeddings shared
with the LM head) has one key, so both places see the same z.

A backend generates z and applies the fused element-wise update that every ZO step needs:

    w <- a * w + sum_k c_k * z(seed_k, key)

(decay, pending update and next perturbation in one call). Backends register by name in
``BACKENDS`` and are built by ``make_noise(name, distribution)``:

  torch   one ``torch.Generator`` per (seed, key) on the tensor's device: the bit-reproducible
          reference and the default (CPU and CUDA streams differ; both are valid).
  table   one shared table of N(0, 1) (or +-1) values, generated once on the CPU from a fixed
          seed; z(seed, key) is a contiguous window of it at a keyed offset. Generating z costs
          nothing (a view), and the table is identical on every device, so a trajectory replays
          anywhere and a CPU can apply a GPU's updates (the evolution-strategies noise table).
  triton  Philox in a fused Triton kernel (``zoft.kernels``); registered only where CUDA and
          ``triton`` are available.

Distributions: ``gaussian`` (N(0, I)), ``rademacher`` (+-1 per element) and ``sphere`` (the
Gaussian direction of each tensor rescaled to norm sqrt(numel): uniform on that sphere, per
tensor, so E[z z^T] = I still holds).
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal, Protocol

import torch

Distribution = Literal["gaussian", "rademacher", "sphere"]
DISTRIBUTIONS = ("gaussian", "rademacher", "sphere")
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


def _check(distribution: str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {list(DISTRIBUTIONS)}")


def _z_dtype(like: torch.Tensor) -> torch.dtype:
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def _to_sphere(z: torch.Tensor) -> torch.Tensor:
    """Rescale a Gaussian draw to norm sqrt(numel) (a new tensor: z may be a shared view). The
    scale stays a device tensor: no host synchronisation per tensor."""
    return z * (math.sqrt(z.numel()) / z.norm(dtype=torch.float64).clamp_min(1e-30)).to(z.dtype)


class NoiseBackend(Protocol):
    name: str
    distribution: Distribution

    def sample(self, seed: int, key: str, like: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """z(seed, key) with the shape and device of ``like`` (fp32, or ``like``'s dtype if wider).

        ``out``: a buffer of that shape and dtype the backend may write z into (saves allocating
        and page-faulting a fresh tensor); the result is ``out`` or another tensor. Read-only: the
        result may be a view of storage shared with other keys (noise table).
        """
        ...

    def axpy(self, w: torch.Tensor, terms: Sequence[Term], key: str, decay: float = 1.0) -> None:
        """In place: ``w <- decay * w + sum_k c_k z(seed_k, key)``."""
        ...


class _AxpyBySample:
    """``axpy`` from ``sample``: one in-place pass per term (no fused kernel on this path). On the
    CPU z is drawn into one scratch buffer per (thread, dtype), reused across calls (a fresh large
    allocation page-faults every time); on a device it is a fresh tensor freed after the call
    (the caching allocator makes that cheap), so no parameter-sized buffer stays on the device.
    Either way it is one fp32 z of the parameter at a time: ``zoft.engine.precision.update_bytes``."""

    def _buffer(self, like: torch.Tensor) -> torch.Tensor | None:
        if like.device.type != "cpu":
            return None
        scratch = self.__dict__.setdefault("_scratch", threading.local()).__dict__  # per thread
        k = (like.device, _z_dtype(like))
        buf = scratch.get(k)
        if buf is None or buf.numel() < like.numel():
            buf = scratch[k] = torch.empty(like.numel(), device=like.device, dtype=k[1])
        return buf[:like.numel()].view(like.shape)

    def axpy(self, w: torch.Tensor, terms: Sequence[Term], key: str, decay: float = 1.0) -> None:
        if decay != 1.0:
            w.mul_(decay)
        for seed, coef in terms:
            if coef != 0.0:
                w.add_(self.sample(seed, key, w, out=self._buffer(w)).to(w.dtype), alpha=coef)


class TorchGeneratorNoise(_AxpyBySample):
    """Reference backend: one ``torch.Generator`` seeded per (seed, key), on the tensor's device.

    Bit-reproducible on a given device type; CPU and CUDA give different (equally valid) streams.
    """

    name = "torch"

    def __init__(self, distribution: Distribution = "gaussian"):
        _check(distribution)
        self.distribution = distribution
        self._local = threading.local()  # one generator per (thread, device): draws may overlap

    def _gen(self, device: torch.device, seed: int, key: str) -> torch.Generator:
        gens = self._local.__dict__.setdefault("gens", {})
        g = gens.get(device)
        if g is None:
            g = gens[device] = torch.Generator(device=device)
        g.manual_seed(mix(seed, key))
        return g

    def sample(self, seed: int, key: str, like: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        dtype = _z_dtype(like)
        g = self._gen(like.device, seed, key)
        if self.distribution == "rademacher":
            bits = torch.randint(0, 2, like.shape, generator=g, device=like.device, dtype=torch.int8)
            return bits.to(dtype).mul_(2).sub_(1)
        if out is not None and out.dtype == dtype and out.shape == like.shape and out.is_contiguous():
            z = torch.randn(like.shape, generator=g, device=like.device, dtype=dtype, out=out)  # same stream
        else:
            z = torch.randn(like.shape, generator=g, device=like.device, dtype=dtype)
        return _to_sphere(z) if self.distribution == "sphere" else z


class NoiseTable(_AxpyBySample):
    """Shared noise table: z(seed, key) is the window ``table[o : o + n]`` at a keyed offset o.

    size: table entries (default 2^26: 256 MiB in fp32). The table is drawn once, on the CPU,
          from ``torch.Generator().manual_seed(table_seed)``, and copied to each device (and
          dtype) on first use, so every device reads the same numbers. A tensor larger than the
          table is assembled from several keyed windows (a copy; still no RNG).

    Offsets are multiples of 16 elements (64-byte aligned windows in fp32). Windows of different
    keys overlap as shifted copies, which leaves distinct elements of one z, and z of different
    keys at the same position, uncorrelated (Salimans et al. 2017 use the same construction).
    """

    name = "table"
    ALIGN = 16

    def __init__(self, distribution: Distribution = "gaussian", size: int = 1 << 26, table_seed: int = 0):
        _check(distribution)
        if size < self.ALIGN:
            raise ValueError(f"noise table size must be >= {self.ALIGN}, got {size}")
        self.distribution = distribution
        self.size = int(size)
        self.table_seed = int(table_seed)
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def table(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (size,) table on ``device`` in ``dtype`` (built on first use, then cached)."""
        device = torch.device(device)
        t = self._tables.get((device, dtype))
        if t is None:
            base = self._tables.get((torch.device("cpu"), torch.float32))
            if base is None:
                g = torch.Generator().manual_seed(self.table_seed)
                if self.distribution == "rademacher":
                    base = torch.randint(0, 2, (self.size,), generator=g, dtype=torch.int8).float().mul_(2).sub_(1)
                else:
                    base = torch.randn(self.size, generator=g)
                self._tables[(torch.device("cpu"), torch.float32)] = base
            t = self._tables[(device, dtype)] = base.to(device=device, dtype=dtype)
        return t

    def offset(self, seed: int, key: str, n: int, part: int = 0) -> int:
        """Start of the window for (seed, key) of n <= size elements (``part``: n > size chunks)."""
        slots = (self.size - n) // self.ALIGN + 1
        return (mix(seed, key if part == 0 else f"{key}#{part}") % slots) * self.ALIGN

    def sample(self, seed: int, key: str, like: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        t = self.table(like.device, _z_dtype(like))  # ``out`` unused: a window is a view
        n = like.numel()
        if n <= self.size:
            o = self.offset(seed, key, n)
            z = t[o:o + n].view(like.shape)  # no copy, no RNG
        else:
            chunks, done, part = [], 0, 0
            while done < n:
                m = min(self.size, n - done)
                o = self.offset(seed, key, m, part)
                chunks.append(t[o:o + m])
                done, part = done + m, part + 1
            z = torch.cat(chunks).view(like.shape)
        return _to_sphere(z) if self.distribution == "sphere" else z


BACKENDS: dict[str, type] = {"torch": TorchGeneratorNoise, "table": NoiseTable}



class PhiloxNoise(_AxpyBySample):
    """Counter-based Philox4x32-10 z (the stream of Triton's ``tl.randn`` / ``tl.randint``).

    Element i of z(seed, key) is a function of (mix(seed, key), i) only. On CUDA tensors the
    fused Triton kernel of ``zoft.kernels`` generates z inside ``axpy`` (one read and one write
    of w for all terms, z never stored); elsewhere the pure-torch reference computes the same
    stream (equal up to ~1 ulp of the Box-Muller log/cos). Registered as ``triton`` only where
    CUDA and ``triton`` are available.
    """

    name = "triton"

    def __init__(self, distribution: Distribution = "gaussian"):
        _check(distribution)
        self.distribution = distribution

    def sample(self, seed: int, key: str, like: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        from zoft.kernels import philox

        dist = "gaussian" if self.distribution == "sphere" else self.distribution
        z = philox.sample(mix(seed, key), like.numel(), like.device, dist).view(like.shape).to(_z_dtype(like))
        return _to_sphere(z) if self.distribution == "sphere" else z

    def axpy(self, w: torch.Tensor, terms: Sequence[Term], key: str, decay: float = 1.0) -> None:
        from zoft.kernels import axpy

        if self.distribution == "sphere" or not w.is_cuda or not w.is_contiguous():
            return super().axpy(w, terms, key, decay)
        terms = [(mix(s, key), c) for s, c in terms if c != 0.0]
        axpy.fused_axpy(w, decay, terms, self.distribution)


def _triton_usable() -> bool:
    if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return False
    try:  # ``zoft.kernels`` exists once installed (setuptools package-dir maps it to kernels/)
        return importlib.util.find_spec("zoft.kernels") is not None
    except ModuleNotFoundError:
        return False


if _triton_usable():
    BACKENDS["triton"] = PhiloxNoise


def make_noise(name: str = "torch", distribution: Distribution = "gaussian") -> NoiseBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown noise backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name](distribution)
