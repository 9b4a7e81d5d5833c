"""``edge-awq serve``: the model behind an OpenAI-compatible HTTP API, made to run under systemd.

Starlette on uvicorn. One model, loaded once; requests wait in a bounded queue (503 with
Retry-After when it is full) and run one at a time on the engine (``engine.py``). systemd's
notify protocol: READY=1 once the model is loaded, a warm-up token generated and the socket
listening; WATCHDOG=1 while the engine's worker keeps stepping; STOPPING=1 on SIGTERM, then the
requests in flight get ``--drain-timeout`` seconds before they are cut short, and the process
exits 0. One log line per request on stderr (the journal).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import signal
import socket
import stat
import time
from pathlib import Path

from edge_awq import flags
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
    p.add_argument("--memory", type=flags.size, default=None,
                   help="memory the model may use, e.g. 2GiB (default: what is free)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(path: Path | None, host: str, unix_socket: Path | None) -> str | None:
    """The bearer token, or None on loopback without one; refuses to listen beyond loopback without it."""
    if path is None:
        if unix_socket is None and not is_loopback(host):
            raise InputError(f"--host {host} listens beyond this machine: give --api-key-file FILE (a bearer "
                             "token clients must send), or keep the default --host 127.0.0.1")
        return None
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise InputError(f"--api-key-file {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"--api-key-file {path}: not UTF-8 text; write the key as one line of text") from None
    if len(key) < 16 or any(c.isspace() for c in key):
        raise InputError(f"--api-key-file {path}: the key must be one line of at least 16 characters")
    return key


def listen_socket(host: str, port: int, unix_socket: Path | None) -> socket.socket:
    """Bind before loading the model, so that a taken port is one clear line, not a traceback later."""
    if unix_socket is not None:
        if unix_socket.exists():
            if not stat.S_ISSOCK(unix_socket.stat().st_mode):
                raise InputError(f"--unix-socket {unix_socket}: exists and is not a socket")
            unix_socket.unlink()  # a stale socket of an earlier run
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        where = str(unix_socket)
    else:
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        where = f"{host}:{port}"
    try:
        s.bind(str(unix_socket) if unix_socket is not None else (host, port))
        s.listen(128)
    except OSError as e:
        s.close()
        raise InputError(f"cannot listen on {where}: {e.strerror} (another server on it? pick another --port)") from None
    s.set_inheritable(True)
    return s


def _load(args):
    """(engine, model name): the model checked against memory, loaded once, warmed up."""
    from edge_awq import integrity
    from edge_awq.engine import Engine
    from edge_awq.load import load_weights, open_source
    from edge_awq.ops import pick_backend
    from edge_awq.plan import check_fits

    src = open_source(args.model)
    integrity.check(src, "always")  # a box nobody watches: every start, before READY (a flip at rest keeps mtime)
    ctx = min(args.ctx, src.args.max_seq_len)
    if ctx < 32:
        raise InputError(f"--ctx {args.ctx}: too small to serve (at least 32)")
    check_fits(src, str(args.model), ctx, args.memory)
    ops, why = pick_backend(args.backend)
    log.info("backend %s (%s)", ops.name, why)
    w = ops.prepare(load_weights(src, dtype=None))
    engine = Engine(w, ops, src.tokenizer(), ctx, max(args.queue_size, 1))
    engine.warm_up()
    return engine, args.model_name or Path(args.model).stem


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from edge_awq.openai_api import Limits
    from edge_awq.serve_app import Settings, create_app

    _log_to_stderr()
    key = read_api_key(args.api_key_file, args.host, args.unix_socket)
    sock = listen_socket(args.host, args.port, args.unix_socket)
    engine, name = _load(args)
    max_prompt = min(args.max_prompt_tokens or engine.ctx - 16, engine.ctx - 1)
    limits = Limits(engine.ctx, max_prompt, args.max_new_tokens, min(args.default_max_tokens, args.max_new_tokens),
                    max_prompt * engine.tokenizer.max_token_bytes)
    app = create_app(engine, Settings(name, key, limits, args.max_body_bytes))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=args.drain_timeout + 5, timeout_keep_alive=5)
    server = _Server(config, engine, args.drain_timeout)
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        if args.unix_socket is not None and args.unix_socket.exists():
            args.unix_socket.unlink()
    log.info("stopped")
    return 0


def _log_to_stderr() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("edge-awq serve: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class _Server:
    """uvicorn's Server, told about systemd and the drain (built lazily: uvicorn imports only here)."""

    def __new__(cls, config, engine, drain_timeout: float):
        import uvicorn

        class Server(uvicorn.Server):
            async def startup(self, sockets=None):
                await super().startup(sockets=sockets)
                if self.started:
                    from edge_awq.sdnotify import notify

                    notify("READY=1", "STATUS=serving")
                    log.info("ready (pid %d)", os.getpid())
                    self._watchdog = asyncio.get_running_loop().create_task(_feed_watchdog(engine))

            def handle_exit(self, sig, frame):
                # Not uvicorn's: it re-raises the signal after the shutdown, and the exit status
                # would be 143 instead of 0 for a clean stop.
                from edge_awq.sdnotify import notify

                if not engine.draining:
                    notify("STOPPING=1", "STATUS=draining")
                    log.info("%s: draining (%d waiting; %.0fs at most)", signal.Signals(sig).name, engine.waiting,
                             drain_timeout)
                    engine.drain(drain_timeout)
                elif sig == signal.SIGINT:
                    self.force_exit = True
                self.should_exit = True

        return Server(config)


async def _feed_watchdog(engine) -> None:
    """WATCHDOG=1 at half the systemd timeout, only while the engine's worker is stepping."""
    from edge_awq.sdnotify import notify, watchdog_seconds

    timeout = watchdog_seconds()
    if not timeout:
        return
    while True:
        await asyncio.sleep(timeout / 2)
        if engine.alive(within=timeout):
            notify("WATCHDOG=1")
        else:
            log.warning("the engine has not stepped for %.0fs: no watchdog ping (systemd will restart us)", timeout)


def request_log(job_id: str, path: str, status: int, n_in: int, n_out: int, t0: float, first: float | None,
                started: float | None = None) -> None:
    """One line per request: time to first token from arrival, and of it the time spent queued."""
    ttft = f"{first - t0:.3f}s" if first else "-"
    queued = f"{started - t0:.3f}s" if started else "-"
    log.info("%s %s %d in=%d out=%d ttft=%s queued=%s total=%.3fs", job_id, path, status, n_in, n_out, ttft, queued,
             time.monotonic() - t0)


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
