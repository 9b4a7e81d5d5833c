"""The inner loop of the 8-bit-activation kernels (``gemv_i8.py``), generated as LLVM IR for the instruction
set ``isa.ISA`` names: eight rows of one block of the layout times a tile of tokens, per chunk of columns the
codes (4-bit nibbles, 3-, 5- and 6-bit planes, bytes) times the int8 activations summed into each row's own int32 lane
(AVX-512 VNNI / AVX-VNNI ``vpdpbusd``, AVX2 ``vpmaddubsw`` + ``vpmaddwd``, Arm ``sdot``, ``smmla`` for a
prompt's tiles on i8mm, plain NEON widening multiplies), then per group the zero-point term and the two scales
in float32. The layout itself, the activations' quantization and the parallel loops are ``gemv_i8.py``'s.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from edge_awq.backends.numba.isa import ISA, X86

ROWS = 8  # rows a block; one int32 lane each
QUAD = 4  # consecutive codes of a row that meet one lane
CHUNK4, CHUNK8 = 64, 32  # columns a chunk: eight 32-byte vectors (4-bit groups of an odd multiple of 32: chunks of 32)
TOKENS = 8 if ISA in ("avx512vnni", "i8mm") else 4  # tokens a tile: an int32 and a float32 accumulator each (32 or 16 registers)
CHAINS = 4  # independent accumulators of a one-token tile (the dot products' latency over their throughput)
PREFETCH = 2048  # bytes ahead of the weights being read that each chunk asks the cache for (measured: 1-4 KiB)
VNNI = ISA in ("avx512vnni", "avxvnni")
MMLA = ISA == "i8mm"  # prompts' tiles by smmla: two rows times two tokens, eight codes deep
_I1, _I8, _I16, _I32, _I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32 = ir.FloatType()


def _vec(ty, n):
    return ir.VectorType(ty, n)


_V8I, _V8F, _V32B = _vec(_I32, ROWS), _vec(_F32, ROWS), _vec(_I8, 32)


def _splat(builder, x, vty):
    v = builder.insert_element(ir.Constant(vty, None), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, vty.count), [0] * vty.count))


def _load(builder, addr, vty, align=1):
    return builder.load(builder.inttoptr(addr, vty.as_pointer()), align=align)


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _halves(builder, v, n):
    """v's first and second halves (n lanes each)."""
    return (builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), list(range(n)))),
            builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), list(range(n, 2 * n)))))


def _join(builder, a, b, n):
    return builder.shuffle_vector(a, b, ir.Constant(_vec(_I32, 2 * n), list(range(2 * n))))


def _dot4_arm(builder, acc, w, x):
    """acc (4 x i32) plus, in each lane, the four products of w's signed bytes with x's (16 bytes each)."""
    v16 = _vec(_I8, 16)
    if ISA in ("sdot", "i8mm"):
        dot = _fn(builder, "llvm.aarch64.neon.sdot.v4i32.v16i8", _vec(_I32, 4), [_vec(_I32, 4), v16, v16])
        return builder.call(dot, [acc, w, x])
    p = builder.mul(builder.sext(w, _vec(_I16, 16)), builder.sext(x, _vec(_I16, 16)))  # |p| <= 128 * 127
    p32 = builder.sext(p, _vec(_I32, 16))
    quarter = [builder.shuffle_vector(p32, p32, ir.Constant(_vec(_I32, 4), [4 * j + i for j in range(4)]))
               for i in range(4)]
    return builder.add(acc, builder.add(builder.add(quarter[0], quarter[1]), builder.add(quarter[2], quarter[3])))


def _dot(builder, acc, w, x):
    """acc (8 x i32) plus, in lane k, the four products of w's bytes 4k..4k+3 with x's (32 bytes each): w
    unsigned on x86 (at most 63: pairs of products stay within int16; 255 with VNNI), signed on ARM."""
    if X86:
        if VNNI:
            dp = _fn(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I, [_V8I, _V8I, _V8I])
            return builder.call(dp, [acc, builder.bitcast(w, _V8I), builder.bitcast(x, _V8I)])
        maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [_V32B, _V32B])
        madd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _V8I, [_vec(_I16, 16)] * 2)
        return builder.add(acc, builder.call(madd, [builder.call(maddubs, [w, x]),
                                                    ir.Constant(_vec(_I16, 16), [1] * 16)]))
    (a0, a1), (w0, w1), (x0, x1) = _halves(builder, acc, 4), _halves(builder, w, 16), _halves(builder, x, 16)
    return _join(builder, _dot4_arm(builder, a0, w0, x0), _dot4_arm(builder, a1, w1, x1), 4)


