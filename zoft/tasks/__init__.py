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
from zoft.models.loading import kind_phrase
from zoft.tasks.base import Batch, Task
from zoft.tasks.classify import KINDS, ClassifyTask, Kind, sst2_task
from zoft.tasks.data import Examples, builtin_sentiment, load_examples
from zoft.tasks.head import check_head_chunk
from zoft.tasks.lm import LMTask
from zoft.tasks.mezo import KSHOT_TASKS, MEZO_TASKS, kshot_sample, lmbff_encode, mezo_sample
from zoft.tasks.suite import PromptTask

__all__ = ["Batch", "Task", "Kind", "KINDS", "ClassifyTask", "LMTask", "PromptTask", "Examples", "TASKS",
           "MEZO_TASKS", "make_task", "register_task", "infer_kind", "load_examples", "builtin_sentiment",
           "mezo_sample", "KSHOT_TASKS", "kshot_sample", "rows_per_probe"]


def _mezo_rows(name: str) -> Callable[..., int]:
    """Rows per probe of MeZO's ``name`` on a causal LM: one per option when it trains on all of
    them (classification, or the accuracy objective) and the options are fixed label words; one
    per example otherwise. Options that are not label words (COPA, ReCoRD, ...) count as one row."""
    spec = MEZO_TASKS[name]

    def rows(kind: Kind, batch_size: int, *, objective: str = "loss", **_) -> int:
        every = objective == "accuracy" or (objective != "f1" and spec.train_as == "classification")
        return batch_size * spec.n_options if every and spec.n_options else batch_size
    return rows


def _mezo(name: str) -> Callable[..., Task]:
    def factory(tokenizer, kind: Kind, max_length: int, *, objective: str = "loss", demos: list = (),
                max_new_tokens: int = 50) -> PromptTask:
        return PromptTask(tokenizer, kind, max_length, name=name, objective=objective, demos=demos,
                          max_new_tokens=max_new_tokens)
    factory.rows = _mezo_rows(name)
    factory.__doc__ = f"MeZO's {name!r} ({MEZO_TASKS[name].source}) on a causal LM; see zoft.tasks.mezo."
    return factory


def _kshot(name: str) -> Callable[..., Task]:
    def factory(tokenizer, kind: Kind, max_length: int) -> ClassifyTask:
        spec = KSHOT_TASKS[name]
        if kind != "masked":
            raise UsageError(f"task {name!r} is MeZO's masked-LM k-shot suite (medium_models) and needs a masked LM, "
                             f"not {kind_phrase(kind)}")
        return ClassifyTask(tokenizer, kind, max_length, template="", name=name,
                            verbalizers={label: " " + w for label, w in spec.words.items()},
                            label_field=spec.label_field, text_fields=spec.sentences,
                            encode=lambda row: lmbff_encode(spec, row, tokenizer, max_length))
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
            raise UsageError(f"task {name!r} needs a causal or masked LM, not {kind_phrase(kind)}")
        return sst2_task(tokenizer, max_length, text_field=text_field, label_field=label_field,
                         descriptions=descriptions, scale=scale)

    def rows(kind: Kind, batch_size: int, **options) -> int:
        if kind == "causal":
            return _mezo_rows(name)(kind, batch_size, **options)
        return sst2_task.rows(kind, batch_size) if kind == "encoder" else batch_size

    factory.rows = rows
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


def make_task(name: str, tokenizer, kind: Kind, max_length: int, *, head_chunk: int | None = None,
              **options) -> Task:
    """Build task ``name`` for a model of ``kind``; options are the factory's keyword arguments
    (e.g. ``template=``, ``verbalizers=`` for "classify"). Bad names/options: ``UsageError``.

    ``head_chunk``: positions per LM-head call in the task's losses (``zoft.tasks.head``; None: the
    model's full logits; an encoder has no head and ignores it), e.g. the plan's ``head_chunk``."""
    factory = _factory(name, kind, options)
    if not isinstance(max_length, int) or max_length < 2:
        raise UsageError(f"max_length must be an integer >= 2, not {max_length!r}")
    task = factory(tokenizer, kind, max_length, **options)
    if head_chunk is not None:
        if not hasattr(task, "head_chunk"):
            raise UsageError(f"task {name!r} computes its loss from the model's own logits; it takes no head_chunk")
        if kind != "encoder":
            task.head_chunk = check_head_chunk(head_chunk)
    return task


def rows_per_probe(name: str, kind: Kind, batch_size: int, *, head_chunk: int | None = None, **options) -> int:
    """Rows the model runs per probe for ``batch_size`` examples of task ``name`` on a ``kind``
    model, without a tokenizer: the batch the offload planner sizes activations and logits by. A
    factory whose task runs other than one row per example says how with a ``rows(kind,
    batch_size, **options)`` attribute (classification on a causal LM: one row per candidate).
    ``head_chunk`` (``make_task``'s) changes no row count."""
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
