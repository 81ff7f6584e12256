"""DeepZero at toy scale: a small CNN trained from scratch on scikit-learn's bundled digits
(offline), first-order SGD against zeroth-order methods at equal forward passes::

    PYTHONPATH=. nice -n 10 python bench/deepzero_digits.py --out docs      # table + deepzero_digits.png
    PYTHONPATH=. python bench/deepzero_digits.py --quick --out /tmp/dz      # smoke run (seconds)

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, pixel values / 16), a fixed 80/20 split
(seeded permutation): 1437 train, 360 held out. Model: conv 1->8 (3x3), relu, maxpool 2,
conv 8->16 (3x3), relu, maxpool 2, linear 64->10 (1898 parameters), fp32, PyTorch's default init
drawn from ``--seed``. Every method trains the same initial model on the same sequence of batches
of 64 (one seeded permutation per epoch) and is stopped when it has spent ``--budget`` forward
passes; held-out accuracy is measured at 25 log-spaced points along the way.

Methods (each through ``zoft.optim.step`` on a ``ZOEngine``, except first-order SGD):

- ``fo-sgd``: torch SGD, lr 0.1, momentum 0.9 (one forward and one backward per step; the
  backward is not counted as forward passes: ~2 forwards of compute);
- ``mezo-sgd``: random Gaussian directions, two-sided, one direction per step (MeZO-SGD, no
  momentum, as published), eps 1e-3, lr 1e-3 (every ZO lr is the best of a small sweep at this
  budget, ``docs/deepzero.md``);
- ``zo-sgd-mmt``: the same random directions with momentum 0.9, lr 1e-4 (separates the estimator
  from CGE's momentum);
- ``cge``: DeepZero's CGE over all 1898 coordinates (one-sided, mu 5e-3, momentum 0.9, weight
  decay 5e-4, feature reuse: DeepZero's defaults; lr 0.3, DeepZero's 0.1 gave less): 1899 forward
  passes per step;
- ``sparse-cge``: DeepZero's protocol at sparsity 0.9: ZO-GraSP scores at initialisation (25
  training images per class, q 192, mu 5e-3) give the layer-wise sparsity ratios; each step
  estimates and updates a random mask with those ratios per layer (biases dense), re-drawn every 5
  epochs, lr 0.3; ZO-GraSP's 2 x 193 forward passes of 250 images count as 1508 passes of 64;
- ``sparse-cge-fixed``: the ZO-GraSP global mask itself, fixed, lr 0.3;
- ``mezo-sgd-grasp``: MeZO-SGD's random directions restricted to that fixed ZO-GraSP mask through
  the ZO-SGD family's perturbation mask (``set_mask``: the mask an LLM optimizer would take),
  lr 1e-2.

A forward pass is one batch of 64 through the model (CGE with feature reuse runs the layers
before the perturbed one once per phase: its FLOPs per pass are lower, reported separately).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from zoft.engine.core import ZOEngine
from zoft.optim import make_optimizer, step
from zoft.optim.cge import CGE, CGEConfig
from zoft.optim.zo_grasp import LayerwiseRandomMask, global_mask, layer_ratios, prunable_keys, zo_grasp_scores
from zoft.tasks.tensor import TensorClassify, tensor_batch

METHODS = ["fo-sgd", "mezo-sgd", "zo-sgd-mmt", "cge", "sparse-cge", "sparse-cge-fixed", "mezo-sgd-grasp"]
OBJ = TensorClassify()
BATCH = 64


def load(seed: int):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = 360
    return (x[perm[n_test:]], y[perm[n_test:]]), (x[perm[:n_test]], y[perm[:n_test]])


def make_model(seed: int) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(64, 10))


def batches(train, seed: int):
    """An endless stream of batches: one seeded permutation per epoch (the same for every method)."""
    x, y = train
    epoch = 0
    while True:
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for lo in range(0, len(y) - BATCH + 1, BATCH):
            idx = perm[lo:lo + BATCH]
            yield tensor_batch(x[idx], y[idx])
        epoch += 1


def per_class(train, k: int):
    x, y = train
    idx = torch.cat([torch.nonzero(y == c).reshape(-1)[:k] for c in range(10)])
    return tensor_batch(x[idx], y[idx])


def steps_per_epoch(train) -> int:
    return len(train[1]) // BATCH


def run(method: str, args, train, test) -> dict:
    model = make_model(args.seed)
    test_batch = tensor_batch(*test)
    # log-spaced from 10 passes to the budget: first-order SGD's early steps show on the same axis
    marks = sorted({round(10 * (args.budget / 10) ** (i / (args.points - 1))) for i in range(args.points)})
    curve: list[tuple[int, float]] = [(0, OBJ.accuracy(model, test_batch))]
    stream = batches(train, args.seed)
    used, t0, info = 0, time.time(), {}
    if method == "fo-sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr.get(method, 0.1), momentum=0.9)
        t = 0
        while used < args.budget and t < args.fo_steps:
            batch = next(stream)
            opt.zero_grad()
            OBJ.fo_loss(model, batch).backward()
            opt.step()
            used, t = used + 1, t + 1
            while marks and used >= marks[0]:
                curve.append((used, OBJ.accuracy(model, test_batch)))
                marks.pop(0)
        if marks:  # stopped by --fo-steps: the last point where it stopped
            curve.append((used, OBJ.accuracy(model, test_batch)))
        return {"curve": curve, "steps": t, "seconds": time.time() - t0, "queries_per_step": 1}
    eng = ZOEngine(model)
    gmask = None
    if "sparse" in method or "grasp" in method:
        ref = per_class(train, 25)
        scores = zo_grasp_scores(eng, ref, OBJ, queries=args.grasp_queries, eps=5e-3, seed=args.seed)
        gmask = global_mask(scores, args.sparsity)
        used = math.ceil(2 * (args.grasp_queries + 1) * len(ref.targets["y"]) / BATCH)
        info = {"layer_ratios": layer_ratios(gmask), "grasp_passes": used}
    if method.startswith(("mezo-sgd", "zo-sgd-mmt")):
        name = "zo-sgd-mmt" if method == "zo-sgd-mmt" else "mezo-sgd"
        opts = {"lr": args.lr.get(method, 1e-3), "eps": 1e-3, **({"momentum": 0.9} if name == "zo-sgd-mmt" else {})}
        opt = make_optimizer(name, opts, seed=args.seed, total_steps=1)
        if gmask is not None:
            opt.set_mask(gmask)
    else:
        mask = gmask
        if method == "sparse-cge":
            shapes = {k: eng.params[k].shape for k in prunable_keys(model)}
            mask = LayerwiseRandomMask(info["layer_ratios"], shapes, seed=args.seed,
                                       interval=5 * steps_per_epoch(train))
        opt = CGE(CGEConfig(lr=args.lr.get(method, 0.1)), mask=mask)
    t = 0
    while used < args.budget:
        batch = next(stream)
        res = step(eng, opt, batch, OBJ, t)
        used, t = used + len(res.losses), t + 1
        if marks and used >= marks[0]:
            eng.flush()
            acc = OBJ.accuracy(model, test_batch)
            while marks and used >= marks[0]:
                marks.pop(0)
            curve.append((used, acc))
    eng.flush()
    if curve[-1][0] != used:
        curve.append((used, OBJ.accuracy(model, test_batch)))
    eng.close()
    return {"curve": curve, "steps": t, "seconds": time.time() - t0,
            "queries_per_step": (used - info.get("grasp_passes", 0)) / max(t, 1), **info}


def flops_per_pass(train, seed: int) -> dict:
    """Measured FLOPs (torch's counter: convolutions and matmuls) per forward pass of one CGE
    step with and without feature reuse, and of a plain forward of one batch."""
    batch = next(batches(train, seed))
    out = {}
    model = make_model(seed)
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            model(batch.inputs["x"])
    out["forward"] = fc.get_total_flops()
    for reuse in (False, True):
        with ZOEngine(make_model(seed)) as eng:
            opt = CGE(CGEConfig(feature_reuse=reuse))
            with FlopCounterMode(display=False) as fc:
                res = step(eng, opt, batch, OBJ, 0)
            out["cge_reuse" if reuse else "cge_full"] = fc.get_total_flops() / len(res.losses)
    return out


def plot(results: dict, path: Path, budget: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in results.items():
        xs, ys = zip(*r["curve"])
        ax.plot([max(x, 1) for x in xs], [100 * y for y in ys], marker="o", ms=3, label=name)
    ax.set_xscale("log")
    ax.set_xlim(1, budget * 1.05)
    ax.set_xlabel("forward passes (batches of 64)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("digits CNN from scratch (1898 params): accuracy vs forward passes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: dict, flops: dict, budget: int) -> str:
    lines = ["| method | steps | passes / step | final acc (%) | best acc (%) | acc at 10% of budget (%) "
             "| passes to 50% | wall (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        accs = [a for _, a in r["curve"]]
        early = [a for q, a in r["curve"] if q <= budget / 10]
        half = next((q for q, a in r["curve"] if a >= 0.5), None)
        lines.append(f"| {name} | {r['steps']} | {r['queries_per_step']:.0f} | {100 * accs[-1]:.1f} | "
                     f"{100 * max(accs):.1f} | {100 * early[-1]:.1f} | {'-' if half is None else half} | "
                     f"{r['seconds']:.0f} |")
    lines.append("")
    lines.append(f"FLOPs per forward pass (torch.utils.flop_counter): plain forward {flops['forward']:,}; "
                 f"one CGE step without feature reuse {flops['cge_full']:,.0f}, with feature reuse "
                 f"{flops['cge_reuse']:,.0f} ({flops['cge_reuse'] / flops['cge_full']:.2f}x).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--budget", type=int, default=30000, help="forward passes per method")
    p.add_argument("--points", type=int, default=25)
    p.add_argument("--fo-steps", type=int, default=3000, help="first-order SGD stops here (converged)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--grasp-queries", type=int, default=192)
    p.add_argument("--lr", default="mezo-sgd=1e-3,zo-sgd-mmt=1e-4,mezo-sgd-grasp=1e-2,cge=0.3,sparse-cge=0.3,"
                   "sparse-cge-fixed=0.3", help="per method: name=lr,... (fo-sgd: 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny budget (smoke test)")
    p.add_argument("--out", type=Path, default=None, help="folder for deepzero_digits.{json,md,png}")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.lr = {k: float(v) for k, v in (kv.split("=") for kv in args.lr.split(",") if kv)}
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"zoft: error: unknown method(s) {unknown}; choose from {METHODS}", file=sys.stderr)
        return 2
    if args.quick:
        args.budget, args.points, args.grasp_queries, args.fo_steps = 600, 3, 4, 20
    train, test = load(args.seed)
    results = {}
    for m in methods:
        results[m] = run(m, args, train, test)
        r = results[m]
        print(f"{m}: {r['steps']} steps, acc {100 * r['curve'][-1][1]:.1f}% after {r['curve'][-1][0]} passes "
              f"({r['seconds']:.0f} s)", flush=True)
    flops = flops_per_pass(train, args.seed)
    text = table(results, flops, args.budget)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "deepzero_digits.json").write_text(json.dumps({"results": results, "flops": flops,
                                                                   "args": {k: v for k, v in vars(args).items()
                                                                            if k != "out"}}, indent=1))
        (args.out / "deepzero_digits.md").write_text(text + "\n")
        plot(results, args.out / "deepzero_digits.png", args.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
