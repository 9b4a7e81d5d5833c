"""Mixed precision: the allocator on hand-made tables, and mixed files exported, planned and run."""

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from edge_awq.offline.allocate import Impossible, allocate, allocate_with_kernels
from tests.conftest import PEAK, TINYSTORIES, assert_one_line_error, edge_awq, export


# --- the allocator ---

def _brute_force(costs, errors, budget):
    """The least summed error within budget, over every combination (None when none fits)."""
    best = None
    for pick in itertools.product(*(range(len(c)) for c in costs)):
        if sum(c[j] for c, j in zip(costs, pick)) <= budget:
            e = sum(err[j] for err, j in zip(errors, pick))
            best = e if best is None or e < best else best
    return best


@pytest.mark.parametrize("seed", range(40))
def test_allocation_is_optimal_and_within_budget(seed):
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    costs = [[int(x) for x in rng.integers(10, 100, m)] for _ in range(n)]
    errors = [[float(x) for x in rng.random(m)] for _ in range(n)]
    budget = int(rng.integers(10 * n, 100 * n))
    best = _brute_force(costs, errors, budget)
    if best is None:
        with pytest.raises(Impossible):
            allocate(costs, errors, budget)
        return
    pick = allocate(costs, errors, budget)
    assert sum(c[j] for c, j in zip(costs, pick)) <= budget
    assert sum(e[j] for e, j in zip(errors, pick)) == pytest.approx(best, abs=1e-12)


def test_large_budgets_are_met_exactly_or_under():
    """Costs of real sizes: the program works in rounded steps, the result holds in exact bytes."""
    rng = np.random.default_rng(1)
    costs = [[int(x) for x in rng.integers(100_000, 9_000_000, 7)] for _ in range(300)]
    errors = [sorted((float(x) for x in rng.random(7)), reverse=True) for _ in range(300)]
    for budget in (sum(min(c) for c in costs), sum(int(np.median(c)) for c in costs) + 12_345, sum(max(c) for c in costs)):
        pick = allocate(costs, errors, budget)
        used = sum(c[j] for c, j in zip(costs, pick))
        assert used <= budget
        if budget == sum(min(c) for c in costs):
            assert pick == [int(np.argmin(c)) for c in costs]  # exactly the budget: the only fit
        if budget == sum(max(c) for c in costs):
            assert pick == [int(np.argmin(e)) for e in errors]  # room for everything: the least error each


def test_ties_go_to_the_cheaper_format():
    costs = [[40, 10, 25], [30, 30, 5]]
    errors = [[0.5, 0.5, 0.5], [1.0, 0.25, 0.25]]
    assert allocate(costs, errors, 1000) == [1, 2]  # every choice fits: equal errors, the cheapest taken


def test_impossible_budget_raises():
    with pytest.raises(Impossible) as e:
        allocate([[10, 20], [5, 7]], [[1, 0], [1, 0]], 14)
    assert e.value.need == 15 and e.value.budget == 14


def _brute_force_kinds(costs, errors, kinds, budget, kind_cost):
    """The least summed error when every kind used beyond the first costs kind_cost (None when none fits)."""
    best = None
    for pick in itertools.product(*(range(len(c)) for c in costs)):
        used = {ks[j] for ks, j in zip(kinds, pick)} - {None}
        if sum(c[j] for c, j in zip(costs, pick)) + max(len(used) - 1, 0) * kind_cost <= budget:
            e = sum(err[j] for err, j in zip(errors, pick))
            best = e if best is None or e < best else best
    return best


@pytest.mark.parametrize("seed", range(30))
def test_allocation_with_kernel_costs_is_optimal_and_within_budget(seed):
    """Choices of several kinds (tile variants), each kind beyond the first costing bytes once."""
    rng = np.random.default_rng(100 + seed)
    n, m = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    costs = [[int(x) for x in rng.integers(10, 100, m)] for _ in range(n)]
    errors = [[float(x) for x in rng.random(m)] for _ in range(n)]
    kinds = [[[None, "a", "b", "c"][int(x)] for x in rng.integers(0, 4, m)] for _ in range(n)]
    budget, kind_cost = int(rng.integers(10 * n, 100 * n)), int(rng.integers(0, 60))
    best = _brute_force_kinds(costs, errors, kinds, budget, kind_cost)
    if best is None:
        with pytest.raises(Impossible):
            allocate_with_kernels(costs, errors, kinds, budget, kind_cost)
        return
    pick = allocate_with_kernels(costs, errors, kinds, budget, kind_cost)
    used = {ks[j] for ks, j in zip(kinds, pick)} - {None}
    assert sum(c[j] for c, j in zip(costs, pick)) + max(len(used) - 1, 0) * kind_cost <= budget
    assert sum(e[j] for e, j in zip(errors, pick)) == pytest.approx(best, abs=1e-12)


