"""Outputs that appear whole or not at all: temporary names beside the target, stale ones swept, signals turned
into an exception that every writer's cleanup sees.

A writer (``format.EawqWriter``, ``hf_writer.HFDirWriter``) writes ``.NAME.tmp-PID`` beside NAME, fsyncs and
renames. Its ``__exit__`` removes the temporary on any exception, including ``Terminated``, which
``terminate_on_signals`` raises on SIGTERM and SIGHUP. A signal can also land where no ``__exit__`` runs: after
``open`` created the temporary but before the writer was built or its with-block entered. So every temporary name is
recorded by ``temporary`` before the file exists and forgotten by ``release`` once renamed or removed; the CLI calls
``remove_temporaries`` as it unwinds, which removes whatever is still recorded. A run killed outright (SIGKILL, power
loss) leaves its temporary behind; the next writer to the same NAME removes those whose process is gone
(``sweep_stale``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
from pathlib import Path

from edge_awq.errors import InputError

log = logging.getLogger(__name__)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind (removing temporaries) and exit with 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def _raise(signum, frame):
    raise Terminated(signum)


def terminate_on_signals() -> None:
    """SIGTERM and SIGHUP raise ``Terminated`` in the main thread (commands other than serve, which drains)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)


_pending: set[Path] = set()  # temporaries named by this process and not yet renamed or removed


def temporary(path: Path, suffix: str = "") -> Path:
    """This process's temporary name for path, recorded until ``release``: create it only after this returns."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    _pending.add(tmp)
    return tmp


def release(tmp: Path) -> None:
    """tmp was renamed into place or removed by its writer: nothing is left to clean up."""
    _pending.discard(tmp)


def remove(tmp: Path) -> None:
    """Remove a temporary (a file or a directory, if it exists) and forget it."""
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    release(tmp)


def remove_temporaries() -> None:
    """Remove every temporary still recorded (a run unwinding from a signal or an error)."""
    for tmp in list(_pending):
        remove(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale(path: Path) -> list[Path]:
    """Remove temporaries for path (``.NAME.tmp-PID``, a file or a directory) whose process is gone; returns them."""
    pattern = re.compile(rf"^\.+{re.escape(path.name)}\.tmp-(\d+)(\..*)?$")  # and temporaries of temporaries
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            remove(p)
            log.warning("removed %s, left by an earlier run that was stopped before it finished", p)
            removed.append(p)
    return removed


def check_output(path: Path, directory: bool) -> None:
    """Before any work: the parent exists and is writable, and path is not a directory (or, for a directory
    output, does not exist)."""
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"{path}: no such directory for the output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{path}: cannot write in {parent} (permission denied); choose another output path")
    if path.is_dir() or (directory and path.exists()):
        raise InputError(f"{path}: already exists as a {'directory' if path.is_dir() else 'file'}; remove it or "
                         "choose another output path")


def write_text(path: Path, text: str) -> None:
    """Write a small text file atomically: a temporary beside it, fsynced, renamed over it."""
    tmp = temporary(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        remove(tmp)
        raise write_error(path, e) from None
    release(tmp)


def write_error(path: Path, e: OSError) -> InputError:
    """The one line for a write that failed (a full disk, a file too large, an I/O error)."""
    return InputError(f"cannot write {path}: {e.strerror or e}; nothing was written (free space, or choose another "
                      "output path)")
