/* The arithmetic every kernel of edge-awq's cuda backend does, in one header compiled twice:
 * by nvcc into the kernels (src/kernels.cu) and by the host C compiler into the CPU test
 * library (src/arith_cpu.c), so that pytest checks it against the numpy reference without a GPU.
 *
 * Packed layout read here: pack.py's "bits-le-v1" (each row of b-bit values a little-endian bit
 * stream, padded to 32 values, stored as uint32 words; 32 values = b words, "a chunk"), with one
 * change made at load time for 4 bits: eawq_interleave_w4 reorders the 8 nibbles of each word to
 * v0 v2 v4 v6 v1 v3 v5 v7, so that (word >> 4i) & 0x000F000F holds the pair (v2i, v2i+1) in its two
 * 16-bit halves. OR-ing 0x6400 into a half's bits makes it the fp16 number 1024 + v: two int4
 * become two fp16 in two instructions. Zero points stay in the file's order (b bits each).
 *
 * Dot products factor the group scale out: sum_g scale_g * sum_j (q_j - zero_g) * x_j. (q - zero)
 * is a small integer, exact in fp16 and fp32, so the GPU's half2 subtraction and the host's integer
 * subtraction agree bit for bit; every product and sum is an fp32 fmaf in a fixed order. The order
 * of a GEMV row: lane l of a 32-lane warp takes chunks l, l+32, ...; within a chunk, words in order,
 * within a word the values in natural order; then the lanes' partial sums meet in a butterfly
 * (xor 16, 8, 4, 2, 1). eawq_lane_butterfly replays that butterfly on the host.
 */
#ifndef EAWQ_ARITH_H
#define EAWQ_ARITH_H

#include <stdint.h>

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define EAWQ_HD __host__ __device__ __forceinline__
#else
#include <math.h>
#include <string.h>
#define EAWQ_HD static inline
#endif

#define EAWQ_LANES 32        /* lanes of a warp; one GEMV row per warp */
#define EAWQ_CHUNK 32        /* values per chunk: the packing pads rows to it */

/* ---- fp16 <-> fp32 (IEEE binary16, round to nearest even) ---- */

EAWQ_HD float eawq_h2f(uint16_t h)
{
#ifdef __CUDA_ARCH__
    return __half2float(__ushort_as_half(h));
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);                     /* inf, nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);            /* normal: rebias 15 -> 127 */
    } else if (man == 0) {
        bits = sign;                                                 /* signed zero */
    } else {                                                         /* subnormal: normalize */
        int e = -1;
        do { man <<= 1; ++e; } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

EAWQ_HD uint16_t eawq_f2h(float f)
{
#ifdef __CUDA_ARCH__
    return __half_as_ushort(__float2half_rn(f));
#else
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000u, absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u)                                         /* inf or nan */
        return (uint16_t)(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u));
    if (absx >= 0x477ff000u)                                         /* rounds past 65504 */
        return (uint16_t)(sign | 0x7c00u);
    if (absx < 0x38800000u) {                                        /* below 2^-14: subnormal or zero */
        if (absx < 0x33000000u)                                      /* below half of 2^-24 */
            return (uint16_t)sign;
        uint32_t man = (absx & 0x7fffffu) | 0x800000u;
        int shift = 126 - (int)(absx >> 23);                         /* 14..24 */
        uint32_t q = man >> shift, rest = man & ((1u << shift) - 1u), half = 1u << (shift - 1);
        q += (rest > half || (rest == half && (q & 1u)));
        return (uint16_t)(sign | q);
    }
    uint32_t q = ((absx >> 23) - 112u) << 10 | ((absx >> 13) & 0x3ffu);
    uint32_t rest = absx & 0x1fffu;
    q += (rest > 0x1000u || (rest == 0x1000u && (q & 1u)));          /* may carry into the exponent: fine */
    return (uint16_t)(sign | q);
#endif
}

/* ---- the packed layout ---- */

/* The file's 4-bit word (v0 at bits 0-3 .. v7 at bits 28-31) in the kernels' order v0 v2 v4 v6 v1 v3 v5 v7. */
EAWQ_HD uint32_t eawq_interleave_w4(uint32_t w)
{
    uint32_t out = 0;
    for (int j = 0; j < 8; ++j) {
        uint32_t v = (w >> (4 * j)) & 0xfu;
        int slot = (j & 1) ? 4 + (j >> 1) : (j >> 1);
        out |= v << (4 * slot);
    }
    return out;
}

