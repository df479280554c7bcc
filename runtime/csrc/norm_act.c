/* RMSNorm over rows (after a residual add, if given) and SwiGLU's silu(gate) * up, one pass each.
 *
 * In bf16 torch runs an RMSNorm as about eight ops (upcast, square, mean, add, rsqrt, two products,
 * downcast), each a pass over the rows, and silu(gate) * up as a chunk, a silu and a product; on a
 * 1024-token prefill of a 30-layer model they took 40 ms and 36 ms of 345 (2 threads, one AMX machine).
 *
 * The arithmetic follows torch's: the norm in fp32, x * rsqrt(mean(x^2) + eps), times the weight,
 * rounded once to the element type; the residual sum rounded to the element type before the norm
 * reads it (torch's add rounds its result); silu rounded to the element type before the product, as
 * torch's silu returns it. Sums run in another order than torch's, so fp32 results can differ from
 * torch's in the last bit and bf16 results, rarely, by one bf16 step.
 * Element type: fp32, or bf16 as raw uint16. Rows are split over OpenMP threads when a call is large
 * enough to pay for the fork (PARALLEL_MIN elements).
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "exp.h"

#define INLINE static inline __attribute__((always_inline))
#define PARALLEL_MIN (1 << 16)

/* One row of d elements: out = src * rsqrt(mean(src^2) + eps) * w, src = x, or with residual given the
 * rounded x + residual, which is stored to sum first. */
INLINE void rms_norm_row(const void *x, const void *residual, const void *w, void *out, void *sum, int d, float eps,
                         int bf16) {
    const void *src = x;
    if (residual) {
#pragma omp simd
        for (int j = 0; j < d; j++)
            store_elem(sum, j, load_elem(x, j, bf16) + load_elem(residual, j, bf16), bf16);
        src = sum;
    }
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int j = 0; j < d; j++) {
        float v = load_elem(src, j, bf16);
        ss += v * v;
    }
    const float r = 1.f / sqrtf(ss * (1.f / (float)d) + eps);
#pragma omp simd
    for (int j = 0; j < d; j++) store_elem(out, j, load_elem(src, j, bf16) * r * load_elem(w, j, bf16), bf16);
}

/* silu(g) * u, before its final rounding; silu rounded to the element type first, as torch's silu returns it.
 * silu(g) = g / (1 + exp(-g)), from an exp that cannot overflow: for g < 0, g exp(g) / (1 + exp(g)),
 * and 0 below exp's clamp (where it is under 2e-36). A select of factors, not of products: a
 * conditional product keeps the loop from vectorizing. */
INLINE float silu_times(float g, float u, int bf16) {
    float e = exp_nonpositive(-fabsf(g)), m = g >= 0.f ? 1.f : (g < -87.f ? 0.f : e);
    float s = g * m / (1.f + e);
    if (bf16) s = bf16_to_float(float_to_bf16(s));
    return s * u;
}

/* One row: out (f) = silu(gate) * up for gate_up (2f), the gate's f elements, then the up's. */
INLINE void silu_mul_row(const void *gate_up, void *out, int f, int bf16) {
#pragma omp simd
    for (int j = 0; j < f; j++)
        store_elem(out, j, silu_times(load_elem(gate_up, j, bf16), load_elem(gate_up, f + j, bf16), bf16), bf16);
}

#ifdef HAVE_BF16_VEC
/* The bf16 rows 16 lanes at a time, with the CPU's bf16 conversions (bf16.h): the same arithmetic
 * as the loops above, whose conversions compile to several integer ops each. On one AMX Xeon,
 * silu_mul of 1072 x 1536 ran 1.5x faster, with every result bit the same. */
