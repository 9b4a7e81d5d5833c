"""The non-linear ops as numba kernels: RMSNorm, RoPE, attention over an fp16 or int8 KV cache, SiLU-mul.

Each has a parallel kernel for prefill and a serial twin for a decode step's few tokens (a parallel
region costs more than the work of one token's row).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from edge_awq.backends.numba.intrinsics import bits_f32, half_f32, int8_f32



@njit(cache=True, inline="always", fastmath=True)
def _rmsnorm_row(x, weight, eps, out, t):
    dim = x.shape[1]
    ss = np.float32(0.0)
    for i in range(dim):
        ss += x[t, i] * x[t, i]
    inv = np.float32(1.0) / np.sqrt(ss / dim + np.float32(eps))
    for i in range(dim):
        out[t, i] = x[t, i] * inv * weight[i]


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def rmsnorm_kernel(x, weight, eps, out):
    """out (T, dim) = x / rms(x) * weight."""
    for t in prange(x.shape[0]):
        _rmsnorm_row(x, weight, eps, out, t)


@njit(nogil=True, cache=True, fastmath=True)
def rmsnorm_serial(x, weight, eps, out):
    """``rmsnorm_kernel`` on the calling thread: a token's norm is less work than waking the pool."""
    for t in range(x.shape[0]):
        _rmsnorm_row(x, weight, eps, out, t)


@njit(cache=True, inline="always")
def _rope_token(x, cos, sin, interleaved, out, t):
    _, H, hd = x.shape
    half = hd // 2
    for h in range(H):
        for i in range(half):
            a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
            x0, x1 = x[t, h, a], x[t, h, b]
            out[t, h, a] = x0 * cos[t, i] - x1 * sin[t, i]
            out[t, h, b] = x0 * sin[t, i] + x1 * cos[t, i]


@njit(nogil=True, parallel=True, cache=True)
def rope_kernel(x, cos, sin, interleaved, out):
    """out (T, H, hd) = x rotated by cos/sin (T, hd/2); pairs (2i, 2i+1) or (i, i + hd/2).
    out may be x: each pair is read before it is written."""
    for t in prange(x.shape[0]):
        _rope_token(x, cos, sin, interleaved, out, t)


@njit(nogil=True, cache=True)
def rope_serial(x, cos, sin, interleaved, out):
    """``rope_kernel`` on the calling thread."""
    for t in range(x.shape[0]):
        _rope_token(x, cos, sin, interleaved, out, t)


@njit(cache=True, inline="always", fastmath=True)
def _exp_shifted(scores, top):
    """scores <- exp(scores - top) in place; returns their sum (the softmax denominator). ``exp_f32``, which
    vectorizes: numba's np.exp, a libm call per key, was most of a decode step's attention."""
    total = np.float32(0.0)
    for s in range(scores.shape[0]):
        e = exp_f32(scores[s] - top)
        scores[s] = e
        total += e
    return total


SPAN = 128  # keys a span of a decode step's attention holds at least (a cache is split in at most 8 spans)


def _value(x):
    """A cache entry as float32: fp16 bits (uint16) or int8."""


@overload(_value, inline="always")
def _value_impl(x):
    if x == types.uint16:
        return lambda x: half_f32(x)
    if x == types.int8:
        return lambda x: int8_f32(x)
    return None


@njit(cache=True, inline="always", fastmath=True)
def _span(qv, keys, k_scale, values, v_scale, s0, s1, scale, scores, part):
    """One query head qv (hd,) over keys s0..s1 of its KV head's keys/values (S, hd): the span's scores
    exponentiated in place (scores: s1 - s0 of them) and their weighted sum of values (part); returns the largest
    score and the sum of the exponentials. Scales: per row, or none (size 0)."""
    hd = qv.shape[0]
    top = np.float32(-np.inf)
    for s in range(s0, s1):
        kr = keys[s]
        acc = np.float32(0.0)
        for d in range(hd):
            acc += qv[d] * _value(kr[d])
        sc = acc * (scale * k_scale[s] if k_scale.shape[0] > 0 else scale)
        scores[s - s0] = sc
        top = max(top, sc)
    total = _exp_shifted(scores[: s1 - s0], top)
    for d in range(hd):
        part[d] = 0.0
    for s in range(s0, s1):
        p = scores[s - s0] * (v_scale[s] if v_scale.shape[0] > 0 else np.float32(1.0))
        vr = values[s]
        for d in range(hd):
            part[d] += p * _value(vr[d])
    return top, total


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def _attention_spans(q, keys, k_scale, values, v_scale, pos, span, tops, sums, parts, scores):
    T, H, _ = q.shape
    group = H // keys.shape[0]
    spans = tops.shape[2]
    scale = np.float32(1.0 / np.sqrt(q.shape[2]))
    for task in prange(T * H * spans):
        t, h, c = task // (H * spans), task // spans % H, task % spans
        s0, s1 = c * span, min(pos + t + 1, (c + 1) * span)
        if s0 < s1:
            kv = h // group
            tops[t, h, c], sums[t, h, c] = _span(q[t, h], keys[kv], k_scale[kv], values[kv], v_scale[kv], s0, s1,
                                                 scale, scores[task], parts[t, h, c])


