/* GGUF's quantized weights executed as they are: y (M, N) = x (M, K) @ dequant(w)^T + bias, for Q8_0, Q4_0, Q4_1.
 *
 * Weights come in blocks of 32 along K, each with an fp16 scale d (and for Q4_1 an fp16 minimum m):
 *   Q8_0  w = d * q,        q in -128..127, stored as u = q + 128 (one byte)
 *   Q4_0  w = d * (u - 8),  u in 0..15 (a nibble)
 *   Q4_1  w = d * u + m,    u in 0..15
 * so in every format w = d * u + c with an unsigned code u and c = -128 d, -8 d or m.  Codes are repacked at load
 * (qweight.py) so that 64 consecutive elements of a row fill one 512-bit register of bytes: Q8_0 stores a row's
 * codes in order; Q4 stores each group of 128 elements as 64 bytes, element j in the low nibble of byte j and
 * element 64 + j in the high nibble (a last group of 64 elements: 32 bytes, j and 32 + j).  K must be a multiple
 * of 64.
 *
 * Every product (decoding's few rows and prefill's many) quantizes the activations as llama.cpp does, per block
 * of 32: x = dx * xq with xq in -127..127.  Then one block's dot product is
 *     sum_i w_i x_i = d dx sum_i u_i xq_i + c (dx sum_i xq_i)
 * -- an unsigned-by-signed byte dot product, one VNNI instruction (vpdpbusd) per 64 elements and row of x, plus a
 * per-block correction from the sums of xq computed once per call.  The hot loop is the chunk loop of dot_chunks:
 * per 64 codes one 64-byte load (two nibble masks for Q4), and per row of x a vpdpbusd, a conversion, a permute
 * of the two blocks' scales and one fused multiply-add; scales are widened and the corrections added 16 blocks at
 * a time.  For a large matrix it streams the weights at the read bandwidth; small ones are bound by the call.
 * Outputs are split evenly over the OpenMP threads; 4 outputs x up to 4 rows of x share each chunk while it is in
 * registers, and rows beyond 4 re-read the block from L1.
 *
 * Without AVX512-VNNI, AVX2 does each 32-element block with vpmaddubsw + vpmaddwd (below); elsewhere the same
 * arithmetic runs as plain C.  All three give the same integer dot products, so they agree to float rounding.
 * kv_qdequant widens rows to float32 (the embedding lookup and the float-activation mode that matches the
 * dequantized model).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { Q8_0 = 1, Q4_0 = 2, Q4_1 = 3 };
#define QK 32    /* elements per block */
#define CHUNK 64 /* elements per 512-bit register of codes: two blocks */
#define MAX_M 16

#include "half.h"

static inline long row_bytes(int fmt, int K) { return fmt == Q8_0 ? K : K / 2; }

static inline float offset_of(int fmt, float d, float m) {
    return fmt == Q8_0 ? -128.0f * d : fmt == Q4_0 ? -8.0f * d : m;
}

/* The activations of M rows, quantized per block: xq (M, K), and per block dx and dx * sum(xq). */
static void quantize_rows(const float *x, int M, int K, int8_t *xq, float *dx, float *xs) {
    int nb = K / QK;
    for (int m = 0; m < M; m++)
        for (int b = 0; b < nb; b++) {
            const float *v = x + (long)m * K + b * QK;
            float amax = 0.0f;
            for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(v[i]));
            float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
            int sum = 0;
            for (int i = 0; i < QK; i++) {
                int q = (int)roundf(v[i] * inv);
                xq[(long)m * K + b * QK + i] = (int8_t)q;
                sum += q;
            }
            dx[m * nb + b] = d;
            xs[m * nb + b] = d * (float)sum;
        }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>

/* the 64 codes of chunk c of a row, as bytes */
static inline __m512i chunk_codes(int fmt, const uint8_t *row, int K, int c) {
    if (fmt == Q8_0) return _mm512_loadu_si512(row + (long)c * CHUNK);
    const __m512i low = _mm512_set1_epi8(15);
    int g = c / 2;
    if (K - g * 128 >= 128) {
        __m512i v = _mm512_loadu_si512(row + (long)g * 64);
        return c % 2 ? _mm512_and_si512(_mm512_srli_epi16(v, 4), low) : _mm512_and_si512(v, low);
    }
    __m512i v = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(row + (long)g * 64)));
    __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    return _mm512_inserti64x4(lo, _mm512_castsi512_si256(hi), 1);
}

