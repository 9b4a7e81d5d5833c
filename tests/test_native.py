"""native/: the CUDA library builds clean for sm_87 (or EDGE_AWQ_CUDA_ARCH's), and its arithmetic (the CPU
build of the shared header) equals the numpy reference on random and real weights and awkward shapes."""

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_awq.backends.cuda import abi_cdef
from edge_awq.backends.reference import ReferenceBackend
from edge_awq.model import Dense, KVCache
from edge_awq.backends.native import CPU_ARITH_LIB, CUDA_LIB, build, source_root
from edge_awq.pack import pack_linear
from tests.conftest import CUDA_ARCH

cffi = pytest.importorskip("cffi")
ROOT = source_root()
INCLUDE = ROOT / "native" / "include"
ref = ReferenceBackend()


@pytest.fixture(scope="session")
def arith(tmp_path_factory):
    """(ffi, lib) of the CPU test library, built by the same CMake project without CUDA."""
    d = tmp_path_factory.mktemp("arith")
    build(ROOT, d, None, cuda=False, cpu_arith=True)
    ffi = cffi.FFI()
    ffi.cdef(abi_cdef((INCLUDE / "edge_awq_cuda.h").read_text()))
    ffi.cdef(abi_cdef((INCLUDE / "edge_awq_arith_cpu.h").read_text()), override=True)
    return ffi, ffi.dlopen(str(d / CPU_ARITH_LIB))


def _functions(header: Path) -> list[str]:
    return re.findall(r"\b(eawq_\w+)\s*\(", abi_cdef(header.read_text()))


# ---- the CUDA build ----

def test_cuda_library_builds_without_warnings_or_spills(cuda_build):
    prefix, log = cuda_build
    assert (prefix / "lib" / CUDA_LIB).is_file() and (prefix / "include" / "edge_awq_cuda.h").is_file()
    kernels = re.findall(rf"Compiling entry function '(\w+)' for 'sm_{CUDA_ARCH}'", log)
    assert len(kernels) >= 9, log[-2000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert spills and all(s == ("0", "0") for s in spills), spills
    assert "warning" not in log.lower()


def test_cuda_library_holds_code_for_its_architecture_only(cuda_build):
    cuobjdump = shutil.which("cuobjdump") or next(Path(sys.prefix).glob("lib/python*/site-packages/nvidia/*/bin/cuobjdump"), None)
    if cuobjdump is None:
        pytest.skip("cuobjdump not installed: pip install nvidia-cuda-cuobjdump")
    import subprocess

    out = subprocess.run([str(cuobjdump), "--list-elf", str(cuda_build[0] / "lib" / CUDA_LIB)],
                         capture_output=True, text=True, check=True).stdout
    assert f"sm_{CUDA_ARCH}" in out and not re.search(rf"sm_(?!{CUDA_ARCH})\d+", out), out


def test_every_abi_function_resolves(cuda_build):
    header = cuda_build[0] / "include" / "edge_awq_cuda.h"
    ffi = cffi.FFI()
    ffi.cdef(abi_cdef(header.read_text()))
    lib = ffi.dlopen(str(cuda_build[0] / "lib" / CUDA_LIB))
    names = _functions(header)
    assert len(names) >= 20 and "eawq_linear" in names
    for name in names:
        assert getattr(lib, name) is not None
    assert lib.eawq_abi_version() == lib.EAWQ_ABI_VERSION == 1
    assert ffi.string(lib.eawq_status_str(lib.EAWQ_ERR_SHAPE)) == b"shape not supported"


def test_cpu_library_exports_what_its_header_declares(arith):
    ffi, lib = arith
    for name in _functions(INCLUDE / "edge_awq_arith_cpu.h"):
        assert getattr(lib, name) is not None


# ---- fp16 and the 4-bit reorder ----

def test_half_to_float_is_exact_for_every_half(arith):
    ffi, lib = arith
    bits = np.arange(1 << 16, dtype=np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    got = np.array([lib.eawq_cpu_h2f(int(b)) for b in bits], np.float32)
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), bits[~same][:5]


def test_float_to_half_rounds_like_numpy(arith):
    ffi, lib = arith
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.integers(-9, 6, 20000),
                        np.float32([0.0, -0.0, 65504, 65519.9, 65520, -1e9, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26,
                                    6.1e-5, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, np.inf, -np.inf])])
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    got = np.array([lib.eawq_cpu_f2h(float(v)) for v in x], np.uint16)
    assert (got == want).all(), x[got != want][:5]
    assert lib.eawq_cpu_f2h(float("nan")) & 0x7C00 == 0x7C00


def test_interleave_puts_pairs_in_the_two_half_words(arith):
    ffi, lib = arith
    words = np.array([0x76543210, 0xFEDCBA98], np.uint32)
    lib.eawq_repack_w4(ffi.cast("uint32_t *", ffi.from_buffer(words)), 2)
    assert [hex(int(w)) for w in words] == ["0x75316420", "0xfdb9eca8"]
    for i in range(4):  # (word >> 4i) & 0x000F000F holds values (2i, 2i + 1)
        assert (int(words[0]) >> 4 * i) & 0xF == 2 * i and (int(words[0]) >> (4 * i + 16)) & 0xF == 2 * i + 1


