"""The one owner of the quantization grid and the bit packing.

Quantizer (asymmetric, per group of ``group_size`` consecutive input channels
of each output row; DESIGN.md): ``max_int = 2**bits - 1``,
``scale = max(max - min, 1e-5) / max_int`` (rounded to float16, the stored
precision, before use), ``zero = clip(-round(min / scale), 0, max_int)``,
``q = clip(round(w / scale) + zero, 0, max_int)``, ``w_hat = (q - zero) * scale``.

Layout of the weights in memory and in ``.eawq`` files: each row of b-bit
values is a little-endian bit stream (value j occupies bits j*b .. j*b+b-1; for
4 bits, value 2k is the low nibble of byte k), padded with zeros to a multiple
of 32 values and stored as uint32 words, so a row of n values takes
ceil(n/32)*b words. In memory, zero points are packed the same way, a row per
output row. In the file, "bits-le-v2" stores the zero points of a tensor as one
stream with no padding between rows (``pack_zeros_flat``); "bits-le-v1" (format
version 1) stored them row by row, padded like the weights.

The same unsigned integers circulate in two other layouts, converted here and
only here (``w = (q - z) * s`` in all three):
- AutoAWQ GEMM (``quant_method: "awq"``, version "gemm"): ``qweight`` int32
  (in, out/8) and ``qzeros`` int32 (in/group, out/8), eight 4-bit values of
  consecutive output columns a word, column 8k + AWQ_ORDER[i] in nibble i;
  ``scales`` float16 (in/group, out).
- AutoAWQ GEMV and compressed-tensors ``pack-quantized``: rows (out, in/8) in
  natural order, which is this layout without the padding to 32 values;
  compressed-tensors stores a code as the signed value plus 2^(b-1) and packs
  its zero points (signed, so also offset by 2^(b-1)) along the output axis.
"""

from __future__ import annotations

import numpy as np

from edge_awq.model import W4

LAYOUT = "bits-le-v2"  # what the writer writes; LAYOUTS is what the reader takes
LAYOUTS = ("bits-le-v1", "bits-le-v2")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: nibble i of a word holds column 8k + AWQ_ORDER[i]


def check_group_size(in_features: int, group_size: int) -> None:
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide input width {in_features}")


CHUNK = 1 << 22  # values converted at a time: a 70B-wide linear's temporaries stay tens of MB, not GBs


