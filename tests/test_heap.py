"""heap.trim: the C heap's free pages go back to the system (glibc), so the searches' temporaries do not
carry their high-water mark from step to step."""

import os

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
