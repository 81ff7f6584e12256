"""Probes, updates and the batch-splitting rules of probe batching.

A step evaluates P *probes* ``(seed, scale)``: probe p sees the weights ``w + scale_p * z(seed_p)``
(``seed=None``: the unperturbed weights). The P probes' inputs are concatenated along dim 0
(probe-major), so every unit receives N = P*R rows and runs each probe's R rows under that
probe's perturbation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from zoft.errors import ZoftError


@dataclass(frozen=True)
class Probe:
    """One perturbed evaluation point: weights ``w + scale * z(seed)``."""

    seed: int | None
    scale: float = 0.0


@dataclass
class Update:
    """A ZO update in seed form: ``w <- decay * w + sum_k coef_k * z(seed_k)``.

    ``decay`` applies only to parameters that take weight decay (see ``ZOEngine.no_decay``).
    Kilobytes per step: this is what the trajectory file stores.
    """

    terms: list[tuple[int, float]] = field(default_factory=list)
    decay: float = 1.0

    def is_noop(self) -> bool:
        return self.decay == 1.0 and all(c == 0.0 for _, c in self.terms)

    def apply(self, key: str, w: torch.Tensor, noise: Any, decays: bool) -> None:
        """Apply this update to one parameter tensor ``w`` (in place) under key ``key``.

        Stateful optimizers (momentum, Adam-style) subclass ``Update`` and keep per-parameter
        state keyed by ``key``; the engine calls this exactly once per parameter per step.
        """
        noise.axpy(w, self.terms, key, self.decay if decays else 1.0)


def _map(x: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
        return type(x)(*(_map(v, fn) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_map(v, fn) for v in x)
    if isinstance(x, dict):
        out = {k: _map(v, fn) for k, v in x.items()}
        return type(x)(**out) if type(x) is not dict else out
    return x


def is_split(t: torch.Tensor, n_rows: int) -> bool:
    """A tensor is split across probes iff it has >= 2 dims and dim 0 is a multiple of N.

    Covers (N, ...) activations and masks, and (N*heads, ...) tensors such as ALiBi biases;
    (1, ...) tensors (shared position ids, rotary tables) and 1-D tensors (cache positions)
    are passed whole to every probe.
    """
    return t.ndim >= 2 and t.shape[0] >= n_rows and t.shape[0] % n_rows == 0


def split_args(x: Any, p: int, num_probes: int, n_rows: int, lo: int = 0, hi: int | None = None) -> tuple[Any, bool]:
    """Probe ``p``'s slice of every split tensor in ``x`` (with ``lo``/``hi``: only its examples
    ``lo..hi-1``, a micro-batch); also whether anything was split."""
    found = False

    def take(t: torch.Tensor) -> torch.Tensor:
        nonlocal found
        if not is_split(t, n_rows):
            return t
        found = True
        chunk = t.shape[0] // num_probes
        if hi is None:
            return t[p * chunk:(p + 1) * chunk]
        per = t.shape[0] // n_rows  # rows per example (ALiBi: heads)
        return t[p * chunk + lo * per:p * chunk + hi * per]

    return _map(x, take), found


def combine_outputs(outs: Sequence[Any], rows: int, was_split: bool, unit: str) -> Any:
    """Concatenate the P probes' outputs (or their micro-batches') along dim 0 (probe-major),
    mirroring ``split_args``.

    When no input was split (e.g. a position embedding called on (1, T) ids), each probe's
    (1, ...) output is expanded to its ``rows`` rows so that probe p's rows see probe p's value
    (micro-batches are only run for split inputs); a probe's ``rows``-row output (feature reuse:
    each probe took the R-row input whole) is its rows as they are.
    """
    first = outs[0]
    if isinstance(first, torch.Tensor):
        if not was_split:
            if first.shape[0] not in (1, rows):
                raise ZoftError(
                    f"unit '{unit}' got no batch-shaped input but returned dim 0 = {first.shape[0]}; "
                    "zoft cannot tell which rows belong to which probe"
                )
            outs = [o.expand(rows, *o.shape[1:]) for o in outs]
        return torch.cat(list(outs), dim=0)
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(combine_outputs([o[i] for o in outs], rows, was_split, unit) for i in range(len(first))))
    if isinstance(first, (list, tuple)):
        return type(first)(combine_outputs([o[i] for o in outs], rows, was_split, unit) for i in range(len(first)))
    if isinstance(first, dict):
        vals = {k: combine_outputs([o[k] for o in outs], rows, was_split, unit) for k in first}
        return type(first)(**vals) if type(first) is not dict else vals
    return first  # None or a non-tensor value: identical for every probe
