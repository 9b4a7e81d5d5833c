"""A prompt's attention, tiled: per KV head and tile of queries, the scores against every key the tile
sees, then the outputs, in loops that vectorize along the keys and along the head dimension.

The kernels in ``kernels.py`` walk the cache row by row for each query and head, a dot product (and a sum
across vector lanes) per key, which suits a decode step (one query a head) but not a prompt: at 512
tokens they ran at a tenth of the rate of the GEMMs around them. Here the cache's keys of a KV head are
first converted once to float32 and transposed (head_dim, n), so that a query's scores accumulate as
``scores += q[d] * K^T[d, :]`` — contiguous multiply-adds along the keys — and a tile's outputs as
``out += p[s] * V[s, :]``. Each query sees only the keys up to its own position; one tile's scores,
``ATTENTION_TILE`` queries of a KV head's group, and the float32 keys and values of the KV heads are all
that is held at a time (``plan.workspace_bytes`` counts them). No BLAS: the threads are numba's, not a
second pool competing with them.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from edge_awq.backends.numba.intrinsics import half_f32, int8_f32
from edge_awq.backends.numba.kernels import exp_f32
from edge_awq.config import ATTENTION_TILE


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def _float_kv(keys, values, k_scale, v_scale, n, kt, vf):
    """kt (n_kv, hd, n) = the keys transposed, vf (n_kv, n, hd) = the values, as float32, from an fp16 cache
    (uint16 bits; scales empty) or an int8 one (a scale per row)."""
    n_kv, _, hd = keys.shape
    for kv in prange(n_kv):
        for s in range(n):
            for d in range(hd):
                if k_scale.shape[0] == 0:
                    kt[kv, d, s] = half_f32(np.uint16(keys[kv, s, d]))
                    vf[kv, s, d] = half_f32(np.uint16(values[kv, s, d]))
                else:
                    kt[kv, d, s] = int8_f32(np.int8(keys[kv, s, d])) * k_scale[kv, s]
                    vf[kv, s, d] = int8_f32(np.int8(values[kv, s, d])) * v_scale[kv, s]


@njit(cache=True, inline="always")
def _job(job, n_tiles):
    """The KV head and tile of job number job, ordered so that the two halves of the jobs (what a static
    schedule gives two threads) hold equal work: a later tile sees more keys, so tiles pair first with last."""
    kv, i = job // n_tiles, job % n_tiles
    tile = i // 2 if i % 2 == 0 else n_tiles - 1 - i // 2
    return kv, tile


@njit(cache=True, inline="always", fastmath=True, error_model="numpy")
def _max(sc, n):
    """max(sc[:n]) in sixteen running maxima, which vectorize: a single running max is a chain of dependent
    compares that LLVM leaves scalar (it took a third of the whole-block kernel below at 8-wide heads).
    A maximum is exact in any order: the same value."""
    full = n - n % 16
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = np.float32(-np.inf)
    m8 = m9 = m10 = m11 = m12 = m13 = m14 = m15 = np.float32(-np.inf)
    for s in range(0, full, 16):
        m0, m1, m2, m3 = max(m0, sc[s]), max(m1, sc[s + 1]), max(m2, sc[s + 2]), max(m3, sc[s + 3])
        m4, m5, m6, m7 = max(m4, sc[s + 4]), max(m5, sc[s + 5]), max(m6, sc[s + 6]), max(m7, sc[s + 7])
        m8, m9, m10, m11 = max(m8, sc[s + 8]), max(m9, sc[s + 9]), max(m10, sc[s + 10]), max(m11, sc[s + 11])
        m12, m13, m14, m15 = max(m12, sc[s + 12]), max(m13, sc[s + 13]), max(m14, sc[s + 14]), max(m15, sc[s + 15])
    top = max(max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7))),
              max(max(max(m8, m9), max(m10, m11)), max(max(m12, m13), max(m14, m15))))
    for s in range(full, n):
        top = max(top, sc[s])
    return top


@njit(nogil=True, parallel=True, cache=True, fastmath=True, error_model="numpy")
def _tiles(q, kt, vf, pos, tile, out):
    T, H, hd = q.shape
    n_kv = kt.shape[0]
    group = H // n_kv
    n_tiles = -(-T // tile)
    scale = np.float32(1.0 / np.sqrt(hd))
    for job in prange(n_kv * n_tiles):
        kv, ti = _job(job, n_tiles)
        t0 = ti * tile
        t1 = min(T, t0 + tile)
        K, V = kt[kv], vf[kv]  # (hd, n), (n, hd)
        sc = np.empty(pos + t1, np.float32)
        acc = np.empty(hd, np.float32)
        for t in range(t0, t1):
            n = pos + t + 1  # this query sees rows 0..pos+t
            for h in range(kv * group, (kv + 1) * group):
                for s in range(n):
                    sc[s] = 0.0
                for d in range(0, hd - 7, 8):  # eight rows of K^T a pass: eight multiply-adds a load of sc
                    q0, q1, q2, q3 = q[t, h, d] * scale, q[t, h, d + 1] * scale, q[t, h, d + 2] * scale, q[t, h, d + 3] * scale
                    q4, q5, q6, q7 = (q[t, h, d + 4] * scale, q[t, h, d + 5] * scale, q[t, h, d + 6] * scale,
                                      q[t, h, d + 7] * scale)
                    k0, k1, k2, k3, k4, k5, k6, k7 = K[d], K[d + 1], K[d + 2], K[d + 3], K[d + 4], K[d + 5], K[d + 6], K[d + 7]
                    for s in range(n):
                        sc[s] += (((q0 * k0[s] + q1 * k1[s]) + (q2 * k2[s] + q3 * k3[s]))
                                  + ((q4 * k4[s] + q5 * k5[s]) + (q6 * k6[s] + q7 * k7[s])))
                for d in range(hd - hd % 8, hd):
                    qd = q[t, h, d] * scale
                    kd = K[d]
                    for s in range(n):
                        sc[s] += qd * kd[s]
                top = _max(sc, n)
                total = np.float32(0.0)
                for s in range(n):
                    e = exp_f32(sc[s] - top)
                    sc[s] = e
                    total += e
                inv = np.float32(1.0) / total
                for d in range(hd):
                    acc[d] = 0.0
                s = 0
                while s + 8 <= n:  # eight rows of V a pass
                    p0, p1, p2, p3 = sc[s] * inv, sc[s + 1] * inv, sc[s + 2] * inv, sc[s + 3] * inv
                    p4, p5, p6, p7 = sc[s + 4] * inv, sc[s + 5] * inv, sc[s + 6] * inv, sc[s + 7] * inv
                    v0, v1, v2, v3, v4, v5, v6, v7 = V[s], V[s + 1], V[s + 2], V[s + 3], V[s + 4], V[s + 5], V[s + 6], V[s + 7]
                    for d in range(hd):
                        acc[d] += (((p0 * v0[d] + p1 * v1[d]) + (p2 * v2[d] + p3 * v3[d]))
                                   + ((p4 * v4[d] + p5 * v5[d]) + (p6 * v6[d] + p7 * v7[d])))
                    s += 8
                while s < n:
                    p = sc[s] * inv
                    vs = V[s]
                    for d in range(hd):
                        acc[d] += p * vs[d]
                    s += 1
                for d in range(hd):
                    out[t, h, d] = acc[d]


def attention_tiles(q: np.ndarray, keys: np.ndarray, values: np.ndarray, pos: int, out: np.ndarray,
                    k_scale: np.ndarray | None = None, v_scale: np.ndarray | None = None) -> None:
    """Causal GQA: q (T, H, hd) float32 at positions pos..pos+T-1; keys, values (n_kv, S, hd) of one layer
    (float16, or int8 with k_scale, v_scale (n_kv, S)); out (T, H, hd) float32. Query t sees rows 0..pos+t."""
    T, H, hd = q.shape
    n_kv, n = keys.shape[0], pos + T
    kt = np.empty((n_kv, hd, n), np.float32)
    vf = np.empty((n_kv, n, hd), np.float32)
    if k_scale is None:
        none = np.empty((0, 0), np.float32)
        _float_kv(keys.view(np.uint16), values.view(np.uint16), none, none, n, kt, vf)
    else:
        _float_kv(keys, values, k_scale, v_scale, n, kt, vf)
    _tiles(np.ascontiguousarray(q, dtype=np.float32), kt, vf, pos, ATTENTION_TILE, out)


PAD = 64  # keys a whole-block kernel's loops run in multiples of (four 16-lane vectors: no scalar remainder)


@njit(cache=True, inline="always", fastmath=True, error_model="numpy")
def _scores_pair(qa, qb, K, hd, scale, m, sa, sb):
    """sa[:m], sb[:m] = the scaled dot products of queries qa and qb with keys K[:, :m]: each load of K serves
    both."""
    for s in range(m):
        sa[s] = 0.0
        sb[s] = 0.0
    for d in range(0, hd - 3, 4):
        a0, a1, a2, a3 = qa[d] * scale, qa[d + 1] * scale, qa[d + 2] * scale, qa[d + 3] * scale
        b0, b1, b2, b3 = qb[d] * scale, qb[d + 1] * scale, qb[d + 2] * scale, qb[d + 3] * scale
        k0, k1, k2, k3 = K[d], K[d + 1], K[d + 2], K[d + 3]
        for s in range(m):
            x0, x1, x2, x3 = k0[s], k1[s], k2[s], k3[s]
            sa[s] += (a0 * x0 + a1 * x1) + (a2 * x2 + a3 * x3)
            sb[s] += (b0 * x0 + b1 * x1) + (b2 * x2 + b3 * x3)
    for d in range(hd - hd % 4, hd):
        a, b, kd = qa[d] * scale, qb[d] * scale, K[d]
        for s in range(m):
            sa[s] += a * kd[s]
            sb[s] += b * kd[s]


@njit(cache=True, inline="always", fastmath=True, error_model="numpy")
def _exp_weights(sc, n, m):
    """sc[:n] becomes e**(sc - max), sc[n:m] zero; returns 1 / their sum."""
    top = _max(sc, n)
    total = np.float32(0.0)
    for s in range(m):
        e = exp_f32(sc[s] - top) if s < n else np.float32(0.0)
        sc[s] = e
        total += e
    return np.float32(1.0) / total


@njit(nogil=True, parallel=True, cache=True, fastmath=True, error_model="numpy")
def _causal_blocks(q, kt, vt, tile, out):
    """q, out (heads, T, hd), a query head's rows; kt, vt (kv heads, hd, T padded to a multiple of PAD, zeros
    after T), a KV head's keys and values transposed; query head h reads KV head h // (heads // kv heads).
    Query t sees keys 0..t. Queries go two at a time (t, t + 1), sharing each load of a key and a value, and
    every loop along the keys runs to a multiple of PAD, the weights past a query's own keys zero."""
    H, T, hd = q.shape
    group = H // kt.shape[0]
    n_tiles = -(-T // tile)
    scale = np.float32(1.0 / np.sqrt(hd))
    for job in prange(H * n_tiles):
        h, ti = _job(job, n_tiles)
        K, V = kt[h // group], vt[h // group]
        sa = np.empty(kt.shape[2], np.float32)
        sb = np.empty(kt.shape[2], np.float32)
        t1 = min(T, ti * tile + tile)
        for t in range(ti * tile, t1, 2):
            tb = t + 1 if t + 1 < t1 else t  # a tile's odd last query pairs with itself
            m = -(-(tb + 1) // PAD) * PAD
            _scores_pair(q[h, t], q[h, tb], K, hd, scale, m, sa, sb)
            ia = _exp_weights(sa, t + 1, m)
            ib = _exp_weights(sb, tb + 1, m)
            for d in range(hd):  # a dot product along the keys per output: the sums vectorize across them
                vd = V[d]
                acc_a = np.float32(0.0)
                acc_b = np.float32(0.0)
                for s in range(m):
                    acc_a += sa[s] * vd[s]
                    acc_b += sb[s] * vd[s]
                out[h, t, d] = acc_a * ia
                out[h, tb, d] = acc_b * ib


def causal_blocks(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal GQA over whole blocks, no cache: q (B, T, H, hd), k and v (B, T, n_kv, hd), float32; returns
    (B, T, H·hd) float32. Query t of a block sees keys 0..t of its own block. The offline scale search runs
    its judged attention through this on narrow heads (``edge_awq.offline.torch_ops.BlockAttention``) on the
    CPUs where torch's flash kernel, whose inner products are a head wide, was measured slower: a Zen 4, not an
    Emerald Rapids Xeon (docs/export-speed.md)."""
    B, T, H, hd = q.shape
    n_kv, padded = k.shape[2], -(-T // PAD) * PAD
    qh = np.ascontiguousarray(q.transpose(0, 2, 1, 3), dtype=np.float32).reshape(B * H, T, hd)
    kt = np.zeros((B * n_kv, hd, padded), np.float32)
    vt = np.zeros((B * n_kv, hd, padded), np.float32)
    kt[..., :T] = k.transpose(0, 2, 3, 1).reshape(B * n_kv, hd, T)
    vt[..., :T] = v.transpose(0, 2, 3, 1).reshape(B * n_kv, hd, T)
    out = np.empty((B * H, T, hd), np.float32)
    _causal_blocks(qh, kt, vt, ATTENTION_TILE, out)
    return out.reshape(B, H, T, hd).transpose(0, 2, 1, 3).reshape(B, T, H * hd)
