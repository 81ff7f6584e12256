"""The unit view of an unmodified model (Hugging Face or any ``nn.Module``).

A model is an ordered list of *units*: embedding(s), the blocks (decoder/encoder layers), then
whatever runs after them (final norm, pooler, head). A unit is a module that is called with
batch-leading tensors and owns a set of parameters; the engine perturbs a unit's parameters
while it runs. Discovery is generic (the longest ``nn.ModuleList`` of same-class layers is the
block stack; every maximal sub-module outside it that owns parameters is a unit); a small
per-family table (``FAMILY_PRE``) only says which non-block units run *before* the blocks where
names do not tell. A model with no block stack (a CNN, an MLP) gets the *generic* layout: the
outermost modules that own parameters directly, in registration order (``_generic_layout``).
Nothing here knows the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from zoft.errors import ZoftError

UnitKind = Literal["embed", "block", "norm", "head", "other"]

# Sub-module names (last path component) that run before the block stack. Generic name patterns
# cover embeddings; this table holds the family-specific rest.
_PRE_NAME_HINTS = ("embed", "wte", "wpe", "word_embeddings", "project_in")
FAMILY_PRE: dict[str, tuple[str, ...]] = {
    "opt": ("project_in",),
    "gpt_neox": ("emb_dropout",),
}


@dataclass(frozen=True)
class Unit:
    """One streamable piece of the model.

    name:   module path on the unmodified model (``"model.decoder.layers.3"``).
    module: the module itself.
    params: ``(key, parameter)`` pairs, ``key`` being the parameter's canonical name in
            ``model.named_parameters()`` (a tied parameter has the same key in every unit).
    kind:   "embed" | "block" | "norm" | "head" | "other".
    """

    name: str
    module: nn.Module
    params: tuple[tuple[str, nn.Parameter], ...]
    kind: UnitKind

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for _, p in self.params)


@dataclass(frozen=True)
class Layout:
    """Units in execution order plus where the block stack lives (``""``: the generic layout,
    no blocks)."""

    units: tuple[Unit, ...]
    blocks_path: str

    @property
    def blocks(self) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if u.kind == "block")

    def param_keys(self) -> list[str]:
        """Canonical keys of all parameters, each once, in unit order."""
        seen: dict[str, None] = {}
        for u in self.units:
            for k, _ in u.params:
                seen.setdefault(k, None)
        return list(seen)


def _find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if not any(True for _ in mod.parameters()):
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    return best


def _kind_of(name: str, module: nn.Module, head: nn.Module | None) -> UnitKind:
    leaf = name.rsplit(".", 1)[-1].lower()
    if head is not None and any(m is head for m in module.modules()):
        return "head"
    if isinstance(module, nn.Embedding) or any(h in leaf for h in _PRE_NAME_HINTS):
        return "embed"
    if "norm" in type(module).__name__.lower() or leaf.startswith("ln") or "norm" in leaf:
        return "norm"
    return "other"


def _generic_layout(model: nn.Module, canonical: dict[int, str]) -> Layout:
    """Units of a model without a block stack: every outermost module that owns parameters
    directly (``Conv2d``, ``Linear``, a norm, ``Embedding``; a module with a parameter of its own
    takes its children's parameters with it, so units never nest), in registration order.

    Registration order is the execution order of ``nn.Sequential`` and of any model whose
    ``forward`` calls its children in the order it assigned them; nothing in the engine relies on
    it (feature reuse names its fan-out unit, ``ZOEngine.evaluate``). A model whose root owns a
    parameter is one unit.
    """
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    units: list[Unit] = []

    def visit(prefix: str, module: nn.Module) -> None:
        if any(True for _ in module.parameters(recurse=False)):
            params = tuple((canonical[id(p)], p) for _, p in module.named_parameters(remove_duplicate=False))
            name = prefix.rstrip(".")
            units.append(Unit(name, module, params, _kind_of(name, module, head)))
            return
        for child_name, child in module.named_children():
            visit(f"{prefix}{child_name}.", child)

    visit("", model)
    return Layout(tuple(units), blocks_path="")


def discover_layout(model: nn.Module) -> Layout:
    """Read the unit layout of ``model`` without modifying it: the block-stack layout when the
    model has a stack of repeated blocks, else the generic layout (``_generic_layout``).

    Raises ``ZoftError`` naming what was not found when a model with a block stack cannot be
    read: parameters owned directly by a module that also contains the blocks.
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    found = _find_block_list(model)
    if found is None:
        return _generic_layout(model, canonical)
    blocks_path, blocks = found
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    family = getattr(getattr(model, "config", None), "model_type", "")
    pre_names = FAMILY_PRE.get(family, ())

    def unit(name: str, module: nn.Module, kind: UnitKind) -> Unit:
        params = tuple(
            (canonical[id(p)], p) for _, p in module.named_parameters(remove_duplicate=False)
        )
        return Unit(name, module, params, kind)

    pre: list[Unit] = []
    post: list[Unit] = []
    stray: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        # ``module`` is an ancestor of the block stack: its own parameters cannot be streamed.
        stray.extend(f"{prefix}{n}" for n, _ in module.named_parameters(recurse=False))
        for child_name, child in module.named_children():
            path = f"{prefix}{child_name}"
            if child is blocks:
                continue
            if any(m is blocks for m in child.modules()) or (
                    isinstance(child, (nn.ModuleDict, nn.ModuleList)) and any(True for _ in child.parameters())):
                visit(path + ".", child)  # containers have no forward of their own: their items are units
            elif any(True for _ in child.parameters()):
                kind = _kind_of(path, child, head)
                is_pre = kind == "embed" or child_name in pre_names
                (pre if is_pre else post).append(unit(path, child, kind))

    visit("", model)
    if stray:
        raise ZoftError(
            f"cannot read {type(model).__name__}: parameters {stray} belong to a module that also "
            f"holds the block stack '{blocks_path}'; add a layout entry in zoft/models/layout.py"
        )
    block_units = [unit(f"{blocks_path}.{i}", b, "block") for i, b in enumerate(blocks)]
    post.sort(key=lambda u: u.kind == "head")  # head last, stable otherwise
    units = tuple(pre + block_units + post)

    covered = {k for u in units for k, _ in u.params}
    missing = [n for n in canonical.values() if n not in covered]
    if missing:
        raise ZoftError(f"cannot read {type(model).__name__}: parameters {missing[:5]} are in no unit")
    return Layout(units, blocks_path)


def unit_bytes_by_kind(layout: Layout) -> dict[str, int]:
    """Bytes of parameters per unit kind (tied parameters counted once)."""
    out: dict[str, int] = {}
    seen: set[str] = set()
    for u in layout.units:
        for k, p in u.params:
            if k in seen:
                continue
            seen.add(k)
            out[u.kind] = out.get(u.kind, 0) + p.numel() * p.element_size()
    return out


def is_float_param(p: torch.Tensor) -> bool:
    return p.dtype.is_floating_point
