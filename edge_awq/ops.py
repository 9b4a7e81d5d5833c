"""The backend interface the model is written against, and the one place a backend is chosen."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .errors import BackendUnavailable


class Backend(Protocol):
    """Six ops (and ``linears``, several linears of one input). Activations are float32 arrays; T is the number of tokens in the call."""

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


def select_backend(name: str = "auto") -> Backend:
    """The only place a backend is chosen: "reference" (numpy), "numba" (CPU kernels) or "auto"."""
    if name in ("reference", "numpy"):
        from .backends.reference import ReferenceBackend

        return ReferenceBackend()
    if name in ("numba", "cpu", "auto"):
        try:
            from .backends.numba_cpu import NumbaBackend
        except ImportError as e:
            if name == "auto":
                from .backends.reference import ReferenceBackend

                return ReferenceBackend()
            raise BackendUnavailable(f"the numba backend needs numba ({e}): pip install numba") from None
        return NumbaBackend()
    raise BackendUnavailable(f"backend {name!r} is unknown: use reference, numba or auto")
