"""Peak memory of ``edge-awq export`` at the width of a 70B model, on a workstation of modest memory.

    python benchmarks/wide_export.py --calib TEXT --tokenizer-from HF_OR_GGUF [--preset llama-2-70b] [--layers 2]
        [--n-samples 2] [--seqlen 128] [--budget 4.5] [--keep DIR]

Writes a synthetic model with the decoder shapes of the preset (Llama-2-70B: width 8192, FFN 28672, 64
heads, 8 KV heads) and a few layers, as a sharded float16 Hugging Face directory of random weights (one
tensor per shard, written one at a time), with the tokenizer of a real model (its vocabulary sets the
embedding's rows). Then runs ``edge-awq export`` on it — AWQ, and with ``--budget`` the sensitivity pass
and the allocation too — and reads the exporter's own peak resident memory (VmHWM). Prints a Markdown
row per run: the width, the peak, the time per phase.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_random_model(preset: str, layers: int, tokenizer_from: str, out: Path, seed: int = 0) -> Path:
    """A Hugging Face directory of random float16 weights with preset's decoder shapes and layers layers."""
    from safetensors.numpy import save_file

    from edge_awq.config import expected_shapes
    from edge_awq.formats.load import open_source
    from edge_awq.formats.sources.hf import hf_name
    from edge_awq.model import LINEARS
    from edge_awq.plan import PRESETS
    from tests.hfdir import hf_config

    import dataclasses

    tok = open_source(tokenizer_from).tokenizer()
    a = dataclasses.replace(PRESETS[preset], n_layers=layers, vocab_size=tok.impl.get_vocab_size(),
                            tied_embeddings=False)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    shapes = expected_shapes(a)
    tensors = [("tok_embeddings", (a.vocab_size, a.dim)), ("norm", (a.dim,)), ("output", (a.vocab_size, a.dim))]
    for i in range(layers):
        tensors += [(f"layers.{i}.{n}", shapes[n]) for n in ("attn_norm", "ffn_norm")]
        tensors += [(f"layers.{i}.{n}.weight", shapes[n]) for n in LINEARS]
    weight_map = {}
    for k, (name, shape) in enumerate(tensors):
        if len(shape) == 1:
            t = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
        else:
            t = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(np.float16)
        fname = f"model-{k + 1:05d}-of-{len(tensors):05d}.safetensors"
        save_file({hf_name(name): t}, str(out / fname))
        weight_map[hf_name(name)] = fname
        del t
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({**hf_config(a, layers), "torch_dtype": "float16"}))
    tok.impl.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": tok.bos_token, "eos_token": tok.eos_token,
                                                           "add_bos_token": tok.add_bos}))
    return out


def main():
    from export_memory import peak_of

    from edge_awq.formats.load import open_source

    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", required=True)
    ap.add_argument("--tokenizer-from", required=True, help="a model whose tokenizer (and vocabulary) to use")
    ap.add_argument("--preset", default="llama-2-70b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--n-samples", default="2")
    ap.add_argument("--seqlen", default="128")
    ap.add_argument("--budget", default=None, help="bits per weight: the sensitivity pass and the allocation too")
    ap.add_argument("--keep", type=Path, default=None, help="write the model here and keep it (reused if there)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="wide"))
    try:
        model = a.keep or tmp / "hf"
        if not (model / "config.json").exists():
            t0 = time.perf_counter()
            write_random_model(a.preset, a.layers, a.tokenizer_from, model)
            print(f"wrote {model} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        size = sum(f.stat().st_size for f in model.iterdir())
        args = ["export", str(model), "--calib", a.calib, "-o", str(tmp / "out.eawq"), "--n-samples", a.n_samples,
                "--seqlen", a.seqlen, "--json", *(["--budget", a.budget] if a.budget else [])]
        peak, stdout = peak_of(args)  # the exporter's own VmHWM (export_memory.py)
        info = json.loads(stdout)
        src = open_source(model)
        sa = src.args
        phases = ", ".join(f"{k} {v:.0f} s" for k, v in info["seconds"].items())
        print("| width | FFN | heads (q/kv) | layers | source (fp16) | mode | export peak RSS | time |\n"
              "|---|---|---|---|---|---|---|---|")
        mode = f"AWQ, --budget {a.budget} (sensitivity pass on)" if a.budget else "AWQ"
        print(f"| {sa.dim} | {sa.hidden_dim} | {sa.n_heads}/{sa.n_kv_heads} | {sa.n_layers} | {size / 1e9:.2f} GB | "
              f"{mode} | {peak / 2**30:.2f} GiB | {phases} |")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
