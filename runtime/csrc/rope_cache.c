/* RoPE and the paged-cache write of one layer's fused q/k/v projection, in one pass: what
 * apply_rope, the slicing of queries from keys and PagedKVCache.write do as about fifteen torch ops.
 *
 * qkv (n, H + 2 * Hkv, D) is a row's query heads, then its key heads, then its value heads. Queries
 * and keys are rotated in the half-split (Llama) layout by cos, sin (n, D); queries go to q (n, H, D),
 * keys and values to row index[i] of the cache slot's k, v (positions, Hkv, D).
 *
 * The arithmetic is torch's, rounding for rounding: x * cos and rotate(x) * sin are each rounded to
 * the element type, then their sum (torch's CPU kernels compute bf16 in fp32 and round each op's
 * result). The function is compiled without FMA contraction, which would round once where torch
 * rounds twice, so the engine's outputs do not depend on which path ran.
 * Element type: fp32, or bf16 as raw uint16 (16 lanes at a time where the CPU has AVX-512 BF16). Built with
 * csrc/paged_attention.c into one library.
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

/* x rounded to the nearest bf16, as a float */
static inline float round_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

static inline void rotate_one(const void *x, const void *c, const void *s, void *out, int d, float rot, int bf16) {
    if (bf16) {
        const uint16_t *xb = x, *cb = c;
        float a = round_bf16(bf16_to_float(xb[d]) * bf16_to_float(cb[d]));
        float b = round_bf16(rot * bf16_to_float(((const uint16_t *)s)[d]));
        ((uint16_t *)out)[d] = float_to_bf16(a + b);
    } else {
        float a = ((const float *)x)[d] * ((const float *)c)[d], b = rot * ((const float *)s)[d];
        ((float *)out)[d] = a + b;
    }
}

/* One head of D elements: out = round(round(x * c) + round(rot(x) * s)), rot(x) = (-x[half:], x[:half]);
 * the two halves as two branch-free loops. */
static inline void rotate_head(const void *x, const void *c, const void *s, void *out, int D, int bf16) {
    int half = D / 2;
    for (int d = 0; d < half; d++) rotate_one(x, c, s, out, d, -load_elem(x, d + half, bf16), bf16);
    for (int d = half; d < D; d++) rotate_one(x, c, s, out, d, load_elem(x, d - half, bf16), bf16);
}

#ifdef HAVE_BF16_VEC
/* rotate_head for bf16 heads whose halves are whole vectors of 16, with the CPU's bf16 conversions:
 * the same products, roundings and sums, 16 lanes at a time (bit for bit, denormals included). */
static inline void rotate_head_bf16x16(const uint16_t *x, const uint16_t *c, const uint16_t *s, uint16_t *out, int D) {
    const int half = D / 2;
    for (int d = 0; d < half; d += 16) {
        const __m512 x1 = bf16x16_load(x + d), x2 = bf16x16_load(x + d + half);
        const __m512 a1 = bf16x16_round(_mm512_mul_ps(x1, bf16x16_load(c + d)));
        const __m512 b1 = bf16x16_round(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), bf16x16_load(s + d)));
        bf16x16_store(out + d, _mm512_add_ps(a1, b1));
        const __m512 a2 = bf16x16_round(_mm512_mul_ps(x2, bf16x16_load(c + d + half)));
        const __m512 b2 = bf16x16_round(_mm512_mul_ps(x1, bf16x16_load(s + d + half)));
        bf16x16_store(out + d + half, _mm512_add_ps(a2, b2));
    }
}
#endif

/* Row i: its query heads rotated into q, its key heads rotated and its value heads copied into row
 * index[i] of the cache slot. */
static inline __attribute__((always_inline)) void rope_row(const void *qkv, const void *cos, const void *sin, void *q,
                                                           void *k_cache, void *v_cache, const int64_t *index,
                                                           int64_t i, int H, int Hkv, int D, int bf16) {
    int64_t size = bf16 ? 2 : 4, row = (int64_t)(H + 2 * Hkv) * D * size, head = (int64_t)D * size;
    const char *x = (const char *)qkv + i * row;
    const char *c = (const char *)cos + i * head, *s = (const char *)sin + i * head;
    char *k_row = (char *)k_cache + index[i] * Hkv * head, *v_row = (char *)v_cache + index[i] * Hkv * head;
#ifdef HAVE_BF16_VEC
    if (bf16 && D % 32 == 0) {
        for (int h = 0; h < H + Hkv; h++)
            rotate_head_bf16x16((const uint16_t *)(x + h * head), (const uint16_t *)c, (const uint16_t *)s,
                                (uint16_t *)(h < H ? (char *)q + (i * H + h) * head : k_row + (h - H) * head), D);
        memcpy(v_row, x + (H + Hkv) * head, (size_t)(Hkv * head));
        return;
    }
#endif
    for (int h = 0; h < H; h++) rotate_head(x + h * head, c, s, (char *)q + (i * H + h) * head, D, bf16);
    for (int h = 0; h < Hkv; h++) rotate_head(x + (H + h) * head, c, s, k_row + h * head, D, bf16);
    memcpy(v_row, x + (H + Hkv) * head, (size_t)(Hkv * head));
}

/* 0 if the call can run; -1 for an odd head dim; -2 when an index lies outside the slot's num_positions
 * (nothing is written then). */
static int check(const int64_t *index, int64_t n, int D, int64_t num_positions) {
    if (D % 2) return -1;
    for (int64_t i = 0; i < n; i++)
        if (index[i] < 0 || index[i] >= num_positions) return -2;
    return 0;
}

/* Rows are split over OpenMP threads only in calls large enough to pay for the fork (a prompt's rows);
 * the loops are written out per element type, so that the type is a constant in OpenMP's outlined body. */
#define PARALLEL_MIN (1 << 16)

int rope_and_cache_f32(const float *qkv, const float *cos, const float *sin, float *q, float *k_cache,
                       float *v_cache, const int64_t *index, int64_t n, int H, int Hkv, int D, int64_t num_positions,
                       int threads) {
    int status = check(index, n, D, num_positions);
    if (status) return status;
#pragma omp parallel for num_threads(threads) if (n * (H + 2 * Hkv) * D >= PARALLEL_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) rope_row(qkv, cos, sin, q, k_cache, v_cache, index, i, H, Hkv, D, 0);
    return 0;
}

int rope_and_cache_bf16(const uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, uint16_t *q,
                        uint16_t *k_cache, uint16_t *v_cache, const int64_t *index, int64_t n, int H, int Hkv, int D,
                        int64_t num_positions, int threads) {
    int status = check(index, n, D, num_positions);
    if (status) return status;
#pragma omp parallel for num_threads(threads) if (n * (H + 2 * Hkv) * D >= PARALLEL_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) rope_row(qkv, cos, sin, q, k_cache, v_cache, index, i, H, Hkv, D, 1);
    return 0;
}
