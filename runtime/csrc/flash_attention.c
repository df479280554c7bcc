/* Causal attention of bf16 prompts and chunks, flash-style (runtime/attention.py: "flash"), with both
 * products on the AMX tile unit where the CPU has AMX-BF16, else in AVX-512 BF16 vectors (vdpbf16ps).
 *
 * On a 2-core AMX Xeon, torch's bf16 SDPA ran a 1024-token causal prompt of SmolLM2's 9/3 heads of 64
 * at about 400 GFLOP/s, and batched GEMMs did worse. vLLM's CPU backend runs its own AMX attention
 * there, and the prefill of long prompts was where Ponder fell behind it. On a Zen 4 (AVX-512 BF16, no
 * AMX) the grouped GEMMs ran 134-token prompts at about 90 GFLOP/s: a square block of 128 queries,
 * half of it masked, and copies of the keys and of the padded queries around it. Here both products
 * run 16 query rows at a time, over keys in chunks of KC with an online softmax (running max and sum in
 * fp32, as flash attention does). They run transposed, S^T = K Q^T and O^T = V^T P^T, so that each
 * query is a lane and the softmax needs no reduction across a register (one per row and chunk had
 * made the softmax 1.6 of a 2.5 ms prompt on AMX).
 *
 *   - Each sequence's keys and values are first packed per KV head: K as rows of D (the first operand
 *     of S^T), V^T per 32 keys and 16 dims (the first operand of O^T), zero past the last key. All
 *     query heads of a group read that copy. Keys come from tensors by stride, or from the paged
 *     cache through a block table (`paged_causal_flash_attention_bf16`, all sequences of a step).
 *   - Queries are the last M of the L positions: query m, at position L - M + m, sees keys 0 .. its
 *     position (M == L: a prompt from position 0; M < L: a chunk after cached context).
 *   - Q^T holds a pair of bf16 dims per 32-bit lane, P^T a pair of keys: the pairs vdpbf16ps (and the
 *     tiles' dot product) multiply and add. AMX: tiles 0-3 the chunk's O^T for 16 dims each, 4-5 Q^T
 *     (32 dims each), 6 K or V^T, 7 S^T and then P^T. Vectors: a key's pair of dims, or a dim's pair of
 *     keys, broadcast against a register of 16 queries, 16 sums in registers at a time.
 *     Head dims of 32 and 64 run.
 *
 * Arithmetic: products in fp32 from bf16 inputs, a degree-4 exp2 (6e-6 relative), probabilities
 * rounded to bf16 for P V, outputs O / sum rounded once to bf16. SDPA sums in another order, so
 * results differ from it within bf16's rounding. Threads: OpenMP over (sequence, head, query tile),
 * the tiles that see the most keys first; on AMX each thread configures its tiles and releases them.
 *
 * Compiled where the compiler targets AMX-BF16 or AVX-512 BF16 (-march=native on such a CPU);
 * `flash_attention_unit` says which runs (for AMX it asks Linux for the tile state once).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "exp.h"

#if defined(HAVE_BF16_VEC) && defined(__AVX512F__)
#define HAVE_FLASH 1
#define KC 128 /* keys per chunk of the online softmax */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

static int amx_permitted = -1; /* -1: not asked yet */

static int amx_ready(void) {
    if (amx_permitted < 0) amx_permitted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return amx_permitted;
}
#endif

/* Where a sequence's keys (or values) of one head lie: row `key` at base + key * sl, or in a paged cache
 * through a block table (block table[key / bs], row key % bs of it, rows sl apart). */
typedef struct {
    const uint16_t *base;
    int64_t sl;
    const int64_t *table; /* NULL: rows in order */
    int bs;
} rows_at;

static inline const uint16_t *row_of(rows_at r, int key) {
    return r.table ? r.base + (r.table[key / r.bs] * r.bs + key % r.bs) * r.sl : r.base + (int64_t)key * r.sl;
}

