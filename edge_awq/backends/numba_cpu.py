"""The CPU backend: numba kernels that read the packed weights directly (parallel over rows).

Packed layout (``pack.py``): each row of b-bit values is a little-endian bit
stream in uint32 words; for 4 bits, word k of a row holds values 8k..8k+7,
value 8k+j in bits 4j..4j+3. At load, each W4 is prepared once (``prepare``):
scales widened to float32 (numba has no float16 arrays) and zero points turned
into ``zs = zero * scale``, so that a group's dot product is
``scale * sum(q * x) - zs * sum(x)``: integer unpacking and one FMA per weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..model import W4, Dense
from ..pack import unpack_bits

DEQUANT_ROWS = 256  # rows dequantized per block for the prefill GEMM


@dataclass(frozen=True)
class PreparedW4:
    """A W4 ready for the kernels."""

    qweight: np.ndarray  # (out, words) uint32, as in the file
    scales: np.ndarray  # (out, G) float32
    zs: np.ndarray  # (out, G) float32: zero point times scale
    group_size: int
    bits: int
    in_features: int
    bias: np.ndarray | None  # (out,) float32


def prepare(w: W4) -> PreparedW4:
    scales = w.scales.astype(np.float32)
    zeros = unpack_bits(w.zeros, w.bits, w.in_features // w.group_size).astype(np.float32)
    bias = None if w.bias is None else np.asarray(w.bias, np.float32)
    return PreparedW4(np.ascontiguousarray(w.qweight), scales, zeros * scales, w.group_size, w.bits, w.in_features, bias)


@njit(cache=True, inline="always")
def _value(row, pos, bits):
    """The b-bit value number pos of a packed row (any bit width)."""
    bit = pos * bits
    word, shift = bit >> 5, bit & 31
    v = row[word] >> np.uint32(shift)
    if shift + bits > 32:
        v |= row[word + 1] << np.uint32(32 - shift)
    return v & np.uint32((1 << bits) - 1)


@njit(parallel=True, cache=True, fastmath=True)
def gemv_w4_kernel(qweight, scales, zs, x, xsum, group_size, y):
    """y (out,) = W x for 4-bit rows with group_size a multiple of 8; xsum (G,) per-group sums of x."""
    out_f, n_groups = scales.shape
    words_per_group = group_size // 8
    for r in prange(out_f):
        acc = np.float32(0.0)
        for g in range(n_groups):
            s = np.float32(0.0)
            w0 = g * words_per_group
            for k in range(words_per_group):
                word = qweight[r, w0 + k]
                i = (w0 + k) * 8
                s += (np.float32(word & 15) * x[i] + np.float32((word >> 4) & 15) * x[i + 1]
                      + np.float32((word >> 8) & 15) * x[i + 2] + np.float32((word >> 12) & 15) * x[i + 3]
                      + np.float32((word >> 16) & 15) * x[i + 4] + np.float32((word >> 20) & 15) * x[i + 5]
                      + np.float32((word >> 24) & 15) * x[i + 6] + np.float32((word >> 28) & 15) * x[i + 7])
            acc += scales[r, g] * s - zs[r, g] * xsum[g]
        y[r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def gemv_any_kernel(qweight, scales, zs, x, xsum, group_size, bits, y):
    """y (out,) = W x for any bit width and group size."""
    out_f, n_groups = scales.shape
    for r in prange(out_f):
        row = qweight[r]
        acc = np.float32(0.0)
        for g in range(n_groups):
            s = np.float32(0.0)
            for i in range(g * group_size, (g + 1) * group_size):
                s += np.float32(_value(row, i, bits)) * x[i]
            acc += scales[r, g] * s - zs[r, g] * xsum[g]
        y[r] = acc


@njit(parallel=True, cache=True)
def dequant_rows_kernel(qweight, scales, zs, group_size, bits, r0, out):
    """out (rows, in) float32 = dequantized rows r0..r0+rows of the weight."""
    rows, in_f = out.shape
    for j in prange(rows):
        row = qweight[r0 + j]
        for i in range(in_f):
            g = i // group_size
            out[j, i] = np.float32(_value(row, i, bits)) * scales[r0 + j, g] - zs[r0 + j, g]


def linear_w4(x: np.ndarray, w: PreparedW4) -> np.ndarray:
    """x (T, in) float32 -> (T, out) float32: GEMV per token for decoding, blocked dequant + BLAS for prefill."""
    T = x.shape[0]
    out_f = w.qweight.shape[0]
    y = np.empty((T, out_f), np.float32)
    if T <= 4:
        n_groups = w.in_features // w.group_size
        for t in range(T):
            xt = np.ascontiguousarray(x[t], dtype=np.float32)
            xsum = xt.reshape(n_groups, w.group_size).sum(axis=1)  # (G,)
            if w.bits == 4 and w.group_size % 8 == 0:
                gemv_w4_kernel(w.qweight, w.scales, w.zs, xt, xsum, w.group_size, y[t])
            else:
                gemv_any_kernel(w.qweight, w.scales, w.zs, xt, xsum, w.group_size, w.bits, y[t])
    else:
        buf = np.empty((min(DEQUANT_ROWS, out_f), w.in_features), np.float32)
        for r0 in range(0, out_f, DEQUANT_ROWS):
            rows = min(DEQUANT_ROWS, out_f - r0)
            dequant_rows_kernel(w.qweight, w.scales, w.zs, w.group_size, w.bits, r0, buf[:rows])
            np.matmul(x, buf[:rows].T, out=y[:, r0 : r0 + rows])
    if w.bias is not None:
        y += w.bias
    return y


# float16 bit pattern -> float32 value: numba has no float16 arrays, so the fp16 KV cache is read through this.
HALF_TO_FLOAT = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(parallel=True, cache=True, fastmath=True)
def rmsnorm_kernel(x, weight, eps, out):
    """out (T, dim) = x / rms(x) * weight."""
    T, dim = x.shape
    for t in prange(T):
        ss = np.float32(0.0)
        for i in range(dim):
            ss += x[t, i] * x[t, i]
        inv = np.float32(1.0) / np.sqrt(ss / dim + np.float32(eps))
        for i in range(dim):
            out[t, i] = x[t, i] * inv * weight[i]


@njit(parallel=True, cache=True)
def rope_kernel(x, cos, sin, interleaved, out):
    """out (T, H, hd) = x rotated by cos/sin (T, hd/2); pairs (2i, 2i+1) or (i, i + hd/2)."""
    T, H, hd = x.shape
    half = hd // 2
    for t in prange(T):
        for h in range(H):
            for i in range(half):
                a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
                x0, x1 = x[t, h, a], x[t, h, b]
                out[t, h, a] = x0 * cos[t, i] - x1 * sin[t, i]
                out[t, h, b] = x0 * sin[t, i] + x1 * cos[t, i]


@njit(parallel=True, cache=True, fastmath=True)
def attention_kernel(q, keys, values, half, pos, out):
    """Causal GQA over an fp16 cache read as uint16 bits.

    q (T, H, hd) float32; keys/values (n_kv, S, hd) uint16 of one layer; half: the float16 table;
    out (T, H, hd) float32. Query t sees cache rows 0..pos+t.
    """
    T, H, hd = q.shape
    n_kv = keys.shape[0]
    group = H // n_kv
    scale = np.float32(1.0 / np.sqrt(hd))
    for th in prange(T * H):
        t, h = th // H, th % H
        kv, n = h // group, pos + t + 1
        scores = np.empty(n, np.float32)
        top = np.float32(-np.inf)
        for s in range(n):
            acc = np.float32(0.0)
            for d in range(hd):
                acc += q[t, h, d] * half[keys[kv, s, d]]
            scores[s] = acc * scale
            top = max(top, scores[s])
        total = np.float32(0.0)
        for s in range(n):
            scores[s] = np.exp(scores[s] - top)
            total += scores[s]
        for d in range(hd):
            out[t, h, d] = 0.0
        for s in range(n):
            p = scores[s] / total
            for d in range(hd):
                out[t, h, d] += p * half[values[kv, s, d]]


@njit(parallel=True, cache=True, fastmath=True)
def silu_mul_kernel(gate, up, out):
    T, n = gate.shape
    for t in prange(T):
        for i in range(n):
            g = gate[t, i]
            out[t, i] = g / (np.float32(1.0) + np.exp(-g)) * up[t, i]


@njit(parallel=True, cache=True, fastmath=True)
def parallel_sum(a):
    """Sum of a float32 array with every thread reading: the machine's read bandwidth."""
    total = np.float32(0.0)
    for i in prange(a.shape[0]):
        total += a[i]
    return total


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