/* Value j of a b-bit little-endian bit stream of uint32 words (may straddle two words). */
EAWQ_HD uint32_t eawq_bits_value(const uint32_t *words, int j, int bits)
{
    int off = j * bits, wi = off >> 5, sh = off & 31;
    uint32_t v = words[wi] >> sh;
    if (sh + bits > 32)
        v |= words[wi + 1] << (32 - sh);
    return v & ((1u << bits) - 1u);
}

/* Value j (0..7) of an interleaved 4-bit word. */
EAWQ_HD uint32_t eawq_w4_value(uint32_t w, int j)
{
    int slot = (j & 1) ? 4 + (j >> 1) : (j >> 1);
    return (w >> (4 * slot)) & 0xfu;
}

/* Pair i (0..3) of an interleaved word as (v2i - zero, v2i+1 - zero), exact. */
EAWQ_HD void eawq_w4_pair(uint32_t w, int i, float zero, float *d0, float *d1)
{
#ifdef __CUDA_ARCH__
    uint32_t bits = ((w >> (4 * i)) & 0x000f000fu) | 0x64006400u;   /* two fp16: 1024 + v */
    __half2 h = *reinterpret_cast<__half2 *>(&bits);
    __half2 z = __float2half2_rn(1024.0f + zero);
    float2 d = __half22float2(__hsub2(h, z));
    *d0 = d.x;
    *d1 = d.y;
#else
    *d0 = (float)((w >> (4 * i)) & 0xfu) - zero;
    *d1 = (float)((w >> (4 * i + 16)) & 0xfu) - zero;
#endif
}

/* sum_j (q_j - zero) * x_j over the 8 values of an interleaved word; x in natural order. */
EAWQ_HD float eawq_w4_word_dot(uint32_t w, float zero, const float *x)
{
    float acc = 0.0f;
    for (int i = 0; i < 4; ++i) {
        float d0, d1;
        eawq_w4_pair(w, i, zero, &d0, &d1);
        acc = fmaf(d0, x[2 * i], acc);
        acc = fmaf(d1, x[2 * i + 1], acc);
    }
    return acc;
}

/* ---- one output row's dot product, as lane `lane` of a warp does it ---- */

/* Which group's scale and zero a chunk uses: group_size is a multiple of 32, or one group per row. */
EAWQ_HD int eawq_chunk_group(int chunk, int group_size)
{
    return (chunk * EAWQ_CHUNK) / group_size;
}

/* x_j for j < in_features, else 0 (the packing pads rows with zero values; x is not padded). */
EAWQ_HD float eawq_x_at(const uint16_t *x, int j, int in_features)
{
    return j < in_features ? eawq_h2f(x[j]) : 0.0f;
}

/* Lane `lane`'s partial sum of row . x for a packed row of `bits` bits (4: interleaved words).
 * words: the row (chunks * bits words); scales: the row's fp16 scales; zeros: the row's packed zeros. */
EAWQ_HD float eawq_packed_lane_dot(const uint32_t *words, const uint16_t *scales, const uint32_t *zeros,
                                   const uint16_t *x, int in_features, int group_size, int bits, int lane)
{
    int n_chunks = (in_features + EAWQ_CHUNK - 1) / EAWQ_CHUNK;
    float acc = 0.0f;
    for (int c = lane; c < n_chunks; c += EAWQ_LANES) {
        int g = eawq_chunk_group(c, group_size);
        float zero = (float)eawq_bits_value(zeros, g, bits), sum = 0.0f;
        const uint32_t *cw = words + (int64_t)c * bits;
        int base = c * EAWQ_CHUNK;
        if (bits == 4) {
            for (int k = 0; k < 4; ++k) {
                float xs[8];
                for (int j = 0; j < 8; ++j)
                    xs[j] = eawq_x_at(x, base + 8 * k + j, in_features);
                sum += eawq_w4_word_dot(cw[k], zero, xs);
            }
        } else {
            for (int j = 0; j < EAWQ_CHUNK; ++j)
                sum = fmaf((float)eawq_bits_value(cw, j, bits) - zero, eawq_x_at(x, base + j, in_features), sum);
        }
        acc = fmaf(eawq_h2f(scales[g]), sum, acc);
    }
    return acc;
}

