"""The README's quality table: perplexity of FP, RTN and AWQ variants, measured in one run.

    python benchmarks/quality.py MODEL --calib TEXT --text EVAL [--max-tokens N] [--group-size G]
        [--n-samples 128] [--seqlen 512] [--bits 4 3] [--variants rtn awq-scale awq awq-duo awq-bf16 ...]
        [--gguf NAME=FILE ...] [--reuse] --out DIR

Each variant is exported with ``edge-awq export`` and scored with ``edge-awq eval``
(same protocol as the FP model). ``--gguf`` adds rows for GGUF files quantized by
other tools (llama.cpp's ``llama-quantize``), scored by the same ``edge-awq eval``;
their bits per weight count the decoder layers' linear weights only, as ours do.
``--reuse`` keeps the rows already in DIR/quality.json (a long run, resumed).
Writes DIR/quality.json and prints a Markdown table whose "gap / RTN" column is
(ppl - FP) / (ppl_RTN - FP) at the same bit width (4-bit RTN for GGUF rows).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "rtn": ["--method", "rtn"],
    "awq-scale": ["--method", "awq", "--no-clip"],
    "awq": ["--method", "awq"],
    "awq-duo": ["--method", "awq", "--duo-scaling"],
    # the search's approximations (docs/export-speed.md)
    "awq-bf16": ["--method", "awq", "--search-dtype", "bfloat16"],
    "awq-blocks4": ["--method", "awq", "--search-blocks", "4"],
    "awq-blocks16-bf16": ["--method", "awq", "--search-blocks", "16", "--search-dtype", "bfloat16"],
}
LABELS = {"rtn": "RTN", "awq-scale": "AWQ scale only", "awq": "AWQ scale+clip", "awq-duo": "AWQ scale+clip, duo",
          "awq-bf16": "AWQ scale+clip, search in bfloat16", "awq-blocks4": "AWQ scale+clip, judged on 4 blocks",
          "awq-blocks16-bf16": "AWQ scale+clip, judged on 16 blocks in bfloat16"}


def edge_awq(*args) -> dict:
    r = subprocess.run([sys.executable, "-m", "edge_awq", *map(str, args), "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"edge-awq {args[0]} failed: {r.stderr.strip()}")
    return json.loads(r.stdout)


def gguf_layer_bits(path: str) -> tuple[float, str]:
    """Bits per weight of a GGUF's decoder-layer matrices, and their quantization types."""
    from gguf import GGUFReader

    bits = n = 0
    kinds = set()
    for t in GGUFReader(path).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            bits, n = bits + 8 * int(t.n_bytes), n + int(t.n_elements)
            kinds.add(t.tensor_type.name)
    return bits / n, "+".join(sorted(kinds))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--group-size", default="auto")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--variants", nargs="+", default=["rtn", "awq-scale", "awq", "awq-duo"], choices=list(VARIANTS))
    ap.add_argument("--head", default="fp16", help="output head of every export (default fp16: the layers compared)")
    ap.add_argument("--gguf", nargs="+", default=[], metavar="NAME=FILE", help="rows for GGUF files made elsewhere")
    ap.add_argument("--reuse", action="store_true", help="keep the rows already in OUT/quality.json")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    limit = ["--max-tokens", a.max_tokens] if a.max_tokens else []
    saved = a.out / "quality.json"
    rows = json.loads(saved.read_text()) if a.reuse and saved.exists() else []
    have = {(r["variant"], r["bits"]) for r in rows}
    if ("FP", 16) not in have:
        rows.insert(0, {"variant": "FP", "bits": 16, **edge_awq("eval", a.model, "--text", a.text, *limit)})
    for spec in a.gguf:
        name, path = spec.split("=", 1)
        if (name, 4) not in have:
            bpw, kinds = gguf_layer_bits(path)
            rows.append({"variant": name, "bits": 4, **edge_awq("eval", path, "--text", a.text, *limit),
                         "bits_per_weight": bpw, "export_seconds": None, "group_size": kinds})
            saved.write_text(json.dumps(rows, indent=1))
    for bits in a.bits:
        for v in a.variants:
            if (v, bits) in have:
                continue
            out = a.out / f"{v}-w{bits}.eawq"
            exp = edge_awq("export", a.model, "--calib", a.calib, "-o", out, "--bits", bits, "--group-size",
                           a.group_size, "--n-samples", a.n_samples, "--seqlen", a.seqlen, "--head", a.head,
                           *VARIANTS[v])
            ev = edge_awq("eval", out, "--text", a.text, *limit)
            rows.append({"variant": v, "bits": bits, **ev, "bits_per_weight": exp["bits_per_weight"],
                         "export_seconds": exp["seconds"]["total"], "group_size": exp["group_size"]})
            saved.write_text(json.dumps(rows, indent=1))
    order = {v: i for i, v in enumerate(["FP", *VARIANTS])}
    rows.sort(key=lambda r: (-r["bits"] if r["variant"] in order else -4, order.get(r["variant"], 99)))
    fp = rows[0]["perplexity"]
    print("| method | bits | group | bits/weight | perplexity | gap / RTN | export time (2 cores) |\n|---|---|---|---|---|---|---|")
    print(f"| FP (source) | 16 | | | {fp:.2f} | | |")
    for r in rows[1:]:
        rtn = next((x["perplexity"] for x in rows if x["variant"] == "rtn" and x["bits"] == r["bits"]), None)
        ratio = f"{(r['perplexity'] - fp) / (rtn - fp):.2f}" if rtn and rtn != fp else ""
        label = LABELS.get(r["variant"], f"llama.cpp {r['variant']}")
        took = "" if r["export_seconds"] is None else f"{r['export_seconds'] / 60:.1f} min"
        print(f"| {label} | {r['bits']} | {r['group_size']} | {r['bits_per_weight']:.3f} | "
              f"{r['perplexity']:.2f} | {ratio} | {took} |")


if __name__ == "__main__":
    main()
