"""The quantization grid and the bit packing, by hand and by round trip."""

import numpy as np
import pytest

from edge_awq.pack import (dequantize, pack_bits, pack_linear, packed_words, quantize, unpack_bits,
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


def test_stored_bits_per_weight_counts_the_bytes():
    """SmolLM2's shapes at W4 g64: 4 bits, a float16 scale and a 4-bit zero per 64 weights (the zero points no
    longer padded to 32 a row); per channel, one scale and zero a row."""
    from edge_awq.formats.eawq import stored_bits_per_weight, tensor_specs
    from edge_awq.plan import PRESETS

    a = PRESETS["smollm2-135m"]
    for gs, want in ((64, 4 + 20 / 64), ("channel", None)):
        specs = tensor_specs(a, 4, lambda n: n if gs == "channel" else gs, 0)
        nbytes = {name: int(np.dtype(dt).itemsize * np.prod(shape)) for name, dt, shape in specs}
        got = stored_bits_per_weight(nbytes, a)
        if want is None:  # 16 + 4 bits a row (zeros: one stream, rounded up to a word per tensor)
            want = 4 + sum(a.n_layers * o * 20 for o, i in _linear_shapes(a)) / a.linear_params
        assert got == pytest.approx(want, rel=1e-4)


def _linear_shapes(a):
    from edge_awq.config import expected_shapes

    return [v for k, v in expected_shapes(a).items() if k.startswith("w")]


# --- the layouts AWQ checkpoints circulate in, held to the libraries that write them ---

def _grid(out_f, in_f, gs, seed=1):
    r = np.random.default_rng(seed)
    q = r.integers(0, 16, (out_f, in_f)).astype(np.uint8)
    z = r.integers(0, 16, (out_f, in_f // gs)).astype(np.uint8)
    s = (r.uniform(0.001, 0.05, (out_f, in_f // gs))).astype(np.float16)
    return q, z, s


def test_awq_gemm_nibble_order_by_hand():
    q = np.arange(8, dtype=np.uint8).reshape(8, 1)  # out 8, in 1: column c holds value c
    from edge_awq.pack import pack_awq_gemm, unpack_awq_gemm

    w = pack_awq_gemm(q)
    assert w.shape == (1, 1) and w.view(np.uint32)[0, 0] == 0x75316420  # nibbles 0,2,4,6,1,3,5,7 low to high
    assert np.array_equal(unpack_awq_gemm(w), q)


@pytest.mark.parametrize("shape,gs", [((64, 128), 32), ((32, 576), 64), ((1536, 576), 576)])
def test_awq_gemm_equals_autoawq_packing(autoawq, shape, gs):
    """AutoAWQ's own WQLinear_GEMM.from_linear packs our integers into the words pack_awq_gemm writes,
    and its dequantize_gemm gives our dequantized weight exactly."""
    import torch

    from edge_awq.pack import pack_awq_gemm, unpack_awq_gemm

    q, z, s = _grid(*shape, gs)
    w_hat = torch.from_numpy(dequantize(q, s, z, gs))  # (out, in) float32
    lin = torch.nn.Linear(shape[1], shape[0], bias=False)
    lin.weight.data = w_hat
    m = autoawq.gemm.WQLinear_GEMM.from_linear(lin, 4, gs, scales=torch.from_numpy(s.T.astype(np.float32)),
                                               zeros=torch.from_numpy(z.T.astype(np.float32)))
    assert np.array_equal(m.qweight.numpy(), pack_awq_gemm(q)) and np.array_equal(m.qzeros.numpy(), pack_awq_gemm(z))
    assert np.array_equal(unpack_awq_gemm(m.qweight.numpy()), q) and np.array_equal(unpack_awq_gemm(m.qzeros.numpy()), z)
    theirs = autoawq.packing.dequantize_gemm(m.qweight, m.qzeros, m.scales, 4, gs)  # (in, out) float16
    assert np.array_equal(theirs.numpy().T, (dequantize(q, s, z, gs)).astype(np.float16))


def test_awq_gemv_rows_are_natural_order(autoawq):
    """AutoAWQ's GEMV packs rows in natural order with padded zero and scale widths: fit_rows recovers ours."""
    import torch

    from edge_awq.pack import fit_rows

    gs, (out_f, in_f) = 64, (16, 576)
    q, z, s = _grid(out_f, in_f, gs)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    lin.weight.data = torch.from_numpy(dequantize(q, s, z, gs))
    m = autoawq.gemv.WQLinear_GEMV.from_linear(lin, 4, gs, scales=torch.from_numpy(s.astype(np.float32)),
                                               zeros=torch.from_numpy(z.astype(np.float32)))
    assert m.qzeros.shape[1] * 8 > in_f // gs and m.scales.shape[1] > in_f // gs  # padded widths
    assert np.array_equal(fit_rows(m.qweight.numpy(), in_f, 4), pack_bits(q, 4))
    assert np.array_equal(fit_rows(m.qzeros.numpy(), in_f // gs, 4), pack_bits(z, 4))
    assert np.array_equal(m.scales.numpy()[:, : in_f // gs], s)


@pytest.mark.parametrize("n", [32, 172, 576])
def test_compressed_tensors_packing_is_ours(n):
    """compressed-tensors' pack_to_int32 of the signed codes gives our rows (without the padding to 32 values),
    and its zero points packed along the output axis unpack to ours."""
    pytest.importorskip("compressed_tensors")
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from edge_awq.pack import fit_rows, pack_along_columns, unpack_along_columns

    q, z, _ = _grid(12, n, n)
    theirs = pack_to_int32(torch.from_numpy(q.astype(np.int8) - 8), 4).numpy()  # signed codes, as CT stores them
    assert theirs.shape == (12, -(-n * 4 // 32))
    assert np.array_equal(fit_rows(theirs, n, 4), pack_bits(q, 4))
    zp = pack_to_int32(torch.from_numpy(z.astype(np.int8) - 8), 4, packed_dim=0).numpy()
    assert np.array_equal(pack_along_columns(z, 4), zp) and np.array_equal(unpack_along_columns(zp, 4, 12), z)


@pytest.mark.parametrize("out_f,n_groups", [(7, 1), (576, 9), (64, 32), (5, 33)])
def test_flat_zeros_round_trip(out_f, n_groups):
    from edge_awq.pack import pack_zeros_flat, zeros_rows

    z = rng.integers(0, 16, (out_f, n_groups)).astype(np.uint8)
    flat = pack_zeros_flat(z, 4)
    assert flat.shape == (packed_words(out_f * n_groups, 4),)  # no padding between rows
    assert np.array_equal(zeros_rows(flat, out_f, n_groups, 4), pack_bits(z, 4))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_block_by_block_conversion_equals_whole_and_keeps_temporaries_small(bits, monkeypatch):
    """pack_linear / unpack_linear / pack_bits work a block of rows at a time: the same bytes as one block of
    everything, and no temporary near the weight's size (a 70B-wide linear is 0.9 GB in float32)."""
    import tracemalloc

    import edge_awq.pack as pack

    w = rng.standard_normal((300, 640)).astype(np.float32)
    whole = pack_linear(w, bits, 64)
    monkeypatch.setattr(pack, "CHUNK", 640 * 7 + 3)  # blocks of 7 rows (unequal last block)
    blocks = pack_linear(w, bits, 64)
    for a, b in ((whole.qweight, blocks.qweight), (whole.scales, blocks.scales), (whole.zeros, blocks.zeros)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert np.array_equal(unpack_linear(blocks), dequantize(*quantize(w, bits, 64), 64))
    q = rng.integers(0, 2**bits, (300, 640)).astype(np.uint8)
    assert np.array_equal(unpack_bits(pack_bits(q, bits), bits, 640), q)
    big = rng.standard_normal((2048, 2048)).astype(np.float32)  # 16 MiB
    monkeypatch.setattr(pack, "CHUNK", 1 << 14)
    tracemalloc.start()
    try:
        p = pack_linear(big, bits, 128)
        _, peak_pack = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        back = unpack_linear(p)
        peak_unpack = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    packed = p.qweight.nbytes + p.scales.nbytes + p.zeros.nbytes
    assert peak_pack < packed + (2 << 20), (peak_pack, packed)
    assert peak_unpack < back.nbytes + (2 << 20), (peak_unpack, back.nbytes)
