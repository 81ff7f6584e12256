import pytest
import torch
from torch import nn

from tiny_models import FAMILIES, tiny_model
from zoft.errors import UsageError, ZoftError
from zoft.models import aliases, build_random, discover_layout, load_model, resolve


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layout_covers_every_parameter_once(family):
    model = tiny_model(family)
    layout = discover_layout(model)
    keys = layout.param_keys()
    assert sorted(keys) == sorted(n for n, _ in model.named_parameters())
    kinds = [u.kind for u in layout.units]
    assert kinds.count("block") == model.config.num_hidden_layers
    # execution order: pre units, then the contiguous block stack, then the rest, head last
    first, last = kinds.index("block"), len(kinds) - 1 - kinds[::-1].index("block")
    assert all(k == "block" for k in kinds[first:last + 1])
    assert "embed" in kinds[:first]
    assert kinds[-1] == "head"


def test_tied_embedding_appears_in_two_units_with_one_key():
    model = tiny_model("opt")
    layout = discover_layout(model)
    embed = next(u for u in layout.units if u.name.endswith("embed_tokens"))
    head = layout.units[-1]
    (k1, p1), = embed.params
    (k2, p2), = head.params
    assert p1 is p2 and k1 == k2 == "model.decoder.embed_tokens.weight"


def test_unreadable_architecture_names_what_is_missing_and_flat_models_are_generic():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = nn.Linear(2, 2)

    layout = discover_layout(Flat())  # no block stack: the generic layout, one unit per Linear
    assert [u.name for u in layout.units] == ["a", "b"] and layout.blocks == ()

    class Stray(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])
            self.scale = nn.Parameter(torch.ones(1))

    with pytest.raises(ZoftError, match="scale"):
        discover_layout(Stray())


def test_alias_configs_resolve_offline():
    al = aliases()
    for name in ["opt-125m", "opt-30b", "opt-175b", "llama-2-7b", "qwen2.5-0.5b", "qwen3-0.6b", "mistral-7b"]:
        assert name in al
    src, cfg = resolve("opt-30b")
    assert src == "facebook/opt-30b" and cfg.hidden_size == 7168 and cfg.num_hidden_layers == 48


def test_random_init_is_deterministic_and_leaves_global_rng_alone():
    cfg = FAMILIES["llama"]()
    state = torch.random.get_rng_state()
    a = build_random(cfg, "causal", torch.float32, seed=3)
    b = build_random(cfg, "causal", torch.float32, seed=3)
    c = build_random(cfg, "causal", torch.float32, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_unknown_model_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="unknown model 'opt-7b'"):
        resolve("opt-7b")
    with pytest.raises(UsageError, match="no config.json"):
        resolve(str(tmp_path))


def test_embedded_default_is_a_pretrained_encoder():
    lm = load_model(None)
    assert lm.kind == "encoder" and lm.tokenizer is not None
    assert len(discover_layout(lm.model).blocks) == 6


def test_unreachable_hub_id_is_a_clear_runtime_error(monkeypatch):
    import transformers

    def offline(*a, **k):  # what the hub client raises with no network
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(ZoftError, match="could not fetch the config of 'nobody/no-such-model'"):
        resolve("nobody/no-such-model")


def test_local_directory_round_trip(tmp_path):
    from conftest import make_tiny_tokenizer
    from tiny_models import tiny_model

    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    make_tiny_tokenizer().save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.kind == "causal" and lm.tokenizer is not None
    for (n, p), (_, q) in zip(model.named_parameters(), lm.model.named_parameters()):
        assert torch.equal(p, q), n
