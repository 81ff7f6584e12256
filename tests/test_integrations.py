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


def load(model_dir, peft: bool = False):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return apply_peft(model, "lora", LORA, seed=SEED) if peft else model


def zo_trainer(model, out, steps: int = STEPS, zo_options=None, **kw) -> ZOTrainer:
    return ZOTrainer(model=model, args=hf_args(out, steps, **kw.pop("args", {})), train_dataset=zoft_batches(steps),
                     data_collator=lm_collator(), zo_options={"eps": EPS, **(zo_options or {})}, **kw)


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("peft,lr,eps", [(False, LR, EPS), (True, 1e-1, 1e-2)], ids=["full", "lora"])
def test_zotrainer_takes_the_steps_of_zofts_own_loop(model_dir, tmp_path, peft, lr, eps):
    """Same batches, seeds and linear lr schedule: per-step losses, lr and projected gradients in
    Trainer's log history equal zoft's metrics, and the trained weights equal zoft's. Tolerances:
    the two sides sum the same token NLLs in a different order (Trainer: the model's
    loss_function, zoft: its task), so a loss agrees to fp32 rounding (rtol 1e-6, ~1e-6 absolute
    at L ~ 6); the projected gradient (L+ - L-) / 2eps carries that rounding over 2eps (rtol 2e-3,
    plus 1e-6 / eps absolute for a near-zero g, as LoRA's zero-initialised B gives); and the
    weight updates lr g z inherit g's error: each tensor's update w - w0 agrees with zoft's to 2e-3
    of its norm (measured: 2e-4; a wrong seed, lr or step would differ by ~100%)."""
    cfg = TrainConfig(model=str(model_dir), task="lm", train=str(model_dir / "train.jsonl"), steps=STEPS,
                      batch_size=B, lr=lr, eps=eps, schedule="linear", max_length=MAXLEN, seed=SEED, device="cpu",
                      output_dir=str(tmp_path / "zoft"), progress=False,
                      **({"peft": "lora", "peft_options": LORA} if peft else {}))
    ref = finetune(cfg)
    ref_w = trained(ref.model)
    model = load(model_dir, peft)
    w0 = trained(model)
    trainer = zo_trainer(model, tmp_path / "hf", zo_options={"eps": eps}, args={"learning_rate": lr})
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    recs = [m for m in ref.metrics if "projected_grad" in m]
    assert len(steps) == len(recs) == STEPS
    for h, r in zip(steps, recs):
        assert "grad_norm" not in h
        assert h["learning_rate"] == pytest.approx(r["lr"], rel=1e-12)
        assert h["loss"] == pytest.approx(r["loss"], rel=1e-6)
        assert h["projected_grad"] == pytest.approx(r["projected_grad"], rel=2e-3, abs=1e-6 / eps)
    assert steps[-1]["learning_rate"] < steps[0]["learning_rate"]  # the schedule is Trainer's (linear)
    w = trained(trainer.model)
    assert w.keys() == ref_w.keys() and all(("lora_" in k) == peft for k in w)
    assert_same_updates(w, ref_w, w0)


def assert_same_updates(w, ref, w0, rel: float = 2e-3):
    """Each tensor's update ``w - w0`` equals ``ref - w0`` to ``rel`` of its norm, and some moved."""
    assert w.keys() == ref.keys()
    for k in w:
        du, dr = w[k] - w0[k], ref[k] - w0[k]
        assert (du - dr).norm() <= rel * dr.norm(), k
    assert any(dr.norm() > 0 for dr in (ref[k] - w0[k] for k in w))
