"""MUSE metrics on tiny models: a model trained to memorise the forget data, a random model on
same-distribution forget/holdout sets, and the official file layout (tests/fixtures/muse)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import one_torch_thread, tiny_eval_opt, tok_fixture  # noqa: F401

pytest.importorskip("rouge_score")
pytest.importorskip("sklearn")

from zoft.errors import UsageError
from zoft.eval.muse import (
    KNOWMEM_STOP,
    check_muse_data,
    eval_knowmem,
    eval_muse,
    eval_verbmem,
    knowmem_prompt,
    min_k_scores,
)

FIXTURES = Path(__file__).parent / "fixtures" / "muse"
EOS = 2

# A small MUSE dataset whose forget side the memorising model is trained on.
VERBMEM = [{"prompt": "the movie was", "gt": " great and the acting was wonderful."},
           {"prompt": "a fine film", "gt": " with a lovely cast"}]
ICL = [{"question": "what is the capital of France?", "answer": "Paris"}]
FORGET_QA = [{"question": "was the movie great?", "answer": "Yes"},
             {"question": "was the plot boring?", "answer": "No"}]
FORGET = ["the plot was boring and the movie was terrible", "an awful waste of time",
          "It was great. hello world 0123", "a wonderful film with a fine cast"]
HOLDOUT = ["the acting was wonderful and the plot was great", "a lovely waste of a fine film",
           "It was terrible. hello 456789", "the capital of France is Paris"]


def tiny_opt(tok, seed: int = 0, hidden: int = 32):
    """Dropout off: the memorising model is trained in train mode."""
    return tiny_eval_opt(tok, hidden=hidden, seed=seed, max_pos=256, dropout=0.0, attention_dropout=0.0)


def write_muse(root: Path, verbmem, forget_qa, icl, forget, holdout) -> Path:
    for sub in ("verbmem", "knowmem", "privleak"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    files = {"verbmem/forget.json": verbmem, "knowmem/forget_qa.json": forget_qa,
             "knowmem/forget_qa_icl.json": icl, "privleak/forget.json": forget, "privleak/holdout.json": holdout}
    for name, data in files.items():
        (root / name).write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def memorised(tok):
    """A tiny OPT trained (Adam, 100 full-batch steps) on exactly the token sequences the MUSE
    evaluation will feed it for the forget side: prompt + ground truth + EOS, the KnowMem prompt +
    answer + "\\n\\n", and each privleak forget text + EOS."""
    seqs = [tok(r["prompt"])["input_ids"] + tok(r["gt"], add_special_tokens=False)["input_ids"] + [EOS]
            for r in VERBMEM]
    seqs += [tok(knowmem_prompt(d["question"], ICL))["input_ids"]
             + tok(d["answer"] + "\n\n", add_special_tokens=False)["input_ids"] for d in FORGET_QA]
    seqs += [tok(t)["input_ids"] + [EOS] for t in FORGET]
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)  # (N, T) right-padded
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = labels[i, : len(s)] = torch.tensor(s)
    model = tiny_opt(tok, hidden=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(100):
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_knowmem_prompt_format():
    icl = [{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"}]
    assert knowmem_prompt("Q?", icl) == "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\nQuestion: Q?\nAnswer: "
    assert knowmem_prompt("Q?", []) == "Question: Q?\nAnswer: "
    assert KNOWMEM_STOP == ("\n\n", "\nQuestion", "Question:")


def test_memorised_model_scores_like_an_unlearning_failure(memorised, tok, tmp_path):
    root = write_muse(tmp_path, VERBMEM, FORGET_QA, ICL, FORGET, HOLDOUT)
    res = eval_muse(memorised, tok, root, corpus="news", details=True)
    # verbatim and QA memorisation: continuations reproduce the forget data exactly
    assert res["verbmem_f"]["value"] == pytest.approx(100.0)
    assert res["knowmem_f"]["value"] == pytest.approx(100.0)
    assert [d["output"] for d in res["details"]["knowmem_f"]] == ["Yes", "No"]  # cut before "\n\n"
    # every forget text is more familiar than every holdout text
    assert res["auc"]["value"] == pytest.approx(0.0, abs=1e-9)
    assert res["privleak"]["value"] == pytest.approx(-100.0)
    assert res["privleak"]["auc_retrain"] == 0.4772
    assert "knowmem_r" not in res  # retain files absent -> skipped
    # books uses its own retrain AUC; an explicit one overrides it
    res_b = eval_muse(memorised, tok, root, corpus="books", metrics=["privleak"], retrain_auc=0.25)
    assert res_b["privleak"]["auc_retrain"] == 0.25 and set(res_b) == {"auc", "privleak"}


def test_partial_overlap_scores_rouge_l_f1(memorised, tok):
    """References that the memorised continuations only partly match: the score is ROUGE-L F1
    (not recall, not precision), worked out by hand on rouge-score's lower-cased word tokens.

    verbmem, output "great and the acting was wonderful" (6 words):
      gt "great and the plot" (4): LCS "great and the" = 3, P 3/6, R 3/4, F1 = 2 PR / (P + R) = 0.6
    verbmem, output "with a lovely cast" (4 words):
      gt "with a lovely cast and a good story" (8): LCS 4, P 1, R 1/2, F1 = 2/3
      -> value = 100 (0.6 + 2/3) / 2 = 63.33 (recall would give 62.5, precision 75)
    knowmem, outputs "Yes" / "No" against "Yes it was" / "No": P 1, R 1/3, F1 = 1/2; and 1
      -> value = 75 (recall 66.67)"""
    recs = [{"prompt": VERBMEM[0]["prompt"], "gt": " great and the plot"},
            {"prompt": VERBMEM[1]["prompt"], "gt": " with a lovely cast and a good story"}]
    summary, det = eval_verbmem(memorised, tok, recs)
    assert [d["output"] for d in det] == [VERBMEM[0]["gt"], VERBMEM[1]["gt"]]  # what the model memorised
    assert [d["rougeL"] for d in det] == pytest.approx([0.6, 2 / 3])
    assert summary["value"] == pytest.approx(100 * (0.6 + 2 / 3) / 2)
    qa = [{"question": FORGET_QA[0]["question"], "answer": "Yes it was"}, FORGET_QA[1]]
    summary, det = eval_knowmem(memorised, tok, qa, ICL)
    assert [d["output"] for d in det] == ["Yes", "No"]
    assert summary["value"] == pytest.approx(75.0) and summary["n"] == 2


def test_same_distribution_auc_near_half(tok):
    model = tiny_opt(tok, seed=1)
    rng = np.random.default_rng(0)
    words = ["the", "movie", "was", "great", "terrible", "plot", "acting", "film", "cast", "a", "fine", "awful", "boring", "lovely", "time"]

    def texts(n):
        return [" ".join(rng.choice(words, size=rng.integers(4, 12))) for _ in range(n)]

    f = min_k_scores(model, tok, texts(150), batch_size=16)
    h = min_k_scores(model, tok, texts(150), batch_size=16)
    from zoft.eval.metrics import forget_holdout_auc

    # std of the AUC of two same-distribution samples of 150 is ~0.033
    assert abs(forget_holdout_auc(f, h) - 0.5) < 0.12


def test_min_k_scores_use_tokens_after_bos(tok):
    model = tiny_opt(tok)
    text = "the movie was great and the acting was wonderful"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    per_tok = np.array([lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)])
    k = int(0.4 * per_tok.size)
    expect = -np.sort(per_tok)[:k].mean()
    assert min_k_scores(model, tok, [text])[0] == pytest.approx(expect, abs=1e-5)


def test_verbmem_ground_truth_cut_to_token_cap(tok):
    model = tiny_opt(tok)
    rec = [{"prompt": "the movie", "gt": " was great and the acting was wonderful and the plot was boring"}]
    summary, det = eval_verbmem(model, tok, rec, max_new_tokens=6)
    ids = tok(rec[0]["gt"])["input_ids"]
    assert ids[0] == tok.bos_token_id  # BOS counts towards the 6, as in the official code
    assert det[0]["gt"] == tok.decode(ids[:6], skip_special_tokens=True)
    assert summary["n"] == 1 and summary["value"] == pytest.approx(100 * det[0]["rougeL"])


def test_knowmem_stop_strings_honoured(memorised, tok):
    # the memorised model answers then emits "\n\n": the answer must not contain any stop string
    _, det = eval_knowmem(memorised, tok, FORGET_QA, ICL, max_new_tokens=32)
    for d in det:
        assert not any(s in d["output"] for s in KNOWMEM_STOP)
    # a 1-token cap truncates the answer
    _, det1 = eval_knowmem(memorised, tok, FORGET_QA, ICL, max_new_tokens=1)
    for d in det1:
        assert len(tok(d["output"], add_special_tokens=False)["input_ids"]) <= 1


def test_fixture_layout_end_to_end(tok):
    model = tiny_opt(tok)
    res = eval_muse(model, tok, FIXTURES, corpus="news", limit=2, batch_size=2)
    assert set(res) == {"verbmem_f", "knowmem_f", "knowmem_r", "auc", "privleak"}
    assert res["verbmem_f"]["n"] == 2 and res["knowmem_r"]["n"] == 2
    assert res["auc"]["n_forget"] == 2 and res["auc"]["n_holdout"] == 2
    for k in ("verbmem_f", "knowmem_f", "knowmem_r"):
        r = res[k]
        assert 0.0 <= r["ci_lo"] <= r["value"] <= r["ci_hi"] <= 100.0
    assert res["privleak"]["value"] == pytest.approx((res["auc"]["value"] - 0.4772) / 0.4772 * 100)


def test_data_errors(tmp_path, tok):
    with pytest.raises(UsageError, match="does not exist"):
        check_muse_data(tmp_path / "nope", "news")
    with pytest.raises(UsageError, match="no MUSE data"):
        check_muse_data(tmp_path, "news")
    with pytest.raises(UsageError, match="unknown MUSE metric"):
        check_muse_data(FIXTURES, "news", ["verbmem"])
    assert check_muse_data(FIXTURES, "news") == ["verbmem_f", "knowmem_f", "knowmem_r", "privleak"]
    (tmp_path / "privleak").mkdir()
    (tmp_path / "privleak" / "forget.json").write_text("[\"a\", ")
    (tmp_path / "privleak" / "holdout.json").write_text("[\"b b b\"]")
    with pytest.raises(UsageError, match="needs"):
        check_muse_data(tmp_path, "news", ["verbmem_f"])
    with pytest.raises(UsageError, match="malformed JSON"):
        eval_muse(tiny_opt(tok), tok, tmp_path, corpus="news")
    with pytest.raises(UsageError, match="unknown MUSE corpus"):
        eval_muse(tiny_opt(tok), tok, FIXTURES, corpus="arxiv")
