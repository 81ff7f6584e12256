"""zoft.kernels: the element-wise kernels of a ZO step, each a Triton kernel beside its pure-torch reference.

Packaged under the import name ``zoft.kernels`` (setuptools ``package-dir``), never as a
top-level ``kernels``: that name belongs to the Hugging Face ``kernels`` package, which
bitsandbytes tries to import.

  philox   Philox4x32-10 counter-based z (Triton's ``tl.randn`` / ``tl.randint`` stream) and its
           bit-exact integer re-implementation in torch (``randint4x_ref``)
  axpy     one pass ``w <- a*w + sum_k c_k z(seed_k)``, z generated in registers, never stored
  sround   stochastic rounding fp32 -> bf16 from Philox bits (the kernel and its reference round
           alike on CPU and GPU); the engine does not use it: it rounds with a keyed torch.Generator
           per device (``zoft.engine.precision.KeyedRounder``), whose CPU and CUDA streams differ,
           so a bf16/fp16 run replays bit for bit only on the same device type
  codec8   8-bit transfer codec: per-block absmax int8; dequantisation kernel

Each public function dispatches on the tensor: CUDA (with ``triton`` installed) runs the Triton
kernel, anything else the torch reference. Tests run the Triton kernels on the CPU under
``TRITON_INTERPRET=1`` (set before importing this package).
"""
import importlib.util

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: the repository root is on sys.path (``python -m pytest`` or
    # a script run from the root, PYTHONPATH=.) and a library asked for Hugging Face's ``kernels``
    # (bitsandbytes: ``from kernels import get_kernel``; transformers' availability check imports
    # whatever ``find_spec("kernels")`` found). This folder must not answer, and raising ImportError
    # here is not enough: find_spec has already found the folder and transformers imports it without
    # a guard, so every model load would crash. Instead the module replaces itself in ``sys.modules``
    # (the import statement returns what is there once this file has run): with the real package if
    # one is installed further down sys.path, else with an empty namespace package (no file, no
    # attributes, no submodules), which transformers and bitsandbytes both read as "not installed".
    # No submodule of this folder is ever imported under the wrong name.
    import os as _os
    import sys as _sys
    from importlib.machinery import ModuleSpec as _ModuleSpec
    from importlib.machinery import PathFinder as _PathFinder

    def _installed_kernels():
        """The spec of a regular ``kernels`` package on sys.path other than this folder, or None."""
        me = _os.path.realpath(__file__)
        for entry in list(_sys.path):
            spec = _PathFinder.find_spec("kernels", [entry])
            if spec is not None and spec.origin and spec.loader and _os.path.realpath(spec.origin) != me:
                return spec
        return None

    def _not_installed(name: str):
        """``from kernels import get_kernel`` (bitsandbytes' probe) on the empty package: say what is
        true (Hugging Face's package is not installed), not Python's "cannot import name ...
        (unknown location)", which reads like a broken install. Only the Hub loaders answer so; any
        other look-up stays a plain AttributeError (``hasattr`` / ``getattr(m, x, None)`` probes)."""
        if name not in ("get_kernel", "get_local_kernel", "has_kernel", "load_kernel"):
            raise AttributeError(name)
        raise ModuleNotFoundError("No module named 'kernels' (Hugging Face's kernels package is not installed; "
                                  "the kernels/ folder here is zoft's, imported as zoft.kernels)", name="kernels")

    _real = _installed_kernels()
    _spec = _real or _ModuleSpec("kernels", None, is_package=True)
    _sys.modules["kernels"] = _mod = importlib.util.module_from_spec(_spec)
    if _real is not None:
        _spec.loader.exec_module(_mod)
    else:
        _mod.__getattr__ = _not_installed

TRITON_MIN = (3, 4)  # the Philox kernels draw at 64-bit offsets (tensors past 2^31 elements)


def _triton_version() -> tuple[int, ...] | None:
    """The installed ``triton``'s (major, minor), or None when it is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(v) for v in version("triton").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return None


# an older triton is treated as absent: every dispatch takes the torch reference
HAS_TRITON = (_triton_version() or (0,)) >= TRITON_MIN

__all__ = ["HAS_TRITON", "TRITON_MIN"]
