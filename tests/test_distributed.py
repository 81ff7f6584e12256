"""Data-parallel ZO training (zoft/distributed.py) on CPU with gloo and 2 processes.

Every multi-process run here uses a tiny OPT and a few steps. One spawn runs several scenarios in
the same two worker processes (process start-up dominates on a 2-core machine); each test then
checks one property of what they wrote:

* both ranks end with bit-identical weights;
* the run equals a plain single-process computation of the same seeds and shards (each rank's
  probes evaluated on its shard with a plain ``ZOEngine``, combined by the n-query formula);
* ``zoft.train.replay`` rebuilds the weights in one process from the trajectory;
* the bytes a rank sends per step are (R-1) * P * 8 (P fp64 losses), counted at the all-gather;
* a rank that hangs or dies stops the others with a one-line error within ``--dist-timeout``,
  and the run resumes from its checkpoint with a different number of ranks.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import make_tiny_tokenizer
from tiny_models import tiny_model
from zoft.cli import main
from zoft.config import TrainConfig
from zoft.distributed import free_port
from zoft.engine import Probe, Update, ZOEngine
from zoft.errors import ZoftError
from zoft.models import load_model
from zoft.noise import make_noise, step_seed
from zoft.optim import make_optimizer
from zoft.tasks import load_examples, make_task
from zoft.train import Trainer, batch_indices, plan_for, replay

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["the movie was great and the acting was wonderful", "an awful waste of time",
         "a fine film with a lovely cast", "the plot was boring", "hello world", "It was great.",
         "a lovely cast and a boring plot", "the acting was awful"]
R = 2  # ranks
STEPS = 4
COMMON = {"task": "lm", "max_length": 16, "batch_size": 2, "lr": 1e-3, "eps": 1e-3, "seed": 3, "progress": False,
          "dist_timeout": 60.0}
# name -> config keys on top of COMMON (model, train, output_dir added per run)
SCENARIOS = {
    "mezo": {"optimizer": "mezo-sgd", "n_queries": 2, "weight_decay": 0.1},
    "adam-onesided": {"optimizer": "zo-adam", "one_sided": True},
    "ranksgd": {"optimizer": "zo-ranksgd", "lr": 1e-2, "optimizer_options": {"m": 4}},
    "lozo": {"optimizer": "lozo", "n_queries": 2, "lr": 1e-3, "optimizer_options": {"rank": 2, "interval": 2}},
    "subzero": {"optimizer": "subzero", "lr": 1e-3, "optimizer_options": {"rank": 2, "interval": 2}},
    "sparse-mezo": {"optimizer": "sparse-mezo", "n_queries": 2, "lr": 1e-2},
    "module-wise": {"optimizer": "mezo-sgd", "n_queries": 2, "optimizer_options": {"module_wise": True}},
    # the rest of `zoft optimizers`' "data-parallel: yes" (tests/test_registry.py checks the list)
    "sign": {"optimizer": "zo-sgd-sign", "lr": 1e-3},
    "momentum": {"optimizer": "zo-sgd-mmt", "n_queries": 2, "lr": 1e-3},
    "r-adazo": {"optimizer": "r-adazo", "lr": 1e-3},
    "grad-sparsity": {"optimizer": "mezo-sgd", "n_queries": 2, "optimizer_options": {"gradient_sparsity": 0.75}},
}


STREAMED = ("deep-resident", "deep-streamed")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    tiny_model("opt").save_pretrained(d / "model")
    make_tiny_tokenizer().save_pretrained(d / "model")
    tiny_model("opt", layers=6).save_pretrained(d / "deep")  # enough blocks for the planner to stream
    make_tiny_tokenizer().save_pretrained(d / "deep")
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return d


def config(assets: Path, name: str, **extra) -> dict:
    return dict(COMMON, model=str(assets / "model"), train=str(assets / "train.jsonl"),
                output_dir=str(assets / name), **SCENARIOS.get(name, {}), **extra)


def _worker(rank: int, ports: list[int], jobs: list[tuple[str, dict]], out: str) -> None:
    """One rank (torch.multiprocessing.spawn): run each job through the public Trainer, then dump
    this rank's final trainable weights and its collective counters."""
    torch.set_num_threads(1)
    for (name, cfg), port in zip(jobs, ports):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(R), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        if name == "mismatch":  # rank 1 was started with another --lr: refused before step 0
            try:
                Trainer(TrainConfig.from_dict(dict(cfg, lr=cfg["lr"] * (1 + rank))))
            except ZoftError as e:
                Path(f"{out}/{name}.rank{rank}.err").write_text(str(e))
            continue
        tr = Trainer(TrainConfig.from_dict(cfg))
        res = tr.run()
        save_file({k: p.detach().clone() for k, p in res.model.named_parameters()}, f"{out}/{name}.rank{rank}.st")
        Path(f"{out}/{name}.rank{rank}.json").write_text(
            json.dumps({tag: vars(s) for tag, s in tr.dist.stats.items()}))


