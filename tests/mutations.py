"""Mutation check of the formulas that define zoft: does the test suite notice a wrong formula?

Each entry of ``MUTATIONS`` is a one-line change to a core formula (an estimator, an update, an
objective, a metric) and the few test files (or test ids) that should catch it. For each one the
runner writes the mutated line into a private copy of the repository (a temporary folder: the
working tree is never written, so Ctrl-C or a crash leaves it as it was), runs those tests with
``pytest -x -q -p no:cacheprovider`` and puts the line back. A mutation is *killed* when the tests
fail (pytest exit status 1) and *survives* when they pass; any other status (a collection error,
a timeout) is reported as such and counts as a failure of the check, as does a survivor.

    python tests/mutations.py               # every mutation (~40 min on 2 busy cores)
    python tests/mutations.py rouge-recall q-levels     # some, by id
    python tests/mutations.py --list        # the list, nothing run

Before the mutations, the union of their targets runs once on the unmutated copy (``--no-baseline``
skips it): a test that already fails would make every mutation look killed. The list and its last
result are in docs/mutations.md; ``tests/test_mutations.py`` checks that every ``old`` string still
occurs where it should (fast) and runs the whole check (marked slow).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("zoft", "tests", "bench", "configs", "kernels", "pyproject.toml")
PYTEST = ("-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=")  # addopts cleared: a named slow test runs


@dataclass(frozen=True)
class Mutation:
    """Replace ``old`` in ``file`` by ``new`` (``old`` must occur once, or give ``nth``: which
    occurrence, 0-based); ``tests``: pytest targets (files or ids, relative to the repository root)
    that must fail."""

    id: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    nth: int | None = None

    def apply(self, text: str) -> str:
        if self.nth is None and text.count(self.old) != 1:
            raise ValueError(f"{self.id}: {self.old!r} found {text.count(self.old)} times in {self.file}, not once")
        start = -1
        for _ in range((self.nth or 0) + 1):
            start = text.find(self.old, start + 1)
            if start < 0:
                raise ValueError(f"{self.id}: occurrence {self.nth} of {self.old!r} not found in {self.file}")
        return text[:start] + self.new + text[start + len(self.old):]


ZO, CORE, RANK = "zoft/optim/zo_sgd.py", "zoft/engine/core.py", "zoft/optim/rank.py"
OBJ, UOPT = "zoft/unlearn/objectives.py", "zoft/unlearn/optimizers.py"
MET, MUSE, MCQ = "zoft/eval/metrics.py", "zoft/eval/muse.py", "zoft/eval/mcq.py"


def _ids(file: str, *names: str) -> tuple[str, ...]:
    return tuple(f"tests/{file}::{n}" for n in names)


# the tests each group of mutations must fail (narrow targets keep one mutation to ~10-60 s)
T_MEZO = _ids("test_mezo.py", "test_mezo_step_matches_published_algorithm")
T_DECAY = _ids("test_mezo.py", "test_weight_decay_skips_biases_and_every_norm")
T_FAM = _ids("test_optim_family.py", "test_step_matches_hand_written_reference")
T_CONS = _ids("test_optim_family.py", "test_cons_keeps_the_lowest_of_three", "test_cons_needs_its_second_phase")
T_RANK = _ids("test_ranksgd.py", "test_full_ranking_weights", "test_top_k_weights_and_edge_count",
              "test_pairwise_ties_dropped_and_cycles", "test_update_carries_the_documented_weights",
              "test_step_matches_hand_written_reference")
T_REWARD = _ids("test_ranksgd.py", "test_reward_over_generations")
T_OBJ = ("tests/test_unlearn_objectives.py",)
T_UOPT = _ids("test_unlearn_optim.py", "test_quantize_update_formula", "test_sign_sgd_step",
              "test_sign_adam_4bit_numbers_by_hand", "test_sign_adam_two_steps_match_formula",
              "test_smoothing_averages_s_gradients_at_sigma")
T_MET = ("tests/test_eval_metrics.py",)
T_MUSE = _ids("test_eval_muse.py", "test_partial_overlap_scores_rouge_l_f1")
T_MCQ = _ids("test_eval_mcq.py", "test_wmdp_accuracy_equals_independent_loglikelihoods", "test_mmlu_csv_layout_and_accuracy")
T_REPORT = _ids("test_unlearn_attacks.py", "test_muse_and_wmdp_evaluators_report_hand_known_numbers")
T_BENCH = _ids("test_unlearn_bench.py", "test_unlearn_cpu_quick")
RECALL = '__import__("zoft.eval.metrics").eval.metrics._rouge_scorer().score({}, {})["rougeL"].recall'

M = Mutation
MUTATIONS: tuple[Mutation, ...] = (
    # -- the MeZO estimator and update (zoft.optim.zo_sgd.ZOSGD) ---------------------------------
    M("mezo-two-sided-2eps", ZO, "return (plus - minus) / (2 * c.eps), plus", "return (plus - minus) / c.eps, plus", T_MEZO),
    M("mezo-one-sided-eps", ZO, "return (plus - losses[0]) / c.eps, plus", "return (plus - losses[0]) / (2 * c.eps), plus", T_MEZO),
    M("mezo-one-sided-base", ZO, "plus = losses[1:c.n_queries + 1]", "plus = losses[0:c.n_queries]", T_MEZO),
    M("mezo-query-mean", ZO, "terms=[(s, -lr * g / d / self.norm(s))", "terms=[(s, -lr * g / self.norm(s))", T_MEZO),
    M("mezo-update-sign", ZO, "terms=[(s, -lr * g / d / self.norm(s))", "terms=[(s, lr * g / d / self.norm(s))", T_MEZO),
    M("mezo-weight-decay-lr", ZO, "1.0 - lr * self.config.weight_decay)\n", "1.0 - self.config.weight_decay)\n", T_MEZO),
    M("mezo-logged-loss-plus", ZO, '{"loss": plus.mean().item()', '{"loss": losses.mean().item()', T_MEZO),
    M("no-decay-mezo-list", CORE, 'NO_DECAY = ("bias", "norm", "ln_")', 'NO_DECAY = ("bias", "layer_norm", "layernorm")', T_DECAY),
    M("no-decay-case", CORE, "not any(s in k.lower() for s in self.no_decay)", "not any(s in k for s in self.no_decay)", T_DECAY),
    M("sphere-estimate-norm", ZO, "return [(s, g / d / self.norm(s)) for s", "return [(s, g / d) for s", T_FAM),
    # -- the ZO-SGD family, ZO-Adam, R-AdaZO -------------------------------------------------------
    M("sign-of-scalar", ZO, "super().make_update(step, torch.sign(grads), lr, decay)",
      "super().make_update(step, grads, lr, decay)", T_FAM),
    M("momentum-dampening", ZO, 'b.mul_(self.hp["momentum"]).add_(g)', 'b.mul_(self.hp["momentum"]).add_(g, alpha=1 - self.hp["momentum"])', T_FAM),
    M("momentum-first-buffer", ZO, "b = bufs[key] = g  #", "b = bufs[key] = (1 - self.hp['momentum']) * g  #", T_FAM),
    M("adam-m-bias-correction", ZO, "w.add_((m / (1 - b1 ** t) / denom)", "w.add_((m / denom)", T_FAM),
    M("adam-v-bias-correction", ZO, "denom = (v / (1 - b2 ** t)).sqrt_()", "denom = v.sqrt()", T_FAM),
    M("adam-v-of-g-squared", ZO, "addcmul_(g, g, value=1 - b2)", "addcmul_(g, g.abs().sqrt(), value=1 - b2)", T_FAM),
    M("radazo-v-of-m-squared", ZO, "addcmul_(m, m, value=1 - b2)", "addcmul_(g, g, value=1 - b2)", T_FAM),
    M("radazo-zeta-inside-sqrt", ZO, '(m / (v + self.hp["zeta"]).sqrt())', '(m / (v.sqrt() + self.hp["zeta"]))', T_FAM),
    M("cons-branch-signs", ZO, "((l_desc, 0, -1.0), (l0, 1, 0.0), (l_asc, 2, 1.0))",
      "((l_desc, 0, 1.0), (l0, 1, 0.0), (l_asc, 2, -1.0))", T_CONS),
    M("cons-keeps-worst", ZO, "choice = min(((l_desc", "choice = max(((l_desc", T_CONS),
    M("cons-tie-order", ZO, "(l0, 1, 0.0)", "(l0, -1, 0.0)", T_CONS),
    M("cons-never-stays", ZO, "(l0, 1, 0.0)", "(l0 + 1e9, 1, 0.0)", T_CONS),
    # -- ZO-RankSGD ---------------------------------------------------------------------------------
    M("rank-weight-loser", RANK, "w[j] -= 1", "w[j] -= 0", T_RANK),
    M("rank-edge-normalisation", RANK, "(s, w / len(comp.edges) / c.n_queries / self.norm(s))",
      "(s, w / c.n_queries / self.norm(s))", T_RANK),
    M("rank-group-mean", RANK, "(s, w / len(comp.edges) / c.n_queries / self.norm(s))",
      "(s, w / len(comp.edges) / self.norm(s))", T_RANK),
    M("rank-update-sign", RANK, "terms = [(s, lr * scale * w) for", "terms = [(s, -lr * scale * w) for", T_RANK),
    M("rank-higher-is-better", RANK, "key = [-v for v in vals] if higher_is_better else vals", "key = vals", T_RANK),
    M("reward-oracle-direction", RANK, "Comparison.from_scores(scores, self.top_k, higher_is_better=True)",
      "Comparison.from_scores(scores, self.top_k)", T_REWARD),
    M("rank-top-k-reveals-all", RANK, "k = len(order) if top_k <= 0 else min(top_k, len(order))", "k = len(order)", T_RANK),
    M("rank-line-search-best", RANK, "scale = c.gamma ** comps[c.n_queries].best()", "scale = 1.0", T_RANK),
    # -- unlearning objectives ----------------------------------------------------------------------
    M("nll-no-shift", OBJ, "target = F.pad(labels[:, 1:], (0, 1), value=IGNORE)", "target = labels", T_OBJ),
    M("token-mean-by-rows", OBJ, "(nll * m).sum(1) / (cnt.to(nll.dtype) * m).sum(1).clamp_min(1)",
      "(nll * m).sum(1) / m.sum(1).clamp_min(1)", T_OBJ),
    M("ga-sign", OBJ, "        return -_token_mean(nll, cnt, forget)", "        return _token_mean(nll, cnt, forget)", T_OBJ),
    M("ga-sequence-mean", OBJ, "return -(nll * m).sum(1) / m.sum(1)", "return -(nll * m).sum(1) / (cnt * m).sum(1)", T_OBJ),
    M("graddiff-retain-sign", OBJ, "out = out + self.options.retain_weight * _token_mean(nll, cnt, ~forget)",
      "out = out - self.options.retain_weight * _token_mean(nll, cnt, ~forget)", T_OBJ, nth=0),
    M("graddiff-retain-weight", OBJ, "out = out + self.options.retain_weight * _token_mean(nll, cnt, ~forget)",
      "out = out + _token_mean(nll, cnt, ~forget)", T_OBJ, nth=0),
    M("npo-log-ratio", OBJ, "logratio = -nll - ref", "logratio = -nll + ref", T_OBJ),
    M("npo-scale-2-over-beta", OBJ, "out = -(2.0 / self.options.beta)", "out = -(1.0 / self.options.beta)", T_OBJ),
    M("npo-sigmoid-sign", OBJ, "F.logsigmoid(-self.options.beta * logratio)", "F.logsigmoid(self.options.beta * logratio)", T_OBJ),
    M("npo-retain", OBJ, "out = out + self.options.retain_weight * _token_mean(nll, cnt, ~forget)",
      "out = out - self.options.retain_weight * _token_mean(nll, cnt, ~forget)", T_OBJ, nth=1),
    M("simnpo-length-norm", OBJ, "logp_norm = -nll / cnt.to(nll.dtype).clamp_min(1)", "logp_norm = -nll", T_OBJ),
    M("simnpo-margin-sign", OBJ, "F.logsigmoid(-o.beta * logp_norm - o.gamma)", "F.logsigmoid(-o.beta * logp_norm + o.gamma)", T_OBJ),
    M("rmu-control-unit", OBJ, "self.options.steering_coef * u / u.norm()", "self.options.steering_coef * u", T_OBJ),
    M("rmu-per-width", OBJ, "err_f = ((h - self.control.to(h.device)) ** 2).sum(-1) / D",
      "err_f = ((h - self.control.to(h.device)) ** 2).sum(-1)", T_OBJ),
    M("rmu-alpha", OBJ, "return lf + self.options.alpha * lr", "return lf + lr", T_OBJ),
    # -- unlearning optimizers ----------------------------------------------------------------------
    M("q-levels", UOPT, "levels = 2 ** (bits - 1) - 1", "levels = 2 ** bits - 1", T_UOPT),
    M("q-round", UOPT, "torch.round(x * (levels / scale)) / levels", "torch.floor(x * (levels / scale)) / levels", T_UOPT),
    M("q-scale-max", UOPT, "scale = x.abs().max()", "scale = x.abs().mean()", T_UOPT),
    M("sign-adam-m-of-g", UOPT, 'st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)', 'st["exp_avg"].mul_(b1).add_(g.sign(), alpha=1 - b1)', T_UOPT),
    M("sign-adam-v-of-g-squared", UOPT, 'addcmul_(g, g, value=1 - b2)', 'add_(g.abs(), alpha=1 - b2)', T_UOPT),
    M("sign-weight-decay", UOPT, 'upd = upd + group["weight_decay"] * p', 'upd = upd - group["weight_decay"] * p', T_UOPT),
    M("smooth-average", UOPT, "loss = self.objective.fo_loss(self.model, batch) / o.smoothing_samples",
      "loss = self.objective.fo_loss(self.model, batch) * 7.0", T_UOPT),
    M("smooth-sigma", UOPT, "p.copy_(w + o.smoothing_sigma * e)", "p.copy_(w + o.smoothing_sigma * e * 10)", T_UOPT),
    # -- evaluation metrics -------------------------------------------------------------------------
    M("rouge-recall", MET, '["rougeL"].fmeasure)', '["rougeL"].recall)', T_MET),
    M("verbmem-recall", MUSE, '"rougeL": rouge_l_f1(gt, g.text)}', '"rougeL": ' + RECALL.format("gt", "g.text") + "}", T_MUSE),
    M("knowmem-recall", MUSE, '"rougeL": rouge_l_f1(d["answer"], g.text)}',
      '"rougeL": ' + RECALL.format('d["answer"]', "g.text") + "}", T_MUSE),
    M("rouge-percent", MUSE, "pct = np.asarray(scores, dtype=np.float64) * 100.0", "pct = np.asarray(scores, dtype=np.float64)", T_MUSE),
    M("min-k-fraction", MET, "k = max(1, int(lp.size * ratio))", "k = max(1, int(lp.size * (1 - ratio)))", T_MET),
    M("min-k-highest", MET, "lp = np.sort(np.asarray(token_logprobs, dtype=np.float64))",
      "lp = np.sort(np.asarray(token_logprobs, dtype=np.float64))[::-1]", T_MET),
    M("min-k-sign", MET, "return float(-np.mean(lp[:k]))", "return float(np.mean(lp[:k]))", T_MET),
    M("auc-direction", MET, "fpr, tpr, _ = roc_curve(y, -np.concatenate([f, h]))", "fpr, tpr, _ = roc_curve(y, np.concatenate([f, h]))", T_MET),
    M("privleak-denominator", MET, "return (auc - auc_retrain) / auc_retrain * 100.0", "return (auc - auc_retrain) / auc * 100.0", T_MET),
    M("report-wmdp-percent", "zoft/unlearn/report.py", 'out = {k: 100.0 * v["acc"] for', 'out = {k: v["acc"] for',
      T_REPORT),
    M("report-accuracy-argmax", "zoft/unlearn/report.py", "((logits.argmax(-1) == target) & keep)",
      "((logits.argmin(-1) == target) & keep)", T_BENCH),
    M("mcq-argmax", MCQ, "correct = (ll.argmax(axis=1) == gold)", "correct = (ll.argmin(axis=1) == gold)", T_MCQ),
)


def _copy_repo(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "runs")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / name)


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _pytest(copy: Path, targets: tuple[str, ...], timeout: float) -> tuple[str, float]:
    """Run ``targets`` in ``copy``: ("passed" | "failed" | "timeout" | "error rc=N", seconds)."""
    t0 = time.monotonic()
    try:
        rc = subprocess.run([sys.executable, "-m", "pytest", *PYTEST, *targets], cwd=copy, env=_env(copy),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - t0
    status = {0: "passed", 1: "failed"}.get(rc, f"error rc={rc}")
    return status, time.monotonic() - t0


def run(mutations: tuple[Mutation, ...], baseline: bool = True, timeout: float = 900.0,
        log=print) -> list[tuple[Mutation, str, float]]:
    """Each mutation's outcome: (mutation, "killed" | "SURVIVED" | "timeout" | "error rc=N", seconds)."""
    results = []
    with tempfile.TemporaryDirectory(prefix="zoft-mutations-") as tmp:
        copy = Path(tmp)
        _copy_repo(copy)
        where = subprocess.run([sys.executable, "-c", "import zoft; print(zoft.__file__)"], cwd=copy, env=_env(copy),
                               capture_output=True, text=True, check=True).stdout.strip()
        if not Path(where).resolve().is_relative_to(copy.resolve()):
            raise RuntimeError(f"the copy does not shadow the installed zoft ({where}); cannot mutate safely")
        for m in mutations:  # every mutation applies before anything runs: a stale list fails fast
            m.apply((copy / m.file).read_text())
        if baseline:
            targets = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
            status, secs = _pytest(copy, targets, timeout * 2)
            log(f"baseline ({len(targets)} targets): {status} in {secs:.0f}s")
            if status != "passed":
                raise RuntimeError("the targeted tests fail without any mutation; fix them first")
        for m in mutations:
            path = copy / m.file
            original = path.read_text()
            try:
                path.write_text(m.apply(original))
                status, secs = _pytest(copy, m.tests, timeout)
            finally:
                path.write_text(original)
            outcome = {"failed": "killed", "passed": "SURVIVED"}.get(status, status)
            results.append((m, outcome, secs))
            log(f"{m.id:28s} {outcome:9s} {secs:5.0f}s  {' '.join(m.tests)}")
    return results


