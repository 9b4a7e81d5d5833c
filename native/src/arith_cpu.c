/* The CPU test library: eawq_arith.h's arithmetic, in the kernels' order, without a GPU.
 * See edge_awq_arith_cpu.h; the kernels it mirrors are in kernels.cu. */
#include "edge_awq_arith_cpu.h"

#include "eawq_arith.h"

#define ATTN_TILE 128 /* keys per tile, as attention_kernel's block */

float eawq_cpu_h2f(uint16_t h) { return eawq_h2f(h); }

uint16_t eawq_cpu_f2h(float f) { return eawq_f2h(f); }

int eawq_repack_w4(uint32_t *words, size_t n_words)
{
    for (size_t i = 0; i < n_words; ++i)
        words[i] = eawq_interleave_w4(words[i]);
    return EAWQ_OK;
}

static float gemv_row(const eawq_linear_t *w, const uint16_t *x, int row)
{
    int in = w->in_features;
    float lanes[EAWQ_LANES];
    size_t words = (size_t)((in + EAWQ_CHUNK - 1) / EAWQ_CHUNK) * w->bits;
    for (int lane = 0; lane < EAWQ_LANES; ++lane)
        lanes[lane] = w->kind == EAWQ_W_F16
                          ? eawq_f16_lane_dot(w->weight + (size_t)row * in, x, in, lane)
                          : eawq_packed_lane_dot(w->qweight + row * words, w->scales + (size_t)row * (in / w->group_size),
                                                 w->zeros + (size_t)row * w->zero_words, x, in, w->group_size,
                                                 w->bits, lane);
    return eawq_lane_butterfly(lanes);
}

static float gemm_weight(const eawq_linear_t *w, int row, int k)
{
    int in = w->in_features;
    if (w->kind == EAWQ_W_F16)
        return eawq_h2f(w->weight[(size_t)row * in + k]);
    size_t words = (size_t)((in + EAWQ_CHUNK - 1) / EAWQ_CHUNK) * w->bits;
    return eawq_packed_weight(w->qweight + row * words, w->scales + (size_t)row * (in / w->group_size),
                              w->zeros + (size_t)row * w->zero_words, k, w->group_size, w->bits);
}

int eawq_cpu_linear(const eawq_linear_t *w, const uint16_t *x, float *y, int T)
{
    int in = w->in_features, out = w->out_features;
    if (w->kind == EAWQ_W_PACKED && (in % w->group_size || (w->group_size != in && w->group_size % EAWQ_CHUNK)))
        return EAWQ_ERR_SHAPE;
    for (int t = 0; t < T; ++t)
        for (int row = 0; row < out; ++row) {
            float acc = 0.0f;
            if (T <= 4) {
                acc = gemv_row(w, x + (size_t)t * in, row);
            } else {
                for (int k = 0; k < in; ++k)
                    acc = fmaf(eawq_h2f(x[(size_t)t * in + k]), gemm_weight(w, row, k), acc);
            }
            y[(size_t)t * out + row] = acc + (w->bias ? w->bias[row] : 0.0f);
        }
    return EAWQ_OK;
}

int eawq_cpu_rmsnorm(const uint16_t *x, const float *weight, float *y, int T, int dim, float eps)
{
    for (int t = 0; t < T; ++t) {
        const uint16_t *xt = x + (size_t)t * dim;
        float ss = 0.0f;
        for (int j = 0; j < dim; ++j)
            ss = fmaf(eawq_h2f(xt[j]), eawq_h2f(xt[j]), ss);
        float f = eawq_rms_factor(ss, dim, eps);
        for (int j = 0; j < dim; ++j)
            y[(size_t)t * dim + j] = eawq_h2f(xt[j]) * f * weight[j];
    }
    return EAWQ_OK;
}

int eawq_cpu_rope(const uint16_t *x, float *y, int T, int heads, int head_dim, int pos, const float *inv_freq,
                  int interleaved)
{
    int half = head_dim / 2;
    for (int r = 0; r < T * heads; ++r)
        for (int i = 0; i < half; ++i) {
            size_t a = (size_t)r * head_dim + (interleaved ? 2 * i : i);
            size_t b = (size_t)r * head_dim + (interleaved ? 2 * i + 1 : i + half);
            float x0 = eawq_h2f(x[a]), x1 = eawq_h2f(x[b]);
            eawq_rope_pair(&x0, &x1, pos + r / heads, inv_freq[i]);
            y[a] = x0;
            y[b] = x1;
        }
    return EAWQ_OK;
}

static void attend_one(const float *qs, const uint16_t *K, const uint16_t *V, float *o, int n_keys, int head_dim)
{
    float run_max = -INFINITY, run_sum = 0.0f, ps[ATTN_TILE];
    for (int d = 0; d < head_dim; ++d)
        o[d] = 0.0f;
    for (int start = 0; start < n_keys; start += ATTN_TILE) {
        int n = n_keys - start < ATTN_TILE ? n_keys - start : ATTN_TILE;
        float tile_max = -INFINITY, tile_sum = 0.0f;
        for (int jj = 0; jj < n; ++jj) {
            float s = 0.0f;
            for (int d = 0; d < head_dim; ++d)
                s = fmaf(qs[d], eawq_h2f(K[(size_t)(start + jj) * head_dim + d]), s);
            ps[jj] = s;
            tile_max = fmaxf(tile_max, s);
        }
        float new_max = fmaxf(run_max, tile_max);
        for (int jj = 0; jj < n; ++jj) {
            ps[jj] = expf(ps[jj] - new_max);
            tile_sum += ps[jj];
        }
        float corr = eawq_softmax_fold(&run_max, &run_sum, new_max, tile_sum);
        for (int d = 0; d < head_dim; ++d) {
            float acc = o[d] * corr;
            for (int jj = 0; jj < n; ++jj)
                acc = fmaf(ps[jj], eawq_h2f(V[(size_t)(start + jj) * head_dim + d]), acc);
            o[d] = acc;
        }
    }
    for (int d = 0; d < head_dim; ++d)
        o[d] /= run_sum;
}

int eawq_cpu_attention(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, float *out, int T,
                       int n_heads, int n_kv_heads, int head_dim, int pos, int max_seq)
{
    float qs[256];
    if (head_dim > 256 || n_heads % n_kv_heads || pos + T > max_seq)
        return EAWQ_ERR_SHAPE;
    float scale = 1.0f / sqrtf((float)head_dim);
    for (int t = 0; t < T; ++t)
        for (int h = 0; h < n_heads; ++h) {
            int kvh = h / (n_heads / n_kv_heads);
            size_t off = ((size_t)t * n_heads + h) * head_dim;
            for (int d = 0; d < head_dim; ++d)
                qs[d] = eawq_h2f(q[off + d]) * scale;
            attend_one(qs, k_cache + (size_t)kvh * max_seq * head_dim, v_cache + (size_t)kvh * max_seq * head_dim,
                       out + off, pos + t + 1, head_dim);
        }
    return EAWQ_OK;
}

int eawq_cpu_silu_mul(const uint16_t *gate, const uint16_t *up, float *out, size_t n)
{
    for (size_t i = 0; i < n; ++i)
        out[i] = eawq_swiglu(eawq_h2f(gate[i]), eawq_h2f(up[i]));
    return EAWQ_OK;
}
