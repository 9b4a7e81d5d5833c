"""The workstation side of edge-awq: calibration, AWQ search and export (torch allowed here).

Installed as ``edge_awq.offline`` by the ``[offline]`` extra; the device side (``edge_awq``) never imports it.

    from edge_awq.offline import quantize
    quantize("model-dir", "calib.txt", "model.eawq", group_size=64)   # edge-awq export, as a function
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_awq.offline.export import quantize

__all__ = ["quantize"]


def __getattr__(name: str):
    if name == "quantize":  # torch is imported when a model is quantized, not with the package
        from edge_awq.offline.export import quantize

        return quantize
    raise AttributeError(f"module 'edge_awq.offline' has no attribute {name!r}")
