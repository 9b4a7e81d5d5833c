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


class NumbaBackend:
    """W4 linears through the numba kernels; the other five ops are still the numpy reference's (issue 4)."""

    name = "numba"

    def __init__(self):
        from .reference import ReferenceBackend

        self._ref = ReferenceBackend()
        self._prepared: dict[int, tuple[W4, PreparedW4]] = {}

    def linear(self, x, w) -> np.ndarray:
        if isinstance(w, Dense):
            return self._ref.linear(x, w)
        hit = self._prepared.get(id(w))
        if hit is None or hit[0] is not w:  # keyed by identity; the W4 is kept so the id stays unique
            hit = self._prepared[id(w)] = (w, prepare(w))
        return linear_w4(np.asarray(x, dtype=np.float32), hit[1])

    def __getattr__(self, op):
        return getattr(self._ref, op)
