"""The engine against plain references: P separate perturbed forward passes of the whole model."""
import copy

import pytest
import torch
import torch.nn.functional as F

from tiny_models import ENCODERS, FAMILIES, tiny_batch, tiny_model
from zoft.engine import Probe, Update, ZOEngine
from zoft.noise import make_noise
from zoft.tasks.base import Batch

# fp32: the engine and the reference add the same z to the same weights; what differs is the
# order of floating-point reductions in batched vs. per-probe matmuls (~1e-7 relative).
RTOL = 1e-5


class TokenNLL:
    """Per-probe mean next-token NLL (causal) or mean token NLL against the inputs (masked)."""

    def __init__(self, causal: bool):
        self.causal = causal

    def forward(self, model, batch):
        return model(**batch.inputs)

    def loss(self, outputs, batch, num_probes):
        logits = outputs.logits.float()  # (P*R, T, V)
        ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        if self.causal:
            logits, ids, mask = logits[:, :-1], ids[:, 1:], mask[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none") * mask  # (P*R, T)
        return nll.reshape(num_probes, -1).sum(1) / mask.reshape(num_probes, -1).sum(1)


def make_batch(family):
    inputs = tiny_batch()
    if family in ENCODERS:
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    return Batch(inputs, size=inputs["input_ids"].shape[0])


def reference_losses(model, probes, batch, objective, noise):
    """P separate forward passes of a deep copy of the whole model, perturbed by hand."""
    out = []
    for pr in probes:
        m = copy.deepcopy(model)
        with torch.no_grad():
            for k, p in m.named_parameters():
                if pr.seed is not None and p.requires_grad:
                    p.copy_(p + pr.scale * noise.sample(pr.seed, k, p).to(p.dtype))
            out.append(objective.loss(objective.forward(m, batch), batch, 1)[0].item())
    return torch.tensor(out, dtype=torch.float64)


def reference_update(model, update, no_decay=("bias", "norm", "ln_")):
    with torch.no_grad():
        for k, p in model.named_parameters():
            decay = update.decay if not any(s in k.lower() for s in no_decay) else 1.0
            z_sum = sum(c * make_noise().sample(s, k, p) for s, c in update.terms)
            p.copy_(decay * p + z_sum)


PROBE_SETS = {
    "mezo": [Probe(11, 1e-2), Probe(11, -1e-2)],
    "nquery+plain": [Probe(None), Probe(5, 3e-2), Probe(7, 3e-2), Probe(7, -3e-2)],
}


@pytest.mark.parametrize("probes", sorted(PROBE_SETS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_engine_equals_separate_perturbed_passes(family, probes):
    probes = PROBE_SETS[probes]
    model = tiny_model(family)
    ref = copy.deepcopy(model)
    obj = TokenNLL(causal=family not in ENCODERS)
    batch = make_batch(family)
    noise = make_noise()
    engine = ZOEngine(model)

    # a pending update from a "previous step" must be applied before this step's probes
    upd = Update(terms=[(3, -1e-3), (4, 2e-3)], decay=1 - 1e-2)
    engine.set_update(upd)
    reference_update(ref, upd)

    losses = engine.evaluate(probes, batch, obj)
    expected = reference_losses(ref, probes, batch, obj, noise)
    torch.testing.assert_close(losses, expected, rtol=RTOL, atol=0)
    for (k, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=1e-7, msg=k)
    assert losses.std() > 0  # the probes really see different weights
    engine.close()


def test_restore_is_exact_and_hooks_leave_no_trace():
    model = tiny_model("llama")
    before = {k: p.clone() for k, p in model.named_parameters()}
    batch = make_batch("llama")
    obj = TokenNLL(causal=True)
    plain = obj.loss(obj.forward(model, batch), batch, 1)
    with ZOEngine(model) as engine:
        engine.evaluate(PROBE_SETS["nquery+plain"], batch, obj)
        engine.set_update(Update(terms=[(1, 0.0)], decay=1.0))  # lr 0
        engine.evaluate(PROBE_SETS["mezo"], batch, obj)
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k]), k  # bitwise: restore points each parameter back at w0, never written
    assert torch.equal(obj.loss(obj.forward(model, batch), batch, 1), plain)


def test_tied_weights_share_one_perturbation_and_one_update():
    model = tiny_model("opt")
    key = "model.decoder.embed_tokens.weight"
    w0 = dict(model.named_parameters())[key].clone()
    engine = ZOEngine(model)
    engine.set_update(Update(terms=[(9, 0.5)]))
    engine.flush()
    z = make_noise().sample(9, key, w0)
    torch.testing.assert_close(model.lm_head.weight, w0 + 0.5 * z)  # once, not twice
    engine.close()


def test_weights_restored_when_forward_raises():
    model = tiny_model("gpt2")
    before = {k: p.clone() for k, p in model.named_parameters()}

    class Boom(TokenNLL):
        def forward(self, model, batch):
            model(**batch.inputs)
            raise RuntimeError("boom")

    with ZOEngine(model) as engine:
        with pytest.raises(RuntimeError):
            engine.evaluate(PROBE_SETS["mezo"], make_batch("gpt2"), Boom(True))
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k]), k


def test_frozen_parameters_are_never_touched():
    model = tiny_model("qwen2")
    for n, p in model.named_parameters():
        p.requires_grad_("layers.1" in n)
    before = {k: p.clone() for k, p in model.named_parameters()}
    with ZOEngine(model) as engine:
        engine.set_update(Update(terms=[(2, 1e-2)], decay=0.9))
        engine.evaluate(PROBE_SETS["mezo"], make_batch("qwen2"), TokenNLL(True))
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k]) == ("layers.1" not in k), k
