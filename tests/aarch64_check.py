"""What tests/test_aarch64.py runs on the aarch64 Python (made by .ci/aarch64, under emulation).

    python tests/aarch64_check.py MODEL.eawq PROMPT_IDS_JSON OUT.json

Writes OUT.json: the machine, whether the x86 integer kernels are in use (they must not be), the
numba linear's relative error against the numpy dequantization on a set of shapes, and the
greedy tokens the numba backend chooses for the prompt, loaded the way `edge-awq chat` loads.
The host compares them with its own numpy reference: one process, so the kernels compile once.
"""

import json
import platform
import sys

import numpy as np

from edge_awq.backends.numba import gemv_i16 as numba_gemv_i16
from edge_awq.backends.numba import NumbaBackend, linear_w4, prepare
from edge_awq.generate import SamplingArgs, generate
from edge_awq.formats.load import load_weights, open_source
from edge_awq.pack import pack_linear, unpack_linear

# (bits, group size, out, in, tokens): SmolLM2's widths and groups, a 7B-wide row, the int8 head,
# 3 bits, a width of 172, decode (1 token) and prefill
SHAPES = [(4, 64, 33, 576, 1), (4, 64, 33, 576, 5), (4, 128, 7, 4096, 1), (4, 128, 6, 4096, 3),
          (8, 64, 5, 576, 1), (8, 64, 9, 576, 4), (3, 64, 9, 576, 1), (4, 172, 5, 172, 2), (4, 32, 1, 64, 1)]


def kernel_errors() -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for bits, gs, out_f, in_f, t in SHAPES:
        w = (rng.standard_normal((out_f, in_f)) * rng.uniform(0.01, 2, (out_f, 1))).astype(np.float32)
        x = rng.standard_normal((t, in_f)).astype(np.float32)
        p = pack_linear(w, bits, gs)
        want = x @ unpack_linear(p).T
        got = linear_w4(x, prepare(p, repack=True))
        err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
        out.append({"shape": [bits, gs, out_f, in_f, t], "rel_err": err})
    return out


def greedy(model: str, prompt: list[int], n: int) -> list[int]:
    src = open_source(model)
    ops = NumbaBackend()
    w = ops.prepare(load_weights(src, dtype=None))
    cache = ops.allocate_cache(w.args, len(prompt) + n)
    return [p.token for p in generate(w, ops, src.tokenizer(), prompt, SamplingArgs(max_new_tokens=n), cache)
            if p.token is not None]


def main() -> int:
    model, prompt, path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    res = {
        "machine": platform.machine(),
        "integer_kernels": numba_gemv_i16.AVAILABLE,  # the block layout and the int16 GEMVs both need it
        "kernels": kernel_errors(),
        "tokens": greedy(model, prompt, 32),
    }
    with open(path, "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
