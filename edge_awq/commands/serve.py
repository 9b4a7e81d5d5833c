"""``edge-awq serve``: the model behind an OpenAI-compatible HTTP API, made to run under systemd.

Starlette on uvicorn (``edge_awq.serve``). One model, opened by ``edge_awq.load`` with every checksum
checked; requests wait in a bounded queue (503 with Retry-After when it is full) and run one at a
time on the engine. READY, WATCHDOG and STOPPING go to systemd (``serve/server.py``); one log line per
request goes to stderr (the journal).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from edge_awq.commands import flags
from edge_awq.errors import InputError

log = logging.getLogger("edge_awq.serve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=".eawq file (or any model edge-awq reads)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=flags.port, default=8000)
    p.add_argument("--unix-socket", type=Path, default=None, help="listen on this Unix socket instead of TCP")
    p.add_argument("--api-key-file", type=Path, default=None,
                   help="file holding the bearer token clients must send (required off loopback)")
    p.add_argument("--model-name", default=None, help="the model's id in the API (default: the file's stem)")
    p.add_argument("--backend", default="auto", help="cuda, numba, reference or auto (default)")
    p.add_argument("--ctx", type=flags.context, default=2048, help="context length: prompt + answer (default 2048)")
    p.add_argument("--max-prompt-tokens", type=flags.positive, default=None,
                   help="longest prompt taken (default ctx - 16)")
    p.add_argument("--max-new-tokens", type=flags.positive, default=1024, help="most new tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=flags.positive, default=256,
                   help="new tokens when a request does not say")
    p.add_argument("--queue-size", type=flags.int_range(0, 1 << 16, "the queue size"), default=8,
                   help="requests waiting beyond the one running (default 8)")
    p.add_argument("--max-body-bytes", type=flags.int_range(1024, 1 << 30, "the body limit"), default=1 << 20,
                   help="largest request body (default 1 MiB)")
    p.add_argument("--drain-timeout", type=flags.seconds, default=30.0,
                   help="seconds requests in flight get to finish after SIGTERM (default 30)")
    flags.add_activations(p)
    p.add_argument("--memory", type=flags.size, default=None,
                   help="memory the model may use, e.g. 2GiB (default: what is free)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from edge_awq.api import load
    from edge_awq.serve.app import Settings, create_app
    from edge_awq.serve.engine import Engine
    from edge_awq.serve.openai_api import Limits
    from edge_awq.serve.server import Server, listen_socket, log_to_stderr, read_api_key

    log_to_stderr()
    key = read_api_key(args.api_key_file, args.host, args.unix_socket)
    sock = listen_socket(args.host, args.port, args.unix_socket)  # a taken port: one line, before the model loads
    if args.ctx < 32:
        raise InputError(f"--ctx {args.ctx}: too small to serve (at least 32)")
    llm = load(args.model, backend=args.backend, ctx=args.ctx, memory=args.memory, activations=args.activations,
               verify="always")  # a box nobody watches: every start, before READY (a flip at rest keeps mtime)
    log.info("backend %s (%s)", llm.info.backend, llm.info.backend_reason)
    engine = Engine(llm, max(args.queue_size, 1))
    engine.warm_up()
    name = args.model_name or Path(args.model).stem
    max_prompt = min(args.max_prompt_tokens or engine.ctx - 16, engine.ctx - 1)
    s = llm.sampling()  # what a request that leaves a field out gets: the model's, else the stated defaults
    limits = Limits(engine.ctx, max_prompt, args.max_new_tokens, min(args.default_max_tokens, args.max_new_tokens),
                    max_prompt * llm.tokenizer.max_token_bytes,
                    {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                     "repetition_penalty": s.repetition_penalty})
    app = create_app(engine, Settings(name, key, limits, args.max_body_bytes))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=args.drain_timeout + 5, timeout_keep_alive=5)
    server = Server(config, engine, args.drain_timeout)
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        if args.unix_socket is not None and args.unix_socket.exists():
            args.unix_socket.unlink()
    log.info("stopped")
    return 0
