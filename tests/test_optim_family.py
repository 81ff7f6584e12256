"""The ZO-SGD family, ZO-Adam and R-AdaZO through the engine: hand-written reference steps on a
tiny LM, descent on a least-squares problem across seeds, per-key state, registry and CLI."""
import copy
import json
import math

import pytest
import torch
from torch import nn

from test_engine import TokenNLL, make_batch
from tiny_models import tiny_model
from zoft.engine import ZOEngine
from zoft.errors import UsageError
from zoft.noise import make_noise
from zoft.optim import (
    OPTIMIZERS,
    ZOSGD,
    ZOConfig,
    evaluate_step,
    make_optimizer,
    step,
    update_record,
)
from zoft.tasks.base import Batch


def assert_matches_reference(model, ref, init, atol=1e-11):
    """Every parameter of ``model`` within ``atol`` of ``ref``'s, and the steps really moved it."""
    w0 = dict(init.named_parameters())
    moved = 0.0
    for (k, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, r, rtol=0, atol=atol, msg=k)
        moved = max(moved, (p - w0[k]).abs().max().item())
    assert moved > 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: on shared, busy cores one thread is several times faster than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


BASE = dict(lr=1e-2, eps=1e-3, weight_decay=0.1, n_queries=1, one_sided=False, schedule="constant", warmup_steps=0)


