"""CPU tests of the CUDA paths a line-by-line review found wrong (issue 14): each shows the defect on
the CPU twin, with a pretend device or a fake CUDA runtime where the twin alone cannot tell the host
from the device. ``tests/test_gpu.py`` runs the same paths on a real GPU (``pytest -m gpu``)."""
from __future__ import annotations

import copy
import datetime

import pytest
import torch
from eval_helpers import tiny_eval_opt, tok_fixture  # noqa: F401
from test_engine import TokenNLL, make_batch
from test_offload import optimizer_steps
from tiny_models import tiny_model

from zoft.engine import Probe, Streaming, Update, ZOEngine
from zoft.engine import offload as offload_mod
from zoft.engine.precision import SROUND_CHUNK, stochastic_round, update_bytes
from zoft.errors import UsageError
from zoft.noise import make_noise
from zoft.optim import bind, make_optimizer


# -- item 3: unit-sphere norms come from the z the engine applies ------------------------------
class HostStreamDiffers:
    """The torch backend, except that z drawn for a tensor living in a streamed unit's host master
    comes out 1.5x: a pretend device whose random stream differs from the host's (CUDA's does).
    The engine draws every z it applies on the device (slots), so only a norm computed from the
    host masters sees the difference."""

    def __init__(self):
        self.inner = make_noise("torch")
        self.name, self.distribution = "torch", "gaussian"
        self.engine = None

    def _on_host(self, t: torch.Tensor) -> bool:
        if self.engine is None or self.engine.offload is None or t.numel() == 0 or t.stride() == (0,) * t.ndim:
            return False
        ptr = t.untyped_storage().data_ptr()
        return any(ptr == s.master.untyped_storage().data_ptr() for s in self.engine.offload.streamed)

    def sample(self, seed, key, like, out=None):
        z = self.inner.sample(seed, key, like, out=out)
        return z * 1.5 if self._on_host(like) else z

    def perturb_into(self, out, w0, seed, key, scale):  # from ``sample``: a host w0 would see 1.5x
        torch.add(w0, self.sample(seed, key, w0).to(w0.dtype), alpha=scale, out=out)

    def axpy(self, w, terms, key, decay=1.0):
        self.inner.axpy(w, terms, key, decay)


def test_sphere_norms_are_drawn_where_the_engine_draws_z():
    """ZO-SGD with unit-sphere directions, streamed (4 of 6 blocks) vs resident: same losses and
    weights. On the old code the streamed run's ||z|| came from the host masters (another stream
    on CUDA; here: 1.5x), so its probes and updates differed."""
    batch, obj = make_batch("llama"), TokenNLL(True)
    results = []
    for offload in (None, Streaming("cpu", resident_blocks=2, prefetch=2)):
        model = tiny_model("llama", 0, layers=6)
        noise = HostStreamDiffers()
        eng = ZOEngine(model, noise=noise, offload=offload)
        noise.engine = eng
        opt = make_optimizer("mezo-sgd", {"lr": 1e-2, "eps": 1e-3, "sphere": True}, seed=3, total_steps=3)
        bind(opt, eng)
        losses, _ = optimizer_steps(eng, opt, batch, obj, 3)
        eng.close()
        results.append((torch.cat(losses), model))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=0)
    for (n, p), (_, q) in zip(results[1][1].named_parameters(), results[0][1].named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=0, msg=n)


def test_z_like_holds_no_memory_and_names_the_compute_device():
    model = tiny_model("opt", 0, layers=4)
    eng = ZOEngine(model, offload=Streaming("cpu", resident_blocks=1, prefetch=2))
    like = eng.z_like()
    assert like.keys() == eng.params.keys()
    for k, t in like.items():
        assert t.shape == eng.params[k].shape and t.dtype == eng.params[k].dtype
        assert t.device == eng.compute_device and t.untyped_storage().nbytes() <= t.element_size()
    eng.close()


# -- item 2: the transients of low-precision updates are counted --------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_meter_counts_the_low_precision_update(dtype):
    """A 2-byte model with a large embedding and a tiny batch: applying the update (fp32 z, an fp32
    copy of the weight, a chunk of stochastic rounding) is the step's largest transient, and the
    meter's peak holds it. The old meter left it out (its peak was below this bound)."""
    model = tiny_model("llama", 0, dtype=dtype, layers=4)
    eng = ZOEngine(model, offload=Streaming("cpu", resident_blocks=0, prefetch=2))
    batch, obj = make_batch("llama"), TokenNLL(True)
    eng.evaluate([Probe(1, 1e-3), Probe(1, -1e-3)], batch, obj)
    eng.set_update(Update([(1, -1e-3)]))
    resident_and_slots = eng.meter.by_kind["resident"] + eng.meter.by_kind["slots"]
    eng.evaluate([Probe(2, 1e-3), Probe(2, -1e-3)], batch, obj)  # applies the update
    biggest = max(p.numel() for p in model.parameters())
    assert eng.device_peak_bytes >= resident_and_slots + update_bytes(biggest, 2)
    eng.close()


def test_chunked_stochastic_rounding_stays_unbiased_across_chunks():
    """Past one chunk (2^20 elements) the draws continue from one keyed generator: every value is
    one of its two neighbours and the mean is unbiased in every chunk."""
    x = torch.full((SROUND_CHUNK + 4097,), 1 + 2 ** -10)  # a quarter ulp of bf16 above 1
    y = stochastic_round(x, torch.bfloat16, seed=7).float()
    assert set(y.unique().tolist()) <= {1.0, 1 + 2 ** -7}
    for part in (y[:SROUND_CHUNK], y[SROUND_CHUNK:]):
        assert abs((part > 1).float().mean().item() - 0.125) < 0.03  # P(up) = 1/8; 5 sigma at n=4097
    assert torch.equal(y, stochastic_round(x, torch.bfloat16, seed=7).float())


