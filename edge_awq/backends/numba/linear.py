"""Packed linears on the CPU: weights prepared once at load, and the table that says which kernel runs.

``prepare`` turns a ``model.W4`` into what the kernels read: on x86 with AVX2, 4-bit weights in groups of
a multiple of 64 and 8-bit weights in groups of a multiple of 32 are repacked once, one tensor at a
time, into four-row blocks of 16-bit words (``gemv_blocked.py``), and the file's pages of that tensor
leave the resident set (the repacked copy takes their place, never beside a second one); elsewhere
the file's bytes are read where they lie.

``GEMV_ROUTES`` is the one table of which kernel multiplies a decode step's few tokens (at most
``GEMV_MAX_T``) by which weight; ``PREFILL_ROUTES`` the same for prompts: with 8-bit activations an
integer GEMM on the packed layout (``gemv_i8.py``), otherwise ``DEQUANT_ROWS`` rows at a time
dequantized into a float32 buffer and multiplied with BLAS. The first route whose condition holds runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_awq.backends.numba import gemv_blocked as blocked
from edge_awq.backends.numba import gemv_i8 as i8
from edge_awq.backends.numba import gemv_i16 as i16
from edge_awq.backends.numba.isa import ISA
from edge_awq.backends.numba.gemv_float import (dequant_rows_kernel, dequant_w4_planes_kernel, dequant_w8_kernel,
                                                f16_rows_kernel, gemv_any_kernel, gemv_f16_kernel, gemv_w4_kernel,
                                                gemv_w4_three_kernel, gemv_w8_kernel)
from edge_awq.formats.tensorfile import release_array
from edge_awq.model import W4

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
    copy; other widths (3-bit) likewise, the generic kernels reading the zero points'
    packed rows (``zero_rows``).
    """

    out_features: int
    qweight: np.ndarray | None  # (out, words) uint32, as in the file (None when blocked)
    qbytes: np.ndarray | None  # the same memory as (out, 4 * words) uint8
    scale_bits: np.ndarray | None  # (out, G) uint16: the fp16 scales' bits
    zero_bytes: np.ndarray | None  # (out, 4 * zero words) uint8: the packed zero points
    zero_rows: np.ndarray | None  # (out, zero words) uint32: the same zero points as packed rows
    group_size: int
    bits: int
    in_features: int
    bias: np.ndarray | None  # (out,) float32
    blocked: blocked.BlockedW4 | None = None  # the load-time block layout, where it applies (then read instead)
    a8: i8.BlockedA8 | None = None  # the 8-bit-activation layout (activations="int8"), where it applies
    # the kernel set a8 runs with (``gemv_i8.kernel_set``): its own width's unless weights share a wider one
    kernels: np.ndarray | None = None

    @property
    def byte_path(self) -> bool:
        """Whether the byte kernels apply: 4 bits in even groups, or 8 bits."""
        return (self.bits == 4 and self.group_size % 2 == 0) or self.bits == 8

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


