"""Keyed perturbation directions.

The direction z for (step seed, parameter key) is a pure function of those two values: no
global RNG state is read or written, and the order in which units are visited, or which of
them are resident, cannot change it. A parameter tied into two units (input embeddings shared
with the LM head) has one key, so both places see the same z.

A backend generates z and applies the fused element-wise update that every ZO step needs:

    w <- a * w + sum_k c_k * z(seed_k, key)

(decay, pending update and next perturbation in one call), and the perturbed copy

    out <- w0 + scale * z(seed, key)

(``perturb_into``). Both run over the flat tensor in pieces of ``ZCHUNK`` elements, so no z of
a whole parameter exists at once (``chunk_bounds``); a bf16/fp16 weight given a rounding seed
is updated piece by piece in fp32 and stochastically rounded back (``zoft.engine.precision``).
Backends register by name in ``BACKENDS`` and are built by ``make_noise(name, distribution)``:

  torch   one ``torch.Generator`` per (seed, key) on the tensor's device: the bit-reproducible
          reference and ``make_noise``'s default (CPU and CUDA streams differ; both are valid).
          On the CPU, pieces drawn in turn from one generator are the single draw (pieces are
          multiples of 16 elements, the block ``torch.randn`` fills); a CUDA generator's are
          not, so there z is drawn whole (``chunked``: False; the planner counts it).
  table   one shared table of N(0, 1) (or +-1) values, generated once on the CPU from a fixed
          seed; z(seed, key) is a contiguous window of it at a keyed offset. Generating z costs
          nothing (a view), and the table is identical on every device, so a trajectory replays
          anywhere and a CPU can apply a GPU's updates (the evolution-strategies noise table).
  triton  Philox in fused Triton kernels (``zoft.kernels``) on CUDA: z is generated in registers,
          never stored; elsewhere the pure-torch Philox reference computes the same stream (up
          to ~1 ulp of log/cos), so a trajectory recorded on a GPU replays on any machine.

``default_noise(device)``: the backend a run uses when it names none (``--noise auto``): the
fastest that replays on any device, ``table`` on the CPU, ``triton`` on CUDA (``table`` where
``triton`` is not installed). Runs recorded with another backend keep it (it is a trajectory key).

Distributions: ``gaussian`` (N(0, I)), ``rademacher`` (+-1 per element) and ``sphere`` (the
Gaussian direction of each tensor rescaled to norm sqrt(numel): uniform on that sphere, per
tensor, so E[z z^T] = I still holds).
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import threading
from collections.abc import Iterator, Sequence
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


ZCHUNK = 1 << 20  # elements of z made at once by ``perturb_into`` and ``axpy``
TABLE_SIZE = 1 << 26  # entries of the default noise table (fp32 on each device using it: 268 MB)


def chunk_bounds(n: int) -> list[tuple[int, int]]:
    """The pieces ``[lo, hi)`` a flat tensor of ``n`` elements is processed in: ``ZCHUNK`` each
    (a multiple of 16), the last one longer by a tail of fewer than 16 elements (``torch.randn``
    on the CPU fills blocks of 16 and redraws a short tail, so pieces drawn in turn from one
    generator equal one draw only when no piece but a whole tensor is shorter than 16)."""
    edges = [*range(0, n, ZCHUNK), n]
    if len(edges) > 2 and edges[-1] - edges[-2] < 16:
        del edges[-2]
    return list(zip(edges[:-1], edges[1:]))


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

    def perturb_into(self, out: torch.Tensor, w0: torch.Tensor, seed: int, key: str, scale: float) -> None:
        """``out <- w0 + scale * z(seed, key)`` (``out``: w0's shape and dtype), z made piece by
        piece (``ZCHUNK`` elements) or in registers, never whole (but see ``chunked``)."""
        ...

    def axpy(self, w: torch.Tensor, terms: Sequence[Term], key: str, decay: float = 1.0,
             sround_seed: int | None = None) -> None:
        """In place: ``w <- decay * w + sum_k c_k z(seed_k, key)``. With ``sround_seed`` a bf16/fp16
        ``w`` is updated one piece at a time in fp32 and stochastically rounded back, keyed by it
        (``zoft.engine.precision``)."""
        ...


class _Chunked:
    """``perturb_into`` and ``axpy`` over the pieces of ``chunk_bounds``, from a backend's
    ``_raw_pieces`` (the flat z before the sphere's scaling, piece by piece, in order). A backend
    whose stream cannot be cut for a device (``chunked`` False: the torch generator on CUDA) draws
    z whole with ``sample`` and slices it: ``zoft.engine.precision.update_bytes`` counts that."""

    rounds_in_place = True  # ``axpy`` takes ``sround_seed`` (``zoft.engine.precision.apply_update_``)

    def chunked(self, like: torch.Tensor) -> bool:
        """Whether z for ``like`` is made piece by piece (else drawn whole, then sliced)."""
        return True

    def z_mode(self, like: torch.Tensor) -> str:
        """How ``axpy`` makes z for ``like``: "pieces", "whole" or "fused" (in registers):
        ``zoft.engine.precision.update_bytes`` counts its bytes."""
        return "pieces" if self.chunked(like) else "whole"

    def _raw_pieces(self, seed: int, key: str, like: torch.Tensor) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def pieces(self, seed: int, key: str, like: torch.Tensor) -> Iterator[torch.Tensor]:
        """z(seed, key) of ``like`` flattened, one piece of ``chunk_bounds(like.numel())`` at a
        time (fp32, or fp64 for an fp64 ``like``; read-only); equal to ``sample``'s z (sphere:
        up to the rounding of its norm, summed piece by piece)."""
        if not self.chunked(like):
            z = self.sample(seed, key, like).reshape(-1)
            for lo, hi in chunk_bounds(z.numel()):
                yield z[lo:hi]
            return
        if self.distribution != "sphere":
            yield from self._raw_pieces(seed, key, like)
            return
        sq = sum(torch.linalg.vector_norm(z, dtype=torch.float64).square()
                 for z in self._raw_pieces(seed, key, like))  # a device tensor: no host sync
        f = (math.sqrt(like.numel()) / torch.as_tensor(sq).sqrt().clamp_min(1e-30)).to(_z_dtype(like))
        for z in self._raw_pieces(seed, key, like):
            yield z * f

    def perturb_into(self, out: torch.Tensor, w0: torch.Tensor, seed: int, key: str, scale: float) -> None:
        if not (out.is_contiguous() and w0.is_contiguous()):
            torch.add(w0, self.sample(seed, key, w0).to(w0.dtype), alpha=scale, out=out)
            return
        of, wf = out.view(-1), w0.view(-1)
        for (lo, hi), z in zip(chunk_bounds(w0.numel()), self.pieces(seed, key, w0)):
            torch.add(wf[lo:hi], z.to(w0.dtype), alpha=scale, out=of[lo:hi])  # one pass: read w0, z

    def axpy(self, w: torch.Tensor, terms: Sequence[Term], key: str, decay: float = 1.0,
             sround_seed: int | None = None) -> None:
        from zoft.engine.precision import KeyedRounder, stochastic_round_

        terms = [(s, c) for s, c in terms if c != 0.0]
        rounded = sround_seed is not None and w.dtype in (torch.bfloat16, torch.float16)
        if rounded and not (w.is_contiguous() and self.chunked(w)):
            w32 = w.float()  # whole: the stream cannot be cut (counted by ``update_bytes``)
            self.axpy(w32, terms, key, decay)
            stochastic_round_(w, w32, sround_seed)
            return
        if not rounded:
            if decay != 1.0:
                w.mul_(decay)
            for seed, coef in terms:  # one term at a time: one piece of z alive
                if not w.is_contiguous():
                    w.add_(self.sample(seed, key, w).to(w.dtype), alpha=coef)
                    continue
                wf = w.view(-1)
                for (lo, hi), z in zip(chunk_bounds(w.numel()), self.pieces(seed, key, w)):
                    wf[lo:hi].add_(z.to(w.dtype), alpha=coef)
            return
        # a piece at a time: its fp32 copy takes the decay and every term, then is rounded back
        wf, rounder = w.view(-1), KeyedRounder(sround_seed, w.device)
        streams = [self.pieces(seed, key, w) for seed, _ in terms]
        for lo, hi in chunk_bounds(w.numel()):
            x = wf[lo:hi].float()
            if decay != 1.0:
                x.mul_(decay)
            for z, (_, coef) in zip(streams, terms):
                x.add_(next(z), alpha=coef)
            rounder.round_(wf[lo:hi], x, lo)


class TorchGeneratorNoise(_Chunked):
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

    def chunked(self, like: torch.Tensor) -> bool:
        return like.device.type == "cpu"  # a CUDA generator's pieces are not its single draw

    def _raw_pieces(self, seed: int, key: str, like: torch.Tensor) -> Iterator[torch.Tensor]:
        g = torch.Generator(device=like.device).manual_seed(mix(seed, key))  # its own: pieces interleave
        dtype = _z_dtype(like)
        for lo, hi in chunk_bounds(like.numel()):
            if self.distribution == "rademacher":
                bits = torch.randint(0, 2, (hi - lo,), generator=g, device=like.device, dtype=torch.int8)
                yield bits.to(dtype).mul_(2).sub_(1)
            else:
                yield torch.randn(hi - lo, generator=g, device=like.device, dtype=dtype)


class NoiseTable(_Chunked):
    """Shared noise table: z(seed, key) is the window ``table[o : o + n]`` at a keyed offset o.

    size: table entries (default ``TABLE_SIZE`` = 2^26: 256 MiB in fp32). The table is drawn
          once, on the CPU, from ``torch.Generator().manual_seed(table_seed)``, and copied to each device (and
          dtype) on first use, so every device reads the same numbers. A tensor larger than the
          table is assembled from several keyed windows (a copy; still no RNG).

    Offsets are multiples of 16 elements (64-byte aligned windows in fp32). Windows of different
    keys overlap as shifted copies, which leaves distinct elements of one z, and z of different
    keys at the same position, uncorrelated (Salimans et al. 2017 use the same construction).
    """

    name = "table"
    ALIGN = 16

    def __init__(self, distribution: Distribution = "gaussian", size: int = TABLE_SIZE, table_seed: int = 0):
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

    def device_bytes(self, device: torch.device | str) -> int:
        """Bytes the table holds on ``device`` once used there: the fp32 table (and any other
        dtype's copy already built), so a plan and the engine's meter count it from the start."""
        device = torch.device(device)
        return max(4 * self.size, sum(t.numel() * t.element_size() for (d, _), t in self._tables.items() if d == device))

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

    def _raw_pieces(self, seed: int, key: str, like: torch.Tensor) -> Iterator[torch.Tensor]:
        t = self.table(like.device, _z_dtype(like))
        n = like.numel()
        if n <= self.size:
            o = self.offset(seed, key, n)
            for lo, hi in chunk_bounds(n):
                yield t[o + lo:o + hi]  # views: no copy, no RNG
            return
        # windows of ``size`` elements, one per part (``sample``); a piece across two is a copy
        starts = {}
        for lo, hi in chunk_bounds(n):
            views = []
            for part in range(lo // self.size, (hi - 1) // self.size + 1):
                if part not in starts:
                    starts[part] = self.offset(seed, key, min(self.size, n - part * self.size), part)
                a, b = max(lo, part * self.size), min(hi, (part + 1) * self.size)
                o = starts[part] - part * self.size
                views.append(t[o + a:o + b])
            yield views[0] if len(views) == 1 else torch.cat(views)


BACKENDS: dict[str, type] = {"torch": TorchGeneratorNoise, "table": NoiseTable}


class PhiloxNoise(_Chunked):
    """Counter-based Philox4x32-10 z (the stream of Triton's ``tl.randn`` / ``tl.randint``).

    Element i of z(seed, key) is a function of (mix(seed, key), i) only, so any piece of z is
    made on its own. On CUDA tensors the fused Triton kernels of ``zoft.kernels`` generate z
    inside ``axpy`` (one read and one write of w for all terms) and ``perturb_into`` (one read of
    w0, one write of out), z never stored; elsewhere the pure-torch reference computes the same
    stream (equal up to ~1 ulp of the Box-Muller log/cos), so a GPU run replays on any machine.
    """

    name = "triton"

    def __init__(self, distribution: Distribution = "gaussian"):
        _check(distribution)
        self.distribution = distribution

    def _dist(self) -> str:
        return "gaussian" if self.distribution == "sphere" else self.distribution

    def sample(self, seed: int, key: str, like: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        from zoft.kernels import philox

        z = philox.sample(mix(seed, key), like.numel(), like.device, self._dist()).view(like.shape).to(_z_dtype(like))
        return _to_sphere(z) if self.distribution == "sphere" else z

    def _raw_pieces(self, seed: int, key: str, like: torch.Tensor) -> Iterator[torch.Tensor]:
        from zoft.kernels import philox

        s, dtype = mix(seed, key), _z_dtype(like)
        for lo, hi in chunk_bounds(like.numel()):
            yield philox.sample(s, hi - lo, like.device, self._dist(), offset=lo).to(dtype)

    def _fused(self, *ts: torch.Tensor) -> bool:
        return self.distribution != "sphere" and all(t.is_cuda and t.is_contiguous() for t in ts)

    def z_mode(self, like: torch.Tensor) -> str:
        return "fused" if self._fused(like) else "pieces"

    def perturb_into(self, out: torch.Tensor, w0: torch.Tensor, seed: int, key: str, scale: float) -> None:
        from zoft.kernels import axpy

        if not self._fused(out, w0):
            return super().perturb_into(out, w0, seed, key, scale)
        axpy.fused_perturb(out, w0, mix(seed, key), scale, self.distribution)

    def axpy(self, w: torch.Tensor, terms: Sequence[Term], key: str, decay: float = 1.0,
             sround_seed: int | None = None) -> None:
        from zoft.engine.precision import KeyedRounder
        from zoft.kernels import axpy

        if not self._fused(w):
            return super().axpy(w, terms, key, decay, sround_seed)
        terms = [(mix(s, key), c) for s, c in terms if c != 0.0]
        if sround_seed is None or w.dtype not in (torch.bfloat16, torch.float16):
            axpy.fused_axpy(w, decay, terms, self.distribution)
            return
        wf, rounder = w.view(-1), KeyedRounder(sround_seed, w.device)
        for lo, hi in chunk_bounds(w.numel()):  # an fp32 piece, updated in registers, rounded back
            x = wf[lo:hi].float()
            axpy.fused_axpy(x, decay, terms, self.distribution, offset=lo)
            rounder.round_(wf[lo:hi], x, lo)


BACKENDS["triton"] = PhiloxNoise


def default_noise(device: str | torch.device) -> str:
    """The backend a run on ``device`` uses when it names none: the fastest that replays on any
    device. CPU: ``table`` (z is a view; measured in ``bench/step_cpu.py``). CUDA: ``triton``
    (z in registers: no table on the device), ``table`` where ``triton`` is not installed.
    Decided from the device type alone, so a dry run on a laptop plans what the GPU will run."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "table"


def make_noise(name: str = "torch", distribution: Distribution = "gaussian") -> NoiseBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown noise backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name](distribution)
