"""Tasks by name: ``make_task("sst2", tokenizer, "causal", 128)``.

A task turns raw examples into batches and model outputs into per-probe losses (see
``zoft.tasks.base``). ``kind`` says what the model is: "causal" (``AutoModelForCausalLM``),
"masked" (``AutoModelForMaskedLM``) or "encoder" (a plain ``AutoModel`` without a head).
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from zoft.errors import UsageError
from zoft.tasks.base import Batch, Task
from zoft.tasks.classify import KINDS, ClassifyTask, Kind, sst2_task
from zoft.tasks.data import Examples, builtin_sentiment, load_examples
from zoft.tasks.lm import LMTask

__all__ = ["Batch", "Task", "Kind", "KINDS", "ClassifyTask", "LMTask", "Examples", "TASKS",
           "make_task", "register_task", "rows_per_probe", "infer_kind", "load_examples", "builtin_sentiment"]

# name -> factory(tokenizer, kind, max_length, **options) -> Task
TASKS: dict[str, Callable[..., Task]] = {
    "lm": LMTask,
    "sst2": sst2_task,
    "classify": ClassifyTask,
}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make ``factory(tokenizer, kind, max_length, **options)`` available as ``name``."""
    if name in TASKS:
        raise ValueError(f"task {name!r} is already registered")
    TASKS[name] = factory


def _factory(name: str, kind: Kind, options: dict) -> Callable[..., Task]:
    """Task ``name``'s factory, once its name, ``kind`` and option names are checked."""
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; choose one of: {', '.join(sorted(TASKS))}")
    if kind not in KINDS:
        raise UsageError(f"model kind must be one of {', '.join(KINDS)}, not {kind!r}")
    factory = TASKS[name]
    params = list(inspect.signature(factory).parameters.values())[3:]  # after tokenizer, kind, max_length
    allowed = {p.name for p in params if p.name != "name"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UsageError(f"task {name!r} has no option {unknown[0]!r}; "
                         f"its options: {', '.join(sorted(allowed)) or 'none'}")
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in options]
    if missing:
        raise UsageError(f"task {name!r} needs the option {missing[0]!r}")
    return factory


def make_task(name: str, tokenizer, kind: Kind, max_length: int, **options) -> Task:
    """Build task ``name`` for a model of ``kind``; options are the factory's keyword arguments
    (e.g. ``template=``, ``verbalizers=`` for "classify"). Bad names/options: ``UsageError``."""
    factory = _factory(name, kind, options)
    if not isinstance(max_length, int) or max_length < 2:
        raise UsageError(f"max_length must be an integer >= 2, not {max_length!r}")
    return factory(tokenizer, kind, max_length, **options)


def rows_per_probe(name: str, kind: Kind, batch_size: int, **options) -> int:
    """Rows the model runs per probe for ``batch_size`` examples of task ``name`` on a ``kind``
    model, without a tokenizer: the batch the offload planner sizes activations and logits by. A
    factory whose task runs other than one row per example says how with a ``rows(kind,
    batch_size, **options)`` attribute (classification on a causal LM: one row per candidate)."""
    rows = getattr(_factory(name, kind, options), "rows", None)
    return rows(kind, batch_size, **options) if rows is not None else batch_size


def infer_kind(model: torch.nn.Module) -> Kind:
    """"causal" for ``*ForCausalLM`` / ``*LMHeadModel``, "masked" for ``*ForMaskedLM``, else
    "encoder" (a headless model whose outputs have ``last_hidden_state``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    def names(mapping) -> set[str]:
        out = set()
        for v in mapping.values():
            out.update(v if isinstance(v, (list, tuple)) else [v])
        return out

    cls = type(model).__name__
    if cls in names(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) or cls.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal"
    if cls.endswith("ForMaskedLM"):
        return "masked"
    return "encoder"
