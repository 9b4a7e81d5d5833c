"""The 4-bit GEMV with integer dot products (x86 AVX2): activations as int16, ``vpmaddwd``.

The float GEMV spends five instructions on every eight weights (widen, mask, convert, FMA) and
is bound by them, not by memory. Here each token's activations are quantized once per call to
int16 with a scale per group (relative error below 2^-15, against the 1e-3 the kernels are held
to); a 16-byte load of packed weights then gives 32 nibbles, widened to int16 and multiplied
and pair-summed into int32 by two ``vpmaddwd`` against the even and odd activations, about a
third of the instructions. Sums of a group stay exact in int32 (at most 128 * 15 * 32767 per
group); group scales and zero points are applied in float32 as in the float kernel.

``rows4_w4_i16`` and ``dot4_w8_i16`` are LLVM IR calling ``llvm.x86.avx2.pmadd.wd``: x86 with AVX2 only. Elsewhere
(ARM) ``AVAILABLE`` is False and the float kernels run. These kernels read the file's own bytes; the
backend prefers the faster block layout (``gemv_blocked.py``, which takes this module's activation
quantizer) wherever its group sizes allow, and runs these for the rest.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from edge_awq.backends.numba.intrinsics import byte_f32, half_f32


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


@intrinsic
def rows4_w4_i16(typingctx, q0, q1, q2, q3, xe, xo, sc0, sc1, sc2, sc3, z0, z1, z2, z3, xscale, xsum, n_groups,
                 half):
    """Four rows' whole dot products with x, group scales and zero points applied, as four float32.

    q*: the rows' packed bytes; xe, xo: int16 even and odd activations; sc*: the rows' fp16 scales
    (uint16 bits); z*: the rows' packed 4-bit zero points; xscale, xsum: float32 per group; all
    addresses (int64). n_groups groups of half bytes (half a multiple of 16). The per-group work —
    four scales, four zero points, the float update — runs on 4-lane vectors, once per group.
    """
    sig = types.UniTuple(types.float32, 4)(*([types.int64] * 18))

    def codegen(context, builder, signature, args):
        qs, (xe, xo), scs, zs, (xscale, xsum, n_groups, half) = args[0:4], args[4:6], args[6:10], args[10:14], args[14:]
        pmadd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8I32, [_V16I16, _V16I16]),
                                               "llvm.x86.avx2.pmadd.wd")
        f32, v4f = ir.FloatType(), ir.VectorType(ir.FloatType(), 4)
        total = cgutils.alloca_once_value(builder, ir.Constant(v4f, None))
        accs = [cgutils.alloca_once(builder, _V8I32) for _ in qs]
        steps = builder.udiv(half, ir.Constant(_I64, CHUNK_BYTES))
        with cgutils.for_range(builder, n_groups) as gl:
            g = gl.index
            for acc in accs:
                builder.store(ir.Constant(_V8I32, None), acc)
            base = builder.mul(g, half)
            with cgutils.for_range(builder, steps) as sl:
                off = builder.add(base, builder.mul(sl.index, ir.Constant(_I64, CHUNK_BYTES)))
                xoff = builder.add(off, off)
                xev = builder.load(builder.inttoptr(builder.add(xe, xoff), _V16I16.as_pointer()), align=2)
                xov = builder.load(builder.inttoptr(builder.add(xo, xoff), _V16I16.as_pointer()), align=2)
                for qa, acc in zip(qs, accs):
                    b = builder.load(builder.inttoptr(builder.add(qa, off), _V16I8.as_pointer()), align=1)
                    lo = builder.zext(builder.and_(b, _splat(_I8, 16, 15)), _V16I16)
                    hi = builder.zext(builder.lshr(b, _splat(_I8, 16, 4)), _V16I16)
                    s = builder.add(builder.call(pmadd, [lo, xev]), builder.call(pmadd, [hi, xov]))
                    builder.store(builder.add(builder.load(acc), s), acc)
            tot = builder.sitofp(_row_sums(builder, [builder.load(acc) for acc in accs]), v4f)
            sc_bits = ir.Constant(ir.VectorType(_I16, 4), None)
            zb = ir.Constant(ir.VectorType(_I8, 4), None)
            zoff = builder.lshr(g, ir.Constant(_I64, 1))
            for k in range(4):
                h = builder.load(builder.inttoptr(builder.add(scs[k], builder.add(g, g)), _I16.as_pointer()))
                sc_bits = builder.insert_element(sc_bits, h, ir.Constant(_I32, k))
                z = builder.load(builder.inttoptr(builder.add(zs[k], zoff), _I8.as_pointer()))
                zb = builder.insert_element(zb, z, ir.Constant(_I32, k))
            sc = builder.fpext(builder.bitcast(sc_bits, ir.VectorType(ir.HalfType(), 4)), v4f)
            shift = builder.trunc(builder.mul(builder.and_(g, ir.Constant(_I64, 1)), ir.Constant(_I64, 4)), _I8)
            shift4 = builder.insert_element(ir.Constant(ir.VectorType(_I8, 4), None), shift, ir.Constant(_I32, 0))
            shift4 = builder.shuffle_vector(shift4, shift4, ir.Constant(ir.VectorType(_I32, 4), [0, 0, 0, 0]))
            zf = builder.uitofp(builder.and_(builder.lshr(zb, shift4), _splat(_I8, 4, 15)), v4f)
            gx = builder.mul(g, ir.Constant(_I64, 4))
            fx = builder.load(builder.inttoptr(builder.add(xscale, gx), f32.as_pointer()))
            sx = builder.load(builder.inttoptr(builder.add(xsum, gx), f32.as_pointer()))
            fx4 = _broadcast(builder, fx, v4f)
            sx4 = _broadcast(builder, sx, v4f)
            upd = builder.fmul(sc, builder.fsub(builder.fmul(tot, fx4), builder.fmul(zf, sx4)))
            builder.store(builder.fadd(builder.load(total), upd), total)
        v = builder.load(total)
        outs = [builder.extract_element(v, ir.Constant(_I32, k)) for k in range(4)]
        return context.make_tuple(builder, signature.return_type, outs)

    return sig, codegen


def _broadcast(builder, x, vty):
    v = builder.insert_element(ir.Constant(vty, None), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count))


def _row_sums(builder, v):
    """The four <8 x i32> accumulators' lane sums as one <4 x i32>."""
    evens = ir.Constant(ir.VectorType(_I32, 8), list(range(0, 16, 2)))
    odds = ir.Constant(ir.VectorType(_I32, 8), list(range(1, 16, 2)))

    def pair_sums(a, b):  # lanes 0-3: a's adjacent pairs added, lanes 4-7: b's
        return builder.add(builder.shuffle_vector(a, b, evens), builder.shuffle_vector(a, b, odds))

    h = pair_sums(pair_sums(v[0], v[1]), pair_sums(v[2], v[3]))  # lanes 2k, 2k+1: halves of row k
    return builder.add(builder.shuffle_vector(h, h, ir.Constant(ir.VectorType(_I32, 4), [0, 2, 4, 6])),
                       builder.shuffle_vector(h, h, ir.Constant(ir.VectorType(_I32, 4), [1, 3, 5, 7])))


