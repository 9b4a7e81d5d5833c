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
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .errors import InputError
from .tokenizer import Tokenizer

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


def generation_config(tok: Tokenizer) -> dict:
    eos = list(tok.eos_ids)
    return {"bos_token_id": tok.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "transformers_version": "4.46.0"}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HFDirWriter:
    """Write a directory atomically: files and tensors into a temporary directory, renamed at ``close``.

    Tensors are added one at a time in a known order with known sizes (``plan``), so shards are cut
    before any is written and no tensor is held longer than its own write.
    """

    def __init__(self, path: str | Path, specs: list[tuple[str, np.dtype, tuple[int, ...]]],
                 max_shard_bytes: int = MAX_SHARD_BYTES):
        self.path = Path(path)
        if self.path.exists():
            raise InputError(f"{self.path}: already exists; remove it or choose another output directory")
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            self._tmp.mkdir(parents=False)
        except OSError as e:
            raise InputError(f"cannot write {self.path}: {e.strerror}; choose another output path") from None
        self._shards = _cut(specs, max_shard_bytes)
        self._specs = {name: (np.dtype(dt), tuple(shape)) for name, dt, shape in specs}
        self._pending: dict[str, np.ndarray] = {}
        self._next_shard = 0
        self._weight_map: dict[str, str] = {}
        self._total = 0

    def write_file(self, name: str, data: bytes | str | dict) -> None:
        """A small file (JSON for a dict) in the directory."""
        if isinstance(data, dict):
            data = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        (self._tmp / name).write_bytes(data.encode() if isinstance(data, str) else data)

    def add(self, name: str, array: np.ndarray) -> None:
        """One tensor; a shard is written as soon as all its tensors are in."""
        dtype, shape = self._specs[name]
        if array.dtype != dtype or tuple(array.shape) != shape:
            raise ValueError(f"tensor {name} {array.dtype}{list(array.shape)}: expected {dtype}{list(shape)}")
        self._pending[name] = array
        while self._next_shard < len(self._shards) and all(n in self._pending for n in self._shards[self._next_shard]):
            self._write_shard(self._next_shard)
            self._next_shard += 1

    def _shard_name(self, k: int) -> str:
        n = len(self._shards)
        return "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"

    def _write_shard(self, k: int) -> None:
        from safetensors.numpy import save_file

        names = self._shards[k]
        tensors = {n: np.ascontiguousarray(self._pending.pop(n)) for n in names}
        fname = self._shard_name(k)
        save_file(tensors, str(self._tmp / fname), metadata={"format": "pt"})
        self._weight_map.update({n: fname for n in names})
        self._total += sum(t.nbytes for t in tensors.values())

    def close(self) -> Path:
        """Write the index (several shards), fsync everything and publish the directory."""
        if self._next_shard != len(self._shards):
            missing = [n for n in self._shards[self._next_shard] if n not in self._pending]
            raise ValueError(f"{len(missing)} tensors were not written (first: {missing[0]})")
        if len(self._shards) > 1:
            self.write_file("model.safetensors.index.json",
                            {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(self._weight_map.items()))})
        for f in self._tmp.iterdir():
            _fsync(f)
        _fsync(self._tmp)
        os.replace(self._tmp, self.path)
        _fsync(self.path.parent)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def _cut(specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]], max_bytes: int) -> list[list[str]]:
    """Tensor names in order, cut into shards of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for name, dt, shape in specs:
        n = int(np.dtype(dt).itemsize * np.prod(shape))
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards
