/* Decode attention over the paged KV cache, in place: one query row per sequence, each over the
 * first ctx_len[r] positions of its block table. No gather, no padding, fp32 accumulation.
 *
 * Layout (runtime/engine/kv_cache.py): a slot's keys and values are (positions, Hkv, D), where
 * position p of block b is b * block_size + p. Queries and outputs are (R, H, D); the H query heads
 * are Hkv groups of g = H / Hkv heads that share one KV head (GQA). A work item is one (sequence,
 * KV head): it reads that head's keys and values once for its g query heads.
 *
 * Built at first use by runtime/paged_attention.py with the host's compiler and -march=native, so
 * the loops vectorize for the CPU it runs on. OpenMP is the libgomp that torch has loaded already.
 * Element type: fp32, or bf16 as raw uint16 (every sum in fp32). One always-inlined body is
 * compiled once per type, with the type as a constant flag.
 *
 * Where the compiler targets AVX-512 BF16 (-march=native on such a CPU), bf16 items take intrinsics:
 * the scores 16 positions at a time with vdpbf16ps (bf16 pairs multiplied exactly, summed in fp32)
 * and one transpose-and-add for their 16 sums, and for head dims 64 and 128 the weighted sum of values
 * with its accumulators in registers. 2.3-2.6x faster than the portable loops on one Zen 4 machine.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h" /* and immintrin.h, where it defines HAVE_BF16_VEC */
#include "exp.h"

#define MAX_HEAD_DIM 256
#define MAX_GROUP 16
#define INLINE static inline __attribute__((always_inline))

/* The cache row of position t of a block table. block_size is a power of two (checked by the caller),
 * so this is a shift and a mask: a 64-bit division per position cost more than its dot products. */
INLINE int64_t row_of(const int64_t *table, int64_t t, int64_t block_size, int64_t row_stride) {
    int64_t shift = __builtin_ctzll((unsigned long long)block_size);
    return ((table[t >> shift] << shift) + (t & (block_size - 1))) * row_stride;
}

/* A row of D elements as fp32 in out. And a prefetch of position t's row (the caller asks for one
 * PREFETCH_AHEAD positions on): rows of one head sit row_stride apart, and the hardware prefetcher
 * does not follow them (without it, past ~4 MB of context each row read was a cache miss). */
INLINE void load_row(const void *base, int64_t row, int D, float *out, int bf16) {
#pragma omp simd
    for (int d = 0; d < D; d++) out[d] = load_elem(base, row + d, bf16);
}

INLINE void prefetch_row(const void *base, const int64_t *table, int64_t t, int64_t n, int64_t block_size,
                         int64_t row_stride, int D, int bf16) {
    if (t >= n) return;
    const char *p = (const char *)base + row_of(table, t, block_size, row_stride) * (bf16 ? 2 : 4);
    for (int b = 0; b < D * (bf16 ? 2 : 4); b += 64) __builtin_prefetch(p + b);
}

#define PREFETCH_AHEAD 8

/* And into L2, FAR_AHEAD positions on, with the first FAR_AHEAD keys and values of an item asked for at
 * its start: a few rows in flight at a time left the kernel waiting on memory (16 decode rows over 130
 * positions of a 755 MB cache, 2 threads, one Zen 4: 148 us a layer, 98 with this; 16 over 1024
 * positions: 1284 against 789). FAR_AHEAD rows of keys and of values are 64 KB at D = 128 in bf16. */
#define FAR_AHEAD 256

INLINE void prefetch_far(const void *base, const int64_t *table, int64_t t, int64_t n, int64_t block_size,
                         int64_t row_stride, int D, int bf16) {
    if (t >= n) return;
    const char *p = (const char *)base + row_of(table, t, block_size, row_stride) * (bf16 ? 2 : 4);
    for (int b = 0; b < D * (bf16 ? 2 : 4); b += 64) __builtin_prefetch(p + b, 0, 2);
}

#ifdef HAVE_BF16_VEC
#define BF16_DOT 1 /* vdpbf16ps: bf16 pairs multiplied exactly and summed in fp32 */

/* Lane i of the result is the sum of v[i]'s 16 lanes: a transpose-and-add, about 2 instructions a sum
 * where a horizontal reduction each takes about 8. */
INLINE __m512 sums16(const __m512 *v) {
    __m512 a[8], b[4];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88), _mm512_shuffle_f32x4(b[0], b[1], 0xdd));
    __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88), _mm512_shuffle_f32x4(b[2], b[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, 0x88), _mm512_shuffle_f32x4(u01, u23, 0xdd));
}

/* scores[j * n + t] = scale * (q_j . k_t) for the g bf16 query rows q (g, D), D a multiple of 32, over
 * the n positions of table, 16 positions at a time. */
