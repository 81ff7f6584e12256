"""zoft.kernels: the element-wise kernels of a ZO step, each a Triton kernel beside its pure-torch reference.

Packaged under the import name ``zoft.kernels`` (setuptools ``package-dir``), never as a
top-level ``kernels``: that name belongs to the Hugging Face ``kernels`` package, which
bitsandbytes tries to import.

  philox   Philox4x32-10 counter-based z (Triton's ``tl.randn`` / ``tl.randint`` stream) and its
           bit-exact integer re-implementation in torch (``randint4x_ref``)
  axpy     one pass ``w <- a*w + sum_k c_k z(seed_k)``, z generated in registers, never stored
  sround   stochastic-rounding write-back fp32 -> bf16 (Philox bits, so CPU and GPU round alike)
  codec8   8-bit transfer codec: per-block absmax int8; dequantisation kernel

Each public function dispatches on the tensor: CUDA (with ``triton`` installed) runs the Triton
kernel, anything else the torch reference. Tests run the Triton kernels on the CPU under
``TRITON_INTERPRET=1`` (set before importing this package).
"""
import importlib.util

HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = ["HAS_TRITON"]
