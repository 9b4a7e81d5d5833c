"""Test helper: AWQ checkpoints made by the ecosystem's own code from the integers of an .eawq file.

- ``write_compressed_tensors``: a transformers model with the file's dequantized weights, quantized by
  compressed-tensors' own ``apply_quantization_config`` and compressor with the file's scales and zero
  points, saved by ``save_pretrained`` and ``ModelCompressor.update_config``, as llm-compressor saves.
- ``write_autoawq``: every linear packed by AutoAWQ's own ``WQLinear_GEMM``/``WQLinear_GEMV.from_linear``
  with the file's scales and zero points, the state dict saved by ``huggingface_hub.save_torch_state_dict``
  and the config written with AutoAWQ's ``AwqConfig.to_transformers_dict``, as ``save_quantized`` does.

Run as a script (``python -m tests.ecosystem ct FILE.eawq OUT``) it writes the compressed-tensors
checkpoint with whatever compressed-tensors is first on the path: an older release installed beside
(``pip install --target``) writes the layouts of its time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from edge_awq.config import to_hf_config
from edge_awq.formats.eawq import EawqSource
from edge_awq.formats.hf_writer import tokenizer_files
from edge_awq.formats.load import load_weights
from edge_awq.model import LINEARS, W4
from edge_awq.pack import unpack_bits, unpack_linear
from edge_awq.formats.sources.hf import hf_name

ROOT = Path(__file__).resolve().parents[1]


def _float_model(path: Path):
    """(transformers model in float16 with the file's weights dequantized, {module name: W4}, source)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src = EawqSource(path)
    w = load_weights(src, dtype=None)
    tok = src.tokenizer()
    config = AutoConfig.for_model(**to_hf_config(src.args, tok.bos_id, tok.eos_ids))
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float16)
    state = {hf_name("tok_embeddings"): w.tok_embeddings, hf_name("norm"): w.norm}
    if not src.args.tied_embeddings:
        state[hf_name("output")] = w.output.weight
    packed = {}
    for i, lw in enumerate(w.layers):
        state[hf_name(f"layers.{i}.attn_norm")] = lw.attn_norm
        state[hf_name(f"layers.{i}.ffn_norm")] = lw.ffn_norm
        for n in LINEARS:
            lin = getattr(lw, n)
            module = hf_name(f"layers.{i}.{n}.weight")[: -len(".weight")]
            state[module + ".weight"] = unpack_linear(lin) if isinstance(lin, W4) else lin.weight
            if lin.bias is not None:
                state[module + ".bias"] = lin.bias
            if isinstance(lin, W4):
                packed[module] = lin
    sd = {k: torch.from_numpy(np.asarray(v, np.float32)).half() for k, v in state.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in k or "rotary" in k for k in missing), (missing, unexpected)
    return model, packed, src


def _zeros(w: W4) -> np.ndarray:
    return unpack_bits(w.zeros, w.bits, w.in_features // w.group_size)  # (out, G) uint8


def write_tokenizer(src: EawqSource, out: Path) -> None:
    """The tokenizer files (tokenizer.json or .model, tokenizer_config.json with the chat template)."""
    for name, data in tokenizer_files(src.tokenizer(), src.args.max_seq_len).items():
        (out / name).write_bytes(data)


def write_compressed_tensors(path: Path, out: Path, symmetric: bool = False) -> Path:
    """The .eawq's integers as a compressed-tensors pack-quantized checkpoint made by compressed-tensors itself.

    symmetric: quantize the file's dequantized weights symmetrically with compressed-tensors' own rounding
    (scales max|w| / 7.5 per group), which makes other integers than the file's.
    """
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)

    model, packed, src = _float_model(path)
    gs = src.quantization["group_size"]
    strategy = "channel" if gs == "channel" else "group"
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=None if gs == "channel" else gs)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=["lm_head"])
    apply_quantization_config(model, config)
    modules = dict(model.named_modules())
    for name, w in packed.items():
        m = modules[name]
        if symmetric:
            g = m.weight.data.float().reshape(w.shape[0], -1, w.group_size)
            m.weight_scale.data = (g.abs().amax(-1) / 7.5).clamp(min=1e-5).half()
        else:
            m.weight_scale.data = torch.from_numpy(np.array(w.scales, np.float16))
            m.weight_zero_point.data = torch.from_numpy(_zeros(w).astype(np.int8) - 8).to(m.weight_zero_point.dtype)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    out.mkdir(parents=True)
    if hasattr(compressor, "compress_model"):
        compressor.compress_model(model)
        model.save_pretrained(out)
    else:  # releases before 0.10 return the compressed state dict
        model.save_pretrained(out, state_dict=compressor.compress(model))
    compressor.update_config(out)
    write_tokenizer(src, out)
    return out


def write_autoawq(path: Path, out: Path, autoawq, version: str = "gemm", not_convert: tuple[str, ...] = ()) -> Path:
    """The .eawq's integers packed by AutoAWQ's own linears and saved as AutoAWQ's save_quantized saves them.

    not_convert: module name parts kept in float (AutoAWQ's ``modules_to_not_convert``).
    """
    import torch
    from huggingface_hub import save_torch_state_dict

    cls = {"gemm": autoawq.gemm.WQLinear_GEMM, "gemv": autoawq.gemv.WQLinear_GEMV}[version]
    model, packed, src = _float_model(path)
    gs = src.quantization["group_size"]
    modules = dict(model.named_modules())
    for name, w in packed.items():
        if any(part in name for part in not_convert):
            continue
        lin = modules[name].float()
        s, z = np.asarray(w.scales, np.float32), _zeros(w).astype(np.float32)
        if version == "gemm":  # from_linear wants (G, out) there, (out, G) for GEMV
            s, z = s.T, z.T
        q = cls.from_linear(lin, 4, w.group_size, scales=torch.from_numpy(s), zeros=torch.from_numpy(z))
        parent, child = name.rsplit(".", 1)
        setattr(modules[parent], child, q)
    qc = autoawq.config.AwqConfig(q_group_size=-1 if gs == "channel" else gs, w_bit=4, version=version,
                    modules_to_not_convert=list(not_convert) or None)
    out.mkdir(parents=True)
    config = model.config.to_dict()
    config["quantization_config"] = qc.to_transformers_dict()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v for k, v in model.state_dict().items() if not (src.args.tied_embeddings and k == "lm_head.weight")}
    save_torch_state_dict(state, out, max_shard_size="5GB", force_contiguous=True)
    write_tokenizer(src, out)
    return out


if __name__ == "__main__":
    kind, file, dest = sys.argv[1:4]
    assert kind == "ct", kind
    write_compressed_tensors(Path(file), Path(dest), symmetric=len(sys.argv) > 4 and sys.argv[4] == "symmetric")
