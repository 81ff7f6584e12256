"""PEFT adapters (LoRA, prefix tuning) through Hugging Face ``peft``.

``apply_peft`` wraps a loaded model with ``peft.get_peft_model``: the base is frozen
(``requires_grad=False``) and only the adapter's parameters are trainable, so the engine, which
perturbs and updates exactly the parameters with ``requires_grad``, trains the adapter alone and
never writes the base. Adapters are saved with peft's own ``save_pretrained`` and load back with
``PeftModel.from_pretrained(base, directory)``.

MeZO's defaults: LoRA r=8, alpha=16 on the attention query/value projections (the target module
names come from peft's per-family table when the options give none); prefix tuning with 5
virtual tokens. The adapter's initial weights are a pure function of the run seed.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoft.errors import UsageError
from zoft.models.quant import quiet_import
from zoft.noise import mix

PEFT_METHODS = ("lora", "prefix")
_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    "prefix": {"num_virtual_tokens": 5},
}


def _peft():
    """The ``peft`` module. peft imports bitsandbytes when it is installed: quietly (``quiet_import``)."""
    quiet_import()
    import peft

    return peft


def _task_type(model: nn.Module) -> str | None:
    from zoft.models.loading import model_kind

    config = getattr(model, "config", None)
    return "CAUSAL_LM" if config is not None and model_kind(config) == "causal" else None


def peft_config(method: str, options: dict[str, Any] | None, model: nn.Module):
    """The ``peft`` config object of ``method`` with MeZO's defaults, overridden by ``options``."""
    peft = _peft()
    if method not in PEFT_METHODS:
        raise UsageError(f"--peft must be one of {', '.join(PEFT_METHODS)}, not '{method}'")
    kw = {"task_type": _task_type(model), **_DEFAULTS[method], **(options or {})}
    if method == "prefix" and kw["task_type"] is None:  # peft's prefix tuning hooks a task model's generation
        from zoft.models.loading import kind_phrase, model_kind

        raise UsageError(f"--peft prefix needs a causal LM; {type(model).__name__} is "
                         f"{kind_phrase(model_kind(model.config))}: use --peft lora on it")
    cls = peft.LoraConfig if method == "lora" else peft.PrefixTuningConfig
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise UsageError(f"peft_options for {method} (in the --config file): {e}") from None


def apply_peft(model: nn.Module, method: str, options: dict[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """``model`` wrapped as a ``peft.PeftModel`` with a fresh ``method`` adapter ("lora" or
    "prefix"); only the adapter's parameters have ``requires_grad``. The adapter's random init
    is drawn from ``seed`` (the global RNG is left as it was)."""
    cfg = peft_config(method, options, model)
    was_training = model.training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix(seed, f"peft/{method}/init"))
        try:
            with warnings.catch_warnings():
                # peft reads transformers' deprecated alias ``is_gradient_checkpointing`` of every model
                # it wraps; the FutureWarning is peft's to fix, and says nothing about this run
                warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                        category=FutureWarning)
                pm = _peft().get_peft_model(model, cfg)
        except ValueError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"--peft {method} cannot wrap {type(model).__name__}: {first}; "
                             "set target_modules under peft_options: in a --config file") from None
    pm.train(was_training)
    if not any(p.requires_grad for p in pm.parameters()):
        raise UsageError(f"--peft {method} added no trainable parameter to {type(model).__name__}")
    return pm


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy the adapter saved in ``directory`` (peft's ``save_pretrained``) into ``model``."""
    from safetensors.torch import load_file

    f = Path(directory) / "adapter_model.safetensors"
    if not f.is_file():
        raise UsageError(f"'{directory}' holds no adapter (adapter_model.safetensors expected)")
    res = _peft().set_peft_model_state_dict(model, load_file(str(f)))
    unexpected = list(getattr(res, "unexpected_keys", []))
    if unexpected:
        raise UsageError(f"adapter in '{directory}' does not match this model: unexpected keys {unexpected[:3]}")


def is_peft_model(model: nn.Module) -> bool:
    peft = sys.modules.get("peft")  # a model cannot be a PeftModel before peft is imported
    return peft is not None and isinstance(model, peft.PeftModel)


__all__ = ["PEFT_METHODS", "apply_peft", "is_peft_model", "load_adapter_weights", "peft_config"]
