/* bf16 as raw uint16 <-> fp32, rounding as torch does (to nearest, ties to even; NaN stays NaN).
 * Branch-free, so loops over it vectorize. Shared by the native kernels in this directory. */
#ifndef PONDER_BF16_H
#define PONDER_BF16_H
#include <stdint.h>

typedef union {
    uint32_t u;
    float f;
} bits32;

static inline float bf16_to_float(uint16_t x) { return (bits32){.u = (uint32_t)x << 16}.f; }

static inline uint16_t float_to_bf16(float f) {
    uint32_t u = (bits32){.f = f}.u, rounded = u + 0x7fffu + ((u >> 16) & 1u);
    uint32_t nan = (u & 0x7fffffffu) > 0x7f800000u;
    return (uint16_t)((nan ? u | 0x400000u : rounded) >> 16);
}

/* Element i of an fp32 array, or (bf16 != 0) of a bf16 one, as fp32; and a store back, rounded. The kernels
 * compile one body per element type with bf16 as a constant, so the test folds away. */
static inline __attribute__((always_inline)) float load_elem(const void *base, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

static inline __attribute__((always_inline)) void store_elem(void *base, int64_t i, float x, int bf16) {
    if (bf16)
        ((uint16_t *)base)[i] = float_to_bf16(x);
    else
        ((float *)base)[i] = x;
}

/* Where the CPU has AVX-512 BF16: 16 bf16 <-> 16 fp32 in one register. vcvtneps2bf16 rounds as torch
 * does (to nearest even, NaN quieted) but flushes denormals to zero, which torch keeps; a vector that
 * holds one (rare: below 1.2e-38) takes the scalar rounding instead. */
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_BF16_VEC 1

static inline __attribute__((always_inline)) __m512 bf16x16_load(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* x rounded to bf16, as fp32 (a product's rounding before it is used again). */
static inline __attribute__((always_inline)) __m512 bf16x16_round(__m512 x) {
    if (__builtin_expect(_mm512_fpclass_ps_mask(x, 0x20) != 0, 0)) { /* 0x20: denormal */
        float f[16];
        _mm512_storeu_ps(f, x);
        for (int i = 0; i < 16; i++) f[i] = bf16_to_float(float_to_bf16(f[i]));
        return _mm512_loadu_ps(f);
    }
    __m256i b = (__m256i)_mm512_cvtneps_pbh(x);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

static inline __attribute__((always_inline)) void bf16x16_store(uint16_t *p, __m512 x) {
    if (__builtin_expect(_mm512_fpclass_ps_mask(x, 0x20) != 0, 0)) { /* 0x20: denormal */
        float f[16];
        _mm512_storeu_ps(f, x);
        for (int i = 0; i < 16; i++) p[i] = float_to_bf16(f[i]);
        return;
    }
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(x));
}
#endif
#endif
