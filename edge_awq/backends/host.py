"""What this machine's CPU is, for the figures that depend on it: its name and the size of its
last-level cache (``bench`` sizes its cold working sets from it, and names the CPU beside every figure).

Read from Linux's ``/proc/cpuinfo`` and ``/sys/devices/system/cpu``; elsewhere the name is
``platform.processor()`` and the cache size is unknown (``None``).
"""

from __future__ import annotations

import platform
from pathlib import Path

CPU_SYSFS = Path("/sys/devices/system/cpu/cpu0/cache")


def cpu_info(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        first = path.read_text(errors="replace").split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines()) if v}


def cpu_name() -> str:
    """The CPU's model name, with its family and model numbers where the kernel gives them (x86), or
    its implementer and part (ARM)."""
    info = cpu_info()
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info:
        return f"{name} (family {info['cpu family']}, model {info.get('model', '?')})"
    if "CPU part" in info:
        return f"{name} (implementer {info.get('CPU implementer', '?')}, part {info['CPU part']})"
    return name


def _size(text: str) -> int:
    """sysfs cache sizes: "32768K", "1M"."""
    text = text.strip().upper()
    unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * unit


def last_level_cache(root: Path = CPU_SYSFS) -> int | None:
    """Bytes of the largest-level data or unified cache cpu0 sees (an L3 on most x86 and ARM servers,
    the shared L2 or L3 on ARM boards), or None when the system does not say."""
    best: tuple[int, int] | None = None
    for index in sorted(root.glob("index*")):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level, size = int((index / "level").read_text()), _size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if best is None or (level, size) > best:
            best = (level, size)
    return best[1] if best else None
