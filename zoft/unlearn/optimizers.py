"""Optimizers for unlearning: first-order (Adam, AdamW, sign / N-bit compressed), first-order
randomized smoothing, zeroth-order (through the zoft engine) and the hybrid FO/ZO schedule.

Formulas (g: the minibatch gradient, lr: the scheduled rate, wd: weight decay, all per tensor):

    adam / adamw     torch.optim.Adam / AdamW
    sign-sgd         w <- w - lr (Q(g; N) + wd w)
    sign-adam        m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;  d = m^/(sqrt(v^) + eps)
                     w <- w - lr (Q(d; N) + wd w)          (m^, v^ bias-corrected, as Adam)
    Q(x; 1) = sign(x)                                      (1-bit: signSGD / signAdam; sign(0) = 0)
    Q(x; N) = round(L x / max|x|) / L,  L = 2^(N-1) - 1   (N >= 2: symmetric uniform, 2L+1 levels,
                                                           scale max|x| per tensor, round half to even)
    smooth           g~ = (1/S) sum_s grad L(w + sigma e_s), e_s ~ N(0, I) drawn from (seed, step, s);
                     then Adam on g~ (the first-order randomized-smoothing baseline)
    zo               q two-point probes along u_i = z_i / ||z_i|| (uniform on the unit sphere of all
                     trainable parameters), g = (1/q) sum_i [L(w + mu u_i) - L(w - mu u_i)] / (2 mu) u_i
                     (the unbiased form's factor d is folded into lr), fed to R-AdaZO
                     (``zoft.optim`` "r-adazo"; any zoft ZO optimizer can be named)
    hybrid           blocks of ``fo_block`` FO steps and ``zo_block`` ZO steps, ending on a ZO block

Since Q(d; 1) = sign(m^), sign-adam with bits=1 is sign-momentum ("Signum"); its v only matters
for N >= 2. Memory (parameter-sized copies of the trainable weights, beyond the weights):
adam/adamw/sign-adam 3 (grad, m, v), sign-sgd 1 (grad), smooth 4 (grad, m, v, a backup of w), zo 2
(R-AdaZO's m, v; no gradient, no stored activations), hybrid: both sets, and the FO phases need
the whole model resident (autograd), the ZO phases can stream it (``make_zo_engine(gpu_mem=...)``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from zoft.errors import UsageError
from zoft.optim.schedule import Schedule, lr_at
from zoft.tasks.base import Batch
from zoft.unlearn.objectives import parse_options

OptimizerName = Literal["adam", "adamw", "sign-sgd", "sign-adam", "smooth", "zo", "hybrid"]
FO_NAMES = ("adam", "adamw", "sign-sgd", "sign-adam", "smooth")


# ------------------------------------------------------------------------------------ Q(x; N)
def quantize_update(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Q(x; N) of the module doc: sign for N = 1, symmetric uniform N-bit levels in [-1, 1] else."""
    if bits < 1:
        raise ValueError("bits must be >= 1")
    if bits == 1:
        return torch.sign(x)
    levels = 2 ** (bits - 1) - 1
    scale = x.abs().max()
    if scale == 0:
        return torch.zeros_like(x)
    return torch.round(x * (levels / scale)) / levels


