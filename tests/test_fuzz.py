"""Property tests of the bad-input promise: whatever is changed in a file, a config or a flag, a command exits 0
with the right answer, or 2 with one line, never a traceback and never another answer without an error.

Bounded in the default run (a few dozen examples a property); ``HYPOTHESIS_PROFILE=long python -m pytest
tests/test_fuzz.py`` runs thousands. Commands run in-process (``cli.main``) so that an example takes
milliseconds; an exception escaping ``main`` is a traceback a user would have seen.
"""

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_awq.cli import main
from tests.conftest import SHAKESPEARE, TINYSTORIES
from tests.conftest import CONFIG, read_header, write_header

settings.register_profile("default", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=int(os.environ.get("EDGE_AWQ_FUZZ_EXAMPLES", 2000)), deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                    | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def promise(code: int, out: str, err: str, want_out: str | None = None) -> None:
    """0 and the right answer, or 2 and one line (or plan's answer that a model does not fit: its table, exit 2)."""
    if code == 2 and "verdict: does NOT fit" in out and not err:
        return
    if code == 0:
        if want_out is not None:
            assert out == want_out, (out, want_out)
        return
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)


@pytest.fixture(scope="module")
def packed(stories_path, tmp_path_factory) -> tuple[Path, str]:
    """A stories260K .eawq and its eval answer."""
    pytest.importorskip("torch")
    path = tmp_path_factory.mktemp("fuzz") / "s.eawq"
    code, _, err = run("export", stories_path, "--calib", SHAKESPEARE, "-o", path, "--method", "rtn", "--group-size",
                       "channel", "--n-samples", 1, "--seqlen", 64)
    assert code == 0, err
    code, out, err = run("eval", path, "--text", TINYSTORIES, "--max-tokens", 200, "--json")
    assert code == 0, err
    return path, _answer(out)


def _answer(out: str) -> str:
    """eval's result without its timing."""
    d = json.loads(out)
    return json.dumps({k: d[k] for k in ("perplexity", "tokens_scored", "windows")})


def _eval(path: Path) -> tuple[int, str, str]:
    code, out, err = run("eval", path, "--text", TINYSTORIES, "--max-tokens", 200, "--json")
    return code, _answer(out) if code == 0 else out, err


@given(key=st.sampled_from(["model_args", "quantization", "tokenizer", "checksums", "source", "layout", "version",
                            "format", "hash"]), value=JSON, reseal=st.booleans())
def test_metadata_values(packed, tmp_path, key, value, reseal):
    path, want = packed
    header, data = read_header(path)
    header["__metadata__"][key] = value if isinstance(value, str) else json.dumps(value)
    bad = write_header(tmp_path / f"m{os.getpid()}.eawq", header, data, reseal)
    promise(*_eval(bad), want)
    promise(*run("verify", bad))
    promise(*run("inspect", bad))


@given(field=st.sampled_from(["dtype", "shape", "data_offsets"]), value=JSON, which=st.integers(0, 200),
       reseal=st.booleans())
def test_tensor_table_entries(packed, tmp_path, field, value, which, reseal):
    path, want = packed
    header, data = read_header(path)
    names = sorted(k for k in header if k != "__metadata__")
    header[names[which % len(names)]][field] = value
    bad = write_header(tmp_path / f"t{os.getpid()}.eawq", header, data, reseal)
    promise(*_eval(bad), want)
    promise(*run("verify", bad))


@given(where=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255))
def test_one_byte_changed_anywhere(packed, tmp_path, where, xor):
    """A byte changed anywhere: an error naming what is damaged, or (a header's padding) the same answer."""
    path, want = packed
    raw = bytearray(path.read_bytes())
    i = int(where * len(raw))
    raw[i] ^= xor
    bad = tmp_path / f"b{os.getpid()}.eawq"
    bad.write_bytes(bytes(raw))
    promise(*_eval(bad), want)


@given(key=st.sampled_from(sorted(CONFIG) + ["head_dim", "rope_scaling", "rope_parameters", "tie_word_embeddings",
                                             "sliding_window", "hidden_act"]), value=JSON)
def test_config_values(tmp_path, key, value):
    d = tmp_path / f"c{os.getpid()}"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({**CONFIG, key: value}))
    promise(*run("plan", d / "config.json", "--memory", "1GiB"))
    promise(*run("plan", d, "--memory", "1GiB"))


@given(cmd=st.sampled_from([("plan", "llama-2-7b", "--memory", "8GiB"), ("chat", "/nonexistent.eawq"),
                            ("eval", "/nonexistent.eawq", "--text", "/nonexistent.txt")]),
       flag=st.sampled_from(["--ctx", "--memory", "--group-size", "--seed", "--temperature", "--top-p", "--top-k",
                             "--repetition-penalty", "--max-new-tokens", "--batch", "--prefill-chunk", "--max-tokens",
                             "--bits", "--head", "--kv-dtype"]),
       value=st.text(max_size=10) | st.integers(-2**70, 2**70).map(str) | st.floats().map(str))
def test_flag_values(cmd, flag, value):
    try:
        code, out, err = run(*cmd, flag, value)
    except SystemExit as e:  # argparse's own exit (an unknown flag for this command): its one line, code 2
        code, out, err = e.code, "", "usage line"
    promise(code, out, err)
