"""Return freed activation memory to the OS during CPU training (``train.release_freed_memory``).

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves requests above ``M_MMAP_THRESHOLD``
(128 KiB at start) with ``mmap`` and returns them to the OS on ``free``, but the threshold is *dynamic*: each time
an mmapped chunk is freed, the threshold rises to that chunk's size (up to 32 MiB). After the first training step,
activation tensors of a few MiB (batch x length x hidden) therefore come from the heap instead; freed ones stay
there, and the heap fragments as tensors of many sizes come and go, so the resident set keeps memory no tensor
uses. Measured on SmolLM2-135M, LoRA q,v, batch 4 x 530 tokens, fp32 (`benchmarks/activation_memory.py`): the peak RSS
above the loaded model was 4.00 GiB after two steps with the dynamic threshold, 2.53 GiB with it fixed, against
about 2 GiB of activations that autograd actually saves.

Fixing the threshold (any ``mallopt(M_MMAP_THRESHOLD, ...)`` call turns the dynamic adjustment off for the rest of
the process) keeps large tensors on ``mmap``: freed memory goes back at once, at the price of a page fault per page
of each new large tensor. Other allocators (jemalloc, tcmalloc, non-glibc C libraries) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value: tensors above it get their own mapping


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The process's glibc, or None on another C library or OS."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process.

    Returns:
        True when the setting took effect; False on a non-glibc system (nothing changes there).
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(threshold)))
