"""The README's quality table: perplexity of FP, RTN and AWQ variants, measured in one run.

    python benchmarks/quality.py MODEL --calib TEXT --text EVAL [--also-text EVAL2] [--max-tokens N]
        [--group-size G] [--n-samples 128] [--seqlen 512] [--bits 4 3]
        [--variants rtn awq-scale awq awq-duo awq-bf16 ... budget:4.5 fit:355MiB ...]
        [--duo-scaling] [--gguf NAME=FILE ...] [--export-flags FLAGS] [--eval-flags FLAGS] [--reuse] --out DIR

Each variant is exported with ``edge-awq export`` and scored with ``edge-awq eval``
(same protocol as the FP model). ``--gguf`` adds rows for GGUF files quantized by
other tools (llama.cpp's ``llama-quantize``), scored by the same ``edge-awq eval``;
their bits per weight count the decoder layers' linear weights only, as ours do.
``--reuse`` keeps the rows already in DIR/quality.json (a long run, resumed).
Mixed-precision variants: ``budget:BITS`` (``export --budget BITS``) and ``fit:MEMORY``
(``export --fit MEMORY --ctx 2048``, with the default int8 head that the plan counts); they run once,
not per ``--bits``, and share one sensitivity table (``export --sensitivity``) in DIR. ``--also-text``
scores every row on a second text (one that chose nothing: the ranking should hold there too).
Writes DIR/quality.json and prints a Markdown table whose "gap / RTN" column is
(ppl - FP) / (ppl_RTN - FP) at the same bit width (4-bit RTN for GGUF and mixed rows).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "rtn": ["--method", "rtn"],
    "awq-scale": ["--method", "awq", "--no-clip"],
    "awq": ["--method", "awq"],  # the default search (screened above 16 blocks)
    "awq-exact": ["--method", "awq", "--exact"],
    "awq-duo": ["--method", "awq", "--duo-scaling"],
    "awq-documents": ["--method", "awq", "--calib-sampling", "documents"],
    # the search's approximations (docs/export-speed.md)
    "awq-bf16": ["--method", "awq", "--search-dtype", "bfloat16"],
    "awq-blocks4": ["--method", "awq", "--search-blocks", "4"],
    "awq-blocks16": ["--method", "awq", "--search-blocks", "16"],
    "awq-blocks16-bf16": ["--method", "awq", "--search-blocks", "16", "--search-dtype", "bfloat16"],
    "awq-screened": ["--method", "awq", "--search-blocks", "16", "--search-dtype", "bfloat16", "--search-refine", "2"],
}
LABELS = {"rtn": "RTN", "awq-scale": "AWQ scale only", "awq": "AWQ scale+clip", "awq-exact": "AWQ scale+clip, exact search",
          "awq-duo": "AWQ scale+clip, duo",
          "awq-documents": "AWQ scale+clip, calibration documents",
          "awq-bf16": "AWQ scale+clip, search in bfloat16", "awq-blocks4": "AWQ scale+clip, judged on 4 blocks",
          "awq-blocks16": "AWQ scale+clip, judged on 16 blocks",
          "awq-blocks16-bf16": "AWQ scale+clip, judged on 16 blocks in bfloat16",
          "awq-screened": "AWQ scale+clip, ranked on 16 blocks in bfloat16, best 2 judged on all"}


def mixed_flags(variant: str) -> list[str] | None:
    """export flags of a mixed-precision variant (budget:4.5, fit:355MiB, and with a weighting of the
    sensitivities other than the default: budget:4.5:residual), None for the others."""
    kind, _, value = variant.partition(":")
    value = value.partition(":")[0]
    if kind == "budget":
        return ["--budget", value]
    if kind == "fit":
        return ["--fit", value, "--ctx", "2048", "--head", "int8"]
    return None


def variant(text: str) -> str:
    if text in VARIANTS or mixed_flags(text) is not None:
        return text
    raise argparse.ArgumentTypeError(f"{text}: one of {', '.join(VARIANTS)}, budget:BITS or fit:MEMORY")


def weighting_env(variant: str) -> dict:
    """The environment of a mixed variant's export: its weighting of the sensitivities, if it names one."""
    import os

    weighting = variant.split(":")[2] if variant.count(":") == 2 else None
    return {**os.environ, **({"EDGE_AWQ_SENSITIVITY_WEIGHTING": weighting} if weighting else {})}


