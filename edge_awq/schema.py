"""One checked description of every structured input: config.json, the .eawq metadata, GGUF fields.

Each is a pydantic model with strict types (a string is not a number, a float not an integer, a
bool neither), ranges and the relations between fields (heads divide the width, the KV heads the
heads). ``validated`` turns the first violation into one line naming the field, the value and what
is allowed, raised as the error the caller names (``ConfigError``, ``FormatError``).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from pydantic import model_validator

from edge_awq.errors import EdgeAwqError


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"must be a number, not {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError("must be finite")
    return float(v)


Number = Annotated[float, BeforeValidator(_number)]
PositiveNumber = Annotated[Number, Field(gt=0)]
Count = Annotated[StrictInt, Field(gt=0, le=1 << 20)]  # widths, heads, layers: positive and not absurd
Vocab = Annotated[StrictInt, Field(gt=0, le=1 << 24)]
Context = Annotated[StrictInt, Field(gt=0, le=1 << 24)]
TokenId = Annotated[StrictInt, Field(ge=0, lt=1 << 24)]


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 48 else r[:45] + "..."


def validated(schema: type[BaseModel], data: Any, where: str, error: type[EdgeAwqError]):
    """data checked against schema (the model instance); the first violation raised as error(one line)."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            raise error(f"{where}: {field} is missing") from None
        if not field:
            raise error(f"{where}: {msg}") from None
        raise error(f"{where}: {field} = {_short(first['input'])}: {msg}") from None


class _Heads(BaseModel):
    """The relations every architecture shares: heads divide the width, KV heads the heads, RoPE pairs."""

    @model_validator(mode="after")
    def _relations(self):
        n_heads, n_kv = self._heads()
        head_dim = self._head_dim()
        if n_heads % n_kv:
            raise ValueError(f"{n_heads} attention heads are not a multiple of {n_kv} key/value heads")
        if head_dim is None:
            raise ValueError(f"the width {self._width()} is not a multiple of {n_heads} heads: give head_dim")
        if head_dim % 2:
            raise ValueError(f"head dimension {head_dim} must be even for RoPE")
        return self


class HFConfig(_Heads):
    """The fields of a Hugging Face config.json that edge-awq reads (others pass through)."""

    model_config = ConfigDict(extra="allow")
    architectures: list[StrictStr] | None = None
    model_type: StrictStr | None = None
    hidden_size: Count
    intermediate_size: Count
    num_hidden_layers: Count
    num_attention_heads: Count
    num_key_value_heads: Count | None = None
    head_dim: Count | None = None
    vocab_size: Vocab
    max_position_embeddings: Context | None = None
    rms_norm_eps: PositiveNumber | None = None
    rope_theta: PositiveNumber | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    tie_word_embeddings: StrictBool | None = None
    sliding_window: Context | None = None
    use_sliding_window: StrictBool | None = None
    hidden_act: StrictStr | None = None
    attention_bias: StrictBool | None = None
    mlp_bias: StrictBool | None = None

    def _heads(self):
        return self.num_attention_heads, self.num_key_value_heads or self.num_attention_heads

    def _width(self):
        return self.hidden_size

    def _head_dim(self):
        if self.head_dim is not None:
            return self.head_dim
        return self.hidden_size // self.num_attention_heads if self.hidden_size % self.num_attention_heads == 0 else None


class RopeParameters(BaseModel):
    """RoPE's base and scaling (transformers 5's rope_parameters, or rope_theta with rope_scaling)."""

    model_config = ConfigDict(extra="forbid")
    rope_type: StrictStr | None = None
    type: StrictStr | None = None
    rope_theta: PositiveNumber | None = None
    factor: PositiveNumber | None = None
    low_freq_factor: PositiveNumber | None = None
    high_freq_factor: PositiveNumber | None = None
    original_max_position_embeddings: Context | None = None

    @model_validator(mode="after")
    def _llama3(self):
        lo, hi = self.low_freq_factor or 1.0, self.high_freq_factor or 4.0
        if (self.rope_type or self.type) == "llama3" and not hi > lo:
            raise ValueError(f"high_freq_factor {hi} must exceed low_freq_factor {lo}")
        return self


class RopeScalingArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["linear", "llama3"]
    factor: PositiveNumber
    low_freq_factor: PositiveNumber = 1.0
    high_freq_factor: PositiveNumber = 4.0
    original_max_position_embeddings: Context = 8192


class StoredModelArgs(_Heads):
    """``config.ModelArgs`` as an .eawq file stores it."""

    model_config = ConfigDict(extra="forbid")
    arch: Literal["llama", "mistral", "qwen2"]
    dim: Count
    hidden_dim: Count
    n_layers: Count
    n_heads: Count
    n_kv_heads: Count
    head_dim: Count
    vocab_size: Vocab
    max_seq_len: Context
    norm_eps: PositiveNumber = 1e-5
    rope_theta: PositiveNumber = 10000.0
    rope_scaling: RopeScalingArgs | None = None
    rope_interleaved: StrictBool = False
    tied_embeddings: StrictBool = False
    qkv_bias: StrictBool = False

    def _heads(self):
        return self.n_heads, self.n_kv_heads

    def _width(self):
        return self.dim

    def _head_dim(self):
        return self.head_dim


class StoredQuantization(BaseModel):
    """The quantization block of an .eawq file's metadata (export settings, or what a conversion kept)."""

    model_config = ConfigDict(extra="allow")
    method: StrictStr
    bits: Literal[3, 4, 5, 6, 8]  # a mixed file's: the format that holds the most weights (``formats`` has each)
    group_size: Annotated[StrictInt, Field(gt=0, le=1 << 20)] | Literal["channel"]
    head: Literal["fp16", "int8", "w4"] = "fp16"
    zero_point: StrictBool = True
    formats: dict[StrictStr, Annotated[StrictStr, Field(pattern=r"^w[34568]g[1-9][0-9]*$")]] | None = None


class StoredTokenizer(BaseModel):
    """The fields that restore the tokenizer stored beside the weights."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["tokenizers", "sentencepiece"]
    bos_id: TokenId | None
    eos_ids: list[TokenId]
    chat_template: StrictStr | None
    add_bos: StrictBool
    bos_token: StrictStr
    eos_token: StrictStr
    special_ids: list[TokenId]


class StoredChecksums(BaseModel):
    """Tensor name -> hex digest."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _digests(cls, v):
        if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(d, str) for k, d in v.items()):
            raise ValueError("must map tensor names to hex digests")
        return v


class GGUFArgs(_Heads):
    """The llama-family fields of a GGUF file's metadata that edge-awq reads."""

    embedding_length: Count
    feed_forward_length: Count
    block_count: Count
    head_count: Count
    head_count_kv: Count | None = None
    key_length: Count | None = None
    vocab_size: Vocab
    context_length: Context
    layer_norm_rms_epsilon: PositiveNumber
    rope_freq_base: PositiveNumber
    rope_scale_linear: PositiveNumber | None = None

    def _heads(self):
        return self.head_count, self.head_count_kv or self.head_count

    def _width(self):
        return self.embedding_length

    def _head_dim(self):
        if self.key_length is not None:
            return self.key_length
        return self.embedding_length // self.head_count if self.embedding_length % self.head_count == 0 else None
