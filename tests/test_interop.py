"""AWQ checkpoints from the ecosystem's own code, read as stored; edge-awq's files handed back to it.

Checkpoints are written by compressed-tensors' compressor and AutoAWQ's packing code (``tests/ecosystem.py``)
from the integers of stories260K and SmolLM2 .eawq files; the integers edge-awq reads back must be the
file's, its dequantization the libraries' own, its greedy tokens the .eawq's. The other way, edge-awq's
directories load in transformers (compressed-tensors decompressing on this CPU).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_awq.formats.eawq import EawqSource
from edge_awq.formats.load import load_weights, open_source
from edge_awq.model import LINEARS, W4, KVCache, forward
from edge_awq.backends import select_backend
from edge_awq.pack import unpack_linear
from tests.conftest import SHAKESPEARE, TINYSTORIES, WIKITEXT
from tests.ecosystem import write_autoawq, write_compressed_tensors
from tests.conftest import assert_one_line_error, edge_awq

pytestmark = pytest.mark.long  # SmolLM2 checkpoints written by the libraries: about two minutes
torch = pytest.importorskip("torch")
pytest.importorskip("compressed_tensors")

PROMPT = np.array([1, 403, 407, 261, 378, 269, 301, 414, 273, 260, 331])


def _export(source, out, *extra):
    r = edge_awq("export", source, "--calib", SHAKESPEARE, "-o", out, "--method", "rtn", "--n-samples", 1,
                 "--seqlen", 64, *extra)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def stories_eawq(stories_path, tmp_path_factory):
    """stories260K, RTN W4 per channel (its widths 64 and 172), float16 head."""
    return _export(stories_path, tmp_path_factory.mktemp("interop") / "stories.eawq", "--group-size", "channel",
                   "--head", "fp16")


@pytest.fixture(scope="module")
def smol_eawq(smollm2, tmp_path_factory):
    """SmolLM2-135M, RTN W4 group 64, with the default int8 head (the embedding table stays fp16: tied)."""
    return _export(smollm2, tmp_path_factory.mktemp("interop") / "smol.eawq", "--group-size", "64")


@pytest.fixture(scope="module")
def smol_dirs(smol_eawq, autoawq, tmp_path_factory):
    d = tmp_path_factory.mktemp("smol-dirs")
    return {"ct": write_compressed_tensors(smol_eawq, d / "ct"),
            "awq-gemm": write_autoawq(smol_eawq, d / "awq-gemm", autoawq, "gemm"),
            "awq-gemv": write_autoawq(smol_eawq, d / "awq-gemv", autoawq, "gemv")}


def _packed_equal(a, b, allow_float=()):
    """Every packed linear of b holds a's integers, scales and zero points; the others are in allow_float."""
    for i, (la, lb) in enumerate(zip(a.layers, b.layers)):
        for n in LINEARS:
            x, y = getattr(la, n), getattr(lb, n)
            if not isinstance(y, W4):
                assert n in allow_float, (i, n)
                continue
            for f in ("qweight", "scales", "zeros"):
                assert np.array_equal(getattr(x, f), getattr(y, f)), (i, n, f)


def _greedy(w, ops, steps=16):
    cache = ops.allocate_cache(w.args, len(PROMPT) + steps)
    logits = forward(w, PROMPT, 0, cache, ops, last_only=True)
    out, pos = [int(np.argmax(logits[-1]))], len(PROMPT)
    for _ in range(steps - 1):
        out.append(int(np.argmax(forward(w, np.array(out[-1:]), pos, cache, ops)[-1])))
        pos += 1
    return out


# --- reading what the ecosystem writes ---

@pytest.mark.parametrize("version", ["ct", "awq-gemm", "awq-gemv"])
def test_smollm2_checkpoints_from_the_libraries_hold_the_files_integers(smol_eawq, smol_dirs, version):
    src = open_source(smol_dirs[version])
    assert src.quantization["layout"] == {"ct": "compressed-tensors"}.get(version, version)
    assert src.quantization["bits"] == 4 and src.quantization["group_size"] == 64
    _packed_equal(load_weights(EawqSource(smol_eawq), dtype=None), load_weights(src, dtype=None))


