"""Tiny random-weight configs for every family zoft supports (shared by several test files)."""
from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    BloomConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

V = 320  # >= the tiny tokenizer's vocabulary

_COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=128)

FAMILIES = {
    "opt": lambda: OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                             max_position_embeddings=128, word_embed_proj_dim=32, dropout=0.0),
    "opt-proj": lambda: OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                  num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=16,
                                  do_layer_norm_before=False, dropout=0.0),
    "llama": lambda: LlamaConfig(**_COMMON, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=64),
    "qwen2": lambda: Qwen2Config(**_COMMON, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=8),
    "gpt2": lambda: GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt_neox": lambda: GPTNeoXConfig(**_COMMON, hidden_dropout=0.0, attention_dropout=0.0),
    "phi3": lambda: Phi3Config(**_COMMON, num_key_value_heads=2, pad_token_id=0),
    # BLOOM passes ALiBi biases shaped (batch * heads, 1, T): split by P chunks of dim 0
    "bloom": lambda: BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0,
                                 attention_dropout=0.0),
    "bert": lambda: BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=128),
}
ENCODERS = {"bert"}
QUANT_WIDTH = 64  # hidden size of the quantized tests' models: bitsandbytes' block size


def bnb_cpu_layout(model: torch.nn.Module, on: bool) -> int:
    """Set bitsandbytes' per-layer switch of its CPU-only 4-bit layout (``support_avx512bf16_for_cpu``,
    which a ``Linear4bit`` copies from ``has_avx512bf16()`` when built) on every 4-bit layer of
    ``model``: ``on`` is what every layer says on a CPU with AVX512-BF16, off what it says on any other
    CPU or on CUDA. Lets one machine run both kinds of CPU's code path. Returns the layers set."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for m in layers:
        m.support_avx512bf16_for_cpu = on
    return len(layers)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, layers: int | None = None,
               width: int | None = None) -> torch.nn.Module:
    """A tiny random-weight model of ``family`` in eval mode (fixed init for a given seed), with
    2 blocks or ``layers``, and hidden size 32 or ``width`` (MLP ``2 * width``, heads unchanged).

    Quantized tests use ``width=QUANT_WIDTH``: every linear layer then has the shape of a real
    model's (dimensions multiples of bitsandbytes' 64-wide blocks)."""
    cfg = FAMILIES[family]()
    if width is not None:
        heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
        for attr in ("hidden_size", "n_embd", "word_embed_proj_dim"):
            if hasattr(cfg, attr):
                setattr(cfg, attr, width)
        for attr in ("intermediate_size", "ffn_dim"):
            if hasattr(cfg, attr):
                setattr(cfg, attr, 2 * width)
        if getattr(cfg, "head_dim", None):
            cfg.head_dim = width // heads
    if layers is not None:
        for attr in ("num_hidden_layers", "n_layer"):
            if hasattr(cfg, attr):
                setattr(cfg, attr, layers)
        if getattr(cfg, "layer_types", None):  # per-layer attention types (Qwen2, ...): one per layer
            cfg.layer_types = cfg.layer_types[:1] * layers
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    cls = AutoModelForMaskedLM if family in ENCODERS else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls.from_config(cfg)
        # Give biases/norms non-trivial values so that errors in their handling show up.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.ndim == 1:
                    p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype).eval()


def tiny_batch(batch: int = 3, length: int = 9, seed: int = 0, pad_last: int = 2) -> dict[str, torch.Tensor]:
    """Random token ids with right padding on the last row (so masks matter)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad_last:
        mask[-1, -pad_last:] = 0
    return {"input_ids": ids, "attention_mask": mask}
