"""What 8-bit activations would cost on the decode path: the README's W4A8 figure.

    python benchmarks/w4a8_quality.py MODEL.eawq --text EVAL [--tokens 4096] [--group-size 64]

The 4-bit GEMV quantizes each token's activations to int16 per group (W4A16); 8-bit activations
(W4A8, as llama.cpp's Q8 activations) would make it faster on CPUs with one vector multiplier,
and this measures what they cost in quality. The text is read in windows of 512 tokens, each
scored teacher-forced one token at a time, the way decoding runs the linears (prefill and
`edge-awq eval` do not go through the GEMV). Every linear, the head included, sees its input
rounded per group to 16 bits (32767 levels, what the kernels do) or 8 bits (127 levels,
symmetric), and multiplies the dequantized weights of the file in float32. Prints the two
perplexities, their ratio, and how often the two choose the same greedy token.
"""

import argparse

import numpy as np

from edge_awq.backends.reference import ReferenceBackend
from edge_awq.formats.load import load_weights, open_source
from edge_awq.model import Dense, KVCache, forward
from edge_awq.pack import unpack_linear

WINDOW = 512


class RoundedInputs(ReferenceBackend):
    """The reference backend with each linear's input rounded per group to +-levels steps."""

    def __init__(self, levels: int, group_size: int):
        self.levels, self.group_size = levels, group_size
        self._weights: dict[int, np.ndarray] = {}  # id -> float32 (the model outlives this run)

    def _rounded(self, x: np.ndarray) -> np.ndarray:
        T, n = x.shape
        g = x.reshape(T, n // self.group_size, self.group_size)
        step = np.abs(g).max(axis=2, keepdims=True) / self.levels
        step[step == 0] = 1
        return (np.rint(g / step) * step).reshape(T, n).astype(np.float32)

    def linear(self, x, w) -> np.ndarray:
        W = self._weights.get(id(w))
        if W is None:
            W = self._weights[id(w)] = np.asarray(w.weight if isinstance(w, Dense) else unpack_linear(w), np.float32)
        y = self._rounded(np.asarray(x, np.float32)) @ W.T
        return y if w.bias is None else y + w.bias

    def linears(self, x, ws) -> list[np.ndarray]:
        return [self.linear(x, w) for w in ws]


def decode_scores(w, tokens: np.ndarray, ops) -> tuple[np.ndarray, np.ndarray]:
    """Negative log-likelihood of each next token and the greedy choice, one token a step."""
    nll, choice = [], []
    for start in range(0, len(tokens), WINDOW):
        seg = tokens[start : start + WINDOW]
        cache = KVCache.allocate(w.args, len(seg), np.float32)
        for pos in range(len(seg) - 1):
            logits = forward(w, seg[pos : pos + 1], pos, cache, ops)[-1].astype(np.float64)
            top = logits.max()
            nll.append(top + np.log(np.exp(logits - top).sum()) - logits[seg[pos + 1]])
            choice.append(int(logits.argmax()))
    return np.array(nll), np.array(choice)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()
    src = open_source(args.model)
    w = load_weights(src)
    with open(args.text, encoding="utf-8") as f:
        tokens = np.array(src.tokenizer().encode(f.read(50 * args.tokens), bos=True)[: args.tokens])
    a16 = decode_scores(w, tokens, RoundedInputs(32767, args.group_size))
    a8 = decode_scores(w, tokens, RoundedInputs(127, args.group_size))
    p16, p8 = np.exp(a16[0].mean()), np.exp(a8[0].mean())
    print(f"{len(a16[0])} tokens, windows of {WINDOW}, activation groups of {args.group_size}")
    print(f"perplexity W4A16 {p16:.4f}, W4A8 {p8:.4f} ({100 * (p8 / p16 - 1):+.2f} %); "
          f"same greedy token {100 * (a16[1] == a8[1]).mean():.1f} % of steps")


if __name__ == "__main__":
    main()
