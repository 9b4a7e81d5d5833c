"""The numba backend as an ARM box runs it: aarch64 Python under qemu user-mode emulation.

On aarch64 the x86 integer GEMVs are not available and the float kernels run; this machine's
x86 tests never reach them on the common group sizes. `.ci/aarch64 DIR` builds that Python (CI
does, and sets EDGE_AWQ_AARCH64_PYTHON to DIR/python); without it this test is skipped. Emulation
makes it slow (minutes: numba compiles its kernels under qemu), so it runs one process.
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

    assert got["machine"] == "aarch64"
    assert not got["integer_kernels"]  # the float kernels are what ran
    bad = [k for k in got["kernels"] if not k["rel_err"] <= 1e-3]
    assert not bad and len(got["kernels"]) >= 9, bad

    ops = ReferenceBackend()
    w = load_weights(src)
    want = [p.token for p in generate(w, ops, src.tokenizer(), prompt, SamplingArgs(max_new_tokens=32))
            if p.token is not None]
    assert got["tokens"] == want and len(want) >= 16
    assert np.unique(want).size > 4  # a real continuation, not one token repeated
