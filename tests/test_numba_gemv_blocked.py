"""The 4- and 8-bit GEMVs on the block layout against the numpy reference: random and real
weights, awkward shapes; the layout's dequantization; what repacking does to memory."""

import gc
import mmap

import numpy as np
import pytest

from edge_awq.backends.numba import gemv_blocked as blocked
from edge_awq.backends.numba import NumbaBackend, linear_w4, linears_w4, prepare
from edge_awq.backends.reference import ReferenceBackend
from edge_awq.pack import pack_linear, unpack_linear
from edge_awq.formats.tensorfile import release_array

needs_avx2 = pytest.mark.skipif(not blocked.AVAILABLE, reason="needs x86 AVX2 (elsewhere the float GEMV runs)")
ref = ReferenceBackend()


def _rel(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _packed(out_f, in_f, group, seed, bias=False, bits=4):
    rng = np.random.default_rng(seed)
    return pack_linear(rng.standard_normal((out_f, in_f)).astype(np.float32), bits, group,
                       bias=rng.standard_normal(out_f).astype(np.float32) if bias else None)


@needs_avx2
@pytest.mark.parametrize("out_f,in_f,group", [(1, 64, 64), (5, 384, 192), (7, 128, 64), (33, 576, 64),
                                              (13, 1536, 128), (6, 4096, 128), (3, 1024, 1024)])
@pytest.mark.parametrize("T", [1, 2, 4])
def test_blocked_gemv_matches_reference(out_f, in_f, group, T):
    """Rows not a multiple of the block, one and two chunks a group, odd chunk counts (192: three)."""
    w = _packed(out_f, in_f, group, out_f + in_f + T, bias=True)
    p = prepare(w, repack=True)
    assert p.blocked is not None and p.blocked.words.shape[0] == -(-out_f // 4)
    rng = np.random.default_rng(T)
    x = (rng.standard_normal((T, in_f)) * rng.uniform(0.01, 30, (T, 1))).astype(np.float32)
    assert _rel(linear_w4(x, p), ref.linear(x, w)) <= 1e-3


@needs_avx2
def test_blocked_dequantization_is_the_file_values_exactly():
    """The prefill path's rows from the block layout equal the file's dequantized rows (to float32 rounding)."""
    w = _packed(11, 384, 64, 1)
    b = prepare(w, repack=True).blocked
    out = np.empty((7, 384), np.float32)
    blocked.dequantize_rows(b, 4, out)  # rows 4..10: a block boundary, the tail
    want = unpack_linear(w)[4:11].astype(np.float32)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


@needs_avx2
@pytest.mark.parametrize("T", [5, 33])
def test_blocked_prefill_matches_reference(T):
    w = _packed(300, 576, 64, T, bias=True)
    p = prepare(w, repack=True)
    x = np.random.default_rng(T).standard_normal((T, 576)).astype(np.float32)
    assert _rel(linear_w4(x, p), ref.linear(x, w)) <= 1e-3


@needs_avx2
def test_blocked_fused_linears_on_real_weights(smollm2_weights):
    """q, k, v and gate, up of SmolLM2's layer 5 (W4 g64) through the one three-weight kernel."""
    _, w = smollm2_weights
    lw = w.layers[5]
    x = np.random.default_rng(0).standard_normal((1, 576)).astype(np.float32)
    for names in (("wq", "wk", "wv"), ("w1", "w3")):
        ws = [pack_linear(np.asarray(getattr(lw, n).weight, np.float32), 4, 64) for n in names]
        ps = [prepare(p, repack=True) for p in ws]
        assert all(p.blocked is not None for p in ps)
        for got, wt in zip(linears_w4(x, ps), ws):
            assert _rel(got, ref.linear(x, wt)) <= 1e-3


@needs_avx2
def test_blocked_down_projection_on_real_weights(smollm2_weights):
    """SmolLM2's down projection (576 x 1536, W4 g64) with an activation of SiLU-like spread."""
    _, w = smollm2_weights
    wt = pack_linear(np.asarray(w.layers[2].w2.weight, np.float32), 4, 64)
    x = (np.random.default_rng(1).standard_normal((1, 1536)) ** 3).astype(np.float32)
    assert _rel(linear_w4(x, prepare(wt, repack=True)), ref.linear(x, wt)) <= 1e-3


@needs_avx2
@pytest.mark.parametrize("out_f,in_f,group", [(1, 32, 32), (6, 96, 96), (9, 576, 64), (5, 4096, 1024),
                                              (37, 1536, 128)])
@pytest.mark.parametrize("T", [1, 3])
def test_blocked_8bit_gemv_matches_reference(out_f, in_f, group, T):
    """The int8 head's layout: 32 columns a chunk, two bytes a word."""
    w = _packed(out_f, in_f, group, out_f * T, bits=8)
    p = prepare(w, repack=True)
    assert p.blocked is not None and p.blocked.bits == 8
    x = np.random.default_rng(T).standard_normal((T, in_f)).astype(np.float32)
    assert _rel(linear_w4(x, p), ref.linear(x, w)) <= 1e-3


@needs_avx2
def test_blocked_8bit_dequantization_and_prefill():
    w = _packed(10, 192, 64, 4, bits=8)
    b = prepare(w, repack=True).blocked
    out = np.empty((9, 192), np.float32)
    blocked.dequantize_rows(b, 1, out)
    np.testing.assert_allclose(out, unpack_linear(w)[1:10].astype(np.float32), rtol=1e-6, atol=1e-6)
    x = np.random.default_rng(0).standard_normal((7, 192)).astype(np.float32)
    assert _rel(linear_w4(x, prepare(w, repack=True)), ref.linear(x, w)) <= 1e-3


@needs_avx2
def test_blocked_8bit_head_rows_on_real_weights(smollm2_weights):
    """The first 3000 rows of SmolLM2's (tied) head, packed 8-bit g64 as ``export --head int8`` does."""
    _, w = smollm2_weights
    wt = pack_linear(np.asarray(w.output.weight[:3000], np.float32), 8, 64)
    x = np.random.default_rng(2).standard_normal((1, 576)).astype(np.float32)
    assert _rel(linear_w4(x, prepare(wt, repack=True)), ref.linear(x, wt)) <= 1e-3


def test_layout_applies_to_4_bits_in_groups_of_64_and_8_bits_in_groups_of_32():
    assert not blocked.usable(4, 32) and not blocked.usable(3, 64) and not blocked.usable(8, 16)
    assert not blocked.usable(8, 2048)  # int32 group sums would no longer be exact
    assert blocked.usable(4, 128) == blocked.usable(8, 128) == blocked.usable(8, 32) == blocked.AVAILABLE


def test_backend_forgets_a_prepared_weight_when_it_is_dropped():
    """Layers read lazily are prepared as they come; their repacked copies must not outlive them."""
    ops = NumbaBackend("int16")
    w = _packed(8, 128, 64, 3)
    ops.linear(np.ones((1, 128), np.float32), w)
    assert len(ops._prepared_w4) == 1
    del w
    gc.collect()
    assert len(ops._prepared_w4) == 0


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not hasattr(mmap, "MADV_DONTNEED"), reason="needs madvise")
def test_release_array_drops_mapped_pages_and_keeps_the_data(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 32 << 20, dtype=np.uint8)
    path = tmp_path / "blob"
    data.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    view = mm[4096 * 3 + 100 : 24 << 20].view(np.uint8)
    assert int(view.sum(dtype=np.int64)) == int(data[4096 * 3 + 100 : 24 << 20].sum(dtype=np.int64))  # resident
    before = _rss_file_kb()
    release_array(view)
    assert before - _rss_file_kb() >= 20 << 10  # about 24 MB left the resident set
    assert np.array_equal(view, data[4096 * 3 + 100 : 24 << 20])  # and reads back from the file


def test_release_array_leaves_ordinary_memory_alone():
    a = np.arange(1 << 20, dtype=np.uint8)
    release_array(a)  # anonymous memory: DONTNEED would zero it
    assert np.array_equal(a, np.arange(1 << 20, dtype=np.uint8))
