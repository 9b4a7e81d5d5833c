"""``edge-awq eval``: perplexity of a model on a text file (protocol in ``perplexity.py``)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from edge_awq.commands import flags
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
    flags.add_activations(p)
    p.add_argument("--no-verify", action="store_true",
                   help="skip the check of an .eawq file's checksums (done once per file on this machine otherwise)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from edge_awq.api import load
    from edge_awq.formats.text import read_text

    text = read_text(args.text)
    llm = load(args.model, backend=args.backend, ctx=args.ctx, tokenizer=args.tokenizer, dtype="float32",
               verify="never" if args.no_verify else "cached", lazy="auto", activations=args.activations)
    if args.ctx > llm.info.args.max_seq_len:
        raise InputError(f"--ctx {args.ctx}: must be between 2 and the model's context of {llm.info.args.max_seq_len}")
    tokens = llm.tokenizer.encode(text)
    if args.max_tokens is not None:
        tokens = tokens[: args.max_tokens]
    if len(tokens) < 2:
        raise InputError(f"{args.text}: only {len(tokens)} token(s): at least 2 are needed to score one")
    console = Console(stderr=True)
    columns = (TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("windows"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("eval", total=None)
        res = llm.perplexity(tokens, args.ctx, on_window=lambda done, total: bar.update(task, completed=done, total=total))
    name = llm.info.backend
    if args.json:
        print(json.dumps({"model": str(args.model), "text": str(args.text), "backend": name, **res.to_dict()}))
    else:
        print(f"perplexity {res.perplexity:.4f} on {res.tokens_scored:,} tokens scored "
              f"({res.windows} windows of {args.ctx}), {res.tokens_per_s:,.1f} tokens/s [{name}]")
    return 0
