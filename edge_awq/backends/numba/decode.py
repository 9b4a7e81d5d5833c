"""One decoder layer of a one-token decode step as a single numba call.

Decoding runs about thirteen small ops per layer, each of which, as a separate call, pays Python
and the numba dispatcher (docs/cpu-kernels.md has what that cost). ``decode_layer`` runs the same sequence — the model's ``attention`` and ``mlp`` sub-blocks
(model.py) — inside compiled code: RMSNorm, q/k/v as one GEMV kernel, RoPE, the fp16 cache
write, attention, o, the residual, RMSNorm, gate/up, SiLU-mul, down, the residual.

``decode_step`` runs every layer of a step so, in one call from Python (``NumbaBackend.decode_layers``).
They cover the common case and say no to the rest (``decode_layers`` and ``decode_block`` return None
and the model runs op by op): one token, every linear repacked for the integer kernels of one
activation type (``gemv_i8.py`` with int8 activations, ``gemv_blocked.py`` with int16) — 4- or 8-bit,
each in its own group size, as a mixed-precision file has them — no biases, an fp16 cache. Linears
that share an input and a group size run as one kernel on one quantized input; where their group
sizes differ, the input is quantized for each. ``kind`` picks the kernels when the layer compiles: with int8
activations ``gemv_i8.kernel_set`` of the model's weights, whose type names their widths' tiles (only those
are compiled), with int16 an empty int16 array. Tests hold it to the op-by-op path.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from numba import types
from numba.extending import overload

from edge_awq.backends.numba import gemv_blocked as blocked
from edge_awq.backends.numba import gemv_i8 as i8
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


def _int8(kind) -> bool:
    """Whether kind (the numba type of decode_layer's ``kind``) is the 8-bit-activation kernels' set
    (``gemv_i8.kernel_set``: a record array) rather than an empty int16 array."""
    return isinstance(kind.dtype, types.Record)


def _inputs(x, group_size, kind):
    """x quantized for the kernels kind names: (xq, scale, sum) per group."""


@overload(_inputs)
def _inputs_impl(x, group_size, kind):
    int8 = _int8(kind)
    quantize = i8.quantize_x8 if int8 else quantize_x16_flat
    xtype = np.int8 if int8 else np.int16
    sums = np.int32 if int8 else np.float32  # int8: exact sums; int16: scaled

    def impl(x, group_size, kind):
        T, n = x.shape
        G = n // group_size
        xq, xs, xsum = np.empty((T, n), xtype), np.empty((T, G), np.float32), np.empty((T, G), sums)
        quantize(x, group_size, xq, xs, xsum)
        return xq, xs, xsum

    return impl


def _three(wa, wb, wc, ya, yb, yc, xq, xs, xsum, group_size, kind):
    """Three weights of one input, by the kernels kind names."""


@overload(_three)
def _three_impl(wa, wb, wc, ya, yb, yc, xq, xs, xsum, group_size, kind):
    if _int8(kind):
        def impl(wa, wb, wc, ya, yb, yc, xq, xs, xsum, group_size, kind):
            i8.gemv_three_kernel(wa[0], wa[1], wa[2], ya, wb[0], wb[1], wb[2], yb, wc[0], wc[1], wc[2], yc, xq, xs,
                                 xsum, group_size, kind)
        return impl

    def impl16(wa, wb, wc, ya, yb, yc, xq, xs, xsum, group_size, kind):
        blocked.gemv_three_kernel(wa[0], wa[1], wa[2], ya, wb[0], wb[1], wb[2], yb, wc[0], wc[1], wc[2], yc, xq, xs,
                                  xsum, group_size)
    return impl16


def _one(w, y, xq, xs, xsum, group_size, kind):
    """One weight, by the kernels kind names."""


@overload(_one)
def _one_impl(w, y, xq, xs, xsum, group_size, kind):
    if _int8(kind):
        def impl(w, y, xq, xs, xsum, group_size, kind):
            i8.gemv_kernel(w[0], w[1], w[2], xq, xs, xsum, group_size, y, kind)
        return impl

    def impl16(w, y, xq, xs, xsum, group_size, kind):
        blocked.gemv_kernel(w[0], w[1], w[2], xq, xs, xsum, group_size, y)
    return impl16


@njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
def _gemv(x, w, out_f, kind):
    """x times one weight (words, scales, zeros, group size)."""
    xq, xs, xsum = _inputs(x, w[3], kind)
    y = np.empty((1, out_f), np.float32)
    _one(w, y, xq, xs, xsum, w[3], kind)
    return y


@njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
def _shared_input(h, wa, wb, wc, ya, yb, yc, kind):
    """h times two or three weights (wc empty for two): one kernel on one quantized input where their group
    sizes agree, else each on the input quantized for its own."""
    g = wa[3]
    if wb[3] == g and (wc[3] == g or wc[0].shape[0] == 0):
        xq, xs, xsum = _inputs(h, g, kind)
        _three(wa, wb, wc, ya, yb, yc, xq, xs, xsum, g, kind)
        return
    xq, xs, xsum = _inputs(h, wa[3], kind)
    _one(wa, ya, xq, xs, xsum, wa[3], kind)
    xq, xs, xsum = _inputs(h, wb[3], kind)
    _one(wb, yb, xq, xs, xsum, wb[3], kind)
    if yc.shape[1] > 0:
        xq, xs, xsum = _inputs(h, wc[3], kind)
        _one(wc, yc, xq, xs, xsum, wc[3], kind)


@njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
def decode_layer(x, attn_norm, ffn_norm, eps, wq, wk, wv, wo, w1, w2, w3, kind, cos, sin, interleaved,
                 keys, values, pos, n_heads, n_kv_heads, head_dim, hidden_dim):
    """x (1, dim) float32 -> the layer's output (1, dim). Each w* is a repacked weight's (words, scales, zeros,
    group size);
    kind which kernels (the module docstring); cos, sin (1, head_dim / 2); keys, values (n_kv_heads,
    max_seq, head_dim) uint16 (fp16 bits) of this layer, row pos written here."""
    h = np.empty_like(x)
    rmsnorm_serial(x, attn_norm, eps, h)
    q = np.empty((1, n_heads * head_dim), np.float32)
    k = np.empty((1, n_kv_heads * head_dim), np.float32)
    v = np.empty((1, n_kv_heads * head_dim), np.float32)
    _shared_input(h, wq, wk, wv, q, k, v, kind)
    _rope(q, n_heads, head_dim, cos[0], sin[0], interleaved)
    _rope(k, n_kv_heads, head_dim, cos[0], sin[0], interleaved)
    for hh in range(n_kv_heads):
        for d in range(head_dim):
            keys[hh, pos, d] = f32_half_bits(k[0, hh * head_dim + d])
            values[hh, pos, d] = f32_half_bits(v[0, hh * head_dim + d])
    att = np.empty((1, n_heads, head_dim), np.float32)
    attention_kernel(q.reshape(1, n_heads, head_dim), keys, values, pos, att)
    x = x + _gemv(att.reshape(1, n_heads * head_dim), wo, x.shape[1], kind)
    rmsnorm_serial(x, ffn_norm, eps, h)
    gate = np.empty((1, hidden_dim), np.float32)
    up = np.empty((1, hidden_dim), np.float32)
    empty = (w3[0][:0], w3[1][:0], w3[2][:0], w3[3])
    _shared_input(h, w1, w3, empty, gate, up, up[:, :0], kind)
    silu_mul_serial(gate, up, gate)
    return x + _gemv(gate, w2, x.shape[1], kind)


@njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
def decode_step(x, layers, eps, kind, cos, sin, interleaved, keys, values, pos, n_heads, n_kv_heads,
                head_dim, hidden_dim):
    """x (1, dim) through every layer of the model: ``decode_layer`` in turn, without returning to Python in
    between. layers: a typed List of each layer's (attn_norm, ffn_norm, wq, wk, wv, wo, w1, w2, w3); keys,
    values (n_layers, n_kv_heads, max_seq, head_dim) uint16."""
    for i in range(len(layers)):
        attn_norm, ffn_norm, wq, wk, wv, wo, w1, w2, w3 = layers[i]
        x = decode_layer(x, attn_norm, ffn_norm, eps, wq, wk, wv, wo, w1, w2, w3, kind, cos, sin,
                         interleaved, keys[i], values[i], pos, n_heads, n_kv_heads, head_dim, hidden_dim)
    return x
