"""Loaders: llama2.c, Hugging Face directories (sharded, bf16, lazy) and GGUF give the same model."""

import json
import struct

import numpy as np
import pytest

from edge_awq.errors import ConfigError, FormatError
from edge_awq.formats.load import load_weights, open_source
from edge_awq.model import KVCache, forward
from edge_awq.backends import select_backend
from edge_awq.formats.tokenizer import from_llama2c_bin
from tests.conftest import TOK512_BIN, to_interleaved
from tests.hfdir import write_hf_dir

ops = select_backend("reference")
PROMPT = np.array([1, 403, 407, 261, 378, 432, 13, 410, 383])


def logits_of(src, tokens=PROMPT):
    w = load_weights(src)
    return forward(w, tokens, 0, KVCache.allocate(w.args, len(tokens)), ops)


@pytest.fixture(scope="module")
def stories_hf(stories_path, tmp_path_factory):
    src = open_source(stories_path)
    return write_hf_dir(src, tmp_path_factory.mktemp("hf") / "stories", shards=3,
                        tokenizer=from_llama2c_bin(TOK512_BIN, 512))


def test_llama2c_header(stories_weights):
    src, w = stories_weights
    a = src.args
    assert (a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.max_seq_len) == (
        64, 172, 5, 8, 4, 512, 512)
    assert a.tied_embeddings and not a.rope_interleaved
    assert w.output.weight is w.tok_embeddings


