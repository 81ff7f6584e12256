"""``ZOTrainer``: a ``transformers.Trainer`` whose training step is a zoft zeroth-order step.

Everything but the step stays Trainer's: ``TrainingArguments`` (learning-rate schedule, logging,
evaluation and save strategies, ``report_to``, seeds), callbacks, datasets and collators,
``evaluate``, ``save_model``, ``push_to_hub``, checkpoints and ``resume_from_checkpoint``. What
changes, and why:

* **The step.** ``training_step`` is ``zoft.optim.step`` over a ``zoft.engine.ZOEngine``: the P
  probes of the zoft optimizer ``zo_optimizer`` (any name in ``zoft.optim.OPTIMIZERS``, options in
  ``zo_options``) run through the model's own ``forward`` in one pass, one loss per probe, and
  the seed-form update is queued on the engine. It is applied lazily as each unit next runs, and
  flushed before ``evaluate``/``predict``/``save_model`` and after the last step, so whatever
  reads the weights through Trainer sees them final. No backward runs and no ``.grad`` is written.
* **The loss** of probe p comes from the model outputs on p's rows, the way ``Trainer.compute_loss``
  takes it: ``compute_loss_func(outputs, labels, num_items_in_batch)`` when given, else the label
  smoother (``label_smoothing_factor``), else the model's own ``loss_function`` on ``labels`` (the
  ``loss`` ``model(**inputs)`` would return). Override ``zo_loss`` for anything else. When the
  ``zo_gpu_mem`` plan runs the LM head in chunks of positions (its ``head_chunk``: the full
  (P*R, T, V) logits do not fit), the model's own causal-LM loss is computed so, through
  ``zoft.tasks.head`` (the same mean, or sum over ``num_items_in_batch``, of the labelled tokens'
  next-token NLL); any other loss (``compute_loss_func``, label smoothing, a ``zo_loss`` override,
  a masked LM, a family whose logits are not head(backbone)) is planned with all logits at once.
* **The optimizer Trainer holds** is a ``ZOOptimizer``: a ``torch.optim.Optimizer`` over the
  trainable parameters that keeps no per-parameter state. Trainer's scheduler writes each step's
  lr into its param group and the ZO step reads it there, so ``learning_rate``,
  ``lr_scheduler_type`` and ``warmup_steps`` are Trainer's; ``weight_decay`` is the zoft
  optimizer's decoupled decay ``w <- (1 - lr wd) w`` (norms and biases excepted, as in MeZO). Its
  ``state_dict`` carries the zoft optimizer's own state (ZO-Adam moments, ...) into
  ``optimizer.pt``. Step t's probe seeds are a pure function of (``args.seed``, t) and Trainer
  restores t, the data position and the scheduler, so a resumed run continues the same trajectory.

With ``zo_gpu_mem`` the planner (``zoft.engine.plan``) places the model under that budget and
blocks that do not fit stream through the device (CUDA, or the CPU twin on a CPU run); the model
then stays where it was loaded (host memory) instead of being moved to ``args.device``.

One ZO step per batch, one process: ``gradient_accumulation_steps`` must be 1 (a larger
``per_device_train_batch_size`` averages more examples per step), ``fp16`` mixed precision
(loss scaling, a first-order device) is refused; ``bf16`` autocast works. The engine's hooks stay
on the model after training (``trainer.engine.close()`` removes them).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from transformers import Trainer

from zoft.engine import Streaming, ZOEngine
from zoft.errors import UsageError
from zoft.noise import default_noise, make_noise
from zoft.optim import make_optimizer, split_candidates, whole_z
from zoft.optim import step as zo_step
from zoft.tasks import Batch, infer_kind
from zoft.tasks.head import forward_hidden, num_rows, split_head
from zoft.tasks.lm import call_model, per_probe, token_nll

# zoft optimizer options that TrainingArguments owns: option -> the argument to set instead
_FROM_ARGS = {"lr": "learning_rate", "weight_decay": "weight_decay", "schedule": "lr_scheduler_type",
              "warmup_steps": "warmup_steps"}
# flash-attention metadata of padding-free (packed) batches, computed for the collated rows and
# wrong for P stacked copies: dropped, the model rebuilds each row's document mask from position_ids
_VARLEN = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class ZOOptimizer(torch.optim.Optimizer):
    """What Trainer holds as its optimizer: the trainable parameters in one group whose ``lr`` the
    scheduler sets, no per-parameter state, and a ``step`` that does nothing (``training_step``
    already queued the ZO update on the engine). ``state_dict`` adds the zoft optimizer's own
    state under ``"zoft"`` (scalars and its parameter-sized buffers, if it keeps any)."""

    def __init__(self, params, lr: float, zo: Any):
        super().__init__(list(params), {"lr": lr})
        self.zo = zo

    def step(self, closure=None):
        return None

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["zoft"] = {"name": self.zo.name, "state": self.zo.state_dict(), "tensors": self.zo.tensor_state()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        zo = sd.pop("zoft", None)
        super().load_state_dict(sd)
        if zo is not None:
            if zo["name"] != self.zo.name:
                raise UsageError(f"the checkpoint was trained with zo_optimizer='{zo['name']}', not "
                                 f"'{self.zo.name}'; resume with the original optimizer")
            self.zo.load_state_dict(zo["state"])
            self.zo.load_tensor_state(zo["tensors"])


class _ProbeLosses:
    """The engine's objective over one Trainer batch: the model on the batch's inputs (``use_cache``
    off for causal LMs), then ``loss_fn(outputs cut to probe p's rows)`` for each probe, shape (P,)."""

    def __init__(self, causal: bool, loss_fn, rows: int):
        self.causal, self.loss_fn, self.rows = causal, loss_fn, rows

    def forward(self, model: torch.nn.Module, batch: Batch) -> Any:
        return call_model(model, batch, self.causal)

    def loss(self, outputs: Any, batch: Batch, num_probes: int) -> torch.Tensor:
        parts = split_candidates(outputs, num_probes, self.rows)
        # not detached: forward-grad differentiates this (under the engine it runs without autograd)
        return torch.stack([self.loss_fn(o).float().reshape(()) for o in parts])  # (P,)


class _ChunkedCausalLoss:
    """The engine's objective for a plan with a head chunk: the model's causal-LM loss (Hugging
    Face's ``ForCausalLMLoss``: the next-token NLL of the labelled tokens, their mean, or their sum
    over ``num_items``) with the LM head run ``chunk`` positions at a time over all P*R rows
    (``zoft.tasks.head``), so no (P*R, T, V) logits exist. ``autocast``: the accelerator's
    mixed-precision context, entered here because accelerate applies it by wrapping
    ``model.forward``, which the backbone and head calls do not go through."""

    def __init__(self, chunk: int, num_items: Any, autocast):
        self.chunk, self.num_items, self.autocast = chunk, num_items, autocast

    def forward(self, model: torch.nn.Module, batch: Batch) -> Any:
        with self.autocast():
            return forward_hidden(model, batch.inputs, True, self.chunk)

    def loss(self, outputs: Any, batch: Batch, num_probes: int) -> torch.Tensor:
        labels = per_probe(batch.targets["labels"], num_rows(outputs) // num_probes, num_probes)
        with self.autocast():
            nll, count = token_nll(outputs, labels, num_probes)  # (P,) fp32 each
        return nll / (count if self.num_items is None else torch.as_tensor(self.num_items, device=nll.device))


# the planner's refusal names zoft's flags; ZOTrainer's arguments instead
_FLAG_ARGS = {"--gpu-mem": "zo_gpu_mem", "--batch-size": "per_device_train_batch_size", "--max-length": "zo_max_length"}
_NO_LABELS = ("the batch has no 'labels': give the collator labels, pass compute_loss_func=, "
              "or override ZOTrainer.zo_loss")


class ZOTrainingMixin:
    """The ZO step for any ``transformers.Trainer`` subclass (``ZOTrainer``, ``ZOSFTTrainer``);
    listed before the trainer class so its methods come first.

    zo_optimizer:    a name in ``zoft.optim.OPTIMIZERS`` ("mezo-sgd", "zo-adam", "zo-ranksgd", ...).
    zo_options:      that optimizer's config fields (eps, n_queries, one_sided, momentum, ...), but
                     not lr / weight_decay / schedule / warmup_steps (TrainingArguments has them).
    zo_noise, zo_distribution: the direction backend ("torch", "table", "triton") and distribution;
                     zo_noise "auto" (the default): ``zoft.noise.default_noise`` of ``args.device``, as
                     ``zoft finetune`` resolves ``--noise auto``, so both take the same steps.
    zo_gpu_mem:      stream under this device budget ("18GB" = 18e9 bytes, "16GiB" = 16 * 2^30); the
                     plan (``trainer.zo_plan``) is made for the optimizer's ``stateful``.
    zo_max_length:   tokens per row the planner sizes activations for (with ``zo_gpu_mem``;
                     default: ``args.max_length`` where the arguments have one, as TRL's do).
    """

    def __init__(self, *args, zo_optimizer: str = "mezo-sgd", zo_options: dict[str, Any] | None = None,
                 zo_noise: str = "auto", zo_distribution: str = "gaussian", zo_gpu_mem: str | int | None = None,
                 zo_max_length: int | None = None, **kwargs):
        self._zo_gpu_mem = zo_gpu_mem  # read by _move_model_to_device inside Trainer.__init__
        super().__init__(*args, **kwargs)
        a = self.args
        if a.gradient_accumulation_steps != 1:
            raise UsageError("ZOTrainer takes one ZO step per batch: set gradient_accumulation_steps=1 "
                             "(a larger per_device_train_batch_size averages more examples per step)")
        if a.world_size > 1:
            raise UsageError(f"ZOTrainer runs in one process (world size {a.world_size}); for data-parallel ZO "
                             "use zoft finetune --nproc")
        if a.fp16:
            raise UsageError("fp16=True mixes precisions with loss scaling for backward passes; ZO has none: "
                             "load the model in float16 (torch_dtype) or use bf16=True")
        if self.optimizer is not None or self.optimizer_cls_and_kwargs is not None:
            raise UsageError("ZOTrainer builds its own optimizer: pass zo_optimizer= and zo_options=, "
                             "not optimizers= or optimizer_cls_and_kwargs=")
        options = dict(zo_options or {})
        clash = sorted(set(options) & set(_FROM_ARGS))
        if clash:
            raise UsageError(f"zo_options {clash}: set {', '.join(_FROM_ARGS[k] for k in clash)} in "
                             "TrainingArguments instead (Trainer's scheduler drives the ZO step)")
        # constant schedule at the group's lr, re-read every step: Trainer's scheduler is the schedule
        # (total_steps is read by zoft's own schedules only)
        self.zo = make_optimizer(zo_optimizer, {**options, "lr": a.learning_rate, "weight_decay": a.weight_decay},
                                 seed=a.seed, total_steps=1)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._zo_base = base  # the transformers model under a peft wrapper: its loss_function, config
        self._zo_causal = infer_kind(base) == "causal"
        noise_name = default_noise(a.device) if zo_noise == "auto" else zo_noise
        try:
            noise = make_noise(noise_name, zo_distribution)
        except ValueError as e:
            raise UsageError(f"zo_noise: {e}") from None
        offload = None
        # the placement under zo_gpu_mem (``zoft.engine.plan.Plan``; None without one), planned
        # with the noise it runs (a device-resident table counts) and the optimizer's statefulness
        self.zo_plan = None
        if zo_gpu_mem is not None:
            self.zo_plan = self._zo_plan(zo_gpu_mem, zo_max_length, noise_name)
            offload = Streaming.from_plan(self.zo_plan, a.device)
        # positions per LM-head call of the loss: the plan's head chunk (None: all logits at once)
        self._zo_head_chunk = self.zo_plan.head_chunk if self.zo_plan is not None else None
        self.engine = ZOEngine(self.model, noise=noise, offload=offload)
        if not self.engine.params:
            raise UsageError("ZOTrainer: no parameter of the model requires grad, so nothing would train; "
                             "unfreeze some (requires_grad_) or add a peft adapter")
        self._zo_logs: dict[str, list[float]] = {}  # step metrics since the last log line

    def _zo_plan(self, gpu_mem, max_length: int | None, noise: str):
        from zoft.engine.plan import make_plan

        max_length = max_length or getattr(self.args, "max_length", None)  # TRL's SFTConfig has one
        if max_length is None:
            raise UsageError("zo_gpu_mem needs zo_max_length: the tokens per row the planner sizes "
                             "activations for")
        base = self._zo_base
        dtype = next(p.dtype for p in base.parameters() if p.dtype.is_floating_point)
        quant = "4bit" if getattr(base, "is_loaded_in_4bit", False) else (
            "8bit" if getattr(base, "is_loaded_in_8bit", False) else "none")
        chunkable = self._zo_chunkable()
        try:
            return make_plan(base.config, gpu_mem, batch_size=self.args.per_device_train_batch_size,
                             max_length=max_length, num_probes=self.zo.num_probes(), dtype=_DTYPES.get(dtype, "fp32"),
                             adapters=base is not self.model, quant=quant, noise=noise,
                             device="cuda" if self.args.device.type == "cuda" else "cpu", stateful=self.zo.stateful,
                             head_chunks=chunkable, whole_z=whole_z(self.zo))
        except UsageError as e:  # the planner names zoft's flags: name this trainer's arguments
            msg = str(e)
            for flag, arg in _FLAG_ARGS.items():
                msg = msg.replace(flag, arg)
            if not chunkable:
                msg += " (planned with all logits at once: this loss cannot run the LM head in chunks)"
            raise UsageError(msg) from None

    def _zo_chunkable(self) -> bool:
        """Whether the probes' loss can run the LM head in chunks of positions: it is the model's
        own causal-LM loss (no ``compute_loss_func``, label smoothing or ``zo_loss`` override) on
        a family whose logits are head(backbone) (``zoft.tasks.head.split_head``)."""
        if (type(self).zo_loss is not ZOTrainingMixin.zo_loss or self.compute_loss_func is not None
                or self.label_smoother is not None or getattr(self._zo_base, "loss_type", None) != "ForCausalLM"):
            return False
        try:
            split_head(self.model)
        except UsageError:
            return False
        return True

    # -- Trainer's placement and optimizer --------------------------------------------------
    def _move_model_to_device(self, model, device):
        if self._zo_gpu_mem is None:  # streamed: the scheduler places what stays on the device
            super()._move_model_to_device(model, device)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self._zo_gpu_mem is not None:
            self.accelerator.device_placement = False  # accelerate.prepare would move the whole model

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = ZOOptimizer(self.engine.params.values(), self.args.learning_rate, self.zo)
        return self.optimizer

    # -- the step ---------------------------------------------------------------------------
    def zo_loss(self, outputs: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """One probe's loss (a scalar) from the model ``outputs`` on that probe's rows, which are
        the rows of ``inputs`` (the collated batch, labels included). Override for a custom loss."""
        labels = inputs.get("labels")
        if self.compute_loss_func is not None:
            return self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        if labels is None:
            raise UsageError(_NO_LABELS)
        if self.label_smoother is not None:
            return self.label_smoother(outputs, labels, shift_labels=self._zo_causal)
        base = self._zo_base
        kw = {"num_items_in_batch": num_items_in_batch} if (
            self.model_accepts_loss_kwargs and num_items_in_batch is not None) else {}
        if getattr(base, "loss_type", None) in ("ForCausalLM", "ForMaskedLM"):
            return base.loss_function(logits=outputs.logits, labels=labels, vocab_size=base.config.vocab_size, **kw)
        if getattr(base, "loss_type", None) == "ForSequenceClassification":
            return base.loss_function(labels=labels, pooled_logits=outputs.logits, config=base.config)
        raise UsageError(f"ZOTrainer takes the loss of {type(base).__name__} (loss type "
                         f"{getattr(base, 'loss_type', None)!r}) from compute_loss_func= or an override of zo_loss")

    def zo_objective(self, inputs: dict[str, Any], num_items_in_batch: Any = None) -> tuple[Batch, _ProbeLosses]:
        """The engine's view of a collated batch (on the device): the model's inputs (all but
        ``labels``) as a ``zoft.tasks.Batch`` of R rows, and the objective giving ``zo_loss`` per
        probe (under a plan's head chunk: the causal-LM loss through the chunked head, the labels
        in the batch's targets); ``engine.evaluate(probes, *zo_objective(inputs))`` is the losses
        at any probes."""
        attention = str(getattr(self._zo_base.config, "_attn_implementation", ""))
        if "flash" in attention and any(k in inputs for k in _VARLEN):
            raise UsageError("packed padding-free batches stack P probe copies as rows, which flash attention "
                             "reads as one sequence each: load the model with attn_implementation='sdpa', "
                             "or turn off padding_free")
        model_inputs = {k: v for k, v in inputs.items() if k != "labels" and k not in _VARLEN}
        rows = next(v for v in model_inputs.values() if isinstance(v, torch.Tensor)).shape[0]
        if self._zo_head_chunk is not None:
            if inputs.get("labels") is None:
                raise UsageError(_NO_LABELS)
            items = num_items_in_batch if self.model_accepts_loss_kwargs else None
            objective = _ChunkedCausalLoss(self._zo_head_chunk, items, self.accelerator.autocast)
            return Batch(model_inputs, {"labels": inputs["labels"]}, rows), objective
        objective = _ProbeLosses(self._zo_causal, lambda out: self.zo_loss(out, inputs, num_items_in_batch), rows)
        return Batch(model_inputs, {}, rows), objective

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One ZO step on ``inputs`` at step ``state.global_step`` with the scheduler's lr;
        returns the loss (at the + probes, as ``zoft finetune`` logs it) on ``args.device``."""
        model.train()  # as Trainer does; the engine runs the probes in eval mode and restores it
        batch, objective = self.zo_objective(self._prepare_inputs(inputs), num_items_in_batch)
        t = self.state.global_step
        self.zo.config.lr = self.optimizer.param_groups[0]["lr"]  # this step's lr, from Trainer's scheduler
        res = zo_step(self.engine, self.zo, batch, objective, t)
        metrics = {k: float(v) for k, v in res.metrics.items() if k not in ("loss", "lr")}
        if self.engine.offload is not None:
            metrics["device_peak_bytes"] = self.engine.device_peak_bytes
        for k, v in metrics.items():
            self._zo_logs.setdefault(k, []).append(v)
        if t + 1 >= self.state.max_steps:  # the last step: what follows (best-model loading, the
            self.engine.flush()            # user's reads of trainer.model) sees the final weights
        return torch.tensor(res.metrics.get("loss", math.nan), device=self.args.device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's log line, plus the ZO step metrics since the last one (``projected_grad``: mean;
        ``device_peak_bytes``: max); ``grad_norm`` (of the absent ``.grad``, always 0) is dropped."""
        if "loss" in logs and self._zo_logs:
            logs.pop("grad_norm", None)
            for k, vs in self._zo_logs.items():
                logs[k] = max(vs) if k == "device_peak_bytes" else sum(vs) / len(vs)
            self._zo_logs = {}
        super().log(logs, start_time)

    # -- whatever reads the weights sees them final -----------------------------------------
    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        self.engine.flush()
        return out

    def evaluate(self, *args, **kwargs):
        self.engine.flush()
        return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        self.engine.flush()
        return super().predict(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        self.engine.flush()
        super().save_model(output_dir, _internal_call)


class ZOTrainer(ZOTrainingMixin, Trainer):
    """``transformers.Trainer`` with zoft's zeroth-order step (see the module docstring)::

        trainer = ZOTrainer(model=model, args=TrainingArguments("out", learning_rate=1e-6, max_steps=1000),
                            train_dataset=ds, data_collator=collator,
                            zo_optimizer="mezo-sgd", zo_options={"eps": 1e-3})
        trainer.train()
    """


__all__ = ["ZOOptimizer", "ZOTrainer", "ZOTrainingMixin"]
