"""The quantization grid of ``edge_awq.pack`` in torch, for the searches (round trip without packing)."""

from __future__ import annotations

import torch


CHUNK = 1 << 22  # values rounded at a time: the temporaries of a 70B-wide linear stay tens of MB, not GBs


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, in_place: bool = False) -> torch.Tensor:
    """w_hat of w (..., in) grouped along the last axis: the same arithmetic as ``pack.quantize``.

    Scales are rounded to float16 before use, as they are stored. A large w is done CHUNK values at a time
    (whole groups: the same values), into one output: w itself with in_place (a float32 w the caller owns;
    each chunk is read before it is overwritten), so that a 70B-wide linear is not held twice.
    """
    if w.numel() > CHUNK:
        flat = w.reshape(-1, group_size)
        own = in_place and w.dtype == torch.float32 and w.is_contiguous()
        out = flat if own else torch.empty(flat.shape, dtype=torch.float32, device=w.device)
        rows = max(1, CHUNK // group_size)
        for r in range(0, flat.shape[0], rows):
            out[r : r + rows] = _fake_quantize(flat[r : r + rows], bits, group_size)
        return out.reshape(w.shape)
    return _fake_quantize(w, bits, group_size)


def _fake_quantize(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    shape = w.shape
    max_int = 2**bits - 1
    g = w.reshape(-1, group_size).float()  # (rows * G, gs)
    lo, hi = g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)
    scale = ((hi - lo).clamp(min=1e-5) / max_int).half().float()
    zero = torch.clamp(-torch.round(lo / scale), 0, max_int)
    q = torch.clamp(torch.round(g / scale) + zero, 0, max_int)
    return ((q - zero) * scale).reshape(shape)
