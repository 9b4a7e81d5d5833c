"""The scale search's exact speed-ups: a group judged on its linears alone scored from one Gram matrix,
the norm before a judged sub-block computed once, a sub-block's candidates bounded chunk by chunk. Each is held to the direct computation it replaces,
on real layers of stories260K and SmolLM2: the same losses (within float rounding), the same choices,
and, end to end, the same file."""

import dataclasses
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.conftest import SHAKESPEARE  # noqa: E402
from edge_awq.formats.load import inv_freq, read_layer  # noqa: E402
from edge_awq.model import SCALE_GROUPS, ModelWeights, attention, block, mlp  # noqa: E402
from edge_awq.offline import layerwise  # noqa: E402
from edge_awq.offline.layerwise import loss_for, record_inputs, to_torch  # noqa: E402
from edge_awq.offline.search import (ChunkedError, _least_chunked, activation_mean, candidate_scales,  # noqa: E402
                                    gram, linear_error, scaled_trial, search_scales)
from edge_awq.offline.torch_ops import NormMemo, TorchOps  # noqa: E402

ops = TorchOps()


def layer_inputs(src, layer: int, n_blocks: int, seqlen: int):
    """Layer `layer` of src and its real input: calibration text through the FP layers before it."""
    ctx = ModelWeights(src.args, None, (), None, None, torch.from_numpy(inv_freq(src)))
    tokens = np.asarray(src.tokenizer().encode(SHAKESPEARE.read_text(encoding="utf-8")[:200_000])[: n_blocks * seqlen])
    with torch.inference_mode():
        x = torch.from_numpy(np.asarray(src.get("tok_embeddings"), np.float32)[tokens.reshape(n_blocks, seqlen)])
        for i in range(layer):
            x = block(to_torch(read_layer(src, i), "cpu"), x, 0, None, 0, ctx, ops)
    return to_torch(read_layer(src, layer), "cpu"), x, ctx


@pytest.fixture(scope="module")
def real_layers(stories_weights, smollm2_weights):
    return {"stories260K": layer_inputs(stories_weights[0], 2, 8, 256),
            "SmolLM2": layer_inputs(smollm2_weights[0], 3, 4, 256)}


def test_gram_is_xtx_in_float64():
    x = torch.randn(3, 1000, 40)
    flat = x.reshape(-1, 40).double()
    assert torch.allclose(gram(x, rows=777), flat.T @ flat, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("model,group_size", [("stories260K", 4), ("stories260K", "channel"), ("SmolLM2", 64),
                                              ("SmolLM2", 128)])
def test_linear_groups_score_and_choose_as_the_direct_search(real_layers, model, group_size):
    """Every linear-alone group of a real layer (w2; wo where heads are not grouped), 4 and 3 bits: each
    candidate's Gram loss within 1e-4 relative of the direct mean squared error, and the same α chosen."""
    lw, x, ctx = real_layers[model]
    with torch.inference_mode():
        feats, x_mid, _ = record_inputs(lw, x, ctx, ops)
        groups = [g for g in SCALE_GROUPS if g.when(ctx.args) and g.inspect is None]
        assert groups
        for g in groups:
            width = feats[g.linears[0]].shape[-1]
            gs = width if group_size == "channel" else group_size
            assert width % gs == 0
            fast = loss_for(g, lw, x, x_mid, feats, ctx, ops)
            direct = loss_for(g, lw, x, x_mid, feats, ctx, ops, gram=False)
            for bits in (4, 3):
                x_mean = feats[g.linears[0]].abs().reshape(-1, width).mean(0)
                for ratio in (0.0, 0.35, 0.9):
                    trial = scaled_trial(lw, g.linears, candidate_scales(x_mean, None, ratio), bits, gs)
                    assert fast(trial) == pytest.approx(direct(trial), rel=1e-4)
                a = search_scales(g, lw, feats[g.linears[0]], fast, bits, gs)
                b = search_scales(g, lw, feats[g.linears[0]], direct, bits, gs)
                assert (a.ratio, a.scales) == (b.ratio, b.scales)
                assert a.loss == pytest.approx(b.loss, rel=1e-4)


def test_gram_loss_sees_a_changed_weight():
    """Not a loss that ignores its argument: a weight changed in one entry changes the loss by the exact amount."""
    from edge_awq.model import Dense, LayerWeights

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 8, generator=gen)
    w = torch.randint(-8, 8, (5, 8), generator=gen).float() / 4  # w + 0.5 exact in float32
    lw = LayerWeights(*[None] * 7, Dense(w), None)
    loss = linear_error(("w2",), lw, x)
    d = torch.zeros(5, 8)
    d[1, 3] = 0.5
    want = float((x.reshape(-1, 8).double() @ d.double().T).pow(2).mean())
    assert loss(dataclasses.replace(lw, w2=Dense(w + d))) == pytest.approx(want, rel=1e-9)
    assert loss(lw) == 0.0


