"""Every registered ZO optimizer at the same number of forward passes, several seeds, one table.

Two problems (``PROBLEMS``):

* ``demo``: the embedded MiniLM demo (``configs/demo.yaml``: pretrained all-MiniLM-L6-v2, built-in
  sentiment set, BitFit parameters, linear decay, batch 16), trained on 300 of the 400 built-in
  training examples; the other 100 (50 per label, fixed) are the *validation* split of the
  learning-rate sweep. Reported: accuracy and loss on the 200 held-out examples, and an exact
  McNemar test of each method's final predictions against MeZO-SGD's on them, per seed.
* ``lm``: a tiny Llama (vocabulary 320, 2 layers, ~39k parameters, all trained) first trained
  first-order (Adam, ``LM_PRETRAIN``) on a random bigram language with 8 successors per token, then
  fine-tuned by each ZO method on the same language restricted to 4 of the 8 successors (the
  knowledge is there; the fine-tuning sharpens it). Held-out next-token NLL (floor ln 4 = 1.386).

Protocol (``run``): every method gets the same forward-pass budget (the steps whose forwards,
``step_forwards``, fit in it) and, per seed, the same batches (``zoft.train.batch_indices``). First a sweep: seed 0 at each
learning rate of ``GRID`` x the method's centre ``LR``, and while the best is at an end of the
rates swept, one more x3 past it (``EXTEND`` times at most per side); the rate with the lowest
*validation* loss (MeZO's dev-selection criterion) is kept, and seeds 1.. run at it (seed 0's run at that rate is
reused: it saw no held-out example). All other options are registry defaults (``OPTIONS``:
stated overrides). Every run is cached in ``--results`` under (problem, method, lr, seed, config
hash); a rerun computes only what is missing. Step times come from one timing pass over all
methods in one process (``--timing``), reported as a ratio to MeZO-SGD's.

    nice -n 10 env PYTHONPATH=. python bench/zoo.py --jobs 2        # compute the runs the cache lacks
    nice -n 10 env PYTHONPATH=. python bench/zoo.py --timing        # step times, one process
    PYTHONPATH=. python bench/zoo.py --report --plot docs/zoo.png   # tables and plot, no runs
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from zoft.optim import OPTIMIZERS, ZOConfig, describe, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "zoo.json"

# Learning-rate centres of the sweep (GRID x centre). demo: MeZO-SGD at the recipe's 2e-3; LOZO /
# SubZero directions have MeZO's expected norm, so the same; scale-free updates (sign, Adam, R-AdaZO,
# RankSGD, FZOO: about lr per coordinate and step) 1e-4, the recipe's typical per-coordinate MeZO
# step; momentum lr (1 - momentum); MeZO-SGD's rate for the methods whose update is a MeZO
# estimate times lr (HiZOO: H starts at 1; MeZO-SVRG's minibatch rate; Sparse MeZO, the module-wise
# and gradient-sparsity variants, Forward-Grad). lm: MeZO-SGD 1e-3 and the same rules.
_MEZO_LIKE = ("lozo", "subzero", "zo-sgd-cons", "hizoo", "mezo-svrg", "sparse-mezo", "forward-grad",
              "mezo-sgd/module-wise", "mezo-sgd/grad-sparse", "sparse-mezo/fixed-mask")
LR = {
    "demo": {"mezo-sgd": 2e-3, **dict.fromkeys(_MEZO_LIKE, 2e-3), "zo-sgd-mmt": 2e-4,
             "zo-sgd-sign": 1e-4, "zo-adam": 1e-4, "r-adazo": 1e-4, "zo-ranksgd": 1e-4, "fzoo": 1e-4},
    "lm": {"mezo-sgd": 1e-3, **dict.fromkeys(_MEZO_LIKE, 1e-3), "zo-sgd-mmt": 1e-4,
           "zo-sgd-sign": 1e-3, "zo-adam": 1e-3, "r-adazo": 1e-4, "zo-ranksgd": 1e-3, "fzoo": 1e-3},
}
GRID = (1 / 3, 1.0, 3.0)
EXTEND = 4  # while the best rate is at an end of the swept rates, sweep one more x3 past it, at most this often
EPS = {"demo": 1e-3, "lm": 1e-2}
BUDGET = {"demo": 300, "lm": 2000}  # forward passes per run (why: README "ZO methods at equal forward passes")
EVALS = {"demo": 3, "lm": 4}  # held-out evaluations per run (the plot's points)
# per-method option overrides for short runs: the lazy factors are refreshed within the budget;
# MeZO-SVRG's anchor estimate on 64 examples (default: the whole training set, 300 demo / 2048 lm
# examples, i.e. 37.5 / 256 forwards per anchor step: a handful of steps in the budget)
OPTIONS = {"lozo": {"interval": 50}, "subzero": {"interval": 50}, "mezo-svrg": {"anchor_batch": 64}}
# methods not run on a problem, and why (printed under its table)
SKIP = {"demo": {m: "on the demo's BitFit parameters (all 1-D) its low-rank directions are plain Gaussian z: "
                    "bit-identical to mezo-sgd (0/0 discordant in a 200-forward run, 2026-12-01)"
                 for m in ("lozo", "subzero")}}
# registry methods the bench leaves out (``--methods all`` skips them), and why (printed under the tables)
EXCLUDED = {"cge": "DeepZero's coordinate-wise estimate costs one forward per "
                   "trained coordinate and step: 31k+1 on the demo (BitFit; budget 300), 39k+1 on lm "
                   "(budget 2000), so not one step fits in either budget (docs/deepzero.md runs it on a 1.9k-coordinate CNN)"}
# option variants benchmarked as methods of their own: label -> (registry name, options)
VARIANTS: dict[str, tuple[str, dict]] = {
    "mezo-sgd/module-wise": ("mezo-sgd", {"module_wise": True}),  # ZO-Bench's module-wise perturbation
    "mezo-sgd/grad-sparse": ("mezo-sgd", {"gradient_sparsity": 0.75}),  # ZO-Bench's value: 77% of z zeroed
    "sparse-mezo/fixed-mask": ("sparse-mezo", {"remask": False}),  # the mask of the pretrained weights, kept
}
LM_PRETRAIN = {"steps": 300, "lr": 1e-2, "batch_size": 32, "sequences": 4096}
V, T = 320, 16  # lm vocabulary and sequence length


_SET = ("optimizer", "lr", "eps", "steps", "seed", "eval_every", "save_every", "optimizer_options", "output_dir")


class Job(NamedTuple):
    """One run: ``problem`` trained by optimizer ``method`` at ``lr`` with ``seed``."""

    problem: str
    method: str
    lr: float
    seed: int
    budget: int
    evals: int

    @property
    def optimizer(self) -> str:
        """The registry name (``method`` is a registry name or a ``VARIANTS`` label)."""
        return VARIANTS[self.method][0] if self.method in VARIANTS else self.method

    def options(self) -> dict:
        return {**OPTIONS.get(self.optimizer, {}), **(VARIANTS[self.method][1] if self.method in VARIANTS else {})}

    def config(self) -> dict:
        """Everything the result depends on besides (method, lr, seed): hashed into the cache key.
        Options at an off value (None, False) or at the ZO-SGD family's default are left out, so a
        new option that keeps the old behaviour by default keeps the cache; so are the demo recipe's
        keys the bench sets itself."""
        base = {f.name: f.default for f in dataclasses.fields(ZOConfig)}
        opts = {k: v for k, v in {**describe(self.optimizer)["options"], **self.options()}.items()
                if v is not None and v is not False and not (k in base and base[k] == v)}
        if self.problem == "demo":
            from zoft.config import load_config_file

            recipe = {k: v for k, v in load_config_file(str(ROOT / "configs" / "demo.yaml")).items() if k not in _SET}
            prob = {"recipe": recipe, "train": 300, "val": 100}
        else:
            prob = {"V": V, "T": T, "pretrain": LM_PRETRAIN}
        return {"eps": EPS[self.problem], "budget": self.budget, "evals": self.evals, "options": opts, **prob}

    def key(self) -> str:
        h = hashlib.sha1(json.dumps(self.config(), sort_keys=True, default=str).encode()).hexdigest()[:10]
        return f"{self.problem}|{self.method}|lr={self.lr:.4g}|seed={self.seed}|{h}"


def step_forwards(opt, step: int, n_train: int, batch_size: int) -> float:
    """Forward passes (of ``batch_size`` examples) that step ``step`` of ``opt`` costs: one per
    probe; zo-sgd-cons's second phase 2 more; forward-grad's q jvp passes count one each; a
    MeZO-SVRG anchor step (t mod q = 0, Algorithm 2) its 2 probes per query on the large batch."""
    if hasattr(opt, "anchor_examples") and step % opt.config.interval == 0:
        return 2 * opt.config.n_queries * min(opt.config.anchor_batch or n_train, n_train) / batch_size
    return {"zo-sgd-cons": opt.num_probes() + 2, "forward-grad": opt.config.n_queries}.get(opt.name, opt.num_probes())


def cost_schedule(job, n_train: int, batch_size: int) -> list[float]:
    """Cumulative forward passes after each step that fits in ``job.budget`` (len = the steps)."""
    opt = make_optimizer(job.optimizer, {"lr": job.lr or 1e-3, **job.options()}, seed=0, total_steps=1)
    out, used = [], 0.0
    while True:
        used += step_forwards(opt, len(out), n_train, batch_size)
        if used > job.budget + 1e-9:
            return out
        out.append(used)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b, c (binomial, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def discordant(x: str, y: str) -> tuple[int, int]:
    """(b, c) of two per-example correctness strings ('1' right, '0' wrong): b = right in x only."""
    b = sum(p == "1" and q == "0" for p, q in zip(x, y, strict=True))
    c = sum(p == "0" and q == "1" for p, q in zip(x, y, strict=True))
    return b, c


# -- the demo task --------------------------------------------------------------------------------
def demo_splits() -> tuple[list[dict], list[dict], list[dict]]:
    """(train 300, validation 100, held-out 200): the validation split is 50 examples per label of
    the built-in training set, drawn once by a fixed generator (the same for every seed)."""
    from zoft.tasks import builtin_sentiment

    train = list(builtin_sentiment("train"))
    g = torch.Generator().manual_seed(1234)
    val_idx = set()
    for label in (0, 1):
        idx = [i for i, e in enumerate(train) if e["label"] == label]
        val_idx |= {idx[j] for j in torch.randperm(len(idx), generator=g)[:50].tolist()}
    return ([e for i, e in enumerate(train) if i not in val_idx], [train[i] for i in sorted(val_idx)],
            list(builtin_sentiment("eval")))


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _demo_trainer(job: Job, workdir: Path, steps: int):
    from zoft import TrainConfig
    from zoft.config import load_config_file
    from zoft.train import Trainer

    train, _, held = demo_splits()
    cfg = load_config_file(str(ROOT / "configs" / "demo.yaml"))
    cfg.update(optimizer=job.optimizer, lr=job.lr, eps=EPS["demo"], steps=steps, seed=job.seed, eval_every=0,
               save_every=0, optimizer_options=job.options(), progress=False,
               train=_write_jsonl(workdir / "train.jsonl", train), eval=_write_jsonl(workdir / "held.jsonl", held),
               output_dir=str(workdir / "run"))
    return Trainer(TrainConfig.from_dict(cfg))


def _correct(task, model, examples: list[dict]) -> str:
    """Per-example correctness of the model's predictions, as a '0'/'1' string."""
    from zoft.tasks.lm import eval_outputs

    out = []
    for batch, outputs in eval_outputs(task, model, examples, 32):
        logits = task.class_logits(outputs, batch, 1)[0]
        out += (logits.argmax(-1) == batch.targets["label"]).int().tolist()
    return "".join(map(str, out))


