"""The offline AWQ math: grid parity with pack.py, scale folding, clip search, AWQ beating RTN."""


import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge_awq.formats.load import inv_freq, read_layer  # noqa: E402
from edge_awq.model import LINEARS, SCALE_GROUPS, Dense, LayerWeights, ModelWeights, block  # noqa: E402
from edge_awq.offline.clip import apply_clip, group_errors, sample_tokens, search_clip  # noqa: E402
from edge_awq.offline.fake_quant import fake_quantize  # noqa: E402
from edge_awq.config import resolve_group_size  # noqa: E402
from edge_awq.offline.layerwise import QuantArgs, quantize_layer, record_inputs, to_torch  # noqa: E402
from edge_awq.offline.search import apply_scales, candidate_scales  # noqa: E402
from edge_awq.offline.torch_ops import TorchOps  # noqa: E402
from edge_awq.pack import dequantize, quantize  # noqa: E402
from edge_awq.errors import ConfigError  # noqa: E402

ops = TorchOps()
rng = np.random.default_rng(0)


@pytest.mark.parametrize("bits,gs", [(4, 64), (3, 32), (4, 172)])
def test_fake_quantize_equals_pack_grid_bit_for_bit(bits, gs):
    w = (rng.standard_normal((16, 344)) * rng.uniform(0.01, 3, (16, 1))).astype(np.float32)
    if 344 % gs:
        w = w[:, :gs]
    want = dequantize(*quantize(w, bits, gs), gs)
    got = fake_quantize(torch.from_numpy(w), bits, gs).numpy()
    assert np.array_equal(got, want)


@pytest.fixture(scope="module")
def stories_layer(stories_weights):
    src, _ = stories_weights
    ctx = ModelWeights(src.args, None, (), None, None, torch.from_numpy(inv_freq(src)))
    tokens = np.asarray(src.tokenizer().encode((src.path.parents[2] / "data" / "tinystories-valid-sample.txt")
                                                .read_text(encoding="utf-8"))[:8 * 128]).reshape(8, 128)
    x = torch.from_numpy(np.asarray(src.get("tok_embeddings"), np.float32)[tokens])  # (8, 128, 64)
    return to_torch(read_layer(src, 1), "cpu"), x, ctx


def random_mha_layer(dim=64, hidden=96, heads=4):
    r = lambda *s: torch.from_numpy((rng.standard_normal(s) * 0.2).astype(np.float32))  # noqa: E731
    lw = LayerWeights(1 + r(dim), Dense(r(dim, dim)), Dense(r(dim, dim)), Dense(r(dim, dim)), Dense(r(dim, dim)),
                      1 + r(dim), Dense(r(hidden, dim)), Dense(r(dim, hidden)), Dense(r(hidden, dim)))
    from edge_awq.config import ModelArgs, rope_frequencies

    a = ModelArgs("llama", dim, hidden, 1, heads, heads, dim // heads, 10, 64)
    return lw, ModelWeights(a, None, (), None, None, torch.from_numpy(rope_frequencies(a)))


def test_folding_scales_leaves_fp_output_unchanged(stories_layer):
    """Every scale group, folded with large random scales: layer output within 1e-5 relative error."""
    lw_gqa, x, ctx_gqa = stories_layer
    lw_mha, ctx_mha = random_mha_layer()
    for lw, ctx in ((lw_gqa, ctx_gqa), (lw_mha, ctx_mha)):
        xin = x if ctx is ctx_gqa else torch.randn(4, 32, 64)
        want = block(lw, xin, 0, None, 0, ctx, ops)
        folded = lw
        groups = [g for g in SCALE_GROUPS if g.when(ctx.args)]
        for g in groups:
            width = getattr(lw, g.linears[0]).weight.shape[1]
            s = torch.from_numpy(rng.uniform(0.2, 5.0, width).astype(np.float32))
            folded = apply_scales(folded, g, s)
        got = block(folded, xin, 0, None, 0, ctx, ops)
        rel = float((got - want).norm() / want.norm())
        assert rel <= 1e-5, (len(groups), rel)
    assert len([g for g in SCALE_GROUPS if g.when(ctx_mha.args)]) == 4 and len(
        [g for g in SCALE_GROUPS if g.when(ctx_gqa.args)]) == 3  # v -> o only without GQA


def test_candidate_scales_are_normalised():
    x_mean = torch.tensor([0.1, 1.0, 10.0])
    s = candidate_scales(x_mean, None, 0.5)
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-6)
    assert torch.equal(candidate_scales(x_mean, None, 0.0), torch.ones(3))


