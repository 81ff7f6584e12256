"""Unlearning objectives: GA, GradDiff, NPO, SimNPO, RMU — one object for FO and ZO.

Every objective follows the engine's objective protocol (``zoft.engine.core.Objective``):
``forward(model, batch)`` and ``loss(outputs, batch, P) -> (P,)`` over a batch repeated P times
(probe-major rows), so ``zoft.optim.step`` runs it for zeroth-order steps; first-order steps call
``fo_loss(model, batch)`` = ``loss(forward(model, batch), batch, 1)[0]`` with autograd on.
Reference quantities (NPO's log-probs of the frozen initial model, RMU's frozen retain
activations) are computed once per batch by ``prepare(batch)`` and stored in ``batch.targets``,
so every probe of a ZO step and every FO step sees the same ones.

Batches come from ``zoft.unlearn.data.make_batch``: forget rows F, then retain rows Rt. With
``nll_i`` the summed next-token NLL of row i (nats), ``n_i`` its predicted-token count, and
``logp_i = -nll_i`` (sequence-summed log-prob):

    NLL_f  = sum_F nll_i / sum_F n_i                     (token mean; GA reduction="sequence": mean_F nll_i)
    NLL_r  = sum_Rt nll_i / sum_Rt n_i
    GA       L = -NLL_f
    GradDiff L = -NLL_f + gamma NLL_r
    NPO      L = -(2/beta) mean_F log sigmoid(-beta (logp_i - logp_ref_i)) + lambda NLL_r
    SimNPO   L = -(2/beta) mean_F log sigmoid(-(beta / n_i) logp_i - gamma) + lambda NLL_r
    RMU      L = mean_{F tokens} ||h_i,t - c u||^2 / D + alpha mean_{Rt tokens} ||h_i,t - h^frozen_i,t||^2 / D

h is the hidden state output by decoder layer ``layer`` (0-based; caught by a forward hook on
that block, as in the released RMU script; equal to ``hidden_states[layer + 1]`` except for the last layer), D its width, u a fixed random unit vector (uniform [0, 1)^D normalised,
drawn from ``seed``). RMU averages over real tokens only (the released script also averages over
padding; with equal-length texts the two agree).
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from zoft.errors import UsageError
from zoft.tasks.base import Batch
from zoft.tasks.head import HiddenOutputs, check_head_chunk, labelled_nll, logits_of, num_rows
from zoft.tasks.lm import IGNORE, call_model

ObjectiveName = Literal["ga", "graddiff", "npo", "simnpo", "rmu"]


# ------------------------------------------------------------------------------------ options
@dataclass
class GAOptions:
    """reduction: "token" (mean token NLL, Hugging Face's LM loss) or "sequence" (mean summed NLL
    per forget row: the beta -> 0 limit of NPO)."""

    reduction: Literal["token", "sequence"] = "token"


@dataclass
class GradDiffOptions:
    retain_weight: float = 1.0  # gamma


@dataclass
class NPOOptions:
    beta: float = 0.1
    retain_weight: float = 1.0  # lambda; 0 gives plain NPO


@dataclass
class SimNPOOptions:
    beta: float = 2.5
    gamma: float = 0.0
    retain_weight: float = 1.0


@dataclass
class RMUOptions:
    """layer: decoder layer whose output is steered (0-based); steering_coef: c; alpha: retain
    weight; seed: of u. Zephyr-7B values of the released script: layer 7, c 6.5, alpha 1200."""

    layer: int = 7
    steering_coef: float = 6.5
    alpha: float = 1200.0
    seed: int = 0


OPTIONS: dict[str, type] = {"ga": GAOptions, "graddiff": GradDiffOptions, "npo": NPOOptions,
                            "simnpo": SimNPOOptions, "rmu": RMUOptions}


def parse_options(cls: type, options: dict[str, Any] | None, what: str):
    """``cls(**options)`` with one-line errors for unknown keys and bad values."""
    options = dict(options or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise UsageError(f"unknown option(s) {unknown} for {what}; valid: {sorted(fields)}")
    try:
        return cls(**options)
    except TypeError as e:
        raise UsageError(f"{what}: {e}") from None


# ------------------------------------------------------------------------------------ helpers
def row_nll(logits: torch.Tensor | HiddenOutputs, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL (rows,) in nats and predicted-token count (rows,) of each row.

    logits (rows, T, V), or ``HiddenOutputs`` (the head run in chunks of positions,
    ``zoft.tasks.head``); labels (rows, T) with -100 on padding; position t predicts token t+1."""
    if isinstance(logits, HiddenOutputs):
        return labelled_nll(logits, labels)
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (rows, T)
    nll = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE,
                          reduction="none").view(target.shape)  # (rows, T)
    return nll.sum(1), (target != IGNORE).sum(1)


