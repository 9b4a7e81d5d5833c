/* The cuda backend's kernels and their launchers.
 *
 * Packed layout expected: pack.py's "bits-le-v1" rows (32 values = `bits` uint32 words per chunk,
 * rows padded to whole chunks), 4-bit words reordered by eawq_repack_w4 (v0 v2 v4 v6 v1 v3 v5 v7);
 * fp16 scales (out, in / group_size); zero points packed like the values. The arithmetic (unpack,
 * dequantize, dot, the order of the sums) is eawq_arith.h's, shared with the CPU test library.
 * Activations fp16, accumulation fp32.
 */
#include <cuda_fp16.h>

#include "eawq_arith.h"
#include "status.h"

namespace {

constexpr int kGemvWarps = 4;           /* rows per GEMV block, one warp each */
constexpr int kGemvMaxTokens = 4;       /* T above this goes to the GEMM */
constexpr int kGemvSharedX = 24576;     /* fp16 entries of x staged in shared memory (48 KiB) */
constexpr int kTileT = 32, kTileN = 64, kTileK = EAWQ_CHUNK;  /* GEMM tile: tokens x rows x depth */
constexpr int kAttnThreads = 128;       /* attention block: one key per thread per tile */
constexpr int kMaxHeadDim = 256;

__device__ __forceinline__ float warp_sum(float v)
{
    for (int off = EAWQ_LANES / 2; off > 0; off >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, off);  /* the butterfly of eawq_lane_butterfly */
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
    for (int off = EAWQ_LANES / 2; off > 0; off >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

/* Sum (or max) over a block of blockDim.x threads, a multiple of 32 and at most 1024; every thread
 * gets the result. red: shared scratch of 32 floats. Ends with a barrier so red can be reused. */
template <bool kMax>
__device__ float block_reduce(float v, float *red)
{
    int lane = threadIdx.x % EAWQ_LANES, warp = threadIdx.x / EAWQ_LANES, n = blockDim.x / EAWQ_LANES;
    v = kMax ? warp_max(v) : warp_sum(v);
    if (lane == 0)
        red[warp] = v;
    __syncthreads();
    float r = red[0];
    for (int i = 1; i < n; ++i)
        r = kMax ? fmaxf(r, red[i]) : r + red[i];
    __syncthreads();
    return r;
}

__device__ __forceinline__ void store(void *y, size_t i, float v, bool f32)
{
    if (f32)
        static_cast<float *>(y)[i] = v;
    else
        static_cast<uint16_t *>(y)[i] = eawq_f2h(v);
}

/* GEMV, T <= 4 tokens: grid (ceil(out / 4), T), 4 warps; warp w computes row 4 * blockIdx.x + w. */
__global__ void __launch_bounds__(kGemvWarps * EAWQ_LANES)
gemv_kernel(eawq_linear_t w, const uint16_t *__restrict__ x, void *__restrict__ y, int y_f32)
{
    extern __shared__ uint16_t xs[];
    int t = blockIdx.y, in = w.in_features;
    const uint16_t *xt = x + (size_t)t * in;
    if (in <= kGemvSharedX) {  /* stage the token's activations: every warp reads them all */
        for (int j = threadIdx.x; j < in; j += blockDim.x)
            xs[j] = xt[j];
        __syncthreads();
        xt = xs;
    }
    int lane = threadIdx.x % EAWQ_LANES, row = blockIdx.x * kGemvWarps + threadIdx.x / EAWQ_LANES;
    if (row >= w.out_features)
        return;
    float acc;
    if (w.kind == EAWQ_W_F16) {
        acc = eawq_f16_lane_dot(w.weight + (size_t)row * in, xt, in, lane);
    } else {
        size_t words = (size_t)((in + EAWQ_CHUNK - 1) / EAWQ_CHUNK) * w.bits;
        acc = eawq_packed_lane_dot(w.qweight + row * words, w.scales + (size_t)row * (in / w.group_size),
                                   w.zeros + (size_t)row * w.zero_words, xt, in, w.group_size, w.bits, lane);
    }
    acc = warp_sum(acc);
    if (lane == 0)
        store(y, (size_t)t * w.out_features + row, acc + (w.bias ? w.bias[row] : 0.0f), y_f32);
}

/* GEMM, T > 4: grid (ceil(out / 64), ceil(T / 32)), 256 threads each owning 2 tokens x 4 rows.
 * Each 32-deep step stages x and the dequantized weights in shared memory (fp32), then fmaf in
 * k order: the same order as the CPU build's eawq_cpu_linear. */
__global__ void __launch_bounds__(256)
gemm_kernel(eawq_linear_t w, const uint16_t *__restrict__ x, void *__restrict__ y, int y_f32, int T)
{
    __shared__ float xs[kTileK][kTileT + 1];
    __shared__ float ws[kTileK][kTileN + 1];
    int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    int row0 = blockIdx.x * kTileN, t0 = blockIdx.y * kTileT, in = w.in_features;
    size_t words = (size_t)((in + EAWQ_CHUNK - 1) / EAWQ_CHUNK) * w.bits;
    int n_groups = in / w.group_size;
    float acc[2][4] = {};
    for (int k0 = 0; k0 < in; k0 += kTileK) {
        for (int i = tid; i < kTileT * kTileK; i += blockDim.x) {
            int tt = i / kTileK, kk = i % kTileK, t = t0 + tt, k = k0 + kk;
            xs[kk][tt] = (t < T && k < in) ? eawq_h2f(x[(size_t)t * in + k]) : 0.0f;
        }
        for (int i = tid; i < kTileN * kTileK; i += blockDim.x) {
            int rr = i / kTileK, kk = i % kTileK, row = row0 + rr, k = k0 + kk;
            float v = 0.0f;
            if (row < w.out_features && k < in)
                v = w.kind == EAWQ_W_F16
                        ? eawq_h2f(w.weight[(size_t)row * in + k])
                        : eawq_packed_weight(w.qweight + row * words, w.scales + (size_t)row * n_groups,
                                             w.zeros + (size_t)row * w.zero_words, k, w.group_size, w.bits);
            ws[kk][rr] = v;
        }
        __syncthreads();
        for (int kk = 0; kk < kTileK; ++kk)
            for (int i = 0; i < 2; ++i)
                for (int j = 0; j < 4; ++j)
                    acc[i][j] = fmaf(xs[kk][ty * 2 + i], ws[kk][tx * 4 + j], acc[i][j]);
        __syncthreads();
    }
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 4; ++j) {
            int t = t0 + ty * 2 + i, row = row0 + tx * 4 + j;
            if (t < T && row < w.out_features)
                store(y, (size_t)t * w.out_features + row, acc[i][j] + (w.bias ? w.bias[row] : 0.0f), y_f32);
        }
}

/* One block of 256 threads per token. */
__global__ void rmsnorm_kernel(const uint16_t *__restrict__ x, const float *__restrict__ weight,
                               uint16_t *__restrict__ y, int dim, float eps)
{
    __shared__ float red[32];
    const uint16_t *xt = x + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        float v = eawq_h2f(xt[j]);
        ss = fmaf(v, v, ss);
    }
    float f = eawq_rms_factor(block_reduce<false>(ss, red), dim, eps);
    for (int j = threadIdx.x; j < dim; j += blockDim.x)
        y[(size_t)blockIdx.x * dim + j] = eawq_f2h(eawq_h2f(xt[j]) * f * weight[j]);
}

/* One block per (token, head), head_dim / 2 threads: one rotated pair each. */
__global__ void rope_kernel(uint16_t *x, int heads, int head_dim, int pos, const float *__restrict__ inv_freq,
                            int interleaved)
{
    int t = blockIdx.x / heads, i = threadIdx.x, half = head_dim / 2;
    uint16_t *row = x + (size_t)blockIdx.x * head_dim;
    int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    float x0 = eawq_h2f(row[a]), x1 = eawq_h2f(row[b]);
    eawq_rope_pair(&x0, &x1, pos + t, inv_freq[i]);
    row[a] = eawq_f2h(x0);
    row[b] = eawq_f2h(x1);
}

/* One block per (token, kv head): copy k and v into cache rows pos + t. */
__global__ void kv_write_kernel(const uint16_t *__restrict__ k, const uint16_t *__restrict__ v,
                                uint16_t *k_cache, uint16_t *v_cache, int n_kv_heads, int head_dim, int pos,
                                int max_seq)
{
    int t = blockIdx.x / n_kv_heads, h = blockIdx.x % n_kv_heads;
    size_t src = (size_t)blockIdx.x * head_dim, dst = ((size_t)h * max_seq + pos + t) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        k_cache[dst + d] = k[src + d];
        v_cache[dst + d] = v[src + d];
    }
}

