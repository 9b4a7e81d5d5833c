"""The numba backend as an ARM box runs it: aarch64 Python under qemu user-mode emulation.

With int16 activations the x86 int16 GEMVs are not available on aarch64 and the float kernels run;
this machine's x86 tests never reach them on the common group sizes. With int8 activations the
integer kernels run with the Armv8.6 matrix multiply (``smmla``, for prompts), the Armv8.2 dot product
(``sdot``) or plain NEON: emulation reports no CPU features, so the CPU is named (NUMBA_CPU_NAME: a
Neoverse V1 for i8mm; a Cortex-A76, the Raspberry Pi 5's, which has the dot product; a Cortex-A53 for
plain NEON) and the instruction set forced (EDGE_AWQ_ISA), each with its
own numba cache so that the kernels compile and their assembly can be read. `.ci/aarch64 DIR` builds
that Python (CI does, and sets EDGE_AWQ_AARCH64_PYTHON to DIR/python); without it these tests are
skipped. Emulation makes them slow (minutes each: numba compiles its kernels under qemu), so they run
beside the rest of the suite, started as it begins at the lowest priority, and these tests come last
(tests/aarch64_runs.py).
"""

import os

import numpy as np
import pytest

AARCH64_PYTHON = os.environ.get("EDGE_AWQ_AARCH64_PYTHON")
pytestmark = [pytest.mark.long,
              pytest.mark.skipif(not AARCH64_PYTHON, reason="set EDGE_AWQ_AARCH64_PYTHON: build it with .ci/aarch64 DIR")]


def _model(res: dict):
    """The exported stories260K the checks ran (4-bit RTN, per-channel groups 64 and 172 wide, int8 head), and
    the prompt's token ids."""
    from edge_awq.formats.load import open_source

    return open_source(res["setup"]["model"]), res["setup"]["prompt"]


@pytest.mark.emulated("float")
def test_numba_on_aarch64_matches_the_numpy_reference(emulated):
    from edge_awq.backends.reference import ReferenceBackend
    from edge_awq.generate import SamplingArgs, generate
    from edge_awq.formats.load import load_weights

    res = emulated("float")
    got = res["got"]
    assert got["machine"] == "aarch64" and got["isa"] == "none"  # emulation reports no features: no integer kernels
    assert not got["integer_kernels"]  # the float kernels are what ran
    bad = [k for k in got["kernels"] if not k["rel_err"] <= 1e-3]
    assert not bad and len(got["kernels"]) >= 9, bad

    src, prompt = _model(res)
    ops = ReferenceBackend()
    w = load_weights(src)
    want = [p.token for p in generate(w, ops, src.tokenizer(), prompt, SamplingArgs(max_new_tokens=32))
            if p.token is not None]
    assert got["tokens"] == want and len(want) >= 16
    assert np.unique(want).size > 4  # a real continuation, not one token repeated


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


@pytest.mark.emulated("sdot")
def test_int8_kernels_on_aarch64_use_sdot_and_match_the_host(emulated):
    """The Cortex-A76 path: the 8-bit-activation routes run, their integer part is the reference's (results
    within float rounding of ``linear_int8``), the compiled loops hold sdot (and no smmla: the A76 lacks i8mm),
    and 32 greedy tokens are the x86 host's with the same activations."""
    res = emulated("sdot")
    got = res["got"]
    assert got["machine"] == "aarch64" and got["isa"] == "sdot" and not got["integer_kernels"]
    exact = [k for k in got["kernels"] if k["int8"]]
    assert len(exact) >= 8 and {k["route"] for k in exact} == {"a8-sdot", "a8-gemm-sdot"}
    bad = [k for k in got["kernels"] if not k["rel_err"] <= (2e-6 if k["int8"] else 1e-3)]
    assert not bad, bad
    assert got["inner_loops"]["sdot"] >= 32 and got["inner_loops"]["smmla"] == 0

    assert got["tokens"] == _host_int8_tokens(*_model(res), 32)


@pytest.mark.emulated("i8mm")
def test_int8_prompts_on_aarch64_use_smmla(emulated):
    """An Armv8.6 core with i8mm (a Neoverse V1: Graviton 3): a prompt's tiles run smmla (two rows times two
    tokens, eight codes deep), a decode step sdot; the integer part is the reference's and 32 greedy tokens
    are the host's."""
    res = emulated("i8mm")
    got = res["got"]
    assert got["isa"] == "i8mm"
    exact = [k for k in got["kernels"] if k["int8"]]
    assert {k["route"] for k in exact} == {"a8-i8mm", "a8-gemm-i8mm"}
    assert any(k["shape"][4] >= 4 for k in exact)  # tiles of four tokens: the smmla loop ran
    bad = [k for k in got["kernels"] if not k["rel_err"] <= (2e-6 if k["int8"] else 1e-3)]
    assert not bad, bad
    assert got["inner_loops"]["smmla"] >= 64 and got["inner_loops"]["sdot"] >= 32

    assert got["tokens"] == _host_int8_tokens(*_model(res), 32)


@pytest.mark.emulated("neon")
def test_int8_kernels_on_plain_neon(emulated):
    """A Cortex-A53 (no dot product): the same routes by widening multiplies, no sdot compiled."""
    got = emulated("neon")["got"]
    assert got["isa"] == "neon" and got["inner_loops"]["sdot"] == 0
    exact = [k for k in got["kernels"] if k["int8"]]
    assert len(exact) >= 8 and {k["route"] for k in exact} == {"a8-neon", "a8-gemm-neon"}
    assert all(k["rel_err"] <= (2e-6 if k["int8"] else 1e-3) for k in got["kernels"]), got["kernels"]
