"""The CPU backend (x86 and ARM): numba kernels on the packed weights.

- ``backend.py``: ``NumbaBackend``, the ops of ``edge_awq.ops.Backend``.
- ``linear.py``: weights prepared at load and the table of which kernel runs for which weight, bit width,
  group size and CPU (``GEMV_ROUTES``, ``PREFILL_ROUTES``).
- ``gemv_blocked.py``, ``gemv_i16.py``: the integer-dot-product GEMVs (x86 AVX2); ``gemv_float.py``: the
  float ones every CPU runs; ``decode.py``: a decode step's layer as one call; ``kernels.py``: norms,
  RoPE, attention, SiLU; ``intrinsics.py``: conversions in LLVM IR.
"""

from edge_awq.backends.numba.backend import NumbaBackend
from edge_awq.backends.numba.linear import PreparedW4, linear_f16, linear_w4, linears_w4, prepare

__all__ = ["NumbaBackend", "PreparedW4", "linear_f16", "linear_w4", "linears_w4", "prepare"]
