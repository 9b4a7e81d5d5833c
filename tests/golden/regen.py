"""Regenerate tests/golden/tiny.eawq and expected.json. Run only on purpose, and review the diff:

    python tests/golden/regen.py

A seeded random LLaMA (dim 32, 2 layers, GQA 4/2, vocab 512 with stories260K's tokenizer) is
written as a Hugging Face directory, exported with RTN W4 group 16 (no torch search involved,
so the bytes do not depend on the machine's BLAS), and greedy-decoded with the reference backend.
``tiny-v1.eawq`` is the same model in format version 1 (zero points padded per row), kept as it was
written to hold the reader to old files.
"""

import hashlib
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
GOLDEN_FILE = HERE / "tiny.eawq"
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import SHAKESPEARE, TOK512_BIN  # noqa: E402
from tests.conftest import write_random_model

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}


def header_sha256(path: Path) -> str:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[: 8 + n]).hexdigest()


def greedy_tokens(path: Path, steps: int = 16) -> list[int]:
    from edge_awq.formats.load import load_weights, open_source
    from edge_awq.model import KVCache, forward
    from edge_awq.backends import select_backend

    w = load_weights(open_source(path))
    ops, cache, out = select_backend("reference"), KVCache.allocate(w.args, steps + 1), [1]
    for pos in range(steps):
        out.append(int(np.argmax(forward(w, np.array(out[-1:]), pos, cache, ops)[-1])))
    return out


def main() -> None:
    from edge_awq.formats.tokenizer import from_llama2c_bin

    with tempfile.TemporaryDirectory() as tmp:
        d = write_random_model(Path(tmp) / "tiny", CONFIG, seed=7)
        from_llama2c_bin(TOK512_BIN, 512).impl.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
        out = HERE / "tiny.eawq"
        subprocess.run([sys.executable, "-m", "edge_awq", "export", str(d), "--calib", str(SHAKESPEARE), "-o", str(out),
                        "--method", "rtn", "--group-size", "16", "--n-samples", "2", "--seqlen", "64", "--head", "fp16"],
                       check=True)
    v1 = json.loads((HERE / "expected.json").read_text())["v1_header_sha256"]  # tiny-v1.eawq is never rewritten
    expected = {"header_sha256": header_sha256(out), "greedy_from_bos": greedy_tokens(out), "v1_header_sha256": v1}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(json.dumps(expected))


if __name__ == "__main__":
    main()