@pytest.mark.parametrize("model", ["stories260K", "SmolLM2"])
def test_norm_computed_once_gives_the_same_bits(real_layers, model):
    lw, x, ctx = real_layers[model]
    with torch.inference_mode():
        memo = NormMemo(ops)
        _, x_mid, _ = record_inputs(lw, x, ctx, ops)
        for trial in (lw, scaled_trial(lw, ("wq", "wk", "wv", "w1", "w3"), torch.full((x.shape[-1],), 1.5), 4, 64)):
            assert torch.equal(attention(trial, x, 0, None, 0, ctx, memo), attention(trial, x, 0, None, 0, ctx, ops))
            assert torch.equal(mlp(trial, x_mid, ctx, memo), mlp(trial, x_mid, ctx, ops))
        assert len(memo._memo) == 2  # one norm of each input, computed once


@pytest.mark.parametrize("model", ["stories260K", "SmolLM2"])
def test_silu_mul_in_place_gives_the_same_bits(real_layers, model):
    """The MLP's SiLU and product written into the gate's storage: the same bits as two new tensors, on the
    real layer's gate and up and on shapes whose lengths leave a vector kernel's scalar tail."""
    import torch.nn.functional as F

    lw, x, ctx = real_layers[model]
    with torch.inference_mode():
        _, x_mid, _ = record_inputs(lw, x, ctx, ops)
        h = ops.rmsnorm(x_mid, lw.ffn_norm, ctx.args.norm_eps)
        pairs = [ops.linears(h, (lw.w1, lw.w3))]
        gen = torch.Generator().manual_seed(3)
        pairs += [(torch.randn(shape, generator=gen) * 6, torch.randn(shape, generator=gen))
                  for shape in ((3, 37, 173), (1, 1, 17), (5, 4099))]
        for gate, up in pairs:
            expected = F.silu(gate) * up
            got = ops.silu_mul(gate.clone(), up)
            assert got.dtype == expected.dtype and torch.equal(got, expected)
            assert not torch.equal(got, gate)  # gate is read, not returned unchanged


def test_export_file_equals_the_direct_searchs(stories_path, tmp_path, monkeypatch):
    """End to end: stories260K exported with the fast search and with the direct one (the search before the
    change): byte-identical files, 4 and 3 bits."""
    from edge_awq.offline import quantize

    calib = SHAKESPEARE
    for bits in (4, 3):
        fast, direct = tmp_path / f"fast{bits}.eawq", tmp_path / f"direct{bits}.eawq"
        quantize(stories_path, calib, fast, bits=bits, group_size="channel", n_samples=8, seqlen=256)
        with monkeypatch.context() as m:
            m.setattr(layerwise, "loss_for", lambda *a, **k: loss_for(*a, **{**k, "gram": False, "chunked": False}))
            m.setattr(layerwise, "NormMemo", lambda inner: inner)
            quantize(stories_path, calib, direct, bits=bits, group_size="channel", n_samples=8, seqlen=256)
        assert fast.read_bytes() == direct.read_bytes()


class TableError(ChunkedError):
    """A ChunkedError whose chunk values come from a table (candidate, chunk), the trial being the candidate."""

    def __init__(self, table):
        self.table, self.n_values, self.evaluated, self.judges = table, 1, 0, [None] * table.shape[1]

    def chunk(self, trial, i):
        self.evaluated += 1
        return float(self.table[trial, i])


def test_bounded_search_finds_the_least_total_of_random_tables():
    """_least_chunked against the totals of every chunk: the same least loss at the same candidate (ties
    to the first), every loss it returns exact, and those it left unfinished above the least. Tables with
    close candidates, far ones, exact ties and zero chunks; the work done is below running everything."""
    rng = np.random.default_rng(0)
    saved = []
    for seed in range(300):
        n_cand, n_chunks = int(rng.integers(2, 21)), int(rng.integers(2, 17))
        level = rng.uniform(1, 3, n_cand) ** rng.choice([1, 4])  # close candidates, or spread ones
        table = rng.gamma(2.0, 1.0, (n_cand, n_chunks)) * level[:, None]
        table[rng.random(table.shape) < 0.1] = 0.0
        if seed % 3 == 0:
            table[int(rng.integers(n_cand))] = table[int(np.argmin(table.sum(1)))]  # an exact tie for the least
        totals = [math.fsum(row) for row in table]
        loss = TableError(table)
        got = _least_chunked(loss, [lambda c=c: c for c in range(n_cand)])
        best = min(range(n_cand), key=lambda c: (totals[c], c))
        assert min(range(n_cand), key=lambda c: (got[c], c)) == best
        assert all(g == t or (g == math.inf and t > totals[best]) for g, t in zip(got, totals))
        assert loss.evaluated <= n_cand * n_chunks
        saved.append(1 - loss.evaluated / (n_cand * n_chunks))
    assert np.mean(saved) > 0.1


