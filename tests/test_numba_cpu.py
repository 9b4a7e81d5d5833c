"""The numba kernels against the numpy reference: random and real weights, awkward shapes."""

import numpy as np
import pytest

pytest.importorskip("numba")

from edge_awq.backends.numba_cpu import NumbaBackend, linear_w4, prepare  # noqa: E402
from edge_awq.backends.reference import ReferenceBackend  # noqa: E402
from edge_awq.load import load_weights, open_source  # noqa: E402
from edge_awq.model import KVCache, forward  # noqa: E402
from edge_awq.pack import pack_linear, unpack_linear  # noqa: E402

rng = np.random.default_rng(0)


def rel_err(got, want):
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


@pytest.mark.parametrize("bits,gs,out_f,in_f", [
    (4, 64, 33, 576), (4, 128, 7, 4096), (4, 172, 5, 172), (4, 4, 16, 172), (3, 64, 9, 576), (3, 4, 3, 172),
    (4, 32, 1, 64), (3, 172, 2, 172),
])
@pytest.mark.parametrize("T", [1, 2, 3, 7, 16, 33])
def test_linear_matches_reference(bits, gs, out_f, in_f, T):
    w = (rng.standard_normal((out_f, in_f)) * rng.uniform(0.01, 2, (out_f, 1))).astype(np.float32)
    x = rng.standard_normal((T, in_f)).astype(np.float32)
    bias = rng.standard_normal(out_f).astype(np.float32)
    p = pack_linear(w, bits, gs, bias)
    want = x @ unpack_linear(p).T + bias
    assert rel_err(linear_w4(x, prepare(p)), want) <= 1e-3


def test_real_weights_smollm2_layer(smollm2_weights):
    src, _ = smollm2_weights
    for name, gs in (("wq", 64), ("w2", 64), ("wk", 32)):
        w = np.asarray(src.get(f"layers.3.{name}.weight"), np.float32)
        p = pack_linear(w, 4, gs)
        x = rng.standard_normal((1, w.shape[1])).astype(np.float32)
        assert rel_err(linear_w4(x, prepare(p)), x @ unpack_linear(p).T) <= 1e-3


def test_greedy_tokens_agree_with_reference(tmp_path):
    from tests.golden.regen import GOLDEN_FILE

    w = load_weights(open_source(GOLDEN_FILE))
    outs = []
    for ops in (ReferenceBackend(), NumbaBackend()):
        cache, toks = KVCache.allocate(w.args, 40), [1]
        logits = forward(w, np.array([1, 400, 401, 402, 403, 404, 405, 406]), 0, cache, ops)
        toks = [int(np.argmax(logits[-1]))]
        for pos in range(8, 39):
            toks.append(int(np.argmax(forward(w, np.array(toks[-1:]), pos, cache, ops)[-1])))
        outs.append(toks)
    assert outs[0] == outs[1]
