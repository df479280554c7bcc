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

#ifdef HAVE_BF16_VEC
/* exp_nonpositive on 16 lanes: the same steps, so the same result bit for bit. */
static inline __attribute__((always_inline)) __m512 exp_nonpositive_x16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.f), x); /* NaN stays NaN, as in the scalar */
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
    __m512 i = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(t, i);
    __m512 p = _mm512_set1_ps(1.5403530e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(i), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}
#endif
#endif