/* K (L keys, D dims) -> Lp rows of D, zero from key L on: the first operand of S^T = K Q^T. */
static void pack_keys(rows_at k, int L, int Lp, int D, uint16_t *out) {
    for (int key = 0; key < Lp; key++)
        if (key < L)
            memcpy(out + (int64_t)key * D, row_of(k, key), D * sizeof(uint16_t));
        else
            memset(out + (int64_t)key * D, 0, D * sizeof(uint16_t));
}

/* V (L keys, D dims) -> V^T per 32 keys s and 16 dims dt, a 16 x 32 tile: row dd holds dim 16dt + dd of
 * keys 32s .. 32s + 31. Keys from L on are zero (their probabilities are too, and 0 times a stale value
 * could be NaN). The first operand of O^T = V^T P^T. */
static void pack_values(rows_at v, int L, int Lp, int D, uint16_t *out) {
    const int dtiles = D / 16;
    for (int s = 0; s < Lp / 32; s++)
        for (int kk = 0; kk < 32; kk++) {
            const int key = s * 32 + kk;
            const uint16_t *row = key < L ? row_of(v, key) : 0;
            for (int dt = 0; dt < dtiles; dt++) {
                uint16_t *tile = out + ((int64_t)s * dtiles + dt) * 512;
                for (int dd = 0; dd < 16; dd++) tile[dd * 32 + kk] = row ? row[dt * 16 + dd] : 0;
            }
        }
}

/* 2^x for x <= 0 on 16 lanes, to a relative 6e-6 (a degree-4 polynomial): the probabilities are rounded
 * to bf16 (2^-9) before P V, so the full precision of exp.h would buy nothing here. */
static inline __attribute__((always_inline)) __m512 exp2_nonpositive_x16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-127.f));
    const __m512 i = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(x, i);
    __m512 p = _mm512_set1_ps(0.013341536745429039f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05235282704234123f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24124981462955475f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6930434703826904f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, i);
}

/* The query lanes (of 16, at positions first_pos + lane) that see key `key`. */
static inline __attribute__((always_inline)) __mmask16 seen_by(int key, int first_pos) {
    const int d = key - first_pos;
    return d <= 0 ? 0xffff : d >= 16 ? 0 : (__mmask16)(0xffffu << d);
}

/* The two products of a query tile, on AMX tiles or in vectors. Q^T: (D / 2) rows of 16 lanes, each a pair
 * of dims; K: rows of D per key; S^T: 16 floats per key; P^T: 16 lanes per pair of keys; V^T: per 32 keys
 * and 16 dims, 16 rows (dims) of 16 pairs of keys (pack_values). */
#define INLINE static inline __attribute__((always_inline))
#ifdef HAVE_AMX
INLINE void load_queries(const uint16_t *qt, int chunks) {
    _tile_loadd(4, qt, 64); /* tile numbers are immediates: no loops over them */
    if (chunks == 2) _tile_loadd(5, qt + 512, 64);
}

/* S^T of 16 keys from k (rows of D) into st (16 x 16 floats). */
INLINE void scores16(const uint16_t *qt, const uint16_t *k, int D, float *st) {
    (void)qt;
    _tile_zero(7);
    _tile_loadd(6, k, D * sizeof(uint16_t));
    _tile_dpbf16ps(7, 6, 4);
    if (D == 64) {
        _tile_loadd(6, k + 32, D * sizeof(uint16_t));
        _tile_dpbf16ps(7, 6, 5);
    }
    _tile_stored(7, st, 64);
}