/* One block of 128 threads per (token t, head h), over keys 0..pos+t in tiles of 128 (one key per
 * thread), with an online softmax: no score buffer, any context length. Thread d owns output
 * dimensions d and d + 128. */
__global__ void __launch_bounds__(kAttnThreads)
attention_kernel(const uint16_t *__restrict__ q, const uint16_t *__restrict__ k_cache,
                 const uint16_t *__restrict__ v_cache, uint16_t *__restrict__ out, int n_heads, int n_kv_heads,
                 int head_dim, int pos, int max_seq)
{
    __shared__ float qs[kMaxHeadDim];
    __shared__ float ps[kAttnThreads];
    __shared__ float red[32];
    int t = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, n_keys = pos + t + 1;
    int kvh = h / (n_heads / n_kv_heads);
    const uint16_t *K = k_cache + (size_t)kvh * max_seq * head_dim;
    const uint16_t *V = v_cache + (size_t)kvh * max_seq * head_dim;
    float scale = 1.0f / sqrtf((float)head_dim);
    for (int d = tid; d < head_dim; d += kAttnThreads)
        qs[d] = eawq_h2f(q[((size_t)t * n_heads + h) * head_dim + d]) * scale;
    __syncthreads();
    float run_max = -INFINITY, run_sum = 0.0f, acc0 = 0.0f, acc1 = 0.0f;
    for (int start = 0; start < n_keys; start += kAttnThreads) {
        int j = start + tid;
        float s = -INFINITY;
        if (j < n_keys) {
            s = 0.0f;
            for (int d = 0; d < head_dim; ++d)
                s = fmaf(qs[d], eawq_h2f(K[(size_t)j * head_dim + d]), s);
        }
        float new_max = fmaxf(run_max, block_reduce<true>(s, red));
        float p = j < n_keys ? expf(s - new_max) : 0.0f;
        ps[tid] = p;
        float corr = eawq_softmax_fold(&run_max, &run_sum, new_max, block_reduce<false>(p, red));
        int n = min(kAttnThreads, n_keys - start);
        acc0 *= corr;
        acc1 *= corr;
        for (int jj = 0; jj < n; ++jj) {
            const uint16_t *vr = V + (size_t)(start + jj) * head_dim;
            if (tid < head_dim)
                acc0 = fmaf(ps[jj], eawq_h2f(vr[tid]), acc0);
            if (tid + kAttnThreads < head_dim)
                acc1 = fmaf(ps[jj], eawq_h2f(vr[tid + kAttnThreads]), acc1);
        }
        __syncthreads();  /* ps is rewritten by the next tile */
    }
    uint16_t *o = out + ((size_t)t * n_heads + h) * head_dim;
    if (tid < head_dim)
        o[tid] = eawq_f2h(acc0 / run_sum);
    if (tid + kAttnThreads < head_dim)
        o[tid + kAttnThreads] = eawq_f2h(acc1 / run_sum);
}

