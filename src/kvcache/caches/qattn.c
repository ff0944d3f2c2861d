/* Decode attention straight over a group-wise quantized KV cache (kvcache.caches.quantized).
 *
 * One query token per sequence; every KV head's group of query heads is served
 * by one pass over that head's stored codes.  Keys are stored in tiles of 16
 * tokens, channel-major, so a tile's 16 scores are built with vertical SIMD
 * (no horizontal sum per token); values are token-major rows.  Scales and offsets are folded
 * into the dot products (no dequantized copy): a key's score is
 *   per-token groups:   sum_g scale_g * (q_g . code_g) + offset_g * sum(q_g)
 *   per-channel groups: (q * scale_block) . code + q . offset_block
 * and a value row adds (p * scale_g) * code + p * offset_g.  The work is split
 * over (sequence, KV head, token chunk) items run by OpenMP threads (the same
 * libgomp PyTorch loads); each item leaves a softmax partial (max, sum,
 * unnormalised output) and the partials are combined at the end, together with
 * those of the full-precision sinks and residual: one call, the final output.
 * int4 and the kernel need head_dim and the groups to be multiples of 16 (else Python uses the reference).
 * Storage is either contiguous per sequence (the single-stream cache: row b's tokens are tiles 0, 1, ... of
 * row b) or a paged pool shared by every sequence (the engine: one storage row per KV head, and each
 * sequence's logical tile t is physical tile tiles[b][t] -- a 16-token block is one tile).
 * Built at first use with gcc (kvcache/caches/kernels.py); the PyTorch
 * reference in quant_ops.py computes the same thing and the tests compare them.
 *
 * kv_paged_decode does the same for the engine's full-precision paged pool: each sequence's keys are
 * read in place through its block table (no gathered copy), only the positions its attention sees
 * (a sliding window and its sinks), in the same items and partials.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 256
#define TILE 16 /* keys are stored in tiles of 16 tokens, channel-major: codes[channel][token] */

#if defined(__FLT16_MAX__)
static inline float half_to_float(uint16_t h) {
    _Float16 f;
    memcpy(&f, &h, sizeof f);
    return (float)f;
}
#else
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#endif

/* exp(x) for x <= 0 (scores minus their maximum): 2^n * 2^f with |f| <= 1/2 and a degree-7 Taylor
 * polynomial (relative error < 1e-8); unlike libm's expf it vectorizes, and the softmax needs one per key. */