def _dot_pair(builder, acc, w0, x0, w1, x1):
    """acc plus the dot products of two pairs (4-bit codes: on AVX2 the int16 pairs of both stay exact)."""
    if X86 and not VNNI:
        maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [_V32B, _V32B])
        madd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _V8I, [_vec(_I16, 16)] * 2)
        p = builder.add(builder.call(maddubs, [w0, x0]), builder.call(maddubs, [w1, x1]))  # <= 2 * 2 * 15 * 127
        return builder.add(acc, builder.call(madd, [p, ir.Constant(_vec(_I16, 16), [1] * 16)]))
    return _dot(builder, _dot(builder, acc, w0, x0), w1, x1)


def _dot8(builder, acc, w, x):
    """acc plus the dot products of 8-bit codes w with x, less 128 times x's sums unless VNNI (the caller
    takes 128 from the zero point alike): unsigned-by-signed takes the raw codes, the signed forms code - 128."""
    if VNNI:
        return _dot(builder, acc, w, x)
    signed = builder.xor(w, ir.Constant(_V32B, [0x80] * 32))  # code - 128, as a signed byte
    if X86:
        absw = builder.call(_fn(builder, "llvm.abs.v32i8", _V32B, [_V32B, _I1]), [signed, ir.Constant(_I1, 0)])
        signed_x = builder.call(_fn(builder, "llvm.x86.avx2.psign.b", _V32B, [_V32B, _V32B]), [x, signed])
        return _dot(builder, acc, absw, signed_x)
    return _dot(builder, acc, signed, x)


def _mmla_chunk(builder, wbase, col0, col_hi, bits, vecs, xrows, macc):
    """One chunk by ``smmla`` (Armv8.6 i8mm): vectors q and q + 1 of the layout hold, for each row, eight
    consecutive codes (its quads q and q + 1); a 32-bit zip of their halves makes four 2 x 8 matrices of
    row pairs, and each token pair's eight activations at those columns the 2 x 8 other operand. macc[p][j]
    (4 x i32) accumulates rows 2p, 2p + 1 times tokens 2j, 2j + 1 as (r0 t0, r0 t1, r1 t0, r1 t1)."""
    for q in range(0, vecs, 2):
        a = _load(builder, builder.add(wbase, ir.Constant(_I64, 32 * q)), _V32B)
        b = _load(builder, builder.add(wbase, ir.Constant(_I64, 32 * q + 32)), _V32B)
        if bits == 4:
            planes = [(builder.and_(a, ir.Constant(_V32B, [15] * 32)), builder.and_(b, ir.Constant(_V32B, [15] * 32)),
                       col0),
                      (builder.lshr(a, ir.Constant(_V32B, [4] * 32)), builder.lshr(b, ir.Constant(_V32B, [4] * 32)),
                       col_hi)]
        else:  # code - 128, as the signed forms read it
            planes = [(builder.xor(a, ir.Constant(_V32B, [0x80] * 32)), builder.xor(b, ir.Constant(_V32B, [0x80] * 32)),
                       col0)]
        _mmla_pairs(builder, [(c, q, wa, wb) for wa, wb, c in planes], xrows, macc)


