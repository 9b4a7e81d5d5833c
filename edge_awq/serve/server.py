"""The HTTP side of ``edge-awq serve``: the listening socket, uvicorn told about systemd and the drain, and the
one log line per request (the journal's).

systemd's notify protocol: READY=1 once the model is loaded, warmed up and the socket listening;
WATCHDOG=1 while the engine's worker keeps stepping; STOPPING=1 on SIGTERM, then the requests in flight
get the drain timeout before they are cut short, and the process exits 0.
"""

from __future__ import annotations

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

from edge_awq.errors import InputError

log = logging.getLogger("edge_awq.serve")


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


def log_to_stderr() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("edge-awq serve: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class Server:
    """uvicorn's Server, told about systemd and the drain (built lazily: uvicorn imports only here)."""

    def __new__(cls, config, engine, drain_timeout: float):
        import uvicorn

        class _Uvicorn(uvicorn.Server):
            async def startup(self, sockets=None):
                await super().startup(sockets=sockets)
                if self.started:
                    from edge_awq.serve.sdnotify import notify

                    notify("READY=1", "STATUS=serving")
                    log.info("ready (pid %d)", os.getpid())
                    self._watchdog = asyncio.get_running_loop().create_task(feed_watchdog(engine))

            def handle_exit(self, sig, frame):
                # Not uvicorn's: it re-raises the signal after the shutdown, and the exit status
                # would be 143 instead of 0 for a clean stop.
                from edge_awq.serve.sdnotify import notify

                if not engine.draining:
                    notify("STOPPING=1", "STATUS=draining")
                    log.info("%s: draining (%d waiting; %.0fs at most)", signal.Signals(sig).name, engine.waiting,
                             drain_timeout)
                    engine.drain(drain_timeout)
                elif sig == signal.SIGINT:
                    self.force_exit = True
                self.should_exit = True

        return _Uvicorn(config)


async def feed_watchdog(engine) -> None:
    """WATCHDOG=1 at half the systemd timeout, only while the engine's worker is stepping."""
    from edge_awq.serve.sdnotify import notify, watchdog_seconds

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