@pytest.fixture(scope="module")
def spawned(assets):
    """Run every scenario on 2 ranks in one spawn; returns the folder with their outputs."""
    import torch.multiprocessing as mp

    jobs = [(name, config(assets, name, steps=STEPS)) for name in SCENARIOS]
    for name in STREAMED:  # the same 6-block run resident, and streamed on every rank (CPU twin)
        cfg = dict(config(assets, "mezo", steps=STEPS), model=str(assets / "deep"), output_dir=str(assets / name),
                   device="cpu")
        if name == "deep-streamed":  # just above the smallest plan of one rank's 4 probes: all blocks stream
            cfg["gpu_mem"] = str(plan_for(TrainConfig.from_dict(dict(cfg, gpu_mem="1GB")), 4).min_budget_bytes + 1000)
        jobs.append((name, cfg))
    jobs.append(("mismatch", config(assets, "mismatch", steps=STEPS)))  # last: it leaves its group behind
    ports = [free_port() for _ in jobs]
    mp.start_processes(_worker, args=(ports, jobs, str(assets)), nprocs=R, join=True, start_method="spawn")
    return assets


def rank_weights(d: Path, name: str, rank: int) -> dict[str, torch.Tensor]:
    return load_file(str(d / f"{name}.rank{rank}.st"))


