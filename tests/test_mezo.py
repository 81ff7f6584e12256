"""MeZO-SGD through the engine against a hand-written step of the published algorithm."""
import copy
import math

import pytest
import torch

from test_engine import TokenNLL, make_batch
from tiny_models import tiny_model
from zoft.engine import ZOEngine
from zoft.noise import make_noise
from zoft.optim import MeZOConfig, MeZOSGD, lr_at, make_optimizer
from zoft.errors import UsageError


def published_mezo_step(model, batch, obj, seeds, eps, lr, wd, one_sided=False):
    """Algorithm 1 of Malladi et al.: in-place +eps z, -2 eps z, +eps z, regenerating z each time
    (here from the keyed generator in place of re-seeding the global one), then the SGD update with
    weight decay skipped for bias / layer-norm parameters."""
    noise = make_noise()
    params = list(model.named_parameters())

    def perturb(seed, scale):
        with torch.no_grad():
            for k, p in params:
                p.add_(noise.sample(seed, k, p), alpha=scale)

    def loss():
        with torch.no_grad():
            return obj.loss(obj.forward(model, batch), batch, 1)[0].item()

    grads, plus = [], []
    for s in seeds:
        if one_sided:
            l0 = loss()
            perturb(s, eps)
            lp = loss()
            perturb(s, -eps)
            grads.append((lp - l0) / eps)
        else:
            perturb(s, eps)
            lp = loss()
            perturb(s, -2 * eps)
            lm = loss()
            perturb(s, eps)
            grads.append((lp - lm) / (2 * eps))
        plus.append(lp)
    with torch.no_grad():
        for k, p in params:
            no_decay = any(t in k for t in ("bias", "layer_norm", "layernorm"))
            if not no_decay:
                p.mul_(1 - lr * wd)
            for s, g in zip(seeds, grads):
                p.add_(noise.sample(s, k, p), alpha=-lr * g / len(seeds))
    return grads, plus


@pytest.mark.parametrize("n_queries,one_sided", [(1, False), (3, False), (2, True)])
def test_mezo_step_matches_published_algorithm(n_queries, one_sided):
    model = tiny_model("opt")
    ref = copy.deepcopy(model)
    batch, obj = make_batch("opt"), TokenNLL(True)
    cfg = MeZOConfig(lr=1e-2, eps=1e-3, weight_decay=0.1, n_queries=n_queries, one_sided=one_sided)
    opt = MeZOSGD(cfg, seed=7, total_steps=10)
    engine = ZOEngine(model)
    for step in range(2):
        losses = engine.evaluate(opt.probes(step), batch, obj)
        upd, metrics = opt.update(step, losses)
        engine.set_update(upd)
        grads, plus = published_mezo_step(ref, batch, obj, opt.seeds(step), cfg.eps, cfg.lr, cfg.weight_decay, one_sided)
        # projected gradients divide a ~1e-7 loss difference by 2 eps = 2e-3: compare absolutely.
        assert metrics["projected_grad"] == pytest.approx(sum(grads) / len(grads), abs=2e-3)
        assert metrics["loss"] == pytest.approx(sum(plus) / len(plus), rel=1e-5)
    engine.flush()
    for (k, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=k)
    engine.close()


def test_mezo_decreases_loss_on_tiny_model():
    model = tiny_model("llama", seed=1)
    batch, obj = make_batch("llama"), TokenNLL(True)
    opt = MeZOSGD(MeZOConfig(lr=1e-3, eps=1e-3, n_queries=4), seed=0, total_steps=60)
    with ZOEngine(model) as engine:
        first = engine.evaluate([opt.probes(0)[0]], batch, obj)[0].item()
        for step in range(60):
            upd, _ = opt.update(step, engine.evaluate(opt.probes(step), batch, obj))
            engine.set_update(upd)
        engine.flush()
        last = obj.loss(obj.forward(model, batch), batch, 1)[0].item()
    assert last < first - 0.1, (first, last)  # measured: 5.80 -> 5.58


