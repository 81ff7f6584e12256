"""The training loop and CLI end to end on a tiny model: outputs, replay, resume, bad input."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_tokenizer
from tiny_models import tiny_model
from zoft.checkpoint import find_checkpoint, save_checkpoint
from zoft.cli import main
from zoft.config import TrainConfig, load_config_file, parse_size
from zoft.errors import UsageError, ZoftError
from zoft.models import aliases, configs_dir, resolve
from zoft.train import Trainer

TEXTS = ["the movie was great and the acting was wonderful", "an awful waste of time",
         "a fine film with a lovely cast", "the plot was boring", "hello world", "It was great."]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-opt")
    tiny_model("opt").save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "train.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return f


def finetune_args(model_dir, data, out, *extra):
    return ["finetune", "--model", str(model_dir), "--task", "lm", "--train", str(data), "--eval", str(data),
            "--steps", "6", "--batch-size", "2", "--lr", "1e-3", "--eps", "1e-3", "--max-length", "16",
            "--output-dir", str(out), "--no-progress", *extra]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_finetune_writes_metrics_checkpoint_plot_and_replays(tiny_dir, lm_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(finetune_args(tiny_dir, lm_data, out, "--eval-every", "3", "--save-every", "3")) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m and "eval_loss" not in m]
    assert [m["step"] for m in steps] == list(range(6))
    for m in steps:
        assert {"step", "loss", "projected_grad", "lr", "step_time_s"} <= set(m)
    assert [m["step"] for m in lines if "eval_loss" in m] == [0, 3, 6]
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "checkpoint" / "model.safetensors").is_file()
    assert len((out / "trajectory.jsonl").read_text().splitlines()) == 6
    cfg = load_config_file(str(out / "config.yaml"))
    assert cfg["steps"] == 6 and cfg["lr"] == 1e-3

    assert main(["replay", str(out), "--output", str(tmp_path / "replayed")]) == 0
    a, b = weights(out / "checkpoint"), weights(tmp_path / "replayed")
    init = load_file(str(tiny_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-identical on the same device type
    assert any(not torch.equal(a[k], init[k]) for k in a)  # and training did move the weights


@pytest.mark.parametrize("how", ["stopped", "interrupted", "torn-write"])
def test_resume_continues_the_same_trajectory(tiny_dir, lm_data, tmp_path, monkeypatch, capsys, how):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(finetune_args(tiny_dir, lm_data, full)) == 0
    if how == "interrupted":  # Ctrl-C during step 3: checkpoint at 3, exit 1 with one line
        real_step = Trainer.step

        def step(self, t):
            if t == 3:
                raise KeyboardInterrupt
            return real_step(self, t)

        monkeypatch.setattr(Trainer, "step", step)
        assert "interrupted at step 3" in one_line_error(capsys, 1, finetune_args(tiny_dir, lm_data, part))
        monkeypatch.setattr(Trainer, "step", real_step)
    else:
        args = finetune_args(tiny_dir, lm_data, part)
        args[args.index("--steps") + 1] = "3"
        assert main(args) == 0
    if how == "torn-write":  # a crash after the checkpoint, mid-line
        with open(part / "trajectory.jsonl", "a") as f:
            f.write('{"step": 3, "terms": [[1, 0.5]], "dec')
    assert main(finetune_args(tiny_dir, lm_data, part, "--resume")) == 0
    a, b = weights(full / "checkpoint"), weights(part / "checkpoint")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (full / "trajectory.jsonl").read_text() == (part / "trajectory.jsonl").read_text()


def one_line_error(capsys, code, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    err = [e.strip() for e in err if e.strip() and not e.strip().startswith(("Loading weights", "Writing model"))]
    assert rc == code, err
    assert len(err) == 1 and err[0].startswith("zoft: error:") and "Traceback" not in err[0], err
    return err[0]


def test_bad_inputs_get_one_line_and_exit_codes(tiny_dir, lm_data, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert "unknown model 'opt-7b'" in one_line_error(capsys, 2, ["finetune", "--model", "opt-7b", "--output-dir", out])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    msg = one_line_error(capsys, 2, finetune_args(tiny_dir, bad, out))
    assert "bad.jsonl" in msg and "2" in msg
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "no examples" in one_line_error(capsys, 2, finetune_args(tiny_dir, empty, out))
    assert "--train" in one_line_error(capsys, 2, ["finetune", "--model", str(tiny_dir), "--task", "lm",
                                                   "--output-dir", out])
    assert "nothing to resume" in one_line_error(capsys, 2, finetune_args(tiny_dir, lm_data, out, "--resume"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot write" in one_line_error(capsys, 2, finetune_args(tiny_dir, lm_data, blocker / "sub"))
    assert "gpu-mem" in one_line_error(capsys, 2, finetune_args(tiny_dir, lm_data, out, "--gpu-mem", "lots"))
    if not torch.cuda.is_available():
        assert "no CUDA" in one_line_error(capsys, 2, finetune_args(tiny_dir, lm_data, out, "--device", "cuda"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-3\nmomentum: 0.9\n")
    assert "momentum" in one_line_error(capsys, 2, finetune_args(tiny_dir, lm_data, out, "--config", str(cfg)))
    # an existing run is never overwritten without --resume
    assert main(finetune_args(tiny_dir, lm_data, out)) == 0
    capsys.readouterr()
    assert "already holds a run" in one_line_error(capsys, 2, finetune_args(tiny_dir, lm_data, out))


def test_nan_losses_skip_updates_then_stop_with_a_checkpoint(tiny_dir, lm_data, tmp_path, capsys):
    out = tmp_path / "nan"
    # lr 1e30 makes the first update overflow: every later loss is NaN/inf
    msg = one_line_error(capsys, 1, finetune_args(tiny_dir, lm_data, out, "--lr", "1e30", "--max-nan-steps", "2"))
    assert "NaN/inf for 2 steps" in msg
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for m in lines if m.get("skipped")) == 2
    assert find_checkpoint(out) is not None


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path):
    class Tok:
        def save_pretrained(self, d):
            raise OSError(28, "No space left on device")

    model = tiny_model("opt")
    save_checkpoint(tmp_path, model, None, {"step": 1})
    with pytest.raises(ZoftError, match="No space left on device.*previous checkpoint is intact"):
        save_checkpoint(tmp_path, model, Tok(), {"step": 2})
    ck = find_checkpoint(tmp_path)
    assert json.loads((ck / "state.json").read_text())["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no temporary left behind


def test_every_config_file_parses():
    root = configs_dir()
    for f in sorted(root.rglob("*.yaml")) + sorted(root.rglob("*.toml")):
        if f.parent.name == "models":
            continue
        data = load_config_file(str(f))
        if f.parent == root:
            TrainConfig.from_dict(data)
    for name in aliases():
        _, cfg = resolve(name)
        assert cfg.num_hidden_layers > 0


def test_sizes():
    assert parse_size("18GB") == 18 * 10**9
    assert parse_size("16GiB") == 16 * 2**30
    assert parse_size("1.5 MB") == 1_500_000
    assert parse_size("123") == 123
    with pytest.raises(UsageError):
        parse_size("18 gigs")


def test_embedded_default_runs_offline(tmp_path, capsys):
    """`zoft finetune` with no --model: the demo recipe on the pretrained MiniLM (2 steps here)."""
    out = tmp_path / "demo"
    assert main(["finetune", "--steps", "2", "--eval-limit", "16", "--output-dir", str(out), "--no-progress"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    cfg = load_config_file(str(out / "config.yaml"))
    demo = load_config_file(str(configs_dir() / "demo.yaml"))
    assert cfg["model"] is None and cfg["lr"] == demo["lr"] and cfg["steps"] == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "eval_accuracy" in m] == [0, 2]


@pytest.mark.parametrize("budget", [[], ["--device", "cpu", "--gpu-mem", "1GB"]])
def test_sphere_directions_train_through_the_loop(tiny_dir, lm_data, tmp_path, budget):
    """Unit-sphere directions need the engine to normalise z; the loop sizes its engine (and the
    streaming plan) from ``optimizer.num_probes()``, never by drawing probes before binding."""
    cfg = tmp_path / "sphere.yaml"
    cfg.write_text("optimizer_options: {sphere: true}\n")
    assert main(finetune_args(tiny_dir, lm_data, tmp_path / "run", "--config", str(cfg), *budget)) == 0
    assert len((tmp_path / "run" / "trajectory.jsonl").read_text().splitlines()) == 6
