"""ZO-RankSGD steering a tiny causal LM with a ranking oracle (the worked example in docs/optimizers.md).

The oracle is a "judge" (``CallableOracle``): it sees the m candidates' next-token distributions on
a fixed set of prompts and returns only their *ranking* by how much probability they put on a set
of preferred tokens (the reward). zoft never sees a loss value. Every ``--eval-every`` steps the
unperturbed model's reward and the share of preferred tokens in its greedy continuations are
recorded; the plot goes to ``docs/ranksgd_example.png``.

    python bench/ranksgd_example.py [--steps 200] [--out docs/ranksgd_example.png]
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from zoft.engine import ZOEngine
from zoft.optim import CallableOracle, greedy_generate, make_optimizer, step
from zoft.tasks.base import Batch

V = 320


def tiny_llama(seed: int) -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=64, use_cache=False)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/ranksgd_example.png")
    args = ap.parse_args()
    torch.set_num_threads(1)

    model = tiny_llama(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    preferred = torch.randperm(V, generator=g)[:16]  # the tokens the reward prefers: 5% of the vocabulary
    prompts = torch.randint(3, V, (8, 6), generator=g)  # (R, T) unpadded prompts
    batch = Batch({"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}, size=8)

    def reward(logits: torch.Tensor) -> float:
        """Mean probability mass on the preferred tokens over every prompt position."""
        return float(logits.float().softmax(-1)[..., preferred].sum(-1).mean())  # logits: (R, T, V)

    def judge(candidates, b) -> list[int]:
        """Sees the m candidates' outputs, answers with a ranking (best first) and nothing else."""
        scores = [reward(c.logits) for c in candidates]
        return sorted(range(len(scores)), key=lambda i: -scores[i])

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            r = reward(model(**batch.inputs).logits)
            ids = greedy_generate(8)(model, batch)[:, prompts.shape[1]:]  # (R, 8) generated tokens
        return r, float(torch.isin(ids, preferred).float().mean())

    opt = make_optimizer("zo-ranksgd", {"lr": args.lr, "eps": args.eps, "m": args.m}, seed=args.seed,
                         total_steps=args.steps)
    oracle = CallableOracle(judge)
    steps, rewards, shares = [], [], []
    t0 = time.perf_counter()
    with ZOEngine(model) as engine:
        for t in range(args.steps + 1):
            if t % args.eval_every == 0:
                engine.flush()
                r, s = evaluate()
                steps.append(t), rewards.append(r), shares.append(s)
                print(f"step {t:4d}  reward {r:.4f}  preferred share of greedy tokens {s:.3f}", flush=True)
            if t < args.steps:
                step(engine, opt, batch, oracle, t)
    wall = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    print(f"{n} parameters, m={args.m}, lr={args.lr}, eps={args.eps}: reward {rewards[0]:.4f} -> {rewards[-1]:.4f}, "
          f"greedy share {shares[0]:.3f} -> {shares[-1]:.3f} in {args.steps} steps ({wall:.1f} s)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, rewards, marker="o", ms=3, label="reward: P(preferred token), mean over positions")
    ax.plot(steps, shares, marker="s", ms=3, label="share of preferred tokens in greedy continuations")
    ax.axhline(len(preferred) / V, color="gray", ls=":", lw=1, label="uniform chance (16/320)")
    ax.set_xlabel("ZO-RankSGD step (the oracle returns rankings only)")
    ax.set_ylabel("fraction")
    ax.set_title(f"ZO-RankSGD, m={args.m}, tiny Llama ({n} params)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
