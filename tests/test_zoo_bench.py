"""``bench/zoo.py``: the statistics against hand-computed values, the win rule, and a smoke run of
the causal-LM problem at a tiny budget (sweep, seeds, cache, timing, table, plot)."""
import json
import math

import pytest
import torch
from test_bench_smoke import load_bench


def test_mcnemar_exact_matches_hand_computed_values():
    zoo = load_bench("zoo")
    assert zoo.mcnemar_exact(0, 0) == 1.0
    assert abs(zoo.mcnemar_exact(12, 5) - 0.1435) < 1e-4  # the README's demo numbers: 2 * P(X <= 5), X ~ B(17, 1/2)
    assert abs(zoo.mcnemar_exact(0, 6) - 2 / 64) < 1e-12
    # b = 10, c = 2: 2 * (1 + 12 + 66) / 4096 = 158 / 4096
    assert abs(zoo.mcnemar_exact(10, 2) - 158 / 4096) < 1e-12
    assert zoo.mcnemar_exact(3, 3) == 1.0  # the two-sided tail is capped at 1


def test_discordant_counts_and_the_win_rule():
    zoo = load_bench("zoo")
    assert zoo.discordant("1100", "1010") == (1, 1)
    assert zoo.discordant("111", "000") == (3, 0)
    with pytest.raises(ValueError):
        zoo.discordant("11", "1")  # different example sets are a bug, not a zero

    def rec(acc, correct):
        return {"final_accuracy": acc, "correct": correct}

    ref = "1" * 60 + "0" * 40
    strong = "1" * 60 + "1" * 12 + "0" * 28  # +12 fixes, 0 breaks: p = 2 / 2^12 per seed
    weak_seed = "1" * 60 + "1" * 4 + "0" * 36  # +4 points but p = 0.125
    done = {"mezo-sgd": {"seeds": {0: rec(0.60, ref), 1: rec(0.60, ref)}},
            "a": {"seeds": {0: rec(0.72, strong), 1: rec(0.72, strong)}},
            "b": {"seeds": {0: rec(0.72, strong), 1: rec(0.64, weak_seed)}}}  # one seed not significant
    assert zoo.winners(done) == ["a"]
    assert zoo.winners(done, min_points=13) == []


def test_forward_budget_per_step_and_schedule():
    zoo = load_bench("zoo")
    from zoft.optim import make_optimizer

    def cost(method, budget, n_train=300):
        return zoo.cost_schedule(zoo.Job("demo", method, 1e-3, 0, budget, 1), n_train, 16)

    assert cost("mezo-sgd", 9) == [2, 4, 6, 8]  # two probes a step; the fifth would pass the budget
    assert cost("zo-sgd-cons", 10) == [5, 10]  # L(w) and a +-eps pair, then the two candidates
    assert cost("forward-grad", 3) == [1, 2, 3]  # one jvp pass per query, counted as one forward
    assert cost("hizoo", 7) == [3, 6]  # L(w) for the Hessian estimate and a +-eps pair
    # MeZO-SVRG with the bench's anchor on 64 examples: anchor steps (t mod 2 = 0) evaluate 2 probes
    # on 64 examples = 8 forwards of 16, minibatch steps 4 probes on 16
    assert cost("mezo-svrg", 30) == [8, 12, 20, 24]
    full = make_optimizer("mezo-svrg", {}, seed=0, total_steps=1)  # the default anchor: the whole set
    assert zoo.step_forwards(full, 0, 300, 16) == 2 * 300 / 16 and zoo.step_forwards(full, 1, 300, 16) == 4


