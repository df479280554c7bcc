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
#endif
