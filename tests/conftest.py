"""Shared test fixtures: a tiny byte-level BPE tokenizer and tiny random-weight models.

Nothing here touches the network: the tokenizer is trained in-process on a few sentences,
and models are built from configs with random weights.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys

import pytest
import torch

torch.set_num_threads(2)


def _import_triton_interpreted() -> None:
    """Without CUDA, Triton kernels run only under its interpreter, and triton's own ``@jit``
    library functions (``tl.randint4x``, ...) are interpreted only if ``TRITON_INTERPRET=1`` when
    triton is first imported; whichever test imported it first (transformers' Trainer does) would
    decide for the session. Import it that way once, then restore the environment: zoft's own
    kernels stay compiled-mode functions (``tests/test_kernels.py`` interprets private copies)."""
    if "triton" in sys.modules or torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


_import_triton_interpreted()

_CORPUS = [
    "the movie was great and the acting was wonderful",
    "the movie was terrible and the plot was boring",
    "a fine film with a lovely cast",
    "an awful waste of time",
    "Question: what is the capital of France?\nAnswer: Paris",
    "The following are multiple choice questions (with answers) about biology.",
    "A. B. C. D. Answer: Yes No Maybe so because",
    "It was great. It was terrible. hello world 0123456789",
]


@functools.lru_cache(maxsize=1)
def make_tiny_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer (vocab ~320) with BOS prepended, like OPT's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA: skipped (with the reason) where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (pytest -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cpu_unless_marked_gpu(request, monkeypatch):
    """On a GPU machine the suite runs as on a CPU: ``device="auto"`` (the default of finetune,
    unlearn and the CLI) resolves to the CPU, in this process and in the subprocesses tests start,
    unless the test is marked ``gpu`` (those run the CUDA paths: ``pytest -m gpu``)."""
    if "gpu" in request.keywords or not torch.cuda.is_available():
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()
