"""MeZO-SVRG: ZO-SGD with an SVRG control variate from a periodic large-batch anchor estimate.

Gautam et al., "Variance-reduced Zeroth-Order Methods for Fine-Tuning Language Models" (ICML
2024, arXiv 2404.08080), Algorithm 2; official code ``amazon-science/mezo_svrg``,
``models/llm_module.py`` ``training_step_MeZO_SVRG`` (defaults from ``finetune_llm.py`` /
``finetune_llm.sh``: q = 2, eta_1 = 1e-3, eta_2 = 1e-6, mu = 1e-3, the anchor estimate on the
whole training sample). With the SPSA estimate on examples B along fresh directions z_1..z_k
(k = ``n_queries``),

    g(w; B) = (1/k) sum_i (L_B(w + eps z_i) - L_B(w - eps z_i)) / (2 eps) z_i,

step t is an *anchor step* when t mod q = 0 (q = ``interval``):

    gbar = g(w_t; D)  (D: the training set, or ``anchor_batch`` examples),  wbar = w_t,
    w_{t+1} = decay w_t - eta_1 gbar

and otherwise, on the step's minibatch I_t and with independent directions for the two estimates,

    w_{t+1} = decay w_t - eta_2 (g(w_t; I_t) - g(wbar; I_t) + gbar)             (4k forwards)

State: gbar is seed form (its k seeds and coefficients, JSON scalars). The anchor wbar is stored
as its offset ``delta = wbar - w`` (one fp32 buffer per trained parameter, 4 B/param, streamed
with its unit like the Adam moments): every applied update subtracts its own change from delta
(an anchor step starts it at 0), and a probe at ``wbar +- eps z`` is the probe ``w + 1 * (delta
+- eps z)``, whose direction the optimizer builds (``shaped_direction``, marker seeds). Those
directions read delta, so their draw checks that the key's pending update landed (``zoft.optim.landing``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from zoft.engine.probes import Probe
from zoft.noise import mix, step_seed
from zoft.optim.landing import KeyClock, LandingUpdate
from zoft.optim.schedule import lr_at
from zoft.optim.zo_sgd import ZOSGD, ZOConfig, _Stateful


@dataclass
class SVRGConfig(ZOConfig):
    """lr:           eta_2, the minibatch steps' rate (official ``--lr_mezosvrg_mb`` 1e-6).
    anchor_lr:    eta_1, the anchor steps' rate (official ``--lr`` 1e-3); scheduled like lr.
    interval:     q: an anchor step every ``interval`` steps (official ``--q`` 2).
    anchor_batch: examples of the anchor estimate in ``zoft finetune``: None = the whole training
                  set (as the official code), else that many drawn afresh per anchor step."""

    anchor_lr: float = 1e-3
    interval: int = 2
    anchor_batch: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.anchor_lr < 0:
            raise ValueError("anchor_lr must be >= 0")
        if self.interval < 1:
            raise ValueError("interval must be >= 1")
        if self.anchor_batch is not None and (isinstance(self.anchor_batch, bool) or not isinstance(
                self.anchor_batch, int) or self.anchor_batch < 1):
            raise ValueError("anchor_batch must be a number of examples >= 1, or null for the whole training set")
        if self.one_sided:
            raise ValueError("mezo-svrg uses two-sided estimates (as published); one_sided is not supported")
        if self.sphere:
            raise ValueError("mezo-svrg probes the anchor through a stored offset; sphere is not supported")
        if self.module_wise:
            raise ValueError("mezo-svrg averages each estimate's directions over every parameter; module_wise is not "
                             "supported")


class SVRGUpdate(LandingUpdate):
    """A seed-form step (``terms`` with lr folded in) that also moves the anchor offset: delta <-
    delta - (w_new - w) for the same arithmetic (an anchor step first sets delta = 0)."""

    def __init__(self, terms, decay: float, lr: float, anchor: bool, opt: "MeZOSVRG"):
        super().__init__(terms=terms, decay=decay)
        self.lr, self.anchor, self.opt = lr, anchor, opt

    def _apply(self, key, w, noise, decays):
        deltas = self.opt.store.setdefault("anchor_delta", {})
        d = deltas.get(key)
        if self.anchor or d is None:
            d = deltas[key] = torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device)
        if decays and self.decay != 1.0:
            d.add_(w, alpha=1.0 - self.decay)
            w.mul_(self.decay)
        for s, c in self.terms:
            if c != 0.0:
                z = noise.sample(s, key, w)
                w.add_(z.to(w.dtype), alpha=c)
                d.add_(z.to(d.dtype), alpha=-c)

    def record(self) -> dict:
        return {"terms": [[s, c] for s, c in self.terms], "decay": self.decay, "lr": self.lr, "anchor": self.anchor}


class MeZOSVRG(_Stateful):
    name = "mezo-svrg"
    config_cls = SVRGConfig
    paper = "Gautam et al., Variance-reduced Zeroth-Order Methods for Fine-Tuning Language Models (MeZO-SVRG, ICML 2024)"
    memory_copies = 1
    data_parallel = "no: the anchor step's estimate covers the whole training set on one process"

    def __init__(self, config, seed=0, total_steps=1):
        super().__init__(config, seed, total_steps)
        self.clock = KeyClock()
        self._need = 0
        self.gbar: list[tuple[int, float]] | None = None  # the anchor estimate, seed form: (seed, coefficient)
        self._markers: dict[int, tuple[int, float]] = {}  # probe seed -> (z seed, +-eps): a probe at wbar +- eps z

    @classmethod
    def state_kind(cls) -> str:
        return ("stored: the anchor's offset, 1 fp32 buffer per parameter key, streamed with its unit; "
                "the anchor estimate in seed form")

    def is_anchor(self, step: int) -> bool:
        return self.gbar is None or step % self.config.interval == 0

    def anchor_examples(self, step: int, n: int) -> list[int] | None:
        """The training examples of ``step``'s estimate when it is an anchor step (None: the step's
        own minibatch): all n, or ``anchor_batch`` of them drawn for this step."""
        if not self.is_anchor(step):
            return None
        k = self.config.anchor_batch
        if k is None or k >= n:
            return list(range(n))
        g = torch.Generator().manual_seed(mix(self.seed * 1_000_003 + step, "svrg-anchor-batch"))
        return torch.randperm(n, generator=g)[:k].tolist()

    # -- directions ----------------------------------------------------------------------
    def direction_shaper(self):
        return self.shaped_direction

    def anchor_seeds(self, step: int) -> list[int]:
        q = self.config.n_queries
        return [step_seed(self.seed, step, q + i) for i in range(q)]

    def shaped_direction(self, noise, seed, key, like):
        marker = self._markers.get(seed)
        if marker is None:
            return super().shaped_direction(noise, seed, key, like)
        s, scale = marker
        z = super().shaped_direction(noise, s, key, like) * scale
        self.clock.check(key, self._need)
        d = self.store.get("anchor_delta", {}).get(key)
        return z if d is None else z.add_(d.to(z.device, z.dtype))

    # -- the step ------------------------------------------------------------------------
    def probes(self, step: int) -> list[Probe]:
        self._need = self.clock.handed
        eps = self.config.eps
        ps = [p for s in self.seeds(step) for p in (Probe(s, eps), Probe(s, -eps))]
        self._markers = {}
        if self.is_anchor(step):
            return ps
        for s in self.anchor_seeds(step):
            for sign, tag in ((1.0, "+"), (-1.0, "-")):
                m = mix(s, f"svrg-anchor{tag}")
                self._markers[m] = (s, sign * eps)
                ps.append(Probe(m, 1.0))
        return ps

    def num_probes(self) -> int:
        return 4 * self.config.n_queries  # a minibatch step's; an anchor step has 2q

    def _estimate(self, seeds: list[int], losses: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, float]]]:
        q = self.config.n_queries
        g = (losses[0::2] - losses[1::2]) / (2 * self.config.eps)
        return g, [(s, x / q) for s, x in zip(seeds, g.tolist())]

    def update(self, step, losses):
        c = self.config
        q, anchor = c.n_queries, self.is_anchor(step)
        g, cur = self._estimate(self.seeds(step), losses[:2 * q])
        if anchor:
            lr = lr_at(step, c.anchor_lr, c.schedule, self.total_steps, c.warmup_steps)  # scheduled as lr
            self.gbar = cur
            terms = [(s, -lr * x) for s, x in cur]
        else:
            lr = self.lr(step)
            _, past = self._estimate(self.anchor_seeds(step), losses[2 * q:4 * q])
            terms = [(s, -lr * x) for s, x in cur] + [(s, lr * x) for s, x in past] + [(s, -lr * x) for s, x in self.gbar]
        self.t += 1
        self.clock.hand_out()
        upd = SVRGUpdate(terms, 1.0 - lr * c.weight_decay, lr, anchor, self)
        return upd, {"loss": losses[0:2 * q:2].mean().item(), "projected_grad": g.mean().item(), "lr": lr,
                     "anchor": float(anchor)}

    def update_from_record(self, record):
        if "anchor" not in record:  # a skipped (NaN) step
            return ZOSGD.update_from_record(self, record)
        self.t += 1
        self.clock.hand_out()
        return SVRGUpdate([(int(s), float(x)) for s, x in record["terms"]], float(record["decay"]),
                          float(record["lr"]), bool(record["anchor"]), self)

    def state_dict(self):
        return {"t": self.t, "gbar": None if self.gbar is None else [[s, x] for s, x in self.gbar]}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        gbar = state.get("gbar")
        self.gbar = None if gbar is None else [(int(s), float(x)) for s, x in gbar]
        self.clock.reset(self.t)
