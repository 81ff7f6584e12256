"""ZO-QLoRA: a peft adapter trained by ZO steps on a bitsandbytes-quantized frozen base (--quant).

Tiny random OPT / Llama models from ``tiny_models.py``, quantized as transformers loads them
(bitsandbytes runs its 4-bit and 8-bit layers on the CPU).

Tolerances, and why:
- the packed base (uint8 / int8 weights, their absmax / quant-map / SCB quant states, every other
  frozen tensor): bitwise. The engine perturbs and writes ``requires_grad`` floating-point
  parameters only; nothing else may change at all.
- engine vs hand reference: per-probe losses and adapter weights within 1e-5 relative (fp32; the
  engine runs each probe's slice of a P-times repeated batch, the reference a plain batch, and
  forms ``w0 + s*z`` with one fused add where the reference adds ``s*z``: reductions and one
  rounding may differ, as in the fp32 engine tests; measured: 0 or 1 ulp of the loss). The projected
  gradient divides a loss difference by 2*eps, which amplifies those ulps: |g - g_hand| <= 2 ulps of
  each loss / (2 eps) (measured 2.4e-5 against a bound of 1.4e-4 at eps 1e-2). The reference then
  updates its adapter with the engine's g (as tests/test_peft.py does): the hand g alone would carry
  that 1e-4 into the weights (lr * dg * |z| ~ 1e-5 per step) and hide the update rule behind it.
- adapter loaded with plain peft onto a freshly quantized base vs the model zoft trained: bitwise
  (same packed bytes, same adapter bytes, same kernels, same inputs).
"""
import json

import pytest
import torch
from conftest import make_tiny_tokenizer
from peft import PeftModel
from safetensors.torch import load_file
from test_engine import RTOL, TokenNLL, make_batch
from tiny_models import tiny_batch, tiny_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from zoft.cli import main
from zoft.config import TrainConfig
from zoft.engine import ZOEngine
from zoft.errors import UsageError
from zoft.models.adapters import apply_peft
from zoft.models.loading import bnb_config, load_model
from zoft.noise import make_noise
from zoft.optim import MeZOConfig, MeZOSGD
from zoft.train import Trainer, replay

bnb = pytest.importorskip("bitsandbytes")