def test_bounded_search_keeps_the_k_least_of_random_tables():
    """_least_chunked asked for the k least (the screened search's shortlist): those k, ranked by (total,
    candidate), have their exact totals; every other candidate is exact or inf, and an inf one's total is above
    the k-th least. k = 1 is the plain bounded search; k = every candidate stops nothing."""
    rng = np.random.default_rng(1)
    for seed in range(200):
        n_cand, n_chunks = int(rng.integers(2, 21)), int(rng.integers(2, 17))
        table = rng.gamma(2.0, 1.0, (n_cand, n_chunks)) * rng.uniform(1, 3, n_cand)[:, None] ** rng.choice([1, 4])
        if seed % 3 == 0:
            table[int(rng.integers(n_cand))] = table[int(np.argmin(table.sum(1)))]
        totals = [math.fsum(row) for row in table]
        ranked = sorted(range(n_cand), key=lambda c: (totals[c], c))
        for k in (1, 2, 3, n_cand):
            got = _least_chunked(TableError(table), [lambda c=c: c for c in range(n_cand)], keep=k)
            assert sorted(range(n_cand), key=lambda c: (got[c], c))[:k] == ranked[:k]
            assert all(got[c] == totals[c] for c in ranked[:k])
            kth = totals[ranked[min(k, n_cand) - 1]]
            assert all(g == t or (g == math.inf and t > kth) for g, t in zip(got, totals))
        assert _least_chunked(TableError(table), [lambda c=c: c for c in range(n_cand)], keep=n_cand) == totals


@pytest.mark.parametrize("model", ["stories260K", "SmolLM2"])
def test_recorded_outputs_are_the_references_bit_for_bit(real_layers, model, monkeypatch):
    """The judged sub-blocks' FP outputs kept by ``record_inputs`` stand for the references the bounded
    search would compute (one candidate's pass saved per group): the same bits, chunk by chunk."""
    lw, x, ctx = real_layers[model]
    monkeypatch.setattr(layerwise, "chunk_blocks", lambda *a: 1)
    with torch.inference_mode():
        feats, x_mid, x_out = record_inputs(lw, x, ctx, ops)
        for g in (g for g in SCALE_GROUPS if g.when(ctx.args) and g.inspect is not None):
            given = loss_for(g, lw, x, x_mid, feats, ctx, ops, x_out=x_out)
            computed = loss_for(g, lw, x, x_mid, feats, ctx, ops)
            assert len(given.references) == x.shape[0] > 1
            for a, b in zip(given.references, computed.references):
                assert torch.equal(a, b)
            # in bfloat16 the references go through the same bfloat16 products as the candidates: computed
            cast = loss_for(g, lw, x, x_mid, feats, ctx, ops, x_out=x_out, dtype="bfloat16").references[0]
            assert not torch.equal(cast, given.references[0])


