"""Memory planning: will a model fit a device, before anything is loaded?

``make_plan`` adds up what the runtime will hold: the packed decoder weights
(counted tensor by tensor from the same ``tensor_specs`` the exporter writes),
the fp16 embedding and head, the KV cache it preallocates, the prefill
workspace of one chunk, the runtime itself (Python, numpy, numba and its
compiled kernels, measured) and the memory the OS keeps. ``edge-awq plan``
prints it; ``chat`` and ``bench`` check it before reading a weight.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_awq.config import ModelArgs, expected_shapes
from edge_awq.errors import DoesNotFit, InputError

GIB, MIB = 1 << 30, 1 << 20

# Published shapes (the models' config.json on the Hugging Face Hub).
PRESETS = {
    "llama-2-7b": ModelArgs("llama", 4096, 11008, 32, 32, 32, 128, 32000, 4096),
    "llama-2-13b": ModelArgs("llama", 5120, 13824, 40, 40, 40, 128, 32000, 4096),
    "llama-2-70b": ModelArgs("llama", 8192, 28672, 80, 64, 8, 128, 32000, 4096),
    "llama-3-8b": ModelArgs("llama", 4096, 14336, 32, 32, 8, 128, 128256, 8192, rope_theta=500000.0),
    "llama-3-70b": ModelArgs("llama", 8192, 28672, 80, 64, 8, 128, 128256, 8192, rope_theta=500000.0),
    "mistral-7b": ModelArgs("mistral", 4096, 14336, 32, 32, 8, 128, 32000, 32768),
    "qwen2.5-7b": ModelArgs("qwen2", 3584, 18944, 28, 28, 4, 128, 152064, 32768, qkv_bias=True),
    "smollm2-135m": ModelArgs("llama", 576, 1536, 30, 9, 3, 64, 49152, 8192, tied_embeddings=True),
}


@dataclass(frozen=True)
class Device:
    name: str
    memory: int  # bytes the kernel reports as MemTotal
    reserve: int  # bytes the OS, its services and (Jetson) the GPU driver keep
    bandwidth: float  # bytes/s, the memory's peak (decode cannot beat memory / bandwidth)
    source: str

    @property
    def usable(self) -> int:
        return self.memory - self.reserve


# Memory: the board's DRAM less what firmware and kernel carve out before Linux counts it
# (MemTotal); reserve: a headless system with its services, and on Jetson the CUDA driver's
# own allocations. Both are estimates from the boards' documentation: measure your own box
# (`free -b`, MemAvailable with nothing running) and pass `--memory` for an exact verdict.
DEVICES = {
    "jetson-agx-orin-64gb": Device("Jetson AGX Orin 64GB", 62 * GIB, 3 * GIB, 204.8e9,
                                   "64 GB LPDDR5 (NVIDIA data sheet), ~62 GiB MemTotal under JetPack 6; 3 GiB for a "
                                   "headless L4T and the CUDA driver"),
    "jetson-agx-orin-32gb": Device("Jetson AGX Orin 32GB", 30 * GIB, 3 * GIB, 204.8e9,
                                   "32 GB LPDDR5 (NVIDIA data sheet), ~30 GiB MemTotal; 3 GiB for L4T and the driver"),
    "jetson-orin-nx-16gb": Device("Jetson Orin NX 16GB", 15 * GIB, 2 * GIB, 102.4e9,
                                  "16 GB LPDDR5 (NVIDIA data sheet), ~15 GiB MemTotal; 2 GiB for L4T and the driver"),
    "jetson-orin-nano-8gb": Device("Jetson Orin Nano 8GB", 7 * GIB + 512 * MIB, 1536 * MIB, 68e9,
                                   "8 GB LPDDR5 (NVIDIA data sheet), ~7.5 GiB MemTotal; 1.5 GiB for L4T and the driver"),
    "rpi5-8gb": Device("Raspberry Pi 5 8GB", 7 * GIB + 768 * MIB, 512 * MIB, 17.1e9,
                       "8 GB LPDDR4X-4267 on a 32-bit bus (Raspberry Pi product brief), ~7.75 GiB MemTotal; "
                       "512 MiB for Raspberry Pi OS Lite"),
}

# Peak RSS of `edge-awq chat --prompt` with a model of 1.3 MB (stories260K): the interpreter,
# numpy, numba/LLVM and the cached kernels; 168 MB measured on x86-64 with numba 0.68.
RUNTIME_OVERHEAD = 160 * MIB
# The integer kernels hold one tile per (bit width, chunk columns) variant their weights need
# (``backends.numba.gemv_i8.kernel_set``); the runtime line above holds a uniform file's one. Each
# further variant of a mixed file costs its compiled code in every kernel and in the decode step:
# SmolLM2 chat at ctx 1024 with seven variants against one, 2.3 MiB a variant on a Zen 4 EPYC and
# 2.7 on a Xeon (all ten against one), numba 0.68.
KERNEL_VARIANT_BYTES = 5 * MIB // 2
# The tokenizer in memory (vocabulary, merges, the chat template's environment): SmolLM2's
# 49,152 entries take 47 MiB once loaded, about 1 kB an entry.
TOKENIZER_BYTES_PER_ENTRY = 1000
PAGE = 4096


@dataclass(frozen=True)
class Plan:
    model: str
    device: str
    device_source: str
    ctx: int
    batch: int
    kv_dtype: str
    prefill_chunk: int
    bits: int
    group_size: int
    head: str
    lines: dict  # what -> bytes
    total: int
    usable: int
    fits: bool
    max_ctx: int  # the longest context that fits (0: none)
    advice: list
    decode_bound_tokens_per_s: float | None
    weights_bytes: int  # what the file holds: packed layers, fp16 embedding and head
    mix: str = ""  # a mixed-precision file's formats ("mixed w4g64 48%, ..."), shown instead of bits and group

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(i?)B?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'24GiB', '64MiB', '16GB', '512M', '1073741824' -> bytes (InputError otherwise)."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise InputError(f"--memory {text!r}: give a size such as 24GiB, 16GB or 512MiB")
    base = 1024 if m.group(3) or not m.group(2) else 1000
    n = int(float(m.group(1)) * base ** "BKMGT".index((m.group(2) or "B").upper()))
    if n <= 0:
        raise InputError(f"--memory {text!r}: a memory size must be positive")
    return n


def kv_bytes_per_token(a: ModelArgs, kv_dtype: str) -> int:
    """KV cache bytes per token and sequence: keys and values of every layer and KV head."""
    per_head = a.head_dim * (2 if kv_dtype == "fp16" else 1) + (0 if kv_dtype == "fp16" else 4)  # int8: + f32 scale
    return a.n_layers * a.n_kv_heads * 2 * per_head


def workspace_bytes(a: ModelArgs, chunk: int, ctx: int, group_size: int) -> int:
    """float32 activations of one prefill chunk (numba backend), with the dequantization buffers."""
    shapes = expected_shapes(a)
    q_out, kv_out = shapes["wq"][0], shapes["wk"][0]
    per_token = 4 * (4 * a.dim + 2 * q_out + 2 * kv_out + 3 * a.hidden_dim)
    dequant = 2 * 256 * max(a.dim, a.hidden_dim) * 4  # DEQUANT_ROWS rows of the widest input, two planes
    # a prompt's attention: the KV heads' keys and values as float32, and a score row per thread
    scores = 2 * a.n_kv_heads * ctx * a.head_dim * 4 + 2 * ctx * 4
    logits = 2 * a.vocab_size * 4
    return chunk * per_token + dequant + scores + logits


def _group(in_features: int, group_size) -> int:
    """The group a linear of this width gets: the size asked where it divides, else the whole row."""
    if group_size == "channel" or in_features % int(group_size):
        return in_features
    return int(group_size)


def spec_bytes(a: ModelArgs, bits: int, group_size, head: str) -> dict[str, int]:
    """Tensor name -> bytes of the .eawq file an export at these settings writes (from ``tensor_specs``)."""
    import numpy as np

    from edge_awq.formats.eawq import tensor_specs

    specs = tensor_specs(a, bits, lambda n: _group(n, group_size), 0, head)
    return {name: int(np.dtype(dt).itemsize * np.prod(shape)) for name, dt, shape in specs if name != "tokenizer"}


def _kind(name: str) -> str:
    """What a tensor is, by its canonical (.eawq) or Hugging Face name."""
    if name.startswith(("layers.", "model.layers.")):
        return "layers"
    if name in ("tok_embeddings", "model.embed_tokens.weight"):
        return "embedding"
    if name.startswith(("output", "lm_head")):
        return "head"
    return "other"  # the final norm, the RoPE table


def weight_lines(a: ModelArgs, bits: int, group_size, head: str, ctx: int, nbytes: dict[str, int] | None = None) -> dict:
    """Bytes of the packed layers, the embedding rows the runtime touches and the head.

    nbytes: tensor name -> bytes as the runtime holds them (a file's own tensors: ``resident_bytes``);
    by default those an export at these settings writes.
    """
    nbytes = spec_bytes(a, bits, group_size, head) if nbytes is None else nbytes
    by_kind: dict[str, int] = {}
    for name, n in nbytes.items():
        by_kind[_kind(name)] = by_kind.get(_kind(name), 0) + n
    emb, head_bytes = by_kind.get("embedding", 0), by_kind.get("head", 0)
    lines = {"packed decoder weights": by_kind.get("layers", 0)}
    if head_bytes or not a.tied_embeddings:  # the table is only gathered: pages of the rows used
        lines["fp16 embedding (rows gathered)"] = min(emb, ctx * max(PAGE, a.dim * 2))
        lines[f"output head ({head})"] = head_bytes or emb
    else:
        lines["fp16 embedding = head (tied)"] = emb
    lines["norms and RoPE tables"] = by_kind.get("other", 0)
    return lines


def file_weight_bytes(a: ModelArgs, bits: int, group_size, head: str) -> int:
    """Bytes of every weight tensor an export writes (packed layers, norms, fp16 embedding, head)."""
    return sum(spec_bytes(a, bits, group_size, head).values())


def make_plan(a: ModelArgs, model: str, device: Device, ctx: int, batch: int = 1, kv_dtype: str = "fp16",
              prefill_chunk: int = 512, bits: int = 4, group_size: int = 128, head: str = "fp16",
              nbytes: dict[str, int] | None = None, mix: str = "", variants: int = 1) -> Plan:
    """The memory plan; nbytes: the model's own tensors (name -> bytes held), else those of an export;
    mix: a mixed file's formats in words (``mixed.describe``); variants: the integer kernels' tile variants
    its linears need (``mixed.tile_variants``), one for a file with one format."""
    if ctx < 1 or batch < 1 or prefill_chunk < 1:
        raise InputError("--ctx, --batch and --prefill-chunk must be at least 1")
    if ctx > a.max_seq_len:
        raise InputError(f"--ctx {ctx:,}: the model is made for at most {a.max_seq_len:,} tokens")
    def lines_for(n: int) -> dict:
        lines = weight_lines(a, bits, group_size, head, n, nbytes)
        lines[f"KV cache ({kv_dtype}, {n:,} tokens x {batch})"] = kv_tok * n
        lines[f"prefill workspace ({min(prefill_chunk, n)} tokens)"] = workspace_bytes(
            a, min(prefill_chunk, n), n, group_size) * batch
        lines["runtime (Python, numpy, numba)"] = RUNTIME_OVERHEAD
        if variants > 1:
            lines[f"kernels of {variants - 1} more tile variant{'s' if variants > 2 else ''}"] = \
                (variants - 1) * KERNEL_VARIANT_BYTES
        lines["tokenizer"] = a.vocab_size * TOKENIZER_BYTES_PER_ENTRY
        return lines

    kv_tok = kv_bytes_per_token(a, kv_dtype) * batch
    lines = lines_for(ctx)
    fixed = weight_lines(a, bits, group_size, head, ctx, nbytes)
    total = sum(lines.values())
    usable = device.usable
    lo, hi = 0, a.max_seq_len  # the largest context that fits: totals grow with the context
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(lines_for(mid).values()) <= usable else (lo, mid - 1)
    max_ctx = lo
    advice = []
    if total > usable:
        if max_ctx:
            advice.append(f"a context of {max_ctx:,} tokens fits (--ctx {max_ctx})")
        if kv_dtype == "fp16":
            saved = kv_tok * ctx - kv_bytes_per_token(a, "int8") * batch * ctx
            advice.append(f"an int8 KV cache saves {size(saved).strip()} (--kv-dtype int8)")
        if bits == 4:
            advice.append(f"3-bit weights save {size(fixed['packed decoder weights'] // 4).strip()} at a "
                          "quality cost (export --bits 3)")
        advice.append("or a device with more memory")
    elif isinstance(group_size, int) and group_size > 32:
        finer = weight_lines(a, bits, group_size // 2, head, ctx)["packed decoder weights"]
        now = weight_lines(a, bits, group_size, head, ctx)["packed decoder weights"]
        advice.append(f"group size {group_size // 2} (finer, better quality) would cost {size(finer - now).strip()} more")
    per_token_read = fixed["packed decoder weights"] + fixed.get(f"output head ({head})",
                                                                 fixed.get("fp16 embedding = head (tied)", 0))
    bound = device.bandwidth / per_token_read if device.bandwidth else None
    weights = sum(nbytes.values()) if nbytes is not None else file_weight_bytes(a, bits, group_size, head)
    return Plan(model, device.name, device.source, ctx, batch, kv_dtype, prefill_chunk, bits, group_size, head,
                lines, total, usable, total <= usable, int(max_ctx), advice, bound, weights, mix)


def linear_budget(a: ModelArgs, device: Device, ctx: int, kv_dtype: str = "fp16", head: str = "fp16",
                  group_size=128) -> int:
    """Bytes left for the decoder linears' packed tensors when everything else the plan counts at this context
    (embedding, head, norms, KV cache, workspace, runtime with one tile variant's kernels) is held on device:
    the largest mixed-precision file that still fits (``export --fit``), less ``KERNEL_VARIANT_BYTES`` for each
    further variant its formats need (the allocator takes those out as it chooses them). Negative when even
    without the linears it does not fit."""
    from edge_awq.formats.eawq import LINEAR_STORAGE

    rest = {k: v for k, v in spec_bytes(a, 4, group_size, head).items() if not LINEAR_STORAGE.match(k)}
    p = make_plan(a, "the model", device, ctx, kv_dtype=kv_dtype, group_size=group_size, head=head, nbytes=rest)
    return p.usable - p.total


def device_or_memory(text: str) -> Device:
    """A device profile by name, or a memory size ('355MiB', '16GB')."""
    return DEVICES[text] if text in DEVICES else device_for(None, text)


def size(n: int) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{n / GIB:8.2f} GiB" if abs(n) >= GIB else f"{n / MIB:8.1f} MiB"


def table(p: Plan) -> str:
    width = max(len(k) for k in p.lines) + 2
    out = [f"{p.model} on {p.device}: {p.mix or f'W{p.bits} group {p.group_size}'}, head {p.head}, "
           f"context {p.ctx:,}, batch {p.batch}"]
    for k, v in p.lines.items():
        out.append(f"  {k:<{width}} {size(v)}")
    out.append(f"  {'total':<{width}} {size(p.total)}")
    out.append(f"  {'usable on the device':<{width}} {size(p.usable)}  ({p.device_source})")
    out.append(f"weights (packed layers, embedding and head): {p.weights_bytes / 1e9:.2f} GB")
    out.append(f"verdict: fits, {size(p.usable - p.total).strip()} to spare" if p.fits else
               f"verdict: does NOT fit, {size(p.total - p.usable).strip()} short")
    out.append(f"longest context that fits: {p.max_ctx:,} tokens" if p.max_ctx else "no context fits")
    if p.decode_bound_tokens_per_s:
        out.append(f"decode bound by memory bandwidth: {p.decode_bound_tokens_per_s:.1f} tokens/s")
    out += [f"  - {a}" for a in p.advice]
    return "\n".join(out)


def model_args(model: str) -> tuple[ModelArgs, dict, dict | None]:
    """Architecture of a preset, config.json, Hugging Face directory or .eawq file; with its quantization and
    its tensors' bytes (``load.resident_bytes``) if packed."""
    if model in PRESETS:
        return PRESETS[model], {}, None
    path = Path(model)
    if not path.exists():
        raise InputError(f"{model}: no such file, and not a preset ({', '.join(PRESETS)})")
    if path.name == "config.json":
        from edge_awq.config import from_hf_config
        from edge_awq.formats.sources.hf import _read_json

        return from_hf_config(_read_json(path), str(path)), {}, None
    if path.is_dir() and not (path / "config.json").is_file():
        raise InputError(f"{model}: no config.json there")
    from edge_awq.formats.load import open_source, resident_bytes

    src = open_source(path)
    quant = getattr(src, "quantization", None) or {}
    return src.args, quant, resident_bytes(src) if quant else None


def device_for(name: str | None, memory: str | None) -> Device:
    if memory is not None:
        size = parse_size(memory)
        return Device(f"{memory} of memory", size, 0, 0.0, "--memory, taken as all usable")
    if name is None:
        raise InputError("name a --device profile or give --memory SIZE")
    if name not in DEVICES:
        raise InputError(f"--device {name}: unknown; profiles are {', '.join(DEVICES)}")
    return DEVICES[name]


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), or 0 if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_fits(src, model: str, ctx: int, memory: str | None, kv_dtype: str = "fp16") -> Plan | None:
    """The runtime's check before loading a source: refuse (InputError with the plan table) when it will not fit.

    A packed source is counted from its own tensors' bytes. memory: the user's --memory, else this
    machine's MemAvailable. Returns the plan (None if unknown).
    """
    from edge_awq.formats.load import resident_bytes

    a, quant = src.args, getattr(src, "quantization", None) or {}
    nbytes = resident_bytes(src) if quant else None
    if memory is None:
        free = available_memory()
        if not free:
            return None
        device = Device("this machine", free, 0, 0.0, "MemAvailable in /proc/meminfo")
    else:
        device = device_for(None, memory)
    ctx = min(ctx, a.max_seq_len)
    if "bits" in quant:
        from edge_awq.mixed import describe, formats_of, tile_variants

        p = make_plan(a, model, device, ctx, kv_dtype=kv_dtype, bits=quant["bits"], group_size=quant["group_size"],
                      head=quant.get("head", "fp16"), nbytes=nbytes, mix=describe(quant, a),
                      variants=tile_variants(formats_of(quant).values()))
    else:
        p = _fp_plan(a, model, device, ctx)
    if not p.fits:
        raise DoesNotFit(f"{table(p)}\n{model} needs {size(p.total).strip()} and {size(p.usable).strip()} is "
                         "usable: free memory, or take one of the changes above")
    return p


def _fp_plan(a: ModelArgs, model: str, device: Device, ctx: int) -> Plan:
    """A float model (eval and chat of the source): weights as float32 arrays."""
    lines = {"float32 weights": 4 * (a.n_params + a.dim * (2 * a.n_layers + 1)),
             f"KV cache (fp16, {ctx:,} tokens)": kv_bytes_per_token(a, "fp16") * ctx,
             "prefill workspace": workspace_bytes(a, min(512, ctx), ctx, 128),
             "runtime (Python, numpy, numba)": RUNTIME_OVERHEAD,
             "tokenizer": a.vocab_size * TOKENIZER_BYTES_PER_ENTRY}
    total = sum(lines.values())
    return Plan(model, device.name, device.source, ctx, 1, "fp16", 512, 16, 0, "fp32", lines, total, device.usable,
                total <= device.usable, ctx if total <= device.usable else 0, ["quantize it: edge-awq export"], None,
                lines["float32 weights"])
