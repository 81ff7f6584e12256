"""Process settings for steps on the CPU: glibc malloc's thresholds.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a request above its
*mmap threshold* with a fresh ``mmap`` and returns the free top of its heap to the kernel once it
exceeds the *trim threshold*; both thresholds start low (128 kB) and follow the largest block
freed so far (up to 32 MB, trim twice that). A ZO step allocates and frees the same activations
every forward, so a process whose activations straddle those moving thresholds hands tens of MB
back to the kernel each step and takes them again page by page: every 4 kB page costs a minor
fault and a kernel zero-fill on first touch. Whether it happens depends on the process's history
(which blocks were freed first): a 2-block OPT with hidden 768 and 8 x 64 tokens re-faults ~10k
pages (~40 MB) per step under glibc's defaults and almost none with fixed thresholds
(``tests/test_runtime.py``); ``bench/step_cpu.py`` counts faults per step for every method.

``tune_cpu_allocator`` fixes the thresholds for the process: requests below 32 MB (glibc's ceiling
for the mmap threshold on 64-bit) come from the heap and up to 64 MB of free heap top is kept for
the next step. Larger requests (a causal LM's logits at a long batch) are still mmapped and
returned at once. ``zoft``'s commands call it at start; a Python program calls it itself (it is a
setting of the whole process, which a library should not change behind its caller's back).
"""
from __future__ import annotations

import ctypes
import os

# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # bytes: requests below this come from the heap (glibc's maximum on 64-bit)
TRIM_THRESHOLD = 64 << 20  # bytes of free heap top kept instead of returned to the kernel

_applied: tuple[int, int] | None = None


def _glibc() -> ctypes.CDLL | None:
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
    except (ValueError, OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def user_malloc_settings() -> list[str]:
    """The environment variables through which the user already set glibc malloc's behaviour."""
    return sorted(k for k in os.environ if k == "GLIBC_TUNABLES" or (k.startswith("MALLOC_") and k.endswith("_")))


def tune_cpu_allocator(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc malloc's mmap and trim thresholds (bytes) for this process, so that a training
    loop's activations are reused from the heap instead of being unmapped and faulted in again
    every step. Returns whether it applied them: ``False`` off glibc, or when the environment
    already sets malloc's behaviour (``GLIBC_TUNABLES``, ``MALLOC_*_``: the user's choice wins).
    Idempotent; the thresholds stay for the life of the process."""
    global _applied
    if _applied == (mmap_threshold, trim_threshold):
        return True
    if user_malloc_settings():
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
    if ok:
        _applied = (mmap_threshold, trim_threshold)
    return ok


def allocator_state() -> str:
    """One line for reports: which malloc settings this process runs under."""
    if _applied is not None:
        return f"glibc malloc, mmap threshold {_applied[0] >> 20} MB, trim threshold {_applied[1] >> 20} MB (zoft)"
    user = user_malloc_settings()
    if user:
        return "malloc as set by " + ", ".join(user)
    return "glibc malloc defaults (dynamic thresholds)" if _glibc() is not None else "the platform's malloc"
