"""The CUDA paths on a real GPU (``pytest -m gpu``; skipped where there is no CUDA device). Tiny
models, seconds each; ``bench/gpu_check.py`` is the longer acceptance run."""
from __future__ import annotations

import json

import pytest
import torch
from test_engine import TokenNLL, make_batch
from tiny_models import tiny_model

from zoft.engine import Probe, Streaming, Update, ZOEngine
from zoft.optim import bind, evaluate_step, make_optimizer

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _steps(eng, opt=None, steps=3):
    batch, obj, out = make_batch("llama").to(CUDA), TokenNLL(True), []
    for t in range(steps):
        if opt is None:
            loss = eng.evaluate([Probe(t, 1e-3), Probe(t, -1e-3)], batch, obj)
            upd = Update([(t, -1e-3)], decay=0.999)
        else:
            loss = evaluate_step(eng, opt, t, batch, obj)
            upd, _ = opt.update(t, loss)
        eng.set_update(upd)
        out.append(loss)
    eng.close()
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sphere", [False, True])
def test_streamed_equals_resident_on_cuda(dtype, sphere):
    """Same losses and weights streamed (real streams and events) as resident; unit-sphere norms
    drawn on the device; after close every parameter and buffer is on one device."""
    runs = []
    for offload in (None, Streaming("cuda", resident_blocks=1, prefetch=2)):
        model = tiny_model("llama", 0, dtype=dtype, layers=5)
        eng = ZOEngine(model if offload else model.to(CUDA), offload=offload)
        opt = None
        if sphere:
            opt = make_optimizer("mezo-sgd", {"lr": 1e-3, "eps": 1e-3, "sphere": True}, seed=1, total_steps=3)
            bind(opt, eng)
        runs.append((_steps(eng, opt), model))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=0)
    for (n, p), (_, q) in zip(runs[1][1].named_parameters(), runs[0][1].named_parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach().cpu(), rtol=1e-5, atol=0, msg=n)
    streamed = runs[1][1]
    assert len({t.device for t in [*streamed.parameters(), *streamed.buffers()]}) == 1


def test_compiled_kernels_match_their_references():
    from zoft.kernels import HAS_TRITON, axpy, philox

    if not HAS_TRITON:
        pytest.skip("triton >= 3.4 is not installed")
    z = philox.sample(12345, 100_003, CUDA)
    torch.testing.assert_close(z.cpu(), philox.sample_ref(12345, 100_003), rtol=0, atol=4e-6)
    w = torch.randn(100_003)
    wd = w.to(CUDA)
    axpy.fused_axpy(wd, 0.9, [(3, 0.5), (4, -0.25)])
    axpy.fused_axpy_ref(w, 0.9, [(3, 0.5), (4, -0.25)])
    torch.testing.assert_close(wd.cpu(), w, rtol=1e-6, atol=1e-5)


def test_cuda_max_allocated_is_per_step(tmp_path):
    """A large allocation before the run must not show up in every step's peak."""
    from conftest import make_tiny_tokenizer
    from zoft import TrainConfig, finetune

    d = tmp_path / "m"
    tiny_model("opt").save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a fine film", "an awful waste of time"] * 3))
    big = torch.empty(1 << 28, dtype=torch.uint8, device=CUDA)  # 256 MiB, freed before the run
    del big
    finetune(TrainConfig(model=str(d), task="lm", train=str(data), steps=3, batch_size=2, max_length=16,
                         device="cuda", output_dir=str(tmp_path / "run"), progress=False))
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    peaks = [r["cuda_max_allocated_bytes"] for r in recs if "cuda_max_allocated_bytes" in r]
    assert len(peaks) == 3 and max(peaks) < 1 << 28


def test_resumed_streamed_state_stays_on_the_host(tmp_path):
    """ZO-Adam under --gpu-mem, resumed: the moments of streamed parameters live on the host
    between steps (loaded there), those of resident ones on the device."""
    from conftest import make_tiny_tokenizer
    from zoft import TrainConfig
    from zoft.train import Trainer

    from zoft.engine.plan import make_plan

    d = tmp_path / "m"
    model = tiny_model("opt", layers=6)
    model.save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a fine film", "an awful waste of time"] * 3))
    smallest = make_plan(model.config, 10**12, batch_size=2, max_length=16, dtype="fp32").min_budget_bytes
    kw = dict(model=str(d), task="lm", train=str(data), batch_size=2, max_length=16, device="cuda",
              optimizer="zo-adam", gpu_mem=str(smallest), output_dir=str(tmp_path / "run"), progress=False)
    Trainer(TrainConfig(steps=2, **kw)).run()
    tr = Trainer(TrainConfig(steps=3, resume=True, **kw))
    tr.step(2)
    tr.engine.flush()
    streamed = tr.engine._streamed_keys
    assert streamed and tr.opt.store
    for bufs in tr.opt.store.values():
        for k, t in bufs.items():
            assert t.device.type == ("cpu" if k in streamed else "cuda"), k
