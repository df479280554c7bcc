/* The exit (value) head of runtime/model.py (ExitHead) in one call: per row,
 *     softplus(out . gelu(fc(rms_norm(x)) + step_bias) + out_bias).
 * It runs at every priced core step; as torch ops it was about ten dispatches, and its two small bf16
 * GEMMs cost 19-26 us each in oneDNN's per-call overhead (83-97 us a step in all, on one AMX machine).
 *
 * Each op's result is rounded to the element type where torch rounds it (the norm, fc with its bias,
 * the step bias sum, gelu, out with its bias, softplus); sums run in fp32, in another order than
 * torch's. gelu is the exact (erf) one, softplus torch's (beta 1, threshold 20).
 * Element type: fp32, or bf16 as raw uint16. Rows split over OpenMP threads in prompt-sized calls.
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

#define INLINE static inline __attribute__((always_inline))
#define MAX_DIM 8192
#define MAX_HIDDEN 1024
#define PARALLEL_MIN 64 /* rows */

INLINE float rounded(float x, int bf16) { return bf16 ? bf16_to_float(float_to_bf16(x)) : x; }

INLINE void exit_row(const void *x, const void *norm_w, float eps, const void *fc_w, const void *fc_b,
                     const void *step_b, const void *out_w, const void *out_b, void *score, int64_t i, int d,
                     int hidden, int bf16) {
    float xn[MAX_DIM], hid[MAX_HIDDEN];
    const int64_t at = i * d;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int j = 0; j < d; j++) {
        float v = load_elem(x, at + j, bf16);
        ss += v * v;
    }
    const float r = 1.f / sqrtf(ss * (1.f / (float)d) + eps);
#pragma omp simd
    for (int j = 0; j < d; j++) xn[j] = rounded(load_elem(x, at + j, bf16) * r * load_elem(norm_w, j, bf16), bf16);
    for (int h = 0; h < hidden; h++) {
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int j = 0; j < d; j++) acc += xn[j] * load_elem(fc_w, (int64_t)h * d + j, bf16);
        float v = rounded(acc + load_elem(fc_b, h, bf16), bf16);
        if (step_b) v = rounded(v + load_elem(step_b, h, bf16), bf16);
        hid[h] = rounded(0.5f * v * (1.f + erff(v * 0.70710678118654752f)), bf16);
    }
    float o = 0.f;
#pragma omp simd reduction(+ : o)
    for (int h = 0; h < hidden; h++) o += hid[h] * load_elem(out_w, h, bf16);
    o = rounded(o + load_elem(out_b, 0, bf16), bf16);
    store_elem(score, i, o > 20.f ? o : log1pf(expf(o)), bf16);
}

/* Returns 0; -1 when d or hidden is past MAX_DIM or MAX_HIDDEN. The loops are written out per element
 * type, so that the type is a constant in OpenMP's outlined body. */
int exit_scores_f32(const float *x, const float *norm_w, float eps, const float *fc_w, const float *fc_b,
                    const float *step_b, const float *out_w, const float *out_b, float *score, int64_t n, int d,
                    int hidden, int threads) {
    if (d > MAX_DIM || hidden > MAX_HIDDEN) return -1;
#pragma omp parallel for num_threads(threads) if (n >= PARALLEL_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) exit_row(x, norm_w, eps, fc_w, fc_b, step_b, out_w, out_b, score, i, d, hidden, 0);
    return 0;
}

int exit_scores_bf16(const uint16_t *x, const uint16_t *norm_w, float eps, const uint16_t *fc_w, const uint16_t *fc_b,
                     const uint16_t *step_b, const uint16_t *out_w, const uint16_t *out_b, uint16_t *score, int64_t n,
                     int d, int hidden, int threads) {
    if (d > MAX_DIM || hidden > MAX_HIDDEN) return -1;
#pragma omp parallel for num_threads(threads) if (n >= PARALLEL_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) exit_row(x, norm_w, eps, fc_w, fc_b, step_b, out_w, out_b, score, i, d, hidden, 1);
    return 0;
}
