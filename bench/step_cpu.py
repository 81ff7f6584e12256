"""CPU step time: zoft's MeZO-SGD step against a faithful reference of the published MeZO loop.

Same model (OPT-125M shape, random weights, fp32), same batch (8 x 64 random token ids), same
hyper-parameters, 2 threads, one process. Each repetition times, in a rotating order:

  reference     ``MeZOReference.step``: MeZO's ``zo_step`` + ``zo_update`` (Malladi et al. 2023,
                ``MeZO/large_models/trainer.py``), re-written here line for line;
  in-place      ``MeZOInPlace.step``: the same loop (4 seeded z draws per step) with in-place
                updates, the baseline zoft's default noise backend is held to;
  zoft[B]       ``ZOEngine.evaluate(opt.probes(step))`` + ``MeZOSGD.update`` + ``engine.set_update``
                with noise backend B (``--noise torch,table``: one model copy and engine each; the
                first backend listed is reported as plain ``zoft``);
  zoft[unit]    the same step with the first backend on the unit-granular engine
                (``ZOEngine(granularity="unit")``: a whole unit perturbed per probe call), the
                path parameter-granular perturbation (the default) is held to (<= 1.05x);
                zoft applies the previous step's update lazily inside the next forward, so every
                timed step is a steady-state one (the first, update-free step is the warm-up);
  forward-only  two plain forward passes of the batch: the physical floor of a two-sided ZO step.

Reports medians of wall-clock and of process CPU seconds (all threads; on a shared machine the
CPU seconds leave out time spent waiting for a core, and with ``--threads 1`` they are the work
figure: with 2 threads an OpenMP thread spinning for a descheduled partner counts), minor page
faults per step (fresh pages touched: memory the allocator took back from the kernel), the ratios
of each zoft backend and of forward-only to the reference and to the in-place loop,
parameter-granular over unit-granular (same backend, same run), the CPU's default backend
(``zoft.noise.default_noise``) on its own line, the z draws per step (counted, in units of one
full-model draw; for ``table`` these are windows read, not generated), and a sanity check that
all compute the same unperturbed loss of the same model on the same batch.

The process runs with ``zoft.runtime.tune_cpu_allocator`` (fixed glibc malloc thresholds), as the
``zoft`` command does, for every method alike; ``--malloc glibc`` measures glibc's defaults.

    python bench/step_cpu.py [--reps 10] [--noise torch,table] [--json FILE] [--quick] [--threads 2]
                             [--malloc zoft|glibc]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import resource
import sys
import time
from statistics import median

import numpy as np
import torch
from torch import nn

from zoft.engine import ZOEngine
from zoft.engine.probes import Probe
from zoft.models import build_random, resolve
from zoft.noise import BACKENDS, NoiseBackend, default_noise, make_noise
from zoft.optim import MeZOConfig, MeZOSGD
from zoft.runtime import allocator_state, tune_cpu_allocator
from zoft.tasks.base import Batch
from zoft.tasks.lm import LMTask

BATCH, SEQ = 8, 64


class MeZOReference:
    """The published MeZO step, as in ``MeZO/large_models/trainer.py`` (``zo_perturb_parameters``,
    ``zo_forward``, ``zo_step``, ``zo_update``), kept deliberately faithful, inefficiencies
    included: the global generator is re-seeded before each of the 4 passes over the parameters,
    z is drawn anew each time with ``torch.normal``, and every update is out of place
    (``param.data = param.data + ...``). Do not optimise this class: it is the baseline.
    """

    def __init__(self, model: nn.Module, lr: float, eps: float, weight_decay: float, seed: int):
        self.model = model
        self.lr, self.zo_eps, self.weight_decay = lr, eps, weight_decay
        self.named_parameters_to_optim = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.np_rng = np.random.RandomState(seed)  # MeZO: np.random.randint(1000000000)
        self.z_elements = 0  # bench instrumentation: elements of z drawn so far

    def zo_perturb_parameters(self, scaling_factor: float = 1) -> None:
        torch.manual_seed(self.zo_random_seed)  # same z every time for the same seed
        for name, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            self.z_elements += z.numel()
            param.data = param.data + scaling_factor * z * self.zo_eps

    def zo_forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.model.eval()
        with torch.inference_mode():
            loss = self.model(**inputs).loss
        return loss.detach()

    def zo_step(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """MeZO's ``zo_step``: +eps, -2eps, +eps passes around two forwards; returns (L+, L-)."""
        self.zo_random_seed = self.np_rng.randint(1000000000)
        self.zo_perturb_parameters(scaling_factor=1)
        loss1 = self.zo_forward(inputs)
        self.zo_perturb_parameters(scaling_factor=-2)
        loss2 = self.zo_forward(inputs)
        self.projected_grad = ((loss1 - loss2) / (2 * self.zo_eps)).item()
        self.zo_perturb_parameters(scaling_factor=1)  # back to the weights at the start of the step
        return loss1, loss2

    def zo_update(self) -> None:
        """MeZO's ``zo_update``: regenerate z a 4th time and take the SGD step (no decay on bias /
        layer norm)."""
        torch.manual_seed(self.zo_random_seed)
        for name, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            self.z_elements += z.numel()
            if "bias" not in name and "layer_norm" not in name and "layernorm" not in name:
                param.data = param.data - self.lr * (self.projected_grad * z + self.weight_decay * param.data)
            else:
                param.data = param.data - self.lr * (self.projected_grad * z)

    def step(self, inputs: dict[str, torch.Tensor]) -> tuple[float, float, float]:
        """One ``zo_step`` + ``zo_update``; returns (L+, L-, projected_grad)."""
        loss1, loss2 = self.zo_step(inputs)
        self.zo_update()
        return loss1.item(), loss2.item(), self.projected_grad


