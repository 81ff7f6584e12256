"""HiZOO and MeZO-SVRG: each against a hand-written fp64 reference of its published update (the
official code's arithmetic, perturbing a copy of the model by hand), streamed == resident with
directions that read state (checked current), finetune + replay, resume, and refusals.
Descent on least squares over seeds: ``DESCENT`` in ``tests/test_optim_family.py``; streamed ==
resident for every registered name also runs in ``tests/test_offload.py``."""
import copy
import json

import pytest
import torch

from test_engine import make_batch
from test_optim_family import BASE, TokenNLL64, assert_matches_reference, one_thread, plain_loss  # noqa: F401  (autouse fixture)
from test_train_cli import finetune_args, lm_data, tiny_dir  # noqa: F401  (fixtures)
from test_zo_methods import engine_steps, loss_at
from tiny_models import tiny_batch, tiny_model
from zoft.engine import ZOEngine
from zoft.noise import make_noise, step_seed
from zoft.optim import evaluate_step, make_optimizer, step
from zoft.tasks.base import Batch

DECAYS = ("bias", "norm", "ln_")


def decays(k):
    return not any(x in k.lower() for x in DECAYS)


# -- HiZOO ----------------------------------------------------------------------------------
def hizoo_reference(cfg, model, batch, obj, seed, steps):
    """The official ``zo_Hessian_step_update`` on dense tensors (H = ones at the start; q queries
    averaged, q = 1 is the code): perturb by +-eps z / sqrt(H), then per parameter
    H <- (1-a) H + a |l+ + l- - 2 l0| H z^2 / (2 eps^2) and w <- w - lr ((l+ - l-)/(2 eps) z /
    sqrt(H_new) + wd w) (decay only on non-bias/norm weights, zoft's rule)."""
    noise, params = make_noise(), dict(model.named_parameters())
    H = {k: torch.ones_like(p) for k, p in params.items()}
    q, eps, lr, a = cfg["n_queries"], cfg["eps"], cfg["lr"], cfg["alpha"]
    for t in range(steps):
        seeds = [step_seed(seed, t, i) for i in range(q)]
        z = {s: {k: noise.sample(s, k, p) for k, p in params.items()} for s in seeds}
        l0 = plain_loss(model, batch, obj)
        lp = {s: loss_at(model, batch, obj, {k: eps * z[s][k] / H[k].sqrt() for k in params}) for s in seeds}
        lm = {s: loss_at(model, batch, obj, {k: -eps * z[s][k] / H[k].sqrt() for k in params}) for s in seeds}
        with torch.no_grad():
            for k, p in params.items():
                est = sum(abs(lp[s] + lm[s] - 2 * l0) * H[k] * z[s][k] ** 2 / (2 * eps ** 2) for s in seeds) / q
                H[k] = (1 - a) * H[k] + a * est
                grad = sum((lp[s] - lm[s]) / (2 * eps) * z[s][k] / H[k].sqrt() for s in seeds) / q
                p.sub_(lr * (grad + (cfg["weight_decay"] * p if decays(k) else 0)))
    return H


@pytest.mark.parametrize("q", [1, 2])
def test_hizoo_matches_hand_written_reference(q):
    """Three steps on a tiny OPT in fp64, alpha 0.5 (H moves by factors per step), weight decay.
    What differs is the order of floating-point operations: batched vs plain matmuls (~1e-16 in
    the losses, divided by 2 eps^2 in the curvature) and (1-a)H + aH c z^2 evaluated as
    H ((1-a) + a c z^2): atol 1e-11 on the weights, rtol 1e-9 on H."""
    cfg = {**BASE, "lr": 1e-2, "n_queries": q, "alpha": 0.5}
    model, init, ref, batch, obj, opt = engine_steps("hizoo", cfg)
    H = hizoo_reference(cfg, ref, batch, obj, seed=3, steps=3)
    assert_matches_reference(model, ref, init)
    for k, h in opt.store["hessian"].items():
        torch.testing.assert_close(h, H[k], rtol=1e-9, atol=0, msg=k)
    assert max((h - 1).abs().max().item() for h in H.values()) > 0.1  # H really moved


