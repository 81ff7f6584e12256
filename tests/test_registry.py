"""Every registered optimizer through ``zoft finetune --optimizer NAME`` with its own defaults, and
what ``zoft optimizers`` claims about it checked against what it does: replay rebuilds the trained
weights, a resumed run continues the same trajectory, the checkpointed state has the printed bytes
per trained parameter, and "streams: no" / "data-parallel: no" are one-line refusals.

Per-method references, descent and streamed == resident live with each method
(``tests/test_optim_family.py``, ``test_zo_methods.py``, ``test_hizoo_svrg.py``, ``test_sparse_zo.py``,
``test_deepzero.py``, ``test_offload.py``)."""
import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_optim_family import one_thread  # noqa: F401  (autouse fixture)
from test_train_cli import lm_data, tiny_dir  # noqa: F401  (fixtures)
from tiny_models import tiny_model
from zoft.cli import main
from zoft.config import TrainConfig
from zoft.distributed import check_supported
from zoft.engine import Streaming, ZOEngine
from zoft.errors import UsageError
from zoft.models.adapters import apply_peft
from zoft.optim import OPTIMIZERS, bind, describe, make_optimizer
from zoft.resolve import resolve_run

# cge queries every trained coordinate: the default (all ~32k of the tiny model's) is refused
# (test below), so its run trains one LayerNorm (64 coordinates, 65 queries per step)
TRAINABLE = {"cge": ["--trainable", "layers.1.final_layer_norm"]}


