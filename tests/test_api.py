"""The Python API: edge_awq.load and LLM, and edge_awq.offline.quantize."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edge_awq
from edge_awq.errors import DoesNotFit, EdgeAwqError, FormatError, InputError
from tests.conftest import SHAKESPEARE, TINYSTORIES
from tests.golden.regen import GOLDEN_FILE
from tests.conftest import edge_awq as cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smol_eawq(smollm2, tmp_path_factory):
    pytest.importorskip("torch")
    from edge_awq.offline import quantize

    out = tmp_path_factory.mktemp("api") / "smollm2-w4g64.eawq"
    quantize(smollm2, SHAKESPEARE, out, method="rtn", group_size=64, n_samples=1, seqlen=64)
    return out


def test_import_loads_nothing_heavy():
    code = ("import sys, edge_awq; edge_awq.load; edge_awq.LLM; "
            "print(sorted(m for m in ('numba', 'torch', 'cffi', 'starlette', 'rich') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stderr


def test_help_is_enough_to_start():
    doc = edge_awq.load.__doc__
    for word in ("backend", "ctx", "kv_dtype", "memory", "verify", "DoesNotFit", "BackendUnavailable"):
        assert word in doc, word
    assert "yielding text pieces" in edge_awq.LLM.generate.__doc__


def test_generate_streams_the_reference_greedy_tokens(stories_path):
    from edge_awq.backends import select_backend
    from edge_awq.formats.load import load_weights, open_source
    from edge_awq.model import KVCache, forward

    with edge_awq.load(stories_path, backend="reference", ctx=64) as llm:
        assert llm.info.backend == "reference" and llm.info.backend_reason == "asked for"
        assert llm.info.args.n_layers == 5 and llm.info.quantization == {} and llm.plan is not None
        pieces = list(llm.generate("Once upon a time", max_new_tokens=12, temperature=0))
    ids = [t for p in pieces for t in p.token_ids]
    text = "".join(pieces)
    assert all(isinstance(p, str) for p in pieces) and len(ids) == 12 and pieces[-1].finish == "length"
    w = load_weights(open_source(stories_path))
    tok = open_source(stories_path).tokenizer()
    seq = tok.encode("Once upon a time", bos=True)
    cache, ops = KVCache.allocate(w.args, 64), select_backend("reference")
    want, logits = [], forward(w, np.array(seq), 0, cache, ops)[-1]
    for pos in range(len(seq), len(seq) + 12):
        want.append(int(np.argmax(logits)))
        logits = forward(w, np.array(want[-1:]), pos, cache, ops)[-1]
    assert ids == want and text == tok.decode(want)


@pytest.mark.long
def test_chat_and_sampling_defaults(smol_eawq):
    with edge_awq.load(smol_eawq, backend="numba", ctx=512) as llm:
        assert llm.info.quantization["bits"] == 4 and llm.info.generation == {}  # a GGUF source: no generation config
        s = llm.sampling()
        assert (s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (0.7, 40, 0.9, 1.1)
        assert llm.sampling(temperature=0).temperature == 0
        text = "".join(llm.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0,
                                max_new_tokens=24))
        assert "Paris" in text
        with pytest.raises(InputError, match="top_p"):
            llm.sampling(top_p=0)
        with pytest.raises(InputError, match="leaves no room"):
            list(llm.generate(list(range(3, 500)), max_new_tokens=100))


def test_recommended_sampling_comes_from_the_generation_config(tmp_path):
    from edge_awq.formats.tokenizer import from_llama2c_bin
    from tests.conftest import TOK512_BIN
    from tests.conftest import BASE, CASES, write_random_model

    d = write_random_model(tmp_path / "m", {**BASE, **CASES["llama-gqa-untied"], "vocab_size": 512})
    from_llama2c_bin(TOK512_BIN, 512).impl.save(str(d / "tokenizer.json"))
    (d / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_p": 0.8, "do_sample": True}))
    with edge_awq.load(d, backend="reference", ctx=32) as llm:
        assert llm.info.generation == {"temperature": 0.3, "top_p": 0.8}
        s = llm.sampling()
        assert (s.temperature, s.top_p, s.top_k) == (0.3, 0.8, 40)  # the model's, then the stated defaults


def test_perplexity_is_evals(stories_path):
    r = cli("eval", stories_path, "--text", TINYSTORIES, "--max-tokens", 1000, "--ctx", 256, "--json")
    assert r.returncode == 0, r.stderr
    with edge_awq.load(stories_path, backend="reference", ctx=256, dtype="float32") as llm:
        res = llm.perplexity(TINYSTORIES.read_text(), ctx=256, max_tokens=1000)
    assert res.perplexity == pytest.approx(json.loads(r.stdout)["perplexity"], rel=1e-9)


def test_errors_are_exceptions_not_exits(stories_path, tmp_path):
    with pytest.raises(DoesNotFit) as e:
        edge_awq.load(stories_path, memory="1MiB")
    assert "verdict: does NOT fit" in str(e.value) and isinstance(e.value, EdgeAwqError)
    bad = tmp_path / "bad.eawq"
    raw = bytearray(GOLDEN_FILE.read_bytes())
    raw[-100] ^= 1
    bad.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="checksum mismatch"):
        edge_awq.load(bad)
    with pytest.raises(EdgeAwqError, match="backend 'tpu' is unknown"):
        edge_awq.load(stories_path, backend="tpu")
    with edge_awq.load(stories_path, backend="reference", ctx=32) as llm:
        with pytest.raises(InputError, match="no chat template"):
            llm.chat([{"role": "user", "content": "hi"}])
    assert llm.weights is None  # closed


def test_quantize_is_export_as_a_function(stories_path, tmp_path):
    pytest.importorskip("torch")
    from edge_awq.offline import quantize

    phases, layers = [], []

    class Progress:
        def start(self, n_layers, method):
            phases.append(("start", n_layers, method))

        def phase(self, i, name):
            phases.append((i, name))

        def layer_done(self, rep):
            layers.append(rep.index)

    info = quantize(stories_path, SHAKESPEARE, tmp_path / "a.eawq", method="rtn", group_size="channel",
                    n_samples=1, seqlen=64, progress=Progress())
    assert phases[0] == ("start", 5, "rtn") and layers == [0, 1, 2, 3, 4] and (4, "propagate") in phases
    r = cli("export", stories_path, "--calib", SHAKESPEARE, "-o", tmp_path / "b.eawq", "--method", "rtn",
            "--group-size", "channel", "--n-samples", 1, "--seqlen", 64)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a.eawq").read_bytes() == (tmp_path / "b.eawq").read_bytes()
    assert info["bits_per_weight"] == pytest.approx(4.381, abs=1e-3)


@pytest.mark.long
def test_example_program_finds_paris(smol_eawq):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "capital.py"), str(smol_eawq)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "Paris" in r.stdout, r.stdout + r.stderr