@pytest.mark.parametrize("model", ["stories260K", "SmolLM2"])
def test_screened_search_chooses_among_the_subsets_best_on_every_block(real_layers, model, monkeypatch):
    """--search-refine: the candidates ranked on a subset of the blocks (in bfloat16), the best k judged on
    every block in float32. With k = every candidate it is the exact search; with k = 2 its choice is the one
    of the two the exact losses rank first, its loss that exact loss; the work on every block is at most k
    candidates' (each chunk of the full judge run at most 2 times, not 20)."""
    from edge_awq.offline.layerwise import search_subset

    lw, x, ctx = real_layers[model]
    monkeypatch.setattr(layerwise, "chunk_blocks", lambda *a: 1)
    gs = 4 if model == "stories260K" else 64
    with torch.inference_mode():
        feats, x_mid, x_out = record_inputs(lw, x, ctx, ops)
        sub = {k: search_subset(v, 2) for k, v in feats.items()}
        for g in (g for g in SCALE_GROUPS if g.when(ctx.args) and g.inspect is not None):
            x_g = feats[g.linears[0]]
            screen = lambda: loss_for(g, lw, search_subset(x, 2), search_subset(x_mid, 2), sub, ctx, ops,  # noqa: E731
                                      dtype="bfloat16")
            full = lambda: loss_for(g, lw, x, x_mid, feats, ctx, ops, x_out=x_out)  # noqa: E731
            exact = search_scales(g, lw, x_g, full(), 3, gs)
            every = search_scales(g, lw, x_g, screen(), 3, gs, refine=(full(), 20))
            assert (every.ratio, every.scales, every.loss) == (exact.ratio, exact.scales, exact.loss)
            ranks, final = screen(), full()
            scores = [ranks(scaled_trial(lw, g.linears, candidate_scales(activation_mean(x_g), None, i / 20), 3, gs))
                      for i in range(20)]
            two = sorted(range(20), key=lambda i: (scores[i], i))[:2]
            got = search_scales(g, lw, x_g, screen(), 3, gs, refine=(final, 2))
            exact_of = {i: full()(scaled_trial(lw, g.linears, candidate_scales(activation_mean(x_g), None, i / 20), 3, gs))
                        for i in two}
            want = min(two, key=lambda i: (exact_of[i], i))
            assert got.ratio == want / 20 and got.loss == exact_of[want]
            assert final.evaluated <= 2 * final.n_chunks


@pytest.mark.parametrize("model", ["stories260K", "SmolLM2"])
def test_bounded_search_chooses_as_every_candidate_in_full(real_layers, model, monkeypatch):
    """The sub-block groups (attention, MLP) of a real layer, one chunk a block, 4 and 3 bits: the bounded
    search's α and scales are those of the direct search on every block at once, its loss within float32
    rounding of the direct one and equal to running every chunk of the winner; it skipped work."""
    lw, x, ctx = real_layers[model]
    monkeypatch.setattr(layerwise, "chunk_blocks", lambda *a: 1)
    gs = 4 if model == "stories260K" else 64
    with torch.inference_mode():
        feats, x_mid, _ = record_inputs(lw, x, ctx, ops)
        skipped = 0
        for g in (g for g in SCALE_GROUPS if g.when(ctx.args) and g.inspect is not None):
            for bits in (4, 3):
                bounded = loss_for(g, lw, x, x_mid, feats, ctx, ops)
                assert isinstance(bounded, ChunkedError) and bounded.n_chunks == x.shape[0]
                direct = loss_for(g, lw, x, x_mid, feats, ctx, ops, chunked=False)
                a = search_scales(g, lw, feats[g.linears[0]], bounded, bits, gs)
                b = search_scales(g, lw, feats[g.linears[0]], direct, bits, gs)
                assert (a.ratio, a.scales) == (b.ratio, b.scales)
                assert a.loss == pytest.approx(b.loss, rel=1e-5)
                s = torch.tensor(a.scales)
                assert bounded(scaled_trial(lw, g.linears, s, bits, gs)) == a.loss
                skipped += 20 * bounded.n_chunks - (bounded.evaluated - bounded.n_chunks)
        assert skipped > 0


@pytest.mark.parametrize("model", ["stories260K", "SmolLM2"])
def test_block_attention_scores_and_chooses_as_torchs_kernel(real_layers, model, monkeypatch):
    """The attention group judged through the numba kernel for whole blocks (``BlockAttention``, references
    included) against torch's flash kernel with the recorded references: every candidate's loss within float
    rounding of the other's, and the same α and scales at 4 and 3 bits, on real layers of both models
    (SmolLM2's 64-wide heads, and any CPU not listed, keep torch's kernel in an export; here the kernel is made
    to take them)."""
    lw, x, ctx = real_layers[model]
    gs = 4 if model == "stories260K" else 64
    g = next(g for g in SCALE_GROUPS if g.inspect == "attention")
    with torch.inference_mode():
        feats, x_mid, x_out = record_inputs(lw, x, ctx, ops)
        default = loss_for(g, lw, x, x_mid, feats, ctx, ops, x_out=x_out)
        first = default.references[0]  # the recorded output where torch's kernel judges, else the kernel's
        kernel_here = model == "stories260K" and layerwise.target_cpu() in layerwise.BLOCK_ATTENTION_CPUS
        assert torch.equal(first, x_mid[: first.shape[0]]) != kernel_here
        monkeypatch.setattr(layerwise, "BLOCK_ATTENTION_HEAD_DIM", 64)
        monkeypatch.setattr(layerwise, "BLOCK_ATTENTION_CPUS", (layerwise.target_cpu(),))
        fast = loss_for(g, lw, x, x_mid, feats, ctx, ops, x_out=x_out)
        with monkeypatch.context() as m:
            m.setattr(layerwise, "BlockAttention", lambda inner: inner)
            flash = loss_for(g, lw, x, x_mid, feats, ctx, ops, x_out=x_out)
        for mine, recorded in zip(fast.references, flash.references):  # computed by the kernel, not recorded
            assert not torch.equal(mine, recorded)
            torch.testing.assert_close(mine, recorded, rtol=1e-5, atol=1e-5)
        x_g = feats[g.linears[0]]
        for bits in (4, 3):
            for i in (0, 7, 19):
                trial = scaled_trial(lw, g.linears, candidate_scales(activation_mean(x_g), None, i / 20), bits, gs)
                mine, theirs = fast(trial), flash(trial)
                assert mine == pytest.approx(theirs, rel=1e-4) and mine != theirs
            a, b = (search_scales(g, lw, x_g, loss, bits, gs) for loss in (fast, flash))
            assert (a.ratio, a.scales) == (b.ratio, b.scales) and a.loss == pytest.approx(b.loss, rel=1e-4)


