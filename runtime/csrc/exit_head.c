/* The exit (value) head of runtime/model.py (ExitHead) in one call: per row,
 *     softplus(out . gelu(fc(rms_norm(x)) + step_bias) + out_bias).
 * It runs at every priced core step; as torch ops it was about ten dispatches, and its two small bf16
 * GEMMs cost 19-26 us each in oneDNN's per-call overhead (83-97 us a step in all, on one AMX machine).
 *
 * Each op's result is rounded to the element type where torch rounds it (the norm, fc with its bias,
 * the step bias sum, gelu, out with its bias, softplus); sums run in fp32, in another order than
 * torch's. gelu is the exact (erf) one, softplus torch's (beta 1, threshold 20).
 * Element type: fp32, or bf16 as raw uint16. fc sums its products in linear_rows.c's order (where the
 * CPU has AVX512-BF16, in bf16 pairs, which flush denormals).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define INLINE static inline __attribute__((always_inline))
#define MAX_DIM 8192
#define MAX_HIDDEN 1024
#define PARALLEL_MIN 64 /* rows */

INLINE float rounded(float x, int bf16) { return bf16 ? bf16_to_float(float_to_bf16(x)) : x; }

void linear_rows_f32(const float *x, const float *w, const float *bias, float *out, int64_t n, int K, int64_t N,
                     int threads);
void linear_rows_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *out, int64_t n, int K,
                      int64_t N, int threads);

/* Row i's norm into xn (d elements of the element type). */
INLINE void norm_row(const void *x, const void *norm_w, float eps, void *xn, int64_t i, int d, int bf16) {
    const int64_t at = i * d;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int j = 0; j < d; j++) {
        float v = load_elem(x, at + j, bf16);
        ss += v * v;
    }
    const float r = 1.f / sqrtf(ss * (1.f / (float)d) + eps);
#pragma omp simd
    for (int j = 0; j < d; j++) store_elem(xn, at + j, load_elem(x, at + j, bf16) * r * load_elem(norm_w, j, bf16), bf16);
}

/* Row i's score from its fc outputs (hidden elements, the bias added and rounded). */
INLINE void score_row(const void *fc_out, const void *step_b, const void *out_w, const void *out_b, void *score,
                      int64_t i, int hidden, int bf16) {
    float o = 0.f;
    for (int h = 0; h < hidden; h++) {
        float v = load_elem(fc_out, i * hidden + h, bf16);
        if (step_b) v = rounded(v + load_elem(step_b, h, bf16), bf16);
        o += rounded(0.5f * v * (1.f + erff(v * 0.70710678118654752f)), bf16) * load_elem(out_w, h, bf16);
    }
    o = rounded(o + load_elem(out_b, 0, bf16), bf16);
    store_elem(score, i, o > 20.f ? o : log1pf(expf(o)), bf16);
}

/* Returns 0; -1 when d or hidden is past MAX_DIM or MAX_HIDDEN, or scratch memory ran out. The norm and
 * the score run per row (over OpenMP threads in prompt-sized calls), fc as one call of linear_rows.c,
 * which reads its weight once for all rows (with AVX512-BF16, in bf16 pairs); one GEMV per row cost 28 us
 * on 8 rows (bf16, one Zen 5 CPU). Written out per element type, so that the type is a constant in
 * OpenMP's outlined bodies. */
#define EXIT_SCORES(T, SUFFIX, BF16)                                                                                 \
    int exit_scores_##SUFFIX(const T *x, const T *norm_w, float eps, const T *fc_w, const T *fc_b, const T *step_b,  \
                             const T *out_w, const T *out_b, T *score, int64_t n, int d, int hidden, int threads) {  \
        if (d > MAX_DIM || hidden > MAX_HIDDEN) return -1;                                                           \
        T *xn = malloc(sizeof(T) * (size_t)n * (size_t)(d + hidden));                                                \
        if (!xn && n) return -1;                                                                                     \
        T *fc_out = xn + n * d;                                                                                      \
        _Pragma("omp parallel for num_threads(threads) if (n >= PARALLEL_MIN) schedule(static)")                    \
        for (int64_t i = 0; i < n; i++) norm_row(x, norm_w, eps, xn, i, d, BF16);                                    \
        linear_rows_##SUFFIX(xn, fc_w, fc_b, fc_out, n, d, hidden, threads);                                         \
        _Pragma("omp parallel for num_threads(threads) if (n >= PARALLEL_MIN) schedule(static)")                    \
        for (int64_t i = 0; i < n; i++) score_row(fc_out, step_b, out_w, out_b, score, i, hidden, BF16);             \
        free(xn);                                                                                                    \
        return 0;                                                                                                    \
    }
EXIT_SCORES(float, f32, 0)
EXIT_SCORES(uint16_t, bf16, 1)

/* The exit adapters (runtime/model.py: ExitAdapter, h + up(down(h))) of rows that left the core, in one
 * call: out (n, d) is h with rows order[0 .. count) (sorted by depth, each below max depth) through the
 * adapter of their depth, down (rank, d), up (d, rank) and up's bias (d) of adapter k at k times their
 * sizes from down, up and up_bias. Each group of one depth runs as two calls of linear_rows.c; as torch
 * ops a decode step's 5-10 depths cost about eight dispatches and two module calls each. down and up
 * round as torch's linears do, and the sum once. Returns 0, or -1 when scratch memory ran out. */
#define EXIT_ADAPTERS(T, SUFFIX, BF16)                                                                               \
    int exit_adapters_##SUFFIX(const T *h, T *out, int64_t n, int d, int rank, const int64_t *order, int64_t count,  \
                               const int64_t *depth, const T *down, const T *up, const T *up_bias, int threads) {     \
        memcpy(out, h, sizeof(T) * (size_t)n * (size_t)d);                                                           \
        T *xs = malloc(sizeof(T) * (size_t)count * (size_t)(2 * d + rank));                                          \
        if (!xs && count) return -1;                                                                                 \
        T *mid = xs + count * d, *ups = mid + count * rank;                                                          \
        for (int64_t a = 0, b; a < count; a = b) {                                                                   \
            const int64_t k = depth[order[a]];                                                                       \
            for (b = a; b < count && depth[order[b]] == k; b++)                                                      \
                memcpy(xs + (b - a) * d, h + order[b] * d, sizeof(T) * (size_t)d);                                  \
            linear_rows_##SUFFIX(xs, down + k * rank * d, 0, mid, b - a, d, rank, threads);                          \
            linear_rows_##SUFFIX(mid, up + k * d * rank, up_bias + k * d, ups, b - a, rank, d, threads);             \
            for (int64_t i = a; i < b; i++)                                                                          \
                for (int j = 0; j < d; j++)                                                                          \
                    store_elem(out, order[i] * d + j,                                                                \
                               load_elem(h, order[i] * d + j, BF16) + load_elem(ups, (i - a) * d + j, BF16), BF16);  \
        }                                                                                                            \
        free(xs);                                                                                                    \
        return 0;                                                                                                    \
    }
EXIT_ADAPTERS(float, f32, 0)
EXIT_ADAPTERS(uint16_t, bf16, 1)
