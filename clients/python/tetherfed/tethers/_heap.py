"""Keep freed memory in the process heap, so a training step's large tensors reuse pages.

A tethered layer allocates ``W ⊙ T`` in every forward and ``∂L/∂W_eff ⊙ T`` in every backward:
tensors the size of the weight. glibc's malloc serves an allocation above ``M_MMAP_THRESHOLD``
(128 KiB, raised adaptively up to 32 MiB) with a fresh ``mmap()`` and returns the heap's free top
above ``M_TRIM_THRESHOLD`` to the kernel, so on CPU each of those tensors is new memory whose pages
fault (and are zeroed by the kernel) on first touch. Measured on ResNet-18 (11.7 M weights, batch
8 at 64 × 64, 2 cores): 21.8 ms a step for the two products with fresh pages, 5.5 ms in reused
pages; the tethered step went from 1.27 × to 1.11 × the untethered one (which also got faster).
Keeping freed memory is what PyTorch's CPU performance guide gets from jemalloc or tcmalloc;
CUDA tensors are unaffected (PyTorch's caching allocator already reuses device memory).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys

log = logging.getLogger("tetherfed.tethers")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse (``mallopt``: mmap threshold 1 GiB, trim
    threshold 2 GiB − 1), once per process.

    Returns True when the setting is in force (set now or by an earlier call), False where it
    does not apply: not Linux, a C library without ``mallopt`` (musl), or the user chose the
    thresholds already through glibc's ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
    environment variables (their choice stands). The cost: the process's resident memory stays
    near its peak instead of shrinking between steps. Raises nothing.
    """
    if not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    kept = bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    if kept:
        log.debug("malloc keeps freed memory (mmap threshold 1 GiB)")
    return kept
