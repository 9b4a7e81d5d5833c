"""``edge-awq export``: quantize a model with AWQ (or RTN) into one packed ``.eawq`` file, or into the
directory layouts transformers and vLLM load (``--format awq-gemm|compressed-tensors``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

from edge_awq.commands import flags

SEARCH = ("search_blocks", "search_dtype", "search_refine")  # the scale search's approximations

log = logging.getLogger(__name__)

DEFAULT_HEAD = "int8"  # measured: SmolLM2 decode +17 % tokens/s, wikitext2 perplexity unchanged (README "Speed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="Hugging Face directory, .gguf file or llama2.c .bin")
    p.add_argument("--calib", required=True, type=Path, help="calibration text file (UTF-8)")
    p.add_argument("-o", "--output", required=True, type=Path,
                   help="the .eawq file to write (a directory for --format awq-gemm or compressed-tensors)")
    p.add_argument("--format", choices=("eawq", "awq-gemm", "compressed-tensors"), default="eawq",
                   help="eawq (default), or a directory AutoAWQ/llm-compressor would write, for transformers and vLLM")
    p.add_argument("--requantize", action="store_true",
                   help="for an already-quantized source: dequantize it and search again, rather than convert")
    p.add_argument("--bits", type=int, choices=(4, 3), default=4)
    p.add_argument("--group-size", type=flags.group_size, default=128,
                   help="128, 64, 32 (any size dividing every layer), auto or channel")
    p.add_argument("--method", choices=("awq", "rtn"), default="awq")
    p.add_argument("--n-samples", type=flags.int_range(1, 1 << 20, "--n-samples"), default=128,
                   help="calibration blocks (default 128)")
    p.add_argument("--seqlen", type=flags.int_range(2, 1 << 20, "--seqlen"), default=512,
                   help="tokens per calibration block (default 512)")
    p.add_argument("--calib-sampling", choices=("even", "documents"), default="even",
                   help="calibration blocks evenly spaced over the text (default), or as AutoAWQ takes them: documents "
                        "(split at blank lines) shuffled with a fixed seed, those within --seqlen concatenated")
    p.add_argument("--duo-scaling", action="store_true", help="scale by activation and weight statistics")
    p.add_argument("--no-clip", action="store_true", help="skip the clip search")
    p.add_argument("--exact", action="store_true",
                   help="the exact scale search, every candidate judged on every calibration block in float32 "
                        "(the default on a CPU with bfloat16 in hardware, above 16 blocks, is --search-blocks 16 "
                        "--search-dtype bfloat16; elsewhere it is exact)")
    p.add_argument("--search-blocks", type=flags.int_range(0, 1 << 20, "--search-blocks"), default=None,
                   help="an approximation: judge the scale candidates on this many of the calibration blocks, evenly "
                        "spaced (statistics still use all; 0: all)")
    p.add_argument("--search-dtype", choices=("float32", "bfloat16"), default=None,
                   help="an approximation: the judged sub-blocks' matrix products in bfloat16 (float32: exact)")
    p.add_argument("--search-refine", type=flags.int_range(0, 64, "--search-refine"), default=None, metavar="K",
                   help="with --search-blocks: the attention's and the MLP's K candidates best on the subset are "
                        "judged again on every block, in float32, which chooses among them (0: the subset chooses)")
    p.add_argument("--budget", type=flags.bits_per_weight, default=None, metavar="BITS_PER_WEIGHT",
                   help="mixed precision: choose a format per linear (3 or 4 bits in groups of 128/64/32, 5, 6 or 8 bits) for the least "
                        "measured error within this many bits per decoder weight (codes, scales and zero points)")
    p.add_argument("--fit", default=None, metavar="DEVICE_OR_MEMORY",
                   help="mixed precision sized by the plan: the largest file that still fits this device profile or "
                        "memory (e.g. orin-nano-8gb, 355MiB) at --ctx with --kv-dtype")
    p.add_argument("--ctx", type=flags.context, default=2048, help="context the --fit plan holds (default 2048)")
    p.add_argument("--kv-dtype", choices=("fp16", "int8"), default="fp16", help="KV cache the --fit plan holds")
    p.add_argument("--sensitivity", type=Path, default=None, metavar="FILE",
                   help="keep the measured sensitivity table in FILE, or read it from there if it was measured with "
                        "the same source and settings (exports at other budgets then skip that pass)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where torch runs the search")
    p.add_argument("--head", choices=("fp16", "int8", "w4"), default=DEFAULT_HEAD,
                   help=f"output head: float16, or packed at 8 or 4 bits (round to nearest; default {DEFAULT_HEAD})")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer file for a llama2.c checkpoint")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _check_args(args) -> None:
    from edge_awq.errors import InputError

    from edge_awq.formats.interop import target_of

    target_of(args.format, args.output)  # the output's name, and that it does not exist yet
    given = [f"--{k.replace('_', '-')}" for k in SEARCH if getattr(args, k) is not None]
    if args.exact and given:
        raise InputError(f"--exact is the search without approximations: drop {' and '.join(given)}, or --exact")
    if args.search_refine and not args.search_blocks:
        raise InputError("--search-refine K re-judges the best K of a --search-blocks subset: give --search-blocks too")
    if args.budget is not None and args.fit is not None:
        raise InputError("--budget and --fit both size the file: give one")
    if (args.budget is not None or args.fit is not None) and args.format != "eawq":
        raise InputError(f"--format {args.format} holds one format for every linear: mixed precision (--budget, "
                         "--fit) is written as .eawq")
    if args.fit is not None:
        from edge_awq.plan import device_or_memory

        device_or_memory(args.fit)  # a known profile or a size, before any work
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda: torch sees no CUDA device here; use --device cpu")


def _metadata(src, qa, calib: dict, tok_fields: dict, head: str) -> dict:
    from edge_awq.pack import LAYOUT

    return {
        "layout": LAYOUT, "model_args": src.args.to_dict(), "tokenizer": tok_fields,
        "quantization": {**qa.to_dict(), "head": head, "embedding": "fp16", "calibration": calib},
        "source": {"name": Path(src.path).name, "fingerprint": src.fingerprint()},
        "generation": getattr(src, "generation_defaults", dict)(),  # the model's recommended sampling, if any
    }


class _CtrlC:
    """Ctrl-C raises KeyboardInterrupt at once, and again at the next phase if a library swallowed it."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        import signal
        import threading

        self._main = threading.current_thread() is threading.main_thread()
        if self._main:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        raise KeyboardInterrupt

    def checked(self, callback):
        def call(*args):
            if self.requested:
                raise KeyboardInterrupt
            return callback(*args)

        return call

    def __exit__(self, *exc):
        import signal

        if self._main:
            signal.signal(signal.SIGINT, self._previous)
        return False


