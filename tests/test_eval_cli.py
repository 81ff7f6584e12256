"""``zoft eval muse|wmdp|mmlu``: argument parsing, JSON output, table, input errors."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from eval_helpers import model_fixture, one_torch_thread, tok_fixture  # noqa: F401

from zoft.errors import UsageError
from zoft.eval import cli
from zoft.eval.mcq import eval_wmdp

FIX = Path(__file__).parent / "fixtures"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="zoft")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.fixture
def patched(monkeypatch, model, tok):
    """Replace model loading (zoft.models) by the in-memory tiny model; record the calls."""
    calls = []

    def fake(args):
        calls.append(args)
        return model, tok

    monkeypatch.setattr(cli, "_load_model", fake)
    return calls


def test_parser_flags():
    a = parse(["eval", "wmdp", "--model", "m", "--data", "d", "--subsets", "bio,chem", "--limit", "3",
               "--batch-size", "4", "--device", "cpu", "--dtype", "bf16", "--random-init", "--output", "o.json"])
    assert (a.eval_command, a.subsets, a.limit, a.batch_size, a.device, a.dtype, a.random_init, a.output) == \
        ("wmdp", "bio,chem", 3, 4, "cpu", "bf16", True, "o.json")
    assert a.func is cli.run
    m = parse(["eval", "muse", "--model", "m", "--data", "d", "--corpus", "books", "--retrain-auc", "0.5"])
    assert (m.corpus, m.retrain_auc, m.metrics) == ("books", 0.5, None)
    with pytest.raises(SystemExit):
        parse(["eval", "muse", "--model", "m", "--data", "d", "--corpus", "arxiv"])
    with pytest.raises(SystemExit):
        parse(["eval"])


def test_wmdp_output_json_and_table(patched, model, tok, tmp_path, capsys):
    out = tmp_path / "res" / "wmdp.json"
    args = parse(["eval", "wmdp", "--model", "m", "--data", str(FIX / "wmdp"), "--subsets", "bio,cyber",
                  "--output", str(out), "--batch-size", "3"])
    assert args.func(args) == 0
    res = json.loads(out.read_text())
    direct = eval_wmdp(model, tok, FIX / "wmdp", subsets=["bio", "cyber"])
    assert set(res) == {"wmdp_bio", "wmdp_cyber", "wmdp"}
    for k in res:
        assert res[k]["n"] == direct[k]["n"] and res[k]["acc"] == pytest.approx(direct[k]["acc"])
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["subset", "acc", "%", "stderr", "n"]
    assert f"{100 * res['wmdp_bio']['acc']:.2f}" in table and "wmdp_cyber" in table


def test_muse_and_mmlu_run(patched, tmp_path, capsys):
    out = tmp_path / "muse.json"
    args = parse(["eval", "muse", "--model", "m", "--data", str(FIX / "muse"), "--corpus", "news",
                  "--limit", "1", "--metrics", "knowmem_r,privleak", "--output", str(out)])
    assert cli.run(args) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"knowmem_r", "auc", "privleak"}
    assert res["privleak"]["auc_retrain"] == 0.4772
    assert "privleak" in capsys.readouterr().out
    args = parse(["eval", "mmlu", "--model", "m", "--data", str(FIX / "mmlu"), "--subsets", "anatomy",
                  "--output", str(tmp_path / "mmlu.json")])
    assert cli.run(args) == 0
    assert set(json.loads((tmp_path / "mmlu.json").read_text())) == {"mmlu_anatomy", "mmlu"}


@pytest.mark.parametrize("argv, match", [
    (["eval", "wmdp", "--model", "m", "--data", "/no/such/dir"], "does not exist"),
    (["eval", "wmdp", "--model", "m", "--data", str(FIX / "wmdp"), "--subsets", "bio,physics"], "unknown WMDP subset"),
    (["eval", "wmdp", "--model", "m", "--data", str(FIX / "wmdp"), "--limit", "0"], "--limit"),
    (["eval", "mmlu", "--model", "m", "--data", str(FIX / "mmlu"), "--subsets", "astrology"], "unknown MMLU subject"),
    (["eval", "muse", "--model", "m", "--data", str(FIX / "wmdp")], "no MUSE data"),
    (["eval", "muse", "--model", "m", "--data", str(FIX / "muse"), "--metrics", "verbmem"], "unknown MUSE metric"),
])
def test_input_errors_before_model_loading(patched, argv, match):
    with pytest.raises(UsageError, match=match):
        cli.run(parse(argv))
    assert patched == []  # failed fast, no model loaded


def test_real_loader_on_saved_model(model, tok, tmp_path, capsys):
    pytest.importorskip("zoft.models")
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    args = parse(["eval", "wmdp", "--model", str(tmp_path / "tiny"), "--data", str(FIX / "wmdp"),
                  "--subsets", "chem", "--device", "cpu", "--no-progress"])
    assert cli.run(args) == 0
    direct = eval_wmdp(model, tok, FIX / "wmdp", subsets=["chem"])
    assert f"{100 * direct['wmdp_chem']['acc']:.2f}" in capsys.readouterr().out


def test_format_table_muse():
    t = cli.format_table({"verbmem_f": {"value": 12.345, "ci_lo": 10.0, "ci_hi": 15.0, "n": 3},
                          "auc": {"value": 0.25, "ci_lo": 0.1, "ci_hi": 0.4, "n_forget": 4, "n_holdout": 5},
                          "privleak": {"value": -47.6, "ci_lo": -79.0, "ci_hi": -16.2, "auc_retrain": 0.4772}})
    lines = t.splitlines()
    assert lines[0].split() == ["metric", "value", "95%", "CI", "n"]
    assert lines[1].split() == ["verbmem_f", "12.35", "[10.00,", "15.00]", "3"]
    assert lines[2].split() == ["auc", "0.2500", "[0.1000,", "0.4000]", "4/5"]
    assert lines[3].split() == ["privleak", "-47.60", "[-79.00,", "-16.20]", "ref", "0.4772"]


def test_malformed_muse_json_fails_before_loading(patched, tmp_path):
    (tmp_path / "privleak").mkdir()
    (tmp_path / "privleak" / "forget.json").write_text('["a text", ')
    (tmp_path / "privleak" / "holdout.json").write_text('["another text"]')
    with pytest.raises(UsageError, match="malformed JSON"):
        cli.run(parse(["eval", "muse", "--model", "m", "--data", str(tmp_path)]))
    assert patched == []