def markdown(results: list[tuple[Mutation, str, float]]) -> str:
    rows = ["| id | file | mutation (old -> new) | tests | result |", "|---|---|---|---|---|"]
    for m, outcome, secs in results:
        by_file: dict[str, list[str]] = {}
        for t in m.tests:
            file, _, name = t.removeprefix("tests/").partition("::")
            by_file.setdefault(file, []).extend([name] if name else [])
        tests = "; ".join(f"{f}::{', '.join(n)}" if n else f for f, n in by_file.items())
        rows.append(f"| `{m.id}` | `{m.file.removeprefix('zoft/')}` | `{m.old.strip()}` -> `{m.new.strip()}` | "
                    f"{tests} | {outcome} ({secs:.0f} s) |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ids", nargs="*", help="run only these mutation ids (default: all)")
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the targets")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation (default 900)")
    ap.add_argument("--markdown", metavar="FILE", help="also write the result table (markdown) to FILE")
    a = ap.parse_args(argv)
    by_id = {m.id: m for m in MUTATIONS}
    unknown = [i for i in a.ids if i not in by_id]
    if unknown:
        print(f"mutations: error: unknown id(s) {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    chosen = tuple(by_id[i] for i in a.ids) if a.ids else MUTATIONS
    if a.list:
        for m in chosen:
            print(f"{m.id:28s} {m.file}: {m.old.strip()!r} -> {m.new.strip()!r}  [{' '.join(m.tests)}]")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the temporary copy is removed
    t0 = time.monotonic()
    results = run(chosen, baseline=not a.no_baseline, timeout=a.timeout)
    bad = [m.id for m, outcome, _ in results if outcome != "killed"]
    print(f"{len(results) - len(bad)}/{len(results)} killed in {time.monotonic() - t0:.0f}s"
          + (f"; not killed: {', '.join(bad)}" if bad else ""))
    if a.markdown:
        Path(a.markdown).write_text(markdown(results) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
