"""How much each decoder linear's judged error grows at each candidate format (the allocator's input).

A streaming pass over the layers, as the export's: per layer the FP inputs of every linear are recorded;
per scale group and candidate format the group's AWQ scale is searched at that format (judged on the
group's linears alone, from their Gram matrix in float32, on at most ``SEARCH_ROWS`` of their output rows:
cheap, and the sub-block judges come next), each linear's clipping is searched at
it, and then each linear alone is quantized that way (the others kept FP) and judged as the AWQ search
judges its group: the attention output for q/k/v, the MLP output for gate/up, the linear's own output for
o and down. All of these outputs are added to the residual stream, so an error is measured in its units,
over the channels that are not massive activations (a channel whose power is ``MASSIVE`` times the median
channel's: RMSNorm divides every channel by a norm such a channel dominates, so an error in the others
counts against their own signal, and one in the massive channel against its huge value — nothing);
divided by the mean square of the layer's input over the same channels it becomes a relative error
comparable across depth. The next layer's input is the FP output: sensitivities do not depend on the
allocation that will use them.

The table is independent of the budget: ``export --sensitivity FILE`` keeps it, and exports at other
budgets read it back instead of measuring again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_awq.errors import InputError
from edge_awq.formats.load import inv_freq, read_layer
from edge_awq.mixed import LinearFormat, candidates
from edge_awq.model import LINEARS, NO_CLIP, SCALE_GROUPS, Dense, ModelWeights, ScaleGroup

from edge_awq.offline.clip import apply_clip, search_clip
from edge_awq.offline.fake_quant import fake_quantize
from edge_awq.offline.heap import trim
from edge_awq.offline.layerwise import judge_for, loss_for, record_inputs, to_torch
from edge_awq.offline.search import scaled_into, search_scales

log = logging.getLogger(__name__)

VERSION = 3
MASSIVE = 100.0  # a channel whose power exceeds this many times the median channel's is a massive activation
SEARCH_ROWS = 4096  # a group's scale search here judges at most this many of its output rows, evenly spaced
WEIGHTINGS = ("relative", "residual")
# how errors are summed: "relative" divides each by its layer's residual power (the default, measured in the
# README's "Mixed precision"); "residual" takes them in residual units as judged
WEIGHTING = os.environ.get("EDGE_AWQ_SENSITIVITY_WEIGHTING", "relative")


@dataclass
class Sensitivity:
    """errors[prefix][format]: the judged error (residual units) of linear prefix quantized alone at format;
    signal[layer]: the mean square of that layer's input."""

    errors: dict[str, dict[str, float]]
    signal: list[float]
    settings: dict  # what the table depends on: source fingerprint, calibration, method settings
    seconds: float = 0.0

    def weighted(self, prefix: str, fmt: str, weighting: str = "") -> float:
        """The error the allocator sums: relative to the layer's signal, or in residual units."""
        weighting = weighting or WEIGHTING
        if weighting not in WEIGHTINGS:
            raise InputError(f"EDGE_AWQ_SENSITIVITY_WEIGHTING={weighting}: one of {', '.join(WEIGHTINGS)}")
        e = self.errors[prefix][fmt]
        return e / self.signal[int(prefix.split(".")[1])] if weighting == "relative" else e

    def save(self, path: Path) -> None:
        from edge_awq.formats.atomic import write_text

        write_text(path, json.dumps({"version": VERSION, **dataclasses.asdict(self)}, indent=0))

    @classmethod
    def load(cls, path: Path, settings: dict) -> Sensitivity | None:
        """The table kept at path if it was measured with these settings; None if there is none (or another's)."""
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_text())
            table = cls(raw["errors"], raw["signal"], raw["settings"], raw.get("seconds", 0.0))
            if raw.get("version") != VERSION:
                raise ValueError("another version")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"--sensitivity {path}: not a sensitivity table ({e}); remove it or name another file"
                             ) from None
        if table.settings != settings:
            diff = sorted(k for k in set(settings) | set(table.settings) if settings.get(k) != table.settings.get(k))
            raise InputError(f"--sensitivity {path}: measured with other settings ({', '.join(diff)} differ); "
                             "remove it or name another file")
        return table


def settings_of(src, calib: dict, qa) -> dict:
    """What a sensitivity table depends on (a kept table is reused only when all of it matches)."""
    out = {"source": src.fingerprint(), "calibration": calib.get("sha256"), "n_samples": calib.get("n_samples"),
           "seqlen": calib.get("seqlen"), "method": qa.method, "duo_scaling": qa.duo_scaling, "clip": qa.clip,
           "n_grid": qa.n_grid, "formats": hashlib.sha256(json.dumps(sorted(
               {str(f) for f in _all_candidates(src.args)})).encode()).hexdigest()[:16]}
    return {**out, "sampling": calib["sampling"]} if "sampling" in calib else out


def _all_candidates(a) -> list[LinearFormat]:
    from edge_awq.config import expected_shapes

    return [f for n in LINEARS for f in candidates(expected_shapes(a)[n][1])]


