"""heap.trim: the C heap's free pages go back to the system (glibc), so the searches' temporaries do not
carry their high-water mark from step to step."""

import os
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
from edge_awq.offline import heap  # noqa: E402


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_trim_returns_freed_heap_pages():
    if not heap.trim():
        pytest.skip("no glibc here: trim does nothing")
    # 64 KB blocks come from the heap (under glibc's mmap threshold); freeing seven of eight leaves holes
    # that free() alone keeps resident, since a block still in use sits above them
    blocks = [np.ones(8192) for _ in range(4096)]  # 256 MiB
    kept = blocks[7::8]
    del blocks
    before = _rss()
    assert heap.trim()
    after = _rss()
    assert before - after > 64 << 20, (before, after)
    assert all(float(b[0]) == 1.0 for b in kept)  # what is in use stays


def test_trim_leaves_small_holes_for_the_next_step():
    """Growth under the slack stays resident (the next trial of the same shapes reuses it without faulting its
    pages in again); slack 0 returns it."""
    if not heap.trim(0):
        pytest.skip("no glibc here: trim does nothing")
    blocks = [np.ones(8192) for _ in range(1024)]  # 64 MiB of heap blocks, seven in eight then freed
    kept = blocks[7::8]
    del blocks
    before = _rss()
    assert heap.trim(slack=1 << 30)  # 56 MiB of holes: under a 1 GiB slack, kept
    assert before - _rss() < 8 << 20
    assert heap.trim(slack=0)
    assert before - _rss() > 32 << 20
    assert all(float(b[0]) == 1.0 for b in kept)


def test_resident_is_this_process():
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    assert abs(heap.resident() - _rss()) < 4 << 20  # the resident set (statm's second field), in bytes
