"""What tests/test_aarch64.py runs on the aarch64 Python (made by .ci/aarch64, under emulation).

    python tests/aarch64_check.py MODEL.eawq PROMPT_IDS_JSON OUT.json [int16|int8] [TOKENS]

Writes OUT.json: the machine, the instruction set the 8-bit-activation kernels chose (``isa.ISA``:
none where the CPU reports nothing, as under emulation, or the one EDGE_AWQ_ISA and NUMBA_CPU_NAME
name), whether the x86 int16 kernels are in use (they must not be), the numba linear's relative error
against the numpy reference on a set of shapes (int16: the dequantized weights; int8: the reference's
integer arithmetic, ``linear_int8``), the kernel table's routes, the instructions of the compiled
8-bit-activation kernels' inner loops (int8), and the greedy tokens the numba backend chooses for the
prompt, loaded the way `edge-awq chat` loads. The host compares them with its own: one process, so the
kernels compile once.
"""

import dataclasses
import json
import platform
import sys

import numpy as np

import re
from collections import Counter

from edge_awq.backends.numba import NumbaBackend, linear_w4, prepare
from edge_awq.backends.numba import gemv_i8 as numba_gemv_i8
from edge_awq.backends.numba import gemv_i16 as numba_gemv_i16
from edge_awq.backends.numba.isa import ISA
from edge_awq.backends.numba.linear import route
from edge_awq.backends.reference import linear_int8
from edge_awq.formats.load import load_weights, open_source
from edge_awq.generate import SamplingArgs, generate
from edge_awq.pack import pack_linear, unpack_linear

# (bits, group size, out, in, tokens): SmolLM2's widths and groups, a 7B-wide row, the int8 head,
# 3 bits, a width of 172, decode (1 token) and prefill; with int8, 6 bits in 32-column chunks (the split planes:
# 5-bit differs from 3 and 6 only in its constants, and is held to the reference on x86 only, for emulation time)
SHAPES = [(4, 64, 33, 576, 1), (4, 64, 33, 576, 5), (4, 128, 7, 4096, 1), (4, 128, 6, 4096, 3),
          (8, 64, 5, 576, 1), (8, 64, 9, 576, 4), (3, 64, 9, 576, 1), (4, 172, 5, 172, 2), (4, 32, 1, 64, 1)]


def kernel_errors(activations: str) -> list[dict]:
    """Each shape's linear against the reference; the 8-bit-activation ones share one kernel set (as a model's
    linears do), so the kernels compile once for all their widths — under emulation each compile costs minutes."""
    rng = np.random.default_rng(0)
    cases = []
    for bits, gs, out_f, in_f, t in SHAPES + ([(4, 64, 21, 576, 9), (8, 32, 13, 64, 6), (3, 32, 11, 576, 9), (6, 32, 11, 576, 9)] if activations == "int8" else []):
        w = (rng.standard_normal((out_f, in_f)) * rng.uniform(0.01, 2, (out_f, 1))).astype(np.float32)
        x = rng.standard_normal((t, in_f)).astype(np.float32)
        p = pack_linear(w, bits, gs)
        cases.append((bits, gs, out_f, in_f, t, x, p, prepare(p, repack=True, activations=activations)))
    sets = [c[-1].kernels for c in cases if c[-1].kernels is not None]
    shared = numba_gemv_i8.kernel_union(*sets) if sets else None
    out = []
    for bits, gs, out_f, in_f, t, x, p, prepared in cases:
        if prepared.kernels is not None:
            prepared = dataclasses.replace(prepared, kernels=shared)
        exact = activations == "int8" and prepared.a8 is not None  # the reference's integer arithmetic
        want = linear_int8(x, p) if exact else x @ unpack_linear(p).T
        got = linear_w4(x, prepared)
        err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
        out.append({"shape": [bits, gs, out_f, in_f, t], "rel_err": err, "int8": exact,
                    "route": route(prepared, t).name})
    return out


def inner_loops() -> dict:
    """The compiled 8-bit-activation kernel's instructions: counts of the dot-product and matrix-multiply
    instructions, and the mnemonics of the innermost loop of the one-token tile for 4-bit weights."""
    rng = np.random.default_rng(1)
    p = prepare(pack_linear(rng.standard_normal((16, 128)).astype(np.float32), 4, 64), repack=True, activations="int8")
    x = rng.standard_normal((1, 128)).astype(np.float32)
    linear_w4(x, p)
    kernel = numba_gemv_i8.gemv_kernel
    asm = "\n".join(kernel.overloads[sig].library.get_asm_str() for sig in kernel.signatures)
    mnemonics = Counter(m.group(1) for m in re.finditer(r"^\s+([a-z][a-z0-9.]*)\s", asm, re.M))
    return {"sdot": mnemonics["sdot"], "smmla": mnemonics["smmla"], "mul": mnemonics["mul"],
            "total": sum(mnemonics.values()), "asm_chars": len(asm)}


def greedy(model: str, prompt: list[int], n: int, activations: str) -> list[int]:
    src = open_source(model)
    ops = NumbaBackend(activations)
    w = ops.prepare(load_weights(src, dtype=None))
    cache = ops.allocate_cache(w.args, len(prompt) + n)
    return [p.token for p in generate(w, ops, src.tokenizer(), prompt, SamplingArgs(max_new_tokens=n), cache)
            if p.token is not None]


def main() -> int:
    model, prompt, path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    activations = sys.argv[4] if len(sys.argv) > 4 else "int16"
    n = int(sys.argv[5]) if len(sys.argv) > 5 else 32
    res = {
        "machine": platform.machine(),
        "isa": ISA,
        "integer_kernels": numba_gemv_i16.AVAILABLE,  # the block layout and the int16 GEMVs both need it
        "kernels": kernel_errors(activations),
    }
    if activations == "int8":
        res["inner_loops"] = inner_loops()
    res["tokens"] = greedy(model, prompt, n, activations) if n else []
    with open(path, "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
