"""Test helper: write a model as a Hugging Face directory (config.json, safetensors shards, tokenizer.json).

Sources hand out Q and K rows in Hugging Face's rotate-half order already.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from edge_awq.formats.sources.hf import hf_name


def hf_config(a, layers: int | None = None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
        "intermediate_size": a.hidden_dim, "num_hidden_layers": layers or a.n_layers,
        "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "vocab_size": a.vocab_size,
        "max_position_embeddings": a.max_seq_len, "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
        "tie_word_embeddings": a.tied_embeddings, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def write_hf_dir(src, out: Path, shards: int = 1, dtype=np.float32, repeat: int = 1, tokenizer=None) -> Path:
    """Write src as an HF directory; repeat > 1 stacks its layers that many times (a deeper model).

    tokenizer: an edge_awq Tokenizer built on the ``tokenizers`` library (default: the source's).
    """
    a = src.args
    out.mkdir(parents=True, exist_ok=True)
    n = a.n_layers * repeat
    tensors = {hf_name("tok_embeddings"): src.get("tok_embeddings"), hf_name("norm"): src.get("norm")}
    if not a.tied_embeddings:
        tensors[hf_name("output")] = src.get("output")
    for i in range(n):
        j = i % a.n_layers
        for name in ("attn_norm", "ffn_norm"):
            tensors[hf_name(f"layers.{i}.{name}")] = src.get(f"layers.{j}.{name}")
        for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            w = np.asarray(src.get(f"layers.{j}.{name}.weight"), dtype=np.float32)
            tensors[hf_name(f"layers.{i}.{name}.weight")] = w
    tensors = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in tensors.items()}
    names = list(tensors)
    groups = [names[k::shards] for k in range(shards)]
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"))
    else:
        weight_map = {}
        for k, group in enumerate(groups):
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({t: tensors[t] for t in group}, str(out / fname))
            weight_map.update({t: fname for t in group})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(hf_config(a, n)))
    tok = tokenizer or src.tokenizer()
    tok.impl.save(str(out / "tokenizer.json"))
    cfg = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "add_bos_token": tok.add_bos}
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out
