"""The cuda backend: native/'s kernels (libedge_awq_cuda.so, built by ``edge-awq build-native``) through cffi.

The only module that touches ``ffi``. cffi's ABI mode: the cdef is the part of ``edge_awq_cuda.h``
between its ABI markers, read from the installed header, and the library is ``dlopen``ed.

Activations live on the device as fp16 ``DeviceArray``s (the model code only reshapes, slices and
adds them); ``prepare`` uploads the weights once (4-bit rows reordered for the kernels, one tensor
at a time), ``allocate_cache`` makes an fp16 KV cache on the device, and ``to_host`` brings the
logits back as float32 numpy. Every other op also takes numpy input (uploaded first), which is how
the tests compare it with the reference one op at a time.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from edge_awq.config import ModelArgs
from edge_awq.errors import BackendUnavailable, InputError, KernelError
from edge_awq.model import W4, Dense, LayerWeights, ModelWeights
from edge_awq.backends.native import CUDA_LIB, default_prefix

log = logging.getLogger(__name__)

HEADER = "edge_awq_cuda.h"
ABI_VERSION = 1
_DTYPES = {np.dtype(np.float16): 2, np.dtype(np.float32): 4, np.dtype(np.int32): 4}


def abi_cdef(header_text: str) -> str:
    """The declarations between ``/* ABI begin */`` and ``/* ABI end */``, comments removed."""
    m = re.search(r"/\* ABI begin \*/(.*?)/\* ABI end \*/", header_text, re.S)
    if not m:
        raise BackendUnavailable("edge_awq_cuda.h has no ABI markers: rebuild with `edge-awq build-native`")
    return re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)


def open_library(path: Path, header: Path):
    """(ffi, lib) for a library and the header that declares it; BackendUnavailable with the fix if not."""
    try:
        import cffi
    except ImportError:
        raise BackendUnavailable("the cuda backend needs cffi: pip install cffi") from None
    if not path.is_file():
        raise BackendUnavailable(f"the cuda backend needs {path.name}, not found in {path.parent}: "
                                 "build it with `edge-awq build-native` (or set EDGE_AWQ_NATIVE to its prefix)")
    if not header.is_file():
        raise BackendUnavailable(f"{header} is missing beside {path}: rebuild with `edge-awq build-native`")
    ffi = cffi.FFI()
    ffi.cdef(abi_cdef(header.read_text()))
    try:
        lib = ffi.dlopen(str(path))
    except OSError as e:
        raise BackendUnavailable(f"{path} does not load ({str(e).splitlines()[0]}): rebuild it with "
                                 "`edge-awq build-native` on this machine") from None
    return ffi, lib


class _Block:
    """One device allocation; back to its pool's free list when no array refers to it."""

    __slots__ = ("ptr", "nbytes", "pool")

    def __init__(self, ptr, nbytes: int, pool: "DevicePool"):
        self.ptr, self.nbytes, self.pool = ptr, nbytes, pool

    def __del__(self):
        self.pool.free[self.nbytes].append(self.ptr)


