"""Batched model calls for evaluation: token log-probabilities and greedy generation.

Everything here takes a Hugging Face causal LM and plain token-id lists, runs under
``torch.inference_mode()`` and returns Python/NumPy values on the CPU, so results do not depend on
the device. Sequences are sorted by length before batching (less padding) and returned in input
order. Log-probabilities are computed in float32 whatever the model dtype.
"""
from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer gives a length
_SEQLEN_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")


def model_max_length(model: Any, tokenizer: Any = None, default: int = DEFAULT_MAX_LENGTH) -> int:
    """Context length in tokens, resolved like lm-eval's HFLM.

    Order: ``config.text_config`` then ``config`` (``n_positions``, ``max_position_embeddings``,
    ``n_ctx``), then ``tokenizer.model_max_length`` unless it is the "unset" sentinel, then
    ``default``.
    """
    config = getattr(model, "config", None)
    for cfg in (getattr(config, "text_config", None), config):
        for attr in _SEQLEN_ATTRS:
            val = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(val, int) and val > 0:
                return val
    tml = getattr(tokenizer, "model_max_length", None)
    if isinstance(tml, int) and 0 < tml < 10**9:
        return tml
    return default


def pad_token_id(tokenizer: Any) -> int:
    """Id used to fill padded positions (never attended to, never scored)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def model_device(model: Any) -> torch.device:
    """Device of the model's input embedding (where input ids must go)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def _progress(total: int, desc: str, progress: bool | None):
    """tqdm bar on stderr; by default only when stderr is a terminal."""
    disable = not sys.stderr.isatty() if progress is None else not progress
    return tqdm(total=total, desc=desc, disable=disable, leave=False)


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of ``batch_size``, longest sequences first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _forward_right_padded(
    model: Any, seqs: list[list[int]], pad_id: int, keep_last: int | None = None
) -> torch.Tensor:
    """Logits for right-padded ``seqs``: (B, T', V) with T' = T or ``keep_last`` last positions.

    Right padding leaves every real token's position id unchanged (positions count from 0 at the
    first token), so the logits of real positions equal those of an unpadded forward.
    """
    dev = model_device(model)
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    kwargs: dict[str, Any] = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}
    if keep_last is not None and keep_last < T and _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep_last
    out = model(**kwargs, use_cache=False)
    return out.logits  # (B, T or keep_last, V)


def token_logprobs(
    model: Any,
    seqs: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool | None = None,
    desc: str = "log-probs",
) -> list[np.ndarray]:
    """Per-token log-probabilities of whole sequences.

    seqs: token-id lists, each of length n >= 2 (callers truncate to the context length).
    Returns one float64 array of length n-1 per sequence: entry i is log p(seq[i+1] | seq[:i+1])
    in nats (so the first token, usually BOS, is conditioned on and never scored).
    """
    seqs = [list(s) for s in seqs]
    for i, s in enumerate(seqs):
        if len(s) < 2:
            raise ValueError(f"sequence {i} has {len(s)} token(s); need >= 2 to score")
    out: list[np.ndarray | None] = [None] * len(seqs)
    bar = _progress(len(seqs), desc, progress)
    with torch.inference_mode():
        for idx in _batches([len(s) for s in seqs], batch_size):
            batch = [seqs[i] for i in idx]
            logits = _forward_right_padded(model, batch, pad_id)  # (B, T, V)
            for row, i in enumerate(idx):
                n = len(seqs[i])
                lp = torch.log_softmax(logits[row, : n - 1].float(), dim=-1)  # (n-1, V)
                tgt = torch.tensor(seqs[i][1:], device=lp.device).unsqueeze(-1)  # (n-1, 1)
                out[i] = lp.gather(-1, tgt).squeeze(-1).double().cpu().numpy()  # (n-1,)
            bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]