def run(args: argparse.Namespace) -> int:
    import sys

    from edge_awq.offline.report import Progress

    def said(message: str) -> None:
        print(f"edge-awq export: {message}", file=sys.stderr)

    with Progress() as progress:
        info = quantize(args.source, args.calib, args.output, format=args.format, bits=args.bits,
                        group_size=args.group_size, method=args.method, n_samples=args.n_samples, seqlen=args.seqlen,
                        calib_sampling=args.calib_sampling,
                        duo_scaling=args.duo_scaling, clip=not args.no_clip, search_blocks=args.search_blocks,
                        search_dtype=args.search_dtype, search_refine=args.search_refine, exact=args.exact,
                        device=args.device, head=args.head,
                        tokenizer=args.tokenizer, requantize=args.requantize, budget=args.budget, fit=args.fit,
                        ctx=args.ctx, kv_dtype=args.kv_dtype, sensitivity=args.sensitivity, progress=progress,
                        note=said)
    print(json.dumps(info) if args.json else info["text"])
    return 0


def quantize(source, calib_text, out, *, format: str = "eawq", bits: int = 4, group_size: int | str = 128,
             method: str = "awq", n_samples: int = 128, seqlen: int = 512, calib_sampling: str = "even",
             duo_scaling: bool = False,
             clip: bool = True, search_blocks: int | None = None, search_dtype: str | None = None,
             search_refine: int | None = None, exact: bool = False, device: str = "cpu",
             head: str = DEFAULT_HEAD, tokenizer=None, requantize: bool = False, budget: float | None = None,
             fit: str | None = None, ctx: int = 2048, kv_dtype: str = "fp16", sensitivity=None,
             progress=None, note=None) -> dict:
    """``edge-awq export`` as a function: quantize source with AWQ (or RTN) into out; returns the summary.

    source: anything ``edge_awq.load`` opens; calib_text: a UTF-8 text file; out: an .eawq file, or a directory
    for format "awq-gemm" or "compressed-tensors". bits 4 or 3; group_size an int dividing every linear, "auto"
    or "channel"; method "awq" or "rtn"; n_samples blocks of seqlen calibration tokens, sampled "even" or as
    "documents" (``calibrate.py``); head "fp16", "int8" or "w4". search_blocks, search_dtype and search_refine
    are the search's approximations (``--search-blocks``, ``--search-dtype``, ``--search-refine``): those not
    given are exact where any is given or exact is true, else all three are the default
    (``layerwise.default_search``). device "cpu" or "cuda" (torch's). An already-quantized source is converted
    as stored unless requantize. Mixed precision (.eawq only): budget in bits per decoder weight, or fit a
    device profile or memory size (with ctx and kv_dtype, as ``edge-awq plan`` counts them); sensitivity a file
    keeping the measured table. progress: an object with ``start(n_layers, method)``, ``phase(layer, name)`` and
    ``layer_done(report)`` (``offline.report.Progress`` draws a bar); note(message): what the caller should be
    told. The summary: output, bytes, bits_per_weight, seconds per phase, per-layer losses, and ``text``.
    """
    from edge_awq.formats.load import DequantizedSource, open_source

    args = argparse.Namespace(source=source, calib=Path(calib_text), output=Path(out), format=format, bits=bits,
                              group_size=group_size, method=method, n_samples=n_samples, seqlen=seqlen,
                              calib_sampling=calib_sampling,
                              duo_scaling=duo_scaling, no_clip=not clip, search_blocks=search_blocks,
                              search_dtype=search_dtype, search_refine=search_refine, exact=exact, device=device,
                              head=head, tokenizer=tokenizer, budget=budget,
                              fit=fit, ctx=ctx, kv_dtype=kv_dtype,
                              sensitivity=None if sensitivity is None else Path(sensitivity))
    _check_args(args)
    note = note or log.info
    t_start = time.perf_counter()
    src = open_source(args.source, args.tokenizer)
    quant = getattr(src, "quantization", None) or {}
    if quant and not requantize:
        from edge_awq.formats.interop import convert

        note(f"{args.source} is already quantized ({quant.get('layout', 'eawq')}, W{quant['bits']}): converting it as "
             "stored, not quantizing again (--requantize to dequantize and search anew)")
        info = convert(Path(args.source), args.output, args.format, args.head if args.format == "eawq" else "fp16")
        info["seconds"] = time.perf_counter() - t_start
        info["text"] = (f"wrote {args.output} ({args.format}) in {info['seconds']:.1f}s: integers, scales and zero "
                        "points as stored in the source")
        return info
    if quant:
        note(f"{args.source} is already quantized: dequantizing it and searching again; the new grid is fitted to "
             "weights already rounded once, so its error adds to the source's")
        src = DequantizedSource(src)
    if args.format == "eawq":
        return _export_eawq(args, src, args.output, t_start, progress)
    return _export_directory(args, src, t_start, progress)


