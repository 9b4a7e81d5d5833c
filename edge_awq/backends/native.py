"""The native library of the cuda backend: where it is installed and found, and its CMake build
(``edge-awq build-native`` runs it).

The library and its header are installed under one prefix (``--prefix``, by default
``$EDGE_AWQ_NATIVE`` or ``~/.local/share/edge-awq/native``): ``lib/libedge_awq_cuda.so`` and
``include/edge_awq_cuda.h``. The cuda backend loads them from there.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from edge_awq.errors import BackendUnavailable, InputError

log = logging.getLogger(__name__)

CUDA_LIB = "libedge_awq_cuda.so"
CPU_ARITH_LIB = "libedge_awq_arith_cpu.so"
ARCHITECTURES = ("87", "72", "75", "80", "86", "89", "90")  # 87: Orin (default); 72: Xavier (JetPack 5 toolkits)


def default_prefix() -> Path:
    env = os.environ.get("EDGE_AWQ_NATIVE")
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "edge-awq" / "native"


def source_root() -> Path:
    """The checkout that holds CMakeLists.txt and native/ (an editable install or a source tree)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "CMakeLists.txt").is_file() or not (root / "native" / "include").is_dir():
        raise InputError(f"the native sources are not next to the package ({root}): "
                         "run build-native from a source checkout of edge-awq, or pass --source DIR")
    return root


def _run(cmd: list[str], what: str) -> str:
    log.info("%s", " ".join(cmd))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise BackendUnavailable(f"{what} needs {cmd[0]}: install CMake 3.18+ (apt install cmake)") from None
    out = done.stdout + done.stderr
    if done.returncode != 0:
        tail = [ln for ln in out.splitlines() if "error" in ln.lower()] or out.splitlines()[-5:]
        raise BackendUnavailable(f"{what} failed: {' | '.join(tail[:3]).strip()} (full log: rerun with -v)")
    return out


def build(source: Path, build_dir: Path, prefix: Path | None, arch: str = "87", cuda: bool = True,
          cpu_arith: bool = False) -> str:
    """Configure, build and (with a prefix) install; returns the build log (ptxas's register report among it)."""
    if cuda and shutil.which("nvcc") is None and not os.environ.get("CUDACXX"):
        raise BackendUnavailable("building libedge_awq_cuda.so needs nvcc: install the CUDA toolkit "
                                 "(on a Jetson: JetPack's nvidia-jetpack), or put it on PATH")
    cfg = ["cmake", "-S", str(source), "-B", str(build_dir), f"-DEAWQ_CUDA={'ON' if cuda else 'OFF'}",
           f"-DEAWQ_CPU_ARITH={'ON' if cpu_arith else 'OFF'}", "-DCMAKE_BUILD_TYPE=Release"]
    if cuda:
        cfg.append(f"-DCMAKE_CUDA_ARCHITECTURES={arch}")
    if prefix is not None:
        cfg.append(f"-DCMAKE_INSTALL_PREFIX={prefix}")
    log_text = _run(cfg, "cmake configure")
    log_text += _run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2)], "the native build")
    if prefix is not None:
        log_text += _run(["cmake", "--install", str(build_dir)], "cmake install")
    return log_text
