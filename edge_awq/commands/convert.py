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

from edge_awq.formats.interop import TARGETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, help="an AutoAWQ or compressed-tensors directory, or an .eawq file")
    p.add_argument("-o", "--output", required=True, type=Path, help="the .eawq file or directory to write")
    p.add_argument("--to", choices=TARGETS, default=None,
                   help="layout to write (default: eawq for an output ending in .eawq)")
    p.add_argument("--head", choices=("fp16", "int8", "w4"), default="fp16",
                   help="to .eawq: pack a float head by round to nearest (default fp16: the head as the source has it)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from edge_awq.formats.interop import convert, target_of

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
