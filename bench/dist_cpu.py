"""Data-parallel ZO on CPU: step throughput for 1 and 2 processes, and bytes on the wire per step.

Same model (a small OPT-shaped random model: 4 decoder layers, hidden 256, FFN 1024, vocab 320 with
a tiny BPE tokenizer trained here), same data, same seed, MeZO-SGD (one query per rank, two-sided),
``--batch-size`` B per rank, fp32. Each configuration is a real ``zoft finetune`` run (the
``--nproc`` launcher: one process with all threads, or 2 processes with ``OMP_NUM_THREADS =
cpus / 2`` each; ``--configs``). From ``metrics.jsonl`` (rank 0) it reports the median step time after warm-up,
examples/s and forward rows/s (rows = examples x probes) for the whole step, and ``comm_bytes``,
the bytes rank 0 hands to the all-gather each step (counted at the collective). Independently it
samples the loopback interface's transmitted bytes (``/proc/net/dev``, ``lo``) while the steps run,
so the per-step wire volume (TCP/IP headers and gloo framing included, both ranks' sends, and any
other loopback traffic on the machine at that time: an upper bound) is set against the model size.

    python bench/dist_cpu.py [--steps 40] [--batch-size 8] [--json FILE]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "movie", "was", "great", "and", "acting", "wonderful", "an", "awful", "waste", "of", "time", "a",
         "fine", "film", "with", "lovely", "cast", "plot", "boring", "hello", "world", "it", "story", "scene",
         "music", "long", "short"]


def make_assets(d: Path) -> int:
    """Model + tokenizer + a 256-line text file in ``d``; returns the parameter count."""
    import torch
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import AutoModelForCausalLM, OPTConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (24,), generator=g).tolist()) for _ in range(256)]
    tok.train_from_iterator(lines, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(d / "model")
    cfg = OPTConfig(vocab_size=320, hidden_size=256, num_hidden_layers=4, ffn_dim=1024, num_attention_heads=8,
                    max_position_embeddings=128, word_embed_proj_dim=256, dropout=0.0, use_cache=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(d / "model")
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return sum(p.numel() for p in model.parameters())


def lo_tx_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])  # transmit bytes
    return 0


def run(d: Path, nproc: int, steps: int, batch: int, threads: int) -> dict:
    """One ``zoft finetune --nproc nproc`` run, ``threads`` CPU threads per process."""
    out = d / f"run{nproc}x{threads}"
    argv = [sys.executable, "-m", "zoft", "finetune", "--model", str(d / "model"), "--task", "lm",
            "--train", str(d / "train.jsonl"), "--steps", str(steps), "--batch-size", str(batch),
            "--max-length", "32", "--lr", "1e-4", "--seed", "0", "--nproc", str(nproc),
            "--output-dir", str(out), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples = []  # (steps logged, lo tx bytes)
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        n = sum(1 for x in metrics.read_text().splitlines() if '"comm_bytes"' in x or '"projected_grad"' in x) \
            if metrics.exists() else 0
        samples.append((n, lo_tx_bytes()))
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"run with --nproc {nproc} failed: {proc.stderr.read()[-2000:]}")
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    recs = [m for m in recs if "step_time_s" in m]
    warm = max(3, steps // 5)
    t = statistics.median(m["step_time_s"] for m in recs[warm:])
    first = next((b for n, b in samples if n >= warm), None)
    last = next((b for n, b in samples if n >= steps - 2), None)
    lo_n = (steps - 2) - warm
    res = {"nproc": nproc, "threads_per_proc": threads, "median_step_s": t,
           "examples_per_step": recs[-1]["examples"], "examples_per_s": recs[-1]["examples"] / t,
           "rows_per_s": recs[-1]["examples"] * 2 / t, "comm_bytes_per_step": recs[-1].get("comm_bytes", 0),
           "final_loss": recs[-1]["loss"]}
    if first is not None and last is not None and lo_n > 0 and nproc > 1:
        res["lo_wire_bytes_per_step"] = (last - first) / lo_n
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8, help="examples per rank per step")
    cpus = os.cpu_count() or 2
    ap.add_argument("--configs", default=f"1x{cpus},1x{max(1, cpus // 2)},2x{max(1, cpus // 2)}",
                    help="comma-separated PROCSxTHREADS_PER_PROC runs (default: one process with all CPUs, "
                         "one with half, two with half each)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="zoft-dist-bench-") as tmp:
        d = Path(tmp)
        n_params = make_assets(d)
        runs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
        rows = [run(d, n, args.steps, args.batch_size, t) for n, t in runs]
    load = os.getloadavg()[0]
    print(f"# {datetime.date.today()}  model {n_params / 1e6:.2f}M params = {n_params * 4 / 1e6:.1f} MB fp32; "
          f"batch {args.batch_size}/rank x 32 tokens; {args.steps} steps; load avg {load:.1f}")
    print("nproc  thr/proc  step_s   ex/step  ex/s    rows/s  comm B/step  lo wire B/step  wire/model")
    for r in rows:
        wire = r.get("lo_wire_bytes_per_step")
        print(f"{r['nproc']:>5}  {r['threads_per_proc']:>8}  {r['median_step_s']:.4f}  {r['examples_per_step']:>7}  "
              f"{r['examples_per_s']:6.1f}  {r['rows_per_s']:6.1f}  {r['comm_bytes_per_step']:>11}  "
              f"{'-' if wire is None else f'{wire:.0f}':>14}  {'-' if wire is None else f'{wire / (n_params * 4):.1e}':>10}")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": str(datetime.date.today()), "params": n_params,
                                               "load_avg": load, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
