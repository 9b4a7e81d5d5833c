"""Token generation: sampling, stop conditions and UTF-8-safe streaming of text.

``generate`` prefills the prompt once, then decodes one token at a time over
the KV cache, yielding text pieces as soon as they are whole characters and
cannot be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from edge_awq.errors import InputError
from edge_awq.model import KVCache, ModelWeights, forward, prefill


@dataclass(frozen=True)
class SamplingArgs:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context
    seed: int | None = None
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Piece:
    """One step of the stream: new text (possibly empty), the token, and why it ended (or None)."""

    text: str
    token: int | None
    finish: str | None = None  # "stop" (EOS or stop string), "length", or None while going


def penalize(logits: np.ndarray, context: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style repetition penalty: positive logits of seen tokens divided by it, negative multiplied."""
    if penalty == 1.0 or len(context) == 0:
        return logits
    out = logits.copy()
    seen = np.unique(context)
    out[seen] = np.where(out[seen] > 0, out[seen] / penalty, out[seen] * penalty)
    return out


def sample(logits: np.ndarray, s: SamplingArgs, rng: np.random.Generator) -> int:
    """Pick a token from logits (vocab,) by greedy, temperature, top-k and top-p.

    Once a token: float32 over the vocabulary, the nucleus sorted only among the tokens that can
    be in it, and one draw (``_draw``) — a fraction of a decode step (docs/cpu-kernels.md).
    """
    if s.temperature <= 0:
        return int(np.argmax(logits))
    z = np.asarray(logits, dtype=np.float32)
    ids = None  # the candidates' token ids, where they are not the whole vocabulary
    if 0 < s.top_k < len(z):
        kth = np.partition(z, -s.top_k)[-s.top_k]
        ids = np.flatnonzero(z >= kth)
        z = z[ids]
    p = np.exp((z - z.max()) / np.float32(s.temperature))
    if s.top_p < 1.0:
        keep = _nucleus(p, s.top_p)
        ids = keep if ids is None else ids[keep]
        p = p[keep]
    j = _draw(p, rng.random())
    return int(j if ids is None else ids[j])


def _draw(p: np.ndarray, u: float, block: int = 1024) -> int:
    """The index i where u (in [0, 1)) of p's total mass falls: p[:i] holds at most u of it and
    p[:i + 1] more. A cumulative sum of block totals, then one within the block: a plain one over
    the vocabulary is a sequential pass that cost more than the rest of the sampling together."""
    n = len(p)
    if n <= block:
        c = np.cumsum(p, dtype=np.float64)
        return _first_above(c, u * c[-1], p)
    padded = np.zeros(-(-n // block) * block, np.float32)
    padded[:n] = p
    totals = np.cumsum(padded.reshape(-1, block).sum(axis=1, dtype=np.float64))
    target = u * totals[-1]
    b = min(int(np.searchsorted(totals, target, side="right")), len(totals) - 1)
    while totals[b] == (totals[b - 1] if b else 0.0):  # rounding landed on an empty block
        b -= 1
    seg = p[b * block : (b + 1) * block]
    return b * block + _first_above(np.cumsum(seg, dtype=np.float64), target - (totals[b - 1] if b else 0.0), seg)


def _first_above(c: np.ndarray, t: float, p: np.ndarray) -> int:
    """The first index with c[i] > t (c the cumulative sum of p); the last nonzero p if rounding put t past the end."""
    j = int(np.searchsorted(c, t, side="right"))
    return j if j < len(c) else int(np.flatnonzero(p)[-1])


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of the largest p whose mass reaches top_p of the total.

    Only tokens above a threshold are sorted when they already hold that mass: they are a prefix
    of the sorted order, so the nucleus lies among them (otherwise a lower threshold, then all).
    """
    need = top_p * float(p.sum(dtype=np.float64))
    top = float(p.max())
    for floor in (1e-3, 1e-6, 0.0):  # 0: every token, which always holds the mass
        cand = np.flatnonzero(p >= top * floor)
        if floor and float(p[cand].sum(dtype=np.float64)) < need:
            continue
        order = cand[np.argsort(-p[cand], kind="stable")]
        po = p[order]
        before = np.cumsum(po, dtype=np.float64) - po  # the mass ahead of each token
        return order[: max(1, int(np.count_nonzero(before < need)))]


class TextStream:
    """Decodes a growing token list into text pieces that never split a UTF-8 character.

    Each token decodes a short window rather than the whole answer: the text of the tokens from
    ``prefix`` on, less that of the tokens from ``prefix`` to ``read`` (the last ones already
    emitted, kept so that a tokenizer that drops or merges spaces at the start of a decode sees
    the same context as in the full text). The window moves on once a piece is whole.
    """

    def __init__(self, tokenizer):
        self.tok, self.ids = tokenizer, []
        self.prefix = self.read = 0  # ids[prefix:read]: already emitted, decoded again for context

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        if text.endswith("\ufffd") or len(text) <= len(before):  # an incomplete character: wait for the next token
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


def fit_prompt(ids: list[int], max_ctx: int, max_new: int, trim: bool) -> list[int]:
    """The prompt as it can run: refused, or trimmed to its last tokens, when it leaves no room to answer."""
    room = max_ctx - max(1, min(max_new, max_ctx // 2))
    if len(ids) <= room:
        return ids
    if not trim:
        raise InputError(f"prompt of {len(ids):,} tokens leaves no room to answer in a context of {max_ctx:,}: "
                         "shorten it or raise the context")
    return ids[-room:]


def generate(w: ModelWeights, ops, tokenizer, prompt: list[int], s: SamplingArgs,
             cache: KVCache | None = None) -> Iterator[Piece]:
    """Stream the continuation of prompt (token ids). The cache, if given, must hold prompt + answer."""
    if not prompt:
        raise InputError("empty prompt: give at least one token")
    cache = cache or ops.allocate_cache(w.args, min(w.args.max_seq_len, len(prompt) + s.max_new_tokens))
    if len(prompt) >= cache.max_seq:
        raise InputError(f"prompt of {len(prompt):,} tokens does not fit a context of {cache.max_seq:,}")
    rng = np.random.default_rng(s.seed)
    stream, pending, context = TextStream(tokenizer), "", list(prompt)
    logits = prefill(w, prompt, 0, cache, ops)
    for step in range(s.max_new_tokens):
        token = sample(penalize(logits, np.asarray(context), s.repetition_penalty), s, rng)
        if token in tokenizer.eos_ids:
            yield Piece(pending, token, "stop")
            return
        context.append(token)
        pending += stream.push(token)
        hit = min((pending.find(x) for x in s.stop if x in pending), default=-1)
        if hit >= 0:
            yield Piece(pending[:hit], token, "stop")
            return
        keep = _holdback(pending, s.stop)
        out, pending = pending[: len(pending) - keep], pending[len(pending) - keep:]
        pos = len(context) - 1
        if step == s.max_new_tokens - 1 or pos + 1 >= cache.max_seq:
            yield Piece(out + pending, token, "length")
            return
        yield Piece(out, token)
        logits = forward(w, np.asarray([token]), pos, cache, ops, last_only=True)[-1]