# ---- linears ----

def _linear_desc(ffi, lib, w, keep):
    """An eawq_linear_t over host copies of a W4 or Dense weight (4-bit rows interleaved)."""
    if isinstance(w, Dense):
        weight = np.ascontiguousarray(w.weight, np.float16).view(np.uint16)
        keep.append(weight)
        out_f, in_f = weight.shape
        return ffi.new("eawq_linear_t *", {"kind": 1, "bits": 16, "group_size": in_f, "in_features": in_f,
                                           "out_features": out_f, "weight": ffi.from_buffer("uint16_t[]", weight)})
    words = np.array(w.qweight, np.uint32)
    if w.bits == 4:
        lib.eawq_repack_w4(ffi.from_buffer("uint32_t[]", words), words.size)
    scales = np.ascontiguousarray(w.scales).view(np.uint16)
    zeros = np.ascontiguousarray(w.zeros, np.uint32)
    bias = None if w.bias is None else np.ascontiguousarray(w.bias, np.float32)
    keep += [words, scales, zeros, bias]
    return ffi.new("eawq_linear_t *", {
        "kind": 0, "bits": w.bits, "group_size": w.group_size, "in_features": w.in_features,
        "out_features": w.shape[0], "zero_words": zeros.shape[1], "qweight": ffi.from_buffer("uint32_t[]", words),
        "scales": ffi.from_buffer("uint16_t[]", scales), "zeros": ffi.from_buffer("uint32_t[]", zeros),
        "bias": ffi.from_buffer("float[]", bias) if bias is not None else ffi.NULL})


def _cpu_linear(arith, w, x):
    ffi, lib = arith
    keep = []
    desc = _linear_desc(ffi, lib, w, keep)
    xh = np.ascontiguousarray(x, np.float16).view(np.uint16)
    out_f = w.weight.shape[0] if isinstance(w, Dense) else w.shape[0]
    y = np.empty((x.shape[0], out_f), np.float32)
    assert lib.eawq_cpu_linear(desc, ffi.from_buffer("uint16_t[]", xh), ffi.from_buffer("float[]", y), x.shape[0]) == 0
    return y


def _rel(got, want) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


SHAPES = [(7, 64, 32), (33, 576, 64), (5, 172, 172), (16, 1536, 128), (3, 96, 96)]  # (out, in, group)


@pytest.mark.parametrize("bits", [4, 3, 5, 6, 8])  # every width a mixed file holds
@pytest.mark.parametrize("out_f,in_f,group", SHAPES)
@pytest.mark.parametrize("T", [1, 3, 7])
def test_packed_linear_matches_reference(arith, bits, out_f, in_f, group, T):
    rng = np.random.default_rng(out_f * in_f + bits + T)
    w = pack_linear(rng.standard_normal((out_f, in_f)).astype(np.float32), bits, group,
                    bias=rng.standard_normal(out_f).astype(np.float32))
    x = rng.standard_normal((T, in_f)).astype(np.float32)
    got = _cpu_linear(arith, w, x)
    x16 = x.astype(np.float16).astype(np.float32)  # the kernels read fp16 activations
    assert _rel(got, ref.linear(x16, w)) <= 1e-5  # only the order of the sums differs
    assert _rel(got, ref.linear(x, w)) <= 1e-3


@pytest.mark.parametrize("T", [1, 9])
def test_dense_fp16_linear_matches_reference(arith, T):
    rng = np.random.default_rng(T)
    w = Dense(rng.standard_normal((45, 200)).astype(np.float16))
    x = rng.standard_normal((T, 200)).astype(np.float32)
    assert _rel(_cpu_linear(arith, w, x), ref.linear(x, w)) <= 1e-3


def test_gemv_sums_lanes_in_the_warps_order(arith):
    """T <= 4 replays 32 lanes and their butterfly: a different order from the GEMM's, same value."""
    rng = np.random.default_rng(5)
    w = pack_linear(rng.standard_normal((8, 4096)).astype(np.float32), 4, 128)
    x = rng.standard_normal((5, 4096)).astype(np.float32)
    gemm = _cpu_linear(arith, w, x)[:1]
    gemv = _cpu_linear(arith, w, x[:1])
    assert _rel(gemv, gemm) <= 1e-5 and not np.array_equal(gemv, gemm)


