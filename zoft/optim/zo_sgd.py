"""The ZO-SGD family of ZO-Bench (Zhang et al. 2024), ZO-Adam and R-AdaZO, in seed form.

Every member shares one estimator. With q queries, seeds s_1..s_q and directions
``u_i = z_i`` (Gaussian, default) or ``u_i = z_i / ||z_i||`` (``sphere=True``):

    g_i = (L(w + eps u_i) - L(w - eps u_i)) / (2 eps)      (one-sided: (L(w + eps u_i) - L(w)) / eps)
    G   = (1/q) sum_i g_i u_i                               (the sphere form omits the factor d of the
                                                             unbiased estimate: it is folded into lr)

and differs in what it does with G (``lr`` is the scheduled rate, ``decay = 1 - lr * weight_decay``
applies only to parameters that take decay):

    mezo-sgd     w <- decay w - lr G
    zo-sgd-sign  w <- decay w - lr (1/q) sum_i sign(g_i) u_i     (sign of the scalar, ZO-Bench's form)
    zo-sgd-mmt   b <- momentum b + G;  w <- decay w - lr b        (b starts at G, as torch SGD)
    zo-sgd-cons  L0 = L(w); keep the best of w, w - lr G, w + lr G (5 forwards two-sided, 4 one-sided)
    zo-adam      m <- b1 m + (1-b1) G; v <- b2 v + (1-b2) G^2; w <- decay w - lr m^/(sqrt(v^) + adam_eps)
                 (m^, v^: bias-corrected with the count t of applied updates)
    r-adazo      m <- b1 m + (1-b1) G; v <- b2 v + (1-b2) m^2;  w <- decay w - lr m / sqrt(v + zeta)

Two options restrict the directions for every member (``shaped_direction``): a **perturbation
mask** ``u = m * z`` (``set_mask``: a fixed key -> 0/1 tensor dict, or a rule ``fn(key, w)`` evaluated
once on the weights at the first ``bind``; stored as one bool per trained parameter, 1 B/param;
Sparse MeZO's magnitude mask builds on it, re-derived every step) and ZO-Bench's **module-wise perturbation**
(``module_wise``: query i of step t perturbs only the parameters of layout unit ``(t + i) mod B``,
B = the units holding trainable parameters; each unit's coefficients are averaged over the queries
that perturbed it, so ``n_queries = B`` is ZO-Bench's all-modules-per-step estimate).

Stateless members return a plain seed-form ``Update``. Stateful ones return an ``Update`` subclass
whose ``apply(key, w, ...)`` regenerates G for that one parameter from the seeds, advances that
parameter's buffers and writes it: all state is per parameter key, created on the parameter's
device the first time the key is updated, so an offload scheduler streams a unit's buffers with
the unit (``buffers(key)``), and the result does not depend on the order units are visited.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import torch

from zoft.engine.probes import Probe, Update
from zoft.errors import UsageError
from zoft.noise import mix, step_seed
from zoft.optim.directions import z_norm
from zoft.optim.schedule import Schedule, lr_at

SphereNorm = Literal["exact", "sqrt_d"]
MaskRule = Callable[[str, torch.Tensor], "torch.Tensor | None"]  # (key, weights) -> 0/1 mask or None


@dataclass
class ZOConfig:
    """Options shared by the family (defaults: MeZO's OPT-13B full-parameter setting).

    sphere:      directions on the unit sphere, ``u = z / ||z||`` (norm over all trainable params).
    sphere_norm: "exact" (one extra z-generation pass per seed and step) or "sqrt_d".
    gradient_sparsity: ZO-Bench's sparse perturbation: each direction's entries where a second
                 keyed N(0, 1) draw is below this value are zeroed (a fraction Phi(value): 0.75
                 zeroes 77%), a fresh mask per direction; None: dense.
    sparse_gradient_group: ZO-Bench's ``layer`` (one threshold ``gradient_sparsity`` everywhere) or
                 ``global``: ``gradient_sparsity`` is a quantile level; the magnitude at that quantile of
                 all the model's weights at the first bind gives each parameter its own threshold,
                 the fraction of its |w| below that magnitude.
    module_wise: ZO-Bench's module-wise perturbation: query i of step t perturbs only layout unit
                 ``(t + i) mod B`` (B units hold trainable parameters); a unit's update averages
                 the queries that perturbed it.
    """

    lr: float = 1e-6
    eps: float = 1e-3
    weight_decay: float = 0.0
    n_queries: int = 1
    one_sided: bool = False
    schedule: Schedule = "constant"
    warmup_steps: int = 0
    sphere: bool = False
    sphere_norm: SphereNorm = "exact"
    gradient_sparsity: float | None = None
    sparse_gradient_group: Literal["layer", "global"] = "layer"
    module_wise: bool = False
    module_wise_applies: ClassVar[bool] = True  # False: a member with its own directions / averaging

    def __post_init__(self):
        if self.eps <= 0:
            raise ValueError("eps must be > 0")
        if self.n_queries < 1:
            raise ValueError("n_queries must be >= 1")
        if self.sphere_norm not in ("exact", "sqrt_d"):
            raise ValueError(f"sphere_norm must be 'exact' or 'sqrt_d', not {self.sphere_norm!r}")
        if self.gradient_sparsity is not None and not isinstance(self.gradient_sparsity, (int, float)):
            raise ValueError(f"gradient_sparsity must be a number or null, not {self.gradient_sparsity!r}")
        if self.module_wise and not self.module_wise_applies:
            raise ValueError("module_wise is for the ZO-SGD family (mezo-sgd, zo-sgd-*, zo-adam, r-adazo, lozo, "
                             "subzero, sparse-mezo, forward-grad), not this optimizer")
        if self.sparse_gradient_group not in ("layer", "global"):
            raise ValueError(f"sparse_gradient_group must be 'layer' or 'global', not {self.sparse_gradient_group!r}")
        if self.sparse_gradient_group == "global" and (self.gradient_sparsity is None
                                                       or not 0.0 <= self.gradient_sparsity <= 1.0):
            raise ValueError("sparse_gradient_group 'global' reads gradient_sparsity as a quantile level in [0, 1]")


@dataclass
class MomentumConfig(ZOConfig):
    momentum: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError("momentum must be in [0, 1)")


@dataclass
class _MomentsConfig(ZOConfig):
    """Two moment decay rates (Adam-style), each in [0, 1)."""

    beta1: float = 0.9
    beta2: float = 0.999

    def __post_init__(self):
        super().__post_init__()
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError("beta1 and beta2 must be in [0, 1)")


@dataclass
class AdamConfig(_MomentsConfig):
    adam_eps: float = 1e-8


@dataclass
class RAdaZOConfig(_MomentsConfig):
    zeta: float = 1e-8

    def __post_init__(self):
        super().__post_init__()
        if self.zeta <= 0:
            raise ValueError("zeta must be > 0")


class ZOSGD:
    """ZO-SGD = MeZO-SGD (``zoft.optim.mezo`` re-exports it under those names). Base of the family."""

    name = "mezo-sgd"
    memory_copies = 0  # parameter-sized buffers kept by the optimizer
    config_cls = ZOConfig
    paper = "Malladi et al., Fine-Tuning Language Models with Just Forward Passes (NeurIPS 2023)"
    data_parallel = "yes"  # or "no: <why>" (``zoft optimizers`` prints it)
    streams = True  # streamed == resident (tests/test_offload.py runs every registered name)
    replays = True  # ``update_from_record`` rebuilds every step (tests/test_train_cli.py)
    mask_bytes = 0  # bytes per trained parameter of a stored perturbation mask (Sparse MeZO: 1)

    def __init__(self, config: ZOConfig, seed: int = 0, total_steps: int = 1):
        self.config = config
        self.seed = seed
        self.total_steps = total_steps
        self._params: dict[str, torch.Tensor] | None = None
        self._noise: Any = None
        self._norms: dict[int, float] = {}
        self._mask_rule: MaskRule | None = None
        self._fixed_keys: set[str] = set()
        self.masks: dict[str, torch.Tensor] | None = None  # key -> bool (parameter's shape); absent: dense
        self._groups: dict[str, int] | None = None  # module_wise: key -> its unit's index
        self._sparsity: dict[str, float] | None = None  # sparse_gradient_group global: key -> threshold
        self._n_groups = 0

    @property
    def stateful(self) -> bool:
        """Whether this optimizer's updates are not seed-form: their ``apply`` overrides
        ``zoft.engine.Update.apply`` to read or write per-parameter state (momentum, Adam moments,
        a Hessian, an anchor offset, masks re-derived from the weights) or explicit values. The
        engine writes a streamed unit holding such an update back in the residency that applied
        it and updates a 2-byte weight on a whole fp32 copy, so a plan for this optimizer is made
        with ``zoft.engine.plan.make_plan(stateful=True)`` (write-back every step, the update's
        whole fp32 copy and z counted). False here: plain seed-form ``Update``s."""
        return False

    @classmethod
    def state_kind(cls) -> str:
        """How the optimizer keeps its state (``zoft optimizers``)."""
        if cls.mask_bytes:
            return (f"stored: a bool perturbation mask per parameter ({cls.mask_bytes} B/param), streamed with its "
                    "unit; updates in seed form")
        if cls.memory_copies == 0:
            return "seed form: nothing stored per parameter"
        return f"stored: {cls.memory_copies} fp32 buffer(s) per parameter key, streamed with its unit"

    # -- perturbation masks ----------------------------------------------------------------
    def set_mask(self, mask: "dict[str, torch.Tensor] | MaskRule | None") -> None:
        """Restrict every direction to a mask: ``u = m * z`` in probes and updates alike, so masked
        (0) coordinates are never perturbed nor moved by a step (weight decay, if set, still
        shrinks every decayed parameter).

        ``mask``: a dict parameter key (``engine.params``' names) -> bool / 0-1 tensor of the
        parameter's shape (keys left out stay dense), or a rule ``fn(key, w) -> tensor | None``
        evaluated once per key on the weights at the first ``bind`` (the initial weights: a replay
        recomputes the same mask); None removes it. Call before the first step. Either way the
        mask is stored as one bool per element of each masked parameter (1 B/param) on the
        parameter's device and saved with the optimizer's tensors (``mask/<key>``), so a resumed
        run keeps the mask of its first step."""
        self.masks = None
        self._mask_rule = None
        self._fixed_keys: set[str] = set()
        if mask is None:
            return
        if callable(mask):
            self._mask_rule = mask
            return
        if not isinstance(mask, dict):
            raise TypeError("a perturbation mask is a dict key -> tensor, or a callable fn(key, w) -> tensor")
        fixed = dict(mask)
        self._mask_rule = lambda key, w: fixed.get(key)
        self._fixed_keys = set(fixed)

    def mask_rule(self) -> "MaskRule | None":
        """The rule ``fn(key, w)`` the masks are built from at the first bind (``set_mask``)."""
        return self._mask_rule

    def _build_masks(self, engine: Any) -> None:
        rule = self.mask_rule()
        if rule is None or self.masks is not None:
            return
        unknown = sorted(self._fixed_keys - set(engine.params))
        if unknown:
            raise UsageError(f"{self.name}: the perturbation mask names {unknown[0]!r}, which is not a trainable "
                             f"parameter of this engine (keys are engine.params' names)")
        engine.flush()
        masks = {}
        with torch.no_grad():
            for k, p in engine.params.items():
                m = rule(k, p.detach())
                if m is None:
                    continue
                m = torch.as_tensor(m, device=p.device)
                if tuple(m.shape) != tuple(p.shape):
                    raise UsageError(f"{self.name}: the mask of {k!r} has shape {tuple(m.shape)}, the parameter "
                                     f"{tuple(p.shape)}")
                masks[k] = m.to(device=p.device, dtype=torch.bool)
        self.masks = masks

    # -- module-wise perturbation ----------------------------------------------------------
    def _build_groups(self, engine: Any) -> None:
        if not self.config.module_wise or self._groups is not None:
            return
        groups: dict[str, int] = {}
        for u in engine.layout.units:
            new = [k for k, _ in u.params if k in engine.params and k not in groups]
            for k in new:
                groups[k] = self._n_groups
            self._n_groups += bool(new)
        self._groups = groups

    def query_seed(self, step: int, index: int) -> int:
        """The seed of query ``index`` of ``step``; with ``module_wise`` it is moved (by less than B)
        so that ``seed mod B`` names the unit it perturbs, ``(step + index) mod B``: the unit is a
        pure function of the seed, whatever replays or applies it."""
        s = step_seed(self.seed, step, index)
        if not self.config.module_wise:
            return s
        if self._groups is None:
            raise RuntimeError(f"{self.name}: module_wise needs the engine's units; call zoft.optim.bind(optimizer, "
                               "engine) (zoft.optim.step does it)")
        B = self._n_groups
        return s - s % B + (step + index) % B

    def divisors(self, seeds: list[int]) -> list[int]:
        """What each query's ``g_i u_i`` is divided by in G: q, or with ``module_wise`` the number of
        the step's queries that perturbed the same unit."""
        if not self.config.module_wise:
            return [self.config.n_queries] * len(seeds)
        B = self._n_groups
        return [sum(1 for t in seeds if t % B == s % B) for s in seeds]

    # -- directions ----------------------------------------------------------------------
    def direction_shaper(self):
        """What ``zoft.optim.bind`` installs in place of plain ``z(seed, key)``, or None."""
        structured = type(self).base_direction is not ZOSGD.base_direction
        shaped = structured or self.config.gradient_sparsity is not None or self.config.module_wise
        return self.shaped_direction if shaped or self.mask_rule() is not None else None

    def base_direction(self, noise: Any, seed: int, key: str, like: torch.Tensor) -> torch.Tensor:
        """The direction before sparsification (structured members override it)."""
        return noise.sample(seed, key, like)

    def shaped_direction(self, noise: Any, seed: int, key: str, like: torch.Tensor) -> torch.Tensor:
        """The direction of (seed, key): ``base_direction``, zeroed where ZO-Bench's keyed mask says,
        outside the perturbation mask, and (``module_wise``) outside the seed's unit."""
        if self.config.module_wise and self._groups.get(key) != seed % self._n_groups:
            dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
            return torch.zeros(like.shape, dtype=dtype, device=like.device)
        u = self.base_direction(noise, seed, key, like)
        s = self.config.gradient_sparsity
        if s is not None:
            s = self._sparsity[key] if self._sparsity is not None else s
            u = u.masked_fill(noise.sample(seed, key + "/grad-mask", like) < s, 0.0)
        m = self.masks.get(key) if self.masks else None
        if m is not None:
            u = u * m.to(u.device, non_blocking=True)
        return u

    def bind(self, params: dict[str, torch.Tensor], noise: Any) -> None:
        """Called by ``zoft.optim.bind``: the trainable parameters (for shapes) and the noise."""
        self._params, self._noise = params, noise

    def bind_engine(self, engine: Any) -> None:
        """Called by ``zoft.optim.bind`` after ``bind``: the module-wise units and, the first time,
        the perturbation masks (from the weights the engine holds then)."""
        self._build_groups(engine)
        self._build_masks(engine)
        self._build_sparsity(engine)

    def _build_sparsity(self, engine: Any) -> None:
        """ZO-Bench's ``global`` group (``estimate_pretrained_model_magnitude_pruning_threshold``,
        ``compute_named_parameters_to_sparsity``): h = the ``gradient_sparsity`` quantile of |w| over
        every floating-point weight of the model (exact up to 1e7 of them, else a keyed sample of
        1e7), and per trained key the fraction of its |w| <= h (kept: ``state_dict``)."""
        c = self.config
        if c.gradient_sparsity is None or c.sparse_gradient_group != "global" or self._sparsity is not None:
            return
        engine.flush()
        ws = [(n, p.detach()) for n, p in engine.model.named_parameters() if p.dtype.is_floating_point]
        total = sum(p.numel() for _, p in ws)
        cap = 10_000_000
        parts = []
        for n, p in ws:
            a = p.reshape(-1).abs().float().cpu()
            if total > cap:
                g = torch.Generator().manual_seed(mix(self.seed, n + "/grad-threshold"))
                a = a[torch.randint(0, a.numel(), (max(1, round(cap * a.numel() / total)),), generator=g)]
            parts.append(a)
        h = torch.quantile(torch.cat(parts), float(c.gradient_sparsity)).item()
        with torch.no_grad():
            self._sparsity = {k: p.detach().abs().le(h).double().mean().item() for k, p in engine.params.items()}

    def _need_binding(self, why: str) -> None:
        if self._params is None:
            raise RuntimeError(f"{self.name}: {why} needs the engine; call zoft.optim.bind(optimizer, engine) "
                               "(zoft.optim.step does it)")

    def norm(self, seed: int) -> float:
        """``||z(seed)||`` when ``sphere`` (cached for the step), else 1."""
        if not self.config.sphere:
            return 1.0
        n = self._norms.get(seed)
        if n is None:
            self._need_binding("sphere=True")
            n = self._norms[seed] = z_norm(seed, self._params, self._noise, self.config.sphere_norm)
        return n

    def seeds(self, step: int) -> list[int]:
        return [self.query_seed(step, i) for i in range(self.config.n_queries)]

    def lr(self, step: int) -> float:
        c = self.config
        return lr_at(step, c.lr, c.schedule, self.total_steps, c.warmup_steps)

    # -- the estimator -------------------------------------------------------------------
    def probes(self, step: int) -> list[Probe]:
        self._norms = {}
        eps = self.config.eps
        seeds = self.seeds(step)
        if self.config.one_sided:
            return [Probe(None, 0.0)] + [Probe(s, eps / self.norm(s)) for s in seeds]
        return [p for s in seeds for p in (Probe(s, eps / self.norm(s)), Probe(s, -eps / self.norm(s)))]

    def num_probes(self) -> int:
        """Probes of a step's first phase (what the engine evaluates at once); needs no engine."""
        q = self.config.n_queries
        return q + 1 if self.config.one_sided else 2 * q

    def projected(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_i (q,), the losses at w + eps u_i (q,)) from the first-phase losses."""
        c = self.config
        if c.one_sided:
            plus = losses[1:c.n_queries + 1]
            return (plus - losses[0]) / c.eps, plus
        plus, minus = losses[0:2 * c.n_queries:2], losses[1:2 * c.n_queries:2]
        return (plus - minus) / (2 * c.eps), plus

    def estimate(self, step: int, grads: torch.Tensor) -> list[tuple[int, float]]:
        """G in seed form: ``G = sum_i c_i z(s_i)``."""
        seeds = self.seeds(step)
        return [(s, g / d / self.norm(s)) for s, g, d in zip(seeds, grads.tolist(), self.divisors(seeds))]

    def update(self, step: int, losses: torch.Tensor) -> tuple[Update, dict[str, float]]:
        """Turn the probes' losses (P,) into an update and the step's metrics."""
        grads, plus = self.projected(losses)
        lr = self.lr(step)
        upd = self.make_update(step, grads, lr, 1.0 - lr * self.config.weight_decay)
        return upd, {"loss": plus.mean().item(), "projected_grad": grads.mean().item(), "lr": lr}

    def make_update(self, step: int, grads: torch.Tensor, lr: float, decay: float) -> Update:
        seeds = self.seeds(step)
        return Update(terms=[(s, -lr * g / d / self.norm(s)) for s, g, d in zip(seeds, grads.tolist(),
                                                                                  self.divisors(seeds))],
                      decay=decay)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-able scalars (tensor buffers: ``tensor_state``): the ``global`` sparsity thresholds."""
        return {"grad_sparsity": self._sparsity} if self._sparsity is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if state.get("grad_sparsity") is not None:
            self._sparsity = {k: float(v) for k, v in state["grad_sparsity"].items()}

    def tensor_state(self) -> dict[str, torch.Tensor]:
        """Per-key tensors for the checkpoint: the perturbation masks (``mask/<key>``)."""
        return {f"mask/{k}": m for k, m in (self.masks or {}).items()}

    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        masks = {k[len("mask/"):]: v.to(torch.bool) for k, v in tensors.items() if k.startswith("mask/")}
        if masks:
            self.masks = masks

    def update_from_record(self, record: dict) -> Update:
        """Rebuild a step's update from its trajectory record (``update_record``), for replay."""
        return Update(terms=[(int(s), float(c)) for s, c in record["terms"]], decay=float(record["decay"]))


class ZOSGDSign(ZOSGD):
    """ZO-SGD-Sign: ``w <- decay w - lr (1/q) sum_i sign(g_i) u_i``."""

    name = "zo-sgd-sign"
    paper = "Zhang et al., Revisiting Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning (ZO-Bench, ICML 2024)"

    def make_update(self, step, grads, lr, decay):
        return super().make_update(step, torch.sign(grads), lr, decay)


class ZOSGDCons(ZOSGD):
    """ZO-SGD-Cons: two phases on one batch. Phase 1: ``L(w)`` and the q probe pairs; phase 2
    (``more_probes``): ``w - lr G`` and ``w + lr G``. ``update`` keeps the lowest of the three
    (ties: the descent step, then ``w``); weight decay applies after the choice."""

    name = "zo-sgd-cons"
    paper = ZOSGDSign.paper
    data_parallel = "no: its second phase (w -/+ lr G) needs a second all-gather"

    def probes(self, step):
        ps = super().probes(step)
        return ps if self.config.one_sided else [Probe(None, 0.0)] + ps

    def num_probes(self):
        return super().num_probes() + (0 if self.config.one_sided else 1)

    @property
    def composite_probes(self) -> bool:
        """Phase 2 probes ``w -/+ lr G`` along one combined direction when q > 1 (a virtual seed:
        ``zoft.optim.directions.whole_z``)."""
        return self.config.n_queries > 1

    def projected(self, losses):
        if self.config.one_sided:
            return super().projected(losses)
        return super().projected(losses[1:])

    def _direction_probe_seed(self, step: int, grads: torch.Tensor) -> tuple[int, float]:
        terms = self.estimate(step, grads)
        if len(terms) == 1:
            return terms[0]
        self._need_binding("n_queries > 1")
        self._noise.clear()
        return self._noise.define(terms), 1.0

    def more_probes(self, step: int, losses: torch.Tensor, comparisons=None) -> list[Probe]:
        if len(losses) != self.num_probes():
            return []
        grads, _ = self.projected(losses)
        seed, c = self._direction_probe_seed(step, grads)
        lr = self.lr(step)
        return [Probe(seed, -lr * c), Probe(seed, lr * c)]

    def update(self, step, losses):
        n1 = self.num_probes()
        if len(losses) != n1 + 2:
            raise RuntimeError("zo-sgd-cons needs its second phase (w -/+ lr G) evaluated on the same batch: "
                               "run it through zoft.optim.step / zoft.optim.evaluate_step")
        grads, _ = self.projected(losses[:n1])
        l0, l_desc, l_asc = losses[0].item(), losses[n1].item(), losses[n1 + 1].item()
        lr = self.lr(step)
        choice = min(((l_desc, 0, -1.0), (l0, 1, 0.0), (l_asc, 2, 1.0)))[2]  # ties: descent, then w
        decay = 1.0 - lr * self.config.weight_decay
        seeds = self.seeds(step)
        upd = Update(terms=[(s, choice * lr * g / d / self.norm(s))
                            for s, g, d in zip(seeds, grads.tolist(), self.divisors(seeds))]
                     if choice else [], decay=decay)
        return upd, {"loss": l0, "projected_grad": grads.mean().item(), "lr": lr, "cons_choice": choice,
                     "loss_step": min(l_desc, l0, l_asc)}


# -- stateful members ------------------------------------------------------------------------
class _BufferedUpdate(Update):
    """Seed-form G plus per-key buffers kept by the optimizer (``store[name][key]``)."""

    def __init__(self, terms, decay, lr, store, hp: dict[str, float]):
        super().__init__(terms=terms, decay=decay)
        self.lr = lr
        self.store = store
        self.hp = hp

    def is_noop(self) -> bool:
        return False  # buffers advance even when G is 0

    def grad(self, key: str, w: torch.Tensor, noise: Any) -> torch.Tensor:
        sdtype = torch.promote_types(w.dtype, torch.float32)  # buffers at least fp32
        g = torch.zeros(w.shape, dtype=sdtype, device=w.device)
        for s, c in self.terms:
            if c != 0.0:
                g.add_(noise.sample(s, key, w).to(w.dtype).to(sdtype), alpha=c)
        return g

    def buffer(self, name: str, key: str, like: torch.Tensor) -> torch.Tensor:
        bufs = self.store.setdefault(name, {})
        if key not in bufs:
            bufs[key] = torch.zeros_like(like)
        return bufs[key]

    def record(self) -> dict:
        return {"terms": [[s, c] for s, c in self.terms], "decay": self.decay, "lr": self.lr, **self.hp}


class MomentumUpdate(_BufferedUpdate):
    def apply(self, key, w, noise, decays):
        g = self.grad(key, w, noise)
        bufs = self.store.setdefault("momentum", {})
        b = bufs.get(key)
        if b is None:
            b = bufs[key] = g  # torch SGD: the first buffer is the gradient itself
        else:
            b.mul_(self.hp["momentum"]).add_(g)
        if decays and self.decay != 1.0:
            w.mul_(self.decay)
        w.add_(b.to(w.dtype), alpha=-self.lr)


class AdamUpdate(_BufferedUpdate):
    def apply(self, key, w, noise, decays):
        g = self.grad(key, w, noise)
        b1, b2, t = self.hp["beta1"], self.hp["beta2"], self.hp["t"]
        m = self.buffer("exp_avg", key, g).mul_(b1).add_(g, alpha=1 - b1)
        v = self.buffer("exp_avg_sq", key, g).mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v / (1 - b2 ** t)).sqrt_().add_(self.hp["adam_eps"])
        if decays and self.decay != 1.0:
            w.mul_(self.decay)
        w.add_((m / (1 - b1 ** t) / denom).to(w.dtype), alpha=-self.lr)


class RAdaZOUpdate(_BufferedUpdate):
    def apply(self, key, w, noise, decays):
        g = self.grad(key, w, noise)
        b1, b2 = self.hp["beta1"], self.hp["beta2"]
        m = self.buffer("exp_avg", key, g).mul_(b1).add_(g, alpha=1 - b1)
        v = self.buffer("exp_avg_sq", key, g).mul_(b2).addcmul_(m, m, value=1 - b2)
        if decays and self.decay != 1.0:
            w.mul_(self.decay)
        w.add_((m / (v + self.hp["zeta"]).sqrt()).to(w.dtype), alpha=-self.lr)


class _Stateful(ZOSGD):
    update_cls: type = _BufferedUpdate

    def __init__(self, config, seed=0, total_steps=1):
        super().__init__(config, seed, total_steps)
        self.store: dict[str, dict[str, torch.Tensor]] = {}
        self.t = 0  # updates handed out (skipped NaN steps do not count)

    @property
    def stateful(self) -> bool:
        """True: every update advances this optimizer's per-parameter buffers (``ZOSGD.stateful``)."""
        return True

    def hyper(self) -> dict[str, float]:
        raise NotImplementedError

    def make_update(self, step, grads, lr, decay):
        self.t += 1
        return self.update_cls(self.estimate(step, grads), decay, lr, self.store, self.hyper())

    def update_from_record(self, record):
        if "lr" not in record:  # a skipped (NaN) step's plain no-op update: the buffers did not move
            return super().update_from_record(record)
        hp = {k: record[k] for k in self.hyper()}
        if "t" in hp:
            self.t = int(hp["t"])
        return self.update_cls([(int(s), float(c)) for s, c in record["terms"]], float(record["decay"]),
                               float(record["lr"]), self.store, hp)

    def buffers(self, key: str) -> dict[str, torch.Tensor]:
        """This parameter's buffers (what an offload scheduler moves with the unit)."""
        return {n: self.store[n][key] for n in self.store if key in self.store[n]}

    def state_dict(self):
        return {**super().state_dict(), "t": self.t}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.t = int(state.get("t", 0))

    def tensor_state(self):
        return {**super().tensor_state(), **{f"{n}/{k}": v for n, bufs in self.store.items() for k, v in bufs.items()}}

    def load_tensor_state(self, tensors):
        super().load_tensor_state(tensors)
        self.store = {}
        for name, v in tensors.items():
            if name.startswith("mask/"):
                continue
            n, k = name.split("/", 1)
            self.store.setdefault(n, {})[k] = v
        # updates already handed out keep referring to the old store; only load between steps


class ZOSGDMomentum(_Stateful):
    name = "zo-sgd-mmt"
    paper = ZOSGDSign.paper
    memory_copies = 1
    update_cls = MomentumUpdate

    def hyper(self):
        return {"momentum": self.config.momentum}


class ZOAdam(_Stateful):
    name = "zo-adam"
    paper = ZOSGDSign.paper
    memory_copies = 2
    update_cls = AdamUpdate

    def hyper(self):
        c = self.config
        return {"beta1": c.beta1, "beta2": c.beta2, "adam_eps": c.adam_eps, "t": self.t}


class RAdaZO(_Stateful):
    name = "r-adazo"
    paper = "Shu et al., Refining Adaptive Zeroth-Order Optimization at Ease (R-AdaZO, 2025)"
    memory_copies = 2
    update_cls = RAdaZOUpdate

    def hyper(self):
        c = self.config
        return {"beta1": c.beta1, "beta2": c.beta2, "zeta": c.zeta}


def update_record(update: Update) -> dict:
    """The trajectory line of an update: ``{"terms", "decay"}`` plus a stateful update's scalars."""
    if hasattr(update, "record"):
        return update.record()
    return {"terms": [[s, c] for s, c in update.terms], "decay": update.decay}

