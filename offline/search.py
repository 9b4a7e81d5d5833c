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
    loss_unscaled: float  # MSE with s = 1 (plain rounding)
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
                 formats: dict | None = None) -> LayerWeights:
    """lw with each named linear's weight replaced by Q(W·s)/s; formats: name -> its own ``LinearFormat``
    (a mixed-precision layer), else every one at bits and group_size."""
    trial = {}
    for n in names:
        d = getattr(lw, n)
        b, gs = (formats[n].bits, formats[n].group_size) if formats else (bits, group_size)
        # W·s is a fresh tensor: rounded and divided in place (no second copy of a large linear)
        trial[n] = Dense(fake_quantize(d.weight * s, b, gs, in_place=True).div_(s), d.bias)
    return dataclasses.replace(lw, **trial)


def output_error(judge: Callable[[LayerWeights], torch.Tensor], reference: torch.Tensor) -> Callable[[LayerWeights], float]:
    """The direct loss: the mean squared difference of the judged sub-block's output from the reference.

    The judged output is a fresh tensor, so the difference and its square are taken in place (the same
    arithmetic, in the same order, as ``(y - reference).pow(2).mean()``, without two more temporaries).
    """

    def loss(trial: LayerWeights) -> float:
        d = judge(trial).sub_(reference)
        return float(d.mul_(d).mean())

    return loss


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
) -> ScaleResult:
    """Grid-search α for one group. x_in (..., in) is the linears' (shared) input; loss(trial layer) its judged
    output's error (``output_error`` or ``linear_error``); formats: each linear's own (``scaled_trial``)."""
    x_mean = activation_mean(x_in)
    sizes = [formats[n].group_size for n in group.linears] if formats else group_size
    w_mean = weight_mean([getattr(lw, n).weight for n in group.linears], sizes) if duo else None
    best = (math.inf, 0.0, None)
    losses = {}
    for i in range(n_grid):
        ratio = i / n_grid
        s = candidate_scales(x_mean, w_mean, ratio)
        trial_loss = loss(scaled_trial(lw, group.linears, s, bits, group_size, formats))
        trim()  # the trial's temporaries go back to the system before the next (heap.py)
        losses[ratio] = trial_loss
        if trial_loss < best[0]:
            best = (trial_loss, ratio, s)
    if w_mean is None:
        unscaled = losses[0.0]  # α = 0 is s = 1
    else:
        unscaled = loss(scaled_trial(lw, group.linears, torch.ones_like(x_mean), bits, group_size, formats))
    return ScaleResult(group.prev, group.linears, best[1], best[0], unscaled, best[2].tolist())


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
