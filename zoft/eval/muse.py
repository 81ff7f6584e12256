"""MUSE (Shi et al. 2024) unlearning metrics, following the official muse_bench protocol.

Data layout (``{data_dir}`` or ``{data_dir}/{corpus}``)::

    verbmem/forget.json          [{"prompt": str, "gt": str}, ...]
    knowmem/forget_qa.json       [{"question": str, "answer": str}, ...]   (+ retain_qa.json,
    knowmem/forget_qa_icl.json   few-shot examples, same form              forget/retain_qa_icl.json)
    privleak/forget.json         [str, ...]                                (+ holdout.json)

Metrics (all in percent except ``auc``):

- ``verbmem_f``: greedy continuation (<= 128 new tokens) of each prompt; ground truth cut to its
  first 128 tokens (BOS included, as the official code tokenizes with special tokens); mean
  ROUGE-L F1 x 100.
- ``knowmem_f`` / ``knowmem_r``: few-shot prompt "Question: {q}\\nAnswer: {a}\\n\\n" per ICL
  example, then "Question: {q}\\nAnswer: "; greedy <= 32 new tokens, cut at "\\n\\n",
  "\\nQuestion", "Question:"; mean ROUGE-L F1 x 100.
- ``auc``: Min-K% (k = 40%) AUC of forget vs holdout texts; ``privleak`` =
  (auc - auc_retrain) / auc_retrain x 100 with the retrain AUC of the chosen corpus.

Each metric carries a 95% percentile-bootstrap CI (fixed seed).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zoft.errors import UsageError
from zoft.eval.generate import decode, greedy_generate, model_max_length, pad_token_id, token_logprobs
from zoft.eval.metrics import (
    AUC_RETRAIN,
    MIN_K_RATIO,
    bootstrap_auc_ci,
    bootstrap_ci,
    forget_holdout_auc,
    min_k_score,
    privleak,
    rouge_l_f1,
)
from zoft.tasks.data import read_utf8

log = logging.getLogger(__name__)

METRICS = ("verbmem_f", "knowmem_f", "knowmem_r", "privleak")
VERBMEM_MAX_NEW_TOKENS = 128
KNOWMEM_MAX_NEW_TOKENS = 32
KNOWMEM_STOP = ("\n\n", "\nQuestion", "Question:")
_FILES = {
    "verbmem_f": ("verbmem/forget.json",),
    "knowmem_f": ("knowmem/forget_qa.json", "knowmem/forget_qa_icl.json"),
    "knowmem_r": ("knowmem/retain_qa.json", "knowmem/retain_qa_icl.json"),
    "privleak": ("privleak/forget.json", "privleak/holdout.json"),
}


# ----------------------------------------------------------------------------- single metrics

def _rouge_summary(scores: Sequence[float], seed: int) -> dict:
    pct = np.asarray(scores, dtype=np.float64) * 100.0
    lo, hi = bootstrap_ci(pct, seed=seed)
    return {"value": float(pct.mean()), "ci_lo": lo, "ci_hi": hi, "n": int(pct.size)}


def eval_verbmem(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict],
    *,
    max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool | None = None,
) -> tuple[dict, list[dict]]:
    """VerbMem on ``[{"prompt", "gt"}, ...]``.

    Returns ``({"value", "ci_lo", "ci_hi", "n"}, details)``: value = mean ROUGE-L F1 x 100 of the
    greedy continuation against the ground truth's first ``max_new_tokens`` tokens; details has
    one ``{"prompt", "gt", "output", "rougeL"}`` per record.
    """
    gens = greedy_generate(model, tokenizer, [r["prompt"] for r in records], max_new_tokens=max_new_tokens,
                           batch_size=batch_size, progress=progress, desc="verbmem")
    details = []
    for r, g in zip(records, gens):
        gt_ids = tokenizer(r["gt"], add_special_tokens=True)["input_ids"][:max_new_tokens]
        gt = decode(tokenizer, gt_ids)
        details.append({"prompt": r["prompt"], "gt": gt, "output": g.text, "rougeL": rouge_l_f1(gt, g.text)})
    return _rouge_summary([d["rougeL"] for d in details], seed), details


def knowmem_prompt(question: str, icl: Sequence[dict]) -> str:
    """Few-shot QA prompt of the official KnowMem evaluation (ends in "Answer: ")."""
    shots = "".join(f"Question: {d['question']}\nAnswer: {d['answer']}\n\n" for d in icl)
    return shots + f"Question: {question}\nAnswer: "


def eval_knowmem(
    model: Any,
    tokenizer: Any,
    qa: Sequence[dict],
    icl: Sequence[dict],
    *,
    max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool | None = None,
) -> tuple[dict, list[dict]]:
    """KnowMem on ``[{"question", "answer"}, ...]`` with the ``icl`` examples as few-shot prefix.

    Returns ``({"value", "ci_lo", "ci_hi", "n"}, details)``, value = mean ROUGE-L F1 x 100 of the
    answer (greedy, cut at the stop strings) against the reference answer.
    """
    prompts = [knowmem_prompt(d["question"], icl) for d in qa]
    gens = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_strings=KNOWMEM_STOP,
                           batch_size=batch_size, progress=progress, desc="knowmem")
    details = [{"question": d["question"], "gt": d["answer"], "output": g.text,
                "rougeL": rouge_l_f1(d["answer"], g.text)} for d, g in zip(qa, gens)]
    return _rouge_summary([d["rougeL"] for d in details], seed), details


def min_k_scores(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    ratio: float = MIN_K_RATIO,
    batch_size: int = 8,
    progress: bool | None = None,
) -> np.ndarray:
    """Min-K% score (nats, see :func:`zoft.eval.metrics.min_k_score`) of each text: shape (N,).

    Tokens are ``tokenizer.encode(text)`` (with BOS); every token after the first is scored.
    A text longer than the model's context keeps its first ``max_length`` tokens.
    """
    max_len = model_max_length(model, tokenizer)
    seqs = [tokenizer.encode(t)[:max_len] for t in texts]
    for i, s in enumerate(seqs):
        if len(s) < 2:
            raise UsageError(f"privleak text {i} encodes to {len(s)} token(s); need at least 2")
    lps = token_logprobs(model, seqs, batch_size=batch_size, pad_id=pad_token_id(tokenizer),
                         progress=progress, desc="min-k%")
    return np.array([min_k_score(lp, ratio) for lp in lps])


def eval_privleak(
    model: Any,
    tokenizer: Any,
    forget_texts: Sequence[str],
    holdout_texts: Sequence[str],
    *,
    auc_retrain: float,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool | None = None,
) -> tuple[dict, dict, dict]:
    """PrivLeak and its AUC.

    Returns ``(auc, privleak, details)``: ``auc = {"value", "ci_lo", "ci_hi", "n_forget",
    "n_holdout"}`` (AUC in [0, 1]); ``privleak = {"value", "ci_lo", "ci_hi", "auc_retrain"}``
    in percent; details ``{"forget": scores, "holdout": scores}``.
    """
    if auc_retrain <= 0:
        raise UsageError(f"retrain AUC must be > 0, got {auc_retrain}")
    f = min_k_scores(model, tokenizer, forget_texts, batch_size=batch_size, progress=progress)
    h = min_k_scores(model, tokenizer, holdout_texts, batch_size=batch_size, progress=progress)
    a = forget_holdout_auc(f, h)
    lo, hi = bootstrap_auc_ci(f, h, seed=seed)
    auc = {"value": a, "ci_lo": lo, "ci_hi": hi, "n_forget": int(f.size), "n_holdout": int(h.size)}
    pl = {"value": privleak(a, auc_retrain), "ci_lo": privleak(lo, auc_retrain),
          "ci_hi": privleak(hi, auc_retrain), "auc_retrain": auc_retrain}
    return auc, pl, {"forget": f.tolist(), "holdout": h.tolist()}


# ----------------------------------------------------------------------------- data + driver

def muse_root(data_dir: str | Path, corpus: str | None = None) -> Path:
    """The folder holding ``verbmem/``, ``knowmem/``, ``privleak/``: ``data_dir/corpus`` when it
    exists (the official ``data/{news,books}`` layout), else ``data_dir`` itself."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UsageError(f"data directory '{data_dir}' does not exist")
    if corpus and (root / corpus).is_dir():
        return root / corpus
    return root


