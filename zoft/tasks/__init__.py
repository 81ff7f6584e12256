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
from zoft.tasks.mezo import MEZO_TASKS, mezo_sample
from zoft.tasks.suite import PromptTask

__all__ = ["Batch", "Task", "Kind", "KINDS", "ClassifyTask", "LMTask", "PromptTask", "Examples", "TASKS",
           "MEZO_TASKS", "make_task", "register_task", "infer_kind", "load_examples", "builtin_sentiment",
           "mezo_sample"]


def _mezo(name: str) -> Callable[..., Task]:
    def factory(tokenizer, kind: Kind, max_length: int, *, objective: str = "loss", demos: list = (),
                max_new_tokens: int = 50) -> PromptTask:
        return PromptTask(tokenizer, kind, max_length, name=name, objective=objective, demos=demos,
                          max_new_tokens=max_new_tokens)
    factory.__doc__ = f"MeZO's {name!r} ({MEZO_TASKS[name].source}) on a causal LM; see zoft.tasks.mezo."
    return factory


def _sst2(tokenizer, kind: Kind, max_length: int, *, objective: str = "loss", demos: list = (),
          max_new_tokens: int = 50, text_field: str = "sentence", label_field: str = "label",
          descriptions=None, scale: float = 20.0) -> Task:
    """SST-2: MeZO's template on a causal LM (``PromptTask``); masked LMs and encoders score it
    with ``sst2_task`` (LM-BFF's masked template, or embedding similarity)."""
    if kind == "causal":
        if (text_field, label_field) != ("sentence", "label"):
            raise UsageError("MeZO's sst2 reads the fields 'sentence' and 'label' (glue/sst2); rename yours "
                             "or use task 'classify' with your own template")
        return _mezo("sst2")(tokenizer, kind, max_length, objective=objective, demos=demos,
                             max_new_tokens=max_new_tokens)
    if objective != "loss" or demos:
        raise UsageError("objective and demos are options of the causal-LM sst2 only")
    return sst2_task(tokenizer, kind, max_length, text_field=text_field, label_field=label_field,
                     descriptions=descriptions, scale=scale)


# name -> factory(tokenizer, kind, max_length, **options) -> Task
TASKS: dict[str, Callable[..., Task]] = {
    "lm": LMTask,
    "classify": ClassifyTask,
    **{name: _mezo(name) for name in MEZO_TASKS},
    "sst2": _sst2,
}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make ``factory(tokenizer, kind, max_length, **options)`` available as ``name``."""
    if name in TASKS:
        raise ValueError(f"task {name!r} is already registered")
    TASKS[name] = factory


def make_task(name: str, tokenizer, kind: Kind, max_length: int, **options) -> Task:
    """Build task ``name`` for a model of ``kind``; options are the factory's keyword arguments
    (e.g. ``template=``, ``verbalizers=`` for "classify"). Bad names/options: ``UsageError``."""
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; choose one of: {', '.join(sorted(TASKS))}")
    if kind not in KINDS:
        raise UsageError(f"model kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise UsageError(f"max_length must be an integer >= 2, not {max_length!r}")
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
    return factory(tokenizer, kind, max_length, **options)


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
