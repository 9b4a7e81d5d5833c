"""AWQ's scale search: per group of linears sharing an input, the per-channel scale s that
minimises the error of the judged sub-block when its weights become Q(W·s)/s.

The chosen s is then folded: 1/s into the previous norm or linear's output rows,
s into the linears' input columns, so inference pays nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edge_awq.model import Dense, LayerWeights, ScaleGroup

from edge_awq.offline.fake_quant import fake_quantize
from edge_awq.offline.heap import trim


@dataclass(frozen=True)
class ScaleResult:
    """Plain data of one group's search, dumpable and reusable."""

    prev: str
    linears: tuple[str, ...]
    ratio: float  # the chosen α
    loss: float  # MSE of the judged output at α
    loss_unscaled: float | None  # MSE with s = 1 (plain rounding); None where the bounded search stopped it early
    scales: list[float]


def activation_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean |x| per input channel of x (..., in) -> (in,)."""
    return x.abs().reshape(-1, x.shape[-1]).float().mean(0)


def weight_mean(weights: list[torch.Tensor], group_size: int | list[int]) -> torch.Tensor:
    """Duo scaling's weight statistic: |w| relative to its group's max, averaged over rows -> (in,).
    group_size: one for all weights, or each weight's own (a mixed-precision layer)."""
    sizes = group_size if isinstance(group_size, list) else [group_size] * len(weights)
    if len(set(sizes)) == 1:
        w = torch.cat(weights, dim=0)  # (sum out, in)
        g = w.abs().reshape(-1, sizes[0])
        return (g / (g.amax(dim=1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)
    rel = []
    for w, gs in zip(weights, sizes):
        g = w.abs().reshape(-1, gs)
        rel.append((g / (g.amax(dim=1, keepdim=True) + 1e-6)).reshape(w.shape))
    return torch.cat(rel).mean(0)


def candidate_scales(x_mean, w_mean, ratio: float) -> torch.Tensor:
    """s = x̄^α (or x̄^α / w̄^(1-α) with duo scaling), normalised so that max·min = 1."""
    s = x_mean.pow(ratio) if w_mean is None else x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_trial(lw: LayerWeights, names: tuple[str, ...], s: torch.Tensor, bits: int, group_size: int,
                 formats: dict | None = None, scratch: dict | None = None) -> LayerWeights:
    """lw with each named linear's weight replaced by Q(W·s)/s; formats: name -> its own ``LinearFormat``
    (a mixed-precision layer), else every one at bits and group_size.

    scratch: a dict the caller keeps from one trial to the next. Each linear's W·s is then written into the
    same buffer every time (``scaled_into``) and rounded there: the returned trial's weight is that buffer,
    valid until the next trial made with the same scratch. Without it every trial's W·s is a fresh
    allocation, which glibc maps and unmaps once it is over 32 MB: at 8B width 235 MB a linear whose pages
    the kernel zeroes and faults in, candidate after candidate."""
    trial = {}
    for n in names:
        d = getattr(lw, n)
        b, gs = (formats[n].bits, formats[n].group_size) if formats else (bits, group_size)
        # W·s is a tensor of the trial's own: rounded and divided in place (no second copy of a large linear)
        scaled = d.weight * s if scratch is None else scaled_into(scratch, n, d.weight, s)
        trial[n] = Dense(fake_quantize(scaled, b, gs, in_place=True).div_(s), d.bias)
    return dataclasses.replace(lw, **trial)


def scaled_into(scratch: dict, name, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """w·s in scratch[name], a float32 buffer of w's shape made on first use: the same product as ``w * s``
    (``torch.mul`` with ``out=``), whatever w's layout (the sensitivity pass searches on every k-th row of a
    linear, a view)."""
    buf = scratch.get(name)
    if buf is None or buf.shape != w.shape:
        buf = scratch[name] = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    return torch.mul(w, s, out=buf)


def output_error(judge: Callable[[LayerWeights], torch.Tensor], reference: torch.Tensor) -> Callable[[LayerWeights], float]:
    """The direct loss: the mean squared difference of the judged sub-block's output from the reference.

    The judged output is a fresh tensor, so the difference and its square are taken in place (the same
    arithmetic, in the same order, as ``(y - reference).pow(2).mean()``, without two more temporaries).
    """

    def loss(trial: LayerWeights) -> float:
        d = judge(trial).sub_(reference)
        return float(d.mul_(d).mean())

    return loss


class ChunkedError:
    """The judged sub-block's error as a sum over chunks of calibration blocks, so that a search can bound it.

    judges[i](trial) is the judged output on chunk i (the sub-block run on those blocks alone: attention never
    crosses a block). A chunk's value is its sum of squared differences from the reference, in float64; the
    loss is their exactly rounded sum (``math.fsum``, whatever order the chunks came in) over the number of
    values, the same mean squared error as ``output_error`` up to float32 rounding. Each partial sum is a lower
    bound of the whole: ``search_scales`` stops a candidate as soon as its partial sum passes the best total.
    Running a chunk at a time also keeps the sub-block's temporaries to one chunk's size.
    """

    def __init__(self, judges: list[Callable[[LayerWeights], torch.Tensor]], reference: LayerWeights,
                 outputs: list[torch.Tensor] | None = None):
        """outputs: each chunk's judged output of reference where the caller has it already (made by the same
        arithmetic: ``layerwise.record_inputs`` ran the same sub-blocks on the same chunks), else computed."""
        self.judges = judges
        self.references = outputs if outputs is not None else [judge(reference) for judge in judges]
        self.n_values = sum(r.numel() for r in self.references)
        self.evaluated = 0  # chunks run so far (the bounded search's work, for the tests and the profile)

    @property
    def n_chunks(self) -> int:
        return len(self.judges)

    def chunk(self, trial: LayerWeights, i: int) -> float:
        self.evaluated += 1
        d = self.judges[i](trial).sub_(self.references[i])
        return float(d.mul_(d).sum(dtype=torch.float64))

    def total(self, chunks: list[float]) -> float:
        return math.fsum(chunks) / self.n_values

    def __call__(self, trial: LayerWeights) -> float:
        return self.total([self.chunk(trial, i) for i in range(self.n_chunks)])


def gram(x: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """XᵀX in float64 of x (..., in), accumulated over blocks of rows (in, in)."""
    flat = x.reshape(-1, x.shape[-1])
    g = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=x.device)
    for r in range(0, flat.shape[0], rows):
        xc = flat[r : r + rows].double()
        g.addmm_(xc.T, xc)
    return g


def linear_error(names: tuple[str, ...], lw: LayerWeights, x_in: torch.Tensor,
                 dtype: torch.dtype = torch.float64) -> Callable[[LayerWeights], float]:
    """The loss of a group judged on its linears alone, from one Gram matrix instead of a pass over the tokens.

    The judged output is x·Wᵀ for each linear (biases cancel), so a trial's error is
    ‖x·Dᵀ‖² / (N·out) = tr(D·XᵀX·Dᵀ) / (N·out) with D = W_trial − W: per candidate a product of
    (out, in) by (in, in), not (N, in) by (in, out). Computed in float64 (more exact than the float32
    difference of two products it replaces; tests hold the two to each other and to the same choices), or
    in dtype (the sensitivity pass's float32: twice as fast, and a ranking of formats needs no more).
    """
    g = gram(x_in).to(dtype)
    n_tokens = x_in.numel() // x_in.shape[-1]
    w = torch.cat([getattr(lw, n).weight for n in names]).to(dtype)

    def loss(trial: LayerWeights) -> float:
        d = torch.cat([getattr(trial, n).weight for n in names]).to(dtype).sub_(w)
        return float((d @ g).mul_(d).sum() / (n_tokens * d.shape[0]))

    return loss


def search_scales(
    group: ScaleGroup, lw: LayerWeights, x_in: torch.Tensor, loss: Callable[[LayerWeights], float],
    bits: int, group_size: int, n_grid: int = 20, duo: bool = False, formats: dict | None = None,
    refine: tuple[Callable[[LayerWeights], float], int] | None = None,
) -> ScaleResult:
    """Grid-search α for one group. x_in (..., in) is the linears' (shared) input; loss(trial layer) its judged
    output's error (``output_error``, ``linear_error``, or a ``ChunkedError``: then the bounded search of
    ``_least_chunked``, which finds the same α without finishing every candidate); formats: each linear's own
    (``scaled_trial``). The least loss wins; of equal ones, the smallest α.

    refine: (final loss, k), a screened search: loss only ranks the candidates (an approximation: a subset of
    the calibration blocks, bfloat16), and the k it ranks best are judged again by the final loss (every block,
    float32), which chooses among them. The result's losses are the final ones (inf for those not refined)."""
    x_mean = activation_mean(x_in)
    sizes = [formats[n].group_size for n in group.linears] if formats else group_size
    w_mean = weight_mean([getattr(lw, n).weight for n in group.linears], sizes) if duo else None
    scales = [candidate_scales(x_mean, w_mean, i / n_grid) for i in range(n_grid)]

    scratch: dict = {}  # one trial at a time: each reuses the last one's buffers (``scaled_trial``)

    def trial(s: torch.Tensor) -> LayerWeights:
        return scaled_trial(lw, group.linears, s, bits, group_size, formats, scratch)

    trials = [lambda s=s: trial(s) for s in scales]
    if refine is None:
        losses = _losses(loss, trials)
    else:
        final, k = refine
        screened = _losses(loss, trials, keep=k)
        top = sorted(range(n_grid), key=lambda i: (screened[i], i))[:k]
        losses = [math.inf] * n_grid
        for i, value in zip(top, _losses(final, [trials[i] for i in top])):
            losses[i] = value
        loss = final
    best = min(range(n_grid), key=lambda i: (losses[i], i))
    if w_mean is None:
        unscaled = losses[0]  # α = 0 is s = 1
    else:
        unscaled = loss(trial(torch.ones_like(x_mean)))
    unscaled = None if math.isinf(unscaled) else unscaled
    return ScaleResult(group.prev, group.linears, best / n_grid, losses[best], unscaled, scales[best].tolist())


def _losses(loss: Callable[[LayerWeights], float], trials: list[Callable[[], LayerWeights]],
            keep: int = 1) -> list[float]:
    """Each trial's loss; with a ``ChunkedError`` of several chunks, inf for those proved not among the keep
    least (``_least_chunked``)."""
    if isinstance(loss, ChunkedError) and loss.n_chunks > 1:
        return _least_chunked(loss, trials, keep)
    losses = []
    for make in trials:
        losses.append(loss(make()))
        trim()  # the trial's temporaries go back to the system before the next (heap.py)
    return losses


def _least_chunked(loss: ChunkedError, trials: list[Callable[[], LayerWeights]], keep: int = 1) -> list[float]:
    """Each candidate's loss, or inf for one proved not to be among the keep least: a branch and bound over
    chunks.

    Every candidate runs on the first chunk; then, in the order of that first value, each runs on the rest
    until its partial sum passes the keep-th least complete total so far. A chunk's value is a sum of squares
    (never negative), and an exactly rounded sum of fewer of them is never above that of all of them: a
    stopped candidate's loss is above keep others, so the keep least totals, and their α, are those of running
    every candidate on every chunk. What it saves depends on how far the candidates' losses lie from the least.
    """
    first = []
    for make in trials:
        first.append(loss.chunk(make(), 0))
        trim()
    losses = [math.inf] * len(trials)
    done: list[float] = []
    for c in sorted(range(len(trials)), key=lambda c: (first[c], c)):
        bound = sorted(done)[keep - 1] if len(done) >= keep else math.inf
        if loss.total([first[c]]) > bound:
            continue  # stopped by its first chunk alone: no trial made again
        t, chunks = trials[c](), [first[c]]
        for i in range(1, loss.n_chunks):
            if loss.total(chunks) > bound:
                break
            chunks.append(loss.chunk(t, i))
        else:
            losses[c] = loss.total(chunks)
            done.append(losses[c])
        del t
        trim()
    return losses


def apply_scales(lw: LayerWeights, group: ScaleGroup, s: torch.Tensor, in_place: bool = False) -> LayerWeights:
    """Fold s: the previous op's output divided by s, the linears' input columns multiplied by s.

    The FP output of the layer is unchanged (up to rounding). in_place: lw's tensors themselves are changed
    (tensors the caller owns; the same arithmetic), else new ones are made.
    """
    prev = getattr(lw, group.prev)
    if isinstance(prev, Dense):
        bias = None if prev.bias is None else (prev.bias.div_(s) if in_place else prev.bias / s)
        w = prev.weight.div_(s[:, None]) if in_place else prev.weight / s[:, None]  # output rows (out, in)
        prev = Dense(w, bias)
    else:
        prev = prev.div_(s) if in_place else prev / s  # norm weight (dim,)
    changes = {group.prev: prev}
    for n in group.linears:
        d = getattr(lw, n)
        changes[n] = Dense(d.weight.mul_(s[None, :]) if in_place else d.weight * s[None, :], d.bias)  # input columns
    return dataclasses.replace(lw, **changes)
