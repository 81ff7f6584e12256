"""Unlearning objectives against hand computations on a tiny random OPT (per-token loops over
log_softmax, independent of the code's cross-entropy path), and FO / ZO consistency.

Tolerances: fp32 sums over <= 60 tokens: 1e-5 relative."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from eval_helpers import one_torch_thread, tiny_eval_opt, tok_fixture  # noqa: F401

from zoft.engine.core import ZOEngine
from zoft.engine.probes import Probe
from zoft.unlearn import make_batch, make_objective

FORGET = ["the movie was great and the acting was wonderful", "a fine film"]
RETAIN = ["an awful waste of time", "the movie was terrible and the plot was boring", "hello world"]


@pytest.fixture(scope="module")
def model(tok):
    return tiny_eval_opt(tok, seed=0)


@pytest.fixture(scope="module")
def ref_model(tok):
    return tiny_eval_opt(tok, seed=1)  # a reference that differs from the model: non-zero log-ratios


@pytest.fixture(scope="module")
def batch(tok):
    f = [tok(t)["input_ids"] for t in FORGET]
    r = [tok(t)["input_ids"] for t in RETAIN]
    return make_batch(tok, f, r)


def hand_rows(model, batch):
    """Per row: (summed log-prob of tokens 2..n, number of those tokens), by explicit loops."""
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    with torch.no_grad():
        lp = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
    out = []
    for i in range(ids.shape[0]):
        s, n = 0.0, 0
        for t in range(ids.shape[1] - 1):
            if mask[i, t + 1]:
                s += lp[i, t, ids[i, t + 1]].item()
                n += 1
        out.append((s, n))
    return out


def split(rows, batch):
    f = batch.targets["forget"].tolist()
    return [r for r, x in zip(rows, f) if x], [r for r, x in zip(rows, f) if not x]


def tok_nll(rows):
    return -sum(s for s, _ in rows) / sum(n for _, n in rows)


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def fo(obj, model, batch):
    with torch.no_grad():
        return obj.fo_loss(model, obj.prepare(batch)).item()


def test_ga_token_and_sequence(model, batch):
    F_, _ = split(hand_rows(model, batch), batch)
    assert fo(make_objective("ga"), model, batch) == pytest.approx(-tok_nll(F_), rel=1e-5)
    seq = sum(s for s, _ in F_) / len(F_)  # -mean summed NLL
    assert fo(make_objective("ga", {"reduction": "sequence"}), model, batch) == pytest.approx(seq, rel=1e-5)


def test_graddiff(model, batch):
    F_, R_ = split(hand_rows(model, batch), batch)
    obj = make_objective("graddiff", {"retain_weight": 0.7})
    assert fo(obj, model, batch) == pytest.approx(-tok_nll(F_) + 0.7 * tok_nll(R_), rel=1e-5)


def test_npo_uses_reference_logprobs(model, ref_model, batch):
    F_, R_ = split(hand_rows(model, batch), batch)
    Fref, _ = split(hand_rows(ref_model, batch), batch)
    beta, lam = 0.1, 0.5
    obj = make_objective("npo", {"beta": beta, "retain_weight": lam})
    obj.set_reference(ref_model)
    prepared = obj.prepare(batch)
    ref_f = prepared.targets["ref_logp"][prepared.targets["forget"]]
    assert ref_f.tolist() == pytest.approx([s for s, _ in Fref], rel=1e-5)
    want = -(2 / beta) * sum(logsig(-beta * (s - sr)) for (s, _), (sr, _) in zip(F_, Fref)) / len(F_)
    want += lam * tok_nll(R_)
    assert fo(obj, model, batch) == pytest.approx(want, rel=1e-5)


def test_npo_setup_reference_is_the_initial_model(model, batch):
    obj = make_objective("npo", {"beta": 0.1, "retain_weight": 0.0})
    obj.setup(model)
    # at theta = theta_ref every log-ratio is 0: L = -(2/beta) log(1/2)
    assert fo(obj, model, batch) == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)


def test_simnpo_length_normalised(model, batch):
    F_, R_ = split(hand_rows(model, batch), batch)
    assert len({n for _, n in F_}) == 2  # forget rows of different lengths: normalisation matters
    # beta 0.1, no retain term: at beta 2.5 the random model's ~-5.8 nats per token saturate the
    # sigmoid (log sigmoid(14.5) ~ -5e-7), which would hide the length normalisation and gamma
    for beta, gamma, lam in ((0.1, 0.3, 0.0), (2.5, 0.3, 0.8)):
        obj = make_objective("simnpo", {"beta": beta, "gamma": gamma, "retain_weight": lam})
        want = -(2 / beta) * sum(logsig(-(beta / n) * s - gamma) for s, n in F_) / len(F_) + lam * tok_nll(R_)
        assert fo(obj, model, batch) == pytest.approx(want, rel=1e-5)


def test_rmu_hand(model, ref_model, batch):
    layer, c, alpha = 0, 6.5, 3.0
    obj = make_objective("rmu", {"layer": layer, "steering_coef": c, "alpha": alpha, "seed": 3})
    obj.setup(model)
    obj.set_reference(ref_model)
    g = torch.Generator().manual_seed(3)
    u = torch.rand(model.config.hidden_size, generator=g)
    u = c * u / u.norm()
    assert torch.allclose(obj.control, u)
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer + 1]
        h0 = ref_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer + 1]
    D = h.shape[-1]
    ef, nf, er, nr = 0.0, 0, 0.0, 0
    for i, is_f in enumerate(batch.targets["forget"].tolist()):
        for t in range(ids.shape[1]):
            if not mask[i, t]:
                continue
            if is_f:
                ef += ((h[i, t] - u) ** 2).sum().item() / D
                nf += 1
            else:
                er += ((h[i, t] - h0[i, t]) ** 2).sum().item() / D
                nr += 1
    assert fo(obj, model, batch) == pytest.approx(ef / nf + alpha * er / nr, rel=1e-5)


def test_rmu_default_params_are_mlp_down_projections(model):
    obj = make_objective("rmu", {"layer": 1})
    assert obj.trainable_default(model) == ["model.decoder.layers.0.fc2.weight", "model.decoder.layers.1.fc2.weight"]


def test_npo_gradient_tends_to_ga_as_beta_to_zero(model, ref_model, batch):
    """grad NPO = mean_F 2 sigmoid(beta d_i) grad logp_i -> grad mean_F logp_i = grad GA(sequence)."""
    params = [p for p in model.parameters()]

    def grad(obj):
        b = obj.prepare(batch)
        with torch.enable_grad():
            gs = torch.autograd.grad(obj.fo_loss(model, b), params)
        return torch.cat([x.flatten() for x in gs])

    g_ga = grad(make_objective("ga", {"reduction": "sequence"}))
    errs = []
    for beta in (1.0, 0.1, 0.01, 0.001):
        obj = make_objective("npo", {"beta": beta, "retain_weight": 0.0})
        obj.set_reference(ref_model)
        errs.append(((grad(obj) - g_ga).norm() / g_ga.norm()).item())
    assert errs[-1] < 1e-3
    assert all(a > b for a, b in itertools.pairwise(errs))  # shrinks with beta


@pytest.mark.parametrize("name,opts", [("graddiff", {}), ("npo", {}), ("simnpo", {}), ("rmu", {"layer": 0})])
def test_zo_probe_losses_match_fo(tok, name, opts, batch):
    """The engine's per-probe losses (P = 3, repeated targets) equal the plain FO loss at the
    unperturbed and at a hand-perturbed model."""
    model = tiny_eval_opt(tok, seed=0)
    obj = make_objective(name, opts)
    obj.setup(model)
    b = obj.prepare(batch)
    base = fo(obj, model, b)
    eng = ZOEngine(model)
    try:
        losses = eng.evaluate([Probe(None, 0.0), Probe(11, 1e-2), Probe(None, 0.0)], b, obj)
        with torch.no_grad():
            z = {k: eng.noise.sample(11, k, p).clone() for k, p in eng.params.items()}
    finally:
        eng.close()
    pert = tiny_eval_opt(tok, seed=0)
    with torch.no_grad():
        for k, p in pert.named_parameters():
            if k in z:
                p.add_(1e-2 * z[k])
    assert losses[0].item() == pytest.approx(base, rel=1e-5)
    assert losses[2].item() == pytest.approx(base, rel=1e-5)
    assert losses[1].item() == pytest.approx(fo(obj, pert, b), rel=1e-4)
