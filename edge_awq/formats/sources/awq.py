"""AutoAWQ checkpoints (``quant_method: "awq"``): the GEMM and GEMV layouts, read as stored.

A Hugging Face directory whose ``config.json`` carries ``quantization_config``
(or, from older AutoAWQ, a ``quant_config.json`` beside it) with
``quant_method: "awq"``. Each quantized linear holds ``qweight``, ``qzeros``
and ``scales`` (layouts in ``edge_awq.pack``); linears named in
``modules_to_not_convert`` keep a float ``weight``. The integers, scales and
zero points are used as stored: only their bit order changes on the way to
the runtime's rows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edge_awq.errors import FormatError
from edge_awq.pack import fit_rows, pack_bits, unpack_awq_gemm

VERSIONS = ("gemm", "gemv")
REFUSED = {"gemv_fast": "AutoAWQ's GEMV-fast (TinyChat's interleaved layout)",
           "exllama": "the ExLlama layout", "exllamav2": "the ExLlamaV2 layout", "marlin": "the Marlin layout",
           "ipex": "the IPEX layout"}
SUPPORTED = "AWQ GEMM or GEMV at 4 bits with zero points, or compressed-tensors pack-quantized at 4 bits"


def awq_settings(qc: dict, where: str) -> dict:
    """The quantization settings of an AWQ config (transformers' keys, or quant_config.json's), checked."""
    version = str(qc.get("version", "gemm")).lower()
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size"))
    if version in REFUSED:
        raise FormatError(f"{where}: AWQ version {version!r} ({REFUSED[version]}) is not supported: edge-awq reads "
                          f"{SUPPORTED}; convert it with AutoAWQ to the GEMM layout")
    if version not in VERSIONS:
        raise FormatError(f"{where}: unknown AWQ version {version!r}: edge-awq reads {SUPPORTED}")
    if bits != 4:
        raise FormatError(f"{where}: AWQ with {bits}-bit weights is not supported: edge-awq reads {SUPPORTED}")
    if qc.get("zero_point", True) is False:
        raise FormatError(f"{where}: AWQ without zero points is not supported: edge-awq reads {SUPPORTED}")
    if not isinstance(group, int) or (group <= 0 and group != -1):
        raise FormatError(f"{where}: AWQ group_size {group!r} is not a positive integer (or -1 for one per row)")
    return {"method": "awq", "layout": f"awq-{version}", "bits": 4, "group_size": "channel" if group == -1 else group,
            "zero_point": True, "not_converted": list(qc.get("modules_to_not_convert") or [])}


class AwqLayout:
    """Reads ``qweight``/``qzeros``/``scales`` of one AWQ version into the runtime's rows (``pack.py``)."""

    def __init__(self, settings: dict, where: str):
        self.quantization = settings
        self.version = settings["layout"].split("-", 1)[1]
        self.where = where

    def is_quantized(self, module: str, has: Callable[[str], bool]) -> bool:
        return has(f"{module}.qweight")

    def groups(self, in_f: int) -> int:
        gs = self.quantization["group_size"]
        if gs != "channel" and in_f % gs:
            raise FormatError(f"{self.where}: group_size {gs} does not divide {in_f}, the input width of a "
                              "quantized linear: the quantization_config does not match the tensors")
        return 1 if gs == "channel" else in_f // gs

    def read(self, part: str, module: str, shape: tuple[int, int], get: Callable[[str], np.ndarray],
             has: Callable[[str], bool]) -> np.ndarray:
        """part "qweight" (out, words) uint32, "scales" (out, G) float16 or "zeros" (out, zero words) uint32."""
        out_f, in_f = shape
        n_groups = self.groups(in_f)
        name = {"qweight": "qweight", "scales": "scales", "zeros": "qzeros"}[part]
        t = get(f"{module}.{name}")
        gemm = self.version == "gemm"
        if part == "scales":
            want = (n_groups, out_f) if gemm else (out_f, None)
            self._check(module, name, t, want, n_groups if not gemm else None)
            return np.ascontiguousarray(t.T if gemm else t[:, :n_groups], dtype=np.float16)
        if t.dtype != np.int32:
            raise FormatError(f"{self.where}: {module}.{name} is {t.dtype}, expected int32 (packed 4-bit values)")
        n = in_f if part == "qweight" else n_groups
        if gemm:
            self._check(module, name, t, (n, out_f // 8))
            return pack_bits(unpack_awq_gemm(t), 4)  # (out, n): the transposed, reordered words as rows
        self._check(module, name, t, (out_f, None), -(-n // 8))
        return fit_rows(t, n, 4)

    def _check(self, module: str, name: str, t: np.ndarray, want: tuple, min_cols: int | None = None) -> None:
        rows, cols = want
        ok = t.ndim == 2 and t.shape[0] == rows and (t.shape[1] == cols if cols is not None else t.shape[1] >= min_cols)
        if not ok:
            shown = tuple(c if c is not None else f">={min_cols}" for c in want)
            raise FormatError(f"{self.where}: {module}.{name} has shape {tuple(t.shape)}, expected {shown} for AWQ "
                              f"{self.version.upper()} at group size {self.quantization['group_size']}: the "
                              "quantization_config does not match the tensors")
