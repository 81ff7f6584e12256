"""Smoke run of ``bench/unlearn_cpu.py --quick`` (slow: trains and unlearns a tiny GPT-2)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "unlearn_cpu.py"


@pytest.mark.slow
def test_unlearn_cpu_quick(tmp_path):
    pytest.importorskip("bitsandbytes")
    spec = importlib.util.spec_from_file_location("bench_unlearn_cpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        assert mod.main(["--quick", "--methods", "adam,hybrid", "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["per_seed"]["0"]) >= {"original", "original+nf4", "retrain", "adam", "hybrid"}
    assert (tmp_path / "results.png").is_file() and "| adam: unlearned |" in (tmp_path / "results.md").read_text()
