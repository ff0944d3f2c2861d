/* The AVX-512 hot loops of kv_paged_decode (qattn.c), the engine's full-precision paged pool: included only
 * where the compiler targets AVX-512 (F + DQ); elsewhere paged_item's plain loops run.
 *
 * Why not the plain loops: a key's score is a dot product of D channels, and a per-token dot product ends in a
 * horizontal sum.  Here 16 tokens' dot products are kept as 16 vectors of partial sums and folded into one
 * vector of 16 scores by a tree of two-source permutes (15 folds, 3 instructions each), so the reduction costs
 * about 3 instructions per (token, query head) instead of a dependent shuffle chain per token.  The value
 * pass keeps its accumulators (up to 4 query heads x 4 vectors) in registers across the whole item.  Both
 * passes then read each key and value row once from memory: the loop is bound by the memory stream. */
#include <immintrin.h>

/* fold(a, b): lane i < 8 is a[2i] + a[2i+1], lane 8 + i is b[2i] + b[2i+1] */
static inline __attribute__((always_inline)) __m512 fold(__m512 a, __m512 b) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    return _mm512_add_ps(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b));
}

/* 16 vectors of partial sums (one per token) -> one vector whose lane t is the full sum of vector t */
static inline __attribute__((always_inline)) __m512 sum16(__m512 *x) {
    for (int w = 16; w > 1; w /= 2)
        for (int i = 0; i < w / 2; i++) x[i] = fold(x[2 * i], x[2 * i + 1]);
    return x[0];
}

/* Blocks are scattered through the pool, and the hardware prefetchers stop at the page a block fills: while
 * one block is read, the rows the next visible index i (< i1) starts on are requested, up to its block's end. */
static inline __attribute__((always_inline)) void prefetch_next(const float *base, int width, const int32_t *table,
                                                                int bs, int s0, int start, int i, int i1) {
    if (i >= i1) return;
    const int pos = i < s0 ? i : start + (i - s0), blk = pos / bs, off = pos - blk * bs;
    const char *at = (const char *)(base + ((size_t)table[blk] * bs + off) * width);
    const size_t bytes = (size_t)(bs - off) * width * sizeof(float);
    for (size_t b = 0; b < bytes; b += 64) _mm_prefetch(at + b, _MM_HINT_T1);
}

/* scores[g * n + col + t] for t < m (m <= 16 consecutive tokens, key rows k0 + t * D) and every query head */
static inline __attribute__((always_inline)) void score16(const float *q, const float *k0, int m, int G,
                                                          const int D, float *scores, int n, int col) {
    for (int g = 0; g < G; g++) {
        __m512 part[16];
        const float *qg = q + g * D;
        for (int t = 0; t < 16; t++) {
            if (t >= m) {
                part[t] = _mm512_setzero_ps();
                continue;
            }
            const float *key = k0 + (size_t)t * D;
            __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
            int d = 0;
            for (; d + 32 <= D; d += 32) {
                a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + d), _mm512_loadu_ps(key + d), a);
                b = _mm512_fmadd_ps(_mm512_loadu_ps(qg + d + 16), _mm512_loadu_ps(key + d + 16), b);
            }
            if (d < D) a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + d), _mm512_loadu_ps(key + d), a);
            part[t] = _mm512_add_ps(a, b);
        }
        _mm512_mask_storeu_ps(scores + g * n + col, (__mmask16)((1u << m) - 1), sum16(part));
    }
}

/* the softmax partial of one query head's n scores, in place: s[j] = exp(s[j] - max), returns (max, sum)
 * (GCC does not vectorise a max reduction written with a ternary: its serial chain cost 3 cycles a score) */
static inline __attribute__((always_inline)) void softmax_part(float *s, int n, float *p) {
    __m512 mv = _mm512_set1_ps(-INFINITY);
    int j = 0;
    for (; j + 16 <= n; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + j));
    float m = _mm512_reduce_max_ps(mv), l = 0.f;
    for (; j < n; j++) m = s[j] > m ? s[j] : m;
    for (j = 0; j < n; j++) s[j] = exp_nonpositive(s[j] - m);
    for (j = 0; j < n; j++) l += s[j];
    p[0] = m;
    p[1] = l;
}

/* out[gi][c0 .. c0 + 16 * NV) += e[gi] * row[c0 ...] over every visible token, for NG query heads g0 ..:
 * the accumulators stay in registers for the whole item (NG * NV <= 16 of the 32 vector registers) */
static inline __attribute__((always_inline)) void values_block(const float *vh, int vstride, const int32_t *table,
                                                               int bs, int s0, int start, int i0, int i1,
                                                               const float *scores, int n, int g0, const int NG,
                                                               int c0, const int NV, float *part, int VD) {
    __m512 acc[NG][NV];
    for (int g = 0; g < NG; g++)
        for (int v = 0; v < NV; v++) acc[g][v] = _mm512_setzero_ps();
    int i = i0;
    while (i < i1) {
        const int pos = i < s0 ? i : start + (i - s0), blk = pos / bs, off = pos - blk * bs;
        int run = bs - off, left = (i < s0 ? s0 : i1) - i;
        run = run < left ? run : left;
        run = run < i1 - i ? run : i1 - i;
        if (c0 == 0 && g0 == 0) prefetch_next(vh, vstride, table, bs, s0, start, i + run, i1);
        const float *row = vh + ((size_t)table[blk] * bs + off) * vstride + c0;
        const float *e = scores + (size_t)g0 * n + (i - i0);
        for (int t = 0; t < run; t++, row += vstride, e++)
            for (int g = 0; g < NG; g++) {
                const __m512 w = _mm512_set1_ps(e[(size_t)g * n]);
                for (int v = 0; v < NV; v++) acc[g][v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(row + 16 * v), acc[g][v]);
            }
        i += run;
    }
    for (int g = 0; g < NG; g++)
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(part + (size_t)(g0 + g) * (VD + 2) + 2 + c0 + 16 * v, acc[g][v]);
}

/* every (query-head block, channel block) of the value pass; VD a multiple of 16 */
static inline __attribute__((always_inline)) void values_avx512(const float *vh, int vstride, const int32_t *table,
                                                                int bs, int s0, int start, int i0, int i1,
                                                                const float *scores, int n, int G, const int VD,
                                                                float *part) {
    for (int c0 = 0; c0 < VD; c0 += 64) {
        const int nv = (VD - c0) / 16 < 4 ? (VD - c0) / 16 : 4;
        for (int g0 = 0; g0 < G; g0 += 4) {
            const int ng = G - g0 < 4 ? G - g0 : 4;
#define VALUES(NG, NV) values_block(vh, vstride, table, bs, s0, start, i0, i1, scores, n, g0, NG, c0, NV, part, VD)
#define VALUES_NG(NG) do { if (nv == 4) VALUES(NG, 4); else if (nv == 3) VALUES(NG, 3); \
                           else if (nv == 2) VALUES(NG, 2); else VALUES(NG, 1); } while (0)
            if (ng == 4) VALUES_NG(4);
            else if (ng == 3) VALUES_NG(3);
            else if (ng == 2) VALUES_NG(2);
            else VALUES_NG(1);
#undef VALUES_NG
#undef VALUES
        }
    }
}
