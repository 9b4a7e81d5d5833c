"""``edge-awq inspect``: a model file's metadata and a table of its tensors.

An ``.eawq`` file, or a Hugging Face directory (float, AutoAWQ or compressed-tensors): the
architecture, the quantization and the layout it is stored in, bits per decoder weight
counted from the bytes stored, and every tensor.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LAYOUT_NAMES = {"awq-gemm": "AutoAWQ GEMM", "awq-gemv": "AutoAWQ GEMV",
                "compressed-tensors": "compressed-tensors pack-quantized"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="an .eawq file or a Hugging Face directory")
    p.add_argument("--json", action="store_true", help="print metadata and tensors as JSON")


def _eawq(path: Path) -> tuple[dict, list[str]]:
    from edge_awq.formats.eawq import EawqSource, stored_bits_per_weight

    src = EawqSource(path)
    tensors = {name: {"dtype": t.dtype, "shape": list(t.shape), "bytes": t.end - t.begin}
               for name, t in src.file.tensors.items()}
    a, q = src.args, src.quantization
    info = {"format": f"edge-awq v{src.version}", "layout": src.file.metadata.get("layout"),
            "model_args": a.to_dict(), "quantization": q, "source": src.source_info,
            "bits_per_weight": stored_bits_per_weight({k: v["bytes"] for k, v in tensors.items()}, a),
            "file_bytes": path.stat().st_size, "tensors": tensors}
    lines = [f"{path}: edge-awq format v{src.version} (layout {info['layout']}), {info['file_bytes']:,} bytes"]
    lines += _model_lines(a, q, info["bits_per_weight"])
    c = q.get("calibration")
    if c:
        lines.append(f"calibration: {c.get('n_samples')} x {c.get('seqlen')} tokens of {c.get('file')} "
                     f"(sha256 {c.get('sha256')})")
    conv = q.get("converted_from")
    if conv:
        lines.append(f"converted from: {conv.get('name')}, {LAYOUT_NAMES.get(conv.get('layout'), conv.get('layout'))} "
                     f"(fingerprint {conv.get('fingerprint')}); integers, scales and zero points as stored there")
    lines.append(f"source: {src.source_info.get('name')} (fingerprint {src.source_info.get('fingerprint')})")
    return info, lines


def _model_lines(a, q: dict, bpw: float | None) -> list[str]:
    lines = [f"model: {a.arch}, {a.n_layers} layers, dim {a.dim}, FFN {a.hidden_dim}, heads {a.n_heads}/{a.n_kv_heads} "
             f"(q/kv), vocab {a.vocab_size}, context {a.max_seq_len}"]
    if q:
        from edge_awq.mixed import describe

        gs = q.get("group_size")
        extras = [f"{k.replace('_', ' ')} {q[k]}" for k in ("duo_scaling", "clip") if k in q]
        what = describe(q, a) or f"W{q.get('bits')} {'per channel' if gs == 'channel' else f'group {gs}'}"
        lines.append(f"quantization: {q.get('method')} {what}, "
                     f"{'zero point' if q.get('zero_point', True) else 'symmetric'}"
                     + "".join(f", {e}" for e in extras) + f"; head {q.get('head', 'fp16')}")
        alloc = q.get("allocation")
        if alloc:
            asked = (f"--budget {alloc.get('budget_bits_per_weight')} bits per weight" if "budget_bits_per_weight"
                     in alloc else f"--fit {alloc.get('fit')} at --ctx {alloc.get('ctx')} (KV {alloc.get('kv_dtype')})")
            lines.append(f"allocation: {asked}: {alloc.get('bytes'):,} of {alloc.get('budget_bytes'):,} bytes for the "
                         "linears, each linear's format chosen from measured sensitivities")
            lines += _format_table(q, a)
    if bpw is not None:
        lines.append(f"stored: {bpw:.3f} bits per decoder weight (codes, scales and zero points, from the bytes)")
    return lines


def _format_table(q: dict, a) -> list[str]:
    """A mixed file's formats, a row per layer."""
    from edge_awq.mixed import formats_of
    from edge_awq.model import LINEARS

    formats = formats_of(q)
    rows = ["layer " + "".join(f"{n:>8s}" for n in LINEARS)]
    for i in range(a.n_layers):
        rows.append(f"{i:5d} " + "".join(f"{str(formats.get(f'layers.{i}.{n}', '')):>8s}" for n in LINEARS))
    return rows


def _directory(path: Path) -> tuple[dict, list[str]]:
    from edge_awq.formats.eawq import stored_bits_per_weight
    from edge_awq.formats.sources.hf import HFSource

    src = HFSource(path)
    tensors = {name: {"dtype": t.dtype, "shape": list(t.shape), "bytes": t.end - t.begin, "file": shard}
               for name, (shard, t) in src.stored_tensors().items()}
    q = {k: v for k, v in src.quantization.items() if k != "source_config"}
    layout = q.get("layout")
    bpw = stored_bits_per_weight({k: v["bytes"] for k, v in tensors.items()}, src.args)
    info = {"format": "huggingface", "layout": layout, "model_args": src.args.to_dict(), "quantization": q,
            "bits_per_weight": bpw, "file_bytes": sum(v["bytes"] for v in tensors.values()), "tensors": tensors}
    shards = sorted({v["file"] for v in tensors.values()})
    what = LAYOUT_NAMES.get(layout, "float weights") if layout else "float weights"
    lines = [f"{path}: Hugging Face directory, {what}, {len(shards)} safetensors file(s), "
             f"{info['file_bytes']:,} bytes of tensors"]
    lines += _model_lines(src.args, q, bpw)
    if q.get("not_converted"):
        lines.append(f"kept in float: {', '.join(q['not_converted'])}")
    return info, lines


def run(args: argparse.Namespace) -> int:
    from edge_awq.errors import FormatError

    if args.file.is_dir():
        info, lines = _directory(args.file)
    elif args.file.suffix == ".eawq":
        info, lines = _eawq(args.file)
    else:
        raise FormatError(f"{args.file}: not an .eawq file or a Hugging Face directory")
    if args.json:
        print(json.dumps(info))
        return 0
    lines.append(f"{'tensor':48s} {'dtype':5s} {'shape':>16s} {'bytes':>12s}")
    for name, t in info["tensors"].items():
        lines.append(f"{name:48s} {t['dtype']:5s} {'x'.join(map(str, t['shape'])):>16s} {t['bytes']:>12,d}")
    print("\n".join(lines))
    return 0