/* ot (D x 16) = ot * alpha + V^T P^T over `subchunks` of 32 keys. */
INLINE void add_values(const uint16_t *pt, const uint16_t *vt, int subchunks, int D, __m512 alpha, float *ot) {
    float tt[64 * 16] __attribute__((aligned(64)));
    const int dtiles = D / 16;
    _tile_zero(0);
    _tile_zero(1);
    if (dtiles == 4) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int s = 0; s < subchunks; s++, vt += dtiles * 512) {
        _tile_loadd(7, pt + s * 512, 64);
        _tile_loadd(6, vt, 64);
        _tile_dpbf16ps(0, 6, 7);
        _tile_loadd(6, vt + 512, 64);
        _tile_dpbf16ps(1, 6, 7);
        if (dtiles == 4) {
            _tile_loadd(6, vt + 1024, 64);
            _tile_dpbf16ps(2, 6, 7);
            _tile_loadd(6, vt + 1536, 64);
            _tile_dpbf16ps(3, 6, 7);
        }
    }
    _tile_stored(0, tt, 64);
    _tile_stored(1, tt + 256, 64);
    if (dtiles == 4) {
        _tile_stored(2, tt + 512, 64);
        _tile_stored(3, tt + 768, 64);
    }
    for (int d = 0; d < D; d++)
        _mm512_store_ps(ot + 16 * d, _mm512_fmadd_ps(_mm512_load_ps(ot + 16 * d), alpha, _mm512_load_ps(tt + 16 * d)));
}
#else
INLINE void load_queries(const uint16_t *qt, int chunks) { (void)qt, (void)chunks; }

/* S^T of 16 keys: for each pair of dims, the keys' pair broadcast against the 16 queries' pair. */
INLINE void scores16(const uint16_t *qt, const uint16_t *k, int D, float *st) {
    const uint32_t *kp = (const uint32_t *)k;
    __m512 acc[16];
    for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
    for (int p = 0; p < D / 2; p++) {
        const __m512bh qp = (__m512bh)_mm512_load_si512(qt + 32 * p);
        for (int j = 0; j < 16; j++)
            acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_set1_epi32((int)kp[j * (D / 2) + p]), qp);
    }
    for (int j = 0; j < 16; j++) _mm512_store_ps(st + 16 * j, acc[j]);
}

/* ot (D x 16) = ot * alpha + V^T P^T: for 16 dims at a time, each pair of keys' values broadcast against
 * the 16 queries' pair of probabilities. */
INLINE void add_values(const uint16_t *pt, const uint16_t *vt, int subchunks, int D, __m512 alpha, float *ot) {
    const int dtiles = D / 16;
    for (int dt = 0; dt < dtiles; dt++) {
        __m512 acc[16];
        for (int dd = 0; dd < 16; dd++) acc[dd] = _mm512_mul_ps(_mm512_load_ps(ot + 16 * (16 * dt + dd)), alpha);
        for (int s = 0; s < subchunks; s++) {
            const uint32_t *tile = (const uint32_t *)(vt + ((int64_t)s * dtiles + dt) * 512); /* 16 dims x 16 pairs */
            for (int kk = 0; kk < 16; kk++) {
                const __m512bh pp = (__m512bh)_mm512_load_si512(pt + (s * 16 + kk) * 32);
                for (int dd = 0; dd < 16; dd++)
                    acc[dd] = _mm512_dpbf16_ps(acc[dd], (__m512bh)_mm512_set1_epi32((int)tile[dd * 16 + kk]), pp);
            }
        }
        for (int dd = 0; dd < 16; dd++) _mm512_store_ps(ot + 16 * (16 * dt + dd), acc[dd]);
    }
}
#endif

/* One tile of 16 query rows (rows past M are zeros and dropped) of one head over its packed keys and values.
 * It runs transposed, S^T = K Q^T and O^T = V^T P^T, so that each of the 16 queries is a lane: the max, the
 * sum and the rescaling of the online softmax are vertical ops, with no reduction across a register. */
