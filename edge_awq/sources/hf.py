"""A Hugging Face model directory: config.json, (sharded) safetensors, tokenizer files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from ..config import from_hf_config
from ..errors import FormatError
from ..tensorfile import SafetensorsFile
from ..tokenizer import Tokenizer, from_sentencepiece, from_tokenizer_json

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


class HFSource:
    def __init__(self, path: Path):
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise FormatError(f"{self.path}: no config.json: not a Hugging Face model directory")
        self.config = _read_json(cfg_path)
        self.args = from_hf_config(self.config)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = self._index()
        if self.args.tied_embeddings is False and "lm_head.weight" not in self._where:
            self.args = dataclasses.replace(self.args, tied_embeddings=True)

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
        return hf_name(key) in self._where

    def get(self, key: str) -> np.ndarray:
        name = hf_name(key)
        if name not in self._where:
            raise FormatError(f"{self.path}: tensor {name} is missing")
        f = self._open(self._where[name])
        if name not in f.tensors:
            raise FormatError(f"{f.path}: tensor {name} is missing though the index names this shard")
        return f.get(name)

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
