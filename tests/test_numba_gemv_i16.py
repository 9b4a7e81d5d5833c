"""The int16 (vpmaddwd) 4-bit GEMV against the numpy reference: random and real weights, awkward shapes."""

import numpy as np
import pytest

from edge_awq.backends import numba_gemv_i16 as i16
from edge_awq.backends.numba_cpu import NumbaBackend, linear_w4, linears_w4, prepare
from edge_awq.backends.reference import ReferenceBackend
from edge_awq.pack import pack_linear

pytestmark = pytest.mark.skipif(not i16.AVAILABLE, reason="needs x86 AVX2 (elsewhere the float GEMV runs)")
ref = ReferenceBackend()


def _rel(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("out_f,in_f,group", [(1, 32, 32), (7, 64, 32), (33, 576, 64), (13, 1536, 128),
                                              (6, 4096, 128)])
@pytest.mark.parametrize("T", [1, 2, 4])
def test_int16_gemv_matches_reference(out_f, in_f, group, T):
    rng = np.random.default_rng(out_f + in_f + T)
    w = pack_linear(rng.standard_normal((out_f, in_f)).astype(np.float32), 4, group,
                    bias=rng.standard_normal(out_f).astype(np.float32))
    x = (rng.standard_normal((T, in_f)) * rng.uniform(0.01, 30, (T, 1))).astype(np.float32)
    assert i16.usable(group)
    assert _rel(linear_w4(x, prepare(w)), ref.linear(x, w)) <= 1e-3


def test_int16_fused_linears_match_reference(smollm2_weights):
    """q, k, v and gate, up of SmolLM2's layer 3, packed W4 g64, through the one fused kernel."""
    _, w = smollm2_weights
    lw = w.layers[3]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 576)).astype(np.float32)
    for names in (("wq", "wk", "wv"), ("w1", "w3")):
        ws = [pack_linear(np.asarray(getattr(lw, n).weight, np.float32), 4, 64) for n in names]
        for got, wt in zip(linears_w4(x, [prepare(p) for p in ws]), ws):
            assert _rel(got, ref.linear(x, wt)) <= 1e-3


def test_activation_quantization_error_is_below_2_to_the_minus_15():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 256)) * 50).astype(np.float32)
    xe, xo, scale, xsum = i16.gemv_inputs_i16(x, 64)
    back = np.empty_like(x)
    back[:, 0::2] = xe * np.repeat(scale, 32, axis=1)
    back[:, 1::2] = xo * np.repeat(scale, 32, axis=1)
    per_group_max = np.abs(x).reshape(2, 4, 64).max(-1)
    assert (np.abs(back - x).reshape(2, 4, 64).max(-1) <= per_group_max * 2.0 ** -15 * 1.01).all()
    assert np.allclose(xsum, x.reshape(2, 4, 64).sum(-1), rtol=1e-5, atol=1e-4)
    assert np.abs(xe).max() <= 32767 and np.abs(xo).max() <= 32767


def test_zero_activations_give_only_the_bias():
    w = pack_linear(np.random.default_rng(2).standard_normal((5, 128)).astype(np.float32), 4, 64,
                    bias=np.arange(5, dtype=np.float32))
    assert np.array_equal(NumbaBackend().linear(np.zeros((1, 128), np.float32), w), np.arange(5, dtype=np.float32)[None])