class CompressedFO(torch.optim.Optimizer):
    """sign-SGD / sign-Adam with the N-bit update Q(.; N) (``bits=1``: the sign)."""

    def __init__(self, params, lr: float, base: Literal["sgd", "adam"] = "adam", bits: int = 1,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if base not in ("sgd", "adam"):
            raise ValueError("base must be 'sgd' or 'adam'")
        if bits < 1:
            raise ValueError("bits must be >= 1")
        super().__init__(params, {"lr": lr, "base": base, "bits": bits, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["base"] == "adam":
                    st = self.state[p]
                    if not st:
                        st["step"] = torch.zeros((), dtype=torch.float32)
                        st["exp_avg"] = torch.zeros_like(p)
                        st["exp_avg_sq"] = torch.zeros_like(p)
                    st["step"] += 1
                    t = float(st["step"])
                    st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                    st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                    d = (st["exp_avg"] / (1 - b1 ** t)) / ((st["exp_avg_sq"] / (1 - b2 ** t)).sqrt() + group["eps"])
                else:
                    d = g
                upd = quantize_update(d, group["bits"])
                if group["weight_decay"]:
                    upd = upd + group["weight_decay"] * p
                p.add_(upd, alpha=-group["lr"])


# ------------------------------------------------------------------------------------ options
@dataclass
class OptimizerOptions:
    """Every optimizer's knobs (``optimizer_options`` in a recipe; unknown keys are an error).

    lr applies to FO steps; zo_lr (default: lr) to ZO steps. mu: ZO smoothing radius; q: probe
    pairs per ZO step. fo_block / zo_block: the hybrid's N (FO:ZO ratio = fo_block:zo_block);
    fo_optimizer: the hybrid's FO phase. bits: N of Q(.; N) for sign-sgd / sign-adam."""

    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    bits: int = 1
    smoothing_samples: int = 4
    smoothing_sigma: float = 1e-3
    zo_optimizer: str = "r-adazo"
    zo_lr: float | None = None
    mu: float = 1e-3
    q: int = 1
    zo_beta1: float = 0.9
    zo_beta2: float = 0.999
    zeta: float = 1e-8
    noise: str = "torch"
    distribution: Literal["gaussian", "rademacher", "sphere"] = "gaussian"
    sphere: bool = True  # u = z / ||z|| over all trainable parameters (the paper's unit sphere)
    fo_block: int = 20
    zo_block: int = 20
    fo_optimizer: Literal["adam", "adamw", "sign-sgd", "sign-adam", "smooth"] = "adam"

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.fo_block < 1 or self.zo_block < 1:
            raise UsageError("fo_block and zo_block must be >= 1")
        if self.bits < 1:
            raise UsageError("bits must be >= 1")
        if self.q < 1 or self.mu <= 0:
            raise UsageError("q must be >= 1 and mu > 0")
        if self.smoothing_samples < 1:
            raise UsageError("smoothing_samples must be >= 1")
        if self.fo_optimizer not in FO_NAMES:
            raise UsageError(f"fo_optimizer must be one of {', '.join(FO_NAMES)}")


def hybrid_phases(steps: int, fo_block: int, zo_block: int) -> list[str]:
    """The phase ("fo" / "zo") of each of ``steps`` steps: blocks FO^fo_block ZO^zo_block repeated,
    laid out from the end so that the run always ends on a full ZO block (when ``steps`` is not a
    multiple of fo_block + zo_block the *first* block is the partial one)."""
    rev: list[str] = []
    while len(rev) < steps:
        rev += ["zo"] * zo_block + ["fo"] * fo_block
    return rev[:steps][::-1]


def phases_for(name: str, steps: int, opts: OptimizerOptions) -> list[str]:
    if name == "hybrid":
        return hybrid_phases(steps, opts.fo_block, opts.zo_block)
    return ["zo" if name == "zo" else "fo"] * steps


def make_zo_engine(model: nn.Module, *, noise: str = "torch", distribution: str = "gaussian",
                   gpu_mem: str | int | None = None, num_probes: int = 2, batch_rows: int = 4,
                   max_length: int = 256, offload: Any = None, device: str | None = None, objective: Any = None,
                   stateful: bool = False, whole_z: str = "none"):
    """The one place the unlearning code builds its ZO engine.

    ``offload`` (a ``zoft.engine.Streaming``) streams blocks as given; ``gpu_mem`` (a device budget,
    e.g. "18GB") asks the planner for that placement for ``num_probes`` probes of ``batch_rows`` x
    ``max_length`` (refused with the smallest budget that fits). ``stateful``: the ZO optimizer's
    ``stateful`` (R-AdaZO, the default, is): planned with write-back every step and the update's
    whole fp32 copy (``zoft.engine.plan.make_plan``); ``whole_z``: where its directions are whole
    tensors (``zoft.optim.directions.whole_z``). Blocks stream through ``device``
    (default: the model's device): CUDA, or the CPU twin. A streamed model is loaded on the host.
    A plan that runs the LM head in chunks sets ``objective.head_chunk``."""
    from zoft.engine import Streaming, ZOEngine
    from zoft.engine.plan import make_plan
    from zoft.noise import make_noise

    if offload is None and gpu_mem is not None:
        p = next(model.parameters())
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[p.dtype]
        plan = make_plan(model.config, gpu_mem, batch_size=batch_rows, max_length=max_length,
                         num_probes=num_probes, dtype=dtype, noise=noise,
                         device=torch.device(device or p.device).type, stateful=stateful, whole_z=whole_z)
        offload = Streaming.from_plan(plan, device or p.device)
        if objective is not None and getattr(plan, "head_chunk", None) is not None:
            objective.head_chunk = plan.head_chunk
    return ZOEngine(model, noise=make_noise(noise, distribution), offload=offload)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_fo(name: str, params: list[nn.Parameter], lr: float, o: OptimizerOptions) -> torch.optim.Optimizer:
    if name == "adam" or name == "smooth":
        return torch.optim.Adam(params, lr=lr, betas=o.betas, eps=o.adam_eps, weight_decay=o.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=o.betas, eps=o.adam_eps, weight_decay=o.weight_decay)
    if name in ("sign-sgd", "sign-adam"):
        return CompressedFO(params, lr=lr, base="sgd" if name == "sign-sgd" else "adam", bits=o.bits,
                            betas=o.betas, eps=o.adam_eps, weight_decay=o.weight_decay)
    raise UsageError(f"unknown first-order optimizer '{name}'")


# ------------------------------------------------------------------------------------ the runner
@dataclass
class Runner:
    """Runs step t of an unlearning optimizer on a prepared batch.

    name: adam | adamw | sign-sgd | sign-adam | smooth | zo | hybrid.  ``step(t, batch)`` returns
    the step's metrics (``phase``, ``loss``, ``lr``); ``flush()`` applies any queued ZO update (call
    before evaluating or saving); ``close()`` removes the engine's hooks.
    """

    name: str
    model: nn.Module
    objective: Any
    lr: float
    steps: int
    options: OptimizerOptions
    seed: int = 0
    schedule: Schedule = "constant"
    warmup_steps: int = 0
    gpu_mem: str | int | None = None  # ZO phases stream under this budget (planned for batch_rows x max_length)
    batch_rows: int = 4
    max_length: int = 256
    offload: Any = None  # or an explicit zoft.engine.Streaming placement
    device: str | None = None  # where --gpu-mem streams to (default: the model's device)
    phases: list[str] = field(init=False)

    def __post_init__(self):
        o = self.options
        self.phases = phases_for(self.name, self.steps, o)
        self.fo_name = o.fo_optimizer if self.name == "hybrid" else self.name
        params = _trainable(self.model)
        if not params:
            raise UsageError("no trainable parameter: the selected parameter set is empty")
        self.fo = make_fo(self.fo_name, params, self.lr, o) if "fo" in self.phases else None
        self.engine = self.zo = None
        streams = self.gpu_mem is not None or self.offload is not None
        on_cuda = torch.device(self.device).type == "cuda" if self.device else next(self.model.parameters()).is_cuda
        if streams and "fo" in self.phases and on_cuda:
            raise UsageError(f"--gpu-mem streams zeroth-order phases only; --optimizer {self.name} takes first-order "
                             "steps, which need the whole model on the device: use --optimizer zo or drop --gpu-mem")
        if "zo" in self.phases:
            from zoft.optim import make_optimizer, whole_z

            zo_opts: dict[str, Any] = {"lr": o.zo_lr if o.zo_lr is not None else self.lr, "eps": o.mu, "n_queries": o.q,
                                           "sphere": o.sphere, "schedule": self.schedule, "warmup_steps": self.warmup_steps,
                                           "weight_decay": o.weight_decay}
            if o.zo_optimizer in ("r-adazo", "zo-adam"):
                zo_opts.update(beta1=o.zo_beta1, beta2=o.zo_beta2)
                zo_opts["zeta" if o.zo_optimizer == "r-adazo" else "adam_eps"] = o.zeta
            self.zo = make_optimizer(o.zo_optimizer, zo_opts, seed=self.seed, total_steps=self.steps)
            self.engine = make_zo_engine(self.model, noise=o.noise, distribution=o.distribution, gpu_mem=self.gpu_mem,
                                         num_probes=self.zo.num_probes(), batch_rows=self.batch_rows,
                                         max_length=self.max_length, offload=self.offload, device=self.device,
                                         objective=self.objective, stateful=self.zo.stateful,
                                         whole_z=whole_z(self.zo))

    def lr_at(self, t: int) -> float:
        return lr_at(t, self.lr, self.schedule, self.steps, self.warmup_steps)

    def step(self, t: int, batch: Batch) -> dict[str, Any]:
        phase = self.phases[t]
        if phase == "zo":
            from zoft.optim import step as zo_step

            res = zo_step(self.engine, self.zo, batch, self.objective, t)
            m = {"phase": "zo", "loss": res.metrics.get("loss"), "lr": res.metrics.get("lr"),
                 "projected_grad": res.metrics.get("projected_grad")}
            if res.metrics.get("skipped"):
                m["skipped"] = True
            return m
        if self.engine is None:
            return {"phase": "fo", **self._fo_step(t, batch)}
        with self.engine.paused():  # flushed; autograd on the plain model; stale prefetches dropped
            return {"phase": "fo", **self._fo_step(t, batch)}

    def _fo_step(self, t: int, batch: Batch) -> dict[str, Any]:
        lr = self.lr_at(t)
        for g in self.fo.param_groups:
            g["lr"] = lr
        was_training = self.model.training
        self.model.eval()  # dropout off, as in the ZO forward passes
        params = _trainable(self.model)
        self.fo.zero_grad(set_to_none=True)
        try:
            if self.fo_name == "smooth":
                loss = self._smoothed_grad(t, batch, params)
            else:
                with torch.enable_grad():
                    loss = self.objective.fo_loss(self.model, batch)
                    if torch.isfinite(loss):
                        loss.backward()
                loss = loss.item()
        finally:
            self.model.train(was_training)
        if not torch.isfinite(torch.tensor(loss)):
            self.fo.zero_grad(set_to_none=True)
            return {"loss": float("nan"), "lr": lr, "skipped": True}
        self.fo.step()
        self.fo.zero_grad(set_to_none=True)
        return {"loss": loss, "lr": lr}

    def _smoothed_grad(self, t: int, batch: Batch, params: list[nn.Parameter]) -> float:
        o = self.options
        backup = [p.detach().clone() for p in params]
        total = 0.0
        try:
            for s in range(o.smoothing_samples):
                g = torch.Generator().manual_seed(((self.seed * 1_000_003 + t) * 1009 + s) & 0x7FFF_FFFF_FFFF_FFFF)
                with torch.no_grad():
                    for p, w in zip(params, backup):
                        e = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.device, p.dtype)
                        p.copy_(w + o.smoothing_sigma * e)
                with torch.enable_grad():
                    loss = self.objective.fo_loss(self.model, batch) / o.smoothing_samples
                    if torch.isfinite(loss):
                        loss.backward()
                total += loss.item()
        finally:
            with torch.no_grad():
                for p, w in zip(params, backup):
                    p.copy_(w)
        return total

    def flush(self) -> None:
        if self.engine is not None:
            self.engine.flush()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    # -- state (checkpoints) ---------------------------------------------------------------
    def tensor_state(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.fo is not None:
            for i, st in self.fo.state_dict()["state"].items():
                for k, v in st.items():
                    if isinstance(v, torch.Tensor):
                        out[f"fo/{i}/{k}"] = v
        if self.zo is not None:
            out.update({f"zo/{k}": v for k, v in self.zo.tensor_state().items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"zo": self.zo.state_dict() if self.zo is not None else {}}

    def load(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if self.fo is not None:
            sd = self.fo.state_dict()
            st: dict[int, dict[str, torch.Tensor]] = {}
            for k, v in tensors.items():
                if k.startswith("fo/"):
                    _, i, name = k.split("/", 2)
                    st.setdefault(int(i), {})[name] = v
            sd["state"] = st
            self.fo.load_state_dict(sd)
        if self.zo is not None:
            self.zo.load_state_dict(state.get("zo", {}))
            self.zo.load_tensor_state({k[3:]: v for k, v in tensors.items() if k.startswith("zo/")})


def parse_optimizer_options(name: str, options: dict[str, Any] | None) -> OptimizerOptions:
    if name not in ("adam", "adamw", "sign-sgd", "sign-adam", "smooth", "zo", "hybrid"):
        raise UsageError(f"unknown optimizer '{name}'; choose one of adam, adamw, sign-sgd, sign-adam, smooth, zo, hybrid")
    return parse_options(OptimizerOptions, options, f"optimizer '{name}'")
