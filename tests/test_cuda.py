"""The cuda backend: how it refuses without a GPU, and (marked cuda, run on a Jetson or any NVIDIA
GPU) every op and the whole model against the numpy reference."""

import subprocess
import sys

import numpy as np
import pytest

from edge_awq.backends.reference import ReferenceBackend
from edge_awq.errors import BackendUnavailable
from edge_awq.model import Dense, forward
from edge_awq.backends import pick_backend
from edge_awq.pack import pack_linear

ref = ReferenceBackend()


def _has_gpu(prefix) -> str | None:
    from edge_awq.backends.cuda import CudaBackend

    try:
        CudaBackend(prefix)
    except BackendUnavailable as e:
        return str(e)
    return None


# ---- without a GPU (this project's machines) ----

def test_missing_library_names_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_AWQ_NATIVE", str(tmp_path))
    with pytest.raises(BackendUnavailable) as e:
        pick_backend("cuda")
    assert "edge-awq build-native" in str(e.value) and "\n" not in str(e.value)


def test_no_device_is_one_line_and_auto_falls_back(cuda_build, monkeypatch):
    monkeypatch.setenv("EDGE_AWQ_NATIVE", str(cuda_build[0]))
    why = _has_gpu(cuda_build[0])
    if why is None:
        pytest.skip("a CUDA device answers here")
    assert "no CUDA device answers" in why and "\n" not in why
    ops, reason = pick_backend("auto")
    assert ops.name == "numba" and reason.startswith("no cuda: ") and "no CUDA device answers" in reason


def test_chat_on_cuda_without_a_device_fails_with_one_line(cuda_build, stories_path, tmp_path):
    env = {"EDGE_AWQ_NATIVE": str(cuda_build[0]), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    if _has_gpu(cuda_build[0]) is None:
        pytest.skip("a CUDA device answers here")
    run = [sys.executable, "-m", "edge_awq", "chat", str(stories_path), "--prompt", "Once", "--max-new-tokens", "4"]
    r = subprocess.run(run + ["--backend", "cuda"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "no CUDA device answers" in r.stderr, r.stderr
    r = subprocess.run(run + ["--backend", "auto"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    assert "[backend: numba (no cuda: " in r.stderr and "no CUDA device answers" in r.stderr


# ---- on a GPU ----

@pytest.fixture(scope="module")
def gpu(cuda_build):
    from edge_awq.backends.cuda import CudaBackend

    why = _has_gpu(cuda_build[0])
    if why is not None:
        pytest.skip(f"needs a CUDA device: {why}")
    return CudaBackend(cuda_build[0])


def _rel(got, want) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.mark.cuda
@pytest.mark.parametrize("bits,group", [(4, 64), (4, 576), (3, 64), (5, 64), (6, 32), (8, 32), (16, 0)])
@pytest.mark.parametrize("T", [1, 3, 7, 33])
def test_linear_on_gpu(gpu, bits, group, T):
    rng = np.random.default_rng(T * bits)
    dense = rng.standard_normal((173, 576)).astype(np.float32)
    w = Dense(dense.astype(np.float16)) if bits == 16 else pack_linear(dense, bits, group)
    x = rng.standard_normal((T, 576)).astype(np.float32)
    assert _rel(gpu.to_host(gpu.linear(x, w)), ref.linear(x, w)) <= 2e-3  # fp16 output


@pytest.mark.cuda
def test_small_ops_on_gpu(gpu):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 576)).astype(np.float32)
    wn = rng.standard_normal(576).astype(np.float32)
    assert _rel(gpu.to_host(gpu.rmsnorm(x, wn, 1e-5)), ref.rmsnorm(x, wn, 1e-5)) <= 2e-3
    g, u = rng.standard_normal((2, 5, 1536)).astype(np.float32)
    assert _rel(gpu.to_host(gpu.silu_mul(g, u)), ref.silu_mul(g, u)) <= 2e-3
    assert _rel(gpu.to_host(gpu.add(g, u)), g + u) <= 2e-3
    inv = (10000.0 ** (-np.arange(0, 64, 2) / 64)).astype(np.float32)
    q = rng.standard_normal((5, 9, 64)).astype(np.float32)
    for inter in (False, True):
        assert _rel(gpu.to_host(gpu.rope(q, 77, inv, inter)), ref.rope(q, 77, inv, inter)) <= 2e-3
    table = rng.standard_normal((100, 64)).astype(np.float16)
    assert np.array_equal(gpu.to_host(gpu.embed(table, [3, 99, 0])), table[[3, 99, 0]].astype(np.float32))


@pytest.mark.cuda
def test_attention_on_gpu_prefill_then_decode(gpu, stories_weights):
    src, w = stories_weights
    a = w.args
    rng = np.random.default_rng(1)
    host, dev = ref.allocate_cache(a, 300), gpu.allocate_cache(a, 300)
    for pos, T in ((0, 200), (200, 1), (201, 7)):
        q = rng.standard_normal((T, a.n_heads, a.head_dim)).astype(np.float32)
        k, v = rng.standard_normal((2, T, a.n_kv_heads, a.head_dim)).astype(np.float32)
        want = ref.attention(q, k, v, host, 0, pos)
        assert _rel(gpu.to_host(gpu.attention(q, k, v, dev, 0, pos)), want) <= 5e-3, (pos, T)


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["stories", "smollm2"])
def test_model_on_gpu_agrees_with_reference(gpu, which, request):
    """Teacher-forced logits of 64 tokens: close, and the same top token at >= 95 % of positions."""
    src, w = request.getfixturevalue(f"{which}_weights")
    if which == "smollm2":
        w = _packed(w)
    tokens = np.random.default_rng(2).integers(3, w.args.vocab_size, 64)
    want = forward(w, tokens, 0, ref.allocate_cache(w.args, 64), ref)
    got = forward(gpu.prepare(w), tokens, 0, gpu.allocate_cache(w.args, 64), gpu)
    assert got.shape == want.shape and got.dtype == np.float32
    assert _rel(got, want) <= 5e-2
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95


def _packed(w):
    """SmolLM2 with every layer's linears packed to W4 g64 (what an .eawq file holds)."""
    from dataclasses import replace

    from edge_awq.model import LINEARS

    layers = [replace(lw, **{n: pack_linear(np.asarray(getattr(lw, n).weight, np.float32), 4, 64) for n in LINEARS})
              for lw in w.layers]
    return replace(w, layers=layers)