def _row_blocks(rows: int, n: int):
    """Slices of rows covering about CHUNK values each (whole rows): the same results as all rows at once."""
    step = max(1, CHUNK // max(n, 1))
    return (slice(r, min(rows, r + step)) for r in range(0, rows, step))


def quantize(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize w (out, in) float -> q (out, in) uint8, scales (out, G) float16, zeros (out, G) uint8."""
    out_f, in_f = w.shape
    check_group_size(in_f, group_size)
    q = np.empty((out_f, in_f), np.uint8)
    scales = np.empty((out_f, in_f // group_size), np.float16)
    zeros = np.empty((out_f, in_f // group_size), np.uint8)
    for r in _row_blocks(out_f, in_f):
        q[r], scales[r], zeros[r] = _quantize(w[r], bits, group_size)
    return q, scales, zeros


def _quantize(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    out_f, in_f = w.shape
    max_int = 2**bits - 1
    g = np.asarray(w, dtype=np.float32).reshape(out_f, in_f // group_size, group_size)  # (out, G, gs)
    lo, hi = g.min(axis=-1), g.max(axis=-1)  # (out, G)
    scales = (np.maximum(hi - lo, 1e-5) / max_int).astype(np.float16)
    s = scales.astype(np.float32)
    zeros = np.clip(-np.round(lo / s), 0, max_int)
    q = np.clip(np.round(g / s[..., None]) + zeros[..., None], 0, max_int)
    return q.reshape(out_f, in_f).astype(np.uint8), scales, zeros.astype(np.uint8)


def dequantize(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int) -> np.ndarray:
    """w_hat (out, in) float32 from q (out, in), scales (out, G) float16, zeros (out, G)."""
    out_f, in_f = q.shape
    w = np.empty((out_f, in_f), np.float32)
    for r in _row_blocks(out_f, in_f):
        g = q[r].reshape(-1, in_f // group_size, group_size).astype(np.float32)  # (rows, G, gs)
        g -= zeros[r].astype(np.float32)[..., None]
        g *= scales[r].astype(np.float32)[..., None]
        w[r] = g.reshape(-1, in_f)
    return w


def packed_words(n: int, bits: int) -> int:
    """uint32 words a row of n b-bit values takes."""
    return -(-n // 32) * bits


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack q (rows, n) of values < 2**bits into (rows, packed_words(n, bits)) uint32."""
    rows, n = q.shape
    if q.size and int(q.max()) >= 2**bits:
        raise ValueError(f"value {int(q.max())} does not fit in {bits} bits")
    out = np.empty((rows, packed_words(n, bits)), "<u4")
    for r in _row_blocks(rows, n * bits):
        out[r] = _pack_rows(q[r], bits)
    return out


def _pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    rows, n = q.shape
    padded = np.zeros((rows, -(-n // 32) * 32), np.uint8)
    padded[:, :n] = q
    if bits == 8:  # a value a byte
        return padded.view("<u4")
    if bits == 4:  # fast path: two values a byte, low nibble first
        return np.ascontiguousarray(padded[:, 0::2] | (padded[:, 1::2] << 4)).view("<u4")
    shifts = np.arange(bits, dtype=np.uint8)
    bitplanes = (padded[..., None] >> shifts) & 1  # (rows, n_pad, bits), bit k of value j
    packed = np.packbits(bitplanes.reshape(rows, -1), axis=-1, bitorder="little")  # (rows, n_pad*bits/8)
    return packed.view("<u4").reshape(rows, packed_words(n, bits))


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of ``pack_bits``: (rows, words) uint32 -> (rows, n) uint8."""
    rows = packed.shape[0]
    out = np.empty((rows, n), np.uint8)
    for r in _row_blocks(rows, n * bits):
        out[r] = _unpack_rows(packed[r], bits, n)
    return out


def _unpack_rows(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    rows = packed.shape[0]
    b = np.ascontiguousarray(packed).view(np.uint8)  # (rows, 4 * words)
    if bits == 8:
        return b[:, :n]
    if bits == 4:  # fast path: two values per byte, low nibble first
        out = np.empty((rows, b.shape[1] * 2), np.uint8)
        out[:, 0::2], out[:, 1::2] = b & 15, b >> 4
        return out[:, :n]
    bitplanes = np.unpackbits(b, axis=-1, bitorder="little")
    bitplanes = bitplanes.reshape(rows, -1, bits)[:, :n]  # (rows, n, bits)
    return (bitplanes << np.arange(bits, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)


def pack_linear(w: np.ndarray, bits: int, group_size: int, bias: np.ndarray | None = None) -> W4:
    """Quantize and pack a weight (out, in) float into a ``W4`` (a block of rows at a time: no full-size
    temporaries beside the packed result)."""
    out_f, in_f = w.shape
    check_group_size(in_f, group_size)
    qweight = np.empty((out_f, packed_words(in_f, bits)), "<u4")
    scales = np.empty((out_f, in_f // group_size), np.float16)
    zeros = np.empty((out_f, in_f // group_size), np.uint8)
    for r in _row_blocks(out_f, in_f):
        q, scales[r], zeros[r] = _quantize(w[r], bits, group_size)
        qweight[r] = _pack_rows(q, bits)
    return W4(qweight, scales, pack_bits(zeros, bits), group_size, bits, in_f, bias)


def unpack_linear(w: W4) -> np.ndarray:
    """The dequantized weight (out, in) float32 of a ``W4`` (a block of rows at a time)."""
    n_groups = w.in_features // w.group_size
    zeros = unpack_bits(w.zeros, w.bits, n_groups)
    out = np.empty((w.qweight.shape[0], w.in_features), np.float32)
    for r in _row_blocks(out.shape[0], w.in_features):
        out[r] = dequantize(_unpack_rows(w.qweight[r], w.bits, w.in_features), w.scales[r], zeros[r], w.group_size)
    return out


def pack_zeros_flat(zeros: np.ndarray, bits: int) -> np.ndarray:
    """Zero points (out, G) as one little-endian stream of out*G values: (packed_words(out*G, bits),) uint32."""
    return pack_bits(zeros.reshape(1, -1), bits).reshape(-1)


def zeros_rows(flat: np.ndarray, out_f: int, n_groups: int, bits: int) -> np.ndarray:
    """The in-memory zero points (out, packed_words(G, bits)) of a flat stream; a view when rows need no padding."""
    if n_groups % 32 == 0:
        return flat[: out_f * n_groups * bits // 32].reshape(out_f, -1)
    return pack_bits(unpack_bits(flat.reshape(1, -1), bits, out_f * n_groups).reshape(out_f, n_groups), bits)


def fit_rows(words: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Rows of natural-order words (rows, k) padded or cut to packed_words(n, bits): a view when k already fits.

    Words past a row's n values hold padding only, so cutting drops nothing and padding adds zeros.
    """
    words = words.view(np.uint32) if words.dtype == np.int32 else words
    want = packed_words(n, bits)
    if words.shape[1] == want:
        return words
    out = np.zeros((words.shape[0], want), np.uint32)
    k = min(want, words.shape[1])
    out[:, :k] = words[:, :k]
    return out


def unpack_awq_gemm(packed: np.ndarray) -> np.ndarray:
    """AutoAWQ GEMM words (rows, cols/8) int32 -> values (cols, rows) uint8: transposed to (out, in)."""
    b = np.ascontiguousarray(packed).view(np.uint8)  # (rows, cols/2): byte j of word k has nibbles 2j, 2j+1
    nib = np.empty((packed.shape[0], packed.shape[1], 8), np.uint8)  # (rows, cols/8, nibble position)
    by = b.reshape(packed.shape[0], packed.shape[1], 4)
    nib[..., 0::2], nib[..., 1::2] = by & 15, by >> 4
    cols = np.empty_like(nib)
    cols[..., list(AWQ_ORDER)] = nib  # nibble i holds column AWQ_ORDER[i]
    return np.ascontiguousarray(cols.reshape(packed.shape[0], -1).T)


def pack_awq_gemm(q: np.ndarray) -> np.ndarray:
    """Values (cols, rows) uint8 < 16 -> AutoAWQ GEMM words (rows, cols/8) int32 (the inverse of unpack_awq_gemm)."""
    cols, rows = q.shape
    if cols % 8:
        raise ValueError(f"AutoAWQ GEMM packs eight output columns a word: {cols} is not a multiple of 8")
    t = np.ascontiguousarray(q.T).reshape(rows, cols // 8, 8)[..., list(AWQ_ORDER)]  # nibble i <- column ORDER[i]
    b = t[..., 0::2] | (t[..., 1::2] << 4)  # (rows, cols/8, 4) bytes, low nibble first
    return np.ascontiguousarray(b).view("<i4").reshape(rows, cols // 8)


def unpack_along_columns(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """compressed-tensors' zero points packed along the output axis: (ceil(n*b/32), G) -> (n, G) uint8."""
    return unpack_bits(np.ascontiguousarray(packed.T).view(np.uint32), bits, n).T


def pack_along_columns(values: np.ndarray, bits: int) -> np.ndarray:
    """(n, G) uint8 -> (ceil(n*b/32), G) int32 packed along the first axis, as compressed-tensors packs zero points."""
    n = values.shape[0]
    words = -(-n * bits // 32)
    return np.ascontiguousarray(pack_bits(np.ascontiguousarray(values.T), bits)[:, :words].T).view(np.int32)
