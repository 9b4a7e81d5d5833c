"""Decode and prefill speed of edge-awq beside llama.cpp on the same model, threads and machine.

    python benchmarks/llamacpp_speed.py MODEL.eawq --gguf MODEL-Q4_0.gguf --llama-bench PATH/llama-bench \\
        [--threads 2] [--out speed.json]

Runs ``llama-bench -t THREADS -p 128,512 -n 128`` on the GGUF and ``edge-awq bench`` on the
``.eawq`` one after the other (run it on an otherwise idle machine), then prints a Markdown
table with each figure and the ratio edge-awq / llama.cpp. llama-bench is built from the
llama.cpp sources that the PyPI sdist of ``llama-cpp-python`` carries (README, "Speed").
"""

import argparse
import json
import os
import subprocess
import sys


def llama_bench(exe: str, gguf: str, threads: int) -> dict:
    r = subprocess.run([exe, "-m", gguf, "-t", str(threads), "-p", "128,512", "-n", "128", "-o", "json"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"llama-bench failed: {r.stderr.strip()[-500:]}")
    out = {}
    for row in json.loads(r.stdout):
        key = f"prefill {row['n_prompt']}" if row["n_prompt"] else f"decode {row['n_gen']}"
        out[key] = row["avg_ts"]
    return out


def edge_bench(model: str, threads: int) -> dict:
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, "-m", "edge_awq", "bench", model, "--backend", "numba", "--json"],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"edge-awq bench failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    theirs = llama_bench(a.llama_bench, a.gguf, a.threads)
    ours_full = edge_bench(a.model, a.threads)
    ours = {f"prefill {n}": p["tokens_per_s"] for n, p in ours_full["prefill"].items()}
    ours["decode 128"] = ours_full["decode_tokens_per_s"]
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"llama.cpp": theirs, "edge-awq": ours_full, "threads": a.threads}, f, indent=1)
    print(f"| {a.threads} threads | edge-awq (tokens/s) | llama.cpp (tokens/s) | ratio |\n|---|---|---|---|")
    for key in ("prefill 128", "prefill 512", "decode 128"):
        if key in ours and key in theirs:
            print(f"| {key} | {ours[key]:.1f} | {theirs[key]:.1f} | {ours[key] / theirs[key]:.2f} |")


if __name__ == "__main__":
    main()
