"""systemd's notify protocol (sd_notify): READY=1, WATCHDOG=1, STOPPING=1, STATUS=... on $NOTIFY_SOCKET.

No libsystemd: one datagram on a Unix socket, as systemd documents it. Outside systemd (no
NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send "KEY=VALUE" lines; True when a socket took them."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall("\n".join(fields).encode())
        return True
    except OSError as e:  # the service keeps serving; systemd will notice what it misses
        log.warning("sd_notify to %s failed: %s", path, e)
        return False


def watchdog_seconds() -> float | None:
    """The watchdog timeout systemd set for this process (WatchdogSec=), or None."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return int(usec) / 1e6 or None
    except ValueError:
        return None