def _per_probe(t: torch.Tensor, P: int) -> torch.Tensor:
    """(P*R, ...) -> (P, R, ...)."""
    return t.view(P, t.shape[0] // P, *t.shape[1:])


def _token_mean(nll: torch.Tensor, cnt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-weighted mean NLL of the rows in ``mask``, per probe. nll, cnt, mask: (P, R) -> (P,)."""
    m = mask.to(nll.dtype)
    return (nll * m).sum(1) / (cnt.to(nll.dtype) * m).sum(1).clamp_min(1)


# ------------------------------------------------------------------------------------ objectives
class UnlearnObjective:
    """Base: the LM forward and the per-row NLLs. Subclasses define ``combine``.

    head_chunk: positions per LM-head call of the log-probs (``zoft.tasks.head``; None: the
    model's full logits). RMU's loss reads no logits: with it set, its steps skip the head."""

    name: str = ""
    uses_retain: bool = True

    def __init__(self, options: Any, head_chunk: int | None = None):
        self.options = options
        self.head_chunk = check_head_chunk(head_chunk)

    def setup(self, model: nn.Module) -> None:
        """Called once with the model before unlearning (reference copies, fixed vectors)."""

    def trainable_default(self, model: nn.Module) -> list[str] | None:
        """Parameter names to update when the user names none (None: every parameter)."""
        return None

    def prepare(self, batch: Batch) -> Batch:
        """Add the batch's reference quantities to ``batch.targets`` (no-op by default)."""
        return batch

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        return call_model(model, batch, causal=True, head_chunk=self.head_chunk)

    def _parts(self, outputs: Any, batch: Batch, P: int):
        logits = logits_of(outputs)
        nll, cnt = row_nll(logits, _labels(batch, num_rows(logits)))
        forget = _repeat_rows(batch.targets["forget"], nll.shape[0])
        return _per_probe(nll, P), _per_probe(cnt, P), _per_probe(forget, P)

    def loss(self, outputs: Any, batch: Batch, num_probes: int) -> torch.Tensor:
        """One loss per probe, shape (P,) (what the engine and ``zoft.optim.step`` consume)."""
        return self.combine(*self._parts(outputs, batch, num_probes), batch, num_probes)

    def combine(self, nll, cnt, forget, batch, P) -> torch.Tensor:
        raise NotImplementedError

    def fo_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The scalar loss with autograd (first-order steps)."""
        return self.loss(self.forward(model, batch), batch, 1)[0]

    def metrics(self, outputs: Any, batch: Batch) -> dict[str, float]:
        """forget_nll / retain_nll (token means, nats) of an unperturbed forward."""
        nll, cnt, forget = self._parts(outputs, batch, 1)
        out = {"forget_nll": _token_mean(nll, cnt, forget)[0].item()}
        if (~forget).any():
            out["retain_nll"] = _token_mean(nll, cnt, ~forget)[0].item()
        return out


def _repeat_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t] * (rows // t.shape[0]), 0)


def _labels(batch: Batch, rows: int) -> torch.Tensor:
    return _repeat_rows(batch.targets["labels"], rows)


class GA(UnlearnObjective):
    """Gradient ascent on the forget set: ``L = -NLL_f`` (retain rows are ignored)."""

    name = "ga"
    uses_retain = False

    def combine(self, nll, cnt, forget, batch, P):
        if self.options.reduction == "sequence":
            m = forget.to(nll.dtype)
            return -(nll * m).sum(1) / m.sum(1)
        return -_token_mean(nll, cnt, forget)


class GradDiff(UnlearnObjective):
    """``L = -NLL_f + gamma NLL_r``."""

    name = "graddiff"

    def combine(self, nll, cnt, forget, batch, P):
        out = -_token_mean(nll, cnt, forget)
        if (~forget).any():
            out = out + self.options.retain_weight * _token_mean(nll, cnt, ~forget)
        return out


class _WithReference(UnlearnObjective):
    """Keeps a frozen copy of the initial model (1x the weights in memory, no gradients)."""

    reference: nn.Module | None = None

    def setup(self, model):
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def set_reference(self, reference: nn.Module) -> None:
        """Use ``reference`` (the initial model) instead of a copy made by ``setup`` (resume)."""
        self.reference = reference.eval().requires_grad_(False)


class NPO(_WithReference):
    """Negative preference optimisation with sequence-summed log-probs (reference: the frozen
    initial model, log-probs computed once per batch into ``targets["ref_logp"]`` (R,))."""

    name = "npo"

    def prepare(self, batch):
        if self.reference is None:
            raise RuntimeError("NPO needs setup(model) (the frozen reference) before prepare")
        with torch.no_grad():
            device = _device(self.reference)
            out = call_model(self.reference, batch.to(device), causal=True, head_chunk=self.head_chunk)
            nll, _ = row_nll(logits_of(out), batch.targets["labels"].to(device))
        return Batch(batch.inputs, {**batch.targets, "ref_logp": (-nll).to(batch.targets["labels"].device)},
                     batch.size)

    def combine(self, nll, cnt, forget, batch, P):
        ref = _repeat_rows(batch.targets["ref_logp"].to(nll.device), nll.numel()).view(nll.shape)  # (P, R)
        logratio = -nll - ref  # log pi_theta - log pi_ref, (P, R)
        m = forget.to(nll.dtype)
        out = -(2.0 / self.options.beta) * (F.logsigmoid(-self.options.beta * logratio) * m).sum(1) / m.sum(1)
        if (~forget).any() and self.options.retain_weight:
            out = out + self.options.retain_weight * _token_mean(nll, cnt, ~forget)
        return out


class SimNPO(UnlearnObjective):
    """Reference-free NPO with length-normalised log-probs and margin gamma."""

    name = "simnpo"

    def combine(self, nll, cnt, forget, batch, P):
        o = self.options
        logp_norm = -nll / cnt.to(nll.dtype).clamp_min(1)  # (P, R): log pi(y|x) / |y|
        m = forget.to(nll.dtype)
        out = -(2.0 / o.beta) * (F.logsigmoid(-o.beta * logp_norm - o.gamma) * m).sum(1) / m.sum(1)
        if (~forget).any() and o.retain_weight:
            out = out + o.retain_weight * _token_mean(nll, cnt, ~forget)
        return out


def mlp_out_names(model: nn.Module, layers: list[int]) -> list[str]:
    """Names of the MLP output projections (down_proj / fc2 / mlp.c_proj / dense_4h_to_h) of
    ``layers`` (0-based decoder layer indices), weights only."""
    pat = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.(?:.*\.)?(down_proj|fc2|mlp\.c_proj|dense_4h_to_h)\.weight$")
    out = [n for n, _ in model.named_parameters() if (m := pat.search(n)) and int(m.group(1)) in layers]
    if not out:
        raise UsageError(f"no MLP output projection found for layers {layers}; name the parameters to update")
    return out


@dataclass
class RMUOutputs:
    logits: torch.Tensor | HiddenOutputs  # (rows, T, V), or the final hidden state and the head
    hidden: torch.Tensor  # (rows, T, D): output of block ``layer``


class RMU(_WithReference):
    """Representation misdirection: steer layer ``layer``'s forget activations to ``c u`` and keep
    its retain activations at the frozen model's (``targets["ref_hidden"]`` (R, T, D), per batch)."""

    name = "rmu"

    def __init__(self, options, head_chunk: int | None = None):
        super().__init__(options, head_chunk)
        self._blocks: dict[int, nn.Module] = {}

    def setup(self, model):
        super().setup(model)
        D = model.config.hidden_size
        g = torch.Generator().manual_seed(self.options.seed)
        u = torch.rand(D, generator=g, dtype=torch.float32)
        self.control = (self.options.steering_coef * u / u.norm())  # (D,)
        self._check_layer(model)

    def _check_layer(self, model):
        n = model.config.num_hidden_layers
        if not 0 <= self.options.layer < n:
            raise UsageError(f"rmu layer {self.options.layer} out of range: the model has {n} layers (0-based)")

    def trainable_default(self, model):
        self._check_layer(model)
        lay = self.options.layer
        return mlp_out_names(model, [i for i in (lay - 2, lay - 1, lay) if i >= 0])

    def forward(self, model, batch):
        """Logits and the output of block ``layer``, caught by a forward hook registered for this
        call only: it runs after the ZO engine's own hooks (registered earlier), so under the engine
        it sees every probe's rows. (Transformers 5 records ``output_hidden_states`` with hooks of its
        own that see only probe 0's slice, so those are not used.)"""
        from zoft.models.layout import discover_layout

        key = id(model)
        if key not in self._blocks:
            self._blocks[key] = discover_layout(model).blocks[self.options.layer].module
        caught: dict[str, torch.Tensor] = {}

        def hook(module, args, output):
            caught["h"] = output[0] if isinstance(output, (tuple, list)) else output

        handle = self._blocks[key].register_forward_hook(hook)
        try:
            out = call_model(model, batch, causal=True, head_chunk=self.head_chunk)
        finally:
            handle.remove()
        return RMUOutputs(logits_of(out), caught["h"])

    def _hidden(self, outputs):
        return outputs.hidden  # (rows, T, D)

    def prepare(self, batch):
        with torch.no_grad():
            out = self.forward(self.reference, batch.to(_device(self.reference)))
            h = self._hidden(out).float().to(batch.targets["labels"].device)
        return Batch(batch.inputs, {**batch.targets, "ref_hidden": h}, batch.size)

    def loss(self, outputs, batch, num_probes):
        P = num_probes
        h = self._hidden(outputs).float()  # (P*R, T, D)
        rows, _, D = h.shape
        mask = _repeat_rows(batch.inputs["attention_mask"], rows).to(h.device).bool()  # (P*R, T)
        forget = _repeat_rows(batch.targets["forget"], rows).to(h.device)  # (P*R,)
        ref = _repeat_rows(batch.targets["ref_hidden"], rows).to(h.device)  # (P*R, T, D)
        err_f = ((h - self.control.to(h.device)) ** 2).sum(-1) / D  # (P*R, T)
        err_r = ((h - ref) ** 2).sum(-1) / D
        tok_f = (mask & forget[:, None]).float()
        tok_r = (mask & ~forget[:, None]).float()
        lf = _per_probe(err_f * tok_f, P).flatten(1).sum(1) / _per_probe(tok_f, P).flatten(1).sum(1).clamp_min(1)
        lr = _per_probe(err_r * tok_r, P).flatten(1).sum(1) / _per_probe(tok_r, P).flatten(1).sum(1).clamp_min(1)
        return lf + self.options.alpha * lr


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


OBJECTIVES: dict[str, type] = {"ga": GA, "graddiff": GradDiff, "npo": NPO, "simnpo": SimNPO, "rmu": RMU}


def make_objective(name: str, options: dict[str, Any] | None = None, head_chunk: int | None = None) -> UnlearnObjective:
    """Objective ``name`` with ``options`` (fields of its options dataclass; unknown keys: error);
    ``head_chunk``: positions per LM-head call (None: the model's full logits)."""
    if name not in OBJECTIVES:
        raise UsageError(f"unknown objective '{name}'; choose one of {', '.join(OBJECTIVES)}")
    opts = parse_options(OPTIONS[name], options, f"objective '{name}'")
    for key in ("beta",):
        if hasattr(opts, key) and getattr(opts, key) <= 0:
            raise UsageError(f"objective '{name}': {key} must be > 0")
    return OBJECTIVES[name](opts, head_chunk)
