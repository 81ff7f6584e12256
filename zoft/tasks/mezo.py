"""MeZO's task suite for causal LMs (``princeton-nlp/MeZO``, ``large_models/``) as a table.

Each entry says, for one task, which fields a row of the Hugging Face dataset has, the prompt
(MeZO's ``Template.encode``), the full text of the prompt with each candidate (``verbalize``),
which candidates are correct, and how MeZO trains it: "classification" (cross-entropy over the
candidates' mean log-likelihoods, ``--train_as_classification``) or "lm" (language-model loss on
the correct option's tokens: COPA, ReCoRD, SQuAD, DROP). A template is data: one scoring path
(``zoft.tasks.suite.PromptTask``) serves every entry.

Strings are MeZO's, character for character (template version 0 of each task; BoolQ's default is
its third template, ``BoolQTemplateV3``, because ``BoolQDataset.get_template`` defaults to
``template_version=2``). ``render`` applies MeZO's ``encode_prompt`` whitespace rules: the prompt
and each candidate text lose surrounding spaces (``strip(' ')``), demonstrations are stripped and
joined by a blank line, and the joined text loses its leading whitespace.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np

from zoft.errors import UsageError
from zoft.tasks.data import check_fields, where

TRAIN_SEP = "\n\n"  # MeZO's Dataset.train_sep: between in-context demonstrations


@dataclass(frozen=True)
class Spec:
    """One task of the suite.

    source:   the Hugging Face dataset whose fields the rows carry.
    fields:   fields every row needs.
    prompt:   row -> the text before the answer (MeZO's ``encode``).
    options:  row -> the full text of the prompt with each candidate (``verbalize``); for a
              generation task, the one teacher-forced text (prompt + first answer + newline).
    correct:  row -> index of the correct option, or a list of indices when several are.
    answers:  generation tasks: row -> the gold answers F1/EM compare with.
    train_as: "classification" or "lm" (see the module docstring).
    dev:      MeZO's number of dev examples (CB and COPA have < 1000 training rows: 100).
    check:    optional row -> problem (a message) or None, for values a field check cannot see.
    """

    name: str
    source: str
    fields: tuple[str, ...]
    prompt: Callable[[dict], str]
    options: Callable[[dict], list[str]]
    correct: Callable[[dict], int | list[int]]
    train_as: Literal["classification", "lm"]
    answers: Callable[[dict], list[str]] | None = None
    dev: int = 500
    check: Callable[[dict], str | None] | None = None

    @property
    def generation(self) -> bool:
        return self.answers is not None


def _label(row: dict, n: int) -> int:
    return int(row["label"])


def _label_check(n: int) -> Callable[[dict], str | None]:
    def check(row: dict) -> str | None:
        v = row["label"]
        try:
            ok = int(v) == float(v) and 0 <= int(v) < n and not isinstance(v, bool)
        except (TypeError, ValueError):
            ok = False
        return None if ok else f"label {v!r} must be an integer in 0..{n - 1}"
    return check


def _verbalized(name: str, source: str, fields: tuple[str, ...], prompt: Callable[[dict], str],
                words: Sequence[str], dev: int = 500) -> Spec:
    """A task whose candidates are label words appended to the prompt (label i -> words[i])."""
    return Spec(name, source, fields, prompt, lambda r: [prompt(r) + w for w in words],
                lambda r: _label(r, len(words)), "classification", dev=dev, check=_label_check(len(words)))


# --- prompts (MeZO's templates.py, version 0 unless said) -------------------------------------

def _sst2(r: dict) -> str:
    return f"{r['sentence'].strip()} It was"


def _rte(r: dict) -> str:
    return f"{r['premise']}\nDoes this mean that \"{r['hypothesis']}\" is true? Yes or No?\n"


def _cb(r: dict) -> str:
    return f"Suppose {r['premise']} Can we infer that \"{r['hypothesis']}\"? Yes, No, or Maybe?\n"


def _question(q: str) -> str:
    """BoolQ: end with "?" and start upper-case."""
    if not q.endswith("?"):
        q = q + "?"
    return q[0].upper() + q[1:]


def _boolq(r: dict) -> str:  # BoolQTemplateV3
    return f"{r['passage']} {_question(r['question'])}\n"


def _boolq_answer(r: dict) -> bool:
    """google/boolq has ``answer`` (bool); super_glue/boolq has ``label`` (1 = true)."""
    v = r["answer"] if r.get("answer") is not None else r["label"]
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return bool(v)


def _boolq_check(r: dict) -> str | None:
    if r.get("answer") is None and r.get("label") is None:
        return "missing field 'answer' (google/boolq) or 'label' (super_glue/boolq)"
    return None


def _wsc(r: dict) -> str:
    return (f"{r['text']}\nIn the previous sentence, does the pronoun \"{r['span2_text'].lower()}\" refer to "
            f"{r['span1_text']}? Yes or No?\n")


def _wic(r: dict) -> str:
    return (f"Does the word \"{r['word']}\" have the same meaning in these two sentences? Yes, No?\n"
            f"{r['sentence1']}\n{r['sentence2']}\n")


def _multirc(r: dict) -> str:
    return (f"{r['paragraph']}\nQuestion: {r['question']}\nI found this answer \"{r['answer']}\". "
            "Is that correct? Yes or No?\n")


_COPA_CONJ = {"effect": " so ", "cause": " because "}


def _copa(r: dict) -> str:
    premise = r["premise"].rstrip()
    if premise.endswith("."):
        premise = premise[:-1]
    return premise + _COPA_CONJ[r["question"]]


def _copa_choice(c: str) -> str:
    """MeZO's "correct" capitalization: the first word lower-cased unless it is "I"."""
    words = c.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


def _copa_check(r: dict) -> str | None:
    if r["question"] not in _COPA_CONJ:
        return f"question {r['question']!r} must be 'cause' or 'effect'"
    return _label_check(2)(r)


def _record_passage(r: dict) -> str:  # ReCoRDTemplateGPT3
    return r["passage"].replace("@highlight\n", "- ")


def _record(r: dict) -> str:
    return f"{_record_passage(r)}\n-"


def _record_options(r: dict) -> list[str]:
    return [f"{_record_passage(r)}\n- {r['query'].replace('@placeholder', e)}" for e in r["entities"]]


def _record_correct(r: dict) -> list[int]:
    # MeZO: candidates.index(answer) for every answer (the first match when an entity repeats)
    return [list(r["entities"]).index(a) for a in r["answers"]]


def _record_check(r: dict) -> str | None:
    for f in ("entities", "answers"):
        if not isinstance(r[f], list) or not r[f] or not all(isinstance(x, str) for x in r[f]):
            return f"field {f!r} must be a non-empty list of strings"
    missing = [a for a in r["answers"] if a not in r["entities"]]
    return f"answer {missing[0]!r} is not one of the entities" if missing else None


def _texts(v: Any, key: str) -> list[str]:
    """Answers as a list: HF's ``{"text": [...]}`` (SQuAD) / ``{"spans": [...]}`` (DROP) or a list."""
    if isinstance(v, dict):
        v = v.get(key)
    return list(v) if isinstance(v, (list, tuple)) else []


def _squad(r: dict) -> str:
    return f"Title: {r['title']}\nContext: {r['context']}\nQuestion: {r['question'].strip()}\nAnswer:"


def _squad_answers(r: dict) -> list[str]:
    return _texts(r["answers"], "text")


def _drop(r: dict) -> str:
    return f"Passage: {r['passage']}\nQuestion: {r['question'].strip()}\nAnswer:"


def _drop_answers(r: dict) -> list[str]:
    return _texts(r["answers_spans"], "spans")


def _generation(name: str, source: str, fields: tuple[str, ...], prompt: Callable[[dict], str],
                answers: Callable[[dict], list[str]], field: str, key: str) -> Spec:
    def check(r: dict) -> str | None:
        a = answers(r)
        if not a or not all(isinstance(x, str) for x in a):
            return (f"field {field!r} must hold at least one answer text "
                    f"(a list of strings or {{{key!r}: [...]}})")
        return None
    # MeZO's verbalize: prompt + " " + the first answer + a newline (the teacher-forced target)
    return Spec(name, source, fields, prompt, lambda r: [f"{prompt(r)} {answers(r)[0]}\n"], lambda r: 0, "lm",
                answers=answers, check=check)


MEZO_TASKS: dict[str, Spec] = {s.name: s for s in [
    _verbalized("sst2", "glue/sst2", ("sentence", "label"), _sst2, [" terrible", " great"]),
    _verbalized("rte", "super_glue/rte", ("premise", "hypothesis", "label"), _rte, ["Yes", "No"]),
    _verbalized("cb", "super_glue/cb", ("premise", "hypothesis", "label"), _cb, ["Yes", "No", "Maybe"], dev=100),
    Spec("boolq", "boolq", ("passage", "question"), _boolq, lambda r: [_boolq(r) + "Yes", _boolq(r) + "No"],
         lambda r: 0 if _boolq_answer(r) else 1, "classification", check=_boolq_check),
    _verbalized("wsc", "super_glue/wsc.fixed", ("text", "span1_text", "span2_text", "label"), _wsc, ["No", "Yes"]),
    _verbalized("wic", "super_glue/wic", ("word", "sentence1", "sentence2", "label"), _wic, ["No", "Yes"]),
    _verbalized("multirc", "super_glue/multirc", ("paragraph", "question", "answer", "label"), _multirc,
                ["No", "Yes"]),
    Spec("copa", "super_glue/copa", ("premise", "choice1", "choice2", "question", "label"), _copa,
         lambda r: [_copa(r) + _copa_choice(r["choice1"]), _copa(r) + _copa_choice(r["choice2"])],
         lambda r: int(r["label"]), "lm", dev=100, check=_copa_check),
    Spec("record", "super_glue/record", ("passage", "query", "entities", "answers"), _record, _record_options,
         _record_correct, "lm", check=_record_check),
    _generation("squad", "squad", ("title", "context", "question", "answers"), _squad, _squad_answers,
                "answers", "text"),
    _generation("drop", "drop", ("passage", "question", "answers_spans"), _drop, _drop_answers,
                "answers_spans", "spans"),
]}


def validate_rows(spec: Spec, rows: Sequence[dict]) -> None:
    """``UsageError`` naming the first row (file and line, or dataset row) that lacks a field of
    ``spec`` or holds a value its template cannot use."""
    check_fields(rows, spec.fields)
    for i, r in enumerate(rows):
        for f in spec.fields:
            if f not in ("label", "answer", "entities", "answers", "answers_spans") and not isinstance(r[f], str):
                raise UsageError(f"{where(rows, i)}: field {f!r} must be text, got {type(r[f]).__name__}")
        problem = spec.check(r) if spec.check is not None else None
        if problem:
            raise UsageError(f"{where(rows, i)}: {problem}")


@dataclass
class Rendered:
    """The exact strings of one row.

    prompt:     what the model sees before the answer (generation: what it continues).
    candidates: the full text of the prompt with each candidate, as scored (generation: the one
                teacher-forced text).
    bare:       MeZO's unjoined ``encode`` / ``verbalize`` strings (``strip(' ')`` only): the
                candidate tokens are the last len(tok(bare_option)) - len(tok(bare_prompt)).
    correct:    index of the correct candidate, or a list of indices.
    answers:    generation tasks: the gold answers.
    """

    prompt: str
    candidates: list[str]
    bare_prompt: str
    bare_options: list[str]
    correct: int | list[int]
    answers: list[str] | None = None


def demonstrations(spec: Spec, demos: Sequence[dict]) -> str:
    """In-context demonstrations as MeZO joins them: each row with its correct answer, stripped,
    joined by a blank line, the whole stripped."""
    texts = []
    for d in demos:
        opts, c = spec.options(d), spec.correct(d)
        texts.append(opts[c[0] if isinstance(c, list) else c].strip())
    return TRAIN_SEP.join(texts).strip()


def render(spec: Spec, row: dict, demos: Sequence[dict] = ()) -> Rendered:
    """MeZO's ``encode_prompt`` strings for ``row`` (with ``demos`` in context)."""
    context = demonstrations(spec, demos)

    def join(text: str) -> str:
        return (context + TRAIN_SEP + text).lstrip().strip(" ")

    bare_prompt = spec.prompt(row).strip(" ")
    bare_options = [o.strip(" ") for o in spec.options(row)]
    return Rendered(join(bare_prompt), [join(o) for o in bare_options], bare_prompt, bare_options,
                    spec.correct(row), spec.answers(row) if spec.answers is not None else None)


def preview(spec: Spec, rows: Sequence[dict], demos: Sequence[dict] = ()) -> list[dict[str, Any]]:
    """What the model sees, per row: ``row`` (where it came from), ``prompt``, ``candidates`` (the
    full texts as scored), ``correct``; generation tasks: ``target`` (the teacher-forced text) and
    ``answers`` (what F1/EM compare with)."""
    out = []
    for i, row in enumerate(rows):
        r = render(spec, row, demos)
        rec: dict[str, Any] = {"row": where(rows, i), "prompt": r.prompt}
        if spec.generation:
            rec.update(target=r.candidates[0], answers=r.answers)
        else:
            rec.update(candidates=r.candidates, correct=r.correct)
        out.append(rec)
    return out


# --- MeZO's sampling --------------------------------------------------------------------------

def mezo_sample(train: Sequence[dict], valid: Sequence[dict] | None, num_train: int, num_dev: int | None,
                num_eval: int | None, seed: int) -> tuple[list[dict], list[dict] | None, list[dict] | None]:
    """(train, dev, test) as MeZO draws them with ``--train_set_seed seed``.

    Train and dev: the first ``num_train + num_dev`` rows of NumPy's permutation of the train
    split under ``seed`` (MeZO's ``sample_subset`` under ``np.random.seed(seed)``; the legacy
    ``RandomState`` gives the same permutation without touching the global RNG), dev being the
    last ``num_dev``; test: the first ``num_eval`` rows of the same seed's permutation of the
    validation split (all of it when ``num_eval`` is None). Disjoint by construction.
    """
    num_dev = num_dev or 0
    need = num_train + num_dev
    if need > len(train):
        raise UsageError(f"--num-train {num_train} + --num-dev {num_dev} = {need} examples, but the training "
                         f"data has {len(train)}; lower them")
    idx = np.random.RandomState(seed).permutation(len(train)).tolist()[:need]
    picked = [train[i] for i in idx]
    tr, dev = picked[:num_train], (picked[num_train:] if num_dev else None)
    test = None
    if valid is not None:
        test = list(valid)
        if num_eval is not None:
            test = [valid[i] for i in np.random.RandomState(seed).permutation(len(valid)).tolist()[:num_eval]]
    return tr, dev, test


# --- MeZO's masked-LM k-shot suite (medium_models, LM-BFF's templates) -------------------------

@dataclass(frozen=True)
class KShotSpec:
    """A k-shot task of MeZO's ``medium_models`` (RoBERTa-style masked LMs), LM-BFF's prompt.

    template:   LM-BFF's template string, verbatim (``run_fewshot.sh``): parts between ``*``;
                ``cls``, ``mask``, ``sep+`` are special tokens; ``sent_i`` is sentence i,
                ``+sent_i`` with a space before it, ``sent-_i`` without its last character,
                ``sentl_i`` / ``+sentl_i`` with a lower-case first character; any other part is
                literal text with "_" for a space. Each part is tokenized on its own.
    sentences:  the row's fields that are sentence 0, 1.
    words:      label -> label word; each is scored as the one token of " " + word.
    limits:     LM-BFF's ``first_sent_limit`` / ``other_sent_limit`` (tokens), None: no limit.
    max_length: LM-BFF's ``max_seq_length`` for the task (tokens).
    """

    name: str
    source: str
    template: str
    sentences: tuple[str, ...]
    label_field: str
    words: dict[Any, str]
    limits: tuple[int | None, int | None] = (None, None)
    max_length: int = 128


_NLI = "*cls**sent-_0*?*mask*,*+sentl_1**sep+*"
KSHOT_TASKS: dict[str, KShotSpec] = {s.name: s for s in [
    KShotSpec("sst2", "glue/sst2", "*cls**sent_0*_It_was*mask*.*sep+*", ("sentence",), "label",
              {0: "terrible", 1: "great"}),
    KShotSpec("sst5", "SetFit/sst5", "*cls**sent_0*_It_was*mask*.*sep+*", ("text",), "label",
              {0: "terrible", 1: "bad", 2: "okay", 3: "good", 4: "great"}, (110, 20)),
    KShotSpec("mnli", "glue/mnli", _NLI, ("premise", "hypothesis"), "label",
              {0: "Yes", 1: "Maybe", 2: "No"}, (240, None), 256),
    KShotSpec("snli", "snli", _NLI, ("premise", "hypothesis"), "label", {0: "Yes", 1: "Maybe", 2: "No"},
              max_length=256),
    KShotSpec("rte", "glue/rte", _NLI, ("sentence1", "sentence2"), "label", {0: "Yes", 1: "No"},
              (240, None), 256),
    # Hugging Face's trec coarse labels: ABBR, ENTY, DESC, HUM, LOC, NUM (LM-BFF's Expression,
    # Entity, Description, Human, Location, Number)
    KShotSpec("trec", "trec", "*cls**mask*:*+sent_0**sep+*", ("text",), "coarse_label",
              {0: "Expression", 1: "Entity", 2: "Description", 3: "Human", 4: "Location", 5: "Number"}, (110, None)),
]}


def lmbff_encode(spec: KShotSpec, row: dict, tokenizer) -> list[int]:
    """Token ids of ``row`` under LM-BFF's ``template`` (see ``KShotSpec``), part by part."""
    special = {"cls": tokenizer.cls_token_id, "mask": tokenizer.mask_token_id, "sep+": tokenizer.sep_token_id}
    ids: list[int] = []
    for part in spec.template.split("*"):
        if not part:
            continue
        if part in special:
            ids.append(special[part])
            continue
        head, _, idx = part.rpartition("_")
        if head in ("sent", "+sent", "sent-", "sentl", "+sentl") and idx.isdigit():
            i = int(idx)
            text = str(row[spec.sentences[i]])
            if head.endswith("l"):
                text = text[:1].lower() + text[1:]
            if head == "sent-":
                text = text[:-1]
            if head.startswith("+"):
                text = " " + text
            toks = tokenizer.encode(text, add_special_tokens=False)
            limit = spec.limits[0 if i == 0 else 1]
            ids.extend(toks[:limit] if limit is not None else toks)
        else:
            ids.extend(tokenizer.encode(part.replace("_", " "), add_special_tokens=False))
    return ids


def kshot_sample(rows: Sequence[dict], label_field: str, k: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, dev) as LM-BFF's ``generate_k_shot_data.py``: shuffle the training rows with
    ``np.random.seed(seed)`` (a private ``RandomState`` here: the same order), then per label, in
    order of first appearance, the first ``k`` rows train and the next ``k`` dev."""
    shuffled = list(rows)
    np.random.RandomState(seed).shuffle(shuffled)
    by_label: dict[Any, list[dict]] = {}
    for r in shuffled:
        by_label.setdefault(str(r[label_field]).strip(), []).append(r)
    train = [r for group in by_label.values() for r in group[:k]]
    dev = [r for group in by_label.values() for r in group[k:2 * k]]
    return train, dev