/* 16 fp16 values from p (fewer at the end of a row: the rest are zero), widened */
static inline __m512 sixteen_halves(const uint16_t *p, int count) {
    __mmask16 mask = count >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << count) - 1);
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}

static inline __m512 sixteen_floats(const float *p, int count) {
    __mmask16 mask = count >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << count) - 1);
    return _mm512_maskz_loadu_ps(mask, p);
}

/* Outputs n0 .. n0 + R - 1 for rows m0 .. m0 + MT - 1 of x, 16 blocks (8 chunks) at a time.  Per 16 blocks and
 * output: the weight scales widened once, times each row's dx (one multiply), and the offset term of all 16
 * blocks in one fused multiply-add (c * dx * sum(xq): -128 d or -8 d against the sums, or Q4_1's minimums).
 * Per chunk and row: vpdpbusd, a conversion, a permute that spreads the two blocks' scale over their lanes, and
 * one fused multiply-add. */
static inline __attribute__((always_inline)) void dot_chunks(int fmt, const uint8_t *codes, const uint16_t *scales,
                                                             const uint16_t *mins, const int8_t *xq, const float *dx,
                                                             const float *xs, float *y, int MT, int R, int N, int K,
                                                             int n0, int m0) {
    int nb = K / QK;
    long rb = row_bytes(fmt, K);
    __m512 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MT; m++) acc[r][m] = _mm512_setzero_ps();
    const float off = fmt == Q8_0 ? -128.0f : -8.0f;
    for (int b0 = 0; b0 < nb; b0 += 16) {
        int count = nb - b0 < 16 ? nb - b0 : 16;
        __m512 xd[4], xsum[4];
        for (int m = 0; m < MT; m++) {
            xd[m] = sixteen_floats(dx + (long)(m0 + m) * nb + b0, count);
            xsum[m] = sixteen_floats(xs + (long)(m0 + m) * nb + b0, count);
            if (fmt != Q4_1) xsum[m] = _mm512_mul_ps(xsum[m], _mm512_set1_ps(off));
        }
        for (int r = 0; r < R; r++) {
            long n = n0 + r;
            __m512 d = sixteen_halves(scales + n * nb + b0, count);
            __m512 c = fmt == Q4_1 ? sixteen_halves(mins + n * nb + b0, count) : d;
            __m512 dd[4];
            for (int m = 0; m < MT; m++) {
                acc[r][m] = _mm512_fmadd_ps(c, xsum[m], acc[r][m]);
                dd[m] = _mm512_mul_ps(d, xd[m]);
            }
            for (int j = 0; j < count / 2; j++) {
                int ch = b0 / 2 + j;
                __m512i u = chunk_codes(fmt, codes + n * rb, K, ch);
                const __m512i spread = _mm512_set_epi32(2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1,
                                                        2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j, 2 * j, 2 * j, 2 * j,
                                                        2 * j, 2 * j, 2 * j, 2 * j);
                for (int m = 0; m < MT; m++) {
                    __m512i xv = _mm512_loadu_si512(xq + (long)(m0 + m) * K + (long)ch * CHUNK);
                    __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, xv));
                    acc[r][m] = _mm512_fmadd_ps(dot, _mm512_permutexvar_ps(spread, dd[m]), acc[r][m]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MT; m++) y[(long)(m0 + m) * N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]);
}

#define INSTANCE(MT)                                                                                               \
    static void rows_##MT(int fmt, const uint8_t *codes, const uint16_t *scales, const uint16_t *mins,              \
                          const int8_t *xq, const float *dx, const float *xs, float *y, int R, int N, int K,         \
                          int n0, int m0) {                                                                         \
        if (R == 4) {                                                                                               \
            if (fmt == Q8_0) dot_chunks(Q8_0, codes, scales, mins, xq, dx, xs, y, MT, 4, N, K, n0, m0);             \
            else if (fmt == Q4_0) dot_chunks(Q4_0, codes, scales, mins, xq, dx, xs, y, MT, 4, N, K, n0, m0);        \
            else dot_chunks(Q4_1, codes, scales, mins, xq, dx, xs, y, MT, 4, N, K, n0, m0);                         \
        } else {                                                                                                    \
            for (int r = 0; r < R; r++)                                                                             \
                dot_chunks(fmt, codes, scales, mins, xq, dx, xs, y, MT, 1, N, K, n0 + r, m0);                        \
        }                                                                                                           \
    }
