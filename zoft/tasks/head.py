"""Losses through the LM head in chunks of positions: the head never holds all logits.

A task's logits are ``head(backbone(**inputs).last_hidden_state)`` for every family in
``HEAD_FAMILIES`` (read in each family's ``forward`` in transformers): the backbone is
``model.base_model`` (Hugging Face's public property: the body named by ``base_model_prefix``,
which ends with the final norm and OPT-350m's ``project_out``) and the head is the model's
top-level child holding ``get_output_embeddings()``: the layout's head unit (``lm_head``; BERT's
``cls`` with its dense + LayerNorm transform). Tied or untied makes no difference: the head is
called as the module it is, so the engine's hooks perturb it as in a full forward.

With ``head_chunk = c`` a task calls the backbone alone (``forward_hidden``) and its loss passes the
final hidden state (N, T, H) through the head ``c`` positions at a time. Every head call takes all
N = P*R rows (probe-major), so the engine's split rule (dim 0 a multiple of N) gives each probe
its own perturbed head; only the positions a loss reads go through it (each row's labelled
tokens, packed to the left: a candidate's few tokens, not the prompt; a masked LM's mask
position). The head's transient is then one chunk's logits and the loss's temporaries
(``head_chunk_bytes``), not (N, T, V). ``head_chunk = None`` is the model's own forward (all
logits at once, as before). A unit called several times per step is handled by the engine: the
pending update is applied once, and each call perturbs the head again, making its z again (tied or
untied: no z is kept between calls), which is the time chunking costs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoft.errors import UsageError

IGNORE = -100  # label of positions that carry no loss (Hugging Face convention)

# Families whose forward computes ``head(base_model(...).last_hidden_state)`` and nothing after
# the head (no logit scaling or soft-capping): checked in transformers' modeling files, tested
# chunked == full in tests/test_head.py.
HEAD_FAMILIES = frozenset({"opt", "llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "bloom", "bert"})


def check_head_chunk(head_chunk: Any) -> int | None:
    """``head_chunk`` as given (None, or positions per head call >= 1), else ``UsageError``."""
    if head_chunk is None:
        return None
    if isinstance(head_chunk, bool) or not isinstance(head_chunk, int) or head_chunk < 1:
        raise UsageError(f"head_chunk must be a positive number of positions (or none), not {head_chunk!r}")
    return head_chunk


def head_chunk_bytes(rows: int, chunk: int, vocab: int, dtype_bytes: int, *, hidden: int, length: int) -> int:
    """Peak bytes a chunked loss adds beyond the final hidden state, with no autograd (a ZO step).

    rows: N = P*R rows of the step; chunk: positions per head call; vocab: V; dtype_bytes: the
    compute dtype's (logits come out of the head in it); hidden: H (the head's input width);
    length: T, positions per row. Per position of a chunk (N * chunk of them):

    - logits: at the head's exit under the engine, the P per-probe outputs and their
      concatenation (2 * dtype_bytes * V); then the loss's fp32 copy of 2-byte logits beside them
      (dtype_bytes + 4 per element; fp32/fp64 logits are used in place): ``V * max(2b, b + 4)``;
    - the head's input gathered for the chunk and a transform's activations (BERT's ``cls``):
      ``4 * H * b``;
    - per-position fp32/int64 scalars of the loss (target, max, sum, NLL): 64.

    Plus, for the whole loss, the packed index of the labelled positions: 40 bytes per row
    position (N * T). Measured on the CPU by counting live storages (tests/test_head.py).
    """
    b = dtype_bytes
    per_position = vocab * max(2 * b, b + (4 if b < 4 else 0)) + 4 * hidden * b + 64
    return rows * chunk * per_position + 40 * rows * length


@dataclass(frozen=True)
class HeadSplit:
    """backbone: ``base_model`` (inputs -> ``last_hidden_state`` (N, T, H)); head: (N, t, H) -> (N, t, V)."""

    backbone: nn.Module
    head: nn.Module


def split_head(model: nn.Module) -> HeadSplit:
    """The backbone and the head of ``model`` (a ``*ForCausalLM`` / ``*ForMaskedLM`` of
    ``HEAD_FAMILIES``, possibly under a peft LoRA adapter), else ``UsageError``."""
    hf = model
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        if model.active_peft_config.is_prompt_learning:
            raise UsageError("head_chunk: prompt/prefix tuning adds its virtual tokens in peft's own forward; "
                             "run it without head_chunk")
        hf = model.get_base_model()  # LoRA layers sit inside the model's own modules
    family = getattr(getattr(hf, "config", None), "model_type", "")
    if family not in HEAD_FAMILIES:
        raise UsageError(f"head_chunk: {type(hf).__name__} ({family or 'no model_type'}) is not among the families "
                         f"whose logits are head(backbone): {', '.join(sorted(HEAD_FAMILIES))}; run it without "
                         "head_chunk")
    backbone = hf.base_model
    try:
        out = hf.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        out = None
    head = next((c for c in hf.children() if c is not backbone and out is not None
                 and any(m is out for m in c.modules())), None)
    if backbone is hf or head is None:
        raise UsageError(f"head_chunk: {type(hf).__name__} has no LM head beside its backbone; run it without head_chunk")
    return HeadSplit(backbone, head)


@dataclass
class HiddenOutputs:
    """What a task's forward returns under ``head_chunk``: the final hidden state and the head.

    hidden: (N, T, H) in the compute dtype; head: the module mapping (N, t, H) -> (N, t, V);
    chunk: positions per head call."""

    hidden: torch.Tensor
    head: nn.Module
    chunk: int


def forward_hidden(model: nn.Module, inputs: dict[str, torch.Tensor], causal: bool, chunk: int) -> HiddenOutputs:
    """The backbone's final hidden state on ``inputs`` (causal LMs without the KV cache)."""
    split = split_head(model)
    out = split.backbone(**inputs, use_cache=False) if causal else split.backbone(**inputs)
    return HiddenOutputs(out.last_hidden_state, split.head, chunk)


def logits_of(outputs: Any) -> torch.Tensor | HiddenOutputs:
    """The logits (N, T, V) of a model's outputs, or the ``HiddenOutputs`` standing for them."""
    return outputs if isinstance(outputs, HiddenOutputs) else outputs.logits


def num_rows(logits: torch.Tensor | HiddenOutputs) -> int:
    return logits.hidden.shape[0] if isinstance(logits, HiddenOutputs) else logits.shape[0]


def _nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] in fp32: logits (N, c, V), target (N, c) -> (N, c).

    Without autograd the exponentials are taken in place in the fp32 logits (no (N, c, V)
    temporary beyond them); with autograd (first-order steps) it is plain cross-entropy."""
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    del logits  # 2-byte logits: freed once their fp32 copy exists (the caller holds no reference)
    if torch.is_grad_enabled():
        return F.cross_entropy(x.flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
    picked = x.gather(-1, target[..., None]).squeeze(-1)  # (N, c)
    top = x.amax(-1, keepdim=True)  # (N, c, 1)
    lse = x.sub_(top).exp_().sum(-1).log_()  # (N, c): log sum exp(x - top)
    return lse.add_(top.squeeze(-1)).sub_(picked)


def labelled_nll(out: HiddenOutputs, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL (N,) fp32 and labelled-token count (N,) of each row, through the
    head ``out.chunk`` labelled positions at a time (all N rows per call).

    labels (N, T) aligned with the inputs, ``IGNORE`` where nothing is predicted; position t
    predicts token t+1. Each row's labelled positions are packed to the left (K = the most any
    row has), so a loss over a few candidate tokens sends K positions, not T, through the head."""
    hidden, N = out.hidden, out.hidden.shape[0]
    target = labels[:, 1:]  # (N, T-1): target of position t
    keep = target != IGNORE
    count = keep.sum(1)  # (N,)
    K = int(count.max()) if N else 0
    pos = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :K]  # (N, K) labelled first
    valid = keep.gather(1, pos)  # (N, K)
    tgt = target.gather(1, pos).masked_fill_(~valid, 0)  # (N, K)
    del keep
    total = torch.zeros(N, device=hidden.device)
    H = hidden.shape[-1]
    for k0 in range(0, K, out.chunk):
        k1 = min(k0 + out.chunk, K)
        x = hidden.gather(1, pos[:, k0:k1, None].expand(-1, -1, H))  # (N, c, H)
        nll = _nll(out.head(x), tgt[:, k0:k1])  # (N, c) fp32: the head's logits live only in here
        total = total + (nll * valid[:, k0:k1]).sum(1)
    return total, count


def logits_at(logits: torch.Tensor | HiddenOutputs, pos: torch.Tensor) -> torch.Tensor:
    """Each row's logits (N, V) at one position ``pos`` (N,): through the head for that position
    alone under ``HiddenOutputs`` (a (N, 1, H) call), else read from the full logits."""
    hidden = logits.hidden if isinstance(logits, HiddenOutputs) else logits
    pos = pos.to(hidden.device)
    rows = torch.arange(pos.shape[0], device=hidden.device)
    if isinstance(logits, HiddenOutputs):
        return logits.head(hidden[rows, pos][:, None])[:, 0]  # (N, 1, H) -> (N, 1, V): all N rows
    return logits[rows, pos]
