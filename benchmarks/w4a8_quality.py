"""What 8-bit activations cost in quality, measured on the kernels that run: the README's W4A8 figures.

    python benchmarks/w4a8_quality.py MODEL.eawq --text ../shared/data/wikitext2-test.txt \
        [--tokens 8192] [--json]

The numba backend runs the same file twice, its packed linears taking their inputs as int16
(W4A16: 32767 levels a group) and as int8 (W4A8: 127 levels a group, integer dot products), and
scores the text in windows of 512 tokens two ways:

- the decode path: each window teacher-forced one token at a time, as generation runs (the fused
  one-call decode step, the GEMV kernels, the int8 head);
- the prefill path: each window in one forward pass, as a prompt runs (with int8 activations the
  integer GEMM; with int16 dequantized rows and BLAS).

Prints each perplexity, the cost of int8 (its perplexity over int16's, less one) on each path, and how
often the two pick the same greedy token. ``NumbaBackend``'s default activations are int8 only where
both costs are under 1 % (README, "Speed").
"""

import argparse
import json
import sys
import time

import numpy as np

from edge_awq.api import load
from edge_awq.model import forward

WINDOW = 512


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    top = z.max(axis=-1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=-1))
    return lse - z[np.arange(len(targets)), targets]


def score(llm, tokens: np.ndarray, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Negative log-likelihood of each next token and the greedy choice, by windows of WINDOW tokens."""
    w, ops, cache = llm.weights, llm.ops, llm.cache
    nll, choice = [], []
    for start in range(0, len(tokens) - 1, WINDOW):
        seg = tokens[start : start + WINDOW]
        if len(seg) < 2:
            break
        if path == "prefill":
            logits = forward(w, seg[:-1], 0, cache, ops)
        else:
            logits = np.stack([forward(w, seg[p : p + 1], p, cache, ops, last_only=True)[-1]
                               for p in range(len(seg) - 1)])
        nll.append(_nll(logits, seg[1:]))
        choice.append(logits.argmax(axis=-1))
    return np.concatenate(nll), np.concatenate(choice)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs = {}
    for acts in ("int16", "int8"):
        llm = load(args.model, backend="numba", ctx=WINDOW, activations=acts)
        with open(args.text, encoding="utf-8") as f:
            tokens = np.array(llm.tokenizer.encode(f.read(50 * args.tokens), bos=True)[: args.tokens])
        for path in ("decode", "prefill"):
            t0 = time.perf_counter()
            nll, choice = score(llm, tokens, path)
            runs[acts, path] = (nll, choice)
            print(f"{acts} {path}: perplexity {np.exp(nll.mean()):.4f} ({len(nll)} tokens, "
                  f"{time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        llm.close()
    out = {"model": args.model, "text": args.text, "tokens": int(len(runs["int8", "decode"][0])), "window": WINDOW}
    for path in ("decode", "prefill"):
        (n16, c16), (n8, c8) = runs["int16", path], runs["int8", path]
        p16, p8 = float(np.exp(n16.mean())), float(np.exp(n8.mean()))
        out[path] = {"int16": p16, "int8": p8, "cost_pct": 100 * (p8 / p16 - 1),
                     "same_greedy_pct": float(100 * (c16 == c8).mean())}
    if args.json:
        print(json.dumps(out))
        return
    print(f"{out['tokens']} tokens of {args.text}, windows of {WINDOW}")
    print("| path | W4A16 (int16) | W4A8 (int8) | cost of int8 | same greedy token |\n|---|---|---|---|---|")
    for path in ("decode", "prefill"):
        r = out[path]
        print(f"| {path} | {r['int16']:.4f} | {r['int8']:.4f} | {r['cost_pct']:+.2f} % | {r['same_greedy_pct']:.1f} % |")


if __name__ == "__main__":
    main()