def _row_totals(builder, v):
    """The four <8 x i32> accumulators' lane sums as four i32."""
    s = _row_sums(builder, v)
    return [builder.extract_element(s, ir.Constant(_I32, k)) for k in range(4)]


@njit(cache=True, inline="always", fastmath=True)
def _group_scale(seg):
    """(scale, sum, 1/scale) of a group of activations: int16 values are x / scale, |x| <= 32767 * scale."""
    m = np.float32(0.0)
    s = np.float32(0.0)
    for k in range(seg.shape[0]):
        m = max(m, abs(seg[k]))
        s += seg[k]
    sc = max(m, np.float32(1e-30)) / np.float32(32767.0)
    return sc, s, np.float32(1.0) / sc


@njit(nogil=True, cache=True, fastmath=True)
def quantize_x16_flat(x, group_size, x16, xscale, xsum):
    """As ``quantize_x16`` in natural order (the 8-bit GEMV): x16 (T, in) int16."""
    T, n = x.shape
    for t in range(T):
        for g in range(n // group_size):
            seg = x[t, g * group_size : (g + 1) * group_size]
            xscale[t, g], xsum[t, g], inv = _group_scale(seg)
            out = x16[t, g * group_size : (g + 1) * group_size]
            for k in range(group_size):
                out[k] = np.int16(np.rint(seg[k] * inv))


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
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


@njit(nogil=True, cache=True, fastmath=True)
def quantize_x16(x, group_size, xe16, xo16, xscale, xsum):
    """x (T, in) float32 -> its even and odd entries as int16 with a scale per group (x ~ x16 * scale),
    and the float sums of each group (for the zero points). Out: xe16, xo16 (T, in/2), xscale, xsum (T, G)."""
    T, n = x.shape
    half = group_size // 2
    for t in range(T):
        for g in range(n // group_size):
            seg = x[t, g * group_size : (g + 1) * group_size]
            xscale[t, g], xsum[t, g], inv = _group_scale(seg)
            e = xe16[t, g * half : (g + 1) * half]
            o = xo16[t, g * half : (g + 1) * half]
            for k in range(half):
                e[k] = np.int16(np.rint(seg[2 * k] * inv))
                o[k] = np.int16(np.rint(seg[2 * k + 1] * inv))


@njit(cache=True, inline="always", fastmath=True)
def _four_rows(qb, scale_bits, zero_bytes, r0, xe16, xo16, xscale, xsum, group_size, y):
    """y[:, r0..r0+3] of 4-bit rows (rows past the end repeat the last), as ``_w4_four_rows`` in int16."""
    out_f, n_groups = scale_bits.shape
    last = out_f - 1
    r1, r2, r3 = min(r0 + 1, last), min(r0 + 2, last), min(r0 + 3, last)
    qa, qs = qb.ctypes.data, qb.strides[0]
    sa, ss = scale_bits.ctypes.data, scale_bits.strides[0]
    za, zst = zero_bytes.ctypes.data, zero_bytes.strides[0]
    ea, oa, xs = xe16.ctypes.data, xo16.ctypes.data, xe16.strides[0]
    fa, fs, ma, ms = xscale.ctypes.data, xscale.strides[0], xsum.ctypes.data, xsum.strides[0]
    for t in range(xe16.shape[0]):
        y[t, r0], y[t, r1], y[t, r2], y[t, r3] = rows4_w4_i16(
            qa + r0 * qs, qa + r1 * qs, qa + r2 * qs, qa + r3 * qs, ea + t * xs, oa + t * xs,
            sa + r0 * ss, sa + r1 * ss, sa + r2 * ss, sa + r3 * ss, za + r0 * zst, za + r1 * zst, za + r2 * zst,
            za + r3 * zst, fa + t * fs, ma + t * ms, n_groups, group_size // 2)


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def gemv_w4_i16_kernel(qb, scale_bits, zero_bytes, xe16, xo16, xscale, xsum, group_size, y):
    """y (T, out) = x W^T for 4-bit rows in file order, qb (out, in/2) uint8, four rows per iteration."""
    for q in prange((scale_bits.shape[0] + 3) // 4):
        _four_rows(qb, scale_bits, zero_bytes, 4 * q, xe16, xo16, xscale, xsum, group_size, y)


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
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
