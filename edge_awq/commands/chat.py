"""``edge-awq chat``: an interactive terminal chat (or one answer with --prompt) with streamed output."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from edge_awq.commands import flags

log = logging.getLogger(__name__)

HELP = "commands: /reset (forget the conversation), /system TEXT, /stats, /help; Ctrl-C stops an answer, Ctrl-D exits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=".eawq file (or any model edge-awq reads)")
    p.add_argument("--prompt", help="answer this once and exit")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--backend", default="auto", help="cuda, numba, reference or auto (default)")
    p.add_argument("--ctx", type=flags.context, default=2048, help="context length in tokens (default 2048)")
    p.add_argument("--max-new-tokens", type=flags.positive, default=512)
    sampling = "default: the model's recommended sampling (generation_config.json), else temperature 0.7, top-k 40, " \
               "top-p 0.9, repetition penalty 1.1"
    p.add_argument("--temperature", type=flags.temperature, default=None, help=f"0: greedy ({sampling})")
    p.add_argument("--top-k", type=flags.top_k, default=None, help="0: off")
    p.add_argument("--top-p", type=flags.top_p, default=None)
    p.add_argument("--repetition-penalty", type=flags.repetition_penalty, default=None, help="1: off")
    p.add_argument("--seed", type=flags.seed, default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer file for a llama2.c checkpoint")
    flags.add_activations(p)
    p.add_argument("--kv-dtype", choices=("fp16", "int8"), default="fp16",
                   help="KV cache precision (int8: half the memory, a scale per token and head)")
    p.add_argument("--memory", type=flags.size, default=None,
                   help="memory the model may use, e.g. 2GiB (default: what is free)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the check of an .eawq file's checksums (done once per file on this machine otherwise)")


@dataclass
class Conversation:
    """Turns kept within the context budget; the oldest are dropped first."""

    system: str | None
    turns: list[dict] = field(default_factory=list)

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    first_token_s: float = 0.0


def prompt_ids(tok, conv: Conversation, budget: int) -> tuple[list[int], int]:
    """Token ids of the conversation, dropping the oldest turns to fit budget. Returns (ids, turns dropped)."""
    from edge_awq.errors import InputError

    dropped = 0
    while True:
        if tok.chat_template:
            ids = tok.encode_chat(conv.messages())
        else:  # no template (a story model): the last user text is continued
            ids = tok.encode(conv.turns[-1]["content"], bos=tok.add_bos)
        if len(ids) <= budget:
            return ids, dropped
        if len(conv.turns) <= 1:
            raise InputError(f"the message is {len(ids):,} tokens; at most {budget:,} fit: shorten it or raise --ctx")
        del conv.turns[:2]  # the oldest user turn and its answer
        dropped += 1


class _StopOnCtrlC:
    """While an answer streams, Ctrl-C sets a flag that the token loop checks.

    Raising KeyboardInterrupt wherever the signal lands is not enough: it can land inside a
    library (numba compiling a kernel on first use) that swallows it, and the answer runs on.
    """

    def __init__(self):
        self.stop = False

    def __enter__(self):
        self._previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.stop = True

    def __exit__(self, *exc):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
        return False


def answer(engine, conv: Conversation, out, stats: Stats) -> str:
    """Stream one answer to out; Ctrl-C stops it (what was said is kept)."""
    from edge_awq.generate import generate

    w, ops, tok, s, ctx, cache = engine
    ids, dropped = prompt_ids(tok, conv, ctx - min(s.max_new_tokens, ctx // 2))
    if dropped:
        print(f"[dropped the {dropped} oldest exchange(s) to fit the context of {ctx} tokens]", file=sys.stderr)
    text, t0, n = "", time.perf_counter(), 0
    with _StopOnCtrlC() as ctrl_c:
        for piece in generate(w, ops, tok, ids, s, cache):
            if n == 0:
                stats.first_token_s = time.perf_counter() - t0
            n += 1
            text += piece.text
            out.write(piece.text)
            out.flush()
            if ctrl_c.stop:
                out.write(" [stopped]")
                break
    out.write("\n")
    out.flush()
    stats.prompt_tokens, stats.new_tokens, stats.seconds = len(ids), n, time.perf_counter() - t0
    return text


def _command(line: str, conv: Conversation, stats: Stats, ctx: int) -> bool:
    """Handle a /command; True when the line was one."""
    if line == "/reset":
        conv.turns.clear()
        print("[conversation cleared]")
    elif line.startswith("/system"):
        conv.system = line[len("/system"):].strip() or None
        conv.turns.clear()
        print(f"[system message {'set' if conv.system else 'removed'}; conversation cleared]")
    elif line == "/stats":
        rate = stats.new_tokens / stats.seconds if stats.seconds else 0.0
        print(f"[last answer: {stats.new_tokens} tokens at {rate:.1f} tokens/s, first token after "
              f"{stats.first_token_s:.2f}s; context used {stats.prompt_tokens + stats.new_tokens} of {ctx}]")
    elif line.startswith("/"):
        print(HELP)
    else:
        return False
    return True


def interact(engine, conv: Conversation) -> int:
    stats, ctx = Stats(), engine[4]
    print(f"edge-awq chat: {HELP}")
    while True:
        try:
            line = input("> ").strip()
            if not line or _command(line, conv, stats, ctx):
                continue
            conv.turns.append({"role": "user", "content": line})
            reply = answer(engine, conv, sys.stdout, stats)
            conv.turns.append({"role": "assistant", "content": reply})
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # outside an answer: drop a question left without one
            if conv.turns and conv.turns[-1]["role"] == "user":
                conv.turns.pop()
            print()


def run(args: argparse.Namespace) -> int:
    from edge_awq.api import load
    from edge_awq.errors import InputError

    if args.ctx < 8:
        raise InputError(f"--ctx {args.ctx}: too small to chat")
    llm = load(args.model, backend=args.backend, ctx=args.ctx, kv_dtype=args.kv_dtype, memory=args.memory,
               tokenizer=args.tokenizer, verify="never" if args.no_verify else "cached",
               activations=args.activations)
    if args.backend == "auto":  # once the model is in: a refused model is one line
        print(f"[backend: {llm.info.backend} ({llm.info.backend_reason})]", file=sys.stderr)
    ctx = llm.info.ctx
    s = llm.sampling(min(args.max_new_tokens, ctx // 2), seed=args.seed, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    engine = (llm.weights, llm.ops, llm.tokenizer, s, ctx, llm.cache)
    conv = Conversation(args.system)
    if args.prompt is not None:
        conv.turns.append({"role": "user", "content": args.prompt})
        answer(engine, conv, sys.stdout, Stats())
        return 0
    return interact(engine, conv)
