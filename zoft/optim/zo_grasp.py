"""ZO-GraSP: DeepZero's sparsity mask at initialisation from zeroth-order estimates, its
layer-wise sparsity ratios, and the layer-wise random masks DeepZero trains sparse CGE with.

GraSP (Wang et al., ICLR 2020) scores a weight by ``S = -w * (H g)``. DeepZero (Chen et al., ICLR
2024; official code ``OPTML-Group/DeepZero``, ``algorithm/prune/importance_scores.py:
zoo_grasp_importance_score`` and ``main.py: global_prune``) replaces both derivatives with
randomised estimates (RGE):

    g0 = RGE(w)                 RGE(v) = (1/q) sum_i (L(v + mu u_i) - L(v)) / mu * u_i
    g1 = RGE(w + mu g0)         (fresh directions), u_i = z_i / ||z_i|| per tensor
    Hg = (g1 - g0) / mu         S = -w * Hg

over the weights of ``Linear``/``Conv`` layers only (biases and norms are never pruned), on
``samples_per_class`` examples per class (25), with q = 192 and mu = 5e-3. ``global_prune``
keeps the (1 - sparsity) fraction of weights with the largest ``|S|`` over all those layers
(torch's ``L1Unstructured`` on the scores); DeepZero keeps from that mask only its **layer-wise
ratios** (``layer_sparsity``) and trains sparse CGE on masks drawn at random within each layer
with those ratios, re-drawn every ``mask_shuffle_interval`` (5) epochs (``layer_wise_random``):
``LayerwiseRandomMask``. The global mask itself (``global_mask``) is the other choice.

All queries go through the engine as probes (directions shaped per tensor, ``u_i`` zero outside
the scored weights; the point ``w + mu g0`` is itself a probe direction, so no weight is written).
The scores hold three parameter-sized fp32/fp64 tensors per scored weight (g0, g1, S): fine for
the small models DeepZero trains, not for an LLM (an LLM's mask would be scored blockwise; not
built).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zoft.engine.probes import Probe
from zoft.noise import mix, step_seed
from zoft.optim.cge import Mask
from zoft.optim.directions import bind


def prunable_keys(model: nn.Module) -> list[str]:
    """Canonical keys of the ``weight`` of every ``Linear`` / ``Conv1d/2d/3d`` (DeepZero's
    ``extract_conv2d_and_linear_weights``), trainable ones, each once."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    keys: dict[str, None] = {}
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.weight.requires_grad:
            keys.setdefault(canonical[id(m.weight)], None)
    return list(keys)