def _read_json_list(path: Path) -> list:
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise UsageError(f"{path}: expected a JSON list")
    return data


def _records(path: Path, keys: tuple[str, ...], limit: int | None) -> list[dict]:
    data = _read_json_list(path)
    for i, d in enumerate(data):
        if not isinstance(d, dict) or any(not isinstance(d.get(k), str) for k in keys):
            raise UsageError(f"{path} item {i}: expected an object with string field(s) {', '.join(keys)}")
    return data[:limit]


def _texts(path: Path, limit: int | None) -> list[str]:
    """privleak files are lists of strings; objects with a "text" field are accepted too."""
    out = []
    for i, d in enumerate(_read_json_list(path)):
        t = d.get("text") if isinstance(d, dict) else d
        if not isinstance(t, str):
            raise UsageError(f"{path} item {i}: expected a string (or an object with a 'text' string)")
        out.append(t)
    return out[:limit]


def _read_metric_files(root: Path, metric: str, limit: int | None) -> tuple:
    """The validated records a metric needs (see the module docstring for the formats)."""
    if metric == "verbmem_f":
        return (_records(root / "verbmem/forget.json", ("prompt", "gt"), limit),)
    if metric in ("knowmem_f", "knowmem_r"):
        split = "forget" if metric == "knowmem_f" else "retain"
        return (_records(root / f"knowmem/{split}_qa.json", ("question", "answer"), limit),
                _records(root / f"knowmem/{split}_qa_icl.json", ("question", "answer"), None))
    return (_texts(root / "privleak/forget.json", limit), _texts(root / "privleak/holdout.json", limit))


