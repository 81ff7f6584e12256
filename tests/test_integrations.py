"""zoft.integrations: ``ZOTrainer`` (transformers.Trainer) and ``ZOSFTTrainer`` (TRL) run zoft's ZO step.

The reference is zoft's own loop (``zoft.finetune``) on the same model, batches and seeds: the
Trainer is fed zoft's batch order (an iterable dataset, which Trainer does not shuffle) through
zoft's own collation, so any difference is the integration's.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_tokenizer
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM, TrainingArguments

from zoft import TrainConfig, finetune
from zoft.errors import UsageError
from zoft.integrations import ZOTrainer
from zoft.models import load_model
from zoft.models.adapters import apply_peft
from zoft.tasks import LMTask
from zoft.train import batch_indices

TEXTS = ["the movie was great and the acting was wonderful", "an awful waste of time",
         "a fine film with a lovely cast", "the plot was boring", "hello world", "It was great."]
B, STEPS, SEED, LR, EPS, MAXLEN = 2, 4, 0, 1e-3, 1e-3, 16
LORA = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-opt-hf")
    tiny_model("opt").save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return d


class InOrder(torch.utils.data.IterableDataset):
    """Examples in a fixed order (Trainer shuffles map-style datasets, never iterable ones)."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


def zoft_batches(steps: int = STEPS) -> InOrder:
    """The examples of zoft's steps 0..steps-1, in its order."""
    return InOrder([{"text": TEXTS[i]} for t in range(steps) for i in batch_indices(len(TEXTS), B, t, SEED)])


def lm_collator():
    """zoft's tokenisation and labels (-100 on padding) as a Trainer collator."""
    task = LMTask(make_tiny_tokenizer(), "causal", MAXLEN)

    def collate(examples):
        b = task.collate(examples)
        return {**b.inputs, "labels": b.targets["labels"]}
    return collate


def hf_args(out, steps: int = STEPS, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=B, learning_rate=LR,
                lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to=[], seed=SEED,
                disable_tqdm=True, use_cpu=True, remove_unused_columns=False)
    return TrainingArguments(**{**base, **kw})


def load(model_dir, peft: bool = False, quant: str = "none"):
    """The model as ``zoft finetune`` builds it: LoRA with its seeded init, on a bitsandbytes base."""
    model = load_model(str(model_dir), quant=quant).model if quant != "none" else \
        AutoModelForCausalLM.from_pretrained(model_dir)
    return apply_peft(model, "lora", LORA, seed=SEED) if peft else model


def zo_trainer(model, out, steps: int = STEPS, zo_options=None, **kw) -> ZOTrainer:
    return ZOTrainer(model=model, args=hf_args(out, steps, **kw.pop("args", {})), train_dataset=zoft_batches(steps),
                     data_collator=lm_collator(), zo_options={"eps": EPS, **(zo_options or {})}, **kw)


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# (peft, quant, lr, eps, loss rtol): the 8-bit base runs bitsandbytes' LLM.int8 matmul with fp16
# activations; its losses agree to ~1e-6 relative, not fp32 rounding (step 0's L+ is bit-identical,
# its L- is not: the two sides reduce the token NLLs in a different order)
@pytest.mark.parametrize("peft,quant,lr,eps,loss_rtol", [
    (False, "none", LR, EPS, 1e-6), (True, "none", 1e-1, 1e-2, 1e-6), (True, "8bit", 1e-1, 1e-2, 1e-5)],
    ids=["full", "lora", "lora-8bit"])
