"""AWQ's clip search: per output row and group, shrink the largest |w| and keep the limit that
minimises the error of the group's partial dot products on sampled calibration tokens.

The unshrunk limit (1.0, plain rounding) is among the candidates and wins ties,
so clipping never raises a group's error above plain rounding's.

A group's error is scored from its inputs' Gram matrix where a group is narrower than the tokens sampled
(``gram_errors``): with D = Q(w) − w, mean over tokens of (x·D)² = D · (XᵀX) · D / n, one (gs, gs) matrix per
group made once per linear, so a candidate costs rows × in × gs multiply-adds instead of tokens × rows × in
(8 × fewer at group 64 and 512 tokens), and the batch is every row at once. In float64 it is within float32
rounding of the direct error (``group_errors``, which wider groups keep); the choices are tested to be the same.
"""

from __future__ import annotations

import torch

from edge_awq.offline.fake_quant import fake_quantize
from edge_awq.offline.heap import trim

TRIM_EVERY = 8  # row batches between returns of the heap's free pages (each costs page faults after it)
GRAM_BATCH = 2**22  # weights a row batch of the Gram scoring holds (its float64 temporaries 32 MB each)


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


def group_grams(xs: torch.Tensor) -> torch.Tensor:
    """Each group's Gram matrix in float64: xs (1, n, G, gs) -> (G, gs, gs)."""
    x64 = xs[0].double()
    return torch.einsum("ngk,ngl->gkl", x64, x64)


def gram_errors(w: torch.Tensor, grams: torch.Tensor, n: int, limits: torch.Tensor, bits: int,
                group_size: int) -> torch.Tensor:
    """``group_errors`` from the groups' Gram matrices, in float64: w (rows, 1, G, gs), grams (G, gs, gs),
    n tokens, limits (rows, 1, G, 1) -> (rows, G)."""
    q = fake_quantize(torch.clamp(w, -limits, limits), bits, group_size, in_place=True)
    d = q.sub_(w)[:, 0].double().transpose(0, 1)  # (G, rows, gs)
    return torch.bmm(d, grams).mul_(d).sum(-1).transpose(0, 1).div_(n)


def search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, n_grid: int = 20,
                max_shrink: float = 0.5, n_tokens: int = 512, rows_per_batch: int = 64,
                gram: bool | None = None) -> torch.Tensor:
    """Best clipping limit per (row, group): w (out, in), x (..., in) -> (out, G) float32. gram: score from the
    groups' Gram matrices (``gram_errors``, ``GRAM_BATCH`` weights a row batch); by default where a group is
    narrower than the tokens sampled, else directly (``group_errors``, rows_per_batch rows at a time)."""
    out_f, in_f = w.shape
    G = in_f // group_size
    xs = sample_tokens(x, n_tokens).reshape(1, -1, G, group_size)  # (1, n, G, gs)
    if gram is None:
        gram = group_size < xs.shape[1]
    grams = group_grams(xs) if gram else None
    batch = max(rows_per_batch, GRAM_BATCH // in_f) if gram else rows_per_batch
    best = []
    for r in range(0, out_f, batch):
        wb = w[r : r + batch].float().reshape(-1, 1, G, group_size)  # (rows, 1, G, gs)
        reference = None if gram else partial_dots(xs, wb)  # (rows, n, G)
        top = wb.abs().amax(dim=-1, keepdim=True)  # (rows, 1, G, 1)
        best_limit = top.clone()
        best_err = torch.full(top.shape[:1] + top.shape[2:3], float("inf"), dtype=torch.float64 if gram else None,
                              device=wb.device)
        for i in range(int(max_shrink * n_grid)):
            limit = top * (1 - i / n_grid)
            if gram:
                err = gram_errors(wb, grams, xs.shape[1], limit, bits, group_size)
            else:
                err = group_errors(wb, xs, limit, bits, group_size, reference)  # (rows, G)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_limit[better[:, None, :, None].expand_as(best_limit)] = limit[better[:, None, :, None].expand_as(limit)]
        best.append(best_limit.reshape(-1, G))
        if (r // batch) % TRIM_EVERY == TRIM_EVERY - 1:
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
