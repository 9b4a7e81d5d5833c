"""A llama2.c checkpoint (``.bin``): the legacy headerless layout and version 1 (fp32).

Legacy: seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len; a negative vocab_size means an unshared classifier), then float32
tensors in a fixed order, with RoPE tables between the final norm and the
classifier. Version 1: magic "ak42", version, the seven int32, a shared-head
byte, padded to 256 bytes, then the same tensors without the RoPE tables.
Weights are stored in Meta's layout, with RoPE pairs interleaved: Q and K rows
are reordered to Hugging Face's as they are read (``sources.to_rotate_half``).
"""

from __future__ import annotations

import hashlib
import math
import struct
from pathlib import Path

import numpy as np

from edge_awq.config import ModelArgs, expected_shapes
from edge_awq.errors import FormatError
from edge_awq.formats.tokenizer import Tokenizer, from_llama2c_bin, from_sentencepiece
from edge_awq.formats.sources import to_rotate_half

MAGIC = 0x616B3432  # "ak42"


def _header(path: Path, size: int) -> tuple[list[int], bool, int, bool]:
    """(seven ints, shared classifier, data offset, legacy layout)."""
    with open(path, "rb") as f:
        head = f.read(256)
    if len(head) < 28:
        raise FormatError(f"{path}: truncated: {size} bytes is too short for a llama2.c checkpoint")
    magic, version = struct.unpack_from("<Ii", head)
    if magic == MAGIC:
        if version != 1:
            raise FormatError(f"{path}: llama2.c checkpoint version {version} unsupported (expected 0 or 1, fp32)")
        ints = list(struct.unpack_from("<7i", head, 8))
        return ints, bool(head[36]), 256, False
    ints = list(struct.unpack_from("<7i", head))
    return [abs(i) for i in ints], ints[5] > 0, 28, True


class Llama2cSource:
    def __init__(self, path: Path, tokenizer_path: Path | None = None):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            ints, shared, offset, legacy = _header(self.path, size)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot read: {e.strerror}") from None
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = ints
        if min(ints) <= 0 or dim % n_heads:
            raise FormatError(f"{self.path}: not a llama2.c checkpoint (header {ints})")
        self.args = ModelArgs(
            arch="llama", dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=dim // n_heads, vocab_size=vocab, max_seq_len=seq_len, norm_eps=1e-5,
            rope_theta=10000.0, tied_embeddings=shared,
        )
        self._layout = self._offsets(offset, legacy)
        end = max(o + 4 * math.prod(s) for o, s in self._layout.values())
        if end > size:
            raise FormatError(f"{self.path}: truncated: the header promises {end} bytes but the file has {size}")
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._tokenizer_path = tokenizer_path

    def release(self) -> None:
        """Drop the resident pages of the mapped file."""
        from edge_awq.formats.tensorfile import release_pages

        release_pages(self._mm)

    def _offsets(self, offset: int, legacy: bool) -> dict[str, tuple[int, tuple[int, ...]]]:
        """Canonical name -> (byte offset, shape) of every tensor, in file order."""
        a = self.args
        layer = expected_shapes(a)
        shapes = {**{(n if "norm" in n else n + ".weight"): s for n, s in layer.items()},
                  "tok_embeddings": (a.vocab_size, a.dim), "norm": (a.dim,), "output": (a.vocab_size, a.dim),
                  "rope_tables": (2, a.max_seq_len, a.head_dim // 2)}  # freq_cis real and imaginary, unused
        linears = ["wq.weight", "wk.weight", "wv.weight", "wo.weight"]
        ffn = ["w1.weight", "w2.weight", "w3.weight"]
        if legacy:
            order = ["tok_embeddings", "attn_norm", *linears, "ffn_norm", *ffn, "norm", "rope_tables"]
        else:
            order = ["attn_norm", "ffn_norm", "norm", "tok_embeddings", *linears, *ffn]
        if not a.tied_embeddings:
            order.append("output")
        out, pos = {}, offset
        for kind in order:  # a per-layer kind is stored for all layers together
            names = [f"layers.{i}.{kind}" for i in range(a.n_layers)] if kind in shapes and kind not in (
                "tok_embeddings", "norm", "output", "rope_tables") else [kind]
            for name in names:
                out[name] = (pos, shapes[kind])
                pos += 4 * math.prod(shapes[kind])
        return out

    def has(self, key: str) -> bool:
        return key in self._layout

    def get(self, key: str) -> np.ndarray:
        if key not in self._layout:
            raise FormatError(f"{self.path}: a llama2.c checkpoint has no tensor {key}")
        off, shape = self._layout[key]
        t = self._mm[off : off + 4 * math.prod(shape)].view(np.float32).reshape(shape)
        if key.endswith((".wq.weight", ".wk.weight")):
            return to_rotate_half(t, self.args.n_heads if ".wq." in key else self.args.n_kv_heads)
        return t

    def tokenizer(self) -> Tokenizer:
        path = self._tokenizer_path or self._find_tokenizer()
        if path.suffix == ".model":
            return from_sentencepiece(path)
        return from_llama2c_bin(path, self.args.vocab_size)

    def _find_tokenizer(self) -> Path:
        d, n = self.path.parent, self.args.vocab_size
        for name in (f"tok{n}.model", f"tok{n}.bin", "tokenizer.model", "tokenizer.bin"):
            if (d / name).is_file():
                return d / name
        raise FormatError(f"{self.path}: no tokenizer beside it (tok{n}.bin or tok{n}.model): pass --tokenizer FILE")

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.path.stat().st_size}".encode())
        h.update(np.asarray(self._mm[:4096]).tobytes())
        return h.hexdigest()[:16]