def _mmla_pairs(builder, pairs, xrows, macc):
    """The smmla products of pairs (base, q, codes of quad q, codes of quad q + 1) for every token pair of
    the tile: ``_mmla_chunk``'s nibble or byte planes, or 3-bit codes rebuilt from theirs."""
    v16, v4i, v2l = _vec(_I8, 16), _vec(_I32, 4), _vec(_I64, 2)
    mmla = _fn(builder, "llvm.aarch64.neon.smmla.v4i32.v16i8", v4i, [v4i, v16, v16])
    for base, q, wa, wb in pairs:
        a32, b32 = builder.bitcast(wa, _V8I), builder.bitcast(wb, _V8I)
        rows = [builder.bitcast(builder.shuffle_vector(a32, b32, ir.Constant(v4i, [2 * p, 8 + 2 * p, 2 * p + 1,
                                                                                   9 + 2 * p])), v16)
                for p in range(ROWS // 2)]
        off = builder.add(base, ir.Constant(_I64, QUAD * q))
        for j in range(len(macc[0])):
            x0 = builder.load(builder.inttoptr(builder.add(xrows[2 * j], off), _I64.as_pointer()), align=1)
            x1 = builder.load(builder.inttoptr(builder.add(xrows[2 * j + 1], off), _I64.as_pointer()), align=1)
            pair = builder.insert_element(builder.insert_element(ir.Constant(v2l, None), x0, ir.Constant(_I32, 0)),
                                          x1, ir.Constant(_I32, 1))
            xv = builder.bitcast(pair, v16)
            for p in range(ROWS // 2):
                builder.store(builder.call(mmla, [builder.load(macc[p][j]), rows[p], xv]), macc[p][j])


@njit(cache=True, inline="always")
def split(bits):
    """The widths of a split code's low and high planes: 3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2 (4 and 8 are not split)."""
    low = 2 if bits == 3 else 4
    return low, bits - low


SPLIT = {bits: split.py_func(bits) for bits in (3, 5, 6)}  # the same, where the IR is generated


def _code_split(builder, vectors, quads, quad, bits):
    """The codes of one quad of a split chunk, from its two planes (widths wl, wh = SPLIT[bits]): the first
    n = quads * wl / 8 vectors hold each code's low wl bits (vector m: quads m, m + n, ... in bits 0..wl-1,
    wl..2wl-1, ...), the last n' = quads * wh / 8 its high wh bits alike."""
    wl, wh = SPLIT[bits]
    nl, nh = quads * wl // 8, quads * wh // 8
    s, t = quad // nl, quad // nh
    lo = vectors[quad % nl]
    lo = builder.lshr(lo, ir.Constant(_V32B, [wl * s] * 32)) if s else lo
    hi = vectors[nl + quad % nh]
    move = wl - wh * t  # the high bits from wh * t up to wl
    if move > 0:
        hi = builder.shl(hi, ir.Constant(_V32B, [move] * 32))
    elif move < 0:
        hi = builder.lshr(hi, ir.Constant(_V32B, [-move] * 32))
    low_mask, high_mask = (1 << wl) - 1, ((1 << wh) - 1) << wl
    return builder.or_(builder.and_(lo, ir.Constant(_V32B, [low_mask] * 32)),
                       builder.and_(hi, ir.Constant(_V32B, [high_mask] * 32)))


def _mmla_token(builder, macc, t):
    """Token t's eight rows (8 x i32) from the 2 x 2 accumulators."""
    j, e = t // 2, t % 2
    pick = ir.Constant(_vec(_I32, 4), [e, e + 2, 4 + e, 4 + e + 2])
    lo = builder.shuffle_vector(builder.load(macc[0][j]), builder.load(macc[1][j]), pick)
    hi = builder.shuffle_vector(builder.load(macc[2][j]), builder.load(macc[3][j]), pick)
    return _join(builder, lo, hi, 4)


def _tile_codegen(bits: int, nt: int, cols: int):
    """Eight rows of one block times nt tokens (see ``tile_a8``), in chunks of cols columns."""
    vecs = cols * bits // QUAD // 8  # 32-byte vectors a chunk
    zero_bias = 128 if bits == 8 and not VNNI else 0  # the signed forms read code - 128

    def codegen(context, builder, signature, args):
        wp, sp, zp, xp, x_stride, fxp, sxp, g_stride, n_groups, chunks, yp, y_stride, rows = args
        fma = _fn(builder, "llvm.fma.v8f32", _V8F, [_V8F] * 3)
        prefetch = _fn(builder, "llvm.prefetch.p0", ir.VoidType(), [ir.PointerType(_I8), _I32, _I32, _I32])
        facc = [cgutils.alloca_once_value(builder, ir.Constant(_V8F, None)) for _ in range(nt)]
        xrows = [builder.add(xp, builder.mul(x_stride, ir.Constant(_I64, t))) for t in range(nt)]
        mmla = MMLA and nt % 2 == 0  # a prompt's tile on i8mm (a decode step keeps sdot)
        # one token has one accumulator chain of dot products, as long as their latency: split it in CHAINS
        chains = CHAINS if nt == 1 else 1
        accs = [[cgutils.alloca_once(builder, _V8I) for _ in range(chains)] for _ in range(nt)]
        macc = [[cgutils.alloca_once(builder, _vec(_I32, 4)) for _ in range(nt // 2)] for _ in range(ROWS // 2)
                ] if mmla else []

        def quad_x(t, base, q):
            """token t's four activations from column base + 4q, in every lane: on x86 a broadcast load; on ARM
            one 16-byte load for four quads and a lane of it (the indexed form of sdot)."""
            if X86:
                addr = builder.add(xrows[t], builder.add(base, ir.Constant(_I64, QUAD * q)))
                four = builder.load(builder.inttoptr(addr, _I32.as_pointer()), align=1)
                return builder.bitcast(_splat(builder, four, _V8I), _V32B)
            addr = builder.add(xrows[t], builder.add(base, ir.Constant(_I64, 16 * (q // 4))))
            sixteen = _load(builder, addr, _vec(_I32, 4))
            lane = builder.shuffle_vector(sixteen, sixteen, ir.Constant(_vec(_I32, ROWS), [q % 4] * ROWS))
            return builder.bitcast(lane, _V32B)

        def chunk(gc):
            wbase = builder.add(wp, builder.mul(gc, ir.Constant(_I64, vecs * 32)))
            col0 = builder.mul(gc, ir.Constant(_I64, cols))
            for line in range(0, vecs * 32, 64):  # the next blocks' lines, while this one computes
                ahead = builder.inttoptr(builder.add(wbase, ir.Constant(_I64, PREFETCH + line)), ir.PointerType(_I8))
                builder.call(prefetch, [ahead, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
            col_hi = builder.add(col0, ir.Constant(_I64, cols // 2))
            if bits in SPLIT:  # two planes, each quad's codes rebuilt where they are used
                vectors = [_load(builder, builder.add(wbase, ir.Constant(_I64, 32 * q)), _V32B) for q in range(vecs)]
                quads = cols // QUAD
                if mmla:
                    _mmla_pairs(builder, [(col0, q, _code_split(builder, vectors, quads, q, bits),
                                           _code_split(builder, vectors, quads, q + 1, bits))
                                          for q in range(0, quads, 2)],
                                xrows, macc)
                    return
                for q in range(0, quads, 2):
                    c0, c1 = _code_split(builder, vectors, quads, q, bits), _code_split(builder, vectors, quads, q + 1, bits)
                    for t, chain in enumerate(accs):
                        if X86 and not VNNI:  # the pair shares one int16 sum (exact for codes below 64: 4 * 63 * 127)
                            acc = chain[q // 2 % chains]
                            builder.store(_dot_pair(builder, builder.load(acc), c0, quad_x(t, col0, q), c1,
                                                    quad_x(t, col0, q + 1)), acc)
                            continue
                        a, b = chain[q % chains], chain[(q + 1) % chains]
                        builder.store(_dot(builder, builder.load(a), c0, quad_x(t, col0, q)), a)
                        builder.store(_dot(builder, builder.load(b), c1, quad_x(t, col0, q + 1)), b)
                return
            if mmla:
                _mmla_chunk(builder, wbase, col0, col_hi, bits, vecs, xrows, macc)
                return
            for q in range(vecs):
                w = _load(builder, builder.add(wbase, ir.Constant(_I64, 32 * q)), _V32B)
                if bits == 4:
                    lo = builder.and_(w, ir.Constant(_V32B, [15] * 32))
                    hi = builder.lshr(w, ir.Constant(_V32B, [4] * 32))
                    for t, chain in enumerate(accs):
                        if X86 and not VNNI:  # the pair shares one int16 sum (exact for 4-bit codes)
                            acc = chain[q % chains]
                            builder.store(_dot_pair(builder, builder.load(acc), lo, quad_x(t, col0, q), hi,
                                                    quad_x(t, col_hi, q)), acc)
                            continue
                        a, b = chain[2 * q % chains], chain[(2 * q + 1) % chains]
                        builder.store(_dot(builder, builder.load(a), lo, quad_x(t, col0, q)), a)
                        builder.store(_dot(builder, builder.load(b), hi, quad_x(t, col_hi, q)), b)
                else:
                    for t, chain in enumerate(accs):
                        acc = chain[q % chains]
                        builder.store(_dot8(builder, builder.load(acc), w, quad_x(t, col0, q)), acc)

        with cgutils.for_range(builder, n_groups) as gl:
            g = gl.index
            for acc in (a for chain in accs for a in chain):
                builder.store(ir.Constant(_V8I, None), acc)
            for acc in (a for pair in macc for a in pair):
                builder.store(ir.Constant(_vec(_I32, 4), None), acc)
            with cgutils.for_range(builder, chunks) as cl:
                chunk(builder.add(builder.mul(g, chunks), cl.index))
            if mmla:
                for t in range(nt):
                    builder.store(_mmla_token(builder, macc, t), accs[t][0])
            # each token's exact integer sums q.x - z * sum(x), then the two scales, in float32
            sbits = _load(builder, builder.add(sp, builder.mul(g, ir.Constant(_I64, 2 * ROWS))), _vec(_I16, ROWS), 2)
            s8 = builder.fpext(builder.bitcast(sbits, _vec(ir.HalfType(), ROWS)), _V8F)
            z8 = builder.zext(_load(builder, builder.add(zp, builder.mul(g, ir.Constant(_I64, ROWS))),
                                    _vec(_I8, ROWS)), _V8I)
            if zero_bias:
                z8 = builder.sub(z8, ir.Constant(_V8I, [zero_bias] * ROWS))
            goff = builder.mul(g, ir.Constant(_I64, 4))
            for t in range(nt):
                toff = builder.add(goff, builder.mul(g_stride, ir.Constant(_I64, t)))
                fx = builder.load(builder.inttoptr(builder.add(fxp, toff), _F32.as_pointer()))
                sx = builder.load(builder.inttoptr(builder.add(sxp, toff), _I32.as_pointer()))
                dots = builder.load(accs[t][0])
                for acc in accs[t][1:]:
                    dots = builder.add(dots, builder.load(acc))
                ints = builder.sub(dots, builder.mul(z8, _splat(builder, sx, _V8I)))
                m8 = builder.fmul(s8, _splat(builder, fx, _V8F))
                builder.store(builder.call(fma, [builder.sitofp(ints, _V8F), m8, builder.load(facc[t])]), facc[t])
        store = _fn(builder, "llvm.masked.store.v8f32.p0", ir.VoidType(),
                    [_V8F, _V8F.as_pointer(), _I32, _vec(_I1, ROWS)])
        lanes = ir.Constant(_vec(_I64, ROWS), list(range(ROWS)))
        mask = builder.icmp_signed("<", lanes, _splat(builder, rows, _vec(_I64, ROWS)))  # the rows that exist
        for t in range(nt):
            out = builder.inttoptr(builder.add(yp, builder.mul(y_stride, ir.Constant(_I64, t))), _V8F.as_pointer())
            builder.call(store, [builder.load(facc[t]), out, ir.Constant(_I32, 4), mask])
        return context.get_dummy_value()

    return codegen


def variants(kind) -> list[tuple[int, int]]:
    """The (bits, chunk columns) tile variants a kernel set names: ``kind`` the numba type of
    ``gemv_i8.kernel_set``'s array, whose record fields are called ``w{bits}c{cols}``."""
    return [variant(name) for name in kind.dtype.fields]


def variant(name: str) -> tuple[int, int]:
    """A kernel set's field name ``w{bits}c{cols}`` as (bits, cols)."""
    bits, cols = name[1:].split("c")
    return int(bits), int(cols)


def _tile_dispatch(nt: int):
    """An intrinsic ``tile(kind, bits, cols, wp, ...)``: the tile of nt tokens (see ``tile_a8``) for the weight's
    bits and chunk columns, compiled only for the variants ``kind``'s type names (a model's own widths, not
    every width there is: the rest would cost compile time and resident code for nothing)."""

    def tile(typingctx, kind, bits, cols, wp, sp, zp, xp, x_stride, fxp, sxp, g_stride, n_groups, chunks, yp,
             y_stride, rows):
        bodies = [(b, c, _tile_codegen(b, nt, c)) for b, c in variants(kind)]

        def codegen(context, builder, signature, args):
            _, bits, cols, *rest = args
            for b, c, body in bodies:
                hit = builder.and_(builder.icmp_signed("==", bits, ir.Constant(_I64, b)),
                                   builder.icmp_signed("==", cols, ir.Constant(_I64, c)))
                with builder.if_then(hit):
                    body(context, builder, None, rest)
            return context.get_dummy_value()

        return types.void(kind, *([types.int64] * 15)), codegen

    tile.__name__ = f"tile_a8_t{nt}"
    return intrinsic(tile)


tile_many, tile_one = _tile_dispatch(TOKENS), _tile_dispatch(1)
tile_a8 = tile_many  # the one the docstring names: (kind, bits, cols: which variant; wp, sp, zp: the block's codes,
# scales, zeros; xp, x_stride: the first token's int8 activations and the bytes between tokens; fxp, sxp, g_stride:
# its float32 scales and int32 sums per group, and the bytes between tokens; n_groups, chunks; yp, y_stride: eight
# float32 outputs per token, of which the first ``rows`` are stored)