def run_args(model_dir, data, out, name, steps, *extra):
    """``zoft finetune --optimizer NAME`` on the tiny OPT: no --lr, --eps, --weight-decay or
    optimizer options, so every value is the optimizer's own default."""
    return ["finetune", "--model", str(model_dir), "--task", "lm", "--train", str(data), "--steps", str(steps),
            "--batch-size", "2", "--max-length", "16", "--output-dir", str(out), "--no-progress",
            "--optimizer", name, *TRAINABLE.get(name, []), *extra]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_finetune_with_its_defaults_replays_resumes_and_keeps_the_printed_state(name, tiny_dir, lm_data, tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    assert main(run_args(tiny_dir, lm_data, full, name, 4)) == 0
    cfg = yaml.safe_load((full / "config.yaml").read_text())
    assert cfg["lr"] is None and cfg["optimizer_options"] == {}  # the optimizer's defaults, recorded as such
    a = load_file(str(full / "checkpoint" / "model.safetensors"))
    init = load_file(str(tiny_dir / "model.safetensors"))
    assert any(not torch.equal(a[k], init[k]) for k in a), "4 steps at the default lr moved nothing"
    assert main(["replay", str(full), "--output", str(tmp_path / "replayed")]) == 0
    b = load_file(str(tmp_path / "replayed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(run_args(tiny_dir, lm_data, half, name, 2)) == 0
    assert main(run_args(tiny_dir, lm_data, half, name, 4, "--resume")) == 0
    c = load_file(str(half / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert (full / "trajectory.jsonl").read_text() == (half / "trajectory.jsonl").read_text()
    # the state the checkpoint keeps per trained parameter is what `zoft optimizers` prints
    patterns = TRAINABLE.get(name, [None, ""])[1].split(",")
    trained = sum(p.numel() for n, p in tiny_model("opt").named_parameters() if any(s in n for s in patterns))
    f = full / "checkpoint" / "optimizer.safetensors"
    state = load_file(str(f)) if f.is_file() else {}
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    assert nbytes == describe(name)["state_bytes_per_param"] * trained, (name, nbytes, trained)


def test_cge_over_a_whole_model_is_refused_in_one_line(tiny_dir, lm_data, tmp_path, capsys):
    """A CGE step queries every trained coordinate once: above ``max_queries`` (10 000 by default;
    the tiny model has 31.5k) the run stops before loading the model, with what to do."""
    assert main(run_args(tiny_dir, lm_data, tmp_path / "run", "cge", 2, "--trainable", "model")) == 2
    queries = sum(p.numel() for p in tiny_model("opt").parameters()) + 1  # one-sided: one per coordinate + L(w)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{queries} forward queries per step" in err and "--trainable" in err
    with pytest.raises(UsageError, match="n_queries does not apply"):
        make_optimizer("cge", {"n_queries": 2}, 0, 1)


def test_cge_dry_run_refuses_what_the_run_refuses(tiny_dir, lm_data, tmp_path, capsys):
    """``--dry-run`` applies the run's ``max_queries`` check (``CGE.check_size``) to the trained
    parameters read from the model's config on the meta device: exit 2 with the run's own line,
    nothing loaded or written; a run under the bound would start. The counts are the loaded model's
    (the whole model's; a LoRA adapter's: r 8 on q and v, 2048 coordinates)."""
    whole = run_args(tiny_dir, lm_data, tmp_path / "run", "cge", 2, "--trainable", "model")
    assert main([*whole, "--dry-run"]) == 2
    dry = capsys.readouterr()
    queries = sum(p.numel() for p in tiny_model("opt").parameters()) + 1
    assert dry.out == "" and dry.err.strip() == (
        f"zoft: error: cge queries each block of trained coordinates separately: {queries} forward queries "
        "per step here, above max_queries 10000; train fewer parameters (--trainable, --peft), raise block, or "
        "raise optimizer_options max_queries")
    assert not (tmp_path / "run").exists()
    assert main([*run_args(tiny_dir, lm_data, tmp_path / "run", "cge", 2), "--dry-run"]) == 0  # one LayerNorm
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("dry run: the run would start")
    config = tmp_path / "cge.yaml"
    config.write_text("optimizer_options:\n  max_queries: 2048\n")
    lora = ["finetune", "--model", str(tiny_dir), "--optimizer", "cge", "--peft", "lora", "--config", str(config)]
    assert main([*lora, "--dry-run"]) == 2
    assert "2049 forward queries per step here, above max_queries 2048" in capsys.readouterr().err
    adapter = apply_peft(tiny_model("opt"), "lora")  # what the run trains
    assert sum(p.numel() for p in adapter.parameters() if p.requires_grad) == 2048


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_printed_streaming_and_data_parallel_claims_hold(name):
    """"streams: yes" optimizers are each run streamed == resident by tests/test_offload.py (its
    parametrization reads the same flag); "streams: no" ones refuse a streamed engine in one line.
    "data-parallel: no ..." is a one-line refusal of --nproc 2; "yes" is a scenario of
    tests/test_distributed.py (every rank bit-identical, replayed)."""
    from test_distributed import SCENARIOS

    row = describe(name)
    if not row["streams"]:
        model = tiny_model("opt")
        opt = make_optimizer(name, {}, seed=0, total_steps=1)
        with ZOEngine(model, offload=Streaming("cpu", resident_blocks=0, prefetch=1)) as engine:
            with pytest.raises(UsageError, match="--gpu-mem") as e:
                bind(opt, engine)
        assert "\n" not in str(e.value)
        with pytest.raises(UsageError, match="does not stream blocks.*drop --gpu-mem"):  # before loading anything
            resolve_run(TrainConfig(optimizer=name, model="opt-125m", gpu_mem="1GB", device="cpu"))
    cfg = TrainConfig(optimizer=name)
    if row["data_parallel"].startswith("no"):
        with pytest.raises(UsageError, match="--nproc 1") as e:
            check_supported(cfg, 2)
        assert "\n" not in str(e.value)
    else:
        check_supported(cfg, 2)
        assert name in {s["optimizer"] for s in SCENARIOS.values()}


@pytest.mark.parametrize("name", ["lozo", "subzero", "fzoo"])
def test_lora_run_with_its_defaults_replays(name, tiny_dir, lm_data, tmp_path):
    """``--peft lora`` (the methods whose LoRA runs are not tested with the method: hizoo, mezo-svrg,
    sparse-mezo, forward-grad are): LoRA's A and B are 2-D, so LOZO's and SubZero's low-rank
    directions apply to them; the adapter moves (B starts at 0) and replay rebuilds it bit for bit."""
    out = tmp_path / "run"
    assert main(run_args(tiny_dir, lm_data, out, name, 3, "--peft", "lora")) == 0
    assert main(["replay", str(out), "--output", str(tmp_path / "replayed")]) == 0
    a = load_file(str(out / "checkpoint" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "replayed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("lora_B" in k and torch.count_nonzero(v) > 0 for k, v in a.items())