INSTANCE(1) INSTANCE(2) INSTANCE(3) INSTANCE(4)

typedef void (*rows_fn)(int, const uint8_t *, const uint16_t *, const uint16_t *, const int8_t *, const float *,
                        const float *, float *, int, int, int, int, int);
static const rows_fn ROWS_FN[5] = {0, rows_1, rows_2, rows_3, rows_4};

static void products(int fmt, const uint8_t *codes, const uint16_t *scales, const uint16_t *mins, const int8_t *xq,
                     const float *dx, const float *xs, float *y, int M, int N, int K) {
    int blocks = (N + 3) / 4;
    #pragma omp parallel for schedule(static)
    for (int b = 0; b < blocks; b++) {
        int n0 = b * 4, R = N - n0 < 4 ? N - n0 : 4;
        for (int m0 = 0; m0 < M; m0 += 4) {
            int mt = M - m0 < 4 ? M - m0 : 4;
            ROWS_FN[mt](fmt, codes, scales, mins, xq, dx, xs, y, R, N, K, n0, m0);
        }
    }
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

/* AVX2 has no vpdpbusd: one block (32 elements, one 256-bit register) is vpmaddubsw (unsigned x signed bytes ->
 * pairwise 16-bit sums) then vpmaddwd by ones (-> eight 32-bit sums).  A Q4 code is at most 15, so a pair sum is
 * at most 2 * 15 * 127 and never saturates.  A Q8_0 code (u = q + 128, up to 255) could: for Q8_0 the kernel
 * uses the signed q = u ^ 0x80 with llama.cpp's sign trick, |q| times sign(xq, q), at most 2 * 128 * 127, and
 * leaves out the -128 d offset term -- the same integer sum_i q_i xq_i as the VNNI path's
 * sum_i u_i xq_i - 128 sum_i xq_i, so both agree to float rounding.
 *
 * One output at a time, for up to 4 rows of x: first the row's block scales times each row's dx, 8 blocks per
 * vector, into a small table (and the offset terms of all blocks into one accumulator); then the hot loop over the
 * row's codes, per 32 codes one load (a shift and mask for Q4), per row of x a load of xq, vpmaddubsw, vpmaddwd, a
 * conversion and a fused multiply-add by the block's broadcast scale, alternating two accumulators so that one
 * multiply-add does not wait for the one before.  On AVX2 machines it is bound by those integer multiplies
 * (one pipe) rather than by memory for Q4; a short tail of scales is read with masked loads (a copy through a
 * buffer stalls on store forwarding). */

static inline __m256i lanes_below(int count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* 8 fp16 values from p, widened; fewer (an even count) at the end of a row, the rest zero */
static inline __m256 eight_halves(const uint16_t *p, int count) {
    if (count >= 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    return _mm256_cvtph_ps(_mm_maskload_epi32((const int *)p, _mm256_castsi256_si128(lanes_below(count / 2))));
}

static inline __m256 eight_floats(const float *p, int count) {
    return count >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes_below(count));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline __m256i block_dot(int fmt, __m256i u, const int8_t *xq) {
    __m256i xv = _mm256_loadu_si256((const __m256i *)xq);
    __m256i pairs = fmt == Q8_0 ? _mm256_maddubs_epi16(_mm256_sign_epi8(u, u), _mm256_sign_epi8(xv, u))
                                : _mm256_maddubs_epi16(u, xv);
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

/* y[m][n] for output n and rows m0 .. m0 + MT - 1 of x */
static inline __attribute__((always_inline)) void dot_row(int fmt, const uint8_t *codes, const uint16_t *scales,
                                                          const uint16_t *mins, const int8_t *xq, const float *dx,
                                                          const float *xs, float *y, int MT, int N, int K, long n,
                                                          int m0) {
    int nb = K / QK;
    const uint8_t *row = codes + n * row_bytes(fmt, K);
    float dd[4][nb + 8]; /* (weight scale * dx) per row of x and block, padded for the last full-vector store */
    __m256 acc[4][2];
    for (int m = 0; m < MT; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += 8) {
        int count = nb - b0 < 8 ? nb - b0 : 8;
        __m256 d = eight_halves(scales + n * nb + b0, count);
        __m256 c = fmt == Q4_1 ? eight_halves(mins + n * nb + b0, count) : _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));
        for (int m = 0; m < MT; m++) {
            _mm256_storeu_ps(dd[m] + b0, _mm256_mul_ps(d, eight_floats(dx + (long)(m0 + m) * nb + b0, count)));
            if (fmt != Q8_0)
                acc[m][1] = _mm256_fmadd_ps(c, eight_floats(xs + (long)(m0 + m) * nb + b0, count), acc[m][1]);
        }
    }
    const __m256i low = _mm256_set1_epi8(15);
    for (int b = 0; b < nb; b += 2) { /* two blocks per turn: 64 codes */
        __m256i u0, u1;
        if (fmt == Q8_0) {
            const __m256i flip = _mm256_set1_epi8((char)0x80);
            u0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(row + (long)b * QK)), flip);
            u1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(row + (long)(b + 1) * QK)), flip);
        } else { /* blocks b, b + 1 of their group: the low nibbles of its two halves, or the high (module header) */
            int g = b / 4, full = K - g * 128 >= 128;
            const uint8_t *group = row + (long)g * 64;
            if (full) {
                __m256i v0 = _mm256_loadu_si256((const __m256i *)group);
                __m256i v1 = _mm256_loadu_si256((const __m256i *)(group + 32));
                if (b % 4) v0 = _mm256_srli_epi16(v0, 4), v1 = _mm256_srli_epi16(v1, 4);
                u0 = _mm256_and_si256(v0, low);
                u1 = _mm256_and_si256(v1, low);
            } else { /* the last group of a row, 64 elements in 32 bytes */
                __m256i v = _mm256_loadu_si256((const __m256i *)group);
                u0 = _mm256_and_si256(v, low);
                u1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            }
        }
        for (int m = 0; m < MT; m++) {
            const int8_t *xm = xq + (long)(m0 + m) * K + (long)b * QK;
            acc[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(fmt, u0, xm)), _mm256_broadcast_ss(&dd[m][b]),
                                        acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(fmt, u1, xm + QK)),
                                        _mm256_broadcast_ss(&dd[m][b + 1]), acc[m][1]);
        }
    }
    for (int m = 0; m < MT; m++) y[(long)(m0 + m) * N + n] = hsum8(_mm256_add_ps(acc[m][0], acc[m][1]));
}

#define INSTANCE(MT)                                                                                               \
    static void rows_##MT(int fmt, const uint8_t *codes, const uint16_t *scales, const uint16_t *mins,              \
                          const int8_t *xq, const float *dx, const float *xs, float *y, int N, int K, long n,       \
                          int m0) {                                                                                 \
        if (fmt == Q8_0) dot_row(Q8_0, codes, scales, mins, xq, dx, xs, y, MT, N, K, n, m0);                        \
        else if (fmt == Q4_0) dot_row(Q4_0, codes, scales, mins, xq, dx, xs, y, MT, N, K, n, m0);                   \
        else dot_row(Q4_1, codes, scales, mins, xq, dx, xs, y, MT, N, K, n, m0);                                    \
    }
INSTANCE(1) INSTANCE(2) INSTANCE(3) INSTANCE(4)

typedef void (*rows_fn)(int, const uint8_t *, const uint16_t *, const uint16_t *, const int8_t *, const float *,
                        const float *, float *, int, int, long, int);
static const rows_fn ROWS_FN[5] = {0, rows_1, rows_2, rows_3, rows_4};

static void products(int fmt, const uint8_t *codes, const uint16_t *scales, const uint16_t *mins, const int8_t *xq,
                     const float *dx, const float *xs, float *y, int M, int N, int K) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int m0 = 0; m0 < M; m0 += 4) {
            int mt = M - m0 < 4 ? M - m0 : 4;
            ROWS_FN[mt](fmt, codes, scales, mins, xq, dx, xs, y, N, K, n, m0);
        }
}

#else /* portable: the same integer dot products, one block at a time */

/* a row's codes, one byte each, in element order */
static void unpack_row(int fmt, const uint8_t *row, int K, uint8_t *u) {
    if (fmt == Q8_0) {
        memcpy(u, row, K);
        return;
    }
    for (int g = 0; g * 128 < K; g++) { /* a group: element j in the low nibble of byte j, j + half in the high */
        int half = (K - g * 128 < 128 ? K - g * 128 : 128) / 2;
        const uint8_t *bytes = row + g * 64;
        uint8_t *lo = u + g * 128, *hi = lo + half;
        for (int j = 0; j < half; j++) {
            lo[j] = bytes[j] & 15;
            hi[j] = bytes[j] >> 4;
        }
    }
}

static void products(int fmt, const uint8_t *codes, const uint16_t *scales, const uint16_t *mins, const int8_t *xq,
                     const float *dx, const float *xs, float *y, int M, int N, int K) {
    int nb = K / QK;
    long rb = row_bytes(fmt, K);
    #pragma omp parallel for schedule(static, 16)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = codes + (long)n * rb;
        uint8_t u[K]; /* this row's codes, unpacked once for every row of x */
        unpack_row(fmt, row, K, u);
        for (int m = 0; m < M; m++) {
            const int8_t *xm = xq + (long)m * K;
            float s = 0.0f;
            for (int b = 0; b < nb; b++) {
                int dot = 0;
                for (int i = 0; i < QK; i++) dot += (int)u[b * QK + i] * (int)xm[b * QK + i];
                float d = half_to_float(scales[(long)n * nb + b]);
                float mn = fmt == Q4_1 ? half_to_float(mins[(long)n * nb + b]) : 0.0f;
                s += d * ((float)dot * dx[m * nb + b]) + offset_of(fmt, d, mn) * xs[m * nb + b];
            }
            y[(long)m * N + n] = s;
        }
    }
}
#endif

/* y (M, N) float32 = x (M, K) float32 @ dequant(w)^T + bias (N) float32 or NULL, activations quantized to 8 bits
 * per block.  Any M: rows go MAX_M at a time (quantized into stack buffers of MAX_M rows), each row computed
 * exactly as it would be alone, so a batch gives every row the result of a single-row call.  Returns 0, or 2 for
 * arguments out of range. */
int kv_qlinear(const float *x, const uint8_t *codes, const uint16_t *scales, const uint16_t *mins, int fmt,
               const float *bias, float *y, int M, int N, int K) {
    if (M < 1 || N < 1 || K < CHUNK || K % CHUNK || fmt < Q8_0 || fmt > Q4_1) return 2;
    if (fmt == Q4_1 && !mins) return 2;
    int nb = K / QK;
    int8_t xq[MAX_M * K];
    float dx[MAX_M * nb], xs[MAX_M * nb];
    for (int m0 = 0; m0 < M; m0 += MAX_M) {
        int mt = M - m0 < MAX_M ? M - m0 : MAX_M;
        quantize_rows(x + (long)m0 * K, mt, K, xq, dx, xs);
        products(fmt, codes, scales, mins, xq, dx, xs, y + (long)m0 * N, mt, N, K);
    }
    if (bias)
        for (long m = 0; m < M; m++)
            for (int n = 0; n < N; n++) y[m * N + n] += bias[n];
    return 0;
}

/* rows[i] of w, dequantized to float32, into out (count, K): w = d * u + c exactly as stored.  idx NULL: the rows
 * first .. first + count - 1.  Returns 0, or 2 for arguments out of range. */
int kv_qdequant(const uint8_t *codes, const uint16_t *scales, const uint16_t *mins, int fmt, const int64_t *idx,
                long first, long count, int K, float *out) {
    if (count < 0 || K < CHUNK || K % CHUNK || fmt < Q8_0 || fmt > Q4_1 || (fmt == Q4_1 && !mins)) return 2;
    int nb = K / QK;
    long rb = row_bytes(fmt, K);
    #pragma omp parallel for schedule(static) if (count * (long)K > 65536)
    for (long i = 0; i < count; i++) {
        long n = idx ? idx[i] : first + i;
        const uint8_t *row = codes + n * rb;
        float *o = out + i * K, d[nb], c[nb];
        for (int b = 0; b < nb; b++) {
            d[b] = half_to_float(scales[n * nb + b]);
            c[b] = offset_of(fmt, d[b], fmt == Q4_1 ? half_to_float(mins[n * nb + b]) : 0.0f);
        }
        if (fmt == Q8_0) {
            for (int k = 0; k < K; k++) o[k] = d[k / QK] * (float)row[k] + c[k / QK];
            continue;
        }
        for (int g = 0; g * 128 < K; g++) { /* a group: element j in the low nibble of byte j, j + half in the high */
            int half = (K - g * 128 < 128 ? K - g * 128 : 128) / 2, k0 = g * 128;
            for (int j = 0; j < half; j++) {
                uint8_t byte = row[g * 64 + j];
                int lo = k0 + j, hi = k0 + half + j;
                o[lo] = d[lo / QK] * (float)(byte & 15) + c[lo / QK];
                o[hi] = d[hi / QK] * (float)(byte >> 4) + c[hi / QK];
            }
        }
    }
    return 0;
}