def test_llama2c_qk_rows_come_in_rotate_half_order(stories_path):
    """The file stores Q/K rows interleaved for Meta's RoPE; the reader hands them out in Hugging Face's order."""
    src = open_source(stories_path)
    a = src.args
    off, shape = src._layout["layers.2.wk.weight"]
    raw = np.fromfile(stories_path, np.float32, count=shape[0] * shape[1], offset=off).reshape(shape)
    hd = a.head_dim
    got = src.get("layers.2.wk.weight").reshape(a.n_kv_heads, hd, a.dim)
    raw = raw.reshape(a.n_kv_heads, hd, a.dim)
    np.testing.assert_array_equal(got[:, : hd // 2], raw[:, 0::2])  # first halves: the pairs' first members
    np.testing.assert_array_equal(got[:, hd // 2 :], raw[:, 1::2])
    np.testing.assert_array_equal(src.get("layers.2.wv.weight"), np.fromfile(
        stories_path, np.float32, count=shape[0] * shape[1], offset=src._layout["layers.2.wv.weight"][0]).reshape(shape))


def test_hf_directory_matches_llama2c(stories_path, stories_hf):
    """Rows reordered to rotate-half, sharded in 3 files: the same logits as the llama2.c file."""
    hf = open_source(stories_hf)
    assert not hf.args.rope_interleaved and hf.args.n_kv_heads == 4
    np.testing.assert_allclose(logits_of(hf), logits_of(open_source(stories_path)), rtol=1e-4, atol=1e-4)
    assert hf.tokenizer().encode("Once upon a time") == open_source(stories_path).tokenizer().encode("Once upon a time")



def test_opening_reads_no_weights(stories_hf):
    """Opening maps nothing; reading one layer maps only the shards holding it."""
    src = open_source(stories_hf)
    assert all(f._mm is None for f in src._files.values())
    load_weights(src, lazy=True).layers[2]
    mapped = [f for f in src._files.values() if f._mm is not None]
    assert 0 < len(mapped) <= 3


def test_lazy_and_eager_weights_agree(stories_path):
    src = open_source(stories_path)
    lazy = load_weights(src, lazy=True)
    w = load_weights(src)
    t = PROMPT
    a = forward(lazy, t, 0, KVCache.allocate(src.args, 16), ops)
    b = forward(w, t, 0, KVCache.allocate(src.args, 16), ops)
    assert np.array_equal(a, b) and len(lazy.layers) == 5


def test_llama2c_version1_layout(stories_path, tmp_path):
    """A version-1 file (magic, 256-byte header, norms first) written from the legacy one reads the same."""
    src = open_source(stories_path)
    a = src.args
    head = struct.pack("<Ii7iB", 0x616B3432, 1, a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads,
                       a.vocab_size, a.max_seq_len, 1)
    parts = [src.get(f"layers.{i}.attn_norm") for i in range(5)] + [src.get(f"layers.{i}.ffn_norm") for i in range(5)]
    parts += [src.get("norm"), src.get("tok_embeddings")]
    for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
        h = {"wq": a.n_heads, "wk": a.n_kv_heads}.get(name)
        parts += [to_interleaved(src.get(f"layers.{i}.{name}.weight"), h) if h else src.get(f"layers.{i}.{name}.weight")
                  for i in range(5)]
    out = tmp_path / "v1.bin"
    out.write_bytes(head.ljust(256, b"\0") + b"".join(np.ascontiguousarray(p, np.float32).tobytes() for p in parts))
    np.testing.assert_array_equal(logits_of(open_source(out, TOK512_BIN)), logits_of(src))


def test_gguf_quant_types_load(stories_path, tmp_path):
    """A GGUF written with F16, Q8_0 and Q4_0 tensors loads, dequantized, close to the source."""
    import gguf
    from gguf.quants import quantize

    src = open_source(stories_path)
    a = src.args
    w = gguf.GGUFWriter(str(tmp_path / "s.gguf"), "llama")
    w.add_context_length(a.max_seq_len); w.add_embedding_length(a.dim); w.add_feed_forward_length(a.hidden_dim)
    w.add_block_count(a.n_layers); w.add_head_count(a.n_heads); w.add_head_count_kv(a.n_kv_heads)
    w.add_layer_norm_rms_eps(a.norm_eps); w.add_rope_freq_base(a.rope_theta)
    tok = src.tokenizer()
    w.add_tokenizer_model("llama"); w.add_token_list([tok.impl.id_to_piece(i) for i in range(512)])
    w.add_token_scores([tok.impl.get_score(i) for i in range(512)]); w.add_token_types([3, 3, 3] + [6] * 256 + [1] * 253)
    w.add_bos_token_id(1); w.add_eos_token_id(2)
    qtypes = [gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0]
    w.add_tensor("token_embd.weight", np.ascontiguousarray(src.get("tok_embeddings"), np.float32))
    w.add_tensor("output_norm.weight", np.asarray(src.get("norm")))
    names = {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
             "wo": "attn_output", "w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}
    for i in range(a.n_layers):
        for k, g in names.items():
            t = np.ascontiguousarray(src.get(f"layers.{i}.{k}" + ("" if "norm" in k else ".weight")), np.float32)
            if k in ("wq", "wk"):  # llama.cpp's files keep Meta's interleaved order
                t = to_interleaved(t, a.n_heads if k == "wq" else a.n_kv_heads)
            qt = qtypes[i % 3] if t.ndim == 2 and t.shape[1] % 32 == 0 else gguf.GGMLQuantizationType.F32
            data = t if qt == gguf.GGMLQuantizationType.F32 else (t.astype(np.float16) if qt == qtypes[0] else quantize(t, qt))
            w.add_tensor(f"blk.{i}.{g}.weight", data, raw_dtype=qt)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    g = open_source(tmp_path / "s.gguf")
    assert not g.args.rope_interleaved and g.args.tied_embeddings
    assert g.tokenizer().encode("Once upon a time") == tok.encode("Once upon a time")
    for i, limit in enumerate((1e-3, 1e-2, 0.15)):  # F16, Q8_0, Q4_0: relative RMS error of the rows
        ref = np.asarray(src.get(f"layers.{i}.w1.weight"))
        err = np.sqrt(np.mean((g.get(f"layers.{i}.w1.weight") - ref) ** 2) / np.mean(ref**2))
        assert err < limit, (i, err)
    assert np.argmax(logits_of(g), -1).tolist() == np.argmax(logits_of(src), -1).tolist()


def test_truncated_safetensors_named(stories_hf, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(stories_hf, bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(FormatError, match="truncated"):
        open_source(bad)


def test_truncated_gguf_named(smollm2, tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as f:
        bad.write_bytes(f.read(50_000_000))
    with pytest.raises(FormatError, match="truncated or corrupt GGUF"):
        open_source(bad)


def test_unsupported_architecture_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"], "hidden_size": 8}))
    with pytest.raises(ConfigError, match="unsupported architecture GPTNeoXForCausalLM"):
        open_source(tmp_path)


def test_missing_shard_named(stories_hf, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(stories_hf, bad)
    sorted(bad.glob("*.safetensors"))[1].unlink()
    with pytest.raises(FormatError, match="shard .* is missing"):
        open_source(bad)


def test_shape_mismatch_named(stories_hf, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(stories_hf, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 176
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"has shape \(172, 64\), expected \(176, 64\)"):
        load_weights(open_source(bad))
