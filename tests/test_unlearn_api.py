"""``zoft.unlearn.unlearn`` and ``zoft unlearn``: data formats, run directory, save_pretrained
output, resume, the robustness report, recipes and one-line errors."""
from __future__ import annotations

import functools
import json
import operator

import pytest
import torch
from eval_helpers import one_torch_thread, tiny_eval_opt, tok_fixture  # noqa: F401

from zoft.cli import main
from zoft.errors import UsageError, ZoftError
from zoft.models.loading import configs_dir
from zoft.unlearn import (
    UnlearnConfig,
    load_texts,
    make_objective,
    parse_optimizer_options,
    tokenize_rows,
    unlearn,
)

FORGET = ["the movie was great and the acting was wonderful", "a fine film with a lovely cast",
          "Question: what is the capital of France?\nAnswer: Paris"]
RETAIN = ["an awful waste of time", "the movie was terrible and the plot was boring", "hello world 0123456789"]


def weights(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_data_formats(tmp_path, tok):
    (tmp_path / "raw.txt").write_text(" ".join(FORGET * 3))
    (tmp_path / "list.json").write_text(json.dumps(FORGET))  # MUSE privleak/*.json
    (tmp_path / "recs.json").write_text(json.dumps([{"text": t} for t in FORGET]))
    (tmp_path / "wmdp.jsonl").write_text("".join(json.dumps({"title": "t", "text": t, "doi": "x"}) + "\n" for t in FORGET))
    for name in ("list.json", "recs.json", "wmdp.jsonl"):
        assert load_texts(tmp_path / name) == (FORGET, False)
    rows = tokenize_rows(tok, tmp_path / "raw.txt", max_length=16)
    ids = tok(" ".join(FORGET * 3), add_special_tokens=False)["input_ids"]
    assert all(r[0] == tok.bos_token_id and len(r) <= 16 for r in rows)
    assert functools.reduce(operator.iadd, (r[1:] for r in rows), []) == ids  # consecutive chunks of the whole corpus
    assert len(tokenize_rows(tok, tmp_path / "raw.txt", max_length=16, txt_mode="lines")) == 4  # 3 newlines
    (tmp_path / "bad.csv").write_text("x")
    with pytest.raises(UsageError, match="must end in"):
        load_texts(tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"other": 1}\n')
    with pytest.raises(UsageError, match="bad.jsonl:2"):
        load_texts(tmp_path / "bad.jsonl")


def test_api_runs_saves_and_reports(tmp_path, tok):
    hook_calls = []

    def hook(model, tokenizer):
        hook_calls.append(1)
        return {"n_params": float(sum(p.numel() for p in model.parameters()))}

    m = tiny_eval_opt(tok)
    w0 = weights(m).clone()
    res = unlearn(model=m, tokenizer=tok, forget=FORGET, retain=RETAIN, objective="graddiff", optimizer="hybrid",
                  steps=4, lr=1e-2, batch_size=2, optimizer_options={"fo_block": 1, "zo_block": 1},
                  output_dir=str(tmp_path / "run"), progress=False, eval_every=2, evaluators={"size": hook},
                  attacks=["relearn"], attack_options={"relearn_steps": 2, "relearn_lr": 1e-3})
    out = res.output_dir
    assert res.model is m and not torch.equal(weights(m), w0)
    assert [h["phase"] for h in res.history if "phase" in h] == ["fo", "zo", "fo", "zo"]
    assert any("eval_forget_nll" in h for h in res.history)
    assert set(res.stages) == {"original", "unlearned", "unlearned+relearn"}
    assert res.stages["unlearned"]["forget_nll"] > res.stages["original"]["forget_nll"]
    assert "size/n_params" in res.stages["original"] and len(hook_calls) == 4  # original, step 2, unlearned, relearn
    for f in ("config.json", "model.safetensors", "metrics.jsonl", "config.yaml", "loss.png",
              "robustness.md", "robustness.json", "robustness.png", "checkpoint/state.json"):
        assert (out / f).is_file(), f
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(weights(back), weights(m))
    table = (out / "robustness.md").read_text()
    assert "| unlearned+relearn |" in table and "forget_nll" in table
    assert json.loads((out / "robustness.json").read_text())["stages"]["original"] == res.stages["original"]
    with pytest.raises(UsageError, match="already holds a run"):
        unlearn(model=tiny_eval_opt(tok), tokenizer=tok, forget=FORGET, steps=1, output_dir=str(out), progress=False)


@pytest.mark.parametrize("optimizer", ["hybrid", "sign-adam"])
def test_resume_continues_the_same_run(tmp_path, tok, optimizer):
    kw = {"tokenizer": tok, "forget": FORGET, "retain": RETAIN, "objective": "npo", "optimizer": optimizer, "steps": 6, "lr": 1e-2,
              "batch_size": 2, "optimizer_options": {"fo_block": 2, "zo_block": 1} if optimizer == "hybrid" else {},
              "progress": False, "eval": "none", "seed": 3}
    ref = unlearn(model=tiny_eval_opt(tok), output_dir=str(tmp_path / "a"), **kw)

    def stop(rec):
        if rec.get("step") == 3:
            raise KeyboardInterrupt

    with pytest.raises(ZoftError, match="interrupted at step 4"):
        unlearn(model=tiny_eval_opt(tok), output_dir=str(tmp_path / "b"), callback=stop, **kw)
    res = unlearn(model=tiny_eval_opt(tok), output_dir=str(tmp_path / "b"), resume=True, **kw)
    assert torch.allclose(weights(res.model), weights(ref.model), rtol=0, atol=1e-6)
    assert [h["step"] for h in res.history] == list(range(6))
    assert [h["loss"] for h in res.history] == pytest.approx([h["loss"] for h in ref.history], rel=1e-5)
    with pytest.raises(UsageError, match="different lr"):
        unlearn(model=tiny_eval_opt(tok), output_dir=str(tmp_path / "b"), resume=True, **{**kw, "lr": 1.0})


def test_rmu_updates_only_its_parameters(tmp_path, tok):
    m = tiny_eval_opt(tok)
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    unlearn(model=m, tokenizer=tok, forget=FORGET, retain=RETAIN, objective="rmu", optimizer="hybrid",
            objective_options={"layer": 1, "steering_coef": 2.0, "alpha": 10.0}, steps=2, lr=1e-2,
            optimizer_options={"fo_block": 1, "zo_block": 1}, output_dir=str(tmp_path / "r"), progress=False,
            eval="none")
    changed = {k for k, v in m.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert changed == {"model.decoder.layers.0.fc2.weight", "model.decoder.layers.1.fc2.weight"}


def _files(tmp_path):
    (tmp_path / "forget.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in FORGET))
    (tmp_path / "retain.json").write_text(json.dumps(RETAIN))
    return tmp_path / "forget.jsonl", tmp_path / "retain.json"


def test_cli_unlearn_end_to_end(tmp_path, tok, capsys):
    model_dir = tmp_path / "model"
    tiny_eval_opt(tok, hidden=64).save_pretrained(model_dir)  # the nf4 attack: dimensions of bitsandbytes' blocks
    tok.save_pretrained(model_dir)
    f, r = _files(tmp_path)
    (tmp_path / "recipe.yaml").write_text("objective_options: {beta: 0.2}\noptimizer_options: {q: 2, mu: 0.01}\n"
                                          "batch_size: 2\nlr: 0.001\n")
    out = tmp_path / "out"
    code = main(["unlearn", "--model", str(model_dir), "--forget", str(f), "--retain", str(r), "--objective", "npo",
                 "--optimizer", "zo", "--steps", "3", "--output-dir", str(out), "--config", str(tmp_path / "recipe.yaml"),
                 "--attacks", "nf4", "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "| unlearned+nf4 |" in text and (out / "model.safetensors").is_file()
    saved = (out / "config.yaml").read_text()
    assert "beta: 0.2" in saved and "q: 2" in saved


@pytest.mark.parametrize("argv,msg", [
    (["--objective", "npo", "--forget", "MISSING.jsonl"], "does not exist"),
    (["--objective", "rmu", "--forget", "F"], "rmu layer 7 out of range"),
    (["--objective", "npo", "--forget", "F", "--params", "nonexistent"], "matches no parameter"),
    (["--objective", "npo", "--forget", "F", "--attacks", "nf3"], "unknown attack"),
    (["--objective", "npo", "--forget", "F", "--config", "CFG"], "unknown config key"),
    (["--objective", "npo", "--forget", "F", "--resume"], "nothing to resume"),
])
def test_cli_errors_are_one_line(tmp_path, tok, capsys, argv, msg):
    model_dir = tmp_path / "model"
    tiny_eval_opt(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    f, _ = _files(tmp_path)
    (tmp_path / "cfg.yaml").write_text("objectve: npo\n")
    argv = [str(f) if a == "F" else str(tmp_path / "cfg.yaml") if a == "CFG" else a for a in argv]
    code = main(["unlearn", "--model", str(model_dir), "--steps", "1", "--output-dir", str(tmp_path / "o"),
                 "--no-progress", "--eval", "none", *argv])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_every_recipe_parses():
    """Every file in configs/unlearn/ is a valid UnlearnConfig with valid objective/optimizer options."""
    from zoft.config import load_config_file

    files = sorted((configs_dir() / "unlearn").glob("*.yaml"))
    assert len(files) >= 6
    for f in files:
        cfg = UnlearnConfig.from_dict(load_config_file(str(f)))
        make_objective(cfg.objective, cfg.objective_options)
        parse_optimizer_options(cfg.optimizer, cfg.optimizer_options)
        assert cfg.forget and cfg.model, f.name
    assert {"npo", "rmu", "simnpo", "graddiff", "ga"} <= {UnlearnConfig.from_dict(load_config_file(str(f))).objective
                                                          for f in files}


@pytest.mark.parametrize("bad,msg", [({"steps": "ten"}, "'steps' must be int"), ({"objective": "dpo"}, "--objective"),
                                     ({"lr": -1.0}, "--lr"), ({"attack_options": {"relearn_lrr": 1}}, "unknown attack option"),
                                     ({"optimizer_options": 3}, "'optimizer_options' must be dict")])
def test_config_errors(bad, msg):
    with pytest.raises(UsageError, match=msg):
        UnlearnConfig.from_dict(bad)