__global__ void silu_mul_kernel(const uint16_t *__restrict__ gate, const uint16_t *__restrict__ up,
                                uint16_t *__restrict__ out, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = eawq_f2h(eawq_swiglu(eawq_h2f(gate[i]), eawq_h2f(up[i])));
}

__global__ void add_kernel(const uint16_t *__restrict__ a, const uint16_t *__restrict__ b,
                           uint16_t *__restrict__ out, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = eawq_f2h(eawq_h2f(a[i]) + eawq_h2f(b[i]));
}

/* One block per token; a token outside the table gives a row of zeros (the caller checks first). */
__global__ void embed_kernel(const uint16_t *__restrict__ table, const int32_t *__restrict__ tokens,
                             uint16_t *__restrict__ out, int dim, int vocab)
{
    int tok = tokens[blockIdx.x];
    bool ok = tok >= 0 && tok < vocab;
    for (int d = threadIdx.x; d < dim; d += blockDim.x)
        out[(size_t)blockIdx.x * dim + d] = ok ? table[(size_t)tok * dim + d] : 0;
}

int launched(const char *what) { return eawq_check(cudaGetLastError(), what); }

int elementwise_blocks(size_t n)
{
    size_t b = (n + 255) / 256;
    return (int)(b < 4096 ? (b > 0 ? b : 1) : 4096);
}

int check_linear(const eawq_linear_t *w, int T)
{
    if (!w || T < 1 || w->in_features < 1 || w->out_features < 1)
        return eawq_fail(EAWQ_ERR_ARG, "eawq_linear: no weight, or T, in or out below 1 (T=%d)", T);
    if (w->kind == EAWQ_W_F16)
        return w->weight ? EAWQ_OK : eawq_fail(EAWQ_ERR_ARG, "eawq_linear: fp16 weight is NULL");
    if (w->kind != EAWQ_W_PACKED || !w->qweight || !w->scales || !w->zeros)
        return eawq_fail(EAWQ_ERR_ARG, "eawq_linear: unknown kind %d or a NULL packed tensor", w->kind);
    if (w->bits < 2 || w->bits > 8)
        return eawq_fail(EAWQ_ERR_SHAPE, "eawq_linear: %d bits (2..8 supported)", w->bits);
    bool one_group = w->group_size == w->in_features;
    if (w->group_size < 1 || w->in_features % w->group_size || (!one_group && w->group_size % EAWQ_CHUNK))
        return eawq_fail(EAWQ_ERR_SHAPE,
                         "eawq_linear: group size %d with input width %d (needs a multiple of 32 dividing the "
                         "width, or one group per row)", w->group_size, w->in_features);
    return EAWQ_OK;
}

} /* namespace */

