/* The whole ABI of libedge_awq_cuda.so: device buffers, a stream, the kernels of the cuda backend.
 *
 * Plain C, raw pointers and sizes. Every entry point returns an eawq status; eawq_status_str() says
 * what it means and eawq_last_error() what went wrong last on this thread (with the CUDA error's
 * text). The library never prints and never exits. Activations are fp16 (uint16_t bits), weights
 * are the .eawq file's packed words (4-bit rows interleaved at load by eawq_repack_w4; see
 * eawq_arith.h), accumulation is fp32. One stream per call; kernels on a stream run in order.
 *
 * The part between the ABI markers is read by cffi (edge_awq/backends/cuda.py) as its cdef, so it
 * holds only declarations and integer #defines.
 */
#ifndef EDGE_AWQ_CUDA_H
#define EDGE_AWQ_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ABI begin */
#define EAWQ_ABI_VERSION 1

#define EAWQ_OK 0
#define EAWQ_ERR_CUDA 1
#define EAWQ_ERR_NO_DEVICE 2
#define EAWQ_ERR_SHAPE 3
#define EAWQ_ERR_ARG 4
#define EAWQ_ERR_OOM 5

#define EAWQ_W_PACKED 0
#define EAWQ_W_F16 1

typedef struct eawq_stream_s *eawq_stream_t;

/* A linear weight (out_features, in_features) on the device. PACKED: qweight (out, chunks * bits)
 * uint32 with chunks = ceil(in / 32), 4-bit rows interleaved; scales (out, in / group_size) fp16;
 * zeros (out, packed zero words) uint32, zero_words per row. F16: weight (out, in) fp16.
 * bias (out,) fp32 or NULL. group_size: a multiple of 32, or in_features (one group per row). */
typedef struct {
    int kind;
    int bits;
    int group_size;
    int in_features;
    int out_features;
    int zero_words;
    const uint32_t *qweight;
    const uint16_t *scales;
    const uint32_t *zeros;
    const uint16_t *weight;
    const float *bias;
} eawq_linear_t;

int eawq_abi_version(void);
const char *eawq_status_str(int status);
const char *eawq_last_error(void);

int eawq_device_count(int *count);
int eawq_device_name(int device, char *name, size_t len);
int eawq_set_device(int device);
int eawq_mem_info(size_t *free_bytes, size_t *total_bytes);

int eawq_malloc(void **ptr, size_t bytes);
int eawq_free(void *ptr);
int eawq_memset(void *ptr, int value, size_t bytes, eawq_stream_t stream);
int eawq_copy_to_device(void *dst, const void *src, size_t bytes, eawq_stream_t stream);
int eawq_copy_to_host(void *dst, const void *src, size_t bytes, eawq_stream_t stream);
int eawq_stream_create(eawq_stream_t *stream);
int eawq_stream_destroy(eawq_stream_t stream);
int eawq_synchronize(eawq_stream_t stream);

/* Host-side: reorder 4-bit words in place into the kernels' nibble order (before the upload). */
int eawq_repack_w4(uint32_t *words, size_t n_words);

/* y (T, out) = x (T, in) . w^T (+ bias); x fp16; y fp16, or fp32 when y_f32. T <= 4: GEMV, else GEMM. */
int eawq_linear(const eawq_linear_t *w, const uint16_t *x, void *y, int y_f32, int T, eawq_stream_t stream);
/* y (T, dim) fp16 = x / rms(x) * weight; x fp16, weight fp32. */
int eawq_rmsnorm(const uint16_t *x, const float *weight, uint16_t *y, int T, int dim, float eps,
                 eawq_stream_t stream);
/* x (T, heads, head_dim) fp16, rotated in place for positions pos..pos+T-1; inv_freq (head_dim/2) fp32.
 * interleaved: pairs (2i, 2i+1), else (i, i + head_dim/2). */
int eawq_rope(uint16_t *x, int T, int heads, int head_dim, int pos, const float *inv_freq, int interleaved,
              eawq_stream_t stream);
/* Write k, v (T, n_kv_heads, head_dim) fp16 into the layer's cache rows pos..pos+T-1 (caches
 * (n_kv_heads, max_seq, head_dim) fp16), then causal attention of q (T, n_heads, head_dim) over rows
 * 0..pos+t: out (T, n_heads * head_dim) fp16. head_dim <= 256, even. */
int eawq_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *k_cache,
                   uint16_t *v_cache, uint16_t *out, int T, int n_heads, int n_kv_heads, int head_dim,
                   int pos, int max_seq, eawq_stream_t stream);
/* out = silu(gate) * up, n elements fp16. */
int eawq_silu_mul(const uint16_t *gate, const uint16_t *up, uint16_t *out, size_t n, eawq_stream_t stream);
/* out = a + b, n elements fp16. */
int eawq_add(const uint16_t *a, const uint16_t *b, uint16_t *out, size_t n, eawq_stream_t stream);
/* out (T, dim) fp16 = rows tokens (T,) of table (vocab, dim) fp16; tokens checked against vocab. */
int eawq_embed(const uint16_t *table, const int32_t *tokens, uint16_t *out, int T, int dim, int vocab,
               eawq_stream_t stream);
/* ABI end */

#ifdef __cplusplus
}
#endif

#endif /* EDGE_AWQ_CUDA_H */