def test_block_attention_runs_on_the_cpus_listed_and_leaves_the_file(stories_path, tmp_path, monkeypatch):
    """The numba kernel judges the attention group only for narrow heads on the CPUs listed (by LLVM's name);
    forced on this CPU, the stories260K export at 4 and 3 bits is byte-identical to torch's kernel's."""
    from edge_awq.offline import quantize
    from edge_awq.offline.torch_ops import BlockAttention

    attn, mlp_group = (next(g for g in SCALE_GROUPS if g.inspect == kind) for kind in ("attention", "mlp"))

    class Ctx:
        class args:
            head_dim = 8

    x = torch.zeros(1)
    for cpu, head_dim, group, want in [("znver4", 8, attn, True), ("znver4", 16, attn, True),
                                       ("znver4", 64, attn, False), ("znver4", 8, mlp_group, False),
                                       ("emeraldrapids", 8, attn, False), ("neoverse-v1", 8, attn, False)]:
        with monkeypatch.context() as m:
            m.setattr(layerwise, "target_cpu", lambda _c=cpu: _c)
            Ctx.args.head_dim = head_dim
            assert layerwise.block_attention(group, x, Ctx) == want

    calls = []

    def counted(inner):
        calls.append(1)
        return BlockAttention(inner)

    monkeypatch.setattr(layerwise, "BlockAttention", counted)
    for bits in (4, 3):
        files = {}
        for name, cpus in (("kernel", (layerwise.target_cpu(),)), ("torch", ())):
            files[name] = tmp_path / f"{name}{bits}.eawq"
            monkeypatch.setattr(layerwise, "BLOCK_ATTENTION_CPUS", cpus)
            before = len(calls)
            quantize(stories_path, SHAKESPEARE, files[name], bits=bits, group_size="channel", n_samples=8, seqlen=256)
            assert (len(calls) > before) == (name == "kernel")
        assert files["kernel"].read_bytes() == files["torch"].read_bytes()


def test_chunks_are_whole_blocks_sized_by_the_work():
    from edge_awq.offline.layerwise import chunk_blocks

    class A:
        dim, hidden_dim = 576, 1536

    assert chunk_blocks(A, 512) == 1  # SmolLM2: a block is work enough
    A.dim, A.hidden_dim = 64, 172
    assert chunk_blocks(A, 512) == 6  # stories260K: blocks gathered until a chunk is
    assert chunk_blocks(A, 512) * 512 * 64 * 172 >= 2**25 > (chunk_blocks(A, 512) - 1) * 512 * 64 * 172


@pytest.mark.parametrize("model", ["stories260K", "SmolLM2"])
def test_layer_passes_by_chunks_equal_one_pass(real_layers, model, monkeypatch):
    """The FP pass that records the linears' inputs, and the layer's output, a block at a time: the tensors of
    one pass over every block (within float32 rounding; bit for bit where the BLAS rounds a row the same
    whatever the row count, as on the machines measured), shared inputs shared; the loss summed by chunks."""
    from edge_awq.model import LINEARS
    from edge_awq.offline.torch_ops import RecordingOps

    lw, x, ctx = real_layers[model]
    monkeypatch.setattr(layerwise, "chunk_blocks", lambda *a: 1)
    with torch.inference_mode():
        feats, x_mid, out = record_inputs(lw, x, ctx, ops)
        rec = RecordingOps(ops, {id(getattr(lw, n)): n for n in LINEARS})
        want_mid = attention(lw, x, 0, None, 0, ctx, rec)
        want_out = mlp(lw, want_mid, ctx, rec)
        assert len(layerwise.chunks(x, ctx)) == x.shape[0] > 1
        for got, want in [(x_mid, want_mid), (out, want_out), *((feats[n], rec.inputs[n]) for n in LINEARS)]:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert feats["wq"] is feats["wk"] is feats["wv"] and feats["w1"] is feats["w3"] and feats["wq"] is not feats["w1"]
        torch.testing.assert_close(layerwise.block_by_chunks(lw, x, ctx, ops), want_out, rtol=1e-6, atol=1e-6)
        other = want_out * 1.01
        direct = float((want_out - other).double().pow(2).mean())
        assert layerwise.block_error(lw, x, other, ctx, ops) == pytest.approx(direct, rel=1e-5)


