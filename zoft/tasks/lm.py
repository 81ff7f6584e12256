"""Causal language modelling on raw text: the loss Hugging Face's ``*ForCausalLM`` computes.

Also holds the few token helpers the classification task shares (padding, model calls,
per-probe views of repeated targets).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from zoft.errors import UsageError
from zoft.models.loading import kind_phrase
from zoft.tasks.base import Batch
from zoft.tasks.data import check_fields, where
from zoft.tasks.head import IGNORE, HiddenOutputs, check_head_chunk, forward_hidden, labelled_nll, logits_of, num_rows


def makes_token_types(tokenizer) -> bool:
    """Whether the tokenizer emits token_type_ids (BERT-style). Only encoders get them: causal
    LMs either reject them or, like GPT-2, add an embedding for them."""
    return "token_type_ids" in tokenizer("a")


def pad_rows(tokenizer, rows: Sequence[Sequence[int]], token_types: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad token lists into model inputs.

    Returns input_ids (R, T) and attention_mask (R, T) (1 on tokens, 0 on padding), plus
    token_type_ids (R, T) of zeros if ``token_types`` (single-segment inputs).
    """
    pad = tokenizer.pad_token_id
    if pad is None:  # GPT-2/Llama have none; the padded positions are masked anyway
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)  # (R, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)  # (R, T)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


def pad_labels(rows: Sequence[Sequence[int]], T: int) -> torch.Tensor:
    """Label lists right-padded with ``IGNORE`` to (R, T)."""
    out = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def per_probe(t: torch.Tensor, rows: int, num_probes: int) -> torch.Tensor:
    """``t`` for all P*rows rows: ``t`` may already be repeated (P*rows on dim 0) or not (rows)."""
    if t.shape[0] == rows * num_probes:
        return t
    if t.shape[0] != rows:
        raise ValueError(f"target has {t.shape[0]} rows; expected {rows} or {rows * num_probes}")
    return torch.cat([t] * num_probes, dim=0)


def option_logprob(logits: torch.Tensor | HiddenOutputs, labels: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of each row's labelled tokens (MeZO's candidate score), fp32, (R,).

    logits (R, T, V), or ``HiddenOutputs`` (through the head in chunks of the labelled positions);
    labels (R, T) aligned with the inputs: the token ids that are scored, ``IGNORE`` elsewhere
    (token t+1 is predicted at position t). Every row needs a labelled token.
    """
    if isinstance(logits, HiddenOutputs):
        nll, count = labelled_nll(logits, labels)
        return -nll / count
    target = labels[:, 1:]  # (R, T-1)
    row, pos = (target != IGNORE).nonzero(as_tuple=True)  # (N,) scored tokens
    logp = logits[row, pos].float().log_softmax(-1)  # (N, V), only where needed
    tok_logp = logp.gather(1, target[row, pos][:, None]).squeeze(1)  # (N,)
    total = torch.zeros(logits.shape[0], device=logits.device).index_add_(0, row, tok_logp)
    return total / (target != IGNORE).sum(1)  # (R,)


def token_nll(logits: torch.Tensor | HiddenOutputs, labels: torch.Tensor,
              num_probes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL (P,) and number of predicted tokens (P,) of each probe's rows.

    logits (P*R, T, V), or ``HiddenOutputs`` (through the head in chunks of positions); labels
    (P*R, T) aligned with the inputs, ``IGNORE`` where nothing is predicted (Hugging Face's
    causal-LM convention)."""
    P = num_probes
    if isinstance(logits, HiddenOutputs):
        nll, count = labelled_nll(logits, labels)  # (P*R,), (P*R,)
        return nll.view(P, -1).sum(1), count.view(P, -1).sum(1)
    # Position t predicts token t+1: shift the labels, not the logits (no copy of (P*R, T, V)).
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (P*R, T)
    nll = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(),
                          ignore_index=IGNORE, reduction="none")  # (P*R*T,)
    return nll.view(P, -1).sum(1), (target != IGNORE).view(P, -1).sum(1)  # (P,), (P,)