def _export_directory(args, src, t_start: float, progress) -> dict:
    """Quantize into a temporary .eawq beside the output, then write it in the asked layout."""
    from edge_awq.formats import atomic
    from edge_awq.formats.eawq import EawqSource
    from edge_awq.formats.interop import write_directory

    tmp = atomic.temporary(args.output, ".eawq")  # swept like the writers' own
    float_head = argparse.Namespace(**{**vars(args), "head": "fp16"})  # neither layout carries a packed head
    try:
        info = _export_eawq(float_head, src, tmp, t_start, progress)
        write_directory(EawqSource(tmp), args.output, args.format)
    finally:
        atomic.remove(tmp)
    from edge_awq.formats.eawq import stored_bits_per_weight
    from edge_awq.formats.sources.hf import HFSource

    stored = {name: t.end - t.begin for name, (_, t) in HFSource(args.output).stored_tensors().items()}
    bpw = stored_bits_per_weight(stored, src.args)
    size = sum(f.stat().st_size for f in args.output.iterdir())
    head = info["text"].splitlines()[0]
    first = (f"wrote {args.output} ({args.format}, {size / 1e6:,.1f} MB): {head.split(': ', 1)[1].split(',')[0]}, "
             f"{bpw:.3f} bits per quantized weight")
    info.update(output=str(args.output), bytes=size, bits_per_weight=bpw,
                text="\n".join([first, *info["text"].splitlines()[1:]]))
    return info


