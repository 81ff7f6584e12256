"""Every default of a ``zoft finetune`` run, resolved in one place.

``zoft finetune``, ``zoft finetune --dry-run`` and ``zoft plan`` all go through ``resolve_run``, so
the plan ``zoft plan`` prints for some flags is the plan ``zoft finetune`` executes with the same
flags. Resolving reads the model's config (offline for the shipped aliases), never its weights:

- device ``auto``: CUDA when one is visible, else CPU. ``cuda`` stays ``cuda`` here even where none
  is visible, so a dry run sizes a GPU run on a laptop (the run itself then refuses to start).
- dtype ``auto``: on CUDA the checkpoint's own dtype (its config's ``dtype``, formerly
  ``torch_dtype``: fp16 for OPT and Llama-2, bf16 for Llama-3, Mistral and Qwen; fp32 when it names
  none), on CPU fp32. A resumed run keeps the dtype its ``config.yaml`` recorded, so it continues in
  what training used on whatever device it resumes.
- noise ``auto``: ``zoft.noise.default_noise`` of the device (``table`` on CPU, ``triton`` on
  CUDA); a resumed run keeps the backend its ``config.yaml`` recorded (it is a trajectory key: a
  run recorded with ``torch`` continues with ``torch``).
- probes per step: the optimizer's (``mezo-sgd``: 2 per query; ``--one-sided``: queries + 1).
- rows per probe: the task's (``sst2`` on a causal LM scores each of its 2 candidates on its own
  row: 2 per example), so the plan sizes what the model really runs.
- with ``--gpu-mem``: the planner's placement (``zoft.engine.plan``) for those and the config's
  batch, ``--max-length``, codec, adapter and quantization, or its one-line refusal.

The run records the resolved config (``config.yaml``: no ``auto`` left), which replay and resume read.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from zoft.config import TrainConfig
from zoft.engine.plan import Plan, format_plan, make_plan
from zoft.errors import UsageError
from zoft.models import checkpoint_dtype, model_kind, resolve
from zoft.models.loading import EMBEDDED_DEFAULT
from zoft.noise import BACKENDS, default_noise
from zoft.optim import make_optimizer, whole_z
from zoft.tasks import rows_per_probe

_KIND = {"causal": "causal LM", "masked": "masked LM", "encoder": "encoder"}


@dataclass(frozen=True)
class ResolvedRun:
    """A run's settings with every default resolved, and its plan (None without ``gpu_mem``)."""

    cfg: TrainConfig  # device "cpu" | "cuda", dtype "fp32" | "bf16" | "fp16": what the run uses
    name: str  # the model as the user named it (alias, directory, hub id)
    source: str  # where its weights load from (hub id or directory)
    kind: str  # "causal" | "masked" | "encoder"
    why_dtype: str  # how the dtype was chosen, for the printout
    num_probes: int  # perturbed evaluations per step
    rows: int  # rows the model runs per probe for the batch (classification on a causal LM: one per candidate)
    plan: Plan | None


def device_type(device: str) -> str:
    """``"cuda"`` or ``"cpu"`` for ``--device`` (auto: CUDA when one is visible)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def auto_dtype(config: Any, device: str) -> str:
    """``--dtype auto`` on ``device`` ("cpu" / "cuda") for a model ``config``: on CUDA the
    checkpoint's own dtype (fp32 when its config names none), on CPU fp32."""
    return (checkpoint_dtype(config) or "fp32") if device == "cuda" else "fp32"


def _resumed(cfg: TrainConfig, key: str, allowed: tuple[str, ...]) -> str | None:
    """The value of ``key`` recorded by the run ``--resume`` continues (None: no readable record)."""
    path = Path(cfg.output_dir) / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None  # the trainer reports a missing or broken run directory itself
    v = saved.get(key) if isinstance(saved, dict) else None
    return v if v in allowed else None


def build_optimizer(cfg: TrainConfig):
    """The optimizer of ``cfg``: the shared flags over the optimizer's own defaults (a flag left
    unset, None, keeps the optimizer's value: lozo's lr 1e-7, cge's one_sided true), then
    ``optimizer_options``."""
    opts = dict(lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay, n_queries=cfg.n_queries,
                one_sided=cfg.one_sided, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps)
    opts = {k: v for k, v in opts.items() if v is not None}
    opts.update(cfg.optimizer_options)
    return make_optimizer(cfg.optimizer, opts, seed=cfg.seed, total_steps=cfg.steps)


def trained_sizes(cfg: TrainConfig, config: Any) -> dict[str, int]:
    """Coordinates per trained parameter of ``cfg``'s run (name -> numel), from the model's
    ``config`` built on the meta device (no weights, no memory): the ``--peft`` adapter's or the
    model's parameters, selected by ``--trainable`` / ``--freeze`` as the run selects them."""
    from zoft.models.adapters import apply_peft
    from zoft.models.loading import _auto_class
    from zoft.train import select_trainable

    with torch.device("meta"):
        model = _auto_class(model_kind(config)).from_config(config)
        if cfg.peft != "none":
            model = apply_peft(model, cfg.peft, cfg.peft_options, seed=cfg.seed)
    select_trainable(cfg, model)
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad and p.dtype.is_floating_point}


