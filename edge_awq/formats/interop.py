"""Move packed models between edge-awq and the engines users scale out on, integers untouched.

``write_directory``: an ``.eawq`` file (or any packed source) as a Hugging Face directory in
AutoAWQ's GEMM layout (``quant_method: "awq"``) or compressed-tensors ``pack-quantized``
(``quant_method: "compressed-tensors"``), the two layouts transformers and vLLM load.
``write_eawq``: an AutoAWQ or compressed-tensors directory (or an ``.eawq`` file) as one ``.eawq``.
Both copy the integers, scales and zero points as they are; only the bit order changes
(``pack.py``). A packed output head, which neither layout carries, is written in float16 as the
values edge-awq computes with; a tied model's head is its float16 embedding table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edge_awq.config import to_hf_config
from edge_awq.errors import InputError
from edge_awq.formats import atomic
from edge_awq.formats.eawq import HEAD_BITS, EawqWriter, float_linear_specs, linear_arrays, linear_specs, tensor_specs
from edge_awq.formats.hf_writer import HFDirWriter, generation_config, tokenizer_files
from edge_awq.config import expected_shapes
from edge_awq.formats.load import inv_freq, read_layer
from edge_awq.model import LINEARS, W4, Dense
from edge_awq.pack import pack_along_columns, pack_awq_gemm, unpack_bits, unpack_linear
from edge_awq.formats.sources.hf import hf_name

log = logging.getLogger(__name__)

LAYOUTS = ("awq-gemm", "compressed-tensors")
TARGETS = ("eawq", *LAYOUTS)


def _zeros(w: W4) -> np.ndarray:
    return unpack_bits(w.zeros, w.bits, w.in_features // w.group_size)  # (out, G) uint8


class AwqGemm:
    """AutoAWQ's GEMM layout, as ``WQLinear_GEMM`` stores it: qweight, qzeros, scales (and a float16 bias)."""

    name = "awq-gemm"

    def specs(self, module: str, w: W4) -> list:
        out_f, in_f = w.shape
        if out_f % 8:
            raise InputError(f"{module} has {out_f} output rows: AutoAWQ's GEMM layout packs eight a word; "
                             "write compressed-tensors instead (--to compressed-tensors)")
        g = in_f // w.group_size
        specs = [(f"{module}.qweight", np.int32, (in_f, out_f // 8)), (f"{module}.qzeros", np.int32, (g, out_f // 8)),
                 (f"{module}.scales", np.float16, (g, out_f))]
        return specs + ([(f"{module}.bias", np.float16, (out_f,))] if w.bias is not None else [])

    def arrays(self, module: str, w: W4) -> dict:
        q = unpack_bits(w.qweight, 4, w.in_features)  # (out, in)
        out = {f"{module}.qweight": pack_awq_gemm(q), f"{module}.qzeros": pack_awq_gemm(_zeros(w)),
               f"{module}.scales": np.ascontiguousarray(np.asarray(w.scales, np.float16).T)}
        return out if w.bias is None else {**out, f"{module}.bias": np.asarray(w.bias, np.float16)}

    def config(self, group_size, not_converted: list[str]) -> dict:
        return {"quant_method": "awq", "zero_point": True, "group_size": -1 if group_size == "channel" else group_size,
                "bits": 4, "version": "gemm", "modules_to_not_convert": not_converted or None}


class CompressedTensors:
    """compressed-tensors pack-quantized, asymmetric: weight_packed, weight_scale, weight_zero_point, weight_shape."""

    name = "compressed-tensors"

    def specs(self, module: str, w: W4) -> list:
        out_f, in_f = w.shape
        g = in_f // w.group_size
        specs = [(f"{module}.weight_packed", np.int32, (out_f, -(-in_f // 8))),
                 (f"{module}.weight_scale", np.float16, (out_f, g)),
                 (f"{module}.weight_zero_point", np.int32, (-(-out_f // 8), g)),
                 (f"{module}.weight_shape", np.int64, (2,))]
        return specs + ([(f"{module}.bias", np.float16, (out_f,))] if w.bias is not None else [])

    def arrays(self, module: str, w: W4) -> dict:
        out_f, in_f = w.shape
        out = {f"{module}.weight_packed": np.ascontiguousarray(w.qweight[:, : -(-in_f // 8)]).view(np.int32),
               f"{module}.weight_scale": np.asarray(w.scales, np.float16),
               f"{module}.weight_zero_point": pack_along_columns(_zeros(w), 4),
               f"{module}.weight_shape": np.array([out_f, in_f], np.int64)}
        return out if w.bias is None else {**out, f"{module}.bias": np.asarray(w.bias, np.float16)}

    def config(self, group_size, not_converted: list[str]) -> dict:
        weights = {"num_bits": 4, "type": "int", "symmetric": False, "dynamic": False, "actorder": None,
                   "strategy": "channel" if group_size == "channel" else "group",
                   "group_size": None if group_size == "channel" else group_size,
                   "observer": "minmax", "observer_kwargs": {}, "block_structure": None}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                              "output_activations": None, "format": "pack-quantized"}},
                "ignore": ["lm_head", *not_converted], "kv_cache_scheme": None, "sparsity_config": {},
                "transform_config": {}, "global_compression_ratio": None}


def common_group(groups: list[tuple[int, int]]) -> int | str:
    """The one group size of a model's packed linears, from (group size, input width) pairs: an int, or
    "channel" when every linear is one group a row; several sizes are refused."""
    if groups and all(g == width for g, width in groups) and len({g for g, _ in groups}) > 1:
        return "channel"
    sizes = {g for g, _ in groups}
    if len(sizes) != 1:
        raise InputError(f"group sizes {', '.join(map(str, sorted(sizes)))} in one model: edge-awq writes one "
                         "group size a model (or one group a row)")
    return sizes.pop()


def _group_size(layers) -> int | str:
    return common_group([(w.group_size, w.in_features) for lw in layers
                         for w in (getattr(lw, n) for n in LINEARS) if isinstance(w, W4)])


def _layers(src) -> list:
    """Every decoder layer as stored (memory-mapped where the source allows), checked for what layouts take."""
    layers = [read_layer(src, i, dtype=None) for i in range(src.args.n_layers)]
    for i, lw in enumerate(layers):
        for n in LINEARS:
            w = getattr(lw, n)
            if isinstance(w, W4) and w.bits != 4:
                raise InputError(f"layers.{i}.{n} has {w.bits}-bit weights: AutoAWQ's and compressed-tensors' "
                                 "layouts as transformers and vLLM load them take 4 bits; keep the .eawq")
    return layers


def _head(src, tied: bool) -> np.ndarray | None:
    """The float16 lm_head to write (None when tied): a packed head as the values edge-awq computes with."""
    if src.has("output.qweight"):
        from edge_awq.formats.load import load_weights

        head = load_weights(src, lazy=True, dtype=None).output
        if tied:
            return None
        log.warning("the packed output head is written as float16 values (neither layout carries a packed head)")
        return unpack_linear(head).astype(np.float16)
    if tied or not src.has("output"):
        return None
    return np.asarray(src.get("output"), np.float16)


def write_directory(src, out: Path, layout: str, max_shard_bytes: int | None = None) -> Path:
    """A packed source as a Hugging Face directory in ``layout`` ("awq-gemm" or "compressed-tensors")."""
    fmt = {"awq-gemm": AwqGemm, "compressed-tensors": CompressedTensors}[layout]()
    a, tok = src.args, src.tokenizer()
    layers = _layers(src)
    group_size = _group_size(layers)
    tied = a.tied_embeddings
    head = _head(src, tied)
    specs = [(hf_name("tok_embeddings"), np.float16, (a.vocab_size, a.dim))]
    not_converted = []
    for i, lw in enumerate(layers):
        specs += [(hf_name(f"layers.{i}.{n}"), np.float16, (a.dim,)) for n in ("attn_norm", "ffn_norm")]
        for n in LINEARS:
            w, module = getattr(lw, n), hf_name(f"layers.{i}.{n}.weight")[: -len(".weight")]
            if isinstance(w, W4):
                specs += fmt.specs(module, w)
            else:
                not_converted.append(module)
                specs += [(f"{module}.weight", np.float16, w.weight.shape)]
                specs += [(f"{module}.bias", np.float16, w.bias.shape)] if w.bias is not None else []
    specs.append((hf_name("norm"), np.float16, (a.dim,)))
    if head is not None:
        specs.append((hf_name("output"), np.float16, head.shape))
    kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    with HFDirWriter(out, specs, **kw) as writer:
        config = to_hf_config(_as_written(a, head), tok.bos_id, tok.eos_ids)
        config["quantization_config"] = fmt.config(group_size, not_converted)
        writer.write_file("config.json", config)
        writer.write_file("generation_config.json",
                          generation_config(tok, getattr(src, "generation_defaults", dict)()))
        for name, data in tokenizer_files(tok, a.max_seq_len).items():
            writer.write_file(name, data)
        writer.add(hf_name("tok_embeddings"), np.asarray(src.get("tok_embeddings"), np.float16))
        for i, lw in enumerate(layers):
            for n in ("attn_norm", "ffn_norm"):
                writer.add(hf_name(f"layers.{i}.{n}"), np.asarray(getattr(lw, n), np.float16))
            for n in LINEARS:
                w, module = getattr(lw, n), hf_name(f"layers.{i}.{n}.weight")[: -len(".weight")]
                arrays = fmt.arrays(module, w) if isinstance(w, W4) else {
                    f"{module}.weight": np.asarray(w.weight, np.float16),
                    **({f"{module}.bias": np.asarray(w.bias, np.float16)} if w.bias is not None else {})}
                for name, t in arrays.items():
                    writer.add(name, t)
            src.release()
        writer.add(hf_name("norm"), np.asarray(src.get("norm"), np.float16))
        if head is not None:
            writer.add(hf_name("output"), head)
        return writer.close()


def _as_written(a, head):
    """The args as the directory holds them (a model whose head was written is untied)."""
    import dataclasses

    return dataclasses.replace(a, tied_embeddings=head is None and a.tied_embeddings)


def write_eawq(src, out: Path, head: str = "fp16", converted: dict | None = None) -> Path:
    """A packed source as one .eawq file, every packed linear's integers, scales and zero points as stored.

    head: "fp16" keeps the source's head (the embedding table when tied); "int8"/"w4" pack it by round to
    nearest, as ``export --head`` does. converted: what the metadata records of the source.
    """
    from edge_awq.formats.eawq import packed_head_arrays
    from edge_awq.pack import LAYOUT

    a, tok = src.args, src.tokenizer()
    tok_bytes, tok_fields = tok.serialize()
    shapes = expected_shapes(a)
    kinds = {}  # packed linear -> its group size
    for i in range(a.n_layers):
        for n in LINEARS:
            prefix = f"layers.{i}.{n}"
            if src.has(prefix + ".qweight"):
                kinds[prefix] = shapes[n][1] // src.get(prefix + ".scales").shape[1]
    head_group = a.dim // src.get("output.scales").shape[1] if src.has("output.qweight") else None

    def linear(prefix, out_f, in_f, bias):
        if prefix in kinds:
            return linear_specs(prefix, out_f, in_f, 4, kinds[prefix], bias)
        return float_linear_specs(prefix, out_f, in_f, bias)

    quant = dict(getattr(src, "quantization", {}))
    group = common_group([(g, shapes[p.split(".")[2]][1]) for p, g in kinds.items()])
    source_head = quant.get("head", "w4") if head_group else None
    if source_head and head not in ("fp16", source_head):
        log.warning("the source's packed head (%s) is kept as stored; --head %s is for a float head", source_head, head)
    head_kind = source_head or head
    head_gs = head_group or (a.dim if group == "channel" else group)
    specs = tensor_specs(a, 4, lambda n: head_gs, len(tok_bytes), head_kind, linear)
    meta = {"layout": LAYOUT, "model_args": a.to_dict(), "tokenizer": tok_fields,
            "quantization": {"method": quant.get("method", "awq"), "bits": 4, "group_size": group, "zero_point": True,
                             "head": head_kind, "embedding": "fp16", "converted_from": converted or {},
                             "float_linears": [p for p in (f"layers.{i}.{n}" for i in range(a.n_layers) for n in LINEARS)
                                               if p not in kinds]},
            "source": {"name": Path(src.path).name, "fingerprint": src.fingerprint()},
            "generation": getattr(src, "generation_defaults", dict)()}
    with EawqWriter(out, specs, (1 << 16) + 2 * len(str(tok_fields)) + len(str(converted))) as writer:
        writer.add("tokenizer", np.frombuffer(tok_bytes, dtype=np.uint8))
        writer.add("rope_inv_freq", inv_freq(src))
        writer.add("tok_embeddings", np.asarray(src.get("tok_embeddings"), np.float16))
        for i in range(a.n_layers):
            lw = read_layer(src, i, dtype=None)
            for n in ("attn_norm", "ffn_norm"):
                writer.add(f"layers.{i}.{n}", np.asarray(getattr(lw, n), np.float16))
            for n in LINEARS:
                w = getattr(lw, n)
                for name, t in linear_arrays(f"layers.{i}.{n}", w if isinstance(w, W4) else Dense(
                        np.asarray(w.weight, np.float16), w.bias)).items():
                    writer.add(name, t)
            src.release()
        writer.add("norm", np.asarray(src.get("norm"), np.float16))
        if source_head:  # the source's own packed head, as stored
            from edge_awq.formats.load import load_weights

            for name, t in linear_arrays("output", load_weights(src, lazy=True, dtype=None).output).items():
                writer.add(name, t)
        elif head_kind in HEAD_BITS:
            weight = src.get("tok_embeddings" if a.tied_embeddings or not src.has("output") else "output")
            for name, t in packed_head_arrays(weight, HEAD_BITS[head_kind], head_gs).items():
                writer.add(name, t)
        elif not a.tied_embeddings:
            writer.add("output", np.asarray(src.get("output"), np.float16))
        return writer.close(meta)


def target_of(to: str | None, output: Path) -> str:
    to = to or ("eawq" if output.suffix == ".eawq" else None)
    if to is None:
        raise InputError(f"{output}: name the layout to write with --to ({', '.join(TARGETS)}), or an .eawq file")
    if (to == "eawq") != (output.suffix == ".eawq"):
        raise InputError(f"{output}: an .eawq file name is for --to eawq, a directory for the other layouts")
    atomic.check_output(output, directory=to != "eawq")  # an .eawq file is replaced atomically; a directory not
    return to


def convert(source: Path, output: Path, to: str, head: str = "fp16") -> dict:
    """Write source (packed) to output in layout ``to``; returns what was done."""
    from edge_awq.formats.load import open_source

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