def prepare(w: W4, repack: bool = False, activations: str = "int16") -> PreparedW4:
    """w's arrays as the kernels read them; repack: the layout of its kernels where one applies (``gemv_i8.py``
    for activations "int8", ``gemv_blocked.py`` for "int16"), after which the file's pages of w leave the
    resident set."""
    qweight = np.ascontiguousarray(w.qweight)
    scale_bits = np.ascontiguousarray(w.scales, dtype=np.float16).view(np.uint16)
    zero_bytes = np.ascontiguousarray(w.zeros).view(np.uint8)
    bias = None if w.bias is None else np.asarray(w.bias, np.float32)
    out_f = qweight.shape[0]
    if repack and activations == "int8" and i8.usable(w.bits, w.group_size):
        a8 = i8.repack(qweight.view(np.uint8), scale_bits, zero_bytes, w.group_size, w.bits)
        for a in (w.qweight, w.scales, w.zeros):
            release_array(a)
        return PreparedW4(out_f, None, None, None, None, None, w.group_size, w.bits, w.in_features, bias,
                          a8=a8, kernels=i8.kernel_set(a8))
    if repack and blocked.usable(w.bits, w.group_size):
        packed = blocked.repack(qweight.view(np.uint8), scale_bits, zero_bytes, w.group_size, w.bits)
        for a in (w.qweight, w.scales, w.zeros):
            release_array(a)
        return PreparedW4(out_f, None, None, None, None, None, w.group_size, w.bits, w.in_features, bias, packed)
    zero_rows = np.ascontiguousarray(w.zeros)  # (out, words) uint32: the any-width kernels read them packed
    return PreparedW4(out_f, qweight, qweight.view(np.uint8), scale_bits, zero_bytes, zero_rows, w.group_size,
                      w.bits, w.in_features, bias)


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
    """x (T, in) times two or three 4-bit weights of one group size, as one parallel kernel: any T in the
    8-bit-activation layout (x quantized once), T <= GEMV_MAX_T in the others."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    gs = ws[0].group_size
    ys = [np.empty((x.shape[0], w.out_features), np.float32) for w in ws]
    if all(w.a8 is not None for w in ws):
        sets = [(w.a8.words, w.a8.scales, w.a8.zeros, y) for w, y in zip(ws, ys)]
        if len(sets) == 2:
            sets.append(tuple(a[:0] for a in sets[0][:3]) + (ys[0][:, :0],))
        i8.gemv_three_kernel(*sets[0], *sets[1], *sets[2], *i8.inputs(x, gs), gs,
                             i8.kernel_union(*(w.kernels for w in ws)))
        return [y if w.bias is None else y + w.bias for w, y in zip(ws, ys)]
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


def _gemv_a8(x, w, y):
    b = w.a8
    i8.gemv_kernel(b.words, b.scales, b.zeros, *i8.inputs(x, w.group_size), w.group_size, y, w.kernels)


def _gemm_a8(x, w):
    y = np.empty((x.shape[0], w.out_features), np.float32)
    _gemv_a8(np.ascontiguousarray(x, dtype=np.float32), w, y)
    return y


def _gemv_blocked(x, w, y):
    b = w.blocked
    blocked.gemv_kernel(b.words, b.scales, b.zeros, *blocked.inputs(x, w.group_size), w.group_size, y)


def _gemv_w4_i16(x, w, y):
    i16.gemv_w4_i16_kernel(w.qbytes, w.scale_bits, w.zero_bytes, *i16.gemv_inputs_i16(x, w.group_size), w.group_size, y)


def _gemv_w4_float(x, w, y):
    gemv_w4_kernel(w.qbytes, w.scale_bits, w.zero_bytes, *_gemv_inputs(x, w.group_size), w.group_size, y)


def _gemv_w8_i16(x, w, y):
    i16.gemv_w8_i16_kernel(w.qbytes, w.scale_bits, w.zero_bytes, *i16.gemv_inputs_i16_flat(x, w.group_size),
                           w.group_size, y)


def _group_sums(x, w):
    return x.reshape(x.shape[0], -1, w.group_size).sum(axis=2)  # (T, G)


def _gemv_w8_float(x, w, y):
    gemv_w8_kernel(w.qbytes, w.scale_bits, w.zero_bytes, x, _group_sums(x, w), w.group_size, y)


def _gemv_any(x, w, y):
    gemv_any_kernel(w.qweight, w.scale_bits, w.zero_rows, x, _group_sums(x, w), w.group_size, w.bits, y)


def _fast4(w) -> bool:
    return w.byte_path and w.bits == 4


@dataclass(frozen=True)
class Route:
    """One row of the kernel table: which weights it takes (``when``) and the kernel that runs them."""

    name: str
    weights: str  # which weights, bits, group sizes and CPUs, in words
    when: Callable[[PreparedW4], bool]
    run: Callable  # decode: run(x, w, y) fills y (T, out); prefill: run(x, w) -> y


# Decode (at most GEMV_MAX_T tokens): the first route whose condition holds runs.
GEMV_ROUTES = (
    Route(f"a8-{ISA}", "3- to 6- and 8-bit in groups of 32k, int8 activations (activations=int8); "
          "x86 AVX2 or VNNI, ARM sdot or NEON", lambda w: w.a8 is not None, _gemv_a8),
    Route("blocked-i16", "4-bit in groups of 64k and 8-bit in groups of 32k, block layout; x86 AVX2",
          lambda w: w.blocked is not None, _gemv_blocked),
    Route("w4-i16", "4-bit, even groups the block layout does not take; x86 AVX2",
          lambda w: _fast4(w) and i16.usable(w.group_size), _gemv_w4_i16),
    Route("w4-float", "4-bit, even groups; any CPU (ARM)", _fast4, _gemv_w4_float),
    Route("w8-i16", "8-bit, groups of 16k; x86 AVX2", lambda w: w.bits == 8 and i16.usable8(w.group_size), _gemv_w8_i16),
    Route("w8-float", "8-bit; any CPU", lambda w: w.bits == 8, _gemv_w8_float),
    Route("any-float", "any other width or group (3-bit with int16 activations); any CPU", lambda w: True, _gemv_any),
)

# Prefill (more tokens): an integer GEMM on the packed weights, or DEQUANT_ROWS rows at a time into float32 for BLAS.
PREFILL_ROUTES = (
    Route(f"a8-gemm-{ISA}", "the 8-bit-activation layout: tiles of tokens times eight rows, integer dot products",
          lambda w: w.a8 is not None, _gemm_a8),
    Route("blocked-dequant", "the block layout", lambda w: w.blocked is not None,
          lambda x, w: _blocked(x, w.out_features, w.in_features,
                                lambda r0, out: blocked.dequantize_rows(w.blocked, r0, out))),
    Route("w4-planes", "4-bit, even groups: even and odd columns as two planes", _fast4,
          lambda x, w: _blocked(x, w.out_features, w.in_features // 2, lambda r0, e, o: dequant_w4_planes_kernel(
              w.qbytes, w.scale_bits, w.zero_bytes, w.group_size, r0, e, o), 2)),
    Route("w8-dequant", "8-bit", lambda w: w.bits == 8,
          lambda x, w: _blocked(x, w.out_features, w.in_features, lambda r0, out: dequant_w8_kernel(
              w.qbytes, w.scale_bits, w.zero_bytes, w.group_size, r0, out))),
    Route("any-dequant", "any other width", lambda w: True,
          lambda x, w: _blocked(x, w.out_features, w.in_features, lambda r0, out: dequant_rows_kernel(
              w.qweight, w.scale_bits, w.zero_rows, w.group_size, w.bits, r0, out))),
)


def route(w: PreparedW4, tokens: int = 1) -> Route:
    """The table's row that runs w for a call of this many tokens."""
    return next(r for r in (GEMV_ROUTES if tokens <= GEMV_MAX_T else PREFILL_ROUTES) if r.when(w))


def linear_w4(x: np.ndarray, w: PreparedW4) -> np.ndarray:
    """x (T, in) float32 -> (T, out) float32: a GEMV over the packed rows for few tokens, dequantized blocks of rows
    and BLAS for more; the kernel is the table's (``GEMV_ROUTES``, ``PREFILL_ROUTES``)."""
    T = x.shape[0]
    r = route(w, T)
    if T <= GEMV_MAX_T:
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.empty((T, w.out_features), np.float32)
        r.run(x, w, y)
    else:
        y = r.run(x, w)
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
