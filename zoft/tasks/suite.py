"""One scoring path over MeZO's task table (``zoft.tasks.mezo``) for causal LMs.

Rows of a batch are token lists of MeZO's strings (``zoft.tasks.mezo.render``), right-padded.
A candidate's tokens are the last ``n`` of its full text, ``n = len(tok(option)) - len(tok(prompt))``
as MeZO counts them (so a BPE merge across the prompt/answer boundary is scored the same way).

- Candidates are scored by the **mean** log-probability of their tokens (``option_logprob``);
  the prediction is the argmax, correct when it is one of the correct indices.
- Training loss, as MeZO: "classification" tasks take the cross-entropy over the candidates'
  scores (rows = every candidate of every example); "lm" tasks (COPA, ReCoRD, SQuAD, DROP) take
  the language-model loss on the correct option's tokens (rows = one per example), the mean over
  all those tokens of the batch.
- Non-differentiable objectives: ``objective="accuracy"`` is minus the batch accuracy of the
  candidate scores; ``objective="f1"`` (SQuAD/DROP) is minus the mean F1 of greedy generations.
  A ZO step needs only one number per probe, so these train directly (MeZO's ``--non_diff``).
- Generation (SQuAD, DROP): greedy, at most ``max_new_tokens`` (50) new tokens and never past
  ``max_length``, stopping at the token of "\\n" or EOS; the decoded text (special tokens
  skipped) is stripped and compared with SQuAD's normalisation (``zoft.tasks.qa``). Training
  (under the engine) generates with full forwards and no KV cache; evaluation of the plain model
  uses ``generate`` with its cache (the same tokens).

Prompts longer than ``max_length`` lose tokens from the left after the leading BOS (MeZO's rule;
generation prompts keep ``max_new_tokens`` of room).
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F

from zoft.errors import UsageError
from zoft.models.loading import kind_phrase
from zoft.tasks.base import Batch
from zoft.tasks.classify import Kind, _fit_left
from zoft.tasks.head import check_head_chunk, logits_at, logits_of, num_rows
from zoft.tasks.lm import (IGNORE, call_model, eval_outputs, model_device, option_logprob, pad_labels, pad_rows,
                           per_probe, token_nll)
from zoft.tasks.mezo import MEZO_TASKS, Rendered, Spec, render, validate_rows
from zoft.tasks.qa import exact_match, f1_score

Objective = Literal["loss", "accuracy", "f1"]
RowSet = Literal["all", "correct", "prompt"]  # every candidate / the correct option / the prompt alone


def greedy(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new: Sequence[int], stop: set[int],
           pad: int, head_chunk: int | None = None) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (R token lists; row r gets at most ``max_new[r]`` tokens,
    ending at the first token in ``stop``, which is kept).

    Full forwards without a KV cache, right-padded: a causal model's logits at a row's real
    positions do not depend on the padding after them, and the same calls work while the ZO
    engine runs P probes on P*R rows (a shared cache would leak one probe's keys into another).
    With ``head_chunk`` only each row's last position goes through the LM head.
    """
    R = len(prompts)
    lens = [len(p) for p in prompts]
    T = max(l + n for l, n in zip(lens, max_new))
    device = model_device(model)
    ids = torch.full((R, T), pad, dtype=torch.long, device=device)  # (R, T)
    mask = torch.zeros((R, T), dtype=torch.long, device=device)  # (R, T)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = torch.tensor(list(p), dtype=torch.long)
        mask[r, : len(p)] = 1
    out: list[list[int]] = [[] for _ in range(R)]
    done = [n <= 0 for n in max_new]
    while not all(done):
        width = max(lens)
        res = call_model(model, Batch({"input_ids": ids[:, :width], "attention_mask": mask[:, :width]}), True,
                         head_chunk)
        last = logits_at(logits_of(res), torch.tensor(lens, device=device) - 1)  # (R, V)
        nxt = last.argmax(-1).tolist()
        for r in range(R):
            if done[r]:
                continue
            out[r].append(nxt[r])
            ids[r, lens[r]], mask[r, lens[r]] = nxt[r], 1
            lens[r] += 1
            done[r] = nxt[r] in stop or len(out[r]) >= max_new[r]
    return out


