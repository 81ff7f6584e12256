"""Evaluation of the unlearning stages and the robustness report (one table, one plot).

Evaluators map ``(model, tokenizer) -> {metric: float}``:

* ``lm``: on the forget and retain token rows: ``forget_nll`` / ``retain_nll`` (mean token NLL,
  nats) and ``forget_acc`` / ``retain_acc`` (teacher-forced next-token accuracy, %). Cheap; what the
  CPU experiment reports.
* ``muse``: ``zoft.eval.eval_muse`` on a MUSE folder (verbmem_f, knowmem_f, knowmem_r, privleak).
* ``wmdp``: ``zoft.eval.eval_wmdp`` (accuracy per subset, %), plus MMLU when ``mmlu_data`` is given.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from zoft.errors import UsageError
from zoft.tasks.lm import IGNORE, call_model
from zoft.unlearn.data import make_batch

Evaluator = Callable[[Any, Any], dict[str, float]]
# metrics where a lower value means "more forgotten" (for the table's arrows)
LOWER_IS_FORGOTTEN = ("forget_acc", "verbmem_f", "knowmem_f", "wmdp")


@torch.no_grad()
def lm_metrics(model: Any, tokenizer: Any, rows: Sequence[Sequence[int]], batch_size: int = 16) -> tuple[float, float]:
    """(mean token NLL in nats, next-token accuracy in %) of ``model`` on token ``rows``."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    nll_sum, correct, count = 0.0, 0, 0
    try:
        for i in range(0, len(rows), batch_size):
            b = make_batch(tokenizer, rows[i:i + batch_size]).to(dev)
            logits = call_model(model, b, causal=True).logits.float()  # (B, T, V)
            target = torch.nn.functional.pad(b.targets["labels"][:, 1:], (0, 1), value=IGNORE)  # (B, T)
            keep = target != IGNORE
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE,
                                                    reduction="sum")
            nll_sum += nll.item()
            correct += int(((logits.argmax(-1) == target) & keep).sum())
            count += int(keep.sum())
    finally:
        model.train(was)
    return nll_sum / max(count, 1), 100.0 * correct / max(count, 1)


def lm_evaluator(forget_rows: Sequence[Sequence[int]], retain_rows: Sequence[Sequence[int]] | None,
                 batch_size: int = 16) -> Evaluator:
    def ev(model, tokenizer):
        out = {}
        out["forget_nll"], out["forget_acc"] = lm_metrics(model, tokenizer, forget_rows, batch_size)
        if retain_rows:
            out["retain_nll"], out["retain_acc"] = lm_metrics(model, tokenizer, retain_rows, batch_size)
        return out
    return ev


def muse_evaluator(data: str, corpus: str = "news", limit: int | None = None, batch_size: int = 8,
                   metrics: Sequence[str] | None = None) -> Evaluator:
    from zoft.eval import check_muse_data, eval_muse

    check_muse_data(data, corpus, metrics)  # fail before any unlearning

    def ev(model, tokenizer):
        res = eval_muse(model, tokenizer, data, corpus=corpus, limit=limit, batch_size=batch_size,
                        metrics=metrics, progress=False)
        return {k: v["value"] for k, v in res.items() if isinstance(v, dict) and "value" in v}
    return ev


def wmdp_evaluator(data: str, subsets: Sequence[str] = ("bio", "cyber"), limit: int | None = None,
                   batch_size: int = 8, mmlu_data: str | None = None) -> Evaluator:
    from zoft.eval import eval_mmlu, eval_wmdp, load_wmdp

    load_wmdp(data, subsets=subsets, limit=1)  # fail before any unlearning

    def ev(model, tokenizer):
        res = eval_wmdp(model, tokenizer, data, subsets=subsets, limit=limit, batch_size=batch_size, progress=False)
        out = {k: 100.0 * v["acc"] for k, v in res.items()}
        if mmlu_data:
            mm = eval_mmlu(model, tokenizer, mmlu_data, limit=limit, batch_size=batch_size, progress=False)
            out["mmlu"] = 100.0 * mm["mmlu"]["acc"]
        return out
    return ev


def make_evaluator(kind: str, *, forget_rows=None, retain_rows=None, data: str | None = None,
                   options: dict[str, Any] | None = None) -> Evaluator | None:
    """Evaluator ``kind`` ("lm", "muse", "wmdp" or "none")."""
    o = dict(options or {})
    if kind == "none":
        return None
    if kind == "lm":
        return lm_evaluator(forget_rows, retain_rows, o.get("batch_size", 16))
    if data is None:
        raise UsageError(f"--eval {kind} needs --eval-data DIR")
    if kind == "muse":
        allowed = {"corpus", "limit", "batch_size", "metrics"}
        fn = muse_evaluator
    elif kind == "wmdp":
        allowed = {"subsets", "limit", "batch_size", "mmlu_data"}
        fn = wmdp_evaluator
    else:
        raise UsageError(f"unknown evaluation '{kind}'; use lm, muse, wmdp or none")
    bad = sorted(set(o) - allowed)
    if bad:
        raise UsageError(f"unknown eval option(s) {bad} for '{kind}'; valid: {sorted(allowed)}")
    return fn(data, **o)


# ------------------------------------------------------------------------------------ the report
def format_table(stages: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per stage, one column per metric."""
    cols = sorted({k for m in stages.values() for k in m})
    lines = ["| stage | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in stages.items():
        cells = []
        for c in cols:
            v = m.get(c)
            cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_stages(stages: dict[str, dict[str, float]], path: Path, title: str = "") -> None:
    """One panel per metric, one bar per stage (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = sorted({k for m in stages.values() for k in m})
    fig, axes = plt.subplots(1, max(1, len(cols)), figsize=(3.2 * max(1, len(cols)), 3.6), squeeze=False)
    names = list(stages)
    for ax, c in zip(axes[0], cols):
        vals = [stages[n].get(c, float("nan")) for n in names]
        ax.bar(range(len(names)), vals, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(c, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(out_dir: Path, stages: dict[str, dict[str, float]], meta: dict[str, Any],
                 name: str = "robustness") -> dict[str, Path]:
    """``{name}.md`` (table), ``{name}.json`` (``{"meta", "stages"}``), ``{name}.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    md = out_dir / f"{name}.md"
    js = out_dir / f"{name}.json"
    png = out_dir / f"{name}.png"
    header = ", ".join(f"{k}={v}" for k, v in meta.items() if not isinstance(v, (dict, list)))
    md.write_text(f"# Robustness of unlearning\n\n{header}\n\n{format_table(stages)}\n")
    js.write_text(json.dumps({"meta": meta, "stages": stages}, indent=1, default=str) + "\n")
    plot_stages(stages, png, header[:150])
    return {"md": md, "json": js, "png": png}
