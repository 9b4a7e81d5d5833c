"""One description of the LLaMA-family architecture, shared by the runtime and the quantizer.

``ModelArgs`` is built from a Hugging Face ``config.json`` (or the equivalent
metadata of a GGUF or llama2.c file) and is what the ``.eawq`` file stores.
LLaMA variants differ only in these fields, never by subclassing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np

from edge_awq.errors import ConfigError

log = logging.getLogger(__name__)

# Hugging Face architecture name -> family. Everything else is refused.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}

ATTENTION_TILE = 64  # a prompt's queries whose scores (against every cached key) a CPU backend holds at once


@dataclass(frozen=True)
class RopeScaling:
    """Frequency rescaling of RoPE for long contexts ("linear" or Llama 3's "llama3")."""

    kind: str  # "linear" | "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    """Shapes and constants of one LLaMA-family decoder."""

    arch: str  # "llama" | "mistral" | "qwen2"
    dim: int  # hidden size
    hidden_dim: int  # FFN inner size
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads: grouped-query attention
    head_dim: int
    vocab_size: int
    max_seq_len: int  # longest context the model may be run at
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # Q/K rows paired for rotation as (2i, 2i+1) (Meta/llama.cpp layout) rather
    # than (i, i + head_dim/2) (Hugging Face layout): set by the loader.
    rope_interleaved: bool = False
    tied_embeddings: bool = False
    qkv_bias: bool = False  # qwen2: q, k and v projections carry a bias

    def __post_init__(self):
        checks = [
            (self.dim > 0 and self.n_layers > 0 and self.vocab_size > 0, "dim, n_layers and vocab_size must be positive"),
            (self.n_heads > 0 and self.n_kv_heads > 0, "head counts must be positive"),
            (self.n_heads % self.n_kv_heads == 0, f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"),
            (self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for RoPE"),
        ]
        for ok, what in checks:
            if not ok:
                raise ConfigError(f"bad model configuration: {what}")

    @property
    def linear_params(self) -> int:
        """Weights of all decoder linears (what gets quantized)."""
        shapes = expected_shapes(self)
        return self.n_layers * sum(shapes[n][0] * shapes[n][1] for n in LINEAR_NAMES)

    @property
    def n_params(self) -> int:
        """All matrix weights: linears, embedding and (untied) head."""
        return self.linear_params + self.vocab_size * self.dim * (1 if self.tied_embeddings else 2)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, where: str = "the stored model configuration") -> "ModelArgs":
        """Inverse of ``to_dict`` (as stored in an ``.eawq`` file), every field checked (``schema``)."""
        from edge_awq.schema import StoredModelArgs, validated

        m = validated(StoredModelArgs, d, where, ConfigError).model_dump()
        if m["rope_scaling"] is not None:
            m["rope_scaling"] = RopeScaling(**m["rope_scaling"])
        return cls(**m)


def _family(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"config.json: architectures = {archs!r}: must be a list of class names")
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    mt = cfg.get("model_type")
    if not archs and mt in MODEL_TYPES:
        return MODEL_TYPES[mt]
    what = ", ".join(archs) if archs else f"model_type {mt!r}"
    raise ConfigError(
        f"unsupported architecture {what}: edge-awq runs {', '.join(ARCHITECTURES)} "
        "(LLaMA, Mistral and Qwen2 decoders)"
    )


ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings"}


def _rope_parameters(cfg: dict) -> dict:
    """The RoPE settings as one flat dict: transformers 5's ``rope_parameters`` (theta and scaling
    together), or the older top-level ``rope_theta`` with ``rope_scaling``."""
    rp = cfg.get("rope_parameters")
    if rp is None:
        legacy = dict(cfg.get("rope_scaling") or {})
        if "rope_theta" in cfg:
            legacy["rope_theta"] = cfg["rope_theta"]
        return legacy
    if not isinstance(rp, dict):
        raise ConfigError(f"rope_parameters {rp!r} is not an object: edge-awq reads rope_type, rope_theta and scaling")
    if rp and all(isinstance(v, dict) for v in rp.values()):  # per layer type ({"full_attention": {...}, ...})
        kinds = list(rp.values())
        if any(k != kinds[0] for k in kinds[1:]):
            raise ConfigError(f"rope_parameters differ between layer types ({', '.join(rp)}): edge-awq runs one RoPE "
                              "for every layer")
        rp = kinds[0]
    if "rope_theta" in cfg and "rope_theta" in rp and float(cfg["rope_theta"]) != float(rp["rope_theta"]):
        raise ConfigError(f"config.json gives rope_theta {cfg['rope_theta']} and rope_parameters.rope_theta "
                          f"{rp['rope_theta']}: fix the one that is wrong")
    return rp


def _rope(cfg: dict) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling; a setting edge-awq does not implement is refused, never defaulted."""
    from edge_awq.schema import RopeParameters, validated

    rp = _rope_parameters(cfg)
    unknown = sorted(set(rp) - ROPE_KEYS)
    if unknown:
        raise ConfigError(f"RoPE setting {', '.join(unknown)} is not supported: edge-awq implements rope_theta "
                          "with 'default', 'linear' and 'llama3' scaling")
    rp = validated(RopeParameters, rp, "config.json RoPE", ConfigError).model_dump(exclude_none=True)
    theta = float(rp.get("rope_theta", 10000.0))  # transformers' default for these architectures
    if not theta > 0:
        raise ConfigError(f"rope_theta {theta} must be positive")
    kind = rp.get("rope_type", rp.get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind not in ("linear", "llama3"):
        raise ConfigError(f"unsupported rope_scaling type {kind!r}: edge-awq supports 'linear' and 'llama3'")
    if "factor" not in rp:
        raise ConfigError(f"rope scaling {kind!r} without its factor: add rope_parameters.factor")
    if kind == "linear":
        return theta, RopeScaling("linear", float(rp["factor"]))
    return theta, RopeScaling(
        "llama3",
        float(rp["factor"]),
        float(rp.get("low_freq_factor", 1.0)),
        float(rp.get("high_freq_factor", 4.0)),
        int(rp.get("original_max_position_embeddings", 8192)),
    )


def _refuse_unsupported(cfg: dict, family: str) -> None:
    if any(k in cfg for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise ConfigError("mixture-of-experts models are not supported: edge-awq runs dense decoders only")
    if cfg.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported: edge-awq expects bias-free MLP projections")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {cfg['hidden_act']!r} is not supported: edge-awq implements SwiGLU (silu)")
    if family == "llama" and cfg.get("attention_bias"):
        raise ConfigError("attention_bias=true is not supported for llama: edge-awq expects bias-free attention")


def _context(cfg: dict, family: str) -> int:
    n_ctx = int(cfg.get("max_position_embeddings", 2048))
    window = cfg.get("sliding_window")
    in_use = window is not None and (
        cfg.get("use_sliding_window", False) if family == "qwen2" else int(window) < n_ctx
    )
    if in_use:
        # Within the window, sliding-window attention is plain causal attention:
        # cap the context there rather than run a mask edge-awq does not implement.
        log.warning("sliding-window attention (%d) in use: context capped at %d tokens", window, window)
        n_ctx = min(n_ctx, int(window))
    return n_ctx


def from_hf_config(cfg: dict, where: str = "config.json") -> ModelArgs:
    """Build ``ModelArgs`` from a Hugging Face ``config.json`` dict (refuses what it cannot run)."""
    from edge_awq.schema import HFConfig, validated

    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: a JSON {type(cfg).__name__}, not an object")
    family = _family(cfg)
    cfg = validated(HFConfig, cfg, where, ConfigError).model_dump(exclude_none=True)
    _refuse_unsupported(cfg, family)
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    theta, scaling = _rope(cfg)
    return ModelArgs(
        arch=family,
        dim=dim,
        hidden_dim=cfg["intermediate_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or dim // n_heads,
        vocab_size=cfg["vocab_size"],
        max_seq_len=_context(cfg, family),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_interleaved=False,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
    )


def expected_shapes(a: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Shape of each per-layer tensor, keyed by its name within the layer."""
    q_out, kv_out = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    return {
        "attn_norm": (a.dim,), "ffn_norm": (a.dim,),
        "wq": (q_out, a.dim), "wk": (kv_out, a.dim), "wv": (kv_out, a.dim), "wo": (a.dim, q_out),
        "w1": (a.hidden_dim, a.dim), "w2": (a.dim, a.hidden_dim), "w3": (a.hidden_dim, a.dim),
    }


LINEAR_NAMES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
GROUP_SIZES = (128, 64, 32, 16, 8, 4, 2, 1)


def resolve_group_size(a: ModelArgs, requested: int | str) -> int | str:
    """The group size to use: an int dividing every linear's input width, or "channel" (one group a row);
    "auto" takes the largest power of two up to 128 that divides them all."""
    shapes = expected_shapes(a)
    widths = {n: shapes[n][1] for n in LINEAR_NAMES}
    fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths.values())]
    if requested == "channel":
        return "channel"
    if requested == "auto":
        return fits[0]
    g = int(requested)
    for name, width in widths.items():
        if g <= 0 or width % g:
            ok = " or ".join(str(f) for f in fits[:3])
            raise ConfigError(f"--group-size {g} does not divide the input width {width} of layer {name}: "
                              f"use {ok} (or auto, or channel)")
    return g