def test_export_file_equals_the_unbounded_search(stories_path, tmp_path, monkeypatch):
    """End to end, stories260K with one chunk a block (so that candidates are stopped early): the file of the
    bounded search is byte-identical to that of the search running every candidate on every block at once."""
    from edge_awq.offline import quantize

    files = {}
    for name, chunked in (("bounded", True), ("full", False)):
        files[name] = tmp_path / f"{name}.eawq"
        with monkeypatch.context() as m:
            m.setattr(layerwise, "chunk_blocks", lambda *a: 1)
            m.setattr(layerwise, "loss_for", lambda *a, _c=chunked, **k: loss_for(*a, **{**k, "chunked": _c}))
            quantize(stories_path, SHAKESPEARE, files[name], bits=3, group_size="channel", n_samples=8, seqlen=256)
    assert files["bounded"].read_bytes() == files["full"].read_bytes()


def test_search_subset_takes_evenly_spaced_blocks():
    from edge_awq.offline.layerwise import search_subset

    x = torch.arange(16.0)[:, None, None].expand(16, 3, 2)
    assert search_subset(x, 4)[:, 0, 0].tolist() == [0.0, 4.0, 8.0, 12.0]
    assert search_subset(x, 0) is x and search_subset(x, 16) is x and search_subset(x, 99) is x


def test_bfloat16_products_stay_close_and_float32(real_layers):
    """CastOps: the linears' products in bfloat16, returned as float32, within bfloat16's rounding of the float32
    result; the judged MLP output within 1 % of float32's."""
    from edge_awq.offline.torch_ops import CastOps

    lw, x, ctx = real_layers["SmolLM2"]
    cast = CastOps(ops, torch.bfloat16)
    with torch.inference_mode():
        got, want = cast.linear(x, lw.w1), ops.linear(x, lw.w1)
        assert got.dtype == torch.float32 and not torch.equal(got, want)
        assert float((got - want).norm() / want.norm()) < 1e-2
        d_got, d_want = mlp(lw, x, ctx, cast) - x, mlp(lw, x, ctx, ops) - x
        assert float((d_got - d_want).norm() / d_want.norm()) < 1e-2


def test_approximations_are_named_and_cost_little(stories_path, tmp_path):
    """An export with both approximations names them in its metadata (an exact one does not), and its
    perplexity on TinyStories is within 2 % of the exact search's."""
    from edge_awq import load
    from edge_awq.formats.eawq import EawqSource
    from edge_awq.offline import quantize
    from tests.conftest import TINYSTORIES

    text = TINYSTORIES.read_text(encoding="utf-8")[:20_000]
    ppl, q = {}, {}
    for name, extra in (("exact", {}), ("approx", {"search_blocks": 4, "search_dtype": "bfloat16"}),
                        ("screened", {"search_blocks": 4, "search_dtype": "bfloat16", "search_refine": 2})):
        out = tmp_path / f"{name}.eawq"
        quantize(stories_path, SHAKESPEARE, out, group_size="channel", n_samples=16, seqlen=256, **extra)
        with load(out, backend="reference", verify="never") as llm:
            ppl[name] = llm.perplexity(text, ctx=256).perplexity
        q[name] = EawqSource(out).quantization
    assert ppl["approx"] == pytest.approx(ppl["exact"], rel=0.02)
    assert ppl["screened"] == pytest.approx(ppl["exact"], rel=0.02)
    assert not {"search_blocks", "search_dtype", "search_refine"} & set(q["exact"])
    assert q["approx"]["search_blocks"] == 4 and q["approx"]["search_dtype"] == "bfloat16"
    assert "search_refine" not in q["approx"] and q["screened"]["search_refine"] == 2


def test_refine_without_a_subset_is_refused_in_one_line(stories_path, tmp_path):
    from tests.conftest import assert_one_line_error, export

    out = tmp_path / "x.eawq"
    r = export(stories_path, out, "--n-samples", 2, "--seqlen", 64, "--search-refine", "2")
    assert_one_line_error(r, "--search-blocks")
    assert not out.exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
