"""The non-linear ops as numba kernels: RMSNorm, RoPE, attention over an fp16 or int8 KV cache, SiLU-mul.

Each has a parallel kernel for prefill and a serial twin for a decode step's few tokens (a parallel
region costs more than the work of one token's row).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

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


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def attention_kernel(q, keys, values, pos, out):
    """Causal GQA over an fp16 cache read as uint16 bits.

    q (T, H, hd) float32; keys/values (n_kv, S, hd) uint16 of one layer;
    out (T, H, hd) float32. Query t sees cache rows 0..pos+t.
    """
    T, H, hd = q.shape
    n_kv = keys.shape[0]
    group = H // n_kv
    scale = np.float32(1.0 / np.sqrt(hd))
    for th in prange(T * H):
        t, h = th // H, th % H
        kv, n = h // group, pos + t + 1
        qv = q[t, h]
        o = out[t, h]
        scores = np.empty(n, np.float32)
        top = np.float32(-np.inf)
        for s in range(n):
            krow = keys[kv, s]
            acc = np.float32(0.0)
            for d in range(hd):
                acc += qv[d] * half_f32(krow[d])
            scores[s] = acc * scale
            top = max(top, scores[s])
        total = _exp_shifted(scores, top)
        for d in range(hd):
            o[d] = 0.0
        for s in range(n):
            p = scores[s] / total
            vrow = values[kv, s]
            for d in range(hd):
                o[d] += p * half_f32(vrow[d])


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def attention_int8_kernel(q, keys, k_scale, values, v_scale, pos, out):
    """``attention_kernel`` over an int8 cache: keys/values (n_kv, S, hd) int8, scales (n_kv, S) float32."""
    T, H, hd = q.shape
    n_kv = keys.shape[0]
    group = H // n_kv
    scale = np.float32(1.0 / np.sqrt(hd))
    for th in prange(T * H):
        t, h = th // H, th % H
        kv, n = h // group, pos + t + 1
        qv = q[t, h]
        o = out[t, h]
        scores = np.empty(n, np.float32)
        top = np.float32(-np.inf)
        for s in range(n):
            krow = keys[kv, s]
            acc = np.float32(0.0)
            for d in range(hd):
                acc += qv[d] * int8_f32(krow[d])
            scores[s] = acc * k_scale[kv, s] * scale
            top = max(top, scores[s])
        total = _exp_shifted(scores, top)
        for d in range(hd):
            o[d] = 0.0
        for s in range(n):
            p = scores[s] / total * v_scale[kv, s]
            vrow = values[kv, s]
            for d in range(hd):
                o[d] += p * int8_f32(vrow[d])


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
