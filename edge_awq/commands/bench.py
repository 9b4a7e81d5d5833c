"""``edge-awq bench``: prefill and decode speed, time to first token, peak memory, and each
linear kernel's effective bandwidth against this machine's measured read bandwidth."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import resource
import time

import numpy as np

from edge_awq.commands import flags


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=".eawq file (or any model edge-awq reads)")
    p.add_argument("--backend", default="auto", help="cuda, numba, reference or auto (default)")
    p.add_argument("--prefill", type=flags.positive, nargs="+", default=[128, 512],
                   help="prompt lengths (default 128 512)")
    p.add_argument("--decode", type=flags.int_range(2, what="decode tokens"), default=128,
                   help="tokens to decode (default 128)")
    p.add_argument("--repeat", type=flags.positive, default=3, help="runs of each measurement; the best is kept")
    flags.add_activations(p)
    p.add_argument("--memory", type=flags.size, default=None,
                   help="memory the model may use, e.g. 2GiB (default: what is free)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the check of an .eawq file's checksums (done once per file on this machine otherwise)")
    p.add_argument("--json", action="store_true")


def read_bandwidth(nbytes: int = 1 << 30, repeat: int = 3) -> float:
    """Bytes per second that a parallel sum over a large array reads (the bound a GEMV can reach)."""
    from edge_awq.backends.numba.kernels import parallel_sum

    a = np.ones(nbytes // 4, np.float32)
    parallel_sum(a[:1024])
    best = min(_timed(lambda: parallel_sum(a)) for _ in range(repeat))
    return a.nbytes / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _linear_bytes_shape(w) -> tuple[int, tuple[int, int]]:
    """The bytes one token reads of a linear, as the backend holds it, and its shape (out, in)."""
    blocked = getattr(w, "a8", None) or getattr(w, "blocked", None)
    if blocked is not None:  # numba's repacked layouts
        arrays = (blocked.words, blocked.scales, blocked.zeros)
    elif hasattr(w, "buffers"):  # cuda: its device buffers
        arrays = [b for b in w.buffers if b is not None]
    elif hasattr(w, "qbytes"):  # numba, the file's own order
        arrays = (w.qbytes, w.scale_bits, w.zero_bytes)
    elif hasattr(w, "qweight"):
        arrays = (w.qweight, w.scales, w.zeros)
    else:
        return w.weight.nbytes, tuple(w.weight.shape)
    return sum(a.nbytes for a in arrays), tuple(w.shape)


def _count(working_set: int, nbytes: int) -> int:
    """Copies of nbytes that make up working_set, at most MAX_COPIES (a tiny weight's row is then the call's
    overhead more than memory's, and the JSON's working_set_bytes says how much was read)."""
    return max(1, min(MAX_COPIES, -(-working_set // max(nbytes, 1))))


def _copies(lin, working_set: int) -> list:
    """lin and copies of it (its arrays copied: new memory) to make up working_set bytes, so that the
    timed loop reads each from memory rather than from a cache; lin alone where it cannot be copied
    (a device backend's buffers)."""
    nbytes, _ = _linear_bytes_shape(lin)
    try:
        return [lin] + [copy.deepcopy(lin) for _ in range(_count(working_set, nbytes) - 1)]
    except (TypeError, AttributeError, ValueError):
        return [lin]


def _cold_rate(name: str, lins: list, ops, repeat: int) -> dict:
    """One token through each of lins in turn, the best of repeat rounds: seconds per linear, and GB/s."""
    nbytes, shape = _linear_bytes_shape(lins[0])
    x = np.random.default_rng(0).standard_normal((1, shape[1])).astype(np.float32)
    x = ops.upload(x) if hasattr(ops, "upload") else x  # a device backend: time the kernel, not the copy
    for w in lins:  # prepares each (a W4 on first use) and compiles
        ops.to_host(ops.linear(x, w))

    def round_():
        for w in lins:
            ops.to_host(ops.linear(x, w))

    rounds = max(repeat, 10, -(-40 // len(lins)))  # at least ten rounds and 40 timed calls
    t = min(_timed(round_) for _ in range(rounds)) / len(lins)
    return {"linear": name, "shape": list(shape), "seconds": t, "gb_per_s": nbytes / t / 1e9,
            "working_set_bytes": nbytes * len(lins), "copies": len(lins)}


def kernel_rates(lw, output, ops, repeat: int, working_set: int) -> list[dict]:
    """Decode-step (one token) time and effective GB/s of each linear of layer 0 and of the head (as prepared),
    each timed over copies of itself that make up working_set bytes."""
    rows = []
    for name, lin in [(n, getattr(lw, n)) for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")] + [("output", output)]:
        rows.append(_cold_rate(name, _copies(lin, working_set), ops, repeat))
    return rows


GEMV_SHAPES = ((4096, 4096), (11008, 4096))  # a 7B model's attention and MLP layers
COLD_FACTOR = 4  # each kernel row reads a working set of this many times the last-level cache
ASSUMED_LLC = 32 << 20  # when the system does not say
MAX_COPIES = 4096
DECODE_PROMPT = 16  # tokens of prompt before the timed decode


def gemv_layers(ops, repeat: int, working_set: int, group_size: int = 128) -> list[dict]:
    """One-token time and effective GB/s of W4 (group 128) layers of 7B shapes, random weights, each timed
    over copies that make up working_set bytes."""
    from edge_awq.pack import pack_linear

    rows = []
    rng = np.random.default_rng(0)
    for out_f, in_f in GEMV_SHAPES:
        lin = pack_linear(rng.standard_normal((out_f, in_f), dtype=np.float32), 4, group_size)
        ops.linear(np.zeros((1, in_f), np.float32), lin)  # as the backend holds it, to count its bytes
        prepared = ops._prepared(lin) if hasattr(ops, "_prepared") else lin
        n = _count(working_set, _linear_bytes_shape(prepared)[0])
        lins = [lin] + [copy.deepcopy(lin) for _ in range(n - 1)]  # host copies: each prepared on first use
        row = _cold_rate(f"W4 g{group_size}", lins, ops, repeat)
        row["gb_per_s"] = _linear_bytes_shape(prepared)[0] / row["seconds"] / 1e9
        row["working_set_bytes"] = _linear_bytes_shape(prepared)[0] * n
        rows.append(row)
        del lins, prepared
    return rows


def machine(ops) -> dict:
    """The CPU, its last-level cache, and the instruction set of the kernels that ran."""
    from edge_awq.backends.host import cpu_name, last_level_cache

    isa = getattr(ops, "isa", None) or getattr(ops, "device_name", None) or "numpy"
    return {"cpu": cpu_name(), "llc_bytes": last_level_cache(), "isa": isa,
            "activations": getattr(ops, "activations", None)}


def run(args: argparse.Namespace) -> int:
    from edge_awq.api import load
    from edge_awq.generate import SamplingArgs, generate
    from edge_awq.model import forward

    n_ctx = max(*args.prefill, DECODE_PROMPT) + args.decode
    llm = load(args.model, backend=args.backend, ctx=n_ctx, memory=args.memory,
               verify="never" if args.no_verify else "cached", activations=args.activations)
    w, ops, tok = llm.weights, llm.ops, llm.tokenizer
    probe = (w.layers[0], w.output)  # what the kernel rows time, as the backend holds them
    rng = np.random.default_rng(0)
    res = {"model": str(args.model), "backend": ops.name, "prefill": {}}
    cache = llm.cache
    for n in args.prefill:
        prompt = rng.integers(3, w.args.vocab_size, n)
        forward(w, prompt[:8], 0, cache, ops, last_only=True)  # warm-up (compiles, converts)
        t = min(_timed(lambda: forward(w, prompt, 0, cache, ops, last_only=True)) for _ in range(args.repeat))
        res["prefill"][str(n)] = {"tokens_per_s": n / t, "time_to_first_token_s": t}
    prompt = list(rng.integers(3, w.args.vocab_size, DECODE_PROMPT))
    no_eos = dataclasses.replace(tok, eos_ids=())  # decode the full count
    for _ in generate(w, ops, no_eos, prompt, SamplingArgs(max_new_tokens=2), cache):  # warm-up: compile the decode path
        pass
    t0 = time.perf_counter()
    steps = [time.perf_counter() for _ in generate(w, ops, no_eos, prompt, SamplingArgs(max_new_tokens=args.decode),
                                                   cache)]
    res["decode_tokens_per_s"] = (len(steps) - 1) / (steps[-1] - steps[0]) if len(steps) > 1 else 0.0
    res["time_to_first_token_s_16"] = steps[0] - t0
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the probes below
    res.update(machine(ops))
    llc = res["llc_bytes"] or ASSUMED_LLC
    res["cache_assumed_bytes"] = llc
    working_set = COLD_FACTOR * llc
    res["kernels"] = kernel_rates(*probe, ops, args.repeat, working_set) + gemv_layers(ops, args.repeat, working_set)
    res["read_gb_per_s"] = read_bandwidth() / 1e9
    print(json.dumps(res) if args.json else _table(res))
    return 0


def _table(r: dict) -> str:
    bw = r["read_gb_per_s"]
    act = f", {r['activations']} activations" if r.get("activations") else ""
    lines = [f"{r['model']} on {r['backend']} ({r['isa']}{act}); {r['cpu']}",
             f"measured read bandwidth {bw:.1f} GB/s; kernels timed over {r['cache_assumed_bytes'] * COLD_FACTOR >> 20} MiB "
             f"({COLD_FACTOR} x the {r['cache_assumed_bytes'] >> 20} MiB last-level cache"
             f"{'' if r['llc_bytes'] else ', assumed'})"]
    for n, p in r["prefill"].items():
        lines.append(f"prefill {n:>4} tokens: {p['tokens_per_s']:8.1f} tokens/s (time to first token {p['time_to_first_token_s']:.3f}s)")
    lines.append(f"decode: {r['decode_tokens_per_s']:.1f} tokens/s; peak RSS {r['peak_rss_mb']:.0f} MB")
    lines.append(f"{'linear':9s} {'shape':>12s} {'ms':>8s} {'GB/s':>7s} {'of bound':>9s}")
    for k in r["kernels"]:
        shape = "x".join(map(str, k["shape"]))
        lines.append(f"{k['linear']:9s} {shape:>12s} {k['seconds'] * 1e3:8.3f} {k['gb_per_s']:7.2f} {k['gb_per_s'] / bw:8.0%}")
    return "\n".join(lines)