def run_demo(job: Job, workdir: Path) -> dict:
    """Train, evaluating the held-out set ``evals`` times; then validation metrics and per-example
    held-out correctness of the final model."""
    cost = cost_schedule(job, 300, 16)
    steps = len(cost)
    tr = _demo_trainer(job, workdir, steps)
    every = max(1, steps // job.evals)
    curve, times = [], []
    for t in range(steps):
        times.append(tr.step(t)["step_time_s"])
        if (t + 1) % every == 0 or t + 1 == steps:
            tr.engine.flush()
            ev = tr.task.evaluate(tr.model, tr.evals, 32)
            curve.append((cost[t], ev["accuracy"], ev["loss"]))
    tr.engine.flush()
    _, val, held = demo_splits()
    ev_val = tr.task.evaluate(tr.model, val, 32)
    correct = _correct(tr.task, tr.model, held)
    tr.engine.close()
    return {"steps": steps, "forwards": cost[-1], "curve": curve, "final_accuracy": curve[-1][1],
            "final_loss": curve[-1][2], "val_loss": ev_val["loss"], "val_accuracy": ev_val["accuracy"],
            "correct": correct, "step_time_s": statistics.median(times)}


def demo_zero_shot(workdir: Path) -> dict:
    """The untrained model's held-out and validation metrics (step 0 of every demo curve)."""
    tr = _demo_trainer(Job("demo", "mezo-sgd", 0.0, 0, 2, 1), workdir, 1)
    _, val, held = demo_splits()
    ev, ev_val = tr.task.evaluate(tr.model, held, 32), tr.task.evaluate(tr.model, val, 32)
    tr.engine.close()
    return {"final_accuracy": ev["accuracy"], "final_loss": ev["loss"], "val_accuracy": ev_val["accuracy"],
            "val_loss": ev_val["loss"], "correct": _correct(tr.task, tr.model, held)}


# -- the tiny causal-LM task ----------------------------------------------------------------------
def bigram_data(n: int, seed: int, successors: int) -> torch.Tensor:
    """(n, T) token sequences of a fixed random bigram chain; each token's next token is uniform
    over the first ``successors`` of its 8 fixed successors (the same table for every split)."""
    g = torch.Generator().manual_seed(1234)
    succ = torch.randint(3, V, (V, 8), generator=g)
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, T, dtype=torch.long)
    x[:, 0] = torch.randint(3, V, (n,), generator=g)
    for t in range(1, T):
        x[:, t] = succ[x[:, t - 1], torch.randint(0, successors, (n,), generator=g)]
    return x


