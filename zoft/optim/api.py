"""One ZO step with any objective — the Python API the training loop and the unlearning work use.

    from zoft.optim import make_optimizer, step
    res = step(engine, optimizer, batch, objective, t)      # applies nothing yet: the update is
    res.update, res.metrics, res.losses, res.comparisons     # queued on the engine (lazy)

``objective`` is one of:

* an engine objective (``forward(model, batch)`` and ``loss(outputs, batch, P) -> (P,)``), e.g. a
  ``zoft.tasks`` task;
* a callable ``fn(outputs, batch) -> float``: a scalar to *minimise* from one candidate's model
  outputs (tensors cut to the batch's rows; ``model(**batch.inputs)`` unless ``forward=`` is given);
* a rank oracle (``forward`` and ``compare(candidates, batch) -> Comparison``; see
  ``zoft.optim.rank``): only for ranking optimizers (``zo-ranksgd``).

Optimizers follow one protocol: ``probes(step)``; optionally ``more_probes(step, losses,
comparisons)`` giving a further phase on the same batch (``zo-sgd-cons``, the RankSGD line search,
CGE's per-unit phases); optionally ``fan_out_at(step, phase)``, the unit before which a phase's
probes perturb nothing (feature reuse, ``ZOEngine.evaluate``; ``zoft.optim.cge``);
``update(step, losses[, comparisons])``. An optimizer whose step is not a set of probe losses
(``forward-grad``) has ``evaluate(engine, step, batch, objective)`` instead, returning what its
``update`` reads. ``evaluate_step`` runs all phases and returns the losses (what ``Trainer.step``
needs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from zoft.engine.probes import Update
from zoft.errors import UsageError
from zoft.optim.directions import bind
from zoft.optim.rank import Comparison, default_forward


@dataclass
class StepResult:
    update: Update
    metrics: dict[str, float]
    losses: torch.Tensor  # (all probes of all phases,) fp64; placeholders (-w_i) with a rank oracle
    comparisons: list[Comparison] | None = None


def split_candidates(outputs: Any, num: int, rows: int) -> list[Any]:
    """Probe-major outputs of ``num * rows`` rows -> one structure per candidate."""
    def take(x: Any, p: int) -> Any:
        if isinstance(x, torch.Tensor):
            return x[p * rows:(p + 1) * rows] if x.ndim and x.shape[0] == num * rows else x
        if isinstance(x, dict):
            vals = {k: take(v, p) for k, v in x.items()}
            return vals if type(x) is dict else type(x)(**vals)
        if isinstance(x, (list, tuple)):
            return type(x)(take(v, p) for v in x)
        return x
    return [take(outputs, p) for p in range(num)]


def _rows(batch: Any) -> int:
    return next(v for v in batch.inputs.values() if isinstance(v, torch.Tensor)).shape[0]


class _PerCandidate:
    """Engine objective that hands each candidate's outputs to ``score(candidates) -> (P,)``."""

    def __init__(self, forward: Callable, score: Callable[[list[Any]], torch.Tensor], rows: int):
        self.forward, self.score, self.rows = forward, score, rows

    def loss(self, outputs, batch, num_probes):
        return self.score(split_candidates(outputs, num_probes, self.rows))


def _kind(objective: Any) -> str:
    if hasattr(objective, "compare") and hasattr(objective, "forward"):
        return "oracle"
    if hasattr(objective, "forward") and hasattr(objective, "loss"):
        return "objective"
    if callable(objective):
        return "callable"
    raise TypeError("objective must have forward+loss, forward+compare, or be a callable outputs -> scalar")


def _evaluate_pieces(engine, probes, batch, objective) -> torch.Tensor:
    """The probes' losses on ``batch``, or on a large batch given as a list of pieces (evaluated
    one after another with the same probes; the per-piece mean losses averaged with weights
    ``piece.size``, which is the whole batch's mean for losses that average over examples)."""
    if not isinstance(batch, (list, tuple)):
        return engine.evaluate(probes, batch, objective)
    total = sum(b.size for b in batch)
    return sum(engine.evaluate(probes, b, objective) * (b.size / total) for b in batch)


def _evaluate(engine, optimizer, step: int, batch, objective, forward: Callable | None):
    own = getattr(optimizer, "evaluate", None)  # a step that is not probe losses (forward-grad's jvps)
    if own is not None:
        return own(engine, step, batch, objective), None
    kind = _kind(objective)
    if isinstance(batch, (list, tuple)) and kind != "objective":
        raise UsageError("a batch in pieces needs an engine objective (forward + loss)")
    ranked = getattr(optimizer, "ranked", False)
    if kind == "oracle" and not ranked:
        raise UsageError(f"a rank oracle gives comparisons, not losses; '{getattr(optimizer, 'name', optimizer)}' "
                         "needs scalar losses (use zo-ranksgd)")
    rows = 0 if kind == "objective" else _rows(batch)
    if kind == "callable":
        fn = objective
        objective = _PerCandidate(forward or default_forward,
                                  lambda cands: torch.tensor([float(fn(c, batch)) for c in cands]), rows)
    comps: list[Comparison] | None = [] if kind == "oracle" else None
    losses: list[torch.Tensor] = []
    fan_out = getattr(optimizer, "fan_out_at", None)  # feature reuse per phase (zoft.optim.cge)
    probes, phase = optimizer.probes(step), 0
    while probes:
        if kind == "oracle":
            group = optimizer.group_size(phase)
            oracle = objective

            def score(cands, group=group, oracle=oracle):
                found = [oracle.compare(cands[g:g + group], batch) for g in range(0, len(cands), group)]
                comps.extend(found)
                return torch.tensor([-w for c in found for w in c.weights()], dtype=torch.float64)

            losses.append(engine.evaluate(probes, batch, _PerCandidate(oracle.forward, score, rows)))
        elif fan_out is not None:
            losses.append(engine.evaluate(probes, batch, objective, fan_out_at=fan_out(step, phase)))
        else:
            losses.append(_evaluate_pieces(engine, probes, batch, objective))
        cat = torch.cat(losses)
        if comps is None and not torch.isfinite(cat).all():
            break
        more = getattr(optimizer, "more_probes", None)
        probes = more(step, cat, comps) if more is not None else []
        phase += 1
    return torch.cat(losses), comps


def evaluate_step(engine, optimizer, step: int, batch: Any, objective: Any) -> torch.Tensor:
    """The losses of every phase of ``optimizer``'s step ``step`` on ``batch`` (stops early on a
    non-finite loss). ``optimizer.update(step, losses)`` then gives the update. ``batch`` may be a
    list of batches: one large batch evaluated in pieces (MeZO-SVRG's anchor steps)."""
    bind(optimizer, engine)
    return _evaluate(engine, optimizer, step, batch, objective, None)[0]


def step(engine, optimizer, batch: Any, objective: Any, step: int, forward: Callable | None = None) -> StepResult:
    """Run step ``step`` of ``optimizer`` on ``batch`` with ``objective`` and queue its update on
    ``engine``. A non-finite loss skips the update (``metrics["skipped"] = True``)."""
    bind(optimizer, engine)
    losses, comps = _evaluate(engine, optimizer, step, batch, objective, forward)
    if comps is not None:
        upd, metrics = optimizer.update(step, None, comps)
    elif not torch.isfinite(losses).all():
        upd, metrics = Update(), {"loss": float("nan"), "lr": optimizer.lr(step), "skipped": True}
    else:
        upd, metrics = optimizer.update(step, losses)
    engine.set_update(upd)
    return StepResult(upd, metrics, losses, comps)
