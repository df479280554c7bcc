/* A vectorizable exp for the native kernels in this directory. */
#ifndef PONDER_EXP_H
#define PONDER_EXP_H
#include <stdint.h>

#include "bf16.h"

/* exp(x) for x <= 0 (softmax after its max is taken off): 2^i * 2^f, 2^f by a degree-6 polynomial
 * (relative error ~2e-7). glibc's expf does not vectorize without -ffast-math, which would also
 * assume no infinities. */
static inline __attribute__((always_inline)) float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;
    float t = x * 1.44269504f, i = __builtin_floorf(t), f = t - i;
    float p = 1.5403530e-4f;
    p = p * f + 1.3333558e-3f;
    p = p * f + 9.6181291e-3f;
    p = p * f + 5.5504109e-2f;
    p = p * f + 2.4022650e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.f;
    return p * (bits32){.u = (uint32_t)((int32_t)i + 127) << 23}.f;
}
#endif