class _NLL:
    """Engine objective: mean next-token NLL per probe, shape (P,)."""

    def forward(self, model, batch):
        return model(input_ids=batch.inputs["input_ids"]).logits

    def loss(self, logits, batch, num_probes):
        ids = batch.inputs["input_ids"]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        return nll.reshape(num_probes, -1).mean(1)


@functools.cache
def pretrained_lm() -> dict[str, torch.Tensor]:
    """State dict of the tiny Llama after ``LM_PRETRAIN`` first-order Adam steps on the 8-successor
    language (seeded; computed once per process)."""
    model = _lm_model()
    data = bigram_data(LM_PRETRAIN["sequences"], 7, 8)
    opt = torch.optim.Adam(model.parameters(), LM_PRETRAIN["lr"])
    g = torch.Generator().manual_seed(0)
    obj = _NLL()
    from zoft.tasks.base import Batch

    for _ in range(LM_PRETRAIN["steps"]):
        ids = data[torch.randint(0, len(data), (LM_PRETRAIN["batch_size"],), generator=g)]
        b = Batch({"input_ids": ids}, {}, len(ids))
        loss = obj.loss(obj.forward(model, b), b, 1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _lm_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=64, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same initial weights in every process
        return AutoModelForCausalLM.from_config(cfg)


def run_lm(job: Job, workdir: Path | None = None, batch_size: int = 16, step_times: list | None = None) -> dict:
    from zoft.engine import ZOEngine
    from zoft.optim import step as zo_step
    from zoft.tasks.base import Batch
    from zoft.train import batch_indices

    train, val, held = bigram_data(2048, 1, 4), bigram_data(256, 98, 4), bigram_data(256, 99, 4)
    cost = cost_schedule(job, len(train), batch_size)
    steps = len(cost)
    model = _lm_model()
    model.load_state_dict(pretrained_lm())
    model.eval()
    obj = _NLL()
    opt = make_optimizer(job.optimizer, {"lr": job.lr, "eps": EPS["lm"], **job.options()}, seed=job.seed,
                         total_steps=steps)

    def nll(x: torch.Tensor) -> float:
        with torch.no_grad():
            b = Batch({"input_ids": x}, {}, len(x))
            return obj.loss(obj.forward(model, b), b, 1).item()

    every = max(1, steps // job.evals)
    curve, times = [(0, None, nll(held))], []
    engine = ZOEngine(model)
    for t in range(steps):
        big = getattr(opt, "anchor_examples", None)  # MeZO-SVRG's anchor step: a large batch in pieces
        big = big(t, len(train)) if big is not None else None
        if big is None:
            batch = Batch({"input_ids": train[batch_indices(len(train), batch_size, t, job.seed)]}, {}, batch_size)
        else:
            batch = [Batch({"input_ids": train[big[j:j + batch_size]]}, {}, len(big[j:j + batch_size]))
                     for j in range(0, len(big), batch_size)]
        t0 = time.perf_counter()
        zo_step(engine, opt, batch, obj, t)
        times.append(time.perf_counter() - t0)
        if (t + 1) % every == 0 or t + 1 == steps:
            engine.flush()
            curve.append((cost[t], None, nll(held)))
    engine.flush()
    if step_times is not None:
        step_times += times
    val_loss = nll(val)
    engine.close()
    return {"steps": steps, "forwards": cost[-1], "curve": curve, "final_loss": curve[-1][2],
            "val_loss": val_loss, "step_time_s": statistics.median(times)}


PROBLEMS = {"demo": run_demo, "lm": run_lm}


# -- the cache ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    with open(Path(tempfile.gettempdir()) / f"zoft-zoo-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"runs": {}, "timing": {}}


def save_result(path: Path, section: str, key: str, value) -> None:
    """Merge one entry into the results file (locked: concurrent invocations may share it)."""
    with _locked(path):
        res = load_results(path)
        res.setdefault(section, {})[key] = value
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=0, sort_keys=True))
        os.replace(tmp, path)


