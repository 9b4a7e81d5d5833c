"""Where an AWQ export's time goes: one decoder layer's search under torch's profiler.

    python benchmarks/export_profile.py MODEL --calib TEXT [--n-samples 32] [--layer 0] [--group-size 64] [--top 15]

Runs the layers before --layer unquantized (FP) to get its real input, then ``search_layer`` on that
layer with ``torch.profiler``, each scale group and the clip search under its own label. Prints the
seconds per phase and group, and the operators that took the most time (self CPU), with their input
shapes and dtypes, and the layer's time split three ways: matrix products, the attention kernel, and the
rest (norms, RoPE, SiLU, the losses, the candidates' rounding, bookkeeping). The breakdown behind
docs/export-speed.md.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from edge_awq.config import resolve_group_size
from edge_awq.formats.load import inv_freq, open_source, read_layer
from edge_awq.model import ModelWeights, block
from edge_awq.offline import clip as clip_mod
from edge_awq.offline import search as search_mod
from edge_awq.offline.calibrate import calibration_blocks
from edge_awq.offline.layerwise import LayerReport, QuantArgs, search_layer, to_torch
from edge_awq.offline.torch_ops import TorchOps


def labelled(fn, label):
    def wrapped(*a, **k):
        with record_function(label(*a, **k)):
            return fn(*a, **k)
    return wrapped


PRODUCTS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")
WRAPPERS = ("aten::matmul", "aten::linear", "aten::einsum", "aten::scaled_dot_product_attention")


def split(events) -> dict[str, float]:
    """Self CPU seconds of the profiled ops: matrix products, the attention kernel, the rest (labels and the
    wrappers that only call the first two are left out)."""
    parts = {"matrix products": 0.0, "attention kernel": 0.0, "the rest": 0.0}
    for e in events:
        if e.key.startswith(("scale ", "clip ")) or e.key in WRAPPERS:
            continue
        part = ("matrix products" if e.key in PRODUCTS else
                "attention kernel" if "scaled_dot_product" in e.key else "the rest")
        parts[part] += e.self_cpu_time_total / 1e6
    return parts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--group-size", default="64")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    src = open_source(a.model)
    qa = QuantArgs(a.bits, resolve_group_size(src.args, a.group_size), "awq", False, True)
    blocks, _ = calibration_blocks(Path(a.calib), src.tokenizer(), a.n_samples, a.seqlen)
    ops = TorchOps("cpu")
    ctx = ModelWeights(src.args, None, (), None, None, torch.from_numpy(inv_freq(src)))
    with torch.inference_mode():
        x = torch.from_numpy(np.asarray(src.get("tok_embeddings")[blocks], dtype=np.float32))
        for i in range(a.layer):
            x = block(to_torch(read_layer(src, i), "cpu"), x, 0, None, 0, ctx, ops)
        lw = to_torch(read_layer(src, a.layer), "cpu")
        search_mod.search_scales = labelled(search_mod.search_scales, lambda g, *r, **k: "scale " + "+".join(g.linears))
        import edge_awq.offline.layerwise as lwmod
        lwmod.search_scales = search_mod.search_scales
        lwmod.search_clip = labelled(clip_mod.search_clip, lambda w, *r, **k: f"clip {tuple(w.shape)}")
        rep = LayerReport(a.layer)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            search_layer(lw, x, ctx, qa, ops, rep, time.perf_counter())
        total = time.perf_counter() - t0
    print(f"{a.model}: layer {a.layer}, {len(blocks)} blocks of {a.seqlen}, W{a.bits} g{qa.group_size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {total:.1f} s")
    print("phases:", ", ".join(f"{k} {v:.1f} s" for k, v in rep.seconds.items()))
    events = prof.key_averages()
    print("| label | seconds |\n|---|---|")
    for e in sorted((e for e in events if e.key.startswith(("scale ", "clip "))), key=lambda e: -e.cpu_time_total):
        print(f"| {e.key} | {e.cpu_time_total / 1e6:.2f} |")
    parts = split(events)
    print("split: " + ", ".join(f"{k} {v:.2f} s ({v / sum(parts.values()):.0%})" for k, v in parts.items()))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=a.top,
                                                             max_name_column_width=40, max_shapes_column_width=60))


if __name__ == "__main__":
    main()