def continuation_logprobs(
    model: Any,
    requests: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    *,
    max_length: int,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool | None = None,
    desc: str = "log-likelihoods",
) -> list[np.ndarray]:
    """Summed log-likelihoods of candidate continuations, lm-eval's ``loglikelihood`` semantics.

    requests:   ``(context_ids, [cont_ids_0, cont_ids_1, ...])`` per item; every continuation has
                at least one token and the context at least one.
    max_length: model context length; like lm-eval, the model input is
                ``(context + cont)[-(max_length + 1):][:-1]`` (left truncation).
    Returns one float64 array per request (shape (C,), nats): sum over the continuation's tokens
    of log p(token | everything before it).

    Candidates of a request that differ only in their last token (" A".." D" are one token, or
    a shared space token plus the letter) share one model row, as lm-eval's one-token-continuation
    cache does: the row's input ``(context + cont)[-(max_length + 1):][:-1]`` is the same for all.
    """
    # Rows to run: (input ids, [(request, candidate, cont ids)]).
    rows: list[tuple[list[int], list[tuple[int, int, list[int]]]]] = []
    results = [np.zeros(len(conts), dtype=np.float64) for _, conts in requests]
    for r, (ctx, conts) in enumerate(requests):
        ctx = list(ctx)
        conts = [list(c) for c in conts]
        if not ctx or any(not c or len(c) > max_length for c in conts):
            raise ValueError(f"request {r}: empty context, or a continuation empty or over max_length")
        groups: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
        for j, c in enumerate(conts):
            groups.setdefault(tuple(c[:-1]), []).append((r, j, c))
        for prefix, members in groups.items():
            rows.append(((ctx + list(prefix))[-max_length:], members))

    bar = _progress(len(rows), desc, progress)
    with torch.inference_mode():
        for idx in _batches([len(r[0]) for r in rows], batch_size):
            seqs = [rows[i][0] for i in idx]
            T = max(len(s) for s in seqs)
            # Every continuation lies within the last `keep` positions of the padded batch.
            keep = T - min(len(s) - max(len(c) for _, _, c in rows[i][1]) for s, i in zip(seqs, idx))
            logits = _forward_right_padded(model, seqs, pad_id, keep_last=keep)  # (B, T', V)
            offset = T - logits.shape[1]  # absolute position of logits[:, 0]
            for row, i in enumerate(idx):
                n = len(rows[i][0])
                for r, j, cont in rows[i][1]:
                    k = len(cont)
                    # Predictions for the k continuation tokens sit at input positions n-k .. n-1.
                    sl = logits[row, n - k - offset : n - offset].float()  # (k, V)
                    lp = torch.log_softmax(sl, dim=-1)
                    tgt = torch.tensor(cont, device=lp.device).unsqueeze(-1)  # (k, 1)
                    results[r][j] = float(lp.gather(-1, tgt).sum())
            bar.update(len(idx))
    bar.close()
    return results


@dataclass
class Generation:
    """One greedy continuation.

    text:       decoded continuation (see :func:`decode`), cut before the first stop string.
    token_ids:  generated token ids, up to and excluding the first EOS (at most max_new_tokens).
    stopped:    "eos", "stop_string" or "length".
    truncated_prompt: True when the prompt was left-truncated to fit the context length.
    """

    text: str
    token_ids: list[int]
    stopped: str
    truncated_prompt: bool = False


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """Prefix of ``text`` before the earliest occurrence of any stop string (MUSE's
    ``get_prefix_before_words_occur``: splitting on each word in turn gives the same prefix)."""
    for s in stop_strings:
        text = text.split(s)[0]
    return text


def clean_up_tokenization(text: str) -> str:
    """The ``clean_up_tokenization_spaces=True`` rewrite of transformers 4.x (what the official
    MUSE code ran with). transformers 5 skips it for BPE tokenizers, so zoft applies it itself."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of ``ids`` as MUSE decodes it: special tokens skipped, tokenization spaces cleaned."""
    return clean_up_tokenization(
        tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    )


