import json

from tests.golden.regen import GOLDEN_FILE
from tests.conftest import edge_awq


def test_bench_reports_every_figure():
    r = edge_awq("bench", GOLDEN_FILE, "--prefill", "8", "16", "--decode", "8", "--repeat", "1", "--backend", "numba",
                 "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["backend"] == "numba" and set(res["prefill"]) == {"8", "16"}
    figures = [res[k] for k in ("read_gb_per_s", "decode_tokens_per_s", "peak_rss_mb")]
    figures += [p[k] for p in res["prefill"].values() for k in sorted(p)]
    assert all(isinstance(f, float) and f > 0 for f in figures)  # every figure measured, none missing or zero
    assert [k["linear"] for k in res["kernels"]] == ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output", "W4 g128", "W4 g128"]
    assert [k["shape"] for k in res["kernels"][-2:]] == [[4096, 4096], [11008, 4096]]
    assert res["kernels"][4]["shape"] == [64, 32] and all(k["gb_per_s"] > 0 for k in res["kernels"])


def test_bench_times_kernels_from_memory_and_names_the_machine():
    """Each kernel row is timed over copies of its weights that make up four times the last-level cache
    (the figures are memory's, not the cache's), and the JSON says which cache, CPU and instructions."""
    from edge_awq.backends.host import last_level_cache
    from edge_awq.backends.numba.isa import ISA

    r = edge_awq("bench", GOLDEN_FILE, "--prefill", "8", "--decode", "4", "--repeat", "1", "--backend", "numba",
                 "--activations", "int8", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    llc = last_level_cache()
    assert res["llc_bytes"] == llc and res["cache_assumed_bytes"] == (llc or 32 << 20)
    assert res["isa"] == (ISA if ISA != "none" else res["isa"]) and res["activations"] == "int8" and res["cpu"]
    for k in res["kernels"]:  # the tiny model's linears: as many copies as bench makes
        assert k["working_set_bytes"] >= 4 * res["cache_assumed_bytes"] or k["copies"] == 4096, k
    big = res["kernels"][-2:]  # the 7B-shaped layers: 4x the cache in whole copies, never capped
    assert all(k["working_set_bytes"] >= 4 * res["cache_assumed_bytes"] and k["copies"] < 4096 for k in big)
