"""MeZO-SGD (Malladi et al. 2023) in seed form.

One step with q queries: seeds s_1..s_q; probes ``[(s_i, +eps), (s_i, -eps)]`` (two-sided) or
``[(None, 0), (s_i, +eps) ...]`` (one-sided);
g_i = (L(w + eps z_i) - L(w - eps z_i)) / (2 eps)   (one-sided: (L(w + eps z_i) - L(w)) / eps);
update ``w <- (1 - lr wd) w - (lr / q) sum_i g_i z_i`` (decay only where weight decay applies).
Logged loss: mean of L(w + eps z_i), as MeZO logs L+.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from zoft.engine.probes import Probe, Update
from zoft.noise import step_seed
from zoft.optim.schedule import Schedule, lr_at


@dataclass
class MeZOConfig:
    """MeZO-SGD hyper-parameters (defaults: the paper's OPT-13B full-parameter setting)."""

    lr: float = 1e-6
    eps: float = 1e-3
    weight_decay: float = 0.0
    n_queries: int = 1
    one_sided: bool = False
    schedule: Schedule = "constant"
    warmup_steps: int = 0

    def __post_init__(self):
        if self.eps <= 0:
            raise ValueError("eps must be > 0")
        if self.n_queries < 1:
            raise ValueError("n_queries must be >= 1")


class MeZOSGD:
    """Stateless: the whole optimizer state is (config, run seed, total steps)."""

    name = "mezo-sgd"
    memory_copies = 0

    def __init__(self, config: MeZOConfig, seed: int = 0, total_steps: int = 1):
        self.config = config
        self.seed = seed
        self.total_steps = total_steps

    def seeds(self, step: int) -> list[int]:
        return [step_seed(self.seed, step, i) for i in range(self.config.n_queries)]

    def probes(self, step: int) -> list[Probe]:
        eps = self.config.eps
        seeds = self.seeds(step)
        if self.config.one_sided:
            return [Probe(None, 0.0)] + [Probe(s, eps) for s in seeds]
        return [p for s in seeds for p in (Probe(s, eps), Probe(s, -eps))]

    def lr(self, step: int) -> float:
        c = self.config
        return lr_at(step, c.lr, c.schedule, self.total_steps, c.warmup_steps)

    def update(self, step: int, losses: torch.Tensor) -> tuple[Update, dict[str, float]]:
        """Turn the probes' losses (P,) into a seed-form update and the step's metrics."""
        c = self.config
        seeds = self.seeds(step)
        if c.one_sided:
            plus = losses[1:]
            grads = (plus - losses[0]) / c.eps
        else:
            plus, minus = losses[0::2], losses[1::2]
            grads = (plus - minus) / (2 * c.eps)
        lr = self.lr(step)
        terms = [(s, -lr * g / c.n_queries) for s, g in zip(seeds, grads.tolist())]
        upd = Update(terms=terms, decay=1.0 - lr * c.weight_decay)
        return upd, {"loss": plus.mean().item(), "projected_grad": grads.mean().item(), "lr": lr}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
