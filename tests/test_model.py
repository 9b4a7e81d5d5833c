"""The whole forward pass on real models: known outputs and an independent implementation."""

import numpy as np
import pytest

from edge_awq.model import KVCache, forward
from edge_awq.backends import select_backend
from edge_awq.formats.tokenizer import from_llama2c_bin
from tests.conftest import TOK512_BIN, LLAMA2C_GREEDY
from tests.hfdir import write_hf_dir

ops = select_backend("reference")

# llama2.c's run.c on stories260K.bin with temperature 0 and 200 steps (its test_all.py expectation).
def greedy(w, prompt, steps, stop=()):
    cache = KVCache.allocate(w.args, len(prompt) + steps)
    logits = forward(w, np.array(prompt), 0, cache, ops, last_only=True)
    out = []
    for pos in range(len(prompt), len(prompt) + steps):
        out.append(int(np.argmax(logits[-1])))
        if out[-1] in stop or pos == len(prompt) + steps - 1:
            break
        logits = forward(w, np.array(out[-1:]), pos, cache, ops, last_only=True)
    return out


@pytest.mark.parametrize("tokenizer", ["model", "bin"])
def test_stories260k_reproduces_llama2c(stories_weights, tokenizer):
    src, w = stories_weights
    tok = src.tokenizer() if tokenizer == "model" else from_llama2c_bin(TOK512_BIN, 512)
    tokens = greedy(w, [1], 200)
    assert len(tokens) == 200
    assert tok.decode(tokens) == LLAMA2C_GREEDY


def test_smollm2_knows_the_capital_of_france(smollm2_weights):
    src, w = smollm2_weights
    tok = src.tokenizer()
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    answer = tok.decode(greedy(w, ids, 24, stop=tok.eos_ids))
    assert "Paris" in answer


def test_forward_refuses_past_the_cache(stories_weights):
    _, w = stories_weights
    with pytest.raises(ValueError, match="exceed the KV cache"):
        forward(w, np.array([1, 2, 3]), 0, KVCache.allocate(w.args, 2), ops)


def test_stories260k_matches_transformers(stories_path, stories_weights, tmp_path):
    """Hugging Face's LlamaForCausalLM on the converted directory gives our logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    src, w = stories_weights
    d = write_hf_dir(src, tmp_path / "hf", tokenizer=from_llama2c_bin(TOK512_BIN, 512))
    # in float64: the check is of our float32 forward, not of how this CPU's torch kernels round float32
    model = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float64)
    tokens = src.tokenizer().encode("Once upon a time, a cat sat on a mat. It was happy.", bos=True)
    with torch.inference_mode():
        want = model(torch.tensor([tokens])).logits[0].numpy()
    assert want.dtype == np.float64
    got = forward(w, np.array(tokens), 0, KVCache.allocate(w.args, len(tokens)), ops)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.long
def test_smollm2_gguf_matches_transformers(smollm2, smollm2_weights):
    """transformers dequantizes the same GGUF and undoes llama.cpp's Q/K permutation itself."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    src, w = smollm2_weights
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name,
                                                              torch_dtype=torch.float32)
    tokens = src.tokenizer().encode("The tower is 324 metres (1,063 ft) tall, about the same height as")
    with torch.inference_mode():
        want = model(torch.tensor([tokens])).logits[0].numpy()
    got = forward(w, np.array(tokens), 0, KVCache.allocate(w.args, len(tokens)), ops)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-3)


def test_prefill_in_chunks_equals_one_pass(stories_weights):
    from edge_awq.backends.reference import ReferenceBackend
    from edge_awq.model import KVCache, forward, prefill

    _, w = stories_weights
    ops = ReferenceBackend()
    tokens = np.arange(1, 41)
    caches = [KVCache.allocate(w.args, 64) for _ in range(2)]
    whole = forward(w, tokens, 0, caches[0], ops, last_only=True)[-1]
    chunked = prefill(w, tokens, 0, caches[1], ops, chunk=7)
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(caches[1].k[:, :, :40], caches[0].k[:, :, :40], rtol=1e-5, atol=1e-5)