def _execute(job: Job | str, threads: int) -> tuple[str, dict]:
    """Run one job (or ``"demo-zero-shot"``) in this process; returns (cache key, record)."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if job == "demo-zero-shot":
            key, rec = zero_shot_key(), demo_zero_shot(Path(tmp))
        else:
            key, rec = job.key(), PROBLEMS[job.problem](job, Path(tmp))
    rec.update(wall_s=time.perf_counter() - t0, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               torch=torch.__version__)
    return key, rec


def zero_shot_key() -> str:
    return f"demo|zero-shot|{Job('demo', 'mezo-sgd', 0.0, 0, 0, 0).key().rsplit('|', 1)[1]}"


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def sweep(runs: dict, problem: str, method: str, budget: int, evals: int) -> tuple[float | None, list[float], bool]:
    """The sweep's state: (pick, rates still to run, pick at an end). The pick is the swept rate
    whose seed-0 run has the lowest validation loss; the sweep starts at ``GRID`` x the centre and,
    while the best is at an end, adds the rate x3 past that end (``EXTEND`` times at most per
    side). Pick None while a needed seed-0 run is missing (listed); "at an end" is True only when
    the extensions ran out with the best still at the end (the best may lie further out)."""
    factors = list(GRID)
    while True:
        grid = [LR[problem][method] * f for f in factors]
        vals = [runs.get(Job(problem, method, lr, 0, budget, evals).key()) for lr in grid]
        missing = [lr for lr, v in zip(grid, vals) if v is None]
        if missing:
            return None, missing, False
        best = min(range(len(grid)), key=lambda i: _finite(vals[i]["val_loss"]))
        if best == 0 and factors[0] > GRID[0] / 3 ** EXTEND * (1 + 1e-9):
            factors.insert(0, factors[0] / 3)
        elif best == len(grid) - 1 and factors[-1] < GRID[-1] * 3 ** EXTEND * (1 - 1e-9):
            factors.append(factors[-1] * 3)
        else:
            return grid[best], [], best in (0, len(grid) - 1)


def chosen_lr(runs: dict, problem: str, method: str, budget: int, evals: int) -> float | None:
    """The sweep's pick (``sweep``), None while it is incomplete."""
    return sweep(runs, problem, method, budget, evals)[0]


