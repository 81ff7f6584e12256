"""Prompt-based classification by candidate scoring (MeZO / LM-BFF style).

One task, three ways of turning a model into C class scores per example (logits (P, B, C)),
then cross-entropy over the classes and argmax for the prediction:

- causal LM: one row per (example, candidate) = prompt + candidate; score = mean log-prob of
  the candidate's tokens given the prompt (MeZO). Rows R = B*C, example-major.
- masked LM: the template holds a mask token; score = the mask position's logit of each
  verbalizer word (one token each). Rows R = B.
- encoder without a head: mean-pooled, L2-normalised embeddings; score = scale * cosine
  between the example and each class description. The C description rows ride in the same
  batch (rows [B, B+C)) so that they see the same perturbed weights. Rows R = B + C.
"""
from __future__ import annotations

import string
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F

from zoft.errors import UsageError
from zoft.models.loading import kind_phrase
from zoft.tasks.base import Batch
from zoft.tasks.data import check_fields, where
from zoft.tasks.head import check_head_chunk, logits_at, logits_of, num_rows
from zoft.tasks.lm import (IGNORE, call_model, eval_outputs, makes_token_types, option_logprob, pad_labels, pad_rows,
                           per_probe)

Kind = Literal["causal", "masked", "encoder"]
KINDS = ("causal", "masked", "encoder")

SST2_VERBALIZERS = [" terrible", " great"]
SST2_DESCRIPTIONS = ["It was terrible.", "It was great."]


def _label_key(v: Any) -> str:
    """Labels compare as text so that 1, 1.0, True-as-1 and "1" (from a CSV) all match."""
    if isinstance(v, bool):
        v = int(v)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).strip()


def _table(value: Sequence[str] | Mapping[Any, str], what: str) -> tuple[list[Any], list[str]]:
    """(labels, words) from a list (label i -> words[i]) or a dict (label -> word)."""
    if isinstance(value, Mapping):
        labels, words = list(value.keys()), list(value.values())
    elif isinstance(value, (list, tuple)):
        labels, words = list(range(len(value))), list(value)
    else:
        raise UsageError(f"{what} must be a list of words (label i -> word i) or a mapping "
                         f"label -> word, not {type(value).__name__}")
    if len(words) < 2 or not all(isinstance(w, str) and w.strip() for w in words):
        raise UsageError(f"{what} needs at least 2 non-empty words, got {words!r}")
    if len({_label_key(k) for k in labels}) != len(labels):
        raise UsageError(f"{what} has duplicate labels: {labels!r}")
    return labels, words