static inline __attribute__((always_inline)) float exp_nonpositive(float x) {
    x = x > -87.0f ? x : -87.0f;
    const float t = x * 1.4426950408889634f, n = rintf(t), f = t - n;
    float p = 1.5252733804059841e-5f;
    p = p * f + 1.5403530393381609e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

/* 8 floats: GCC vector extensions, lowered to AVX2 / AVX-512 / SSE by -march=native (no intrinsics) */
typedef float v8f __attribute__((vector_size(32)));
typedef uint8_t v8u __attribute__((vector_size(8)));
typedef int32_t v8i __attribute__((vector_size(32)));
#if defined(__AVX2__)
#include <immintrin.h>
/* 8 bytes -> 8 floats: vpmovzxbd + vcvtdq2ps (GCC's generic lowering extracts bytes one by one) */
static inline __attribute__((always_inline)) v8f to_floats(v8u c) {
    __m128i bytes;
    memcpy(&bytes, &c, 8);
    return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}
#else
static inline v8f to_floats(v8u c) { return __builtin_convertvector(__builtin_convertvector(c, v8i), v8f); }
#endif
#define TO_FLOATS(c) to_floats(c)
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include "paged_avx512.h"
#endif

/* codes of one value row -> floats.  int4 comes out permuted within each run of 16 channels (the 8 even
 * channels, then the 8 odd ones); run_item un-permutes its output once at the end. */
static inline __attribute__((always_inline)) void unpack_row(const uint8_t *row, int bits, int dim, float *out) {
    v8f *o = (v8f *)out;
    v8u c;
    if (bits == 8) {
        for (int i = 0; i < dim / 8; i++) {
            memcpy(&c, row + 8 * i, 8);
            o[i] = TO_FLOATS(c);
        }
    } else {
        for (int i = 0; i < dim / 16; i++) {
            memcpy(&c, row + 8 * i, 8);
            o[2 * i] = TO_FLOATS(c & 15);
            o[2 * i + 1] = TO_FLOATS(c >> 4);
        }
    }
}

/* one key tile (channel-major) -> tf[channel][2] vectors of 8 tokens each */
static inline __attribute__((always_inline)) void unpack_tile(const uint8_t *tile, int bits, int dim, v8f *tf) {
    if (bits == 8) {
        for (int i = 0; i < dim * 2; i++) {
            v8u c;
            memcpy(&c, tile + 8 * i, 8);
            tf[i] = TO_FLOATS(c);
        }
    } else {
        for (int p = 0; p < dim / 2; p++)
            for (int h = 0; h < 2; h++) {
                v8u c;
                memcpy(&c, tile + p * TILE + 8 * h, 8);
                tf[(2 * p) * 2 + h] = TO_FLOATS(c & 15);
                tf[(2 * p + 1) * 2 + h] = TO_FLOATS(c >> 4);
            }
    }
}

typedef struct {
    const float *q;            /* (B, H, G, D), scaled */
    const uint8_t *kc, *vc;    /* keys (S, H, cap/TILE, D*bits/8, TILE); values (S, H, cap, D*bits/8) */
    const uint16_t *ks, *ko;   /* per token (S, H, cap/TILE, D/kgroup, TILE) | per channel (S, H, cap/kgroup, D) */
    const uint16_t *vs, *vo;   /* (S, H, cap, D/vgroup); S = B contiguous, 1 paged */
    const int32_t *tiles;      /* paged: (B, max_tiles) physical tile of each logical tile; NULL: contiguous */
    int batch, heads, qgroup, dim, cap, bits, kgroup, vgroup, key_per_channel, max_tiles;
} Args;

/* where (sequence b, KV head h)'s logical tile t is stored: its storage row and physical tile */
static inline size_t storage_row(const Args *a, int bh) { return a->tiles ? (size_t)(bh % a->heads) : (size_t)bh; }
static inline int physical_tile(const Args *a, int bh, int t) {
    return a->tiles ? a->tiles[(size_t)(bh / a->heads) * a->max_tiles + t] : t;
}

/* Query-side terms that depend on the queries and scales only: per-token groups need sum(q_g) per group;
 * per-channel blocks fold the block's scales into the queries (qs = q * scale) and offsets into one bias. */
typedef struct {
    float qs[64 * 128], bias[64], qsum[64 * 16];
    int block;
} QueryTerms;

/* sum over channels d in [d0, d1) of q[d] * (the tile's 16 tokens of channel d), as two vectors of 8 tokens.
 * The hot loop of the key scores: an FMA chain per accumulator waits out the FMA latency (4-5 cycles), so
 * four interleaved pairs of accumulators keep the FMA units busy; d1 - d0 is a multiple of 4 (16 at least). */
static inline __attribute__((always_inline)) void channel_dots(const float *q, const v8f *tf, int d0, int d1,
                                                                v8f *out0, v8f *out1) {
    v8f a0[4] = {{0}}, a1[4] = {{0}};
    for (int d = d0; d < d1; d += 4)
        for (int u = 0; u < 4; u++) {
            a0[u] += q[d + u] * tf[2 * (d + u)];
            a1[u] += q[d + u] * tf[2 * (d + u) + 1];
        }
    *out0 = (a0[0] + a0[1]) + (a0[2] + a0[3]);
    *out1 = (a1[0] + a1[1]) + (a1[2] + a1[3]);
}

/* Scores of the G query heads for the tokens of one tile: s[g * TILE + l], l < TILE. */
static inline __attribute__((always_inline)) void tile_scores(const Args *a, size_t srow, int tile, const float *q,
                                                               QueryTerms *qt, float *s, const int D,
                                                               const int group) {
    const int G = a->qgroup, cw = D * a->bits / 8;
    v8f tf[D * 2];
    unpack_tile(a->kc + (srow * (a->cap / TILE) + tile) * cw * TILE, a->bits, D, tf);
    if (a->key_per_channel) {
        const int block = tile * TILE / group;
        if (block != qt->block) {
            const size_t at = (srow * (a->cap / group) + block) * D;
            for (int g = 0; g < G; g++) {
                float bias = 0.f;
                for (int d = 0; d < D; d++) {
                    qt->qs[g * D + d] = q[g * D + d] * half_to_float(a->ks[at + d]);
                    bias += q[g * D + d] * half_to_float(a->ko[at + d]);
                }
                qt->bias[g] = bias;
            }
            qt->block = block;
        }
        for (int g = 0; g < G; g++) {
            v8f acc0, acc1;
            channel_dots(qt->qs + g * D, tf, 0, D, &acc0, &acc1);
            for (int l = 0; l < 8; l++) {
                s[g * TILE + l] = acc0[l] + qt->bias[g];
                s[g * TILE + 8 + l] = acc1[l] + qt->bias[g];
            }
        }
    } else {
        const int ng = D / group;
        const uint16_t *ks = a->ks + (srow * (a->cap / TILE) + tile) * ng * TILE;
        const uint16_t *ko = a->ko + (srow * (a->cap / TILE) + tile) * ng * TILE;
        v8f sc[ng * 2], of[ng * 2];
        for (int i = 0; i < ng * 2; i++)
            for (int l = 0; l < 8; l++) {
                sc[i][l] = half_to_float(ks[8 * i + l]);
                of[i][l] = half_to_float(ko[8 * i + l]);
            }
        for (int g = 0; g < G; g++) {
            v8f tot0 = {0}, tot1 = {0};
            for (int j = 0; j < ng; j++) {
                v8f acc0, acc1;
                channel_dots(q + g * D, tf, j * group, (j + 1) * group, &acc0, &acc1);
                const float qsum = qt->qsum[g * ng + j];
                tot0 += sc[2 * j] * acc0 + of[2 * j] * qsum;
                tot1 += sc[2 * j + 1] * acc1 + of[2 * j + 1] * qsum;
            }
            for (int l = 0; l < 8; l++) {
                s[g * TILE + l] = tot0[l];
                s[g * TILE + 8 + l] = tot1[l];
            }
        }
    }
}

/* One (sequence, KV head, chunk) item: partial over logical tokens [t0, t1) for the G query heads
 * (t0 % TILE == 0); ``group`` is the value group and, with per-token keys, the key group too (the caller
 * checks they are equal, so the key loops stay unrolled); per-channel key blocks are a->kgroup tokens. */
static inline __attribute__((always_inline)) void run_item(const Args *a, int bh, int t0, int t1, float *part,
                                                            const int D, const int group) {
    /* part: G * (D + 2) floats */
    const int G = a->qgroup, cw = D * a->bits / 8, ng = D / group, n = t1 - t0;
    const int kg = a->key_per_channel ? a->kgroup : group, nkg = a->key_per_channel ? 1 : D / kg;
    const size_t srow = storage_row(a, bh);
    const float *q = a->q + (size_t)bh * G * D;
    const uint8_t *vc = a->vc + srow * a->cap * cw;
    float scores[G * CHUNK];
    QueryTerms qt;
    qt.block = -1;
    for (int g = 0; g < G; g++)
        for (int j = 0; j < nkg; j++) {
            float sum = 0.f;
            for (int d = 0; d < D / nkg; d++) sum += q[g * D + j * (D / nkg) + d];
            qt.qsum[g * nkg + j] = sum;
        }
    for (int t = t0; t < t1; t += TILE) {
        float s[G * TILE];
        tile_scores(a, srow, physical_tile(a, bh, t / TILE), q, &qt, s, D, kg);
        for (int g = 0; g < G; g++)
            for (int l = 0; l < TILE && t + l < t1; l++) scores[g * n + (t - t0) + l] = s[g * TILE + l];
    }
    /* softmax partial per query head */
    for (int g = 0; g < G; g++) {
        float m = -INFINITY, l = 0.f;
        for (int i = 0; i < n; i++) m = scores[g * n + i] > m ? scores[g * n + i] : m;
        for (int i = 0; i < n; i++) {
            float e = exp_nonpositive(scores[g * n + i] - m);
            scores[g * n + i] = e;
            l += e;
        }
        float *p = part + (size_t)g * (D + 2);
        p[0] = m;
        p[1] = l;
        memset(p + 2, 0, sizeof(float) * D);
    }
    /* values (token-major rows), 16 at a time: out += (p * scale) * code, plus sum(p * offset) per group */
    const uint16_t *vs = a->vs + srow * a->cap * ng, *vo = a->vo + srow * a->cap * ng;
    for (int t = t0; t < t1; t += TILE) {
        const int nt = t1 - t < TILE ? t1 - t : TILE, at = physical_tile(a, bh, t / TILE) * TILE;
        float vf[TILE * D] __attribute__((aligned(32))), vsc[ng * TILE], vof[ng * TILE]; /* scales [group][token] */
        for (int l = 0; l < TILE; l++) /* a partial last tile: zero weights for the missing tokens */
            for (int j = 0; j < ng; j++) vsc[j * TILE + l] = vof[j * TILE + l] = 0.f;
        for (int l = 0; l < nt; l++) {
            unpack_row(vc + (size_t)(at + l) * cw, a->bits, D, vf + l * D);
            for (int j = 0; j < ng; j++) {
                vsc[j * TILE + l] = half_to_float(vs[(size_t)(at + l) * ng + j]);
                vof[j * TILE + l] = half_to_float(vo[(size_t)(at + l) * ng + j]);
            }
        }
        for (int g = 0; g < G; g++) {
            float pe[TILE] = {0};
            for (int l = 0; l < nt; l++) pe[l] = scores[g * n + (t - t0) + l];
            float *out = part + (size_t)g * (D + 2) + 2;
            for (int j = 0; j < ng; j++) {
                float acc[group], odd[group], ps[TILE], bias = 0.f;
                for (int l = 0; l < TILE; l++) { /* vectorised over the tile's tokens: no serial chain */
                    ps[l] = pe[l] * vsc[j * TILE + l];
                    bias += pe[l] * vof[j * TILE + l];
                }
                for (int d = 0; d < group; d++) {
                    acc[d] = out[j * group + d];
                    odd[d] = 0.f;
                }
                /* the hot loop of the values: even and odd tokens in separate accumulators, two FMA chains
                 * per vector of output, so the FMA latency is hidden */
                int l = 0;
                for (; l + 1 < nt; l += 2)
                    for (int d = 0; d < group; d++) {
                        acc[d] += ps[l] * vf[l * D + j * group + d];
                        odd[d] += ps[l + 1] * vf[(l + 1) * D + j * group + d];
                    }
                if (l < nt)
                    for (int d = 0; d < group; d++) acc[d] += ps[l] * vf[l * D + j * group + d];
                for (int d = 0; d < group; d++) out[j * group + d] = (acc[d] + odd[d]) + bias;
            }
        }
    }
    if (a->bits == 4) /* back from the (even, odd) order of unpack_row */
        for (int g = 0; g < G; g++) {
            float *out = part + (size_t)g * (D + 2) + 2, tmp[16];
            for (int r = 0; r < D; r += 16) {
                memcpy(tmp, out + r, sizeof tmp);
                for (int p = 0; p < 8; p++) {
                    out[r + 2 * p] = tmp[p];
                    out[r + 2 * p + 1] = tmp[8 + p];
                }
            }
        }
}

/* run_item with head_dim and group known at compile time for the common shapes (unrolled loops) */
typedef void (*ItemFn)(const Args *, int, int, int, float *);
#define SPECIALISE(DIM, GROUP) \
    static void item_##DIM##_##GROUP(const Args *a, int bh, int t0, int t1, float *part) { \
        run_item(a, bh, t0, t1, part, DIM, GROUP); \
    }