static void bf16_scores(const uint16_t *q, const uint16_t *k, const int64_t *table, int64_t n, int64_t block_size,
                        int64_t row_stride, int g, int D, float scale, float *scores) {
    const __m512 scaled = _mm512_set1_ps(scale);
    for (int64_t t0 = 0; t0 < n; t0 += 16) {
        int cnt = n - t0 < 16 ? (int)(n - t0) : 16;
        const uint16_t *rows[16];
        for (int i = 0; i < 16; i++) {
            rows[i] = k + row_of(table, t0 + (i < cnt ? i : 0), block_size, row_stride);
            prefetch_row(k, table, t0 + 16 + i, n, block_size, row_stride, D, 1);
            prefetch_far(k, table, t0 + FAR_AHEAD + i, n, block_size, row_stride, D, 1);
        }
        for (int j = 0; j < g; j++) {
            __m512 acc[16];
            for (int i = 0; i < 16; i++) {
                __m512 s = _mm512_setzero_ps();
                for (int c = 0; c < D; c += 32)
                    s = _mm512_dpbf16_ps(s, (__m512bh)_mm512_loadu_si512(q + j * D + c),
                                         (__m512bh)_mm512_loadu_si512(rows[i] + c));
                acc[i] = s;
            }
            _mm512_mask_storeu_ps(scores + j * n + t0, (__mmask16)((1u << cnt) - 1), _mm512_mul_ps(sums16(acc), scaled));
        }
    }
}

/* acc (g, D) = sum over t of p[j * n + t] * v_t for bf16 value rows, D a multiple of 16 known at compile time
 * where this is inlined (so the sums stay in registers), 4 query rows at a time. */
INLINE void bf16_values(const float *p, const uint16_t *v, const int64_t *table, int64_t n, int64_t block_size,
                        int64_t row_stride, int g, int D, float *acc) {
    for (int j0 = 0; j0 < g; j0 += 4) {
        __m512 sum[4][MAX_HEAD_DIM / 16];
        for (int j = 0; j < 4; j++)
            for (int c = 0; c < D / 16; c++) sum[j][c] = _mm512_setzero_ps();
        for (int64_t t = 0; t < n; t++) {
            prefetch_row(v, table, t + PREFETCH_AHEAD, n, block_size, row_stride, D, 1);
            if (j0 == 0) prefetch_far(v, table, t + FAR_AHEAD, n, block_size, row_stride, D, 1);
            const uint16_t *row = v + row_of(table, t, block_size, row_stride);
            __m512 x[MAX_HEAD_DIM / 16];
            for (int c = 0; c < D / 16; c++) x[c] = bf16x16_load(row + 16 * c);
            for (int j = 0; j < 4; j++) {
                __m512 pj = _mm512_set1_ps(j0 + j < g ? p[(int64_t)(j0 + j) * n + t] : 0.f);
                for (int c = 0; c < D / 16; c++) sum[j][c] = _mm512_fmadd_ps(pj, x[c], sum[j][c]);
            }
        }
        for (int j = 0; j < 4 && j0 + j < g; j++)
            for (int c = 0; c < D / 16; c++) _mm512_storeu_ps(acc + (j0 + j) * D + 16 * c, sum[j][c]);
    }
}
#else
#define BF16_DOT 0
#endif

/* g query rows q (g, D), already scaled (q_raw: the same rows as stored, unscaled, for the bf16 dot
 * products), over the n positions of table: acc (g, D) gets their outputs. k and v point at this KV head's first element; a position's row is row_stride further.
 * scores holds g * n floats. Each key and value row is converted to fp32 once, for all g rows. */
INLINE void attend_item(const float *q, const void *q_raw, float scale, const void *k, const void *v,
                        const int64_t *table, int64_t n, int64_t block_size, int64_t row_stride, int g, int D,
                        float *scores, float *acc, int bf16) {
    float row_f[MAX_HEAD_DIM];
    for (int64_t t = 0; t < FAR_AHEAD && t < n; t++) {
        prefetch_far(k, table, t, n, block_size, row_stride, D, bf16);
        prefetch_far(v, table, t, n, block_size, row_stride, D, bf16);
    }
#if BF16_DOT
    if (bf16 && D % 32 == 0)
        bf16_scores(q_raw, k, table, n, block_size, row_stride, g, D, scale, scores);
    else
#endif
    for (int64_t t = 0; t < n; t++) {
        prefetch_row(k, table, t + PREFETCH_AHEAD, n, block_size, row_stride, D, bf16);
        prefetch_far(k, table, t + FAR_AHEAD, n, block_size, row_stride, D, bf16);
        load_row(k, row_of(table, t, block_size, row_stride), D, row_f, bf16);
        for (int j = 0; j < g; j++) {
            const float *qj = q + j * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int d = 0; d < D; d++) s += qj[d] * row_f[d];
            scores[j * n + t] = s;
        }
    }
    for (int j = 0; j < g; j++) {
        float *sj = scores + j * n, top = -INFINITY, sum = 0.f;
#pragma omp simd reduction(max : top)
        for (int64_t t = 0; t < n; t++) top = sj[t] > top ? sj[t] : top;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; t++) {
            sj[t] = exp_nonpositive(sj[t] - top);
            sum += sj[t];
        }
        float inv = 1.f / sum;
        for (int64_t t = 0; t < n; t++) sj[t] *= inv;
    }
