"""Giving freed heap memory back to the system after a batch search.

A batch search builds score tables of a few MB per query chunk. glibc serves such sizes
from its heap once its mmap threshold has risen (it does after the first large free), and
a fragmented heap keeps them: on glove-50 a SPANN process held ~27 MB more after its
batches, which malloc_trim gives back (1.6 MB left). A no-op where there is no glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim() -> None:
    """Return the free pages of the heap to the system (glibc's malloc_trim)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
