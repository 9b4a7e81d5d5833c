"""Which integer instructions this CPU has, decided once per process from what the CPU reports.

``ISA`` names the 8-bit-activation kernels' instruction set:

- ``avx512vnni``: ``vpdpbusd`` on 256-bit vectors (AVX-512 VNNI with VL: Zen 4 and 5, Ice Lake and later);
- ``avxvnni``: the same instruction VEX-encoded (AVX-VNNI: Alder Lake and later);
- ``avx2``: ``vpmaddubsw`` then ``vpmaddwd`` (any x86 with AVX2);
- ``i8mm``: the Armv8.6 int8 matrix multiply ``smmla`` for prompts (tiles of tokens), ``sdot`` for a decode step
  (Neoverse V1 and N2, Cortex-A710 and X2 and later: Graviton 3, Grace);
- ``sdot``: the Armv8.2 dot product (Cortex-A76 and A78AE: Raspberry Pi 5, Jetson Orin);
- ``neon``: widening multiplies on plain Armv8 NEON;
- ``none``: no integer kernels (the float ones run).

``EDGE_AWQ_ISA`` forces one the CPU also has (tests run each in turn); numba caches compiled kernels
by CPU, not by this choice, so a forced run wants its own ``NUMBA_CACHE_DIR``. On aarch64 under
emulation, where the CPU reports nothing, ``NUMBA_CPU_NAME`` and ``EDGE_AWQ_ISA`` say what to target.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ISAS = ("avx512vnni", "avxvnni", "avx2", "i8mm", "sdot", "neon", "none")
NEEDS = {"avx512vnni": ("avx512vnni", "avx512vl", "avx2"), "avxvnni": ("avxvnni", "avx2"), "avx2": ("avx2",),
         "i8mm": ("i8mm", "dotprod"), "sdot": ("dotprod",), "neon": ("neon",), "none": ()}


def cpu_features() -> dict[str, bool]:
    """The features LLVM sees on this CPU (its names: avx2, avx512vnni, dotprod, i8mm, ...)."""
    try:
        from llvmlite import binding

        return {k: bool(v) for k, v in binding.get_host_cpu_features().items()}
    except Exception:  # an unknown host: no integer kernels
        return {}


def target_cpu() -> str:
    """The CPU LLVM compiles numba's kernels for, by LLVM's name (znver4, emeraldrapids, neoverse-v1, ...):
    ``NUMBA_CPU_NAME`` where set, else the host's."""
    if os.environ.get("NUMBA_CPU_NAME"):
        return os.environ["NUMBA_CPU_NAME"]
    try:
        from llvmlite import binding

        return binding.get_host_cpu_name()
    except Exception:
        return "generic"


def detect(features: dict[str, bool], forced: str | None = None) -> str:
    """The best instruction set the features allow, or the forced one (which must be allowed, or be
    named for an emulated target: NUMBA_CPU_NAME set)."""
    if forced:
        if forced not in ISAS:
            raise ValueError(f"EDGE_AWQ_ISA={forced!r}: one of {', '.join(ISAS)}")
        if all(features.get(f) for f in NEEDS[forced]) or os.environ.get("NUMBA_CPU_NAME"):
            return forced
        log.warning("EDGE_AWQ_ISA=%s: this CPU lacks %s; choosing by what it has", forced,
                    ", ".join(f for f in NEEDS[forced] if not features.get(f)))
    for isa in ISAS:
        if all(features.get(f) for f in NEEDS[isa]):
            return isa
    return "none"


FEATURES = cpu_features()
ISA = detect(FEATURES, os.environ.get("EDGE_AWQ_ISA"))
X86 = ISA in ("avx512vnni", "avxvnni", "avx2")
ARM = ISA in ("i8mm", "sdot", "neon")