class PromptTask:
    """A task of MeZO's suite (``zoft.tasks.mezo.MEZO_TASKS[name]``) on a causal LM.

    objective:      "loss" (MeZO's training loss), "accuracy" (classification tasks) or "f1"
                    (SQuAD/DROP): the last two are non-differentiable, for ZO optimizers only.
    demos:          in-context demonstrations put before every example (rows of the same task).
    max_new_tokens: generation budget (MeZO: 50).
    head_chunk:     positions per LM-head call (``zoft.tasks.head``; None: the model's full logits): the
                    losses send only the scored tokens through the head, generation only the last position.
    """

    def __init__(self, tokenizer, kind: Kind, max_length: int, *, name: str, objective: Objective = "loss",
                 demos: Sequence[dict] = (), max_new_tokens: int = 50, head_chunk: int | None = None):
        if name not in MEZO_TASKS:
            raise UsageError(f"unknown MeZO task {name!r}; choose one of: {', '.join(MEZO_TASKS)}")
        if kind != "causal":
            raise UsageError(f"task {name!r} is MeZO's causal-LM suite (large_models) and needs a causal LM, "
                             f"not {kind_phrase(kind)}")
        self.spec: Spec = MEZO_TASKS[name]
        if objective not in ("loss", "accuracy", "f1"):
            raise UsageError(f"objective must be loss, accuracy or f1, not {objective!r}")
        if objective == "f1" and not self.spec.generation:
            raise UsageError(f"--objective f1 is for the generation tasks squad and drop, not {name!r}; "
                             "use --objective accuracy")
        if objective == "accuracy" and self.spec.generation:
            raise UsageError(f"--objective accuracy is for candidate tasks; {name!r} generates: use --objective f1")
        if max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be >= 1, not {max_new_tokens}")
        self.name, self.tokenizer, self.max_length = name, tokenizer, max_length
        self.objective, self.max_new_tokens = objective, max_new_tokens
        self.head_chunk = check_head_chunk(head_chunk)
        validate_rows(self.spec, list(demos))
        self.demos = list(demos)
        self._prefix_ids = {tokenizer.bos_token_id, tokenizer.cls_token_id} - {None}
        self._pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        newline = tokenizer.encode("\n", add_special_tokens=False)
        self.stop_ids = ({newline[-1]} if newline else set()) | ({tokenizer.eos_token_id} - {None})

    # -- strings and tokens ---------------------------------------------------------------
    def validate(self, examples: list[dict]) -> None:
        validate_rows(self.spec, examples)

    def render(self, row: dict, demos: Sequence[dict] | None = None) -> Rendered:
        return render(self.spec, row, self.demos if demos is None else demos)

    def _keep(self, ids: list[int]) -> int:
        n = 0
        while n < len(ids) and ids[n] in self._prefix_ids:
            n += 1
        return n

    def _room(self) -> int:
        return self.max_length - (self.max_new_tokens if self.spec.generation else 0)

    def _option(self, r: Rendered, i: int) -> tuple[list[int], int]:
        """Tokens of candidate ``i``'s full text (truncated) and how many at its end are the answer."""
        enc = self.tokenizer.encode
        n = len(enc(r.bare_options[i])) - len(enc(r.bare_prompt))
        ids = enc(r.candidates[i])
        keep = self._keep(ids)
        if n < 1:
            raise UsageError(f"task {self.name}: candidate {r.bare_options[i][len(r.bare_prompt):]!r} adds no "
                             "token to the prompt")
        if n > self._room() - keep - 1:
            raise UsageError(f"max_length {self.max_length} leaves no room for a prompt before the {n}-token "
                             "answer; raise it")
        return _fit_left(ids, self._room(), keep), n

    def _prompt_ids(self, r: Rendered) -> list[int]:
        ids = self.tokenizer.encode(r.prompt)
        return _fit_left(ids, self._room(), self._keep(ids))

    def _collate(self, items: Sequence[tuple[dict, Sequence[dict] | None]], rows: RowSet,
                 cached: bool = False) -> Batch:
        """inputs (R, T); targets: labels (R, T) (candidate tokens, IGNORE elsewhere), first (R,)
        whether a row is its example's (first) correct option, counts (rows per example), gold
        (correct indices per example), answers (generation), cached (generate with a KV cache:
        the plain model only)."""
        toks, labels, first, counts, gold, answers = [], [], [], [], [], []
        for row, demos in items:
            r = self.render(row, demos)
            correct = r.correct if isinstance(r.correct, list) else [r.correct]
            gold.append(correct)
            answers.append(r.answers)
            if rows == "prompt":
                picked = []
                toks.append(self._prompt_ids(r))
                labels.append([])
                first.append(True)
            else:
                picked = range(len(r.candidates)) if rows == "all" else [correct[0]]
            for i in picked:
                ids, n = self._option(r, i)
                toks.append(ids)
                labels.append([IGNORE] * (len(ids) - n) + ids[-n:])
                first.append(i == correct[0])
            counts.append(len(picked) or 1)
        inputs = pad_rows(self.tokenizer, toks)
        targets: dict[str, Any] = {"labels": pad_labels(labels, inputs["input_ids"].shape[1]),  # (R, T)
                                   "first": torch.tensor(first),  # (R,)
                                   "counts": counts, "gold": gold, "answers": answers, "rows": rows,
                                   "cached": cached}
        return Batch(inputs, targets, size=len(items))

    def train_rows(self) -> RowSet:
        if self.objective == "f1":
            return "prompt"
        if self.objective == "accuracy" or self.spec.train_as == "classification":
            return "all"
        return "correct"

    def collate(self, examples: list[dict]) -> Batch:
        """The training batch of ``examples`` for this task's objective."""
        return self._collate([(e, None) for e in examples], self.train_rows())

    # -- model calls and losses -------------------------------------------------------------
    def forward(self, model: torch.nn.Module, batch: Batch) -> Any:
        if batch.targets["rows"] != "prompt":
            return call_model(model, batch, causal=True, head_chunk=self.head_chunk)
        ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        lens = mask.sum(1).tolist()
        prompts = [ids[r, :n].tolist() for r, n in enumerate(lens)]
        budget = [min(self.max_new_tokens, self.max_length - n) for n in lens]  # MeZO's max_new_tokens rule
        if batch.targets.get("cached"):
            return self._generate(model, prompts, budget)
        return greedy(model, prompts, budget, self.stop_ids, self._pad, self.head_chunk)

    def _generate(self, model: torch.nn.Module, prompts: list[list[int]], budget: list[int]) -> list[list[int]]:
        """``greedy``'s tokens through Hugging Face's ``generate`` with its KV cache (left-padded):
        for the plain model only (evaluation), where a cache is safe and saves the re-reading of
        the prompt at every new token."""
        T = max(map(len, prompts))
        device = model_device(model)
        ids = torch.full((len(prompts), T), self._pad, dtype=torch.long)  # (R, T), left-padded
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, T - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, T - len(p):] = 1
        new = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             num_beams=1, max_new_tokens=max(budget), eos_token_id=sorted(self.stop_ids),
                             pad_token_id=self._pad)[:, T:].tolist()
        out = []
        for r, toks in enumerate(new):
            toks = toks[:budget[r]]
            end = next((j + 1 for j, t in enumerate(toks) if t in self.stop_ids), len(toks))
            out.append(toks[:end])
        return out

    def scores(self, outputs: Any, batch: Batch, num_probes: int) -> torch.Tensor:
        """Mean log-probability of every row's candidate tokens, (P, R) fp32."""
        logits = logits_of(outputs)  # (P*R, T, V), or the hidden state and the head
        labels = per_probe(batch.targets["labels"], num_rows(logits) // num_probes, num_probes)
        return option_logprob(logits, labels).view(num_probes, -1)

    def _groups(self, batch: Batch) -> list[slice]:
        out, lo = [], 0
        for c in batch.targets["counts"]:
            out.append(slice(lo, lo + c))
            lo += c
        return out

    def _class_loss(self, scores: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean over examples of the cross-entropy of the first correct candidate, (P,)."""
        gold = [g[0] for g in batch.targets["gold"]]
        per_ex = [F.cross_entropy(scores[:, s], torch.full((scores.shape[0],), g, device=scores.device),
                                  reduction="none") for s, g in zip(self._groups(batch), gold)]
        return torch.stack(per_ex, 1).mean(1)

    def _hits(self, scores: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(P, B) 1.0 where the argmax candidate is a correct one."""
        hits = [[float(int(scores[p, s].argmax()) in g) for s, g in zip(self._groups(batch), batch.targets["gold"])]
                for p in range(scores.shape[0])]
        return torch.tensor(hits)

    def _generated_text(self, outputs: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outputs]

    def loss(self, outputs: Any, batch: Batch, num_probes: int) -> torch.Tensor:
        P, rows = num_probes, batch.targets["rows"]
        if rows == "prompt":  # objective f1: minus the mean F1 of each probe's generations
            texts = self._generated_text(outputs)
            B = batch.size
            f1 = [[f1_score(texts[p * B + i], a) for i, a in enumerate(batch.targets["answers"])] for p in range(P)]
            return -torch.tensor(f1, dtype=torch.float64).mean(1)
        if self.objective == "accuracy":
            return -self._hits(self.scores(outputs, batch, P), batch).mean(1)
        if rows == "all":
            return self._class_loss(self.scores(outputs, batch, P), batch)
        logits = logits_of(outputs)
        nll, count = token_nll(logits, per_probe(batch.targets["labels"], num_rows(logits) // P, P), P)
        return nll / count

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, model: torch.nn.Module, examples: list[dict], batch_size: int,
                 demos: Sequence[Sequence[dict]] | None = None) -> dict[str, float]:
        """MeZO's metric on ``examples`` (``demos[i]``: example i's own demonstrations, else the
        task's): accuracy in [0, 1] for candidate tasks, f1 and em in [0, 1] for generation; plus
        ``loss``, the training loss ("lm": token-weighted) on the same examples."""
        items = [(e, None if demos is None else demos[i]) for i, e in enumerate(examples)]
        nll, tokens, ce, hits, f1, em = 0.0, 0, 0.0, 0.0, 0.0, 0.0
        lm = self.spec.train_as == "lm"
        candidates = not self.spec.generation
        for batch, outputs in eval_outputs(self, model, items, batch_size,
                                           lambda its: self._collate(its, "all" if candidates else "correct")):
            labels = batch.targets["labels"]
            if lm:  # the LM loss of the correct options only
                s, n = token_nll(logits_of(outputs), labels.masked_fill(~batch.targets["first"][:, None], IGNORE), 1)
                nll, tokens = nll + s.item(), tokens + int(n.item())
            if candidates:
                scores = self.scores(outputs, batch, 1)
                hits += float(self._hits(scores, batch).sum())
                if not lm:
                    ce += float(self._class_loss(scores, batch)) * batch.size
        if self.spec.generation:
            for batch, outputs in eval_outputs(self, model, items, batch_size,
                                               lambda its: self._collate(its, "prompt", cached=True)):
                for text, gold in zip(self._generated_text(outputs), batch.targets["answers"]):
                    f1 += f1_score(text, gold)
                    em += exact_match(text, gold)
            n = len(examples)
            return {"f1": f1 / n, "em": em / n, "loss": nll / max(tokens, 1)}
        return {"accuracy": hits / len(examples), "loss": nll / max(tokens, 1) if lm else ce / len(examples)}
