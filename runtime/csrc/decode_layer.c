/* One transformer layer on the rows of a decode step, in one call: the same kernels, in the same order,
 * as runtime/layers.py's Block takes for them one by one on CPU (runtime/decode_layer.py):
 *
 *     qkv = linear(rms_norm(x), wqkv)              the fused q/k/v projection of every row
 *     q   = rope_and_cache(qkv, cos, sin)          keys and values written to the cache slot
 *     a   = paged_decode(q[live])                  the live rows attend over the cache in place
 *     h, hn = rms_norm(x[live] + linear(a, wo))    the attention residual, in the norm's pass
 *     out = h + linear(silu_mul(linear(hn, w_gate_up)), w_down)
 *
 * Rows that left the core (kv_fill 'propagate') write their entry and stop there: `live` (m indices into
 * the n rows, or null for all) names the rows that go on. With m = 0 (a group of exited rows) the call
 * projects keys and values only, as the separate path's wk and wv do. Every intermediate is rounded to the element
 * type as torch rounds it between ops, so the result is the unfused path's, bit for bit. What this saves
 * is Python: as separate calls a layer cost ~25 dispatches and ~120 us of interpreter time on a few rows
 * (bf16, one Zen 5 CPU), against ~240 us of kernels at one row.
 *
 * Element type: fp32, or bf16 as raw uint16. The scratch `work` holds n * (qkv + H * D + d) + m * (H * D +
 * 3 * d + 3 * F) elements (runtime/decode_layer.py allocates it).
 */
#include <stdint.h>
#include <string.h>

void linear_rows_f32(const float *x, const float *w, const float *bias, float *out, int64_t n, int K, int64_t N,
                     int threads);
void linear_rows_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *out, int64_t n, int K,
                      int64_t N, int threads);
void rms_norm_f32(const float *x, const float *residual, const float *w, float *out, float *sum, int64_t n, int d,
                  float eps, int threads);
void rms_norm_bf16(const uint16_t *x, const uint16_t *residual, const uint16_t *w, uint16_t *out, uint16_t *sum,
                   int64_t n, int d, float eps, int threads);
void silu_mul_f32(const float *gate_up, float *out, int64_t n, int f, int threads);
void silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t n, int f, int threads);
int rope_and_cache_f32(const float *qkv, const float *cos, const float *sin, float *q, float *k_cache,
                       float *v_cache, const int64_t *index, int64_t n, int H, int Hkv, int D, int64_t num_positions,
                       int threads);
int rope_and_cache_bf16(const uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, uint16_t *q,
                        uint16_t *k_cache, uint16_t *v_cache, const int64_t *index, int64_t n, int H, int Hkv, int D,
                        int64_t num_positions, int threads);
int paged_decode_f32(const float *q, const float *k, const float *v, const int64_t *tables, int64_t width,
                     const int64_t *ctx_lens, float *out, int R, int H, int Hkv, int D, int64_t block_size,
                     int64_t num_blocks, float scale, int num_threads);
int paged_decode_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const int64_t *tables, int64_t width,
                      const int64_t *ctx_lens, uint16_t *out, int R, int H, int Hkv, int D, int64_t block_size,
                      int64_t num_blocks, float scale, int num_threads);

#include "bf16.h"

/* h + delta per element, rounded once to the element type (torch's add). */
#define ADD_ROWS(T, bf16)                                                                                          \
    static void add_rows_##T(const T *a, const T *b, T *out, int64_t count) {                                      \
        for (int64_t j = 0; j < count; j++) store_elem(out, j, load_elem(a, j, bf16) + load_elem(b, j, bf16), bf16); \
    }
ADD_ROWS(float, 0)
ADD_ROWS(uint16_t, 1)

/* Returns 0, or the failing kernel's status: rope_and_cache's (-1 odd head dim, -2 an index outside the
 * cache, nothing written) as 10 + status, paged_decode's (-1 limits or memory, -2 a table outside the cache)
 * as 20 + status. Written out per element type, as the kernels it calls are. */
