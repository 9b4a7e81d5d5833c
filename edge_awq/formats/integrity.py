"""Is an .eawq file what its writer wrote? Checksums of the header and of every tensor, checked once per machine.

Format version 2 stores an xxh3-128 digest of every tensor and one of the header itself (the
metadata and the tensor table, canonical JSON): a changed byte anywhere is found. xxh3 is not a
cryptographic hash — it guards against damage (a flipped bit on a flash card, a copy cut short),
not against an attacker — and it is fast enough that checking a file costs about what reading it
does (README "The .eawq file": measured against sha256 and BLAKE3). Version 1 files carry sha256
digests of their tensors and no header digest.

Checking every tensor reads the whole file, so ``check`` remembers a file it has checked, keyed
by its device, inode, size and modification time, under ``$XDG_CACHE_HOME/edge-awq/verified``
(``EDGE_AWQ_CACHE`` overrides): the next start of the same file is instant. A file changed in
place gets a new modification time and is checked again; a flip at rest does not, which is why
``serve`` checks in full at every start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from edge_awq.errors import FormatError

log = logging.getLogger(__name__)

HASH = "xxh3_128"
MODES = ("cached", "always", "never")


def digest(data) -> str:
    """xxh3-128 hex digest of bytes (or a contiguous array)."""
    import xxhash

    return xxhash.xxh3_128_hexdigest(memoryview(data).cast("B"))


def header_digest(metadata: dict, tensors: dict) -> str:
    """Digest of a header: the metadata (without the digest itself) and the tensor table, canonical JSON."""
    meta = {k: v for k, v in metadata.items() if k != "header_checksum"}
    canon = json.dumps({"__metadata__": meta, **tensors}, sort_keys=True, separators=(",", ":"))
    return digest(canon.encode())


def _tensor_digest(raw, algorithm: str) -> str:
    if algorithm == "sha256":
        return hashlib.sha256(memoryview(raw).cast("B")).hexdigest()
    return digest(raw)


def bad_tensors(src) -> list[str]:
    """Names of tensors whose bytes do not match their checksum, or that lack one (src: an EawqSource)."""
    bad = []
    for name in src.file.tensors:
        want = src.checksums.get(name)
        if want is None or _tensor_digest(src.file.raw(name), src.hash) != want:
            bad.append(name)
        src.file.release()  # a checked tensor's pages need not stay resident
    missing = sorted(set(src.checksums) - set(src.file.tensors))
    return bad + missing


def _cache_dir() -> Path:
    root = os.environ.get("EDGE_AWQ_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-awq"
    return Path(root) / "verified"


def _identity(path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def check(src, mode: str = "cached") -> bool:
    """Check every tensor of an .eawq source against its checksum, unless mode says otherwise.

    mode: "cached" (once per file identity on this machine), "always", or "never" (the caller
    takes the risk: ``--no-verify``). Raises FormatError naming the damaged tensors. Returns
    whether the tensors were read and checked now.
    """
    if mode not in MODES:
        raise ValueError(f"verify mode {mode!r}: one of {MODES}")
    if mode == "never" or not hasattr(src, "checksums"):  # only .eawq files carry checksums
        return False
    marker = _cache_dir() / _identity(src.path)
    if mode == "cached" and marker.is_file():
        return False
    bad = bad_tensors(src)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise FormatError(f"{src.path}: checksum mismatch in {', '.join(bad[:3])}{more}: the file is damaged; copy "
                          "or export it again")
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{src.path}\n")
    except OSError as e:  # a read-only home: check again next time rather than fail
        log.info("cannot remember that %s was checked (%s)", src.path, e.strerror)
    return True
