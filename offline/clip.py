"""AWQ's clip search: per output row and group, shrink the largest |w| and keep the limit that
minimises the error of the group's partial dot products on sampled calibration tokens.

The unshrunk limit (1.0, plain rounding) is among the candidates and wins ties,
so clipping never raises a group's error above plain rounding's.
"""

from __future__ import annotations

import torch

from edge_awq.offline.fake_quant import fake_quantize
from edge_awq.offline.heap import trim

TRIM_EVERY = 8  # row batches between returns of the heap's free pages (each costs page faults after it)


def sample_tokens(x: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """n_tokens rows evenly spaced over x (..., in) -> (n, in)."""
    flat = x.reshape(-1, x.shape[-1])
    step = max(1, flat.shape[0] // n_tokens)
    return flat[::step][:n_tokens].float()


def group_errors(w: torch.Tensor, x: torch.Tensor, limits: torch.Tensor, bits: int, group_size: int,
                 reference: torch.Tensor) -> torch.Tensor:
    """Mean squared error per (row, group) of partial dot products with w clipped to ±limits and rounded.

    w (rows, 1, G, gs), x (1, n, G, gs), limits (rows, 1, G, 1), reference (rows, n, G) -> (rows, G).
    """
    q = fake_quantize(torch.clamp(w, -limits, limits), bits, group_size, in_place=True)  # the clamp is fresh
    d = partial_dots(x, q).sub_(reference)  # fresh too: the difference and its square in place, the same values
    return d.mul_(d).mean(dim=1)


def partial_dots(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-group dot products: x (1, n, G, gs), w (rows, 1, G, gs) -> (rows, n, G), as one batched matmul."""
    return torch.einsum("ngk,rgk->rng", x[0], w[:, 0])


def search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, n_grid: int = 20,
                max_shrink: float = 0.5, n_tokens: int = 512, rows_per_batch: int = 64) -> torch.Tensor:
    """Best clipping limit per (row, group): w (out, in), x (..., in) -> (out, G) float32."""
    out_f, in_f = w.shape
    G = in_f // group_size
    xs = sample_tokens(x, n_tokens).reshape(1, -1, G, group_size)  # (1, n, G, gs)
    best = []
    for r in range(0, out_f, rows_per_batch):
        wb = w[r : r + rows_per_batch].float().reshape(-1, 1, G, group_size)  # (rows, 1, G, gs)
        reference = partial_dots(xs, wb)  # (rows, n, G)
        top = wb.abs().amax(dim=-1, keepdim=True)  # (rows, 1, G, 1)
        best_limit, best_err = top.clone(), torch.full(top.shape[:1] + top.shape[2:3], float("inf"))
        for i in range(int(max_shrink * n_grid)):
            limit = top * (1 - i / n_grid)
            err = group_errors(wb, xs, limit, bits, group_size, reference)  # (rows, G)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_limit[better[:, None, :, None].expand_as(best_limit)] = limit[better[:, None, :, None].expand_as(limit)]
        best.append(best_limit.reshape(-1, G))
        if (r // rows_per_batch) % TRIM_EVERY == TRIM_EVERY - 1:
            trim()  # the batches' temporaries go back to the system (heap.py)
    return torch.cat(best)


def apply_clip(w: torch.Tensor, limits: torch.Tensor, group_size: int, in_place: bool = False) -> torch.Tensor:
    """w (out, in) clamped to ±limits (out, G) group by group (in_place: w itself, a tensor the caller owns)."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group_size, group_size)
    lim = limits[..., None]
    if in_place and w.is_contiguous():
        return g.clamp_(-lim, lim).reshape(out_f, in_f)
    return torch.clamp(g, -lim, lim).reshape(out_f, in_f)
