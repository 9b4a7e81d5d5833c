"""The 4- and 8-bit GEMVs on a load-time layout of four-row blocks and 16-bit words (x86 AVX2).

The file-order GEMV (``gemv_i16.py``) widens each byte's two nibbles to int16 with a
lane-crossing ``vpmovzxbw`` before its ``vpmaddwd``, and reads four rows as four separate
streams. Here, at load, each 4-bit weight with groups of a multiple of 64 is repacked, one tensor
at a time, into:

- ``words`` (blocks, G * chunks * 4 * 16) uint16: for block b (rows 4b..4b+3), group g, chunk c
  (64 columns) and row k, sixteen words; nibble p of word i is the value of column
  ``g * group_size + 64 c + 16 p + i``. Sixteen words are one 32-byte vector, and
  ``(w >> 4p) & 15`` is already sixteen int16 lanes that meet sixteen consecutive activations:
  three shifts, three ANDs and four ``vpmaddwd`` per 64 weights, no widening, and one contiguous
  stream per block of rows.
- 8-bit weights (the int8 head), groups of a multiple of 32: the same with 32 columns a chunk;
  byte h of word i is the value of column ``32 c + 16 h + i`` (one AND, one shift, two
  ``vpmaddwd`` per 32 weights).
- ``scales`` (blocks, G * 4) uint16 (fp16 bits) and ``zeros`` (blocks, G * 4) uint8: the four
  rows' group scale and zero point side by side, read as one 4-lane vector per group.

Rows past the end (out not a multiple of 4) are zero and never written out. Activations are int16
in natural order with a scale per group (``gemv_i16.quantize_x16_flat``, error below
2^-15). Each of the eight int32 lanes sums group_size / 8 products of a group exactly (at most
128 * 255 * 32767 < 2^31 for 8-bit groups of 1024) before it is converted to float32, so a row's
result is ``sum_g s_g * xscale_g * dot_g - sum_g s_g * z_g * xsum_g``.

What it reaches, and why, is in docs/cpu-kernels.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from edge_awq.backends.numba.gemv_i16 import AVAILABLE, quantize_x16_flat
from edge_awq.backends.numba.intrinsics import half_f32

CHUNK = 64  # columns per 32-byte vector of 16 words (4-bit)
CHUNK8 = 32  # the same for 8-bit values
ROWS = 4  # rows per block

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V16I16, _V8I32 = ir.VectorType(_I16, 16), ir.VectorType(_I32, 8)
_F32 = ir.FloatType()
_V4F, _V8F = ir.VectorType(_F32, 4), ir.VectorType(_F32, 8)


@dataclass(frozen=True)
class BlockedW4:
    """A 4-bit weight in the block layout (see the module docstring)."""

    words: np.ndarray  # (blocks, G * chunks * 64) uint16
    scales: np.ndarray  # (blocks, G * 4) uint16, fp16 bits
    zeros: np.ndarray  # (blocks, G * 4) uint8
    out_features: int
    group_size: int
    bits: int = 4


def usable(bits: int, group_size: int) -> bool:
    """The block layout applies: x86 AVX2 and 4 bits in groups of a multiple of 64 columns, or
    8 bits in groups of a multiple of 32 up to 1024 (int32 sums stay exact)."""
    if bits == 4:
        return AVAILABLE and group_size % CHUNK == 0
    return AVAILABLE and bits == 8 and group_size % CHUNK8 == 0 and group_size <= 1024


def chunk_columns(bits: int) -> int:
    return CHUNK if bits == 4 else CHUNK8


@njit(cache=True, inline="always")
def _file_value(qb, r, col, bits):
    """Value number col of file-order row r: a nibble (low one first) or a byte."""
    if bits == 8:
        return np.uint16(qb[r, col])
    byte = qb[r, col >> 1]
    return np.uint16((byte >> np.uint8(4)) if col & 1 else (byte & np.uint8(15)))


@njit(nogil=True, parallel=True, cache=True)
def _repack_kernel(qb, scale_bits, zero_bytes, group_size, bits, words, scales, zeros):
    out_f, n_groups = scale_bits.shape
    parts = 16 // bits  # values per word
    chunks = group_size // (16 * parts)
    for b in prange(words.shape[0]):
        for k in range(ROWS):
            r = ROWS * b + k
            if r >= out_f:
                continue  # padding rows stay zero
            for g in range(n_groups):
                scales[b, ROWS * g + k] = scale_bits[r, g]
                zeros[b, ROWS * g + k] = _file_value(zero_bytes, r, g, bits)
                for c in range(chunks):
                    base = ((g * chunks + c) * ROWS + k) * 16
                    col0 = g * group_size + c * 16 * parts
                    for i in range(16):
                        word = np.uint16(0)
                        for p in range(parts):
                            word |= _file_value(qb, r, col0 + 16 * p + i, bits) << np.uint16(bits * p)
                        words[b, base + i] = word


def repack(qbytes: np.ndarray, scale_bits: np.ndarray, zero_bytes: np.ndarray, group_size: int,
           bits: int = 4) -> BlockedW4:
    """The block layout of a 4- or 8-bit weight given as file-order bytes (out, in * bits / 8),
    fp16 scale bits (out, G) and packed zero points (out, >= G * bits / 8 bytes)."""
    out_f, n_groups = scale_bits.shape
    blocks = -(-out_f // ROWS)
    words = np.zeros((blocks, n_groups * group_size * bits // 16 * ROWS), np.uint16)
    scales = np.zeros((blocks, n_groups * ROWS), np.uint16)
    zeros = np.zeros((blocks, n_groups * ROWS), np.uint8)
    _repack_kernel(qbytes, scale_bits, zero_bytes, group_size, bits, words, scales, zeros)
    return BlockedW4(words, scales, zeros, out_f, group_size, bits)


def _splat(builder, x, vty):
    v = builder.insert_element(ir.Constant(vty, None), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count))


def _const(ty, n: int, v: int) -> ir.Constant:
    return ir.Constant(ir.VectorType(ty, n), [v] * n)


def _block4_codegen(bits: int):
    """The code of one block's four dot products for 4- or 8-bit words (see ``block4``)."""
    cols = chunk_columns(bits)
    parts_per_word = 16 // bits

    def codegen(context, builder, signature, args):
        wp, sp, zp, xp, fxp, sxp, n_groups, chunks = args
        pmadd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8I32, [_V16I16, _V16I16]),
                                               "llvm.x86.avx2.pmadd.wd")
        facc = [cgutils.alloca_once_value(builder, ir.Constant(_V8F, None)) for _ in range(ROWS)]
        ztot = cgutils.alloca_once_value(builder, ir.Constant(_V4F, None))
        accs = [cgutils.alloca_once(builder, _V8I32) for _ in range(ROWS)]
        mask = _const(_I16, 16, (1 << bits) - 1)
        shifts = [_const(_I16, 16, bits * p) for p in range(parts_per_word)]
        vec_bytes = ir.Constant(_I64, 32)
        fma8 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8F, [_V8F] * 3), "llvm.fma.v8f32")

        def chunk(gc):
            """Add chunk number gc of the rows to the four int32 accumulators."""
            xbase = builder.add(xp, builder.mul(gc, ir.Constant(_I64, 2 * cols)))
            xs = [builder.load(builder.inttoptr(builder.add(xbase, ir.Constant(_I64, 32 * p)),
                                                _V16I16.as_pointer()), align=2) for p in range(parts_per_word)]
            wbase = builder.add(wp, builder.mul(gc, ir.Constant(_I64, ROWS * 32)))
            for k, acc in enumerate(accs):
                addr = builder.add(wbase, builder.mul(ir.Constant(_I64, k), vec_bytes))
                w = builder.load(builder.inttoptr(addr, _V16I16.as_pointer()), align=2)
                parts = []
                for p in range(parts_per_word):
                    v = w if p == 0 else builder.lshr(w, shifts[p])
                    if p < parts_per_word - 1:
                        v = builder.and_(v, mask)
                    parts.append(builder.call(pmadd, [v, xs[p]]))
                while len(parts) > 1:
                    parts = [builder.add(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
                s = parts[0]
                builder.store(builder.add(builder.load(acc), s), acc)

        with cgutils.for_range(builder, n_groups) as gl:
            g = gl.index
            for acc in accs:
                builder.store(ir.Constant(_V8I32, None), acc)
            half = builder.udiv(chunks, ir.Constant(_I64, 2))
            first = builder.mul(g, chunks)
            with cgutils.for_range(builder, half) as cl:  # two chunks a step (the group's tail below)
                c0 = builder.add(first, builder.mul(cl.index, ir.Constant(_I64, 2)))
                chunk(c0)
                chunk(builder.add(c0, ir.Constant(_I64, 1)))
            with builder.if_then(builder.icmp_unsigned("!=", builder.urem(chunks, ir.Constant(_I64, 2)),
                                                       ir.Constant(_I64, 0))):
                chunk(builder.sub(builder.add(first, chunks), ir.Constant(_I64, 1)))
            sbits = builder.load(builder.inttoptr(builder.add(sp, builder.mul(g, ir.Constant(_I64, 2 * ROWS))),
                                                  ir.VectorType(_I16, ROWS).as_pointer()), align=2)
            s4 = builder.fpext(builder.bitcast(sbits, ir.VectorType(ir.HalfType(), ROWS)), _V4F)
            zb = builder.load(builder.inttoptr(builder.add(zp, builder.mul(g, ir.Constant(_I64, ROWS))),
                                               ir.VectorType(_I8, ROWS).as_pointer()), align=1)
            z4 = builder.uitofp(zb, _V4F)
            goff = builder.mul(g, ir.Constant(_I64, 4))
            fx = builder.load(builder.inttoptr(builder.add(fxp, goff), _F32.as_pointer()))
            sx = builder.load(builder.inttoptr(builder.add(sxp, goff), _F32.as_pointer()))
            m4 = builder.fmul(s4, _splat(builder, fx, _V4F))
            builder.store(builder.fadd(builder.load(ztot), builder.fmul(builder.fmul(s4, z4), _splat(builder, sx, _V4F))),
                          ztot)
            for k in range(ROWS):
                mk = _splat(builder, builder.extract_element(m4, ir.Constant(_I32, k)), _V8F)
                builder.store(builder.call(fma8, [builder.sitofp(builder.load(accs[k]), _V8F), mk,
                                                  builder.load(facc[k])]), facc[k])
        z = builder.load(ztot)
        outs = []
        for k in range(ROWS):
            v = builder.load(facc[k])
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 4), [0, 1, 2, 3]))
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 4), [4, 5, 6, 7]))
            h = builder.fadd(lo, hi)
            total = builder.fadd(builder.fadd(builder.extract_element(h, ir.Constant(_I32, 0)),
                                              builder.extract_element(h, ir.Constant(_I32, 1))),
                                 builder.fadd(builder.extract_element(h, ir.Constant(_I32, 2)),
                                              builder.extract_element(h, ir.Constant(_I32, 3))))
            outs.append(builder.fsub(total, builder.extract_element(z, ir.Constant(_I32, k))))
        return context.make_tuple(builder, signature.return_type, outs)

    return codegen


