import math

import numpy as np
import pytest

from edge_awq.backends import select_backend
from edge_awq.perplexity import nll_of_logits, perplexity, windows
from tests.conftest import TINYSTORIES


def test_windows_are_consecutive_and_drop_a_lone_token():
    t = np.arange(10)
    assert [w.tolist() for w in windows(t, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(w) for w in windows(np.arange(9), 4)] == [4, 4]  # the 9th token alone scores nothing
    assert windows(np.arange(1), 4) == []


def test_nll_hand_worked():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]], np.float32))
    assert math.isclose(nll_of_logits(logits, np.array([0, 2])), -math.log(0.5) - math.log(0.8), rel_tol=1e-6)
    big = logits + 1000.0  # shift-invariant and no overflow
    assert math.isclose(nll_of_logits(big, np.array([0, 2])), -math.log(0.5) - math.log(0.8), rel_tol=1e-4)


def test_perplexity_counts_and_independence_of_windows(stories_weights):
    src, w = stories_weights
    ops = select_backend("reference")
    tokens = src.tokenizer().encode(TINYSTORIES.read_text(encoding="utf-8"))[:600]
    res = perplexity(w, ops, tokens, 256)
    assert (res.windows, res.tokens_scored) == (3, 255 + 255 + 87)
    # each window is scored alone: the whole is exactly the windows run one by one, each from an empty cache
    parts = [perplexity(w, ops, tokens[k : k + 256], 256) for k in (0, 256, 512)]
    assert [p.tokens_scored for p in parts] == [255, 255, 87]
    total = sum(p.mean_nll * p.tokens_scored for p in parts)
    assert res.mean_nll * res.tokens_scored == pytest.approx(total, rel=1e-12)
    seen = []
    perplexity(w, ops, tokens, 256, on_window=lambda d, n: seen.append((d, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_uniform_model_has_vocab_perplexity(stories_weights):
    """With an all-zero head every token has probability 1/vocab: perplexity is exactly vocab_size."""
    import dataclasses

    from edge_awq.model import Dense

    src, w = stories_weights
    flat = dataclasses.replace(w, output=Dense(np.zeros_like(w.tok_embeddings)))
    res = perplexity(flat, select_backend("reference"), np.arange(3, 100), 32)
    assert res.perplexity == pytest.approx(512.0, rel=1e-6)