@njit(nogil=True, cache=True, fastmath=True)
def attention_spans(q, keys, k_scale, values, v_scale, pos, out):
    """Causal GQA of a few tokens (a decode step) over a KV cache: keys/values (n_kv, S, hd) fp16 bits (uint16)
    or int8 with per-row scales (n_kv, S) (fp16: scales of shape (n_kv, 0)); q, out (T, H, hd) float32. Query t
    sees cache rows 0..pos+t. One task per token, head and span of keys (one span up to ``SPAN`` keys, at most
    eight), so that two threads share nine heads or a long cache evenly; the spans' partial softmaxes are then
    merged exactly (each rescaled by exp(its top - the top))."""
    T, H, hd = q.shape
    n_max = pos + T
    span = max(SPAN, -(-n_max // 8))
    spans = -(-n_max // span)
    tops = np.empty((T, H, spans), np.float32)
    sums = np.zeros((T, H, spans), np.float32)  # stays 0 for a span past a token's last key
    parts = np.empty((T, H, spans, hd), np.float32)
    scores = np.empty((T * H * spans, span), np.float32)
    _attention_spans(q, keys, k_scale, values, v_scale, pos, span, tops, sums, parts, scores)
    for t in range(T):
        for h in range(H):
            o = out[t, h]
            top = np.float32(-np.inf)
            for c in range(spans):
                if sums[t, h, c] > 0:
                    top = max(top, tops[t, h, c])
            total = np.float32(0.0)
            for d in range(hd):
                o[d] = 0.0
            for c in range(spans):
                if sums[t, h, c] > 0:
                    w = exp_f32(tops[t, h, c] - top)
                    total += w * sums[t, h, c]
                    for d in range(hd):
                        o[d] += w * parts[t, h, c, d]
            inv = np.float32(1.0) / total
            for d in range(hd):
                o[d] *= inv


@njit(nogil=True, cache=True)
def attention_kernel(q, keys, values, pos, out):
    """Causal GQA over an fp16 cache read as uint16 bits (``attention_spans``).

    q (T, H, hd) float32; keys/values (n_kv, S, hd) uint16 of one layer;
    out (T, H, hd) float32. Query t sees cache rows 0..pos+t.
    """
    none = np.empty((keys.shape[0], 0), np.float32)
    attention_spans(q, keys, none, values, none, pos, out)


@njit(nogil=True, cache=True)
def attention_int8_kernel(q, keys, k_scale, values, v_scale, pos, out):
    """``attention_kernel`` over an int8 cache: keys/values (n_kv, S, hd) int8, scales (n_kv, S) float32."""
    attention_spans(q, keys, k_scale, values, v_scale, pos, out)


@njit(cache=True, inline="always", fastmath=True)
def exp_f32(x):
    """e**x in float32 within 4e-7 relative, in arithmetic a loop vectorizes (numba's exp is a libm call):
    x = n ln 2 + r, |r| <= ln 2 / 2, e**r by its Taylor polynomial to degree 7, times 2**n built in the
    exponent bits. Inputs are clamped to [-87, 88], where 2**n stays a normal float."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.rint(x * np.float32(1.4426950408889634))
    r = x - n * np.float32(0.693145751953125)  # ln 2 in two parts: the first exact times any n here
    r = r - n * np.float32(1.428606765330187e-06)
    p = np.float32(1.0 / 5040)
    p = p * r + np.float32(1.0 / 720)
    p = p * r + np.float32(1.0 / 120)
    p = p * r + np.float32(1.0 / 24)
    p = p * r + np.float32(1.0 / 6)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * bits_f32(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))


@njit(cache=True, inline="always", fastmath=True, error_model="numpy")
def _silu_mul_row(gate, up, out, t):
    g_row, u_row, o_row = gate[t], up[t], out[t]
    for i in range(g_row.shape[0]):
        g = g_row[i]
        o_row[i] = g / (np.float32(1.0) + exp_f32(-g)) * u_row[i]


@njit(nogil=True, parallel=True, cache=True, fastmath=True, error_model="numpy")
def silu_mul_kernel(gate, up, out):
    """out (T, n) = silu(gate) * up; out may be gate."""
    for t in prange(gate.shape[0]):
        _silu_mul_row(gate, up, out, t)


@njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
def silu_mul_serial(gate, up, out):
    """``silu_mul_kernel`` on the calling thread."""
    for t in range(gate.shape[0]):
        _silu_mul_row(gate, up, out, t)


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def parallel_sum(a):
    """Sum of a float32 array with every thread reading: the machine's read bandwidth."""
    total = np.float32(0.0)
    for i in prange(a.shape[0]):
        total += a[i]
    return total
