"""Write a Hugging Face model directory, atomically: config, generation config, tokenizer files, shards.

What AutoAWQ and llm-compressor write, so that transformers and vLLM load it:
``config.json`` (with the ``quantization_config`` of the layout), ``generation_config.json``,
safetensors shards of at most ``max_shard_bytes`` with ``model.safetensors.index.json`` when
there are several, ``tokenizer.json`` (or sentencepiece's ``tokenizer.model``) and
``tokenizer_config.json`` with the chat template. Everything goes into a temporary directory
beside the target, is fsynced, and is renamed into place at the end: an error or Ctrl-C
leaves no half-written directory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from edge_awq.formats import atomic
from edge_awq.errors import InputError
from edge_awq.formats.tokenizer import Tokenizer

MAX_SHARD_BYTES = 5 * 10**9  # transformers' and AutoAWQ's default: "5GB"
ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
             np.dtype(np.int64): "I64", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8"}



def tokenizer_files(tok: Tokenizer, max_len: int) -> dict[str, bytes]:
    """The tokenizer as Hugging Face files: tokenizer.json or tokenizer.model, and tokenizer_config.json."""
    data, fields = tok.serialize()
    spm = fields["kind"] == "sentencepiece"
    cfg = {"bos_token": tok.bos_token or None, "eos_token": tok.eos_token or None, "add_bos_token": tok.add_bos,
           "add_eos_token": False, "model_max_length": max_len, "clean_up_tokenization_spaces": False,
           "tokenizer_class": "LlamaTokenizer" if spm else "PreTrainedTokenizerFast"}
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    return {"tokenizer.model" if spm else "tokenizer.json": data,
            "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False).encode()}


def generation_config(tok: Tokenizer, sampling: dict | None = None) -> dict:
    """generation_config.json: special tokens, and the model's recommended sampling where it has one."""
    eos = list(tok.eos_ids)
    sampling = dict(sampling or {})
    if sampling:
        sampling["do_sample"] = sampling.get("temperature", 1.0) > 0
    return {"bos_token_id": tok.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos, **sampling,
            "transformers_version": "4.46.0"}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HFDirWriter:
    """Write a directory atomically: files and tensors into a temporary directory, renamed at ``close``.

    specs: [(name, numpy dtype, shape)] of every tensor in the order ``add`` will get them. Shards are
    cut from the sizes before any is written, and each tensor is streamed into its shard as it comes
    (safetensors header first): no tensor is held longer than its own write.
    """

    def __init__(self, path: str | Path, specs: list[tuple[str, object, tuple[int, ...]]],
                 max_shard_bytes: int = MAX_SHARD_BYTES):
        self.path = Path(path)
        atomic.check_output(self.path, directory=True)
        atomic.sweep_stale(self.path)
        self._tmp = atomic.temporary(self.path)
        try:
            self._tmp.mkdir(parents=False)
        except OSError as e:
            atomic.release(self._tmp)
            raise InputError(f"cannot write {self.path}: {e.strerror}; choose another output path") from None
        self._specs = [(name, np.dtype(dt), tuple(int(d) for d in shape)) for name, dt, shape in specs]
        self._shards = _cut(self._specs, max_shard_bytes)
        self._shard_of = {spec[0]: k for k, shard in enumerate(self._shards) for spec in shard}
        self._order = [name for name, _, _ in self._specs]
        self._next = 0
        self._file = None
        self._shard = -1
        self._weight_map: dict[str, str] = {}
        self._total = sum(int(dt.itemsize * np.prod(shape)) for _, dt, shape in self._specs)

    def write_file(self, name: str, data: bytes | str | dict) -> None:
        """A small file (JSON for a dict) in the directory."""
        if isinstance(data, dict):
            data = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        try:
            (self._tmp / name).write_bytes(data.encode() if isinstance(data, str) else data)
        except OSError as e:
            raise atomic.write_error(self.path, e) from None

    def _shard_name(self, k: int) -> str:
        n = len(self._shards)
        return "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"

    def _open_shard(self, k: int) -> None:
        if self._file is not None:
            self._file.close()
        entries, off = {}, 0
        for name, dt, shape in self._shards[k]:
            n = int(dt.itemsize * np.prod(shape))
            entries[name] = {"dtype": ST_DTYPES[dt], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            self._weight_map[name] = self._shard_name(k)
        header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # tensor data 8-byte aligned
        self._file = open(self._tmp / self._shard_name(k), "wb")
        self._write(struct.pack("<Q", len(header)) + header)
        self._shard = k

    def _write(self, data) -> None:
        try:
            self._file.write(data)
        except OSError as e:
            raise atomic.write_error(self.path, e) from None

    def add(self, name: str, array: np.ndarray) -> None:
        """The next tensor, in the order of the specs."""
        want, dt, shape = self._specs[self._next] if self._next < len(self._specs) else (None, None, None)
        if name != want or array.dtype != dt or tuple(array.shape) != shape:
            raise ValueError(f"tensor {name} {array.dtype}{list(array.shape)} out of order or shape "
                             f"(expected {want} {dt}{list(shape or ())})")
        k = self._shard_of[name]
        if k != self._shard:
            self._open_shard(k)
        self._write(memoryview(np.ascontiguousarray(array)).cast("B"))
        self._next += 1

    def close(self) -> Path:
        """Write the index (several shards), fsync everything and publish the directory."""
        if self._next != len(self._order):
            raise ValueError(f"{len(self._order) - self._next} tensors were not written (next: {self._order[self._next]})")
        try:
            if self._file is not None:
                self._file.close()
            if len(self._shards) > 1:
                self.write_file("model.safetensors.index.json", {"metadata": {"total_size": self._total},
                                                                  "weight_map": dict(sorted(self._weight_map.items()))})
            for f in self._tmp.iterdir():
                _fsync(f)
            _fsync(self._tmp)
        except OSError as e:
            raise atomic.write_error(self.path, e) from None
        os.replace(self._tmp, self.path)
        atomic.release(self._tmp)
        _fsync(self.path.parent)
        return self.path

    def abort(self) -> None:
        try:
            if self._file is not None:
                self._file.close()
        except OSError:  # the disk is still full: the directory goes all the same
            pass
        atomic.remove(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def _cut(specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]], max_bytes: int) -> list[list[tuple]]:
    """Specs in order, cut into shards of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for spec in specs:
        n = int(spec[1].itemsize * np.prod(spec[2]))
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards
