"""The 8-bit-activation kernels against the numpy reference's integer arithmetic (``reference.linear_int8``):
random and real weights, awkward shapes, the fused decode layer, and each instruction set forced in turn."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edge_awq.backends.numba import NumbaBackend, linear_w4, prepare
from edge_awq.backends.numba import gemv_i8 as i8
from edge_awq.backends.numba.isa import FEATURES, ISA, NEEDS
from edge_awq.backends.reference import ReferenceBackend, linear_int8, quantize_activations
from edge_awq.pack import pack_bits, pack_linear, unpack_linear

needs_int8 = pytest.mark.skipif(ISA == "none", reason="this CPU has no integer dot products the kernels use")


def _rel(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _packed(out_f, in_f, group, seed, bits=4, bias=False):
    rng = np.random.default_rng(seed)
    return pack_linear(rng.standard_normal((out_f, in_f)).astype(np.float32), bits, group,
                       bias=rng.standard_normal(out_f).astype(np.float32) if bias else None)


def test_activation_quantization_is_the_references():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 576)) * rng.uniform(0.01, 40, (3, 1))).astype(np.float32)
    x[1, 64:128] = 0  # an all-zero group: scale 1
    x8, scale, xsum = i8.inputs(x, 64)
    r8, rscale, rsum = quantize_activations(x, 64)
    assert np.array_equal(x8, r8) and np.array_equal(scale, rscale) and scale[1, 1] == 1.0
    assert xsum.dtype == np.int32 and np.array_equal(xsum, rsum)
    assert np.abs(x8.astype(np.int32)).max() == 127


@needs_int8
def test_integer_part_is_exact():
    """Scales of 1 and integer activations up to 127: the outputs are the exact integer sums."""
    rng = np.random.default_rng(1)
    out_f, in_f, gs = 9, 256, 64
    q = rng.integers(0, 16, (out_f, in_f)).astype(np.uint8)
    z = rng.integers(0, 16, (out_f, in_f // gs)).astype(np.uint8)
    from edge_awq.model import W4

    w = W4(pack_bits(q, 4), np.ones((out_f, in_f // gs), np.float16), pack_bits(z, 4), gs, 4, in_f)
    x = rng.integers(-127, 128, (2, in_f)).astype(np.float32)
    x[:, ::gs] = 127  # every group's largest magnitude is 127: its scale is exactly 1
    want = np.einsum("oi,ti->to", q.astype(np.int64), x.astype(np.int64)) - np.einsum(
        "og,tg->to", z.astype(np.int64), x.reshape(2, -1, gs).sum(-1).astype(np.int64))
    got = NumbaBackend("int8").linear(x, w)
    assert np.array_equal(got, want.astype(np.float32)) and np.array_equal(linear_int8(x, w), got)


@needs_int8
@pytest.mark.parametrize("bits", [3, 5, 6])
@pytest.mark.parametrize("group", [32, 64])
def test_split_codes_integer_part_is_exact(bits, group):
    """3-, 5- and 6-bit codes from both planes of the layout (every code value, every position of a chunk):
    with scales of 1 and integer activations the outputs are the exact integer sums, decoding and in a
    prompt's tiles; one row of largest codes against activations of 127 (the int16 pair sums' worst case)."""
    from edge_awq.model import W4

    rng = np.random.default_rng(group + bits)
    out_f, in_f = 17, 4 * group
    q = rng.integers(0, 1 << bits, (out_f, in_f)).astype(np.uint8)
    q[3] = (1 << bits) - 1
    z = rng.integers(0, 1 << bits, (out_f, in_f // group)).astype(np.uint8)
    w = W4(pack_bits(q, bits), np.ones((out_f, in_f // group), np.float16), pack_bits(z, bits), group, bits, in_f)
    for T in (1, 11):
        x = rng.integers(-127, 128, (T, in_f)).astype(np.float32)
        x[:, ::group] = 127
        x[0] = 127
        want = np.einsum("oi,ti->to", q.astype(np.int64), x.astype(np.int64)) - np.einsum(
            "og,tg->to", z.astype(np.int64), x.reshape(T, -1, group).sum(-1).astype(np.int64))
        got = NumbaBackend("int8").linear(x, w)
        assert np.array_equal(got, want.astype(np.float32)) and np.array_equal(linear_int8(x, w), got)
    assert NumbaBackend("int8").route_of(w, 1).startswith("a8-")


@needs_int8
@pytest.mark.parametrize("bits,out_f,in_f,group", [(4, 1, 64, 64), (4, 5, 384, 192), (4, 7, 128, 64),
                                                   (4, 33, 576, 64), (4, 13, 1536, 128), (4, 6, 4096, 128),
                                                   (4, 9, 576, 32), (4, 1, 32, 32), (4, 11, 288, 96),
                                                   (8, 9, 576, 64), (8, 3, 64, 32), (8, 5, 1024, 1024),
                                                   (3, 9, 576, 64), (3, 1, 32, 32), (3, 13, 1536, 128),
                                                   (3, 11, 288, 96), (3, 7, 192, 192), (5, 9, 576, 64),
                                                   (5, 1, 32, 32), (5, 11, 288, 96), (6, 13, 1536, 128),
                                                   (6, 9, 576, 32), (6, 7, 192, 192)])
@pytest.mark.parametrize("T", [1, 2, 4, 5, 9])
def test_gemv_matches_the_reference(bits, out_f, in_f, group, T):
    """Rows not a multiple of the block of eight, a single row, one to sixteen chunks a group, 3, 4, 5, 6 and 8
    bits, 3- to 6-bit groups of an odd multiple of 32 (32-column chunks);
    token counts below, at and past a tile."""
    w = _packed(out_f, in_f, group, out_f + in_f + T, bits, bias=True)
    p = prepare(w, repack=True, activations="int8")
    assert p.a8 is not None and p.a8.words.shape[0] == -(-out_f // 8)
    rng = np.random.default_rng(T)
    x = (rng.standard_normal((T, in_f)) * rng.uniform(0.01, 30, (T, 1))).astype(np.float32)
    want = linear_int8(x, w) + w.bias
    assert _rel(linear_w4(x, p), want) <= 2e-6


@needs_int8
@pytest.mark.parametrize("bits,out_f,in_f,group", [(4, 300, 576, 64), (4, 172, 1536, 128), (8, 49, 576, 64),
                                                   (4, 172, 576, 32), (4, 9, 576, 96), (3, 172, 576, 64),
                                                   (3, 9, 1536, 32), (5, 172, 576, 64), (6, 9, 1536, 32)])
@pytest.mark.parametrize("T", [1, 33, 513])
def test_prefill_gemm_matches_the_reference(bits, out_f, in_f, group, T):
    """More tokens than a GEMV takes (a prompt of 1, 33 and 513 tokens: tiles and a tail), the integer GEMM on
    the packed layout, against the reference's arithmetic; rows written, and only they."""
    w = _packed(out_f, in_f, group, T + bits, bits, bias=True)
    p = prepare(w, repack=True, activations="int8")
    x = (np.random.default_rng(T).standard_normal((T, in_f)) * 3).astype(np.float32)
    y = np.full((T, out_f + 5), 7.0, np.float32)
    i8.gemv_kernel(p.a8.words, p.a8.scales, p.a8.zeros, *i8.inputs(x, group), group, y[:, :out_f],
                   i8.kernel_set(p.a8))
    want = linear_int8(x, w)
    assert _rel(y[:, :out_f], want) <= 2e-6 and (y[:, out_f:] == 7.0).all()
    assert _rel(linear_w4(x, p), want + w.bias) <= 2e-6


