"""The CPU backend: numba kernels that read the packed weights directly (parallel over rows).

Packed layout (``pack.py``): each row of b-bit values is a little-endian bit
stream; for 4 bits, byte k of a row holds value 2k in its low nibble and value
2k+1 in its high nibble. On x86 with AVX2, 4-bit weights in groups of a multiple
of 64 are repacked once at load, one tensor at a time, into blocks of four rows
and 16-bit words (``numba_gemv_blocked``), and the file's pages of that tensor
leave the resident set: the repacked copy takes their place, never beside a
second one. Elsewhere the file's bytes are read where they lie: the 4-bit GEMV
splits x once per call into its even and odd entries, so that a byte's two
nibbles meet two contiguous vectors and the loop vectorizes
(``numba_intrinsics``); on AVX2 with other group sizes, with int16 activations
(``numba_gemv_i16``). A group's dot product is ``scale * sum(q * x) - zs * sum(x)``
with ``zs = zero * scale``. Prefill dequantizes blocks of rows into a small
float32 buffer and multiplies with BLAS; fp16 dense weights (the head, FP
models) are read as fp16.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from edge_awq import threads
from edge_awq.ops import HostMemory
from edge_awq.model import LINEARS, W4, Dense
from edge_awq.pack import unpack_bits
from edge_awq.tensorfile import release_array
from edge_awq.backends import numba_gemv_blocked as blocked
from edge_awq.backends import numba_gemv_i16 as i16
from edge_awq.backends.numba_intrinsics import byte_f32, half_f32, hi_nibble, int8_f32, lo_nibble

threads.configure()  # before the first parallel kernel starts OpenMP

DEQUANT_ROWS = 256  # rows dequantized per block for the prefill GEMM
GEMV_MAX_T = 4  # up to this many tokens, linears run as GEMVs over the packed rows


@dataclass(frozen=True)
class PreparedW4:
    """A W4 ready for the kernels.

    Where the block layout applies (``blocked``), it is all the kernels read and the
    source's arrays are not kept: a weight converted at load (an AWQ checkpoint's
    transposed words) is not held twice. Elsewhere 4- and 8-bit weights
    (``byte_path``) are read where they lie: bytes, fp16 scale bits and packed zero
    points are views of the file's arrays, so a memory-mapped model costs no second
    copy; other widths widen scales and zero points to float32 (``zs = zero * scale``)
    for the generic kernels.
    """

    out_features: int
    qweight: np.ndarray | None  # (out, words) uint32, as in the file (None when blocked)
    qbytes: np.ndarray | None  # the same memory as (out, 4 * words) uint8
    scale_bits: np.ndarray | None  # (out, G) uint16: the fp16 scales' bits
    zero_bytes: np.ndarray | None  # (out, 4 * zero words) uint8: the packed zero points
    scales: np.ndarray | None  # (out, G) float32, other widths only
    zs: np.ndarray | None  # (out, G) float32: zero point times scale, other widths only
    group_size: int
    bits: int
    in_features: int
    bias: np.ndarray | None  # (out,) float32
    blocked: blocked.BlockedW4 | None = None  # the load-time block layout, where it applies (then read instead)

    @property
    def byte_path(self) -> bool:
        """Whether the byte kernels apply: 4 bits in even groups, or 8 bits."""
        return (self.bits == 4 and self.group_size % 2 == 0) or self.bits == 8

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


def prepare(w: W4, repack: bool = False) -> PreparedW4:
    """w's arrays as the kernels read them; repack: the block layout where it applies
    (``numba_gemv_blocked``), after which the file's pages of w leave the resident set."""
    qweight = np.ascontiguousarray(w.qweight)
    scale_bits = np.ascontiguousarray(w.scales, dtype=np.float16).view(np.uint16)
    zero_bytes = np.ascontiguousarray(w.zeros).view(np.uint8)
    bias = None if w.bias is None else np.asarray(w.bias, np.float32)
    out_f = qweight.shape[0]
    if repack and blocked.usable(w.bits, w.group_size):
        packed = blocked.repack(qweight.view(np.uint8), scale_bits, zero_bytes, w.group_size, w.bits)
        for a in (w.qweight, w.scales, w.zeros):
            release_array(a)
        return PreparedW4(out_f, None, None, None, None, None, None, w.group_size, w.bits, w.in_features, bias, packed)
    scales = zs = None
    if not ((w.bits == 4 and w.group_size % 2 == 0) or w.bits == 8):
        scales = w.scales.astype(np.float32)
        zs = unpack_bits(w.zeros, w.bits, w.in_features // w.group_size).astype(np.float32) * scales
    return PreparedW4(out_f, qweight, qweight.view(np.uint8), scale_bits, zero_bytes, scales, zs, w.group_size, w.bits,
                      w.in_features, bias)


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


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def gemv_any_kernel(qweight, scales, zs, x, xsum, group_size, bits, y):
    """y (T, out) = x W^T for any bit width and group size; x (T, in), xsum (T, G)."""
    T = x.shape[0]
    out_f, n_groups = scales.shape
    for r in prange(out_f):
        row = qweight[r]
        for t in range(T):
            acc = np.float32(0.0)
            for g in range(n_groups):
                s = np.float32(0.0)
                for i in range(g * group_size, (g + 1) * group_size):
                    s += np.float32(_value(row, i, bits)) * x[t, i]
                acc += scales[r, g] * s - zs[r, g] * xsum[t, g]
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
def dequant_rows_kernel(qweight, scales, zs, group_size, bits, r0, out):
    """out (rows, in) float32 = dequantized rows r0..r0+rows of the weight (any bit width)."""
    rows, in_f = out.shape
    for j in prange(rows):
        row = qweight[r0 + j]
        for i in range(in_f):
            g = i // group_size
            out[j, i] = np.float32(_value(row, i, bits)) * scales[r0 + j, g] - zs[r0 + j, g]


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


def _blocked(x: np.ndarray, out_f: int, in_f: int, fill, n_buffers: int = 1) -> np.ndarray:
    """y = x W^T with W made DEQUANT_ROWS rows at a time by fill(r0, *buffers) and multiplied by BLAS."""
    y = np.empty((x.shape[0], out_f), np.float32)
    bufs = [np.empty((min(DEQUANT_ROWS, out_f), in_f), np.float32) for _ in range(n_buffers)]
    xs = [x] if n_buffers == 1 else [np.ascontiguousarray(x[:, 0::2]), np.ascontiguousarray(x[:, 1::2])]
    for r0 in range(0, out_f, DEQUANT_ROWS):
        rows = min(DEQUANT_ROWS, out_f - r0)
        views = [b[:rows] for b in bufs]
        fill(r0, *views)
        np.matmul(xs[0], views[0].T, out=y[:, r0 : r0 + rows])
        for xi, v in zip(xs[1:], views[1:]):
            y[:, r0 : r0 + rows] += xi @ v.T
    return y


def _gemv_inputs(x: np.ndarray, group_size: int):
    """x (T, in) -> its even and odd entries and its per-group sums, as the 4-bit GEMV reads them."""
    T = x.shape[0]
    xsum = x.reshape(T, -1, group_size).sum(axis=2)  # (T, G)
    return np.ascontiguousarray(x[:, 0::2]), np.ascontiguousarray(x[:, 1::2]), xsum


def linears_w4(x: np.ndarray, ws: list[PreparedW4]) -> list[np.ndarray]:
    """x (T <= GEMV_MAX_T, in) times two or three 4-bit weights of one group size, as one parallel kernel."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    gs = ws[0].group_size
    ys = [np.empty((x.shape[0], w.out_features), np.float32) for w in ws]
    use_blocked = all(w.blocked is not None for w in ws)
    if use_blocked:
        sets = [(w.blocked.words, w.blocked.scales, w.blocked.zeros, y) for w, y in zip(ws, ys)]
    else:
        sets = [(w.qbytes, w.scale_bits, w.zero_bytes, y) for w, y in zip(ws, ys)]
    if len(sets) == 2:  # an empty third weight
        sets.append(tuple(a[:0] for a in sets[0][:3]) + (ys[0][:, :0],))
    if use_blocked:
        blocked.gemv_three_kernel(*sets[0], *sets[1], *sets[2], *blocked.inputs(x, gs), gs)
    elif i16.usable(gs):
        i16.gemv_w4_i16_three_kernel(*sets[0], *sets[1], *sets[2], *i16.gemv_inputs_i16(x, gs), gs)
    else:
        gemv_w4_three_kernel(*sets[0], *sets[1], *sets[2], *_gemv_inputs(x, gs), gs)
    for w, y in zip(ws, ys):
        if w.bias is not None:
            y += w.bias
    return ys


def linear_w4(x: np.ndarray, w: PreparedW4) -> np.ndarray:
    """x (T, in) float32 -> (T, out) float32: GEMV over packed rows for few tokens, blocked dequant + BLAS for more."""
    T = x.shape[0]
    out_f = w.out_features
    n_groups = w.in_features // w.group_size
    fast4 = w.byte_path and w.bits == 4
    if T <= GEMV_MAX_T:
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.empty((T, out_f), np.float32)
        if w.blocked is not None:  # the load-time block layout (x86 AVX2; 4- and 8-bit)
            b = w.blocked
            blocked.gemv_kernel(b.words, b.scales, b.zeros, *blocked.inputs(x, w.group_size), w.group_size, y)
        elif fast4 and i16.usable(w.group_size):  # integer dot products (x86 AVX2)
            i16.gemv_w4_i16_kernel(w.qbytes, w.scale_bits, w.zero_bytes, *i16.gemv_inputs_i16(x, w.group_size),
                                   w.group_size, y)
        elif fast4:
            xe, xo, xsum = _gemv_inputs(x, w.group_size)
            gemv_w4_kernel(w.qbytes, w.scale_bits, w.zero_bytes, xe, xo, xsum, w.group_size, y)
        elif w.bits == 8 and i16.usable8(w.group_size):
            i16.gemv_w8_i16_kernel(w.qbytes, w.scale_bits, w.zero_bytes, *i16.gemv_inputs_i16_flat(x, w.group_size),
                                   w.group_size, y)
        elif w.bits == 8:
            xsum = x.reshape(T, n_groups, w.group_size).sum(axis=2)  # (T, G)
            gemv_w8_kernel(w.qbytes, w.scale_bits, w.zero_bytes, x, xsum, w.group_size, y)
        else:
            xsum = x.reshape(T, n_groups, w.group_size).sum(axis=2)  # (T, G)
            gemv_any_kernel(w.qweight, w.scales, w.zs, x, xsum, w.group_size, w.bits, y)
    elif w.blocked is not None:
        y = _blocked(x, out_f, w.in_features, lambda r0, out: blocked.dequantize_rows(w.blocked, r0, out))
    elif fast4:
        y = _blocked(x, out_f, w.in_features // 2,
                     lambda r0, e, o: dequant_w4_planes_kernel(w.qbytes, w.scale_bits, w.zero_bytes, w.group_size, r0, e, o), 2)
    elif w.bits == 8:
        y = _blocked(x, out_f, w.in_features,
                     lambda r0, out: dequant_w8_kernel(w.qbytes, w.scale_bits, w.zero_bytes, w.group_size, r0, out))
    else:
        y = _blocked(x, out_f, w.in_features,
                     lambda r0, out: dequant_rows_kernel(w.qweight, w.scales, w.zs, w.group_size, w.bits, r0, out))
    if w.bias is not None:
        y += w.bias
    return y


def linear_f16(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x (T, in) float32 -> (T, out) float32 for a float16 weight (out, in), read as float16."""
    bits = np.ascontiguousarray(w).view(np.uint16)
    out_f, in_f = bits.shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] <= GEMV_MAX_T:
        y = np.empty((x.shape[0], out_f), np.float32)
        gemv_f16_kernel(bits, x, y)
        return y
    return _blocked(x, out_f, in_f, lambda r0, out: f16_rows_kernel(bits, r0, out))


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
    """scores <- exp(scores - top) in place; returns their sum (the softmax denominator)."""
    total = np.float32(0.0)
    for s in range(scores.shape[0]):
        scores[s] = np.exp(scores[s] - top)
        total += scores[s]
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
def _silu_mul_row(gate, up, out, t):
    for i in range(gate.shape[1]):
        g = gate[t, i]
        out[t, i] = g / (np.float32(1.0) + np.exp(-g)) * up[t, i]


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def silu_mul_kernel(gate, up, out):
    """out (T, n) = silu(gate) * up; out may be gate."""
    for t in prange(gate.shape[0]):
        _silu_mul_row(gate, up, out, t)


