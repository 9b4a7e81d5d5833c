"""The quantization grid and the bit packing, by hand and by round trip."""

import numpy as np
import pytest

from edge_awq.pack import (bits_per_weight, dequantize, pack_bits, pack_linear, packed_words, quantize, unpack_bits,
                           unpack_linear)

rng = np.random.default_rng(0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 64, 172, 576])
def test_pack_round_trip(bits, n):
    q = rng.integers(0, 2**bits, (5, n)).astype(np.uint8)
    p = pack_bits(q, bits)
    assert p.dtype == np.uint32 and p.shape == (5, packed_words(n, bits))
    assert np.array_equal(unpack_bits(p, bits, n), q)


def test_nibble_order_is_little_endian():
    q = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 15]], np.uint8)
    p = pack_bits(q, 4)
    assert p[0, 0] == 0x87654321 and p[0, 1] == 0xF and p.shape == (1, 4)


def test_three_bit_stream_crosses_words():
    q = np.zeros((1, 32), np.uint8)
    q[0, 10] = 0b111  # bits 30..32: straddles words 0 and 1
    p = pack_bits(q, 3)
    assert p[0, 0] == 0b11 << 30 and p[0, 1] == 1 and p.shape == (1, 3)


def test_pack_refuses_values_too_wide():
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_bits(np.array([[8]], np.uint8), 3)


def test_quantizer_hand_worked():
    # one group [-1, 0, 0.5, 2]: scale = 3/15 = 0.2, zero = -round(-1/0.2) = 5
    w = np.array([[-1.0, 0.0, 0.5, 2.0]], np.float32)
    q, s, z = quantize(w, 4, 4)
    assert s.dtype == np.float16 and float(s[0, 0]) == pytest.approx(0.2, abs=1e-4) and z[0, 0] == 5
    s32 = np.float32(s[0, 0])
    assert q.tolist() == [[0, 5, int(np.round(0.5 / s32)) + 5, min(15, int(np.round(2.0 / s32)) + 5)]]
    np.testing.assert_allclose(dequantize(q, s, z, 4), w, atol=s32 / 2 + 1e-6)


def test_quantizer_zero_point_clamps_at_zero():
    """A group of one sign: the zero point clamps to 0 (AWQ's formula), so the top of the range is cut."""
    w = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    q, s, z = quantize(w, 4, 4)
    assert z[0, 0] == 0 and float(s[0, 0]) == pytest.approx(0.2, abs=1e-4)
    assert q.tolist() == [[5, 10, 15, 15]]


def test_quantizer_scale_floor_keeps_constant_groups_finite():
    q, s, z = quantize(np.zeros((1, 8), np.float32), 4, 8)
    assert float(s[0, 0]) > 0 and np.array_equal(dequantize(q, s, z, 8), np.zeros((1, 8), np.float32))


@pytest.mark.parametrize("bits,gs,shape", [(4, 64, (33, 576)), (3, 32, (7, 64)), (4, 172, (5, 172)), (3, 4, (3, 172))])
def test_linear_round_trip_error_bound(bits, gs, shape):
    w = rng.standard_normal(shape).astype(np.float32)
    packed = pack_linear(w, bits, gs)
    w_hat = unpack_linear(packed)
    q, s, z = quantize(w, bits, gs)
    assert np.array_equal(w_hat, dequantize(q, s, z, gs))
    step = np.repeat(s.astype(np.float32), gs, axis=1)  # each weight is within half a step (plus fp16 scale rounding)
    g = w.reshape(shape[0], -1, gs)
    mixed = np.repeat((g.min(-1) < 0) & (g.max(-1) > 0), gs, axis=1)  # groups of one sign are cut at the top
    assert mixed.mean() > 0.5
    assert np.all((np.abs(w_hat - w) <= 0.5 * step * (1 + 2e-3) + 1e-6)[mixed])


def test_bits_per_weight():
    assert bits_per_weight(4, 64) == pytest.approx(4.3125) and bits_per_weight(4, 128) == pytest.approx(4.15625)
