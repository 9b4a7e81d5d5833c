"""Giving the C heap's free pages back to the system between the searches' steps.

The searches make many temporaries of a few to tens of MB (a chunk of a rounded linear, a clip search's
partial products). glibc serves sizes under its mmap threshold — which rises to 32 MB once larger blocks
have been freed — from its heaps, and pages freed in the middle of a heap stay resident: at 70B width
the exporter's resident memory rose GBs above what it held (docs/export-memory.md). ``trim`` asks glibc to
return every free page (``malloc_trim(0)``); the searches call it after each step, so the heap's reuse
within a step is kept and its high-water mark does not carry into the next. Elsewhere (another libc,
another system) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    return getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own C library: glibc has it


def trim() -> bool:
    """Return the C heap's free pages to the system; whether there was a glibc to ask."""
    f = _malloc_trim()
    if f is None:
        return False
    f(0)
    return True
