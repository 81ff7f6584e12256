"""Smoke test of ``bench/gpu_check.py --dry-run``: every section runs on the CPU with tiny shapes
and passes (the script a lent GPU runs first must not fail on its own bugs)."""
import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_gpu_check_dry_run_walks_every_section(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
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
