"""The one owner of the quantization grid and the bit packing.

Quantizer (asymmetric, per group of ``group_size`` consecutive input channels
of each output row; DESIGN.md): ``max_int = 2**bits - 1``,
``scale = max(max - min, 1e-5) / max_int`` (rounded to float16, the stored
precision, before use), ``zero = clip(-round(min / scale), 0, max_int)``,
``q = clip(round(w / scale) + zero, 0, max_int)``, ``w_hat = (q - zero) * scale``.

Layout "bits-le-v1": each row of b-bit values is a little-endian bit stream
(value j occupies bits j*b .. j*b+b-1; for 4 bits, value 2k is the low nibble
of byte k), padded with zeros to a multiple of 32 values and stored as uint32
words, so a row of n values takes ceil(n/32)*b words. Zero points are packed
the same way. Other layouts (the Hugging Face AWQ GEMM order) convert here.
"""

from __future__ import annotations

import numpy as np

from .model import W4

LAYOUT = "bits-le-v1"


def check_group_size(in_features: int, group_size: int) -> None:
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide input width {in_features}")


def quantize(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize w (out, in) float -> q (out, in) uint8, scales (out, G) float16, zeros (out, G) uint8."""
    out_f, in_f = w.shape
    check_group_size(in_f, group_size)
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
    g = q.reshape(out_f, in_f // group_size, group_size).astype(np.float32)  # (out, G, gs)
    w = (g - zeros.astype(np.float32)[..., None]) * scales.astype(np.float32)[..., None]
    return w.reshape(out_f, in_f)


def packed_words(n: int, bits: int) -> int:
    """uint32 words a row of n b-bit values takes."""
    return -(-n // 32) * bits


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack q (rows, n) of values < 2**bits into (rows, packed_words(n, bits)) uint32."""
    rows, n = q.shape
    if q.size and int(q.max()) >= 2**bits:
        raise ValueError(f"value {int(q.max())} does not fit in {bits} bits")
    padded = np.zeros((rows, -(-n // 32) * 32), np.uint8)
    padded[:, :n] = q
    shifts = np.arange(bits, dtype=np.uint8)
    bitplanes = (padded[..., None] >> shifts) & 1  # (rows, n_pad, bits), bit k of value j
    packed = np.packbits(bitplanes.reshape(rows, -1), axis=-1, bitorder="little")  # (rows, n_pad*bits/8)
    return packed.view("<u4").reshape(rows, packed_words(n, bits))


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of ``pack_bits``: (rows, words) uint32 -> (rows, n) uint8."""
    rows = packed.shape[0]
    if bits == 4:  # fast path: two values per byte, low nibble first
        b = np.ascontiguousarray(packed).view(np.uint8)  # (rows, 4 * words)
        out = np.empty((rows, b.shape[1] * 2), np.uint8)
        out[:, 0::2], out[:, 1::2] = b & 15, b >> 4
        return out[:, :n]
    bitplanes = np.unpackbits(np.ascontiguousarray(packed).view(np.uint8), axis=-1, bitorder="little")
    bitplanes = bitplanes.reshape(rows, -1, bits)[:, :n]  # (rows, n, bits)
    return (bitplanes << np.arange(bits, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)


def bits_per_weight(bits: int, group_size: int) -> float:
    """Storage per weight: the value, plus a float16 scale and a b-bit zero per group."""
    return bits + (16 + bits) / group_size


def pack_linear(w: np.ndarray, bits: int, group_size: int, bias: np.ndarray | None = None) -> W4:
    """Quantize and pack a weight (out, in) float into a ``W4``."""
    q, scales, zeros = quantize(w, bits, group_size)
    return W4(pack_bits(q, bits), scales, pack_bits(zeros, bits), group_size, bits, w.shape[1], bias)


def unpack_linear(w: W4) -> np.ndarray:
    """The dequantized weight (out, in) float32 of a ``W4``."""
    n_groups = w.in_features // w.group_size
    q = unpack_bits(w.qweight, w.bits, w.in_features)
    return dequantize(q, w.scales, unpack_bits(w.zeros, w.bits, n_groups), w.group_size)
