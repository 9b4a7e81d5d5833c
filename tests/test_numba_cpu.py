"""The numba kernels against the numpy reference: random and real weights, awkward shapes."""

import numpy as np
import pytest

pytest.importorskip("numba")

from edge_awq.backends.numba import NumbaBackend, linear_f16, linear_w4, prepare  # noqa: E402
from edge_awq.backends.reference import ReferenceBackend  # noqa: E402
from edge_awq.formats.load import load_weights, open_source  # noqa: E402
from edge_awq.model import KVCache, forward  # noqa: E402
from edge_awq.pack import pack_linear, unpack_linear  # noqa: E402

rng = np.random.default_rng(0)


def rel_err(got, want):
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


@pytest.mark.parametrize("bits,gs,out_f,in_f", [
    (4, 64, 33, 576), (4, 128, 7, 4096), (4, 172, 5, 172), (4, 4, 16, 172), (3, 64, 9, 576), (3, 4, 3, 172),
    (4, 32, 1, 64), (3, 172, 2, 172), (8, 64, 5, 576), (8, 172, 4, 172), (2, 32, 3, 64),
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


@pytest.mark.parametrize("T", [1, 2, 4, 5, 40])
@pytest.mark.parametrize("out_f,in_f", [(1, 64), (7, 172), (300, 576)])
def test_fp16_linear_reads_half_weights(T, out_f, in_f):
    w = (rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float16)
    x = rng.standard_normal((T, in_f)).astype(np.float32)
    assert rel_err(linear_f16(x, w), x @ w.astype(np.float32).T) <= 1e-5


def test_half_conversion_is_exact_for_every_finite_pattern():
    from numba import njit

    from edge_awq.backends.numba.intrinsics import half_f32

    @njit
    def convert(bits, out):
        for i in range(bits.shape[0]):
            out[i] = half_f32(bits[i])

    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    finite = np.isfinite(bits.view(np.float16))
    out = np.empty(65536, np.float32)
    convert(bits, out)
    np.testing.assert_array_equal(out[finite], bits.view(np.float16)[finite].astype(np.float32))


def test_real_head_rows_fp16_and_8bit(smollm2_weights):
    src, _ = smollm2_weights
    emb = np.asarray(src.get("tok_embeddings"))[:2000].astype(np.float16)  # (2000, 576)
    x = rng.standard_normal((1, 576)).astype(np.float32)
    assert rel_err(linear_f16(x, emb), x @ emb.astype(np.float32).T) <= 1e-5
    p = pack_linear(emb.astype(np.float32), 8, 64)
    assert rel_err(linear_w4(x, prepare(p)), x @ unpack_linear(p).T) <= 1e-3


def test_greedy_tokens_agree_with_reference(tmp_path):
    from tests.golden.regen import GOLDEN_FILE

    w = load_weights(open_source(GOLDEN_FILE))
    outs = []
    for ops in (ReferenceBackend(), NumbaBackend("int16")):
        cache = KVCache.allocate(w.args, 40, ops.kv_dtype)
        logits = forward(w, np.array([1, 400, 401, 402, 403, 404, 405, 406]), 0, cache, ops)
        toks = [int(np.argmax(logits[-1]))]
        for pos in range(8, 39):
            toks.append(int(np.argmax(forward(w, np.array(toks[-1:]), pos, cache, ops)[-1])))
        outs.append(toks)
    assert outs[0] == outs[1]


ref = ReferenceBackend()
nb = NumbaBackend("int16")  # the float-activation kernels, held to the float reference


@pytest.mark.parametrize("T", [1, 2, 3, 7, 16, 33])
def test_small_ops_match_reference(T):
    x = rng.standard_normal((T, 172)).astype(np.float32)
    wt = rng.standard_normal(172).astype(np.float32)
    assert rel_err(nb.rmsnorm(x, wt, 1e-5), ref.rmsnorm(x, wt, 1e-5)) <= 1e-5
    u = rng.standard_normal((T, 172)).astype(np.float32) * 10
    assert rel_err(nb.silu_mul(u, x), ref.silu_mul(u, x)) <= 1e-5
    inv = (1.0 / 10000 ** (np.arange(0, 64, 2) / 64)).astype(np.float32)
    q = rng.standard_normal((T, 9, 64)).astype(np.float32)
    for inter in (True, False):
        assert rel_err(nb.rope(q, 5, inv, inter), ref.rope(q, 5, inv, inter)) <= 1e-5


@pytest.mark.parametrize("kv_dtype", [np.float16, np.int8])
@pytest.mark.parametrize("T,pos,H,n_kv,hd", [(1, 0, 9, 3, 64), (1, 40, 9, 3, 64), (7, 0, 8, 4, 64), (16, 9, 4, 4, 64),
                                           (33, 0, 6, 1, 64), (150, 40, 9, 3, 64), (70, 3, 4, 2, 12),
                                           (1, 128, 9, 3, 64), (1, 200, 9, 3, 64), (1, 999, 9, 3, 64),
                                           (4, 250, 8, 2, 64), (8, 29, 6, 3, 12)])
def test_attention_matches_reference_on_fp16_and_int8_cache(T, pos, H, n_kv, hd, kv_dtype):
    """One query and a few (the decode kernels: spans of keys, one to eight, a span of 128 keys and one more and the
    tokens of one call seeing different spans) and prompts (the tiled attention: tiles of 64 queries and a tail,
    after a cached prefix, head dims with and without a multiple of eight)."""
    from edge_awq.config import ModelArgs

    a = ModelArgs("llama", H * hd, 8, 2, H, n_kv, hd, 10, 1024)
    caches = [KVCache.allocate(a, max(256, pos + T), kv_dtype) for _ in range(2)]
    prev_k, prev_v = (rng.standard_normal((pos, n_kv, hd)).astype(np.float32) for _ in range(2))
    q, k, v = (rng.standard_normal((T, h, hd)).astype(np.float32) for h in (H, n_kv, n_kv))
    for c in caches:
        c.write(1, 0, prev_k, prev_v)
    got = nb.attention(q, k, v, caches[0], 1, pos)
    want = ref.attention(q, k, v, caches[1], 1, pos)
    assert rel_err(got, want) <= 1e-3 and np.array_equal(caches[0].k, caches[1].k)
    if kv_dtype == np.int8:  # and the int8 cache stays close to exact float attention
        exact = KVCache.allocate(a, max(256, pos + T), np.float32)
        exact.write(1, 0, prev_k, prev_v)
        assert rel_err(got, ref.attention(q, k, v, exact, 1, pos)) <= 0.03


def _stories_packed(stories_weights):
    from edge_awq.model import LayerWeights
    import dataclasses

    src, w = stories_weights
    q = [LayerWeights(**{n: pack_linear(getattr(lw, n).weight, 4, getattr(lw, n).weight.shape[1])
                         if n.startswith("w") else getattr(lw, n) for n in lw.__dataclass_fields__}) for lw in w.layers]
    return src, dataclasses.replace(w, layers=q)


def test_whole_model_numba_equals_reference_greedy(stories_weights):
    """stories260K packed (RTN, per-channel groups), float activations: 64 greedy steps agree between backends."""
    from edge_awq.generate import SamplingArgs, generate

    src, wq = _stories_packed(stories_weights)
    tok = src.tokenizer()
    runs = [[p.token for p in generate(wq, ops, tok, [1], SamplingArgs(max_new_tokens=64))] for ops in (ref, nb)]
    assert runs[0] == runs[1] and len(runs[0]) == 64


def test_whole_model_int8_activations_follow_the_reference(stories_weights):
    """With int8 activations a last-bit difference in a float sum (attention, a norm) can move an activation
    across a rounding step, so two correct implementations drift apart over a long greedy run of a tiny
    model. Teacher-forced on the reference's own 64 greedy tokens, numba picks the same token at (nearly)
    every step, with logits close to the reference's."""
    _, wq = _stories_packed(stories_weights)
    backends = (ReferenceBackend("int8"), NumbaBackend("int8"))
    caches = [KVCache.allocate(wq.args, 80, np.float16) for _ in backends]
    token, agree, errs = 1, 0, []
    for pos in range(64):
        a, b = (forward(wq, np.array([token]), pos, c, o, last_only=True)[-1] for o, c in zip(backends, caches))
        errs.append(rel_err(b, a))
        agree += int(np.argmax(a) == np.argmax(b))
        token = int(np.argmax(a))
    assert agree >= 62 and max(errs) <= 0.1 and np.median(errs) <= 0.03


def _greedy_64(packed, prompt, ops) -> list[int]:
    cache = KVCache.allocate(packed.args, len(prompt) + 64, ops.kv_dtype)
    toks = [int(np.argmax(forward(packed, prompt, 0, cache, ops, last_only=True)[-1]))]
    for pos in range(len(prompt), len(prompt) + 63):
        toks.append(int(np.argmax(forward(packed, np.array(toks[-1:]), pos, cache, ops)[-1])))
    return toks


@pytest.fixture(scope="module")
def smollm2_packed_greedy(smollm2_weights):
    """SmolLM2 packed to W4 (group 64, int8 head), a prompt, and the reference's 64 greedy tokens."""
    import dataclasses

    from edge_awq.model import LINEARS

    src, w = smollm2_weights
    layers = [dataclasses.replace(lw, **{n: pack_linear(np.asarray(getattr(lw, n).weight, np.float32), 4, 64)
                                         for n in LINEARS}) for lw in w.layers]
    head = pack_linear(np.asarray(w.tok_embeddings, np.float32), 8, 64)
    packed = dataclasses.replace(w, layers=layers, output=head)
    prompt = np.array(src.tokenizer().encode("The capital of France is"))
    return packed, prompt, _greedy_64(packed, prompt, ReferenceBackend())


@pytest.mark.long
@pytest.mark.parametrize("integer_kernels", [True, False], ids=["x86-integer", "float-as-on-arm"])
def test_smollm2_packed_numba_and_reference_agree_for_64_greedy_steps(smollm2_packed_greedy, integer_kernels,
                                                                      monkeypatch):
    """Both backends choose the same 64 greedy tokens on packed SmolLM2, with this machine's integer
    kernels and with the float ones that run where AVX2 is missing (ARM)."""
    from edge_awq.backends.numba import gemv_blocked as numba_gemv_blocked, gemv_i16 as numba_gemv_i16

    if not integer_kernels:
        for module in (numba_gemv_i16, numba_gemv_blocked):
            monkeypatch.setattr(module, "AVAILABLE", False)
        assert not numba_gemv_blocked.usable(4, 64) and not numba_gemv_i16.usable(64)
    packed, prompt, want = smollm2_packed_greedy
    assert (prepare(packed.layers[0].wq, repack=True).blocked is None) != integer_kernels
    assert _greedy_64(packed, prompt, NumbaBackend("int16")) == want


@pytest.mark.parametrize("T", [1, 3, 9])
@pytest.mark.parametrize("outs", [(576, 192, 192), (1536, 1536), (9, 5, 3)])
def test_linears_of_one_input_match_reference(T, outs):
    in_f = 576
    ws = [pack_linear(rng.standard_normal((o, in_f)).astype(np.float32), 4, 64,
                      rng.standard_normal(o).astype(np.float32) if i == 0 else None) for i, o in enumerate(outs)]
    x = rng.standard_normal((T, in_f)).astype(np.float32)
    got, want = nb.linears(x, ws), ref.linears(x, ws)
    assert [g.shape for g in got] == [(T, o) for o in outs]
    assert all(rel_err(g, w) <= 1e-3 for g, w in zip(got, want))


@pytest.mark.parametrize("B,T,H,n_kv,hd", [(1, 1, 4, 4, 8), (3, 7, 6, 2, 8), (2, 65, 9, 3, 64), (1, 130, 8, 1, 12),
                                         (2, 64, 4, 2, 16), (1, 200, 3, 3, 6), (6, 512, 8, 4, 8)])
def test_causal_blocks_match_the_reference_block_by_block(B, T, H, n_kv, hd):
    """The offline search's attention over whole blocks: each block as the reference runs it from an empty
    float32 cache (tiles of 64 queries and a tail, head dims with and without a multiple of eight, groups of
    one to nine query heads; the last row is stories260K's chunk of six 512-token blocks)."""
    from edge_awq.backends.numba.attention import causal_blocks
    from edge_awq.config import ModelArgs

    a = ModelArgs("llama", H * hd, 8, 1, H, n_kv, hd, 10, T)
    q = rng.standard_normal((B, T, H, hd)).astype(np.float32) * 3
    k, v = (rng.standard_normal((B, T, n_kv, hd)).astype(np.float32) for _ in range(2))
    got = causal_blocks(q, k, v)
    assert got.shape == (B, T, H * hd) and got.dtype == np.float32
    for b in range(B):
        want = ref.attention(q[b], k[b], v[b], KVCache.allocate(a, T, np.float32), 0, 0)
        assert rel_err(got[b], want) <= 1e-5


def test_causal_blocks_on_real_queries_and_keys(stories_weights, smollm2_weights):
    """Real q, k, v (a layer's projections of embedded text, RoPE applied) of stories260K and SmolLM2."""
    from edge_awq.backends.numba.attention import causal_blocks
    from edge_awq.formats.load import inv_freq, read_layer

    for src, w in (stories_weights, smollm2_weights):
        a, lw, freq = w.args, read_layer(src, 1), inv_freq(src)
        tokens = rng.integers(0, a.vocab_size, (2, 96))
        x = np.asarray(src.get("tok_embeddings"), np.float32)[tokens]
        h = ref.rmsnorm(x, np.asarray(lw.attn_norm, np.float32), a.norm_eps)
        proj = {n: h @ np.asarray(getattr(lw, n).weight, np.float32).T for n in ("wq", "wk", "wv")}
        q = proj["wq"].reshape(2, 96, a.n_heads, a.head_dim)
        k, v = (proj[n].reshape(2, 96, a.n_kv_heads, a.head_dim) for n in ("wk", "wv"))
        q, k = (np.stack([ref.rope(t[b], 0, freq, a.rope_interleaved) for b in range(2)]) for t in (q, k))
        got = causal_blocks(q, k, v)
        for b in range(2):
            cache = KVCache.allocate(a, 96, np.float32)
            assert rel_err(got[b], ref.attention(q[b], k[b], v[b], cache, 0, 0)) <= 1e-5
