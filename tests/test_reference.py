"""The numpy reference backend checked against hand-written loops and identities."""

import numpy as np
import pytest

from edge_awq.backends.reference import ReferenceBackend
from edge_awq.config import ModelArgs
from edge_awq.model import Dense, KVCache
from edge_awq.formats.sources import to_rotate_half

ops = ReferenceBackend()
rng = np.random.default_rng(0)


def test_rmsnorm_matches_formula():
    x = rng.standard_normal((3, 7)).astype(np.float32)
    w = rng.standard_normal(7).astype(np.float32)
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(ops.rmsnorm(x, w, 1e-5), want, rtol=1e-5)


def test_linear_with_bias_and_fp16_weight():
    x = rng.standard_normal((2, 5)).astype(np.float32)
    w = rng.standard_normal((3, 5)).astype(np.float16)
    b = np.array([1.0, -2.0, 0.5], np.float32)
    np.testing.assert_allclose(ops.linear(x, Dense(w, b)), x @ w.astype(np.float32).T + b, rtol=1e-5)


def test_silu_mul_is_stable_for_large_inputs():
    g = np.array([[-1000.0, -1.0, 0.0, 1.0, 1000.0]], np.float32)
    out = ops.silu_mul(g, np.ones_like(g))
    with np.errstate(over="ignore"):
        want = g / (1 + np.exp(-g.astype(np.float64)))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-30)


def test_rope_conventions_agree_after_row_permutation():
    """Interleaved RoPE on Meta-layout rows equals rotate-half RoPE on the same rows reordered."""
    hd, heads, T = 8, 3, 5
    inv = (1.0 / 10000 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
    x = rng.standard_normal((T, heads * hd)).astype(np.float32)
    inter = ops.rope(x.reshape(T, heads, hd), 7, inv, True).reshape(T, heads * hd)
    half = ops.rope(to_rotate_half(x.T, heads).T.reshape(T, heads, hd), 7, inv, False).reshape(T, heads * hd)
    np.testing.assert_allclose(to_rotate_half(inter.T, heads).T, half, rtol=1e-5, atol=1e-6)


def test_rope_rotates_pairs_by_position_angle():
    inv = np.array([0.5, 0.25], np.float32)
    x = np.array([[[1.0, 0.0, 0.0, 1.0]]], np.float32)  # (T=1, heads=1, hd=4)
    out = ops.rope(x, 3, inv, True)[0, 0]
    a0, a1 = 3 * 0.5, 3 * 0.25
    np.testing.assert_allclose(out, [np.cos(a0), np.sin(a0), -np.sin(a1), np.cos(a1)], rtol=1e-6)


def naive_attention(q, k, v, n_kv):
    T, H, hd = q.shape
    out = np.zeros((T, H, hd))
    for t in range(T):
        for h in range(H):
            kh = h // (H // n_kv)
            s = np.array([q[t, h] @ k[j, kh] for j in range(t + 1)]) / np.sqrt(hd)
            p = np.exp(s - s.max())
            p /= p.sum()
            out[t, h] = sum(p[j] * v[j, kh] for j in range(t + 1))
    return out.reshape(T, H * hd)


@pytest.mark.parametrize("T,H,n_kv", [(1, 4, 4), (7, 6, 2), (16, 9, 3), (33, 8, 1)])
def test_attention_matches_naive_loop(T, H, n_kv):
    hd = 8
    a = ModelArgs("llama", H * hd, 16, 1, H, n_kv, hd, 10, 64)
    q, k, v = (rng.standard_normal((T, h, hd)).astype(np.float32) for h in (H, n_kv, n_kv))
    out = ops.attention(q, k, v, KVCache.allocate(a, 64), 0, 0)
    np.testing.assert_allclose(out, naive_attention(q, k, v, n_kv), rtol=1e-4, atol=1e-5)


def test_attention_prefill_then_decode_equals_one_prefill():
    hd, H, n_kv, T = 8, 4, 2, 9
    a = ModelArgs("llama", H * hd, 16, 2, H, n_kv, hd, 10, 32)
    q, k, v = (rng.standard_normal((T, h, hd)).astype(np.float32) for h in (H, n_kv, n_kv))
    full = ops.attention(q, k, v, KVCache.allocate(a, 32), 1, 0)
    cache = KVCache.allocate(a, 32)
    first = ops.attention(q[:5], k[:5], v[:5], cache, 1, 0)
    rest = [ops.attention(q[t : t + 1], k[t : t + 1], v[t : t + 1], cache, 1, t) for t in range(5, T)]
    np.testing.assert_allclose(np.concatenate([first, *rest]), full, rtol=1e-5, atol=1e-6)
    assert not cache.k[0].any(), "layer 0 of the cache must be untouched"
