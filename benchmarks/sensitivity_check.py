"""Does the allocator's objective track perplexity? The summed error a sensitivity table predicts for each
exported file, beside the perplexity ``benchmarks/quality.py`` measured for it.

    python benchmarks/sensitivity_check.py DIR [--table DIR/sensitivity.json]

For every row of DIR/quality.json that has an .eawq file in DIR (mixed files by their own formats, one-format
files by their width and group), sums the table's weighted errors (``Sensitivity.weighted``: the default
weighting, or EDGE_AWQ_SENSITIVITY_WEIGHTING) over the decoder's linears, and prints a Markdown table
ordered by that prediction, with the rank correlation between prediction and perplexity.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def predicted(path: Path, table) -> tuple[float, float] | None:
    """(summed weighted error, bits per weight) of the file at path under table; None if the table lacks a format
    or was measured for another method."""
    from edge_awq.formats.eawq import EawqSource, stored_bits_per_weight
    from edge_awq.mixed import LinearFormat, formats_of, linear_names

    src = EawqSource(path)
    q, a = src.quantization, src.args
    if q.get("method") != table.settings.get("method"):
        return None  # a table measured for AWQ says nothing of a round-to-nearest file
    own = formats_of(q)
    total = 0.0
    for prefix, _, in_f in linear_names(a):
        f = own.get(prefix) or LinearFormat(q["bits"], in_f if q["group_size"] == "channel" else q["group_size"])
        if str(f) not in table.errors[prefix]:
            return None
        total += table.weighted(prefix, str(f))
    return total, stored_bits_per_weight(src.tensor_bytes(), a)


def ranks(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0] * len(values)
    for r, i in enumerate(order):
        out[i] = r
    return out


def main():
    from edge_awq.offline.sensitivity import WEIGHTING, Sensitivity

    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--table", type=Path, default=None)
    a = ap.parse_args()
    raw = json.loads((a.table or a.dir / "sensitivity.json").read_text())
    table = Sensitivity(raw["errors"], raw["signal"], raw["settings"])
    rows = []
    for r in json.loads((a.dir / "quality.json").read_text()):
        name = r["variant"].replace(":", "-") + ("" if r["bits"] in (0, 16) else f"-w{r['bits']}") + ".eawq"
        path = a.dir / name
        if path.exists():
            got = predicted(path, table)
            if got is not None:
                rows.append((got[0], got[1], r["perplexity"], r["variant"], r["bits"]))
    rows.sort()
    n = len(rows)
    rp, rq = ranks([x[0] for x in rows]), ranks([x[2] for x in rows])
    rho = 1 - 6 * sum((p - q) ** 2 for p, q in zip(rp, rq)) / (n * (n * n - 1)) if n > 1 else float("nan")
    print(f"| file | bits/weight | predicted summed error ({WEIGHTING}) | perplexity |\n|---|---|---|---|")
    for err, bpw, ppl, variant, bits in rows:
        print(f"| {variant}{'' if bits in (0, 16) else f' W{bits}'} | {bpw:.3f} | {err:.4f} | {ppl:.2f} |")
    print(f"\nSpearman rank correlation, prediction vs perplexity, over {n} files: {rho:.2f}")


if __name__ == "__main__":
    main()
