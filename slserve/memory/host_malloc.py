"""Give freed host memory back to the OS when the engine goes idle (glibc only).

Each step allocates activations, logits and sampling buffers whose sizes follow the batch, so
they vary from step to step. glibc serves them from its heaps (it raises its mmap threshold to the
largest block freed so far, up to 32 MiB) and keeps freed space inside a heap mapped: after a
burst of traffic the process's resident memory stays at the burst's high-water mark plus
fragmentation, and grows further with each burst of a different shape, though nothing is live.
malloc_trim(0) returns every free page of every arena to the OS (MADV_DONTNEED); it costs a few
milliseconds, so the engine calls it only when it runs out of work, not between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from functools import cache

logger = logging.getLogger(__name__)


@cache
def _libc_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc; musl has no malloc_trim (and keeps no such heaps)
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return free heap pages to the OS; False where the C library offers no way to."""
    trim = _libc_malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
