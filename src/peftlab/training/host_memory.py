"""Return freed activation memory to the OS during CPU training (``train.release_freed_memory``).

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves requests above ``M_MMAP_THRESHOLD``
(128 KiB at start) with ``mmap`` and returns them to the OS on ``free``, but the threshold is *dynamic*: each time
an mmapped chunk is freed, the threshold rises to that chunk's size (up to 32 MiB). After the first training step,
activation tensors of a few MiB (batch x length x hidden) therefore come from the heap instead; freed ones stay
there, and the heap fragments as tensors of many sizes come and go, so the resident set keeps memory no tensor
uses.

Fixing the threshold (any ``mallopt(M_MMAP_THRESHOLD, ...)`` call turns the dynamic adjustment off for the rest of
the process) keeps large tensors on ``mmap``: freed memory goes back at once, at the price of page faults (and
zeroing) for every page of every new large tensor. Measured on SmolLM2-135M, LoRA q,v, batch 4 x 512 tokens, fp32,
2 threads (``python benchmarks/activation_memory.py --lengths 512``): the training peak above the loaded model was
4244 MiB with glibc's dynamic threshold and 2532 MiB with it fixed (autograd itself saves 1900 MiB), but a step took
12.1 s instead of 8.2 s; ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's transparent-huge-page advice) did not change that.
It is therefore an option (``train.release_freed_memory``, off by default) between the default and gradient
checkpointing (``benchmarks/activation_memory.py`` reports all three). Other allocators (jemalloc, tcmalloc,
non-glibc C libraries) are left alone.
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


def trim_heap() -> bool:
    """Give the heap's free memory back to the OS now (glibc ``malloc_trim(0)``); False where there is no glibc."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(ctypes.c_size_t(0)))
