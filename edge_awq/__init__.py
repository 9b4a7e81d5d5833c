"""edge-awq: AWQ 4-bit LLaMA-family models for edge devices.

    import edge_awq

    with edge_awq.load("model.eawq") as llm:               # plan, check, open, prepare: edge_awq.api.load
        for piece in llm.chat([{"role": "user", "content": "Hi!"}]):
            print(piece, end="", flush=True)

The device side (this package) never imports torch; the workstation side lives in ``edge_awq.offline``
(sources in the top-level ``offline/``, extra ``[offline]``). Importing ``edge_awq`` loads nothing heavy:
numba, the native library and the model load with ``load``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "Info", "TextPiece", "__version__", "load"]

if TYPE_CHECKING:
    from edge_awq.api import LLM, Info, TextPiece, load


def __getattr__(name: str):
    if name in ("load", "LLM", "Info", "TextPiece"):
        from edge_awq import api

        return getattr(api, name)
    raise AttributeError(f"module 'edge_awq' has no attribute {name!r}")
