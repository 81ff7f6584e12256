"""Parameter-granular perturbation and streaming groups (issue 15, items 1 and 2).

The reference is the unit-granular engine (``granularity="unit"``: a whole unit perturbed for each
probe's call), itself tested against P separate perturbed forwards (``tests/test_engine.py``) and
streamed == resident (``tests/test_offload.py``). fp32 throughout: the two paths add the same z to
the same weights; what differs is the order of reductions when parameter-free work runs on all
probes' rows at once instead of one probe's (~1e-7 relative), hence rtol 1e-5.
"""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, MixtralConfig, OPTConfig

from test_engine import TokenNLL, make_batch, reference_losses
from test_offload import L, RTOL, assert_same_weights, deep_model, optimizer_steps, raise_inside, run_steps
from tiny_models import QUANT_WIDTH, V, tiny_model
from zoft.engine import Probe, Streaming, Update, ZOEngine
from zoft.errors import UsageError
from zoft.models.layout import call_order, discover_layout, leaves, pack_groups, unit_path
from zoft.noise import make_noise
from zoft.optim import OPTIMIZERS, bind, make_optimizer
from zoft.tasks.base import Batch

FAMILIES = ["opt", "llama", "qwen2", "gpt2", "bloom", "bert"]


def granular_pair(make, steps=3, offload=None):
    """(losses, model) of the unit-granular resident engine and of the parameter-granular engine
    (streamed with ``offload`` when given) on two copies of ``make()``."""
    out = []
    for gran, off in (("unit", None), ("param", offload)):
        model = make()
        eng = ZOEngine(model, granularity=gran, offload=off)
        if gran == "param":  # the leaf path is what runs in every block
            assert all(id(b.module) in eng._leaves for b in eng.layout.blocks)
        losses = run_steps(eng, make.family, steps=steps)
        eng.close()
        out.append((losses, model))
    return out


def assert_pair(pair, atol=0.0):
    (l_unit, m_unit), (l_param, m_param) = pair
    torch.testing.assert_close(l_param, l_unit, rtol=RTOL, atol=atol)
    assert_same_weights(m_param, m_unit)


def maker(family):
    def make():
        return deep_model(family)
    make.family = family
    return make


@pytest.mark.parametrize("family", FAMILIES)
def test_param_granular_equals_unit_granular(family):
    assert_pair(granular_pair(maker(family)))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("group_bytes,every", [(1, 1), (6000, 3)], ids=["leaf-groups", "packed-groups-kwb3"])
def test_groups_streamed_equal_unit_granular_resident(family, group_bytes, every):
    """Every block streamed in groups (one leaf each, or leaves packed up to 6000 bytes) with
    write-back every step or every 3 updates: the unit-granular resident engine's losses and weights."""
    off = Streaming("cpu", resident_blocks=1, prefetch=2, group_bytes=group_bytes, writeback_every=every)
    assert_pair(granular_pair(maker(family), offload=off))


def test_each_group_crosses_the_link_once_per_step_in_call_order():
    """Groups are a block's leaves in call order packed greedily under ``group_bytes``; slots hold
    the largest group; after the first step each group is uploaded once per step (2 or 6 probes)
    and written back once, and nothing stalls (prefetch follows call order)."""
    model = deep_model("llama")
    gb = 3000
    eng = ZOEngine(model, offload=Streaming("cpu", resident_blocks=2, prefetch=2, group_bytes=gb))
    blocks = eng.layout.blocks
    order = call_order(model, blocks[3].module)
    names = {id(m): n for n, m in blocks[3].module.named_modules()}
    assert [names[id(m)] for m in order][:2] == ["input_layernorm", "self_attn.q_proj"]
    groups = eng.offload.units(blocks[3].module)
    assert [m for s in groups for m in s.leaves] == order and len(groups) > 2
    for s in groups:
        nbytes = (s.numel * 4)
        assert nbytes <= gb or len(s.leaves) == 1
    assert eng.offload.slots[0].flat.numel() == max(s.numel for s in eng.offload.streamed)
    S = len(eng.offload.streamed)
    assert S == len(groups) * (L - 2)
    st = eng.offload.stats
    for t, dirs in enumerate((1, 1, 3)):
        probes = [Probe(s, sc) for s in range(10 * t, 10 * t + dirs) for sc in (1e-3, -1e-3)]
        before = (st.uploads, st.writebacks, st.stalls)
        eng.evaluate(probes, make_batch("llama"), TokenNLL(True))
        eng.set_update(Update([(10 * t, -1e-2)]))
        if t:
            assert (st.uploads - before[0], st.writebacks - before[1], st.stalls - before[2]) == (S, S, 0)
    eng.close()


