"""Calibration blocks: the user's text cut into blocks of ``seqlen`` tokens.

Two ways (``export --calib-sampling``): "even" encodes the text once and takes whole blocks evenly spaced
over it; "documents" takes it as AutoAWQ and llm-awq take their datasets: the text split into documents
(at blank lines), shuffled with a fixed seed, those longer than a block skipped, the rest concatenated
(without BOS) until the blocks asked for are filled, and cut into blocks.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from edge_awq.errors import InputError
from edge_awq.formats.text import read_text

log = logging.getLogger(__name__)


SAMPLINGS = ("even", "documents")
DOCUMENTS_SEED = 42


def _documents(text: str, tokenizer, seqlen: int, want: int) -> np.ndarray:
    """The text's documents (split at blank lines) shuffled with a fixed seed, those of at most seqlen tokens
    concatenated until want tokens (or the text) are used up."""
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    taken, n = [], 0
    for k in np.random.default_rng(DOCUMENTS_SEED).permutation(len(docs)):
        ids = tokenizer.encode(docs[k])
        if len(ids) > seqlen:
            continue
        taken.append(np.asarray(ids, dtype=np.int64))
        n += len(ids)
        if n >= want:
            break
    return np.concatenate(taken) if taken else np.zeros(0, np.int64)


def calibration_blocks(path: Path, tokenizer, n_samples: int, seqlen: int,
                       sampling: str = "even") -> tuple[np.ndarray, dict]:
    """(n, seqlen) int64 token blocks of the text (``sampling``: "even" or "documents"), and a summary for the
    metadata.

    The text is encoded without BOS. With fewer than n_samples whole blocks in the
    text, every block is used (and a warning logged); with none, it is an error.
    """
    text = read_text(path)
    if sampling == "documents":
        tokens = _documents(text, tokenizer, seqlen, n_samples * seqlen)
    else:
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
    if sampling != "even":  # named only when not the default: an even-sampled file is as before
        summary["sampling"] = sampling
    return blocks, summary
