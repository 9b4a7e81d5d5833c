/* The CPU test library (libedge_awq_arith_cpu.so): the kernels' arithmetic from eawq_arith.h,
 * compiled by the host C compiler in the order the kernels use, for pytest to check against the
 * numpy reference on a machine without a GPU. Not part of the runtime. Outputs are fp32 (before
 * the kernels' final rounding to fp16). Read by cffi between the ABI markers, like edge_awq_cuda.h.
 */
#ifndef EDGE_AWQ_ARITH_CPU_H
#define EDGE_AWQ_ARITH_CPU_H

#include "edge_awq_cuda.h"

/* ABI begin */
float eawq_cpu_h2f(uint16_t h);
uint16_t eawq_cpu_f2h(float f);
int eawq_repack_w4(uint32_t *words, size_t n_words);
/* As eawq_linear: T <= 4 replays the GEMV (32 lanes and their butterfly), else the GEMM's k order. */
int eawq_cpu_linear(const eawq_linear_t *w, const uint16_t *x, float *y, int T);
int eawq_cpu_rmsnorm(const uint16_t *x, const float *weight, float *y, int T, int dim, float eps);
int eawq_cpu_rope(const uint16_t *x, float *y, int T, int heads, int head_dim, int pos, const float *inv_freq,
                  int interleaved);
/* As eawq_attention, over caches already holding rows 0..pos+T-1 (fp16), in tiles of 128 keys. */
int eawq_cpu_attention(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, float *out, int T,
                       int n_heads, int n_kv_heads, int head_dim, int pos, int max_seq);
int eawq_cpu_silu_mul(const uint16_t *gate, const uint16_t *up, float *out, size_t n);
/* ABI end */

#endif
