"""A Hugging Face model directory: config.json, (sharded) safetensors, tokenizer files.

A directory whose config carries a ``quantization_config`` (or an AutoAWQ
``quant_config.json`` beside it) holds AWQ-packed linears: AutoAWQ's GEMM or
GEMV layout (``sources.awq``) or compressed-tensors ``pack-quantized``
(``sources.compressed_tensors``). Their canonical ``.qweight``, ``.scales``
and ``.zeros`` are the runtime's rows (``pack.py``), converted one tensor at a
time; linears the checkpoint left in float keep ``.weight``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from edge_awq.config import from_hf_config
from edge_awq.errors import FormatError
from edge_awq.model import LINEARS
from edge_awq.formats.tensorfile import SafetensorsFile, TensorInfo
from edge_awq.formats.tokenizer import Tokenizer, from_sentencepiece, from_tokenizer_json

# canonical name -> Hugging Face tensor name ({i}: layer index)
HF_NAMES = {
    "tok_embeddings": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "output": "lm_head.weight",
    "layers.{i}.attn_norm": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.wq": "model.layers.{i}.self_attn.q_proj",
    "layers.{i}.wk": "model.layers.{i}.self_attn.k_proj",
    "layers.{i}.wv": "model.layers.{i}.self_attn.v_proj",
    "layers.{i}.wo": "model.layers.{i}.self_attn.o_proj",
    "layers.{i}.w1": "model.layers.{i}.mlp.gate_proj",
    "layers.{i}.w2": "model.layers.{i}.mlp.down_proj",
    "layers.{i}.w3": "model.layers.{i}.mlp.up_proj",
}


def hf_name(key: str) -> str:
    """Hugging Face tensor name of a canonical key ("layers.3.wq.weight" -> "model.layers.3.self_attn.q_proj.weight")."""
    parts = key.split(".")
    if parts[0] != "layers":
        return HF_NAMES[key]
    i, rest = parts[1], parts[2:]
    base = HF_NAMES["layers.{i}." + rest[0]].format(i=i)
    return base + ("." + rest[1] if len(rest) > 1 else "")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None


PACKED = ("qweight", "scales", "zeros")  # the canonical parts of a packed linear
SAMPLING_FIELDS = {"temperature": (float, 0.0, 100.0), "top_k": (int, 0, 1 << 24), "top_p": (float, 1e-9, 1.0),
                   "repetition_penalty": (float, 1e-9, 100.0)}


def generation_defaults(gen: dict) -> dict:
    """The sampling fields of a generation config that are there and in range (others are ignored, as
    transformers ignores them)."""
    if not isinstance(gen, dict):
        return {}
    out = {}
    for key, (kind, lo, hi) in SAMPLING_FIELDS.items():
        v = gen.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi and (kind is float or v == int(v)):
            out[key] = kind(v)
    if gen.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def quant_layout(path: Path, config: dict):
    """The packed layout a directory's quantization config names (None for a float model); refuses the rest."""
    from edge_awq.formats.sources.awq import SUPPORTED, AwqLayout, awq_settings
    from edge_awq.formats.sources.compressed_tensors import CompressedTensorsLayout, ct_settings

    qc, where = config.get("quantization_config"), path / "config.json"
    if qc is None and (path / "quant_config.json").is_file():  # AutoAWQ before transformers carried the config
        qc, where = {"quant_method": "awq", **_read_json(path / "quant_config.json")}, path / "quant_config.json"
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise FormatError(f"{where}: quantization_config is not an object")
    method = qc.get("quant_method")
    if method == "awq":
        return AwqLayout(awq_settings(qc, str(where)), str(path))
    if method == "compressed-tensors":
        return CompressedTensorsLayout(ct_settings(qc, str(where)), str(path))
    raise FormatError(f"{where}: quant_method {method!r} is not supported: edge-awq reads {SUPPORTED}")


