"""Smoke test of ``bench/gpu_check.py --dry-run``: every section runs on the CPU with tiny shapes
and passes (the script a lent GPU runs first must not fail on its own bugs)."""
import json

import torch
from test_bench_smoke import load_bench


def test_gpu_check_dry_run_walks_every_section(tmp_path, capsys):
    mod = load_bench("gpu_check")
    out = tmp_path / "check.json"
    with torch.random.fork_rng(devices=[]):
        rc = mod.main(["--dry-run", "--json", str(out)])
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0, text
    assert {r["section"] for r in rows} == {"environment", "link", "equivalence", "kernels", "memory", "step time"}
    assert not [r for r in rows if r["ok"] is False]
    eq = [r["check"] for r in rows if r["section"] == "equivalence"]
    for case in ("fp32", "fp16", "bf16", "fp32, bf16 codec", "fp32, int8 codec", "fp32, unit sphere"):
        assert f"{case}: losses / weights rel" in eq
    assert "| section | check | value | expected | ok |" in text