def run(problems: list[str], methods: list[str], seeds: list[int], budgets: dict, evals: dict, path: Path,
        threads: int = 1, workers: int = 1) -> None:
    """Per method, in the given order: its sweep (seed 0 at every grid rate), then, once that is
    complete, its other seeds at the chosen rate, ahead of later methods' sweeps (methods complete
    in order). ``workers`` processes at a time; cached runs are skipped; each result is cached as
    it comes; a failing run is reported and not cached."""
    queue: list = ["demo-zero-shot"] if "demo" in problems else []
    queue += [Job(p, m, LR[p][m] * f, 0, budgets[p], evals[p]) for m in methods for p in problems
              if m not in SKIP.get(p, {}) for f in GRID]
    ready: list[Job] = []  # finals of complete sweeps: before any further sweep
    scheduled = {j.key() for j in queue if j != "demo-zero-shot"}  # sweep runs ever queued
    expanded: set[tuple[str, str]] = set()
    counts = {"computed": 0, "cached": 0, "failed": 0}

    def key(j) -> str:
        return zero_shot_key() if j == "demo-zero-shot" else j.key()

    def after(j) -> None:  # a sweep run is in the cache: are the method's finals due?
        if j == "demo-zero-shot" or j.seed != 0 or (j.problem, j.method) in expanded:
            return
        lr, more, _ = sweep(load_results(path)["runs"], j.problem, j.method, j.budget, j.evals)
        if lr is not None:
            expanded.add((j.problem, j.method))
            ready.extend(Job(j.problem, j.method, lr, s, j.budget, j.evals) for s in seeds if s != 0)
        else:  # rates still to run: grid runs already queued, or the rate past an end the best sits at
            # (queued once, even while a sibling run is in flight)
            for x in more:
                nxt = Job(j.problem, j.method, x, 0, j.budget, j.evals)
                if nxt.key() not in scheduled:
                    scheduled.add(nxt.key())
                    ready.append(nxt)

    def next_job():
        while ready or queue:
            j = ready.pop(0) if ready else queue.pop(0)
            if key(j) not in load_results(path)["runs"]:
                return j
            counts["cached"] += 1
            after(j)
        return None

    def finish(j, result) -> None:
        try:
            k, rec = result()
        except Exception as e:  # one failing method must not lose the others' runs
            counts["failed"] += 1
            print(f"  {j}: FAILED: {type(e).__name__}: {e}", flush=True)
            return
        save_result(path, "runs", k, rec)
        counts["computed"] += 1
        tail = f"final {rec['curve'][-1]}, val loss {rec['val_loss']:.4f}" if "curve" in rec else "zero-shot"
        print(f"  {k}: {tail} ({rec['wall_s']:.0f} s)", flush=True)
        after(j)

    if workers <= 1:
        while (j := next_job()) is not None:
            finish(j, functools.partial(_execute, j, threads))
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            flying: dict = {}
            while True:
                while len(flying) < workers and (j := next_job()) is not None:
                    flying[pool.submit(_execute, j, threads)] = j
                if not flying:
                    break
                done, _ = concurrent.futures.wait(flying, return_when=concurrent.futures.FIRST_COMPLETED)
                for fut in done:
                    finish(flying.pop(fut), fut.result)
    print(f"computed {counts['computed']} run(s), {counts['cached']} cached, {counts['failed']} failed", flush=True)


