"""edge-awq plan: the published 70B figures, the verdicts, and the runtime holding to them."""

import json
import subprocess
import sys

import pytest

from edge_awq.plan import DEVICES, GIB, PRESETS, Device, make_plan, parse_size
from tests.conftest import SHAKESPEARE, TINYSTORIES, PEAK
from tests.conftest import edge_awq


def test_llama2_70b_fits_orin_64gb_with_published_sizes():
    orin = DEVICES["jetson-agx-orin-64gb"]
    assert orin.bandwidth == 204.8e9  # the published peak of its LPDDR5
    p = make_plan(PRESETS["llama-2-70b"], "llama-2-70b", orin, 4096)
    assert p.fits and p.max_ctx == 4096
    assert abs(p.weights_bytes - 36.6e9) / 36.6e9 <= 0.02
    assert p.lines["KV cache (fp16, 4,096 tokens x 1)"] == 80 * 8 * 128 * 2 * 2 * 4096 == 1.25 * GIB
    # the plan's decode bound is arithmetic, nothing timed: the bytes each token reads, at the profile's bandwidth
    per_token = p.lines["packed decoder weights"] + p.lines["output head (fp16)"]
    assert p.decode_bound_tokens_per_s * per_token == pytest.approx(orin.bandwidth)


def test_cli_plan_table_and_json():
    r = edge_awq("plan", "llama-2-70b", "--device", "jetson-agx-orin-64gb", "--ctx", "4096")
    assert r.returncode == 0, r.stderr
    assert "verdict: fits" in r.stdout and "36.6" in r.stdout and "1.25 GiB" in r.stdout
    r = edge_awq("plan", "llama-3-70b", "--device", "jetson-orin-nano-8gb", "--json")
    assert r.returncode == 2
    p = json.loads(r.stdout)
    assert not p["fits"] and p["max_ctx"] == 0 and p["total"] > p["usable"]


def test_longest_context_is_the_boundary():
    a = PRESETS["llama-3-8b"]
    dev = Device("test", 5 * GIB, 0, 0.0, "test")
    p = make_plan(a, "llama-3-8b", dev, 8192)
    assert not p.fits and 0 < p.max_ctx < 8192
    assert make_plan(a, "m", dev, p.max_ctx).fits and not make_plan(a, "m", dev, p.max_ctx + 1).fits
    assert make_plan(a, "m", dev, 8192, kv_dtype="int8").total < p.total


@pytest.mark.parametrize("text,n", [("24GiB", 24 * GIB), ("64MiB", 64 << 20), ("16GB", 16 * 10**9), ("1024", 1024)])
def test_parse_size(text, n):
    assert parse_size(text) == n


def test_bad_plan_input_is_one_line():
    for args in (["nope-7b", "--memory", "1GiB"], ["llama-2-7b", "--device", "toaster"],
                 ["llama-2-7b", "--memory", "lots"], ["llama-2-7b", "--memory", "8GiB", "--ctx", "100000"]):
        r = edge_awq("plan", *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


@pytest.fixture(scope="module")
def smollm2_eawq(smollm2, tmp_path_factory):
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("plan") / "smol.eawq"
    r = edge_awq("export", smollm2, "--calib", SHAKESPEARE, "-o", out, "--method", "rtn", "--group-size", "64",
                 "--n-samples", "1", "--seqlen", "64")
    assert r.returncode == 0, r.stderr
    return out


def test_model_that_does_not_fit_is_refused_before_loading(smollm2_eawq):
    r = edge_awq("chat", smollm2_eawq, "--prompt", "Hi", "--memory", "64MiB")
    assert r.returncode == 2 and "does NOT fit" in r.stderr and "Traceback" not in r.stderr
    assert "packed decoder weights" in r.stderr and "[backend" not in r.stderr  # refused before a backend started


def _peak_rss_of_chat(model, ctx: int) -> int:
    prompt = " ".join(TINYSTORIES.read_text().split()[: ctx // 6])  # a long prompt: the prefill workspace is used
    r = subprocess.run([sys.executable, "-c", PEAK, "chat", str(model), "--prompt", prompt, "--backend",
                        "numba", "--ctx", str(ctx), "--max-new-tokens", "16"], capture_output=True, text=True)
    peak = [line for line in r.stderr.splitlines() if line.startswith("PEAK ")]
    assert r.returncode == 0 and peak, r.stderr
    return int(peak[0].split()[1])


@pytest.mark.long
@pytest.mark.parametrize("which,ctx", [("stories", 512), ("smollm2", 1024)])
def test_measured_peak_rss_is_what_plan_predicts(which, ctx, request, tmp_path):
    if which == "stories":
        model = tmp_path / "stories.eawq"
        pytest.importorskip("torch")
        r = edge_awq("export", request.getfixturevalue("stories_path"), "--calib", SHAKESPEARE, "-o", model,
                     "--method", "rtn", "--group-size", "channel", "--n-samples", "1", "--seqlen", "64")
        assert r.returncode == 0, r.stderr
    else:
        model = request.getfixturevalue("smollm2_eawq")
    r = edge_awq("plan", model, "--memory", "24GiB", "--ctx", ctx, "--json")
    predicted = json.loads(r.stdout)["total"]
    _peak_rss_of_chat(model, ctx)  # first run: numba compiles what its cache lacks (LLVM's memory is transient)
    measured = _peak_rss_of_chat(model, ctx)
    assert abs(measured - predicted) <= max(0.10 * predicted, 30e6), (measured, predicted)