def test_hizoo_with_alpha_zero_is_mezo_sgd_plus_a_forward():
    """alpha = 0 keeps H = 1: the same weights as MeZO-SGD, bit for bit."""
    batch, obj, models = make_batch("opt"), TokenNLL64(True), []
    for name in ("hizoo", "mezo-sgd"):
        model = tiny_model("opt", dtype=torch.float64)
        opt = make_optimizer(name, {**BASE, "alpha": 0.0} if name == "hizoo" else BASE, seed=3, total_steps=5)
        with ZOEngine(model) as engine:
            for t in range(3):
                step(engine, opt, batch, obj, t)
        models.append(model)
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))


# -- MeZO-SVRG ------------------------------------------------------------------------------
def svrg_reference(cfg, model, batches, obj, seed, steps):
    """Algorithm 2 of the paper on dense tensors, with the anchor weights stored as a copy: every
    ``interval`` steps gbar = g(w; anchor batch), wbar = w, w <- w - eta1 (gbar + wd w); otherwise
    w <- w - eta2 (g(w; I) - g(wbar; I) + gbar + wd w), the two estimates along independent
    directions. g(w; B) = (1/q) sum_i (L_B(w + eps z_i) - L_B(w - eps z_i)) / (2 eps) z_i; an
    anchor batch in pieces has the pieces' size-weighted mean loss."""
    noise, params = make_noise(), dict(model.named_parameters())
    q, eps = cfg["n_queries"], cfg["eps"]

    def loss(b, direction):
        pieces = b if isinstance(b, list) else [b]
        return sum(loss_at(model, p, obj, direction) * p.size for p in pieces) / sum(p.size for p in pieces)

    def estimate(b, seeds, shift):
        g = {k: torch.zeros_like(p) for k, p in params.items()}
        for s in seeds:
            z = {k: noise.sample(s, k, p) for k, p in params.items()}
            d = (loss(b, {k: shift[k] + eps * z[k] for k in params})
                 - loss(b, {k: shift[k] - eps * z[k] for k in params})) / (2 * eps)
            for k in params:
                g[k] += d * z[k] / q
        return g

    zero = {k: torch.zeros_like(p) for k, p in params.items()}
    for t in range(steps):
        seeds = [step_seed(seed, t, i) for i in range(q)]
        if t % cfg["interval"] == 0:
            gbar = estimate(batches[t], seeds, zero)
            wbar = {k: p.detach().clone() for k, p in params.items()}
            lr, v = cfg["anchor_lr"], gbar
        else:
            past = estimate(batches[t], [step_seed(seed, t, q + i) for i in range(q)],
                            {k: wbar[k] - p.detach() for k, p in params.items()})
            cur = estimate(batches[t], seeds, zero)
            lr, v = cfg["lr"], {k: cur[k] - past[k] + gbar[k] for k in params}
        with torch.no_grad():
            for k, p in params.items():
                p.sub_(lr * (v[k] + (cfg["weight_decay"] * p if decays(k) else 0)))


def lm_batches(steps, interval):
    """Step t's batch: a 3-row minibatch of its own, or (anchor steps) two pieces of 3 and 2 rows."""
    def b(seed, rows):
        x = tiny_batch(rows, seed=seed)
        return Batch(x, size=rows)
    return [[b(100 + t, 3), b(200 + t, 2)] if t % interval == 0 else b(t, 3) for t in range(steps)]


