"""Small-integer and float16 conversions for numba kernels, written in LLVM IR.

Numba types arithmetic on small integers as int64, so ``float32(b & 15)`` on a
uint8 becomes a 64-bit AND and an int64-to-float conversion, which x86 AVX2
has no vector instruction for: the loop stays scalar. These intrinsics keep
the unpacking in 8 bits and convert straight to float32, so LLVM vectorizes
the dot products (8 lanes on AVX2, 4 on NEON). ``half_f32`` reads a float16
stored as uint16 bits (numba has no float16 arrays) with the CPU's own
conversion (F16C ``vcvtph2ps`` on x86, ``fcvt`` on ARM).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_I8 = ir.IntType(8)


@intrinsic
def lo_nibble(typingctx, b):
    """float32 of bits 0..3 of a uint8."""

    def codegen(context, builder, signature, args):
        return builder.uitofp(builder.and_(args[0], ir.Constant(_I8, 15)), ir.FloatType())

    return types.float32(types.uint8), codegen


@intrinsic
def hi_nibble(typingctx, b):
    """float32 of bits 4..7 of a uint8."""

    def codegen(context, builder, signature, args):
        return builder.uitofp(builder.lshr(args[0], ir.Constant(_I8, 4)), ir.FloatType())

    return types.float32(types.uint8), codegen


@intrinsic
def byte_f32(typingctx, b):
    """float32 of a uint8."""

    def codegen(context, builder, signature, args):
        return builder.uitofp(args[0], ir.FloatType())

    return types.float32(types.uint8), codegen


@intrinsic
def int8_f32(typingctx, b):
    """float32 of an int8."""

    def codegen(context, builder, signature, args):
        return builder.sitofp(args[0], ir.FloatType())

    return types.float32(types.int8), codegen


@intrinsic
def half_f32(typingctx, h):
    """float32 value of the float16 whose bits are the uint16 h."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def f32_half_bits(typingctx, x):
    """The bits (uint16) of the float16 nearest to the float32 x (round to nearest even)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def bits_f32(typingctx, i):
    """The float32 whose bits are the int32 i."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen
