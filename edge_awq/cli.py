"""The ``edge-awq`` command. Each subcommand's module (``edge_awq.commands.*``, and ``edge_awq.offline.export``)
is imported only when it runs, so ``edge-awq chat`` never loads torch."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from edge_awq import __version__
from edge_awq.backends import threads
from edge_awq.formats import atomic
from edge_awq.errors import DoesNotFit, EdgeAwqError

threads.configure()  # before numpy or numba start their thread pools

# name -> (module with add_arguments(p) and run(args) -> int, one-line help)
COMMANDS = {
    "eval": ("edge_awq.commands.eval", "perplexity of a model (or an .eawq file) on a text file"),
    "export": ("edge_awq.offline.export", "quantize a model with AWQ into one .eawq file (needs torch)"),
    "chat": ("edge_awq.commands.chat", "chat with a model in the terminal (or answer one --prompt)"),
    "bench": ("edge_awq.commands.bench", "speed and memory of a model on this machine"),
    "serve": ("edge_awq.commands.serve", "serve a model over an OpenAI-compatible HTTP API (for systemd)"),
    "plan": ("edge_awq.commands.plan", "will a model fit a device? memory plan before loading"),
    "inspect": ("edge_awq.commands.inspect", "print a model's metadata and tensors (.eawq file or Hugging Face directory)"),
    "convert": ("edge_awq.commands.convert", "a packed model between .eawq, AutoAWQ GEMM and compressed-tensors, integers untouched"),
    "verify": ("edge_awq.commands.verify", "check every checksum of an .eawq file"),
    "build-native": ("edge_awq.commands.build_native", "build the CUDA library of the cuda backend (needs nvcc and CMake)"),
}


def one_line(message: str) -> str:
    """A message as one line: line breaks and other control characters (from a user's value) escaped."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in message)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as for every other bad input
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _parser(chosen: str | None) -> argparse.ArgumentParser:
    parser = _Parser(prog="edge-awq", description="AWQ 4-bit LLaMA-family models for edge devices.")
    parser.add_argument("--version", action="version", version=f"edge-awq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = _parser(chosen)
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command != "serve":  # serve drains on SIGTERM; the others unwind, removing what they were writing
        atomic.terminate_on_signals()
    try:
        return args.run(args)
    except atomic.Terminated as t:
        print(f"edge-awq {args.command}: stopped by {t.name}; no half-written output is left", file=sys.stderr)
        return 128 + t.signum
    except EdgeAwqError as e:
        print(f"edge-awq {args.command}: error: {e if isinstance(e, DoesNotFit) else one_line(str(e))}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "torch":
            raise
        print(f"edge-awq {args.command}: error: needs torch: pip install 'edge-awq[offline]'", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (| head): not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"edge-awq {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:  # a signal between a temporary's creation and its writer's with-block: no __exit__ removed it
        atomic.remove_temporaries()


if __name__ == "__main__":
    sys.exit(main())
