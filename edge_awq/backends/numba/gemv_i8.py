"""Linears with 8-bit activations: integer dot products of the weights' codes with int8 activations,
for one token (decode) and for many (prefill), from one weight layout.

Each linear input is quantized once to int8 with a scale per group of the weights' group size
(``quantize_x8``: ``x8 = rint(x / s)``, ``s = max|x| / 127``); a row's group is then the exact integer
``sum q * x8 - z * sum x8``, times the weight's and the activations' scales in float32 — the arithmetic
of ``backends/reference.py``'s ``linear_int8``, which the tests hold these kernels to.

The weights are repacked once at load, one tensor at a time, into blocks of eight rows (``repack``) whose
bytes interleave the rows four columns at a time, so that one 32-byte vector holds four consecutive
codes of each of the eight rows, and one instruction adds four products into each row's own 32-bit
lane — no sums across lanes, and the activations' four bytes broadcast to all eight:

- 4-bit, groups of a multiple of 64: per 64-column chunk eight such vectors; in vector q, row k's four
  bytes hold columns 4q..4q+3 of the chunk in their low nibbles and columns 32+4q..32+4q+3 in their high
  ones (``w & 15`` and ``w >> 4`` meet the activations of those columns); groups of an odd multiple of
  32 (32, 96, ...) the same in 32-column chunks of four vectors, the high nibbles columns 16+4q..16+4q+3;
- 3-, 5- and 6-bit (a mixed file's), groups of a multiple of 32, chunks as 4-bit's: the same file bytes in
  two planes, a low plane of each code's low ``wl`` bits and a high plane of its other ``wh`` (``split``:
  3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2); a plane of width w holds quads * w / 8 vectors, vector m the quads
  m, m + n, m + 2n, ... in its bits 0..w-1, w..2w-1, ... (n its vector count): 3-bit's low bit pairs four
  quads a byte and third bits eight; 5- and 6-bit's low plane is 4-bit's nibble layout. Bits a code as
  stored, no more, each quad's codes rebuilt by shifts, masks and an or;
- 8-bit (the int8 head), groups of a multiple of 32: per 32-column chunk eight vectors of the codes;
- ``scales`` (blocks, G * 8) fp16 bits and ``zeros`` (blocks, G * 8) uint8: eight rows side by side.

A tile of up to ``TOKENS`` tokens reads each vector of weights once (``tile_i8.tile_a8``), so prefill is a
blocked integer GEMM on the packed weights, and a decode step the same loop with one token. The inner loop
(``tile_i8.py``) is chosen by ``isa.ISA`` when the kernels compile: AVX-512 VNNI or AVX-VNNI ``vpdpbusd`` (unsigned codes
times signed activations, four products into each int32 lane), AVX2 ``vpmaddubsw`` then ``vpmaddwd``
(pairs of products in int16: at most 2 * 2 * 15 * 127 for 4-bit codes, exact), the Armv8.2 ``sdot``, or
widening multiplies on plain NEON; with Armv8.6 i8mm a prompt's tiles run ``smmla`` instead (``_mmla_chunk``:
each instruction two rows times two tokens, eight codes deep, from the same layout by one 32-bit zip). 8-bit codes meet the signed instructions as ``code - 128`` (its zero
point likewise): on AVX2 as |w| and x with w's sign (``vpsignb``), whose pairs stay within int16.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numba import njit, prange

from edge_awq.backends.numba.intrinsics import half_f32
from edge_awq.backends.numba.isa import ISA

from edge_awq.backends.numba.tile_i8 import (CHUNK4, CHUNK8, QUAD, ROWS, TOKENS, split, tile_many, tile_one,
                                              variant)


@dataclass(frozen=True)
class BlockedA8:
    """A 3-, 4-, 5-, 6- or 8-bit weight in the 8-bit-activation block layout (see the module docstring)."""

    words: np.ndarray  # (blocks, G * chunks * 8 * 32) uint8: the codes, rows interleaved four at a time
    scales: np.ndarray  # (blocks, G * 8) uint16, fp16 bits
    zeros: np.ndarray  # (blocks, G * 8) uint8: the zero points
    out_features: int
    group_size: int
    bits: int


def usable(bits: int, group_size: int) -> bool:
    """Whether this CPU has the integer kernels and the weight fits the layout (int32 sums stay exact)."""
    if ISA == "none":
        return False
    if bits in (3, 4, 5, 6):
        return group_size % (CHUNK4 // 2) == 0
    return bits == 8 and group_size % CHUNK8 == 0 and group_size <= 1 << 15


@njit(cache=True, inline="always")
def chunk_columns(bits, group_size):
    """Columns a chunk of the layout holds: 32 for 8-bit, 64 for 4-bit but 32 where the group is an odd
    multiple of 32."""
    if bits == 8:
        return CHUNK8
    return CHUNK4 if group_size % CHUNK4 == 0 else CHUNK4 // 2


@njit(cache=True, inline="always")
def _code(qb, r, col, bits):
    """Value number col of file-order row r (a nibble, low one first, a byte, or 3, 5 or 6 bits of the
    row's little-endian bit stream)."""
    if bits == 8:
        return np.int32(qb[r, col])
    if bits != 4:
        bit = bits * col
        byte = bit >> 3
        v = np.int32(qb[r, byte])
        if byte + 1 < qb.shape[1]:
            v |= np.int32(qb[r, byte + 1]) << 8
        return (v >> (bit & 7)) & ((1 << bits) - 1)
    byte = qb[r, col >> 1]
    return np.int32((byte >> np.uint8(4)) if col & 1 else (byte & np.uint8(15)))


@njit(cache=True, inline="always")
def _offset_split(quad, j, k, quads, wl, wh):
    """Where code j of quad ``quad`` of row k sits in a split chunk of ``quads`` quads (planes of wl and wh
    bits): the byte offset and shift of its low bits, and those of its high bits."""
    nl, nh = quads * wl // 8, quads * wh // 8
    cell = k * QUAD + j
    return (quad % nl) * 32 + cell, wl * (quad // nl), (nl + quad % nh) * 32 + cell, wh * (quad // nh)


@njit(nogil=True, parallel=True, cache=True)
def _repack_kernel(qb, scale_bits, zero_bytes, group_size, bits, words, scales, zeros):
    out_f, n_groups = scale_bits.shape
    cols = chunk_columns(bits, group_size)
    chunks, vecs, half = group_size // cols, cols * bits // QUAD // 8, cols // 2
    for b in prange(words.shape[0]):
        for k in range(ROWS):
            r = ROWS * b + k
            if r >= out_f:
                continue  # padding rows stay zero
            for g in range(n_groups):
                scales[b, ROWS * g + k] = scale_bits[r, g]
                zeros[b, ROWS * g + k] = _code(zero_bytes, r, g, bits)
                for c in range(chunks):
                    col0 = g * group_size + c * cols
                    if bits != 4 and bits != 8:
                        wl, wh = split(bits)
                        start = (g * chunks + c) * vecs * 32
                        for quad in range(cols // QUAD):
                            for j in range(QUAD):
                                v = _code(qb, r, col0 + QUAD * quad + j, bits)
                                lo, ls, hi, hs = _offset_split(quad, j, k, cols // QUAD, wl, wh)
                                words[b, start + lo] |= np.uint8((v & ((1 << wl) - 1)) << ls)
                                words[b, start + hi] |= np.uint8((v >> wl) << hs)
                        continue
                    for q in range(vecs):
                        base = (((g * chunks + c) * vecs + q) * ROWS + k) * QUAD
                        for j in range(QUAD):
                            col = col0 + QUAD * q + j
                            if bits == 4:
                                words[b, base + j] = _code(qb, r, col, 4) | (_code(qb, r, col + half, 4) << 4)
                            else:
                                words[b, base + j] = _code(qb, r, col, 8)


def repack(qbytes: np.ndarray, scale_bits: np.ndarray, zero_bytes: np.ndarray, group_size: int,
           bits: int) -> BlockedA8:
    """The layout of a 3-, 4-, 5-, 6- or 8-bit weight given as file-order bytes (out, in * bits / 8), fp16 scale bits
    (out, G) and packed zero points (out, >= G * bits / 8 bytes)."""
    out_f, n_groups = scale_bits.shape
    blocks = -(-out_f // ROWS)
    words = np.zeros((blocks, n_groups * group_size * bits // 8 * ROWS), np.uint8)
    scales = np.zeros((blocks, n_groups * ROWS), np.uint16)
    zeros = np.zeros((blocks, n_groups * ROWS), np.uint8)
    _repack_kernel(qbytes, scale_bits, zero_bytes, group_size, bits, words, scales, zeros)
    return BlockedA8(words, scales, zeros, out_f, group_size, bits)


# --- activations ---

@njit(cache=True, fastmath=True)  # a maximum is exact in any order (inlined by LLVM, its flags kept)
def _absmax(row, a, n):
    top = np.float32(0.0)
    for k in range(n):
        v = abs(row[a + k])
        top = v if v > top else top
    return top


@njit(cache=True, inline="always", error_model="numpy")
def _round_group(row, a, n, inv, out):
    """out[a:a+n] = clip(rint(row[a:a+n] * inv), -127, 127) as int8; returns their sum."""
    total = 0
    for k in range(n):
        v = np.rint(row[a + k] * inv)
        v = v if v > np.float32(-127.0) else np.float32(-127.0)
        v = v if v < np.float32(127.0) else np.float32(127.0)
        q = np.int32(v)
        out[a + k] = np.int8(q)
        total += q
    return total


@njit(nogil=True, cache=True, error_model="numpy")  # no fastmath: the scales must be the reference's to the bit
def quantize_x8(x, group_size, x8, xscale, xsum):
    """x (T, in) float32 -> x8 (T, in) int8, xscale (T, G) float32 and xsum (T, G) int32: the scale of each
    group, and the sum of the group's x8 (what the zero point multiplies)."""
    T, n = x.shape
    for t in range(T):
        row, out = x[t], x8[t]
        for g in range(n // group_size):
            a = g * group_size
            top = _absmax(row, a, group_size)
            s = top / np.float32(127.0) if top > 0 else np.float32(1.0)
            xsum[t, g] = _round_group(row, a, group_size, np.float32(1.0) / s, out)
            xscale[t, g] = s


@njit(nogil=True, parallel=True, cache=True, error_model="numpy")
def quantize_x8_parallel(x, group_size, x8, xscale, xsum):
    """``quantize_x8`` with the tokens shared among the threads (a prompt)."""
    for t in prange(x.shape[0]):
        quantize_x8(x[t : t + 1], group_size, x8[t : t + 1], xscale[t : t + 1], xsum[t : t + 1])


def inputs(x: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (T, in) float32 -> (x8, xscale, xsum): what the kernels read."""
    T, n = x.shape
    out = (np.empty((T, n), np.int8), np.empty((T, n // group_size), np.float32),
           np.empty((T, n // group_size), np.int32))
    (quantize_x8 if T <= TOKENS else quantize_x8_parallel)(np.ascontiguousarray(x, dtype=np.float32), group_size, *out)
    return out




@lru_cache(maxsize=None)
def kernel_set_of(variants: tuple[tuple[int, int], ...]) -> np.ndarray:
    """The kernel set (see ``kernel_set``) of these sorted (bits, chunk columns) variants, one array per set."""
    return np.empty(0, np.dtype([(f"w{bits}c{cols}", np.uint8) for bits, cols in variants]))


def kernel_set(*weights: BlockedA8) -> np.ndarray:
    """What the kernels' last argument, ``kind``, is for these weights: an empty array whose record dtype names
    the tile variants (bits, chunk columns) they need. Numba compiles a kernel for each type of its
    arguments, so a model's kernels hold only its own widths' tiles (``tile_i8.tile_many``) — one width for
    a uniform file, its few for a mixed one — not all ten, whose code would cost compile time and resident
    memory for nothing."""
    return kernel_set_of(tuple(sorted({(b.bits, chunk_columns.py_func(b.bits, b.group_size)) for b in weights})))


def kernel_union(*kinds: np.ndarray) -> np.ndarray:
    """The kernel set of every weight the sets ``kinds`` are for (a model's, from its layers')."""
    if all(k is kinds[0] for k in kinds):  # a prepared model's linears share one set: nothing to merge
        return kinds[0]
    return kernel_set_of(tuple(sorted({variant(name) for kind in kinds for name in kind.dtype.names})))


@njit(cache=True, inline="always")
def _block(words, scales, zeros, b, x8, xscale, xsum, group_size, y, kind):
    """y[:, 8b..8b+7] (the rows that exist) of one block, every token of x8, TOKENS at a time; kind: the tiles
    compiled (``kernel_set``)."""
    T, out_f = x8.shape[0], y.shape[1]
    n_groups = scales.shape[1] // ROWS
    bits = words.shape[1] * 8 // (n_groups * group_size * ROWS)  # 3, 4, 5, 6 or 8, from the bytes a block holds
    cols = chunk_columns(bits, group_size)
    chunks = group_size // cols
    wa = words.ctypes.data + b * words.strides[0]
    sa = scales.ctypes.data + b * scales.strides[0]
    za = zeros.ctypes.data + b * zeros.strides[0]
    r = ROWS * b
    rows = min(ROWS, out_f - r)
    ya, ys = y.ctypes.data + r * 4, y.strides[0]
    xa, fa, ma = x8.ctypes.data, xscale.ctypes.data, xsum.ctypes.data
    xs, gs = x8.strides[0], xscale.strides[0]
    t = 0
    while t < T:
        if T - t >= TOKENS:
            tile_many(kind, bits, cols, wa, sa, za, xa, xs, fa, ma, gs, n_groups, chunks, ya, ys, rows)
            step = TOKENS
        else:
            tile_one(kind, bits, cols, wa, sa, za, xa, xs, fa, ma, gs, n_groups, chunks, ya, ys, rows)
            step = 1
        t += step
        xa, fa, ma, ya = xa + step * xs, fa + step * gs, ma + step * gs, ya + step * ys


@njit(nogil=True, parallel=True, cache=True)
def gemv_kernel(words, scales, zeros, x8, xscale, xsum, group_size, y, kind):
    """y (T, out) = x W^T of one weight in this layout; x8 (T, in) int8, xscale (T, G) float32, xsum (T, G) int32;
    kind: ``kernel_set`` of the weight. Any number of tokens: a decode step's GEMV, and prefill's GEMM (a block's
    weights read once per tile)."""
    for b in prange(words.shape[0]):
        _block(words, scales, zeros, b, x8, xscale, xsum, group_size, y, kind)


@njit(nogil=True, parallel=True, cache=True)
def gemv_three_kernel(wa, sa, za, ya, wb, sb, zb, yb, wc, sc, zc, yc, x8, xscale, xsum, group_size, kind):
    """Three weights that share their input (q, k, v; gate, up and an empty one), one parallel loop; kind: the
    ``kernel_set`` of the three."""
    na, nb, nc = wa.shape[0], wb.shape[0], wc.shape[0]
    for q in prange(na + nb + nc):
        if q < na:
            _block(wa, sa, za, q, x8, xscale, xsum, group_size, ya, kind)
        elif q < na + nb:
            _block(wb, sb, zb, q - na, x8, xscale, xsum, group_size, yb, kind)
        else:
            _block(wc, sc, zc, q - na - nb, x8, xscale, xsum, group_size, yc, kind)


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def dequant_kernel(words, scales, zeros, group_size, bits, r0, out):
    """out (rows, in) float32 = dequantized rows r0.. of a weight in this layout, natural column order."""
    rows = out.shape[0]
    n_groups = scales.shape[1] // ROWS
    cols = chunk_columns(bits, group_size)
    chunks, vecs, half = group_size // cols, cols * bits // QUAD // 8, cols // 2
    for j in prange(rows):
        r = r0 + j
        b, k = r // ROWS, r % ROWS
        for g in range(n_groups):
            s = half_f32(scales[b, ROWS * g + k])
            z = np.float32(zeros[b, ROWS * g + k])
            for c in range(chunks):
                col0 = g * group_size + c * cols
                if bits != 4 and bits != 8:
                    wl, wh = split(bits)
                    start = (g * chunks + c) * vecs * 32
                    for quad in range(cols // QUAD):
                        for i in range(QUAD):
                            lo, ls, hi, hs = _offset_split(quad, i, k, cols // QUAD, wl, wh)
                            v = (((np.int32(words[b, start + lo]) >> ls) & ((1 << wl) - 1))
                                 | (((np.int32(words[b, start + hi]) >> hs) & ((1 << wh) - 1)) << wl))
                            out[j, col0 + QUAD * quad + i] = (np.float32(v) - z) * s
                    continue
                for q in range(vecs):
                    base = (((g * chunks + c) * vecs + q) * ROWS + k) * QUAD
                    for i in range(QUAD):
                        v = np.int32(words[b, base + i])
                        if bits == 4:
                            out[j, col0 + QUAD * q + i] = (np.float32(v & 15) - z) * s
                            out[j, col0 + half + QUAD * q + i] = (np.float32((v >> 4) & 15) - z) * s
                        else:
                            out[j, col0 + QUAD * q + i] = (np.float32(v) - z) * s


def dequantize_rows(b: BlockedA8, r0: int, out: np.ndarray) -> None:
    """out (rows, in) float32 = dequantized rows r0.. of b."""
    dequant_kernel(b.words, b.scales, b.zeros, b.group_size, b.bits, r0, out)
