"""Run directories: atomic checkpoints, the seed trajectory, metrics and the loss picture.

Layout of ``output_dir``::

    config.yaml        the resolved TrainConfig
    metrics.jsonl      one JSON object per step (eval lines carry ``eval_`` keys)
    trajectory.jsonl   one line per step: {"step", "terms": [[seed, coef], ...], "decay"}
    checkpoint/        model (save_pretrained, safetensors) + tokenizer + state.json
    loss.png           training loss (and eval metrics) against steps

A checkpoint is written to a temporary sibling folder and renamed into place, so a failed
write (full disk, interrupt) leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from zoft.errors import UsageError, ZoftError

_RUN_LOGS = ("config.yaml", "metrics.jsonl", "trajectory.jsonl", "loss.png", "loss.tmp.png", "metrics.tmp",
             "trajectory.tmp")  # what a run writes before (and beside) its checkpoint


def _clean(v: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        f.flush()


def read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (the first ``limit``; a torn last line is ignored)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if limit is not None and len(out) >= limit:
            break
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def truncate_jsonl(path: Path, n: int) -> None:
    """Keep the first ``n`` records (resume drops steps done after the last checkpoint)."""
    records = read_jsonl(path, n)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def save_checkpoint(out_dir: Path, model, tokenizer, state: dict[str, Any], tensors: dict | None = None) -> Path:
    """Write ``out_dir/checkpoint`` atomically: model, tokenizer, ``state.json`` and the optimizer's
    per-parameter buffers (``optimizer.safetensors``, when ``tensors`` is non-empty)."""
    final = out_dir / "checkpoint"
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=out_dir))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if tensors:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "optimizer.safetensors"))
        old = out_dir / ".checkpoint-old"
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ZoftError(f"could not write a checkpoint in '{out_dir}': {e.strerror or e}; "
                        "the previous checkpoint is intact") from None
    return final


def find_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (also one left by a write interrupted mid-rename)."""
    for name in ("checkpoint", ".checkpoint-old"):
        p = out_dir / name
        if (p / "state.json").is_file():
            return p
    return None


def claim_output_dir(path: str | os.PathLike, flag: str, *, run: bool, resume: bool = False) -> Path:
    """The one rule for output directories (``finetune --output-dir``, ``replay --output``).

    A new or empty directory is taken (created, parents too). For a run (``run=True``): a
    directory holding a run with a checkpoint is taken only to continue it (``resume``); one whose
    run stopped before its first checkpoint holds only that run's logs (``config.yaml``,
    ``metrics.jsonl``, ``trajectory.jsonl``, ``loss.png``), which the new run replaces. Anything
    else non-empty is refused (``UsageError`` naming ``flag``): nothing is ever overwritten.
    """
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to output directory '{out}': {e.strerror or e}; "
                         f"choose another {flag}") from None
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return out
    if run and find_checkpoint(out) is not None:
        if resume:
            return out
        raise UsageError(f"'{out}' already holds a run; pass --resume to continue it or choose another {flag}")
    if run and all(n in _RUN_LOGS or n.startswith(".checkpoint-") for n in names):
        return out  # a run that died before its first checkpoint: nothing a rerun can continue
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    what = "holds no zoft run" if run else "would be overwritten"
    raise UsageError(f"'{out}' is not empty ({shown}) and {what}; choose a new or empty {flag}")


def plot_metrics(metrics: list[dict[str, Any]], path: Path) -> None:
    """Training loss (raw and smoothed) and eval curves against steps, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if m.get("loss") is not None and "eval_loss" not in m]
    evals = [m for m in metrics if any(k.startswith("eval_") for k in m)]
    eval_keys = sorted({k for m in evals for k in m if k.startswith("eval_") and not k.endswith("_time_s")
                        and isinstance(m[k], (int, float))})
    fig, axes = plt.subplots(1, 1 + len(eval_keys), figsize=(6 + 4 * len(eval_keys), 4), squeeze=False)
    ax = axes[0][0]
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, alpha=0.3, label="loss (L+)")
        ema, out = losses[0], []
        for v in losses:
            ema = 0.9 * ema + 0.1 * v
            out.append(ema)
        ax.plot(steps, out, label="EMA 0.9")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    for ax2, k in zip(axes[0][1:], eval_keys):  # one panel per held-out metric: scales differ
        pts = [(m["step"], m[k]) for m in evals if m.get(k) is not None]
        if pts:
            ax2.plot(*zip(*pts), marker="o")
        ax2.set_xlabel("step")
        ax2.set_title(f"held-out {k[len('eval_'):]}")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