# -- item 4: after close() the model is on one device --------------------------------------------
def test_close_returns_every_weight_home():
    """After ``close()`` nothing of a streamed model is on the device: the meter reads 0 bytes
    (the old close left resident units and slots counted there) and every parameter shares one
    device."""
    model = tiny_model("opt", 0, layers=4)
    eng = ZOEngine(model, offload=Streaming("cpu", resident_blocks=1, prefetch=2))
    eng.evaluate([Probe(1, 1e-3), Probe(1, -1e-3)], make_batch("opt"), TokenNLL(True))
    assert eng.meter.now > 0
    eng.close()
    assert eng.meter.now == 0 and set(eng.meter.by_kind.values()) == {0}
    assert len({p.device for p in model.parameters()} | {b.device for b in model.buffers()}) == 1


def test_unlearn_under_gpu_mem_loads_on_the_host_and_returns_one_device(tmp_path, tok, monkeypatch):
    """``zoft unlearn --gpu-mem``: the model is loaded on the host (the engine moves the resident
    units), the ZO phases stream to the requested device, and the returned model is on one device."""
    from zoft.models import loading
    from zoft.unlearn import unlearn

    d = tmp_path / "tiny"
    tiny_eval_opt(tok).save_pretrained(d)
    tok.save_pretrained(d)
    seen = []
    real = loading.load_model

    def spy(*a, **kw):
        seen.append(torch.device(kw["device"]))
        return real(*a, **kw)

    monkeypatch.setattr(loading, "load_model", spy)
    res = unlearn(model=str(d), forget=["the movie was great", "a fine film"], objective="ga", optimizer="zo",
                  steps=2, lr=1e-3, batch_size=1, max_length=16, gpu_mem="1GB", device="cpu",
                  output_dir=str(tmp_path / "run"), progress=False)
    assert seen == [torch.device("cpu")]
    assert len({p.device for p in res.model.parameters()}) == 1


# -- item 8: NCCL runs zoft's collectives on a gloo side group ------------------------------------
def test_nccl_collectives_go_over_a_gloo_side_group(monkeypatch):
    """Under NCCL, the scalars and objects zoft gathers travel over a gloo group (timeouts and dead
    peers then raise gloo's error, which becomes zoft's one line), as CPU tensors. Fake process
    group calls: no GPU and no peers needed."""
    import torch.distributed as dist

    from zoft.config import TrainConfig
    from zoft.distributed import init_distributed

    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.setdefault("default", backend))
    monkeypatch.setattr(dist, "new_group", lambda backend=None, timeout=None: calls.setdefault("side", (backend, timeout)) and "SIDE")

    def gather(out, local, group=None):
        calls["gather"] = (group, local.device, out.device)
        out.copy_(local.repeat(2))

    monkeypatch.setattr(dist, "all_gather_into_tensor", gather)
    monkeypatch.setattr(dist, "all_gather_single", gather, raising=False)
    ctx = init_distributed(TrainConfig(model="x", dist_timeout=7.0), torch.device("cuda"))
    assert calls["default"] == "nccl" and calls["side"] == ("gloo", datetime.timedelta(seconds=7.0))
    got = ctx.all_gather(torch.tensor([1.0, 2.0]))
    assert calls["gather"] == ("SIDE", torch.device("cpu"), torch.device("cpu"))
    assert got.tolist() == [[1.0, 2.0], [1.0, 2.0]]


# -- item 9: page-locking falls back once, and is undone when construction fails -----------------
class FakeCudart:
    def __init__(self, rc: int):
        self.rc, self.registered, self.unregistered = rc, [], []

    def cudaHostRegister(self, ptr, nbytes, flags):
        if self.rc == 0:
            self.registered.append(ptr)
        return self.rc

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(ptr)
        return 0


def test_refused_page_locking_falls_back_and_says_so_once(monkeypatch, capsys):
    fake = FakeCudart(rc=712)  # cudaErrorHostMemoryAlreadyRegistered-like refusal
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(offload_mod.HostPins, "refused_said", False)
    pins = offload_mod.HostPins()
    assert not pins.pin(torch.empty(16)) and not pins.pin(torch.empty(16))
    err = capsys.readouterr().err
    assert err.count("zoft: page-locking host memory was refused") == 1 and err.count("\n") == 1
    pins.release()
    assert fake.unregistered == []  # nothing was pinned, nothing is unpinned


def test_failed_construction_unpins_what_it_pinned(monkeypatch):
    fake = FakeCudart(rc=0)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    buf = torch.empty(64)

    def setup_that_fails(self, *a):
        self.pins.pin(buf)
        raise UsageError("a unit mixes parameter dtypes")

    monkeypatch.setattr(offload_mod.Offloader, "_setup", setup_that_fails)
    model = tiny_model("opt", 0, layers=4)
    with pytest.raises(UsageError):
        ZOEngine(copy.deepcopy(model), offload=Streaming("cpu", resident_blocks=1, prefetch=2))
    assert fake.registered == [buf.data_ptr()] and fake.unregistered == [buf.data_ptr()]


def test_resident_engine_moves_resumed_state_without_a_scheduler():
    """A resumed run loads optimizer state on the host; a resident engine on a GPU brings it to the
    parameter's device on first use. With no scheduler there is no link to count the bytes on (the
    "meta" device stands in for a device other than the host)."""
    eng = ZOEngine(tiny_model("llama", 0))
    store = {"exp_avg": {"k": torch.ones(3)}}
    eng._move_state(store, "k", torch.device("meta"))
    assert store["exp_avg"]["k"].device.type == "meta"
    eng.close()