def plan_for(cfg: TrainConfig, num_probes: int = 2, **options: Any) -> Plan | None:
    """The plan of ``resolve_run(cfg, num_probes, **options)`` (None without ``cfg.gpu_mem``)."""
    return resolve_run(cfg, num_probes, **options).plan


def resolve_run(cfg: TrainConfig, num_probes: int | None = None, **plan_options: Any) -> ResolvedRun:
    """Resolve ``cfg``'s defaults (device, dtype, probes) and plan it under ``cfg.gpu_mem``.

    Loads no weights. The plan places ``cfg.model`` (its config alone) for ``num_probes`` probes of
    ``cfg.batch_size x cfg.max_length`` (the task's rows) in the resolved dtype; adapter runs plan
    the base and write nothing back. Raises ``UsageError`` with one line when the run could not start: an unknown model
    or optimizer, a budget below the smallest plan (naming that plan's budget and the model as the
    user named it), a cge step over its ``max_queries`` (counted on ``trained_sizes``).
    ``num_probes`` overrides the optimizer's count (``zoft plan --num-probes``, a what-if);
    ``plan_options`` are the planner's what-if knobs (``h2d_gbps``, ``tflops``, ``attention``,
    ``scratch``).
    """
    name = cfg.model or EMBEDDED_DEFAULT
    source, config = resolve(cfg.model)
    device = device_type(cfg.device)
    kept = _resumed(cfg, "dtype", ("fp32", "bf16", "fp16")) if cfg.resume and cfg.dtype == "auto" else None
    cuda = auto_dtype(config, "cuda")
    if cfg.dtype != "auto":
        dtype, why = cfg.dtype, f"--dtype {cfg.dtype}"
    elif kept is not None:
        dtype, why = kept, "auto: kept from the run being resumed"
    elif device == "cuda":
        dtype = cuda
        why = "auto: the checkpoint's dtype on CUDA" if checkpoint_dtype(config) else "auto: the checkpoint names none"
    else:
        dtype = auto_dtype(config, device)
        why = "auto: fp32 on CPU" + (f"; on CUDA: the checkpoint's {cuda}" if cuda != dtype else "")
    noise = cfg.noise
    if noise == "auto":  # the backend is a trajectory key: a resumed run keeps the one it recorded
        noise = (_resumed(cfg, "noise", tuple(BACKENDS)) if cfg.resume else None) or default_noise(device)
    resolved = dataclasses.replace(cfg, device=device, dtype=dtype, noise=noise)
    opt = build_optimizer(resolved)
    if cfg.gpu_mem is not None and not getattr(opt, "streams", True):  # zoft optimizers: "streams: no"
        raise UsageError(f"--optimizer {cfg.optimizer} does not stream blocks (zoft optimizers: streams: no); "
                         "drop --gpu-mem")
    if hasattr(opt, "check_size"):  # cge queries every trained coordinate: refused above max_queries
        opt.check_size(trained_sizes(resolved, config))
    probes = num_probes if num_probes is not None else opt.num_probes()
    # a stateful optimizer's update (momentum, Adam moments, re-derived masks) is not seed-form:
    # the engine writes a streamed block back in the residency that applied it, so its plan has
    # k_wb = 1 (unless --writeback-every says otherwise) and counts the update's whole fp32 copy
    stateful = opt.stateful
    kind = model_kind(config)
    rows = rows_per_probe(cfg.task, kind, cfg.batch_size, **cfg.task_options)
    try:
        plan = None if cfg.gpu_mem is None else make_plan(
            name, cfg.gpu_mem, batch_size=cfg.batch_size, max_length=cfg.max_length, num_probes=probes, dtype=dtype,
            transfer=cfg.transfer, adapters=cfg.peft != "none", quant=cfg.quant, rows=rows,
            writeback_every=cfg.writeback_every, noise=noise, device=device, stateful=stateful,
            whole_z=whole_z(opt), **plan_options)
    except UsageError as e:
        if cfg.dtype == "auto" and device == "cpu" and cuda != dtype:  # sizing a GPU run on a laptop
            raise UsageError(f"{e} (planned in {dtype}, --dtype auto on CPU; --device cuda plans a GPU run, "
                             f"in {cuda})") from None
        raise
    return ResolvedRun(resolved, name, source, kind, why, probes, rows, plan)


def format_run(run: ResolvedRun) -> str:
    """The resolved settings (two lines), then the plan (``format_plan``) or why there is none."""
    c = run.cfg
    init = "random init from its config" if c.random_init else run.source
    head = [f"run: {run.name} ({init}, {_KIND.get(run.kind, run.kind)}) on {c.device}, {c.dtype} ({run.why_dtype})",
            (f"  task {c.task}, batch {c.batch_size} x {c.max_length} tokens"
             + (f" ({run.rows} rows per probe)" if run.rows != c.batch_size else "") + f", {c.optimizer} with "
             f"{run.num_probes} probes per step, {c.steps} steps"
             + (f", peft {c.peft}" if c.peft != "none" else "") + (f", {c.quant} base" if c.quant != "none" else ""))]
    tail = format_plan(run.plan) if run.plan is not None else "  no --gpu-mem: the whole model stays on the device"
    return "\n".join([*head, tail])


__all__ = ["ResolvedRun", "auto_dtype", "build_optimizer", "device_type", "format_run", "plan_for", "resolve_run",
           "trained_sizes"]
