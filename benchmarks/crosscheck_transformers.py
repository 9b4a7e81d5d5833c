"""Perplexity of a model by Hugging Face transformers, with edge-awq's protocol, for cross-checking.

    python benchmarks/crosscheck_transformers.py MODEL --text FILE [--ctx 512] [--max-tokens N]

MODEL is a .gguf file (transformers dequantizes it and undoes llama.cpp's Q/K
permutation itself) or a Hugging Face directory. The text is tokenized by
transformers' own tokenizer, without BOS, and cut into non-overlapping windows
exactly as ``edge-awq eval`` does, so the two figures should agree to a few
hundredths of a percent. Needs ``pip install transformers`` (not a dependency).
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load(model: Path):
    if model.suffix == ".gguf":
        kw = dict(gguf_file=model.name)
        return AutoTokenizer.from_pretrained(model.parent, **kw), AutoModelForCausalLM.from_pretrained(
            model.parent, torch_dtype=torch.float32, **kw)
    return AutoTokenizer.from_pretrained(model), AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int)
    a = ap.parse_args()
    tok, model = load(a.model)
    ids = tok(a.text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][: a.max_tokens]
    nll, scored, t0 = 0.0, 0, time.time()
    with torch.inference_mode():
        for i in range(0, len(ids), a.ctx):
            win = ids[i : i + a.ctx]
            if len(win) < 2:
                continue
            logits = model(torch.tensor([win])).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor(win[1:]), reduction="sum").item()
            scored += len(win) - 1
    print(json.dumps({"perplexity": math.exp(nll / scored), "tokens_scored": scored, "seconds": time.time() - t0}))


if __name__ == "__main__":
    main()