def check_muse_data(data_dir: str | Path, corpus: str | None = None,
                    metrics: Iterable[str] | None = None) -> list[str]:
    """The metrics that can run on ``data_dir``: all of ``metrics`` (an error if a file is
    missing) or, when ``metrics`` is None, every metric whose files exist (others are skipped
    with a warning). The files are parsed, so malformed data fails here, before any model work.
    Raises ``UsageError`` when nothing can run."""
    root = muse_root(data_dir, corpus)
    explicit = metrics is not None
    metrics = list(metrics) if explicit else list(METRICS)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise UsageError(f"unknown MUSE metric(s) {', '.join(unknown) or '(none)'}; use {', '.join(METRICS)}")
    runnable = []
    for m in metrics:
        missing = [str(root / f) for f in _FILES[m] if not (root / f).is_file()]
        if missing and explicit:
            raise UsageError(f"MUSE metric {m} needs {', '.join(missing)}")
        if missing:
            log.warning("skipping %s: %s not found", m, ", ".join(missing))
        else:
            _read_metric_files(root, m, None)
            runnable.append(m)
    if not runnable:
        raise UsageError(f"no MUSE data in {root} (expected verbmem/, knowmem/ or privleak/ JSON files)")
    return runnable


def eval_muse(
    model: Any,
    tokenizer: Any,
    data_dir: str | Path,
    *,
    corpus: str = "news",
    metrics: Iterable[str] | None = None,
    retrain_auc: float | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool | None = None,
    details: bool = False,
) -> dict:
    """All MUSE metrics whose files exist (or exactly ``metrics``, which must then exist).

    corpus:      "news" or "books": picks ``data_dir/corpus`` if present and the retrain AUC.
    retrain_auc: overrides the official retrain AUC (News 0.4772, Books 0.5393).
    limit:       first N records of every file (quick looks; not comparable to full runs).
    Returns ``{"verbmem_f": {...}, "knowmem_f": {...}, "knowmem_r": {...}, "auc": {...},
    "privleak": {...}}`` (see the single-metric functions) plus ``"details"`` when asked.
    """
    if corpus not in AUC_RETRAIN and retrain_auc is None:
        raise UsageError(f"unknown MUSE corpus '{corpus}'; use news or books (or pass a retrain AUC)")
    root = muse_root(data_dir, corpus)
    runnable = check_muse_data(data_dir, corpus, metrics)

    out: dict[str, Any] = {}
    logs: dict[str, Any] = {}
    kw = {"batch_size": batch_size, "seed": seed, "progress": progress}
    if "verbmem_f" in runnable:
        (recs,) = _read_metric_files(root, "verbmem_f", limit)
        out["verbmem_f"], logs["verbmem_f"] = eval_verbmem(model, tokenizer, recs, **kw)
    for m in ("knowmem_f", "knowmem_r"):
        if m in runnable:
            qa, icl = _read_metric_files(root, m, limit)
            out[m], logs[m] = eval_knowmem(model, tokenizer, qa, icl, **kw)
    if "privleak" in runnable:
        forget, holdout = _read_metric_files(root, "privleak", limit)
        auc_r = retrain_auc if retrain_auc is not None else AUC_RETRAIN[corpus]
        out["auc"], out["privleak"], logs["privleak"] = eval_privleak(
            model, tokenizer, forget, holdout, auc_retrain=auc_r, **kw)
    if details:
        out["details"] = logs
    return out
