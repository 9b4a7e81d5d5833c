import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from edge_awq.errors import FormatError
from edge_awq.formats.tensorfile import SafetensorsFile


def write_raw(path, tensors: dict[str, tuple[str, tuple, bytes]], metadata=None):
    """A safetensors file written by hand: name -> (dtype name, shape, bytes)."""
    header, off, blobs = {}, 0, []
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
        blobs.append(data)
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_reads_what_safetensors_writes(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.array([1.5, -2.25], np.float16)
    save_file({"a": a, "b": b}, str(tmp_path / "x.safetensors"), metadata={"k": "v"})
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert f.metadata == {"k": "v"} and set(f.tensors) == {"a", "b"}
    assert np.array_equal(f.get("a"), a) and f.get("b").dtype == np.float16 and np.array_equal(f.get("b"), b)


def test_bf16_is_widened_exactly(tmp_path):
    want = np.array([1.0, -2.5, 3.140625, 1e-3], np.float32)
    bf16 = (want.view(np.uint32) >> 16).astype(np.uint16)  # these values are exact in bfloat16 but 1e-3
    write_raw(tmp_path / "b.safetensors", {"w": ("BF16", (4,), bf16.tobytes())})
    got = SafetensorsFile(tmp_path / "b.safetensors").get("w")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got[:3], want[:3])
    assert abs(got[3] - 1e-3) < 1e-5


@pytest.mark.parametrize("cut,words", [(4, "too short"), (20, "truncated or not safetensors"), (-3, "truncated: tensor")])
def test_truncation_is_named(tmp_path, cut, words):
    save_file({"a": np.ones((8, 8), np.float32)}, str(tmp_path / "x.safetensors"))
    raw = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:cut])
    with pytest.raises(FormatError, match=words):
        SafetensorsFile(tmp_path / "cut.safetensors")


def test_corrupt_header_and_bad_entries(tmp_path):
    p = tmp_path / "c.safetensors"
    p.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 16)
    with pytest.raises(FormatError, match="not JSON"):
        SafetensorsFile(p)
    write_raw(p, {"w": ("F32", (3,), b"\0" * 8)})
    with pytest.raises(FormatError, match="spans 8 bytes but shape"):
        SafetensorsFile(p)
    write_raw(p, {"w": ("Q4", (2,), b"\0" * 8)})
    with pytest.raises(FormatError, match="unsupported dtype 'Q4'"):
        SafetensorsFile(p)