def test_zoo_lm_smoke_sweep_seeds_and_cache(tmp_path, capsys):
    zoo = load_bench("zoo")
    results = tmp_path / "zoo.json"
    argv = ["--problems", "lm", "--methods", "mezo-sgd,zo-sgd-cons", "--seeds", "0,1", "--budget", "10",
            "--evals", "1", "--results", str(results)]
    threads = torch.get_num_threads()
    try:
        assert zoo.main([*argv, "--plot", str(tmp_path / "z.png")]) == 0
        first = capsys.readouterr().out
        assert zoo.main([*argv, "--timing"]) == 0
        assert "timing lm (s/step): mezo-sgd " in capsys.readouterr().out
        cached = json.loads(results.read_text())
        assert zoo.main(argv) == 0  # everything cached: nothing recomputed, the same file
        second = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    n = len(cached["runs"])  # per method: 3 sweep rates (+ extensions past an end), then seed 1
    assert 8 <= n <= 8 + 2 * 2 * zoo.EXTEND and f"computed {n} run(s), 0 cached, 0 failed" in first
    assert first.index("lm|mezo-sgd|") < first.index("|seed=1|") < first.index("lm|zo-sgd-cons|")  # methods in order
    # nothing recomputed (a sweep whose extensions are cached is complete without visiting them)
    assert "computed 0 run(s), " in second and json.loads(results.read_text()) == cached
    # equal forward passes: 10 // 2 and 10 // 5 steps
    assert "| `mezo-sgd` |" in first and " | 5 | " in first.split("`mezo-sgd`")[1].splitlines()[0]
    assert " | 2 | " in first.split("`zo-sgd-cons`")[1].splitlines()[0]
    assert set(cached["timing"]) == {"lm|mezo-sgd", "lm|zo-sgd-cons"} and cached["timing"]["lm|mezo-sgd"]["ratio"] == 1
    for key, rec in cached["runs"].items():
        assert rec["curve"][0][0] == 0 and rec["curve"][-1][0] <= 10, key
        assert rec["val_loss"] > 0 and rec["final_loss"] > 0
    # the seed-1 runs use the learning rate whose seed-0 run had the lowest validation loss
    for m in ("mezo-sgd", "zo-sgd-cons"):
        lr, more, _ = zoo.sweep(cached["runs"], "lm", m, 10, 1)
        assert more == [] and lr == zoo.chosen_lr(cached["runs"], "lm", m, 10, 1)
        sweep = {k: r["val_loss"] for k, r in cached["runs"].items() if f"|{m}|" in k and "|seed=0|" in k}
        assert 3 <= len(sweep) <= 3 + zoo.EXTEND
        assert sweep[min(sweep, key=sweep.get)] == cached["runs"][zoo.Job("lm", m, lr, 0, 10, 1).key()]["val_loss"]
        assert zoo.Job("lm", m, lr, 1, 10, 1).key() in cached["runs"]
    assert (tmp_path / "z.png").stat().st_size > 1000


@pytest.mark.parametrize("best,ran,expect", [
    (1.0, (), (1.0, [], False)),                     # interior: no extension
    (3.0, (), (None, [9.0], False)),                 # best at the top of the grid: one rate further
    ("top", "top", ("top", [], True)),              # still at the end after EXTEND extensions: starred
    (1 / 9, (1 / 9, 1 / 27), (1 / 9, [], False)),    # the extension below won, the next one lost
])
def test_sweep_extends_past_an_end_while_the_best_is_there(best, ran, expect):
    """The sweep on hand-made validation losses |log3(lr / best)| (lowest at ``best``) of the grid's
    runs plus the extensions already run (``ran``, x centre): its pick, the rates it still needs,
    and the end flag."""
    zoo = load_bench("zoo")
    if best == "top":  # the grid's top rate x3 EXTEND times, each extension run
        ran = tuple(zoo.GRID[-1] * 3 ** i for i in range(1, zoo.EXTEND + 1))
        best = ran[-1]
        expect = (best, [], True)
    centre = zoo.LR["lm"]["mezo-sgd"]
    runs = {zoo.Job("lm", "mezo-sgd", centre * f, 0, 10, 1).key(): {"val_loss": abs(math.log(f / best, 3))}
            for f in (*zoo.GRID, *ran)}
    lr, more, edge = zoo.sweep(runs, "lm", "mezo-sgd", 10, 1)
    want_lr, want_more, want_edge = expect
    assert (lr is None) == (want_lr is None) and edge == want_edge
    if want_lr is not None:
        assert lr == pytest.approx(centre * want_lr, rel=1e-12)
    assert more == pytest.approx([centre * f for f in want_more], rel=1e-12)


def test_demo_validation_split_is_disjoint_balanced_and_fixed():
    zoo = load_bench("zoo")
    train, val, held = zoo.demo_splits()
    assert (len(train), len(val), len(held)) == (300, 100, 200)
    assert sum(e["label"] for e in val) == 50
    assert not {e["sentence"] for e in val} & {e["sentence"] for e in train}
    assert val == zoo.demo_splits()[1]


@pytest.mark.slow
def test_zoo_demo_smoke(tmp_path, capsys):
    zoo = load_bench("zoo")
    threads = torch.get_num_threads()
    try:
        rc = zoo.main(["--problems", "demo", "--methods", "mezo-sgd", "--seeds", "0", "--budget", "4", "--evals", "1",
                       "--results", str(tmp_path / "z.json")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out = capsys.readouterr().out
    assert "zero-shot: accuracy 70.0%" in out and "| `mezo-sgd` |" in out
    runs = json.loads((tmp_path / "z.json").read_text())["runs"]
    rec = next(r for k, r in runs.items() if "|mezo-sgd|" in k)
    assert len(rec["correct"]) == 200 and abs(rec["correct"].count("1") / 200 - rec["final_accuracy"]) < 1e-9
