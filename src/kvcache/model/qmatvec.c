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
 * Without AVX512-VNNI the same arithmetic runs as plain C the compiler vectorises (AVX2 or SSE); both give the
 * same integer dot products, so they agree to float rounding.  kv_qdequant widens rows to float32 (the
 * embedding lookup and the float-activation mode that matches the dequantized model).
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

/* the code of element k of a row */
static inline int code_at(int fmt, const uint8_t *row, int K, int k) {
    if (fmt == Q8_0) return row[k];
    int g = k / 128, group = K - g * 128 < 128 ? K - g * 128 : 128, j = k - g * 128, half = group / 2;
    uint8_t byte = row[g * 64 + (j < half ? j : j - half)];
    return j < half ? byte & 15 : byte >> 4;
}

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

#else /* portable: the same integer dot products, one block at a time */

static void products(int fmt, const uint8_t *codes, const uint16_t *scales, const uint16_t *mins, const int8_t *xq,
                     const float *dx, const float *xs, float *y, int M, int N, int K) {
    int nb = K / QK;
    long rb = row_bytes(fmt, K);
    #pragma omp parallel for schedule(static, 16)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = codes + (long)n * rb;
        uint8_t u[K]; /* this row's codes, unpacked once for every row of x */
        for (int k = 0; k < K; k++) u[k] = (uint8_t)code_at(fmt, row, K, k);
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
