"""``NumbaBackend``: the ops of ``edge_awq.ops.Backend`` in numba, on host arrays.

Linears go through ``linear.py`` (prepared weights, the kernel table); a one-token decode step runs each
4-bit layer as one compiled call where it can (``decode.py``); the other ops are ``kernels.py``'s.
"""

from __future__ import annotations

import dataclasses
import weakref

import numpy as np

from edge_awq.backends import threads
from edge_awq.backends.numba import gemv_i8 as i8
from edge_awq.backends.numba.kernels import (attention_int8_kernel, attention_kernel, rmsnorm_kernel, rmsnorm_serial,
                                             rope_kernel, rope_serial, silu_mul_kernel, silu_mul_serial)
from edge_awq.backends.numba.linear import (GEMV_MAX_T, PreparedW4, linear_f16, linear_w4, linears_w4, prepare)
from edge_awq.model import LINEARS, W4, Dense
from edge_awq.ops import HostMemory

threads.configure()  # before the first parallel kernel starts OpenMP

DEFAULT_ACTIVATIONS = "int8"  # measured (README "Speed"): +0.18 % perplexity decoding, +0.10 % in prefill (under 1 %)


def _isa(activations: str) -> str:
    """The instruction set the packed linears' inner loops use: the integer kernels' (isa.py), or, for
    int16, what LLVM vectorizes for this CPU."""
    from edge_awq.backends.numba.isa import ISA, target_cpu

    if activations == "int8" and ISA != "none":
        return ISA
    return f"vectorized for {target_cpu()}"


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _sharing_kernels(layers: list) -> list:
    """The layers with every 8-bit-activation linear running one kernel set, the union of their widths
    (``gemv_i8.kernel_set``): a mixed file compiles each kernel once for all its widths, not once per
    combination its linears happen to meet in, and its decode step calls those same compiled kernels."""
    def a8(lw) -> dict:
        linears = {n: getattr(lw, n) for n in LINEARS}
        return {n: p for n, p in linears.items() if isinstance(p, PreparedW4) and p.kernels is not None}

    shared = [p.kernels for lw in layers for p in a8(lw).values()]
    if not shared:
        return layers
    kind = i8.kernel_union(*shared)
    return [dataclasses.replace(lw, **{n: dataclasses.replace(p, kernels=kind) for n, p in a8(lw).items()})
            for lw in layers]


def _kept_while_alive(table: dict, obj, make):
    """make(obj), computed once and kept in table while obj lives (keyed by identity; the entry
    leaves with obj, so layers read lazily do not pile up their prepared copies)."""
    key = id(obj)
    hit = table.get(key)
    if hit is None or hit[0]() is not obj:
        hit = table[key] = (weakref.ref(obj), make(obj))
        weakref.finalize(obj, table.pop, key, None)
    return hit[1]


