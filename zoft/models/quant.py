"""bitsandbytes bases: imported only on the paths that use them, always in their canonical (saved) layout.

bitsandbytes (0.50) has a second, CPU-only layout for 4-bit weights. On a CPU with AVX512-BF16
(``bitsandbytes.functional.has_avx512bf16()``, copied into each ``Linear4bit`` as
``support_avx512bf16_for_cpu``), the first forward in eval mode without grad repacks the layer in
place: a new ``weight.data`` (``[N, K/2]``, nibbles interleaved per 32 output rows), the absmax cast
to bf16 and transposed (``[K/64, N]``), ``quant_state.packing_format_for_cpu`` set; the matmul then
runs in bf16 whatever ``bnb_4bit_compute_dtype`` says. ``state_dict()`` converts the weight back but
leaves the absmax bf16 and transposed. On other CPUs and on CUDA none of this happens. zoft runs every
forward in eval mode without grad, so on such a CPU it would meet, mid-run:

* a ``weight.data`` replaced under the engine's views (streamed blocks point it into their slot);
* activations in bf16 (relative error ~4e-3 measured on a 512x2048 layer), a floor below which a ZO
  loss difference ``L(w + eps z) - L(w - eps z)`` is noise;
* a base whose saved bytes (the absmax) differ from the ones it was loaded with, and a hard crash
  for a layer whose input dimension is not a multiple of 64 or output dimension of 32.

So zoft keeps the canonical layout everywhere: ``keep_canonical_layout`` switches the CPU layout off
per layer (bitsandbytes' own per-layer flag; nothing global is patched) and converts back any layer
already repacked (a model evaluated before it reached zoft). Every device then runs the same bytes
and the same fp32 (compute-dtype) matmul, and any layer shape bitsandbytes quantizes works.

8-bit layers (LLM.int8()) have one layout everywhere but cache their int8 weight beside
``weight.data``; ``keep_canonical_layout`` makes them read the weight they hold at each call, so a
streamed block computes from the bytes it uploaded.

``quiet_import`` keeps bitsandbytes' import-time probe quiet: on such a CPU its CPU backend tries
Hugging Face's ``kernels`` package for a fused kernel of that CPU layout and logs a warning when it is
missing. zoft never takes that layout, so the warning says nothing about a zoft run.
"""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

from zoft.errors import UsageError

_PROBE_LOGGER = "bitsandbytes.backends.cpu.ops"
_PROBE_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropProbeWarning(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_PROBE_MESSAGE)


def quiet_import() -> None:
    """Ready the import of bitsandbytes (directly, or through peft, which imports it when installed):
    its CPU backend's probe for a kernel of the CPU layout that zoft never uses stays quiet. Call
    before importing either; does not import bitsandbytes itself."""
    log = logging.getLogger(_PROBE_LOGGER)
    if not any(isinstance(f, _DropProbeWarning) for f in log.filters):
        log.addFilter(_DropProbeWarning())


def import_bitsandbytes(needed_by: str) -> Any:
    """The ``bitsandbytes`` module, imported quietly; a one-line UsageError naming ``needed_by``
    (e.g. "--quant 4bit") when it is not installed."""
    quiet_import()
    try:
        import bitsandbytes
    except ImportError:
        raise UsageError(f"{needed_by} needs bitsandbytes: pip install 'zoft[quant]'") from None
    return bitsandbytes


def describe_cpu_path() -> str:
    """One line saying which 4-bit CPU path bitsandbytes would take on this machine (CI logs)."""
    try:
        bnb = import_bitsandbytes("describe_cpu_path")
    except UsageError:
        return "bitsandbytes: not installed"
    if bnb.functional.has_avx512bf16():
        return (f"bitsandbytes {bnb.__version__}: this CPU has AVX512-BF16, so 4-bit layers would repack for "
                "bitsandbytes' bf16 CPU kernel; zoft keeps the canonical layout")
    return f"bitsandbytes {bnb.__version__}: no AVX512-BF16 on this CPU, 4-bit layers keep the canonical layout"


def _int8_reads_its_weight(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a ``Linear8bitLt``: its matmul reads the int8 weight and row scales the
    layer holds now (``weight.data``, ``weight.SCB``: a streamed block points them into its slot)."""
    module.state.CB, module.state.SCB = module.weight.data, module.weight.SCB


def keep_canonical_layout(model: nn.Module) -> int:
    """Switch bitsandbytes' CPU-only 4-bit layout off on every ``Linear4bit`` of ``model`` and bring
    back to the canonical layout any layer already repacked; returns how many were repacked.

    8-bit layers (``Linear8bitLt``, LLM.int8()) have one layout on every device, but keep the int8
    weight in a second place: ``weight.CB``, which the first forward moves, with the row scales, into
    the layer's matmul state and computes from ever after, whatever ``weight.data`` then points to. A
    streamed block repoints ``weight.data`` into its slot on each upload, so each such layer drops
    that second reference and reads its weight at every call (``_int8_reads_its_weight``).

    A repacked layer's weight bytes come back exactly (bitsandbytes' own inverse, run by
    ``state_dict``); its absmax was rounded to bf16 by the repacking, so it comes back as fp32 in
    canonical order holding those bf16 values (a double-quantized absmax is re-quantized by
    bitsandbytes). Duck-typed: a model without bitsandbytes layers costs one pass over its modules."""
    repacked = 0
    for m in model.modules():
        if callable(getattr(type(m), "init_8bit_state", None)) and not m.state.has_fp16_weights:
            if m.weight.SCB is None:  # a layer that already ran: its row scales went to its state
                m.weight.SCB = m.state.SCB
            m.weight.CB = None  # the same tensor as weight.data, under a name the engine does not repoint
            if _int8_reads_its_weight not in m._forward_pre_hooks.values():
                m.register_forward_pre_hook(_int8_reads_its_weight)
        if not hasattr(m, "support_avx512bf16_for_cpu"):
            continue
        m.support_avx512bf16_for_cpu = False
        qs = getattr(m.weight, "quant_state", None)
        if not getattr(qs, "packing_format_for_cpu", False):
            continue
        m.state_dict()  # bitsandbytes converts the weight back in place when it saves
        if not qs.nested and qs.absmax.dim() == 2:  # [K/blocksize, N] bf16 -> [N*K/blocksize] fp32
            qs.absmax = qs.absmax.t().contiguous().reshape(-1).float()
        repacked += 1
    return repacked
