"""Open a model in any supported format and read its weights, lazily or all at once."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edge_awq.config import expected_shapes, rope_frequencies
from edge_awq.errors import FormatError
from edge_awq.model import LINEARS, W4, Dense, LayerWeights, LazyLayers, ModelWeights
from edge_awq.formats.eawq import HEAD_BITS
from edge_awq.pack import packed_words, zeros_rows
from edge_awq.formats.sources import Source

log = logging.getLogger(__name__)


def open_source(path: str | Path, tokenizer: str | Path | None = None) -> Source:
    """The source for a Hugging Face directory, a ``.gguf`` or a llama2.c ``.bin`` (headers only)."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or directory")
    if path.suffix == ".eawq":
        from edge_awq.formats.eawq import EawqSource

        return EawqSource(path)
    if path.is_dir():
        from edge_awq.formats.sources.hf import HFSource

        return HFSource(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from edge_awq.formats.sources.gguf import GGUFSource

        return GGUFSource(path)
    if path.suffix == ".bin":
        from edge_awq.formats.sources.llama2c import Llama2cSource

        return Llama2cSource(path, Path(tokenizer) if tokenizer else None)
    raise FormatError(
        f"{path}: unrecognised model format: expected a Hugging Face directory, a .gguf file or a llama2.c .bin"
    )


def _checked(src: Source, key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    return _checked_array(src, key, src.get(key), shape, dtype)


def _checked_array(src: Source, key: str, t: np.ndarray, shape: tuple[int, ...], dtype=None) -> np.ndarray:
    if tuple(t.shape) != shape:
        raise FormatError(f"{src.path}: tensor {key} has shape {tuple(t.shape)}, expected {shape} from the config")
    return t if dtype is None else np.ascontiguousarray(t, dtype=dtype)


def _linear(src: Source, key: str, shape: tuple[int, int], dtype, bits: int | None = None) -> Dense | W4:
    """A Dense weight, or a packed W4 where the source holds ``key.qweight`` (an .eawq file).

    bits: the packed width, by default the linear's own in a mixed file (``mixed.formats_of``), else the
    file's quantization bits (the head has its own).
    """
    bias = _checked(src, key + ".bias", shape[:1], np.float32) if src.has(key + ".bias") else None
    if not src.has(key + ".qweight"):
        return Dense(_checked(src, key + ".weight", shape, dtype), bias)
    bits, (out_f, in_f) = bits or _file_bits(src, key), shape
    scales = src.get(key + ".scales")
    n_groups = scales.shape[1] if scales.ndim == 2 else 0
    if n_groups == 0 or in_f % n_groups:
        raise FormatError(f"{src.path}: tensor {key}.scales has shape {scales.shape}, which fits no grouping of {in_f}")
    qweight = _checked(src, key + ".qweight", (out_f, packed_words(in_f, bits)), None)
    zeros = src.get(key + ".zeros")
    if zeros.ndim == 1:  # one stream for the tensor (format version 2): rows for the kernels
        zeros = zeros_rows(_checked(src, key + ".zeros", (packed_words(out_f * n_groups, bits),), None),
                           out_f, n_groups, bits)
    zeros = _checked_array(src, key + ".zeros", zeros, (out_f, packed_words(n_groups, bits)))
    _checked(src, key + ".scales", (out_f, n_groups), None)
    return W4(qweight, scales, zeros, in_f // n_groups, bits, in_f, bias)


def _file_bits(src: Source, key: str) -> int:
    """The bit width a packed file stores linear key at: its own format in a mixed file, else the file's."""
    from edge_awq.mixed import formats_of

    formats = getattr(src, "linear_formats", None)
    if formats is None:  # parsed once per source
        formats = src.linear_formats = formats_of(src.quantization)
    own = formats.get(key)
    return own.bits if own is not None else src.quantization["bits"]


def read_layer(src: Source, i: int, dtype=np.float32) -> LayerWeights:
    """Layer i's weights, shape-checked; dtype None keeps the stored (possibly mapped) arrays."""
    fields = {}
    for name, shape in expected_shapes(src.args).items():
        if name in LINEARS:
            fields[name] = _linear(src, f"layers.{i}.{name}", shape, dtype)
        else:
            fields[name] = _checked(src, f"layers.{i}.{name}", shape, np.float32)
    return LayerWeights(**fields)


def check_structure(src: Source) -> None:
    """Every tensor the model needs is present with the shape its config gives, and the tokenizer reads
    (a FormatError names what is not); the tensors' bytes are not read."""
    w = load_weights(src, lazy=True, dtype=None)
    for i in range(src.args.n_layers):
        read_layer(src, i, dtype=None)
    del w
    src.tokenizer()


def resident_bytes(src: Source) -> dict[str, int]:
    """Tensor name -> bytes the runtime holds once the source is loaded, from the headers alone (the
    tokenizer excluded; bfloat16 counted as the float32 it is widened to)."""
    return src.tensor_bytes()


def inv_freq(src: Source) -> np.ndarray:
    """RoPE inverse frequencies: the source's own (GGUF rope_freqs, .eawq) or from the config."""
    own = getattr(src, "rope_inv_freq", None)
    return own() if own else rope_frequencies(src.args)


def load_weights(src: Source, lazy: bool = False, dtype=np.float32) -> ModelWeights:
    """All weights of src. lazy: layers are read from the source at each access (bounded memory)."""
    a = src.args
    emb = _checked(src, "tok_embeddings", (a.vocab_size, a.dim), dtype)
    if getattr(src, "quantization", None) and src.has("output.qweight"):  # a packed head (``export --head``)
        head_bits = HEAD_BITS.get(src.quantization.get("head"))
        if head_bits is None:
            raise FormatError(f"{src.path}: a packed output head, but the metadata names head "
                              f"{src.quantization.get('head')!r}; re-export the file")
        out = _linear(src, "output", (a.vocab_size, a.dim), dtype, head_bits)
    elif a.tied_embeddings or not src.has("output"):
        out = Dense(emb)
    else:
        out = Dense(_checked(src, "output", (a.vocab_size, a.dim), dtype))
    if lazy:
        layers = LazyLayers(a.n_layers, lambda i: read_layer(src, i, dtype))
    else:
        layers = [read_layer(src, i, dtype) for i in range(a.n_layers)]
    log.info("loaded %s (%d layers, %s)", src.path, a.n_layers, "lazy" if lazy else "in memory")
    return ModelWeights(a, emb, layers, _checked(src, "norm", (a.dim,), np.float32), out, inv_freq(src))


class DequantizedSource:
    """A packed source seen as a float one: each packed linear's ``.weight`` is its dequantized values
    (float32, one tensor at a time), for quantizing a packed model again (``export --requantize``)."""

    def __init__(self, src: Source):
        self._src, self.path, self.args = src, src.path, src.args

    def has(self, key: str) -> bool:
        if key.endswith(".weight") and self._src.has(key[: -len("weight")] + "qweight"):
            return True
        return not key.endswith((".qweight", ".scales", ".zeros")) and self._src.has(key)

    def get(self, key: str) -> np.ndarray:
        prefix = key[: -len(".weight")] if key.endswith(".weight") else key
        if (key.endswith(".weight") or key == "output") and self._src.has(prefix + ".qweight"):
            from edge_awq.pack import unpack_linear

            shape = (self.args.vocab_size, self.args.dim) if prefix == "output" else expected_shapes(self.args)[
                prefix.split(".")[-1]]
            bits = HEAD_BITS.get(self._src.quantization.get("head")) if prefix == "output" else None
            return unpack_linear(_linear(self._src, prefix, shape, None, bits))
        return self._src.get(key)

    def tokenizer(self):
        return self._src.tokenizer()

    def fingerprint(self) -> str:
        return self._src.fingerprint()

    def release(self) -> None:
        self._src.release()

    def rope_inv_freq(self) -> np.ndarray:
        return inv_freq(self._src)