def _groups(a) -> list[ScaleGroup]:
    """The layer's scale groups, and each linear no group scales as a group of its own without a scale."""
    groups = [g for g in SCALE_GROUPS if g.when(a)]
    scaled = {n for g in groups for n in g.linears}
    return groups + [ScaleGroup(prev="", linears=(n,)) for n in LINEARS if n not in scaled]


def _rows(lw, names: tuple[str, ...], limit: int = SEARCH_ROWS):
    """lw with the named linears cut to every k-th output row, at most limit rows in all (lw itself if fewer)."""
    rows = sum(getattr(lw, n).weight.shape[0] for n in names)
    if rows <= limit:
        return lw
    k = -(-rows // limit)
    cut = {n: Dense(getattr(lw, n).weight[::k], None if getattr(lw, n).bias is None else getattr(lw, n).bias[::k])
           for n in names}
    return dataclasses.replace(lw, **cut)


def ordinary_channels(x: torch.Tensor) -> torch.Tensor:
    """The residual channels of x (..., dim) that are not massive activations: (dim,) bool."""
    power = x.pow(2).reshape(-1, x.shape[-1]).mean(0)
    return power <= MASSIVE * power.median()


def _masked_error(judge, reference, keep):
    """A trial's mean squared error of the judged output over the residual channels kept (massive ones out)."""

    def error(trial) -> float:
        d = judge(trial).sub_(reference)[..., keep]
        return float(d.mul_(d).mean())

    return error


def layer_errors(lw, x_in, ctx, qa, ops) -> tuple[dict[str, dict[str, float]], float, torch.Tensor]:
    """Judged errors of one layer's linears at each candidate format, the layer input's mean square, and the
    layer's FP output."""
    feats, x_mid, fp_out = record_inputs(lw, x_in, ctx, ops)
    keep = ordinary_channels(x_in)
    signal = float(x_in[..., keep].pow(2).mean())
    out: dict[str, dict[str, float]] = {n: {} for n in LINEARS}
    for g in _groups(ctx.args):
        x = feats[g.linears[0]]
        judge = judge_for(g, x_in, x_mid, feats, ctx, ops)
        error = _masked_error(judge, judge(lw), keep)
        if qa.method == "awq" and g.prev:  # the scale searched on the linears' own outputs, in float32
            searched = _rows(lw, g.linears)
            loss = loss_for(dataclasses.replace(g, inspect=None), searched, x_in, x_mid, feats, ctx, ops,
                            gram_dtype=torch.float32)
        scratch: dict = {}  # one trial at a time: W·s in one buffer per shape (``search.scaled_into``)
        for f in candidates(x.shape[-1]):
            s = torch.ones(x.shape[-1], dtype=torch.float32, device=x.device)
            if qa.method == "awq" and g.prev:
                res = search_scales(g, searched, x, loss, f.bits, f.group_size, qa.n_grid, qa.duo_scaling)
                s = torch.tensor(res.scales, dtype=torch.float32, device=x.device)
            for n in g.linears:
                d = getattr(lw, n)
                # clipped, rounded and divided in place (one copy of a linear at a time)
                w = scaled_into(scratch, tuple(d.weight.shape), d.weight, s)
                if qa.method == "awq" and qa.clip and n not in NO_CLIP:
                    w = apply_clip(w, search_clip(w, x / s, f.bits, f.group_size, qa.n_grid), f.group_size,
                                   in_place=True)
                w = fake_quantize(w, f.bits, f.group_size, in_place=True).div_(s)
                trial = dataclasses.replace(lw, **{n: Dense(w, d.bias)})
                out[n][str(f)] = error(trial)
                del w, trial
                trim()  # each trial's temporaries go back to the system before the next (heap.py)
    return out, signal, fp_out


def measure(src, blocks: np.ndarray, qa, settings: dict, ops, device: str = "cpu", on_phase=None,
            on_layer=None) -> Sensitivity:
    """The sensitivity table of every decoder linear of src on the calibration blocks; on_phase(i, name) as a
    layer starts, on_layer(i) when it is done."""
    a = src.args
    t0 = time.perf_counter()
    ctx = ModelWeights(a, None, (), None, None, torch.from_numpy(inv_freq(src)).to(device))
    x = torch.from_numpy(np.asarray(src.get("tok_embeddings")[blocks], dtype=np.float32)).to(device)
    errors, signal = {}, []
    for i in range(a.n_layers):
        if on_phase is not None:
            on_phase(i, "sensitivity")
        with torch.inference_mode():
            lw = to_torch(read_layer(src, i, dtype=None), device)  # one conversion, to arrays of its own
            src.release()  # copied out: the mapped source pages need not stay resident beside the copy
            layer, power, x = layer_errors(lw, x, ctx, qa, ops)
            del lw
        errors.update({f"layers.{i}.{n}": v for n, v in layer.items()})
        signal.append(power)
        log.info("sensitivity: layer %d done", i)
        if on_layer is not None:
            on_layer(i)
    return Sensitivity(errors, signal, settings, time.perf_counter() - t0)
