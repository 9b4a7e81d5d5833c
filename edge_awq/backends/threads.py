"""How the runtime's two thread pools share a few cores.

The numba kernels run on OpenMP workers; prefill's matrix products run on
OpenBLAS's own threads. Both pools are told to sleep when idle, so that on a
board with few cores one pool's spinning does not starve the other; OpenMP
workers first poll about 1000 times (GNU's ``GOMP_SPINCOUNT``), so that the
back-to-back parallel regions of a decode step find them awake. Other OpenMP
runtimes ignore the spin count and keep the passive policy. The measurements
behind these settings are in docs/cpu-kernels.md.
``configure`` sets these unless the user set them: OpenBLAS reads its setting
when numpy is first imported, OpenMP when numba first runs a parallel kernel,
so it is called before either (first thing in the CLI, and again when the
numba backend is imported).
"""

from __future__ import annotations

import os

DEFAULTS = {
    "OMP_WAIT_POLICY": "PASSIVE",  # OpenMP workers sleep between parallel regions ...
    "GOMP_SPINCOUNT": "1000",  # ... after a few microseconds of polling (GNU OpenMP)
    "OPENBLAS_THREAD_TIMEOUT": "4",  # OpenBLAS threads sleep after 2**4 cycles idle (its minimum)
}


def configure() -> dict[str, str]:
    """Set the thread-pool variables the user has not set; returns the values in force."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in DEFAULTS}