def _export_eawq(args, src, output: Path, t_start: float, progress) -> dict:
    import numpy as np

    from edge_awq.formats.eawq import HEAD_BITS, EawqWriter, packed_head_arrays, tensor_specs
    from edge_awq.formats.load import inv_freq

    from edge_awq.offline.calibrate import calibration_blocks
    from edge_awq.config import resolve_group_size
    from edge_awq.mixed import head_group

    from edge_awq.offline.layerwise import QuantArgs, quantize_model
    from edge_awq.offline.torch_ops import TorchOps
    from edge_awq.offline.report import summary

    mixed = args.budget is not None or args.fit is not None
    qa = QuantArgs(args.bits, head_group(src.args) if mixed else resolve_group_size(src.args, args.group_size), args.method,
                   args.duo_scaling, not args.no_clip)
    tok = src.tokenizer()
    t0 = time.perf_counter()
    blocks, calib = calibration_blocks(args.calib, tok, args.n_samples, args.seqlen, args.calib_sampling)
    t_calib = time.perf_counter() - t0
    # the search is chosen for the blocks the text gave, which a short text makes fewer than --n-samples
    qa = dataclasses.replace(qa, **_search(args, len(blocks)))
    allocation = None
    if mixed:
        qa, allocation = _allocate(args, src, blocks, calib, qa, progress)
    tok_bytes, tok_fields = tok.serialize()
    specs = tensor_specs(src.args, qa.bits, qa.group_for, len(tok_bytes), args.head, linear=_linear_specs(qa))
    a = src.args
    reserve = (1 << 16) + 2 * len(json.dumps(tok_fields))  # room for the metadata in the header
    if progress is not None:
        progress.start(a.n_layers, qa.method)
    on_layer = progress.layer_done if progress is not None else (lambda rep: None)
    on_phase = progress.phase if progress is not None else (lambda i, name: None)
    with EawqWriter(output, specs, reserve) as writer:
        writer.add("tokenizer", np.frombuffer(tok_bytes, dtype=np.uint8))
        writer.add("rope_inv_freq", inv_freq(src))
        writer.add("tok_embeddings", np.asarray(src.get("tok_embeddings"), dtype=np.float16))
        with _CtrlC() as ctrl_c:
            reports = quantize_model(src, blocks, qa, writer, specs, TorchOps(args.device), args.device,
                                     ctrl_c.checked(on_layer), ctrl_c.checked(on_phase))
        writer.add("norm", np.asarray(src.get("norm"), dtype=np.float16))
        # the head packed from the float16 values the file (and any directory made from it) keeps: reproducible
        head = np.asarray(src.get("tok_embeddings" if a.tied_embeddings or not src.has("output") else "output"),
                          np.float16)
        if args.head in HEAD_BITS:
            for name, t in packed_head_arrays(head, HEAD_BITS[args.head], qa.group_for(a.dim)).items():
                writer.add(name, t)
        elif not a.tied_embeddings:
            writer.add("output", np.asarray(head, dtype=np.float16))
        meta = _metadata(src, qa, calib, tok_fields, args.head)
        if allocation is not None:
            meta["quantization"]["allocation"] = {k: v for k, v in allocation.items() if k != "seconds"}
        writer.close(meta)
    return summary(output, a, qa, reports, t_calib, time.perf_counter() - t_start, allocation,
                   n_blocks=len(blocks))


def _search(args, n_blocks: int) -> dict:
    """The search's settings: those given (the others exact), the exact ones (--exact), or the default for
    n_blocks calibration blocks."""
    from edge_awq.offline.layerwise import EXACT_SEARCH, default_search

    given = {k: getattr(args, k) for k in SEARCH if getattr(args, k) is not None}
    if args.exact or given:
        return {**EXACT_SEARCH, **given}
    return default_search(n_blocks, args.device)


