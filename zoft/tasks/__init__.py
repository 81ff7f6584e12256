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
from zoft.tasks.mezo import KSHOT_TASKS, MEZO_TASKS, kshot_sample, lmbff_encode, mezo_sample
from zoft.tasks.suite import PromptTask

__all__ = ["Batch", "Task", "Kind", "KINDS", "ClassifyTask", "LMTask", "PromptTask", "Examples", "TASKS",
           "MEZO_TASKS", "make_task", "register_task", "infer_kind", "load_examples", "builtin_sentiment",
           "mezo_sample", "KSHOT_TASKS", "kshot_sample"]


def _mezo(name: str) -> Callable[..., Task]:
    def factory(tokenizer, kind: Kind, max_length: int, *, objective: str = "loss", demos: list = (),
                max_new_tokens: int = 50) -> PromptTask:
        return PromptTask(tokenizer, kind, max_length, name=name, objective=objective, demos=demos,
                          max_new_tokens=max_new_tokens)
    factory.__doc__ = f"MeZO's {name!r} ({MEZO_TASKS[name].source}) on a causal LM; see zoft.tasks.mezo."
    return factory


def _kshot(name: str) -> Callable[..., Task]:
    def factory(tokenizer, kind: Kind, max_length: int) -> ClassifyTask:
        spec = KSHOT_TASKS[name]
        if kind != "masked":
            raise UsageError(f"task {name!r} is MeZO's masked-LM k-shot suite (medium_models) and needs a masked LM, "
                             f"not a {kind} model")
        return ClassifyTask(tokenizer, kind, max_length, template="", name=name,
                            verbalizers={label: " " + w for label, w in spec.words.items()},
                            label_field=spec.label_field, text_fields=spec.sentences,
                            encode=lambda row: lmbff_encode(spec, row, tokenizer))
    factory.__doc__ = f"MeZO's k-shot {name!r} ({KSHOT_TASKS[name].source}) on a masked LM; see zoft.tasks.mezo."
    return factory


def _by_kind(name: str) -> Callable[..., Task]:
    """``name`` on a causal LM: MeZO's large_models template; on a masked LM: its k-shot
    (LM-BFF) template; SST-2 on an encoder: ``sst2_task``'s embedding similarity."""
    def factory(tokenizer, kind: Kind, max_length: int, *, objective: str = "loss", demos: list = (),
                max_new_tokens: int = 50, text_field: str = "sentence", label_field: str = "label",
                descriptions=None, scale: float = 20.0) -> Task:
        if kind != "encoder" and (text_field, label_field, descriptions) != ("sentence", "label", None):
            raise UsageError(f"MeZO's {name} reads the dataset's own fields; text_field, label_field and "
                             "descriptions are options of sst2 on an encoder (or use task 'classify')")
        if kind == "causal":
            return _mezo(name)(tokenizer, kind, max_length, objective=objective, demos=demos,
                               max_new_tokens=max_new_tokens)
        if objective != "loss" or demos:
            raise UsageError(f"objective and demos are options of the causal-LM {name} only")
        if kind == "masked":
            return _kshot(name)(tokenizer, kind, max_length)
        if name != "sst2":
            raise UsageError(f"task {name!r} needs a causal or masked LM, not a {kind} model")
        return sst2_task(tokenizer, kind, max_length, text_field=text_field, label_field=label_field,
                         descriptions=descriptions, scale=scale)
    return factory


# name -> factory(tokenizer, kind, max_length, **options) -> Task
TASKS: dict[str, Callable[..., Task]] = {
    "lm": LMTask,
    "classify": ClassifyTask,
    **{name: _mezo(name) for name in MEZO_TASKS},
    **{name: _kshot(name) for name in KSHOT_TASKS},
    "sst2": _by_kind("sst2"),
    "rte": _by_kind("rte"),
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
