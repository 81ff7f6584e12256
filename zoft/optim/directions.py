"""Directions beyond one keyed seed: unit-sphere scaling and composite (multi-seed) directions.

The engine perturbs along ``z(seed, key)`` for one seed per probe. Two things the optimizer
family needs are expressed on top of that without touching the engine:

* **Unit-sphere directions** ``u = z / ||z||`` (norm over *all* trainable parameters): a probe
  ``w + eps u`` is ``Probe(seed, eps / ||z||)`` and an update coefficient on ``u`` is one on ``z``
  divided by ``||z||``. ``||z||`` is computed exactly by one generation pass over the parameters'
  shapes (no weights are read; under offload only shapes and the compute device are needed), or
  approximated by ``sqrt(d)`` (relative error ~ ``1/sqrt(2d)``: 7e-4 at d = 1e6; exact for
  Rademacher noise).
* **Composite directions** ``sum_i c_i z(s_i)`` (the conservative step's and the RankSGD line
  search's candidate points): ``CompositeNoise`` wraps the engine's backend and gives such a
  combination a *virtual seed* (a negative int; real seeds are >= 0), so ``Probe(virtual, t)``
  evaluates ``w + t sum_i c_i z(s_i)`` exactly (written into the engine's scratch from the
  untouched ``w0``, which the parameter points back at afterwards).
  Virtual seeds only ever appear in probes, never in an applied ``Update``.
* **Shaped directions**: an optimizer whose ``direction_shaper()`` returns a function
  ``(noise, seed, key, like) -> tensor`` (LOZO's low-rank ``U V^T``, ZO-Bench's sparse z and module-wise
  units, perturbation masks) replaces
  ``z(seed, key)`` by that keyed tensor for every real seed, in
  probes and in applied updates alike (``axpy`` then runs one pass per term). It must be a pure
  function of (seed, key, shape): the engine draws it again wherever it needs it (each probe of
  each module's call, each update and re-applied update, a sphere norm), in whatever order the
  units run.

``bind(optimizer, engine)`` installs the wrapper (idempotent) and hands the optimizer the
engine's trainable parameters (for shapes) and noise.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

Term = tuple[int, float]


class CompositeNoise:
    """A noise backend plus virtual seeds for fixed linear combinations of real seeds."""

    def __init__(self, inner: Any):
        self.inner = inner
        self._combos: dict[int, list[Term]] = {}
        self.shaper: Any = None  # the bound optimizer's ``direction_shaper()`` (None: plain z)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def distribution(self) -> str:
        return self.inner.distribution

    def define(self, terms: Sequence[Term]) -> int:
        """A fresh virtual seed standing for ``sum_k c_k z(s_k)`` (all ``s_k`` real seeds)."""
        if any(s < 0 for s, _ in terms):
            raise ValueError("a composite direction is built from real (>= 0) seeds only")
        seed = -1 - len(self._combos)
        self._combos[seed] = [(int(s), float(c)) for s, c in terms]
        return seed

    def clear(self) -> None:
        self._combos.clear()

    def sample(self, seed: int, key: str, like: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if seed >= 0:
            if self.shaper is not None:
                return self.shaper(self.inner, seed, key, like)
            return self.inner.sample(seed, key, like) if out is None else self.inner.sample(seed, key, like, out=out)
        terms = self._combos.get(seed)
        if terms is None:
            raise KeyError(f"virtual seed {seed} is not defined (directions live for one step)")
        acc = None  # accumulated in z's dtype (fp32, or fp64 for fp64 weights); samples are read-only
        for s, c in terms:
            z = self.sample(s, key, like)
            if acc is None:
                acc = torch.mul(z, c, out=out) if out is not None and out.dtype == z.dtype else z * c
            else:
                acc.add_(z, alpha=c)
        return acc if acc is not None else torch.zeros_like(like)

    @property
    def rounds_in_place(self) -> bool:  # shaped directions are whole tensors: rounded on a whole copy
        return self.shaper is None and getattr(self.inner, "rounds_in_place", False)

    def z_mode(self, like: torch.Tensor) -> str:
        """``zoft.noise``'s ``z_mode``: the backend's; "whole" for shaped directions or a backend
        that does not say."""
        inner = getattr(self.inner, "z_mode", None)
        return inner(like) if self.shaper is None and inner is not None else "whole"

    def perturb_into(self, out: torch.Tensor, w0: torch.Tensor, seed: int, key: str, scale: float) -> None:
        if seed >= 0 and self.shaper is None:
            self.inner.perturb_into(out, w0, seed, key, scale)
        else:  # a virtual or shaped direction is a whole tensor
            torch.add(w0, self.sample(seed, key, w0).to(w0.dtype), alpha=scale, out=out)

    def axpy(self, w: torch.Tensor, terms: Sequence[Term], key: str, decay: float = 1.0,
             sround_seed: int | None = None) -> None:
        if any(s < 0 for s, _ in terms):
            raise ValueError("virtual seeds are for probes only; an applied update must use real seeds")
        if self.shaper is None:
            if sround_seed is None:
                self.inner.axpy(w, terms, key, decay)
            else:
                self.inner.axpy(w, terms, key, decay, sround_seed=sround_seed)
            return
        if decay != 1.0:
            w.mul_(decay)
        for s, c in terms:
            if c != 0.0:
                w.add_(self.sample(s, key, w).to(w.dtype), alpha=c)

    def __getattr__(self, name: str) -> Any:  # anything else the backend offers
        return getattr(self.inner, name)


def whole_z(optimizer: Any) -> str:
    """Where ``optimizer``'s directions are whole tensors on the device instead of the backend's
    pieces (``zoft.engine.plan.make_plan``'s ``whole_z``, the bytes the engine's meter sees):
    "all" with a direction shaper (every probe's copy and every update term draws a whole shaped
    tensor), "probes" when its probes can be composite (``composite_probes``: several z summed
    into one tensor; its updates stay seed-form), else "none"."""
    shaper = getattr(optimizer, "direction_shaper", None)
    if shaper is not None and shaper() is not None:
        return "all"
    return "probes" if getattr(optimizer, "composite_probes", False) else "none"


def bind(optimizer: Any, engine: Any) -> CompositeNoise:
    """Attach ``optimizer`` to ``engine``: wraps ``engine.noise`` once, passes the parameters."""
    if not isinstance(engine.noise, CompositeNoise):
        engine.noise = CompositeNoise(engine.noise)
    shaper = getattr(optimizer, "direction_shaper", None)
    engine.noise.shaper = shaper() if shaper is not None else None
    if hasattr(optimizer, "bind"):
        optimizer.bind(engine.z_like(), engine.noise)
    if hasattr(optimizer, "bind_engine"):  # module-wise units, perturbation masks
        optimizer.bind_engine(engine)
    return engine.noise


def z_norm(seed: int, params: dict[str, torch.Tensor], noise: Any, how: str = "exact") -> float:
    """``||z(seed)||`` over all ``params`` (the z the engine applies: cast to each param's dtype).

    ``params``: key -> a tensor with the parameter's shape and dtype on the device where the engine
    draws z (``ZOEngine.z_like``: a streamed parameter's z is drawn on the compute device, not
    where its master lives, and CPU and CUDA streams differ). One z at a time; the squares are
    summed on that device and read back once per device."""
    if how == "sqrt_d":
        return math.sqrt(sum(p.numel() for p in params.values()))
    sums: dict[torch.device, list[torch.Tensor]] = {}
    for k, p in params.items():
        z = noise.sample(seed, k, p).to(p.dtype)
        sums.setdefault(z.device, []).append(torch.linalg.vector_norm(z, dtype=torch.float64).square())
    return math.sqrt(sum(float(torch.stack(v).sum()) for v in sums.values()))
