"""Mixed precision: a format (bit width and group size) per decoder linear.

An export under a budget (``export --budget`` or ``--fit``) stores each decoder linear at the format the
allocator chose; the file's quantization metadata names them (``formats``: tensor prefix -> ``"w4g64"``),
and the loader, the plan and ``inspect`` read them from there. A file without ``formats`` has one format,
its ``bits`` and ``group_size``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edge_awq.config import ModelArgs, expected_shapes
from edge_awq.errors import FormatError

CANDIDATE_BITS = (3, 4, 5, 6, 8)
COARSE_BITS = (5, 6, 8)  # widths offered at the largest dividing group only: finer groups buy little there
CANDIDATE_GROUPS = (128, 64, 32)
_NAME = re.compile(r"^w([34568])g([1-9][0-9]*)$")


@dataclass(frozen=True, order=True)
class LinearFormat:
    """How one linear is stored: ``bits``-bit codes, one fp16 scale and zero point per ``group_size`` inputs."""

    bits: int
    group_size: int

    def __str__(self) -> str:
        return f"w{self.bits}g{self.group_size}"

    @classmethod
    def parse(cls, text: str) -> LinearFormat:
        m = _NAME.match(text)
        if not m:
            raise ValueError(f"{text!r} is not a linear format (w3g64, w4g128, w8g32 ...)")
        return cls(int(m.group(1)), int(m.group(2)))

    def nbytes(self, out_f: int, in_f: int) -> int:
        """Bytes of the linear's file tensors (codes, scales, zero points), the same the runtime holds."""
        from edge_awq.pack import packed_words

        groups = out_f * (in_f // self.group_size)
        return 4 * out_f * packed_words(in_f, self.bits) + 2 * groups + 4 * packed_words(groups, self.bits)


def candidates(in_f: int, bits=CANDIDATE_BITS, groups=CANDIDATE_GROUPS) -> list[LinearFormat]:
    """The formats a linear of this input width can take: 3 and 4 bits at each group size that divides it,
    5, 6 and 8 bits at the largest only (there a group's scale costs more than a finer group buys: the
    rounding error is already 4-16 times 4-bit's); one group per row where none divides."""
    sizes = [g for g in groups if in_f % g == 0] or [in_f]
    return [LinearFormat(b, g) for b in bits for g in (sizes[:1] if b in COARSE_BITS else sizes)]


def linear_names(a: ModelArgs) -> list[tuple[str, int, int]]:
    """(prefix, out, in) of every decoder linear, in file order."""
    from edge_awq.model import LINEARS

    shapes = expected_shapes(a)
    return [(f"layers.{i}.{n}", *shapes[n]) for i in range(a.n_layers) for n in LINEARS]


def formats_of(quant: dict) -> dict[str, LinearFormat]:
    """A file's per-linear formats from its quantization metadata ({} for a file with one format)."""
    raw = quant.get("formats") or {}
    try:
        return {k: LinearFormat.parse(v) for k, v in raw.items()}
    except ValueError as e:
        raise FormatError(f"quantization formats: {e}; export the file again") from None


def mix_summary(formats: dict[str, LinearFormat], a: ModelArgs) -> dict[str, float]:
    """Share of the decoder's weights at each format, largest first: {"w4g64": 0.62, ...}."""
    weights: dict[str, int] = {}
    for prefix, out_f, in_f in linear_names(a):
        f = formats.get(prefix)
        if f is not None:
            weights[str(f)] = weights.get(str(f), 0) + out_f * in_f
    total = sum(weights.values()) or 1
    return {k: v / total for k, v in sorted(weights.items(), key=lambda kv: -kv[1])}


def tile_variant(f: LinearFormat) -> tuple[int, int] | None:
    """The integer kernels' tile variant a linear in this format needs: its bit width and chunk width
    (``backends.numba.gemv_i8.chunk_columns``: 32 columns for 8-bit codes and for groups that are odd
    multiples of 32, else 64); None for a group they do not take (not a multiple of 32: the float kernels)."""
    if f.group_size % 32:
        return None
    return f.bits, 32 if f.bits == 8 or f.group_size % 64 else 64


def tile_variants(formats) -> int:
    """How many tile variants the integer kernels compile for linears in these formats (at least one): the
    plan counts their code."""
    return max(1, len({v for v in map(tile_variant, formats) if v is not None}))


def predominant(formats: dict[str, LinearFormat], a: ModelArgs) -> LinearFormat:
    """The format that holds the most weights (a mixed file's headline ``bits`` and ``group_size``)."""
    return LinearFormat.parse(next(iter(mix_summary(formats, a))))


def describe(quant: dict, a: ModelArgs) -> str:
    """'mixed w4g64 48%, w3g64 30%, ...' for a mixed file's quantization metadata; '' for one format."""
    formats = formats_of(quant)
    if not formats:
        return ""
    return "mixed " + ", ".join(f"{k} {v:.0%}" for k, v in mix_summary(formats, a).items())


def head_group(a: ModelArgs) -> int:
    """A mixed file's group for the packed head: the largest candidate group dividing the width, else the row."""
    return next((g for g in CANDIDATE_GROUPS if a.dim % g == 0), a.dim)