class DevicePool:
    """Device memory reused by size: cudaMalloc/cudaFree per op would cost more than the kernels.

    One stream runs every kernel in order, so memory freed here by the host is reused by later
    kernels only after the earlier ones that read it.
    """

    def __init__(self, backend: "CudaBackend"):
        self.backend = backend
        self.free: dict[int, list] = defaultdict(list)

    def alloc(self, nbytes: int) -> _Block:
        nbytes = max(256, -(-nbytes // 256) * 256)
        if self.free[nbytes]:
            return _Block(self.free[nbytes].pop(), nbytes, self)
        b = self.backend
        out = b.ffi.new("void **")
        b.call("eawq_malloc", out, nbytes)
        return _Block(out[0], nbytes, self)


class DeviceArray:
    """An fp16, fp32 or int32 array in device memory: a shape, a dtype and a byte offset into a block."""

    def __init__(self, backend: "CudaBackend", block: _Block, shape: tuple[int, ...], dtype, offset: int = 0):
        self.backend, self.block, self.shape, self.dtype, self.offset = backend, block, tuple(shape), np.dtype(dtype), offset

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def ptr(self):
        return self.backend.ffi.cast("char *", self.block.ptr) + self.offset

    def __len__(self) -> int:
        return self.shape[0]

    def reshape(self, *shape) -> "DeviceArray":
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if -1 in shape:
            known = int(np.prod([s for s in shape if s != -1]))
            shape = tuple(self.size // known if s == -1 else s for s in shape)
        if int(np.prod(shape)) != self.size:
            raise ValueError(f"cannot reshape {self.shape} into {shape}")
        return DeviceArray(self.backend, self.block, shape, self.dtype, self.offset)

    def __getitem__(self, idx) -> "DeviceArray":
        """Rows of the first axis: an int or a slice with step 1 (what the model code takes)."""
        n, row = self.shape[0], self.nbytes // max(self.shape[0], 1)
        if isinstance(idx, (int, np.integer)):
            i = int(idx) + n if idx < 0 else int(idx)
            if not 0 <= i < n:
                raise IndexError(idx)
            return DeviceArray(self.backend, self.block, self.shape[1:], self.dtype, self.offset + i * row)
        if isinstance(idx, slice):
            start, stop, step = idx.indices(n)
            if step != 1:
                raise IndexError("device arrays slice rows with step 1 only")
            stop = max(stop, start)
            return DeviceArray(self.backend, self.block, (stop - start, *self.shape[1:]), self.dtype,
                               self.offset + start * row)
        raise IndexError(f"device arrays take an int or a slice of rows, not {idx!r}")

    def __add__(self, other) -> "DeviceArray":
        return self.backend.add(self, other)


@dataclass(frozen=True)
class CudaLinear:
    """A linear weight uploaded to the device: the eawq_linear_t the kernels take, and its buffers."""

    desc: object  # cffi eawq_linear_t *
    buffers: tuple  # DeviceArrays the desc points into (kept alive with it)
    out_features: int
    in_features: int
    f32_out: bool = False  # the head: logits come out in fp32

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


@dataclass
class CudaKVCache:
    """fp16 keys and values of every layer on the device, (n_layers, n_kv_heads, max_seq, head_dim) each."""

    k: DeviceArray
    v: DeviceArray
    max_seq: int

    def layer(self, which: DeviceArray, layer: int):
        per_layer = which.nbytes // which.shape[0]
        return which.backend.ffi.cast("uint16_t *", which.ptr + layer * per_layer)


class CudaBackend:
    """The six ops on an NVIDIA GPU (Jetson Orin: sm_87). fp16 activations, fp32 accumulation."""

    name = "cuda"
    kv_dtype = np.float16

    def __init__(self, prefix: Path | None = None, device: int = 0):
        prefix = Path(prefix) if prefix else default_prefix()
        self.ffi, self.lib = open_library(prefix / "lib" / CUDA_LIB, prefix / "include" / HEADER)
        if self.lib.eawq_abi_version() != ABI_VERSION:
            raise BackendUnavailable(f"{prefix / 'lib' / CUDA_LIB} has ABI {self.lib.eawq_abi_version()}, this "
                                     f"edge-awq expects {ABI_VERSION}: rebuild with `edge-awq build-native`")
        count = self.ffi.new("int *")
        if self.lib.eawq_device_count(count) != 0:
            raise BackendUnavailable(f"{CUDA_LIB} loads, but no CUDA device answers "
                                     f"({self.ffi.string(self.lib.eawq_last_error()).decode()})")
        self.call("eawq_set_device", device)
        name = self.ffi.new("char[256]")
        self.call("eawq_device_name", device, name, 256)
        self.device_name = self.ffi.string(name).decode()
        stream = self.ffi.new("eawq_stream_t *")
        self.call("eawq_stream_create", stream)
        self.stream = stream[0]
        self.pool = DevicePool(self)
        self._uploaded: dict[int, tuple[object, object]] = {}  # id(host weight) -> (host, device): on-the-fly uploads
        log.info("cuda backend on %s", self.device_name)

    # -- plumbing --------------------------------------------------------------------------

    def call(self, fn: str, *args) -> None:
        status = getattr(self.lib, fn)(*args)
        if status != 0:
            msg = self.ffi.string(self.lib.eawq_last_error()).decode()
            raise KernelError(f"{fn}: {self.ffi.string(self.lib.eawq_status_str(status)).decode()}: {msg}")

    def empty(self, shape, dtype=np.float16) -> DeviceArray:
        shape = tuple(int(s) for s in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return DeviceArray(self, self.pool.alloc(nbytes), shape, dtype)

    def upload(self, a, dtype=np.float16) -> DeviceArray:
        """A host array copied to the device as dtype (fp16, fp32 or int32)."""
        if isinstance(a, DeviceArray):
            return a
        a = np.ascontiguousarray(a, dtype=dtype)
        out = self.empty(a.shape, dtype)
        self.call("eawq_copy_to_device", out.ptr, self.ffi.from_buffer(a), a.nbytes, self.stream)
        self.call("eawq_synchronize", self.stream)  # the host buffer may go away after this returns
        return out

    def to_host(self, x) -> np.ndarray:
        """A device array as float32 numpy (waits for the kernels that write it)."""
        if not isinstance(x, DeviceArray):
            return np.asarray(x, dtype=np.float32)
        host = np.empty(x.shape, x.dtype)
        self.call("eawq_copy_to_host", self.ffi.from_buffer(host), x.ptr, x.nbytes, self.stream)
        return host.astype(np.float32, copy=False)

    def _u16(self, x: DeviceArray):
        return self.ffi.cast("uint16_t *", x.ptr)

    def _f32(self, x: DeviceArray):
        return self.ffi.cast("float *", x.ptr)

    # -- weights ---------------------------------------------------------------------------

    def upload_linear(self, w, f32_out: bool = False) -> CudaLinear:
        """A Dense or W4 weight on the device (4-bit rows interleaved for the kernels), one tensor at a time."""
        if isinstance(w, CudaLinear):
            return w
        bias = self.upload(w.bias, np.float32) if w.bias is not None else None
        if isinstance(w, Dense):
            return self._f16_linear(self.upload(w.weight, np.float16), bias, f32_out)
        if not isinstance(w, W4):
            raise TypeError(f"cuda linear takes Dense or W4 weights, got {type(w).__name__}")
        out_f, in_f = w.shape
        if in_f % w.group_size or (w.group_size != in_f and w.group_size % 32):
            raise BackendUnavailable(f"the cuda kernels take group sizes that are multiples of 32 (or one group "
                                     f"per row); this file has {w.group_size}: use --backend numba")
        words = np.array(w.qweight, dtype=np.uint32)  # a host copy of this one tensor, repacked in place
        if w.bits == 4:
            self.call("eawq_repack_w4", self.ffi.cast("uint32_t *", self.ffi.from_buffer(words)), words.size)
        qweight = self.upload(words.view(np.int32), np.int32)
        del words
        scales = self.upload(np.asarray(w.scales).view(np.uint16).view(np.float16), np.float16)
        zeros = self.upload(np.asarray(w.zeros, np.uint32).view(np.int32), np.int32)
        desc = self.ffi.new("eawq_linear_t *", {
            "kind": 0, "bits": w.bits, "group_size": w.group_size, "in_features": in_f, "out_features": out_f,
            "zero_words": w.zeros.shape[1], "qweight": self.ffi.cast("uint32_t *", qweight.ptr),
            "scales": self._u16(scales), "zeros": self.ffi.cast("uint32_t *", zeros.ptr),
            "bias": self._f32(bias) if bias is not None else self.ffi.NULL})
        return CudaLinear(desc, (qweight, scales, zeros, bias), out_f, in_f, f32_out)

    def _f16_linear(self, weight: DeviceArray, bias: DeviceArray | None, f32_out: bool) -> CudaLinear:
        """An fp16 weight (out, in) already on the device as a linear."""
        out_f, in_f = weight.shape
        desc = self.ffi.new("eawq_linear_t *", {
            "kind": 1, "bits": 16, "group_size": in_f, "in_features": in_f, "out_features": out_f,
            "weight": self._u16(weight), "bias": self._f32(bias) if bias is not None else self.ffi.NULL})
        return CudaLinear(desc, (weight, bias), out_f, in_f, f32_out)

    def prepare(self, w: ModelWeights) -> ModelWeights:
        """The model's weights on the device: linears uploaded, norms fp32, embedding fp16 (shared with a tied head)."""
        layers = []
        for lw in w.layers:  # a lazy sequence reads one layer at a time
            layers.append(LayerWeights(**{
                f.name: (self.upload(getattr(lw, f.name), np.float32) if f.name.endswith("norm")
                         else self.upload_linear(getattr(lw, f.name))) for f in fields(LayerWeights)}))
        emb = self.upload(w.tok_embeddings, np.float16)
        if isinstance(w.output, Dense) and w.output.weight is w.tok_embeddings:  # tied: one table on the device
            out = self._f16_linear(emb, None, True)
        else:
            out = self.upload_linear(w.output, f32_out=True)
        return replace(w, tok_embeddings=emb, layers=layers, norm=self.upload(w.norm, np.float32), output=out,
                       inv_freq=self.upload(w.inv_freq, np.float32))

    def allocate_cache(self, args: ModelArgs, max_seq: int, dtype=None, commit: bool = False) -> CudaKVCache:
        if dtype is not None and np.dtype(dtype) != np.float16:
            raise InputError(f"the cuda backend keeps an fp16 KV cache, not {np.dtype(dtype).name}: "
                             "drop --kv-dtype int8 or use --backend numba")
        shape = (args.n_layers, args.n_kv_heads, max_seq, args.head_dim)
        k, v = self.empty(shape), self.empty(shape)
        for a in (k, v):  # device memory is committed when allocated; zero it so no stale rows are ever read
            self.call("eawq_memset", a.ptr, 0, a.nbytes, self.stream)
        return CudaKVCache(k, v, max_seq)

    def _linear_of(self, w) -> CudaLinear:
        if isinstance(w, CudaLinear):
            return w
        hit = self._uploaded.get(id(w))
        if hit is None or hit[0] is not w:  # a host weight passed directly (tests, lazy layers): upload once
            hit = self._uploaded[id(w)] = (w, self.upload_linear(w))
        return hit[1]

    # -- the ops ---------------------------------------------------------------------------

    def embed(self, table, tokens) -> DeviceArray:
        """Rows of table (vocab, dim) fp16 on the device for tokens (T,) int -> (T, dim) fp16."""
        table = table if isinstance(table, DeviceArray) else self.upload(table, np.float16)
        tokens = np.asarray(tokens).reshape(-1)
        vocab, dim = table.shape
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
            raise InputError(f"token ids must be in 0..{vocab - 1}, got {tokens.min()}..{tokens.max()}")
        ids = self.upload(tokens, np.int32)
        out = self.empty((tokens.size, dim))
        self.call("eawq_embed", self._u16(table), self.ffi.cast("int32_t *", ids.ptr), self._u16(out),
                  tokens.size, dim, vocab, self.stream)
        return out

    def rmsnorm(self, x, weight, eps: float) -> DeviceArray:
        x, weight = self.upload(x), self.upload(weight, np.float32)
        T, dim = int(np.prod(x.shape[:-1])), x.shape[-1]
        out = self.empty(x.shape)
        self.call("eawq_rmsnorm", self._u16(x), self._f32(weight), self._u16(out), T, dim, float(eps), self.stream)
        return out

    def linear(self, x, w) -> DeviceArray:
        """x (..., in) fp16 times w (out, in) transposed (+ bias) -> (..., out) fp16, or fp32 for the head."""
        x, cw = self.upload(x), self._linear_of(w)
        if x.shape[-1] != cw.in_features:
            raise KernelError(f"linear: input width {x.shape[-1]} does not match the weight's {cw.shape}")
        T = int(np.prod(x.shape[:-1]))
        out = self.empty((*x.shape[:-1], cw.out_features), np.float32 if cw.f32_out else np.float16)
        self.call("eawq_linear", cw.desc, self._u16(x), out.ptr, int(cw.f32_out), T, self.stream)
        return out

    def linears(self, x, ws) -> list[DeviceArray]:
        x = self.upload(x)
        return [self.linear(x, w) for w in ws]

    def rope(self, x, pos: int, inv_freq, interleaved: bool) -> DeviceArray:
        """Rotates x (T, heads, head_dim) fp16 in place (a fresh copy when x came from the host) and returns it."""
        x, inv_freq = self.upload(x), self.upload(inv_freq, np.float32)
        T, heads, hd = x.shape
        self.call("eawq_rope", self._u16(x), T, heads, hd, int(pos), self._f32(inv_freq), int(interleaved),
                  self.stream)
        return x

    def attention(self, q, k, v, cache: CudaKVCache, layer: int, pos: int) -> DeviceArray:
        if not isinstance(cache, CudaKVCache):
            raise TypeError("the cuda backend attends over its own cache: make it with ops.allocate_cache")
        q, k, v = self.upload(q), self.upload(k), self.upload(v)
        T, n_heads, hd = q.shape
        n_kv = k.shape[1]
        out = self.empty((T, n_heads * hd))
        self.call("eawq_attention", self._u16(q), self._u16(k), self._u16(v), cache.layer(cache.k, layer),
                  cache.layer(cache.v, layer), self._u16(out), T, n_heads, n_kv, hd, int(pos), cache.max_seq,
                  self.stream)
        return out

    def silu_mul(self, gate, up) -> DeviceArray:
        gate, up = self.upload(gate), self.upload(up)
        out = self.empty(gate.shape)
        self.call("eawq_silu_mul", self._u16(gate), self._u16(up), self._u16(out), gate.size, self.stream)
        return out

    def add(self, a, b) -> DeviceArray:
        """a + b, same shape, fp16: the residual adds of the model code (``x + h``)."""
        a, b = self.upload(a), self.upload(b)
        if a.shape != b.shape:
            raise KernelError(f"add: shapes {a.shape} and {b.shape} differ")
        out = self.empty(a.shape)
        self.call("eawq_add", self._u16(a), self._u16(b), self._u16(out), a.size, self.stream)
        return out
