"""The Python API: ``edge_awq.formats.load`` opens a model once, the way every command does, and ``LLM`` runs it.

    import edge_awq

    with edge_awq.formats.load("smollm2-w4g64.eawq") as llm:
        for piece in llm.chat([{"role": "user", "content": "What is the capital of France?"}]):
            print(piece, end="", flush=True)

``load`` is the one place that opens a model: it checks the file (``formats.integrity``), plans the memory
and refuses a model that will not fit (``plan.check_fits``), picks the backend and says why
(``backends.pick_backend``), prepares the weights for it (repacked once, one tensor at a time) and
preallocates the KV cache. ``chat``, ``serve``, ``bench`` and ``eval`` are built on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edge_awq.errors import InputError

# Sampling when neither the caller nor the model says: the range llama.cpp and Ollama use for a conversation
# (greedy decoding loops on small models). Greedy is temperature=0.
CONVERSATION_DEFAULTS = {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1}
SAMPLING_KEYS = tuple(CONVERSATION_DEFAULTS)


class TextPiece(str):
    """A piece of generated text (a ``str``), with the token ids that made it and, on the last, why it ended."""

    token_ids: tuple[int, ...]
    finish: str | None  # "stop" (end of sequence or a stop string), "length", or None while going

    def __new__(cls, text: str, token_ids: tuple[int, ...] = (), finish: str | None = None):
        piece = super().__new__(cls, text)
        piece.token_ids, piece.finish = token_ids, finish
        return piece


@dataclass(frozen=True)
class Info:
    """What was opened and how it runs."""

    path: str
    backend: str  # "numba", "cuda" or "reference"
    backend_reason: str  # why that backend: asked for, or what auto found
    args: object  # config.ModelArgs
    quantization: dict  # {} for a float model; bits, group_size, head, layout ... for a packed one
    ctx: int  # tokens the KV cache holds: prompt and answer
    kv_dtype: str  # "fp16" or "int8"
    generation: dict = field(default_factory=dict)  # the model's recommended sampling, where it has one


class LLM:
    """A loaded model: tokenizer, prepared weights, backend and one preallocated KV cache (not thread-safe:
    one generation at a time). Made by ``edge_awq.formats.load``."""

    def __init__(self, weights, ops, tokenizer, cache, plan, info: Info):
        self.weights, self.ops, self.tokenizer, self.cache, self.plan, self.info = (
            weights, ops, tokenizer, cache, plan, info)

    # --- sampling ---

    def sampling(self, max_new_tokens: int = 256, stop: Sequence[str] = (), seed: int | None = None, **given):
        """The ``SamplingArgs`` a request gets: what it gives, else the model's recommended sampling
        (generation_config.json, carried into .eawq files), else ``CONVERSATION_DEFAULTS``."""
        from edge_awq.generate import SamplingArgs

        unknown = set(given) - set(SAMPLING_KEYS)
        if unknown:
            raise TypeError(f"unknown sampling arguments: {', '.join(sorted(unknown))}")
        values = {**CONVERSATION_DEFAULTS, **self.info.generation,
                  **{k: v for k, v in given.items() if v is not None}}
        _check_sampling(values, max_new_tokens)
        return SamplingArgs(temperature=float(values["temperature"]), top_k=int(values["top_k"]),
                            top_p=float(values["top_p"]), repetition_penalty=float(values["repetition_penalty"]),
                            seed=seed, max_new_tokens=max_new_tokens, stop=tuple(stop))

    # --- generation ---

    def generate(self, prompt: str | Sequence[int], *, max_new_tokens: int = 256, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                 stop: Sequence[str] = (), seed: int | None = None) -> Iterator[TextPiece]:
        """Continue prompt (text, or token ids), yielding text pieces as they are made.

        Text is encoded with BOS where the model expects it. Sampling arguments left None take the model's
        recommended values (``sampling``); temperature=0 is greedy. The prompt and the answer share the
        context ``load`` allocated (``info.ctx`` tokens): a prompt that leaves no room is an InputError.
        """
        ids = (self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos) if isinstance(prompt, str)
               else [int(t) for t in prompt])
        s = self.sampling(max_new_tokens, stop, seed, temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty)
        return self._stream(ids, s)

    def chat(self, messages: Sequence[dict], **sampling) -> Iterator[TextPiece]:
        """Answer a conversation ([{"role": "system"|"user"|"assistant", "content": str}]) through the model's
        chat template, yielding text pieces; keyword arguments as for ``generate``."""
        if not self.tokenizer.chat_template:
            raise InputError("this model has no chat template: use generate(text) to continue a text")
        return self.generate(self.tokenizer.encode_chat(list(messages)), **sampling)

    def _stream(self, ids: list[int], s) -> Iterator[TextPiece]:
        from edge_awq.generate import fit_prompt, generate

        fit_prompt(ids, self.info.ctx, s.max_new_tokens, trim=False)
        for piece in generate(self.weights, self.ops, self.tokenizer, ids, s, self.cache):
            yield TextPiece(piece.text, () if piece.token is None else (piece.token,), piece.finish)

    # --- scoring ---

    def perplexity(self, text: str | Sequence[int], ctx: int = 512, max_tokens: int | None = None,
                   on_window: Callable[[int, int], None] | None = None):
        """Perplexity of text (encoded without BOS) in consecutive windows of ctx tokens (``perplexity.py``'s
        protocol); on_window(done, total) reports progress. Returns a ``PerplexityResult``."""
        from edge_awq.perplexity import perplexity

        tokens = self.tokenizer.encode(text) if isinstance(text, str) else list(text)
        if max_tokens is not None:
            tokens = tokens[:max_tokens]
        if len(tokens) < 2:
            raise InputError(f"only {len(tokens)} token(s) to score: at least 2 are needed to score one")
        if not 2 <= ctx <= self.info.args.max_seq_len:
            raise InputError(f"ctx {ctx}: must be between 2 and the model's context of {self.info.args.max_seq_len}")
        cache = self.cache if self.cache.max_seq >= ctx else None  # the one preallocated, where it is long enough
        return perplexity(self.weights, self.ops, tokens, ctx, on_window, cache)

    # --- lifetime ---

    def close(self) -> None:
        """Let go of the weights and the cache (a cuda backend's device memory with them)."""
        self.weights = self.cache = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        a = self.info.args
        return (f"LLM({self.info.path!r}, {a.arch} {a.n_layers} layers dim {a.dim}, backend {self.info.backend}, "
                f"ctx {self.info.ctx})")


def _check_sampling(v: dict, max_new_tokens: int) -> None:
    checks = [
        (isinstance(max_new_tokens, int) and max_new_tokens >= 1, f"max_new_tokens {max_new_tokens!r}: at least 1"),
        (_finite(v["temperature"]) and v["temperature"] >= 0, f"temperature {v['temperature']!r}: 0 (greedy) or more"),
        (isinstance(v["top_k"], int) and v["top_k"] >= 0, f"top_k {v['top_k']!r}: 0 (off) or more"),
        (_finite(v["top_p"]) and 0 < v["top_p"] <= 1, f"top_p {v['top_p']!r}: in (0, 1]"),
        (_finite(v["repetition_penalty"]) and v["repetition_penalty"] > 0,
         f"repetition_penalty {v['repetition_penalty']!r}: above 0 (1 is off)"),
    ]
    for ok, what in checks:
        if not ok:
            raise InputError(f"sampling {what}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load(model: str | Path, *, backend: str = "auto", ctx: int = 2048, kv_dtype: str = "fp16",
         memory: str | None = None, verify: str = "cached", tokenizer: str | Path | None = None,
         dtype: str = "stored", lazy: bool | str = False, activations: str = "auto") -> LLM:
    """Open a model to run it: an .eawq file, a Hugging Face directory (float, AutoAWQ or compressed-tensors),
    a .gguf file or a llama2.c .bin.

    backend: "auto" (cuda where its library loads and a GPU answers, else numba), "cuda", "numba" or
        "reference" (numpy); ``info.backend_reason`` says why.
    ctx: tokens of context (prompt and answer) the KV cache holds, at most the model's own.
    kv_dtype: "fp16" or "int8" (half the memory: one float32 scale per token and head).
    memory: what the model may use, e.g. "2GiB"; by default what the machine has free (MemAvailable).
        A model that will not fit raises ``DoesNotFit`` with the plan's table before any weight is read.
    verify: an .eawq file's checksums: "cached" (every tensor the first time the file is used on this
        machine), "always", or "never".
    tokenizer: the tokenizer file of a llama2.c checkpoint, if not beside it.
    dtype: float tensors as "stored" (float16 stays float16: half the memory) or as "float32".
    activations: the CPU backends' packed linears: "int8" (integer dot products with 8-bit activations),
        "int16", or "auto" (numba's measured default, README "Speed"); the cuda backend's are fp16.
    lazy: read each decoder layer from the file when it runs, holding one at a time (a float model larger
        than memory, scored by ``perplexity``); "auto": when float32 weights would take over half the free
        memory. Memory is then bounded by a layer, and the plan is not checked.

    Raises ``edge_awq.errors.EdgeAwqError`` subclasses (FormatError, ConfigError, DoesNotFit,
    BackendUnavailable, InputError) with a message that names the problem and the fix.
    """
    import numpy as np

    from edge_awq.formats import integrity
    from edge_awq.formats.load import load_weights, open_source
    from edge_awq.backends import pick_backend
    from edge_awq.plan import available_memory, check_fits

    if kv_dtype not in ("fp16", "int8"):
        raise InputError(f"kv_dtype {kv_dtype!r}: fp16 or int8")
    if dtype not in ("stored", "float32"):
        raise InputError(f"dtype {dtype!r}: stored or float32")
    src = open_source(model, tokenizer)
    integrity.check(src, verify)
    ctx = min(int(ctx), src.args.max_seq_len)
    if ctx < 2:
        raise InputError(f"ctx {ctx}: at least 2 tokens")
    quantized = bool(getattr(src, "quantization", None))
    if lazy == "auto":
        lazy = not quantized and 4 * src.args.n_params > available_memory() // 2 > 0
    plan = None if lazy else check_fits(src, str(model), ctx, memory, kv_dtype)  # before any weight is read
    ops, why = pick_backend(backend, activations)
    if kv_dtype == "int8" and ops.name == "cuda":
        raise InputError("kv_dtype int8 is the CPU backends': the cuda backend keeps an fp16 cache")
    # the stored arrays as they are (memory-mapped), prepared in their place
    weights = ops.prepare(load_weights(src, lazy=bool(lazy), dtype=None if dtype == "stored" else np.float32))
    cache = ops.allocate_cache(weights.args, ctx, np.int8 if kv_dtype == "int8" else None, commit=True)
    tok = src.tokenizer()
    quant = {k: v for k, v in (getattr(src, "quantization", None) or {}).items() if k != "source_config"}
    gen = getattr(src, "generation_defaults", lambda: {})()
    info = Info(str(model), ops.name, why, src.args, quant, ctx, kv_dtype, gen)
    return LLM(weights, ops, tok, cache, plan, info)
