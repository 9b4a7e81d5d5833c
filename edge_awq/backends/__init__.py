"""Compute backends behind ``edge_awq.ops.Backend``, and the one place a backend is chosen.

``reference`` (numpy: the slow, obvious ground truth), ``numba`` (the CPU: x86 and ARM; which kernel runs
for which weight is the table in ``backends/numba/__init__.py``) and ``cuda`` (``native/`` through cffi).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_awq.errors import BackendUnavailable

if TYPE_CHECKING:  # the package is imported for threads.configure before numpy may start OpenBLAS
    from edge_awq.ops import Backend


def pick_backend(name: str = "auto") -> tuple[Backend, str]:
    """The only place a backend is chosen, and why: "cuda", "numba", "reference" (numpy) or "auto".

    auto takes cuda when libedge_awq_cuda.so loads and a device answers, else numba, else numpy.
    """
    if name in ("reference", "numpy"):
        from edge_awq.backends.reference import ReferenceBackend

        return ReferenceBackend(), "asked for"
    if name == "cuda":
        from edge_awq.backends.cuda import CudaBackend

        return CudaBackend(), "asked for"
    if name not in ("numba", "cpu", "auto"):
        raise BackendUnavailable(f"backend {name!r} is unknown: use cuda, numba, reference or auto")
    why = "asked for"
    if name == "auto":
        try:
            from edge_awq.backends.cuda import CudaBackend

            cuda = CudaBackend()
            return cuda, f"a CUDA device answers: {cuda.device_name}"
        except BackendUnavailable as e:
            why = f"no cuda: {e}"
    try:
        from edge_awq.backends.numba import NumbaBackend
    except ImportError as e:
        if name == "auto":
            from edge_awq.backends.reference import ReferenceBackend

            return ReferenceBackend(), f"{why}; no numba ({e})"
        raise BackendUnavailable(f"the numba backend needs numba ({e}): pip install numba") from None
    return NumbaBackend(), why


def select_backend(name: str = "auto") -> Backend:
    """``pick_backend`` without the reason."""
    return pick_backend(name)[0]
