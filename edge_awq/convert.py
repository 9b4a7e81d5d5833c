"""``edge-awq convert``: a packed model from one layout to another, its integers, scales and zero points untouched.

    edge-awq convert AWQ_OR_CT_DIR -o OUT.eawq              an AutoAWQ / compressed-tensors checkpoint -> .eawq
    edge-awq convert FILE.eawq --to awq-gemm -o DIR         .eawq -> what transformers and vLLM load
    edge-awq convert FILE.eawq --to compressed-tensors -o DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TARGETS = ("eawq", "awq-gemm", "compressed-tensors")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, help="an AutoAWQ or compressed-tensors directory, or an .eawq file")
    p.add_argument("-o", "--output", required=True, type=Path, help="the .eawq file or directory to write")
    p.add_argument("--to", choices=TARGETS, default=None,
                   help="layout to write (default: eawq for an output ending in .eawq)")
    p.add_argument("--head", choices=("fp16", "int8", "w4"), default="fp16",
                   help="to .eawq: pack a float head by round to nearest (default fp16: the head as the source has it)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def target_of(to: str | None, output: Path) -> str:
    from edge_awq import atomic
    from edge_awq.errors import InputError

    to = to or ("eawq" if output.suffix == ".eawq" else None)
    if to is None:
        raise InputError(f"{output}: name the layout to write with --to ({', '.join(TARGETS)}), or an .eawq file")
    if (to == "eawq") != (output.suffix == ".eawq"):
        raise InputError(f"{output}: an .eawq file name is for --to eawq, a directory for the other layouts")
    atomic.check_output(output, directory=to != "eawq")  # an .eawq file is replaced atomically; a directory not
    return to


def convert(source: Path, output: Path, to: str, head: str = "fp16") -> dict:
    """Write source (packed) to output in layout ``to``; returns what was done."""
    from edge_awq.errors import InputError
    from edge_awq.hf_export import write_directory, write_eawq
    from edge_awq.load import open_source

    src = open_source(source)
    quant = getattr(src, "quantization", None) or {}
    if not quant:
        raise InputError(f"{source}: not a packed model (no AWQ or compressed-tensors quantization): quantize it "
                         "with edge-awq export")
    layout = quant.get("layout", "eawq")
    if to == "eawq":
        converted = {"layout": layout, "name": source.name, "fingerprint": src.fingerprint(),
                     "config": quant.get("source_config") or quant.get("converted_from", {}).get("config")}
        write_eawq(src, output, head, converted)
    else:
        write_directory(src, output, to)
    return {"source": str(source), "source_layout": layout, "output": str(output), "layout": to}


def run(args: argparse.Namespace) -> int:
    to = target_of(args.to, args.output)
    t0 = time.perf_counter()
    info = convert(args.source, args.output, to, args.head)
    info["seconds"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(info))
    else:
        print(f"wrote {args.output} ({to}) from {args.source} ({info['source_layout']}) in {info['seconds']:.1f}s: "
              "integers, scales and zero points as stored")
    return 0