# -- step time, one process -----------------------------------------------------------------------
def time_steps(problems: list[str], methods: list[str], path: Path, steps: int = 4, threads: int = 1) -> None:
    """Mean s/step of each method and of mezo-sgd, measured in this one process (two rounds, the
    second in reverse order; two warm-up steps first; even counts, so MeZO-SVRG's anchor and
    minibatch steps are balanced); cached per (problem, method) as the ratio to mezo-sgd's."""
    torch.set_num_threads(threads)
    for problem in problems:
        ms = ["mezo-sgd"] + [m for m in methods if m not in SKIP.get(problem, {}) and m != "mezo-sgd"]
        times: dict[str, list[float]] = {m: [] for m in ms}
        for order in (ms, ms[::-1]):
            for m in order:
                job = Job(problem, m, LR[problem][m], 0, 0, 1)
                n_train = 300 if problem == "demo" else 2048
                opt = make_optimizer(job.optimizer, job.options(), 0, 1)
                job = job._replace(budget=sum(step_forwards(opt, t, n_train, 16) for t in range(steps + 2)))
                with tempfile.TemporaryDirectory() as tmp:
                    if problem == "demo":
                        tr = _demo_trainer(job, Path(tmp), steps + 2)
                        times[m] += [tr.step(t)["step_time_s"] for t in range(steps + 2)][2:]
                        tr.engine.close()
                    else:
                        run_lm(job, step_times=times[m])
                        del times[m][-steps - 2:-steps]  # the warm-up steps
        ref = statistics.mean(times["mezo-sgd"])
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        for m, v in times.items():
            save_result(path, "timing", f"{problem}|{m}", {"ratio": statistics.mean(v) / ref, "s_per_step": statistics.mean(v),
                                                             "date": date, "load": os.getloadavg()[0], "threads": threads})
        print(f"timing {problem} (s/step): " + ", ".join(f"{m} {statistics.mean(v):.3f}" for m, v in times.items()),
              flush=True)


# -- report ---------------------------------------------------------------------------------------
def mean_sd(xs: list[float], digits: int = 4) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} +- {statistics.stdev(xs):.{digits}f}"


