/* Softmax in place over rows of causal attention scores, the causal mask applied as it goes.
 *
 * runtime/attention.py's grouped_attention multiplies a block of queries against every key up to the
 * block's end: query j of the block (row r: j = r % block) sits at position first + j and sees keys
 * 0 .. first + j; the keys after it must get probability 0. torch does that as an add of a -inf
 * triangle and a softmax, two passes over the scores; in bf16 the softmax alone took 131 ms of a
 * 1.18 s step of two 1024-token prompts (2 threads, one Zen 4 CPU). Here it is one call per block:
 * each row's max, exp and sum in fp32 over the keys it sees, probabilities rounded once to the
 * element type, zeros after them.
 *
 * The arithmetic is torch's (exp(x - max) times 1 / sum, in fp32); exp is exp_nonpositive, so results
 * can differ from torch's in the last fp32 bit and, rarely, by one bf16 step. Element type: fp32, or
 * bf16 as raw uint16. Rows are split over OpenMP threads when a call is large enough (PARALLEL_MIN).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "exp.h"

#define INLINE static inline __attribute__((always_inline))
#define PARALLEL_MIN (1 << 16)

/* One row of cols scores of which the first `sees` are visible; tmp holds cols floats. */
INLINE void causal_softmax_row(void *row, float *tmp, int cols, int sees, int bf16) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int j = 0; j < sees; j++) {
        float x = load_elem(row, j, bf16);
        m = x > m ? x : m;
    }
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < sees; j++) {
        float e = exp_nonpositive(load_elem(row, j, bf16) - m);
        tmp[j] = e;
        sum += e;
    }
    const float r = 1.f / sum;
#pragma omp simd
    for (int j = 0; j < sees; j++) store_elem(row, j, tmp[j] * r, bf16);
    memset((char *)row + (size_t)sees * (bf16 ? 2 : 4), 0, (size_t)(cols - sees) * (bf16 ? 2 : 4));
}

/* n rows of cols scores; row r is query r % block of a block whose first query sits at position first.
 * Returns 0, or -1 when a row buffer could not be allocated. Written out per element type, as in
 * norm_act.c: a bf16 flag that is not a constant in the outlined parallel loop keeps it scalar. */
int causal_softmax_f32(float *scores, int64_t n, int cols, int block, int64_t first, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) if (n * cols >= PARALLEL_MIN) reduction(| : failed)
    {
        float *tmp = malloc((size_t)cols * sizeof(float));
        failed = !tmp;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            int64_t sees = first + r % block + 1;
            if (tmp) causal_softmax_row(scores + r * cols, tmp, cols, sees < cols ? (int)sees : cols, 0);
        }
        free(tmp);
    }
    return failed ? -1 : 0;
}

int causal_softmax_bf16(uint16_t *scores, int64_t n, int cols, int block, int64_t first, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) if (n * cols >= PARALLEL_MIN) reduction(| : failed)
    {
        float *tmp = malloc((size_t)cols * sizeof(float));
        failed = !tmp;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            int64_t sees = first + r % block + 1;
            if (tmp) causal_softmax_row(scores + r * cols, tmp, cols, sees < cols ? (int)sees : cols, 1);
        }
        free(tmp);
    }
    return failed ? -1 : 0;
}
