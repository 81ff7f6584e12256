"""SQuAD's answer normalisation, F1 and exact match (the official v1.1 script's rules, which
MeZO's ``metrics.py`` uses for SQuAD and DROP)."""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_PUNCT = set(string.punctuation)
_NO_ANSWER = ("CANNOTANSWER", "no answer")  # MeZO: such a gold answer scores exact match only


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, the articles a/an/the, and collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str, golds: Sequence[str]) -> float:
    """Best token-level F1 of ``pred`` against any gold answer, in [0, 1]."""
    if golds[0] in _NO_ANSWER:
        return float(normalize_answer(golds[0]) == normalize_answer(pred))
    return max(_f1(pred, g) for g in golds)


def exact_match(pred: str, golds: Sequence[str]) -> float:
    """1.0 if ``pred`` equals any gold answer after normalisation, else 0.0."""
    return float(any(normalize_answer(g) == normalize_answer(pred) for g in golds))
