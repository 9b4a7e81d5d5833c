"""Compute backends behind ``edge_awq.ops.Backend``, and the one place a backend is chosen.

``reference`` (numpy: the slow, obvious ground truth), ``numba`` (the CPU: x86 and ARM; which kernel runs
for which weight is the table in ``backends/numba/__init__.py``) and ``cuda`` (``native/`` through cffi).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_awq.errors import BackendUnavailable

if TYPE_CHECKING:  # the package is imported for threads.configure before numpy may start OpenBLAS
    from edge_awq.ops import Backend


ACTIVATIONS = ("auto", "int8", "int16")


def pick_backend(name: str = "auto", activations: str = "auto") -> tuple[Backend, str]:
    """The only place a backend is chosen, and why: "cuda", "numba", "reference" (numpy) or "auto".

    auto takes cuda when libedge_awq_cuda.so loads and a device answers, else numba, else numpy.
    activations: how the CPU backends' packed linears take their inputs: "int8" (integer dot products),
    "int16", or "auto" (numba's measured default; the reference's float arithmetic). The reason names the
    CPU kernels' instruction set.
    """
    if activations not in ACTIVATIONS:
        raise BackendUnavailable(f"activations {activations!r} unknown: use int8, int16 or auto")
    if name in ("reference", "numpy"):
        from edge_awq.backends.reference import ReferenceBackend

        return ReferenceBackend("int16" if activations == "auto" else activations), "asked for"
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

            return ReferenceBackend("int16" if activations == "auto" else activations), f"{why}; no numba ({e})"
        raise BackendUnavailable(f"the numba backend needs numba ({e}): pip install numba") from None
    from edge_awq.backends.numba.backend import DEFAULT_ACTIVATIONS
    from edge_awq.backends.numba.isa import ISA

    ops = NumbaBackend(DEFAULT_ACTIVATIONS if activations == "auto" else activations)
    return ops, f"{why}; {ops.activations} activations, integer kernels: {ISA}"


def select_backend(name: str = "auto", activations: str = "auto") -> Backend:
    """``pick_backend`` without the reason."""
    return pick_backend(name, activations)[0]
