"""Decode and prefill speed of edge-awq beside llama.cpp on the same model, threads and machine.

    python benchmarks/llamacpp_speed.py MODEL.eawq --gguf MODEL-Q4_0.gguf --llama-bench PATH/llama-bench \\
        [--threads 2] [--reps 3] [--activations auto] [--out speed.json]

Runs ``llama-bench -t THREADS -p 512 -n 128`` on the GGUF and ``edge-awq bench --prefill 512
--decode 128`` on the ``.eawq``, alternately, REPS times each (run it on an otherwise idle machine),
and prints a Markdown table: each figure as the best of the repetitions (and every repetition), and
the ratio edge-awq / llama.cpp. Beside the figures it records what ran: the CPU (model and the
vector extensions it reports), llama.cpp's build (commit, the CMake options it was configured with
where its CMakeCache.txt is found beside the binary, and the weight layout its CPU backend repacked
the model into), and edge-awq's instruction set and activations. llama-bench is built from the
llama.cpp sources that the PyPI sdist of ``llama-cpp-python`` carries (README, "Speed").
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from edge_awq.backends.host import cpu_info, cpu_name

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "asimddp", "i8mm", "sve")


def cpu() -> dict:
    info = cpu_info()
    reported = set(info.get("flags", info.get("Features", "")).split())
    return {"model": cpu_name(), "features": [f for f in FLAGS if f in reported]}


def _run(cmd: list[str], env=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def llama_build(exe: str, gguf: str, threads: int) -> dict:
    """What the llama.cpp binary is: its commit (from one tiny verbose run), its CMake options, and the
    layouts its CPU backend repacks the weights into."""
    r = _run([exe, "-m", gguf, "-t", str(threads), "-p", "8", "-n", "0", "-r", "1", "-o", "json", "-v"])
    if r.returncode != 0:
        sys.exit(f"llama-bench failed: {r.stderr.strip()[-500:]}")
    row = json.loads(r.stdout)[0]
    repacks = sorted(set(re.findall(r"repack tensor \S+ with (\S+)", r.stderr)))
    types = sorted(set(re.findall(r"type\s+(\w+):\s+\d+ tensors", r.stderr)))
    cache = Path(exe).resolve().parent.parent / "CMakeCache.txt"
    options = {}
    if cache.is_file():
        for line in cache.read_text(errors="replace").splitlines():
            m = re.match(r"(GGML_(?:NATIVE|AVX\w*|F16C|FMA|CPU_\w+)|CMAKE_BUILD_TYPE):\w+=(.*)", line)
            if m:
                options[m.group(1)] = m.group(2)
    return {"commit": row.get("build_commit"), "build_number": row.get("build_number"),
            "cpu_info": row.get("cpu_info"), "cmake": options, "repacked_as": repacks, "tensor_types": types}


def llama_bench(exe: str, gguf: str, threads: int) -> dict:
    r = _run([exe, "-m", gguf, "-t", str(threads), "-p", "512", "-n", "128", "-o", "json"])
    if r.returncode != 0:
        sys.exit(f"llama-bench failed: {r.stderr.strip()[-500:]}")
    out = {}
    for row in json.loads(r.stdout):
        key = f"prefill {row['n_prompt']}" if row["n_prompt"] else f"decode {row['n_gen']}"
        out[key] = row["avg_ts"]
    return out


def edge_bench(model: str, threads: int, activations: str) -> dict:
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    r = _run([sys.executable, "-m", "edge_awq", "bench", model, "--backend", "numba", "--prefill", "512",
              "--decode", "128", "--activations", activations, "--json"], env)
    if r.returncode != 0:
        sys.exit(f"edge-awq bench failed: {r.stderr.strip()[-500:]}")
    full = json.loads(r.stdout)
    figures = {f"prefill {n}": p["tokens_per_s"] for n, p in full["prefill"].items()}
    figures["decode 128"] = full["decode_tokens_per_s"]
    return {"figures": figures, "full": full}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--activations", default="auto", choices=("auto", "int8", "int16"))
    ap.add_argument("--out")
    a = ap.parse_args()
    build = llama_build(a.llama_bench, a.gguf, a.threads)
    theirs, ours, last = [], [], None
    for _ in range(a.reps):  # interleaved: a slow minute of the machine hits both
        theirs.append(llama_bench(a.llama_bench, a.gguf, a.threads))
        run = edge_bench(a.model, a.threads, a.activations)
        ours.append(run["figures"])
        last = run["full"]
    result = {"cpu": cpu(), "threads": a.threads, "llama.cpp": {"build": build, "runs": theirs},
              "edge-awq": {"isa": last["isa"], "activations": last["activations"], "runs": ours, "last": last}}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"CPU: {result['cpu']['model']} ({' '.join(result['cpu']['features'])}), {a.threads} threads")
    print(f"llama.cpp {build['commit']} ({', '.join(f'{k}={v}' for k, v in build['cmake'].items())}); "
          f"weights repacked as {', '.join(build['repacked_as']) or 'stored'}")
    print(f"edge-awq: {last['isa']}, {last['activations']} activations; best of {a.reps} interleaved runs each\n")
    print("| tokens/s | edge-awq | llama.cpp | ratio | edge-awq runs | llama.cpp runs |\n|---|---|---|---|---|---|")
    for key in ("prefill 512", "decode 128"):
        mine, other = [r[key] for r in ours], [r[key] for r in theirs]
        print(f"| {key} | {max(mine):.1f} | {max(other):.1f} | {max(mine) / max(other):.2f} | "
              f"{' '.join(f'{v:.0f}' for v in mine)} | {' '.join(f'{v:.0f}' for v in other)} |")


if __name__ == "__main__":
    main()
