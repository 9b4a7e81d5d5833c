"""The LLaMA-family decoder, written once against the ``ops`` backend interface.

``forward(w, tokens, pos, cache, ops)`` is plain functions over frozen weight
dataclasses; the array type is whatever the backend uses (numpy here, torch in
``edge_awq.offline``), so the model code only reshapes, slices and adds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edge_awq.config import LINEAR_NAMES, ModelArgs


@dataclass(frozen=True)
class Dense:
    """An unquantized linear layer."""

    weight: np.ndarray  # (out_features, in_features) float32 or float16
    bias: np.ndarray | None = None  # (out_features,) float32


@dataclass(frozen=True)
class W4:
    """A packed low-bit linear layer: 4 (or 3) bits, asymmetric, grouped; layout in ``pack.py``."""

    qweight: np.ndarray  # (out_features, packed_words(in_features, bits)) uint32
    scales: np.ndarray  # (out_features, in_features // group_size) float16
    zeros: np.ndarray  # (out_features, packed_words(in_features // group_size, bits)) uint32
    group_size: int
    bits: int
    in_features: int
    bias: np.ndarray | None = None  # (out_features,) float32

    @property
    def shape(self) -> tuple[int, int]:
        return (self.qweight.shape[0], self.in_features)


Linear = Dense | W4


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer. Linear weights are ``Dense`` or ``W4`` and shaped (out, in)."""

    attn_norm: np.ndarray  # (dim,)
    wq: Linear  # (n_heads * head_dim, dim)
    wk: Linear  # (n_kv_heads * head_dim, dim)
    wv: Linear  # (n_kv_heads * head_dim, dim)
    wo: Linear  # (dim, n_heads * head_dim)
    ffn_norm: np.ndarray  # (dim,)
    w1: Linear  # gate (hidden_dim, dim)
    w2: Linear  # down (dim, hidden_dim)
    w3: Linear  # up   (hidden_dim, dim)


LINEARS = LINEAR_NAMES  # config.py: the one list, with the layer shapes
NORMS = ("attn_norm", "ffn_norm")


class LazyLayers(Sequence):
    """Decoder layers read from their source only when indexed (one at a time, not kept)."""

    def __init__(self, n_layers: int, read_layer: Callable[[int], LayerWeights]):
        self._n = n_layers
        self._read = read_layer

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._read(i % self._n)


@dataclass(frozen=True)
class ModelWeights:
    args: ModelArgs
    tok_embeddings: np.ndarray  # (vocab_size, dim)
    layers: Sequence[LayerWeights]  # n_layers, possibly lazy
    norm: np.ndarray  # (dim,)
    output: Linear  # (vocab_size, dim); the embedding table when tied
    inv_freq: np.ndarray  # (head_dim / 2,) float32 RoPE inverse frequencies


