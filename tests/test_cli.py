"""The command line: results, and one clear line with exit code 2 for every bad input."""

import json

import numpy as np
import pytest

from tests.conftest import TINYSTORIES, edge_awq, assert_one_line_error


def test_eval_stories_json_matches_library(stories_weights):
    from edge_awq.backends import select_backend
    from edge_awq.perplexity import perplexity

    src, w = stories_weights
    r = edge_awq("eval", src.path, "--text", TINYSTORIES, "--ctx", 256, "--max-tokens", 1000, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    tokens = src.tokenizer().encode(TINYSTORIES.read_text(encoding="utf-8"))[:1000]
    want = perplexity(w, select_backend("reference"), tokens, 256)
    assert out["tokens_scored"] == want.tokens_scored == 996
    assert out["perplexity"] == pytest.approx(want.perplexity, rel=1e-9)


def test_eval_prints_one_result_line(stories_path):
    r = edge_awq("eval", stories_path, "--text", TINYSTORIES, "--max-tokens", 600)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith("perplexity ") and "598 tokens scored (2 windows of 512)" in line and "tokens/s" in line


@pytest.mark.parametrize("case", ["missing model", "missing text", "empty text", "ctx too long", "not utf8"])
def test_eval_bad_input(stories_path, tmp_path, case):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok \xff\xfe bad")
    args, words = {
        "missing model": ((tmp_path / "nope.gguf", "--text", TINYSTORIES), "no such file or directory"),
        "missing text": ((stories_path, "--text", tmp_path / "nope.txt"), "no such text file"),
        "empty text": ((stories_path, "--text", empty), "the text is empty"),
        "ctx too long": ((stories_path, "--text", TINYSTORIES, "--ctx", 4096), "model's context of 512"),
        "not utf8": ((stories_path, "--text", binary), "not UTF-8"),
    }[case]
    assert_one_line_error(edge_awq("eval", *args), words)


def test_eval_truncated_gguf(smollm2, tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as f:
        bad.write_bytes(f.read(40_000_000))
    assert_one_line_error(edge_awq("eval", bad, "--text", TINYSTORIES), "truncated or corrupt GGUF")


def test_eval_truncated_safetensors(tmp_path):
    from safetensors.numpy import save_file

    from tests.conftest import LLAMA

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**LLAMA, "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 2}))
    save_file({"model.embed_tokens.weight": np.ones((16, 8), np.float32)}, str(d / "model.safetensors"))
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:-64])
    assert_one_line_error(edge_awq("eval", d, "--text", TINYSTORIES), "truncated")


def test_eval_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    assert_one_line_error(edge_awq("eval", tmp_path, "--text", TINYSTORIES), "unsupported architecture BertForMaskedLM")


def test_usage_errors_are_one_line():
    r = edge_awq("eval", "--ctx", "x")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    r = edge_awq("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr
