/* The small-M products of decoding: y (M, N) = x (M, K) @ w (N, K)^T + bias, for 1 <= M <= 16.
 *
 * Decoding reads every weight once per step and does two flops per weight per row: it is bound by how fast
 * the weights stream from memory, not by arithmetic.  So the weights stay in PyTorch's own row-major (N, K)
 * layout (each output's weights are one contiguous run the hardware prefetcher follows), every weight
 * vector loaded is used for all M rows while it sits in a register, and the rows of x (a few KiB) stay in
 * L1.  Outputs are split over the OpenMP threads in static chunks.
 *
 * The hot loop is the k loop of dot_rows: per vector of weights (16 floats, 8 on AVX2) one load (a widening for
 * bf16 and fp16) and one fused multiply-add per row of x, 8 outputs at a time for one row (independent FMA
 * chains, more loads in flight) and 4 x 4 otherwise.  It is bound by memory for one row; with more rows oneDNN's blocked matmul overtakes
 * it, so matvec.py only sends it the rows below the measured crossover.  Weights are float32, bfloat16 or
 * float16 (widened exactly to float32: products and sums are float32 in all three); x and y are float32, the
 * caller rounds y to the model's dtype.  Plain C99 with GCC vector extensions (an intrinsic for the widening
 * where the CPU has one): AVX-512 under -march=native, AVX2 or SSE otherwise.
 */
#include <stdint.h>
#include <string.h>

#ifdef __AVX512F__
#define W 16 /* floats per vector: one register (two AVX2 registers per accumulator would spill at 8 outputs) */
#else
#define W 8
#endif
#define MAX_M 16

typedef float vf __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));

static inline vf load_f32(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

#include "half.h"

#ifdef __AVX512F__
#include <immintrin.h>
static inline vf load_f16(const uint16_t *p) {
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
static inline vf load_bf16(const uint16_t *p) {  /* one 32-byte load, widen, shift: bfloat16 is a float's top half */
    __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
    return (vf)_mm512_castsi512_ps(u);
}
#elif defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
static inline vf load_f16(const uint16_t *p) {
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
static inline vf load_bf16(const uint16_t *p) {
    __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
    return (vf)_mm256_castsi256_ps(u);
}
#else
static inline vf load_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;  /* bfloat16 is the top half of a float32: exact */
    vf v;
    memcpy(&v, &u, sizeof v);
    return v;
}
static inline vf load_f16(const uint16_t *p) {
    vf v;
    for (int i = 0; i < W; i++) v[i] = half_to_float(p[i]);
    return v;
}
#endif

static inline float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < W; i++) s += v[i];
    return s;
}

enum { F32 = 0, BF16 = 1, F16 = 2 };

static inline vf load_w(const void *w, int wt, long at) {
    return wt == BF16 ? load_bf16((const uint16_t *)w + at) : wt == F16 ? load_f16((const uint16_t *)w + at)
                                                                         : load_f32((const float *)w + at);
}

static inline float widen1(const void *w, int wt, long i) {
    if (wt == F32) return ((const float *)w)[i];
    if (wt == F16) return half_to_float(((const uint16_t *)w)[i]);
    uint32_t u = (uint32_t)((const uint16_t *)w)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* outputs n0 .. n0 + R - 1 (all < N) for every row of x; M and R are constants in each instantiation below, so
 * the R * M accumulators live in registers and the m loop unrolls */
static inline __attribute__((always_inline)) void dot_rows(const float *x, const void *w, int wt, float *y,
                                                          int M, int R, int N, int K, int n0) {
    vf acc[8][MAX_M];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) acc[r][m] = (vf){0};
    int kv = K / W * W;
    for (int k = 0; k < kv; k += W) {
        for (int r = 0; r < R; r++) {
            long at = (long)(n0 + r) * K + k;
            vf wv = load_w(w, wt, at);
            for (int m = 0; m < M; m++) acc[r][m] += wv * load_f32(x + (long)m * K + k);
        }
    }
    for (int r = 0; r < R; r++) {
        for (int m = 0; m < M; m++) {
            float s = hsum(acc[r][m]);
            for (int k = kv; k < K; k++) s += widen1(w, wt, (long)(n0 + r) * K + k) * x[(long)m * K + k];
            y[(long)m * N + n0 + r] = s;
        }
    }
}

/* A block of R outputs for MT rows of x: R * MT accumulators stay in registers (one row of x: 8 outputs at a
 * time, for more loads in flight; otherwise 4).  More than 4 rows of x go 4 at a time over the same block of
 * weights, which is then read from L1, not memory, after the first group. */
#define INSTANCE(MT, R)                                                                                   \
    static void rows_##MT(const float *x, const void *w, int wt, float *y, int N, int K, int n0) {      \
        if (wt == BF16) dot_rows(x, w, BF16, y, MT, R, N, K, n0);                                           \
        else if (wt == F16) dot_rows(x, w, F16, y, MT, R, N, K, n0);                                        \
        else dot_rows(x, w, F32, y, MT, R, N, K, n0);                                                       \
    }
INSTANCE(1, 8) INSTANCE(2, 4) INSTANCE(3, 4) INSTANCE(4, 4)
#define BLOCK 8  /* outputs per task: rows_1 does 8; the others do two blocks of 4 */

typedef void (*rows_fn)(const float *, const void *, int, float *, int, int, int);
static const rows_fn ROWS_FN[5] = {0, rows_1, rows_2, rows_3, rows_4};

/* outputs n0 .. n0 + BLOCK - 1 for every row of x */
static void block(const float *x, const void *w, int wt, float *y, int M, int N, int K, int n0) {
    for (int m0 = 0; m0 < M; m0 += 4) {
        int mt = M - m0 < 4 ? M - m0 : 4;
        const float *xm = x + (long)m0 * K;
        float *ym = y + (long)m0 * N;
        if (mt == 1) ROWS_FN[1](xm, w, wt, ym, N, K, n0);
        else for (int n = n0; n < n0 + BLOCK; n += 4) ROWS_FN[mt](xm, w, wt, ym, N, K, n);
    }
}

static void dot_one(const float *x, const void *w, int wt, float *y, int M, int N, int K, int n) {
    for (int m = 0; m < M; m++) {
        float s = 0.0f;
        for (int k = 0; k < K; k++) s += widen1(w, wt, (long)n * K + k) * x[(long)m * K + k];
        y[(long)m * N + n] = s;
    }
}

/* y (M, N) float32 = x (M, K) float32 @ w (N, K)^T (wt: 0 float32, 1 bfloat16, 2 float16) + bias (N) float32 or NULL.
 * Returns 0, or 2 for arguments out of range. */
int kv_linear(const float *x, const void *w, int wt, const float *bias, float *y, int M, int N, int K) {
    if (M < 1 || M > MAX_M || N < 1 || K < 1) return 2;
    int blocks = N / BLOCK;
    #pragma omp parallel for schedule(static, 8)
    for (int b = 0; b < blocks; b++) block(x, w, wt, y, M, N, K, b * BLOCK);
    for (int n = blocks * BLOCK; n < N; n++) dot_one(x, w, wt, y, M, N, K, n);
    if (bias)
        for (int m = 0; m < M; m++)
            for (int n = 0; n < N; n++) y[(long)m * N + n] += bias[n];
    return 0;
}
