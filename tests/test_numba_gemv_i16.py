"""The int16 (vpmaddwd) 4-bit GEMV against the numpy reference: random and real weights, awkward shapes."""

import numpy as np
import pytest

from edge_awq.backends.numba import gemv_i16 as i16
from edge_awq.backends.numba import NumbaBackend, linear_w4, linears_w4, prepare
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
    assert np.array_equal(NumbaBackend("int16").linear(np.zeros((1, 128), np.float32), w), np.arange(5, dtype=np.float32)[None])


@pytest.mark.parametrize("out_f,in_f,group", [(1, 16, 16), (9, 576, 64), (37, 1024, 1024), (5, 4096, 128)])
@pytest.mark.parametrize("T", [1, 3])
def test_int16_gemv_8bit_matches_reference(out_f, in_f, group, T):
    """The int8 head's path: one byte per value, natural order."""
    rng = np.random.default_rng(out_f * T)
    w = pack_linear(rng.standard_normal((out_f, in_f)).astype(np.float32), 8, group)
    x = rng.standard_normal((T, in_f)).astype(np.float32)
    assert i16.usable8(group)
    assert _rel(linear_w4(x, prepare(w)), ref.linear(x, w)) <= 1e-3


def test_8bit_groups_too_long_for_int32_stay_on_the_float_path():
    assert not i16.usable8(2048)


def test_fused_decode_layer_matches_op_by_op(smollm2_weights):
    """SmolLM2 with W4 g64 layers: decode steps through ``decode_layers`` (the whole model in one call), through
    ``decode_block`` (one call per layer) and through the ops one by one give the same greedy tokens, the two
    fused paths the same logits exactly, and logits within 1e-2 of the largest of the op-by-op ones."""
    from dataclasses import replace

    from edge_awq.model import LINEARS, forward

    _, w = smollm2_weights
    layers = [replace(lw, **{n: pack_linear(np.asarray(getattr(lw, n).weight, np.float32), 4, 64) for n in LINEARS})
              for lw in w.layers]
    w = replace(w, layers=layers)
    whole, per_layer, plain = NumbaBackend("int16"), NumbaBackend("int16"), NumbaBackend("int16")
    per_layer.decode_layers = lambda *a: None
    plain.decode_block = plain.decode_layers = lambda *a: None
    calls = []
    real = whole.decode_layers
    whole.decode_layers = lambda *a: calls.append(1) or real(*a)
    backends = (whole, per_layer, plain)
    caches = [b.allocate_cache(w.args, 64) for b in backends]
    prompt = np.array([1, 400, 401, 402, 403, 404, 405, 406])
    logits = [forward(w, prompt, 0, c, b, last_only=True)[-1] for b, c in zip(backends, caches)]
    for pos in range(len(prompt), len(prompt) + 12):
        tok = int(np.argmax(logits[2]))
        assert all(int(np.argmax(lg)) == tok for lg in logits)
        logits = [forward(w, np.array([tok]), pos, c, b, last_only=True)[-1] for b, c in zip(backends, caches)]
        assert np.array_equal(logits[0], logits[1])
        assert _rel(logits[0], logits[2]) <= 1e-2
    assert len(calls) >= 12 and real(w, np.zeros((1, w.args.dim), np.float32), 0, caches[0]) is not None


def test_fused_decode_declines_what_it_does_not_cover(stories_weights):
    """stories260K's float layers: decode_block says None and the ops run."""
    _, w = stories_weights
    ops = NumbaBackend("int16")
    cache = ops.allocate_cache(w.args, 8)
    assert ops.decode_block(w.layers[0], np.zeros((1, w.args.dim), np.float32), 0, cache, 0, w) is None


def test_fused_decode_declines_an_int8_cache_after_serving_an_fp16_one(smollm2_weights):
    """The layer's arrays are kept per layer; whether the cache fits is asked on every call."""
    from dataclasses import replace

    from edge_awq.model import LINEARS

    _, w = smollm2_weights
    lw = replace(w.layers[0], **{n: pack_linear(np.asarray(getattr(w.layers[0], n).weight, np.float32), 4, 64)
                                 for n in LINEARS})
    ops = NumbaBackend("int16")
    x = np.random.default_rng(0).standard_normal((1, w.args.dim)).astype(np.float32)
    assert ops.decode_block(lw, x, 0, ops.allocate_cache(w.args, 8), 0, w) is not None
    assert ops.decode_block(lw, x, 0, ops.allocate_cache(w.args, 8, np.int8), 0, w) is None
