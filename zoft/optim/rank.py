"""ZO-RankSGD (Tang, Rybin, Chang; ICLR 2024): descent from comparisons alone.

A step evaluates m candidates ``w + eps u_i`` (``u_i = z(s_i)``, or ``z / ||z||`` with ``sphere``)
and asks an *oracle* only which are better. Any comparison graph works: an edge ``i -> j`` says
"i is better than j" (a full ranking gives all m(m-1)/2 ordered pairs; an ordered top-k gives the
pairs inside the top k and every top-k point -> every unranked point, |E| = k(k-1)/2 + k(m-k);
pairwise preferences give their pairs; ties give no edge). With ``w_i`` = out-degree - in-degree,

    g = (1/|E|) sum_{(i->j) in E} (u_j - u_i) = -(1/|E|) sum_i w_i u_i,        w <- decay w - lr g

(a ranked point at 0-based rank r has w_i = m-1-2r; an unranked one -k). g is scale-free: ``lr``
sets the step length. With q = ``n_queries`` independent groups of m candidates, g is their mean.
Only the *order* of losses enters, so any strictly increasing transform of the loss gives the
identical trajectory. Statistics (linear f, Gaussian u, full ranking, any m, d): every edge has
E<u_j - u_i, grad/|grad|> = E|N(0, 2)| = 2/sqrt(pi), hence E<g, grad/|grad|> = 2/sqrt(pi); for
d >> m, |g| ~= sqrt(d sum_i w_i^2)/|E| and E cos(g, grad) ~= sqrt(3 m (m-1) / ((m+1) pi d)).

Line search (``line_search = L > 0``): a second phase on the same batch evaluates
``w - lr gamma^l g`` for l = 0..L-1 and the same oracle picks the best (ties: the longer step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Protocol, Sequence

import torch

from zoft.engine.probes import Probe, Update
from zoft.noise import step_seed
from zoft.optim.zo_sgd import ZOSGD, ZOConfig


# -- comparison graphs -------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    """A comparison graph over ``m`` candidates: ``edges`` are (better, worse) index pairs."""

    m: int
    edges: tuple[tuple[int, int], ...]

    def __post_init__(self):
        for i, j in self.edges:
            if not (0 <= i < self.m and 0 <= j < self.m) or i == j:
                raise ValueError(f"bad comparison edge ({i}, {j}) for {self.m} candidates")

    @classmethod
    def from_ranking(cls, order: Sequence[int], m: int | None = None) -> "Comparison":
        """``order``: candidate indices best first; shorter than ``m`` = an ordered top-k."""
        order = [int(i) for i in order]
        m = len(order) if m is None else m
        if len(set(order)) != len(order):
            raise ValueError(f"ranking {order} repeats a candidate")
        rest = [j for j in range(m) if j not in set(order)]
        edges = [(order[a], order[b]) for a in range(len(order)) for b in range(a + 1, len(order))]
        edges += [(i, j) for i in order for j in rest]
        return cls(m, tuple(edges))

    @classmethod
    def from_scores(cls, scores: Sequence[float] | torch.Tensor, top_k: int = 0,
                    higher_is_better: bool = False) -> "Comparison":
        """From one score per candidate (default: lower is better, like a loss). ``top_k > 0``
        keeps only what an ordered top-k oracle reveals. Ties give no edge."""
        vals = [float(v) for v in (scores.tolist() if isinstance(scores, torch.Tensor) else scores)]
        if any(math.isnan(v) for v in vals):
            raise ValueError("a candidate's score is NaN")
        key = [-v for v in vals] if higher_is_better else vals
        order = sorted(range(len(vals)), key=lambda i: (key[i], i))
        k = len(order) if top_k <= 0 else min(top_k, len(order))
        edges = [(i, j) for a, i in enumerate(order[:k]) for j in order[a + 1:] if key[i] < key[j]]
        return cls(len(vals), tuple(edges))

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[int, int]], m: int) -> "Comparison":
        """Pairwise preferences ``(winner, loser)``; ties are simply not listed."""
        return cls(m, tuple((int(i), int(j)) for i, j in pairs))

    def weights(self) -> list[int]:
        """w_i = (# candidates i beats) - (# candidates that beat i); they sum to 0."""
        w = [0] * self.m
        for i, j in self.edges:
            w[i] += 1
            w[j] -= 1
        return w

    def best(self) -> int:
        """The candidate with the largest weight (lowest index on ties)."""
        w = self.weights()
        return max(range(self.m), key=lambda i: (w[i], -i))


# -- oracles -----------------------------------------------------------------------------------
def default_forward(model: torch.nn.Module, batch: Any) -> Any:
    return model(**batch.inputs)


def greedy_generate(max_new_tokens: int) -> Callable[[torch.nn.Module, Any], torch.Tensor]:
    """A ``forward`` that greedily generates ``max_new_tokens`` (no KV cache) and returns the
    token ids (rows, T + new). Prompts must be unpadded or left-padded (the next token is read at
    the last position); each candidate generates under its own perturbed weights."""
    def forward(model, batch):
        ids = batch.inputs["input_ids"]
        mask = batch.inputs.get("attention_mask", torch.ones_like(ids))
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (N, T, V)
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # (N, 1)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        return ids
    return forward


class RankOracle(Protocol):
    """Says which of the candidates are better. ``candidates[i]`` is candidate i's outputs of
    ``forward`` (tensors cut to the batch's rows); ``batch`` is the plain (un-repeated) batch."""

    def forward(self, model: torch.nn.Module, batch: Any) -> Any: ...

    def compare(self, candidates: list[Any], batch: Any) -> Comparison: ...


class LossOracle:
    """(a) The loss of a task/objective on the shared minibatch (lower is better)."""

    def __init__(self, objective: Any, top_k: int = 0):
        self.objective, self.top_k = objective, top_k

    def forward(self, model, batch):
        return self.objective.forward(model, batch)

    def compare(self, candidates, batch):
        scores = [float(self.objective.loss(c, batch, 1)[0]) for c in candidates]
        return Comparison.from_scores(scores, self.top_k)


class RewardOracle:
    """(b) A reward function or reward model over each candidate's outputs or generations
    (``reward(outputs, batch) -> float``, higher is better). ``forward`` defaults to the model's
    forward; pass ``greedy_generate(n)`` to score generations."""

    def __init__(self, reward: Callable[[Any, Any], float], forward: Callable | None = None, top_k: int = 0):
        self.reward, self.top_k = reward, top_k
        self._forward = forward or default_forward

    def forward(self, model, batch):
        return self._forward(model, batch)

    def compare(self, candidates, batch):
        scores = [float(self.reward(c, batch)) for c in candidates]
        return Comparison.from_scores(scores, self.top_k, higher_is_better=True)


class CallableOracle:
    """(c) A judge or a person: ``fn(candidates, batch)`` returns a ranking (indices best first,
    possibly only the top k), a list of pairwise wins ``[(winner, loser), ...]``, or a ``Comparison``."""

    def __init__(self, fn: Callable[[list[Any], Any], Any], forward: Callable | None = None):
        self.fn = fn
        self._forward = forward or default_forward

    def forward(self, model, batch):
        return self._forward(model, batch)

    def compare(self, candidates, batch):
        r = self.fn(candidates, batch)
        if isinstance(r, Comparison):
            return r
        r = list(r)
        if r and isinstance(r[0], (tuple, list)):
            return Comparison.from_pairs(r, len(candidates))
        return Comparison.from_ranking(r, len(candidates))


# -- the optimizer -----------------------------------------------------------------------------
@dataclass
class RankSGDConfig(ZOConfig):
    """ZO-RankSGD. lr: step length (g is scale-free); eps: the paper's mu; m: candidates per group;
    n_queries: independent groups per step (averaged); top_k: 0 = full ranking, else the loss
    oracle reveals only an ordered top-k; rank_oracle: what ``zoft finetune`` ranks by (the task
    loss; reward/callable oracles are Python objects, see ``zoft.optim.step``); line_search: L
    step lengths ``lr gamma^l`` tried in a second phase (0: off)."""

    lr: float = 1e-3
    m: int = 8
    top_k: int = 0
    rank_oracle: Literal["loss"] = "loss"
    line_search: int = 0
    gamma: float = 0.5
    module_wise_applies: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()  # eps, n_queries, sphere_norm
        if self.m < 2:
            raise ValueError("zo-ranksgd needs m >= 2")
        if self.one_sided:
            raise ValueError("one_sided does not apply to zo-ranksgd (candidates are compared, not differenced)")
        if not 0 <= self.top_k <= self.m:
            raise ValueError("top_k must be in [0, m]")
        if self.rank_oracle != "loss":
            raise ValueError("rank_oracle in a config can only be 'loss'; pass reward/callable oracles "
                             "through the Python API (zoft.optim.step)")
        if self.line_search < 0 or not 0 < self.gamma < 1:
            raise ValueError("line_search must be >= 0 and gamma in (0, 1)")


class ZORankSGD(ZOSGD):
    name = "zo-ranksgd"
    memory_copies = 0
    paper = "Tang, Rybin, Chang, Zeroth-Order Optimization Meets Human Feedback (ZO-RankSGD, ICLR 2024)"
    data_parallel = "yes, with line_search: 0 and m * n_queries >= ranks"
    ranked = True

    def seeds(self, step: int) -> list[int]:
        return [step_seed(self.seed, step, i) for i in range(self.config.n_queries * self.config.m)]

    def probes(self, step: int) -> list[Probe]:
        self._norms = {}
        return [Probe(s, self.config.eps / self.norm(s)) for s in self.seeds(step)]

    def num_probes(self) -> int:
        return self.config.n_queries * self.config.m

    def group_size(self, phase: int) -> int:
        return self.config.m if phase == 0 else self.config.line_search

    def comparisons(self, losses: torch.Tensor) -> list[Comparison]:
        """The loss oracle: one comparison per group of m (and one for the line search)."""
        c = self.config
        n1 = c.n_queries * c.m
        comps = [Comparison.from_scores(losses[j * c.m:(j + 1) * c.m], c.top_k) for j in range(c.n_queries)]
        if len(losses) > n1:
            comps.append(Comparison.from_scores(losses[n1:]))
        return comps

    def direction(self, step: int, comps: Sequence[Comparison]) -> list[tuple[int, float]]:
        """-g in seed form: ``sum_i (w_i / (|E| q)) u_i`` over the q groups."""
        c = self.config
        seeds = self.seeds(step)
        terms = []
        for j, comp in enumerate(comps[:c.n_queries]):
            if not comp.edges:
                continue  # all tied: this group says nothing
            for i, w in enumerate(comp.weights()):
                s = seeds[j * c.m + i]
                terms.append((s, w / len(comp.edges) / c.n_queries / self.norm(s)))
        return terms

    @property
    def composite_probes(self) -> bool:
        """The line search probes along the combined ranking direction (a virtual seed:
        ``zoft.optim.directions.whole_z``)."""
        return self.config.line_search > 0

    def more_probes(self, step: int, losses: torch.Tensor, comparisons: list[Comparison] | None = None) -> list[Probe]:
        c = self.config
        if not c.line_search or len(losses) != c.n_queries * c.m:
            return []
        comps = comparisons if comparisons is not None else self.comparisons(losses)
        self._need_binding("line_search")
        self._noise.clear()
        vseed = self._noise.define(self.direction(step, comps))
        lr = self.lr(step)
        return [Probe(vseed, lr * c.gamma ** l) for l in range(c.line_search)]

    def update(self, step: int, losses: torch.Tensor | None,
               comparisons: list[Comparison] | None = None) -> tuple[Update, dict[str, float]]:
        """From the losses (loss oracle) or from an oracle's comparisons (then ``losses`` may be None)."""
        c = self.config
        n1 = c.n_queries * c.m
        comps = comparisons if comparisons is not None else self.comparisons(losses)
        if c.line_search and len(comps) != c.n_queries + 1:
            raise RuntimeError("zo-ranksgd with line_search needs its second phase on the same batch: "
                               "run it through zoft.optim.step / zoft.optim.evaluate_step")
        lr = self.lr(step)
        scale = c.gamma ** comps[c.n_queries].best() if c.line_search else 1.0
        terms = [(s, lr * scale * w) for s, w in self.direction(step, comps)]
        upd = Update(terms=terms, decay=1.0 - lr * c.weight_decay)
        metrics = {"lr": lr, "edges": float(sum(len(x.edges) for x in comps[:c.n_queries])), "step_scale": scale}
        if comparisons is None:
            metrics["loss"] = losses[:n1].mean().item()
            metrics["loss_best"] = losses[:n1].min().item()
        return upd, metrics
