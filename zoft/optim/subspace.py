"""Structured perturbations in seed form: LOZO's low-rank and SubZero's random-subspace directions.

**LOZO** (Chen et al., "Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank
Structures", ICLR 2025; official code ``optsuite/LOZO``, ``lowrank_zo_perturb_parameters`` /
``lowrank_zo_update``). For every 2-D trainable matrix W (m x n) the direction of query i at step t is

    Z_i = U_i V^T,      U_i = z(s_i, key/lozo-u)  (m x r, fresh every step),
                        V   = z(v_k, key/lozo-v)  (n x r, the same for the k-th block of
                                                   ``interval`` steps: k = t // interval)

and every other parameter (biases, norms) takes the plain Gaussian ``z(s_i, key)``. The estimator
and the update are MeZO's with Z_i in place of z_i:

    g_i = (L(w + eps Z_i) - L(w - eps Z_i)) / (2 eps),     w <- decay w - lr (1/q) sum_i g_i Z_i

(Algorithm 1 of the paper; no 1/r scaling, as in the official code). The official code keeps V
in memory between refreshes; here V is regenerated from its keyed seed ``v_k`` wherever it is
needed, so LOZO stores nothing per parameter (seed form), streams and replays like MeZO-SGD.
LOZO's momentum variant (LOZO-M) is not implemented.

**SubZero** (Yu et al., "Zeroth-Order Fine-Tuning of LLMs in Random Subspaces", ICCV 2025;
official code ``zimingyy/SubZero``, ``zo_subspace_perturb_parameters`` / ``zo_subspace_update``
and ``fast_svd_method_v2``). For every 2-D trainable matrix W (m x n), with r' = min(r, m, n):

    Z_i = sqrt(m n) / r' * U Z0_i V^T,   U = qr(z(b_k, key/subzero-u) (m x r')).Q,
                                          V = qr(z(b_k, key/subzero-v) (n x r')).Q
                                              (column-orthonormal, fixed for the k-th block of
                                               ``interval`` steps),
                                          Z0_i = z(s_i, key/subzero-z) (r' x r', fresh every step)

(the sqrt(m n)/r' factor is the official code's, so that ``E||Z_i||^2 = m n`` as for Gaussian z);
other parameters take plain z; the estimator and update are MeZO's with Z_i. The official code
keeps U and V in memory between refreshes; here they are regenerated (a QR of an m x r' and an
n x r' Gaussian) wherever needed: no state per parameter. The official code's reshaping of LoRA /
prefix parameters into near-square matrices is not done (zoft uses each tensor's own 2-D shape).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from zoft.engine.probes import Update
from zoft.noise import mix, step_seed
from zoft.optim.zo_sgd import ZOSGD, ZOConfig


@dataclass
class _LowRankConfig(ZOConfig):
    """rank:     r, the rank of each matrix's direction.
    interval: steps between refreshes of the factors shared by a block of steps."""

    rank: int = 1
    interval: int = 100

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1:
            raise ValueError("rank must be >= 1")
        if self.interval < 1:
            raise ValueError("interval must be >= 1")


@dataclass
class LOZOConfig(_LowRankConfig):
    """LOZO (defaults: the official ``large_models/lozo.sh``: rank 1, V refreshed every 100 steps
    (the paper's nu), lr 1e-7, eps 1e-3)."""

    lr: float = 1e-7
    rank: int = 1
    interval: int = 100


class _SteppedUpdate(Update):
    """A seed-form update that records its step (the directions depend on it through V)."""

    def __init__(self, terms, decay, step: int):
        super().__init__(terms=terms, decay=decay)
        self.step = step

    def record(self) -> dict:
        return {"terms": [[s, c] for s, c in self.terms], "decay": self.decay, "step": self.step}


class _LowRank(ZOSGD):
    """Shared by LOZO and SubZero: matrices take a low-rank direction that depends on the step
    (through factors refreshed every ``interval`` steps), other tensors plain z."""

    memory_copies = 0

    def __init__(self, config, seed: int = 0, total_steps: int = 1):
        super().__init__(config, seed, total_steps)
        self._step_of: dict[int, int] = {}  # seed -> its step

    def seeds(self, step: int) -> list[int]:
        seeds = super().seeds(step)
        self._remember(step, seeds)
        return seeds

    def _remember(self, step: int, seeds: list[int]) -> None:
        # kept for the whole run (a few ints per step): a deferred write-back (``writeback_every``)
        # re-applies updates many steps old
        for s in seeds:
            self._step_of[s] = step

    def block_seed(self, step: int) -> int:
        """The seed of the factors shared by ``step``'s block of ``interval`` steps."""
        return mix(self.seed * 1_000_003 + step // self.config.interval, f"{self.name}-block")

    def base_direction(self, noise: Any, seed: int, key: str, like: torch.Tensor) -> torch.Tensor:
        """Z for (seed, key): low rank for a matrix, plain z otherwise; fp32 (fp64 for fp64 ``like``)."""
        if like.ndim != 2:
            return noise.sample(seed, key, like)
        step = self._step_of.get(seed)
        if step is None:
            raise RuntimeError(f"{self.name}: seed {seed} is not a seed of this run's steps")
        return self.matrix_direction(noise, seed, self.block_seed(step), key, like)

    def matrix_direction(self, noise: Any, seed: int, block: int, key: str, like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def make_update(self, step, grads, lr, decay):
        upd = super().make_update(step, grads, lr, decay)
        return _SteppedUpdate(upd.terms, upd.decay, step)

    def update_from_record(self, record: dict) -> Update:
        if not record["terms"]:  # a skipped (NaN) step
            return super().update_from_record(record)
        step = int(record["step"])
        terms = [(int(s), float(c)) for s, c in record["terms"]]
        # a data-parallel run's line holds all ranks' R*q seeds: step_seed(run seed, step, 0..R*q-1)
        if [s for s, _ in terms] != [self.query_seed(step, i) for i in range(len(terms))]:
            raise RuntimeError(f"{self.name}: a trajectory line's seeds do not match its step (another run seed?)")
        self._remember(step, [s for s, _ in terms])
        return _SteppedUpdate(terms, float(record["decay"]), step)


class LOZO(_LowRank):
    name = "lozo"
    config_cls = LOZOConfig
    paper = ("Chen et al., Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank Structures "
             "(LOZO, ICLR 2025)")

    def matrix_direction(self, noise, seed, block, key, like):
        (m, n), r = like.shape, self.config.rank
        u = noise.sample(seed, key + "/lozo-u", like.new_empty((m, r)))
        v = noise.sample(block, key + "/lozo-v", like.new_empty((n, r)))
        return u @ v.T


@dataclass
class SubZeroConfig(_LowRankConfig):
    """SubZero (defaults: the official ``large_models/run.py``: ``gauss_rank 8`` (capped at
    min(m, n) per matrix), ``update_interval 2000`` (the paper's T0); lr and eps as MeZO's)."""

    rank: int = 8
    interval: int = 2000


class SubZero(_LowRank):
    name = "subzero"
    config_cls = SubZeroConfig
    paper = "Yu et al., Zeroth-Order Fine-Tuning of LLMs in Random Subspaces (SubZero, ICCV 2025)"

    def matrix_direction(self, noise, seed, block, key, like):
        (m, n) = like.shape
        r = min(self.config.rank, m, n)
        u = torch.linalg.qr(noise.sample(block, key + "/subzero-u", like.new_empty((m, r)))).Q
        v = torch.linalg.qr(noise.sample(block, key + "/subzero-v", like.new_empty((n, r)))).Q
        z0 = noise.sample(seed, key + "/subzero-z", like.new_empty((r, r)))
        return (u @ z0 @ v.T).mul_(math.sqrt(m * n) / r)