def test_smollm2_greedy_tokens_from_library_checkpoints_equal_the_eawq(smol_eawq, smol_dirs):
    """numba on the .eawq (its int8 head) against numba on each directory (the tied fp16 head): the decoder
    runs the same integers, so both heads' greedy choices are checked against the reference on the dir. With
    int16 activations, the ones held to the float reference (int8 activations change a greedy choice in
    about 4 % of steps, README "Speed")."""
    ops = select_backend("numba", "int16")
    ref = _greedy(load_weights(open_source(smol_dirs["ct"])), select_backend("reference"))
    for d in smol_dirs.values():
        w = ops.prepare(load_weights(open_source(d), dtype=None))
        assert _greedy(w, ops) == ref, d


def test_compressed_tensors_dequantization_is_ours_exactly(smol_dirs):
    """compressed-tensors' own decompressor, on the tensors it wrote, gives edge-awq's dequantized weights."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    d = smol_dirs["ct"]
    cfg = json.loads((d / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(targets=["Linear"], **{k: v for k, v in cfg["config_groups"]["group_0"].items()
                                                       if k in ("weights", "input_activations")})
    sd = load_file(str(d / "model.safetensors"))
    src = open_source(d)
    for i, (n, mod) in enumerate([("wq", "self_attn.q_proj"), ("w2", "mlp.down_proj"), ("wk", "self_attn.k_proj")]):
        prefix = f"model.layers.{7 * i}.{mod}"
        parts = {k.split(".")[-1]: v for k, v in sd.items() if k.startswith(prefix + ".")}
        theirs = PackedQuantizationCompressor.decompress(parts, scheme)["weight"]
        ours = load_weights(src, lazy=True, dtype=None).layers[7 * i]
        assert np.array_equal(theirs.numpy(), unpack_linear(getattr(ours, n)).astype(np.float16)), n


def test_autoawq_dequantization_is_ours_exactly(smol_dirs, autoawq):
    from safetensors.torch import load_file

    d = smol_dirs["awq-gemm"]
    sd = load_file(str(d / "model.safetensors"))
    w = load_weights(open_source(d), lazy=True, dtype=None)
    for i, (n, mod) in enumerate([("wv", "self_attn.v_proj"), ("w1", "mlp.gate_proj"), ("wo", "self_attn.o_proj")]):
        p = f"model.layers.{11 * i}.{mod}"
        theirs = autoawq.packing.dequantize_gemm(sd[p + ".qweight"], sd[p + ".qzeros"], sd[p + ".scales"], 4, 64)
        assert np.array_equal(theirs.numpy().T, unpack_linear(getattr(w.layers[11 * i], n)).astype(np.float16)), n


def test_stories_checkpoints_with_float_linears_and_per_channel_groups(stories_eawq, autoawq, tmp_path):
    """stories260K: compressed-tensors per channel over widths 64 and 172; AutoAWQ GEMM with gate/up kept in float
    (modules_to_not_convert: 172 output rows do not pack eight a word)."""
    ct = write_compressed_tensors(stories_eawq, tmp_path / "ct")
    awq = write_autoawq(stories_eawq, tmp_path / "awq", autoawq, "gemm", not_convert=("gate_proj", "up_proj"))
    want = load_weights(EawqSource(stories_eawq), dtype=None)
    _packed_equal(want, load_weights(open_source(ct), dtype=None))
    _packed_equal(want, load_weights(open_source(awq), dtype=None), allow_float=("w1", "w3"))
    ref = select_backend("reference")
    assert _greedy(load_weights(open_source(ct)), ref) == _greedy(want, ref)
    assert open_source(awq).quantization["not_converted"] == ["gate_proj", "up_proj"]


def test_symmetric_compressed_tensors_reads_as_its_library_dequantizes(stories_eawq, tmp_path):
    """Symmetric weights (no zero point stored: the codes are signed values plus 8)."""
    from transformers import AutoModelForCausalLM

    d = write_compressed_tensors(stories_eawq, tmp_path / "sym", symmetric=True)
    src = open_source(d)
    assert not src.quantization["zero_point"]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    w = load_weights(src)
    with torch.inference_mode():
        want = model(torch.tensor([PROMPT.tolist()])).logits[0].numpy()  # the first forward decompresses
    theirs = model.model.layers[3].mlp.down_proj.weight.detach().numpy()  # float32, as the model was loaded
    assert np.array_equal(theirs, unpack_linear(load_weights(src, dtype=None).layers[3].w2))
    got = forward(w, PROMPT, 0, KVCache.allocate(w.args, 16), select_backend("reference"))
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


@pytest.mark.skipif(not os.environ.get("EDGE_AWQ_CT_OLD"), reason="EDGE_AWQ_CT_OLD (compressed-tensors 0.9.3 installed "
                    "with pip --target, as .ci/run does) not set")
def test_zero_points_unpacked_as_compressed_tensors_0_9_3_wrote_them(stories_eawq, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.environ["EDGE_AWQ_CT_OLD"], str(Path(__file__).parents[1])])}
    r = subprocess.run([sys.executable, "-m", "tests.ecosystem", "ct", str(stories_eawq), str(tmp_path / "old")],
                       capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())["quantization_config"]
    assert "version" not in cfg and "format" not in cfg["config_groups"]["group_0"]  # as 0.9 wrote it
    from safetensors import safe_open

    with safe_open(str(tmp_path / "old" / "model.safetensors"), "np") as f:
        zp = f.get_tensor("model.layers.0.mlp.gate_proj.weight_zero_point")
    assert zp.shape == (172, 1) and zp.dtype == np.int8  # one signed value a row, not packed
    _packed_equal(load_weights(EawqSource(stories_eawq), dtype=None), load_weights(open_source(tmp_path / "old"),
                                                                                   dtype=None))


# --- handing edge-awq's files to the ecosystem ---

def test_round_trips_are_byte_identical(smol_eawq, tmp_path):
    """.eawq -> awq-gemm -> .eawq and .eawq -> compressed-tensors -> .eawq: every tensor byte-identical (the int8
    head packed again from the same float16 table)."""
    first = EawqSource(smol_eawq)
    for layout in ("awq-gemm", "compressed-tensors"):
        d, back = tmp_path / layout, tmp_path / f"{layout}.eawq"
        r = edge_awq("convert", smol_eawq, "--to", layout, "-o", d)
        assert r.returncode == 0, r.stderr
        r = edge_awq("convert", d, "-o", back, "--head", "int8")
        assert r.returncode == 0, r.stderr
        again = EawqSource(back)
        assert sorted(again.file.tensors) == sorted(first.file.tensors)
        for name in first.file.tensors:
            assert np.array_equal(np.asarray(first.file.raw(name)), np.asarray(again.file.raw(name))), (layout, name)
        assert again.quantization["converted_from"]["layout"] == layout


def test_transformers_loads_our_compressed_tensors_export(smol_eawq, tmp_path):
    """transformers (compressed-tensors decompressing on the CPU) on our directory: logits within 1e-3 of ours."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path / "ct"
    assert edge_awq("convert", smol_eawq, "--to", "compressed-tensors", "-o", d).returncode == 0
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    src = open_source(d)
    assert ids == src.tokenizer().encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    with torch.inference_mode():
        want = model(torch.tensor([ids])).logits[0].numpy()
    w = load_weights(src)
    got = forward(w, np.array(ids), 0, KVCache.allocate(w.args, len(ids)), select_backend("reference"))
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def test_awq_gemm_export_scores_the_same_perplexity(smol_eawq, tmp_path):
    """The .eawq and its awq-gemm directory: the same perplexity on numba, to the last digit (fp16 head both)."""
    d = tmp_path / "awq"
    assert edge_awq("convert", smol_eawq, "--to", "awq-gemm", "-o", d).returncode == 0
    fp16_head = tmp_path / "fp16-head.eawq"
    assert edge_awq("convert", d, "-o", fp16_head).returncode == 0
    scores = []
    for m in (fp16_head, d):
        r = edge_awq("eval", m, "--text", WIKITEXT, "--max-tokens", 1024, "--backend", "numba", "--json")
        assert r.returncode == 0, r.stderr
        scores.append(json.loads(r.stdout)["perplexity"])
    assert scores[0] == scores[1]


