"""Smoke test of ``bench/zoo.py``: two methods, one seed, a tiny forward-pass budget on the causal-LM
problem; the table, JSON and plot come out and the McNemar p-value is the exact binomial one."""
import json

import torch
from test_bench_smoke import load_bench


def test_mcnemar_exact_matches_hand_computed_values():
    zoo = load_bench("zoo")
    assert zoo.mcnemar_exact(0, 0) == 1.0
    assert abs(zoo.mcnemar_exact(12, 5) - 0.1435) < 1e-4  # the README's demo numbers: 2 * P(X <= 5), X ~ B(17, 1/2)
    assert abs(zoo.mcnemar_exact(0, 6) - 2 / 64) < 1e-12


def test_zoo_lm_smoke(tmp_path, capsys):
    zoo = load_bench("zoo")
    threads = torch.get_num_threads()
    try:
        rc = zoo.main(["--problems", "lm", "--methods", "mezo-sgd,zo-sgd-cons,lozo", "--seeds", "0", "--budget", "10",
                       "--evals", "1", "--threads", "1", "--json", str(tmp_path / "z.json"),
                       "--plot", str(tmp_path / "z.png")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out = capsys.readouterr().out
    assert "| `lozo` | 5 |" in out and "| `zo-sgd-cons` | 2 |" in out  # equal forward passes: 10 // 2, 10 // 5
    res = json.loads((tmp_path / "z.json").read_text())["lm"]
    for name in ("mezo-sgd", "zo-sgd-cons", "lozo"):
        curve = res[name]["0"]["curve"]
        assert curve[0][0] == 0 and curve[-1][0] <= 10 and curve[-1][2] > 0
    assert (tmp_path / "z.png").stat().st_size > 1000
