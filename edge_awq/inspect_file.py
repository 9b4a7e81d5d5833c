"""``edge-awq inspect``: an .eawq file's metadata and a table of its tensors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="the .eawq file")
    p.add_argument("--json", action="store_true", help="print metadata and tensors as JSON")


def run(args: argparse.Namespace) -> int:
    from .errors import FormatError
    from .format import EawqSource

    if args.file.suffix != ".eawq":
        raise FormatError(f"{args.file}: not an .eawq file")
    src = EawqSource(args.file)
    tensors = {name: {"dtype": t.dtype, "shape": list(t.shape), "bytes": t.end - t.begin}
               for name, t in src.file.tensors.items()}
    meta = {"model_args": src.args.to_dict(), "quantization": src.quantization, "source": src.source_info}
    if args.json:
        print(json.dumps({**meta, "file_bytes": args.file.stat().st_size, "tensors": tensors}))
        return 0
    a, q = src.args, src.quantization
    print(f"{args.file}: edge-awq format v{src.file.metadata['version']}, {args.file.stat().st_size:,} bytes")
    print(f"model: {a.arch}, {a.n_layers} layers, dim {a.dim}, FFN {a.hidden_dim}, heads {a.n_heads}/{a.n_kv_heads} "
          f"(q/kv), vocab {a.vocab_size}, context {a.max_seq_len}")
    print(f"quantization: {q['method']} W{q['bits']} group {q['group_size']}, zero point, duo scaling "
          f"{q['duo_scaling']}, clip {q['clip']}; head {q['head']}")
    c = q.get("calibration", {})
    print(f"calibration: {c.get('n_samples')} x {c.get('seqlen')} tokens of {c.get('file')} (sha256 {c.get('sha256')})")
    print(f"source: {src.source_info.get('name')} (fingerprint {src.source_info.get('fingerprint')})")
    print(f"{'tensor':40s} {'dtype':5s} {'shape':>16s} {'bytes':>12s}")
    for name, t in tensors.items():
        print(f"{name:40s} {t['dtype']:5s} {'x'.join(map(str, t['shape'])):>16s} {t['bytes']:>12,d}")
    return 0
