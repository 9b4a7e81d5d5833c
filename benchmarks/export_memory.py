"""Peak memory of ``edge-awq export`` as the model gets deeper (it should not grow).

    python benchmarks/export_memory.py MODEL --calib TEXT [--repeats 1 4] [--method rtn] \\
        [--n-samples 4] [--seqlen 256] [--group-size 64]

Writes MODEL's layers repeated R times as a sharded float16 Hugging Face directory (a
synthetic deeper model: ``tests/hfdir.py``), exports each with ``edge-awq export`` and reads
the exporter's own peak resident memory (VmHWM) at exit. Prints a Markdown table.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK = """
import sys
from edge_awq.cli import main
sys.argv = ["edge-awq", *sys.argv[1:]]
try:
    sys.exit(main())
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    sys.stderr.write(f"PEAK {int(hwm.split()[1]) * 1024}\\n")
"""


def peak_of(args: list[str]) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True)
    peak = [line for line in r.stderr.splitlines() if line.startswith("PEAK ")]
    if r.returncode != 0 or not peak:
        sys.exit(f"edge-awq {args[0]} failed: {r.stderr[-800:]}")
    return int(peak[0].split()[1]), r.stdout


def main():
    from edge_awq.formats.load import open_source
    from tests.hfdir import write_hf_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--repeats", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--n-samples", default="4")
    ap.add_argument("--seqlen", default="256")
    ap.add_argument("--group-size", default="64")
    a = ap.parse_args()
    src = open_source(a.model)
    rows = []
    for r in a.repeats:
        tmp = Path(tempfile.mkdtemp(prefix="deep"))
        try:
            hf = write_hf_dir(src, tmp / "hf", shards=4, dtype=np.float16, repeat=r)
            size = sum(f.stat().st_size for f in hf.iterdir())
            peak, _ = peak_of(["export", str(hf), "--calib", a.calib, "-o", str(tmp / "out.eawq"), "--method",
                               a.method, "--n-samples", a.n_samples, "--seqlen", a.seqlen, "--group-size",
                               a.group_size])
            rows.append((r, src.args.n_layers * r, size, peak))
        finally:
            shutil.rmtree(tmp)
    base = rows[0][3]
    print("| layers | source (fp16) | export peak RSS | vs the first |\n|---|---|---|---|")
    for r, n, size, peak in rows:
        print(f"| {n} | {size / 1e6:,.0f} MB | {peak / 1e6:,.0f} MB | {peak / base:.2f} x |")


if __name__ == "__main__":
    main()
