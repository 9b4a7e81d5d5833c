"""edge-awq export end to end on stories260K: quality, determinism, bad input, interruption."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import SHAKESPEARE, TINYSTORIES, export
from edge_awq.formats.load import open_source
from tests.conftest import assert_one_line_error, edge_awq

pytest.importorskip("torch")


def ppl(path):
    r = edge_awq("eval", path, "--text", TINYSTORIES, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["perplexity"]


def _stored_bits(a, bits, gs):
    """Bits per decoder weight by hand: codes in rows padded to 32 values, a float16 scale per group, the
    zero points of each tensor as one stream padded to a word."""
    from edge_awq.config import expected_shapes
    from edge_awq.pack import packed_words

    total = 0
    for name, shape in expected_shapes(a).items():
        if name.startswith("w"):
            (out_f, in_f), g = shape, shape[1] // gs
            total += 32 * out_f * packed_words(in_f, bits) + 16 * out_f * g + 32 * packed_words(out_f * g, bits)
    return a.n_layers * total / a.linear_params


def test_export_is_deterministic(stories_path, tmp_path):
    a, b = tmp_path / "a.eawq", tmp_path / "b.eawq"
    for out in (a, b):
        r = export(stories_path, out, "--n-samples", 4, "--seqlen", 128, "--group-size", "4", "--json")
        assert r.returncode == 0, r.stderr
    assert a.read_bytes() == b.read_bytes()
    info = json.loads(r.stdout)
    assert info["bits_per_weight"] == pytest.approx(_stored_bits(open_source(stories_path).args, 4, 4))
    assert len(info["layers"]) == 5
    assert all(0 < layer["loss"] < 1 for layer in info["layers"])
    assert {f.name for f in tmp_path.iterdir()} == {"a.eawq", "b.eawq"}  # no temporary left behind


@pytest.mark.long
def test_awq_perplexity_beats_rtn_on_stories(stories_path, tmp_path):
    fp = ppl(stories_path)
    got = {}
    for method in ("rtn", "awq"):
        out = tmp_path / f"{method}.eawq"
        r = export(stories_path, out, "--method", method, "--group-size", "channel", "--n-samples", 16,
                   "--seqlen", 256)
        assert r.returncode == 0, r.stderr
        got[method] = ppl(out)
    assert fp < got["awq"] < got["rtn"]


def test_calibration_text_too_short(stories_path, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.")
    r = edge_awq("export", stories_path, "--calib", short, "-o", tmp_path / "x.eawq", "--group-size", "channel")
    assert_one_line_error(r, "calibration text too short: 10 tokens, one block needs 512")
    assert not (tmp_path / "x.eawq").exists()


def test_unwritable_output_fails_before_work(stories_path, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        assert_one_line_error(export(stories_path, ro / "x.eawq"), "cannot write")
    finally:
        ro.chmod(0o700)


def test_output_in_missing_directory(stories_path, tmp_path):
    assert_one_line_error(export(stories_path, tmp_path / "nope" / "x.eawq", "--group-size", "4"), "no such directory for the output")


def test_unknown_architecture(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"]}))
    assert_one_line_error(export(tmp_path / "m", tmp_path / "x.eawq"), "unsupported architecture FalconForCausalLM")


def test_bad_group_size_names_layer(stories_path, tmp_path):
    assert_one_line_error(export(stories_path, tmp_path / "x.eawq", "--group-size", "64"),
                          "does not divide the input width 172 of layer w2")


def test_ctrl_c_midway_leaves_no_file(stories_path, tmp_path):
    out = tmp_path / "x.eawq"
    p = subprocess.Popen([sys.executable, "-m", "edge_awq", "export", str(stories_path), "--calib", str(SHAKESPEARE),
                          "-o", str(out), "--group-size", "4", "--n-samples", "64"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(f.name.startswith(".x.eawq.tmp") for f in tmp_path.iterdir()):
        time.sleep(0.2)
    assert any(f.name.startswith(".x.eawq.tmp") for f in tmp_path.iterdir()), "export never started writing"
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.long
@pytest.mark.parametrize("head,bits", [("int8", 8), ("w4", 4)])
def test_packed_head_keeps_embedding_rows_and_scores_close(stories_path, tmp_path, head, bits):
    import numpy as np

    from edge_awq.backends.numba import NumbaBackend
    from edge_awq.backends.reference import ReferenceBackend
    from edge_awq.formats.load import load_weights, open_source
    from edge_awq.model import W4, Dense, KVCache, forward

    outs = {}
    for h in ("fp16", head):
        outs[h] = tmp_path / f"{h}.eawq"
        r = export(stories_path, outs[h], "--method", "rtn", "--group-size", "channel", "--head", h)
        assert r.returncode == 0, r.stderr
    fp16, packed = (load_weights(open_source(outs[h]), dtype=None) for h in ("fp16", head))
    assert isinstance(fp16.output, Dense) and isinstance(packed.output, W4) and packed.output.bits == bits
    assert open_source(outs[head]).quantization["head"] == head
    src = open_source(stories_path)
    rows = np.array([0, 1, 7, 511])  # tied model: the gather still reads the fp16 table, exactly
    np.testing.assert_array_equal(packed.tok_embeddings[rows], np.asarray(src.get("tok_embeddings"))[rows].astype(np.float16))
    tokens = np.array([1, 403, 261, 290, 17, 95, 300])
    logits = {h: forward(w, tokens, 0, KVCache.allocate(w.args, 16), ReferenceBackend()) for h, w in
              (("fp16", fp16), (head, packed))}
    rel = np.abs(logits[head] - logits["fp16"]).max() / np.abs(logits["fp16"]).max()
    assert 0 < rel < (0.02 if bits == 8 else 0.2)
    got = forward(packed, tokens, 0, KVCache.allocate(packed.args, 16, np.float16), NumbaBackend("int16"))
    assert np.abs(got - logits[head]).max() / np.abs(logits[head]).max() <= 1e-3
    assert ppl(outs[head]) < 1.1 * ppl(outs["fp16"])


@pytest.mark.long
def test_export_peak_memory_does_not_grow_with_depth(smollm2, tmp_path):
    """SmolLM2's layers repeated 4x (a sharded fp16 HF directory): the exporter's peak RSS stays put."""
    import numpy as np

    from edge_awq.formats.load import open_source
    from tests.hfdir import write_hf_dir
    from tests.conftest import PEAK

    src = open_source(smollm2)
    peaks = []
    for repeat in (1, 4):
        hf = write_hf_dir(src, tmp_path / f"x{repeat}", shards=4, dtype=np.float16, repeat=repeat)
        r = subprocess.run([sys.executable, "-c", PEAK, "export", str(hf), "--calib", str(SHAKESPEARE), "-o",
                            str(tmp_path / f"x{repeat}.eawq"), "--method", "rtn", "--group-size", "64",
                            "--n-samples", "2", "--seqlen", "128"], capture_output=True, text=True, timeout=900)
        peak = [line for line in r.stderr.splitlines() if line.startswith("PEAK ")]
        assert r.returncode == 0 and peak, r.stderr
        peaks.append(int(peak[0].split()[1]))
    assert peaks[1] < 1.10 * peaks[0], peaks


def test_calibration_documents_as_the_references_take_them(stories_path):
    """--calib-sampling documents: shuffled (fixed seed) documents of at most a block, concatenated and cut."""
    import numpy as np

    from edge_awq.offline.calibrate import calibration_blocks

    tok = open_source(stories_path).tokenizer()
    even, s_even = calibration_blocks(SHAKESPEARE, tok, 8, 64)
    docs, s_docs = calibration_blocks(SHAKESPEARE, tok, 8, 64, "documents")
    again, _ = calibration_blocks(SHAKESPEARE, tok, 8, 64, "documents")
    assert docs.shape == even.shape == (8, 64) and np.array_equal(docs, again)  # the seed is fixed
    assert not np.array_equal(docs, even) and s_docs["sampling"] == "documents" and "sampling" not in s_even
    pieces = [np.asarray(tok.encode(d.strip())) for d in SHAKESPEARE.read_text().split("\n\n") if d.strip()]
    stream = docs.reshape(-1)
    first = next(p for p in pieces if 0 < len(p) <= 64 and np.array_equal(stream[: len(p)], p))
    assert len(first) <= 64  # the blocks begin with a whole document of at most a block
