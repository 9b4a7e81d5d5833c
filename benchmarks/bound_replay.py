"""How close the bounded scale search comes to the least work any partial-sum bound could do.

    python benchmarks/bound_replay.py MODEL --calib TEXT [--n-samples 16] [--layers 0,3] [--group-size 64]

For each judged scale group (attention, MLP) of the given layers, every candidate α runs on every calibration
block, and each block's loss is kept. Then, per group:

- **search**: the export's own bound (``search._least_chunked``) replayed on those values, in the chunks
  ``layerwise.chunk_blocks`` makes for this model, and in chunks of one block: the share of the candidates'
  blocks it runs;
- **oracle**: the best candidate on every block, each other one only until the sum of its own largest block
  losses passes the least total. No search that stops a candidate on a partial sum of its losses can run
  less, even one that knew the order of every candidate's losses beforehand;
- the candidates' spread (largest total over least) and the best candidate's per-block coefficient of
  variation (how much a block's loss differs from another's).

The layers before each one run unquantized (FP) to make its input, as in ``export_profile.py``.
The measurements behind docs/export-speed.md, "How near the floor".
"""

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from edge_awq.config import resolve_group_size
from edge_awq.formats.load import inv_freq, open_source, read_layer
from edge_awq.model import SCALE_GROUPS, ModelWeights, block
from edge_awq.offline import layerwise
from edge_awq.offline.calibrate import calibration_blocks
from edge_awq.offline.search import _least_chunked, activation_mean, candidate_scales, scaled_trial
from edge_awq.offline.torch_ops import TorchOps


class Recorded:
    """The bounded search's view of a ``ChunkedError`` whose chunk values are already known; ``ran`` marks the
    (candidate, chunk) pairs the search asked for."""

    def __init__(self, values: np.ndarray):
        self.values = values
        self.ran = np.zeros(values.shape, dtype=bool)

    @property
    def n_chunks(self) -> int:
        return self.values.shape[1]

    def chunk(self, candidate: int, i: int) -> float:
        self.ran[candidate, i] = True
        return float(self.values[candidate, i])

    def total(self, chunks: list[float]) -> float:
        return math.fsum(chunks)


def search_share(per_block: np.ndarray, chunk: int) -> float:
    """The share of candidate-blocks the export's bound runs, with chunk blocks a chunk."""
    n = per_block.shape[1]
    bounds = list(range(0, n, chunk)) + [n]
    rec = Recorded(np.stack([per_block[:, lo:hi].sum(1) for lo, hi in zip(bounds, bounds[1:])], axis=1))
    _least_chunked(rec, [lambda c=c: c for c in range(len(per_block))])
    return float((rec.ran * np.diff(bounds)).sum() / per_block.size)


def oracle_share(per_block: np.ndarray) -> float:
    totals = per_block.sum(1)
    best = int(totals.argmin())
    work = per_block.shape[1]
    for c in (c for c in range(len(per_block)) if c != best):
        largest_first = np.cumsum(np.sort(per_block[c])[::-1])
        work += min(per_block.shape[1], int(np.searchsorted(largest_first, totals[best], side="right")) + 1)
    return work / per_block.size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--layers", default="0")
    ap.add_argument("--group-size", default="64")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--n-grid", type=int, default=20)
    a = ap.parse_args()
    src = open_source(a.model)
    qa = layerwise.QuantArgs(a.bits, resolve_group_size(src.args, a.group_size))
    blocks, _ = calibration_blocks(Path(a.calib), src.tokenizer(), a.n_samples, a.seqlen)
    ops = TorchOps("cpu")
    ctx = ModelWeights(src.args, None, (), None, None, torch.from_numpy(inv_freq(src)))
    export_chunk = layerwise.chunk_blocks(src.args, a.seqlen)
    layerwise.chunk_blocks = lambda *_, **__: 1  # record every block's loss on its own
    layers = sorted(int(v) for v in a.layers.split(","))
    print(f"{a.model}: {len(blocks)} blocks of {a.seqlen}, W{a.bits} g{qa.group_size}, {a.n_grid} candidates; "
          f"the export's chunks: {export_chunk} block(s)")
    print(f"| layer | group | spread | block CV | search, {export_chunk}-block chunks | search, 1-block chunks | oracle |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        x = torch.from_numpy(np.asarray(src.get("tok_embeddings")[blocks], dtype=np.float32))
        for i in range(layers[-1] + 1):
            lw = layerwise.to_torch(read_layer(src, i), "cpu")
            if i in layers:
                feats, x_mid, x_out = layerwise.record_inputs(lw, x, ctx, ops)
                for g in (g for g in SCALE_GROUPS if g.when(ctx.args) and g.inspect is not None):
                    loss = layerwise.loss_for(g, lw, x, x_mid, feats, ctx, ops, x_out=x_out)
                    x_mean = activation_mean(feats[g.linears[0]])
                    gs = qa.group_for(getattr(lw, g.linears[0]).weight.shape[1])
                    per_block = np.zeros((a.n_grid, loss.n_chunks))
                    for c in range(a.n_grid):
                        trial = scaled_trial(lw, g.linears, candidate_scales(x_mean, None, c / a.n_grid), a.bits, gs)
                        per_block[c] = [loss.chunk(trial, b) for b in range(loss.n_chunks)]
                    totals = per_block.sum(1)
                    best = per_block[totals.argmin()]
                    print(f"| {i} | {g.inspect} | {totals.max() / totals.min():.2f} | {best.std() / best.mean():.3f} | "
                          f"{search_share(per_block, export_chunk):.1%} | {search_share(per_block, 1):.1%} | "
                          f"{oracle_share(per_block):.1%} |", flush=True)
            x = block(lw, x, 0, None, 0, ctx, ops)


if __name__ == "__main__":
    main()
