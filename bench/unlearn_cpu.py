"""Does low-grade unlearning survive 4-bit quantization and relearning better than Adam? A CPU
experiment anyone can rerun (measured: 3.6 min per seed, seeds run in parallel with --threads 1,
on 2 cores shared with other jobs; results and their reading: docs/unlearning.md)::

    PYTHONPATH=. python bench/unlearn_cpu.py --out /tmp/unlearn_cpu          # 3 seeds
    PYTHONPATH=. python bench/unlearn_cpu.py --quick --out /tmp/uq           # smoke run (~1 min)
    # seeds in parallel processes, then the summary of all three:
    for s in 0 1 2; do PYTHONPATH=. python bench/unlearn_cpu.py --seeds $s --threads 1 --out D & done; wait
    PYTHONPATH=. python bench/unlearn_cpu.py --seeds 0,1,2 --reuse --out D

Per seed s (model init, data, probes):

1. Data: synthetic "facts" (``"<first> <last> lives in <city> and works as a <job> ."``), 16 forget
   and 32 retain people, random attribute combinations, so the model can only get them right by
   memorising them. A word-level tokenizer is trained in-process (offline).
2. A random-init GPT-2-shaped model (2 layers, width 64, ~0.11M parameters) is trained first-order
   (AdamW, lr 3e-3, 300 steps of 16 facts) on forget + retain until it recites both (next-token
   accuracy ~88%; the ceiling is ~91%: a fact's first word cannot be predicted). ``retrain``: the same
   model trained on the retain facts only, the gold standard an unlearned model should match.
3. Unlearning with NPO (beta 0.1, + retain NLL, the paper's headline objective), the same number of
   steps and the same lr for every optimizer: adam, sign-adam (1-bit), zo (R-AdaZO, q probe pairs on
   the unit sphere) and hybrid (Adam / R-AdaZO blocks, ending on ZO), through ``zoft.unlearn.unlearn``.
4. Attacks on the unlearned model: bitsandbytes NF4 reload (``zoft.unlearn.quantize``) and
   relearning (AdamW on 4 of the 16 forget samples, evaluated on all 16).

Metrics (``zoft.unlearn.lm_evaluator``): forget / retain next-token accuracy (%) and mean token NLL.
Prints one markdown table (mean +- std over seeds) and writes ``results.json`` / ``results.md`` /
``results.png`` in ``--out``. No number is tuned towards the paper's claim: lr and steps were chosen
once so that Adam clearly unlearns, and are shared by every optimizer.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

FIRST = ["anna", "boris", "chen", "dana", "emil", "fatima", "gita", "hugo", "ines", "jon", "kira", "liam", "mona",
         "nils", "olga", "pablo", "quinn", "rosa", "sven", "tara", "ugo", "vera", "wim", "xena", "yuri", "zoe"]
LAST = ["abel", "berg", "costa", "dahl", "engel", "falk", "gomez", "haas", "ivanov", "jung", "keller", "lund",
        "meyer", "novak", "ortiz", "park", "quist", "roth", "stein", "tanaka", "urban", "vogel", "wolf", "young"]
CITY = ["paris", "lima", "oslo", "cairo", "quito", "perth", "delhi", "rome", "seoul", "tunis", "accra", "bern",
        "hanoi", "kyiv", "lagos", "minsk", "nairobi", "riga", "sofia", "tokyo"]
JOB = ["baker", "pilot", "nurse", "judge", "farmer", "painter", "doctor", "miner", "tailor", "sailor", "cook",
       "clerk", "poet", "guard", "smith", "vet", "chemist", "teacher", "writer", "plumber"]


def make_facts(seed: int, n_forget: int, n_retain: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    people = rng.sample([(f, l) for f in FIRST for l in LAST], n_forget + n_retain)
    facts = [f"{f} {l} lives in {rng.choice(CITY)} and works as a {rng.choice(JOB)} ." for f, l in people]
    return facts[:n_forget], facts[n_forget:]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(FIRST + LAST + CITY + JOB + ["lives", "in", "and", "works", "as", "a", "."]))
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_model(vocab: int, seed: int, width: int, layers: int):
    from transformers import AutoModelForCausalLM, GPT2Config

    cfg = GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=4, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg).eval()


def memorise(model, tok, texts: list[str], steps: int, lr: float, seed: int) -> None:
    """First-order AdamW on all facts (batch 16), deterministic in ``seed``."""
    from zoft.tasks.lm import call_model
    from zoft.unlearn import batch_indices, make_batch, row_nll

    rows = [tok(t)["input_ids"] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for t in range(steps):
        b = make_batch(tok, [rows[i] for i in batch_indices(len(rows), 16, t, seed)])
        with torch.enable_grad():
            nll, cnt = row_nll(call_model(model, b, causal=True).logits, b.targets["labels"])
            loss = nll.sum() / cnt.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)


METHODS = {
    "adam": {"optimizer": "adam"},
    "sign-adam": {"optimizer": "sign-adam", "optimizer_options": {"bits": 1}},
    "zo": {"optimizer": "zo", "optimizer_options": {"q": 4, "mu": 1e-3}},
    "hybrid": {"optimizer": "hybrid", "optimizer_options": {"fo_block": 10, "zo_block": 10, "q": 4, "mu": 1e-3}},
}


def run_seed(seed: int, a: argparse.Namespace, work: Path) -> dict:
    from zoft.unlearn import lm_evaluator, quantize, relearn, tokenize_rows, unlearn

    tok = make_tokenizer()
    forget, retain = make_facts(seed, a.n_forget, a.n_retain)
    base = make_model(len(tok), seed, a.width, a.layers)
    t0 = time.perf_counter()
    memorise(base, tok, forget + retain, a.train_steps, 3e-3, seed)
    f_rows = tokenize_rows(tok, forget, max_length=32)
    r_rows = tokenize_rows(tok, retain, max_length=32)
    ev = lm_evaluator(f_rows, r_rows)
    out = {"original": ev(base, tok)}
    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(d)
        out["original+nf4"] = ev(quantize(d, "nf4"), tok)
    out["train_s"] = time.perf_counter() - t0
    # the gold standard: the same model trained on the retain facts only (never saw the forget set)
    gold = make_model(len(tok), seed, a.width, a.layers)
    memorise(gold, tok, retain, a.train_steps, 3e-3, seed)
    out["retrain"] = ev(gold, tok)
    for name, spec in METHODS.items():
        if a.methods and name not in a.methods:
            continue
        t0 = time.perf_counter()
        m = make_model(len(tok), seed, a.width, a.layers)
        m.load_state_dict(base.state_dict())
        run_dir = work / f"seed{seed}_{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        res = unlearn(model=m, tokenizer=tok, forget=forget, retain=retain, objective="npo",
                      objective_options={"beta": 0.1, "retain_weight": 1.0}, lr=a.lr, steps=a.steps,
                      batch_size=8, retain_batch_size=8, seed=seed, output_dir=str(run_dir), progress=False,
                      eval="none", **spec)
        row = {"unlearned": ev(res.model, tok)}
        row["unlearned+nf4"] = ev(quantize(run_dir, "nf4"), tok)
        rl = relearn(res.model, tok, f_rows, lr=a.relearn_lr, steps=a.relearn_steps, samples=4, batch_size=4,
                     seed=seed)
        row["unlearned+relearn"] = ev(rl, tok)
        row["time_s"] = time.perf_counter() - t0
        out[name] = row
        print(f"seed {seed} {name:9s} " + "  ".join(f"{k}: f_acc {v['forget_acc']:.1f} r_acc {v['retain_acc']:.1f}"
                                                     for k, v in row.items() if isinstance(v, dict)), flush=True)
    return out


def summarise(per_seed: dict[int, dict], metrics=("forget_acc", "retain_acc", "forget_nll", "retain_nll")) -> tuple:
    rows: dict[str, dict[str, tuple[float, float]]] = {}

    def ms(vals):
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    seeds = list(per_seed)
    for stage in ("original", "original+nf4", "retrain"):
        rows[stage] = {k: ms([per_seed[s][stage][k] for s in seeds]) for k in metrics}
    for name in METHODS:
        if name not in per_seed[seeds[0]]:
            continue
        for stage in ("unlearned", "unlearned+nf4", "unlearned+relearn"):
            rows[f"{name}: {stage.replace('unlearned', 'after') if stage != 'unlearned' else 'unlearned'}"] = {
                k: ms([per_seed[s][name][stage][k] for s in seeds]) for k in metrics}
    lines = ["| stage | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for stage, vals in rows.items():
        lines.append(f"| {stage} | " + " | ".join(f"{m:.2f} +- {s:.2f}" for m, s in (vals[k] for k in metrics)) + " |")
    return rows, "\n".join(lines)


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if f"{m}: unlearned" in rows]
    stages = ["unlearned", "after+nf4", "after+relearn"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("forget_acc", "retain_acc")):
        for j, st in enumerate(stages):
            vals = [rows[f"{m}: {st}"][metric] for m in methods]
            ax.bar([i + 0.25 * j for i in range(len(methods))], [v[0] for v in vals], 0.25,
                   yerr=[v[1] for v in vals], label=st)
        ax.axhline(rows["original"][metric][0], color="k", ls="--", lw=1, label="original")
        ax.axhline(rows["retrain"][metric][0], color="g", ls=":", lw=1, label="retrain (gold)")
        ax.set_xticks([i + 0.25 for i in range(len(methods))], methods)
        ax.set_title(f"{metric} (%)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=60, help="unlearning steps (every optimizer)")
    p.add_argument("--lr", type=float, default=1e-3, help="unlearning lr (FO and ZO)")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--relearn-steps", type=int, default=20)
    p.add_argument("--relearn-lr", type=float, default=1e-3)
    p.add_argument("--n-forget", type=int, default=16)
    p.add_argument("--n-retain", type=int, default=32)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--methods", default="", help="comma list (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1 seed, short runs (smoke test)")
    p.add_argument("--reuse", action="store_true", help="load seeds already written to --out/seed<s>.json")
    p.add_argument("--out", default="unlearn_cpu_out")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.steps, a.train_steps, a.relearn_steps, a.width, a.layers = "0", 4, 30, 2, 64, 2
    a.methods = [m for m in a.methods.split(",") if m]
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    per_seed = {}
    for s in (int(x) for x in a.seeds.split(",")):
        f = out / f"seed{s}.json"
        if a.reuse and f.is_file():  # a seed finished by an earlier (e.g. parallel) invocation
            per_seed[s] = json.loads(f.read_text())
            continue
        per_seed[s] = run_seed(s, a, out / "runs")
        f.write_text(json.dumps(per_seed[s], indent=1))
    rows, table = summarise(per_seed)
    meta = {"command": "python bench/unlearn_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "torch": torch.__version__,
            "args": vars(a), "total_s": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps({"meta": meta, "per_seed": per_seed,
                                                  "summary": {k: {m: list(v) for m, v in r.items()}
                                                              for k, r in rows.items()}}, indent=1))
    (out / "results.md").write_text(f"{meta['command']}  ({meta['date_utc']} UTC, {meta['total_s']:.0f} s)\n\n{table}\n")
    plot(rows, out / "results.png")
    print(table)
    print(f"total {meta['total_s']:.0f} s; results in {out}")
    return 0 if all(math.isfinite(v[0]) for r in rows.values() for v in r.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
