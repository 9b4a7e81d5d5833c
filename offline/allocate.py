"""Choose a format per decoder linear that minimises the summed error increase under a byte budget.

The problem is a multiple-choice knapsack: each linear takes exactly one of its candidate formats, a
format has a cost (its bytes, exact) and an error (its measured sensitivity), and the summed cost must not
exceed the budget. ``allocate`` solves it by dynamic programming over the budget cut into at most ``BINS``
steps: each linear's cost above its cheapest format is rounded *up* to whole steps, so any allocation the
program accepts fits the budget in exact bytes; what the rounding leaves unspent is then offered, exactly,
to the single changes that lower the error most per byte. Ties go to the cheaper format.
"""

from __future__ import annotations

import math

import numpy as np

BINS = 1 << 16


class Impossible(ValueError):
    """The budget is below the cheapest choice of every item."""

    def __init__(self, need: int, budget: int):
        super().__init__(f"needs at least {need:,} bytes, the budget is {budget:,}")
        self.need, self.budget = need, budget


def allocate(costs: list[list[int]], errors: list[list[float]], budget: int, bins: int = BINS) -> list[int]:
    """The chosen choice index per item: sum of costs <= budget, sum of errors minimal (up to the steps).

    costs[i][j], errors[i][j]: item i's choice j. Raises ``Impossible`` when even the cheapest choices exceed
    the budget.
    """
    c = [np.asarray(ci, dtype=np.int64) for ci in costs]
    e = [np.asarray(ei, dtype=np.float64) for ei in errors]
    base = sum(int(ci.min()) for ci in c)
    if base > budget:
        raise Impossible(base, budget)
    spare = budget - base
    extra = [ci - ci.min() for ci in c]
    step = max(1, math.ceil(spare / bins)) if spare else 1
    n_steps = spare // step
    steps = [-(-x // step) for x in extra]  # rounded up: the program's totals bound the exact ones
    best = np.zeros(n_steps + 1)  # best[b]: least error of the items so far within b steps
    choice = np.zeros((len(c), n_steps + 1), dtype=np.int16)
    for i in range(len(c)):
        order = np.lexsort((e[i], c[i]))  # cheapest first, so that on equal error the cheaper stays
        new = np.full(n_steps + 1, np.inf)
        for j in order:
            k = int(steps[i][j])
            if k > n_steps:
                continue
            cand = np.full(n_steps + 1, np.inf)
            cand[k:] = best[: n_steps + 1 - k] + e[i][j]
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = j
        best = new
    picked, b = [0] * len(c), n_steps
    for i in reversed(range(len(c))):
        picked[i] = int(choice[i, b])
        b -= int(steps[i][picked[i]])
    return _spend_rest(picked, c, e, budget)


def _spend_rest(picked: list[int], c, e, budget: int) -> list[int]:
    """Offer what the rounding left unspent to single changes that lower the error, best per byte first."""
    used = sum(int(c[i][j]) for i, j in enumerate(picked))
    while True:
        best = None
        for i, j in enumerate(picked):
            gain = e[i][j] - e[i]
            more = c[i] - c[i][j]
            ok = (gain > 0) & (more <= budget - used)
            for k in np.flatnonzero(ok):
                score = gain[k] / max(int(more[k]), 1)
                if best is None or score > best[0]:
                    best = (score, i, int(k))
        if best is None:
            return picked
        _, i, k = best
        used += int(c[i][k] - c[i][picked[i]])
        picked[i] = k