SPECIALISE(64, 16)
SPECIALISE(64, 32)
SPECIALISE(64, 64)
SPECIALISE(128, 32)
SPECIALISE(128, 64)
SPECIALISE(128, 128)
static void item_any(const Args *a, int bh, int t0, int t1, float *part) {
    run_item(a, bh, t0, t1, part, a->dim, a->vgroup);
}

static ItemFn pick(int dim, int group) {
    if (dim == 64 && group == 16) return item_64_16;
    if (dim == 64 && group == 32) return item_64_32;
    if (dim == 64 && group == 64) return item_64_64;
    if (dim == 128 && group == 32) return item_128_32;
    if (dim == 128 && group == 64) return item_128_64;
    if (dim == 128 && group == 128) return item_128_128;
    return item_any;
}

/* Partial over full-precision tokens [t0, t1) of one (sequence, KV head): fk/fv rows (B, H, fcap, D). */
static void run_full_item(const float *q, const float *fk, const float *fv, int G, int D, int t0, int t1,
                          float *part) {
    const int n = t1 - t0;
    float scores[G * CHUNK];
    for (int t = t0; t < t1; t++)
        for (int g = 0; g < G; g++) {
            float acc = 0.f;
            for (int d = 0; d < D; d++) acc += q[g * D + d] * fk[(size_t)t * D + d];
            scores[g * n + (t - t0)] = acc;
        }
    for (int g = 0; g < G; g++) {
        float m = -INFINITY, l = 0.f, *p = part + (size_t)g * (D + 2), *o = p + 2;
        for (int i = 0; i < n; i++) m = scores[g * n + i] > m ? scores[g * n + i] : m;
        memset(o, 0, sizeof(float) * D);
        for (int i = 0; i < n; i++) {
            const float e = exp_nonpositive(scores[g * n + i] - m), *row = fv + (size_t)(t0 + i) * D;
            l += e;
            for (int d = 0; d < D; d++) o[d] += e * row[d];
        }
        p[0] = m;
        p[1] = l;
    }
}