PACKED = {"4bit": (bnb.nn.Params4bit, torch.uint8), "8bit": (bnb.nn.Int8Params, torch.int8)}
TEXTS = ["the quick brown fox jumps over the lazy dog", "zeroth-order steps need forward passes only",
         "a packed four-bit base never changes", "adapters learn on top of a frozen model",
         "hello world, this is a tiny corpus", "eight-bit weights stay where they are"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """``family -> directory`` holding a tiny model (save_pretrained) and the tiny tokenizer."""
    out = {}
    for family in ("opt", "llama"):
        d = tmp_path_factory.mktemp(f"tiny-{family}-quant")
        tiny_model(family).save_pretrained(d)
        make_tiny_tokenizer().save_pretrained(d)
        out[family] = d
    return out


@pytest.fixture(scope="module")
def lm_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("qdata") / "train.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return f


def trainable(model):
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def frozen_state(model):
    """Every tensor of the base: packed weights, their quant states (state_dict holds absmax,
    quant_map, nested stats, SCB, ...) and the unquantized frozen parameters, cloned."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {k: v.detach().clone() for k, v in base.state_dict().items() if "lora_" not in k}


def quantized_lora(directory, quant, seed=0):
    lm = load_model(str(directory), quant=quant)
    return apply_peft(lm.model, "lora", {}, seed=seed).eval()


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantized_load_packs_linear_weights_and_freezes_them(tiny_dirs, quant):
    cls, dtype = PACKED[quant]
    model = load_model(str(tiny_dirs["opt"]), quant=quant).model
    packed = {k: p for k, p in model.named_parameters() if isinstance(p, cls)}
    assert len(packed) == 2 * 6  # q, k, v, out, fc1, fc2 of each of the 2 layers (the head stays fp32)
    assert all(p.dtype == dtype and not p.requires_grad for p in packed.values())
    assert all(p.requires_grad for k, p in model.named_parameters() if k not in packed)  # fp32 rest
    engine = ZOEngine(apply_peft(model, "lora", {}, seed=0))
    assert engine.params and all("lora_" in k and p.dtype == torch.float32 for k, p in engine.params.items())
    engine.close()


def test_random_init_quantizes_the_seeded_random_weights_as_bitsandbytes_does(tiny_dirs):
    model = load_model(str(tiny_dirs["opt"]), random_init=True, seed=3, quant="4bit").model
    plain = load_model(str(tiny_dirs["opt"]), random_init=True, seed=3).model
    w = plain.model.decoder.layers[1].self_attn.v_proj.weight.detach()
    q = model.model.decoder.layers[1].self_attn.v_proj.weight
    ref, state = bnb.functional.quantize_4bit(w, blocksize=q.quant_state.blocksize, quant_type="nf4")
    assert torch.equal(q.data, ref) and torch.equal(q.quant_state.absmax, state.absmax)
    # seeded: a different seed gives different packed bytes
    other = load_model(str(tiny_dirs["opt"]), random_init=True, seed=4, quant="4bit").model
    assert not torch.equal(other.model.decoder.layers[1].self_attn.v_proj.weight.data, q.data)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_adapter_only_mezo_step_on_4bit_base_equals_hand_reference(tiny_dirs, family):
    model, ref = quantized_lora(tiny_dirs[family], "4bit"), quantized_lora(tiny_dirs[family], "4bit")
    a_ref = trainable(ref)
    assert all(torch.equal(p, a_ref[k]) for k, p in trainable(model).items())  # same seeded adapter init
    batch, obj, noise = make_batch(family), TokenNLL(True), make_noise()
    cfg = MeZOConfig(lr=1e-1, eps=1e-2, weight_decay=0.1)
    opt = MeZOSGD(cfg, seed=7, total_steps=10)
    engine = ZOEngine(model)
    for step in range(3):
        losses = engine.evaluate(opt.probes(step), batch, obj)  # (2,): L(a + eps z), L(a - eps z)
        upd, metrics = opt.update(step, losses)
        engine.set_update(upd)

        # by hand, on the second model: two perturbed forwards of the adapter a with step's seed, then
        # g = (L+ - L-) / (2 eps);  a <- (1 - lr wd) a - lr g z   (no decay on biases; LoRA has none)
        (s,) = opt.seeds(step)
        a0 = {k: p.detach().clone() for k, p in a_ref.items()}
        z = {k: noise.sample(s, k, p) for k, p in a_ref.items()}
        hand = []
        with torch.no_grad():
            for scale in (cfg.eps, -cfg.eps):
                for k, p in a_ref.items():
                    p.copy_(a0[k] + scale * z[k])
                hand.append(obj.loss(obj.forward(ref, batch), batch, 1)[0].item())
            g = (hand[0] - hand[1]) / (2 * cfg.eps)
            ulp = torch.finfo(torch.float32).eps * max(abs(x) for x in hand)
            assert abs(metrics["projected_grad"] - g) <= 2 * 2 * ulp / (2 * cfg.eps)
            g = metrics["projected_grad"]
            for k, p in a_ref.items():
                p.copy_((1 - cfg.lr * cfg.weight_decay) * a0[k] - cfg.lr * g * z[k])
        torch.testing.assert_close(losses, torch.tensor(hand, dtype=losses.dtype), rtol=RTOL, atol=0)
    engine.close()
    for k, p in trainable(model).items():
        torch.testing.assert_close(p, a_ref[k], rtol=RTOL, atol=1e-7, msg=k)
    assert any(torch.count_nonzero(p) > 0 for k, p in trainable(model).items() if "lora_B" in k)  # it moved


def run_config(directory, data, out, quant, **kw):
    opts = dict(model=str(directory), task="lm", train=str(data), eval=str(data), steps=5, batch_size=2, lr=1e-1,
                eps=1e-2, max_length=16, output_dir=str(out), progress=False, peft="lora", quant=quant)
    return TrainConfig(**{**opts, **kw})


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_zo_training_leaves_the_packed_base_bit_identical_and_checkpoint_loads_in_plain_peft(
        tiny_dirs, lm_file, tmp_path, quant):
    out = tmp_path / "run"
    trainer = Trainer(run_config(tiny_dirs["opt"], lm_file, out, quant, save_every=2))
    before = frozen_state(trainer.model)
    cls, dtype = PACKED[quant]
    assert sum(isinstance(p, cls) for p in trainer.model.parameters()) == 12
    assert any(k.endswith(("absmax", "SCB")) for k in before)  # the quant states are in the snapshot
    assert all("lora_" in k for k in trainer.engine.params)
    res = trainer.run()
    after = frozen_state(res.model)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k  # bit-identical, packed or not
    assert all(p.dtype == dtype for p in res.model.parameters() if isinstance(p, cls))

    ck = out / "checkpoint"
    trained = load_file(str(ck / "adapter_model.safetensors"))
    assert trained and all("lora_" in k for k in trained) and not (ck / "model.safetensors").exists()
    assert any("lora_B" in k and torch.count_nonzero(v) > 0 for k, v in trained.items())

    # plain transformers + peft, no zoft: quantize the base afresh, load the adapter
    qcfg = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
            if quant == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["opt"], quantization_config=qcfg, dtype=torch.float32,
                                                device_map={"": "cpu"})
    plain = PeftModel.from_pretrained(base, ck).eval()
    ids = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(plain(**ids).logits, res.model(**ids).logits, rtol=0, atol=0)

    # replay: the base reloaded quantized, the adapter rebuilt from the seed trajectory, bitwise
    replay(out, output=tmp_path / "replayed")
    again = load_file(str(tmp_path / "replayed" / "adapter_model.safetensors"))
    assert again.keys() == trained.keys() and all(torch.equal(again[k], trained[k]) for k in trained)
    with pytest.raises(UsageError, match="re-quantize"):
        replay(out, merge=True)

    if quant == "8bit":
        return  # resume does not depend on the codec: checked once, on the 4-bit base
    # resume from the step-4 checkpoint continues the same adapter trajectory
    part = tmp_path / "part"
    Trainer(run_config(tiny_dirs["opt"], lm_file, part, quant, save_every=2, steps=4)).run()
    Trainer(run_config(tiny_dirs["opt"], lm_file, part, quant, save_every=2, resume=True)).run()
    b = load_file(str(part / "checkpoint" / "adapter_model.safetensors"))
    assert all(torch.equal(b[k], trained[k]) for k in trained)


def test_bad_quant_inputs_are_one_line_usage_errors(tiny_dirs, lm_file, tmp_path, capsys):
    base = ["finetune", "--model", str(tiny_dirs["opt"]), "--task", "lm", "--train", str(lm_file), "--steps", "1",
            "--output-dir", str(tmp_path / "r"), "--no-progress"]
    assert main([*base, "--quant", "4bit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--quant 4bit needs --peft" in err[0] and "in place" in err[0]
    with pytest.raises(UsageError, match="not a BitsAndBytesConfig key"):
        bnb_config("4bit", {"bnb_4bit_quant_typo": "nf4"})
    with pytest.raises(UsageError, match="come from --quant"):
        bnb_config("4bit", {"load_in_8bit": True})
    cfg = bnb_config("4bit", {"bnb_4bit_use_double_quant": True})
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.float32