static void query_tile(const uint16_t *q, int64_t q_sm, uint16_t *out, int64_t o_sm, int rows, int first_pos, int L,
                       int D, float scale, const uint16_t *kpack, const uint16_t *vpack) {
    uint16_t qt[2 * 512] __attribute__((aligned(64)));    /* Q^T per 32 dims: row kk, lane m: dims 2kk, 2kk + 1 */
    uint16_t pt[KC / 2 * 32] __attribute__((aligned(64))); /* P^T: row kk, lane m: keys 2kk, 2kk + 1 */
    float st[KC * 16] __attribute__((aligned(64)));        /* S^T: a key per row, a query per lane */
    float ot[64 * 16] __attribute__((aligned(64)));        /* O^T: a dim per row, a query per lane */
    const int chunks = D / 32, dtiles = D / 16;
    const float scale2 = scale * 1.44269504f; /* scores to log2 units: exp(x) = 2^(x log2 e) */
    const __m512 c = _mm512_set1_ps(scale2);
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                                6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    memset(qt, 0, sizeof qt);
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i pair_rows = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(16)); /* pair kk of a row -> row kk */
    for (int m = 0; m < rows; m++) /* each row's dim pairs (32 bits) scattered down lane m */
        for (int p = 0; p < D / 2; p += 16)
            _mm512_i32scatter_epi32((uint32_t *)qt + (p / 16) * 256 + m, pair_rows,
                                    _mm512_loadu_si512(q + (int64_t)m * q_sm + 2 * p), 4);
    memset(ot, 0, sizeof ot);
    __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
    load_queries(qt, chunks);
    const int last = first_pos + 15 < L - 1 ? first_pos + 15 : L - 1; /* the furthest key a lane sees */
    for (int kc = 0; kc <= last; kc += KC) {
        const int keys = last + 1 - kc < KC ? last + 1 - kc : KC, subchunks = (keys + 31) / 32;
        for (int t = 0; t < (keys + 15) / 16; t++) scores16(qt, kpack + (int64_t)(kc + 16 * t) * D, D, st + t * 256);
        __m512 m = _mm512_set1_ps(-INFINITY);
        for (int j = 0; j < keys; j++) m = _mm512_mask_max_ps(m, seen_by(kc + j, first_pos), m, _mm512_load_ps(st + 16 * j));
        const __m512 m_new = _mm512_max_ps(mx, _mm512_mul_ps(m, c));
        const __m512 alpha = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(mx, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ),
                                                 exp2_nonpositive_x16(_mm512_sub_ps(mx, m_new)));
        sum = _mm512_mul_ps(sum, alpha);
        for (int j = 0; j < subchunks * 32; j += 2) { /* probabilities, a pair of keys per row of P^T */
            __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
            if (j < keys)
                p0 = _mm512_maskz_mov_ps(seen_by(kc + j, first_pos),
                                         exp2_nonpositive_x16(_mm512_fmsub_ps(_mm512_load_ps(st + 16 * j), c, m_new)));
            if (j + 1 < keys)
                p1 = _mm512_maskz_mov_ps(seen_by(kc + j + 1, first_pos),
                                         exp2_nonpositive_x16(_mm512_fmsub_ps(_mm512_load_ps(st + 16 * j + 16), c, m_new)));
            sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
            const __m512i pair = (__m512i)_mm512_cvtne2ps_pbh(p1, p0); /* p0's 16 bf16, then p1's */
            _mm512_store_si512(pt + j / 2 * 32, _mm512_permutexvar_epi16(interleave, pair));
        }
        mx = m_new;
        add_values(pt, vpack + (int64_t)(kc / 32) * dtiles * 512, subchunks, D, alpha, ot);
    }
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), sum);
    for (int d = 0; d < D; d++) _mm512_store_ps(ot + 16 * d, _mm512_mul_ps(_mm512_load_ps(ot + 16 * d), inv));
    for (int m = 0; m < rows; m++) /* lane m of 16 dims at a time, gathered */
        for (int d = 0; d < D; d += 16)
            bf16x16_store(out + (int64_t)m * o_sm + d, _mm512_i32gather_ps(pair_rows, ot + 16 * d + m, 4));
}
#endif

