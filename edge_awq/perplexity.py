"""Perplexity of a model on a token stream, over non-overlapping windows.

Protocol: the text is encoded once, without BOS; the tokens are cut into
consecutive windows of ``ctx`` tokens (a final shorter window counts if it has
at least two tokens); in each window, every token but the first is predicted
from the tokens before it in the same window. Perplexity is exp of the mean
negative log-likelihood over all predicted tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_awq.model import ModelWeights, forward


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float  # nats per scored token
    tokens_scored: int
    windows: int
    ctx: int
    seconds: float
    tokens_per_s: float  # tokens run through the model per second

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def windows(tokens: np.ndarray, ctx: int) -> list[np.ndarray]:
    """Consecutive slices of ctx tokens; a last shorter one is kept when it scores at least one token."""
    return [tokens[i : i + ctx] for i in range(0, len(tokens), ctx) if len(tokens[i : i + ctx]) >= 2]


def nll_of_logits(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log softmax(logits)[target]; logits (T, vocab) float32, targets (T,) int."""
    m = logits.max(axis=-1, keepdims=True)  # (T, 1)
    lse = m[:, 0].astype(np.float64) + np.log(np.exp(logits - m).sum(axis=-1, dtype=np.float64))  # (T,)
    picked = logits[np.arange(len(targets)), targets].astype(np.float64)
    return float(np.sum(lse - picked))


def perplexity(
    w: ModelWeights, ops, tokens, ctx: int, on_window: Callable[[int, int], None] | None = None, cache=None
) -> PerplexityResult:
    """Score tokens (N,) int window by window; on_window(done, total) reports progress.

    cache: a KV cache of at least ctx positions to use (one is allocated otherwise)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    wins = windows(tokens, ctx)
    cache = cache if cache is not None else ops.allocate_cache(w.args, ctx)
    total_nll, scored, seen = 0.0, 0, 0
    t0 = time.perf_counter()
    for k, win in enumerate(wins):
        logits = forward(w, win, 0, cache, ops)  # (len(win), vocab)
        total_nll += nll_of_logits(logits[:-1], win[1:])
        scored += len(win) - 1
        seen += len(win)
        if on_window:
            on_window(k + 1, len(wins))
    secs = time.perf_counter() - t0
    mean = total_nll / max(scored, 1)
    return PerplexityResult(math.exp(mean), mean, scored, len(wins), ctx, secs, seen / secs if secs > 0 else 0.0)
