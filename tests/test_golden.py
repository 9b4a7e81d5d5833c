"""The committed tiny .eawq: its header bytes and its greedy tokens must not drift.

A change here means the file format or the arithmetic changed: bump the format
version if old files no longer read the same, then regenerate with tests/golden/regen.py.
"""

import json
from pathlib import Path

import numpy as np

from tests.golden.regen import greedy_tokens, header_sha256

GOLDEN = Path(__file__).parent / "golden"


def test_golden_header_bytes():
    expected = json.loads((GOLDEN / "expected.json").read_text())
    assert header_sha256(GOLDEN / "tiny.eawq") == expected["header_sha256"]


def test_golden_greedy_tokens():
    expected = json.loads((GOLDEN / "expected.json").read_text())
    assert greedy_tokens(GOLDEN / "tiny.eawq") == expected["greedy_from_bos"]


def test_golden_checksums_hold():
    from edge_awq.formats.eawq import EawqSource

    assert EawqSource(GOLDEN / "tiny.eawq").verify() == []


def test_golden_version1_file_still_reads_the_same():
    """The same model written by format version 1 (zero points padded per row): unchanged bytes, the same
    weights in memory and the same greedy tokens as the current file."""
    from edge_awq.formats.eawq import EawqSource
    from edge_awq.formats.load import load_weights

    expected = json.loads((GOLDEN / "expected.json").read_text())
    old, new = GOLDEN / "tiny-v1.eawq", GOLDEN / "tiny.eawq"
    assert header_sha256(old) == expected["v1_header_sha256"]
    assert EawqSource(old).version == 1 and EawqSource(new).version == 2
    assert greedy_tokens(old) == expected["greedy_from_bos"]
    a, b = load_weights(EawqSource(old), dtype=None), load_weights(EawqSource(new), dtype=None)
    for la, lb in zip(a.layers, b.layers):
        for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            for f in ("qweight", "scales", "zeros"):
                assert np.array_equal(getattr(getattr(la, n), f), getattr(getattr(lb, n), f)), (n, f)
    assert new.stat().st_size < old.stat().st_size
