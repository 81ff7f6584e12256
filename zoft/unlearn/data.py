"""Forget / retain data: files -> token rows -> deterministic (forget, retain) batches.

Accepted sources (``load_texts``):

* ``.txt``  a raw corpus (MUSE ``raw/forget.txt`` ...): ``txt_mode="chunk"`` (default) tokenizes the
  whole file and cuts it into consecutive windows of ``max_length`` tokens (MUSE's own unlearning
  code does this, with 2048-token windows); ``"lines"``: one example per non-empty line.
* ``.json`` a list of strings (MUSE ``privleak/*.json``) or of objects with ``text_field``.
* ``.jsonl`` one string or object with ``text_field`` per line (the WMDP corpora: bio-forget-corpus
  lines are ``{"title", "abstract", "text", "doi"}``, cyber corpora ``{"text"}``).
* a Python list of strings.

Other than ``txt_mode="chunk"``, each text becomes one row, truncated to its first ``max_length``
tokens (with the tokenizer's special tokens, e.g. BOS).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from zoft.errors import UsageError
from zoft.tasks.base import Batch
from zoft.tasks.data import read_utf8
from zoft.tasks.lm import pad_labels, pad_rows

TxtMode = Literal["chunk", "lines"]
Source = str | os.PathLike | Sequence[str]


def _text_of(rec: Any, field: str, where: str) -> str:
    if isinstance(rec, str):
        return rec
    if isinstance(rec, dict) and isinstance(rec.get(field), str):
        return rec[field]
    raise UsageError(f"{where}: expected a string or an object with a {field!r} string field")


def load_texts(source: Source, *, text_field: str = "text") -> tuple[list[str], bool]:
    """``(texts, is_raw_corpus)``: the texts of a file (see module doc) or a list of strings.

    ``is_raw_corpus`` is True for a ``.txt`` file (one text: the whole file)."""
    if not isinstance(source, (str, os.PathLike)):
        texts = list(source)
        for i, t in enumerate(texts):
            _text_of(t, text_field, f"item {i}")
        return [_text_of(t, text_field, "") for t in texts], False
    p = Path(source)
    if not p.is_file():
        raise UsageError(f"data file '{p}' does not exist")
    if p.suffix == ".txt":
        return [read_utf8(p)], True
    if p.suffix == ".json":
        try:
            data = json.loads(read_utf8(p))
        except json.JSONDecodeError as e:
            raise UsageError(f"'{p}' is not valid JSON: {e.msg} (line {e.lineno})") from None
        if isinstance(data, dict):  # {"text": [...]} or a single record
            data = data.get(text_field, [data])
        if not isinstance(data, list):
            raise UsageError(f"'{p}' must hold a JSON list of strings or objects")
        return [_text_of(r, text_field, f"{p} item {i}") for i, r in enumerate(data)], False
    if p.suffix == ".jsonl":
        out = []
        for n, line in enumerate(read_utf8(p).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            out.append(_text_of(rec, text_field, f"{p}:{n}"))
        return out, False
    raise UsageError(f"data file '{p}' must end in .txt, .json or .jsonl")


def tokenize_rows(tokenizer: Any, source: Source, *, max_length: int, txt_mode: TxtMode = "chunk",
                  text_field: str = "text", min_tokens: int = 2) -> list[list[int]]:
    """Token-id rows (each ``min_tokens <= len <= max_length``) of ``source``; see the module doc."""
    texts, raw = load_texts(source, text_field=text_field)
    if raw and txt_mode == "lines":
        texts, raw = [t for t in texts[0].splitlines() if t.strip()], False
    rows: list[list[int]] = []
    if raw:
        bos = tokenizer.bos_token_id if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id] else None
        ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
        width = max_length - (bos is not None)
        for i in range(0, len(ids), width):
            rows.append(([bos] if bos is not None else []) + ids[i:i + width])
    else:
        enc = tokenizer([t for t in texts], add_special_tokens=True, truncation=True, max_length=max_length)
        rows = list(enc["input_ids"])
    rows = [r for r in rows if len(r) >= min_tokens]
    if not rows:
        raise UsageError(f"{source if isinstance(source, (str, os.PathLike)) else 'the given texts'}: "
                         f"no text of at least {min_tokens} tokens")
    return rows


def batch_indices(n: int, size: int, step: int, seed: int) -> list[int]:
    """Rows of step ``step``: consecutive slices of a seeded permutation per epoch (a pure function
    of its arguments, so a resumed run draws the same batches). ``size`` > ``n`` wraps."""
    out = []
    start = step * size
    for pos in range(start, start + size):
        epoch, i = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[i]))
    return out


def make_batch(tokenizer: Any, forget: Sequence[Sequence[int]], retain: Sequence[Sequence[int]] = ()) -> Batch:
    """One unlearning batch: forget rows first, then retain rows, right-padded to one length.

    inputs:  input_ids, attention_mask (R, T), R = len(forget) + len(retain)
    targets: labels (R, T) (-100 on padding), forget (R,) bool (True on forget rows)
    """
    rows = [list(r) for r in forget] + [list(r) for r in retain]
    inputs = pad_rows(tokenizer, rows)
    labels = pad_labels(rows, inputs["input_ids"].shape[1])
    is_forget = torch.zeros(len(rows), dtype=torch.bool)
    is_forget[:len(forget)] = True
    return Batch(inputs, {"labels": labels, "forget": is_forget}, size=len(rows))


class UnlearnData:
    """Forget and retain rows plus the deterministic batch of each step."""

    def __init__(self, tokenizer: Any, forget: list[list[int]], retain: list[list[int]] | None,
                 batch_size: int, retain_batch_size: int | None = None, seed: int = 0):
        if batch_size < 1:
            raise UsageError("batch_size must be >= 1")
        self.tokenizer, self.forget, self.retain = tokenizer, forget, retain or []
        self.batch_size = batch_size
        self.retain_batch_size = batch_size if retain_batch_size is None else retain_batch_size
        self.seed = seed

    def batch(self, step: int, with_retain: bool = True) -> Batch:
        f = [self.forget[i] for i in batch_indices(len(self.forget), self.batch_size, step, self.seed)]
        r = []
        if with_retain and self.retain and self.retain_batch_size > 0:
            r = [self.retain[i] for i in batch_indices(len(self.retain), self.retain_batch_size, step, self.seed + 1)]
        return make_batch(self.tokenizer, f, r)