class MeZOInPlace(MeZOReference):
    """MeZO's loop with its updates written in place: the same 4 seeded z draws per step (a
    generator re-seeded before each pass over the parameters, ``torch.normal``), but every
    perturbation and update is ``param.data.add_`` instead of a new tensor. The faster baseline a
    careful user of the published loop would write; zoft's default backend is measured against it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gen = torch.Generator()

    def _z(self, param: torch.Tensor) -> torch.Tensor:
        z = torch.normal(mean=0, std=1, size=param.data.size(), generator=self.gen, device=param.data.device,
                         dtype=param.data.dtype)
        self.z_elements += z.numel()
        return z

    def zo_perturb_parameters(self, scaling_factor: float = 1) -> None:
        self.gen.manual_seed(self.zo_random_seed)  # same z every time for the same seed
        for name, param in self.named_parameters_to_optim:
            param.data.add_(self._z(param), alpha=scaling_factor * self.zo_eps)

    def zo_update(self) -> None:
        self.gen.manual_seed(self.zo_random_seed)
        for name, param in self.named_parameters_to_optim:
            z = self._z(param)
            if self.weight_decay and "bias" not in name and "layer_norm" not in name and "layernorm" not in name:
                param.data.mul_(1 - self.lr * self.weight_decay)
            param.data.add_(z, alpha=-self.lr * self.projected_grad)


class CountingNoise:
    """A backend wrapper counting the elements of z it hands out (bench instrumentation only)."""

    def __init__(self, inner: NoiseBackend):
        self.inner, self.name, self.distribution = inner, inner.name, inner.distribution
        self.z_elements = 0

    def sample(self, seed: int, key: str, like: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self.z_elements += like.numel()
        return self.inner.sample(seed, key, like, out=out)

    rounds_in_place = False  # fp32 here: the engine never asks for rounding

    def perturb_into(self, out: torch.Tensor, w0: torch.Tensor, seed: int, key: str, scale: float) -> None:
        self.z_elements += w0.numel()
        self.inner.perturb_into(out, w0, seed, key, scale)

    def z_mode(self, like: torch.Tensor) -> str:
        return self.inner.z_mode(like)

    def axpy(self, w: torch.Tensor, terms, key: str, decay: float = 1.0) -> None:
        self.z_elements += w.numel() * sum(1 for _, c in terms if c != 0.0)
        self.inner.axpy(w, terms, key, decay)


def model_config(quick: bool):
    """The ``opt-125m`` alias config (offline); ``quick``: the same family shrunk to a toy size."""
    _, config = resolve("opt-125m")
    config.use_cache = False
    if quick:
        for k, v in dict(vocab_size=512, hidden_size=64, word_embed_proj_dim=64, ffn_dim=128,
                         num_hidden_layers=2, num_attention_heads=4).items():
            setattr(config, k, v)
    return config


def run(reps: int, quick: bool, lr: float, eps: float, weight_decay: float, seed: int, threads: int,
        noises: tuple[str, ...] = ("torch",)) -> dict:
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    config = model_config(quick)
    t0 = time.perf_counter()
    ref_model = build_random(config, "causal", torch.float32, seed).eval()
    inplace_model = copy.deepcopy(ref_model)
    # (backend, granularity) -> a model copy: same initial weights, separate storage
    variants = [(b, "param") for b in noises] + [(noises[0], "unit")]
    zoft_models = {v: copy.deepcopy(ref_model) for v in variants}
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in ref_model.parameters() if p.requires_grad)  # tied counted once

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=gen)  # (B, T)
    mask = torch.ones_like(ids)  # (B, T), no padding
    ref_inputs = {"input_ids": ids, "attention_mask": mask, "labels": ids}  # HF shifts labels itself
    batch = Batch({"input_ids": ids, "attention_mask": mask}, {"labels": ids}, size=BATCH)
    task = LMTask(tokenizer=None, kind="causal", max_length=SEQ)  # forward + loss need no tokenizer

    ref = MeZOReference(ref_model, lr, eps, weight_decay, seed)
    inplace = MeZOInPlace(inplace_model, lr, eps, weight_decay, seed)
    engines = {v: ZOEngine(m, noise=make_noise(v[0], "gaussian"), granularity=v[1]) for v, m in zoft_models.items()}
    cfg = MeZOConfig(lr=lr, eps=eps, weight_decay=weight_decay)
    opts = {v: MeZOSGD(cfg, seed=seed, total_steps=reps + 2) for v in variants}

    # Sanity: all compute the same unperturbed loss of the same weights on the same batch.
    loss0_ref = ref.zo_forward(ref_inputs).item()
    loss0_zoft = {v: e.evaluate([Probe(None, 0.0)], batch, task).item() for v, e in engines.items()}
    loss0_rel = max(abs(loss0_ref - v) / abs(loss0_ref) for v in loss0_zoft.values())

    label = {(b, "param"): "zoft" if i == 0 else f"zoft[{b}]" for i, b in enumerate(noises)}
    label[(noises[0], "unit")] = "zoft[unit]"
    steps = {v: 0 for v in variants}
    first: dict[str, tuple[float, float, float]] = {}

    def ref_step():
        lp, lm, g = ref.step(ref_inputs)
        first.setdefault("reference", (lp, lm, g))

    def zoft_step(v: tuple[str, str]):
        losses = engines[v].evaluate(opts[v].probes(steps[v]), batch, task)  # (2,): L+, L-
        upd, metrics = opts[v].update(steps[v], losses)
        engines[v].set_update(upd)
        first.setdefault(label[v], (losses[0].item(), losses[1].item(), metrics["projected_grad"]))
        steps[v] += 1

    def forward_only():
        for _ in range(2):
            ref.zo_forward(ref_inputs)

    def inplace_step():
        lp, lm, g = inplace.step(ref_inputs)
        first.setdefault("in-place", (lp, lm, g))

    fns = {"reference": ref_step, "mezo_inplace": inplace_step}
    fns.update({label[v]: (lambda v=v: zoft_step(v)) for v in variants})
    fns["forward_only"] = forward_only
    for fn in fns.values():  # warm-up; zoft's first step has no pending update to apply
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}  # process CPU seconds (all threads)
    faults: dict[str, list[int]] = {k: [] for k in fns}  # minor page faults (first touches of fresh pages)
    names = list(fns)
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate: no method always first
            f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t, c = time.perf_counter(), time.process_time()
            fns[name]()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)

    # z generations per step, counted on one more (steady-state) step of each.
    ref.z_elements = 0
    ref_step()
    ref_z = ref.z_elements / n_params
    inplace.z_elements = 0
    inplace_step()
    inplace_z = inplace.z_elements / n_params
    zoft_z = {}
    for v, e in engines.items():
        e.noise = counting = CountingNoise(e.noise)
        zoft_step(v)
        zoft_z[v] = counting.z_elements / n_params
        e.close()

    med = {k: median(v) for k, v in times.items()}
    cmed = {k: median(v) for k, v in cpu.items()}
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": "opt-125m shape (random init)" if not quick else "tiny opt (quick)",
        "params": n_params, "batch": [BATCH, SEQ], "dtype": "fp32", "threads": threads,
        "torch": torch.__version__, "reps": reps, "lr": lr, "eps": eps, "weight_decay": weight_decay,
        "build_s": build_s, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "median_s": med, "times_s": times, "cpu_median_s": cmed, "cpu_s": cpu, "allocator": allocator_state(),
        "minor_faults": faults, "faults_median": {k: median(v) for k, v in faults.items()},
        "noise": list(noises),
        "ratio_over_reference": {k: med[k] / med["reference"] for k in names if k != "reference"},
        "ratio_zoft_over_reference": med["zoft"] / med["reference"],
        # parameter-granular (the default) over unit-granular, same backend, same run
        "ratio_param_over_unit": med["zoft"] / med["zoft[unit]"],
        "paired_param_over_unit": median([a / b for a, b in zip(times["zoft"], times["zoft[unit]"])]),
        "ratio_forward_only_over_reference": med["forward_only"] / med["reference"],
        # every zoft backend against MeZO's loop written with in-place updates (same run)
        "ratio_over_inplace": {label[v]: med[label[v]] / med["mezo_inplace"] for v in variants},
        # the same ratios by CPU seconds: time waiting for a core (other processes) left out
        "cpu_ratio_over_inplace": {label[v]: cmed[label[v]] / cmed["mezo_inplace"] for v in variants},
        "cpu_param_over_unit": cmed["zoft"] / cmed["zoft[unit]"],
        "default_noise": default_noise("cpu"),
        "default_label": label.get((default_noise("cpu"), "param")),
        # Median of per-repetition ratios (each ran next to the reference): less sensitive to load drift.
        "paired_ratio_median": {k: median([a / b for a, b in zip(times[k], times["reference"])])
                                for k in names if k != "reference"},
        "z_per_step": {"reference": ref_z, "mezo_inplace": inplace_z, **{label[v]: z for v, z in zoft_z.items()}},
        "loss0": {"reference": loss0_ref, **{label[v]: x for v, x in loss0_zoft.items()}, "rel_diff": loss0_rel},
        "first_step": {k: dict(zip(("loss_plus", "loss_minus", "projected_grad"), v)) for k, v in first.items()},
    }


def report(res: dict) -> str:
    med, t = res["median_s"], res["times_s"]
    ref = med["reference"]
    lines = [
        f"{res['model']}: {res['params'] / 1e6:.1f}M params, {res['dtype']}, batch {res['batch'][0]}x{res['batch'][1]}, "
        f"{res['threads']} threads, {res['reps']} reps, torch {res['torch']}, "
        f"load avg {res['loadavg_before'][0]:.2f} -> {res['loadavg_after'][0]:.2f}",
        f"allocator: {res['allocator']}",
        f"{'':24s}{'median s/step':>14s}{'min':>9s}{'max':>9s}{'x reference':>13s}{'paired':>8s}"
        f"{'x in-place':>12s}{'cpu s/step':>12s}{'cpu x in-place':>16s}{'faults/step':>13s}",
    ]
    cmed = res["cpu_median_s"]
    paired, inplace = res["paired_ratio_median"], med["mezo_inplace"]
    for name in med:
        label = {"reference": "MeZO reference", "mezo_inplace": "MeZO in-place",
                 "forward_only": "forward-only (2 fwd)"}.get(name, name)
        pr = f"{paired[name]:8.3f}" if name in paired else f"{'':8s}"
        lines.append(f"{label:24s}{med[name]:14.3f}{min(t[name]):9.3f}{max(t[name]):9.3f}{med[name] / ref:13.3f}{pr}"
                     f"{med[name] / inplace:12.3f}{cmed[name]:12.3f}{cmed[name] / cmed['mezo_inplace']:16.3f}"
                     f"{res['faults_median'][name]:13.0f}")
    z, l0 = res["z_per_step"], res["loss0"]
    lines += [
        f"ratio zoft/reference = {res['ratio_zoft_over_reference']:.3f} (zoft: noise '{res['noise'][0]}')   "
        f"forward-only/reference = {res['ratio_forward_only_over_reference']:.3f}   "
        "(paired: median of per-repetition ratios to the reference)",
        f"parameter-granular / unit-granular = {res['ratio_param_over_unit']:.3f} "
        f"(paired {res['paired_param_over_unit']:.3f}; by CPU seconds {res['cpu_param_over_unit']:.3f}; "
        f"noise '{res['noise'][0]}')",
        (f"default noise on the CPU: '{res['default_noise']}': "
         + (f"{res['ratio_over_inplace'][res['default_label']]:.3f} x MeZO in-place "
            f"(by CPU seconds {res['cpu_ratio_over_inplace'][res['default_label']]:.3f})" if res["default_label"]
            else "not timed (add it to --noise)")),
        "z draws per step (full-model units; 'table' reads windows, draws nothing): "
        + ", ".join(f"{k} {v:.2f}" for k, v in z.items()),
        "step-0 unperturbed loss: " + ", ".join(f"{k} {v:.6f}" for k, v in l0.items() if k != "rel_diff")
        + f" (max rel diff {l0['rel_diff']:.1e})",
    ]
    for k, v in res["first_step"].items():
        lines.append(f"first step {k:9s}: L+ {v['loss_plus']:.6f}  L- {v['loss_minus']:.6f}  g {v['projected_grad']:+.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10; 2 with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny OPT config, 2 reps (smoke test)")
    ap.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the benchmark's setting is 2)")
    ap.add_argument("--malloc", choices=("zoft", "glibc"), default="zoft",
                    help="zoft: glibc malloc with zoft's fixed thresholds, as the zoft command runs "
                         "(zoft.runtime.tune_cpu_allocator); glibc: the library's dynamic defaults")
    ap.add_argument("--noise", default="torch,table",
                    help=f"comma-separated noise backends to time, one zoft column each (of {sorted(BACKENDS)})")
    args = ap.parse_args(argv)
    reps = args.reps if args.reps is not None else (2 if args.quick else 10)
    if reps < 1:
        ap.error("--reps must be >= 1")
    noises = tuple(b.strip() for b in args.noise.split(",") if b.strip())
    unknown = [b for b in noises if b not in BACKENDS]
    if not noises or unknown:
        ap.error(f"--noise: unknown backend(s) {unknown}; choose from {sorted(BACKENDS)}")
    if args.malloc == "zoft":
        tune_cpu_allocator()
    res = run(reps, args.quick, args.lr, args.eps, args.weight_decay, args.seed, args.threads, noises)
    print(report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    # fp32 forward of the same weights and batch by two code paths: equal up to summation order.
    if not all(math.isfinite(v) for v in res["loss0"].values()) or res["loss0"]["rel_diff"] > 1e-5:
        print("FAIL: zoft and the reference disagree on the unperturbed loss", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