# -- a smooth test problem --------------------------------------------------------------------
class LeastSquares(nn.Module):
    """out = sum_l W_l x + b_l: a convex quadratic in the parameters; a ModuleList of two
    same-class layers so that ``discover_layout`` sees a block stack."""

    def __init__(self, d=8, layers=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        with torch.no_grad():
            for lin in self.layers:
                lin.weight.copy_(0.3 * torch.randn(d, d, generator=g))
                lin.bias.zero_()

    def forward(self, x):
        return sum(lin(x) for lin in self.layers)  # (N, d)


class MSE:
    def forward(self, model, batch):
        return model(batch.inputs["x"])

    def loss(self, out, batch, num_probes):
        err = (out - batch.targets["y"]).square().sum(-1)  # (P*R,)
        return err.reshape(num_probes, -1).mean(1)


def ls_problem(seed=0, d=8, rows=32):
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(rows, d, generator=g)
    a = torch.randn(d, d, generator=g) / math.sqrt(d)
    return LeastSquares(d, seed=seed), Batch({"x": x}, {"y": x @ a.T}, rows)


def plain_loss(model, batch, obj):
    with torch.no_grad():
        return obj.loss(obj.forward(model, batch), batch, 1)[0].item()


# Per optimizer: extra options, steps, and the loss ratio it must reach on every seed (measured
# ratios on seeds 0-2 in the comments; d = 144 parameters).
DESCENT = {
    "mezo-sgd": (dict(lr=2e-3, n_queries=2), 150, 0.3),         # 0.088-0.099
    "zo-sgd-sign": (dict(lr=2e-2, n_queries=2), 150, 0.3),      # 0.096-0.118
    "zo-sgd-mmt": (dict(lr=5e-4, n_queries=2), 150, 0.3),       # 0.028-0.044
    "zo-sgd-cons": (dict(lr=2e-3), 150, 0.5),                   # 0.127-0.226
    "zo-adam": (dict(lr=2e-2, n_queries=2), 150, 0.3),          # 0.043-0.061
    "r-adazo": (dict(lr=2e-3, n_queries=2), 150, 0.3),          # 0.038-0.080
    "mezo-sgd+sphere": (dict(lr=0.2, n_queries=2, sphere=True), 150, 0.4),  # 0.158-0.160
    "mezo-sgd+sparse": (dict(lr=5e-3, n_queries=2, gradient_sparsity=0.75), 150, 0.3),  # 0.210-0.238
    "lozo": (dict(lr=2e-3, n_queries=2, rank=2, interval=5), 150, 0.3),        # 0.049-0.077
    "subzero": (dict(lr=2e-3, n_queries=2, rank=2, interval=5), 150, 0.4),     # 0.163-0.240
    "fzoo": (dict(lr=5e-2, n=4), 60, 0.3),                                      # 0.058-0.120 (5 forwards/step)
    "sparse-mezo": (dict(lr=4e-3, n_queries=2, sparsity=0.1), 150, 0.3),  # 0.095-0.147 (the largest 10% fixed)
    "mezo-sgd+module": (dict(lr=2e-3, n_queries=2, module_wise=True), 150, 0.3),  # 0.103-0.142
    "forward-grad": (dict(lr=2e-3, n_queries=2), 150, 0.3),  # 0.088-0.099 (2 jvp passes/step)
    "hizoo": (dict(lr=1e-2, n_queries=2, alpha=1e-3), 150, 0.3),               # 0.155-0.211
    "mezo-svrg": (dict(lr=2e-3, anchor_lr=2e-3, n_queries=2), 150, 0.4),       # 0.135-0.254
}


@pytest.mark.parametrize("name", sorted(DESCENT))
def test_each_optimizer_decreases_least_squares(name):
    opts, steps, ratio = DESCENT[name]
    for seed in range(3):
        model, batch = ls_problem(seed)
        obj = MSE()
        opt = make_optimizer(name.split("+")[0], {**BASE, "weight_decay": 0.0, **opts}, seed=seed, total_steps=steps)
        first = plain_loss(model, batch, obj)
        with ZOEngine(model) as engine:
            for t in range(steps):
                step(engine, opt, batch, obj, t)
        last = plain_loss(model, batch, obj)
        assert last < ratio * first, (name, seed, first, last)


# -- hand-written reference steps ---------------------------------------------------------------
def reference_run(name, cfg, model, batch, obj, seed, steps):
    """The published update rules written out on dense tensors, perturbing by hand."""
    noise = make_noise()
    params = dict(model.named_parameters())
    decays = {k: not any(s in k.lower() for s in ("bias", "norm", "ln_")) for k in params}
    state = {k: {} for k in params}
    from zoft.noise import step_seed

    def z(s, k):
        v = noise.sample(s, k, params[k])
        if cfg.get("gradient_sparsity") is not None:  # ZO-Bench: z[normal_like(z) < sparsity] = 0
            v = torch.where(noise.sample(s, k + "/grad-mask", params[k]) < cfg["gradient_sparsity"], 0.0, v)
        return v

    def loss_at(direction):  # direction: {key: tensor} or None
        m = copy.deepcopy(model)
        with torch.no_grad():
            if direction is not None:
                for k, p in m.named_parameters():
                    p.add_(direction[k])
        return plain_loss(m, batch, obj)

    for t in range(steps):
        q = cfg["n_queries"]
        seeds = [step_seed(seed, t, i) for i in range(q)]
        norms = {s: (math.sqrt(sum(float(z(s, k).double().square().sum()) for k in params))
                     if cfg.get("sphere") else 1.0) for s in seeds}
        u = {s: {k: z(s, k) / norms[s] for k in params} for s in seeds}
        eps, lr = cfg["eps"], cfg["lr"]
        grads = []
        for s in seeds:
            lp = loss_at({k: eps * v for k, v in u[s].items()})
            if cfg["one_sided"]:
                grads.append((lp - loss_at(None)) / eps)
            else:
                grads.append((lp - loss_at({k: -eps * v for k, v in u[s].items()})) / (2 * eps))
        G = {k: sum(g * u[s][k] for s, g in zip(seeds, grads)) / q for k in params}
        if name == "zo-sgd-cons":
            l0 = loss_at(None)
            l_desc = loss_at({k: -lr * G[k] for k in params})
            l_asc = loss_at({k: lr * G[k] for k in params})
            best = min(l_desc, l0, l_asc)
            sgn = -1.0 if best == l_desc else (0.0 if best == l0 else 1.0)
        with torch.no_grad():
            for k, p in params.items():
                if decays[k]:
                    p.mul_(1 - lr * cfg["weight_decay"])
                st = state[k]
                if name == "mezo-sgd":
                    p.sub_(lr * G[k])
                elif name == "zo-sgd-sign":
                    p.sub_(lr * sum(math.copysign(1.0, g) * u[s][k] for s, g in zip(seeds, grads)) / q)
                elif name == "zo-sgd-cons":
                    p.add_(sgn * lr * G[k])
                elif name == "zo-sgd-mmt":
                    st["b"] = G[k].clone() if "b" not in st else cfg["momentum"] * st["b"] + G[k]
                    p.sub_(lr * st["b"])
                elif name == "zo-adam":
                    b1, b2 = cfg["beta1"], cfg["beta2"]
                    st["m"] = b1 * st.get("m", 0) + (1 - b1) * G[k]
                    st["v"] = b2 * st.get("v", 0) + (1 - b2) * G[k] ** 2
                    mh, vh = st["m"] / (1 - b1 ** (t + 1)), st["v"] / (1 - b2 ** (t + 1))
                    p.sub_(lr * mh / (vh.sqrt() + cfg["adam_eps"]))
                elif name == "r-adazo":
                    b1, b2 = cfg["beta1"], cfg["beta2"]
                    st["m"] = b1 * st.get("m", 0) + (1 - b1) * G[k]
                    st["v"] = b2 * st.get("v", 0) + (1 - b2) * st["m"] ** 2
                    p.sub_(lr * st["m"] / (st["v"] + cfg["zeta"]).sqrt())


class TokenNLL64(TokenNLL):
    """TokenNLL kept in fp64 (the reference tests run the tiny model in fp64)."""

    def loss(self, outputs, batch, num_probes):
        logits = outputs.logits[:, :-1]  # (P*R, T-1, V)
        ids, mask = batch.inputs["input_ids"][:, 1:], batch.inputs["attention_mask"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none") * mask
        return nll.reshape(num_probes, -1).sum(1) / mask.reshape(num_probes, -1).sum(1)


REFERENCE = {
    "mezo-sgd": [dict(), dict(n_queries=2, one_sided=True), dict(n_queries=2, sphere=True),
                 dict(n_queries=2, gradient_sparsity=0.75)],
    "zo-sgd-sign": [dict(n_queries=2)],
    "zo-sgd-cons": [dict(lr=0.3), dict(lr=0.3, n_queries=2, sphere=True), dict(lr=0.3, n_queries=2,
                                                                                  gradient_sparsity=0.0)],
    "zo-sgd-mmt": [dict(momentum=0.9, n_queries=2)],
    "zo-adam": [dict(lr=1e-3, beta1=0.9, beta2=0.99, adam_eps=1e-8), dict(lr=1e-3, beta1=0.9, beta2=0.99,
                                                                          adam_eps=1e-8, sphere=True),
                dict(lr=1e-3, beta1=0.9, beta2=0.99, adam_eps=1e-8, gradient_sparsity=0.75)],
    "r-adazo": [dict(lr=1e-3, beta1=0.9, beta2=0.99, zeta=1e-10, n_queries=2)],
}
CASES = [(n, i) for n in sorted(REFERENCE) for i in range(len(REFERENCE[n]))]


@pytest.mark.parametrize("name,case", CASES)
def test_step_matches_hand_written_reference(name, case):
    """Three steps (so momentum/Adam buffers carry over) on a tiny OPT in fp64: what differs is
    the reduction order of batched vs. plain matmuls (~1e-16), amplified by 1/(2 eps) in g and by
    R-AdaZO's sign-like m/sqrt(v) near m = 0 (measured worst: 7e-14 absolute): atol 1e-11."""
    cfg = {**BASE, **REFERENCE[name][case]}
    model = tiny_model("opt", dtype=torch.float64)
    init = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    batch, obj = make_batch("opt"), TokenNLL64(True)
    opt = make_optimizer(name, cfg, seed=3, total_steps=10)
    with ZOEngine(model) as engine:
        for t in range(3):
            step(engine, opt, batch, obj, t)
    reference_run(name, cfg, ref, batch, obj, seed=3, steps=3)
    assert_matches_reference(model, ref, init)


@pytest.mark.parametrize("name", ["zo-sgd-mmt", "zo-adam", "r-adazo"])
def test_state_is_per_key_and_order_free(name):
    """What block streaming needs: a stateful update touches only its key's buffers, so applying
    it to the parameters in any order (any residency) gives bit-identical weights and state."""
    noise = make_noise()
    results = []
    for order in (1, -1):
        model = tiny_model("gpt2")
        opt = make_optimizer(name, {**BASE, "n_queries": 2}, seed=0, total_steps=5)
        params = list(model.named_parameters())[::order]
        for t in range(3):
            upd, _ = opt.update(t, torch.tensor([1.0, 0.5, 0.2, 0.4], dtype=torch.float64))
            with torch.no_grad():
                for k, p in params:
                    upd.apply(k, p.data, noise, "bias" not in k)
        assert set(opt.buffers(params[0][0])) == ({"momentum"} if name == "zo-sgd-mmt" else {"exp_avg", "exp_avg_sq"})
        results.append(({k: p.clone() for k, p in model.named_parameters()}, opt.tensor_state()))
    (w1, s1), (w2, s2) = results
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_stateful_state_round_trip_and_replay_record():
    model, batch = ls_problem(0)
    obj = MSE()
    opt = make_optimizer("zo-adam", {**BASE, "lr": 1e-2}, seed=0, total_steps=10)
    records = []
    with ZOEngine(model) as engine:
        for t in range(4):
            records.append(json.loads(json.dumps(update_record(step(engine, opt, batch, obj, t).update))))
    json.dumps(opt.state_dict())  # the JSON part is JSON
    # replay: a fresh optimizer rebuilds every update from its record
    model2, _ = ls_problem(0)
    opt2 = make_optimizer("zo-adam", {**BASE, "lr": 1e-2}, seed=0, total_steps=10)
    with ZOEngine(model2) as engine:
        for r in records:
            engine.set_update(opt2.update_from_record(r))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    # resume: state_dict + tensor_state continue the same trajectory
    opt3 = make_optimizer("zo-adam", {**BASE, "lr": 1e-2}, seed=0, total_steps=10)
    opt3.load_state_dict(opt.state_dict())
    opt3.load_tensor_state({k: v.clone() for k, v in opt.tensor_state().items()})
    m_a, m_b = copy.deepcopy(model), copy.deepcopy(model)
    for m, o in ((m_a, opt), (m_b, opt3)):
        with ZOEngine(m) as engine:
            step(engine, o, batch, obj, 4)
    for p, q in zip(m_a.parameters(), m_b.parameters()):
        assert torch.equal(p, q)


def test_cons_needs_its_second_phase():
    model, batch = ls_problem(0)
    opt = make_optimizer("zo-sgd-cons", BASE, seed=0, total_steps=2)
    with ZOEngine(model) as engine:
        losses = engine.evaluate(opt.probes(0), batch, MSE())
        with pytest.raises(RuntimeError, match="second phase"):
            opt.update(0, losses)
        losses = evaluate_step(engine, opt, 0, batch, MSE())
        assert len(losses) == 5
        upd, m = opt.update(0, losses)
        l0, l_desc, l_asc = losses[0].item(), losses[3].item(), losses[4].item()
        assert m["cons_choice"] == (-1.0 if l_desc <= min(l0, l_asc) else 0.0 if l0 <= l_asc else 1.0)
        assert m["loss_step"] == min(l0, l_desc, l_asc) and (m["cons_choice"] == 0.0) == (upd.terms == [])


@pytest.mark.parametrize("losses,choice", [
    # phase 1: L(w), L(w + eps z), L(w - eps z); phase 2: L(w - lr G), L(w + lr G)
    ([1.0, 1.3, 1.1, 0.9, 1.2], -1.0),  # the descent step is lowest
    ([1.0, 1.3, 1.1, 1.05, 1.2], 0.0),  # staying at w is lowest
    ([1.0, 1.3, 1.1, 1.2, 0.8], 1.0),   # the ascent step is lowest
    ([1.0, 1.3, 1.1, 1.0, 1.2], -1.0),  # descent ties with w: descent
    ([1.0, 1.3, 1.1, 1.2, 1.0], 0.0),   # ascent ties with w: w
    ([1.0, 1.3, 1.1, 0.7, 0.7], -1.0),  # descent ties with ascent: descent
])
def test_cons_keeps_the_lowest_of_three(losses, choice):
    """Each branch wins when its loss is lowest: the update is ``choice * lr * g * z`` with
    g = (1.3 - 1.1) / (2 eps) = 100 (eps 1e-3, lr 1e-2: coefficient choice * 1.0), no terms when
    w stays; weight decay (1 - lr wd = 0.999) applies in every case."""
    opt = make_optimizer("zo-sgd-cons", BASE, seed=0, total_steps=1)
    upd, m = opt.update(0, torch.tensor(losses, dtype=torch.float64))
    assert m["cons_choice"] == choice and m["loss"] == 1.0 and m["loss_step"] == min(losses[0], *losses[3:])
    assert m["projected_grad"] == pytest.approx(100.0)
    expect = [] if choice == 0.0 else [(opt.seeds(0)[0], pytest.approx(choice * 1.0))]
    assert upd.terms == expect and upd.decay == pytest.approx(0.999)


def test_custom_scalar_callable_objective():
    """``step`` with a plain callable outputs -> scalar equals the same objective as a class."""
    (m1, batch), (m2, _) = ls_problem(1), ls_problem(1)
    y = batch.targets["y"]
    o1 = make_optimizer("zo-sgd-mmt", BASE, seed=0, total_steps=3)
    o2 = make_optimizer("zo-sgd-mmt", BASE, seed=0, total_steps=3)
    with ZOEngine(m1) as e1, ZOEngine(m2) as e2:
        for t in range(3):
            step(e1, o1, batch, MSE(), t)
            step(e2, o2, batch, lambda out, b: (out - y).square().sum(-1).mean(), t,
                 forward=lambda model, b: model(b.inputs["x"]))
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_registry_options_and_memory_costs():
    expected = {"mezo-sgd": 0, "zo-sgd-sign": 0, "zo-sgd-cons": 0, "zo-sgd-mmt": 1, "zo-adam": 2, "r-adazo": 2,
                "zo-ranksgd": 0, "lozo": 0, "subzero": 0, "fzoo": 0, "sparse-mezo": 0,
                "forward-grad": 0, "hizoo": 1, "mezo-svrg": 1}
    assert {n: impl.memory_copies for n, (_, impl) in OPTIMIZERS.items()} == expected
    for name in OPTIMIZERS:  # every name accepts what zoft.train.build_optimizer passes
        opt = make_optimizer(name, {**BASE, "weight_decay": 0.0}, seed=0, total_steps=1)
        assert opt.name == name
    with pytest.raises(UsageError, match="unknown option"):
        make_optimizer("zo-sgd-sign", {"momentum": 0.9}, 0, 1)
    with pytest.raises(UsageError, match="one_sided"):
        make_optimizer("zo-ranksgd", {"one_sided": True}, 0, 1)
    with pytest.raises(UsageError, match="rank_oracle"):
        make_optimizer("zo-ranksgd", {"rank_oracle": "reward"}, 0, 1)
    with pytest.raises(UsageError, match="beta"):
        make_optimizer("zo-adam", {"beta1": 1.0}, 0, 1)


def test_sphere_sqrt_d_is_close_to_exact():
    model = tiny_model("opt")
    exact = make_optimizer("mezo-sgd", {"sphere": True}, seed=0, total_steps=1)
    approx = make_optimizer("mezo-sgd", {"sphere": True, "sphere_norm": "sqrt_d"}, seed=0, total_steps=1)
    with ZOEngine(model) as engine:
        from zoft.optim import bind
        bind(exact, engine), bind(approx, engine)
        d = sum(p.numel() for p in engine.params.values())
        s = exact.seeds(0)[0]
        # ||z||/sqrt(d) - 1 has std 1/sqrt(2d): allow 5 sigma
        assert abs(exact.norm(s) / approx.norm(s) - 1) < 5 / math.sqrt(2 * d)


def test_composite_directions_leave_shared_noise_untouched():
    """Backends may return read-only views of shared storage (the noise table): the conservative
    step's composite candidates (q > 1) must read them, never write them."""
    from zoft.noise import BACKENDS

    if "table" not in BACKENDS:
        pytest.skip("no noise-table backend in this build")
    noise = BACKENDS["table"](size=1 << 12)
    before = noise.table().clone()
    model, batch = ls_problem(0)
    opt = make_optimizer("zo-sgd-cons", {**BASE, "n_queries": 3}, seed=0, total_steps=3)
    with ZOEngine(model, noise=noise) as engine:
        for t in range(3):
            step(engine, opt, batch, MSE(), t)
    assert torch.equal(noise.table(), before)


def test_cli_optimizers_lists_every_name_with_defaults(capsys):
    from zoft.cli import main

    assert main(["optimizers", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(OPTIMIZERS)
    assert rows["zo-adam"]["state_bytes_per_param"] == 8 and rows["zo-adam"]["options"]["beta2"] == 0.999
    assert rows["mezo-sgd"]["state_bytes_per_param"] == 0 and rows["mezo-sgd"]["options"]["eps"] == 1e-3
    assert rows["zo-sgd-cons"]["data_parallel"].startswith("no:")
    assert rows["sparse-mezo"]["state_bytes_per_param"] == 1 and rows["sparse-mezo"]["options"]["sparsity"] == 0.75
    assert all(r["paper"] and r["replays"] for r in rows.values())
    assert [n for n, r in rows.items() if not r["streams"]] == ["forward-grad"]
    assert main(["optimizers"]) == 0
    text = capsys.readouterr().out
    assert all(f"{n}: " in text for n in OPTIMIZERS) and "adam_eps=1e-08" in text
