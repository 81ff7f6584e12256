"""FZOO: batched one-sided estimates with Rademacher directions and a loss-spread step size.

Dang et al., "FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning Large Language Models towards
Adam-Scale Speed" (ICLR 2026); official code ``DKmiyan/FZOO``, ``trainer.py`` ``zo_step`` /
``zo_update`` (defaults from ``fzoo.sh`` / ``run.py``: N = 8, lr 1e-5, eps 1e-3). Each step
evaluates ``l0 = L(w)`` and ``l_i = L(w + eps u_i)``, i < N, with Rademacher ``u_i``, and

    sigma = std(l_1..l_N)          (population std, as ``torch.std(unbiased=False)`` in the code)
    w <- decay w - lr sum_i (l_i - l0) / (N sigma) u_i

(the paper's ``g / sigma`` with ``g = (1/(eps N)) sum_i (l_i - l0) u_i`` has an extra 1/eps; the
official code, followed here, has none). Seed form: ``u_i = sign(z(s_i, key))`` (exactly
Rademacher for any backend), no state. Deviations: a step whose N losses are all equal
(sigma = 0) applies no update (the official code would divide by zero); the code's batched
"parallel" forward kernels are an implementation speed-up that zoft's probe batching replaces.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from zoft.engine.probes import Probe, Update
from zoft.noise import step_seed
from zoft.optim.zo_sgd import ZOSGD, ZOConfig


@dataclass
class FZOOConfig(ZOConfig):
    """n: perturbations per step (the paper's N; FZOO is one-sided by construction, so
    ``one_sided`` and ``n_queries`` have no effect)."""

    lr: float = 1e-5
    n: int = 8
    module_wise_applies: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        if self.n < 2:
            raise ValueError("n must be >= 2 (the step size divides by the spread of the n losses)")
        if self.sphere:
            raise ValueError("fzoo perturbs along Rademacher directions; sphere is not supported")


class FZOO(ZOSGD):
    name = "fzoo"
    config_cls = FZOOConfig
    paper = ("Dang et al., FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning Large Language Models towards "
             "Adam-Scale Speed (ICLR 2026)")
    data_parallel = "no: sigma and L(w) are per batch; a data-parallel step would mix shards"

    def seeds(self, step: int) -> list[int]:
        return [step_seed(self.seed, step, i) for i in range(self.config.n)]

    def base_direction(self, noise: Any, seed: int, key: str, like: torch.Tensor) -> torch.Tensor:
        return noise.sample(seed, key, like).sign()

    def probes(self, step: int) -> list[Probe]:
        return [Probe(None, 0.0)] + [Probe(s, self.config.eps) for s in self.seeds(step)]

    def num_probes(self) -> int:
        return self.config.n + 1

    def update(self, step: int, losses: torch.Tensor) -> tuple[Update, dict[str, float]]:
        n, lr = self.config.n, self.lr(step)
        l0, plus = losses[0], losses[1:n + 1]
        sigma = plus.std(unbiased=False).item()
        coef = (plus - l0) / (n * sigma) if sigma > 0 else torch.zeros_like(plus)
        upd = Update(terms=[(s, -lr * c) for s, c in zip(self.seeds(step), coef.tolist())],
                     decay=1.0 - lr * self.config.weight_decay)
        return upd, {"loss": l0.item(), "projected_grad": ((plus - l0) / self.config.eps).mean().item(), "lr": lr,
                     "loss_std": sigma}
