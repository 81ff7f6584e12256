"""The training loop: data -> ZO step -> metrics, eval, checkpoints, resume, replay.

``finetune(TrainConfig(...))`` is the Python entry point of ``zoft finetune``. A run is fully
determined by its config: step t's batch and probe seeds are pure functions of (seed, t), so a
resumed run continues the same trajectory, and ``replay`` rebuilds the final weights from the
initial ones and ``trajectory.jsonl`` (kilobytes, not gigabytes).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import yaml

from zoft.checkpoint import (
    append_jsonl,
    claim_output_dir,
    find_checkpoint,
    plot_metrics,
    read_jsonl,
    save_checkpoint,
    truncate_jsonl,
)
from zoft.config import TrainConfig
from zoft.distributed import (
    DataParallel,
    init_distributed,
    is_launched_worker,
    launch_local,
    run_digest,
    weights_digest,
)
from zoft.engine import Streaming, Update, ZOEngine
from zoft.errors import UsageError, ZoftError
from zoft.models import LoadedModel, load_model
from zoft.models.adapters import apply_peft, load_adapter_weights
from zoft.noise import make_noise, mix
from zoft.optim import OPTIMIZERS, bind, evaluate_step, update_record
from zoft.resolve import build_optimizer, device_type, plan_for, resolve_run
from zoft.tasks import builtin_sentiment, kshot_sample, load_examples, make_task, mezo_sample

# Config keys that change the trajectory: a resumed run must keep them.
_TRAJECTORY_KEYS = ("model", "random_init", "task", "task_options", "train", "max_length", "optimizer", "lr",
                    "eps", "weight_decay", "n_queries", "one_sided", "schedule", "warmup_steps",
                    "optimizer_options", "noise", "distribution", "batch_size", "seed", "dtype", "trainable", "freeze",
                    "peft", "peft_options", "quant", "quant_options", "transfer",
                    "num_train", "num_dev", "objective", "k_shot")


@dataclass
class RunResult:
    """What ``finetune`` returns: the trained model (hooks removed), its tokenizer, the run
    directory, every metrics record, and the final held-out metrics (``eval_*`` keys)."""

    model: torch.nn.Module
    tokenizer: Any
    output_dir: Path
    metrics: list[dict[str, Any]]
    final_eval: dict[str, float]


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA device is visible; use --device cpu")
    return torch.device(device_type(device))


@lru_cache(maxsize=8)
def _epoch_perm(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(mix(seed, f"data/epoch/{epoch}"))
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of ``step``'s batch: consecutive slices of per-epoch permutations."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, i = divmod(pos + len(out), n)
        take = min(batch_size - len(out), n - i)
        out.extend(_epoch_perm(n, seed, epoch)[i:i + take])
    return out


def _load_data(cfg: TrainConfig, task) -> tuple[list[dict], list[dict] | None]:
    if cfg.train is None:
        if cfg.task != "sst2":
            raise UsageError(f"--task {cfg.task} needs --train FILE")
        train, evals = builtin_sentiment("train"), builtin_sentiment("eval")
        if cfg.eval is not None:
            evals = load_examples(cfg.eval)
    else:
        train = load_examples(cfg.train)
        evals = load_examples(cfg.eval) if cfg.eval else None
    task.validate(train)
    if evals is not None:
        task.validate(evals)
        if cfg.eval_limit:
            evals = evals[: cfg.eval_limit]
    return list(train), (list(evals) if evals is not None else None)


def _mezo_splits(cfg: TrainConfig, task, train: list[dict], evals: list[dict] | None):
    """(train, dev, test): MeZO's seeded draw when ``cfg.num_train`` is set, k rows per label for
    train and dev with ``cfg.k_shot`` (``--eval`` is then the test set), else as given."""
    if cfg.k_shot is not None:
        label = getattr(task, "label_field", None)
        if label is None:
            raise UsageError(f"--k-shot needs a classification task with labels, not {cfg.task!r}")
        return (*kshot_sample(train, label, cfg.k_shot, cfg.seed), evals)
    if cfg.num_train is None:
        return train, None, evals
    return mezo_sample(train, evals, cfg.num_train, cfg.num_dev, cfg.num_eval, cfg.seed)


def _task_options(cfg: TrainConfig) -> dict[str, Any]:
    if cfg.objective == "loss":
        return dict(cfg.task_options)
    return {**cfg.task_options, "objective": cfg.objective}


def _load(cfg: TrainConfig, device: torch.device, checkpoint: Path | None) -> LoadedModel:
    """The model to train: the initial weights, or the checkpoint's. With ``cfg.peft`` the base always
    comes from ``cfg.model`` (it is never written), wrapped with a seed-determined adapter init that
    the checkpoint's adapter (peft's ``save_pretrained`` layout) then overwrites. With ``cfg.quant``
    the base is quantized again as it loads (same weights, same config: the same packed bytes)."""
    if checkpoint is None or cfg.peft != "none":
        lm = load_model(cfg.model, random_init=cfg.random_init, dtype=cfg.dtype, device=device,
                        seed=cfg.seed, tokenizer=cfg.tokenizer, quant=cfg.quant, quant_options=cfg.quant_options)
        if cfg.peft != "none":
            lm.model = apply_peft(lm.model, cfg.peft, cfg.peft_options, seed=cfg.seed)
            if checkpoint is not None:
                load_adapter_weights(lm.model, checkpoint)
        return lm
    lm = load_model(str(checkpoint), dtype=cfg.dtype, device=device, tokenizer=cfg.tokenizer)
    lm.name = cfg.model or lm.name
    return lm


def _check_max_length(cfg: TrainConfig, lm: LoadedModel) -> None:
    """Refuse a ``--max-length`` beyond the model's positions (its config's context length)."""
    from zoft.eval.generate import model_max_length

    limit = model_max_length(lm.model, default=0)
    if limit and cfg.max_length > limit:
        raise UsageError(f"--max-length {cfg.max_length} is beyond {lm.name}'s {limit} positions; "
                         f"give --max-length {limit} or less")


def select_trainable(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """With ``cfg.trainable`` only parameters whose names contain one of its entries are trained;
    then those containing a ``cfg.freeze`` entry are frozen. Frozen means ``requires_grad=False``:
    never perturbed nor written. One-line refusals: a pattern that matches no parameter name,
    nothing left to train."""
    for what, patterns in (("trainable", cfg.trainable), ("freeze", cfg.freeze)):
        if patterns and not any(s in n for n, _ in model.named_parameters() for s in patterns):
            raise UsageError(f"--{what} {','.join(patterns)} matches no parameter name")
    for n, p in model.named_parameters():
        if cfg.trainable and not any(s in n for s in cfg.trainable):
            p.requires_grad_(False)
        if any(s in n for s in cfg.freeze):
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError("nothing to train: every parameter is frozen (--trainable "
                         f"{','.join(cfg.trainable) or '(all)'}, --freeze {','.join(cfg.freeze) or '(none)'}); "
                         "leave some parameter names out of --freeze")


def build_engine(cfg: TrainConfig, model: torch.nn.Module, num_probes: int = 2,
                 device: torch.device | None = None, plan: Any = None) -> ZOEngine:
    """The engine over ``model``, training what ``select_trainable`` leaves trainable. With
    ``cfg.gpu_mem`` the planner places the model under that budget for ``num_probes`` probes of
    ``cfg.batch_size x cfg.max_length`` and blocks that do not fit stream through ``device`` (CUDA,
    or the CPU twin on ``cpu``)."""
    select_trainable(cfg, model)
    offload = None
    if cfg.gpu_mem is not None:
        offload = Streaming.from_plan(plan or plan_for(cfg, num_probes), device or resolve_device(cfg.device))
    return ZOEngine(model, noise=make_noise(cfg.noise, cfg.distribution), offload=offload)


class Trainer:
    """One fine-tuning run. ``run()`` trains, evaluates and checkpoints; see ``finetune``."""

    def __init__(self, cfg: TrainConfig):
        # data-parallel under torchrun / --nproc (docs/distributed.md); world size 1 otherwise
        self.dist = init_distributed(cfg, resolve_device(cfg.device))
        self.dist.hint = f"the last checkpoint in '{cfg.output_dir}' continues with --resume (any number of ranks)"
        created = not Path(cfg.output_dir).exists()
        try:
            with self.dist.agree("setting up the run"):  # one rank's bad input stops every rank at once
                self._setup(cfg)
        except BaseException:
            if created and self.dist.is_main and Path(cfg.output_dir).is_dir() \
                    and not any(Path(cfg.output_dir).iterdir()):
                Path(cfg.output_dir).rmdir()  # refused before writing anything: leave no trace
            raise
        if self.dist.world_size > 1:  # same config, data and starting weights everywhere, or stop now
            same = {k: v for k, v in cfg.to_dict().items() if k not in ("progress", "nproc", "dist_timeout")}
            self.dist.check_identical(run_digest(same, self.train, self.model),
                                      "the ranks' configs, training examples or starting weights",
                                      "start every rank with the same flags, files and checkpoint")

    def _setup(self, cfg: TrainConfig) -> None:
        # every default ("auto" device and dtype, probes) and the plan, as --dry-run prints them;
        # streamed runs are planned (or refused) here, before anything is written or loaded
        run = resolve_run(cfg)
        self.cfg = cfg = run.cfg
        main = self.dist.is_main  # rank 0 alone checks and writes the run directory
        self.out = claim_output_dir(cfg.output_dir, "--output-dir", run=True, resume=cfg.resume) if main \
            else Path(cfg.output_dir)
        self.device = resolve_device(cfg.device)
        ckpt = find_checkpoint(self.out) if cfg.resume else None
        self.state: dict[str, Any] = {"step": 0, "nan_streak": 0, "metrics_lines": 0, "trajectory_lines": 0}
        if cfg.resume:
            if ckpt is None:
                raise UsageError(f"nothing to resume in '{self.out}' (no checkpoint); drop --resume to start a new run")
            self.state = json.loads((ckpt / "state.json").read_text())
            if main:
                self._check_resume_config()
        # streamed: planned (or refused) by resolve_run, loaded on the host; the scheduler then
        # moves the resident units to the device
        self.plan = run.plan
        lm = _load(cfg, torch.device("cpu") if cfg.gpu_mem else self.device, ckpt)
        if lm.tokenizer is None:
            raise UsageError(f"no tokenizer is available offline for '{lm.name}'; pass --tokenizer PATH")
        self.model, self.tokenizer, self.kind = lm.model, lm.tokenizer, lm.kind
        _check_max_length(cfg, lm)
        options = _task_options(cfg)
        if getattr(self.plan, "head_chunk", None) is not None:  # the plan runs the LM head in chunks
            options["head_chunk"] = self.plan.head_chunk
        self.task = make_task(cfg.task, self.tokenizer, self.kind, cfg.max_length, **options)
        self.train, self.dev, self.evals = _mezo_splits(cfg, self.task, *_load_data(cfg, self.task))
        if self.dev is not None and self.dist.world_size > 1:
            raise UsageError("--num-dev (best-dev checkpoint selection) runs on one process for now; drop --nproc")
        if cfg.batch_size > len(self.train):
            raise UsageError(f"--batch-size {cfg.batch_size} is more than the {len(self.train)} training examples "
                             "(each step would repeat examples); give --batch-size "
                             f"{len(self.train)} or less")
        self.opt = build_optimizer(cfg)
        self.dp = DataParallel(self.dist, self.opt) if self.dist.world_size > 1 else None
        if self.dp is not None:
            self.opt = self.dp.opt  # the whole step's optimizer (all ranks' queries); its state is saved
        self.engine = build_engine(cfg, self.model, (self.dp or self.opt).num_probes(), self.device,
                                   None if self.dp else self.plan)
        bind(self.opt, self.engine)
        self.opt.load_state_dict(self.state.get("optimizer", {}))
        if ckpt is not None and (ckpt / "optimizer.safetensors").is_file():
            from safetensors.torch import load_file

            # on the host: the engine brings a buffer to its parameter's device on first use, and
            # those of streamed parameters stay on the host between steps
            self.opt.load_tensor_state(load_file(str(ckpt / "optimizer.safetensors"), device="cpu"))
        self._moved = (0, 0)  # link bytes (host to device, device to host) already in a record
        self.metrics_path = self.out / "metrics.jsonl"
        self.traj_path = self.out / "trajectory.jsonl"
        self.metrics: list[dict[str, Any]] = []
        if not main:
            return
        if cfg.resume:
            truncate_jsonl(self.metrics_path, self.state["metrics_lines"])
            truncate_jsonl(self.traj_path, self.state["trajectory_lines"])
        else:
            for p in (self.metrics_path, self.traj_path):
                p.unlink(missing_ok=True)
        resolved = cfg.to_dict() | {"resume": False}
        (self.out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        self.metrics = read_jsonl(self.metrics_path)

    def _check_resume_config(self) -> None:
        """Resume continues the checkpointed trajectory or refuses: the trajectory keys are kept;
        ``--steps`` may not fall below the checkpoint's step, and may grow only under a constant
        schedule (a decaying one spreads its decay over ``--steps``: a new total would change the
        learning rate of the steps already taken)."""
        done, steps = self.state["step"], self.cfg.steps
        if steps < done:
            raise UsageError(f"--resume with --steps {steps}, but the checkpoint in '{self.out}' is at step {done}; "
                             f"give --steps {done} or more")
        saved_path = self.out / "config.yaml"
        if not saved_path.exists():
            return
        saved = yaml.safe_load(saved_path.read_text()) or {}
        now = self.cfg.to_dict()
        # a shared optimizer flag left unset (None) is the optimizer's default: the same run as that value
        defaults = {f.name: f.default for f in dataclasses.fields(OPTIMIZERS[self.cfg.optimizer][0])} \
            if self.cfg.optimizer in OPTIMIZERS else {}
        for d in (saved, now):
            for k in ("lr", "eps", "weight_decay", "one_sided"):
                if k in d and d[k] is None and k in defaults:
                    d[k] = defaults[k]
        changed = [k for k in _TRAJECTORY_KEYS if k in saved and saved[k] != now[k]]
        if changed:
            raise UsageError(f"--resume with a different {changed[0]} ({saved[changed[0]]!r} -> {now[changed[0]]!r}) "
                             "would not continue the same trajectory; use the original value")
        schedule = self.cfg.optimizer_options.get("schedule", self.cfg.schedule)
        if schedule != "constant" and saved.get("steps", steps) != steps:
            raise UsageError(f"--resume with --steps {steps} under --schedule {schedule}: the learning rate decays over "
                             f"--steps, so a new total would change it at every step; resume with --steps "
                             f"{saved['steps']} (only --schedule constant runs can be extended)")

    # -- records ----------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            append_jsonl(self.metrics_path, record)
        self.metrics.append(record)
        self.state["metrics_lines"] += 1

    def _evaluate(self, step: int) -> dict[str, float]:
        if self.dev is not None and step > 0:
            return self._evaluate_dev(step)
        if not self.evals:
            return {}
        self.engine.flush()
        t0 = time.perf_counter()
        res = self.task.evaluate(self.model, self.evals, self.cfg.eval_batch_size)
        rec = {f"eval_{k}": v for k, v in res.items()}
        self._log({"step": step, **rec, "eval_time_s": time.perf_counter() - t0})
        return rec

    # -- MeZO's protocol: keep the best dev checkpoint, report the test score there ----------
    def _trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _evaluate_dev(self, step: int) -> dict[str, float]:
        """Dev metrics (``dev_*``); the trainable weights go to ``best.safetensors`` when they beat
        every earlier dev evaluation (lowest loss, or highest score with ``--select-by score``)."""
        from safetensors.torch import save_file

        t0 = time.perf_counter()
        with self.engine.paused():  # flushed; streamed blocks' parameters are their host masters
            res = self.task.evaluate(self.model, self.dev, self.cfg.eval_batch_size)
            score = res["loss"] if self.cfg.select_by == "loss" else -next(v for k, v in res.items() if k != "loss")
            best = self.state.get("best")
            improved = best is None or score < best["score"]
            if improved:
                tmp = self.out / ".best.safetensors.tmp"
                save_file({n: p.detach().to("cpu").contiguous() for n, p in self._trainable().items()}, str(tmp))
                os.replace(tmp, self.out / "best.safetensors")
                self.state["best"] = {"step": step, "score": score}
        rec = {f"dev_{k}": v for k, v in res.items()}
        self._log({"step": step, **rec, "best": improved, "eval_time_s": time.perf_counter() - t0})
        return rec

    def _test_at_best(self) -> dict[str, float]:
        """Load the best dev checkpoint's weights into the model and evaluate the test set there."""
        from safetensors.torch import load_file

        best = self.state["best"]
        saved = load_file(str(self.out / "best.safetensors"))
        with self.engine.paused(), torch.no_grad():
            for n, p in self._trainable().items():
                p.copy_(saved[n])
            t0 = time.perf_counter()
            res = self.task.evaluate(self.model, self.evals, self.cfg.eval_batch_size) if self.evals else {}
        rec = {f"eval_{k}": v for k, v in res.items()}
        self._log({"step": self.cfg.steps, "best_step": best["step"], **rec, "eval_time_s": time.perf_counter() - t0})
        return rec

    def _save(self, step: int, verify: bool = True) -> None:
        self.engine.flush()
        if verify and self.dist.world_size > 1:  # all ranks hold bit-identical weights, or nothing is written
            self.dist.check_identical(weights_digest(self.model), f"the trained weights at step {step}")
        if not self.dist.is_main:
            return
        self.state.update(step=step, optimizer=self.opt.state_dict(), device_type=self.device.type)
        save_checkpoint(self.out, self.model, self.tokenizer, self.state, tensors=self.opt.tensor_state())
        try:
            plot_metrics(self.metrics, self.out / "loss.png")
        except OSError as e:
            print(f"zoft: could not draw loss.png: {e}", file=sys.stderr)

    # -- the loop ---------------------------------------------------------------------
    def step(self, step: int) -> dict[str, Any]:
        """One ZO step: returns the metrics record (already logged)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        if self.device.type == "cuda":  # cuda_max_allocated_bytes is this step's peak
            torch.cuda.reset_peak_memory_stats(self.device)
        dp = self.dp  # data-parallel: this rank's shard and probes, one all-gather (zoft/distributed.py)
        idx = batch_indices(len(self.train), dp.global_batch(cfg.batch_size) if dp else cfg.batch_size, step, cfg.seed)
        idx = dp.shard(idx) if dp else idx
        # a large-batch step (MeZO-SVRG's anchor): its examples in pieces of --batch-size (the
        # memory of a regular step), evaluated one after another with the same probes
        big = getattr(self.opt, "anchor_examples", None)
        big = big(step, len(self.train)) if big is not None and dp is None else None
        if big is not None:
            idx = big
            batch = [self.task.collate([self.train[i] for i in big[j:j + cfg.batch_size]]).to(self.device)
                     for j in range(0, len(big), cfg.batch_size)]
        else:
            batch = self.task.collate([self.train[i] for i in idx]).to(self.device)
        if dp is None:
            losses = evaluate_step(self.engine, self.opt, step, batch, self.task)  # every phase (zo-sgd-cons: 2)
        else:
            losses = dp.evaluate(self.engine, step, batch, self.task)  # every rank's losses, rank-major
        if torch.isfinite(losses).all():
            upd, m = (dp or self.opt).update(step, losses)
            self._check_update(step, upd)
            self.state["nan_streak"] = 0
            skipped = False
        else:
            upd, m = Update(), {"loss": float("nan"), "projected_grad": float("nan"), "lr": self.opt.lr(step)}
            self.state["nan_streak"] += 1
            skipped = True
        self.engine.set_update(upd)
        if self.dist.is_main:
            append_jsonl(self.traj_path, {"step": step, **update_record(upd), **(dp.record(losses) if dp else {})})
        self.state["trajectory_lines"] += 1
        rec = {"step": step, **m, "step_time_s": time.perf_counter() - t0,
               "examples": dp.examples(len(idx)) if dp else len(idx)}
        if dp is not None:
            rec.update(world_size=self.dist.world_size, comm_bytes=dp.comm_bytes())
        if self.engine.offload is not None:
            rec["device_peak_bytes"] = self.engine.device_peak_bytes
            # bytes over the link since the previous step's record (an eval's or a checkpoint's
            # flush counts in the step after it)
            st = self.engine.offload.stats
            rec["h2d_bytes"], rec["d2h_bytes"] = st.upload_bytes - self._moved[0], st.writeback_bytes - self._moved[1]
            self._moved = (st.upload_bytes, st.writeback_bytes)
        if self.device.type == "cuda":
            rec["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        if skipped:
            rec["skipped"] = True
        self._log(rec)
        return rec

    def _check_update(self, step: int, upd: Update) -> None:
        """Stop (one line, before anything is applied or recorded) at an update whose coefficient or
        learning rate the trained weights' dtype cannot hold: the axpy would fail or write inf."""
        dtype = next(p.dtype for p in self.model.parameters() if p.requires_grad)
        worst = max([abs(c) for _, c in upd.terms] + [abs(getattr(upd, "lr", 0.0))], default=0.0)
        if not worst <= torch.finfo(dtype).max:
            raise ZoftError(f"step {step}: an update coefficient of {worst:.3g} overflows the "
                            f"{str(dtype).removeprefix('torch.')} weights "
                            f"(largest {torch.finfo(dtype).max:.3g}); lower --lr (now {self.opt.config.lr:g})")

    def run(self) -> RunResult:
        from tqdm.auto import tqdm

        cfg = self.cfg
        start = self.state["step"]
        if start == 0 and not any("eval_loss" in m or "eval_accuracy" in m for m in self.metrics):
            self._evaluate(0)
        bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and self.dist.is_main), desc="zoft",
                   dynamic_ncols=True,
                   file=sys.stderr)
        ema = None
        step = start
        every = cfg.eval_every or (max(1, cfg.steps // 5) if self.dev is not None else 0)  # MeZO: 1/5
        try:
            for step in range(start, cfg.steps):
                rec = self.step(step)
                if self.state["nan_streak"] >= cfg.max_nan_steps:
                    self._save(step + 1)
                    raise ZoftError(f"loss was NaN/inf for {cfg.max_nan_steps} steps in a row (last at step {step}); "
                                    "updates were skipped and a checkpoint saved; lower --lr or --eps, or use --dtype fp32")
                if not rec.get("skipped"):
                    ema = rec["loss"] if ema is None else 0.9 * ema + 0.1 * rec["loss"]
                bar.set_postfix(loss=f"{ema:.4f}" if ema is not None else "nan",
                                ex_s=f"{rec['examples'] / rec['step_time_s']:.1f}", refresh=False)
                bar.update(1)
                done = step + 1
                if every and done % every == 0 and done < cfg.steps:
                    ev = self._evaluate(done)
                    if ev:
                        bar.write("step %d: %s" % (done, ", ".join(f"{k}={v:.4f}" for k, v in ev.items())))
                if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                    self._save(done)
        except KeyboardInterrupt:
            bar.close()
            self.state["step"] = step  # the interrupted step is redone on resume
            self._save(step, verify=False)  # peers may be gone: no collective
            raise ZoftError(f"interrupted at step {step}; checkpoint saved in '{self.out}'; continue with --resume") from None
        bar.close()
        # a finished run resumed has nothing left to do: its final eval lines stand (not logged twice)
        finished = start == cfg.steps and any(m.get("step") == cfg.steps and any(k.startswith("eval_") for k in m)
                                              for m in self.metrics)
        final = _final_eval(self.metrics, cfg.steps) if finished else self._evaluate(cfg.steps)
        self._save(cfg.steps)  # the last step's weights (resume, replay)
        if self.dev is not None and not finished:
            final = self._test_at_best()  # the returned model holds the best dev checkpoint's weights
        self.engine.close()
        self.dist.close()
        return RunResult(self.model, self.tokenizer, self.out, self.metrics, final)


def finetune(config: TrainConfig | dict[str, Any]) -> RunResult:
    """Fine-tune with zeroth-order steps; see ``TrainConfig`` for every option.

    >>> from zoft import finetune, TrainConfig
    >>> res = finetune(TrainConfig(model="facebook/opt-125m", task="sst2", steps=1000, lr=1e-6,
    ...                            output_dir="runs/opt125m-sst2"))           # doctest: +SKIP
    >>> res.final_eval["eval_accuracy"]                                       # doctest: +SKIP
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if cfg.nproc > 1 and not is_launched_worker() and "WORLD_SIZE" not in os.environ:
        return _finetune_local_ranks(cfg)
    return Trainer(cfg).run()


def _finetune_local_ranks(cfg: TrainConfig) -> RunResult:
    """``nproc`` > 1 from Python or the CLI: run the ranks as worker processes (``launch_local``),
    then return rank 0's result as read back from the run directory (the checkpoint's model)."""
    code = launch_local(cfg)
    if code:
        raise (UsageError if code == 2 else ZoftError)(f"the {cfg.nproc} ranks stopped (exit {code}); their "
                                                        "errors are above")
    out = Path(cfg.output_dir)
    ran = TrainConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text()))  # as resolved by the ranks
    lm = _load(ran, torch.device("cpu"), find_checkpoint(out))
    return RunResult(lm.model, lm.tokenizer, out, *read_run(out, cfg.steps))


def read_run(run_dir: str | os.PathLike, steps: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """A finished run's metrics records and its final held-out metrics (the eval line at ``steps``)."""
    metrics = read_jsonl(Path(run_dir) / "metrics.jsonl")
    return metrics, _final_eval(metrics, steps)


def _final_eval(metrics: list[dict[str, Any]], steps: int) -> dict[str, float]:
    """The held-out metrics of the eval line at ``steps`` ({} when there is none)."""
    last = next((m for m in reversed(metrics) if m.get("step") == steps and any(k.startswith("eval_") for k in m)), {})
    return {k: v for k, v in last.items() if k.startswith("eval_") and k != "eval_time_s"}


def replay(run_dir: str | os.PathLike, output: str | os.PathLike | None = None, device: str | None = None,
           merge: bool = False):
    """Rebuild a run's checkpointed weights from its initial weights and ``trajectory.jsonl``.

    Returns the model; with ``output`` also writes it (and the tokenizer) with ``save_pretrained``
    (for a ``--peft`` run: the adapter, loadable with ``PeftModel.from_pretrained``; with ``merge``,
    a LoRA adapter is folded into the base and the plain merged model is returned and written). Bit-identical to the checkpoint on the device type the run used (``state.json``).
    """
    run = Path(run_dir)
    if not (run / "config.yaml").is_file() or not (run / "trajectory.jsonl").is_file():
        raise UsageError(f"'{run}' is not a zoft run directory (config.yaml and trajectory.jsonl expected)")
    out = claim_output_dir(output, "--output", run=False) if output is not None else None
    cfg = TrainConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    if merge and cfg.quant != "none":
        raise UsageError(f"--merge of a --quant {cfg.quant} run would re-quantize the merged weights (lossy); "
                         "replay without --merge and load the adapter onto the quantized base")
    ckpt = find_checkpoint(run)
    state = json.loads((ckpt / "state.json").read_text()) if ckpt else {}
    dev = resolve_device(device or state.get("device_type", "cpu"))
    # with --peft: the base plus the adapter's seed-determined init; streamed runs load on the host
    lm = _load(cfg, torch.device("cpu") if cfg.gpu_mem else dev, None)
    records = read_jsonl(run / "trajectory.jsonl", state.get("trajectory_lines"))
    opt = build_optimizer(cfg)  # stateful optimizers rebuild each update (and their buffers) from its record
    # replay runs no forward to hide re-applied updates behind: stream with write-back every update
    # (the weights are the same for any interval)
    cfg.writeback_every = 1
    engine = build_engine(cfg, lm.model, opt.num_probes(), dev)
    bind(opt, engine)
    for r in records:
        engine.set_update(opt.update_from_record(r))
    engine.close()
    if merge:
        if cfg.peft != "lora":
            raise UsageError(f"--merge needs a --peft lora run; '{run}' is --peft {cfg.peft}")
        lm.model = lm.model.merge_and_unload()
    if out is not None:  # written beside, then renamed onto the empty directory: all or nothing
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            lm.model.save_pretrained(tmp, safe_serialization=True)
            if lm.tokenizer is not None:
                lm.tokenizer.save_pretrained(tmp)
            os.chmod(tmp, out.stat().st_mode & 0o7777)  # mkdtemp's 0700 -> the claimed directory's mode
            os.replace(tmp, out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ZoftError(f"could not write the replayed model to '{out}': {e.strerror or e}") from None
    return lm.model


__all__ = ["RunResult", "Trainer", "batch_indices", "build_optimizer", "finetune", "plan_for", "replay",
           "resolve_device"]