@needs_int8
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (3, 32), (3, 64), (3, 128),
                                      (5, 32), (5, 64), (6, 32), (6, 128)])
def test_layout_holds_the_file_values(bits, group):
    """The repacked layout, dequantized, is the file's values (every row, block boundaries, the tail)."""
    w = _packed(21, 256, group, bits, bits)
    b = prepare(w, repack=True, activations="int8").a8
    out = np.empty((21, 256), np.float32)
    i8.dequantize_rows(b, 0, out)
    assert np.array_equal(out, unpack_linear(w))
    part = np.empty((7, 256), np.float32)
    i8.dequantize_rows(b, 6, part)  # rows 6..12: across the first block boundary
    assert np.array_equal(part, unpack_linear(w)[6:13])


@needs_int8
def test_real_weights(smollm2_weights):
    """SmolLM2's q/k/v, gate/up, down (group 64 repacked from the GGUF's values) and an int8 head slice."""
    _, w = smollm2_weights
    lw = w.layers[3]
    rng = np.random.default_rng(3)
    for name in ("wq", "wk", "w1", "w2"):
        dense = np.asarray(getattr(lw, name).weight, np.float32)
        packed = pack_linear(dense, 4, 64)
        x = rng.standard_normal((1, dense.shape[1])).astype(np.float32)
        assert _rel(NumbaBackend("int8").linear(x, packed), linear_int8(x, packed)) <= 2e-6, name
    head = pack_linear(np.asarray(w.tok_embeddings[:1000], np.float32), 8, 64)
    x = rng.standard_normal((1, 576)).astype(np.float32)
    assert _rel(NumbaBackend("int8").linear(x, head), linear_int8(x, head)) <= 2e-6


def _fused_and_op_by_op() -> tuple[NumbaBackend, NumbaBackend]:
    """Two int8 backends: one as it runs, one whose one-call decode paths decline (every op by itself)."""
    fused, plain = NumbaBackend("int8"), NumbaBackend("int8")
    plain.decode_block = plain.decode_layers = lambda *a: None
    return fused, plain


