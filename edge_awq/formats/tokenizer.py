"""Text to token ids and back, through the ``tokenizers`` or ``sentencepiece`` libraries.

Builders turn each format's tokenizer into one: a ``tokenizer.json``, a
sentencepiece ``.model``, a GGUF vocabulary (byte-level BPE or sentencepiece
BPE) or a llama2.c ``tok*.bin``. The chat template is rendered with Jinja2 the
way Hugging Face renders it.
"""

from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from edge_awq.errors import FormatError, InputError


@dataclass
class Tokenizer:
    impl: object  # tokenizers.Tokenizer or sentencepiece.SentencePieceProcessor
    bos_id: int | None
    eos_ids: tuple[int, ...]
    chat_template: str | None = None
    add_bos: bool = True  # the model expects BOS at the start of a prompt
    bos_token: str = ""
    eos_token: str = ""
    special_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def _is_spm(self) -> bool:
        return not hasattr(self.impl, "encode_batch")

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of text; special-token strings in text become their ids."""
        ids = list(self.impl.encode(text)) if self._is_spm else self.impl.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids if not (skip_special and int(i) in self.special_ids)]
        return self.impl.decode(ids) if self._is_spm else self.impl.decode(ids, skip_special_tokens=False)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes one token's piece takes (an upper bound on the text a token covers)."""
        if self._is_spm:
            pieces = (self.impl.id_to_piece(i) for i in range(self.impl.get_piece_size()))
        else:
            pieces = self.impl.get_vocab(with_added_tokens=True)
        return max((len(p.encode("utf-8")) for p in pieces), default=1) + 1  # +1: a prefix space a normalizer adds

    @property
    def vocab_size(self) -> int:
        return self.impl.get_piece_size() if self._is_spm else self.impl.get_vocab_size(with_added_tokens=True)

    def serialize(self) -> tuple[bytes, dict]:
        """The tokenizer as bytes (tokenizer.json or sentencepiece model) and the fields to restore it."""
        data = self.impl.serialized_model_proto() if self._is_spm else self.impl.to_str().encode("utf-8")
        fields = {
            "kind": "sentencepiece" if self._is_spm else "tokenizers", "bos_id": self.bos_id,
            "eos_ids": list(self.eos_ids), "chat_template": self.chat_template, "add_bos": self.add_bos,
            "bos_token": self.bos_token, "eos_token": self.eos_token, "special_ids": sorted(self.special_ids),
        }
        return data, fields

    @classmethod
    def deserialize(cls, data: bytes, fields: dict) -> "Tokenizer":
        """Inverse of ``serialize``."""
        if fields["kind"] == "sentencepiece":
            import sentencepiece as spm

            impl = spm.SentencePieceProcessor()
            impl.LoadFromSerializedProto(data)
        else:
            from tokenizers import Tokenizer as HFTokenizer

            impl = HFTokenizer.from_str(data.decode("utf-8"))
        return cls(impl, fields["bos_id"], tuple(fields["eos_ids"]), fields["chat_template"], fields["add_bos"],
                   fields["bos_token"], fields["eos_token"], frozenset(fields["special_ids"]))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for messages [{"role", "content"}] by the model's chat template."""
        if not self.chat_template:
            raise InputError("this model has no chat template: give it plain text instead of chat messages")
        from jinja2 import TemplateError

        try:
            return _compiled_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token,
            )
        except TemplateError as e:
            raise FormatError(f"the model's chat template does not render: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt)
        starts_with_bos = bool(self.bos_token) and text.startswith(self.bos_token)
        return self.encode(text, bos=self.add_bos and not starts_with_bos)


def _raise_exception(msg):
    raise InputError(f"chat template refused the messages: {msg}")


@functools.lru_cache(maxsize=4)
def _compiled_template(source: str):
    """A chat template compiled once (a server renders it for every request), in a sandbox."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env.from_string(source)


def _special_ids(tok) -> frozenset[int]:
    return frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)


def from_tokenizer_json(path: Path, config: dict | None = None, eos_ids: tuple[int, ...] = ()) -> Tokenizer:
    """A Hugging Face ``tokenizer.json`` with its ``tokenizer_config.json`` dict."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception on parse errors
        raise FormatError(f"{path}: not a readable tokenizer.json ({e})") from None
    config = config or {}
    bos, eos = _token_str(config.get("bos_token")), _token_str(config.get("eos_token"))
    bos_id = tok.token_to_id(bos) if bos else None
    eos_id = tok.token_to_id(eos) if eos else None
    eos_all = tuple(dict.fromkeys(([eos_id] if eos_id is not None else []) + list(eos_ids)))
    return Tokenizer(
        tok, bos_id, eos_all, config.get("chat_template") if isinstance(config.get("chat_template"), str) else None,
        add_bos=bool(config.get("add_bos_token", False)) and bos_id is not None,
        bos_token=bos or "", eos_token=eos or "", special_ids=_special_ids(tok),
    )


def _token_str(t) -> str | None:
    return t.get("content") if isinstance(t, dict) else t


def from_sentencepiece(path: Path, chat_template: str | None = None) -> Tokenizer:
    """A sentencepiece ``.model`` file."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise FormatError(f"{path}: not a readable sentencepiece model ({e})") from None
    bos = sp.bos_id() if sp.bos_id() >= 0 else None
    eos = (sp.eos_id(),) if sp.eos_id() >= 0 else ()
    specials = frozenset(i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i))
    return Tokenizer(
        sp, bos, eos, chat_template, add_bos=bos is not None,
        bos_token=sp.id_to_piece(bos) if bos is not None else "",
        eos_token=sp.id_to_piece(eos[0]) if eos else "", special_ids=specials,
    )


def spm_bpe(pieces: list[str], scores: list[float], specials: dict[int, str], add_space_prefix: bool = True):
    """A ``tokenizers`` BPE that encodes like sentencepiece BPE (and llama2.c) from pieces and scores.

    Merges are ranked by the score of the piece they make, which is how the
    sentencepiece BPE encoder picks the next pair. Pieces use "▁" for space.
    """
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers

    vocab = {p: i for i, p in enumerate(pieces)}
    ranked = sorted(
        (i for i, p in enumerate(pieces) if len(p) > 1 and i not in specials and not _is_byte_piece(p)),
        key=lambda i: -scores[i],
    )
    merges = []
    for i in ranked:
        p = pieces[i]
        merges += [(p[:k], p[k:]) for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab]
    unk = next((s for s in specials.values() if "unk" in s), None)
    tok = HFTokenizer(models.BPE(vocab, merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    norms = ([normalizers.Prepend("▁")] if add_space_prefix else []) + [normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence(norms)
    decs = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(decs + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials.values()])
    return tok


# Pre-tokenizer regexes by GGUF ``tokenizer.ggml.pre`` name (as llama.cpp splits).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {
    "default": (_GPT2,), "gpt2": (_GPT2,), "gpt-2": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2), "starcoder": (r"\p{N}", _GPT2), "refact": (r"\p{N}", _GPT2),
    "llama-bpe": (_LLAMA3,), "llama3": (_LLAMA3,), "qwen2": (_QWEN2,),
}


def byte_level_bpe(tokens: list[str], merges: list[str], pre: str, specials: list[str]):
    """A ``tokenizers`` byte-level BPE (GPT-2 style) from a GGUF vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    if pre not in PRE_TOKENIZERS:
        raise FormatError(f"unsupported GGUF pre-tokenizer {pre!r}: known are {', '.join(sorted(PRE_TOKENIZERS))}")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def _is_byte_piece(p: str) -> bool:
    return len(p) == 6 and p.startswith("<0x") and p.endswith(">")


def from_llama2c_bin(path: Path, vocab_size: int) -> Tokenizer:
    """A llama2.c ``tok*.bin``: max piece length, then (score f32, length i32, bytes) per piece."""
    try:
        b = path.read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: cannot read tokenizer: {e.strerror}") from None
    pieces, scores, off = [], [], 4
    try:
        for _ in range(vocab_size):
            score, n = struct.unpack_from("<fi", b, off)
            pieces.append(b[off + 8 : off + 8 + n].decode("utf-8"))
            scores.append(score)
            off += 8 + n
    except (struct.error, UnicodeDecodeError):
        raise FormatError(f"{path}: truncated or corrupt llama2.c tokenizer (expected {vocab_size} pieces)") from None
    # llama2.c writes "▁" as a space and wraps BOS/EOS in newlines.
    specials = {0: "<unk>", 1: "<s>", 2: "</s>"}
    pieces = [specials.get(i, p.replace(" ", "▁")) for i, p in enumerate(pieces)]
    tok = spm_bpe(pieces, scores, specials)
    return Tokenizer(tok, 1, (2,), None, add_bos=True, bos_token="<s>", eos_token="</s>", special_ids=frozenset(specials))
