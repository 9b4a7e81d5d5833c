"""How the runtime's two thread pools share a few cores.

The numba kernels run on OpenMP workers; prefill's matrix products run on
OpenBLAS's own threads. Both pools busy-wait after finishing work, and on a
board with 2 to 8 cores each one's spinning starves the other: measured on
2 cores, a 128-token prefill of SmolLM2 took 6.5 s with the defaults and
0.73 s with waiting threads asleep. Sleeping at once has its own cost: a
one-token decode step runs some 150 short parallel regions back to back, and
waking a sleeping worker for each cost about 13 us of a 45 us GEMV (SmolLM2:
decode 75 tokens/s). GNU OpenMP's ``GOMP_SPINCOUNT`` (which takes precedence
over the wait policy) lets a worker spin for about 1000 polls, some
microseconds, before it sleeps: the next region of a decode step finds it
awake (88 tokens/s), while between prefill's regions it is asleep long before
OpenBLAS needs the core (prefill unchanged, measured in interleaved runs).
Other OpenMP runtimes ignore it and keep the passive policy.
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