def _template_fields(template: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise UsageError(f"bad template {template!r}: {e} (write fields as {{name}}, braces as {{{{ }}}})") from None
    fields = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name or name.isdigit():
            raise UsageError(f"template {template!r} has a positional field {{{name}}}; "
                             "name the example's fields, e.g. {sentence}")
        if not name.isidentifier():
            raise UsageError(f"template {template!r}: write fields as plain {{name}}, not {{{name}}}")
        if name not in fields:
            fields.append(name)
    return fields


def _fit_left(ids: list[int], length: int, keep: int) -> list[int]:
    """Cut ``ids`` to ``length`` tokens by dropping from the left, after the first ``keep``
    (leading special tokens such as BOS/CLS survive; the prompt's end, where the answer goes,
    is kept)."""
    if len(ids) <= length:
        return ids
    return ids[:keep] + ids[len(ids) - (length - keep):]


class ClassifyTask:
    """Classification of examples ``{field: text, ..., label_field: label}`` by candidate scoring.

    template:     prompt with ``{field}`` placeholders (causal/masked; masked templates put
                  ``{mask}`` where the word goes, else " {mask}" is appended).
    verbalizers:  candidate words, a list (label i -> words[i]) or a mapping label -> word.
    label_field:  the example's label; ints, digit strings (CSV) and mapping keys all work.
    text_fields:  what the encoder embeds, joined by spaces (default: the template's fields).
    descriptions: encoder only: the text each class is compared with, like ``verbalizers``
                  (default: the verbalizer words).
    scale:        encoder only: logits = scale * cosine.
    encode:       masked only: example -> token ids holding one mask token (at most max_length), instead of formatting
                  ``template`` and tokenizing the string (LM-BFF's part-wise templates,
                  ``zoft.tasks.mezo.lmbff_encode``); ``text_fields`` then name the fields checked.
    head_chunk:   positions per LM-head call (``zoft.tasks.head``; None: the model's full logits): a causal LM
                  sends each row's candidate tokens through the head, a masked LM its mask position; an
                  encoder has no head (ignored).
    """

    def __init__(self, tokenizer, kind: Kind, max_length: int, *, template: str,
                 verbalizers: Sequence[str] | Mapping[Any, str], label_field: str = "label",
                 text_fields: Sequence[str] | None = None,
                 descriptions: Sequence[str] | Mapping[Any, str] | None = None,
                 scale: float = 20.0, name: str = "classify", encode: Callable[[dict], list[int]] | None = None,
                 head_chunk: int | None = None):
        if kind not in KINDS:
            raise UsageError(f"model kind must be one of {', '.join(KINDS)}, not {kind!r}")
        self.name, self.kind, self.tokenizer, self.max_length = name, kind, tokenizer, max_length
        self.labels, self.words = _table(verbalizers, "verbalizers")
        self.label_index = {_label_key(k): i for i, k in enumerate(self.labels)}
        self.label_field = label_field
        self.scale = float(scale)
        if encode is not None and kind != "masked":
            raise UsageError(f"task {name!r} encodes a masked-LM prompt and needs a masked LM, "
                             f"not {kind_phrase(kind)}")
        self.encode = encode
        self.head_chunk = check_head_chunk(head_chunk) if kind != "encoder" else None

        fields = _template_fields(template)
        if kind == "masked":
            if tokenizer.mask_token is None:
                raise UsageError("a masked-LM task needs a tokenizer with a mask token")
            if "mask" not in fields:
                template += " {mask}"
        elif "mask" in fields:
            raise UsageError(f"template {template!r} has {{mask}}, which only masked LMs fill; "
                             f"{kind_phrase(kind)} scores the words after the prompt")
        self.template = template
        self.fields = [f for f in fields if f != "mask"]
        self.text_fields = list(text_fields) if text_fields is not None else self.fields
        if not self.text_fields:
            raise UsageError(f"template {template!r} names no example field and no text_fields "
                             "were given; write e.g. '{sentence} It was'")

        # Token ids of the candidates, checked once here.
        enc = tokenizer(self.words, add_special_tokens=False)["input_ids"]
        for w, ids in zip(self.words, enc):
            if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
                raise UsageError(f"verbalizer {w!r} contains a token this tokenizer does not know")
        if kind == "causal":
            for w, ids in zip(self.words, enc):
                if not ids:
                    raise UsageError(f"verbalizer {w!r} encodes to no tokens")
            self.candidates: list[list[int]] = enc
        elif kind == "masked":
            for w, ids in zip(self.words, enc):
                if len(ids) != 1:
                    raise UsageError(f"verbalizer {w!r} is {len(ids)} tokens for this tokenizer; "
                                     "masked-LM scoring needs one-token words")
            self.word_ids = torch.tensor([ids[0] for ids in enc])  # (C,)
        else:
            if descriptions is None:
                self.descriptions = [w.strip() for w in self.words]
            else:
                d_labels, d_words = _table(descriptions, "descriptions")
                by_key = {_label_key(k): w for k, w in zip(d_labels, d_words)}
                if set(by_key) != set(self.label_index):
                    raise UsageError(f"descriptions have labels {d_labels!r} but the verbalizers "
                                     f"have {self.labels!r}")
                self.descriptions = [by_key[_label_key(k)] for k in self.labels]
        self.num_classes = len(self.words)
        self._token_types = kind != "causal" and makes_token_types(tokenizer)
        self._prefix_ids = {tokenizer.bos_token_id, tokenizer.cls_token_id} - {None}

    @staticmethod
    def rows(kind: Kind, batch_size: int, *, verbalizers: Sequence[str] | Mapping[Any, str], **_) -> int:
        """Rows the model runs for ``batch_size`` examples (no tokenizer needed: what the planner
        sizes by): B*C on a causal LM, B on a masked LM, B+C on an encoder."""
        C = len(_table(verbalizers, "verbalizers")[1])
        return {"causal": batch_size * C, "masked": batch_size}.get(kind, batch_size + C)

    # ----------------------------------------------------------------------------------------

    def validate(self, examples: list[dict]) -> None:
        check_fields(examples, [*dict.fromkeys([*self.fields, *self.text_fields, self.label_field])])
        for i, ex in enumerate(examples):
            for f in dict.fromkeys([*self.fields, *self.text_fields]):
                if isinstance(ex[f], (dict, list)):
                    raise UsageError(f"{where(examples, i)}: field {f!r} must be text, "
                                     f"got {type(ex[f]).__name__}")
            if _label_key(ex[self.label_field]) not in self.label_index:
                raise UsageError(f"{where(examples, i)}: {self.label_field} "
                                 f"{ex[self.label_field]!r} is not one of the verbalizer's labels "
                                 f"{self.labels!r}")

    def _prompt(self, ex: dict) -> str:
        values = {f: str(ex[f]) for f in self.fields}
        if self.kind == "masked":
            values["mask"] = self.tokenizer.mask_token
        return self.template.format(**values)

    def _keep(self, ids: list[int]) -> int:
        """Number of leading BOS / CLS tokens."""
        n = 0
        while n < len(ids) and ids[n] in self._prefix_ids:
            n += 1
        return n

    def collate(self, examples: list[dict]) -> Batch:
        """inputs (R, T) with R = B*C (causal), B (masked) or B+C (encoder); targets:
        label (B,) class index, plus labels (R, T) candidate-token ids elsewhere -100 (causal)
        or mask_pos (R,) (masked)."""
        B = len(examples)
        gold = torch.tensor([self.label_index[_label_key(ex[self.label_field])] for ex in examples])
        targets: dict[str, Any] = {"label": gold}  # (B,)
        if self.kind == "causal":
            ctx = self.tokenizer([self._prompt(ex) for ex in examples], add_special_tokens=True)["input_ids"]
            rows, labels = [], []
            for i, c in enumerate(ctx):
                for cand in self.candidates:
                    room = self.max_length - len(cand)
                    if room <= self._keep(c):
                        raise UsageError(f"max_length {self.max_length} leaves no room for a prompt "
                                         f"before the {len(cand)}-token answer; raise it")
                    c_fit = _fit_left(c, room, self._keep(c))
                    rows.append(c_fit + cand)
                    labels.append([IGNORE] * len(c_fit) + cand)
            inputs = pad_rows(self.tokenizer, rows, self._token_types)
            targets["labels"] = pad_labels(labels, inputs["input_ids"].shape[1])  # (B*C, T)
        elif self.kind == "masked":
            mask_id = self.tokenizer.mask_token_id
            rows, pos = [], []
            if self.encode is not None:
                enc = [self.encode(ex) for ex in examples]
            else:
                enc = self.tokenizer([self._prompt(ex) for ex in examples], add_special_tokens=True)["input_ids"]
            for i, ids in enumerate(enc):
                ids = _fit_left(ids, self.max_length, self._keep(ids))
                where_mask = [t for t, tok in enumerate(ids) if tok == mask_id]
                if len(where_mask) != 1:
                    raise UsageError(f"{where(examples, i)}: the prompt has {len(where_mask)} mask "
                                     f"tokens after truncation to {self.max_length} tokens; it needs "
                                     "exactly one (raise max_length or remove mask tokens from the text)")
                rows.append(ids)
                pos.append(where_mask[0])
            inputs = pad_rows(self.tokenizer, rows, self._token_types)
            targets["mask_pos"] = torch.tensor(pos)  # (B,)
        else:
            texts = [" ".join(str(ex[f]) for f in self.text_fields) for ex in examples]
            enc = self.tokenizer(texts + self.descriptions, add_special_tokens=True, truncation=True,
                                 max_length=self.max_length)["input_ids"]
            inputs = pad_rows(self.tokenizer, enc, self._token_types)  # rows [0, B) examples, [B, B+C) descriptions
        return Batch(inputs, targets, size=B)

    def preview(self, examples: list[dict]) -> list[dict[str, Any]]:
        """Masked LMs: what the model sees, per row: ``row`` (where it came from), ``prompt`` (the
        token ids of ``collate``, truncation included, decoded with the special tokens),
        ``candidates`` (the verbalizer words, each scored as one token at the mask), ``tokens``
        (those tokens as the tokenizer spells them) and ``correct`` (the label's index)."""
        if self.kind != "masked":
            raise UsageError(f"preview of task {self.name!r} is for masked LMs, not {kind_phrase(self.kind)}")
        self.validate(examples)
        tokens = self.tokenizer.convert_ids_to_tokens(self.word_ids.tolist())
        b = self.collate(examples)
        ids, mask = b.inputs["input_ids"], b.inputs["attention_mask"]  # (B, T) right-padded
        return [{"row": where(examples, i), "prompt": self.tokenizer.decode(ids[i, :int(mask[i].sum())]),
                 "candidates": list(self.words), "tokens": tokens, "correct": int(b.targets["label"][i])}
                for i in range(len(examples))]

    def forward(self, model: torch.nn.Module, batch: Batch) -> Any:
        return call_model(model, batch, causal=self.kind == "causal", head_chunk=self.head_chunk)

    def class_logits(self, outputs: Any, batch: Batch, num_probes: int) -> torch.Tensor:
        """Class scores (P, B, C) in fp32 from the outputs on ``batch.repeat(P)``."""
        P, B, C = num_probes, batch.size, self.num_classes
        if self.kind == "causal":
            logits = logits_of(outputs)  # (P*R, T, V), R = B*C, or the hidden state and the head
            labels = per_probe(batch.targets["labels"], num_rows(logits) // P, P)  # (P*R, T)
            return option_logprob(logits, labels).view(P, B, C)  # mean candidate-token log-prob
        if self.kind == "masked":
            logits = logits_of(outputs)  # (P*B, T, V), or the hidden state and the head
            pos = per_probe(batch.targets["mask_pos"], B, P)  # (P*B,)
            at_mask = logits_at(logits, pos)  # (P*B, V)
            return at_mask[:, self.word_ids.to(at_mask.device)].float().view(P, B, C)
        h = outputs.last_hidden_state.float()  # (P*R, T, H), R = B + C
        mask = per_probe(batch.inputs["attention_mask"], B + C, P).to(h.dtype)  # (P*R, T)
        pooled = (h * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # (P*R, H)
        emb = F.normalize(pooled, dim=-1).view(P, B + C, -1)  # (P, R, H)
        return self.scale * emb[:, :B] @ emb[:, B:].transpose(1, 2)  # (P, B, C)

    def loss(self, outputs: Any, batch: Batch, num_probes: int) -> torch.Tensor:
        """Mean cross-entropy over the classes, per probe, shape (P,)."""
        logits = self.class_logits(outputs, batch, num_probes)  # (P, B, C)
        P, B, C = logits.shape
        gold = per_probe(batch.targets["label"], B, P).to(logits.device)  # (P*B,)
        return F.cross_entropy(logits.reshape(P * B, C), gold, reduction="none").view(P, B).mean(1)

    def evaluate(self, model: torch.nn.Module, examples: list[dict], batch_size: int) -> dict[str, float]:
        """Accuracy (argmax class == label, in [0, 1]) and mean cross-entropy, model in eval mode."""
        correct, loss_sum = 0, 0.0
        for batch, outputs in eval_outputs(self, model, examples, batch_size):
            logits = self.class_logits(outputs, batch, 1)[0]  # (B, C)
            gold = batch.targets["label"]
            loss_sum += F.cross_entropy(logits, gold, reduction="sum").item()
            correct += int((logits.argmax(-1) == gold).sum().item())
        return {"accuracy": correct / len(examples), "loss": loss_sum / len(examples)}


def sst2_task(tokenizer, max_length: int, *, text_field: str = "sentence", label_field: str = "label",
              descriptions: Sequence[str] | Mapping[Any, str] | None = None, scale: float = 20.0) -> ClassifyTask:
    """SST-2 on an encoder without a head: the sentence's embedding against "It was terrible." (0) /
    "It was great." (1). (On a causal or masked LM, ``make_task("sst2", ...)`` is MeZO's task.)"""
    return ClassifyTask(tokenizer, "encoder", max_length, template=f"{{{text_field}}}", verbalizers=SST2_VERBALIZERS,
                        label_field=label_field,
                        descriptions=descriptions if descriptions is not None else SST2_DESCRIPTIONS,
                        scale=scale, name="sst2")


sst2_task.rows = lambda kind, batch_size, **_: ClassifyTask.rows(kind, batch_size, verbalizers=SST2_VERBALIZERS)
