/* A linear layer on a few rows, out = x W^T (+ bias), reading the weight once, as it is stored.
 *
 * A decode step multiplies every weight by one row per sequence: it must stream the weights from
 * memory, and little else. oneDNN's bf16 GEMM on one row read them at 19 GB/s on a CPU whose memory
 * reads 57 GB/s (SmolLM2-135M, 2 threads, one Zen 4 CPU). Here the weight (N, K), row-major as torch
 * keeps it, is read in tiles of OUTS rows; each tile is multiplied by every row of x, ROWS rows at a
 * time, while it sits in L1, so the weight is read from memory once per call. A tile's rows are too
 * short for the hardware prefetcher to follow (the LM head read 17 GB/s without help), so the first
 * pass over a tile prefetches the tile AHEAD tiles on, 256 bytes per step of K, into L2, not L1: at
 * 16 rows x alone fills half of L1, and prefetches into L1 evicted each other before use (the 3072 x
 * 576 weight at 16 rows, from memory: 302 us with L1 prefetches, 211 with L2; at 1 row the same).
 *
 * Arithmetic: products and sums in fp32, in one fixed order per output (a row's result does not
 * depend on the other rows of the call), the bias added in fp32, one rounding to the element type.
 * With AVX512-BF16, bf16 pairs multiply and add in one instruction (vdpbf16ps, which flushes
 * denormals); elsewhere, and for fp32, a portable loop that gcc vectorizes. Element type: fp32, or
 * bf16 as raw uint16.
 */
#include <stdint.h>

#include "bf16.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_DPBF16 1
#endif

#define INLINE static inline __attribute__((always_inline))
#define OUTS 4 /* weight rows per tile */
#define ROWS 6 /* rows of x multiplied per pass over a tile: 24 accumulators, 4 weights and a row in 32 registers */
#define AHEAD 2 /* tiles ahead that the first pass over a tile prefetches */

/* Portable: outs (<= OUTS) outputs of rows (<= ROWS) rows of x, from weight rows w. */
INLINE void tile_portable(const void *x, int64_t r0, int rows, const void *w, int64_t o0, int outs, int K,
                          float acc[ROWS][OUTS], int bf16) {
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < outs; o++) {
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int k = 0; k < K; k++)
                s += load_elem(x, (r0 + r) * K + k, bf16) * load_elem(w, (o0 + o) * K + k, bf16);
            acc[r][o] = s;
        }
}

#ifdef HAVE_DPBF16
/* The sums of the 16 lanes of a, b, c and d, as one add tree for the four (a fixed order). */
INLINE __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                      _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

/* R rows (a constant, so the accumulators stay in registers) by OUTS outputs, 32 bf16 of K at a time;
 * ahead: the weight bytes to prefetch, 256 a step, or null. */
INLINE void tile_dpbf16(const uint16_t *x, int64_t r0, const uint16_t *w, int64_t o0, int K, float acc[ROWS][OUTS],
                        const char *ahead, const int R) {
    __m512 sum[ROWS][OUTS];
    for (int r = 0; r < R; r++)
        for (int o = 0; o < OUTS; o++) sum[r][o] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 32) {
        const __mmask32 m = K - k >= 32 ? 0xffffffffu : (1u << (K - k)) - 1u;
        if (ahead)
            for (int b = 0; b < 256; b += 64) _mm_prefetch(ahead + (int64_t)k * 8 + b, _MM_HINT_T1);
        __m512i wv[OUTS];
        for (int o = 0; o < OUTS; o++) wv[o] = _mm512_maskz_loadu_epi16(m, w + (o0 + o) * K + k);
        for (int r = 0; r < R; r++) {
            const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + (r0 + r) * K + k);
            for (int o = 0; o < OUTS; o++) sum[r][o] = _mm512_dpbf16_ps(sum[r][o], xv, (__m512bh)wv[o]);
        }
    }
    for (int r = 0; r < R; r++) _mm_storeu_ps(acc[r], sum4(sum[r][0], sum[r][1], sum[r][2], sum[r][3]));
}
#endif

INLINE void store_tile(void *out, int64_t r0, int rows, int64_t o0, int outs, int64_t N, const void *bias,
                       float acc[ROWS][OUTS], int bf16) {
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < outs; o++)
            store_elem(out, (r0 + r) * N + o0 + o, acc[r][o] + (bias ? load_elem(bias, o0 + o, bf16) : 0.f), bf16);
}

/* One tile of outputs o0 .. o0 + outs for every row. */
INLINE void linear_tile(const void *x, const void *w, const void *bias, void *out, int64_t n, int K, int64_t N,
                        int64_t o0, int outs, int bf16) {
    float acc[ROWS][OUTS];
    const int64_t elem = bf16 ? 2 : 4, next = o0 + AHEAD * OUTS;
    const char *ahead = next + OUTS <= N ? (const char *)w + next * K * elem : 0;
    for (int64_t r0 = 0; r0 < n; r0 += ROWS, ahead = 0) {
        const int rows = n - r0 < ROWS ? (int)(n - r0) : ROWS;
#ifdef HAVE_DPBF16
        if (bf16 && outs == OUTS) {
            switch (rows) {
                case 1: tile_dpbf16(x, r0, w, o0, K, acc, ahead, 1); break;
                case 2: tile_dpbf16(x, r0, w, o0, K, acc, ahead, 2); break;
                case 3: tile_dpbf16(x, r0, w, o0, K, acc, ahead, 3); break;
                case 4: tile_dpbf16(x, r0, w, o0, K, acc, ahead, 4); break;
                case 5: tile_dpbf16(x, r0, w, o0, K, acc, ahead, 5); break;
                default: tile_dpbf16(x, r0, w, o0, K, acc, ahead, 6); break;
            }
            store_tile(out, r0, rows, o0, outs, N, bias, acc, bf16);
            continue;
        }
#endif
        if (ahead)
            for (int64_t b = 0; b < OUTS * K * elem; b += 64) __builtin_prefetch(ahead + b, 0, 2); /* into L2 */
        tile_portable(x, r0, rows, w, o0, outs, K, acc, bf16);
        store_tile(out, r0, rows, o0, outs, N, bias, acc, bf16);
    }
}

/* x (n, K), w (N, K), bias (N) or null, out (n, N); tiles of outputs split over OpenMP threads. Written
 * out per element type, as in norm_act.c: a bf16 flag that is not a constant in the outlined parallel
 * loop keeps it scalar. */
void linear_rows_f32(const float *x, const float *w, const float *bias, float *out, int64_t n, int K, int64_t N,
                     int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o0 = 0; o0 < N; o0 += OUTS)
        linear_tile(x, w, bias, out, n, K, N, o0, N - o0 < OUTS ? (int)(N - o0) : OUTS, 0);
}

void linear_rows_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *out, int64_t n, int K,
                      int64_t N, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o0 = 0; o0 < N; o0 += OUTS)
        linear_tile(x, w, bias, out, n, K, N, o0, N - o0 < OUTS ? (int)(N - o0) : OUTS, 1);
}
