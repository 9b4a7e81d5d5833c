"""The .eawq container: round trip, atomic writes, checks on read, checksums."""

import json
import struct

import numpy as np
import pytest

from edge_awq.errors import FormatError, InputError
from edge_awq.formats.eawq import EawqSource, EawqWriter, tensor_specs
from edge_awq.formats.load import load_weights, open_source
from edge_awq.model import W4

SPECS = [("a", np.float16, (2, 3)), ("b", np.uint32, (4,)), ("tokenizer", np.uint8, (5,))]
META = {"layout": "bits-le-v1", "model_args": {}, "quantization": {"bits": 4}, "source": {}, "tokenizer": {}}


def write_small(path):
    with EawqWriter(path, SPECS) as w:
        w.add("a", np.arange(6, dtype=np.float16).reshape(2, 3))
        w.add("b", np.array([1, 2, 3, 4], np.uint32))
        w.add("tokenizer", np.frombuffer(b"hello", np.uint8))
        w.close(META)


def test_writer_is_readable_by_safetensors_and_leaves_no_temp(tmp_path):
    from safetensors.numpy import load_file

    p = tmp_path / "m.eawq"
    write_small(p)
    got = load_file(str(p))
    assert got["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and got["b"].tolist() == [1, 2, 3, 4]
    assert [f.name for f in tmp_path.iterdir()] == ["m.eawq"]


def test_failure_midway_leaves_nothing(tmp_path):
    p = tmp_path / "m.eawq"
    with pytest.raises(RuntimeError):
        with EawqWriter(p, SPECS) as w:
            w.add("a", np.zeros((2, 3), np.float16))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_wrong_order_or_shape(tmp_path):
    with EawqWriter(tmp_path / "m.eawq", SPECS) as w:
        with pytest.raises(ValueError, match="out of order or shape"):
            w.add("b", np.zeros(4, np.uint32))
        with pytest.raises(ValueError, match="out of order or shape"):
            w.add("a", np.zeros((3, 2), np.float16))
        w.abort()


def test_unwritable_output(tmp_path):
    with pytest.raises(InputError, match="no such directory for the output"):
        EawqWriter(tmp_path / "no" / "such" / "dir" / "m.eawq", SPECS)


@pytest.fixture(scope="module")
def exported(stories_path, tmp_path_factory):
    pytest.importorskip("torch")
    from tests.conftest import export

    out = tmp_path_factory.mktemp("eawq") / "s.eawq"
    r = export(stories_path, out, "--n-samples", 4, "--seqlen", 128, "--group-size", "channel")
    assert r.returncode == 0, r.stderr
    return out


def test_reader_gives_packed_weights_and_tokenizer(exported, stories_path):
    src = open_source(exported)
    fp = open_source(stories_path)
    assert src.args == fp.args and src.quantization["bits"] == 4 and src.quantization["group_size"] == "channel"
    w = load_weights(src)
    assert isinstance(w.layers[0].w2, W4) and w.layers[0].w2.group_size == 172 and w.layers[0].wq.group_size == 64
    assert src.tokenizer().encode("Once upon a time") == fp.tokenizer().encode("Once upon a time")
    assert src.verify() == []
    assert src.quantization["head"] == "int8" and isinstance(w.output, W4) and w.output.bits == 8  # the default
    specs = tensor_specs(src.args, 4, lambda i: i, src.file.tensors["tokenizer"].shape[0], src.quantization["head"])
    assert [n for n, _, _ in specs] == list(src.file.tensors)


def test_damaged_byte_fails_verify(exported, tmp_path):
    raw = bytearray(exported.read_bytes())
    raw[-10] ^= 0xFF  # inside the last tensor
    bad = tmp_path / "bad.eawq"
    bad.write_bytes(bytes(raw))
    src = EawqSource(bad)  # the header is intact: opening succeeds, verify finds it
    assert src.verify() == [list(src.file.tensors)[-1]]


def test_truncated_and_wrong_version_are_named(exported, tmp_path):
    raw = exported.read_bytes()
    cut = tmp_path / "cut.eawq"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FormatError, match="truncated"):
        EawqSource(cut)
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"]["version"] = "99"
    h = json.dumps(header).encode().ljust(n, b" ")
    old = tmp_path / "v99.eawq"
    old.write_bytes(raw[:8] + h + raw[8 + n :])
    with pytest.raises(FormatError, match="version 99 unsupported"):
        EawqSource(old)
