"""Quantize a model layer by layer: calibration activations stream through one decoder layer at a time.

Per layer: record the inputs of every linear (FP), search AWQ scales for each
scale group and fold them, search clipping limits, quantize and pack, then run
the quantized layer to make the next layer's input. Only one layer's weights
and the calibration activations are in memory at any time.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from edge_awq.backends.numba.isa import target_cpu
from edge_awq.formats.eawq import linear_arrays
from edge_awq.formats.load import inv_freq, read_layer
from edge_awq.mixed import LinearFormat
from edge_awq.model import LINEARS, NO_CLIP, SCALE_GROUPS, Dense, LayerWeights, ModelWeights, attention, block, mlp
from edge_awq.pack import pack_linear, unpack_linear

from edge_awq.offline.clip import apply_clip, search_clip
from edge_awq.offline.fake_quant import fake_quantize
from edge_awq.offline.heap import trim
from edge_awq.offline.search import ChunkedError, ScaleResult, apply_scales, linear_error, output_error, search_scales
from edge_awq.offline.torch_ops import BlockAttention, CastOps, NormMemo, RecordingOps



@dataclass(frozen=True)
class QuantArgs:
    bits: int = 4
    group_size: int | str = 128  # an int, or "channel": one group per output row
    method: str = "awq"  # "awq" | "rtn"
    duo_scaling: bool = False
    clip: bool = True
    n_grid: int = 20
    # approximations of the scale search (docs/export-speed.md); the defaults are the exact search
    search_blocks: int = 0  # judge candidates on this many of the calibration blocks, evenly spaced (0: all)
    search_dtype: str = "float32"  # "bfloat16": the judged sub-blocks run in bfloat16
    search_refine: int = 0  # with search_blocks: the best this many on the subset judged again on every block
    # mixed precision: "layers.{i}.{name}" -> LinearFormat for every decoder linear (None: all at bits, group_size)
    formats: dict | None = None

    def group_for(self, in_features: int) -> int:
        return in_features if self.group_size == "channel" else int(self.group_size)

    def layer_formats(self, index: int, lw: LayerWeights) -> dict[str, LinearFormat]:
        """Each linear of layer index by name -> its format."""
        if self.formats:
            return {n: self.formats[f"layers.{index}.{n}"] for n in LINEARS}
        return {n: LinearFormat(self.bits, self.group_for(getattr(lw, n).weight.shape[1])) for n in LINEARS}

    def to_dict(self) -> dict:
        """The metadata's settings; an approximation is named only when one was used (an exact export's file
        is the same as before the approximations existed)."""
        d = {**dataclasses.asdict(self), "zero_point": True}
        for k, exact in {**EXACT_SEARCH, "formats": None}.items():
            if d[k] == exact:
                del d[k]
        if self.formats:
            d["formats"] = {k: str(v) for k, v in self.formats.items()}
        return d


EXACT_SEARCH = {f.name: f.default for f in dataclasses.fields(QuantArgs) if f.name.startswith("search_")}


def default_search(n_blocks: int, device: str = "cpu") -> dict:
    """The scale search ``export`` runs unless told otherwise (docs/export-speed.md). On a CPU that multiplies
    bfloat16 in hardware, with more than 16 calibration blocks: the candidates judged on 16 of them, evenly
    spaced, in bfloat16 (SmolLM2 at 128 blocks: 11 minutes instead of 44 on two cores, perplexity +0.5 % at
    4 bits and -7 % at 3 bits against the exact search). Elsewhere the exact search: on a GPU it is fast, on a
    CPU without bfloat16 the float32 subset missed the 0.5 % a default may cost (+1.2 % at 4 bits), and with
    16 blocks or fewer there is nothing to leave out."""
    if n_blocks <= 16 or torch.device(device).type != "cpu":
        return dict(EXACT_SEARCH)
    from edge_awq.offline.torch_ops import native_bfloat16

    if not native_bfloat16(device):
        return dict(EXACT_SEARCH)
    return {**EXACT_SEARCH, "search_blocks": 16, "search_dtype": "bfloat16"}


@dataclass
class LayerReport:
    index: int
    seconds: dict[str, float] = field(default_factory=dict)
    loss: float = 0.0  # MSE of the layer output, quantized vs FP, on the calibration input
    loss_rtn: float = 0.0  # the same for plain rounding
    scales: list[ScaleResult] = field(default_factory=list)


def to_torch(lw: LayerWeights, device) -> LayerWeights:
    """lw's arrays as float32 tensors of their own: each converted (and copied) once, whatever the source
    stores them as, so the searches may change them in place without touching the source."""
    t = lambda a: None if a is None else torch.from_numpy(np.array(a, dtype=np.float32)).to(device)  # noqa: E731
    return LayerWeights(**{n: Dense(t(getattr(lw, n).weight), t(getattr(lw, n).bias)) if n in LINEARS
                           else t(getattr(lw, n)) for n in lw.__dataclass_fields__})


def record_inputs(lw: LayerWeights, x, ctx: ModelWeights, ops):
    """Inputs of each linear by name, the attention output and the layer output, all FP. Run a chunk of
    calibration blocks at a time (``chunk_blocks``; each product and norm works row by row and attention within
    a block, so the tensors are those of one pass over every block, with a chunk's temporaries); linears that
    share an input (q, k, v; gate, up) share one recorded tensor."""
    names = {id(getattr(lw, n)): n for n in LINEARS}
    feats: dict[str, torch.Tensor] = {}
    x_mid = x_out = None
    for part in chunks(x, ctx):
        rec = RecordingOps(ops, names)
        mid = attention(lw, x[part], 0, None, 0, ctx, rec)
        out = mlp(lw, mid, ctx, rec)
        if x_out is None:
            x_mid, x_out = _whole(mid, x.shape[0]), _whole(out, x.shape[0])
            shared = {}
            for n, v in rec.inputs.items():
                feats[n] = shared.setdefault(id(v), _whole(v, x.shape[0]))
        x_mid[part], x_out[part] = mid, out
        for n, v in rec.inputs.items():
            feats[n][part] = v
    return feats, x_mid, x_out


def chunks(x, ctx: ModelWeights) -> list[slice]:
    """x's leading (calibration block) axis in chunks of ``chunk_blocks``."""
    n, step = x.shape[0], chunk_blocks(ctx.args, x.shape[-2])
    return [slice(lo, min(lo + step, n)) for lo in range(0, n, step)]


def _whole(part: torch.Tensor, n: int) -> torch.Tensor:
    return part.new_empty((n, *part.shape[1:]))


def block_by_chunks(lw: LayerWeights, x, ctx: ModelWeights, ops) -> torch.Tensor:
    """``block`` over every calibration block, a chunk at a time (the same tensor, a chunk's temporaries)."""
    out = None
    for part in chunks(x, ctx):
        y = block(lw, x[part], 0, None, 0, ctx, ops)
        out = _whole(y, x.shape[0]) if out is None else out
        out[part] = y
    return out


def block_error(lw: LayerWeights, x, reference, ctx: ModelWeights, ops) -> float:
    """The mean squared difference of lw's layer output from reference, a chunk at a time (the output itself
    never whole), summed in float64."""
    total = sum(_squares(block(lw, x[part], 0, None, 0, ctx, ops).sub_(reference[part])) for part in chunks(x, ctx))
    return total / reference.numel()


def _squares(d: torch.Tensor) -> float:
    """The sum of squares of d (a fresh tensor, squared in place), in float64."""
    return float(d.mul_(d).sum(dtype=torch.float64))


def judge_for(group, x_in, x_mid, feats, ctx, ops) -> Callable[[LayerWeights], torch.Tensor]:
    """The judged sub-block's output for a trial layer. The norm before it does not depend on the trial's
    linears: computed once (``NormMemo``), the same tensor every trial."""
    if group.inspect == "attention":
        memo = NormMemo(ops)
        return lambda t: attention(t, x_in, 0, None, 0, ctx, memo)
    if group.inspect == "mlp":
        memo = NormMemo(ops)
        return lambda t: mlp(t, x_mid, ctx, memo)
    return lambda t: torch.cat([ops.linear(feats[n], getattr(t, n)) for n in group.linears], dim=-1)


# where the search runs its judged attention through the numba kernel for whole blocks (``BlockAttention``):
# heads at most this wide, on the CPUs (LLVM's names) where the kernel was measured faster than torch's flash
# kernel. Zen 4: 2.8 x at 8 wide, 1.2 x at 16. Emerald Rapids (Xeon, family 6 model 207): 0.7 x at 8 wide, its
# flash kernel twice as fast as Zen 4's and LLVM's vectors there 256 bits (docs/export-speed.md). Wider heads and
# other CPUs keep torch's kernel.
BLOCK_ATTENTION_HEAD_DIM = 16
BLOCK_ATTENTION_CPUS = ("znver4",)


def block_attention(group, x_in, ctx) -> bool:
    """Whether the judged attention of group runs through ``BlockAttention`` (above)."""
    return (group.inspect == "attention" and x_in.device.type == "cpu"
            and ctx.args.head_dim <= BLOCK_ATTENTION_HEAD_DIM and target_cpu() in BLOCK_ATTENTION_CPUS)


def loss_for(group, lw, x_in, x_mid, feats, ctx, ops, gram: bool = True,
             dtype: str = "float32", gram_dtype=torch.float64, chunked: bool = True,
             x_out=None) -> Callable[[LayerWeights], float]:
    """A trial's judged error: a group judged on its linears alone from their input's Gram matrix
    (``linear_error``), unless gram is False; a sub-block by running it, a chunk of calibration blocks at a
    time (``ChunkedError``, which the search bounds; ``chunk_blocks`` sets the size), or on every block at once
    (``output_error``) where chunked is False; its matrix products in dtype ("bfloat16": ``CastOps``; the
    reference through the same arithmetic); where ``block_attention`` says (narrow heads, on the CPUs listed),
    the attention sub-block's attention through the numba kernel for whole blocks (``BlockAttention``; its
    reference too). x_out: the FP layer's output on x_in from ``record_inputs`` (x_mid being the attention's):
    where the judged sub-block runs torch's float32 arithmetic, the chunked references are taken from these,
    not run again."""
    x = feats[group.linears[0]]
    if group.inspect is None and gram and x.numel() // x.shape[-1] >= x.shape[-1]:
        return linear_error(group.linears, lw, x, gram_dtype)  # (the Gram matrix pays where tokens outnumber inputs)
    if dtype != "float32":
        ops = CastOps(ops, getattr(torch, dtype))
    kernel = block_attention(group, x_in, ctx)
    if kernel:
        ops = BlockAttention(ops)
    if not chunked:
        judge = judge_for(group, x_in, x_mid, feats, ctx, ops)
        return output_error(judge, judge(lw))
    # views made once: a chunk's norm is remembered by its input's identity
    parts = chunks(x_in, ctx)
    judges = [judge_for(group, x_in[part], x_mid[part], {k: v[part] for k, v in feats.items()}, ctx, ops)
              for part in parts]
    # the references through the candidates' own arithmetic: the FP pass's outputs where that is the same
    as_fp_pass = dtype == "float32" and not kernel
    recorded = {"attention": x_mid, "mlp": x_out}.get(group.inspect) if as_fp_pass else None
    return ChunkedError(judges, lw, None if recorded is None else [recorded[part] for part in parts])


def chunk_blocks(args, seqlen: int, work: float = 2.0**25) -> int:
    """Calibration blocks per chunk of a judged sub-block: one, unless a block is so little work (a model as
    narrow as stories260K) that per-call overheads would outweigh what stopping early saves; work is about
    the multiply-adds of a chunk's MLP. 2^25 gathers 6 blocks for stories260K: a chunk's tensors stay in
    the caches (its MLP's hidden activations are 2 MB), which 48 blocks' did not (its 128-block exact search:
    41 s at 6 blocks a chunk, 42 at 2, 50 at 1, 61 at 48; docs/export-speed.md)."""
    per_block = seqlen * args.dim * max(args.dim, args.hidden_dim)
    return max(1, math.ceil(work / per_block))


def search_subset(x, n_blocks: int):
    """n_blocks of x's leading (block) axis, evenly spaced; x itself for 0 or at least as many as it has."""
    if n_blocks <= 0 or n_blocks >= x.shape[0]:
        return x
    return x[torch.arange(n_blocks) * x.shape[0] // n_blocks]


def rtn_layer(lw: LayerWeights, fmts: dict[str, LinearFormat]) -> LayerWeights:
    q = {n: Dense(fake_quantize(getattr(lw, n).weight, fmts[n].bits, fmts[n].group_size), getattr(lw, n).bias)
         for n in LINEARS}
    return dataclasses.replace(lw, **q)


def _timed(rep: LayerReport, phase: str, t0: float) -> float:
    now = time.perf_counter()
    rep.seconds[phase] = rep.seconds.get(phase, 0.0) + now - t0
    return now


def _nothing(index: int, phase: str) -> None:
    pass


def search_layer(lw: LayerWeights, x_in, ctx, qa: QuantArgs, ops, rep: LayerReport, t: float, on_phase=_nothing,
                 in_place: bool = False):
    """AWQ on one layer: scales searched on FP features and folded, then clipping. Before any of it, the loss
    of plain rounding is taken for the report (``rep.loss_rtn``).

    Returns the new lw and the FP layer output (kept for the loss report). in_place: lw's tensors are the
    caller's to give (``quantize_model``'s own copy of the layer): the scales and clips change them in place
    rather than making a second float copy of the layer; the result is the same.
    """
    on_phase(rep.index, "stats")
    fmts = qa.layer_formats(rep.index, lw)
    feats, x_mid, fp_out = record_inputs(lw, x_in, ctx, ops)
    t = _timed(rep, "stats", t)
    # what the candidates are judged on: every block, or (--search-blocks) a subset taken once for all groups
    judged_in, judged_mid, judged_out = (search_subset(v, qa.search_blocks) for v in (x_in, x_mid, fp_out))
    # plain rounding's error, for the report only: on the judged blocks (with a subset, an estimate)
    rep.loss_rtn = block_error(rtn_layer(lw, fmts), judged_in, judged_out, ctx, ops)
    t = _timed(rep, "propagate", t)
    on_phase(rep.index, "scale search")
    found = []
    groups = [g for g in SCALE_GROUPS if g.when(ctx.args)]
    judged = {}
    for g in groups:  # a group's linears share one input: one subset each
        shared = search_subset(feats[g.linears[0]], qa.search_blocks)
        judged.update({n: shared for n in g.linears})
    screened = qa.search_refine > 0 and judged_in.shape[0] < x_in.shape[0]
    for g in groups:
        f = fmts[g.linears[0]]
        loss = loss_for(g, lw, judged_in, judged_mid, judged, ctx, ops, dtype=qa.search_dtype, x_out=judged_out)
        refine = None
        if screened and g.inspect is not None:
            # a judged sub-block's best few on the subset run again on every block, in float32 (--search-refine);
            # a group judged on its linears alone keeps the subset's Gram matrix (all blocks' would cost more
            # than the whole refinement: 2 x 65,536 x 1,536² float64 multiply-adds a layer for SmolLM2's down)
            refine = (loss_for(g, lw, x_in, x_mid, feats, ctx, ops, x_out=fp_out), qa.search_refine)
        res = search_scales(g, lw, feats[g.linears[0]], loss, f.bits, f.group_size, qa.n_grid, qa.duo_scaling,
                            fmts if qa.formats else None, refine)
        rep.scales.append(res)
        found.append((g, torch.tensor(res.scales, dtype=torch.float32, device=x_in.device)))
    for g, s in found:
        lw = apply_scales(lw, g, s, in_place)
        scaled_input = feats[g.linears[0]] / s
        feats.update({n: scaled_input for n in g.linears})
    t = _timed(rep, "scale search", t)
    if qa.clip:
        on_phase(rep.index, "clip search")
        for n in (n for n in LINEARS if n not in NO_CLIP):
            d, f = getattr(lw, n), fmts[n]
            limits = search_clip(d.weight, feats[n], f.bits, f.group_size, qa.n_grid)
            clipped = apply_clip(d.weight, limits, f.group_size, in_place=in_place)
            lw = dataclasses.replace(lw, **{n: Dense(clipped, d.bias)})
            trim()
        _timed(rep, "clip search", t)
    return lw, fp_out


def quantize_layer(lw_fp: LayerWeights, x_in, index: int, ctx, qa: QuantArgs, ops, on_phase=_nothing,
                   in_place: bool = False):
    """Quantize one layer. Returns (packed linears {name: W4}, folded norms {name: array}, next input, report).
    in_place: lw_fp's tensors are the caller's to give, changed by the search (``search_layer``)."""
    rep = LayerReport(index)
    t = time.perf_counter()
    if qa.method == "awq":
        lw, fp_out = search_layer(lw_fp, x_in, ctx, qa, ops, rep, t, on_phase, in_place)
    else:
        lw, fp_out = lw_fp, None
    on_phase(index, "quantize")
    t = time.perf_counter()
    packed, dequant = {}, {}
    fmts = qa.layer_formats(index, lw)
    # the searched float weights leave one linear at a time as their packed and dequantized forms come
    # (where the caller holds no other reference), so that at most two float copies of a layer are alive at once
    searched = {n: getattr(lw, n) for n in LINEARS}
    lw = dataclasses.replace(lw, **{n: None for n in LINEARS})
    for n in LINEARS:
        d = searched.pop(n)
        bias = None if d.bias is None else d.bias.cpu().numpy()
        packed[n] = pack_linear(d.weight.cpu().numpy(), fmts[n].bits, fmts[n].group_size, bias)
        bias, d = d.bias, None  # the float weight goes now
        dequant[n] = Dense(torch.from_numpy(unpack_linear(packed[n])).to(x_in.device), bias)
        trim()
    t = _timed(rep, "quantize", t)
    lw_q = dataclasses.replace(lw, **dequant)
    del dequant
    on_phase(index, "propagate")
    if fp_out is None:
        fp_out = block_by_chunks(lw_fp, x_in, ctx, ops)
    x_out = block_by_chunks(lw_q, x_in, ctx, ops)
    rep.loss = sum(_squares(x_out[part] - fp_out[part]) for part in chunks(x_in, ctx)) / fp_out.numel()
    if qa.method == "rtn":
        rep.loss_rtn = rep.loss
    _timed(rep, "propagate", t)
    norms = {n: lw.attn_norm if n == "attn_norm" else lw.ffn_norm for n in ("attn_norm", "ffn_norm")}
    return packed, {n: v.cpu().numpy() for n, v in norms.items()}, x_out, rep


def layer_arrays(i: int, packed: dict, norms: dict) -> dict[str, np.ndarray]:
    """The .eawq tensors of layer i by name."""
    out = {f"layers.{i}.{n}": v.astype(np.float16) for n, v in norms.items()}
    for n, w in packed.items():
        out.update(linear_arrays(f"layers.{i}.{n}", w))
    return out


def quantize_model(src, blocks: np.ndarray, qa: QuantArgs, writer, specs, ops, device="cpu",
                   on_layer: Callable[[LayerReport], None] | None = None, on_phase=_nothing) -> list[LayerReport]:
    """Stream src through the quantizer into writer (tensors in ``specs`` order). Returns per-layer reports."""
    a = src.args
    ctx = ModelWeights(a, None, (), None, None, torch.from_numpy(inv_freq(src)).to(device))
    emb = src.get("tok_embeddings")
    x = torch.from_numpy(np.asarray(emb[blocks], dtype=np.float32)).to(device)  # (n, seqlen, dim)
    order = [name for name, _, _ in specs]
    reports = []
    for i in range(a.n_layers):
        with torch.inference_mode():
            lw = to_torch(read_layer(src, i, dtype=None), device)  # one conversion, to arrays of its own
            src.release()  # the layer is copied out: its mapped source pages need not stay resident beside it
            packed, norms, x, rep = quantize_layer(lw, x, i, ctx, qa, ops, on_phase, in_place=True)
            del lw
        arrays = layer_arrays(i, packed, norms)
        for name in (n for n in order if n.startswith(f"layers.{i}.")):
            writer.add(name, arrays[name])
        reports.append(rep)
        if on_layer:
            on_layer(rep)
    return reports
