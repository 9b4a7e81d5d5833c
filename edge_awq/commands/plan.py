"""``edge-awq plan``: will a model fit a device? The memory plan (``plan.py``), printed before anything is loaded."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_awq.commands import flags
from edge_awq.errors import ConfigError, InputError
from edge_awq.plan import DEVICES, PRESETS, device_for, make_plan, model_args, table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=f"config.json, Hugging Face directory, .eawq file or a preset: {', '.join(PRESETS)}")
    p.add_argument("--device", help=f"device profile: {', '.join(DEVICES)}")
    p.add_argument("--memory", type=flags.size, help="usable memory instead of a profile, e.g. 24GiB")
    p.add_argument("--ctx", type=flags.context, default=None,
                   help="context length in tokens (default: the model's, at most 4096)")
    p.add_argument("--batch", type=flags.int_range(1, 4096, "the batch"), default=1,
                   help="sequences served at once (default 1)")
    p.add_argument("--kv-dtype", choices=("fp16", "int8"), default="fp16")
    p.add_argument("--prefill-chunk", type=flags.int_range(1, 1 << 16, "the prefill chunk"), default=512,
                   help="prompt tokens run per step (default 512)")
    p.add_argument("--bits", type=int, choices=(3, 4), default=None, help="for a model not yet packed (default 4)")
    p.add_argument("--group-size", type=flags.group_size, default=None,
                   help="for a model not yet packed (default 128; channel: one group a row)")
    p.add_argument("--head", choices=("fp16", "int8", "w4"), default=None, help="for a model not yet packed")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    a, quant, nbytes = model_args(args.model)
    device = device_for(args.device, args.memory)
    ctx = args.ctx or min(a.max_seq_len, 4096)
    if quant and (args.bits or args.group_size or args.head):
        raise InputError(f"{args.model} is packed already: --bits, --group-size and --head are for a model not yet "
                         "packed")
    if quant:
        group = quant.get("group_size", 128)
    else:  # what an export would use: the size asked for, checked; by default 128 where it divides every layer
        from edge_awq.config import resolve_group_size

        asked = args.group_size or 128
        try:
            group = resolve_group_size(a, asked)
        except ConfigError:
            if args.group_size is not None:
                raise
            group = resolve_group_size(a, "auto")
    from edge_awq.mixed import describe, formats_of, tile_variants

    p = make_plan(a, Path(args.model).name, device, ctx, args.batch, args.kv_dtype, args.prefill_chunk,
                  args.bits or quant.get("bits", 4), group, args.head or quant.get("head", "fp16"), nbytes,
                  describe(quant, a) if quant else "", tile_variants(formats_of(quant).values()))
    print(p.to_json() if args.json else table(p))
    return 0 if p.fits else 2
