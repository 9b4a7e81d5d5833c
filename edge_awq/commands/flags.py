"""Typed, range-checked converters for the command-line flags (``type=`` of argparse).

A value out of range is an ``argparse.ArgumentTypeError``: the parser prints it as one line naming
the flag and exits with code 2, before any work starts.
"""

from __future__ import annotations

import argparse
import math


def _int(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def int_range(lo: int, hi: int | None = None, what: str = ""):
    """An integer in [lo, hi]."""

    def convert(text: str) -> int:
        v = _int(text)
        if v < lo or (hi is not None and v > hi):
            shown = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
            raise argparse.ArgumentTypeError(f"{v} is out of range: {what or 'the value'} must be {shown}")
        return v

    convert.__name__ = "integer"
    return convert


def float_range(lo: float, hi: float | None = None, lo_open: bool = False, what: str = ""):
    """A finite number in [lo, hi] (or (lo, hi] with lo_open)."""

    def convert(text: str) -> float:
        v = _float(text)
        if v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
            lo_s = f"{'above' if lo_open else 'at least'} {lo:g}"
            shown = lo_s if hi is None else f"{lo_s} and at most {hi:g}"
            raise argparse.ArgumentTypeError(f"{v:g} is out of range: {what or 'the value'} must be {shown}")
        return v

    convert.__name__ = "number"
    return convert


positive = int_range(1)
port = int_range(1, 65535, "a TCP port")
seed = int_range(0, 2**63 - 1, "a seed")
context = int_range(2, 1 << 24, "a context length")
temperature = float_range(0.0, 100.0, what="temperature (0: greedy)")
top_p = float_range(0.0, 1.0, lo_open=True, what="top-p")
top_k = int_range(0, 1 << 24, "top-k (0: off)")
repetition_penalty = float_range(0.0, 100.0, lo_open=True, what="the repetition penalty (1: off)")
seconds = float_range(0.0, 86400.0, what="a time in seconds")
bits_per_weight = float_range(0.0, 32.0, lo_open=True, what="--budget (bits per decoder weight)")


def group_size(text: str) -> int | str:
    """A positive group size, "auto" or "channel"."""
    if text in ("auto", "channel"):
        return text
    return int_range(1, 1 << 20, "a group size (or auto, or channel)")(text)


def size(text: str) -> str:
    """A memory size as text, checked now (``plan.parse_size``; the commands parse it again where they use it)."""
    from edge_awq.errors import InputError
    from edge_awq.plan import parse_size

    try:
        parse_size(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--memory ")) from None
    return text


def add_activations(p) -> None:
    """``--activations``: how the CPU backends' packed linears take their inputs."""
    p.add_argument("--activations", choices=("auto", "int8", "int16"), default="auto",
                   help="the CPU's packed linears: int8 (integer dot products), int16, "
                        "or auto (the measured default, README 'Speed')")
