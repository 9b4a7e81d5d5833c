"""Each supported architecture against transformers' own implementation, on small random models."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from edge_awq.formats.load import load_weights, open_source
from edge_awq.model import KVCache, forward
from edge_awq.backends import select_backend
from edge_awq.formats.sources.hf import hf_name

BASE = {
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "hidden_act": "silu", "torch_dtype": "float32",
}
CASES = {
    "llama-gqa-untied": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False},
    "llama3-rope-scaling": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": True, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16},
    },
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "tie_word_embeddings": False,
                "sliding_window": None},
    "qwen2-bias": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": True,
                   "use_sliding_window": False},
}


def write_random_model(d, cfg, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    dim, hid, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    q_out, kv_out = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"wq": (q_out, dim), "wk": (kv_out, dim), "wv": (kv_out, dim), "wo": (dim, q_out),
              "w1": (hid, dim), "w2": (dim, hid), "w3": (hid, dim)}
    r = lambda *s, scale=0.1: (rng.standard_normal(s) * scale).astype(np.float32)  # noqa: E731
    t = {hf_name("tok_embeddings"): r(cfg["vocab_size"], dim, scale=1.0), hf_name("norm"): 1 + r(dim)}
    if not cfg["tie_word_embeddings"]:
        t[hf_name("output")] = r(cfg["vocab_size"], dim)
    for i in range(cfg["num_hidden_layers"]):
        t[hf_name(f"layers.{i}.attn_norm")] = 1 + r(dim)
        t[hf_name(f"layers.{i}.ffn_norm")] = 1 + r(dim)
        for name, shape in shapes.items():
            t[hf_name(f"layers.{i}.{name}.weight")] = r(*shape)
        if cfg["model_type"] == "qwen2":
            for name in ("wq", "wk", "wv"):
                t[hf_name(f"layers.{i}.{name}.bias")] = r(shapes[name][0], scale=0.5)
    save_file(t, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("case", sorted(CASES))
def test_architecture_matches_transformers(tmp_path, case):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = {**BASE, **CASES[case]}
    d = write_random_model(tmp_path / case, cfg)
    src = open_source(d)
    assert src.args.arch == cfg["model_type"] and src.args.qkv_bias == (case == "qwen2-bias")
    w = load_weights(src)
    tokens = np.random.default_rng(1).integers(0, 100, 40)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
    with torch.inference_mode():
        want = model(torch.tensor([tokens.tolist()])).logits[0].numpy()
    # prefill of 30, then 10 decode steps through the cache
    cache = KVCache.allocate(w.args, 40)
    ops = select_backend("reference")
    got = [forward(w, tokens[:30], 0, cache, ops)]
    got += [forward(w, tokens[p : p + 1], p, cache, ops) for p in range(30, 40)]
    np.testing.assert_allclose(np.concatenate(got), want, rtol=1e-4, atol=1e-4)