@pytest.mark.parametrize("q", [1, 2])
def test_svrg_matches_hand_written_reference(q):
    """Five steps (anchors at 0 and 3: interval 3), weight decay, fp64 tiny OPT, anchor batches
    in two pieces; zoft probes the anchor at w + (delta +- eps z) with delta = wbar - w carried
    as an offset, the reference at the stored copy wbar +- eps z: the two differ by rounding of
    w + delta (~1e-16 relative) divided by 2 eps, and by batched vs plain matmuls: atol 1e-11."""
    cfg = {**BASE, "lr": 1e-2, "anchor_lr": 2e-2, "interval": 3, "n_queries": q}
    model = tiny_model("opt", dtype=torch.float64)
    init, ref = copy.deepcopy(model), copy.deepcopy(model)
    obj, batches = TokenNLL64(True), lm_batches(5, 3)
    opt = make_optimizer("mezo-svrg", cfg, seed=3, total_steps=10)
    kinds = []
    with ZOEngine(model) as engine:
        for t in range(5):
            kinds.append(step(engine, opt, batches[t], obj, t).metrics["anchor"])
    assert kinds == [1.0, 0.0, 0.0, 1.0, 0.0]
    svrg_reference(cfg, ref, batches, obj, seed=3, steps=5)
    assert_matches_reference(model, ref, init)


def test_svrg_anchor_examples_are_the_training_set_or_a_keyed_sample():
    opt = make_optimizer("mezo-svrg", {"interval": 3}, seed=0, total_steps=10)
    assert opt.anchor_examples(0, 7) == opt.anchor_examples(1, 7) == list(range(7))  # no anchor yet: 1 too
    opt.gbar = [(1, 1.0)]
    assert opt.anchor_examples(1, 7) is None and opt.anchor_examples(3, 7) == list(range(7))
    opt = make_optimizer("mezo-svrg", {"anchor_batch": 4}, seed=0, total_steps=10)
    a = opt.anchor_examples(0, 10)
    assert len(set(a)) == 4 and a == opt.anchor_examples(0, 10) and a != opt.anchor_examples(2, 10)


# -- both -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hizoo", "mezo-svrg"])
@pytest.mark.parametrize("every", [1, 4])
def test_streamed_equals_resident_with_state_read_by_the_directions(name, every):
    """Streamed (state on the host between residencies, brought to the device for the update
    each direction then reads) == resident: same losses and weights (rtol 1e-5, the Equivalence
    invariant of tests/test_offload.py), over enough steps for state to matter."""
    from test_engine import TokenNLL
    from test_offload import RTOL, assert_same_weights, deep_model
    from zoft.engine import Streaming
    from zoft.optim import bind

    batch, obj, results = make_batch("llama"), TokenNLL(True), []
    opts = {"lr": 1e-3, "eps": 1e-3, **({"alpha": 0.3} if name == "hizoo" else {"anchor_lr": 1e-3, "interval": 3})}
    for offload in (None, Streaming("cpu", resident_blocks=1, prefetch=2, writeback_every=every)):
        model = deep_model("llama")
        eng = ZOEngine(model, offload=offload)
        opt = make_optimizer(name, opts, seed=3, total_steps=8)
        bind(opt, eng)
        losses = []
        for t in range(7):
            loss = evaluate_step(eng, opt, t, batch, obj)
            eng.set_update(opt.update(t, loss)[0])
            losses.append(loss)
        eng.close()
        if offload is not None:  # the state of streamed units is back on the host
            assert all(v.device.type == "cpu" for bufs in opt.store.values() for v in bufs.values())
        results.append((torch.cat(losses), model))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=RTOL, atol=0)
    assert_same_weights(results[1][1], results[0][1])


