"""Robustness attacks: the quantization attack is bitsandbytes' own load-time quantization, and
relearning is AdamW on the forget rows."""
from __future__ import annotations

import pytest
import torch
from eval_helpers import one_torch_thread, tiny_eval_opt, tok_fixture  # noqa: F401
from tiny_models import bnb_cpu_layout

bnb = pytest.importorskip("bitsandbytes")

from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from zoft.unlearn import lm_metrics, quantize, relearn


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    m = tiny_eval_opt(tok, hidden=64)
    m.save_pretrained(d)
    return d, m


@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8"])
def test_quantize_equals_direct_bitsandbytes_load(saved, mode):
    d, m = saved
    ours = quantize(d, mode)
    cfg = (BitsAndBytesConfig(load_in_8bit=True) if mode == "int8" else
           BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_compute_dtype=torch.float32))
    direct = AutoModelForCausalLM.from_pretrained(d, quantization_config=cfg, device_map="cpu").eval()
    # quantize() keeps bitsandbytes' canonical 4-bit layout on every CPU (zoft.models.quant); the direct
    # load is compared in it (on a CPU with AVX512-BF16 it would otherwise repack and run in bf16)
    flags = [m.support_avx512bf16_for_cpu for m in ours.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert len(flags) == (0 if mode == "int8" else 12) and not any(flags)
    bnb_cpu_layout(direct, False)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, full = ours(input_ids=ids).logits, direct(input_ids=ids).logits, m(input_ids=ids).logits
    assert torch.equal(a, b)
    assert not torch.equal(a, full)  # quantization did change the model
    lin = ours.model.decoder.layers[0].fc1
    w = m.model.decoder.layers[0].fc1.weight.detach()
    if mode == "int8":
        assert isinstance(lin, bnb.nn.Linear8bitLt) and lin.weight.dtype == torch.int8
        # LLM.int8(): row-wise absmax int8 codes
        codes = torch.round(w * 127 / w.abs().amax(1, keepdim=True)).to(torch.int8)
        assert (lin.weight.data.to(torch.int16) - codes.to(torch.int16)).abs().max() <= 1
    else:
        assert isinstance(lin, bnb.nn.Linear4bit)
        q, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type=mode)
        want = bnb.functional.dequantize_4bit(q, state)
        got = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
        assert torch.equal(got, want)


def test_relearn_lowers_forget_nll_and_leaves_input(tok):
    m = tiny_eval_opt(tok)
    rows = [tok(t)["input_ids"] for t in ["the movie was great and the acting was wonderful", "a fine film"]]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = relearn(m, tok, rows, lr=1e-2, steps=10, samples=1, batch_size=2)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    nll0, _ = lm_metrics(m, tok, rows[:1])
    nll1, _ = lm_metrics(r, tok, rows[:1])
    assert nll1 < nll0 - 0.5
    r2 = relearn(m, tok, rows, lr=1e-2, steps=10, samples=1, batch_size=2)
    assert all(torch.equal(a, b) for a, b in zip(r.parameters(), r2.parameters()))  # deterministic


def test_muse_and_wmdp_evaluators_report_hand_known_numbers(tok):
    """The robustness report's MUSE and WMDP evaluators on the official-format fixtures, for a
    model whose numbers are known by hand: with the (tied) output embedding zeroed every logit is
    0, so every token has log-prob -log V. Then greedy decoding emits only the pad token (decoded
    to ""), so VerbMem = KnowMem = 0; every Min-K% score is log V, forget and holdout tie, AUC =
    0.5 and PrivLeak = (0.5 - 0.4772) / 0.4772 x 100 = 4.778; each answer letter is one token, all
    four tie and the argmax takes "A", so accuracy = the share of gold answers "A" among the first
    4 questions: bio [C, A, B, D] 25%, cyber [B, A, D, C] 25%, both 2/8; MMLU abstract algebra
    [D, A, B, B] and anatomy [B, C, A] 2/7."""
    from pathlib import Path

    from zoft.errors import UsageError
    from zoft.unlearn.report import make_evaluator

    fix = Path(__file__).parent / "fixtures"
    model = tiny_eval_opt(tok)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    muse = make_evaluator("muse", data=str(fix / "muse"), options={"limit": 2, "batch_size": 2})(model, tok)
    assert muse == pytest.approx({"verbmem_f": 0.0, "knowmem_f": 0.0, "knowmem_r": 0.0, "auc": 0.5,
                                  "privleak": (0.5 - 0.4772) / 0.4772 * 100}, abs=1e-9)
    wmdp = make_evaluator("wmdp", data=str(fix / "wmdp"), options={"limit": 4, "batch_size": 2,
                                                                     "mmlu_data": str(fix / "mmlu")})(model, tok)
    assert wmdp == pytest.approx({"wmdp_bio": 25.0, "wmdp_cyber": 25.0, "wmdp": 25.0, "mmlu": 200 / 7})
    with pytest.raises(UsageError, match="needs --eval-data"):
        make_evaluator("muse")
