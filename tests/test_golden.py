"""The committed tiny .eawq: its header bytes and its greedy tokens must not drift.

A change here means the file format or the arithmetic changed: bump the format
version if old files no longer read the same, then regenerate with tests/golden/regen.py.
"""

import json
from pathlib import Path

from tests.golden.regen import greedy_tokens, header_sha256

GOLDEN = Path(__file__).parent / "golden"


def test_golden_header_bytes():
    expected = json.loads((GOLDEN / "expected.json").read_text())
    assert header_sha256(GOLDEN / "tiny.eawq") == expected["header_sha256"]


def test_golden_greedy_tokens():
    expected = json.loads((GOLDEN / "expected.json").read_text())
    assert greedy_tokens(GOLDEN / "tiny.eawq") == expected["greedy_from_bos"]


def test_golden_checksums_hold():
    from edge_awq.format import EawqSource

    assert EawqSource(GOLDEN / "tiny.eawq").verify() == []