def test_schedules():
    assert lr_at(5, 1.0, "constant", 10) == 1.0
    assert lr_at(0, 1.0, "linear", 10) == 1.0 and lr_at(5, 1.0, "linear", 10) == 0.5
    assert lr_at(5, 1.0, "cosine", 10) == pytest.approx(0.5)
    assert lr_at(10, 1.0, "cosine", 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(0, 1.0, "constant", 10, warmup_steps=4) == 0.25
    assert lr_at(7, 1.0, "linear", 10, warmup_steps=4) == pytest.approx(1 - 3 / 6)
    assert math.isclose(lr_at(4, 2.0, "cosine", 10, warmup_steps=4), 2.0)


def test_registry_rejects_unknown_names_and_options():
    with pytest.raises(UsageError, match="unknown optimizer 'adamw'"):
        make_optimizer("adamw", {}, 0, 1)
    with pytest.raises(UsageError, match="unknown option"):
        make_optimizer("mezo-sgd", {"momentum": 0.9}, 0, 1)
    with pytest.raises(UsageError, match="eps"):
        make_optimizer("mezo-sgd", {"eps": 0}, 0, 1)


# Which parameters take weight decay, per family (names of a 1-layer tiny model, written down by
# hand). zoft skips every name containing "bias", "norm" or "ln_" (case-insensitive). MeZO's list
# ("bias", "layer_norm", "layernorm") gives the same sets on OPT; on Llama it would decay the final
# ``model.norm.weight`` and on GPT-2 every LayerNorm weight (``ln_1``, ``ln_2``, ``ln_f``): zoft
# deliberately skips all norm parameters in every family (docs/optimizers.md, "Weight decay").
_OPT_LAYER = ["self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.q_proj.bias", "self_attn.out_proj.bias",
              "self_attn_layer_norm.weight", "self_attn_layer_norm.bias", "fc1.bias", "fc2.bias",
              "final_layer_norm.weight", "final_layer_norm.bias"]
_GPT2_LAYER = ["ln_1.weight", "ln_1.bias", "attn.c_attn.bias", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
               "mlp.c_fc.bias", "mlp.c_proj.bias"]
_BERT_NORMS = ["bert.embeddings", "bert.encoder.layer.0.attention.output", "bert.encoder.layer.0.output",
               "cls.predictions.transform"]
_BERT_LINEAR = [f"bert.encoder.layer.0.{n}" for n in ("attention.self.query", "attention.self.key",
                                                       "attention.self.value", "attention.output.dense",
                                                       "intermediate.dense", "output.dense")] + ["cls.predictions.transform.dense"]
NOT_DECAYED = {
    "opt": [f"model.decoder.layers.0.{n}" for n in _OPT_LAYER]
    + ["model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias"],
    "llama": ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
              "model.norm.weight"],
    "gpt2": [f"transformer.h.0.{n}" for n in _GPT2_LAYER] + ["transformer.ln_f.weight", "transformer.ln_f.bias"],
    # BERT spells its norms "LayerNorm": the match ignores case
    "bert": [f"{m}.LayerNorm.{w}" for m in _BERT_NORMS for w in ("weight", "bias")]
    + [f"{m}.bias" for m in _BERT_LINEAR] + ["cls.predictions.bias"],
}
DECAYED = {
    "opt": ["model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"]
    + [f"model.decoder.layers.0.{n}.weight" for n in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj",
                                                      "self_attn.out_proj", "fc1", "fc2")],
    "llama": ["model.embed_tokens.weight", "lm_head.weight"]
    + [f"model.layers.0.{n}.weight" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")],
    "gpt2": ["transformer.wte.weight", "transformer.wpe.weight"]
    + [f"transformer.h.0.{n}.weight" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")],
    "bert": [f"bert.embeddings.{n}_embeddings.weight" for n in ("word", "position", "token_type")]
    + [f"{m}.weight" for m in _BERT_LINEAR],
}


@pytest.mark.parametrize("family", ["opt", "llama", "gpt2", "bert"])
def test_weight_decay_skips_biases_and_every_norm(family):
    """A step that only decays (no direction, decay 0.5) halves exactly the parameters of
    ``DECAYED`` and leaves those of ``NOT_DECAYED`` bit-identical."""
    from zoft.engine.probes import Update

    model = tiny_model(family, layers=1)
    w0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    assert sorted(w0) == sorted(DECAYED[family] + NOT_DECAYED[family])
    with ZOEngine(model) as engine:
        engine.set_update(Update(terms=[], decay=0.5))
        engine.flush()
    for k, p in model.named_parameters():
        expect = 0.5 * w0[k] if k in DECAYED[family] else w0[k]
        assert torch.equal(p.detach(), expect), k
