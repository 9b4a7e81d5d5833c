"""The ``.eawq`` file: a safetensors container of packed weights, tokenizer and metadata.

Tensors (canonical names as in ``edge_awq.formats.sources``):
    tok_embeddings, norm, output (untied only)      float16
    rope_inv_freq                                   float32 (head_dim/2,)
    layers.{i}.attn_norm, layers.{i}.ffn_norm       float16
    layers.{i}.{wq..w3}.qweight|scales|zeros        uint32 (out, words), float16 (out, G), uint32 (words,)
                                                    (layout: pack.py; version 1 stored zeros (out, words))
    layers.{i}.{wq,wk,wv}.bias                      float32 (qwen2)
    tokenizer                                       uint8: tokenizer.json or sentencepiece model bytes
Metadata (JSON strings): format, version, layout, model_args, quantization,
source, tokenizer, checksums (sha256 of every tensor's bytes).

The writer streams tensors in a fixed order into a temporary file beside the
target, fills in the header (padded with spaces, as safetensors allows) at
the end, fsyncs and renames: a reader never sees a partial file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from pathlib import Path

import numpy as np

from edge_awq import schema
from edge_awq.formats import atomic, integrity
from edge_awq.config import ModelArgs
from edge_awq.errors import FormatError, InputError
from edge_awq.formats.tensorfile import SafetensorsFile
from edge_awq.formats.tokenizer import Tokenizer

FORMAT = "edge-awq"
VERSION = 2  # 2: zero points stored as one stream per tensor (pack.pack_zeros_flat); 1 still reads
READS = {1: "bits-le-v1", 2: "bits-le-v2"}  # version -> the packing layout it carries
ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint32): "U32",
             np.dtype(np.uint8): "U8"}


class EawqWriter:
    """Write a ``.eawq`` file atomically, tensors given one at a time in the order of ``specs``.

    specs: [(name, numpy dtype, shape)] of every tensor, known before the first is written.
    """

    def __init__(self, path: str | Path, specs: list[tuple[str, object, tuple[int, ...]]], meta_reserve: int = 1 << 20):
        self.path = Path(path)
        self._entries, off = {}, 0
        for name, dtype, shape in specs:
            n = math.prod(shape) * np.dtype(dtype).itemsize
            self._entries[name] = {"dtype": ST_DTYPES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        self._order = [name for name, _, _ in specs]
        self._next = 0
        self._sums: dict[str, str] = {}
        self._header_len = len(json.dumps(self._entries)) + 100 * len(specs) + meta_reserve
        self._header_len += -self._header_len % 8  # keep tensor data 8-byte aligned
        atomic.check_output(self.path, directory=False)
        atomic.sweep_stale(self.path)
        self._tmp = atomic.temporary(self.path)
        try:
            self._f = open(self._tmp, "wb")
        except OSError as e:
            atomic.release(self._tmp)
            raise InputError(f"cannot write {self.path}: {e.strerror}; choose another output path") from None
        try:
            self._write(b"\0" * (8 + self._header_len))
        except BaseException:  # not yet inside a with-block: nothing else would remove it
            self.abort()
            raise

    def _write(self, data) -> None:
        try:
            self._f.write(data)
        except OSError as e:  # a full disk, a file-size limit: the caller's exit removes the temporary
            raise atomic.write_error(self.path, e) from None

    def add(self, name: str, array: np.ndarray) -> None:
        want = self._order[self._next] if self._next < len(self._order) else None
        e = self._entries.get(name)
        if name != want or e is None or list(array.shape) != e["shape"] or ST_DTYPES.get(array.dtype) != e["dtype"]:
            raise ValueError(f"tensor {name} {array.dtype}{list(array.shape)} out of order or shape (expected {want}: {e})")
        data = np.ascontiguousarray(array)
        self._write(memoryview(data).cast("B"))
        self._sums[name] = integrity.digest(data)
        self._next += 1

    def close(self, metadata: dict) -> Path:
        """Write the header with metadata (values JSON-encoded) and checksums, then publish the file."""
        if self._next != len(self._order):
            raise ValueError(f"{len(self._order) - self._next} tensors were not written (next: {self._order[self._next]})")
        meta = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
        meta.update(format=FORMAT, version=str(VERSION), hash=integrity.HASH,
                    checksums=json.dumps(self._sums, sort_keys=True))
        meta["header_checksum"] = integrity.header_digest(meta, self._entries)
        header = json.dumps({"__metadata__": meta, **self._entries}, separators=(",", ":")).encode()
        if len(header) > self._header_len:
            raise ValueError(f"metadata of {len(header)} bytes exceeds the {self._header_len} reserved")
        try:
            self._f.seek(0)
            self._f.write(struct.pack("<Q", self._header_len) + header.ljust(self._header_len, b" "))
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        except OSError as e:
            raise atomic.write_error(self.path, e) from None
        os.replace(self._tmp, self.path)
        atomic.release(self._tmp)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file (on error or interrupt); a close that fails again (a full disk) changes nothing."""
        try:
            self._f.close()
        except OSError:
            pass
        atomic.remove(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def _json_field(path: Path, meta: dict, key: str):
    if key not in meta:
        raise FormatError(f"{path}: metadata lacks {key!r}: not a complete edge-awq file")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError:
        raise FormatError(f"{path}: metadata {key!r} is not valid JSON") from None


def _checked_field(path: Path, meta: dict, key: str, model) -> dict:
    """A metadata field parsed and checked against its schema (``schema.py``), as a plain dict."""
    value = _json_field(path, meta, key)
    checked = schema.validated(model, value, f"{path}: metadata {key}", FormatError)
    return value if isinstance(checked, schema.StoredChecksums) else checked.model_dump()


class EawqSource:
    """A ``.eawq`` file read as a model source (checked header; tensors memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = SafetensorsFile(self.path)
        meta = self.file.metadata
        if meta.get("format") != FORMAT:
            raise FormatError(f"{self.path}: not an edge-awq file (format {meta.get('format')!r})")
        version = {str(v): v for v in READS}.get(meta.get("version"))
        if version is None:
            raise FormatError(f"{self.path}: version {meta.get('version')} unsupported (this edge-awq reads "
                              f"{', '.join(map(str, READS))}); re-export it with this edge-awq")
        if meta.get("layout") != READS[version]:
            raise FormatError(f"{self.path}: packing layout {meta.get('layout')!r} unsupported in version {version} "
                              f"(expected {READS[version]})")
        self.version = version
        self.hash = "sha256" if version == 1 else meta.get("hash")
        if version >= 2:
            if self.hash != integrity.HASH:
                raise FormatError(f"{self.path}: checksum kind {self.hash!r} unknown (expected {integrity.HASH})")
            if meta.get("header_checksum") != integrity.header_digest(meta, self.file.entries):
                raise FormatError(f"{self.path}: the header (metadata and tensor table) does not match its checksum: "
                                  "the file is damaged; copy or export it again")
        self.args = ModelArgs.from_dict(_json_field(self.path, meta, "model_args"), f"{self.path}: model_args")
        self.quantization = _checked_field(self.path, meta, "quantization", schema.StoredQuantization)
        source = _json_field(self.path, meta, "source")
        self.source_info = source if isinstance(source, dict) else {}
        self.checksums = _checked_field(self.path, meta, "checksums", schema.StoredChecksums)
        self._tok_fields = _checked_field(self.path, meta, "tokenizer", schema.StoredTokenizer)

    def has(self, key: str) -> bool:
        return key in self.file.tensors

    def release(self) -> None:
        self.file.release()

    def get(self, key: str) -> np.ndarray:
        if key not in self.file.tensors:
            raise FormatError(f"{self.path}: tensor {key} is missing")
        return self.file.get(key)

    def tokenizer(self) -> Tokenizer:
        try:
            return Tokenizer.deserialize(self.get("tokenizer").tobytes(), self._tok_fields)
        except Exception as e:  # the tokenizer libraries raise bare exceptions on bytes they cannot read
            raise FormatError(f"{self.path}: the stored tokenizer does not load ({type(e).__name__}: "
                              f"{str(e)[:80]}); export the file again") from None

    def rope_inv_freq(self) -> np.ndarray:
        return np.asarray(self.get("rope_inv_freq"), dtype=np.float32)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.file.metadata["checksums"].encode()).hexdigest()[:16]

    def generation_defaults(self) -> dict:
        """The model's recommended sampling, carried from its source's generation config ({} when none)."""
        from edge_awq.formats.sources.hf import generation_defaults

        raw = self.file.metadata.get("generation")
        try:
            return generation_defaults(json.loads(raw)) if raw else {}
        except json.JSONDecodeError:
            raise FormatError(f"{self.path}: metadata 'generation' is not valid JSON") from None

    def tensor_bytes(self) -> dict[str, int]:
        """Tensor name -> bytes, as stored (the tokenizer excluded)."""
        return {n: t.end - t.begin for n, t in self.file.tensors.items() if n != "tokenizer"}

    def verify(self) -> list[str]:
        """Names of tensors whose bytes do not match their checksum (or that lack one), and of checksums
        whose tensor is missing."""
        return integrity.bad_tensors(self)


LINEAR_STORAGE = re.compile(  # a decoder linear's stored parts, by canonical or Hugging Face name
    r"^(model\.)?layers\.\d+\.((self_attn|mlp)\.)?(wq|wk|wv|wo|w1|w2|w3|[qkvo]_proj|gate_proj|up_proj|down_proj)\."
    r"(qweight|scales|zeros|qzeros|weight|weight_packed|weight_scale|weight_zero_point)$")


def stored_bits_per_weight(nbytes: dict[str, int], a: ModelArgs) -> float:
    """Bits per decoder weight counted from the bytes stored: every decoder linear's packed codes, scales and
    zero points (padding included), or its float weight, over the decoder's matrix weights.
    nbytes: tensor name -> bytes as stored (an .eawq file's or a Hugging Face directory's names)."""
    stored = sum(v for k, v in nbytes.items() if LINEAR_STORAGE.match(k))
    return 8 * stored / a.linear_params


HEAD_BITS = {"int8": 8, "w4": 4}  # packed output heads; "fp16" keeps the float16 table
HEAD_ROWS = 8192  # rows of the head quantized at a time (bounded memory for large vocabularies)


def packed_head_arrays(weight, bits: int, group_size: int) -> dict[str, np.ndarray]:
    """The output head (vocab, dim) packed by round to nearest, HEAD_ROWS rows at a time: its file tensors."""
    import dataclasses

    from edge_awq.pack import pack_linear

    parts = [pack_linear(np.asarray(weight[r : r + HEAD_ROWS], np.float32), bits, group_size)
             for r in range(0, weight.shape[0], HEAD_ROWS)]
    head = dataclasses.replace(parts[0], **{f: np.concatenate([getattr(p, f) for p in parts])
                                            for f in ("qweight", "scales", "zeros")})
    return linear_arrays("output", head)  # packed output heads; "fp16" keeps the float16 table


def linear_specs(name: str, out_f: int, in_f: int, bits: int, group_size: int,
                 bias: bool = False) -> list[tuple[str, object, tuple[int, ...]]]:
    """The file tensors of one packed linear (out, in): qweight, scales, zero points as one stream, bias."""
    from edge_awq.pack import packed_words

    n_groups = in_f // group_size
    specs = [(f"{name}.qweight", np.uint32, (out_f, packed_words(in_f, bits))),
             (f"{name}.scales", np.float16, (out_f, n_groups)),
             (f"{name}.zeros", np.uint32, (packed_words(out_f * n_groups, bits),))]
    return specs + ([(f"{name}.bias", np.float32, (out_f,))] if bias else [])


def float_linear_specs(name: str, out_f: int, in_f: int, bias: bool = False) -> list[tuple[str, object, tuple]]:
    """The file tensors of a linear kept in float: its float16 weight and float32 bias."""
    return [(f"{name}.weight", np.float16, (out_f, in_f))] + ([(f"{name}.bias", np.float32, (out_f,))] if bias else [])


def linear_arrays(name: str, w) -> dict[str, np.ndarray]:
    """A linear as the file's tensors: a packed ``model.W4`` as ``linear_specs`` names them, a ``Dense`` one
    as ``float_linear_specs`` does."""
    from edge_awq.pack import pack_zeros_flat, unpack_bits

    if not hasattr(w, "qweight"):
        out = {f"{name}.weight": np.asarray(w.weight, np.float16)}
        return out if w.bias is None else {**out, f"{name}.bias": np.asarray(w.bias, np.float32)}
    zeros = unpack_bits(w.zeros, w.bits, w.in_features // w.group_size)  # (out, G)
    out = {f"{name}.qweight": w.qweight, f"{name}.scales": np.asarray(w.scales, np.float16),
           f"{name}.zeros": pack_zeros_flat(zeros, w.bits)}
    if w.bias is not None:
        out[f"{name}.bias"] = np.asarray(w.bias, np.float32)
    return out


def tensor_specs(a: ModelArgs, bits: int, group_for, tokenizer_nbytes: int,
                 head: str = "fp16", linear=None) -> list[tuple[str, object, tuple[int, ...]]]:
    """Every tensor of an .eawq file in write order: (name, dtype, shape).

    group_for(in_features) -> the group size used for a linear of that input width.
    linear(prefix, out_f, in_f, bias) -> the specs of one decoder linear, where they are not all packed at
    ``bits`` (a converted checkpoint's linears kept in float: ``float_linear_specs``).
    head: "fp16" (the embedding table when tied), or "int8"/"w4": an output head
    packed at 8 or 4 bits in groups of group_for(dim), tied or not (the fp16
    embedding table stays for the gather).
    """
    from edge_awq.config import expected_shapes
    from edge_awq.model import LINEARS

    specs = [("tokenizer", np.uint8, (tokenizer_nbytes,)), ("rope_inv_freq", np.float32, (a.head_dim // 2,)),
             ("tok_embeddings", np.float16, (a.vocab_size, a.dim))]
    shapes = expected_shapes(a)
    for i in range(a.n_layers):
        specs += [(f"layers.{i}.{n}", np.float16, (a.dim,)) for n in ("attn_norm", "ffn_norm")]
        for n in LINEARS:
            out_f, in_f = shapes[n]
            bias = a.qkv_bias and n in ("wq", "wk", "wv")
            if linear is not None:
                specs += linear(f"layers.{i}.{n}", out_f, in_f, bias)
            else:
                specs += linear_specs(f"layers.{i}.{n}", out_f, in_f, bits, group_for(in_f), bias)
    specs.append(("norm", np.float16, (a.dim,)))
    if head in HEAD_BITS:
        specs += linear_specs("output", a.vocab_size, a.dim, HEAD_BITS[head], group_for(a.dim))
    elif not a.tied_embeddings:
        specs.append(("output", np.float16, (a.vocab_size, a.dim)))
    return specs
