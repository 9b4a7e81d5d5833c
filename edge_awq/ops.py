"""The backend interface the model is written against (``edge_awq.backends`` chooses one)."""

from __future__ import annotations

from typing import Protocol

import numpy as np



class Backend(Protocol):
    """Six ops (and ``linears``, several linears of one input). Activations are float32 arrays; T is the number of tokens in the call.

    A backend may also define ``decode_block(lw, x, pos, cache, layer, w)``: one decoder layer (``model.block``)
    for x (1, dim) at position pos as one fused call, returning None for a layer it declines (the model then
    runs it op by op). numba runs a one-token step of a 4-bit layer so. ``decode_layers(w, x, pos, cache)`` does
    the same for every layer of the model at once (``model.forward``), or returns None.
    """

    name: str
    kv_dtype: type  # dtype of the KV cache the backend reads (numpy dtype)

    def embed(self, table, tokens) -> np.ndarray:
        """Rows of table (vocab, dim) for tokens (T,) int -> (T, dim) float32."""

    def rmsnorm(self, x, weight, eps: float) -> np.ndarray:
        """x (T, dim) float32, weight (dim,) -> x / rms(x) * weight, (T, dim) float32."""

    def linear(self, x, w) -> np.ndarray:
        """x (T, in) float32 times w (out, in) transposed, plus bias -> (T, out) float32."""

    def linears(self, x, ws) -> list[np.ndarray]:
        """``[linear(x, w) for w in ws]`` for weights sharing an input (q, k, v; gate, up): one kernel may run them all."""

    def rope(self, x, pos: int, inv_freq, interleaved: bool) -> np.ndarray:
        """Rotate x (T, heads, head_dim) for positions pos..pos+T-1.

        inv_freq (head_dim/2,) float32. interleaved pairs (2i, 2i+1); otherwise
        (i, i + head_dim/2), the Hugging Face "rotate half" layout.
        """

    def attention(self, q, k, v, cache, layer: int, pos: int) -> np.ndarray:
        """Causal grouped-query attention over the KV cache.

        q (T, n_heads, head_dim), k and v (T, n_kv_heads, head_dim) float32; k, v are
        written to cache rows pos..pos+T-1 of ``layer`` first. Returns (T, n_heads*head_dim).
        """

    def silu_mul(self, gate, up) -> np.ndarray:
        """silu(gate) * up, both (T, hidden_dim) float32."""

    # Where the weights, the cache and the logits live: host memory for numpy and numba (these
    # return their argument, or a KVCache), device memory for cuda.
    def prepare(self, w):
        """The model's weights (ModelWeights) in the form this backend's ops read."""

    def allocate_cache(self, args, max_seq: int, dtype=None, commit: bool = False):
        """A KV cache for max_seq positions (dtype: the cache's, default ``kv_dtype``); see model.KVCache."""

    def to_host(self, x) -> np.ndarray:
        """An op's output as a float32 numpy array (the logits at the end of ``forward``)."""


class HostMemory:
    """prepare, allocate_cache and to_host for backends that compute on host arrays (numpy, numba)."""

    kv_dtype: type

    def prepare(self, w):
        return w

    def allocate_cache(self, args, max_seq: int, dtype=None, commit: bool = False):
        from edge_awq.model import KVCache

        return KVCache.allocate(args, max_seq, self.kv_dtype if dtype is None else dtype, commit)

    def to_host(self, x) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)