# cge queries every trained coordinate (76k here, over its max_queries): blocks of 1024 coordinates
# keep every parameter in its set at 94 queries a step (multi-block and partial-block probes); its
# default feature reuse fans out at the last block and the units after it (zoft/optim/cge.py)
EXTRA = {"cge": {"block": 1024}}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_param_granular_in_groups_equals_unit_granular(name):
    """Each optimizer (stateful ones move their buffers with each group), parameter-granular and
    streamed in groups, gives the unit-granular resident engine's losses and weights (one that
    cannot stream, forward-grad and cge: parameter-granular resident)."""
    family, obj = "llama", TokenNLL(True)
    batch = make_batch(family)
    results = []
    groups = Streaming("cpu", resident_blocks=1, prefetch=2, group_bytes=4000) if OPTIMIZERS[name][1].streams else None
    for gran, offload in (("unit", None), ("param", groups)):
        model = deep_model(family)
        eng = ZOEngine(model, offload=offload, granularity=gran)
        opt = make_optimizer(name, {"lr": 1e-3, "eps": 1e-3, **EXTRA.get(name, {})}, seed=3, total_steps=4)
        bind(opt, eng)
        losses, _ = optimizer_steps(eng, opt, batch, obj, 3)
        eng.close()
        results.append((torch.cat(losses), model))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=RTOL, atol=0)
    assert_same_weights(results[1][1], results[0][1])


def lora(model):
    from zoft.models.adapters import apply_peft

    model = apply_peft(model, "lora", {"target_modules": ["q_proj", "v_proj"]}, seed=1)
    with torch.no_grad():  # LoRA's B starts at zero: move it so the adapter matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    return model


@pytest.mark.parametrize("offload", [None, Streaming("cpu", resident_blocks=1, group_bytes=2000)],
                         ids=["resident", "groups"])
def test_lora_param_granular_equals_unit_granular(offload):
    """The adapter's Linear leaves are the perturbed modules (the frozen base Linear runs once on
    all probes' rows); streamed in groups, frozen groups are uploaded only."""
    def make():
        return lora(deep_model("opt"))
    make.family = "opt"
    pair = granular_pair(make, offload=offload)
    assert_pair(pair)