/* 2: AMX tiles run the kernel (Linux granted their state); 1: AVX-512 BF16 vectors; 0: it does not run here. */
int flash_attention_unit(void) {
#if defined(HAVE_AMX)
    return amx_ready() ? 2 : 0;
#elif defined(HAVE_FLASH)
    return 1;
#else
    return 0;
#endif
}

#ifdef HAVE_FLASH
/* One sequence of a call: its M query rows (the last M of its L positions) and where its keys and values lie. */
typedef struct {
    const uint16_t *q;
    uint16_t *out;
    int64_t q_sh, q_sm, o_sh, o_sm; /* strides of heads and rows */
    rows_at k, v;                   /* head 0's; heads k_sh, v_sh apart */
    int64_t k_sh, v_sh, packed;     /* packed: where its heads' packed keys start in the scratch */
    int M, L, Lp;
} sequence;

typedef struct {
    int seq, head, tile, first_pos;
} work;

static int later_first(const void *a, const void *b) { /* the tiles that see the most keys first */
    return ((const work *)b)->first_pos - ((const work *)a)->first_pos;
}

static int run(sequence *seqs, int S, int H, int Hkv, int D, float scale, int threads) {
    if ((D != 32 && D != 64) || H % Hkv) return -4;
    int64_t scratch = 0, items = 0;
    for (int s = 0; s < S; s++) {
        if (seqs[s].M > seqs[s].L || seqs[s].M < 0) return -4;
        seqs[s].Lp = (seqs[s].L + KC - 1) / KC * KC;
        seqs[s].packed = scratch;
        scratch += (int64_t)Hkv * seqs[s].Lp * D;
        items += (int64_t)H * ((seqs[s].M + 15) / 16);
    }
    uint16_t *kpack = malloc((size_t)scratch * 2 * sizeof(uint16_t) + 1);
    work *todo = malloc((size_t)items * sizeof(work) + 1);
    if (!kpack || !todo) {
        free(kpack);
        free(todo);
        return -1;
    }
    uint16_t *vpack = kpack + scratch;
    int64_t n = 0;
    for (int s = 0; s < S; s++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < (seqs[s].M + 15) / 16; t++) todo[n++] = (work){s, h, t, seqs[s].L - seqs[s].M + 16 * t};
    qsort(todo, (size_t)items, sizeof(work), later_first);
    const int g = H / Hkv;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for collapse(2) schedule(static)
        for (int s = 0; s < S; s++)
            for (int h = 0; h < Hkv; h++) {
                const sequence *q = seqs + s;
                const int64_t at = q->packed + (int64_t)h * q->Lp * D;
                rows_at k = q->k, v = q->v;
                k.base += h * q->k_sh, v.base += h * q->v_sh;
                pack_keys(k, q->L, q->Lp, D, kpack + at);
                pack_values(v, q->L, q->Lp, D, vpack + at);
            }
#ifdef HAVE_AMX
        tile_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette_id = 1;
        for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
        _tile_loadconfig(&cfg);
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < items; i++) {
            const work w = todo[i];
            const sequence *q = seqs + w.seq;
            const int m0 = 16 * w.tile, rows = q->M - m0 < 16 ? q->M - m0 : 16;
            const int64_t at = q->packed + (int64_t)(w.head / g) * q->Lp * D;
            query_tile(q->q + w.head * q->q_sh + m0 * q->q_sm, q->q_sm, q->out + w.head * q->o_sh + m0 * q->o_sm,
                       q->o_sm, rows, w.first_pos, q->L, D, scale, kpack + at, vpack + at);
        }
#ifdef HAVE_AMX
        _tile_release();
#endif
    }
    free(kpack);
    free(todo);
    return 0;
}
#endif

