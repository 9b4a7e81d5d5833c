"""One decoder layer of a one-token decode step as a single numba call.

Decoding runs about thirteen small ops per layer, each of which, as a separate call, pays Python
and the numba dispatcher (docs/cpu-kernels.md has what that cost). ``decode_layer`` runs the same sequence — the model's ``attention`` and ``mlp`` sub-blocks
(model.py) — inside compiled code: RMSNorm, q/k/v as one GEMV kernel, RoPE, the fp16 cache
write, attention, o, the residual, RMSNorm, gate/up, SiLU-mul, down, the residual.

It covers the common case and says no to the rest (``NumbaBackend.decode_block`` returns None
and the model runs op by op): one token, 4-bit layers of one group size repacked into the block
layout (``gemv_blocked.py``), no biases, an fp16 cache. Tests hold it to the op-by-op path.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from edge_awq.backends.numba import gemv_blocked as blocked
from edge_awq.backends.numba.gemv_i16 import quantize_x16_flat
from edge_awq.backends.numba.kernels import attention_kernel, rmsnorm_serial, silu_mul_serial
# this module only when a decode step runs, so the import is not circular
from edge_awq.backends.numba.intrinsics import f32_half_bits


@njit(nogil=True, cache=True)
def _rope(v, heads, head_dim, cos, sin, interleaved):
    """v (1, heads * head_dim) rotated in place; cos, sin (head_dim / 2,).

    A flat loop rather than ``rope_serial`` on a (1, heads, head_dim) view, which costs far more called from
    here (docs/cpu-kernels.md)."""
    half = head_dim // 2
    for h in range(heads):
        base = h * head_dim
        for i in range(half):
            a = base + (2 * i if interleaved else i)
            b = base + (2 * i + 1 if interleaved else i + half)
            x0, x1 = v[0, a], v[0, b]
            v[0, a] = x0 * cos[i] - x1 * sin[i]
            v[0, b] = x0 * sin[i] + x1 * cos[i]


@njit(nogil=True, cache=True)
def _inputs(x, group_size):
    T, n = x.shape
    G = n // group_size
    x16, xs, xsum = np.empty((T, n), np.int16), np.empty((T, G), np.float32), np.empty((T, G), np.float32)
    quantize_x16_flat(x, group_size, x16, xs, xsum)
    return x16, xs, xsum


@njit(nogil=True, cache=True, fastmath=True)
def _gemv(x, w, out_f, group_size):
    x16, xs, xsum = _inputs(x, group_size)
    y = np.empty((1, out_f), np.float32)
    blocked.gemv_kernel(w[0], w[1], w[2], x16, xs, xsum, group_size, y)
    return y


@njit(nogil=True, cache=True, fastmath=True)
def decode_layer(x, attn_norm, ffn_norm, eps, wq, wk, wv, wo, w1, w2, w3, group_size, cos, sin, interleaved,
                 keys, values, pos, n_heads, n_kv_heads, head_dim, hidden_dim):
    """x (1, dim) float32 -> the layer's output (1, dim). Each w* is a blocked weight's (words, scales, zeros);
    cos, sin (1, head_dim / 2); keys, values (n_kv_heads, max_seq, head_dim) uint16 (fp16 bits) of this
    layer, row pos written here."""
    h = np.empty_like(x)
    rmsnorm_serial(x, attn_norm, eps, h)
    x16, xs, xsum = _inputs(h, group_size)
    q = np.empty((1, n_heads * head_dim), np.float32)
    k = np.empty((1, n_kv_heads * head_dim), np.float32)
    v = np.empty((1, n_kv_heads * head_dim), np.float32)
    blocked.gemv_three_kernel(wq[0], wq[1], wq[2], q, wk[0], wk[1], wk[2], k, wv[0], wv[1], wv[2], v,
                              x16, xs, xsum, group_size)
    _rope(q, n_heads, head_dim, cos[0], sin[0], interleaved)
    _rope(k, n_kv_heads, head_dim, cos[0], sin[0], interleaved)
    for hh in range(n_kv_heads):
        for d in range(head_dim):
            keys[hh, pos, d] = f32_half_bits(k[0, hh * head_dim + d])
            values[hh, pos, d] = f32_half_bits(v[0, hh * head_dim + d])
    att = np.empty((1, n_heads, head_dim), np.float32)
    attention_kernel(q.reshape(1, n_heads, head_dim), keys, values, pos, att)
    x = x + _gemv(att.reshape(1, n_heads * head_dim), wo, x.shape[1], group_size)
    rmsnorm_serial(x, ffn_norm, eps, h)
    x16, xs, xsum = _inputs(h, group_size)
    gate = np.empty((1, hidden_dim), np.float32)
    up = np.empty((1, hidden_dim), np.float32)
    blocked.gemv_three_kernel(w1[0], w1[1], w1[2], gate, w3[0], w3[1], w3[2], up, w3[0][:0], w3[1][:0],
                              w3[2][:0], up[:, :0], x16, xs, xsum, group_size)
    silu_mul_serial(gate, up, gate)
    return x + _gemv(gate, w2, x.shape[1], group_size)
