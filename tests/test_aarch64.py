"""The numba backend as an ARM box runs it: aarch64 Python under qemu user-mode emulation.

With int16 activations the x86 int16 GEMVs are not available on aarch64 and the float kernels run;
this machine's x86 tests never reach them on the common group sizes. With int8 activations the
integer kernels run with the Armv8.6 matrix multiply (``smmla``, for prompts), the Armv8.2 dot product
(``sdot``) or plain NEON: emulation reports no CPU features, so the CPU is named (NUMBA_CPU_NAME: a
Neoverse V1 for i8mm; a Cortex-A76, the Raspberry Pi 5's, which has the dot product; a Cortex-A53 for
plain NEON) and the instruction set forced (EDGE_AWQ_ISA), each with its
own numba cache so that the kernels compile and their assembly can be read. `.ci/aarch64 DIR` builds
that Python (CI does, and sets EDGE_AWQ_AARCH64_PYTHON to DIR/python); without it these tests are
skipped. Emulation makes them slow (minutes: numba compiles its kernels under qemu).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHAKESPEARE

AARCH64_PYTHON = os.environ.get("EDGE_AWQ_AARCH64_PYTHON")
pytestmark = [pytest.mark.long,
              pytest.mark.skipif(not AARCH64_PYTHON, reason="set EDGE_AWQ_AARCH64_PYTHON: build it with .ci/aarch64 DIR")]
CHECK = Path(__file__).with_name("aarch64_check.py")


@pytest.fixture(scope="module")
def stories_rtn(stories_path, tmp_path_factory) -> Path:
    """stories260K, 4-bit RTN with per-channel groups (64 and 172 wide) and an int8 head."""
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("aarch64") / "stories.eawq"
    subprocess.run([sys.executable, "-m", "edge_awq", "export", str(stories_path), "--calib", str(SHAKESPEARE),
                    "--method", "rtn", "--group-size", "channel", "--n-samples", "4", "--seqlen", "128",
                    "-o", str(out)], check=True, capture_output=True)
    return out


def test_numba_on_aarch64_matches_the_numpy_reference(stories_rtn, tmp_path):
    from edge_awq.backends.reference import ReferenceBackend
    from edge_awq.generate import SamplingArgs, generate
    from edge_awq.formats.load import load_weights, open_source

    src = open_source(stories_rtn)
    prompt = src.tokenizer().encode("Once upon a time, a little dog", bos=True)
    out = tmp_path / "aarch64.json"
    run = subprocess.run([AARCH64_PYTHON, str(CHECK), str(stories_rtn), json.dumps(prompt), str(out)],
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(out.read_text())

    assert got["machine"] == "aarch64" and got["isa"] == "none"  # emulation reports no features: no integer kernels
    assert not got["integer_kernels"]  # the float kernels are what ran
    bad = [k for k in got["kernels"] if not k["rel_err"] <= 1e-3]
    assert not bad and len(got["kernels"]) >= 9, bad

    ops = ReferenceBackend()
    w = load_weights(src)
    want = [p.token for p in generate(w, ops, src.tokenizer(), prompt, SamplingArgs(max_new_tokens=32))
            if p.token is not None]
    assert got["tokens"] == want and len(want) >= 16
    assert np.unique(want).size > 4  # a real continuation, not one token repeated


def _run_check(model, prompt, out, activations, tokens, env):
    return subprocess.run([AARCH64_PYTHON, str(CHECK), str(model), json.dumps(prompt), str(out), activations,
                           str(tokens)], capture_output=True, text=True, timeout=1500, env={**os.environ, **env})


def _host_int8_tokens(src, prompt: list[int], n: int) -> list[int]:
    """The greedy tokens this machine's numba backend with int8 activations chooses (n of them, checked)."""
    from edge_awq.backends.numba import NumbaBackend
    from edge_awq.formats.load import load_weights
    from edge_awq.generate import SamplingArgs, generate

    ops = NumbaBackend("int8")
    w = ops.prepare(load_weights(src, dtype=None))
    want = [p.token for p in generate(w, ops, src.tokenizer(), prompt, SamplingArgs(max_new_tokens=n))
            if p.token is not None]
    assert len(want) == n
    return want


