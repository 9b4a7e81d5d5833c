"""Write a GGUF's weights dequantized to F16 (norms F32), metadata copied: the input llama.cpp's
``llama-quantize`` needs to make its own Q4_0 / Q4_K_M of the same source weights.

    python benchmarks/gguf_to_f16.py IN.gguf OUT-f16.gguf
"""

import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

MOSTLY_F16 = 1


def main(src: str, dst: str) -> None:
    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(dst, arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub_type=sub)
    w.add_file_type(MOSTLY_F16)
    for t in r.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))  # (rows, cols)
        data = np.asarray(t.data) if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) \
            else dequantize(t.data, t.tensor_type)
        data = data.reshape(shape)
        w.add_tensor(t.name, data.astype(np.float32 if data.ndim == 1 else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