HF_ARCHITECTURES = {family: name for name, family in ARCHITECTURES.items()}


def to_hf_config(a: ModelArgs, bos_id: int | None = None, eos_ids: tuple[int, ...] = ()) -> dict:
    """A Hugging Face ``config.json`` dict for ``a`` (the inverse of ``from_hf_config``), float16 weights.

    RoPE is written both ways, ``rope_theta``/``rope_scaling`` for older readers and transformers 5's
    ``rope_parameters``; Q and K rows are in the rotate-half order every edge-awq file keeps.
    """
    if a.rope_interleaved:
        raise ConfigError("Q/K rows in interleaved RoPE order (a version-1 file from llama2.c or GGUF): "
                          "re-export it from its source to write a Hugging Face directory")
    rope = {"rope_type": "default", "rope_theta": a.rope_theta}
    if a.rope_scaling is not None:
        rs = a.rope_scaling
        rope.update(rope_type=rs.kind, factor=rs.factor)
        if rs.kind == "llama3":
            rope.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                        original_max_position_embeddings=rs.original_max_position_embeddings)
    cfg = {
        "architectures": [HF_ARCHITECTURES[a.arch]], "model_type": a.arch, "hidden_size": a.dim,
        "intermediate_size": a.hidden_dim, "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim, "vocab_size": a.vocab_size,
        "max_position_embeddings": a.max_seq_len, "rms_norm_eps": a.norm_eps, "hidden_act": "silu",
        "tie_word_embeddings": a.tied_embeddings, "rope_theta": a.rope_theta,
        "rope_scaling": None if a.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"},
        "rope_parameters": rope, "torch_dtype": "float16", "dtype": "float16",
        "bos_token_id": bos_id, "eos_token_id": (list(eos_ids) if len(eos_ids) > 1 else
                                                 (eos_ids[0] if eos_ids else None)),
    }
    if a.arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    elif a.arch == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None)
    else:
        cfg.update(sliding_window=None)
    return cfg


def rope_frequencies(args: ModelArgs) -> np.ndarray:
    """Inverse frequencies of RoPE, float32 (head_dim/2,), scaling applied."""
    hd = args.head_dim
    inv = 1.0 / args.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)  # (hd/2,)
    rs = args.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    if rs.kind == "linear":
        return (inv / rs.factor).astype(np.float32)
    # llama3: leave high frequencies, divide low ones by factor, blend in between.
    wavelen = 2 * math.pi / inv
    low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    blended = (1 - smooth) * inv / rs.factor + smooth * inv
    out = np.where(wavelen < high_wl, inv, np.where(wavelen > low_wl, inv / rs.factor, blended))
    return out.astype(np.float32)