def collect(runs: dict, problem: str, methods: list[str], seeds: list[int], budget: int, evals: int) -> dict:
    """{method: {"lr": chosen, "seeds": {seed: record}}} of the cached final runs (complete methods only)."""
    out = {}
    for m in methods:
        lr, _, edge = sweep(runs, problem, m, budget, evals)
        recs = {s: runs.get(Job(problem, m, lr, s, budget, evals).key()) for s in seeds} if lr is not None else {}
        if recs and all(recs.values()):
            out[m] = {"lr": lr, "edge": edge, "seeds": recs}
    return out


def winners(done: dict, min_points: float = 3.0, alpha: float = 0.05) -> list[str]:
    """Demo methods that beat MeZO-SGD: mean held-out gain >= ``min_points`` and exact McNemar
    p < ``alpha`` against MeZO-SGD's model of the same seed, on *every* seed (each seed a replicate;
    requiring all keeps the overall level at ``alpha``, an intersection-union test)."""
    ref = done.get("mezo-sgd")
    if ref is None:
        return []
    out = []
    for m, d in done.items():
        if m == "mezo-sgd":
            continue
        gain = statistics.mean(100 * (d["seeds"][s]["final_accuracy"] - ref["seeds"][s]["final_accuracy"])
                               for s in d["seeds"])
        ps = [mcnemar_exact(*discordant(d["seeds"][s]["correct"], ref["seeds"][s]["correct"])) for s in d["seeds"]]
        if gain >= min_points and max(ps) < alpha:
            out.append(m)
    return out


def _lr_cell(d: dict) -> str:
    """The chosen rate, starred when it is still at an end of the extended sweep (the best may lie
    outside it)."""
    return f"{d['lr']:.3g}{'*' if d['edge'] else ''}"


def table(results: dict, timing: dict, zero_shot: dict | None, methods: list[str]) -> str:
    lines = []
    for problem, done in results.items():
        tm = {k.split("|", 1)[1]: v["ratio"] for k, v in timing.items() if k.startswith(f"{problem}|")}
        if problem == "demo":
            if zero_shot:
                lines.append(f"zero-shot: accuracy {100 * zero_shot['final_accuracy']:.1f}%, loss "
                             f"{zero_shot['final_loss']:.4f}\n")
            lines += ["| method | lr (swept) | steps | held-out accuracy % | held-out loss | vs mezo-sgd: points, "
                      "McNemar b/c p per seed | state B/param | step time x mezo-sgd |",
                      "|---|---:|---:|---:|---:|---|---:|---:|"]
        else:
            start = next(iter(next(iter(done.values()))["seeds"].values()))["curve"][0][2] if done else None
            if start is not None:
                lines.append(f"pretrained start: held-out NLL {start:.4f}\n")
            lines += ["| method | lr (swept) | steps | held-out NLL | state B/param | step time x mezo-sgd |",
                      "|---|---:|---:|---:|---:|---:|"]
        ref = done.get("mezo-sgd")
        for name, d in done.items():
            recs = d["seeds"]
            mem = describe(Job(problem, name, 0, 0, 0, 0).optimizer)["state_bytes_per_param"]
            st = f"{tm[name]:.2f}" if name in tm else "n/a"
            steps = next(iter(recs.values()))["steps"]
            if problem == "demo":
                acc = mean_sd([100 * r["final_accuracy"] for r in recs.values()], 1)
                loss = mean_sd([r["final_loss"] for r in recs.values()])
                sig = ""
                if name != "mezo-sgd" and ref is not None:
                    gain = statistics.mean(100 * (recs[s]["final_accuracy"] - ref["seeds"][s]["final_accuracy"])
                                           for s in recs)
                    per_seed = []
                    for s in recs:
                        b, c = discordant(recs[s]["correct"], ref["seeds"][s]["correct"])
                        per_seed.append(f"{b}/{c} {mcnemar_exact(b, c):.2f}")
                    sig = f"{gain:+.1f}: " + "; ".join(per_seed)
                lines.append(f"| `{name}` | {_lr_cell(d)} | {steps} | {acc} | {loss} | {sig} | {mem} "
                             f"| {st} |")
            else:
                nll = mean_sd([r["final_loss"] for r in recs.values()])
                lines.append(f"| `{name}` | {_lr_cell(d)} | {steps} | {nll} | {mem} | {st} |")
        lines += [f"`{m}` not run: {why}" for m, why in SKIP.get(problem, {}).items() if m in methods]
        lines += [f"`{m}`: not complete in the cache" for m in methods if m not in done and m not in SKIP.get(problem, {})]
        lines += [f"`{m}` not run: {why}" for m, why in EXCLUDED.items()]
        lines.append(f"(* the chosen rate is at an end of the sweep, {EXTEND} x3 steps past the grid)\n")
    return "\n".join(lines)