def test_real_weights_match_reference(arith, stories_weights, smollm2_weights):
    """stories260K (widths 64 and 172, one group per row) and SmolLM2 (width 576, group 64; 1536 in)."""
    rng = np.random.default_rng(0)
    for (_, w), group_of in ((stories_weights, lambda n: n), (smollm2_weights, lambda n: 64)):
        lw = w.layers[0]
        for name in ("wq", "wk", "w1", "w2"):
            dense = np.asarray(getattr(lw, name).weight, np.float32)
            for bits in (4, 3):
                packed = pack_linear(dense, bits, group_of(dense.shape[1]))
                x = rng.standard_normal((2, dense.shape[1])).astype(np.float32)
                assert _rel(_cpu_linear(arith, packed, x), ref.linear(x, packed)) <= 1e-3, (name, bits)


def test_unsupported_group_size_is_refused(arith):
    w = pack_linear(np.ones((4, 64), np.float32), 4, 16)
    ffi, lib = arith
    keep = []
    desc = _linear_desc(ffi, lib, w, keep)
    y = np.empty((1, 4), np.float32)
    x = np.zeros((1, 64), np.float16).view(np.uint16)
    assert lib.eawq_cpu_linear(desc, ffi.from_buffer("uint16_t[]", x), ffi.from_buffer("float[]", y), 1) == \
        lib.EAWQ_ERR_SHAPE


# ---- the small ops ----

def _h(a):
    return np.ascontiguousarray(a, np.float16).view(np.uint16)


def test_rmsnorm_silu_and_rope_match_reference(arith):
    ffi, lib = arith
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 576)).astype(np.float16)
    weight = rng.standard_normal(576).astype(np.float32)
    y = np.empty((3, 576), np.float32)
    lib.eawq_cpu_rmsnorm(ffi.from_buffer("uint16_t[]", _h(x)), ffi.from_buffer("float[]", weight),
                         ffi.from_buffer("float[]", y), 3, 576, 1e-5)
    assert _rel(y, ref.rmsnorm(x.astype(np.float32), weight, 1e-5)) <= 1e-5
    g, u = (rng.standard_normal(1000).astype(np.float16) * 20 for _ in range(2))
    out = np.empty(1000, np.float32)
    lib.eawq_cpu_silu_mul(ffi.from_buffer("uint16_t[]", _h(g)), ffi.from_buffer("uint16_t[]", _h(u)),
                          ffi.from_buffer("float[]", out), 1000)
    assert _rel(out, ref.silu_mul(g.astype(np.float32), u.astype(np.float32))) <= 1e-5
    inv_freq = (10000.0 ** (-np.arange(0, 64, 2) / 64)).astype(np.float32)
    q = rng.standard_normal((5, 3, 64)).astype(np.float16)
    for pos in (0, 1000, 1_000_000):  # far positions too: the angle is reduced in double, not taken in float
        for interleaved in (False, True):
            y = np.empty((5, 3, 64), np.float32)
            lib.eawq_cpu_rope(ffi.from_buffer("uint16_t[]", _h(q)), ffi.from_buffer("float[]", y), 5, 3, 64, pos,
                              ffi.from_buffer("float[]", inv_freq), interleaved)
            assert _rel(y, ref.rope(q.astype(np.float32), pos, inv_freq, interleaved)) <= 1e-5, (pos, interleaved)


@pytest.mark.parametrize("T,pos,n_heads,n_kv", [(1, 0, 4, 4), (1, 300, 9, 3), (7, 0, 9, 3), (5, 250, 8, 2)])
def test_attention_matches_reference(arith, T, pos, n_heads, n_kv):
    """Tiles of 128 keys and their online softmax, grouped-query heads, a 1-token and a longer prompt."""
    from edge_awq.config import ModelArgs

    ffi, lib = arith
    hd, max_seq = 64, 320
    rng = np.random.default_rng(T + pos)
    a = ModelArgs("llama", dim=n_heads * hd, hidden_dim=4, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv,
                  head_dim=hd, vocab_size=8, max_seq_len=max_seq)
    past = [rng.standard_normal((pos + T, n_kv, hd)).astype(np.float16).astype(np.float32) for _ in range(2)]
    q = rng.standard_normal((T, n_heads, hd)).astype(np.float16)
    cache = KVCache.allocate(a, max_seq)
    if pos:
        cache.write(0, 0, past[0][:pos], past[1][:pos])
    want = ref.attention(q.astype(np.float32), past[0][pos:], past[1][pos:], cache, 0, pos)
    k_cache, v_cache = (_h(np.ascontiguousarray(p.transpose(1, 0, 2))) for p in past)  # (n_kv, S, hd)
    k_full, v_full = (np.zeros((n_kv, max_seq, hd), np.uint16) for _ in range(2))
    k_full[:, : pos + T], v_full[:, : pos + T] = k_cache, v_cache
    out = np.empty((T, n_heads * hd), np.float32)
    assert lib.eawq_cpu_attention(ffi.from_buffer("uint16_t[]", _h(q)), ffi.from_buffer("uint16_t[]", k_full),
                                  ffi.from_buffer("uint16_t[]", v_full), ffi.from_buffer("float[]", out), T,
                                  n_heads, n_kv, hd, pos, max_seq) == 0
    assert _rel(out, want) <= 1e-3
