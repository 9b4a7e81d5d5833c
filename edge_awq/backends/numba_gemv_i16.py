"""The 4-bit GEMV with integer dot products (x86 AVX2): activations as int16, ``vpmaddwd``.

The float GEMV spends five instructions on every eight weights (widen, mask, convert, FMA) and
is bound by them, not by memory. Here each token's activations are quantized once per call to
int16 with a scale per group (relative error below 2^-15, against the 1e-3 the kernels are held
to); a 16-byte load of packed weights then gives 32 nibbles, widened to int16 and multiplied
and pair-summed into int32 by two ``vpmaddwd`` against the even and odd activations, about a
third of the instructions. Sums of a group stay exact in int32 (at most 128 * 15 * 32767 per
group); group scales and zero points are applied in float32 as in the float kernel.

``dot4_w4_i16`` is LLVM IR calling ``llvm.x86.avx2.pmadd.wd``: x86 with AVX2 only. Elsewhere
(ARM) ``AVAILABLE`` is False and the float kernels run.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .numba_intrinsics import byte_f32, half_f32, hi_nibble, lo_nibble


def _host_has_avx2() -> bool:
    try:
        return bool(llvm_binding.get_host_cpu_features().get("avx2", False))
    except Exception:  # an unknown host: keep to the float kernels
        return False


AVAILABLE = _host_has_avx2()
CHUNK_BYTES = 16  # packed bytes per step: 32 nibbles, so group sizes must be multiples of 32

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V16I8, _V16I16, _V8I32 = ir.VectorType(_I8, 16), ir.VectorType(_I16, 16), ir.VectorType(_I32, 8)


def _splat(ty, n: int, v: int) -> ir.Constant:
    return ir.Constant(ir.VectorType(ty, n), [v] * n)


@intrinsic
def dot4_w4_i16(typingctx, q0, q1, q2, q3, xe, xo, n):
    """Four rows' int32 sums of nibble * activation over n steps of 16 bytes (32 weights).

    q0..q3: addresses of the rows' packed bytes (file order: byte k holds values 2k, 2k+1);
    xe, xo: addresses of the int16 even and odd activations; all int64.
    """
    sig = types.UniTuple(types.int32, 4)(*([types.int64] * 7))

    def codegen(context, builder, signature, args):
        *qs, xe, xo, n = args
        pmadd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8I32, [_V16I16, _V16I16]),
                                               "llvm.x86.avx2.pmadd.wd")
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_V8I32, None)) for _ in qs]
        with cgutils.for_range(builder, n) as loop:
            off = builder.mul(loop.index, ir.Constant(_I64, CHUNK_BYTES))
            xev = builder.load(builder.inttoptr(builder.add(xe, builder.add(off, off)), _V16I16.as_pointer()), align=2)
            xov = builder.load(builder.inttoptr(builder.add(xo, builder.add(off, off)), _V16I16.as_pointer()), align=2)
            for qa, acc in zip(qs, accs):
                b = builder.load(builder.inttoptr(builder.add(qa, off), _V16I8.as_pointer()), align=1)
                lo = builder.zext(builder.and_(b, _splat(_I8, 16, 15)), _V16I16)
                hi = builder.zext(builder.lshr(b, _splat(_I8, 16, 4)), _V16I16)
                s = builder.add(builder.call(pmadd, [lo, xev]), builder.call(pmadd, [hi, xov]))
                builder.store(builder.add(builder.load(acc), s), acc)
        outs = _row_totals(builder, [builder.load(acc) for acc in accs])
        return context.make_tuple(builder, signature.return_type, outs)

    return sig, codegen


@intrinsic
def dot4_w8_i16(typingctx, q0, q1, q2, q3, x, n):
    """Four rows' int32 sums of byte * activation over n steps of 16 bytes (16 weights); addresses."""
    sig = types.UniTuple(types.int32, 4)(*([types.int64] * 6))

    def codegen(context, builder, signature, args):
        *qs, x, n = args
        pmadd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8I32, [_V16I16, _V16I16]),
                                               "llvm.x86.avx2.pmadd.wd")
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_V8I32, None)) for _ in qs]
        with cgutils.for_range(builder, n) as loop:
            off = builder.mul(loop.index, ir.Constant(_I64, CHUNK_BYTES))
            xv = builder.load(builder.inttoptr(builder.add(x, builder.add(off, off)), _V16I16.as_pointer()), align=2)
            for qa, acc in zip(qs, accs):
                b = builder.load(builder.inttoptr(builder.add(qa, off), _V16I8.as_pointer()), align=1)
                s = builder.call(pmadd, [builder.zext(b, _V16I16), xv])
                builder.store(builder.add(builder.load(acc), s), acc)
        outs = _row_totals(builder, [builder.load(acc) for acc in accs])
        return context.make_tuple(builder, signature.return_type, outs)

    return sig, codegen