@needs_int8
def test_grouped_linears_and_the_fused_layer_match_op_by_op(smollm2_weights):
    """q/k/v as one kernel, and a whole decoder layer as one call, against the same ops run one by one."""
    from edge_awq.model import KVCache, block
    import dataclasses

    _, w = smollm2_weights
    lw = w.layers[5]
    packed = dataclasses.replace(lw, **{n: pack_linear(np.asarray(getattr(lw, n).weight, np.float32), 4, 64)
                                        for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")})
    fused, plain = _fused_and_op_by_op()
    x = np.random.default_rng(5).standard_normal((1, 576)).astype(np.float32)
    outs = []
    for ops in (fused, plain):
        cache = KVCache.allocate(w.args, 8, np.float16)
        for pos in range(3):
            y = block(packed, x, pos, cache, 5, w, ops)
        outs.append(y)
    assert fused._decode_args(packed, w) is not None  # the fused call ran
    assert _rel(outs[0], outs[1]) <= 1e-5


MIXED_LAYER = {"wq": (4, 32), "wk": (8, 64), "wv": (4, 64), "wo": (4, 96), "w1": (8, 32), "w3": (4, 192),
               "w2": (4, 128)}
# a second layer with the widths and chunks the cases below lack: each two-layer model holds all nine tile
# variants, so its step is one compiled call that picks among every one (and the cases share that compile)
OTHER_LAYER = {"wq": (3, 32), "wk": (5, 32), "wv": (6, 64), "wo": (3, 64), "w1": (5, 64), "w3": (6, 32), "w2": (4, 128)}


@needs_int8
@pytest.mark.parametrize("formats", [MIXED_LAYER, {**MIXED_LAYER, "wk": (4, 32), "wv": (4, 32)},
                                     {**MIXED_LAYER, "w1": (4, 192)},
                                     {**MIXED_LAYER, "wv": (3, 64), "w1": (3, 192), "w3": (3, 192), "w2": (3, 32)},
                                     {**MIXED_LAYER, "wq": (5, 64), "wv": (6, 32), "w1": (5, 96), "w3": (6, 96),
                                      "w2": (5, 128)}])
def test_fused_decode_runs_a_mixed_layer(smollm2_weights, formats):
    """A layer of a mixed-precision file (3- to 6- and 8-bit linears, each in its own group size; q/k/v and
    gate/up sharing a group size or not) as one compiled call, and the whole model's step, against op by op."""
    from edge_awq.model import KVCache, block
    import dataclasses

    _, w = smollm2_weights
    layers = [dataclasses.replace(lw, **{n: pack_linear(np.asarray(getattr(lw, n).weight, np.float32), *f[n])
                                         for n in f}) for lw, f in zip(w.layers[4:6], (formats, OTHER_LAYER))]
    small = dataclasses.replace(w, layers=layers, args=dataclasses.replace(w.args, n_layers=2))
    fused, plain = _fused_and_op_by_op()
    x = np.random.default_rng(6).standard_normal((1, 576)).astype(np.float32)
    outs = []
    for ops in (fused, plain):
        cache = KVCache.allocate(small.args, 8, np.float16)
        for pos in range(3):
            y = ops.decode_layers(small, x, pos, cache)
            if y is None:
                y = x
                for i, lw in enumerate(small.layers):
                    y = block(lw, y, pos, cache, i, small, ops)
        outs.append(y)
    step = fused._step_args(small)
    assert step is not None  # the whole step ran as one call
    assert len(step[2].dtype.names) == 9 and step[2] is i8.kernel_union(step[2])  # its kernels: every variant
    assert fused._step_args(small) is not None  # the whole step ran as one call
    assert _rel(outs[0], outs[1]) <= 1e-5


@needs_int8
def test_a_three_bit_linear_with_int16_activations_runs_its_layer_op_by_op(smollm2_weights):
    """int16 activations have no 3-bit layout (the generic kernel runs it): the one-call layer declines."""
    import dataclasses

    _, w = smollm2_weights
    lw = w.layers[2]
    packed = dataclasses.replace(lw, **{n: pack_linear(np.asarray(getattr(lw, n).weight, np.float32),
                                                       3 if n == "wv" else 4, 64) for n in MIXED_LAYER})
    assert NumbaBackend("int16")._decode_args(packed, w) is None
    assert NumbaBackend("int8")._decode_args(packed, w) is not None


@needs_int8
def test_routes_name_what_runs():
    nb = NumbaBackend("int8")
    assert nb.route_of(_packed(8, 128, 64, 0), 1) == f"a8-{ISA}"
    assert nb.route_of(_packed(8, 128, 64, 0), 40) == f"a8-gemm-{ISA}"
    assert nb.route_of(_packed(8, 96, 32, 0), 1) == f"a8-{ISA}"  # 4-bit groups of 32: chunks of 32
    assert nb.route_of(_packed(8, 96, 16, 0), 1) != f"a8-{ISA}"  # groups of 16: not this layout
    assert nb.route_of(_packed(8, 96, 32, 0, 3), 1) == f"a8-{ISA}"  # 3-bit: the two-plane layout
    assert NumbaBackend("int16").route_of(_packed(8, 128, 64, 0, 3), 1) == "any-float"
    assert NumbaBackend("int16").route_of(_packed(8, 128, 64, 0), 1) != f"a8-{ISA}"


FORCED = """
import json, sys
import numpy as np
from edge_awq.backends.numba import NumbaBackend
from edge_awq.backends.numba.isa import ISA
from edge_awq.backends.reference import linear_int8
from edge_awq.pack import pack_linear
rng = np.random.default_rng(0)
errs = []
for bits, gs, out_f, in_f, T in [(4, 64, 33, 576, 1), (4, 128, 7, 4096, 3), (8, 64, 9, 576, 2), (3, 64, 17, 576, 1),
                                  (3, 32, 9, 576, 9), (4, 32, 9, 576, 5), (5, 64, 17, 576, 1), (6, 32, 9, 576, 9)]:
    w = pack_linear(rng.standard_normal((out_f, in_f)).astype(np.float32), bits, gs)
    x = rng.standard_normal((T, in_f)).astype(np.float32)
    nb = NumbaBackend("int8")
    got = nb.linear(x, w)
    ref = linear_int8(x, w)
    errs.append(float(np.abs(got - ref).max() / np.abs(ref).max()))
from edge_awq.model import W4
from edge_awq.pack import pack_bits
for bits in (3, 5, 6):  # largest codes times activations of 127: the int16 pair sums' worst case, exact
    q = np.full((9, 128), (1 << bits) - 1, np.uint8)
    w = W4(pack_bits(q, bits), np.ones((9, 2), np.float16), pack_bits(np.zeros((9, 2), np.uint8), bits), 64, bits, 128)
    x = np.full((2, 128), 127.0, np.float32)
    errs.append(float(np.abs(nb.linear(x, w) - 127.0 * 128 * ((1 << bits) - 1)).max()))
print(json.dumps({"isa": ISA, "route": nb.route_of(w, 1), "err": max(errs)}))
"""


@pytest.mark.parametrize("isa", ["avx2", "avxvnni", "avx512vnni", "i8mm", "sdot", "neon"])
def test_each_instruction_set_in_turn(isa, tmp_path):
    """Each variant this CPU has, forced (its own numba cache: compiled code is cached by CPU, not by variant)."""
    if not all(FEATURES.get(f) for f in NEEDS[isa]):
        pytest.skip(f"this CPU has no {isa}")
    env = {**os.environ, "EDGE_AWQ_ISA": isa, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    r = subprocess.run([sys.executable, "-c", FORCED], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["isa"] == isa and out["route"] == f"a8-{isa}" and out["err"] <= 2e-6


def test_reference_backend_runs_the_same_arithmetic():
    w = _packed(7, 128, 64, 9)
    x = np.random.default_rng(9).standard_normal((2, 128)).astype(np.float32)
    assert np.array_equal(ReferenceBackend("int8").linear(x, w), linear_int8(x, w))
    assert _rel(ReferenceBackend("int8").linear(x, w), ReferenceBackend().linear(x, w)) < 0.02  # 8-bit error


@needs_int8
def test_kernels_compile_only_the_widths_their_weights_hold():
    """A kernel set names the (bits, chunk columns) tile variants of its weights and no others, one array per
    set (so one compile each), and a 4-bit weight runs the kernel compiled for the 4-bit tiles alone."""
    p4, p3, p8 = (prepare(_packed(16, 576, g, 1, bits), repack=True, activations="int8")
                  for bits, g in ((4, 64), (3, 96), (8, 64)))
    assert i8.kernel_set(p4.a8).dtype.names == ("w4c64",)
    assert i8.kernel_set(p8.a8, p4.a8, p3.a8).dtype.names == ("w3c32", "w4c64", "w8c32")
    assert i8.kernel_set(p4.a8, p3.a8) is i8.kernel_union(i8.kernel_set(p3.a8), i8.kernel_set(p4.a8))
    x = np.random.default_rng(0).standard_normal((3, 576)).astype(np.float32)
    linear_w4(x, p4)
    import numba

    own = numba.typeof(i8.kernel_set(p4.a8))
    assert own in {sig[-1] for sig in i8.gemv_kernel.signatures}  # the 4-bit weight's kernel: its own tiles only
