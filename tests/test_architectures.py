"""Each supported architecture against transformers' own implementation, on small random models."""


import numpy as np
import pytest

from tests.conftest import BASE, CASES, write_random_model

from edge_awq.formats.load import load_weights, open_source
from edge_awq.model import KVCache, forward
from edge_awq.backends import select_backend

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
