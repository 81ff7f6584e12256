"""Robustness attacks on an unlearned model: weight quantization and relearning.

* ``quantize(path, mode)``: reload a ``save_pretrained`` folder quantized by bitsandbytes exactly as
  ``transformers`` does at load time (``BitsAndBytesConfig``): ``nf4`` / ``fp4`` (4-bit, blocks of
  64, compute dtype fp32 on CPU) or ``int8`` (LLM.int8(), threshold 6.0). Every ``nn.Linear`` but the
  LM head is replaced (transformers' default ``modules_to_not_convert``); embeddings stay fp32.
  Runs on CPU with bitsandbytes >= 0.45 (the ``quant`` extra). 4-bit layers keep the canonical layout
  on every CPU (``zoft.models.quant``): the attack measures the quantized weights under an fp32
  matmul, not bitsandbytes' bf16 CPU kernel, so it reads the same on every machine.
* ``relearn(model, tokenizer, rows, ...)``: AdamW fine-tuning on the first ``samples`` forget rows
  (the paper: lr 1e-5, a few dozen to ~150 steps); returns a new model, the input is untouched.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from zoft.errors import UsageError, ZoftError
from zoft.models.quant import import_bitsandbytes, keep_canonical_layout
from zoft.tasks.lm import call_model
from zoft.unlearn.data import batch_indices, make_batch
from zoft.unlearn.objectives import row_nll

QuantMode = Literal["nf4", "fp4", "int8"]
QUANT_MODES = ("nf4", "fp4", "int8")


def bnb_config(mode: QuantMode, compute_dtype: torch.dtype = torch.float32):
    """The ``BitsAndBytesConfig`` of ``mode``."""
    from transformers import BitsAndBytesConfig

    import_bitsandbytes("the quantization attack")
    if mode in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_compute_dtype=compute_dtype)
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UsageError(f"unknown quantization '{mode}'; use one of {', '.join(QUANT_MODES)}")


def quantize(path: str | os.PathLike, mode: QuantMode = "nf4", device: str = "cpu") -> nn.Module:
    """The model saved in ``path`` reloaded with bitsandbytes ``mode`` weights (eval mode)."""
    from transformers import AutoModelForCausalLM

    cfg = bnb_config(mode)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=cfg, device_map=device)
    except (OSError, RuntimeError, ValueError) as e:
        raise ZoftError(f"bitsandbytes {mode} load of '{path}' failed: {str(e).splitlines()[0]}") from None
    keep_canonical_layout(model)
    return model.eval()


def relearn(model: nn.Module, tokenizer: Any, rows: Sequence[Sequence[int]], *, lr: float = 1e-5, steps: int = 50,
            samples: int | None = None, batch_size: int = 4, weight_decay: float = 0.01, seed: int = 0) -> nn.Module:
    """A copy of ``model`` fine-tuned with AdamW on the forget rows (mean token NLL).

    rows: token rows of the forget set; the first ``samples`` (default all) are used, batches drawn
    by ``zoft.unlearn.data.batch_indices`` (deterministic in ``seed``). Dropout off."""
    if steps < 0 or lr < 0:
        raise UsageError("relearn steps and lr must be >= 0")
    rows = list(rows)[:samples] if samples else list(rows)
    if not rows:
        raise UsageError("relearn needs at least one forget sample")
    m = copy.deepcopy(model).eval().requires_grad_(True)
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=weight_decay)
    dev = next(m.parameters()).device
    for t in range(steps):
        idx = batch_indices(len(rows), min(batch_size, len(rows)), t, seed + 7)
        b = make_batch(tokenizer, [rows[i] for i in idx]).to(dev)
        with torch.enable_grad():
            nll, cnt = row_nll(call_model(m, b, causal=True).logits, b.targets["labels"])
            loss = nll.sum() / cnt.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return m.requires_grad_(False)
