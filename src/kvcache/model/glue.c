/* The small float32 steps of a decoder layer between its matmuls, one call each instead of several PyTorch ops:
 * a decoding step runs ~10 of them per layer on a few hundred floats, so what they cost is the dispatch, not the
 * arithmetic (docs/benchmarks.md, "The rest of the step").
 *
 *   kv_rmsnorm      y = x / sqrt(mean(x^2) + eps) * w, optionally after the residual add h = x + delta
 *   kv_rope_rows    queries and keys rotated in place, straight in the fused QKV projection's output
 *   kv_silu_mul     silu(gate) * up from the fused gate/up projection
 *
 * Every row is computed alone, by one thread, in the same order whatever the number of rows, so a row of a batch
 * gets exactly its single-row result (the engine's rows equal generate's).  Rows are split over the OpenMP threads
 * only when there are many (prefill); a decoding step's one row stays on the calling thread.  Plain C99 the
 * compiler vectorises; the sums of squares are float32 in 16 interleaved partial sums.
 */
#include <math.h>
#include <stddef.h>

#define PARALLEL_ROWS 64 /* below this many rows the OpenMP fork costs more than it saves */
#define LANES 16

static float mean_square(const float *x, int dim) {
    float part[LANES] = {0};
    int i = 0;
    for (; i + LANES <= dim; i += LANES)
        for (int j = 0; j < LANES; j++) part[j] += x[i + j] * x[i + j];
    float s = 0.0f;
    for (int j = 0; j < LANES; j++) s += part[j];
    for (; i < dim; i++) s += x[i] * x[i];
    return s / (float)dim;
}

/* rows of dim floats: h = x + delta (delta NULL: h = x, h may be NULL then), y = h / sqrt(mean(h^2) + eps) * w.
 * Returns 0, or 2 for arguments out of range. */
int kv_rmsnorm(const float *x, const float *delta, const float *w, float eps, float *h, float *y, long rows,
               int dim) {
    if (rows < 0 || dim < 1 || (delta && !h)) return 2;
    #pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *yr = y + r * dim;
        if (delta) {
            float *hr = h + r * dim;
            const float *dr = delta + r * dim;
            for (int i = 0; i < dim; i++) hr[i] = xr[i] + dr[i];
            xr = hr;
        }
        float inv = 1.0f / sqrtf(mean_square(xr, dim) + eps);
        for (int i = 0; i < dim; i++) yr[i] = xr[i] * inv * w[i];
    }
    return 0;
}

/* x: rows of `heads` vectors of dim floats (row r at x + r * row_stride), each rotated in place by its row's
 * angles: x_j cos_j + x_(j + dim/2 mod dim) sin'_j, with rotate-half's sign folded into sin' (the first half
 * negated), the tables' row r % table_rows.  Returns 0, or 2 for arguments out of range. */
int kv_rope_rows(float *x, long rows, long row_stride, int heads, int dim, const float *cos, const float *sin,
                 long table_rows) {
    if (rows < 0 || heads < 1 || dim < 2 || dim % 2 || table_rows < 1 || row_stride < (long)heads * dim) return 2;
    int half = dim / 2;
    #pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (long r = 0; r < rows; r++) {
        const float *c = cos + (r % table_rows) * dim, *s = sin + (r % table_rows) * dim;
        for (int hd = 0; hd < heads; hd++) {
            float *v = x + r * row_stride + (long)hd * dim;
            for (int i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * c[i] + b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
    return 0;
}

/* gate_up: rows of 2 * width floats (gate, then up); out (rows, width) = gate * sigmoid(gate) * up.
 * Returns 0, or 2 for arguments out of range. */
int kv_silu_mul(const float *gate_up, float *out, long rows, int width) {
    if (rows < 0 || width < 1) return 2;
    #pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (long r = 0; r < rows; r++) {
        const float *g = gate_up + r * 2 * width, *u = g + width;
        float *o = out + r * width;
        for (int i = 0; i < width; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
    return 0;
}