@pytest.mark.parametrize("name", ["hizoo", "mezo-svrg"])
def test_finetune_with_defaults_replays_and_resumes_identically(name, tiny_dir, lm_data, tmp_path):
    """``zoft finetune --optimizer NAME`` with the method's defaults (lr 1e-3 so that 6 steps
    move fp32 weights visibly; HiZOO's alpha raised so that H matters), then ``zoft replay``:
    bit-identical weights; a run stopped at step 3 and resumed: the same weights and trajectory
    as the uninterrupted run (the state comes back from the checkpoint)."""
    from safetensors.torch import load_file

    from zoft.cli import main

    extra = []
    if name == "hizoo":
        (tmp_path / "h.yaml").write_text("optimizer_options: {alpha: 0.1}\n")
        extra = ["--config", str(tmp_path / "h.yaml")]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(finetune_args(tiny_dir, lm_data, full, "--optimizer", name, *extra)) == 0
    assert main(["replay", str(full), "--output", str(tmp_path / "replayed")]) == 0
    a = load_file(str(full / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "replayed" / "model.safetensors"))
    init = load_file(str(tiny_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], init[k]) for k in a)
    args = finetune_args(tiny_dir, lm_data, part, "--optimizer", name, *extra)
    args[args.index("--steps") + 1] = "3"
    assert main(args) == 0
    assert main(finetune_args(tiny_dir, lm_data, part, "--optimizer", name, *extra, "--resume")) == 0
    c = load_file(str(part / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert (full / "trajectory.jsonl").read_text() == (part / "trajectory.jsonl").read_text()
    lines = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    if name == "mezo-svrg":  # anchor steps 0, 2, 4 run on the whole training set
        steps = [m for m in lines if "anchor" in m]
        assert [m["anchor"] for m in steps] == [1.0, 0.0] * 3
        assert steps[0]["examples"] > steps[1]["examples"] == 2


@pytest.mark.parametrize("name", ["hizoo", "mezo-svrg"])
def test_lora_run_replays(name, tiny_dir, lm_data, tmp_path):
    """With ``--peft lora`` the state is kept for the adapter's parameters only; replay rebuilds
    the trained adapter bit for bit."""
    from safetensors.torch import load_file

    from zoft.cli import main

    out = tmp_path / "run"
    assert main(finetune_args(tiny_dir, lm_data, out, "--optimizer", name, "--peft", "lora")) == 0
    assert main(["replay", str(out), "--output", str(tmp_path / "replayed")]) == 0
    a = load_file(str(out / "checkpoint" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "replayed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = load_file(str(out / "checkpoint" / "optimizer.safetensors"))
    assert state and all("lora_" in k for k in state)


def test_refusals_are_one_line():
    from zoft.config import TrainConfig
    from zoft.distributed import check_supported
    from zoft.errors import UsageError

    for name in ("hizoo", "mezo-svrg"):
        with pytest.raises(UsageError, match=f"{name} does not run data-parallel.*--nproc 1"):
            check_supported(TrainConfig(optimizer=name), 2)
        with pytest.raises(UsageError, match="one_sided is not supported"):
            make_optimizer(name, {"one_sided": True}, 0, 1)
        with pytest.raises(UsageError, match="sphere is not supported"):
            make_optimizer(name, {"sphere": True}, 0, 1)
        with pytest.raises(UsageError, match="module_wise is not supported"):
            make_optimizer(name, {"module_wise": True}, 0, 1)
    with pytest.raises(UsageError, match="alpha must be in"):
        make_optimizer("hizoo", {"alpha": 2.0}, 0, 1)
    with pytest.raises(UsageError, match="anchor_batch"):
        make_optimizer("mezo-svrg", {"anchor_batch": 0}, 0, 1)
    with pytest.raises(UsageError, match="interval"):
        make_optimizer("mezo-svrg", {"interval": 0}, 0, 1)


def test_a_direction_from_stale_state_is_an_error_and_a_failed_update_is_named():
    """The direction of key k reads k's state only after the pending update of k landed: drawn
    before, it raises at once (never a direction from stale state); after, it is drawn; after an
    update whose apply raised, the error names that update."""
    opt = make_optimizer("hizoo", {"alpha": 0.5}, seed=0, total_steps=4)
    upd, _ = opt.update(0, torch.tensor([1.0, 1.1, 0.95], dtype=torch.float64))
    opt.probes(1)  # step 1's directions need update 0
    w, noise = torch.zeros(4), make_noise()
    for key in ("a", "b"):
        with pytest.raises(RuntimeError, match=f"direction of '{key}' was drawn before update 1"):
            opt.shaped_direction(noise, 5, key, w)
    upd.apply("a", w, noise, True)
    assert opt.shaped_direction(noise, 5, "a", w).shape == w.shape
    opt.raw_direction = lambda *a: (_ for _ in ()).throw(MemoryError("boom"))
    with pytest.raises(MemoryError):
        upd.apply("b", w, noise, True)
    with pytest.raises(RuntimeError, match="update of 'b' failed"):
        opt.clock.check("b", opt._need)