class _GraSPDirections:
    """Probe directions of one ZO-GraSP computation, by probe seed: ``u`` of the i-th draw of
    the first (``g0``) or second (``g1``) estimate, ``g0`` itself, or ``g0 + u``."""

    def __init__(self, keys: list[str], seed: int, q: int):
        self.keys, self.seed, self.q = set(keys), seed, q
        self.g0: dict[str, torch.Tensor] = {}

    def u(self, noise: Any, phase: int, i: int, key: str, like: torch.Tensor) -> torch.Tensor:
        z = noise.sample(step_seed(self.seed, phase, i), key, like)  # ``noise``: the plain backend
        return z / (z.norm() + 1e-8)  # DeepZero's per-tensor normalisation (its 1e-8 included)

    def direction_shaper(self):
        return self._shape

    def _shape(self, noise: Any, seed: int, key: str, like: torch.Tensor) -> torch.Tensor:
        """seed in [0, q): u of g0's draw; [q, 2q): g0 + u of g1's draw; 2q: g0."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        if key not in self.keys:
            return torch.zeros(like.shape, dtype=dtype, device=like.device)
        if seed < self.q:
            return self.u(noise, 0, seed, key, like)
        if seed == 2 * self.q:
            return self.g0[key]
        return self.g0[key] + self.u(noise, 1, seed - self.q, key, like)

    def estimate(self, noise: Any, phase: int, losses: torch.Tensor, eps: float,
                 params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """RGE from (base, q probe losses): ``(1/q) sum_i (L_i - L_0) / mu * u_i`` per key."""
        coefs = ((losses[1:] - losses[0]) / eps / self.q).tolist()
        out = {}
        for k in self.keys:
            acc = None
            for i, c in enumerate(coefs):
                u = self.u(noise, phase, i, k, params[k])
                acc = u * c if acc is None else acc.add_(u, alpha=c)
            out[k] = acc
        return out


def zo_grasp_scores(engine: Any, batch: Any, objective: Any, keys: list[str] | None = None,
                    queries: int = 192, eps: float = 5e-3, seed: int = 0) -> dict[str, torch.Tensor]:
    """DeepZero's ZO-GraSP scores ``S = -w * (g1 - g0) / mu`` (module docstring) of ``keys``
    (default: ``prunable_keys``) on ``batch``; 2 (q + 1) queries through ``engine``.

    Binds its own directions to the engine: bind the training optimizer after it
    (``zoft.optim.step`` does)."""
    keys = prunable_keys(engine.model) if keys is None else keys
    missing = [k for k in keys if k not in engine.params]
    if missing:
        raise ValueError(f"zo_grasp_scores: {missing[:3]} are not trainable parameters of the engine")
    dirs = _GraSPDirections(keys, seed, queries)
    noise = bind(dirs, engine).inner
    like = engine.z_like()
    q = queries
    l0 = engine.evaluate([Probe(None, 0.0)] + [Probe(i, eps) for i in range(q)], batch, objective)
    dirs.g0 = dirs.estimate(noise, 0, l0, eps, like)
    l1 = engine.evaluate([Probe(2 * q, eps)] + [Probe(q + i, eps) for i in range(q)], batch, objective)
    g1 = dirs.estimate(noise, 1, l1, eps, like)
    with torch.no_grad():
        return {k: -engine.params[k].detach().to(g1[k].dtype) * (g1[k] - dirs.g0[k]) / eps for k in keys}


def global_mask(scores: dict[str, torch.Tensor], sparsity: float) -> Mask:
    """Keep the ``1 - sparsity`` fraction of coordinates with the largest ``|score|`` over all
    keys together (torch's ``global_unstructured`` with ``L1Unstructured``: ``round(sparsity *
    total)`` coordinates pruned); True = kept."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError("sparsity must be in [0, 1)")
    flat = torch.cat([s.detach().abs().reshape(-1).double().cpu() for s in scores.values()])
    n_prune = round(sparsity * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if n_prune:
        keep[torch.topk(flat, n_prune, largest=False).indices] = False
    out, lo = {}, 0
    for k, s in scores.items():
        out[k] = keep[lo:lo + s.numel()].view(s.shape)
        lo += s.numel()
    return out


def layer_ratios(mask: Mask) -> dict[str, float]:
    """Each key's pruned fraction (DeepZero's ``layer_sparsity``)."""
    return {k: 1.0 - m.double().mean().item() for k, m in mask.items()}


class LayerwiseRandomMask:
    """DeepZero's ``layer_wise_random`` masks: key k keeps all but ``round(ratio_k * numel)``
    coordinates, chosen at random, re-drawn every ``interval`` steps; a pure function of
    (seed, step // interval, key) (a ``torch.Generator`` seeded by ``zoft.noise.mix``). Keys
    without a ratio stay dense (CGE estimates them all)."""

    def __init__(self, ratios: dict[str, float], shapes: dict[str, torch.Size], seed: int = 0, interval: int = 1):
        if interval < 1:
            raise ValueError("interval must be >= 1")
        self.ratios, self.shapes, self.seed, self.interval = ratios, shapes, seed, interval
        self._cache: tuple[int, Mask] | None = None

    def __call__(self, step: int) -> Mask:
        period = step // self.interval
        if self._cache is not None and self._cache[0] == period:
            return self._cache[1]
        out = {}
        for k, r in self.ratios.items():
            n = int(torch.Size(self.shapes[k]).numel())
            g = torch.Generator().manual_seed(mix(self.seed * 1_000_003 + period, k + "/deepzero-mask"))
            m = torch.ones(n, dtype=torch.bool)
            m[torch.randperm(n, generator=g)[:round(r * n)]] = False
            out[k] = m.view(self.shapes[k])
        self._cache = (period, out)
        return out