def test_a_kind_worth_less_than_its_kernels_is_left_out():
    """Two items of kind a; a better choice of kind b for one of them saves less error than its kernels cost
    in bytes elsewhere: the allocation stays with one kind, and takes b once b's kernels are free."""
    costs = [[10, 20, 20], [10, 20, 11]]
    errors = [[1.0, 0.5, 0.5], [1.0, 0.5, 0.4]]
    kinds = [["a", "a", "a"], ["a", "a", "b"]]
    assert allocate_with_kernels(costs, errors, kinds, 40, kind_cost=15) == [1, 1]  # [1, 2]: 31 bytes + 15 for b
    assert allocate_with_kernels(costs, errors, kinds, 40, kind_cost=0) == [1, 2]


# --- mixed files end to end (stories260K) ---

@pytest.fixture(scope="module")
def mixed_stories(stories_path, tmp_path_factory):
    pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("mixed")
    out, table = d / "b45.eawq", d / "sens.json"
    r = export(stories_path, out, "--budget", "4.5", "--n-samples", 8, "--seqlen", 128, "--sensitivity", table,
               "--json")
    assert r.returncode == 0, r.stderr
    return out, table, json.loads(r.stdout)


def test_mixed_file_meets_its_budget_and_names_its_formats(mixed_stories, stories_path):
    from edge_awq.formats.eawq import EawqSource
    from edge_awq.mixed import LinearFormat, formats_of, linear_names
    from edge_awq.pack import packed_words

    out, _, info = mixed_stories
    src = EawqSource(out)
    a = src.args
    formats = formats_of(src.quantization)
    assert set(formats) == {p for p, _, _ in linear_names(a)}
    assert len(set(formats.values())) > 1  # a budget between the formats mixes them
    assert info["bits_per_weight"] <= 4.5 and info["allocation"]["bytes"] <= info["allocation"]["budget_bytes"]
    assert info["bits_per_weight"] == pytest.approx(8 * info["allocation"]["bytes"] / a.linear_params)
    for prefix, out_f, in_f in linear_names(a):
        f = formats[prefix]
        assert isinstance(f, LinearFormat) and in_f % f.group_size == 0
        assert src.get(prefix + ".qweight").shape == (out_f, packed_words(in_f, f.bits))
        assert src.get(prefix + ".scales").shape == (out_f, in_f // f.group_size)
    r = edge_awq("inspect", out)
    assert r.returncode == 0 and "allocation: --budget 4.5" in r.stdout and "mixed w" in r.stdout


def test_plan_reads_a_mixed_file_exactly(mixed_stories):
    from edge_awq.formats.eawq import EawqSource

    out, _, _ = mixed_stories
    src = EawqSource(out)
    layers = sum(n for k, n in src.tensor_bytes().items() if k.startswith("layers."))
    r = edge_awq("plan", out, "--memory", "1GiB", "--ctx", 256, "--json")
    p = json.loads(r.stdout)
    assert p["lines"]["packed decoder weights"] == layers and p["mix"].startswith("mixed ")


@pytest.fixture(scope="module")
def mixed_stories_56(mixed_stories, stories_path):
    """A larger budget, from the same sensitivity table: 5- and 6-bit linears beside 4- and 8-bit ones."""
    out, table, _ = mixed_stories
    out56 = out.with_name("b56.eawq")
    r = export(stories_path, out56, "--budget", "5.6", "--n-samples", 8, "--seqlen", 128, "--sensitivity", table,
               "--json")
    assert r.returncode == 0, r.stderr
    return out56, table, json.loads(r.stdout)


def test_five_and_six_bit_linears_run_the_integer_kernels(mixed_stories_56):
    from edge_awq.backends.numba import NumbaBackend
    from edge_awq.backends.numba.isa import ISA
    from edge_awq.formats.eawq import EawqSource
    from edge_awq.formats.load import load_weights
    from edge_awq.mixed import formats_of

    out, _, info = mixed_stories_56
    src = EawqSource(out)
    widths = {f.bits for f in formats_of(src.quantization).values()}
    assert {5, 6} <= widths and info["bits_per_weight"] <= 5.6, widths
    if ISA == "none":
        pytest.skip("this CPU has no integer dot products the kernels use")
    nb = NumbaBackend("int8")
    w = load_weights(src)
    for lw in w.layers:
        for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            lin = getattr(lw, name)
            if lin.bits in (5, 6) and lin.group_size % 32 == 0:
                assert nb.route_of(lin, 1) == f"a8-{ISA}" and nb.route_of(lin, 100) == f"a8-gemm-{ISA}"


def test_plan_counts_the_kernel_variants_the_backend_compiles(mixed_stories_56):
    """The plan's kernel line names as many tile variants as the prepared model's shared kernel set holds."""
    from edge_awq.backends.numba import NumbaBackend
    from edge_awq.backends.numba.isa import ISA
    from edge_awq.formats.eawq import EawqSource
    from edge_awq.formats.load import load_weights
    from edge_awq.mixed import formats_of, tile_variants
    from edge_awq.plan import KERNEL_VARIANT_BYTES

    out, _, _ = mixed_stories_56
    src = EawqSource(out)
    n = tile_variants(formats_of(src.quantization).values())
    p = json.loads(edge_awq("plan", out, "--memory", "1GiB", "--ctx", 256, "--json").stdout)
    assert n >= 4 and p["lines"][f"kernels of {n - 1} more tile variants"] == (n - 1) * KERNEL_VARIANT_BYTES
    if ISA == "none":
        pytest.skip("this CPU has no integer dot products the kernels use")
    w = NumbaBackend("int8").prepare(load_weights(src, dtype=None))
    from edge_awq.model import LINEARS

    linears = [getattr(lw, name) for lw in w.layers for name in LINEARS]
    sets = {id(p.kernels): p.kernels for p in linears if getattr(p, "kernels", None) is not None}
    assert len(sets) == 1 and len(next(iter(sets.values())).dtype.names) == n


@pytest.mark.parametrize("which", ["mixed_stories", "mixed_stories_56"])
def test_mixed_file_same_greedy_tokens_on_numpy_and_numba(which, request):
    import edge_awq

    out, _, _ = request.getfixturevalue(which)
    # float activations on both, then int8 on both (the same integer arithmetic: 3- to 8-bit linears on
    # numba's integer kernels); int8 against float would flip near-ties
    for acts in (("auto", "int16"), ("int8", "int8")):
        tokens = {}
        for backend, activations in zip(("reference", "numba"), acts):
            with edge_awq.load(out, backend=backend, ctx=256, activations=activations) as llm:
                tokens[backend] = [t for piece in llm.generate("Once upon a time", max_new_tokens=24, temperature=0)
                                   for t in piece.token_ids]
        assert len(tokens["numba"]) == 24 and tokens["numba"] == tokens["reference"], acts


def test_sensitivity_table_is_reused_and_guarded(mixed_stories, stories_path, tmp_path):
    _, table, first = mixed_stories
    r = export(stories_path, tmp_path / "b4.eawq", "--budget", "4", "--n-samples", 8, "--seqlen", 128,
               "--sensitivity", table, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["allocation"]["sensitivity"] == str(table) and info["seconds"]["sensitivity"] == 0.0
    assert info["bits_per_weight"] <= 4.0 < first["bits_per_weight"]
    r = export(stories_path, tmp_path / "other.eawq", "--budget", "4", "--n-samples", 4, "--seqlen", 128,
               "--sensitivity", table)
    assert_one_line_error(r, "measured with other settings")
    assert not (tmp_path / "other.eawq").exists()


def test_impossible_budget_is_one_line(stories_path, tmp_path):
    r = export(stories_path, tmp_path / "x.eawq", "--budget", "2", "--n-samples", 2, "--seqlen", 64)
    assert_one_line_error(r, "--budget 2")
    assert "bits per weight" in r.stderr and not (tmp_path / "x.eawq").exists()


@pytest.mark.parametrize("flags,words", [
    (["--budget", "4", "--fit", "1GiB"], "--budget and --fit"),
    (["--budget", "4", "--format", "awq-gemm"], "mixed precision"),
    (["--fit", "64KiB", "--ctx", "256"], "before any weights"),
    (["--fit", "no-such-device"], "--memory"),
])
def test_mixed_flags_refused_in_one_line(stories_path, tmp_path, flags, words):
    out = tmp_path / ("x" if "awq-gemm" in flags else "x.eawq")
    r = export(stories_path, out, "--n-samples", 2, "--seqlen", 64, *flags)
    assert_one_line_error(r, words)
    assert not out.exists()


# --- --fit on SmolLM2: the plan's budget, held by the runtime ---



@pytest.mark.long
def test_fit_file_fits_its_plan_and_runs_within_it(smollm2, tmp_path):
    pytest.importorskip("torch")
    out, ctx = tmp_path / "fit.eawq", 1024
    r = export(smollm2, out, "--fit", "330MiB", "--ctx", ctx, "--method", "rtn", "--n-samples", 1, "--seqlen", 64,
               "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bits_per_weight"] < 4.3125  # below today's W4 g64: some linears at 3 bits
    r = edge_awq("plan", out, "--memory", "330MiB", "--ctx", ctx, "--json")
    plan = json.loads(r.stdout)
    assert r.returncode == 0 and plan["fits"], r.stdout
    assert plan["usable"] - plan["total"] < 0.02 * plan["usable"]  # the largest file that fits: little left over
    prompt = " ".join(TINYSTORIES.read_text().split()[: ctx // 6])
    peaks = []
    for _ in range(2):  # the first run compiles what numba's cache lacks (LLVM's memory is transient)
        p = subprocess.run([sys.executable, "-c", PEAK, "chat", str(out), "--prompt", prompt, "--backend", "numba",
                            "--ctx", str(ctx), "--max-new-tokens", "16", "--memory", "330MiB"],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        peaks.append(int([x for x in p.stderr.splitlines() if x.startswith("PEAK ")][0].split()[1]))
    assert abs(peaks[-1] - plan["total"]) <= 0.10 * plan["total"], (peaks[-1], plan["total"])


# --- the sensitivity table ---

def test_massive_channels_are_set_apart():
    import torch

    from edge_awq.offline.sensitivity import ordinary_channels

    x = torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(0))
    assert bool(ordinary_channels(x).all())
    x[..., 5] *= 300.0  # one channel carrying most of the stream's power, as SmolLM2's from layer 12 on
    keep = ordinary_channels(x)
    assert not bool(keep[5]) and int(keep.sum()) == 63


def test_layer_errors_fall_with_bits(stories_path):
    """On a real layer: every linear's judged error falls from 3 to 4 to 8 bits at one group size (a finer
    group is not always better: each format has its own scale search)."""
    import torch

    from edge_awq.formats.load import inv_freq, open_source, read_layer
    from edge_awq.model import ModelWeights
    from edge_awq.offline.layerwise import QuantArgs, to_torch
    from edge_awq.offline.sensitivity import layer_errors
    from edge_awq.offline.torch_ops import TorchOps

    src = open_source(stories_path)
    ctx = ModelWeights(src.args, None, (), None, None, torch.from_numpy(inv_freq(src)))
    tokens = np.arange(4 * 64).reshape(4, 64) % src.args.vocab_size
    x = torch.from_numpy(np.asarray(src.get("tok_embeddings")[tokens], dtype=np.float32))
    with torch.inference_mode():
        errors, signal, out = layer_errors(to_torch(read_layer(src, 0), "cpu"), x, ctx, QuantArgs(), TorchOps("cpu"))
    assert signal > 0 and out.shape == x.shape
    for n, e in errors.items():
        if n == "w2":  # input width 172: one group a row
            e = {k[:2]: v for k, v in e.items()}
        else:
            assert e["w4g32"] < e["w3g32"], (n, e)
            e = {k[:2]: v for k, v in e.items() if k.endswith("g64")}
        # two bits apart the error always falls; one apart nearly always (on 256 tokens, at 5 and 6 bits, the
        # attention output's noise can swap them: wq of this layer measures 4.2e-6 at 5 bits, 5.1e-6 at 6)
        assert e["w8"] < min(e["w5"], e["w6"]) and max(e["w5"], e["w6"]) < e["w4"] < e["w3"] and e["w5"] < e["w3"], (n, e)
    for n in ("wq", "wk", "wv", "wo", "w1", "w3"):  # 128 does not divide 64; 5, 6 and 8 bits at the largest group only
        assert set(errors[n]) == {"w3g64", "w3g32", "w4g64", "w4g32", "w5g64", "w6g64", "w8g64"}