def test_4bit_base_in_groups_equals_unit_granular(tmp_path):
    """ZO-QLoRA: a 4-bit base streamed in groups (packed bytes travel with their leaf's group),
    parameter-granular, equals the unit-granular resident engine, and no packed byte changes."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    tiny_model("opt", layers=3, width=QUANT_WIDTH).save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)

    def make():
        base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q, device_map="cpu").eval()
        return lora(base)
    make.family = "opt"
    pair = granular_pair(make, offload=Streaming("cpu", resident_blocks=0, prefetch=2, group_bytes=3000))
    assert_pair(pair)
    packed = {n: p for n, p in pair[0][1].named_parameters() if not p.dtype.is_floating_point}
    for n, p in pair[1][1].named_parameters():
        if n in packed:
            assert torch.equal(p, packed[n]), n


@pytest.mark.parametrize("family", ["opt", "bloom"])
@pytest.mark.parametrize("micro_batch", [1, 2])
def test_micro_batches_param_granular_equal_unit_granular_whole_slices(family, micro_batch):
    """A block perturbed leaf by leaf runs one probe's chunk of examples at a time (uneven 2 + 1;
    BLOOM's ALiBi rows cut per example): the unit-granular engine's whole-slice results."""
    out = []
    for gran, off in (("unit", None), ("param", Streaming("cpu", resident_blocks=2, micro_batch=micro_batch))):
        model = deep_model(family)
        eng = ZOEngine(model, granularity=gran, offload=off)
        out.append((run_steps(eng, family), model))
        eng.close()
    assert_pair(out, atol=1e-6)


def test_groups_and_micro_batches_are_refused_together():
    with pytest.raises(UsageError, match="do not combine"):
        ZOEngine(deep_model("opt"), offload=Streaming("cpu", micro_batch=1, group_bytes=1000))


def test_a_raising_forward_inside_a_group_loses_no_update():
    """A forward raising between two groups of a streamed block: held groups are released with
    their pending update completed, the next steps equal an uninterrupted run's."""
    ref_model, model, ref, eng, batch, obj = raise_inside(
        {"granularity": "unit"}, Streaming("cpu", resident_blocks=0, prefetch=2, writeback_every=3, group_bytes=3000),
        lambda m: m.model.layers[3].mlp.up_proj)
    assert not eng._held and not eng._live
    for e in (ref, eng):
        e.set_update(Update([(2, -0.3)], decay=0.99))
    torch.testing.assert_close(eng.evaluate([Probe(3, 1e-3)], batch, obj),
                               ref.evaluate([Probe(3, 1e-3)], batch, obj), rtol=RTOL, atol=0)
    ref.close()
    eng.close()
    assert_same_weights(model, ref_model)


def test_scratch_is_one_leaf_not_two_units():
    """The meter during a streamed step holds one leaf's perturbed copy (the largest leaf: an fc1
    of 64 x 256; z is made in pieces), not a block's copy plus its z: the step's peak above
    resident weights and slots stays under the two block-sized buffers the unit path kept. The
    z piece of that copy is counted: in a first step on one row of 3 tokens (no update pending, so
    no update's z; activations of a few kB) the peak above them is at least the copy and
    fc1.weight's z piece (64 KiB), as the planner's scratch counts it (``perturb_bytes``)."""
    from zoft.engine.precision import perturb_bytes

    cfg = OPTConfig(vocab_size=100, hidden_size=64, ffn_dim=256, num_hidden_layers=4, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=64, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
    eng = ZOEngine(model, offload=Streaming("cpu", resident_blocks=0, prefetch=1))
    batch = make_batch("opt")
    batch.inputs["input_ids"] = batch.inputs["input_ids"] % 100
    leaf = 64 * 256 + 256  # fc1's weight and bias, fp32: the largest leaf
    block = sum(p.numel() for p in model.model.decoder.layers[0].parameters())
    short = Batch({k: v[:1, :3] for k, v in batch.inputs.items()}, size=1)
    for t in range(2):
        eng.evaluate([Probe(t, 1e-3), Probe(t, -1e-3)], short if t == 0 else batch, TokenNLL(True))
        above = eng.device_peak_bytes - eng.meter.by_kind["resident"] - eng.meter.by_kind["slots"]
        if t == 0:
            z_piece = perturb_bytes(64 * 256, 4)  # fc1.weight's z, fp32: 65,536 B
            assert above >= 4 * leaf + z_piece, (above, 4 * leaf + z_piece)
        eng.set_update(Update([(t, -1e-3)]))
    assert eng.meter.by_kind["scratch"] == 4 * leaf  # its perturbed copy
    assert above < 2 * 4 * block, (above, 2 * 4 * block)
    eng.close()


def test_families_that_read_a_parameter_outside_its_call_take_the_unit_path():
    """BLOOM with ``slow_but_exact`` slices ``dense.weight`` inside its attention's forward, and
    mixture-of-experts blocks route tokens to experts: both perturb whole units, so the default
    engine still equals P separate perturbed forwards; the families tested elsewhere take leaves."""
    bloom = BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0,
                        attention_dropout=0.0, pretraining_tp=2, slow_but_exact=True, use_cache=False)
    moe = MixtralConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128, use_cache=False)
    for cfg in (bloom, moe):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg).eval()
        layout = discover_layout(model)
        assert all(unit_path(model, b) for b in layout.blocks)
        probes, obj, batch = [Probe(11, 1e-2), Probe(11, -1e-2)], TokenNLL(True), make_batch("opt")
        expected = reference_losses(model, probes, batch, obj, make_noise())
        eng = ZOEngine(copy.deepcopy(model))
        assert not any(id(b.module) in eng._leaves for b in layout.blocks)
        torch.testing.assert_close(eng.evaluate(probes, batch, obj), expected, rtol=RTOL, atol=0)
        eng.close()
    for family in FAMILIES:
        model = tiny_model(family)
        assert not any(unit_path(model, u) for u in discover_layout(model).units), family