_SIG = types.UniTuple(types.float32, ROWS)(*([types.int64] * 8))


@intrinsic
def block4(typingctx, wp, sp, zp, xp, fxp, sxp, n_groups, chunks):
    """The four rows of one block of a 4-bit weight dotted with one token's activations, as four
    float32. wp, sp, zp: the block's words, scales and zeros; xp: int16 activations (natural
    order); fxp, sxp: float32 activation scale and sum per group; all addresses (int64)."""
    return _SIG, _block4_codegen(4)


@intrinsic
def block4_w8(typingctx, wp, sp, zp, xp, fxp, sxp, n_groups, chunks):
    """As ``block4`` for 8-bit weights."""
    return _SIG, _block4_codegen(8)


@njit(cache=True, inline="always")
def _block_rows(words, scales, zeros, b, x16, xscale, xsum, group_size, y):
    """y[:, 4b..4b+3] (the rows that exist) of one block, for every token of x16; the words per
    group tell 4-bit (group_size / 4 per row) from 8-bit (group_size / 2)."""
    n_groups = scales.shape[1] // ROWS
    out_f = y.shape[1]
    eight = words.shape[1] // (n_groups * ROWS) == group_size // 2
    wa = words.ctypes.data + b * words.strides[0]
    sa = scales.ctypes.data + b * scales.strides[0]
    za = zeros.ctypes.data + b * zeros.strides[0]
    r = ROWS * b
    for t in range(x16.shape[0]):
        xa = x16.ctypes.data + t * x16.strides[0]
        fa = xscale.ctypes.data + t * xscale.strides[0]
        ma = xsum.ctypes.data + t * xsum.strides[0]
        if eight:
            y0, y1, y2, y3 = block4_w8(wa, sa, za, xa, fa, ma, n_groups, group_size // CHUNK8)
        else:
            y0, y1, y2, y3 = block4(wa, sa, za, xa, fa, ma, n_groups, group_size // CHUNK)
        y[t, r] = y0
        if r + 1 < out_f:
            y[t, r + 1] = y1
        if r + 2 < out_f:
            y[t, r + 2] = y2
        if r + 3 < out_f:
            y[t, r + 3] = y3


@njit(nogil=True, parallel=True, cache=True)
def gemv_kernel(words, scales, zeros, x16, xscale, xsum, group_size, y):
    """y (T, out) = x W^T of one blocked weight; x16 (T, in) int16, xscale, xsum (T, G) float32."""
    for b in prange(words.shape[0]):
        _block_rows(words, scales, zeros, b, x16, xscale, xsum, group_size, y)


@njit(nogil=True, parallel=True, cache=True)
def gemv_three_kernel(wa, sa, za, ya, wb, sb, zb, yb, wc, sc, zc, yc, x16, xscale, xsum, group_size):
    """Three blocked weights that share their input (q, k, v; gate, up and an empty one), one parallel loop."""
    na, nb, nc = wa.shape[0], wb.shape[0], wc.shape[0]
    for q in prange(na + nb + nc):
        if q < na:
            _block_rows(wa, sa, za, q, x16, xscale, xsum, group_size, ya)
        elif q < na + nb:
            _block_rows(wb, sb, zb, q - na, x16, xscale, xsum, group_size, yb)
        else:
            _block_rows(wc, sc, zc, q - na - nb, x16, xscale, xsum, group_size, yc)


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def dequant_kernel(words, scales, zeros, group_size, bits, r0, out):
    """out (rows, in) float32 = dequantized rows r0.. of a blocked weight, natural column order."""
    rows = out.shape[0]
    n_groups = scales.shape[1] // ROWS
    parts = 16 // bits
    chunks = group_size // (16 * parts)
    mask = np.uint16((1 << bits) - 1)
    for j in prange(rows):
        r = r0 + j
        b, k = r // ROWS, r % ROWS
        for g in range(n_groups):
            s = half_f32(scales[b, ROWS * g + k])
            z = np.float32(zeros[b, ROWS * g + k]) * s
            for c in range(chunks):
                base = ((g * chunks + c) * ROWS + k) * 16
                dst = out[j, g * group_size + c * 16 * parts : g * group_size + (c + 1) * 16 * parts]
                for p in range(parts):
                    for i in range(16):
                        v = (words[b, base + i] >> np.uint16(bits * p)) & mask
                        dst[16 * p + i] = np.float32(v) * s - z


def dequantize_rows(b: BlockedW4, r0: int, out: np.ndarray) -> None:
    """out (rows, in) float32 = dequantized rows r0.. of b (rows past its end are not asked for)."""
    dequant_kernel(b.words, b.scales, b.zeros, b.group_size, b.bits, r0, out)


def inputs(x: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (T, in) float32 -> (x16, xscale, xsum): what the blocked GEMV reads."""
    T, n = x.shape
    G = n // group_size
    out = (np.empty((T, n), np.int16), np.empty((T, G), np.float32), np.empty((T, G), np.float32))
    quantize_x16_flat(np.ascontiguousarray(x, dtype=np.float32), group_size, *out)
    return out