static void rms_norm_row_bf16x16(const uint16_t *x, const uint16_t *residual, const uint16_t *w, uint16_t *out,
                                 uint16_t *sum, int d, float eps) {
    const uint16_t *src = x;
    int j;
    if (residual) {
        for (j = 0; j + 16 <= d; j += 16)
            bf16x16_store(sum + j, _mm512_add_ps(bf16x16_load(x + j), bf16x16_load(residual + j)));
        for (; j < d; j++) sum[j] = float_to_bf16(bf16_to_float(x[j]) + bf16_to_float(residual[j]));
        src = sum;
    }
    __m512 acc = _mm512_setzero_ps();
    for (j = 0; j + 16 <= d; j += 16) {
        __m512 v = bf16x16_load(src + j);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    float ss = _mm512_reduce_add_ps(acc);
    for (; j < d; j++) ss += bf16_to_float(src[j]) * bf16_to_float(src[j]);
    const float r = 1.f / sqrtf(ss * (1.f / (float)d) + eps);
    const __m512 rv = _mm512_set1_ps(r);
    for (j = 0; j + 16 <= d; j += 16)
        bf16x16_store(out + j, _mm512_mul_ps(_mm512_mul_ps(bf16x16_load(src + j), rv), bf16x16_load(w + j)));
    for (; j < d; j++) out[j] = float_to_bf16(bf16_to_float(src[j]) * r * bf16_to_float(w[j]));
}

static void silu_mul_row_bf16x16(const uint16_t *gate_up, uint16_t *out, int f) {
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.f);
    int j = 0;
    for (; j + 16 <= f; j += 16) {
        __m512 g = bf16x16_load(gate_up + j), u = bf16x16_load(gate_up + f + j);
        __m512 e = exp_nonpositive_x16(_mm512_sub_ps(zero, _mm512_abs_ps(g)));
        __m512 m = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(g, _mm512_set1_ps(-87.f), _CMP_LT_OQ), zero);
        m = _mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(g, zero, _CMP_GE_OQ), one);
        __m512 s = bf16x16_round(_mm512_div_ps(_mm512_mul_ps(g, m), _mm512_add_ps(one, e)));
        bf16x16_store(out + j, _mm512_mul_ps(s, u));
    }
    for (; j < f; j++) out[j] = float_to_bf16(silu_times(bf16_to_float(gate_up[j]), bf16_to_float(gate_up[f + j]), 1));
}
#endif

/* The row loops are written out per element type: OpenMP outlines a parallel loop before constants
 * propagate, and a bf16 flag that is not a constant there keeps the loops from vectorizing. */
void rms_norm_f32(const float *x, const float *residual, const float *w, float *out, float *sum, int64_t n, int d,
                  float eps, int threads) {
#pragma omp parallel for num_threads(threads) if (n * d >= PARALLEL_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++)
        rms_norm_row(x + i * d, residual ? residual + i * d : 0, w, out + i * d, sum ? sum + i * d : 0, d, eps, 0);
}

void rms_norm_bf16(const uint16_t *x, const uint16_t *residual, const uint16_t *w, uint16_t *out, uint16_t *sum,
                   int64_t n, int d, float eps, int threads) {
#pragma omp parallel for num_threads(threads) if (n * d >= PARALLEL_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++)
#ifdef HAVE_BF16_VEC
        rms_norm_row_bf16x16(x + i * d, residual ? residual + i * d : 0, w, out + i * d, sum ? sum + i * d : 0, d, eps);
#else
        rms_norm_row(x + i * d, residual ? residual + i * d : 0, w, out + i * d, sum ? sum + i * d : 0, d, eps, 1);
#endif
}

void silu_mul_f32(const float *gate_up, float *out, int64_t n, int f, int threads) {
#pragma omp parallel for num_threads(threads) if (n * f >= PARALLEL_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) silu_mul_row(gate_up + i * 2 * f, out + i * f, f, 0);
}

void silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t n, int f, int threads) {
#pragma omp parallel for num_threads(threads) if (n * f >= PARALLEL_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++)
#ifdef HAVE_BF16_VEC
        silu_mul_row_bf16x16(gate_up + i * 2 * f, out + i * f, f);
#else
        silu_mul_row(gate_up + i * 2 * f, out + i * f, f, 1);
#endif
}
