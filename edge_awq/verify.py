"""``edge-awq verify``: recompute every tensor checksum of an .eawq file."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="the .eawq file")


def run(args: argparse.Namespace) -> int:
    from .errors import FormatError
    from .format import EawqSource

    src = EawqSource(args.file)
    bad = src.verify()
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise FormatError(f"{args.file}: checksum mismatch in {', '.join(bad[:3])}{more}: the file is damaged; "
                          "copy or export it again")
    print(f"{args.file}: {len(src.file.tensors)} tensors, all checksums match")
    return 0