static void empty_partial(float *part, int G, int D) {
    for (int g = 0; g < G; g++) {
        float *p = part + (size_t)g * (D + 2);
        p[0] = -INFINITY;
        p[1] = 0.f;
        memset(p + 2, 0, sizeof(float) * D);
    }
}

static int max_of(const int32_t *x, int n) {
    int m = 0;
    for (int i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* Combine each (sequence, KV head)'s ``chunks`` partials (max, sum, unnormalised output of width D) into
 * the normalised output (B*H, G, D). */
static void merge_parts(const float *parts, int rows, int chunks, int qgroup, int dim, float *out) {
    const int width = dim + 2;
    for (int bh = 0; bh < rows; bh++)
        for (int g = 0; g < qgroup; g++) {
            float m = -INFINITY;
            for (int c = 0; c < chunks; c++) {
                const float mc = parts[((size_t)(bh * chunks + c) * qgroup + g) * width];
                m = mc > m ? mc : m;
            }
            float l = 0.f, *o = out + ((size_t)bh * qgroup + g) * dim;
            memset(o, 0, sizeof(float) * dim);
            for (int c = 0; c < chunks; c++) {
                const float *p = parts + ((size_t)(bh * chunks + c) * qgroup + g) * width;
                float w = p[0] == -INFINITY ? 0.f : exp_nonpositive(p[0] - m);
                l += p[1] * w;
                for (int d = 0; d < dim; d++) o[d] += p[2 + d] * w;
            }
            const float inv = l > 0.f ? 1.f / l : 0.f;
            for (int d = 0; d < dim; d++) o[d] *= inv;
        }
}

/* Decode attention of q (B, H, G, D), already scaled, over counts[b] stored tokens and fcounts[b] full-precision
 * ones per sequence (fk/fv: (B, H, fcap, D), the sinks, residual or block being filled; NULL if none), with
 * storage contiguous (tiles NULL) or paged (tiles: (B, max_tiles) physical tiles): the normalised output. */
int kv_quant_decode(const float *q, const uint8_t *kc, const uint16_t *ks, const uint16_t *ko,
                    const uint8_t *vc, const uint16_t *vs, const uint16_t *vo, int batch, int heads, int qgroup,
                    int dim, int cap, int bits, int kgroup, int vgroup, int key_per_channel, const int32_t *tiles,
                    int max_tiles, const int32_t *counts, const float *fk, const float *fv, const int32_t *fcounts,
                    int fcap, float *out) {
    Args a = {q, kc, vc, ks, ko, vs, vo, tiles, batch, heads, qgroup, dim, cap, bits, kgroup, vgroup,
              key_per_channel, max_tiles};
    const int qchunks = (max_of(counts, batch) + CHUNK - 1) / CHUNK;
    const int fchunks = fk ? (max_of(fcounts, batch) + CHUNK - 1) / CHUNK : 0;
    const int chunks = qchunks + fchunks, items = batch * heads * chunks, width = dim + 2;
    if (items == 0) return 2;
    float *parts = malloc(sizeof(float) * (size_t)items * qgroup * width);
    if (!parts) return 1;
    const ItemFn item = pick(dim, vgroup);
#pragma omp parallel for schedule(static)
    for (int it = 0; it < items; it++) {
        const int bh = it / chunks, c = it % chunks, b = bh / heads;
        float *part = parts + (size_t)it * qgroup * width;
        if (c < qchunks) {
            const int t0 = c * CHUNK, t1 = t0 + CHUNK < counts[b] ? t0 + CHUNK : counts[b];
            if (t0 < t1) item(&a, bh, t0, t1, part);
            else empty_partial(part, qgroup, dim);
        } else {
            const int t0 = (c - qchunks) * CHUNK, t1 = t0 + CHUNK < fcounts[b] ? t0 + CHUNK : fcounts[b];
            if (t0 < t1)
                run_full_item(q + (size_t)bh * qgroup * dim, fk + (size_t)bh * fcap * dim,
                              fv + (size_t)bh * fcap * dim, qgroup, dim, t0, t1, part);
            else empty_partial(part, qgroup, dim);
        }
    }
    merge_parts(parts, batch * heads, chunks, qgroup, dim, out);
    free(parts);
    return 0;
}

/* Partial of one (sequence b, KV head h) over its visible tokens with visible index in [i0, i1): index i is
 * position i below s0 (the sinks), else position start + (i - s0).  Keys k (H, slots, D) and values v
 * (H, slots, vstride; the first VD channels are read) in place, through the sequence's block table.
 * Positions walk block by block (no division per token); D and VD are compile-time in the common shapes. */
static inline __attribute__((always_inline)) void paged_item(const float *qin, float scale, const float *k,
                                                             const float *v, long slots, const int32_t *table,
                                                             int bs, int s0, int start, int i0, int i1, int h,
                                                             int G, const int D, const int VD, int vstride,
                                                             float *part) {
    const int n = i1 - i0;
    float scores[G * CHUNK], q[G * D];
    for (int i = 0; i < G * D; i++) q[i] = qin[i] * scale;
    const float *kh = k + (size_t)h * slots * D, *vh = v + (size_t)h * slots * vstride;
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    if (D % 16 == 0 && VD % 16 == 0) { /* paged_avx512.h: the same two passes with register-blocked loops */
        for (int i = i0; i < i1;) {
            const int pos = i < s0 ? i : start + (i - s0), blk = pos / bs, off = pos - blk * bs;
            int run = bs - off, left = (i < s0 ? s0 : i1) - i;
            run = run < left ? run : left;
            run = run < i1 - i ? run : i1 - i;
            const float *key = kh + ((size_t)table[blk] * bs + off) * D;
            prefetch_next(kh, D, table, bs, s0, start, i + run, i1);
            for (int t = 0; t < run; t += 16)
                score16(q, key + (size_t)t * D, run - t < 16 ? run - t : 16, G, D, scores, n, i - i0 + t);
            i += run;
        }
        for (int g = 0; g < G; g++) softmax_part(scores + (size_t)g * n, n, part + (size_t)g * (VD + 2));
        values_avx512(vh, vstride, table, bs, s0, start, i0, i1, scores, n, G, VD, part);
        return;
    }
#endif
    for (int pass = 0; pass < 2; pass++) {  /* pass 0: scores; pass 1: values */
        if (pass == 1)
            for (int g = 0; g < G; g++) {
                float m = -INFINITY, *p = part + (size_t)g * (VD + 2);
                for (int i = 0; i < n; i++) m = scores[g * n + i] > m ? scores[g * n + i] : m;
                for (int i = 0; i < n; i++) scores[g * n + i] = exp_nonpositive(scores[g * n + i] - m);
                float l = 0.f;
                for (int i = 0; i < n; i++) l += scores[g * n + i];
                p[0] = m;
                p[1] = l;
                memset(p + 2, 0, sizeof(float) * VD);
            }
        int i = i0;
        while (i < i1) {  /* one run of consecutive positions inside one block per iteration */
            const int pos = i < s0 ? i : start + (i - s0), blk = pos / bs, off = pos - blk * bs;
            int run = bs - off, left = (i < s0 ? s0 : i1) - i;
            run = run < left ? run : left;
            run = run < i1 - i ? run : i1 - i;
            const size_t slot = (size_t)table[blk] * bs + off;
            for (int t = 0; t < run; t++) {
                const int col = i - i0 + t;
                if (pass == 0) {
                    const float *key = kh + (slot + t) * D;
                    for (int g = 0; g < G; g++) {
                        float acc = 0.f;
                        for (int d = 0; d < D; d++) acc += q[g * D + d] * key[d];
                        scores[g * n + col] = acc;
                    }
                } else {
                    const float *row = vh + (slot + t) * vstride;
                    for (int g = 0; g < G; g++) {
                        float *o = part + (size_t)g * (VD + 2) + 2;
                        const float e = scores[g * n + col];
                        for (int d = 0; d < VD; d++) o[d] += e * row[d];
                    }
                }
            }
            i += run;
        }
    }
}

typedef void (*PagedFn)(const float *, float, const float *, const float *, long, const int32_t *, int, int, int,
                        int, int, int, int, int, int, int, float *);
#define PAGED(DIM, VDIM) \
    static void paged_##DIM##_##VDIM(const float *q, float sc, const float *k, const float *v, long slots, \
                                     const int32_t *t, int bs, int s0, int st, int i0, int i1, int h, int G, \
                                     int D, int VD, int vs, float *part) { \
        (void)D; (void)VD; \
        paged_item(q, sc, k, v, slots, t, bs, s0, st, i0, i1, h, G, DIM, VDIM, vs, part); \
    }
PAGED(64, 64)
PAGED(128, 128)
PAGED(576, 512)
static void paged_any(const float *q, float sc, const float *k, const float *v, long slots, const int32_t *t, int bs,
                      int s0, int st, int i0, int i1, int h, int G, int D, int VD, int vs, float *part) {
    paged_item(q, sc, k, v, slots, t, bs, s0, st, i0, i1, h, G, D, VD, vs, part);
}

/* Decode attention of q (B, H, G, D) times ``scale`` over the engine's paged pool: sequence b attends to
 * positions j < counts[b] with j < sinks[b] or j >= lo[b], token j at slot tables[b][j / bs] * bs + j % bs
 * of k (H, slots, D) and v (H, slots, vstride).  out (B, H, G, VD). */
int kv_paged_decode(const float *q, float scale, const float *k, const float *v, int batch, int heads, int qgroup,
                    int dim, int vdim, int vstride, long slots, const int32_t *tables, int max_blocks, int bs,
                    const int32_t *counts, const int32_t *lo, const int32_t *sinks, float *out) {
    int most = 0;
    for (int b = 0; b < batch; b++) {
        const int s0 = sinks[b] < counts[b] ? sinks[b] : counts[b], start = lo[b] > s0 ? lo[b] : s0;
        const int visible = s0 + (counts[b] > start ? counts[b] - start : 0);
        most = visible > most ? visible : most;
    }
    const int chunks = (most + CHUNK - 1) / CHUNK, items = batch * heads * chunks;
    if (items == 0) return 2;
    float *parts = malloc(sizeof(float) * (size_t)items * qgroup * (vdim + 2));
    if (!parts) return 1;
    const PagedFn item = dim == 64 && vdim == 64 ? paged_64_64 : dim == 128 && vdim == 128 ? paged_128_128
                         : dim == 576 && vdim == 512 ? paged_576_512 : paged_any;
#pragma omp parallel for schedule(static)
    for (int it = 0; it < items; it++) {
        const int bh = it / chunks, c = it % chunks, b = bh / heads, h = bh % heads;
        const int s0 = sinks[b] < counts[b] ? sinks[b] : counts[b], start = lo[b] > s0 ? lo[b] : s0;
        const int visible = s0 + (counts[b] > start ? counts[b] - start : 0);
        const int i0 = c * CHUNK, i1 = i0 + CHUNK < visible ? i0 + CHUNK : visible;
        float *part = parts + (size_t)it * qgroup * (vdim + 2);
        if (i0 < i1)
            item(q + (size_t)bh * qgroup * dim, scale, k, v, slots, tables + (size_t)b * max_blocks, bs, s0, start, i0,
                 i1, h, qgroup, dim, vdim, vstride, part);
        else empty_partial(part, qgroup, vdim);
    }
    merge_parts(parts, batch * heads, chunks, qgroup, vdim, out);
    free(parts);
    for (size_t i = 0; i < (size_t)batch * heads * qgroup * vdim; i++)
        if (!(fabsf(out[i]) <= 3.4028234e38f)) return 3; /* overflowed (inf or nan): the caller recomputes */
    return 0;
}