def edge_awq(*args, env=None) -> dict:
    r = subprocess.run([sys.executable, "-m", "edge_awq", *map(str, args), "--json"], capture_output=True, text=True,
                       env=env)
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
    ap.add_argument("--variants", nargs="+", default=["rtn", "awq-scale", "awq", "awq-duo"], type=variant)
    ap.add_argument("--also-text", default=None, help="a second text every row is scored on")
    ap.add_argument("--eval-flags", default="", metavar="FLAGS",
                    help="passed to every edge-awq eval, as one string (--eval-flags='--backend numba')")
    ap.add_argument("--export-flags", default="", metavar="FLAGS",
                    help="passed to every edge-awq export of a variant, as one string (--export-flags='--exact')")
    ap.add_argument("--duo-scaling", action="store_true", help="the mixed-precision variants with duo scaling")
    ap.add_argument("--head", default="fp16", help="output head of every export (default fp16: the layers compared)")
    ap.add_argument("--gguf", nargs="+", default=[], metavar="NAME=FILE", help="rows for GGUF files made elsewhere")
    ap.add_argument("--reuse", action="store_true", help="keep the rows already in OUT/quality.json")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    limit = ["--max-tokens", a.max_tokens] if a.max_tokens else []
    a.eval_flags, a.export_flags = a.eval_flags.split(), a.export_flags.split()
    saved = a.out / "quality.json"
    rows = json.loads(saved.read_text()) if a.reuse and saved.exists() else []
    have = {(r["variant"], r["bits"]) for r in rows}

    def scored(path) -> dict:
        row = edge_awq("eval", path, "--text", a.text, *limit, *a.eval_flags)
        if a.also_text:
            row["perplexity_also"] = edge_awq("eval", path, "--text", a.also_text, *limit, *a.eval_flags)["perplexity"]
        return row

    if ("FP", 16) not in have:
        rows.insert(0, {"variant": "FP", "bits": 16, **scored(a.model)})
    for spec in a.gguf:
        name, path = spec.split("=", 1)
        if (name, 4) not in have:
            bpw, kinds = gguf_layer_bits(path)
            rows.append({"variant": name, "bits": 4, **scored(path), "bits_per_weight": bpw, "export_seconds": None,
                         "group_size": kinds})
            saved.write_text(json.dumps(rows, indent=1))
    table = a.out / ("sensitivity-duo.json" if a.duo_scaling else "sensitivity.json")
    for v in (v for v in a.variants if mixed_flags(v) is not None):
        if (v, 0) in have:
            continue
        out = a.out / f"{v.replace(':', '-')}.eawq"
        exp = edge_awq("export", a.model, "--calib", a.calib, "-o", out, "--n-samples", a.n_samples, "--seqlen",
                       a.seqlen, "--head", a.head, *mixed_flags(v), "--sensitivity", table,
                       *(["--duo-scaling"] if a.duo_scaling else []), env=weighting_env(v))
        rows.append({"variant": v, "bits": 0, **scored(out), "bits_per_weight": exp["bits_per_weight"],
                     "export_seconds": exp["seconds"]["total"], "group_size": "mixed",
                     "sensitivity_seconds": exp["seconds"].get("sensitivity"),
                     "mix": exp["allocation"]["mix"], "duo_scaling": a.duo_scaling})
        saved.write_text(json.dumps(rows, indent=1))
    for bits in a.bits:
        for v in a.variants:
            if (v, bits) in have or mixed_flags(v) is not None:
                continue
            out = a.out / f"{v}-w{bits}.eawq"
            exp = edge_awq("export", a.model, "--calib", a.calib, "-o", out, "--bits", bits, "--group-size",
                           a.group_size, "--n-samples", a.n_samples, "--seqlen", a.seqlen, "--head", a.head,
                           *VARIANTS[v], *a.export_flags)
            ev = scored(out)
            rows.append({"variant": v, "bits": bits, **ev, "bits_per_weight": exp["bits_per_weight"],
                         "export_seconds": exp["seconds"]["total"], "group_size": exp["group_size"],
                         "export_phases": exp["seconds"], "alphas": [lay["alphas"] for lay in exp["layers"]]})
            saved.write_text(json.dumps(rows, indent=1))
    order = {v: i for i, v in enumerate(["FP", *VARIANTS])}
    rows.sort(key=lambda r: (r["variant"] != "FP", r.get("bits_per_weight") or 0, order.get(r["variant"], 99)))
    fp = rows[0]["perplexity"]
    also = a.also_text is not None and all("perplexity_also" in r for r in rows)
    extra = f" {Path(a.also_text).name} |" if also else ""
    print(f"| method | bits | group | bits/weight | perplexity | gap / RTN |{extra} export time (2 cores) |\n"
          f"|---|---|---|---|---|---|{'---|' if also else ''}---|")
    fp_also = f" {rows[0]['perplexity_also']:.2f} |" if also else ""
    print(f"| FP (source) | 16 | | | {fp:.2f} | |{fp_also} |")
    for r in rows[1:]:
        bits = r["bits"] or 4
        rtn = next((x["perplexity"] for x in rows if x["variant"] == "rtn" and x["bits"] == bits), None)
        ratio = f"{(r['perplexity'] - fp) / (rtn - fp):.2f}" if rtn and rtn != fp else ""
        label = mixed_label(r) if mixed_flags(r["variant"]) else LABELS.get(r["variant"], f"llama.cpp {r['variant']}")
        took = "" if r["export_seconds"] is None else f"{r['export_seconds'] / 60:.1f} min"
        shown = f" {r['perplexity_also']:.2f} |" if also else ""
        print(f"| {label} | {r['bits'] or 'mixed'} | {r['group_size']} | {r['bits_per_weight']:.3f} | "
              f"{r['perplexity']:.2f} | {ratio} |{shown} {took} |")


def mixed_label(r: dict) -> str:
    kind, _, value = r["variant"].partition(":")
    value, _, weighting = value.partition(":")
    what = f"--budget {value}" if kind == "budget" else f"--fit {value} --ctx 2048 (int8 head)"
    what += f", {weighting} weighting" if weighting else ""
    what += ", duo scaling" if r.get("duo_scaling") else ""
    top = ", ".join(f"{k} {v:.0%}" for k, v in list(r.get("mix", {}).items())[:3])
    return f"AWQ mixed, {what}: {top}"


if __name__ == "__main__":
    main()
