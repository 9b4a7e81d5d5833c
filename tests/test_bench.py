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
