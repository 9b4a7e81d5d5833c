"""The numpy reference backend: slow, plain and obviously correct.

Every other backend is tested against it. Arithmetic is float32; weights stored
as float16 are widened per call. With ``activations="int8"`` a packed linear runs
the CPU kernels' integer arithmetic (``quantize_activations``, ``linear_int8``):
each linear input quantized to int8 with a scale per group, codes times int8
activations summed in integers, the zero point applied once per group.
"""

from __future__ import annotations

import numpy as np

from edge_awq.ops import HostMemory
from edge_awq.model import W4, Dense
from edge_awq.pack import unpack_linear


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


ACTIVATIONS = ("int16", "int8")  # int16: float arithmetic here (the int16 kernels' error is below 2^-15)


def quantize_activations(x: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (T, in) float32 -> x8 (T, in) int8, scale (T, G) float32, sums (T, G) int32: x8 = rint(x / scale) with
    scale = max|x| / 127 per group of group_size (1 for an all-zero group), and the sum of each group's x8."""
    T, n = x.shape
    g = np.asarray(x, np.float32).reshape(T, n // group_size, group_size)  # (T, G, gs)
    top = np.abs(g).max(axis=-1)  # (T, G)
    scale = np.where(top > 0, top / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    inv = (np.float32(1.0) / scale)[..., None]
    x8 = np.clip(np.rint(g * inv), -127, 127).astype(np.int8)
    return x8.reshape(T, n), scale, x8.astype(np.int32).sum(axis=-1)


def linear_int8(x: np.ndarray, w: W4) -> np.ndarray:
    """x (T, in) float32 times a packed weight with int8 activations: for each row r and group g,
    ``s[r, g] * xscale[g] * (sum q * x8 - z[r, g] * sum x8)``, the sums exact integers. (T, out) float32."""
    from edge_awq.pack import unpack_bits

    n_groups = w.in_features // w.group_size
    x8, xscale, xsum = quantize_activations(_f32(x), w.group_size)
    q = unpack_bits(w.qweight, w.bits, w.in_features).astype(np.int32)  # (out, in)
    z = unpack_bits(w.zeros, w.bits, n_groups).astype(np.int64)  # (out, G)
    T, out_f = x.shape[0], q.shape[0]
    dots = np.einsum("ogi,tgi->tog", q.reshape(out_f, n_groups, w.group_size).astype(np.int64),
                     x8.reshape(T, n_groups, w.group_size).astype(np.int64))  # (T, out, G) exact
    ints = dots - z[None] * xsum[:, None, :]  # (T, out, G)
    s = np.asarray(w.scales, np.float32)  # (out, G)
    return (ints.astype(np.float32) * (s[None] * xscale[:, None, :])).sum(axis=-1, dtype=np.float32)


class ReferenceBackend(HostMemory):
    name = "reference"
    kv_dtype = np.float32

    def __init__(self, activations: str = "int16"):
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations {activations!r}: one of {ACTIVATIONS}")
        self.activations = activations

    def embed(self, table, tokens) -> np.ndarray:
        return _f32(table[np.asarray(tokens, dtype=np.int64)])

    def rmsnorm(self, x, weight, eps: float) -> np.ndarray:
        x = _f32(x)
        ms = np.mean(x * x, axis=-1, keepdims=True)  # (T, 1)
        return x / np.sqrt(ms + eps) * _f32(weight)

    def linear(self, x, w) -> np.ndarray:
        if isinstance(w, W4) and self.activations == "int8" and w.bits in (3, 4, 5, 6, 8):
            y = linear_int8(x, w)
        elif isinstance(w, W4):
            y = _f32(x) @ unpack_linear(w).T  # dequantized one layer at a time, dropped after use
        elif isinstance(w, Dense):
            y = _f32(x) @ _f32(w.weight).T  # (T, out)
        else:
            raise TypeError(f"reference linear takes Dense or W4 weights, got {type(w).__name__}")
        if w.bias is not None:
            y += _f32(w.bias)
        return y

    def linears(self, x, ws) -> list[np.ndarray]:
        return [self.linear(x, w) for w in ws]

    def rope(self, x, pos: int, inv_freq, interleaved: bool) -> np.ndarray:
        T, _, hd = x.shape
        angles = np.arange(pos, pos + T, dtype=np.float64)[:, None] * inv_freq[None, :]  # (T, hd/2)
        cos = np.cos(angles).astype(np.float32)[:, None, :]  # (T, 1, hd/2)
        sin = np.sin(angles).astype(np.float32)[:, None, :]
        out = np.empty_like(_f32(x))
        if interleaved:
            x0, x1 = x[..., 0::2], x[..., 1::2]
            out[..., 0::2] = x0 * cos - x1 * sin
            out[..., 1::2] = x0 * sin + x1 * cos
        else:
            x0, x1 = x[..., : hd // 2], x[..., hd // 2 :]
            out[..., : hd // 2] = x0 * cos - x1 * sin
            out[..., hd // 2 :] = x1 * cos + x0 * sin
        return out

    def attention(self, q, k, v, cache, layer: int, pos: int) -> np.ndarray:
        T, n_heads, hd = q.shape
        n_kv = k.shape[1]
        group = n_heads // n_kv
        cache.write(layer, pos, k, v)
        keys, values = cache.read(layer, pos + T)  # (n_kv, S, hd) float32
        S = pos + T
        qg = _f32(q).reshape(T, n_kv, group, hd).transpose(1, 2, 0, 3).reshape(n_kv, group * T, hd)
        scores = (qg @ keys.transpose(0, 2, 1)).reshape(n_kv, group, T, S) * np.float32(1 / np.sqrt(hd))
        future = np.arange(S)[None, :] > (pos + np.arange(T))[:, None]  # (T, S)
        scores[..., future] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out = (p.reshape(n_kv, group * T, S) @ values).reshape(n_kv, group, T, hd)
        return out.transpose(2, 0, 1, 3).reshape(T, n_heads * hd)

    def silu_mul(self, gate, up) -> np.ndarray:
        gate = _f32(gate)
        return gate * (0.5 * (1.0 + np.tanh(0.5 * gate))) * _f32(up)  # sigmoid via tanh: no overflow