class NumbaBackend:
    """The six ops in numba. W4 linears read packed weights; Dense ones (fp16 head, FP models) use BLAS."""

    name = "numba"
    kv_dtype = np.float16

    def __init__(self):
        self._prepared: dict[int, tuple[W4, PreparedW4]] = {}
        self._dense: dict[int, tuple[Dense, np.ndarray]] = {}

    def embed(self, table, tokens) -> np.ndarray:
        return np.asarray(table[np.asarray(tokens, dtype=np.int64)], dtype=np.float32)

    def rmsnorm(self, x, weight, eps: float) -> np.ndarray:
        x = _f32(x)
        out = np.empty_like(x)
        rmsnorm_kernel(x, _f32(weight), eps, out)
        return out

    def linear(self, x, w) -> np.ndarray:
        x = _f32(x)
        if isinstance(w, Dense):
            hit = self._dense.get(id(w))
            if hit is None or hit[0] is not w:  # float32 view of the weight, converted once
                hit = self._dense[id(w)] = (w, _f32(w.weight))
            y = x @ hit[1].T
            return y if w.bias is None else y + _f32(w.bias)
        hit = self._prepared.get(id(w))
        if hit is None or hit[0] is not w:  # keyed by identity; the W4 is kept so the id stays unique
            hit = self._prepared[id(w)] = (w, prepare(w))
        return linear_w4(x, hit[1])

    def rope(self, x, pos: int, inv_freq, interleaved: bool) -> np.ndarray:
        x = _f32(x)
        angles = np.arange(pos, pos + x.shape[0], dtype=np.float64)[:, None] * inv_freq[None, :]  # (T, hd/2)
        out = np.empty_like(x)
        rope_kernel(x, np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32), interleaved, out)
        return out

    def attention(self, q, k, v, cache, layer: int, pos: int) -> np.ndarray:
        T, H, hd = q.shape
        if cache.k.dtype != np.float16:
            raise TypeError("the numba backend keeps its KV cache in float16: allocate it with dtype=np.float16")
        cache.k[layer, :, pos : pos + T] = k.transpose(1, 0, 2)
        cache.v[layer, :, pos : pos + T] = v.transpose(1, 0, 2)
        out = np.empty((T, H, hd), np.float32)
        keys, values = cache.k[layer].view(np.uint16), cache.v[layer].view(np.uint16)
        attention_kernel(_f32(q), keys, values, HALF_TO_FLOAT, pos, out)
        return out.reshape(T, H * hd)

    def silu_mul(self, gate, up) -> np.ndarray:
        gate = _f32(gate)
        out = np.empty_like(gate)
        silu_mul_kernel(gate, _f32(up), out)
        return out
