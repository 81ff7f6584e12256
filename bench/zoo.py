"""Every registered ZO optimizer at the same number of forward passes, several seeds, one run.

Two problems:

* ``demo``: the embedded MiniLM demo (``configs/demo.yaml``: pretrained all-MiniLM-L6-v2, built-in
  sentiment set, BitFit parameters), run through ``zoft.finetune`` exactly as ``zoft finetune``
  does; held-out accuracy and loss on the 200 held-out examples, and a paired exact McNemar test of
  each method's final predictions against MeZO-SGD's (same seed).
* ``lm``: a random-weight tiny Llama (vocabulary 320, 2 layers, ~39k parameters) learning a fixed
  random sparse bigram language (each token has 4 possible successors); held-out token NLL.

Every method gets the same forward-pass budget ``--budget``: steps = budget // (forwards per step).
Learning rates are per method and per problem (``LR`` below, chosen by the rule stated there, not
swept); all other options are the method's registry defaults (``zoft optimizers``).

    PYTHONPATH=. python bench/zoo.py [--problems demo,lm] [--methods all] [--seeds 0,1]
        [--budget 400] [--evals 4] [--json zoo.json] [--plot docs/zoo.png]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from zoft.optim import OPTIMIZERS, describe, make_optimizer

ROOT = Path(__file__).resolve().parents[1]

# Learning rates. demo: MeZO-SGD keeps the demo recipe's 2e-3; LOZO / SubZero directions have
# MeZO's expected norm (E||Z||^2 = m n), so they take the same; scale-free updates (sign, Adam,
# R-AdaZO, RankSGD, FZOO: a step of about lr per coordinate) take 1e-4 (the recipe's typical per-coordinate
# MeZO step); momentum takes lr (1 - momentum). lm: MeZO-SGD 1e-3 (1e-2 diverged in a first run: held-out
# NLL 6.5 from 5.77), the same rules, scale-free updates 1e-3 except R-AdaZO (1e-4: 1e-3 diverged).
LR = {
    "demo": {"mezo-sgd": 2e-3, "lozo": 2e-3, "subzero": 2e-3, "zo-sgd-cons": 2e-3, "zo-sgd-mmt": 2e-4,
             "zo-sgd-sign": 1e-4, "zo-adam": 1e-4, "r-adazo": 1e-4, "zo-ranksgd": 1e-4, "fzoo": 1e-4},
    "lm": {"mezo-sgd": 1e-3, "lozo": 1e-3, "subzero": 1e-3, "zo-sgd-cons": 1e-3, "zo-sgd-mmt": 1e-4,
           "zo-sgd-sign": 1e-3, "zo-adam": 1e-3, "r-adazo": 1e-4, "zo-ranksgd": 1e-3, "fzoo": 1e-3},
}
EPS = {"demo": 1e-3, "lm": 1e-2}
# per-method option overrides for short runs: the lazy factors are refreshed within the budget
OPTIONS = {"lozo": {"interval": 50}, "subzero": {"interval": 50}}


def forwards_per_step(name: str, options: dict) -> int:
    """Forward passes one step costs (the second phase of zo-sgd-cons included)."""
    opt = make_optimizer(name, options, seed=0, total_steps=1)
    return opt.num_probes() + (2 if name == "zo-sgd-cons" else 0)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b, c (binomial, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


# -- the demo task --------------------------------------------------------------------------------
def run_demo(name: str, seed: int, budget: int, evals: int, workdir: Path) -> dict:
    from zoft import TrainConfig, finetune
    from zoft.config import load_config_file
    from zoft.tasks import builtin_sentiment
    from zoft.tasks.lm import eval_outputs

    options = dict(OPTIONS.get(name, {}))
    per = forwards_per_step(name, {"n_queries": 1, **options})
    steps = budget // per
    cfg = load_config_file(str(ROOT / "configs" / "demo.yaml"))
    cfg.update(optimizer=name, lr=LR["demo"][name], eps=EPS["demo"], steps=steps, seed=seed,
               eval_every=max(1, steps // evals), save_every=0, output_dir=str(workdir / f"demo-{name}-{seed}"),
               optimizer_options=options, progress=False)
    t0 = time.perf_counter()
    res = finetune(TrainConfig.from_dict(cfg))
    wall = time.perf_counter() - t0
    from zoft.tasks import make_task  # per-example predictions of the final model (for McNemar)

    task = make_task("sst2", res.tokenizer, "encoder", cfg["max_length"])
    examples = list(builtin_sentiment("eval"))
    correct: list[int] = []
    for batch, outputs in eval_outputs(task, res.model, examples, 32):
        logits = task.class_logits(outputs, batch, 1)[0]
        correct += (logits.argmax(-1) == batch.targets["label"]).int().tolist()
    curve = [(m["step"] * per, m["eval_accuracy"], m["eval_loss"]) for m in res.metrics if "eval_accuracy" in m]
    times = [m["step_time_s"] for m in res.metrics if "step_time_s" in m]
    return {"steps": steps, "forwards_per_step": per, "curve": curve, "final_accuracy": curve[-1][1],
            "final_loss": curve[-1][2], "correct": correct, "step_time_s": statistics.median(times),
            "wall_s": wall}


# -- the tiny causal-LM task ----------------------------------------------------------------------
V, T = 320, 16


def bigram_data(n: int, seed: int) -> torch.Tensor:
    """(n, T) token sequences of a fixed random sparse bigram chain (4 successors per token)."""
    g = torch.Generator().manual_seed(1234)  # the language is the same for every seed and split
    succ = torch.randint(3, V, (V, 4), generator=g)
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, T, dtype=torch.long)
    x[:, 0] = torch.randint(3, V, (n,), generator=g)
    for t in range(1, T):
        x[:, t] = succ[x[:, t - 1], torch.randint(0, 4, (n,), generator=g)]
    return x


class _NLL:
    """Engine objective: mean next-token NLL per probe, shape (P,)."""

    def forward(self, model, batch):
        return model(input_ids=batch.inputs["input_ids"]).logits

    def loss(self, logits, batch, num_probes):
        ids = batch.inputs["input_ids"]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        return nll.reshape(num_probes, -1).mean(1)


def run_lm(name: str, seed: int, budget: int, evals: int, batch_size: int = 16) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from zoft.engine import ZOEngine
    from zoft.optim import step as zo_step
    from zoft.tasks.base import Batch

    options = dict(OPTIONS.get(name, {}))
    per = forwards_per_step(name, {"n_queries": 1, **options})
    steps = budget // per
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=64, use_cache=False)
    torch.manual_seed(0)  # the same initial model for every method and seed
    model = AutoModelForCausalLM.from_config(cfg).eval()
    train, held = bigram_data(2048, 1 + seed), bigram_data(256, 99)
    obj = _NLL()
    opt = make_optimizer(name, {"lr": LR["lm"][name], "eps": EPS["lm"], **options}, seed=seed, total_steps=steps)

    def held_out() -> float:
        with torch.no_grad():
            b = Batch({"input_ids": held}, {}, len(held))
            return obj.loss(obj.forward(model, b), b, 1).item()

    every = max(1, steps // evals)
    curve, times = [(0, None, held_out())], []
    engine = ZOEngine(model)
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        ids = train[torch.randint(0, len(train), (batch_size,), generator=g)]
        t0 = time.perf_counter()
        zo_step(engine, opt, Batch({"input_ids": ids}, {}, batch_size), obj, t)
        times.append(time.perf_counter() - t0)
        if (t + 1) % every == 0 or t + 1 == steps:
            engine.flush()
            curve.append(((t + 1) * per, None, held_out()))
    engine.close()
    return {"steps": steps, "forwards_per_step": per, "curve": curve, "final_loss": curve[-1][2],
            "step_time_s": statistics.median(times)}


# -- report ---------------------------------------------------------------------------------------
def mean_sd(xs: list[float], digits: int = 4) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} +- {statistics.stdev(xs):.{digits}f}"


def table(results: dict) -> str:
    lines = []
    for problem, runs in results.items():
        if problem == "demo":
            lines += ["| demo (MiniLM, 200 held-out) | steps | accuracy | loss | McNemar vs mezo-sgd (pooled b/c, p) "
                      "| state B/param | s/step |", "|---|---:|---:|---:|---:|---:|---:|"]
        else:
            lines += ["| lm (tiny Llama, bigram) | steps | held-out NLL | state B/param | s/step |",
                      "|---|---:|---:|---:|---:|"]
        for name, per_seed in runs.items():
            mem = describe(name)["state_bytes_per_param"]
            st = statistics.median(r["step_time_s"] for r in per_seed.values())
            steps = next(iter(per_seed.values()))["steps"]
            if problem == "demo":
                acc = mean_sd([100 * r["final_accuracy"] for r in per_seed.values()], 1)
                loss = mean_sd([r["final_loss"] for r in per_seed.values()])
                sig = ""
                if name != "mezo-sgd" and "mezo-sgd" in runs:
                    b = c = 0  # b: this method right where MeZO-SGD is wrong; c: the reverse
                    for s in [s for s in per_seed if s in runs["mezo-sgd"]]:  # paired: same seed
                        for x, y in zip(per_seed[s]["correct"], runs["mezo-sgd"][s]["correct"]):
                            b += x and not y
                            c += y and not x
                    sig = f"{b}/{c}, p = {mcnemar_exact(b, c):.3f}"
                lines.append(f"| `{name}` | {steps} | {acc} | {loss} | {sig} | {mem} | {st:.3f} |")
            else:
                nll = mean_sd([r["final_loss"] for r in per_seed.values()])
                lines.append(f"| `{name}` | {steps} | {nll} | {mem} | {st:.4f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (problem, runs) in zip(axes[0], results.items()):
        for name, per_seed in runs.items():
            curves = [r["curve"] for r in per_seed.values()]
            xs = [p[0] for p in curves[0]]
            col = 1 if problem == "demo" else 2
            ys = [statistics.mean(c[i][col] for c in curves) for i in range(len(xs))]
            ax.plot(xs, [100 * y for y in ys] if problem == "demo" else ys, marker="o", label=name)
        ax.set_xlabel("forward passes")
        ax.set_ylabel("held-out accuracy (%)" if problem == "demo" else "held-out NLL")
        ax.set_title(problem)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="demo,lm")
    ap.add_argument("--methods", default="all", help="comma-separated registry names, or all")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--budget", type=int, default=400, help="forward passes per run")
    ap.add_argument("--evals", type=int, default=4, help="held-out evaluations per run (plus step 0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--plot", help="write the held-out metric vs forward passes plot here")
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="no runs: print the table (and --plot) of earlier --json files, merged")
    args = ap.parse_args(argv)
    if args.report:
        results = {}
        for f in args.report:
            for problem, runs in json.loads(Path(f).read_text()).items():
                results.setdefault(problem, {}).update(runs)
        print(table(results))
        if args.plot:
            plot(results, args.plot)
        return 0
    torch.set_num_threads(args.threads)
    methods = list(OPTIMIZERS) if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m not in OPTIMIZERS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; zoft optimizers lists them")
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for problem in args.problems.split(","):
            results[problem] = {}
            for name in methods:
                results[problem][name] = {}
                for seed in seeds:
                    r = (run_demo(name, seed, args.budget, args.evals, Path(tmp)) if problem == "demo"
                         else run_lm(name, seed, args.budget, args.evals))
                    results[problem][name][seed] = r
                    print(f"{problem} {name} seed {seed}: final {r['curve'][-1]} ({r['steps']} steps, "
                          f"{r['step_time_s']:.3f} s/step)", flush=True)
                    if args.json:
                        Path(args.json).write_text(json.dumps(results))
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, budget {args.budget} forward passes, "
          f"seeds {seeds}\n")
    print(table(results))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