def trajectory(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "trajectory.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_rank_ends_with_bit_identical_weights_and_replay_rebuilds_them(spawned, name):
    w0, w1 = rank_weights(spawned, name, 0), rank_weights(spawned, name, 1)
    init = dict(tiny_model("opt").named_parameters())
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert any(not torch.equal(w0[k], init[k].detach()) for k in w0)  # training moved the weights
    rebuilt = dict(replay(spawned / name).named_parameters())  # one process, the plain replay path
    for k in w0:
        assert torch.equal(rebuilt[k].detach(), w0[k]), k
    ck = load_file(str(spawned / name / "checkpoint" / "model.safetensors"))
    assert torch.equal(ck["model.decoder.layers.0.fc1.weight"], w0["model.decoder.layers.0.fc1.weight"])
    recs = trajectory(spawned / name)
    assert [r["step"] for r in recs] == list(range(STEPS)) and all(r["world_size"] == R for r in recs)


def test_streaming_on_every_rank_equals_the_resident_data_parallel_run(spawned):
    """Both ranks stream all 6 blocks through the CPU twin under --gpu-mem: their weights are
    bit-identical to each other and to the same data-parallel run with every block resident, and
    every step's accounted device peak is within the budget."""
    ref = rank_weights(spawned, "deep-resident", 0)
    cfg = json.loads(json.dumps(yaml.safe_load((spawned / "deep-streamed" / "config.yaml").read_text())))
    for rank in range(R):
        w = rank_weights(spawned, "deep-streamed", rank)
        for k in ref:
            assert torch.equal(w[k], ref[k]), (rank, k)
    recs = [json.loads(x) for x in (spawned / "deep-streamed" / "metrics.jsonl").read_text().splitlines()]
    peaks = [r["device_peak_bytes"] for r in recs if "device_peak_bytes" in r]
    assert len(peaks) == STEPS and max(peaks) <= int(cfg["gpu_mem"])


def run_noise(run: Path):
    """The noise backend the run resolved (its config.yaml): the reference draws the same z."""
    return make_noise(yaml.safe_load((run / "config.yaml").read_text())["noise"], "gaussian")


def _reference(assets: Path, name: str) -> tuple[dict[str, torch.Tensor], list[list[list[float]]]]:
    """The 2-rank run computed in one process, plainly: for each step, rank r's queries (global
    indices r*q+i) are evaluated on rank r's shard (rows [r*B, (r+1)*B) of the 2B-example batch),
    and the update is the n-query MeZO-SGD one over all 2q queries,
    ``w <- (1 - lr wd) w - lr/(2q) sum_j g_j z_j`` with ``g_j = (L+ - L-) / (2 eps)``."""
    cfg = TrainConfig.from_dict(config(assets, name, steps=STEPS))
    assert cfg.optimizer == "mezo-sgd" and not cfg.one_sided
    lm = load_model(cfg.model, dtype="fp32")
    task = make_task("lm", lm.tokenizer, lm.kind, cfg.max_length)
    train = list(load_examples(cfg.train))
    engine = ZOEngine(lm.model, noise=run_noise(assets / name))
    q, B, losses_seen = cfg.n_queries, cfg.batch_size, []
    for t in range(STEPS):
        rows = batch_indices(len(train), R * B, t, cfg.seed)
        terms, per_rank = [], []
        for r in range(R):
            batch = task.collate([train[i] for i in rows[r * B:(r + 1) * B]])
            seeds = [step_seed(cfg.seed, t, r * q + i) for i in range(q)]
            probes = [p for s in seeds for p in (Probe(s, cfg.eps), Probe(s, -cfg.eps))]
            L = engine.evaluate(probes, batch, task)  # (2q,) fp64
            per_rank.append(L.tolist())
            for i, s in enumerate(seeds):
                g = ((L[2 * i] - L[2 * i + 1]) / (2 * cfg.eps)).item()
                terms.append((s, -cfg.lr * g / (R * q)))
        losses_seen.append(per_rank)
        engine.set_update(Update(terms=terms, decay=1.0 - cfg.lr * cfg.weight_decay))
    engine.close()
    return {k: p.detach() for k, p in lm.model.named_parameters()}, losses_seen


def test_data_parallel_equals_the_single_process_computation_of_the_same_seeds_and_shards(spawned):
    torch.set_num_threads(1)  # as the ranks: same kernels, so bit-identical is the right bar
    try:
        ref, losses = _reference(spawned, "mezo")
    finally:
        torch.set_num_threads(2)
    recs = trajectory(spawned / "mezo")
    assert [r["losses"] for r in recs] == losses  # every rank's scalars, as the reference computed them
    w = rank_weights(spawned, "mezo", 0)
    for k in w:
        assert torch.equal(w[k], ref[k]), k


def test_ranksgd_spreads_its_candidates_over_ranks_on_one_shared_batch(spawned):
    """m = 4 candidates, 2 per rank, all on the single-process batch: equals one process that
    evaluates all 4 (the candidates' losses are compared on one batch)."""
    cfg = TrainConfig.from_dict(config(spawned, "ranksgd", steps=STEPS))
    lm = load_model(cfg.model, dtype="fp32")
    task = make_task("lm", lm.tokenizer, lm.kind, cfg.max_length)
    train = list(load_examples(cfg.train))
    engine = ZOEngine(lm.model, noise=run_noise(spawned / "ranksgd"))
    opt = make_optimizer("zo-ranksgd", {"lr": cfg.lr, "eps": cfg.eps, "m": 4}, seed=cfg.seed, total_steps=STEPS)
    recs = trajectory(spawned / "ranksgd")
    torch.set_num_threads(1)
    try:
        for t in range(STEPS):
            batch = task.collate([train[i] for i in batch_indices(len(train), cfg.batch_size, t, cfg.seed)])
            halves = [engine.evaluate(opt.probes(t)[2 * r:2 * r + 2], batch, task) for r in range(R)]
            losses = torch.cat(halves)  # (4,): what the all-gather assembles
            assert recs[t]["losses"] == losses.tolist()
            upd, _ = opt.update(t, losses)
            assert recs[t]["terms"] == [list(x) for x in upd.terms]
            engine.set_update(upd)
        engine.close()
    finally:
        torch.set_num_threads(2)
    w = rank_weights(spawned, "ranksgd", 1)
    for k, p in lm.model.named_parameters():
        assert torch.equal(w[k], p.detach()), k


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bytes_sent_per_step_are_o_ranks_scalars(spawned, name):
    """Measured at the all-gather wrapper: one collective per step, each rank sending its P fp64
    losses to the R-1 peers; the model (30k parameters, 120 kB) never travels."""
    P = {"mezo": 4, "adam-onesided": 2, "ranksgd": 2, "lozo": 4, "subzero": 2, "sparse-mezo": 4,
         "module-wise": 4, "sign": 2, "momentum": 4, "r-adazo": 2, "grad-sparsity": 4}[name]  # this rank's probes per step
    metrics = [json.loads(x) for x in (spawned / name / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "comm_bytes" in m]
    assert len(steps) == STEPS and all(m["comm_bytes"] == (R - 1) * P * 8 for m in steps)
    for rank in range(R):
        stats = json.loads((spawned / f"{name}.rank{rank}.json").read_text())
        assert stats["losses"] == {"calls": STEPS, "bytes_sent": STEPS * (R - 1) * P * 8,
                                   "bytes_received": STEPS * (R - 1) * P * 8}
        assert stats["check"] == {"calls": 2, "bytes_sent": 16, "bytes_received": 16}  # 8-byte digests: start, save
    model_bytes = sum(p.numel() * 4 for p in tiny_model("opt").parameters())
    assert (R - 1) * P * 8 * 1000 < model_bytes


def test_ranks_started_with_different_configs_are_refused_before_step_0(spawned):
    for rank in range(R):
        msg = (spawned / f"mismatch.rank{rank}.err").read_text()
        assert msg.startswith("the ranks' configs, training examples or starting weights differ between rank 0 "
                              "and rank 1"), msg
    assert not (spawned / "mismatch" / "trajectory.jsonl").exists()


def _cli(assets: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(assets / "model"), "--task", "lm", "--train", str(assets / "train.jsonl"),
            "--max-length", "16", "--batch-size", "2", "--lr", "1e-3", "--seed", "3", "--output-dir", str(out),
            "--no-progress", *extra]


def test_cli_nproc_resumes_a_one_rank_run_on_two_ranks_and_replays(assets, tmp_path, capsys):
    out = tmp_path / "grow"
    assert main(_cli(assets, out, "--steps", "2")) == 0
    capsys.readouterr()
    assert main(_cli(assets, out, "--steps", "4", "--resume", "--nproc", "2", "--dist-timeout", "60")) == 0
    assert capsys.readouterr().out.count("done: 4 steps") == 1  # printed once, by the launcher
    recs = trajectory(out)
    assert [r.get("world_size", 1) for r in recs] == [1, 1, 2, 2]
    assert [len(r["terms"]) for r in recs] == [1, 1, 2, 2]  # one query per rank
    assert recs[2]["terms"][0][0] == step_seed(3, 2, 0) and recs[2]["terms"][1][0] == step_seed(3, 2, 1)
    assert main(["replay", str(out), "--output", str(tmp_path / "re")]) == 0
    a, b = load_file(str(out / "checkpoint" / "model.safetensors")), load_file(str(tmp_path / "re" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _start_ranks(assets: Path, out: Path, timeout: int) -> list[subprocess.Popen]:
    """Two ranks started the way torchrun starts them (its environment variables, no launcher),
    training for 'ever' with a checkpoint every 2 steps; each rank's stderr on its own pipe."""
    port = free_port()
    argv = [sys.executable, "-m", "zoft", *_cli(assets, out, "--steps", "100000", "--save-every", "2",
                                                "--dist-timeout", str(timeout))]
    return [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RANK=str(r),
                                      LOCAL_RANK=str(r), WORLD_SIZE=str(R), MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=str(port)))
            for r in range(R)]


def _wait_for_checkpoint(run: Path, procs: list[subprocess.Popen], at_least: int) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        st = run / "checkpoint" / "state.json"
        if st.is_file() and json.loads(st.read_text())["step"] >= at_least:
            return
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint at step >= {at_least}; exits {[p.poll() for p in procs]}")


def _errors(stderr: str) -> list[str]:
    skip = ("Loading weights", "Writing model")
    return [x.strip() for x in stderr.splitlines() if x.strip() and not x.strip().startswith(skip) and "it/s]" not in x]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_a_hung_peer_stops_the_others_after_the_timeout_and_the_run_resumes_on_one_rank(assets, tmp_path, capsys):
    """Rank 1 freezes (SIGSTOP) mid-run: rank 0 stops after --dist-timeout with one line, exit 1.
    Then the run resumes from its last checkpoint on ONE rank and replays to its weights."""
    out, timeout = tmp_path / "hang", 4
    procs = _start_ranks(assets, out, timeout)
    try:
        _wait_for_checkpoint(out, procs, 2)
        os.kill(procs[1].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        code = procs[0].wait(timeout=timeout + 30)
        waited = time.monotonic() - t0
    finally:
        _stop(procs)
    assert code == 1
    # stopped by the timeout (rank 0 may have entered its all-gather a little before the SIGSTOP), no hang after
    assert timeout - 2 < waited < timeout + 15
    lines = _errors(procs[0].stderr.read())
    assert len(lines) == 1 and lines[0].startswith("zoft: error: rank 0 of 2: step "), lines
    assert f"no answer from a peer rank within --dist-timeout {timeout} s" in lines[0]
    assert "--resume (any number of ranks)" in lines[0]

    ck = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    capsys.readouterr()
    assert main(_cli(assets, out, "--steps", str(ck + 2), "--resume")) == 0  # 2 ranks -> 1 rank
    recs = trajectory(out)
    assert [r.get("world_size", 1) for r in recs] == [2] * ck + [1, 1]
    assert [len(r["terms"]) for r in recs[-2:]] == [1, 1] and recs[-1]["terms"][0][0] == step_seed(3, ck + 1, 0)
    rebuilt = dict(replay(out).named_parameters())
    final = load_file(str(out / "checkpoint" / "model.safetensors"))
    for k in final:
        assert torch.equal(rebuilt[k].detach(), final[k]), k


def test_a_killed_peer_stops_the_survivor_at_once_with_one_line(assets, tmp_path):
    """SIGKILL mid-run: gloo sees the closed connection, so the survivor stops long before the
    60 s timeout (measured: well under a second once it reaches the all-gather)."""
    out = tmp_path / "kill"
    procs = _start_ranks(assets, out, 60)
    try:
        _wait_for_checkpoint(out, procs, 2)
        os.kill(procs[1].pid, signal.SIGKILL)
        t0 = time.monotonic()
        code = procs[0].wait(timeout=60)
        waited = time.monotonic() - t0
    finally:
        _stop(procs)
    assert code == 1 and waited < 20
    lines = _errors(procs[0].stderr.read())
    assert len(lines) == 1 and lines[0].startswith("zoft: error: rank 0 of 2:"), lines
    assert "closed its connection (it crashed or was killed)" in lines[0]


def test_the_launcher_reports_a_worker_killed_by_a_signal(capsys):
    from zoft.distributed import _wait

    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"]),
             subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])]
    assert _wait(procs, grace_s=5) == 1
    assert capsys.readouterr().err.strip().startswith("zoft: error: rank 1 (pid")


