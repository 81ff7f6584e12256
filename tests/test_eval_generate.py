"""Batched log-probs and greedy generation of zoft.eval against plain one-sequence loops."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_helpers import one_torch_thread, tiny_eval_opt, tok_fixture  # noqa: F401

from zoft.eval.generate import (
    clean_up_tokenization,
    continuation_logprobs,
    cut_at_stop_strings,
    decode,
    greedy_generate,
    model_max_length,
    token_logprobs,
)

PROMPTS = ["the movie was", "Question: what is the capital of France?\nAnswer:", "a",
           "It was great. It was terrible. hello world"]


@pytest.fixture(scope="module")
def model(tok):
    return tiny_eval_opt(tok, max_pos=256)


def manual_greedy(model, ids: list[int], n: int, eos: int = 2) -> list[int]:
    """Reference: full forward (no cache, no padding) and argmax, one token at a time."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out])).logits[0, -1]
            t = int(logits.argmax())
            if t == eos:
                break
            out.append(t)
    return out


def test_model_max_length(model, tok):
    assert model_max_length(model, tok) == 256


def test_token_logprobs_match_unbatched(model, tok):
    seqs = [tok.encode(p) for p in PROMPTS]
    got = token_logprobs(model, seqs, batch_size=3)
    for s, g in zip(seqs, got):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([s])).logits[0].double(), -1)  # (n, V)
        ref = np.array([lp[i, s[i + 1]].item() for i in range(len(s) - 1)])
        assert g.shape == (len(s) - 1,)
        np.testing.assert_allclose(g, ref, atol=1e-5)


def test_continuation_logprobs_fast_and_general_paths(model, tok):
    ctxs = [tok.encode(p) for p in PROMPTS]
    one_tok = [[5], [17], [40], [100]]  # single-token candidates: one forward per request
    multi = [[5, 6], [17], [40, 41, 42]]  # mixed lengths: one row per candidate
    shared = [[223, 5], [223, 6], [223, 7]]  # same prefix, last token differs: one row
    reqs = [(c, one_tok) for c in ctxs] + [(c, multi) for c in ctxs] + [(c, shared) for c in ctxs]
    got = continuation_logprobs(model, reqs, max_length=256, batch_size=3)
    for (ctx, conts), g in zip(reqs, got):
        for j, cont in enumerate(conts):
            full = ctx + cont
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
            ref = sum(lp[len(ctx) - 1 + i, cont[i]].item() for i in range(len(cont)))
            assert g[j] == pytest.approx(ref, abs=1e-4)


def test_continuation_logprobs_left_truncates_like_lm_eval(model, tok):
    ctx = tok.encode(PROMPTS[3])  # ~20 tokens
    cont = [7, 8]
    got = continuation_logprobs(model, [(ctx, [cont])], max_length=6)[0][0]
    inp = (ctx + cont)[-(6 + 1):][:-1]  # lm-eval's model input
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([inp])).logits[0].double(), -1)
    ref = lp[-2, 7].item() + lp[-1, 8].item()
    assert got == pytest.approx(ref, abs=1e-5)


def test_greedy_matches_manual_loop_and_honours_token_cap(model, tok):
    for cap in (1, 7):
        gens = greedy_generate(model, tok, PROMPTS, max_new_tokens=cap, batch_size=3)
        for p, g in zip(PROMPTS, gens):
            ref = manual_greedy(model, tok(p)["input_ids"], cap)
            assert g.token_ids == ref
            assert len(g.token_ids) <= cap
            assert g.text == decode(tok, ref)
            assert g.stopped == ("length" if len(ref) == cap else "eos")


def test_greedy_batched_equals_one_at_a_time(model, tok):
    batched = greedy_generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=4)
    single = [greedy_generate(model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]


def test_stop_strings_cut_and_stop_early(model, tok):
    free = greedy_generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=2)
    # a stop string the random model does produce: two characters from the middle of a row's output
    row = max(range(len(free)), key=lambda i: len(free[i].text))
    raw = free[row].text
    stop = raw[len(raw) // 2: len(raw) // 2 + 2]
    gens = greedy_generate(model, tok, PROMPTS, max_new_tokens=12, stop_strings=[stop, "\n\n"], batch_size=2)
    for f, g in zip(free, gens):
        assert g.text == cut_at_stop_strings(f.text, [stop, "\n\n"])
        assert g.token_ids == f.token_ids[: len(g.token_ids)]  # same greedy path, maybe shorter
        if g.stopped == "stop_string":
            # stopped at the first token whose text completes the stop string
            assert stop in decode(tok, g.token_ids) or "\n\n" in decode(tok, g.token_ids)
            assert stop not in decode(tok, g.token_ids[:-1])
    assert gens[row].stopped == "stop_string"
    assert stop not in gens[row].text


def test_cut_at_stop_strings_earliest_wins():
    stops = ("\n\n", "\nQuestion", "Question:")
    assert cut_at_stop_strings("Paris\n\nQuestion: x", stops) == "Paris"
    assert cut_at_stop_strings("Paris Question: x\n\n", stops) == "Paris "
    assert cut_at_stop_strings("Paris\nQuestion", stops) == "Paris"
    assert cut_at_stop_strings("no stop here", stops) == "no stop here"


def test_clean_up_tokenization_like_transformers_4():
    assert clean_up_tokenization("Hello , world ! Is n't it ? I 'm sure .") == "Hello, world! Isn't it? I'm sure."


def test_long_prompt_is_left_truncated(tok):
    model = tiny_eval_opt(tok, max_pos=32)
    long = " ".join(["the movie was great"] * 20)
    g = greedy_generate(model, tok, [long], max_new_tokens=4)[0]
    assert g.truncated_prompt
    ids = tok(long)["input_ids"][-(32 - 4):]
    assert g.token_ids == manual_greedy(model, ids, 4)