def test_zotrainer_takes_the_steps_of_zofts_own_loop(model_dir, tmp_path, peft, quant, lr, eps, loss_rtol):
    """Same batches, seeds and linear lr schedule: per-step losses, lr and projected gradients in
    Trainer's log history equal zoft's metrics, and the trained weights equal zoft's. Tolerances:
    the two sides sum the same token NLLs in a different order (Trainer: the model's
    loss_function, zoft: its task), so a loss agrees to fp32 rounding (rtol 1e-6, ~6e-6 absolute
    at L ~ 6); the projected gradient (L+ - L-) / 2eps carries that rounding over 2eps (rtol 2e-3,
    plus 6 rtol / eps absolute for a near-zero g, as LoRA's zero-initialised B gives); and the
    weight updates sum_t lr_t g_t z_t inherit g's error: each tensor's update w - w0 agrees with
    zoft's to 2e-3 of its norm plus what the logged g differences explain,
    1.5 sum_t lr_t |dg_t| / sqrt(sum_t (lr_t g_t)^2) (z_t independent: the reference update's
    norm is about sqrt(sum (lr_t g_t)^2) |z|, the error's at most sum lr_t |dg_t| |z|; 1.5 covers
    |z_t| varying between steps on tensors of >= 512 elements). fp32 runs: measured 2e-4; the
    8-bit run's g carries the int8 path's ~1e-6 loss differences over 2 eps (measured 1.6-4.8% of
    the update, depending on the noise draws). A wrong seed, lr or step differs by ~100%."""
    cfg = TrainConfig(model=str(model_dir), task="lm", train=str(model_dir / "train.jsonl"), steps=STEPS,
                      batch_size=B, lr=lr, eps=eps, schedule="linear", max_length=MAXLEN, seed=SEED, device="cpu",
                      output_dir=str(tmp_path / "zoft"), progress=False,
                      quant=quant, **({"peft": "lora", "peft_options": LORA} if peft else {}))
    ref = finetune(cfg)
    ref_w = trained(ref.model)
    model = load(model_dir, peft, quant)
    w0 = trained(model)
    trainer = zo_trainer(model, tmp_path / "hf", zo_options={"eps": eps}, args={"learning_rate": lr})
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    recs = [m for m in ref.metrics if "projected_grad" in m]
    assert len(steps) == len(recs) == STEPS
    for h, r in zip(steps, recs):
        assert "grad_norm" not in h
        assert h["learning_rate"] == pytest.approx(r["lr"], rel=1e-12)
        assert h["loss"] == pytest.approx(r["loss"], rel=loss_rtol)
        assert h["projected_grad"] == pytest.approx(r["projected_grad"], rel=2e-3, abs=loss_rtol * 6 / eps)
    lrs = torch.tensor([r["lr"] for r in recs], dtype=torch.float64)
    g_ref = torch.tensor([r["projected_grad"] for r in recs], dtype=torch.float64)
    g_hf = torch.tensor([h["projected_grad"] for h in steps], dtype=torch.float64)
    explained = float(1.5 * (lrs * (g_hf - g_ref).abs()).sum() / (lrs * g_ref).norm())
    assert steps[-1]["learning_rate"] < steps[0]["learning_rate"]  # the schedule is Trainer's (linear)
    w = trained(trainer.model)
    assert w.keys() == ref_w.keys() and all(("lora_" in k) == peft for k in w)
    assert_same_updates(w, ref_w, w0, 2e-3 + explained)
    if peft and quant == "none":  # save_model writes the adapter alone; plain peft loads it
        from peft import PeftModel

        trainer.save_model(str(tmp_path / "adapter"))
        assert not (tmp_path / "adapter" / "model.safetensors").exists()
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter")
        lora = {k: p for k, p in plain.named_parameters() if "lora_" in k}
        assert lora.keys() == w.keys() and all(torch.equal(lora[k], w[k]) for k in w)


def assert_same_updates(w, ref, w0, rel: float = 2e-3):
    """Each tensor's update ``w - w0`` equals ``ref - w0`` to ``rel`` of its norm, and some moved."""
    assert w.keys() == ref.keys()
    for k in w:
        du, dr = w[k] - w0[k], ref[k] - w0[k]
        assert (du - dr).norm() <= rel * dr.norm(), k
    assert any(dr.norm() > 0 for dr in (ref[k] - w0[k] for k in w))


def test_no_backward_no_grad_no_optimizer_state(model_dir, tmp_path, monkeypatch):
    """A ZOTrainer run never calls autograd's backward, leaves every ``.grad`` None and allocates
    no optimizer state (Trainer's optimizer is the stateless ZOOptimizer)."""
    def no_backward(*a, **k):
        raise AssertionError("backward was called")

    monkeypatch.setattr(torch.autograd, "backward", no_backward)
    model = load(model_dir)
    trainer = zo_trainer(model, tmp_path)
    trainer.train()
    assert all(p.grad is None for p in model.parameters())
    assert len(trainer.optimizer.state) == 0
    sd = trainer.optimizer.state_dict()
    assert sd["state"] == {} and sd["zoft"]["tensors"] == {}


