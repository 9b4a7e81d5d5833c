"""``edge-awq verify``: is an .eawq file whole? Its header checksum, every tensor's checksum, and every tensor the
model needs present with its shape."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="the .eawq file")


def run(args: argparse.Namespace) -> int:
    from edge_awq.formats import integrity
    from edge_awq.errors import FormatError
    from edge_awq.formats.eawq import EawqSource
    from edge_awq.formats.load import check_structure

    if args.file.suffix != ".eawq":
        raise FormatError(f"{args.file}: not an .eawq file (verify checks the checksums an .eawq file carries)")
    src = EawqSource(args.file)  # the header and its checksum
    check_structure(src)
    integrity.check(src, "always")
    print(f"{args.file}: {len(src.file.tensors)} tensors, all checksums match"
          + (", the header's too" if src.version >= 2 else " (a version-1 file: its header carries none)")
          + "; every tensor the model needs is there")
    return 0
