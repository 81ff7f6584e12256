"""PEFT adapters (peft LoRA / prefix tuning) under the engine, the trainer, the CLI and replay."""
import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import make_tiny_tokenizer
from test_engine import RTOL, TokenNLL, make_batch
from test_train_cli import finetune_args, lm_data  # noqa: F401 - the fixture
from tiny_models import tiny_batch, tiny_model
from zoft.cli import main
from zoft.config import TrainConfig, load_config_file
from zoft.engine import Probe, Update, ZOEngine
from zoft.models import configs_dir
from zoft.models.adapters import apply_peft
from zoft.noise import make_noise
from zoft.optim import MeZOConfig, MeZOSGD
from zoft.train import replay


def adapter_model(family, method="lora", seed=0):
    return apply_peft(tiny_model(family), method, {}, seed=seed).eval()


def trainable(model):
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def perturbed_losses(model, probes, batch, obj):
    """P separate forward passes of copies of the plain peft model, adapter perturbed by hand."""
    noise, out = make_noise(), []
    for pr in probes:
        m = copy.deepcopy(model)
        with torch.no_grad():
            for k, p in trainable(m).items():
                if pr.seed is not None:
                    p.add_(noise.sample(pr.seed, k, p), alpha=pr.scale)
            out.append(obj.loss(obj.forward(m, batch), batch, 1)[0].item())
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("family,method", [("opt", "lora"), ("llama", "lora"), ("opt", "prefix"), ("llama", "prefix")])
def test_engine_equals_separate_perturbed_passes_with_adapters(family, method):
    model = adapter_model(family, method)
    assert trainable(model) and all(("lora_" in k) == (method == "lora") and ("prompt_encoder" in k) == (method == "prefix")
                                    for k in trainable(model))
    ref = copy.deepcopy(model)
    batch, obj = make_batch(family), TokenNLL(causal=True)
    engine = ZOEngine(model)
    assert set(engine.params) == set(trainable(model))  # every adapter parameter is in some unit
    upd = Update(terms=[(3, -1e-2), (4, 2e-2)])  # a pending update (LoRA B starts at 0: move it)
    engine.set_update(upd)
    with torch.no_grad():
        for k, p in trainable(ref).items():
            p.add_(sum(c * make_noise().sample(s, k, p) for s, c in upd.terms))
    probes = [Probe(None), Probe(11, 1e-1), Probe(11, -1e-1), Probe(5, 1e-1)]
    losses = engine.evaluate(probes, batch, obj)
    expected = perturbed_losses(ref, probes, batch, obj)
    torch.testing.assert_close(losses, expected, rtol=RTOL, atol=0)
    assert losses.std() > 0
    engine.close()
    for (k, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=1e-7, msg=k)


def test_adapter_only_mezo_step_equals_hand_written_reference_and_base_is_untouched():
    model = adapter_model("opt")
    ref = copy.deepcopy(model)
    base0 = {k: p.clone() for k, p in model.named_parameters() if not p.requires_grad}
    batch, obj, noise = make_batch("opt"), TokenNLL(True), make_noise()
    cfg = MeZOConfig(lr=1e-2, eps=1e-2, weight_decay=0.1)
    opt = MeZOSGD(cfg, seed=7, total_steps=10)
    engine = ZOEngine(model)
    for step in range(3):
        upd, metrics = opt.update(step, engine.evaluate(opt.probes(step), batch, obj))
        engine.set_update(upd)
        # by hand: g = (L(a + eps z) - L(a - eps z)) / 2 eps over the adapter a only; a <- (1 - lr wd) a - lr g z
        (s,) = opt.seeds(step)
        lp, lm = perturbed_losses(ref, [Probe(s, cfg.eps), Probe(s, -cfg.eps)], batch, obj).tolist()
        g = (lp - lm) / (2 * cfg.eps)
        assert metrics["projected_grad"] == pytest.approx(g, rel=1e-3, abs=1e-3)
        with torch.no_grad():
            for k, p in trainable(ref).items():
                decay = 1.0 if "bias" in k else 1 - cfg.lr * cfg.weight_decay
                p.mul_(decay).add_(noise.sample(s, k, p), alpha=-cfg.lr * metrics["projected_grad"])
    engine.close()
    for (k, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=k)
    for k, p in model.named_parameters():
        if k in base0:
            assert torch.equal(p, base0[k]), k  # the frozen base: bit-identical
    assert any(not torch.equal(p, torch.zeros_like(p)) for k, p in trainable(model).items() if "lora_B" in k)


