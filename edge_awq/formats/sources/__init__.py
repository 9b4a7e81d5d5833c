"""Readers of the model formats users hold, each behind the same ``Source`` interface.

A source opens lazily (headers and metadata only) and hands out tensors by
canonical name, float32 or float16, shaped as ``edge_awq.model`` expects:

    tok_embeddings                 (vocab_size, dim)
    norm                           (dim,)
    output                         (vocab_size, dim)    absent when tied
    layers.{i}.attn_norm|ffn_norm  (dim,)
    layers.{i}.{wq..w3}.weight     (out, in)
    layers.{i}.{wq,wk,wv}.bias     (out,)               qwen2 only

Q and K rows are always in Hugging Face's "rotate half" order (RoPE pairs
(i, i + head_dim/2) of each head): readers of formats that store them
interleaved for Meta's RoPE (llama2.c, llama.cpp's GGUF) reorder them as they
read, so every file edge-awq writes, and every engine it hands them to, sees
one order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from edge_awq.config import ModelArgs
from edge_awq.formats.tokenizer import Tokenizer


def to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows (n_heads * head_dim, in) from interleaved RoPE pairs (2i, 2i+1) to (i, i + head_dim/2), per head."""
    out_f = w.shape[0]
    hd = out_f // n_heads
    return np.ascontiguousarray(
        w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))  # (out, in)


class Source(Protocol):
    path: Path
    args: ModelArgs

    def has(self, key: str) -> bool:
        """Whether the canonical tensor ``key`` exists."""

    def get(self, key: str) -> np.ndarray:
        """The canonical tensor ``key``, float32 or float16 (possibly memory-mapped)."""

    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer with its special tokens and chat template."""

    def fingerprint(self) -> str:
        """A short identity of the source files (names, sizes, header hashes), read cheaply."""

    def release(self) -> None:
        """Drop resident pages of memory-mapped files (what the exporter calls after each layer)."""