/* q (R, H, M, D), k and v (R, Hkv, L, D), out (R, H, M, D), each by strides in elements (per sequence,
 * head, row; dims contiguous). Returns 0; -1: no memory; -3: the kernel does not run here (flash_attention_unit);
 * -4: a head dim other than 32 or 64, or M > L. */
int causal_flash_attention_bf16(const uint16_t *q, int64_t q_sr, int64_t q_sh, int64_t q_sm, const uint16_t *k,
                                int64_t k_sr, int64_t k_sh, int64_t k_sl, const uint16_t *v, int64_t v_sr, int64_t v_sh,
                                int64_t v_sl, uint16_t *out, int64_t o_sr, int64_t o_sh, int64_t o_sm, int R, int H,
                                int Hkv, int M, int L, int D, float scale, int threads) {
#ifdef HAVE_FLASH
    if (!flash_attention_unit()) return -3;
    sequence *seqs = malloc((size_t)R * sizeof(sequence) + 1);
    if (!seqs) return -1;
    for (int r = 0; r < R; r++)
        seqs[r] = (sequence){q + r * q_sr, out + r * o_sr, q_sh, q_sm, o_sh, o_sm, {k + r * k_sr, k_sl, 0, 1},
                             {v + r * v_sr, v_sl, 0, 1}, k_sh, v_sh, 0, M, L, 0};
    const int status = run(seqs, R, H, Hkv, D, scale, threads);
    free(seqs);
    return status;
#else
    (void)q, (void)q_sr, (void)q_sh, (void)q_sm, (void)k, (void)k_sr, (void)k_sh, (void)k_sl, (void)v, (void)v_sr;
    (void)v_sh, (void)v_sl, (void)out, (void)o_sr, (void)o_sh, (void)o_sm, (void)R, (void)H, (void)Hkv, (void)M;
    (void)L, (void)D, (void)scale, (void)threads;
    return -3;
#endif
}

/* The same over one slot of the paged cache, for S sequences of one step: sequence s has rows[s] query rows
 * from row starts[s] of q (n, H, D) and out (n, H, D), the last of its ctx[s] positions, whose keys and values
 * are in k_cache, v_cache (num_blocks * bs, Hkv, D) through tables (S, W). Returns as above; -2: a context
 * past its table, or a block id outside the cache. */
int paged_causal_flash_attention_bf16(const uint16_t *q, uint16_t *out, const uint16_t *k_cache, const uint16_t *v_cache,
                                      const int64_t *tables, int64_t W, const int64_t *starts, const int64_t *rows,
                                      const int64_t *ctx, int S, int H, int Hkv, int D, int bs, int64_t num_blocks,
                                      float scale, int threads) {
#ifdef HAVE_FLASH
    if (!flash_attention_unit()) return -3;
    for (int s = 0; s < S; s++) {
        if (ctx[s] > W * bs || ctx[s] < rows[s]) return -2;
        for (int64_t b = 0; b < (ctx[s] + bs - 1) / bs; b++)
            if (tables[s * W + b] < 0 || tables[s * W + b] >= num_blocks) return -2;
    }
    sequence *seqs = malloc((size_t)S * sizeof(sequence) + 1);
    if (!seqs) return -1;
    const int64_t row = (int64_t)H * D, key = (int64_t)Hkv * D;
    for (int s = 0; s < S; s++)
        seqs[s] = (sequence){q + starts[s] * row, out + starts[s] * row, D, row, D, row, {k_cache, key, tables + s * W, bs},
                             {v_cache, key, tables + s * W, bs}, D, D, 0, (int)rows[s], (int)ctx[s], 0};
    const int status = run(seqs, S, H, Hkv, D, scale, threads);
    free(seqs);
    return status;
#else
    (void)q, (void)out, (void)k_cache, (void)v_cache, (void)tables, (void)W, (void)starts, (void)rows, (void)ctx;
    (void)S, (void)H, (void)Hkv, (void)D, (void)bs, (void)num_blocks, (void)scale, (void)threads;
    return -3;
#endif
}