def plot(results: dict, zero_shot: dict | None, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (problem, done) in zip(axes[0], results.items()):
        for i, (name, d) in enumerate(done.items()):
            curves = [r["curve"] for r in d["seeds"].values()]
            if problem == "demo":
                pts = [(0, 100 * zero_shot["final_accuracy"])] if zero_shot else []
                pts += [(c[0], 100 * statistics.mean(cv[k][1] for cv in curves)) for k, c in enumerate(curves[0])]
            else:
                pts = [(c[0], statistics.mean(cv[k][2] for cv in curves)) for k, c in enumerate(curves[0])]
            ax.plot(*zip(*pts), marker="o", ms=3, label=name, color=plt.cm.tab20(i % 20),
                    linewidth=2.5 if name == "mezo-sgd" else 1.2)
        ax.set_xlabel("forward passes")
        ax.set_ylabel("held-out accuracy (%), mean over seeds" if problem == "demo" else "held-out NLL, mean over seeds")
        ax.set_title(f"{problem}: {title}")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="demo,lm")
    ap.add_argument("--methods", default="all", help="comma-separated registry names, or all")
    ap.add_argument("--seeds", default="0,1,2", help="seed 0 is the sweep's; it must be included")
    ap.add_argument("--budget", type=int, help="forward passes per run (default: demo 300, lm 2000)")
    ap.add_argument("--evals", type=int, help="held-out evaluations per run (default: demo 3, lm 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--jobs", type=int, default=1, help="runs computed in parallel processes")
    ap.add_argument("--results", default=str(RESULTS), help="the cache (JSON), read and extended")
    ap.add_argument("--timing", action="store_true",
                    help="no runs: measure the methods' step times (and mezo-sgd's) in this process, then the tables")
    ap.add_argument("--report", action="store_true", help="compute nothing: tables of what is cached")
    ap.add_argument("--plot", help="write the held-out metric vs forward passes plot here (PNG)")
    args = ap.parse_args(argv)
    methods = ([m for m in [*OPTIMIZERS, *VARIANTS] if m not in EXCLUDED] if args.methods == "all"
               else args.methods.split(","))
    problems = args.problems.split(",")
    bad = [m for m in methods if m not in OPTIMIZERS and m not in VARIANTS] + [p for p in problems if p not in PROBLEMS]
    seeds = [int(s) for s in args.seeds.split(",")]
    if bad:
        ap.error(f"unknown method(s) or problem(s) {bad}; zoft optimizers lists the methods, problems: demo, lm")
    if 0 not in seeds:
        ap.error("--seeds must include 0 (the learning-rate sweep's seed)")
    missing = [m for p in problems for m in methods if m not in LR[p]]
    if missing:
        ap.error(f"no learning-rate centre for {sorted(set(missing))} in bench/zoo.py LR; add one")
    budgets = {p: args.budget or BUDGET[p] for p in problems}
    evals = {p: args.evals or EVALS[p] for p in problems}
    path = Path(args.results)
    if args.timing:
        time_steps(problems, methods, path, threads=args.threads)
    elif not args.report:
        run(problems, methods, seeds, budgets, evals, path, args.threads, args.jobs)
    res = load_results(path)
    results = {p: collect(res["runs"], p, methods, seeds, budgets[p], evals[p]) for p in problems}
    zero_shot = res["runs"].get(zero_shot_key())
    dates = sorted(r["date"] for r in res["runs"].values())
    title = f"runs {dates[0][:10]} to {dates[-1][:10]}" if dates else ""
    print(f"{title}; budgets {budgets} forward passes; seeds {seeds}; lr grid {GRID} x centre, extended "
          f"x3 past an end (at most {EXTEND} times per side) while the best rate is there\n")
    print(table(results, res.get("timing", {}), zero_shot, methods))
    if "demo" in results:
        wins = winners(results["demo"])
        print("beats mezo-sgd on the demo (>= 3 points, McNemar p < 0.05 on every seed):", ", ".join(wins) or "none")
    if args.plot:
        plot(results, zero_shot, args.plot, title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