def test_clip_never_raises_group_error_above_rtn(stories_layer):
    lw, x, ctx = stories_layer
    feats, _, _ = record_inputs(lw, x, ctx, ops)
    for name, gs in (("w1", 64), ("w2", 172), ("w2", 4)):
        w = getattr(lw, name).weight
        limits = search_clip(w, feats[name], 4, gs)
        xs = sample_tokens(feats[name], 512).reshape(1, -1, w.shape[1] // gs, gs)
        wg = w.reshape(-1, 1, w.shape[1] // gs, gs)
        reference = (xs * wg).sum(-1)
        top = wg.abs().amax(-1, keepdim=True)
        err_rtn = group_errors(wg, xs, top, 4, gs, reference)
        err_clip = group_errors(wg, xs, limits.reshape(top.shape), 4, gs, reference)
        assert torch.all(err_clip <= err_rtn) and torch.any(err_clip < err_rtn)
        assert torch.all(limits <= top.reshape(limits.shape)) and torch.all(limits >= 0.5 * top.reshape(limits.shape))
        clipped = apply_clip(w, limits, gs)
        assert float(clipped.abs().max()) <= float(w.abs().max())


@pytest.mark.parametrize("rows,gs", [(64, 4), (64, 172), (7, 2)])
def test_group_errors_in_place_are_the_plain_formula_bit_for_bit(stories_layer, rows, gs):
    """The clip search's error per (row, group), its difference and square taken in place: the same bits as
    (partial dots − reference)² averaged over the tokens, on a real linear and its real input."""
    from edge_awq.offline.clip import partial_dots

    lw, x, ctx = stories_layer
    feats, _, _ = record_inputs(lw, x, ctx, ops)
    w = lw.w2.weight[:rows]
    G = w.shape[1] // gs
    xs = sample_tokens(feats["w2"], 512).reshape(1, -1, G, gs)
    wg = w.reshape(-1, 1, G, gs)
    reference = partial_dots(xs, wg)
    limits = wg.abs().amax(-1, keepdim=True) * 0.8
    want = (partial_dots(xs, fake_quantize(torch.clamp(wg, -limits, limits), 4, gs)) - reference).pow(2).mean(dim=1)
    got = group_errors(wg, xs, limits, 4, gs, reference)
    assert got.shape == (rows, G) and torch.all(want > 0)
    assert torch.equal(got, want)


def test_awq_beats_rtn_on_layer_output(stories_layer):
    lw, x, ctx = stories_layer
    for qa in (QuantArgs(4, 4), QuantArgs(3, "channel"), QuantArgs(4, "channel", duo_scaling=True)):
        _, _, _, rep = quantize_layer(lw, x, 1, ctx, qa, ops)
        assert rep.loss < rep.loss_rtn, (qa, rep.loss, rep.loss_rtn)
        assert {s.prev for s in rep.scales} == {"attn_norm", "ffn_norm", "w3"}
        assert all(s.loss <= s.loss_unscaled for s in rep.scales)


def test_rtn_method_packs_plain_rounding(stories_layer):
    lw, x, ctx = stories_layer
    packed, norms, _, rep = quantize_layer(lw, x, 1, ctx, QuantArgs(4, 4, method="rtn"), ops)
    w = lw.w1.weight.numpy()
    from edge_awq.pack import unpack_linear

    assert np.array_equal(unpack_linear(packed["w1"]), dequantize(*quantize(w, 4, 4), 4))
    assert rep.loss == rep.loss_rtn and np.array_equal(norms["attn_norm"], lw.attn_norm.numpy())


def test_group_size_resolution(smollm2_weights, stories_weights):
    smol, _ = smollm2_weights
    stories, _ = stories_weights
    assert resolve_group_size(smol.args, "auto") == 64 and resolve_group_size(smol.args, "64") == 64
    with pytest.raises(ConfigError, match=r"--group-size 128 does not divide the input width 576 of layer wq: use 64 or 32"):
        resolve_group_size(smol.args, "128")
    assert resolve_group_size(stories.args, "auto") == 4 and resolve_group_size(stories.args, "channel") == "channel"
    with pytest.raises(ConfigError, match="input width 172 of layer w2"):
        resolve_group_size(stories.args, "64")


@pytest.mark.parametrize("duo", [False, True])
def test_formats_naming_one_format_quantize_as_that_format(stories_layer, duo):
    """A mixed-precision layer whose formats are all one is the single-format layer, bit for bit; and each
    linear of a truly mixed layer is packed at its own width and group."""
    import dataclasses

    from edge_awq.mixed import LinearFormat

    lw, x, ctx = stories_layer
    qa = QuantArgs(4, "channel", duo_scaling=duo)
    same = {f"layers.1.{n}": LinearFormat(4, getattr(lw, n).weight.shape[1]) for n in LINEARS}
    a, _, _, rep_a = quantize_layer(lw, x, 1, ctx, qa, ops)
    b, _, _, rep_b = quantize_layer(lw, x, 1, ctx, dataclasses.replace(qa, formats=same), ops)
    for n in LINEARS:
        assert np.array_equal(a[n].qweight, b[n].qweight) and np.array_equal(a[n].scales, b[n].scales)
    assert rep_a.loss == rep_b.loss
    mixed = {**same, "layers.1.wk": LinearFormat(8, 64), "layers.1.w1": LinearFormat(3, 32)}
    c, _, _, _ = quantize_layer(lw, x, 1, ctx, dataclasses.replace(qa, formats=mixed), ops)
    assert (c["wk"].bits, c["wk"].group_size, c["w1"].bits, c["w1"].group_size) == (8, 64, 3, 32)
    assert (c["wq"].bits, c["wq"].group_size) == (4, 64)


def test_fake_quantize_in_chunks_and_in_place_is_the_same(monkeypatch):
    """A linear larger than fake_quant.CHUNK is rounded a chunk of rows at a time: the same values as in one
    chunk. in_place rounds the caller's float32 tensor itself (and returns it); without it w is left alone."""
    from edge_awq.offline import fake_quant

    w = torch.randn(fake_quant.CHUNK // 512 + 3, 1024, generator=torch.Generator().manual_seed(0))
    keep = w.clone()
    for bits, gs in ((4, 64), (3, 128), (8, 1024)):
        chunked = fake_quant.fake_quantize(w, bits, gs)
        with monkeypatch.context() as m:
            m.setattr(fake_quant, "CHUNK", w.numel())
            whole = fake_quant.fake_quantize(w, bits, gs)
        assert torch.equal(w, keep) and not torch.equal(chunked, w)
        assert torch.equal(chunked, whole)
        own = w.clone()
        assert fake_quant.fake_quantize(own, bits, gs, in_place=True).data_ptr() == own.data_ptr()
        assert torch.equal(own, chunked)
    half = w[:64].half()  # not float32: rounded in a copy even with in_place
    assert torch.equal(fake_quant.fake_quantize(half, 4, 64, in_place=True), fake_quant.fake_quantize(half.float(), 4, 64))
    assert torch.equal(half, w[:64].half())


def test_in_place_search_gives_the_same_layer_and_leaves_the_default_callers_weights_alone(stories_layer):
    """quantize_model hands its copy of the layer over (in_place): the scales and clips then change it rather
    than making a second float copy; the packed layer and the losses are the same bits. Without in_place the
    caller's tensors are left as they were."""
    import dataclasses

    lw, x, ctx = stories_layer
    before = {n: getattr(lw, n).weight.clone() for n in LINEARS}
    norm = lw.attn_norm.clone()
    qa = QuantArgs(4, 4)
    a, na, xa, rep_a = quantize_layer(lw, x, 1, ctx, qa, ops)
    assert all(torch.equal(getattr(lw, n).weight, before[n]) for n in LINEARS) and torch.equal(lw.attn_norm, norm)
    own = dataclasses.replace(lw, **{n: Dense(getattr(lw, n).weight.clone(), None) for n in LINEARS},
                              attn_norm=lw.attn_norm.clone(), ffn_norm=lw.ffn_norm.clone())
    b, nb, xb, rep_b = quantize_layer(own, x, 1, ctx, qa, ops, in_place=True)
    assert not torch.equal(own.w1.weight, before["w1"])  # the given copy was used up
    for n in LINEARS:
        assert np.array_equal(a[n].qweight, b[n].qweight) and np.array_equal(a[n].scales, b[n].scales)
        assert np.array_equal(a[n].zeros, b[n].zeros)
    assert all(np.array_equal(na[k], nb[k]) for k in na) and torch.equal(xa, xb)
    assert (rep_a.loss, rep_a.loss_rtn) == (rep_b.loss, rep_b.loss_rtn) and rep_b.loss < rep_b.loss_rtn