def test_export_writes_directory_formats(stories_path, tmp_path):
    out = tmp_path / "ct"
    r = edge_awq("export", stories_path, "--calib", SHAKESPEARE, "-o", out, "--format", "compressed-tensors",
                 "--method", "rtn", "--group-size", "channel", "--n-samples", 1, "--seqlen", 64)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # the temporary .eawq is gone
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"} <= names
    r = edge_awq("eval", out, "--text", TINYSTORIES, "--max-tokens", 2000, "--json")
    assert r.returncode == 0, r.stderr


def test_shards_and_index_are_written_past_the_limit(smol_eawq, tmp_path):
    from edge_awq.formats.interop import write_directory

    d = write_directory(EawqSource(smol_eawq), tmp_path / "sharded", "compressed-tensors", max_shard_bytes=40 << 20)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted({v for v in index["weight_map"].values()})
    assert len(shards) >= 3
    for s in shards:  # at most the limit, unless one tensor alone is larger (the 56 MB embedding table)
        held = [n for n, f in index["weight_map"].items() if f == s]
        assert (d / s).stat().st_size <= (40 << 20) + (1 << 20) or len(held) == 1, (s, len(held))
    _packed_equal(load_weights(EawqSource(smol_eawq), dtype=None), load_weights(open_source(d), dtype=None))