def _row_totals(builder, v):
    """The four <8 x i32> accumulators' lane sums, with shuffles (no scalar extract per lane)."""
    evens = ir.Constant(ir.VectorType(_I32, 8), list(range(0, 16, 2)))
    odds = ir.Constant(ir.VectorType(_I32, 8), list(range(1, 16, 2)))

    def pair_sums(a, b):  # lanes 0-3: a's adjacent pairs added, lanes 4-7: b's
        return builder.add(builder.shuffle_vector(a, b, evens), builder.shuffle_vector(a, b, odds))

    h = pair_sums(pair_sums(v[0], v[1]), pair_sums(v[2], v[3]))  # lanes 2k, 2k+1: halves of row k
    s = builder.add(builder.shuffle_vector(h, h, ir.Constant(ir.VectorType(_I32, 4), [0, 2, 4, 6])),
                    builder.shuffle_vector(h, h, ir.Constant(ir.VectorType(_I32, 4), [1, 3, 5, 7])))
    return [builder.extract_element(s, ir.Constant(_I32, k)) for k in range(4)]


@njit(cache=True, fastmath=True)
def quantize_x16_flat(x, group_size, x16, xscale, xsum):
    """As ``quantize_x16`` in natural order (the 8-bit GEMV): x16 (T, in) int16."""
    T, n = x.shape
    for t in range(T):
        for g in range(n // group_size):
            seg = x[t, g * group_size : (g + 1) * group_size]
            m = np.float32(0.0)
            s = np.float32(0.0)
            for k in range(group_size):
                m = max(m, abs(seg[k]))
                s += seg[k]
            sc = max(m, np.float32(1e-30)) / np.float32(32767.0)
            inv = np.float32(1.0) / sc
            xscale[t, g] = sc
            xsum[t, g] = s
            out = x16[t, g * group_size : (g + 1) * group_size]
            for k in range(group_size):
                out[k] = np.int16(np.rint(seg[k] * inv))


@njit(parallel=True, cache=True, fastmath=True)
def gemv_w8_i16_kernel(qb, scale_bits, zero_bytes, x16, xscale, xsum, group_size, y):
    """y (T, out) = x W^T for 8-bit rows (one byte per value), four rows per iteration."""
    out_f, n_groups = scale_bits.shape
    steps = group_size // CHUNK_BYTES
    last = out_f - 1
    qa, qs = qb.ctypes.data, qb.strides[0]
    xa, xstride = x16.ctypes.data, x16.strides[0]
    for q in prange((out_f + 3) // 4):
        r0 = 4 * q
        r1, r2, r3 = min(r0 + 1, last), min(r0 + 2, last), min(r0 + 3, last)
        for t in range(x16.shape[0]):
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for g in range(n_groups):
                off = g * group_size
                i0, i1, i2, i3 = dot4_w8_i16(qa + r0 * qs + off, qa + r1 * qs + off, qa + r2 * qs + off,
                                             qa + r3 * qs + off, xa + t * xstride + 2 * off, steps)
                fx, sx = xscale[t, g], xsum[t, g]
                a0 += half_f32(scale_bits[r0, g]) * (fx * np.float32(i0) - byte_f32(zero_bytes[r0, g]) * sx)
                a1 += half_f32(scale_bits[r1, g]) * (fx * np.float32(i1) - byte_f32(zero_bytes[r1, g]) * sx)
                a2 += half_f32(scale_bits[r2, g]) * (fx * np.float32(i2) - byte_f32(zero_bytes[r2, g]) * sx)
                a3 += half_f32(scale_bits[r3, g]) * (fx * np.float32(i3) - byte_f32(zero_bytes[r3, g]) * sx)
            y[t, r0] = a0
            y[t, r1] = a1
            y[t, r2] = a2
            y[t, r3] = a3


def gemv_inputs_i16_flat(x: np.ndarray, group_size: int) -> tuple[np.ndarray, ...]:
    """x (T, in) float32 -> (x16, xscale, xsum): what the 8-bit int16 GEMV reads."""
    T, n = x.shape
    G = n // group_size
    out = (np.empty((T, n), np.int16), np.empty((T, G), np.float32), np.empty((T, G), np.float32))
    quantize_x16_flat(np.ascontiguousarray(x, dtype=np.float32), group_size, *out)
    return out


def usable8(group_size: int) -> bool:
    """The 8-bit int16 GEMV runs on this machine for this group size (up to 1024: int32 lanes stay exact)."""
    return AVAILABLE and group_size % CHUNK_BYTES == 0 and group_size <= 1024


@njit(cache=True, fastmath=True)
def quantize_x16(x, group_size, xe16, xo16, xscale, xsum):
    """x (T, in) float32 -> its even and odd entries as int16 with a scale per group (x ~ x16 * scale),
    and the float sums of each group (for the zero points). Out: xe16, xo16 (T, in/2), xscale, xsum (T, G)."""
    T, n = x.shape
    half = group_size // 2
    for t in range(T):
        for g in range(n // group_size):
            seg = x[t, g * group_size : (g + 1) * group_size]
            m = np.float32(0.0)
            s = np.float32(0.0)
            for k in range(group_size):
                m = max(m, abs(seg[k]))
                s += seg[k]
            sc = max(m, np.float32(1e-30)) / np.float32(32767.0)
            inv = np.float32(1.0) / sc
            xscale[t, g] = sc
            xsum[t, g] = s
            e = xe16[t, g * half : (g + 1) * half]
            o = xo16[t, g * half : (g + 1) * half]
            for k in range(half):
                e[k] = np.int16(np.rint(seg[2 * k] * inv))
                o[k] = np.int16(np.rint(seg[2 * k + 1] * inv))


@njit(cache=True, inline="always")
def _scale_zs4(scale_bits, zero_bytes, r, g):
    s = half_f32(scale_bits[r, g])
    zb = zero_bytes[r, g >> 1]
    return s, (hi_nibble(zb) if g & 1 else lo_nibble(zb)) * s


@njit(cache=True, inline="always", fastmath=True)
def _four_rows(qb, scale_bits, zero_bytes, r0, xe16, xo16, xscale, xsum, group_size, y):
    """y[:, r0..r0+3] of 4-bit rows (rows past the end repeat the last), as ``_w4_four_rows`` in int16."""
    out_f, n_groups = scale_bits.shape
    half = group_size // 2
    steps = half // CHUNK_BYTES
    last = out_f - 1
    r1, r2, r3 = min(r0 + 1, last), min(r0 + 2, last), min(r0 + 3, last)
    qa, qs = qb.ctypes.data, qb.strides[0]
    ea, oa, xs = xe16.ctypes.data, xo16.ctypes.data, xe16.strides[0]
    for t in range(xe16.shape[0]):
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for g in range(n_groups):
            off = g * half
            i0, i1, i2, i3 = dot4_w4_i16(qa + r0 * qs + off, qa + r1 * qs + off, qa + r2 * qs + off,
                                         qa + r3 * qs + off, ea + t * xs + 2 * off, oa + t * xs + 2 * off, steps)
            fx, sx = xscale[t, g], xsum[t, g]
            sc, zs = _scale_zs4(scale_bits, zero_bytes, r0, g)
            a0 += sc * fx * np.float32(i0) - zs * sx
            sc, zs = _scale_zs4(scale_bits, zero_bytes, r1, g)
            a1 += sc * fx * np.float32(i1) - zs * sx
            sc, zs = _scale_zs4(scale_bits, zero_bytes, r2, g)
            a2 += sc * fx * np.float32(i2) - zs * sx
            sc, zs = _scale_zs4(scale_bits, zero_bytes, r3, g)
            a3 += sc * fx * np.float32(i3) - zs * sx
        y[t, r0] = a0
        y[t, r1] = a1
        y[t, r2] = a2
        y[t, r3] = a3


@njit(parallel=True, cache=True, fastmath=True)
def gemv_w4_i16_kernel(qb, scale_bits, zero_bytes, xe16, xo16, xscale, xsum, group_size, y):
    """y (T, out) = x W^T for 4-bit rows in file order, qb (out, in/2) uint8, four rows per iteration."""
    for q in prange((scale_bits.shape[0] + 3) // 4):
        _four_rows(qb, scale_bits, zero_bytes, 4 * q, xe16, xo16, xscale, xsum, group_size, y)


@njit(parallel=True, cache=True, fastmath=True)
def gemv_w4_i16_three_kernel(qa, sa, za, ya, qb, sb, zb, yb, qc, sc, zc, yc, xe16, xo16, xscale, xsum, group_size):
    """Three 4-bit weights sharing their input (q, k, v; gate, up and an empty one) in one parallel loop."""
    na, nb, nc = (sa.shape[0] + 3) // 4, (sb.shape[0] + 3) // 4, (sc.shape[0] + 3) // 4
    for q in prange(na + nb + nc):
        if q < na:
            _four_rows(qa, sa, za, 4 * q, xe16, xo16, xscale, xsum, group_size, ya)
        elif q < na + nb:
            _four_rows(qb, sb, zb, 4 * (q - na), xe16, xo16, xscale, xsum, group_size, yb)
        else:
            _four_rows(qc, sc, zc, 4 * (q - na - nb), xe16, xo16, xscale, xsum, group_size, yc)


def gemv_inputs_i16(x: np.ndarray, group_size: int) -> tuple[np.ndarray, ...]:
    """x (T, in) float32 -> (xe16, xo16, xscale, xsum): what the int16 GEMV reads."""
    T, n = x.shape
    G = n // group_size
    out = (np.empty((T, n // 2), np.int16), np.empty((T, n // 2), np.int16),
           np.empty((T, G), np.float32), np.empty((T, G), np.float32))
    quantize_x16(np.ascontiguousarray(x, dtype=np.float32), group_size, *out)
    return out


def usable(group_size: int) -> bool:
    """The int16 GEMV runs on this machine for this group size."""
    return AVAILABLE and group_size % (2 * CHUNK_BYTES) == 0