@njit(nogil=True, cache=True, fastmath=True)
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


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _kept_while_alive(table: dict, obj, make):
    """make(obj), computed once and kept in table while obj lives (keyed by identity; the entry
    leaves with obj, so layers read lazily do not pile up their prepared copies)."""
    key = id(obj)
    hit = table.get(key)
    if hit is None or hit[0]() is not obj:
        hit = table[key] = (weakref.ref(obj), make(obj))
        weakref.finalize(obj, table.pop, key, None)
    return hit[1]


class NumbaBackend(HostMemory):
    """The six ops in numba. W4 linears read packed weights; Dense ones (fp16 head, FP models) use BLAS."""

    name = "numba"
    kv_dtype = np.float16

    def __init__(self):
        self._prepared_w4: dict[int, tuple[weakref.ref, PreparedW4]] = {}  # id(W4) -> (a weak ref to it, prepared)
        self._dense: dict[int, tuple[weakref.ref, np.ndarray]] = {}  # id(Dense) -> (..., its float32 weight)
        self._angles: tuple = (None,)
        self._fused: dict[int, tuple] = {}  # id(LayerWeights) -> (a weak ref to it, decode_layer's arrays or None)

    def embed(self, table, tokens) -> np.ndarray:
        return np.asarray(table[np.asarray(tokens, dtype=np.int64)], dtype=np.float32)

    def rmsnorm(self, x, weight, eps: float) -> np.ndarray:
        x = _f32(x)
        out = np.empty_like(x)
        (rmsnorm_serial if x.shape[0] <= GEMV_MAX_T else rmsnorm_kernel)(x, _f32(weight), eps, out)
        return out

    def linear(self, x, w) -> np.ndarray:
        x = _f32(x)
        if isinstance(w, PreparedW4):
            return linear_w4(x, w)
        if isinstance(w, Dense):
            if w.weight.dtype == np.float16:  # read as it is stored: half the bytes of a float32 copy
                y = linear_f16(x, w.weight)
            else:
                y = x @ _kept_while_alive(self._dense, w, lambda d: _f32(d.weight)).T  # converted once
            return y if w.bias is None else y + _f32(w.bias)
        return linear_w4(x, self._prepared(w))

    def linears(self, x, ws) -> list[np.ndarray]:
        x = _f32(x)
        if x.shape[0] <= GEMV_MAX_T and len(ws) in (2, 3) and all(isinstance(w, (W4, PreparedW4)) for w in ws):
            ps = [self._prepared(w) for w in ws]
            if all(p.byte_path and p.bits == 4 and p.group_size == ps[0].group_size for p in ps):
                return linears_w4(x, ps)
        return [self.linear(x, w) for w in ws]

    def prepare(self, w):
        """The model with every packed linear prepared now, one at a time, rather than at its first token:
        the returned weights hold the prepared forms in place of the W4s (drop the argument to free what
        was converted at load). Layers read lazily are prepared as they come, and dropped with them."""
        output = self._prepared(w.output) if isinstance(w.output, W4) else w.output
        if not isinstance(w.layers, list):
            return dataclasses.replace(w, output=output)
        layers = [dataclasses.replace(lw, **{n: self._prepared(getattr(lw, n)) for n in LINEARS
                                             if isinstance(getattr(lw, n), W4)}) for lw in w.layers]
        return dataclasses.replace(w, layers=layers, output=output)

    def _prepared(self, w) -> PreparedW4:
        """A W4 prepared (once, kept while it lives), or a PreparedW4 as it is."""
        if isinstance(w, PreparedW4):
            return w
        return _kept_while_alive(self._prepared_w4, w, lambda m: prepare(m, repack=True))

    def decode_block(self, lw, x, pos: int, cache, layer: int, w):
        """One decoder layer for one token as a single compiled call (``numba_decode``), or None when
        this layer, cache or machine is not the case it covers (the model then runs op by op)."""
        args = self._decode_args(lw, w) if x.shape[0] == 1 and cache.k.dtype == np.float16 else None
        if args is None:
            return None
        from edge_awq.backends.numba_decode import decode_layer

        cos, sin = self._rope_angles(pos, 1, w.inv_freq)
        a = w.args
        return decode_layer(_f32(x), *args, cos, sin, a.rope_interleaved,
                            cache.k[layer].view(np.uint16), cache.v[layer].view(np.uint16), pos, a.n_heads,
                            a.n_kv_heads, a.head_dim, lw.w1.shape[0])

    def _decode_args(self, lw, w):
        """The layer's arrays for ``decode_layer`` (kept per layer), or None if it does not apply."""
        return _kept_while_alive(self._fused, lw, lambda layer: self._layer_args(layer, w))

    def _layer_args(self, lw, w):
        lins = [getattr(lw, n) for n in LINEARS]  # decode_layer takes them in this order
        ok = (all(isinstance(m, (W4, PreparedW4)) and m.bits == 4 and m.bias is None for m in lins)
              and len({m.group_size for m in lins}) == 1)
        if not ok:
            return None
        ps = [self._prepared(m) for m in lins]
        if not all(p.blocked is not None for p in ps):
            return None
        return (np.asarray(lw.attn_norm, np.float32), np.asarray(lw.ffn_norm, np.float32), w.args.norm_eps,
                *[(p.blocked.words, p.blocked.scales, p.blocked.zeros) for p in ps], lins[0].group_size)

    def rope(self, x, pos: int, inv_freq, interleaved: bool) -> np.ndarray:
        x = _f32(x)
        cos, sin = self._rope_angles(pos, x.shape[0], inv_freq)
        out = np.empty_like(x)
        (rope_serial if x.shape[0] <= GEMV_MAX_T else rope_kernel)(x, cos, sin, interleaved, out)
        return out

    def _rope_angles(self, pos: int, T: int, inv_freq) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin (T, hd/2) float32 of positions pos..pos+T-1, computed once for all layers of a step."""
        key = (pos, T, id(inv_freq))
        if self._angles[0] != key:
            angles = np.arange(pos, pos + T, dtype=np.float64)[:, None] * inv_freq[None, :]  # (T, hd/2)
            self._angles = (key, np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32), inv_freq)
        return self._angles[1], self._angles[2]

    def attention(self, q, k, v, cache, layer: int, pos: int) -> np.ndarray:
        T, H, hd = q.shape
        if cache.k.dtype not in (np.float16, np.int8):
            raise TypeError("the numba backend keeps its KV cache in float16 or int8: allocate it with one of those")
        cache.write(layer, pos, k, v)
        out = np.empty((T, H, hd), np.float32)
        if cache.k.dtype == np.int8:
            attention_int8_kernel(_f32(q), cache.k[layer], cache.k_scale[layer], cache.v[layer], cache.v_scale[layer],
                                  pos, out)
        else:
            attention_kernel(_f32(q), cache.k[layer].view(np.uint16), cache.v[layer].view(np.uint16), pos, out)
        return out.reshape(T, H * hd)

    def silu_mul(self, gate, up) -> np.ndarray:
        gate = _f32(gate)
        out = np.empty_like(gate)
        (silu_mul_serial if gate.shape[0] <= GEMV_MAX_T else silu_mul_kernel)(gate, _f32(up), out)
        return out