/* Lane `lane`'s partial sum of row . x for an fp16 row (Dense weights). */
EAWQ_HD float eawq_f16_lane_dot(const uint16_t *row, const uint16_t *x, int in_features, int lane)
{
    float acc = 0.0f;
    for (int base = lane * EAWQ_CHUNK; base < in_features; base += EAWQ_LANES * EAWQ_CHUNK) {
        float sum = 0.0f;
        int end = base + EAWQ_CHUNK < in_features ? base + EAWQ_CHUNK : in_features;
        for (int j = base; j < end; ++j)
            sum = fmaf(eawq_h2f(row[j]), eawq_h2f(x[j]), sum);
        acc += sum;
    }
    return acc;
}

/* The dequantized weight (q - zero) * scale at (row, j), as the GEMM tiles store it. */
EAWQ_HD float eawq_packed_weight(const uint32_t *words, const uint16_t *scales, const uint32_t *zeros,
                                 int j, int group_size, int bits)
{
    int c = j / EAWQ_CHUNK, g = eawq_chunk_group(c, group_size), r = j % EAWQ_CHUNK;
    const uint32_t *cw = words + (int64_t)c * bits;
    uint32_t q = bits == 4 ? eawq_w4_value(cw[r >> 3], r & 7) : eawq_bits_value(cw, r, bits);
    return ((float)q - (float)eawq_bits_value(zeros, g, bits)) * eawq_h2f(scales[g]);
}

/* ---- small ops ---- */

/* 1 / rms: the factor rmsnorm multiplies by, from the sum of squares of a row of `dim`. */
EAWQ_HD float eawq_rms_factor(float sum_sq, int dim, float eps)
{
    return 1.0f / sqrtf(sum_sq / (float)dim + eps);
}

/* silu(g) * u, with the sigmoid written through tanh so that it never overflows. */
EAWQ_HD float eawq_swiglu(float g, float u)
{
    return g * (0.5f * (1.0f + tanhf(0.5f * g))) * u;
}

/* Rotate the pair (x0, x1) by pos * inv_freq. The angle is taken in double and reduced to [-1, 1] half
 * turns before any sine: exact to float precision at any position (a float angle loses its fraction as
 * positions grow: at 10^6, a sixteenth of a radian), and the sine and cosine never take their large-argument
 * path, whose reduction table would put a stack frame in local memory in every kernel that inlines this
 * (ptxas's -warn-lmem-usage, at sm_90). The device's sincospif and the host's sinf/cosf of the same reduced
 * float agree to an ulp or two. */
EAWQ_HD void eawq_rope_pair(float *x0, float *x1, int pos, float inv_freq)
{
    double turns = (double)pos * (double)inv_freq * 0.31830988618379067154; /* the angle over pi */
    float h = (float)(turns - 2.0 * rint(0.5 * turns)), s, c, r0, r1;     /* in [-1, 1] half turns */
#ifdef __CUDA_ARCH__
    sincospif(h, &s, &c);
#else
    s = sinf(h * 3.14159265358979323846f);
    c = cosf(h * 3.14159265358979323846f);
#endif
    r0 = *x0 * c - *x1 * s;
    r1 = *x0 * s + *x1 * c;
    *x0 = r0;
    *x1 = r1;
}

/* Online softmax: fold a tile (its max and sum of exp(s - new max)) into the running max and sum;
 * returns the factor the running output must be multiplied by. */
EAWQ_HD float eawq_softmax_fold(float *run_max, float *run_sum, float new_max, float tile_sum)
{
    float corr = *run_max == -INFINITY ? 0.0f : expf(*run_max - new_max);
    *run_sum = *run_sum * corr + tile_sum;
    *run_max = new_max;
    return corr;
}

#ifndef __CUDACC__
/* The warp's butterfly (xor 16, 8, 4, 2, 1) over 32 lanes' partial sums, replayed on the host. */
static inline float eawq_lane_butterfly(float *v)
{
    for (int off = EAWQ_LANES / 2; off > 0; off >>= 1) {
        float nxt[EAWQ_LANES];
        for (int l = 0; l < EAWQ_LANES; ++l)
            nxt[l] = v[l] + v[l ^ off];
        memcpy(v, nxt, sizeof nxt);
    }
    return v[0];
}
#endif

#endif /* EAWQ_ARITH_H */