def test_int8_kernels_on_aarch64_use_sdot_and_match_the_host(stories_rtn, tmp_path):
    """The Cortex-A76 path: the 8-bit-activation routes run, their integer part is the reference's (results
    within float rounding of ``linear_int8``), the compiled loops hold sdot (and no smmla: the A76 lacks i8mm),
    and 32 greedy tokens are the x86 host's with the same activations."""
    from edge_awq.formats.load import open_source

    src = open_source(stories_rtn)
    prompt = src.tokenizer().encode("Once upon a time, a little dog", bos=True)
    out = tmp_path / "sdot.json"
    run = _run_check(stories_rtn, prompt, out, "int8", 32, {"NUMBA_CPU_NAME": "cortex-a76", "EDGE_AWQ_ISA": "sdot",
                                                            "NUMBA_CACHE_DIR": str(tmp_path / "numba")})
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["machine"] == "aarch64" and got["isa"] == "sdot" and not got["integer_kernels"]
    exact = [k for k in got["kernels"] if k["int8"]]
    assert len(exact) >= 8 and {k["route"] for k in exact} == {"a8-sdot", "a8-gemm-sdot"}
    bad = [k for k in got["kernels"] if not k["rel_err"] <= (2e-6 if k["int8"] else 1e-3)]
    assert not bad, bad
    assert got["inner_loops"]["sdot"] >= 32 and got["inner_loops"]["smmla"] == 0

    assert got["tokens"] == _host_int8_tokens(src, prompt, 32)


def test_int8_prompts_on_aarch64_use_smmla(stories_rtn, tmp_path):
    """An Armv8.6 core with i8mm (a Neoverse V1: Graviton 3): a prompt's tiles run smmla (two rows times two
    tokens, eight codes deep), a decode step sdot; the integer part is the reference's and 32 greedy tokens
    are the host's."""
    from edge_awq.formats.load import open_source

    src = open_source(stories_rtn)
    prompt = src.tokenizer().encode("Once upon a time, a little dog", bos=True)
    out = tmp_path / "i8mm.json"
    run = _run_check(stories_rtn, prompt, out, "int8", 32, {"NUMBA_CPU_NAME": "neoverse-v1", "EDGE_AWQ_ISA": "i8mm",
                                                            "NUMBA_CACHE_DIR": str(tmp_path / "numba")})
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["isa"] == "i8mm"
    exact = [k for k in got["kernels"] if k["int8"]]
    assert {k["route"] for k in exact} == {"a8-i8mm", "a8-gemm-i8mm"}
    assert any(k["shape"][4] >= 4 for k in exact)  # tiles of four tokens: the smmla loop ran
    bad = [k for k in got["kernels"] if not k["rel_err"] <= (2e-6 if k["int8"] else 1e-3)]
    assert not bad, bad
    assert got["inner_loops"]["smmla"] >= 64 and got["inner_loops"]["sdot"] >= 32

    assert got["tokens"] == _host_int8_tokens(src, prompt, 32)


def test_int8_kernels_on_plain_neon(stories_rtn, tmp_path):
    """A Cortex-A53 (no dot product): the same routes by widening multiplies, no sdot compiled."""
    out = tmp_path / "neon.json"
    run = _run_check(stories_rtn, [1], out, "int8", 0, {"NUMBA_CPU_NAME": "cortex-a53", "EDGE_AWQ_ISA": "neon",
                                                        "NUMBA_CACHE_DIR": str(tmp_path / "numba")})
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["isa"] == "neon" and got["inner_loops"]["sdot"] == 0
    exact = [k for k in got["kernels"] if k["int8"]]
    assert len(exact) >= 8 and {k["route"] for k in exact} == {"a8-neon", "a8-gemm-neon"}
    assert all(k["rel_err"] <= (2e-6 if k["int8"] else 1e-3) for k in got["kernels"]), got["kernels"]