#define DECODE_LAYER(T, SUFFIX)                                                                                      \
    int decode_layer_##SUFFIX(const T *x, const T *attn_norm_w, float attn_eps, const T *wqkv, const T *cos,         \
                              const T *sin, T *k_cache, T *v_cache, const int64_t *index, int64_t num_positions,     \
                              const int64_t *live, int64_t m, const int64_t *tables, int64_t width,                 \
                              const int64_t *ctx_lens, int64_t block_size, const T *wo, const T *mlp_norm_w,         \
                              float mlp_eps, const T *w_gate_up, const T *w_down, T *out, T *work, int64_t n, int d, \
                              int H, int Hkv, int D, int F, float scale, int threads) {                             \
        const int64_t qkv_width = (int64_t)(H + 2 * Hkv) * D, q_width = (int64_t)H * D;                              \
        T *qkv = work, *q = qkv + n * qkv_width, *attn = q + n * q_width, *xs = attn + m * q_width;                 \
        T *proj = xs + m * d, *h = proj + m * d, *gate_up = h + m * d, *act = gate_up + m * 2 * F;                  \
        T *normed = act + m * F; /* n rows of x normed, then (reused) m rows of h normed */                        \
        rms_norm_##SUFFIX(x, 0, attn_norm_w, normed, 0, n, d, attn_eps, threads);                                   \
        if (m == 0) { /* every row left the core: its key and value only, from wqkv's last rows */               \
            linear_rows_##SUFFIX(normed, wqkv + q_width * d, 0, qkv, n, d, qkv_width - q_width, threads);            \
            int status = rope_and_cache_##SUFFIX(qkv, cos, sin, q, k_cache, v_cache, index, n, 0, Hkv, D,          \
                                                 num_positions, threads);                                           \
            return status ? 10 + status : 0;                                                                        \
        }                                                                                                           \
        linear_rows_##SUFFIX(normed, wqkv, 0, qkv, n, d, qkv_width, threads);                                       \
        int status = rope_and_cache_##SUFFIX(qkv, cos, sin, q, k_cache, v_cache, index, n, H, Hkv, D,              \
                                             num_positions, threads);                                               \
        if (status) return 10 + status;                                                                             \
        const T *q_live = q, *x_live = x;                                                                           \
        if (live) { /* the rows that go on, gathered */                                                             \
            for (int64_t i = 0; i < m; i++) {                                                                       \
                memcpy(xs + i * d, x + live[i] * d, sizeof(T) * d);                                                 \
                memcpy(qkv + i * q_width, q + live[i] * q_width, sizeof(T) * q_width);                              \
            }                                                                                                       \
            q_live = qkv, x_live = xs; /* qkv is free after rope_and_cache: the gathered queries go there */        \
        }                                                                                                           \
        status = paged_decode_##SUFFIX(q_live, k_cache, v_cache, tables, width, ctx_lens, attn, (int)m, H, Hkv, D,  \
                                       block_size, num_positions / block_size, scale, threads);                    \
        if (status) return 20 + status;                                                                             \
        linear_rows_##SUFFIX(attn, wo, 0, proj, m, (int)q_width, d, threads);                                       \
        rms_norm_##SUFFIX(x_live, proj, mlp_norm_w, normed, h, m, d, mlp_eps, threads);                             \
        linear_rows_##SUFFIX(normed, w_gate_up, 0, gate_up, m, d, 2 * (int64_t)F, threads);                         \
        silu_mul_##SUFFIX(gate_up, act, m, F, threads);                                                             \
        linear_rows_##SUFFIX(act, w_down, 0, proj, m, F, d, threads);                                               \
        add_rows_##T(h, proj, out, m * d);                                                                          \
        return 0;                                                                                                   \
    }
DECODE_LAYER(float, f32)
DECODE_LAYER(uint16_t, bf16)
