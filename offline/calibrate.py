"""Calibration blocks: the user's text, tokenized once, cut into blocks of ``seqlen`` tokens."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from edge_awq.errors import InputError
from edge_awq.formats.text import read_text

log = logging.getLogger(__name__)


def calibration_blocks(path: Path, tokenizer, n_samples: int, seqlen: int) -> tuple[np.ndarray, dict]:
    """(n, seqlen) int64 token blocks spread evenly over the text, and a summary for the metadata.

    The text is encoded without BOS. With fewer than n_samples whole blocks in the
    text, every block is used (and a warning logged); with none, it is an error.
    """
    text = read_text(path)
    tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
    available = len(tokens) // seqlen
    if available == 0:
        raise InputError(
            f"{path}: calibration text too short: {len(tokens):,} tokens, one block needs {seqlen:,} "
            f"(--seqlen); give a longer text"
        )
    n = min(n_samples, available)
    if n < n_samples:
        log.warning("calibration text holds %d blocks of %d tokens, fewer than the %d asked for", n, seqlen, n_samples)
    starts = (np.arange(n) * available // n) * seqlen  # evenly spaced whole blocks
    blocks = np.stack([tokens[s : s + seqlen] for s in starts])  # (n, seqlen)
    summary = {
        "file": Path(path).name, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
        "text_tokens": int(len(tokens)), "n_samples": int(n), "seqlen": int(seqlen),
    }
    return blocks, summary
