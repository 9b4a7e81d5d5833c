"""A checking, memory-mapped reader of safetensors files.

Opening reads only the JSON header; a tensor's bytes are touched when it is
asked for. Used for Hugging Face checkpoints and for ``.eawq`` files. bfloat16,
which numpy lacks, is widened to float32 on read.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_awq.errors import FormatError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
MAX_HEADER = 100 * 2**20  # the safetensors format caps headers at 100 MB


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype name, e.g. "F16"
    shape: tuple[int, ...]
    begin: int  # byte offset from the start of the file
    end: int


def _read_header(path: Path) -> tuple[dict, int, int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: truncated: {size} bytes is too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise FormatError(f"{path}: truncated or not safetensors: header of {n} bytes in a {size}-byte file")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return json.loads(raw), 8 + n, size
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{path}: corrupt safetensors header (not JSON)") from None


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo]) -> None:
    """Tensors' byte ranges must not overlap (each tensor its own bytes)."""
    spans = sorted((t.begin, t.end, name) for name, t in tensors.items() if t.end > t.begin)
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FormatError(f"{path}: corrupt header: tensors {n0!r} and {n1!r} overlap (bytes {b1}..{e0})")


def release_pages(mm) -> None:
    """madvise(DONTNEED) over a read-only np.memmap: its pages leave the resident set, the data stays valid."""
    import mmap

    raw = getattr(mm, "_mmap", None)
    if raw is not None and hasattr(mmap, "MADV_DONTNEED"):
        raw.madvise(mmap.MADV_DONTNEED)


def release_array(a: np.ndarray) -> None:
    """Drop this process's resident pages under a if it lies in a read-only np.memmap (the whole pages
    inside it; the data stays valid, read again from the file if used). Other arrays: nothing."""
    import mmap

    base = a
    while isinstance(base, np.ndarray) and not isinstance(base.base, mmap.mmap):
        base = base.base
    if not (isinstance(base, np.memmap) and base.mode == "r" and hasattr(mmap, "MADV_DONTNEED")):
        return
    start = a.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (start + a.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > first:
        base.base.madvise(mmap.MADV_DONTNEED, first, end - first)


class SafetensorsFile:
    """Header-checked view of one safetensors file; tensors are memory-mapped on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header, data_start, size = _read_header(self.path)
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise FormatError(f"{self.path}: corrupt safetensors header (__metadata__ must map names to strings)")
        self.metadata: dict[str, str] = meta
        self.entries: dict = header  # the tensor table as stored (what a header checksum covers)
        self.tensors: dict[str, TensorInfo] = {}
        for name, h in header.items():
            self.tensors[name] = self._check(name, h, data_start, size)
        _check_no_overlap(self.path, self.tensors)
        self._mm: np.memmap | None = None

    def _check(self, name: str, h: dict, data_start: int, size: int) -> TensorInfo:
        try:
            dtype, shape, (b, e) = h["dtype"], h["shape"], h["data_offsets"]
            ints = [*shape, b, e]
            if not all(type(v) is int and v >= 0 for v in ints):  # no floats, strings, bools or negatives
                raise ValueError
            shape = tuple(shape)
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{self.path}: corrupt header entry for tensor {name!r} (dtype, shape and "
                              "data_offsets must be a type name and non-negative integers)") from None
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise FormatError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype!r}")
        nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        if e < b or e - b != nbytes:
            raise FormatError(f"{self.path}: tensor {name!r} spans {e - b} bytes but shape {shape} needs {nbytes}")
        if data_start + e > size:
            raise FormatError(
                f"{self.path}: truncated: tensor {name!r} ends at byte {data_start + e} "
                f"but the file has {size} bytes; copy or download it again"
            )
        return TensorInfo(dtype, shape, data_start + b, data_start + e)

    def _map(self) -> np.memmap:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm

    def release(self) -> None:
        """Drop this process's resident pages of the mapping (they are read again from the file if used)."""
        release_pages(self._mm)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored, a read-only memory-mapped uint8 view."""
        t = self.tensors[name]
        return self._map()[t.begin : t.end]

    def get(self, name: str) -> np.ndarray:
        """The tensor, memory-mapped (bfloat16 is widened to a float32 copy)."""
        t = self.tensors[name]
        if t.begin == t.end:
            return np.zeros(t.shape, DTYPES[t.dtype])
        a = self.raw(name).view(DTYPES[t.dtype]).reshape(t.shape)
        if t.dtype == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a
