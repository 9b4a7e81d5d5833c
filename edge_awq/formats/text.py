"""Text files users give (a text to score, a calibration text): UTF-8, not empty, or one line saying why."""

from __future__ import annotations

from pathlib import Path

from edge_awq.errors import InputError


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
