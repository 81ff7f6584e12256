"""Metric functions of zoft.eval against values computed by hand."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("rouge_score")
pytest.importorskip("sklearn")

from zoft.eval.metrics import (
    AUC_RETRAIN,
    accuracy_stderr,
    bootstrap_auc_ci,
    bootstrap_ci,
    forget_holdout_auc,
    min_k_score,
    privleak,
    rouge_l_f1,
)


def test_rouge_l_exact_copy_is_one():
    text = "The city council met on Tuesday evening to discuss the new budget."
    assert rouge_l_f1(text, text) == 1.0


def test_rouge_l_hand_computed():
    # ref 6 tokens, pred 4 tokens, LCS "the cat on mat" = 4: P = 1, R = 4/6, F = 2PR/(P+R) = 0.8
    assert rouge_l_f1("the cat sat on the mat", "the cat on mat") == pytest.approx(0.8)
    # rouge-score lower-cases and drops punctuation; no stemmer: "cats" != "cat"
    assert rouge_l_f1("The CAT, sat.", "the cat sat") == 1.0
    assert rouge_l_f1("cats", "cat") == 0.0
    assert rouge_l_f1("anything", "") == 0.0


def test_min_k_hand_computed():
    lp = [-1.0, -5.0, -2.0, -4.0, -3.0]  # n = 5, k = int(0.4 * 5) = 2 -> lowest -5, -4
    assert min_k_score(lp) == pytest.approx(4.5)
    assert min_k_score(lp, ratio=0.6) == pytest.approx(4.0)  # k = 3 -> -5, -4, -3
    # n = 10, k = 4
    assert min_k_score(-np.arange(10.0)) == pytest.approx((9 + 8 + 7 + 6) / 4)
    # k = int(0.4 * 2) = 0: zoft uses the single lowest (official code would give NaN)
    assert min_k_score([-1.0, -7.0]) == pytest.approx(7.0)


def test_auc_hand_computed():
    # forget texts with low Min-K% (familiar) vs holdout with high: fully memorised -> 0
    assert forget_holdout_auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert forget_holdout_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    # one inversion out of 2x2 pairs: holdout 1.5 below forget 2.0 -> AUC = 1/4
    assert forget_holdout_auc([1.0, 2.0], [1.5, 3.0]) == pytest.approx(0.25)
    # ties count one half
    assert forget_holdout_auc([1.0], [1.0]) == pytest.approx(0.5)


def test_auc_equals_mann_whitney_count():
    rng = np.random.default_rng(3)
    f = rng.normal(size=40).round(1)  # rounding makes ties
    h = rng.normal(0.3, size=30).round(1)
    # AUC of -score with holdout positive = P(-h > -f) + 0.5 P(tie) = P(h < f) + 0.5 P(h == f)
    expect = ((h[None, :] < f[:, None]).sum() + 0.5 * (h[None, :] == f[:, None]).sum()) / (f.size * h.size)
    assert forget_holdout_auc(f, h) == pytest.approx(expect)


def test_privleak_formula_and_constants():
    assert AUC_RETRAIN == {"news": 0.4772, "books": 0.5393}
    assert privleak(0.0, AUC_RETRAIN["news"]) == pytest.approx(-100.0)
    assert privleak(AUC_RETRAIN["books"], AUC_RETRAIN["books"]) == 0.0
    assert privleak(0.5, 0.4772) == pytest.approx((0.5 - 0.4772) / 0.4772 * 100)


def test_bootstrap_ci_properties():
    assert bootstrap_ci([3.0] * 7) == (3.0, 3.0)
    x = np.random.default_rng(0).normal(10.0, 2.0, size=400)
    lo, hi = bootstrap_ci(x, seed=1)
    assert bootstrap_ci(x, seed=1) == (lo, hi)  # fixed seed -> reproducible
    assert lo < x.mean() < hi
    # the percentile interval of a mean is close to +-1.96 standard errors
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_bootstrap_auc_ci_brackets_auc():
    rng = np.random.default_rng(0)
    f, h = rng.normal(0, 1, 60), rng.normal(1, 1, 60)
    lo, hi = bootstrap_auc_ci(f, h, n_resamples=300, seed=0)
    assert lo < forget_holdout_auc(f, h) < hi
    assert 0.0 <= lo and hi <= 1.0


def test_accuracy_stderr_like_lm_eval():
    c = [1, 0, 1, 1]
    assert accuracy_stderr(c) == pytest.approx(np.std(c, ddof=1) / 2)
