"""GEMVs with 8-bit activations: integer dot products of the weights' codes with int8 activations.

Each linear input is quantized once to int8 with a scale per group of the weights' group size
(``quantize_x8``: ``x8 = rint(x / s)``, ``s = max|x| / 127``); a row's group is then the exact integer
``sum q * x8 - z * sum x8``, times the weight's and the activations' scales in float32 — the arithmetic
of ``backends/reference.py``'s ``linear_int8``, which the tests hold these kernels to.

The weights are repacked once at load, one tensor at a time, into blocks of four rows (``repack``):

- 4-bit, groups of a multiple of 64: per group, 64 columns a chunk, each row's chunk 32 bytes, byte i
  holding column i in its low nibble and column 32 + i in its high one: ``w & 15`` and ``w >> 4`` are 32
  unsigned bytes each that meet 32 consecutive activations;
- 8-bit (the int8 head), groups of a multiple of 32: per chunk of 32 columns, the codes less 128 as
  signed bytes (the zero point stored less 128 likewise);
- ``scales`` (blocks, G * 4) fp16 bits and ``zeros`` (blocks, G * 4) int8: four rows side by side.

The inner loop is chosen by ``isa.ISA`` when the kernels compile: AVX-512 VNNI or AVX-VNNI ``vpdpbusd``
(unsigned weights times signed activations, four products into each int32 lane), AVX2 ``vpmaddubsw``
then ``vpmaddwd`` (pairs of products in int16 — at most 2 * 2 * 15 * 127, exact), the Armv8.2 ``sdot``,
or widening multiplies on plain NEON. Signed 8-bit weights meet the unsigned-times-signed x86
instructions as |w| and x with w's sign (``vpsignb``), whose pairs stay within int16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from edge_awq.backends.numba.intrinsics import half_f32
from edge_awq.backends.numba.isa import ISA, X86

ROWS = 4
PREFETCH = 2048  # bytes ahead of the weights being read that each chunk asks the cache for (measured: 1-4 KiB)
CHUNK4, CHUNK8 = 64, 32  # columns per chunk: 32 bytes a row
_I1, _I8, _I16, _I32, _I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32 = ir.FloatType()
LANES = 8 if X86 else 4  # int32 lanes of an accumulator: 256-bit on x86, 128-bit on ARM
_VACC = ir.VectorType(_I32, LANES)
_V4F = ir.VectorType(_F32, 4)


@dataclass(frozen=True)
class BlockedA8:
    """A 4- or 8-bit weight in the 8-bit-activation block layout (see the module docstring)."""

    words: np.ndarray  # (blocks, G * chunks * 4 * 32) uint8 (4-bit) or int8 (8-bit)
    scales: np.ndarray  # (blocks, G * 4) uint16, fp16 bits
    zeros: np.ndarray  # (blocks, G * 4) int8: z (4-bit), z - 128 (8-bit)
    out_features: int
    group_size: int
    bits: int


def usable(bits: int, group_size: int) -> bool:
    """Whether this CPU has the integer kernels and the weight fits the layout (int32 sums stay exact)."""
    if ISA == "none":
        return False
    if bits == 4:
        return group_size % CHUNK4 == 0
    return bits == 8 and group_size % CHUNK8 == 0 and group_size <= 1 << 16


@njit(cache=True, inline="always")
def _code(qb, r, col, bits):
    """Value number col of file-order row r (a nibble, low one first, or a byte)."""
    if bits == 8:
        return np.int32(qb[r, col])
    byte = qb[r, col >> 1]
    return np.int32((byte >> np.uint8(4)) if col & 1 else (byte & np.uint8(15)))


@njit(nogil=True, parallel=True, cache=True)
def _repack_kernel(qb, scale_bits, zero_bytes, group_size, bits, words, scales, zeros):
    out_f, n_groups = scale_bits.shape
    cols = CHUNK4 if bits == 4 else CHUNK8
    chunks = group_size // cols
    for b in prange(words.shape[0]):
        for k in range(ROWS):
            r = ROWS * b + k
            if r >= out_f:
                continue  # padding rows stay zero
            for g in range(n_groups):
                scales[b, ROWS * g + k] = scale_bits[r, g]
                z = _code(zero_bytes, r, g, bits)
                zeros[b, ROWS * g + k] = z if bits == 4 else z - 128
                for c in range(chunks):
                    base = ((g * chunks + c) * ROWS + k) * 32
                    col0 = g * group_size + c * cols
                    for i in range(32):
                        if bits == 4:
                            words[b, base + i] = _code(qb, r, col0 + i, 4) | (_code(qb, r, col0 + 32 + i, 4) << 4)
                        else:
                            words[b, base + i] = _code(qb, r, col0 + i, 8) - 128


def repack(qbytes: np.ndarray, scale_bits: np.ndarray, zero_bytes: np.ndarray, group_size: int,
           bits: int) -> BlockedA8:
    """The layout of a 4- or 8-bit weight given as file-order bytes (out, in * bits / 8), fp16 scale bits
    (out, G) and packed zero points (out, >= G * bits / 8 bytes)."""
    out_f, n_groups = scale_bits.shape
    blocks = -(-out_f // ROWS)
    words = np.zeros((blocks, n_groups * group_size * bits // 8 * ROWS), np.uint8 if bits == 4 else np.int8)
    scales = np.zeros((blocks, n_groups * ROWS), np.uint16)
    zeros = np.zeros((blocks, n_groups * ROWS), np.int8)
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


def inputs(x: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (T, in) float32 -> (x8, xscale, xsum): what the kernels read."""
    T, n = x.shape
    out = (np.empty((T, n), np.int8), np.empty((T, n // group_size), np.float32),
           np.empty((T, n // group_size), np.int32))
    quantize_x8(np.ascontiguousarray(x, dtype=np.float32), group_size, *out)
    return out


# --- the inner loop, by instruction set ---

def _vec(ty, n):
    return ir.VectorType(ty, n)


def _splat(builder, x, vty):
    v = builder.insert_element(ir.Constant(vty, None), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, vty.count), [0] * vty.count))


def _load(builder, addr, vty, align=1):
    return builder.load(builder.inttoptr(addr, vty.as_pointer()), align=align)


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _dot_x86(builder, acc, w, x):
    """acc (8 x i32) plus, in each lane, four products of w's unsigned bytes with x's signed ones."""
    v32, v8 = _vec(_I8, 32), _vec(_I32, 8)
    if ISA in ("avx512vnni", "avxvnni"):
        dp = _fn(builder, "llvm.x86.avx512.vpdpbusd.256", v8, [v8, v8, v8])
        return builder.call(dp, [acc, builder.bitcast(w, v8), builder.bitcast(x, v8)])
    maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [v32, v32])
    madd = _fn(builder, "llvm.x86.avx2.pmadd.wd", v8, [_vec(_I16, 16)] * 2)
    p = builder.call(maddubs, [w, x])
    return builder.add(acc, builder.call(madd, [p, ir.Constant(_vec(_I16, 16), [1] * 16)]))


def _dot_x86_pair(builder, acc, w0, x0, w1, x1):
    """acc plus the dot products of two unsigned-by-signed byte vectors (4-bit codes: int16 pairs exact)."""
    if ISA in ("avx512vnni", "avxvnni"):
        return _dot_x86(builder, _dot_x86(builder, acc, w0, x0), w1, x1)
    v32, v8 = _vec(_I8, 32), _vec(_I32, 8)
    maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [v32, v32])
    madd = _fn(builder, "llvm.x86.avx2.pmadd.wd", v8, [_vec(_I16, 16)] * 2)
    p = builder.add(builder.call(maddubs, [w0, x0]), builder.call(maddubs, [w1, x1]))  # <= 2 * 2 * 15 * 127
    return builder.add(acc, builder.call(madd, [p, ir.Constant(_vec(_I16, 16), [1] * 16)]))


def _dot_arm(builder, acc, w, x):
    """acc (4 x i32) plus, in each lane, four products of w's signed bytes with x's."""
    v16 = _vec(_I8, 16)
    if ISA == "sdot":
        dot = _fn(builder, "llvm.aarch64.neon.sdot.v4i32.v16i8", _vec(_I32, 4), [_vec(_I32, 4), v16, v16])
        return builder.call(dot, [acc, w, x])
    p = builder.mul(builder.sext(w, _vec(_I16, 16)), builder.sext(x, _vec(_I16, 16)))  # |p| <= 128 * 127
    p32 = builder.sext(p, _vec(_I32, 16))
    quarter = [builder.shuffle_vector(p32, p32, ir.Constant(_vec(_I32, 4), [4 * j + i for j in range(4)]))
               for i in range(4)]
    return builder.add(acc, builder.add(builder.add(quarter[0], quarter[1]), builder.add(quarter[2], quarter[3])))


def _chunk(builder, bits, acc, waddr, xaddr):
    """acc plus one row's chunk (32 bytes of codes) dotted with the chunk's activations."""
    if X86:
        v32 = _vec(_I8, 32)
        w = _load(builder, waddr, v32)
        if bits == 4:
            lo = builder.and_(w, ir.Constant(v32, [15] * 32))
            hi = builder.lshr(w, ir.Constant(v32, [4] * 32))
            return _dot_x86_pair(builder, acc, lo, _load(builder, xaddr, v32), hi,
                                 _load(builder, builder.add(xaddr, ir.Constant(_I64, 32)), v32))
        x = _load(builder, xaddr, v32)
        absw = builder.call(_fn(builder, "llvm.abs.v32i8", v32, [v32, _I1]), [w, ir.Constant(_I1, 0)])
        signed_x = builder.call(_fn(builder, "llvm.x86.avx2.psign.b", v32, [v32, v32]), [x, w])
        return _dot_x86(builder, acc, absw, signed_x)
    v16 = _vec(_I8, 16)
    sixteen = ir.Constant(_I64, 16)
    w0, w1 = _load(builder, waddr, v16), _load(builder, builder.add(waddr, sixteen), v16)
    if bits == 4:
        mask, four = ir.Constant(v16, [15] * 16), ir.Constant(v16, [4] * 16)
        xs = [_load(builder, builder.add(xaddr, ir.Constant(_I64, 16 * j)), v16) for j in range(4)]
        acc = _dot_arm(builder, acc, builder.and_(w0, mask), xs[0])
        acc = _dot_arm(builder, acc, builder.and_(w1, mask), xs[1])
        acc = _dot_arm(builder, acc, builder.lshr(w0, four), xs[2])
        return _dot_arm(builder, acc, builder.lshr(w1, four), xs[3])
    acc = _dot_arm(builder, acc, w0, _load(builder, xaddr, v16))
    return _dot_arm(builder, acc, w1, _load(builder, builder.add(xaddr, sixteen), v16))


def _row_sums(builder, accs):
    """The four rows' int32 accumulators (LANES lanes each) summed across lanes: one 4 x i32 vector, row k in
    lane k (x86: three vphaddd and the two halves added; ARM: three addp)."""
    v4 = _vec(_I32, 4)
    if X86:
        hadd = _fn(builder, "llvm.x86.avx2.phadd.d", _VACC, [_VACC, _VACC])
        h = builder.call(hadd, [builder.call(hadd, accs[:2]), builder.call(hadd, accs[2:])])  # [r0..r3 | r0..r3]
        lo = builder.shuffle_vector(h, h, ir.Constant(v4, [0, 1, 2, 3]))
        hi = builder.shuffle_vector(h, h, ir.Constant(v4, [4, 5, 6, 7]))
        return builder.add(lo, hi)
    addp = _fn(builder, "llvm.aarch64.neon.addp.v4i32", v4, [v4, v4])
    return builder.call(addp, [builder.call(addp, accs[:2]), builder.call(addp, accs[2:])])


def _block4_codegen(bits: int):
    """One block's four dot products (see ``block4_a8``)."""
    cols = CHUNK4 if bits == 4 else CHUNK8

    def codegen(context, builder, signature, args):
        wp, sp, zp, xp, fxp, sxp, n_groups, chunks = args
        v4 = _vec(_I32, 4)
        fma = _fn(builder, "llvm.fma.v4f32", _V4F, [_V4F] * 3)
        facc = cgutils.alloca_once_value(builder, ir.Constant(_V4F, None))
        accs = [cgutils.alloca_once(builder, _VACC) for _ in range(ROWS)]

        prefetch = _fn(builder, "llvm.prefetch.p0", ir.VoidType(), [ir.PointerType(_I8), _I32, _I32, _I32])

        def chunk(gc):
            xbase = builder.add(xp, builder.mul(gc, ir.Constant(_I64, cols)))
            wbase = builder.add(wp, builder.mul(gc, ir.Constant(_I64, ROWS * 32)))
            for line in (0, 64):  # the next blocks' lines, while this one computes
                ahead = builder.inttoptr(builder.add(wbase, ir.Constant(_I64, PREFETCH + line)), ir.PointerType(_I8))
                builder.call(prefetch, [ahead, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
            for k, acc in enumerate(accs):
                waddr = builder.add(wbase, ir.Constant(_I64, 32 * k))
                builder.store(_chunk(builder, bits, builder.load(acc), waddr, xbase), acc)

        with cgutils.for_range(builder, n_groups) as gl:
            g = gl.index
            for acc in accs:
                builder.store(ir.Constant(_VACC, None), acc)
            with cgutils.for_range(builder, chunks) as cl:
                chunk(builder.add(builder.mul(g, chunks), cl.index))
            # the group's exact integer sum q.x - z * sum(x), then its two scales, in float32
            sbits = _load(builder, builder.add(sp, builder.mul(g, ir.Constant(_I64, 2 * ROWS))), _vec(_I16, ROWS), 2)
            s4 = builder.fpext(builder.bitcast(sbits, _vec(ir.HalfType(), ROWS)), _V4F)
            z4 = builder.sext(_load(builder, builder.add(zp, builder.mul(g, ir.Constant(_I64, ROWS))),
                                    _vec(_I8, ROWS)), v4)
            goff = builder.mul(g, ir.Constant(_I64, 4))
            fx = builder.load(builder.inttoptr(builder.add(fxp, goff), _F32.as_pointer()))
            sx = builder.load(builder.inttoptr(builder.add(sxp, goff), _I32.as_pointer()))
            ints = builder.sub(_row_sums(builder, [builder.load(a) for a in accs]),
                               builder.mul(z4, _splat(builder, sx, v4)))
            m4 = builder.fmul(s4, _splat(builder, fx, _V4F))
            builder.store(builder.call(fma, [builder.sitofp(ints, _V4F), m4, builder.load(facc)]), facc)
        v = builder.load(facc)
        outs = [builder.extract_element(v, ir.Constant(_I32, k)) for k in range(ROWS)]
        return context.make_tuple(builder, signature.return_type, outs)

    return codegen


_SIG = types.UniTuple(types.float32, ROWS)(*([types.int64] * 8))


@intrinsic
def block4_a8(typingctx, wp, sp, zp, xp, fxp, sxp, n_groups, chunks):
    """The four rows of one block of a 4-bit weight dotted with one token's int8 activations, as four float32.
    wp, sp, zp: the block's codes, scales and zeros; xp: int8 activations; fxp, sxp: float32 activation scale,
    and int32 sum, per group; all addresses (int64)."""
    return _SIG, _block4_codegen(4)


@intrinsic
def block4_a8_w8(typingctx, wp, sp, zp, xp, fxp, sxp, n_groups, chunks):
    """As ``block4_a8`` for 8-bit weights."""
    return _SIG, _block4_codegen(8)


@njit(cache=True, inline="always")
def _block_rows(words, scales, zeros, b, x8, xscale, xsum, group_size, y):
    """y[:, 4b..4b+3] (the rows that exist) of one block, for every token of x8; int8 codes are 8-bit weights."""
    n_groups = scales.shape[1] // ROWS
    out_f = y.shape[1]
    wa = words.ctypes.data + b * words.strides[0]
    sa = scales.ctypes.data + b * scales.strides[0]
    za = zeros.ctypes.data + b * zeros.strides[0]
    r = ROWS * b
    for t in range(x8.shape[0]):
        xa = x8.ctypes.data + t * x8.strides[0]
        fa = xscale.ctypes.data + t * xscale.strides[0]
        ma = xsum.ctypes.data + t * xsum.strides[0]
        if words.shape[1] == n_groups * group_size * ROWS:  # a byte a value: 8-bit weights
            y0, y1, y2, y3 = block4_a8_w8(wa, sa, za, xa, fa, ma, n_groups, group_size // CHUNK8)
        else:
            y0, y1, y2, y3 = block4_a8(wa, sa, za, xa, fa, ma, n_groups, group_size // CHUNK4)
        y[t, r] = y0
        if r + 1 < out_f:
            y[t, r + 1] = y1
        if r + 2 < out_f:
            y[t, r + 2] = y2
        if r + 3 < out_f:
            y[t, r + 3] = y3


@njit(nogil=True, parallel=True, cache=True)
def gemv_kernel(words, scales, zeros, x8, xscale, xsum, group_size, y):
    """y (T, out) = x W^T of one weight in this layout; x8 (T, in) int8, xscale (T, G) float32, xsum (T, G) int32."""
    for b in prange(words.shape[0]):
        _block_rows(words, scales, zeros, b, x8, xscale, xsum, group_size, y)


@njit(nogil=True, parallel=True, cache=True)
def gemv_three_kernel(wa, sa, za, ya, wb, sb, zb, yb, wc, sc, zc, yc, x8, xscale, xsum, group_size):
    """Three weights that share their input (q, k, v; gate, up and an empty one), one parallel loop."""
    na, nb, nc = wa.shape[0], wb.shape[0], wc.shape[0]
    for q in prange(na + nb + nc):
        if q < na:
            _block_rows(wa, sa, za, q, x8, xscale, xsum, group_size, ya)
        elif q < na + nb:
            _block_rows(wb, sb, zb, q - na, x8, xscale, xsum, group_size, yb)
        else:
            _block_rows(wc, sc, zc, q - na - nb, x8, xscale, xsum, group_size, yc)


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def dequant_kernel(words, scales, zeros, group_size, bits, r0, out):
    """out (rows, in) float32 = dequantized rows r0.. of a weight in this layout, natural column order."""
    rows = out.shape[0]
    n_groups = scales.shape[1] // ROWS
    cols = CHUNK4 if bits == 4 else CHUNK8
    chunks = group_size // cols
    for j in prange(rows):
        r = r0 + j
        b, k = r // ROWS, r % ROWS
        for g in range(n_groups):
            s = half_f32(scales[b, ROWS * g + k])
            z = np.float32(zeros[b, ROWS * g + k])
            for c in range(chunks):
                base = ((g * chunks + c) * ROWS + k) * 32
                dst = out[j, g * group_size + c * cols : g * group_size + (c + 1) * cols]
                for i in range(32):
                    v = np.int32(words[b, base + i])
                    if bits == 4:
                        dst[i] = (np.float32(v & 15) - z) * s
                        dst[32 + i] = (np.float32((v >> 4) & 15) - z) * s
                    else:
                        dst[i] = (np.float32(v) - z) * s


def dequantize_rows(b: BlockedA8, r0: int, out: np.ndarray) -> None:
    """out (rows, in) float32 = dequantized rows r0.. of b."""
    words = b.words.view(np.int8) if b.bits == 8 else b.words
    dequant_kernel(words, b.scales, b.zeros, b.group_size, b.bits, r0, out)
