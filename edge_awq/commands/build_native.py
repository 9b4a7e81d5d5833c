"""``edge-awq build-native``: build native/ with CMake into libedge_awq_cuda.so and install it where the cuda
backend looks (``backends/native.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_awq.backends.native import ARCHITECTURES, CUDA_LIB, build, default_prefix, source_root


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="87", choices=ARCHITECTURES,
                   help="CUDA architecture: 87 Orin (default), 72 Xavier (CUDA 11.x), 89/90 desktop GPUs")
    p.add_argument("--prefix", type=Path, default=None, help=f"install here (default: {default_prefix()})")
    p.add_argument("--build-dir", type=Path, default=None, help="CMake build directory (default: build/native)")
    p.add_argument("--source", type=Path, default=None, help="source checkout (default: the one edge_awq runs from)")


def run(args: argparse.Namespace) -> int:
    source = args.source or source_root()
    prefix = args.prefix or default_prefix()
    build_dir = args.build_dir or source / "build" / "native"
    build(source, build_dir, prefix, args.arch)
    print(f"built {prefix / 'lib' / CUDA_LIB} for sm_{args.arch}")
    if args.prefix and args.prefix != default_prefix():
        print(f"the cuda backend looks in {default_prefix()}: set EDGE_AWQ_NATIVE={prefix}")
    return 0