def _linear_specs(qa):
    """tensor_specs' linear(prefix, out, in, bias) for a mixed file (None for one format)."""
    from edge_awq.formats.eawq import linear_specs

    if not qa.formats:
        return None
    return lambda prefix, out_f, in_f, bias: linear_specs(prefix, out_f, in_f, qa.formats[prefix].bits,
                                                          qa.formats[prefix].group_size, bias)


def _allocate(args, src, blocks, calib: dict, qa, progress):
    """The formats under the budget (--budget, or --fit's from the plan), from the sensitivity table measured
    now or kept in --sensitivity. Returns the QuantArgs that carry them and what the metadata records."""
    import dataclasses

    from edge_awq.errors import InputError
    from edge_awq.mixed import candidates, linear_names, mix_summary, predominant, tile_variant, tile_variants
    from edge_awq.plan import KERNEL_VARIANT_BYTES, device_or_memory, linear_budget, size

    from edge_awq.offline.allocate import Impossible, allocate, allocate_with_kernels
    from edge_awq.offline.sensitivity import WEIGHTING, Sensitivity, measure, settings_of
    from edge_awq.offline.torch_ops import TorchOps

    a = src.args
    if args.budget is not None:
        budget = int(args.budget * a.linear_params / 8)
        asked = {"budget_bits_per_weight": args.budget}
    else:
        device = device_or_memory(args.fit)
        budget = linear_budget(a, device, args.ctx, args.kv_dtype, args.head, qa.group_size)
        asked = {"fit": args.fit, "ctx": args.ctx, "kv_dtype": args.kv_dtype}
        if budget <= 0:
            raise InputError(f"--fit {args.fit}: at --ctx {args.ctx} even the embedding, KV cache and runtime take "
                             f"{size(-budget).strip()} more than it holds, before any weights: a smaller --ctx, "
                             "--kv-dtype int8, or a larger device")
    settings = settings_of(src, calib, qa)
    table = Sensitivity.load(args.sensitivity, settings) if args.sensitivity is not None else None
    measured = table is None
    if table is None:
        if progress is not None:
            progress.start(a.n_layers, "sensitivity")
        table = measure(src, blocks, qa, settings, TorchOps(args.device), args.device,
                        *((progress.phase, progress.advance) if progress is not None else ()))
        if args.sensitivity is not None:
            table.save(args.sensitivity)
    t0 = time.perf_counter()
    names = linear_names(a)
    options = [candidates(in_f) for _, _, in_f in names]
    costs = [[f.nbytes(out_f, in_f) for f in fs] for (_, out_f, in_f), fs in zip(names, options)]
    errors = [[table.weighted(prefix, str(f)) for f in fs] for (prefix, _, _), fs in zip(names, options)]
    try:
        if args.budget is not None:
            picked = allocate(costs, errors, budget)
        else:  # the plan's runtime holds one tile variant's kernels: each further one comes out of the budget
            kinds = [[tile_variant(f) for f in fs] for fs in options]
            picked = allocate_with_kernels(costs, errors, kinds, budget, KERNEL_VARIANT_BYTES)
    except Impossible as e:
        what = f"--budget {args.budget}" if args.budget is not None else f"--fit {args.fit} at --ctx {args.ctx}"
        raise InputError(f"{what}: the decoder's linears need at least {8 * e.need / a.linear_params:.3f} bits per "
                         f"weight ({size(e.need).strip()}), the budget allows {8 * max(budget, 0) / a.linear_params:.3f}"
                         f" ({size(max(budget, 0)).strip()}): a larger budget or device, or a shorter context"
                         ) from None
    formats = {prefix: fs[j] for (prefix, _, _), fs, j in zip(names, options, picked)}
    used = sum(c[j] for c, j in zip(costs, picked))
    top = predominant(formats, a)
    seconds = {"sensitivity": table.seconds if measured else 0.0, "allocate": time.perf_counter() - t0}
    allocation = {**asked, "budget_bytes": budget, "bytes": used, "bits_per_weight": 8 * used / a.linear_params,
                  "predicted_error": float(sum(e[j] for e, j in zip(errors, picked))), "weighting": WEIGHTING,
                  "mix": {k: round(v, 4) for k, v in mix_summary(formats, a).items()},
                  "tile_variants": tile_variants(formats.values()),
                  "sensitivity": "measured" if measured else str(args.sensitivity), "seconds": seconds}
    return dataclasses.replace(qa, formats=formats, bits=top.bits), allocation