#if BF16_DOT
    if (bf16 && (D == 64 || D == 128)) { /* the common head dims, each compiled with D a constant */
        if (D == 64)
            bf16_values(scores, v, table, n, block_size, row_stride, g, 64, acc);
        else
            bf16_values(scores, v, table, n, block_size, row_stride, g, 128, acc);
        return;
    }
#endif
    memset(acc, 0, sizeof(float) * g * D);
    for (int64_t t = 0; t < n; t++) {
        prefetch_row(v, table, t + PREFETCH_AHEAD, n, block_size, row_stride, D, bf16);
        prefetch_far(v, table, t + FAR_AHEAD, n, block_size, row_stride, D, bf16);
        load_row(v, row_of(table, t, block_size, row_stride), D, row_f, bf16);
        for (int j = 0; j < g; j++) {
            float p = scores[j * n + t], *aj = acc + j * D;
#pragma omp simd
            for (int d = 0; d < D; d++) aj[d] += p * row_f[d];
        }
    }
}

static void attend_item_f32(const float *q, const void *q_raw, float scale, const void *k, const void *v,
                            const int64_t *table, int64_t n, int64_t block_size, int64_t row_stride, int g, int D,
                            float *scores, float *acc) {
    attend_item(q, q_raw, scale, k, v, table, n, block_size, row_stride, g, D, scores, acc, 0);
}

static void attend_item_bf16(const float *q, const void *q_raw, float scale, const void *k, const void *v,
                             const int64_t *table, int64_t n, int64_t block_size, int64_t row_stride, int g, int D,
                             float *scores, float *acc) {
    attend_item(q, q_raw, scale, k, v, table, n, block_size, row_stride, g, D, scores, acc, 1);
}

/* Whether every context fits its table and every block it reads is one of the cache's num_blocks. */
static int inside_cache(const int64_t *tables, int64_t width, const int64_t *ctx_lens, int R, int64_t block_size,
                        int64_t num_blocks) {
    for (int r = 0; r < R; r++) {
        if (ctx_lens[r] < 0 || ctx_lens[r] > width * block_size) return 0;
        for (int64_t b = 0; b * block_size < ctx_lens[r]; b++)
            if (tables[r * width + b] < 0 || tables[r * width + b] >= num_blocks) return 0;
    }
    return 1;
}

/* Returns 0; -1 when a shape is past the limits above, block_size is not a power of two, or memory ran
 * out; -2 when a context or a block id lies outside the tables or the cache (nothing is read then). */
INLINE int paged_decode(const void *q, const void *k, const void *v, const int64_t *tables, int64_t width,
                        const int64_t *ctx_lens, void *out, int R, int H, int Hkv, int D, int64_t block_size,
                        int64_t num_blocks, float scale, int num_threads, int bf16) {
    int g = H / Hkv, failed = 0;
    if (D > MAX_HEAD_DIM || g > MAX_GROUP || g * Hkv != H || block_size <= 0 || (block_size & (block_size - 1)))
        return -1;
    if (!inside_cache(tables, width, ctx_lens, R, block_size, num_blocks)) return -2;
    int64_t longest = 1;
    for (int r = 0; r < R; r++) longest = ctx_lens[r] > longest ? ctx_lens[r] : longest;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float qf[MAX_GROUP * MAX_HEAD_DIM], acc[MAX_GROUP * MAX_HEAD_DIM];
        float *scores = malloc(sizeof(float) * g * longest);
        failed = scores == NULL;
#pragma omp for schedule(dynamic)
        for (int item = 0; item < R * Hkv; item++) {
            if (scores == NULL) continue;
            int r = item / Hkv, h = item % Hkv;
            int64_t first = ((int64_t)r * H + (int64_t)h * g) * D; /* of this item's query rows */
            for (int i = 0; i < g * D; i++) qf[i] = load_elem(q, first + i, bf16) * scale;
            int64_t head = (int64_t)h * D * (bf16 ? 2 : 4);
            (bf16 ? attend_item_bf16 : attend_item_f32)(qf, (const char *)q + first * (bf16 ? 2 : 4), scale,
                                                        (const char *)k + head, (const char *)v + head,
                                                        tables + (int64_t)r * width, ctx_lens[r], block_size,
                                                        (int64_t)Hkv * D, g, D, scores, acc);
            for (int i = 0; i < g * D; i++) store_elem(out, first + i, acc[i], bf16);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

int paged_decode_f32(const float *q, const float *k, const float *v, const int64_t *tables, int64_t width,
                     const int64_t *ctx_lens, float *out, int R, int H, int Hkv, int D, int64_t block_size,
                     int64_t num_blocks, float scale, int num_threads) {
    return paged_decode(q, k, v, tables, width, ctx_lens, out, R, H, Hkv, D, block_size, num_blocks, scale,
                        num_threads, 0);
}

int paged_decode_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const int64_t *tables, int64_t width,
                      const int64_t *ctx_lens, uint16_t *out, int R, int H, int Hkv, int D, int64_t block_size,
                      int64_t num_blocks, float scale, int num_threads) {
    return paged_decode(q, k, v, tables, width, ctx_lens, out, R, H, Hkv, D, block_size, num_blocks, scale,
                        num_threads, 1);
}
