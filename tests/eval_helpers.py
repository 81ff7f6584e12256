"""Shared pieces of the ``zoft.eval`` tests: a tiny random-weight OPT and module-scoped fixtures.

Test modules import the fixtures by name (pytest picks up fixtures defined in or imported into a
test module)::

    from eval_helpers import model_fixture, one_torch_thread, tok_fixture  # noqa: F401

The fixtures are named ``tok`` / ``model`` but defined as ``*_fixture`` functions, so that test
functions taking ``tok`` / ``model`` arguments do not shadow an imported name (ruff F811).
"""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_tokenizer
from transformers import AutoModelForCausalLM, OPTConfig


def tiny_eval_opt(tok, hidden: int = 32, seed: int = 0, max_pos: int = 512, **config):
    """A 2-layer OPT (``ffn_dim = 2 * hidden``) with weights drawn from ``seed``, in eval mode.

    The global torch RNG is left as it was. ``config`` overrides further ``OPTConfig`` fields."""
    cfg = OPTConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, ffn_dim=2 * hidden,
                    num_attention_heads=4, max_position_embeddings=max_pos, word_embed_proj_dim=hidden,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2, **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny-model forwards are overhead-bound: one intra-op thread is as fast alone and ~10x
    faster when the CPU is shared. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", name="tok")
def tok_fixture():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module", name="model")
def model_fixture(tok):
    return tiny_eval_opt(tok)
