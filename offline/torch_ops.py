"""The six backend ops in torch (CPU or CUDA), so the offline tool runs the same ``model.py``.

Arrays are float32 torch tensors with optional leading batch dimensions;
attention runs without a KV cache (whole calibration blocks, causal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_awq.model import Dense


class TorchOps:
    name = "torch"

    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)

    def embed(self, table, tokens):
        return table[tokens].float()

    def rmsnorm(self, x, weight, eps: float):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def linear(self, x, w):
        if not isinstance(w, Dense):
            raise TypeError(f"torch ops take Dense weights, got {type(w).__name__}")
        return F.linear(x, w.weight, w.bias)

    def linears(self, x, ws):
        return [self.linear(x, w) for w in ws]

    def rope(self, x, pos: int, inv_freq, interleaved: bool):
        T, hd = x.shape[-3], x.shape[-1]
        t = torch.arange(pos, pos + T, dtype=torch.float64, device=x.device)
        angles = t[:, None] * inv_freq.to(torch.float64)[None, :]  # (T, hd/2)
        cos, sin = angles.cos().float()[:, None, :], angles.sin().float()[:, None, :]  # (T, 1, hd/2)
        if interleaved:
            x0, x1 = x[..., 0::2], x[..., 1::2]
            return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
        x0, x1 = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)

    def attention(self, q, k, v, cache, layer: int, pos: int):
        if cache is not None or pos != 0:
            raise ValueError("offline attention runs whole blocks from position 0, without a cache")
        group = q.shape[-2] // k.shape[-2]
        qh, kh, vh = (t.transpose(-3, -2) for t in (q, k, v))  # (..., heads, T, hd)
        kh, vh = kh.repeat_interleave(group, dim=-3), vh.repeat_interleave(group, dim=-3)
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)  # (..., n_heads, T, hd)
        return o.transpose(-3, -2).flatten(-2)  # (..., T, n_heads * hd)

    def silu_mul(self, gate, up):
        """SiLU(gate) · up in gate's storage: gate is a linear's fresh output that nothing else reads. The same
        element-wise kernels as ``F.silu(gate) * up``, bit for bit, without two new (T, hidden) tensors a call,
        whose pages the search faulted in again for every candidate (SmolLM2's MLP, a block: 1.2-1.6 ms → 0.5-0.6)."""
        return F.silu(gate, inplace=True).mul_(up)


class RecordingOps:
    """Wraps ops and keeps the input of each linear, under its weight's name in the layer."""

    def __init__(self, inner, names: dict[int, str]):
        self.inner, self.names, self.name = inner, names, inner.name
        self.inputs: dict[str, torch.Tensor] = {}

    def linear(self, x, w):
        name = self.names.get(id(w))
        if name is not None:
            self.inputs[name] = x
        return self.inner.linear(x, w)

    def linears(self, x, ws):
        return [self.linear(x, w) for w in ws]

    def __getattr__(self, op):
        return getattr(self.inner, op)


class NormMemo:
    """Wraps ops and computes each RMSNorm once: a search runs its judged sub-block once per candidate on
    the same input and norm weight, and only the linears change. Keyed by the identity of the input and
    the weight (kept alive with the result, so an identity is never reused while remembered)."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self._memo: dict[tuple[int, int, float], tuple] = {}

    def rmsnorm(self, x, weight, eps: float):
        key = (id(x), id(weight), eps)
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = (x, weight, self.inner.rmsnorm(x, weight, eps))
        return hit[2]

    def __getattr__(self, op):
        return getattr(self.inner, op)


class BlockAttention:
    """Wraps ops so that attention runs through the numba kernel for whole causal blocks
    (``edge_awq.backends.numba.attention.causal_blocks``) instead of torch's flash kernel, on CPU float32
    tensors. The scale search runs its judged attention sub-block through this where heads are narrow
    (``layerwise.BLOCK_ATTENTION_HEAD_DIM``), on the CPUs where it was measured faster than torch's kernel
    (``layerwise.BLOCK_ATTENTION_CPUS``): with stories260K's 8-wide heads on a Zen 4 the flash kernel's inner
    products are 8 long, it ran at 2.7 GFLOP/s and took most of that model's search (docs/export-speed.md). The
    arithmetic is float32 in another order (the softmax's exponential within 4e-7): a candidate's loss moves
    by float rounding, to which the search's choices are tested to be indifferent; the FP pass and the
    propagation keep torch's kernel, so the statistics and the next layer's input do not change."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name

    def attention(self, q, k, v, cache, layer: int, pos: int):
        if cache is not None or pos != 0:
            raise ValueError("offline attention runs whole blocks from position 0, without a cache")
        from edge_awq.backends.numba.attention import causal_blocks

        T, H, hd = q.shape[-3:]
        flat = lambda t: t.detach().reshape(-1, *t.shape[-3:]).numpy()  # noqa: E731
        out = causal_blocks(flat(q), flat(k), flat(v))
        return torch.from_numpy(out).reshape(*q.shape[:-3], T, H * hd)

    def __getattr__(self, op):
        return getattr(self.inner, op)


class CastOps:
    """Wraps ops so that the linears' matrix products run in a lower precision (bfloat16, where the CPU
    has it in hardware): input and weight cast, the product returned in float32. Norms, RoPE, attention,
    the residual additions and the loss stay float32. The last input's cast is kept: q, k, v (and gate,
    up) share theirs."""

    def __init__(self, inner, dtype):
        self.inner, self.name, self.dtype = inner, inner.name, dtype
        self._last: tuple = (None, None)

    def linear(self, x, w):
        if self._last[0] is not x:
            self._last = (x, x.to(self.dtype))
        bias = None if w.bias is None else w.bias.to(self.dtype)
        return F.linear(self._last[1], w.weight.to(self.dtype), bias).float()

    def linears(self, x, ws):
        return [self.linear(x, w) for w in ws]

    def __getattr__(self, op):
        return getattr(self.inner, op)


def native_bfloat16(device: str = "cpu") -> bool:
    """Whether device multiplies bfloat16 in hardware (AVX-512 BF16 or AMX on x86, the BF16 extension on Arm,
    a GPU that has it): elsewhere torch emulates it, slower than float32."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    import platform

    if platform.machine() in ("aarch64", "arm64"):
        from edge_awq.backends.host import cpu_info

        return "bf16" in cpu_info().get("Features", "").split()
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(p()) for p in probes if p is not None)