def test_evaluate_and_save_model_see_the_trained_weights(model_dir, tmp_path):
    """Trainer's callbacks see every step and log line, its evaluation strategy runs on the
    updated weights (eval_loss equals a plain forward's loss of the saved model), and
    ``save_model`` writes a folder ``from_pretrained`` loads with exactly the trainer's weights."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        steps, logs = [], []

        def on_step_end(self, args, state, control, **kw):
            self.steps.append(state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append(dict(logs))

    model = load(model_dir)
    w0 = trained(model)
    evals = [{"text": t} for t in TEXTS[:4]]
    trainer = zo_trainer(model, tmp_path / "run", eval_dataset=evals, callbacks=[Recorder()],
                         args={"eval_strategy": "steps", "eval_steps": 2, "per_device_eval_batch_size": 4})
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [2, 4]
    assert Recorder.steps == [1, 2, 3, 4] and sum("projected_grad" in g for g in Recorder.logs) == STEPS
    trainer.save_model(str(tmp_path / "saved"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert trained(loaded).keys() == w0.keys()
    assert all(torch.equal(p, trainer.model.state_dict()[k]) for k, p in loaded.state_dict().items())
    assert any(not torch.equal(p, w0[k]) for k, p in trained(loaded).items())
    batch = lm_collator()(evals)
    with torch.no_grad():
        ref = loaded(**batch).loss.item()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("name", ["mezo-sgd", "zo-sgd-mmt"])
def test_resume_from_a_trainer_checkpoint_continues_the_same_trajectory(model_dir, tmp_path, name):
    """Stopped at checkpoint-2 of a 4-step run and resumed with ``resume_from_checkpoint``: the
    final weights are bit-identical to the uninterrupted run (momentum: its buffer travels in
    optimizer.pt)."""
    full = zo_trainer(load(model_dir), tmp_path / "full", zo_optimizer=name,
                      args={"save_strategy": "steps", "save_steps": 2})
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "scheduler.pt").is_file()
    resumed = zo_trainer(load(model_dir), tmp_path / "resumed", zo_optimizer=name)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert [h["step"] for h in resumed.state.log_history if "loss" in h][-2:] == [3, 4]
    a, b = trained(full.model), trained(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["mezo-sgd", "sparse-mezo", "r-adazo"])
def test_streaming_under_zo_gpu_mem_on_the_cpu_twin_equals_resident(tmp_path, name):
    """``zo_gpu_mem`` just above the smallest plan streams blocks through the CPU twin: the
    weights equal the resident run's (the engine's equivalence tolerance, rtol 1e-5) and the
    logged device peak stays within the budget. The plan (``trainer.zo_plan``) is the planner's
    for the optimizer's statefulness: Sparse MeZO (re-masking) and R-AdaZO hand out updates that
    are not seed-form, planned with write-back every step and their whole fp32 copy
    (``make_plan(stateful=True)``); MeZO-SGD defers write-back."""
    from zoft.engine.plan import make_plan
    from zoft.optim import make_optimizer

    d = tmp_path / "deep"
    tiny_model("opt", layers=6).save_pretrained(d)
    stateful = make_optimizer(name, {}, seed=0, total_steps=1).stateful
    assert stateful == (name != "mezo-sgd")
    kw = dict(batch_size=B, max_length=MAXLEN, num_probes=2, dtype="fp32", noise="torch", device="cpu",
              stateful=stateful)
    cfg = AutoModelForCausalLM.from_pretrained(d).config
    budget = make_plan(cfg, "1GB", **kw).min_budget_bytes + 2000
    # torch noise: the CPU default 'table' puts a 268 MB table on the device, above this kB budget
    resident = zo_trainer(AutoModelForCausalLM.from_pretrained(d), tmp_path / "r", zo_noise="torch", zo_optimizer=name)
    resident.train()
    streamed = zo_trainer(AutoModelForCausalLM.from_pretrained(d), tmp_path / "s", zo_gpu_mem=str(budget),
                          zo_max_length=MAXLEN, zo_noise="torch", zo_optimizer=name)
    assert streamed.zo_plan == make_plan(cfg, budget, **kw)
    assert (streamed.zo_plan.writeback_every == 1) == stateful
    assert streamed.engine.offload is not None and len(streamed.engine.offload.streamed) > 0
    streamed.train()
    peaks = [h["device_peak_bytes"] for h in streamed.state.log_history if "loss" in h]
    assert len(peaks) == STEPS and 0 < max(peaks) <= budget
    a, b = trained(resident.model), trained(streamed.model)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=0, msg=k)
    assert any(not torch.equal(a[k], p) for k, p in trained(AutoModelForCausalLM.from_pretrained(d)).items())


def test_a_plan_with_a_chunked_head_runs_the_causal_lm_loss_in_chunks(tmp_path):
    """For 128-token rows the smallest budget fits only with the LM head run 64 positions at a
    time (the plan's head_chunk; all logits at once need 2.33 MB, not 1.19 MB). ZOTrainer then
    computes the model's own causal-LM loss through the chunked head: no (P*R, T, V) logits, the
    probes' losses equal ``model(**inputs).loss`` (rtol 1e-5), and the logged device peak of
    steps on 128-token rows stays within the budget (the twin does not see the loss's fp32
    copies of full logits, which the plan counts, so it cannot tell them apart). A custom
    loss (``compute_loss_func``) cannot be chunked: the planner plans all logits at once, so the
    same budget is refused in one line naming the smallest plan that holds them (and the
    trainer's arguments to change), which runs."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from zoft.engine import Probe
    from zoft.engine.plan import make_plan, min_budget_from_message
    from zoft.tasks.head import HiddenOutputs

    d, T = tmp_path / "deep", 128
    tiny_model("opt", layers=6).save_pretrained(d)
    task = LMTask(make_tiny_tokenizer(), "causal", T)

    def collate(examples):
        b = task.collate(examples)
        return {**b.inputs, "labels": b.targets["labels"]}

    long = [{"text": " ".join(TEXTS[i:] + TEXTS[:i]) * 3} for i in range(len(TEXTS))]
    assert min(len(task._encode([x])[0]) for x in long) >= T  # every row is truncated to T tokens
    kw = dict(batch_size=B, max_length=T, num_probes=2, dtype="fp32", noise="torch", device="cpu")
    cfg = AutoModelForCausalLM.from_pretrained(d).config
    budget = make_plan(cfg, "1GB", **kw).min_budget_bytes

    def trainer(out, gpu_mem, **more):
        return ZOTrainer(model=AutoModelForCausalLM.from_pretrained(d), args=hf_args(out, 2),
                         train_dataset=InOrder(long[:2 * B]), data_collator=collate, zo_options={"eps": EPS},
                         zo_gpu_mem=str(gpu_mem), zo_max_length=T, zo_noise="torch", **more)

    chunked = trainer(tmp_path / "c", budget)
    assert chunked.zo_plan.head_chunk == 64 and chunked.zo_plan.streamed_blocks > 0
    inputs = chunked._prepare_inputs(collate(long[:B]))
    batch, objective = chunked.zo_objective(inputs)
    with torch.no_grad():
        assert isinstance(objective.forward(chunked.model, batch), HiddenOutputs)
        ref = AutoModelForCausalLM.from_pretrained(d)(**inputs).loss.item()
    losses = chunked.engine.evaluate([Probe(None, 0.0)] * 2, batch, objective)
    torch.testing.assert_close(losses, torch.full((2,), ref, dtype=torch.float64), rtol=1e-5, atol=0)
    chunked.train()
    peaks = [h["device_peak_bytes"] for h in chunked.state.log_history if "loss" in h]
    assert len(peaks) == 2 and max(peaks) <= budget, (peaks, budget)

    def custom(outputs, labels, num_items_in_batch=None):
        return ForCausalLMLoss(outputs.logits, labels, outputs.logits.shape[-1])

    with pytest.raises(UsageError, match="smallest plan needs") as e:
        trainer(tmp_path / "f", budget, compute_loss_func=custom)
    msg = str(e.value)
    whole = min_budget_from_message(make_plan(cfg, "1GB", head_chunks=False, **kw).min_budget_bytes)
    assert "\n" not in msg and f"needs {whole / 1e6:.2f} MB" in msg and whole > budget
    assert "raise zo_gpu_mem or lower per_device_train_batch_size/zo_max_length" in msg and "all logits" in msg
    full = trainer(tmp_path / "f", whole, compute_loss_func=custom)
    assert full.zo_plan.head_chunk is None
    full.train()
    assert max(h["device_peak_bytes"] for h in full.state.log_history if "loss" in h) <= whole


@pytest.mark.parametrize("kw,says", [
    ({"args": {"gradient_accumulation_steps": 2}}, "gradient_accumulation_steps=1"),
    ({"zo_options": {"lr": 1.0}}, "learning_rate"),
    ({"zo_optimizer": "adamw"}, "unknown optimizer"),
    ({"zo_gpu_mem": "1GB"}, "zo_max_length"),
    ({"zo_noise": "philox"}, "unknown noise backend"),
])
def test_bad_setups_are_one_line_usage_errors(model_dir, tmp_path, kw, says):
    with pytest.raises(UsageError, match=says) as e:
        zo_trainer(load(model_dir), tmp_path, **kw)
    assert "\n" not in str(e.value)


def test_a_model_with_nothing_trainable_is_refused(model_dir, tmp_path):
    model = load(model_dir).requires_grad_(False)
    with pytest.raises(UsageError, match="nothing would train"):
        zo_trainer(model, tmp_path)


# -- TRL ----------------------------------------------------------------------------------------
WORDS = ["great", "terrible", "fine", "awful", "boring", "lovely"]


def chat_tokenizer():
    tok = make_tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    return tok


def chats(n: int, start: int = 0, prompt_completion: bool = False):
    from datasets import Dataset

    rows = []
    for i in range(start, start + n):
        w = WORDS[i % len(WORDS)]
        user = [{"role": "user", "content": f"was the movie {w}?"}]
        reply = [{"role": "assistant", "content": f"the movie was {w}"}]
        rows.append({"prompt": user, "completion": reply} if prompt_completion else {"messages": user + reply})
    return Dataset.from_list(rows)


def sft_args(out, **kw):
    from trl import SFTConfig

    base = dict(output_dir=str(out), max_steps=16, per_device_train_batch_size=4, learning_rate=5e-2,
                logging_steps=4, save_strategy="no", report_to=[], seed=SEED, disable_tqdm=True, use_cpu=True,
                max_length=32, per_device_eval_batch_size=12)
    return SFTConfig(**{**base, **kw})


def test_zosfttrainer_lowers_the_held_out_loss_on_chat_data(tmp_path):
    """TRL prepares a chat-formatted dataset (chat template, labels); ZO steps lower the loss on
    held-out conversations. fp32 (``bf16=False``; TRL's SFTConfig defaults to bf16 autocast, whose
    rounding moves a loss by ~1e-3 on this model, as much as a perturbation at eps 1e-3 does) at
    lr 1e-2: measured 5.804 -> 5.566 / 5.558 / 5.671 at seeds 0 / 1 / 2 in 24 steps; steps that did
    nothing, or moved the weights at random, would not lower it by 0.05 (lr 5e-2 diverges: 7.6-470)."""
    from zoft.integrations import ZOSFTTrainer

    trainer = ZOSFTTrainer(model=tiny_model("opt"), args=sft_args(tmp_path, max_steps=24, learning_rate=1e-2, bf16=False),
                           train_dataset=chats(24), eval_dataset=chats(12, start=3), processing_class=chat_tokenizer(),
                           zo_options={"eps": EPS})
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.05
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all("projected_grad" in h for h in logs)
    assert all(p.grad is None for p in trainer.model.parameters())


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_zosft_probe_loss_is_trls_loss_completion_only(tmp_path, packing):
    """On a prompt-completion batch (completion-only loss: prompt tokens are -100 in TRL's labels),
    padded or packed padding-free, the engine's loss of each of two stacked unperturbed probes
    equals TRL's own ``compute_loss`` (its fused LM head) on the same batch. rtol 1e-5: the fused
    head reduces the same fp32 token NLLs in tiles."""
    from zoft.engine import Probe
    from zoft.integrations import ZOSFTTrainer

    trainer = ZOSFTTrainer(model=tiny_model("opt"), args=sft_args(tmp_path, packing=packing),
                           train_dataset=chats(8, prompt_completion=True), processing_class=chat_tokenizer())
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labels = inputs["labels"]
    assert ("position_ids" in inputs and labels.shape[0] == 1) if packing else "attention_mask" in inputs
    prompt_ids = chat_tokenizer().apply_chat_template(chats(1, prompt_completion=True)[0]["prompt"])
    assert (labels[0, 1:len(prompt_ids)] == -100).all() and (labels != -100).any()  # completion only
    n = (labels[..., 1:] != -100).sum()
    with torch.no_grad():
        ref = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=n).item()
    losses = trainer.engine.evaluate([Probe(None, 0.0)] * 2, *trainer.zo_objective(inputs, n))
    torch.testing.assert_close(losses, torch.full((2,), ref, dtype=torch.float64), rtol=1e-5, atol=0)


def test_every_registered_optimizer_steps_through_zotrainer(model_dir, tmp_path):
    """Any name in the registry works by name: two steps each, finite losses, weights moved, no
    ``.grad``. ``cge`` queries every trained coordinate (the whole model is refused over its
    ``max_queries``): it trains one LayerNorm."""
    from zoft.optim import OPTIMIZERS

    for name in OPTIMIZERS:
        model = load(model_dir)
        if name == "cge":
            for n, p in model.named_parameters():
                p.requires_grad_("layers.1.final_layer_norm" in n)
        w0 = trained(model)
        trainer = zo_trainer(model, tmp_path / name, steps=2, zo_optimizer=name)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), name
        assert any(not torch.equal(p, w0[k]) for k, p in trained(model).items()), name
        assert all(p.grad is None for p in model.parameters()), name