@dataclass
class KVCache:
    """Preallocated keys and values of every layer: float32, float16, or int8 with a scale per token and head.

    int8 rows are ``round(x / s)`` with ``s = max|x| / 127`` for each token's head vector, so a
    row reads back as ``q * s`` (relative error at most 1/254 of the row's largest entry).
    """

    k: np.ndarray  # (n_layers, n_kv_heads, max_seq, head_dim)
    v: np.ndarray  # (n_layers, n_kv_heads, max_seq, head_dim)
    k_scale: np.ndarray | None = None  # (n_layers, n_kv_heads, max_seq) float32, int8 caches only
    v_scale: np.ndarray | None = None

    @classmethod
    def allocate(cls, args: ModelArgs, max_seq: int, dtype=np.float32, commit: bool = False) -> "KVCache":
        """commit: write every page now, so the memory is held from the start (not when a long answer needs it)."""
        shape = (args.n_layers, args.n_kv_heads, max_seq, args.head_dim)
        if np.dtype(dtype) == np.int8:
            cache = cls(np.zeros(shape, np.int8), np.zeros(shape, np.int8),
                        np.zeros(shape[:3], np.float32), np.zeros(shape[:3], np.float32))
        else:
            cache = cls(np.zeros(shape, dtype), np.zeros(shape, dtype))
        if commit:
            for a in (cache.k, cache.v, cache.k_scale, cache.v_scale):
                if a is not None:
                    a.fill(0)
        return cache

    @property
    def max_seq(self) -> int:
        return self.k.shape[2]

    def write(self, layer: int, pos: int, k, v) -> None:
        """Store k, v (T, n_kv_heads, head_dim) float32 at rows pos..pos+T-1 of a layer."""
        T = k.shape[0]
        for x, store, scale in ((k, self.k, self.k_scale), (v, self.v, self.v_scale)):
            x = np.asarray(x, np.float32).transpose(1, 0, 2)  # (n_kv, T, hd)
            if scale is None:
                store[layer, :, pos : pos + T] = x
            else:
                s = np.maximum(np.abs(x).max(axis=-1), 1e-30) / 127  # (n_kv, T)
                store[layer, :, pos : pos + T] = np.clip(np.rint(x / s[..., None]), -127, 127)
                scale[layer, :, pos : pos + T] = s

    def read(self, layer: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of rows 0..end-1 of a layer as float32 (n_kv_heads, end, head_dim)."""
        out = []
        for store, scale in ((self.k, self.k_scale), (self.v, self.v_scale)):
            x = store[layer, :, :end].astype(np.float32)
            out.append(x if scale is None else x * scale[layer, :, :end, None])
        return out[0], out[1]


def attention(lw: LayerWeights, x, pos: int, cache: KVCache | None, layer: int, w: ModelWeights, ops):
    """Self-attention sub-block with its residual: x (..., T, dim) -> (..., T, dim).

    Leading batch dimensions are for backends that take them (the offline torch ops, which
    run calibration batches with cache None).
    """
    a = w.args
    lead = x.shape[:-1]  # (..., T)
    h = ops.rmsnorm(x, lw.attn_norm, a.norm_eps)
    q, k, v = ops.linears(h, (lw.wq, lw.wk, lw.wv))
    q = q.reshape(*lead, a.n_heads, a.head_dim)
    k = k.reshape(*lead, a.n_kv_heads, a.head_dim)
    v = v.reshape(*lead, a.n_kv_heads, a.head_dim)
    q = ops.rope(q, pos, w.inv_freq, a.rope_interleaved)
    k = ops.rope(k, pos, w.inv_freq, a.rope_interleaved)
    o = ops.attention(q, k, v, cache, layer, pos)  # (..., T, n_heads * head_dim)
    return x + ops.linear(o, lw.wo)


def mlp(lw: LayerWeights, x, w: ModelWeights, ops):
    """SwiGLU feed-forward sub-block with its residual: x (..., T, dim) -> (..., T, dim)."""
    h = ops.rmsnorm(x, lw.ffn_norm, w.args.norm_eps)
    gate, up = ops.linears(h, (lw.w1, lw.w3))
    return x + ops.linear(ops.silu_mul(gate, up), lw.w2)  # silu_mul may write into gate (the torch ops do)


def block(lw: LayerWeights, x, pos: int, cache: KVCache | None, layer: int, w: ModelWeights, ops):
    """One decoder layer: x (..., T, dim) -> (..., T, dim).

    A backend may run the whole layer as one call (``decode_block``: numba, for a one-token step);
    it returns None for what it does not cover, and the layer runs op by op.
    """
    fused = getattr(ops, "decode_block", None)
    if fused is not None and cache is not None:
        y = fused(lw, x, pos, cache, layer, w)
        if y is not None:
            return y
    return mlp(lw, attention(lw, x, pos, cache, layer, w, ops), w, ops)


def forward(w: ModelWeights, tokens, pos: int, cache: KVCache, ops, last_only: bool = False):
    """Run tokens (T,) int at positions pos..pos+T-1; returns float32 logits (T, vocab) or (1, vocab)."""
    if pos + len(tokens) > cache.max_seq:
        raise ValueError(f"positions {pos}..{pos + len(tokens) - 1} exceed the KV cache of {cache.max_seq}")
    x = ops.embed(w.tok_embeddings, tokens)
    fused = getattr(ops, "decode_layers", None)  # every layer in one call, where the backend has it
    y = fused(w, x, pos, cache) if fused is not None else None
    if y is not None:
        x = y
    else:
        for i, lw in enumerate(w.layers):
            x = block(lw, x, pos, cache, i, w, ops)
    if last_only:
        x = x[-1:]
    return ops.to_host(ops.linear(ops.rmsnorm(x, w.norm, w.args.norm_eps), w.output))


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that share one input, and the op before them that AWQ folds their scales into."""

    prev: str  # a norm (attn_norm, ffn_norm) or a linear whose output rows feed ``linears``
    linears: tuple[str, ...]
    inspect: str | None = None  # sub-block judged by the search: "attention", "mlp", or the linears alone
    when: Callable[[ModelArgs], bool] = lambda a: True


# AWQ's knowledge of the LLaMA block, as data (DESIGN.md, "The algorithm").
SCALE_GROUPS = (
    ScaleGroup(prev="attn_norm", linears=("wq", "wk", "wv"), inspect="attention"),
    ScaleGroup(prev="wv", linears=("wo",), when=lambda a: a.n_kv_heads == a.n_heads),
    ScaleGroup(prev="ffn_norm", linears=("w1", "w3"), inspect="mlp"),
    ScaleGroup(prev="w3", linears=("w2",)),
)
NO_CLIP = ("wq", "wk")  # clipping q/k hurts attention scores more than it saves


PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds the activation workspace (see plan.py)


def prefill(w: ModelWeights, tokens, pos: int, cache: KVCache, ops, chunk: int = PREFILL_CHUNK):
    """Run a prompt chunk by chunk into the cache; returns the last position's logits (vocab,)."""
    tokens = np.asarray(tokens)
    for start in range(0, len(tokens), chunk):
        logits = forward(w, tokens[start : start + chunk], pos + start, cache, ops, last_only=True)
    return logits[-1]
