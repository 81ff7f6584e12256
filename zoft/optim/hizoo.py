"""HiZOO: zeroth-order steps preconditioned by a diagonal Hessian estimated from the same probes.

Zhao et al., "Second-Order Fine-Tuning without Pain for LLMs: A Hessian Informed Zeroth-Order
Optimizer" (arXiv 2402.15173, ICLR 2025); official code ``Yanjun-Zhao/HiZOO``, ``trainer.py``
``zo_Hessian_step_update`` / ``efficient_Hessian_perturb_parameters`` (defaults from the README's
example: lr 1e-6, eps 1e-3, ``--hessian_smooth_type constant1e-8``, i.e. alpha = 1e-8). Per
trained parameter it keeps H (the diagonal Hessian estimate, the paper's Sigma^-1; ones at the
start). Step t, seeds s_1..s_q, z_i = z(s_i), u_i = z_i / sqrt(H_t):

    l0 = L(w),  l_i+- = L(w +- eps u_i)                                   (2q + 1 forwards)
    H_{t+1} = (1 - alpha) H_t + alpha (1/q) sum_i |l_i+ + l_i- - 2 l0| / (2 eps^2) H_t z_i^2
    w <- decay w - lr (1/q) sum_i (l_i+ - l_i-) / (2 eps) z_i / sqrt(H_{t+1})

(q = 1 is the paper and the code; q > 1 averages the q curvature and gradient estimates.) The
update is a per-key ``Update.apply``: it regenerates z_i from the seeds, advances that key's H
and writes the weights, so H is stored (4 bytes per trained parameter, fp32), streamed with its
unit like the Adam moments. The probes' directions read H, so a key's direction is drawn only
after the key's update has landed: the engine applies a module's pending update in its pre-hook
before it perturbs the module, and ``zoft.optim.landing.KeyClock`` checks it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from zoft.engine.probes import Probe
from zoft.optim.landing import KeyClock, LandingUpdate
from zoft.optim.zo_sgd import ZOSGD, ZOConfig, _Stateful


@dataclass
class HiZOOConfig(ZOConfig):
    """alpha: the smoothing rate of the diagonal Hessian (0 keeps H = 1: MeZO with an extra L(w))."""

    alpha: float = 1e-8

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1]")
        if self.one_sided:
            raise ValueError("hizoo estimates curvature from L(w) and both L(w +- eps u); one_sided is not supported")
        if self.sphere:
            raise ValueError("hizoo scales its directions by the diagonal Hessian; sphere is not supported")
        if self.module_wise:
            raise ValueError("hizoo averages its q queries' curvature over every parameter; module_wise is not supported")


class HiZOOUpdate(LandingUpdate):
    """Step t's HiZOO update: ``terms`` are (s_i, g_i / q) (the projected gradients, not yet times
    lr), ``curv`` the (1/q) |l_i+ + l_i- - 2 l0| / (2 eps^2) of the same queries."""

    def __init__(self, terms, curv: list[float], decay: float, lr: float, alpha: float, opt: "HiZOO"):
        super().__init__(terms=terms, decay=decay)
        self.curv, self.lr, self.alpha, self.opt = curv, lr, alpha, opt

    def _apply(self, key, w, noise, decays):
        sdtype = torch.promote_types(w.dtype, torch.float32)
        hs = self.opt.store.setdefault("hessian", {})
        h = hs.get(key)
        if h is None:
            h = hs[key] = torch.ones(w.shape, dtype=sdtype, device=w.device)
        zs = [self.opt.raw_direction(noise, s, key, w).to(sdtype) for s, _ in self.terms]
        est = torch.zeros_like(h)
        for z, c in zip(zs, self.curv):
            est.addcmul_(z, z, value=c)
        h.mul_(est.mul_(self.alpha).add_(1.0 - self.alpha))  # (1-a) H + a H sum_i c_i z_i^2
        rs = h.rsqrt()
        if decays and self.decay != 1.0:
            w.mul_(self.decay)
        for z, (_, g) in zip(zs, self.terms):
            w.add_((z * rs).to(w.dtype), alpha=-self.lr * g)

    def record(self) -> dict:
        return {"terms": [[s, c] for s, c in self.terms], "decay": self.decay, "lr": self.lr,
                "alpha": self.alpha, "curv": list(self.curv)}


class HiZOO(_Stateful):
    name = "hizoo"
    config_cls = HiZOOConfig
    paper = ("Zhao et al., Second-Order Fine-Tuning without Pain for LLMs: A Hessian Informed Zeroth-Order "
             "Optimizer (HiZOO, ICLR 2025)")
    memory_copies = 1
    data_parallel = "no: every rank would need L(w) and the curvature of all ranks' queries"

    def __init__(self, config, seed=0, total_steps=1):
        super().__init__(config, seed, total_steps)
        self.clock = KeyClock()
        self._need = 0  # updates the current step's directions must see

    @classmethod
    def state_kind(cls) -> str:
        return "stored: the diagonal Hessian, 1 fp32 buffer per parameter key, streamed with its unit"

    # -- directions ----------------------------------------------------------------------
    def direction_shaper(self):
        return self.shaped_direction

    def raw_direction(self, noise: Any, seed: int, key: str, like: torch.Tensor) -> torch.Tensor:
        """z_i (with ``gradient_sparsity``'s mask), before the Hessian scaling."""
        return ZOSGD.shaped_direction(self, getattr(noise, "inner", noise), seed, key, like)

    def shaped_direction(self, noise, seed, key, like):
        """u_i = z_i / sqrt(H) for the current H of ``key`` (checked: the pending update of key landed)."""
        z = self.raw_direction(noise, seed, key, like)
        self.clock.check(key, self._need)
        h = self.store.get("hessian", {}).get(key)
        return z if h is None else z * h.to(z.device).rsqrt().to(z.dtype)

    # -- the step ------------------------------------------------------------------------
    def probes(self, step: int) -> list[Probe]:
        self._need = self.clock.handed
        eps = self.config.eps
        return [Probe(None, 0.0)] + [p for s in self.seeds(step) for p in (Probe(s, eps), Probe(s, -eps))]

    def num_probes(self) -> int:
        return 2 * self.config.n_queries + 1

    def update(self, step, losses):
        c = self.config
        q, lr = c.n_queries, self.lr(step)
        l0, plus, minus = losses[0], losses[1:2 * q + 1:2], losses[2:2 * q + 1:2]
        grads = (plus - minus) / (2 * c.eps)
        curv = (plus + minus - 2 * l0).abs() / (2 * c.eps ** 2) / q
        self.t += 1
        self.clock.hand_out()
        upd = HiZOOUpdate([(s, g / q) for s, g in zip(self.seeds(step), grads.tolist())], curv.tolist(),
                          1.0 - lr * c.weight_decay, lr, c.alpha, self)
        return upd, {"loss": l0.item(), "projected_grad": grads.mean().item(), "lr": lr,
                     "curvature": (curv.sum() * 2 * c.eps ** 2).item()}

    def update_from_record(self, record):
        if "curv" not in record:  # a skipped (NaN) step: H did not move
            return ZOSGD.update_from_record(self, record)
        self.t += 1
        self.clock.hand_out()
        return HiZOOUpdate([(int(s), float(g)) for s, g in record["terms"]], [float(x) for x in record["curv"]],
                           float(record["decay"]), float(record["lr"]), float(record["alpha"]), self)

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.clock.reset(self.t)
