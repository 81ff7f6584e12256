"""``zoft.unlearn.unlearn``: the unlearning loop, its run directory, resume and the robustness report.

Run directory (``output_dir``)::

    config.yaml        the resolved UnlearnConfig
    metrics.jsonl      one line per step ({"step", "phase", "loss", "lr", ...}); eval lines carry eval_ keys
    checkpoint/        model + tokenizer + state.json + optimizer.safetensors (atomic, zoft.checkpoint)
    config.json, model.safetensors, tokenizer files: the unlearned model (save_pretrained)
    loss.png           the training curve
    robustness.{md,json,png}   stages: original, unlearned, unlearned+<attack>

Resume (``resume=True``) reloads the *initial* model from ``model`` (the reference of NPO / RMU is
the initial model), then the checkpoint's weights and optimizer state, and continues the same
batches and ZO seeds (both pure functions of the seed and the step).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoft.checkpoint import (
    append_jsonl,
    find_checkpoint,
    plot_metrics,
    read_jsonl,
    save_checkpoint,
    truncate_jsonl,
)
from zoft.errors import UsageError, ZoftError
from zoft.unlearn.config import RELEARN_DEFAULTS, TRAJECTORY_KEYS, UnlearnConfig
from zoft.unlearn.data import UnlearnData, tokenize_rows
from zoft.unlearn.objectives import make_objective
from zoft.unlearn.optimizers import Runner, parse_optimizer_options
from zoft.unlearn.report import Evaluator, make_evaluator, write_report


@dataclass
class UnlearnResult:
    model: nn.Module  # the unlearned model (plain Hugging Face model, engine hooks removed)
    tokenizer: Any
    history: list[dict[str, Any]]  # metrics.jsonl records
    stages: dict[str, dict[str, float]]  # evaluation per stage (original, unlearned, attacks)
    output_dir: Path | None


def _resolve_config(config: UnlearnConfig | dict | str | os.PathLike | None, overrides: dict) -> UnlearnConfig:
    if isinstance(config, UnlearnConfig):
        base = config.to_dict()
    elif isinstance(config, dict):
        base = dict(config)
    elif config is None:
        base = {}
    else:
        from zoft.config import load_config_file

        base = load_config_file(str(config))
    return UnlearnConfig.from_dict({**base, **overrides})


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available")
    return torch.device(name)


def select_trainable(model: nn.Module, names: list[str] | None, patterns: list[str]) -> list[str]:
    """Set ``requires_grad`` on the parameters to update: those whose names contain one of
    ``patterns`` (user choice), else exactly ``names`` (the objective's default), else all."""
    all_names = [n for n, _ in model.named_parameters()]
    for s in patterns:
        if not any(s in n for n in all_names):
            raise UsageError(f"--params entry '{s}' matches no parameter name")
    chosen = []
    for n, p in model.named_parameters():
        on = any(s in n for s in patterns) if patterns else (names is None or n in names)
        p.requires_grad_(on and p.dtype.is_floating_point)
        if on:
            chosen.append(n)
    return chosen


def _load_weights(model: nn.Module, ckpt: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(ckpt.glob("*.safetensors"))
    files = [f for f in files if f.name != "optimizer.safetensors"]
    if not files:
        raise ZoftError(f"checkpoint '{ckpt}' holds no model weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    _missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise ZoftError(f"checkpoint '{ckpt}' does not match the model (unexpected {unexpected[:3]})")


def unlearn(config: UnlearnConfig | dict | str | os.PathLike | None = None, *, model: nn.Module | str | None = None,
            tokenizer: Any = None, forget: Any = None, retain: Any = None,
            evaluators: dict[str, Evaluator] | None = None,
            callback: Callable[[dict[str, Any]], None] | None = None, **overrides: Any) -> UnlearnResult:
    """Unlearn ``forget`` from ``model`` while keeping ``retain``.

    config:     an ``UnlearnConfig``, a dict of its keys, or a YAML/TOML recipe path; ``overrides``
                (same keys) win over it.
    model:      alias / directory / hub id (also ``config.model``) or an ``nn.Module`` (then pass
                ``tokenizer``; on resume pass the same *initial* module again).
    forget, retain: data files or lists of strings (also ``config.forget`` / ``config.retain``).
    evaluators: extra ``name -> fn(model, tokenizer) -> {metric: float}`` hooks, run with the built-in
                evaluation every ``eval_every`` steps and on every stage of the report.
    callback:   called with every metrics record (e.g. for a notebook's live plot).

    Returns ``UnlearnResult(model, tokenizer, history, stages, output_dir)``.
    """
    if isinstance(model, str):
        overrides["model"] = model
    if isinstance(forget, (str, os.PathLike)):
        overrides["forget"] = str(forget)
    if isinstance(retain, (str, os.PathLike)):
        overrides["retain"] = str(retain)
    cfg = _resolve_config(config, overrides)
    return Unlearner(cfg, model if isinstance(model, nn.Module) else None, tokenizer,
                     forget if isinstance(forget, (list, tuple)) else None,
                     retain if isinstance(retain, (list, tuple)) else None, evaluators or {}, callback).run()


class Unlearner:
    """One unlearning run (see ``unlearn``)."""

    def __init__(self, cfg: UnlearnConfig, module: nn.Module | None, tokenizer: Any, forget_list, retain_list,
                 evaluators: dict[str, Evaluator], callback):
        self.cfg, self.callback, self.hooks = cfg, callback, evaluators
        self.out = Path(cfg.output_dir)
        ckpt = find_checkpoint(self.out) if cfg.resume else None
        if cfg.resume and ckpt is None:
            raise UsageError(f"nothing to resume in '{self.out}' (no checkpoint); drop --resume to start a new run")
        if not cfg.resume and (find_checkpoint(self.out) or (self.out / "metrics.jsonl").exists()):
            raise UsageError(f"'{self.out}' already holds a run; pass --resume to continue it or choose another --output-dir")
        if cfg.resume:
            self._check_resume()
        forget_src = forget_list if forget_list is not None else cfg.forget
        if forget_src is None:
            raise UsageError("no forget data: pass --forget FILE")
        retain_src = retain_list if retain_list is not None else cfg.retain
        self.objective = make_objective(cfg.objective, cfg.objective_options)
        self.opt_options = parse_optimizer_options(cfg.optimizer, cfg.optimizer_options)
        self.device = _device(cfg.device)
        if module is not None:
            if tokenizer is None:
                raise UsageError("a model object needs its tokenizer: unlearn(model=m, tokenizer=tok, ...)")
            self.model = module if cfg.gpu_mem else module.to(self.device)
        else:
            if cfg.model is None:
                raise UsageError("no model: pass --model NAME")
            from zoft.models.loading import kind_phrase, load_model

            # streamed (--gpu-mem): loaded on the host; the engine moves the resident units
            lm = load_model(cfg.model, random_init=cfg.random_init, dtype=cfg.dtype,
                            device=torch.device("cpu") if cfg.gpu_mem else self.device,
                            seed=cfg.seed, tokenizer=cfg.tokenizer)
            if lm.kind != "causal":
                raise UsageError(f"unlearning needs a causal language model; '{cfg.model}' is {kind_phrase(lm.kind)}")
            self.model, tokenizer = lm.model, tokenizer or lm.tokenizer
            if tokenizer is None:
                raise UsageError(f"no tokenizer found for '{cfg.model}'; pass --tokenizer")
        self.tokenizer = tokenizer
        if getattr(self.model.config, "use_cache", None):
            self.model.config.use_cache = False
        self.model.eval()
        kw = {"max_length": cfg.max_length, "txt_mode": cfg.txt_mode, "text_field": cfg.text_field}
        self.forget_rows = tokenize_rows(tokenizer, forget_src, **kw)
        self.retain_rows = tokenize_rows(tokenizer, retain_src, **kw) if retain_src is not None else None
        self.data = UnlearnData(tokenizer, self.forget_rows, self.retain_rows, cfg.batch_size,
                                cfg.retain_batch_size, cfg.seed)
        self.evaluator = make_evaluator(cfg.eval, forget_rows=self.forget_rows, retain_rows=self.retain_rows,
                                        data=cfg.eval_data, options=cfg.eval_options)
        self.trainable = select_trainable(self.model, self.objective.trainable_default(self.model), cfg.params)
        self.objective.setup(self.model)  # the reference is the initial model, also on resume
        self.state: dict[str, Any] = {"step": 0, "metrics_lines": 0, "stages": {}}
        self.metrics_path = self.out / "metrics.jsonl"
        if ckpt is not None:
            self.state = json.loads((ckpt / "state.json").read_text())
            _load_weights(self.model, ckpt)
            truncate_jsonl(self.metrics_path, self.state["metrics_lines"])
        import yaml

        self.out.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to be good
        (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict() | {"resume": False}, sort_keys=False))
        self.runner = Runner(cfg.optimizer, self.model, self.objective, cfg.lr, cfg.steps, self.opt_options,
                             seed=cfg.seed, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps, gpu_mem=cfg.gpu_mem,
                             batch_rows=cfg.batch_size + (cfg.retain_batch_size or cfg.batch_size),
                             max_length=cfg.max_length, device=str(self.device))
        if ckpt is not None:
            tensors = {}
            if (ckpt / "optimizer.safetensors").is_file():
                from safetensors.torch import load_file

                tensors = load_file(str(ckpt / "optimizer.safetensors"))
            self.runner.load(self.state.get("optimizer", {}), tensors)

    def _check_resume(self) -> None:
        import yaml

        p = self.out / "config.yaml"
        if not p.is_file():
            raise UsageError(f"'{self.out}' has no config.yaml to resume from")
        saved = yaml.safe_load(p.read_text()) or {}
        now = self.cfg.to_dict()
        for k in TRAJECTORY_KEYS:
            if k in saved and saved[k] != now[k] and not (isinstance(now[k], tuple) and list(now[k]) == saved[k]):
                raise UsageError(f"--resume with a different {k} ({saved[k]!r} -> {now[k]!r}) would not continue "
                                 "the same run; use the original value")

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.evaluator is not None:
            out.update(self.evaluator(model, self.tokenizer))
        for name, fn in self.hooks.items():
            out.update({f"{name}/{k}" if not k.startswith(name) else k: float(v) for k, v in fn(model, self.tokenizer).items()})
        return out

    def _log(self, rec: dict[str, Any]) -> None:
        append_jsonl(self.metrics_path, rec)
        self.state["metrics_lines"] += 1
        if self.callback is not None:
            self.callback(rec)

    def _save(self) -> None:
        self.runner.flush()
        self.state["optimizer"] = self.runner.state_dict()
        save_checkpoint(self.out, self.model, self.tokenizer, self.state, tensors=self.runner.tensor_state())

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> UnlearnResult:
        cfg = self.cfg
        want_report = self.evaluator is not None or bool(self.hooks)
        if want_report and "original" not in self.state["stages"]:
            self.state["stages"]["original"] = self.evaluate(self.model)
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.state["step"], desc=f"unlearn {cfg.objective}/{cfg.optimizer}")
        start = self.state["step"]
        try:
            for t in range(start, cfg.steps):
                t0 = time.perf_counter()
                batch = self.objective.prepare(self.data.batch(t, self.objective.uses_retain).to(self.device))
                rec = {"step": t, **self.runner.step(t, batch), "time_s": time.perf_counter() - t0}
                self.state["step"] = t + 1
                self._log(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}" if rec.get("loss") is not None else "nan", phase=rec["phase"])
                if cfg.eval_every and (t + 1) % cfg.eval_every == 0 and t + 1 < cfg.steps and want_report:
                    self.runner.flush()
                    self._log({"step": t + 1, **{f"eval_{k}": v for k, v in self.evaluate(self.model).items()}})
                if cfg.save_every and (t + 1) % cfg.save_every == 0 and t + 1 < cfg.steps:
                    self._save()
        except KeyboardInterrupt:
            self._save()
            raise ZoftError(f"interrupted at step {self.state['step']}; checkpoint saved in '{self.out}'; "
                            "continue with --resume") from None
        finally:
            if bar is not None:
                bar.close()
        self.runner.flush()
        self._save()
        stages = dict(self.state["stages"])
        if want_report:  # while the engine is open: streamed blocks still stream through the device
            stages["unlearned"] = self.evaluate(self.model)
        self.runner.close()  # a streamed model is whole on the host from here (one device)
        self.model.save_pretrained(self.out, safe_serialization=True)
        self.tokenizer.save_pretrained(self.out)
        history = read_jsonl(self.metrics_path)
        if history:
            plot_metrics(history, self.out / "loss.png")
        if want_report:
            stages.update(self.attack_stages())
            meta = {"model": cfg.model or type(self.model).__name__, "objective": cfg.objective,
                    "optimizer": cfg.optimizer, "steps": cfg.steps, "lr": cfg.lr, "seed": cfg.seed,
                    "eval": cfg.eval, "attacks": list(cfg.attacks), "objective_options": cfg.objective_options,
                    "optimizer_options": cfg.optimizer_options, "attack_options": self.relearn_options()}
            write_report(self.out, stages, meta)
        return UnlearnResult(self.model, self.tokenizer, history, stages, self.out)

    def relearn_options(self) -> dict[str, Any]:
        return {**RELEARN_DEFAULTS, **self.cfg.attack_options}

    def attack_stages(self) -> dict[str, dict[str, float]]:
        """Evaluate the unlearned model (saved in ``output_dir``) after each attack."""
        from zoft.unlearn.attacks import quantize, relearn

        out = {}
        for a in self.cfg.attacks:
            if a == "relearn":
                o = self.relearn_options()
                m = relearn(self.model, self.tokenizer, self.forget_rows, lr=o["relearn_lr"], steps=o["relearn_steps"],
                            samples=o["relearn_samples"], batch_size=o["relearn_batch_size"],
                            weight_decay=o["relearn_weight_decay"], seed=self.cfg.seed)
            else:
                m = quantize(self.out, a, device="cpu" if self.device.type == "cpu" else str(self.device))
            out[f"unlearned+{a}"] = self.evaluate(m)
            del m
        return out


def save_temp(model: nn.Module) -> tempfile.TemporaryDirectory:
    """``model`` saved (save_pretrained) in a temporary folder (for quantizing an in-memory model)."""
    d = tempfile.TemporaryDirectory(prefix="zoft-unlearn-")
    model.save_pretrained(d.name, safe_serialization=True)
    return d