def test_leaves_and_groups():
    """Leaves own parameters directly (BERT's MLM-head bias, tied to its decoder's, is the
    decoder's); packing is greedy in call order, a leaf larger than the bound alone."""
    model = tiny_model("bert")
    cls = dict(discover_layout(model).units[-1].module.named_modules())
    found = [n for n, _ in leaves(model.cls)]
    assert "predictions" not in found and "predictions.decoder" in found
    assert cls["predictions.decoder"].bias is model.cls.predictions.bias
    lin = [torch.nn.Linear(4, 4, bias=False) for _ in range(4)]  # 64 bytes each
    big = torch.nn.Linear(16, 16, bias=False)  # 1024 bytes
    assert pack_groups([lin[0], lin[1], big, lin[2], lin[3]], 130) == [[lin[0], lin[1]], [big], [lin[2], lin[3]]]
    assert pack_groups(lin, 10) == [[m] for m in lin]


class _BlocksFrom:
    """Directions only on blocks ``first..`` of the stack (what CGE's per-unit phases promise)."""

    def __init__(self, prefix: str, first: int):
        self.prefix, self.first = prefix, first

    def direction_shaper(self):
        def shape(nz, seed, key, like):
            rest = key[len(self.prefix):] if key.startswith(self.prefix) else None
            if rest is not None and int(rest.split(".")[0]) >= self.first:
                return nz.sample(seed, key, like)
            return torch.zeros_like(like)
        return shape


@pytest.mark.parametrize("gran,rows", [("param", 1), ("unit", 3)])
def test_fan_out_at_a_block_equals_full_forwards(gran, rows):
    """Feature reuse inside a block stack (``evaluate(fan_out_at=)``): the blocks before the
    fan-out run once on R rows, the fan-out block's inputs are repeated for the P probes
    (``repeat_rows``; its leaves then take each probe's rows), and the losses equal the plain
    evaluation's, which ``test_engine`` holds to P separate forwards. The parameter-granular engine
    runs parameter-free work on all rows, so an R-row mask made before the fan-out only broadcasts
    at R = 1; the unit path hands each probe its R rows at any R."""
    from test_engine import TokenNLL as NLL
    from tiny_models import tiny_batch

    model = deep_model("opt")
    batch = Batch(tiny_batch(batch=rows, pad_last=0), size=rows)
    probes = [Probe(None, 0.0), Probe(7, 1e-2), Probe(7, -1e-2), Probe(8, 1e-2)]
    with ZOEngine(model, granularity=gran) as eng:
        stack = eng.layout.blocks_path + "."
        bind(_BlocksFrom(stack, 2), eng)
        full = eng.evaluate(probes, batch, NLL(True))
        reuse = eng.evaluate(probes, batch, NLL(True), fan_out_at=eng.layout.blocks[2].name)
    torch.testing.assert_close(reuse, full, rtol=RTOL, atol=0)
    assert len(set(full.tolist())) == len(probes)  # the directions matter
