"""Giving the C heap's free pages back to the system between the searches' steps.

The searches make many temporaries of a few to tens of MB (a clip search's partial products, a judged
sub-block's activations; a trial's rounded weights are made in place, in buffers kept from trial to
trial: ``fake_quant``, ``search.scaled_into``). glibc serves sizes under its mmap threshold — which rises
to 32 MB once larger blocks have been freed — from its heaps, and pages freed in the middle of a heap
stay resident: at 70B width the exporter's resident memory rose GBs above what it held
(docs/export-memory.md). ``trim`` asks glibc to return every free page (``malloc_trim(0)``); the searches
call it after each step, so the heap's reuse within a step is kept and its high-water mark does not carry
into the next.

A return has a price: the next step faults its temporaries in again, page by page. Where a step's
temporaries are small (SmolLM2's scale-search candidates: about 60 MB), that was 0.9 million page faults
and about 3 s of system time a layer at 16 blocks, for nothing: the next candidate reuses the same holes.
So ``trim`` returns pages only once the process's resident memory has grown by more than ``SLACK`` since
the last return (or since it was last lower): what the heap may hold beyond what is in use stays under
about that much. Elsewhere (another libc,
another system) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

SLACK = 64 << 20  # bytes of growth in resident memory a step may leave behind before the heap is trimmed

_base: int | None = None  # resident bytes just after the last return, or the least seen since


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    return getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own C library: glibc has it


def resident() -> int:
    """This process's resident memory in bytes (Linux: /proc/self/statm)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim(slack: int = SLACK) -> bool:
    """Return the C heap's free pages to the system if resident memory has grown by more than slack bytes
    since the last return (slack 0: always); whether there was a glibc to ask."""
    global _base
    f = _malloc_trim()
    if f is None:
        return False
    now = resident()
    if _base is not None and now - _base <= slack:
        _base = min(_base, now)
        return True
    f(0)
    _base = resident()
    return True
