"""Choose a format per decoder linear that minimises the summed error increase under a byte budget.

The problem is a multiple-choice knapsack: each linear takes exactly one of its candidate formats, a
format has a cost (its bytes, exact) and an error (its measured sensitivity), and the summed cost must not
exceed the budget. ``allocate`` solves it by dynamic programming over the budget cut into at most ``BINS``
steps: each linear's cost above its cheapest format is rounded *up* to whole steps, so any allocation the
program accepts fits the budget in exact bytes; what the rounding leaves unspent is then offered, exactly,
to the single changes that lower the error most per byte. Ties go to the cheaper format.

Where a choice also needs code the runtime compiles once for all the items that use it (a tile variant of
the integer kernels: ``mixed.tile_variant``), ``allocate_with_kernels`` charges each kind beyond the first
once, by solving the knapsack for every set of kinds with their bytes taken from the budget.
"""

from __future__ import annotations

import itertools
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


def allocate_with_kernels(costs: list[list[int]], errors: list[list[float]], kinds: list[list], budget: int,
                          kind_cost: int, bins: int = BINS) -> list[int]:
    """``allocate`` where choice j of item i also needs the kind ``kinds[i][j]`` (None: nothing), and every kind
    the chosen choices need beyond the first costs ``kind_cost`` bytes once. Exact (up to the steps): each
    set of kinds that leaves every item a choice is solved with its extra kinds' bytes taken from the
    budget, and the least summed error wins; on equal error, the fewer kinds."""
    universe = sorted({k for ks in kinds for k in ks if k is not None})
    best, need = None, None
    for r in range(len(universe) + 1):
        for subset in itertools.combinations(universe, r):
            allowed = set(subset) | {None}
            index = [[j for j, k in enumerate(ks) if k in allowed] for ks in kinds]
            if not all(index):
                continue
            extra = max(r - 1, 0) * kind_cost
            try:
                sub = allocate([[costs[i][j] for j in ix] for i, ix in enumerate(index)],
                               [[errors[i][j] for j in ix] for i, ix in enumerate(index)], budget - extra, bins)
            except Impossible as e:
                need = e.need + extra if need is None else min(need, e.need + extra)
                continue
            picked = [ix[j] for ix, j in zip(index, sub)]
            err = sum(errors[i][j] for i, j in enumerate(picked))
            if best is None or err < best[0]:
                best = (err, picked)
    if best is None:
        raise Impossible(need if need is not None else 0, budget)
    return best[1]