def _through_first_stop(tokenizer: Any, toks: list[int], stop_strings: Sequence[str]) -> list[int]:
    """Shortest prefix of ``toks`` whose text contains a stop string (drops the padding that
    ``generate`` appends to a row after it has stopped)."""
    for p in range(1, len(toks) + 1):
        text = decode(tokenizer, toks[:p])
        if any(s in text for s in stop_strings):
            return toks[:p]
    return toks


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _stop_criterion(tokenizer: Any, stop_strings: Sequence[str], prompt_len: int) -> Callable:
    from transformers import StoppingCriteria

    class _StopOnStrings(StoppingCriteria):
        """Per-row True once the decoded continuation contains a stop string.

        Stopping early cannot change the cut text: the cut keeps only what precedes the first
        stop string, and later tokens cannot change an already-decoded prefix.
        """

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            texts = [decode(tokenizer, row) for row in input_ids[:, prompt_len:].tolist()]
            done = [any(s in t for s in stop_strings) for t in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return _StopOnStrings()


def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    batch_size: int = 8,
    add_special_tokens: bool = True,
    max_length: int | None = None,
    progress: bool | None = None,
    desc: str = "generate",
) -> list[Generation]:
    """Greedy decoding of at most ``max_new_tokens`` tokens per prompt, batched with left padding.

    Prompts are encoded with ``add_special_tokens`` (BOS for Llama/OPT, as MUSE does). Decoding
    stops at the model's EOS, at ``max_new_tokens``, or once the decoded text contains a stop
    string (the returned text is then cut before it). A prompt longer than
    ``max_length - max_new_tokens`` tokens is left-truncated (the official code would fail on it).

    Batched greedy decoding matches one-at-a-time decoding up to float rounding of padded
    matmuls; ``batch_size=1`` reproduces the official unbatched loop exactly.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    max_length = max_length or model_max_length(model, tokenizer)
    budget = max(1, max_length - max_new_tokens)
    encoded, truncated = [], []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]
        truncated.append(len(ids) > budget)
        encoded.append(ids[-budget:])
    if any(truncated):
        log.warning("%d prompt(s) left-truncated to %d tokens to fit the context", sum(truncated), budget)

    pad = pad_token_id(tokenizer)
    eos = _eos_ids(model, tokenizer)
    dev = model_device(model)
    results: list[Generation | None] = [None] * len(encoded)
    bar = _progress(len(encoded), desc, progress)
    with torch.inference_mode():
        for idx in _batches([len(e) for e in encoded], batch_size):
            T = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), T), pad, dtype=torch.long)  # (B, T), left-padded
            mask = torch.zeros((len(idx), T), dtype=torch.long)  # (B, T)
            for row, i in enumerate(idx):
                n = len(encoded[i])
                ids[row, T - n:] = torch.tensor(encoded[i], dtype=torch.long)
                mask[row, T - n:] = 1
            # use_cache=True: zoft.models.load_model turns the KV cache off in the config.
            kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1,
                                      "pad_token_id": pad, "use_cache": True}
            if stop_strings:
                from transformers import StoppingCriteriaList

                kwargs["stopping_criteria"] = StoppingCriteriaList(
                    [_stop_criterion(tokenizer, stop_strings, T)]
                )
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kwargs)
            new = out[:, T:].tolist()  # (B, <= max_new_tokens)
            for row, i in enumerate(idx):
                toks = new[row]
                stopped = "length"
                for p, t in enumerate(toks):
                    if t in eos:
                        toks, stopped = toks[:p], "eos"
                        break
                raw = decode(tokenizer, toks)
                text = cut_at_stop_strings(raw, stop_strings)
                if stop_strings and text != raw:
                    stopped = "stop_string"
                    toks = _through_first_stop(tokenizer, toks, stop_strings)
                results[i] = Generation(text, toks, stopped, truncated[i])
            bar.update(len(idx))
    bar.close()
    return results  # type: ignore[return-value]
