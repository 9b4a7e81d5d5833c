"""An AWQ export written as an AutoAWQ GEMM directory against the same integers as an .eawq, in one run.

    python benchmarks/interop_e2e.py "$SMOL" --calib ../shared/data/tinyshakespeare.txt \\
        --text ../shared/data/wikitext2-test.txt --max-tokens 8192 --n-samples 4 --out out/interop

Exports SOURCE with AWQ (W4 g64) straight into ``--format awq-gemm``, converts that directory to an
.eawq (float16 head, as the directory has it), scores both with ``edge-awq eval`` (numba, the same
protocol) and times both with ``edge-awq bench`` (numba), the two interleaved ``--repeat`` times.
Prints one markdown table; the CPU model is in its first line.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path


def edge_awq(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "edge_awq", *map(str, args), "--json"], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"edge-awq {' '.join(map(str, args))} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    """The CPU's name, family and model, and the vector extensions the kernels may use."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                    if ":" in line)
    except OSError:
        return platform.processor()
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "asimddp", "i8mm")
             if f in info.get("flags", info.get("Features", "")).split()]
    return (f"{info.get('model name', platform.processor())} (family {info.get('cpu family')}, model "
            f"{info.get('model')}; {' '.join(flags)})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source")
    p.add_argument("--calib", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--group-size", default="64")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("out/interop"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    d, f = a.out / "awq-gemm", a.out / "from-awq-gemm.eawq"
    if not d.exists():
        edge_awq("export", a.source, "--calib", a.calib, "-o", d, "--format", "awq-gemm", "--group-size",
                 a.group_size, "--n-samples", a.n_samples)
    if not f.exists():
        edge_awq("convert", d, "-o", f)
    rows = {}
    for m in (f, d):
        ev = edge_awq("eval", m, "--text", a.text, "--max-tokens", a.max_tokens, "--backend", "numba")
        rows[m] = {"perplexity": ev["perplexity"], "tokens": ev["tokens_scored"], "decode": [], "prefill": []}
    for _ in range(a.repeat):
        for m in (f, d):
            b = edge_awq("bench", m, "--backend", "numba", "--prefill", "128", "--decode", "128", "--repeat", "1")
            rows[m]["decode"].append(b["decode_tokens_per_s"])
            rows[m]["prefill"].append(b["prefill"]["128"]["tokens_per_s"])
    print(f"CPU: {cpu_model()}; {a.max_tokens} tokens of {Path(a.text).name}, windows of 512; numba")
    print("| model | perplexity | decode tokens/s (median of " f"{a.repeat}) | prefill 128 tokens/s |")
    print("|---|---|---|---|")
    for m, r in rows.items():
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        print(f"| {m.name} | {r['perplexity']:.4f} | {med(r['decode']):.1f} | {med(r['prefill']):.1f} |")


if __name__ == "__main__":
    main()