class NumbaBackend(HostMemory):
    """The six ops in numba. W4 linears read packed weights; Dense ones (fp16 head, FP models) use BLAS."""

    name = "numba"
    kv_dtype = np.float16

    def __init__(self, activations: str = DEFAULT_ACTIVATIONS):
        """activations: "int8" (integer dot products with 8-bit activations, ``gemv_i8.py``) or "int16"."""
        if activations not in ("int8", "int16"):
            raise ValueError(f"activations {activations!r}: int8 or int16")
        self.activations = activations
        self.isa = _isa(activations)
        self._prepared_w4: dict[int, tuple[weakref.ref, PreparedW4]] = {}  # id(W4) -> (a weak ref to it, prepared)
        self._dense: dict[int, tuple[weakref.ref, np.ndarray]] = {}  # id(Dense) -> (..., its float32 weight)
        self._angles: tuple = (None,)
        self._fused: dict[int, tuple] = {}  # id(LayerWeights) -> (a weak ref to it, decode_layer's arrays or None)
        self._steps: dict[int, tuple] = {}  # id(ModelWeights) -> (a weak ref to it, decode_step's layers or None)

    def embed(self, table, tokens) -> np.ndarray:
        return np.asarray(table[np.asarray(tokens, dtype=np.int64)], dtype=np.float32)

    def rmsnorm(self, x, weight, eps: float) -> np.ndarray:
        x = _f32(x)
        out = np.empty_like(x)
        (rmsnorm_serial if x.shape[0] <= GEMV_MAX_T else rmsnorm_kernel)(x, _f32(weight), eps, out)
        return out

    def linear(self, x, w) -> np.ndarray:
        x = _f32(x)
        if isinstance(w, PreparedW4):
            return linear_w4(x, w)
        if isinstance(w, Dense):
            if w.weight.dtype == np.float16:  # read as it is stored: half the bytes of a float32 copy
                y = linear_f16(x, w.weight)
            else:
                y = x @ _kept_while_alive(self._dense, w, lambda d: _f32(d.weight)).T  # converted once
            return y if w.bias is None else y + _f32(w.bias)
        return linear_w4(x, self._prepared(w))

    def linears(self, x, ws) -> list[np.ndarray]:
        x = _f32(x)
        if len(ws) in (2, 3) and all(isinstance(w, (W4, PreparedW4)) for w in ws):
            ps = [self._prepared(w) for w in ws]
            same = all(p.group_size == ps[0].group_size for p in ps)
            if same and all(p.a8 is not None for p in ps):  # 3-, 4- or 8-bit, any number of tokens
                return linears_w4(x, ps)
            if (same and x.shape[0] <= GEMV_MAX_T
                    and all(p.bits == 4 and p.byte_path and p.a8 is None for p in ps)):
                return linears_w4(x, ps)
        return [self.linear(x, w) for w in ws]

    def prepare(self, w):
        """The model with every packed linear prepared now, one at a time, rather than at its first token:
        the returned weights hold the prepared forms in place of the W4s (drop the argument to free what
        was converted at load). Layers read lazily are prepared as they come, and dropped with them."""
        output = self._prepared(w.output) if isinstance(w.output, W4) else w.output
        if not isinstance(w.layers, list):
            return dataclasses.replace(w, output=output)
        layers = [dataclasses.replace(lw, **{n: self._prepared(getattr(lw, n)) for n in LINEARS
                                             if isinstance(getattr(lw, n), W4)}) for lw in w.layers]
        return dataclasses.replace(w, layers=_sharing_kernels(layers), output=output)

    def _prepared(self, w) -> PreparedW4:
        """A W4 prepared (once, kept while it lives), or a PreparedW4 as it is."""
        if isinstance(w, PreparedW4):
            return w
        return _kept_while_alive(self._prepared_w4, w, lambda m: prepare(m, repack=True, activations=self.activations))

    def route_of(self, w, tokens: int = 1) -> str:
        """The name of the kernel table's route that runs w (a packed weight) for this many tokens."""
        from edge_awq.backends.numba.linear import route

        if isinstance(w, Dense):
            return "f16-float" if w.weight.dtype == np.float16 else "blas"
        return route(self._prepared(w), tokens).name

    def decode_block(self, lw, x, pos: int, cache, layer: int, w):
        """One decoder layer for one token as a single compiled call (``decode.py``), or None when
        this layer, cache or machine is not the case it covers (the model then runs op by op)."""
        args = self._decode_args(lw, w) if x.shape[0] == 1 and cache.k.dtype == np.float16 else None
        if args is None:
            return None
        from edge_awq.backends.numba.decode import decode_layer

        cos, sin = self._rope_angles(pos, 1, w.inv_freq)
        a = w.args
        return decode_layer(_f32(x), *args, cos, sin, a.rope_interleaved,
                            cache.k[layer].view(np.uint16), cache.v[layer].view(np.uint16), pos, a.n_heads,
                            a.n_kv_heads, a.head_dim, lw.w1.shape[0])

    def decode_layers(self, w, x, pos: int, cache):
        """Every decoder layer for one token as a single compiled call (``decode.decode_step``), or None when a
        layer, the cache or the machine is not the case it covers."""
        if x.shape[0] != 1 or cache.k.dtype != np.float16 or not isinstance(w.layers, list):
            return None
        step = _kept_while_alive(self._steps, w, self._step_args)
        if step is None:
            return None
        from edge_awq.backends.numba.decode import decode_step

        layers, eps, kind = step
        cos, sin = self._rope_angles(pos, 1, w.inv_freq)
        a = w.args
        return decode_step(_f32(x), layers, eps, kind, cos, sin, a.rope_interleaved,
                           cache.k.view(np.uint16), cache.v.view(np.uint16), pos, a.n_heads, a.n_kv_heads,
                           a.head_dim, a.hidden_dim)

    def _step_args(self, w):
        """decode_step's typed list of the layers' arrays, and what they share; None if a layer is declined."""
        from numba.typed import List

        per_layer = [self._decode_args(lw, w) for lw in w.layers]
        if not per_layer or any(a is None for a in per_layer):
            return None
        eps, kinds = per_layer[0][2], [a[10] for a in per_layer]
        if len({k.dtype.names is None for k in kinds}) != 1:  # some layers int8's kernels, some int16's
            return None
        kind = kinds[0] if kinds[0].dtype.names is None else i8.kernel_union(*kinds)
        layers = List()
        for a in per_layer:
            layers.append((a[0], a[1], *a[3:10]))
        return layers, eps, kind

    def _decode_args(self, lw, w):
        """The layer's arrays for ``decode_layer`` (kept per layer), or None if it does not apply."""
        return _kept_while_alive(self._fused, lw, lambda layer: self._layer_args(layer, w))

    def _layer_args(self, lw, w):
        lins = [getattr(lw, n) for n in LINEARS]  # decode_layer takes them in this order
        if not all(isinstance(m, (W4, PreparedW4)) and m.bias is None for m in lins):
            return None
        ps = [self._prepared(m) for m in lins]
        layouts = [p.a8 if p.a8 is not None else p.blocked for p in ps]
        if any(b is None for b in layouts) or len({type(b) for b in layouts}) != 1:
            return None
        # which kernels run: int8's, compiled for these weights' widths only, or int16's
        kind = i8.kernel_union(*(p.kernels for p in ps)) if ps[0].a8 is not None else np.empty(0, np.int16)
        return (np.array(lw.attn_norm, np.float32), np.array(lw.ffn_norm, np.float32), w.args.norm_eps,
                *[(b.words, b.scales, b.zeros, np.int64(p.group_size)) for b, p in zip(layouts, ps)], kind)

    def rope(self, x, pos: int, inv_freq, interleaved: bool) -> np.ndarray:
        x = _f32(x)
        cos, sin = self._rope_angles(pos, x.shape[0], inv_freq)
        out = np.empty_like(x)
        (rope_serial if x.shape[0] <= GEMV_MAX_T else rope_kernel)(x, cos, sin, interleaved, out)
        return out

    def _rope_angles(self, pos: int, T: int, inv_freq) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin (T, hd/2) float32 of positions pos..pos+T-1, computed once for all layers of a step."""
        key = (pos, T, id(inv_freq))
        if self._angles[0] != key:
            angles = np.arange(pos, pos + T, dtype=np.float64)[:, None] * inv_freq[None, :]  # (T, hd/2)
            self._angles = (key, np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32), inv_freq)
        return self._angles[1], self._angles[2]

    def attention(self, q, k, v, cache, layer: int, pos: int) -> np.ndarray:
        T, H, hd = q.shape
        if cache.k.dtype not in (np.float16, np.int8):
            raise TypeError("the numba backend keeps its KV cache in float16 or int8: allocate it with one of those")
        cache.write(layer, pos, k, v)
        out = np.empty((T, H, hd), np.float32)
        if T > GEMV_MAX_T:  # a prompt: matrix products (attention.py)
            from edge_awq.backends.numba.attention import attention_tiles

            int8 = cache.k.dtype == np.int8
            attention_tiles(_f32(q), cache.k[layer], cache.v[layer], pos, out,
                            cache.k_scale[layer] if int8 else None, cache.v_scale[layer] if int8 else None)
        elif cache.k.dtype == np.int8:
            attention_int8_kernel(_f32(q), cache.k[layer], cache.k_scale[layer], cache.v[layer], cache.v_scale[layer],
                                  pos, out)
        else:
            attention_kernel(_f32(q), cache.k[layer].view(np.uint16), cache.v[layer].view(np.uint16), pos, out)
        return out.reshape(T, H * hd)

    def silu_mul(self, gate, up) -> np.ndarray:
        gate = _f32(gate)
        out = np.empty_like(gate)
        (silu_mul_serial if gate.shape[0] <= GEMV_MAX_T else silu_mul_kernel)(gate, _f32(up), out)
        return out
