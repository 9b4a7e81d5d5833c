"""A GGUF file (llama.cpp), read with the ``gguf`` package and dequantized per tensor.

Every tensor type the ``gguf`` package dequantizes is accepted. llama.cpp stores
the Q and K rows of llama-family models permuted for its interleaved RoPE: they
are put back in Hugging Face's order as they are read (qwen2 files keep it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from edge_awq.config import ModelArgs, RopeScaling, rope_frequencies
from edge_awq.errors import ConfigError, FormatError
from edge_awq.schema import GGUFArgs, validated
from edge_awq.formats.tokenizer import Tokenizer, byte_level_bpe, spm_bpe
from edge_awq.formats.sources import to_rotate_half

GGUF_NAMES = {
    "tok_embeddings": "token_embd",
    "norm": "output_norm",
    "output": "output",
    "attn_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
    "wq": "attn_q",
    "wk": "attn_k",
    "wv": "attn_v",
    "wo": "attn_output",
    "w1": "ffn_gate",
    "w2": "ffn_down",
    "w3": "ffn_up",
}
ARCHS = ("llama", "mistral", "qwen2")
INTERLEAVED_ROPE = ("llama", "mistral")  # convert_hf_to_gguf permutes Q/K rows for these
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4


def gguf_name(key: str) -> str:
    """GGUF tensor name of a canonical key ("layers.3.wq.weight" -> "blk.3.attn_q.weight")."""
    parts = key.split(".")
    if parts[0] != "layers":
        return GGUF_NAMES[key] + ".weight"
    rest = parts[2:]
    return f"blk.{parts[1]}.{GGUF_NAMES[rest[0]]}." + (rest[1] if len(rest) > 1 else "weight")


class GGUFSource:
    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.path = Path(path)
        try:
            self.reader = GGUFReader(self.path)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot read: {e.strerror}") from None
        except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on damage
            raise FormatError(f"{self.path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.args = self._args()

    def release(self) -> None:
        """Drop the resident pages of the mapped file."""
        from edge_awq.formats.tensorfile import release_pages

        release_pages(self.reader.data)

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def _args(self) -> ModelArgs:
        arch = self.field("general.architecture")
        if arch not in ARCHS:
            raise ConfigError(f"{self.path}: unsupported GGUF architecture {arch!r}: edge-awq runs llama, mistral and qwen2")
        if self.field(f"{arch}.expert_count"):
            raise ConfigError(f"{self.path}: mixture-of-experts models are not supported")
        k = lambda name, default=None: self.field(f"{arch}.{name}", default)  # noqa: E731
        fields = {
            "embedding_length": k("embedding_length"), "feed_forward_length": k("feed_forward_length"),
            "block_count": k("block_count"), "head_count": k("attention.head_count"),
            "head_count_kv": k("attention.head_count_kv"), "key_length": k("attention.key_length"),
            "vocab_size": k("vocab_size") or len(self.field("tokenizer.ggml.tokens", []))
            or (int(self.tensors["token_embd.weight"].shape[1]) if "token_embd.weight" in self.tensors else None),
            "context_length": k("context_length", 2048),
            "layer_norm_rms_epsilon": k("attention.layer_norm_rms_epsilon", 1e-5),
            "rope_freq_base": k("rope.freq_base", 10000.0), "rope_scale_linear": k("rope.scale_linear"),
        }
        g = validated(GGUFArgs, {n: v for n, v in fields.items() if v is not None}, f"{self.path}: GGUF {arch}",
                      FormatError)
        return ModelArgs(
            arch=arch,
            dim=g.embedding_length,
            hidden_dim=g.feed_forward_length,
            n_layers=g.block_count,
            n_heads=g.head_count,
            n_kv_heads=g.head_count_kv or g.head_count,
            head_dim=g._head_dim(),
            vocab_size=g.vocab_size,
            max_seq_len=g.context_length,
            norm_eps=g.layer_norm_rms_epsilon,
            rope_theta=g.rope_freq_base,
            rope_scaling=RopeScaling("linear", g.rope_scale_linear) if g.rope_scale_linear else None,
            tied_embeddings="output.weight" not in self.tensors,
            qkv_bias="blk.0.attn_q.bias" in self.tensors,
        )

    def rope_inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies; Llama 3's scaling is baked into a ``rope_freqs`` tensor of divisors."""
        base = rope_frequencies(self.args)
        t = self.tensors.get("rope_freqs.weight")
        return base if t is None else (base / np.asarray(t.data, dtype=np.float32).reshape(-1)).astype(np.float32)

    def has(self, key: str) -> bool:
        return gguf_name(key) in self.tensors

    def get(self, key: str) -> np.ndarray:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        name = gguf_name(key)
        t = self.tensors.get(name)
        if t is None:
            raise FormatError(f"{self.path}: tensor {name} is missing")
        shape = tuple(int(s) for s in reversed(t.shape))  # ggml lists the fastest dimension first
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            a = np.asarray(t.data).reshape(shape)
        else:
            try:
                a = dequantize(t.data, t.tensor_type).reshape(shape)
            except NotImplementedError:
                raise FormatError(f"{self.path}: tensor {name} has type {t.tensor_type.name}, "
                                  "which gguf cannot dequantize") from None
        if self.args.arch in INTERLEAVED_ROPE and key.endswith((".wq.weight", ".wk.weight")):
            return to_rotate_half(a, self.args.n_heads if ".wq." in key else self.args.n_kv_heads)
        return a

    def tokenizer(self) -> Tokenizer:
        model = self.field("tokenizer.ggml.model")
        tokens = list(self.field("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise FormatError(f"{self.path}: no tokenizer in the GGUF metadata")
        types = list(self.field("tokenizer.ggml.token_type") or [1] * len(tokens))
        specials = {i: t for i, t in enumerate(tokens) if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)}
        if model == "gpt2":
            impl = byte_level_bpe(tokens, list(self.field("tokenizer.ggml.merges") or []),
                                  self.field("tokenizer.ggml.pre", "default"), list(specials.values()))
        elif model == "llama":
            scores = list(self.field("tokenizer.ggml.scores") or [0.0] * len(tokens))
            unk = self.field("tokenizer.ggml.unknown_token_id")
            if unk is not None:
                specials[int(unk)] = tokens[int(unk)]
            impl = spm_bpe(tokens, scores, specials, bool(self.field("tokenizer.ggml.add_space_prefix", True)))
        else:
            raise FormatError(f"{self.path}: unsupported GGUF tokenizer model {model!r} (expected gpt2 or llama)")
        bos, eos = self.field("tokenizer.ggml.bos_token_id"), self.field("tokenizer.ggml.eos_token_id")
        eot = self.field("tokenizer.ggml.eot_token_id")
        eos_ids = tuple(dict.fromkeys(int(i) for i in (eos, eot) if i is not None))
        return Tokenizer(
            impl, None if bos is None else int(bos), eos_ids, self.field("tokenizer.chat_template"),
            add_bos=bool(self.field("tokenizer.ggml.add_bos_token", model == "llama")) and bos is not None,
            bos_token=tokens[int(bos)] if bos is not None else "", eos_token=tokens[int(eos)] if eos is not None else "",
            special_ids=frozenset(specials),
        )

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.path.stat().st_size}".encode())
        for name in sorted(self.tensors):
            t = self.tensors[name]
            h.update(f"{name}:{t.tensor_type.name}:{list(t.shape)}:{t.data_offset}".encode())
        return h.hexdigest()[:16]
