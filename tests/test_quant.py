"""ZO-QLoRA: a peft adapter trained by ZO steps on a bitsandbytes-quantized frozen base (--quant).

Tiny random OPT / Llama models from ``tiny_models.py`` with the layer shapes of real models (hidden
size 64 = bitsandbytes' block), quantized as transformers loads them (bitsandbytes runs its 4-bit and
8-bit layers on the CPU). bitsandbytes has a second 4-bit layout on CPUs with AVX512-BF16, switched
per layer by ``support_avx512bf16_for_cpu``; zoft keeps the canonical one (``zoft.models.quant``).
The 4-bit tests set that switch both ways (``bnb_cpu_layout``), so either kind of CPU runs both
code paths; the packed base is always compared in the canonical (saved) layout.

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
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_tokenizer
from peft import PeftModel
from safetensors.torch import load_file
from test_engine import RTOL, TokenNLL, make_batch
from tiny_models import QUANT_WIDTH, bnb_cpu_layout, tiny_batch, tiny_model
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
        tiny_model(family, width=QUANT_WIDTH).save_pretrained(d)
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


@pytest.mark.parametrize("cpu_layout", [False, True], ids=["canonical-cpu", "avx512bf16-cpu"])
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_adapter_only_mezo_step_on_4bit_base_equals_hand_reference(tiny_dirs, family, cpu_layout):
    model, ref = quantized_lora(tiny_dirs[family], "4bit"), quantized_lora(tiny_dirs[family], "4bit")
    # the engine's model says what its CPU's layers say; the hand reference runs bitsandbytes'
    # canonical fp32 matmul (with the switch on, bitsandbytes would repack it and compute in bf16)
    assert bnb_cpu_layout(model, cpu_layout) == bnb_cpu_layout(ref, False) > 0
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
    bnb_cpu_layout(base, False)  # bitsandbytes' canonical layout and fp32 matmul, as zoft runs on every CPU
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


@pytest.mark.parametrize("cpu_layout", [False, True], ids=["canonical-cpu", "avx512bf16-cpu"])
def test_layers_narrower_than_a_block_train_under_either_cpu_switch(tmp_path, cpu_layout):
    """Input dimension 32 (< bitsandbytes' 64-wide blocks): bitsandbytes' CPU layout cannot repack
    such a layer (a RuntimeError inside bitsandbytes on the first eval forward of an AVX512-BF16 CPU);
    the canonical layout quantizes and runs it. With the switch on, zoft's step equals the step
    with it off, bitwise: the engine switched it off before any forward."""
    tiny_model("opt").save_pretrained(tmp_path)  # hidden 32, MLP 64
    batch, obj = make_batch("opt"), TokenNLL(True)
    opt = MeZOSGD(MeZOConfig(lr=1e-1, eps=1e-2), seed=7, total_steps=10)
    out = []
    for on in (False, cpu_layout):
        model = quantized_lora(tmp_path, "4bit")
        assert bnb_cpu_layout(model, on) == 12
        engine = ZOEngine(model)
        out.append(engine.evaluate(opt.probes(0), batch, obj))
        engine.close()
    assert torch.isfinite(out[0]).all() and torch.equal(out[0], out[1])


def test_a_base_repacked_before_zoft_comes_back_to_the_canonical_layout(tiny_dirs):
    """A 4-bit model evaluated before zoft gets it (the switch on, one eval forward without grad:
    bitsandbytes repacks every layer, on any CPU, and rounds its absmax to bf16). The engine brings
    it back before it builds anything: packed weight bytes exactly as loaded, absmax the loaded one
    rounded to bf16 (what the repacked layer computed with), in canonical order and dtype; its
    forward equals, bitwise, a canonical model holding those same constants (built by hand)."""
    from zoft.models.quant import keep_canonical_layout

    model = quantized_lora(tiny_dirs["opt"], "4bit")
    loaded = frozen_state(model)
    assert bnb_cpu_layout(model, True) == 12
    with torch.no_grad():
        model(**tiny_batch())
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert all(m.weight.quant_state.packing_format_for_cpu for m in layers)  # repacked: [N, K/2], bf16 absmax
    engine = ZOEngine(model)
    assert not any(m.support_avx512bf16_for_cpu or m.weight.quant_state.packing_format_for_cpu for m in layers)
    assert keep_canonical_layout(model) == 0  # nothing left to bring back
    engine.close()
    now = frozen_state(model)
    assert now.keys() == loaded.keys() and sum(k.endswith("absmax") for k in now) == 12
    for k, v in loaded.items():
        want = v.to(torch.bfloat16).float() if k.endswith("absmax") else v
        assert now[k].dtype == v.dtype and torch.equal(now[k], want), k

    hand = load_model(str(tiny_dirs["opt"]), quant="4bit").model
    for m in hand.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.weight.quant_state.absmax = m.weight.quant_state.absmax.to(torch.bfloat16).float()
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(**tiny_batch()).logits, hand(**tiny_batch()).logits, rtol=0, atol=0)


def test_8bit_layers_keep_one_layout_through_eval_forwards(tiny_dirs):
    """LLM.int8() on the CPU has no CPU-dependent layout: bitsandbytes' first forward moves the int8
    weight's row scales into the layer's matmul state (``init_8bit_state``), and the weight bytes stay
    the very tensor the module holds. After a ZO run the saved base is bitwise the loaded one."""
    model = apply_peft(load_model(str(tiny_dirs["opt"]), quant="8bit").model, "lora", {}, seed=0)
    loaded = frozen_state(model)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(layers) == 12
    engine = ZOEngine(model)
    opt = MeZOSGD(MeZOConfig(lr=1e-1, eps=1e-2), seed=7, total_steps=10)
    for step in range(2):
        engine.set_update(opt.update(step, engine.evaluate(opt.probes(step), make_batch("opt"), TokenNLL(True)))[0])
    engine.close()
    for m in layers:
        assert m.weight.dtype == torch.int8 and m.state.CB.data_ptr() == m.weight.data.data_ptr()
    after = frozen_state(model)
    assert after.keys() == loaded.keys() and all(torch.equal(after[k], v) for k, v in loaded.items())


def run_in_repo_root(code: str, *args: str) -> subprocess.CompletedProcess:
    """``python -c code *args`` in a fresh interpreter started in the repository root (so the
    ``kernels/`` folder is on sys.path: the worst case for bitsandbytes' kernels-community probe),
    with a user's default warning filters (FutureWarnings show, DeprecationWarnings do not)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=600)


def test_importing_zoft_imports_neither_bitsandbytes_nor_peft_and_the_integrations_print_nothing():
    code = ("import sys, zoft, zoft.cli, zoft.train, zoft.unlearn, zoft.eval, zoft.models.adapters\n"
            "print(sorted(m for m in ('bitsandbytes', 'peft') if m in sys.modules))")
    proc = run_in_repo_root(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]" and proc.stderr.strip() == "", proc.stderr[-2000:]
    # the integrations import transformers' Trainer and trl, which import peft and so bitsandbytes: silently
    proc = run_in_repo_root("import zoft.integrations.trainer, zoft.integrations.sft")
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr[-2000:]


@pytest.mark.parametrize("extra", [[], ["--quant", "4bit"], ["--quant", "8bit"]], ids=["peft", "4bit", "8bit"])
def test_peft_and_quant_runs_print_nothing_but_their_own_output(tiny_dirs, lm_file, tmp_path, extra):
    """``zoft finetune --peft lora`` (peft imports bitsandbytes when it is installed) and with --quant, in
    a fresh interpreter: stderr holds neither bitsandbytes' probe message nor transformers'
    FutureWarnings; the only line allowed is bitsandbytes' one note that LLM.int8() casts its inputs
    to fp16 (8-bit only: a precision fact about the run)."""
    argv = ["finetune", "--model", str(tiny_dirs["opt"]), "--task", "lm", "--train", str(lm_file), "--steps", "1",
            "--batch-size", "2", "--max-length", "16", "--output-dir", str(tmp_path / "r"), "--no-progress",
            "--peft", "lora", *extra]
    proc = run_in_repo_root("import sys; from zoft.cli import main; sys.exit(main(sys.argv[1:]))", *argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = [x for x in proc.stderr.splitlines() if x.strip()]
    if extra == ["--quant", "8bit"]:
        assert len([x for x in err if x.startswith("MatMul8bitLt: inputs will be cast")]) == 1
        err = [x for x in err if not x.startswith("MatMul8bitLt: inputs will be cast")]
    assert err == [], err


def test_ci_line_names_the_cpu_path_this_machine_takes():
    from zoft.models.quant import describe_cpu_path

    line = describe_cpu_path()
    assert bnb.__version__ in line and ("has AVX512-BF16" in line) == bool(bnb.functional.has_avx512bf16())