def test_adapter_init_is_a_function_of_the_seed():
    a, b, c = (trainable(adapter_model("llama", seed=s)) for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-opt-peft")
    tiny_model("opt").save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    return d


def test_finetune_peft_lora_cli_checkpoint_loads_in_plain_peft_and_replays(tiny_dir, lm_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = finetune_args(tiny_dir, lm_data, out, "--peft", "lora", "--save-every", "3")
    args[args.index("--lr") + 1], args[args.index("--eps") + 1] = "1e-1", "1e-2"
    assert main(args) == 0
    ck = out / "checkpoint"
    assert (ck / "adapter_config.json").is_file() and (ck / "adapter_model.safetensors").is_file()
    assert not (ck / "model.safetensors").exists()  # the base is not copied: it was never written
    trained = load_file(str(ck / "adapter_model.safetensors"))
    assert trained and all("lora_" in k for k in trained)
    assert any("lora_B" in k and torch.count_nonzero(v) > 0 for k, v in trained.items())  # it trained

    # plain peft, no zoft: the base from its directory + the checkpoint
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    plain = PeftModel.from_pretrained(base, ck).eval()
    for k, v in trained.items():
        assert any(torch.equal(v, p) for n, p in plain.named_parameters() if k.replace(".weight", "") in n), k
    # ... gives the logits of the model zoft trained (its adapter rebuilt by replay below)
    model = replay(out, output=tmp_path / "replayed")
    ids = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(plain(**ids).logits, model(**ids).logits, rtol=0, atol=0)
    again = load_file(str(tmp_path / "replayed" / "adapter_model.safetensors"))
    assert again.keys() == trained.keys()
    for k in trained:
        assert torch.equal(again[k], trained[k]), k  # replay is bitwise
    # the frozen base in the trained model equals the file it came from
    init = load_file(str(tiny_dir / "model.safetensors"))
    base_params = dict(model.get_base_model().named_parameters())
    for k, v in init.items():
        if k in base_params:
            assert torch.equal(base_params[k], v), k

    # merged on export: a plain transformers model with the same outputs
    assert main(["replay", str(out), "--output", str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, plain(**ids).logits, rtol=1e-5, atol=1e-5)

    # resume from the step-3 checkpoint continues the same adapter trajectory
    part = tmp_path / "part"
    short = list(args)
    short[short.index("--output-dir") + 1] = str(part)
    short[short.index("--steps") + 1] = "3"
    assert main(short) == 0
    resumed = list(args)
    resumed[resumed.index("--output-dir") + 1] = str(part)
    assert main([*resumed, "--resume"]) == 0
    b = load_file(str(part / "checkpoint" / "adapter_model.safetensors"))
    assert all(torch.equal(b[k], trained[k]) for k in trained)
    assert (out / "trajectory.jsonl").read_text() == (part / "trajectory.jsonl").read_text()
    cfg = load_config_file(str(out / "config.yaml"))
    assert cfg["peft"] == "lora"
    assert json.loads((ck / "state.json").read_text())["step"] == 6


def test_recipe_files_in_subfolders_parse():
    root = configs_dir()
    found = [f for f in sorted(root.rglob("*.yaml")) + sorted(root.rglob("*.toml"))
             if f.parent != root and not {"models", "unlearn"} & set(f.relative_to(root).parts)]  # finetune recipes
    names = {f.relative_to(root).as_posix() for f in found}
    assert {"opt/13b_mezo_lora.yaml", "opt/13b_mezo_prefix.yaml"} <= names
    for f in found:
        TrainConfig.from_dict(load_config_file(str(f)))
    lora = TrainConfig.from_dict(load_config_file(str(root / "opt" / "13b_mezo_lora.yaml")))
    assert (lora.peft, lora.lr, lora.eps, lora.peft_options["r"], lora.peft_options["lora_alpha"]) == ("lora", 1e-4, 1e-2, 8, 16)
    prefix = TrainConfig.from_dict(load_config_file(str(root / "opt" / "13b_mezo_prefix.yaml")))
    assert (prefix.peft, prefix.lr, prefix.eps, prefix.peft_options["num_virtual_tokens"]) == ("prefix", 1e-2, 1e-1, 5)
    for recipe in (lora, prefix):  # the options are valid peft configs
        assert trainable(apply_peft(tiny_model("opt"), recipe.peft, recipe.peft_options))
