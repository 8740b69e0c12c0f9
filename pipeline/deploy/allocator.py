"""A heap that does not page-fault while networks are timed (``nps latency``, ``nps latency-model``).

PyTorch allocates every CPU tensor with the C library's ``malloc``. glibc's serves a large block by ``mmap`` (above
a threshold that starts at 128 KiB and moves with what was freed) and gives the top of its heap back to the system
when more than a trim threshold of it is free; either way the next forward touches fresh pages and pays a minor page
fault per 4 KiB page. Which forward pays depends on what ran before it: a MobileNetV2 base network timed after one of
its pruned copies took 1,100-1,200 page faults per forward for the first few dozen pairs and none after, its runs
some 20 % slower, so its subnetworks' paired ratios came out 0.60 instead of 0.72 (docs/study-latency.md). PyTorch's
performance guide advises an allocator that keeps its memory (jemalloc, tcmalloc); :func:`steady_heap` does the
same with glibc's own knobs, for the rest of the process: blocks up to 32 MiB (glibc's largest threshold) come from
the heap, and the heap is never trimmed. Memory a forward freed stays with the process, which is what a timing
process wants. Elsewhere (another C library, another system) nothing changes, and the session says so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # the largest glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes an int: as good as never
STEADY = "glibc malloc: blocks up to 32 MiB from the heap, never trimmed"
UNCHANGED = "the C library's malloc as it is"

_state: str | None = None


def steady_heap() -> str:
    """Set glibc's malloc not to return memory to the system while this process times networks (see the module
    docstring); once per process. Returns what the allocator now does, for the session's settings."""
    global _state
    if _state is None:
        _state = STEADY if _set_glibc() else UNCHANGED
    return _state


def _set_glibc() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no C library to load, or one without mallopt (musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
