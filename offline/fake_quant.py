"""The quantization grid of ``edge_awq.pack`` in torch, for the searches (round trip without packing)."""

from __future__ import annotations

import torch


CHUNK = 1 << 22  # values rounded at a time: the temporaries of a 70B-wide linear stay tens of MB, not GBs


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, in_place: bool = False) -> torch.Tensor:
    """w_hat of w (..., in) grouped along the last axis: the same arithmetic as ``pack.quantize``.

    Scales are rounded to float16 before use, as they are stored. The values are rounded in place, CHUNK at a
    time (whole groups: the same values), in w itself with in_place (a float32 w the caller owns), else in a
    float32 copy: no temporary of a linear's size, and none of a chunk's but its per-group limits, so that a
    70B-wide linear is not held twice and the searches' trials (``search.scaled_trial``) make no fresh pages.
    """
    flat = w.reshape(-1, group_size)
    own = in_place and w.dtype == torch.float32 and w.is_contiguous()
    out = flat if own else flat.to(torch.float32, copy=True)
    rows = max(1, CHUNK // group_size)
    for r in range(0, out.shape[0], rows):
        _round_(out[r : r + rows], bits)
    return out.reshape(w.shape)


def _round_(g: torch.Tensor, bits: int) -> None:
    """g (groups, group_size) float32, replaced by its rounding: pack.quantize's asymmetric grid per row."""
    max_int = 2**bits - 1
    lo, hi = g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)
    scale = ((hi - lo).clamp(min=1e-5) / max_int).half().float()
    zero = torch.clamp(-torch.round(lo / scale), 0, max_int)
    # round(g / scale) + zero clamped to the grid, then (q - zero) * scale: the same operations, in g's memory
    g.div_(scale).round_().add_(zero).clamp_(0, max_int).sub_(zero).mul_(scale)
