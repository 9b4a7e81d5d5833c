"""edge-awq: AWQ 4-bit LLaMA-family models for edge devices.

The device side (this package) never imports torch; the workstation side lives
in ``edge_awq.offline`` (sources in the top-level ``offline/``).
"""

__version__ = "0.1.0"