def call_model(model: torch.nn.Module, batch: Batch, causal: bool, head_chunk: int | None = None) -> Any:
    """``model(**batch.inputs)``; causal LMs without the KV cache (a shared cache object would
    leak one probe's keys into the next, and the loss never needs it). With ``head_chunk``: the
    backbone alone, its final hidden state and the head (``zoft.tasks.head.HiddenOutputs``) for
    a loss that runs the head ``head_chunk`` positions at a time."""
    if head_chunk is not None:
        return forward_hidden(model, batch.inputs, causal, head_chunk)
    if causal:
        return model(**batch.inputs, use_cache=False)
    return model(**batch.inputs)


def model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def eval_outputs(task: Any, model: torch.nn.Module, examples: list[dict], batch_size: int, collate=None):
    """Yield ``(batch, outputs)`` for consecutive slices of ``examples`` (plain forward, no autograd,
    model in eval mode; batches from ``collate``, default ``task.collate``); the model's
    train/eval mode is restored when the loop ends."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                batch = (collate or task.collate)(examples[i : i + batch_size]).to(device)
                yield batch, task.forward(model, batch)
    finally:
        model.train(was_training)


class LMTask:
    """Next-token NLL on ``{"text": ...}`` examples for causal LMs.

    One row per example, right-padded, truncated to ``max_length`` tokens (keeping the
    start). Per-probe loss = mean token NLL over that probe's rows, exactly what Hugging Face's
    causal-LM loss gives for the same sub-batch.
    """

    name = "lm"

    def __init__(self, tokenizer, kind: str, max_length: int, text_field: str = "text", head_chunk: int | None = None):
        if kind != "causal":
            raise UsageError(f"task 'lm' needs a causal language model, not {kind_phrase(kind)}; "
                             "use task 'sst2' or 'classify' for masked LMs and encoders")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.text_field = text_field
        self.head_chunk = check_head_chunk(head_chunk)  # positions per head call (None: all logits at once)

    def validate(self, examples: list[dict]) -> None:
        f = self.text_field
        check_fields(examples, [f])
        for i, ex in enumerate(examples):
            if not isinstance(ex[f], str) or not ex[f].strip():
                raise UsageError(f"{where(examples, i)}: field {f!r} must be non-empty text, "
                                 f"got {ex[f]!r}")
        lengths = [len(ids) for ids in self._encode(examples)]
        for i, n in enumerate(lengths):
            if n < 2:
                raise UsageError(f"{where(examples, i)}: {f!r} is {n} token long; language "
                                 "modelling needs at least 2 tokens (one to predict from)")

    def _encode(self, examples: list[dict]) -> list[list[int]]:
        texts = [ex[self.text_field] for ex in examples]
        enc = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.max_length)
        return enc["input_ids"]

    def collate(self, examples: list[dict]) -> Batch:
        """inputs: input_ids, attention_mask (B, T); targets: labels (B, T), -100 on padding."""
        rows = self._encode(examples)
        inputs = pad_rows(self.tokenizer, rows)
        labels = pad_labels(rows, inputs["input_ids"].shape[1])  # (B, T)
        return Batch(inputs, {"labels": labels}, size=len(examples))

    def forward(self, model: torch.nn.Module, batch: Batch) -> Any:
        return call_model(model, batch, causal=True, head_chunk=self.head_chunk)

    def token_nll(self, outputs: Any, batch: Batch, num_probes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL (P,) and number of predicted tokens (P,) of each probe's rows."""
        logits = logits_of(outputs)  # (P*B, T, V) or the hidden state and the head
        labels = per_probe(batch.targets["labels"], num_rows(logits) // num_probes, num_probes)  # (P*B, T)
        return token_nll(logits, labels, num_probes)

    def loss(self, outputs: Any, batch: Batch, num_probes: int) -> torch.Tensor:
        """Mean token NLL of each probe, shape (P,)."""
        nll, count = self.token_nll(outputs, batch, num_probes)
        return nll / count

    def evaluate(self, model: torch.nn.Module, examples: list[dict], batch_size: int) -> dict[str, float]:
        """Token-weighted mean NLL over all examples, and its exp (perplexity)."""
        nll_sum, tokens = 0.0, 0
        for batch, outputs in eval_outputs(self, model, examples, batch_size):
            nll, count = self.token_nll(outputs, batch, 1)
            nll_sum += nll.item()
            tokens += int(count.item())
        loss = nll_sum / tokens
        return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}
