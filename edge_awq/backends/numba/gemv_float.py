"""Float GEMVs and dequantizing kernels on the packed rows as stored (``pack.py``), for every CPU.

A group's dot product is ``scale * sum(q * x) - zs * sum(x)`` with ``zs = zero * scale``. The 4-bit GEMV
splits x once per call into its even and odd entries, so that a byte's two nibbles meet two contiguous
vectors and the loop vectorizes (nibble-to-float conversions in LLVM IR, ``intrinsics.py``); 8-bit rows and
fp16 dense weights read their bytes likewise; other widths (3-bit) read any bit position (``_value``), the
scales as fp16 bits and the zero points from their packed rows (no float copies: a 3-bit file is held at its
own size). Prefill dequantizes blocks of rows into a float32 buffer for BLAS.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from edge_awq.backends.numba.intrinsics import byte_f32, half_f32, hi_nibble, lo_nibble



@njit(cache=True, inline="always")
def _scale_zs(scale_bits, zero_bytes, r, g, bits):
    """Scale and zero point times scale of group g of row r, from fp16 bits and packed 4- or 8-bit zeros."""
    s = half_f32(scale_bits[r, g])
    if bits == 8:
        return s, byte_f32(zero_bytes[r, g]) * s
    zb = zero_bytes[r, g >> 1]
    return s, (hi_nibble(zb) if g & 1 else lo_nibble(zb)) * s


@njit(cache=True, inline="always")
def _value(row, pos, bits):
    """The b-bit value number pos of a packed row (any bit width)."""
    bit = pos * bits
    word, shift = bit >> 5, bit & 31
    v = row[word] >> np.uint32(shift)
    if shift + bits > 32:
        v |= row[word + 1] << np.uint32(32 - shift)
    return v & np.uint32((1 << bits) - 1)


@njit(cache=True, inline="always", fastmath=True)
def _w4_four_rows(qb, scale_bits, zero_bytes, r0, xe, xo, xsum, group_size, y):
    """y[:, r0..r0+3] for 4-bit rows; qb (out, bytes) uint8 in file order (rows past the end repeat the last).

    xe, xo (T, in/2): the even and odd entries of x; xsum (T, G): per-group sums.
    Four rows share the loads of x; slices keep indices provably non-negative,
    which the vectorizer needs.
    """
    out_f, n_groups = scale_bits.shape
    half = group_size // 2
    last = out_f - 1
    r1, r2, r3 = min(r0 + 1, last), min(r0 + 2, last), min(r0 + 3, last)
    for t in range(xe.shape[0]):
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for g in range(n_groups):
            lo, hi = g * half, (g + 1) * half
            b0, b1, b2, b3 = qb[r0, lo:hi], qb[r1, lo:hi], qb[r2, lo:hi], qb[r3, lo:hi]
            xa, xb = xe[t, lo:hi], xo[t, lo:hi]
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for k in range(half):
                s0 += lo_nibble(b0[k]) * xa[k] + hi_nibble(b0[k]) * xb[k]
                s1 += lo_nibble(b1[k]) * xa[k] + hi_nibble(b1[k]) * xb[k]
                s2 += lo_nibble(b2[k]) * xa[k] + hi_nibble(b2[k]) * xb[k]
                s3 += lo_nibble(b3[k]) * xa[k] + hi_nibble(b3[k]) * xb[k]
            xs = xsum[t, g]
            sc, zs = _scale_zs(scale_bits, zero_bytes, r0, g, 4)
            a0 += sc * s0 - zs * xs
            sc, zs = _scale_zs(scale_bits, zero_bytes, r1, g, 4)
            a1 += sc * s1 - zs * xs
            sc, zs = _scale_zs(scale_bits, zero_bytes, r2, g, 4)
            a2 += sc * s2 - zs * xs
            sc, zs = _scale_zs(scale_bits, zero_bytes, r3, g, 4)
            a3 += sc * s3 - zs * xs
        y[t, r0] = a0
        y[t, r1] = a1
        y[t, r2] = a2
        y[t, r3] = a3


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def gemv_w4_kernel(qb, scale_bits, zero_bytes, xe, xo, xsum, group_size, y):
    """y (T, out) = x W^T for 4-bit rows, four rows per iteration (``_w4_four_rows``)."""
    for q in prange((scale_bits.shape[0] + 3) // 4):
        _w4_four_rows(qb, scale_bits, zero_bytes, 4 * q, xe, xo, xsum, group_size, y)


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def gemv_w4_three_kernel(qa, sa, za, ya, qb, sb, zb, yb, qc, sc, zc, yc, xe, xo, xsum, group_size):
    """Three 4-bit weights that share their input (q, k, v; or gate, up and an empty one) in one parallel loop."""
    na, nb, nc = (sa.shape[0] + 3) // 4, (sb.shape[0] + 3) // 4, (sc.shape[0] + 3) // 4
    for q in prange(na + nb + nc):
        if q < na:
            _w4_four_rows(qa, sa, za, 4 * q, xe, xo, xsum, group_size, ya)
        elif q < na + nb:
            _w4_four_rows(qb, sb, zb, 4 * (q - na), xe, xo, xsum, group_size, yb)
        else:
            _w4_four_rows(qc, sc, zc, 4 * (q - na - nb), xe, xo, xsum, group_size, yc)


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def gemv_w8_kernel(qb, scale_bits, zero_bytes, x, xsum, group_size, y):
    """y (T, out) = x W^T for 8-bit rows (one byte per value); x (T, in), xsum (T, G)."""
    T = x.shape[0]
    out_f, n_groups = scale_bits.shape
    for rp in prange((out_f + 1) // 2):
        r0 = 2 * rp
        r1 = min(r0 + 1, out_f - 1)
        for t in range(T):
            acc0 = np.float32(0.0)
            acc1 = np.float32(0.0)
            for g in range(n_groups):
                b0 = qb[r0, g * group_size : (g + 1) * group_size]
                b1 = qb[r1, g * group_size : (g + 1) * group_size]
                xa = x[t, g * group_size : (g + 1) * group_size]
                s0 = np.float32(0.0)
                s1 = np.float32(0.0)
                for k in range(group_size):
                    s0 += byte_f32(b0[k]) * xa[k]
                    s1 += byte_f32(b1[k]) * xa[k]
                sc, zs = _scale_zs(scale_bits, zero_bytes, r0, g, 8)
                acc0 += sc * s0 - zs * xsum[t, g]
                sc, zs = _scale_zs(scale_bits, zero_bytes, r1, g, 8)
                acc1 += sc * s1 - zs * xsum[t, g]
            y[t, r0] = acc0
            y[t, r1] = acc1


@njit(cache=True, inline="always")
def _any_scale_zs(scale_bits, zeros, r, g, bits):
    """Scale and zero point times scale of group g of row r, from fp16 bits and b-bit packed zero rows."""
    s = half_f32(scale_bits[r, g])
    return s, np.float32(_value(zeros[r], g, bits)) * s


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def gemv_any_kernel(qweight, scale_bits, zeros, x, xsum, group_size, bits, y):
    """y (T, out) = x W^T for any bit width and group size; x (T, in), xsum (T, G); scales and zero points
    read as stored (fp16 bits, packed rows), no float copy."""
    T = x.shape[0]
    out_f, n_groups = scale_bits.shape
    for r in prange(out_f):
        row = qweight[r]
        for t in range(T):
            acc = np.float32(0.0)
            for g in range(n_groups):
                s = np.float32(0.0)
                for i in range(g * group_size, (g + 1) * group_size):
                    s += np.float32(_value(row, i, bits)) * x[t, i]
                sc, zs = _any_scale_zs(scale_bits, zeros, r, g, bits)
                acc += sc * s - zs * xsum[t, g]
            y[t, r] = acc


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def dequant_w4_planes_kernel(qb, scale_bits, zero_bytes, group_size, r0, even, odd):
    """even, odd (rows, in/2) float32 = the even and odd columns of rows r0.. of a 4-bit weight."""
    rows = even.shape[0]
    n_groups = scale_bits.shape[1]
    half = group_size // 2
    for j in prange(rows):
        r = r0 + j
        for g in range(n_groups):
            s, z = _scale_zs(scale_bits, zero_bytes, r, g, 4)
            b = qb[r, g * half : (g + 1) * half]
            e = even[j, g * half : (g + 1) * half]
            o = odd[j, g * half : (g + 1) * half]
            for k in range(half):
                e[k] = lo_nibble(b[k]) * s - z
                o[k] = hi_nibble(b[k]) * s - z


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def dequant_w8_kernel(qb, scale_bits, zero_bytes, group_size, r0, out):
    """out (rows, in) float32 = dequantized rows r0.. of an 8-bit weight."""
    rows = out.shape[0]
    n_groups = scale_bits.shape[1]
    for j in prange(rows):
        r = r0 + j
        for g in range(n_groups):
            s, z = _scale_zs(scale_bits, zero_bytes, r, g, 8)
            b = qb[r, g * group_size : (g + 1) * group_size]
            o = out[j, g * group_size : (g + 1) * group_size]
            for k in range(group_size):
                o[k] = byte_f32(b[k]) * s - z


@njit(nogil=True, parallel=True, cache=True)
def dequant_rows_kernel(qweight, scale_bits, zeros, group_size, bits, r0, out):
    """out (rows, in) float32 = dequantized rows r0..r0+rows of the weight (any bit width)."""
    rows, in_f = out.shape
    for j in prange(rows):
        r = r0 + j
        row = qweight[r]
        for g in range(in_f // group_size):
            sc, zs = _any_scale_zs(scale_bits, zeros, r, g, bits)
            for i in range(g * group_size, (g + 1) * group_size):
                out[j, i] = np.float32(_value(row, i, bits)) * sc - zs


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def gemv_f16_kernel(w, x, y):
    """y (T, out) = x W^T for a float16 weight read as uint16 bits (out, in); x (T, in)."""
    T = x.shape[0]
    out_f = w.shape[0]
    for rp in prange((out_f + 1) // 2):
        r0 = 2 * rp
        r1 = min(r0 + 1, out_f - 1)
        w0, w1 = w[r0], w[r1]
        for t in range(T):
            xt = x[t]
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            for k in range(xt.shape[0]):
                s0 += half_f32(w0[k]) * xt[k]
                s1 += half_f32(w1[k]) * xt[k]
            y[t, r0] = s0
            y[t, r1] = s1


@njit(nogil=True, parallel=True, cache=True)
def f16_rows_kernel(w, r0, out):
    """out (rows, in) float32 = rows r0.. of a float16 weight read as uint16 bits."""
    rows, in_f = out.shape
    for j in prange(rows):
        src, dst = w[r0 + j], out[j]
        for k in range(in_f):
            dst[k] = half_f32(src[k])
