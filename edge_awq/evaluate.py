"""``edge-awq eval``: perplexity of a model on a text file (protocol in ``perplexity.py``)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from edge_awq import flags, integrity
from edge_awq.errors import InputError

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face directory, .gguf file or llama2.c .bin")
    p.add_argument("--text", required=True, type=Path, help="UTF-8 text file to score")
    p.add_argument("--ctx", type=flags.context, default=512, help="window length in tokens (default 512)")
    p.add_argument("--max-tokens", type=flags.int_range(2, what="--max-tokens (two tokens score one)"), default=None,
                   help="score only the first N tokens of the text")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer file for a llama2.c checkpoint")
    p.add_argument("--backend", default="reference", help="compute backend (default: reference)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the check of an .eawq file's checksums (done once per file on this machine otherwise)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such text file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None
    if not text.strip():
        raise InputError(f"{path}: the text is empty: give a file with text to score")
    return text


def _should_stream(args_bytes: int) -> bool:
    """Keep layers on disk when float32 weights would take over half the available memory."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return False
    return args_bytes > avail // 2


def _tokens(src, args, text: str):
    tokens = src.tokenizer().encode(text)
    if args.max_tokens is not None:
        if args.max_tokens < 2:
            raise InputError(f"--max-tokens {args.max_tokens}: at least 2 tokens are needed to score one")
        tokens = tokens[: args.max_tokens]
    if len(tokens) < 2:
        raise InputError(f"{args.text}: only {len(tokens)} token(s): at least 2 are needed to score one")
    return tokens


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from edge_awq.load import load_weights, open_source
    from edge_awq.ops import select_backend
    from edge_awq.perplexity import perplexity

    text = read_text(args.text)
    src = open_source(args.model, args.tokenizer)
    integrity.check(src, "never" if args.no_verify else "cached")  # damaged files never answer
    a = src.args
    if not 2 <= args.ctx <= a.max_seq_len:
        raise InputError(f"--ctx {args.ctx}: must be between 2 and the model's context of {a.max_seq_len}")
    ops = select_backend(args.backend)
    tokens = _tokens(src, args, text)
    weights = ops.prepare(load_weights(src, lazy=_should_stream(4 * a.n_params)))
    console = Console(stderr=True)
    columns = (TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("windows"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("eval", total=None)
        res = perplexity(weights, ops, tokens, args.ctx, lambda done, total: bar.update(task, completed=done, total=total))
    if args.json:
        print(json.dumps({"model": str(args.model), "text": str(args.text), "backend": ops.name, **res.to_dict()}))
    else:
        print(
            f"perplexity {res.perplexity:.4f} on {res.tokens_scored:,} tokens scored "
            f"({res.windows} windows of {args.ctx}), {res.tokens_per_s:,.1f} tokens/s [{ops.name}]"
        )
    return 0