class HFSource:
    def __init__(self, path: Path):
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise FormatError(f"{self.path}: no config.json: not a Hugging Face model directory")
        self.config = _read_json(cfg_path)
        self.args = from_hf_config(self.config, str(cfg_path))
        self.layout = quant_layout(self.path, self.config)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = self._index()
        if self.args.tied_embeddings is False and "lm_head.weight" not in self._where and not self._has_name(
                "lm_head.qweight") and not self._has_name("lm_head.weight_packed"):
            self.args = dataclasses.replace(self.args, tied_embeddings=True)
        self.quantization = self._quantization()

    def _quantization(self) -> dict:
        """The settings of a packed checkpoint (as an .eawq file's metadata names them); {} for a float model."""
        if self.layout is None:
            return {}
        head = "w4" if self.has("output.qweight") else "fp16"
        return {**self.layout.quantization, "head": head, "source_config": self.config.get("quantization_config")}

    def _has_name(self, name: str) -> bool:
        return name in self._where

    def _split(self, key: str) -> tuple[str, str] | None:
        """(Hugging Face module, part) of a packed linear's canonical key, or None for any other key."""
        parts = key.split(".")
        linear = parts[:-1] == ["output"] or (len(parts) == 4 and parts[0] == "layers" and parts[2] in LINEARS)
        if self.layout is None or parts[-1] not in PACKED or not linear:
            return None
        prefix = ".".join(parts[:-1])
        module = "lm_head" if prefix == "output" else hf_name(prefix + ".weight")[: -len(".weight")]
        return module, parts[-1]

    def _shape(self, key: str) -> tuple[int, int]:
        from edge_awq.config import expected_shapes

        a = self.args
        name = key.split(".")[-2]
        return (a.vocab_size, a.dim) if key.startswith("output.") else expected_shapes(a)[name]

    def release(self) -> None:
        """Drop the resident pages of every mapped shard."""
        for f in self._files.values():
            f.release()

    def _index(self) -> dict[str, str]:
        """Tensor name -> shard file name, from the index or from the shards' headers."""
        idx = self.path / "model.safetensors.index.json"
        if idx.is_file():
            weight_map = _read_json(idx).get("weight_map")
            if not isinstance(weight_map, dict):
                raise FormatError(f"{idx}: no weight_map")
            for shard in sorted(set(weight_map.values())):
                if not (self.path / shard).is_file():
                    raise FormatError(f"{self.path}: shard {shard} named by the index is missing")
                self._open(shard)
            return dict(weight_map)
        shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not shards:
            raise FormatError(f"{self.path}: no *.safetensors weights (PyTorch .bin checkpoints are not read)")
        return {name: s for s in shards for name in self._open(s).tensors}

    def _open(self, shard: str) -> SafetensorsFile:
        if shard not in self._files:
            self._files[shard] = SafetensorsFile(self.path / shard)
        return self._files[shard]

    def has(self, key: str) -> bool:
        packed = self._split(key)
        if packed is not None:
            return self.layout.is_quantized(packed[0], self._has_name)
        try:
            return hf_name(key) in self._where
        except KeyError:  # a canonical name no Hugging Face tensor has
            return False

    def get(self, key: str) -> np.ndarray:
        packed = self._split(key)
        if packed is not None:
            module, part = packed
            return self.layout.read(part, module, self._shape(key), self._get_name, self._has_name)
        return self._get_name(hf_name(key))

    def _get_name(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise FormatError(f"{self.path}: tensor {name} is missing")
        f = self._open(self._where[name])
        if name not in f.tensors:
            raise FormatError(f"{f.path}: tensor {name} is missing though the index names this shard")
        return f.get(name)

    def stored_tensors(self) -> dict[str, tuple[str, TensorInfo]]:
        """Hugging Face tensor name -> (shard file, its header entry), every tensor of the directory."""
        out = {}
        for name in sorted(self._where):
            t = self._open(self._where[name]).tensors.get(name)
            if t is not None:
                out[name] = (self._where[name], t)
        return out

    def tensor_bytes(self) -> dict[str, int]:
        """Hugging Face tensor name -> bytes held once loaded (bfloat16 is widened to float32)."""
        return {name: (t.end - t.begin) * (2 if t.dtype == "BF16" else 1)
                for name, (_, t) in self.stored_tensors().items()}

    def tokenizer(self) -> Tokenizer:
        tc_path = self.path / "tokenizer_config.json"
        tc = _read_json(tc_path) if tc_path.is_file() else {}
        gen_path = self.path / "generation_config.json"
        eos = self._eos_ids(_read_json(gen_path) if gen_path.is_file() else {})
        if (self.path / "tokenizer.json").is_file():
            return from_tokenizer_json(self.path / "tokenizer.json", tc, eos)
        if (self.path / "tokenizer.model").is_file():
            return from_sentencepiece(self.path / "tokenizer.model", tc.get("chat_template"))
        raise FormatError(f"{self.path}: no tokenizer.json or tokenizer.model")

    def generation_defaults(self) -> dict:
        """The model's recommended sampling from generation_config.json (temperature, top_k, top_p,
        repetition_penalty), as vLLM takes it; do_sample false is greedy. {} when there is none."""
        path = self.path / "generation_config.json"
        return generation_defaults(_read_json(path) if path.is_file() else {})

    def _eos_ids(self, gen: dict) -> tuple[int, ...]:
        eos = gen.get("eos_token_id", self.config.get("eos_token_id"))
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, list) else (int(eos),)

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for name in sorted(self._files):
            f = self._files[name]
            h.update(f"{name}:{f.path.stat().st_size}:{sorted(f.tensors.items())}".encode())
        return h.hexdigest()[:16]