def test_fast_search_on_cuda_scores_and_chooses_as_the_direct_one(real_layers):
    """`export --device cuda`: the Gram loss and the norm memo on the GPU, held to the direct search there."""
    from edge_awq.model import Dense

    lw, x, ctx = real_layers["SmolLM2"]
    move = lambda v: Dense(v.weight.cuda(), None) if isinstance(v, Dense) else v.cuda()  # noqa: E731
    lw, x = type(lw)(**{n: move(getattr(lw, n)) for n in lw.__dataclass_fields__}), x.cuda()
    ctx = dataclasses.replace(ctx, inv_freq=ctx.inv_freq.cuda())
    with torch.inference_mode():
        feats, x_mid, _ = record_inputs(lw, x, ctx, ops)
        for g in (g for g in SCALE_GROUPS if g.when(ctx.args)):
            fast = loss_for(g, lw, x, x_mid, feats, ctx, ops)
            direct = loss_for(g, lw, x, x_mid, feats, ctx, ops, gram=False, chunked=False)
            a = search_scales(g, lw, feats[g.linears[0]], fast, 4, 64)
            b = search_scales(g, lw, feats[g.linears[0]], direct, 4, 64)
            assert a.ratio == b.ratio and a.loss == pytest.approx(b.loss, rel=1e-4)


def test_default_search_is_the_bfloat16_subset_where_the_cpu_has_it(monkeypatch):
    """``export``'s default: above 16 blocks on a CPU with bfloat16 in hardware, the candidates judged on 16
    blocks in bfloat16; the exact search at 16 or fewer, on a CPU without it, and on a GPU; --exact or any
    search flag given leaves the others exact."""
    import argparse

    from edge_awq.offline import export, torch_ops
    from edge_awq.offline.layerwise import EXACT_SEARCH, default_search

    assert EXACT_SEARCH == {"search_blocks": 0, "search_dtype": "float32", "search_refine": 0}
    monkeypatch.setattr(torch_ops, "native_bfloat16", lambda device="cpu": True)
    approx = {"search_blocks": 16, "search_dtype": "bfloat16", "search_refine": 0}
    assert default_search(128) == default_search(17) == approx
    assert default_search(16) == default_search(128, "cuda") == EXACT_SEARCH
    ns = lambda **k: argparse.Namespace(**{"exact": False, "n_samples": 128, "device": "cpu",  # noqa: E731
                                           **dict.fromkeys(export.SEARCH), **k})
    assert export._search(ns(), 128) == approx
    assert export._search(ns(exact=True), 128) == EXACT_SEARCH
    assert export._search(ns(search_dtype="bfloat16"), 128) == {**EXACT_SEARCH, "search_dtype": "bfloat16"}
    assert export._search(ns(n_samples=8), 8) == EXACT_SEARCH
    # the blocks the calibration text gave decide, not the number asked for
    assert export._search(ns(), 12) == EXACT_SEARCH
    monkeypatch.setattr(torch_ops, "native_bfloat16", lambda device="cpu": False)
    assert default_search(128) == export._search(ns(), 128) == EXACT_SEARCH


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="x86's probes")
def test_native_bfloat16_follows_the_cpu(monkeypatch):
    """x86: AVX-512 BF16 or AMX, as torch reports them; CUDA asks the device."""
    from edge_awq.offline import torch_ops

    for bf16, amx in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda _v=bf16: _v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda _v=amx: _v, raising=False)
        assert torch_ops.native_bfloat16() is (bf16 or amx)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert torch_ops.native_bfloat16("cuda") is True


def test_default_export_names_its_search_and_exact_refuses_approximations(stories_path, tmp_path):
    """Above 16 blocks the default export's metadata names the search it ran (the bfloat16 subset where the CPU
    has it, else nothing: exact); --exact with an approximation is refused in one line."""
    from edge_awq.formats.eawq import EawqSource
    from edge_awq.offline.layerwise import default_search
    from tests.conftest import assert_one_line_error, export

    out = tmp_path / "default.eawq"
    r = export(stories_path, out, "--group-size", "channel", "--n-samples", 24, "--seqlen", 64)
    assert r.returncode == 0, r.stderr
    q, want = EawqSource(out).quantization, default_search(24)
    assert q.get("search_blocks", 0) == want["search_blocks"] and q.get("search_dtype", "float32") == want["search_dtype"]
    bad = tmp_path / "bad.eawq"
    r = export(stories_path, bad, "--n-samples", 24, "--seqlen", 64, "--exact", "--search-blocks", "4")
    assert_one_line_error(r, "--exact")
    assert not bad.exists()


