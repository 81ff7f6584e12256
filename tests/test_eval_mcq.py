"""WMDP / MMLU: data formats, the lm-eval prompt, and accuracy against an independent
one-question-at-a-time log-likelihood computation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import model_fixture, one_torch_thread, tok_fixture  # noqa: F401

from zoft.errors import UsageError
from zoft.eval.mcq import (
    choice_loglikelihoods,
    encode_pair,
    eval_mmlu,
    eval_wmdp,
    format_prompt,
    load_mmlu,
    load_wmdp,
)

FIX = Path(__file__).parent / "fixtures"


def reference_loglik(model, tok, item, subject, add_special_tokens=True) -> np.ndarray:
    """Independent path: for each letter, one unpadded forward of encode(context + " X") and the
    sum of log-probs of the tokens beyond encode(context)."""
    ctx = ("The following are multiple choice questions (with answers) about " + subject + ".\n\n"
           + item["question"].strip() + "\n"
           + "\n".join(f"{L}. {c}" for L, c in zip("ABCD", item["choices"])) + "\nAnswer:")
    c = tok(ctx, add_special_tokens=add_special_tokens)["input_ids"]
    out = []
    for L in "ABCD":
        full = tok(ctx + " " + L, add_special_tokens=add_special_tokens)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)  # (n, V)
        out.append(sum(lp[p - 1, full[p]].item() for p in range(len(c), len(full))))
    return np.array(out)


def test_prompt_format():
    p = format_prompt("  What is 2+2? \n", ["3", "4", "5", "6"], "biology")
    assert p == ("The following are multiple choice questions (with answers) about biology.\n\n"
                 "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")


def test_encode_pair_moves_trailing_space(tok):
    ctx, cont = encode_pair(tok, "Answer: ", "A")
    ctx2, cont2 = encode_pair(tok, "Answer:", " A")
    assert (ctx, cont) == (ctx2, cont2)
    assert ctx[0] == tok.bos_token_id
    assert encode_pair(tok, "Answer:", " A", add_special_tokens=False)[0][0] != tok.bos_token_id


def test_wmdp_accuracy_equals_independent_loglikelihoods(model, tok):
    data = load_wmdp(FIX / "wmdp")
    res = eval_wmdp(model, tok, FIX / "wmdp", batch_size=3)
    total_correct = 0
    for s, subject in (("bio", "biology"), ("cyber", "cybersecurity"), ("chem", "chemistry")):
        items = data[s]
        ll = choice_loglikelihoods(model, tok, items, subject, batch_size=3)
        ref = np.stack([reference_loglik(model, tok, it, subject) for it in items])
        np.testing.assert_allclose(ll, ref, atol=1e-4)
        correct = ref.argmax(1) == np.array([it["answer"] for it in items])
        total_correct += int(correct.sum())
        assert res[f"wmdp_{s}"]["n"] == len(items)
        assert res[f"wmdp_{s}"]["acc"] == pytest.approx(correct.mean())
    assert res["wmdp"]["n"] == 15
    assert res["wmdp"]["acc"] == pytest.approx(total_correct / 15)  # question-weighted


def test_no_bos_variant_matches_reference(model, tok):
    items = load_wmdp(FIX / "wmdp", subsets=["chem"])["chem"]
    ll = choice_loglikelihoods(model, tok, items, "chemistry", add_special_tokens=False)
    ref = np.stack([reference_loglik(model, tok, it, "chemistry", add_special_tokens=False) for it in items])
    np.testing.assert_allclose(ll, ref, atol=1e-4)


def test_mmlu_csv_layout_and_accuracy(model, tok):
    data = load_mmlu(FIX / "mmlu")
    assert list(data) == ["abstract_algebra", "anatomy"]
    assert data["abstract_algebra"][3] == {"question": 'How many elements does S_3 have, with "quotes", commas?',
                                           "choices": ["3", "6", "9", "12"], "answer": 1}
    res = eval_mmlu(model, tok, FIX / "mmlu", limit=2)
    assert res["mmlu_anatomy"]["n"] == 2 and res["mmlu"]["n"] == 4
    items = data["anatomy"][:2]
    ref = np.stack([reference_loglik(model, tok, it, "anatomy") for it in items])
    acc = (ref.argmax(1) == [it["answer"] for it in items]).mean()
    assert res["mmlu_anatomy"]["acc"] == pytest.approx(acc)
    assert set(eval_mmlu(model, tok, FIX / "mmlu", subjects=["anatomy"], limit=1)) == {"mmlu_anatomy", "mmlu"}


def test_mmlu_flat_jsonl_with_subject_field(tmp_path):
    recs = [{"question": "q1", "subject": "virology", "choices": ["a", "b", "c", "d"], "answer": 2},
            {"question": "q2", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": "D"}]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    data = load_mmlu(tmp_path)
    assert data == {"anatomy": [{"question": "q2", "choices": ["a", "b", "c", "d"], "answer": 3}],
                    "virology": [{"question": "q1", "choices": ["a", "b", "c", "d"], "answer": 2}]}


def test_parquet_hf_layouts(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    bio = json.loads((FIX / "wmdp" / "wmdp-bio.json").read_text())
    (tmp_path / "wmdp" / "wmdp-bio").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(bio), tmp_path / "wmdp" / "wmdp-bio" / "test-00000-of-00001.parquet")
    assert load_wmdp(tmp_path / "wmdp", subsets=["bio"])["bio"] == [
        {"question": r["question"], "choices": r["choices"], "answer": r["answer"]} for r in bio]
    # cais/mmlu: one folder per subject, plus "all" (ignored when subject folders exist)
    rows = [{"question": "q", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 1}]
    for sub in ("anatomy", "all"):
        (tmp_path / "mmlu" / sub).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mmlu" / sub / "test-00000-of-00001.parquet")
        pq.write_table(pa.Table.from_pylist(rows * 2), tmp_path / "mmlu" / sub / "dev-00000-of-00001.parquet")
    assert {k: len(v) for k, v in load_mmlu(tmp_path / "mmlu").items()} == {"anatomy": 1}
    assert {k: len(v) for k, v in load_mmlu(tmp_path / "mmlu", split="dev").items()} == {"anatomy": 2}


def test_input_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_wmdp(tmp_path / "missing")
    with pytest.raises(UsageError, match="unknown WMDP subset"):
        load_wmdp(FIX / "wmdp", subsets=["bio", "physics"])
    with pytest.raises(UsageError, match="no WMDP 'bio' data"):
        load_wmdp(tmp_path, subsets=["bio"])
    (tmp_path / "wmdp-bio.json").write_text('[{"question": "q", ')
    with pytest.raises(UsageError, match="malformed JSON"):
        load_wmdp(tmp_path, subsets=["bio"])
    (tmp_path / "wmdp-bio.json").write_text('[{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 4}]')
    with pytest.raises(UsageError, match="item 0: 'answer' must be 0-3"):
        load_wmdp(tmp_path, subsets=["bio"])
    (tmp_path / "wmdp-bio.json").write_text('[{"question": "q", "choices": ["a", "b"], "answer": 0}]')
    with pytest.raises(UsageError, match="4 strings"):
        load_wmdp(tmp_path, subsets=["bio"])
    with pytest.raises(UsageError, match="unknown MMLU subject"):
        load_mmlu(FIX / "mmlu", subjects=["astrology"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no MMLU 'test' data"):
        load_mmlu(empty)
