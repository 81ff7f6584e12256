"""Forward-Grad: the forward-mode directional derivative along a random direction.

Baydin et al., "Gradients without Backpropagation" (2022), as ZO-Bench runs it (Zhang et al., ICML
2024; official code ``ZO-Bench/ZO-LLM``, ``zo-bench/trainer.py`` ``forward_grad_step``). With q
directions ``u_i = z(s_i)`` (the engine's keyed noise, shaped like every ZO-SGD member's: perturbation
masks, ``gradient_sparsity`` and ``module_wise`` apply),

    d_i = grad L(w) . u_i           exactly, by one ``torch.func.jvp`` per direction (no eps)
    w <- decay w - lr (1/q) sum_i d_i u_i

so the update is in seed form and replays like MeZO-SGD's. It is not a probe method: a step runs
q forward passes with tangents (``evaluate``), outside the engine's probe batching, on the model
with the engine's hooks paused. Memory: the tangents of every trained parameter (one z per
parameter at once: one parameter copy, fp32 for fp32 weights) plus, during each forward, a tangent
beside every live activation (about twice the inference activations), and attention runs on
PyTorch's math path (the fused kernels have no forward-mode rule: T x T scores per head are
materialised). It therefore refuses block
streaming (the whole model and its tangents must be on one device), bitsandbytes 4-bit bases (their
matmuls have no forward-mode rule) and data-parallel runs (the step is not a set of probe losses to
all-gather); ``sphere`` and ``one_sided`` do not apply.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from zoft.engine.probes import Probe, Update
from zoft.errors import UsageError
from zoft.optim.zo_sgd import ZOSGD, ZOConfig


@dataclass
class ForwardGradConfig(ZOConfig):
    """ZO-Bench sweeps lr 1e-4..1e-8 for Forward-Grad (no default); zoft keeps MeZO's 1e-6. ``eps``
    is unused (the derivative is exact)."""

    def __post_init__(self):
        super().__post_init__()
        if self.sphere:
            raise ValueError("forward-grad uses Gaussian directions (E[(grad . z) z] = grad); sphere is not supported")
        if self.one_sided:
            raise ValueError("one_sided does not apply to forward-grad (no finite differences)")


class _Loss(nn.Module):
    """The objective's loss on a batch as a module of ``model`` (its parameters under ``model.``),
    so ``torch.func.functional_call`` can substitute the trained ones."""

    def __init__(self, model: nn.Module, objective: Any):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: Any) -> torch.Tensor:
        return self.objective.loss(self.objective.forward(self.model, batch), batch, 1)[0]


class ForwardGrad(ZOSGD):
    name = "forward-grad"
    config_cls = ForwardGradConfig
    paper = "Baydin et al., Gradients without Backpropagation (2022); as run in ZO-Bench (Zhang et al., ICML 2024)"
    data_parallel = "no: a step is q jvp passes, not probe losses the ranks could all-gather"
    streams = False  # refuses block streaming (tangents of the whole model on one device)

    @classmethod
    def state_kind(cls) -> str:
        return ("seed form: nothing stored per parameter; a step holds a tangent per trained parameter (one "
                "parameter copy) and forward-mode activations (about 2x inference)")

    def probes(self, step: int) -> list[Probe]:
        raise RuntimeError("forward-grad evaluates its own step: use zoft.optim.step / evaluate_step")

    def num_probes(self) -> int:
        return 1  # the rows of one forward (what a plan would size); the step runs q of them

    def bind_engine(self, engine: Any) -> None:
        if engine.offload is not None:
            raise UsageError("forward-grad runs torch.func.jvp over the whole model (weights, tangents and "
                             "forward-mode activations on one device) and cannot stream; drop --gpu-mem")
        if any(type(p).__name__ == "Params4bit" for p in engine.model.parameters()):
            raise UsageError("forward-grad: torch.func.jvp cannot differentiate through bitsandbytes 4-bit layers; "
                             "use an unquantized base (drop --quant)")
        super().bind_engine(engine)

    def evaluate(self, engine: Any, step: int, batch: Any, objective: Any) -> torch.Tensor:
        """``[L(w), d_1, .., d_q]`` (fp64, CPU) for step ``step`` on ``batch``: the loss and the q
        directional derivatives, one ``torch.func.jvp`` each; the pending update is applied first."""
        if not (hasattr(objective, "forward") and hasattr(objective, "loss")) or hasattr(objective, "compare"):
            raise UsageError("forward-grad differentiates a loss: pass an objective with forward(model, batch) and "
                             "loss(outputs, batch, P) (e.g. a zoft.tasks task), not a callable or a rank oracle")
        self._norms = {}
        with engine.paused() as model:  # flushed; the hooks do nothing: the plain model
            name_of = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
            keys = list(engine.params)
            names = ["model." + name_of[id(engine.params[k])] for k in keys]
            primals = tuple(engine.params[k].detach() for k in keys)
            f = _Loss(model, objective)

            def loss(*ws):
                return torch.func.functional_call(f, dict(zip(names, ws)), (batch,), strict=False)

            was_training = model.training
            model.eval()
            out = []
            # the fused attention kernels have no forward-mode rule: the math path (T x T scores) does
            try:
                with sdpa_kernel(SDPBackend.MATH):
                    for s in self.seeds(step):
                        tangents = tuple(engine.noise.sample(s, k, w).to(w.dtype) for k, w in zip(keys, primals))
                        value, d = torch.func.jvp(loss, primals, tangents)
                        del tangents
                        if not out:
                            out.append(value.detach())
                        out.append(d.detach())
            finally:
                model.train(was_training)
        res = torch.stack(out).to("cpu", torch.float64)
        if bool((res[1:] == 0).all()) and bool(torch.isfinite(res).all()):
            raise UsageError("forward-grad: every directional derivative is exactly 0: the objective's loss does not "
                             "depend differentiably on the trained weights (detached, or computed through .item() / "
                             "integer ops), or the mask leaves nothing to perturb")
        return res

    def update(self, step: int, losses: torch.Tensor) -> tuple[Update, dict[str, float]]:
        if len(losses) != self.config.n_queries + 1:
            raise RuntimeError("forward-grad needs [L, d_1..d_q] from its own evaluate (zoft.optim.evaluate_step)")
        d = losses[1:]
        lr = self.lr(step)
        upd = self.make_update(step, d, lr, 1.0 - lr * self.config.weight_decay)
        return upd, {"loss": losses[0].item(), "projected_grad": d.mean().item(), "lr": lr}