def test_bad_data_parallel_input_gets_one_line(assets, tmp_path, capsys):
    def one_line(argv, code=2):
        rc = main(argv)
        err = _errors(capsys.readouterr().err)
        assert rc == code and len(err) == 1 and err[0].startswith("zoft: error:"), err
        return err[0]

    out = tmp_path / "bad"
    assert "--nproc must be >= 1" in one_line(_cli(assets, out, "--steps", "2", "--nproc", "0"))
    assert "--dist-timeout must be > 0" in one_line(_cli(assets, out, "--steps", "2", "--dist-timeout", "0"))
    assert "zo-sgd-cons" in one_line(_cli(assets, out, "--steps", "2", "--nproc", "2", "--optimizer", "zo-sgd-cons"))
    cfg = tmp_path / "rank.yaml"
    cfg.write_text("optimizer: zo-ranksgd\noptimizer_options: {m: 2, line_search: 2}\n")
    assert "line_search" in one_line(_cli(assets, out, "--steps", "2", "--nproc", "2", "--config", str(cfg)))
    cfg.write_text("optimizer: zo-ranksgd\noptimizer_options: {m: 2}\n")
    assert "at most 2 ranks" in one_line(_cli(assets, out, "--steps", "2", "--nproc", "3", "--config", str(cfg)))
    with pytest.raises(Exception, match="needs worker processes"):
        Trainer(TrainConfig.from_dict(config(assets, "x", steps=1, nproc=2)))