def test_short_calibration_text_gets_the_exact_default(stories_path, tmp_path, monkeypatch):
    """A text that holds 16 blocks or fewer gets the exact search by default even where --n-samples asks for
    more and the CPU has bfloat16: its metadata names no approximation, and the summary claims no subset."""
    from edge_awq.formats.eawq import EawqSource
    from edge_awq.offline import quantize, torch_ops

    monkeypatch.setattr(torch_ops, "native_bfloat16", lambda device="cpu": True)
    calib = tmp_path / "short.txt"
    calib.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:1_000], encoding="utf-8")
    out = tmp_path / "short.eawq"
    info = quantize(stories_path, calib, out, group_size="channel", n_samples=128, seqlen=64)
    q = EawqSource(out).quantization
    assert 0 < q["calibration"]["n_samples"] <= 16
    assert not {"search_blocks", "search_dtype", "search_refine"} & set(q)
    assert "judged calibration blocks" not in info["text"]
    # and with a text long enough, the same call takes the bfloat16 subset
    long_out = tmp_path / "long.eawq"
    info = quantize(stories_path, SHAKESPEARE, long_out, group_size="channel", n_samples=24, seqlen=64)
    assert EawqSource(long_out).quantization["search_dtype"] == "bfloat16"
    assert "RTN MSE measured on the 16 judged calibration blocks" in info["text"]


def test_scratch_trials_reuse_one_buffer_for_the_same_weights(real_layers):
    """With a scratch, each trial's W·s of a linear goes into the same buffer: the same weights, bit for bit,
    as a trial of its own, and the buffer is the one the next trial overwrites (the contract
    ``search_scales`` keeps: one trial at a time)."""
    from edge_awq.model import Dense

    lw, x, _ = real_layers["SmolLM2"]
    names = ("w1", "w3")
    x_mean = activation_mean(x)
    s1, s2 = candidate_scales(x_mean, None, 0.3), candidate_scales(x_mean, None, 0.7)
    want1, want2 = scaled_trial(lw, names, s1, 4, 64), scaled_trial(lw, names, s2, 4, 64)
    scratch = {}
    t1 = scaled_trial(lw, names, s1, 4, 64, scratch=scratch)
    assert set(scratch) == set(names)
    for n in names:
        assert torch.equal(getattr(t1, n).weight, getattr(want1, n).weight)
    ptrs = {n: getattr(t1, n).weight.data_ptr() for n in names}
    t2 = scaled_trial(lw, names, s2, 4, 64, scratch=scratch)
    for n in names:
        assert getattr(t2, n).weight.data_ptr() == ptrs[n] == scratch[n].data_ptr()
        assert torch.equal(getattr(t2, n).weight, getattr(want2, n).weight)
        assert not torch.equal(getattr(want1, n).weight, getattr(want2, n).weight)
    assert torch.equal(lw.w1.weight, real_layers["SmolLM2"][0].w1.weight)  # the layer's own weights untouched
    # a view of every other row (the sensitivity pass's cut linears): in the buffer too, the same weights
    cut = dataclasses.replace(lw, w1=Dense(lw.w1.weight[::2]), w3=Dense(lw.w3.weight[::2]))
    assert not cut.w1.weight.is_contiguous()
    t3 = scaled_trial(cut, names, s1, 4, 64, scratch=scratch)
    for n in names:
        assert getattr(t3, n).weight.data_ptr() == scratch[n].data_ptr()
        assert torch.equal(getattr(t3, n).weight, getattr(scaled_trial(cut, names, s1, 4, 64), n).weight)


@pytest.mark.parametrize("budget", [None, "4.5"])
def test_export_file_is_the_same_with_scratch_buffers(stories_path, tmp_path, monkeypatch, budget):
    """End to end, stories260K: the trials' W·s in buffers kept from trial to trial (the scale search and the
    sensitivity pass) against a fresh tensor for every trial: byte-identical files."""
    from edge_awq.offline import quantize, search, sensitivity

    files = []
    for fresh in (False, True):
        with monkeypatch.context() as m:
            if fresh:
                for mod in (search, sensitivity):
                    m.setattr(mod, "scaled_into", lambda scratch, name, w, s: w * s)
            out = tmp_path / f"fresh{fresh}.eawq"
            quantize(stories_path, SHAKESPEARE, out, group_size="channel", n_samples=4, seqlen=128,
                     budget=None if budget is None else float(budget))
        files.append(out.read_bytes())
    assert files[0] == files[1]