def test_already_quantized_source_is_converted_not_quantized_again(stories_eawq, tmp_path):
    d = tmp_path / "ct"
    assert edge_awq("convert", stories_eawq, "--to", "compressed-tensors", "-o", d).returncode == 0
    r = edge_awq("export", d, "--calib", SHAKESPEARE, "-o", tmp_path / "again.eawq", "--head", "fp16")
    assert r.returncode == 0 and "already quantized" in r.stderr and "converting" in r.stderr, r.stderr
    _packed_equal(load_weights(EawqSource(stories_eawq), dtype=None),
                  load_weights(EawqSource(tmp_path / "again.eawq"), dtype=None))


def test_inspect_and_plan_read_directories(smol_dirs, smol_eawq):
    r = edge_awq("inspect", smol_dirs["awq-gemm"])
    assert r.returncode == 0 and "AutoAWQ GEMM" in r.stdout and "group 64" in r.stdout, r.stderr
    bits = [float(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("stored:")]
    assert 4.3 < bits[0] < 4.35  # 4 bits, a float16 scale and a 4-bit zero point per 64 weights
    plans = [json.loads(edge_awq("plan", m, "--memory", "4GiB", "--ctx", 1024, "--json").stdout)
             for m in (smol_dirs["ct"], smol_eawq)]
    assert plans[0]["lines"]["packed decoder weights"] == pytest.approx(plans[1]["lines"]["packed decoder weights"],
                                                                        rel=0.01)


# --- bad input: one line, exit 2 ---

def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("case,words", [
    ("group", "does not match the tensors"),
    ("bits", "8-bit weights is not supported"),
    ("gemv_fast", "GEMV-fast"),
    ("marlin", "Marlin"),
    ("no-qzeros", "model.layers.0.self_attn.q_proj.qzeros is missing"),
    ("truncated", "truncated"),
    ("index", "is missing"),
])
def test_bad_awq_checkpoints_are_one_line(smol_eawq, tmp_path, case, words):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "awq"
    assert edge_awq("convert", smol_eawq, "--to", "awq-gemm", "-o", d).returncode == 0
    st = d / "model.safetensors"
    if case == "group":
        _edit_config(d, group_size=128)
    elif case == "bits":
        _edit_config(d, bits=8)
    elif case in ("gemv_fast", "marlin"):
        _edit_config(d, version=case)
    elif case == "no-qzeros":
        t = load_file(str(st))
        del t["model.layers.0.self_attn.q_proj.qzeros"]
        save_file(t, str(st))
    elif case == "truncated":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    elif case == "index":
        t = load_file(str(st))
        names = sorted(t)
        half = {n: t[n] for n in names[: len(names) // 2]}
        save_file(half, str(d / "model-00001-of-00002.safetensors"))
        save_file({n: t[n] for n in names[len(names) // 2 :]}, str(d / "model-00002-of-00002.safetensors"))
        st.unlink()
        weight_map = {n: "model-00001-of-00002.safetensors" for n in half}  # the second shard's names left out
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for cmd in (["eval", d, "--text", TINYSTORIES, "--max-tokens", 64], ["chat", d, "--prompt", "hi"]):
        assert_one_line_error(edge_awq(*cmd), words)


def test_compressed_tensors_settings_not_supported_are_one_line(smol_dirs, tmp_path):
    fp8 = {"targets": ["Linear"], "format": "float-quantized",
           "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}}
    for change, words in ((dict(format="float-quantized", config_groups={"g": fp8}), "float weights"),
                          (dict(config_groups={"g": {"targets": ["Linear"], "weights": {
                              "num_bits": 4, "type": "int", "strategy": "group", "group_size": 64, "symmetric": True},
                              "input_activations": {"num_bits": 8, "type": "int"}}}), "quantized activations"),
                          (dict(format="naive-quantized", config_groups={"g": {"targets": ["Linear"], "weights": {
                              "num_bits": 4, "type": "int", "strategy": "group", "group_size": 64}}}),
                           "format naive-quantized"),
                          (dict(config_groups={"g": {"targets": ["Linear"], "weights": {
                              "num_bits": 8, "type": "int", "strategy": "channel"}}}), "8-bit weights"),
                          (dict(config_groups={"g": {"targets": ["Linear"], "weights": {
                              "num_bits": 4, "type": "int", "strategy": "group", "group_size": 64,
                              "actorder": "group"}}}), "act-order")):
        d = _copy(smol_dirs["ct"], tmp_path / f"ct-{len(list(tmp_path.iterdir()))}")
        _edit_config(d, **change)
        assert_one_line_error(edge_awq("eval", d, "--text", TINYSTORIES, "--max-tokens", 64), words)


def test_config_as_transformers_5_writes_it(smol_dirs):
    """The fixtures' config.json comes from transformers 5's to_dict: RoPE only inside rope_parameters."""
    cfg = json.loads((smol_dirs["awq-gemm"] / "config.json").read_text())
    assert "rope_theta" not in cfg and cfg["rope_parameters"]["rope_theta"] == 100000.0
    assert open_source(smol_dirs["awq-gemm"]).args.rope_theta == 100000.0


def test_bfloat16_float_tensors_and_no_safetensors_metadata(stories_eawq, tmp_path):
    """Float tensors stored in bfloat16 while the config says float16, in a file without __metadata__."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "ct"
    assert edge_awq("convert", stories_eawq, "--to", "compressed-tensors", "-o", d).returncode == 0
    st = d / "model.safetensors"
    t = load_file(str(st))
    t = {k: v.to(torch.bfloat16) if v.dtype == torch.float16 and "weight_scale" not in k else v for k, v in t.items()}
    save_file(t, str(st))  # no metadata
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == "float16"
    src = open_source(d)
    emb = src.get("tok_embeddings")
    assert emb.dtype == np.float32 and np.array_equal(emb, t["model.embed_tokens.weight"].float().numpy())
    ref = select_backend("reference")
    want = forward(load_weights(EawqSource(stories_eawq)), PROMPT, 0, KVCache.allocate(src.args, 16), ref)
    got = forward(load_weights(src), PROMPT, 0, KVCache.allocate(src.args, 16), ref)
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()  # bfloat16 norms and embeddings: 8 bits less


def test_qwen2_biases_ride_along(autoawq, tmp_path):
    """A qwen2 model (q/k/v biases) through AutoAWQ GEMM and compressed-tensors: the same logits as its .eawq."""
    from tests.conftest import BASE, CASES, write_random_model

    src_dir = write_random_model(tmp_path / "qwen2", {**BASE, **CASES["qwen2-bias"], "vocab_size": 512})
    from edge_awq.formats.tokenizer import from_llama2c_bin
    from tests.conftest import TOK512_BIN

    from_llama2c_bin(TOK512_BIN, 512).impl.save(str(src_dir / "tokenizer.json"))
    eawq = _export(src_dir, tmp_path / "qwen2.eawq", "--group-size", "32", "--head", "fp16")
    ref = select_backend("reference")
    tokens = PROMPT
    want_w = load_weights(EawqSource(eawq))
    want = forward(want_w, tokens, 0, KVCache.allocate(want_w.args, 16), ref)
    for d in (write_autoawq(eawq, tmp_path / "awq", autoawq, "gemm"), write_compressed_tensors(eawq, tmp_path / "ct")):
        src = open_source(d)
        assert src.args.qkv_bias and src.has("layers.0.wq.bias") and src.has("layers.0.wq.qweight")
        got = forward(load_weights(src), tokens, 0, KVCache.allocate(src.args, 16), ref)
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max(), d  # biases stored float16 there
