"""compressed-tensors checkpoints (``quant_method: "compressed-tensors"``, what llm-compressor writes), read as stored.

Read: ``format: "pack-quantized"`` with 4-bit integer weights, strategy group or
channel, symmetric or asymmetric, no activation quantization. A quantized
linear holds ``weight_packed`` int32 (out, in/8), ``weight_scale`` (out, G) in
the model's float type, ``weight_shape`` and, when asymmetric,
``weight_zero_point``: packed along the output axis (out/8, G) since
compressed-tensors 0.9.4, one int8 per group before. Codes and zero points are
stored signed, offset by 8 when packed (``pack.py``); symmetric weights have
the zero point 8 in the runtime's unsigned terms.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from edge_awq.errors import FormatError
from edge_awq.pack import fit_rows, pack_bits, unpack_along_columns
from edge_awq.formats.sources.awq import SUPPORTED

log = logging.getLogger(__name__)


def _weights_of(group: dict, where: str) -> dict:
    w = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(w, dict):
        raise FormatError(f"{where}: a compressed-tensors config group without weight settings")
    checks = [
        (w.get("type", "int") == "int", f"{w.get('type')} weights"),
        (w.get("num_bits") == 4, f"{w.get('num_bits')}-bit weights"),
        (w.get("strategy") in ("group", "channel"), f"strategy {w.get('strategy')!r}"),
        (not group.get("input_activations"), "quantized activations"),
        (w.get("actorder") in (None, "static", "weight", False), f"act-order {w.get('actorder')!r} (g_idx)"),
        (not w.get("dynamic"), "dynamic weight quantization"),
    ]
    for ok, what in checks:
        if not ok:
            raise FormatError(f"{where}: compressed-tensors with {what} is not supported: edge-awq reads {SUPPORTED}")
    return w


def ct_settings(qc: dict, where: str) -> dict:
    """The quantization settings of a compressed-tensors config, checked."""
    fmt = qc.get("format")
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise FormatError(f"{where}: a compressed-tensors config without config_groups")
    weights = [_weights_of(g, where) for g in groups.values()]
    formats = {g.get("format") or fmt for g in groups.values()}
    if formats != {"pack-quantized"}:
        raise FormatError(f"{where}: compressed-tensors format {', '.join(sorted(map(str, formats)))} is not "
                          f"supported: edge-awq reads {SUPPORTED}")
    sizes = sorted({w.get("group_size") or "channel" for w in weights}, key=str)
    return {"method": "compressed-tensors", "layout": "compressed-tensors", "bits": 4,
            "group_size": sizes[0] if len(sizes) == 1 else "mixed", "group_sizes": sizes,
            "zero_point": any(not w.get("symmetric", True) for w in weights),
            "not_converted": list(qc.get("ignore") or [])}


class CompressedTensorsLayout:
    """Reads ``weight_packed``/``weight_scale``/``weight_zero_point`` into the runtime's rows (``pack.py``)."""

    def __init__(self, settings: dict, where: str):
        self.quantization = settings
        self.where = where
        self._warned = False

    def is_quantized(self, module: str, has: Callable[[str], bool]) -> bool:
        if has(f"{module}.weight_g_idx"):
            raise FormatError(f"{self.where}: {module} carries weight_g_idx (GPTQ act-order): not supported; "
                              f"edge-awq reads {SUPPORTED}")
        return has(f"{module}.weight_packed")

    def read(self, part: str, module: str, shape: tuple[int, int], get: Callable[[str], np.ndarray],
             has: Callable[[str], bool]) -> np.ndarray:
        """part "qweight" (out, words) uint32, "scales" (out, G) float16 or "zeros" (out, zero words) uint32."""
        out_f, in_f = shape
        if has(f"{module}.weight_shape"):
            stored = tuple(int(v) for v in np.asarray(get(f"{module}.weight_shape")).reshape(-1))
            if stored != shape:
                raise FormatError(f"{self.where}: {module}.weight_shape is {stored}, expected {shape} from the config")
        scale = get(f"{module}.weight_scale")
        n_groups = scale.shape[1] if scale.ndim == 2 else 0
        if scale.ndim != 2 or scale.shape[0] != out_f or n_groups == 0 or in_f % n_groups:
            raise FormatError(f"{self.where}: {module}.weight_scale has shape {tuple(scale.shape)}, which fits no "
                              f"grouping of a ({out_f}, {in_f}) weight")
        self._check_group(module, in_f, n_groups)
        if part == "scales":
            return self._scales(module, scale)
        if part == "qweight":
            t = get(f"{module}.weight_packed")
            if t.dtype != np.int32 or t.ndim != 2 or t.shape[0] != out_f or t.shape[1] * 8 < in_f:
                raise FormatError(f"{self.where}: {module}.weight_packed is {t.dtype}{tuple(t.shape)}, expected "
                                  f"int32 ({out_f}, {-(-in_f // 8)})")
            return fit_rows(t, in_f, 4)
        return pack_bits(self._zeros(module, out_f, n_groups, get, has), 4)

    def _check_group(self, module: str, in_f: int, n_groups: int) -> None:
        sizes = self.quantization["group_sizes"]
        got = "channel" if n_groups == 1 and "channel" in sizes else in_f // n_groups
        if got not in sizes:
            raise FormatError(f"{self.where}: {module}.weight_scale gives groups of {in_f // n_groups} but the "
                              f"quantization_config says {', '.join(map(str, sizes))}: the config does not match "
                              "the tensors")

    def _scales(self, module: str, scale: np.ndarray) -> np.ndarray:
        half = np.asarray(scale).astype(np.float16)
        if scale.dtype != np.float16 and not self._warned:
            exact = np.array_equal(half.astype(np.float32), np.asarray(scale, np.float32))
            if not exact:  # float32 scales, or bfloat16 ones below float16's normal range
                rel = np.max(np.abs(half.astype(np.float64) / np.asarray(scale, np.float64) - 1))
                log.warning("%s: scales are rounded to float16, the precision the kernels read "
                            "(largest relative change %.2g, first in %s)", self.where, rel, module)
                self._warned = True
        return half

    def _zeros(self, module: str, out_f: int, n_groups: int, get, has) -> np.ndarray:
        """Unsigned zero points (out, G) uint8."""
        if not has(f"{module}.weight_zero_point"):
            return np.full((out_f, n_groups), 8, np.uint8)  # symmetric: codes are signed values plus 8
        zp = get(f"{module}.weight_zero_point")
        packed_rows = -(-out_f // 8)
        if zp.dtype == np.int32 and zp.shape == (packed_rows, n_groups) and packed_rows != out_f:
            return unpack_along_columns(zp, 4, out_f)  # packed, as 0.9.4 and later write it (offset included)
        if zp.shape == (out_f, n_groups) and zp.dtype in (np.int8, np.int32, np.int64, np.int16):
            if zp.dtype == np.int32 and packed_rows == out_f:
                raise FormatError(f"{self.where}: {module}.weight_zero_point cannot be told packed from unpacked "
                                  f"for {out_f} rows: edge-awq reads it as packed only when rows differ")
            z = np.asarray(zp, np.int64) + 8  # the older, unpacked form: signed values
            if z.min() < 0 or z.max() > 15:
                raise FormatError(f"{self.where}: {module}.weight_zero_point holds values outside 4 bits")
            return z.astype(np.uint8)
        raise FormatError(f"{self.where}: {module}.weight_zero_point is {zp.dtype}{tuple(zp.shape)}, expected int32 "
                          f"({packed_rows}, {n_groups}) packed or int8 ({out_f}, {n_groups})")