extern "C" {

int eawq_linear(const eawq_linear_t *w, const uint16_t *x, void *y, int y_f32, int T, eawq_stream_t stream)
{
    int rc = check_linear(w, T);
    if (rc != EAWQ_OK)
        return rc;
    cudaStream_t s = (cudaStream_t)stream;
    if (T <= kGemvMaxTokens) {
        size_t shared = w->in_features <= kGemvSharedX ? (size_t)w->in_features * sizeof(uint16_t) : 0;
        dim3 grid((w->out_features + kGemvWarps - 1) / kGemvWarps, T);
        gemv_kernel<<<grid, kGemvWarps * EAWQ_LANES, shared, s>>>(*w, x, y, y_f32);
        return launched("gemv_kernel");
    }
    dim3 grid((w->out_features + kTileN - 1) / kTileN, (T + kTileT - 1) / kTileT);
    gemm_kernel<<<grid, 256, 0, s>>>(*w, x, y, y_f32, T);
    return launched("gemm_kernel");
}

int eawq_rmsnorm(const uint16_t *x, const float *weight, uint16_t *y, int T, int dim, float eps,
                 eawq_stream_t stream)
{
    if (T < 1 || dim < 1)
        return eawq_fail(EAWQ_ERR_ARG, "eawq_rmsnorm: T=%d, dim=%d", T, dim);
    rmsnorm_kernel<<<T, 256, 0, (cudaStream_t)stream>>>(x, weight, y, dim, eps);
    return launched("rmsnorm_kernel");
}

int eawq_rope(uint16_t *x, int T, int heads, int head_dim, int pos, const float *inv_freq, int interleaved,
              eawq_stream_t stream)
{
    if (T < 1 || heads < 1 || head_dim < 2 || head_dim % 2 || head_dim > 2 * 1024 || pos < 0)
        return eawq_fail(EAWQ_ERR_SHAPE, "eawq_rope: T=%d heads=%d head_dim=%d pos=%d", T, heads, head_dim, pos);
    rope_kernel<<<T * heads, head_dim / 2, 0, (cudaStream_t)stream>>>(x, heads, head_dim, pos, inv_freq,
                                                                      interleaved);
    return launched("rope_kernel");
}

int eawq_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *k_cache,
                   uint16_t *v_cache, uint16_t *out, int T, int n_heads, int n_kv_heads, int head_dim,
                   int pos, int max_seq, eawq_stream_t stream)
{
    if (T < 1 || n_kv_heads < 1 || n_heads % n_kv_heads || head_dim < 2 || head_dim > kMaxHeadDim || pos < 0)
        return eawq_fail(EAWQ_ERR_SHAPE, "eawq_attention: T=%d heads=%d kv_heads=%d head_dim=%d pos=%d (head_dim "
                         "up to %d, heads a multiple of kv_heads)", T, n_heads, n_kv_heads, head_dim, pos, kMaxHeadDim);
    if (pos + T > max_seq)
        return eawq_fail(EAWQ_ERR_SHAPE, "eawq_attention: positions %d..%d exceed the cache of %d", pos,
                         pos + T - 1, max_seq);
    cudaStream_t s = (cudaStream_t)stream;
    kv_write_kernel<<<T * n_kv_heads, 128, 0, s>>>(k, v, k_cache, v_cache, n_kv_heads, head_dim, pos, max_seq);
    int rc = launched("kv_write_kernel");
    if (rc != EAWQ_OK)
        return rc;
    attention_kernel<<<dim3(T, n_heads), kAttnThreads, 0, s>>>(q, k_cache, v_cache, out, n_heads, n_kv_heads,
                                                               head_dim, pos, max_seq);
    return launched("attention_kernel");
}

int eawq_silu_mul(const uint16_t *gate, const uint16_t *up, uint16_t *out, size_t n, eawq_stream_t stream)
{
    silu_mul_kernel<<<elementwise_blocks(n), 256, 0, (cudaStream_t)stream>>>(gate, up, out, n);
    return launched("silu_mul_kernel");
}

int eawq_add(const uint16_t *a, const uint16_t *b, uint16_t *out, size_t n, eawq_stream_t stream)
{
    add_kernel<<<elementwise_blocks(n), 256, 0, (cudaStream_t)stream>>>(a, b, out, n);
    return launched("add_kernel");
}

int eawq_embed(const uint16_t *table, const int32_t *tokens, uint16_t *out, int T, int dim, int vocab,
               eawq_stream_t stream)
{
    if (T < 1 || dim < 1 || vocab < 1)
        return eawq_fail(EAWQ_ERR_ARG, "eawq_embed: T=%d dim=%d vocab=%d", T, dim, vocab);
    embed_kernel<<<T, 256, 0, (cudaStream_t)stream>>>(table, tokens, out, dim, vocab);
    return launched("embed_kernel");
}

} /* extern "C" */
