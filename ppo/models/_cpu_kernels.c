/* The toolkit's CPU kernels for the elementwise work around the matmuls (ppo/models/cpu_kernels.py).
 *
 * paddle's CPU kernels for these run on one thread and as several passes, each with its own
 * autograd node: RMSNorm (a square, a mean, an rsqrt, two broadcasting multiplies; their
 * gradients), rotary embedding (two broadcasting multiplies, a roll, an add; their gradients) and
 * SwiGLU.  Each is one pass here, forward and backward, over float32 contiguous buffers, split over
 * the threads the caller asks for.
 *
 * Built by `pip install` (setup.py, an optional extension: where it cannot be compiled the toolkit
 * keeps paddle's kernels and says so in one line) and loaded with ctypes, never imported.  No
 * OpenMP library is linked: the caller hands over the GOMP_parallel entry point of the OpenMP
 * runtime the process already runs (paddle's libiomp5, whose threads oneDNN's GEMM uses too), so
 * the kernels share one thread team with the matmuls.
 *
 * Results do not depend on the number of threads: every sum over rows (the norm's weight
 * gradient) is taken over fixed blocks of rows, then over the blocks in order.  (The GEMMs the
 * decode step and the batched products call are the exception: MKL's own blocking, within float
 * rounding.)
 * Compiled without floating-point contraction, so x * c + y * s rounds as paddle's separate ops do;
 * only the sums within a row (the REDUCE helpers) may be reassociated, to run on vector lanes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* the loops also get an AVX2 build, chosen at load time on CPUs that have it */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

/* sums whose order the compiler may change (vector lanes); nothing else is reassociated */
#if defined(__GNUC__) && !defined(__clang__)
#define REDUCE __attribute__((optimize("associative-math", "no-signed-zeros"), noinline))
#else
#define REDUCE
#endif

typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_int_fn)(void);

static gomp_parallel_fn g_parallel = 0;
static omp_int_fn g_thread_num = 0;
static omp_int_fn g_num_threads = 0;

/* The OpenMP runtime's GOMP_parallel, omp_get_thread_num and omp_get_num_threads (NULL: one thread). */
void ppk_init(void *parallel, void *thread_num, void *num_threads) {
    g_parallel = (gomp_parallel_fn)parallel;
    g_thread_num = (omp_int_fn)thread_num;
    g_num_threads = (omp_int_fn)num_threads;
}

/* the entry points' version: ppo/models/kernel_library.py refuses a library built from another one */
int ppk_version(void) { return 5; }

typedef void (*range_fn)(void *ctx, int64_t begin, int64_t end);

typedef struct {
    range_fn body;
    void *ctx;
    int64_t n;
} job_t;

static void job_worker(void *p) {
    job_t *job = (job_t *)p;
    int64_t t = g_thread_num(), nt = g_num_threads();
    int64_t chunk = (job->n + nt - 1) / nt;
    int64_t begin = t * chunk, end = begin + chunk < job->n ? begin + chunk : job->n;
    if (begin < end) job->body(job->ctx, begin, end);
}

/* body(ctx, begin, end) over [0, n), in one static chunk per thread; `work` is the elements per
 * item, so that small calls stay on the calling thread. */
static void parallel_for(int64_t n, int64_t work, int threads, range_fn body, void *ctx) {
    if (threads <= 1 || g_parallel == 0 || n < 2 || n * work < 32768) {
        body(ctx, 0, n);
        return;
    }
    if (threads > n) threads = (int)n;
    job_t job = {body, ctx, n};
    g_parallel(job_worker, &job, (unsigned)threads, 0);
}

/* ---------------------------------------------------------------- row sums */

CLONES REDUCE static float dot2(const float *restrict a, const float *restrict b, int64_t n) {
    float total = 0.0f;
    for (int64_t i = 0; i < n; ++i) total += a[i] * b[i];
    return total;
}

CLONES REDUCE static float dot3(const float *restrict a, const float *restrict b, const float *restrict c, int64_t n) {
    float total = 0.0f;
    for (int64_t i = 0; i < n; ++i) total += (a[i] * b[i]) * c[i];
    return total;
}

CLONES REDUCE static float sum1(const float *restrict a, int64_t n) {
    float total = 0.0f;
    for (int64_t i = 0; i < n; ++i) total += a[i];
    return total;
}

/* ---------------------------------------------------------------- RMSNorm */
/* y = x * r * w with r = 1 / sqrt(mean(x^2) + eps) per row of H; rstd[row] = r when rstd.  With a
 * residual (inference: the residual stream's add and the next norm), x + residual is written to
 * sum and normalised instead of x. */

typedef struct {
    const float *x, *residual, *w;
    float *y, *sum, *rstd;
    int64_t H;
    float eps;
} norm_fwd_t;

CLONES static void norm_fwd_rows(void *p, int64_t begin, int64_t end) {
    norm_fwd_t *a = (norm_fwd_t *)p;
    const int64_t H = a->H;
    for (int64_t row = begin; row < end; ++row) {
        const float *x = a->x + row * H;
        float *y = a->y + row * H;
        if (a->residual) {
            const float *res = a->residual + row * H;
            float *sum = a->sum + row * H;
            for (int64_t i = 0; i < H; ++i) sum[i] = x[i] + res[i];
            x = sum;
        }
        const float r = 1.0f / sqrtf(dot2(x, x, H) / (float)H + a->eps);
        if (a->rstd) a->rstd[row] = r;
        for (int64_t i = 0; i < H; ++i) y[i] = (x[i] * r) * a->w[i];
    }
}

void ppk_rms_norm_forward(const float *x, const float *w, float *y, float *rstd, int64_t rows, int64_t H,
                          float eps, int threads) {
    norm_fwd_t a = {x, 0, w, y, 0, rstd, H, eps};
    parallel_for(rows, H, threads, norm_fwd_rows, &a);
}

void ppk_add_rms_norm(const float *x, const float *residual, const float *w, float *y, float *sum, int64_t rows,
                      int64_t H, float eps, int threads) {
    norm_fwd_t a = {x, residual, w, y, sum, 0, H, eps};
    parallel_for(rows, H, threads, norm_fwd_rows, &a);
}

#define NORM_BLOCK 32 /* rows per partial sum of the weight gradient */

typedef struct {
    const float *g, *x, *w, *rstd;
    float *dx, *partial;
    int64_t rows, H;
} norm_bwd_t;

/* over blocks of NORM_BLOCK rows: dx = r (g w - x_hat mean(g w x_hat)), partial[block] = sum g x_hat */
CLONES static void norm_bwd_blocks(void *p, int64_t begin, int64_t end) {
    norm_bwd_t *a = (norm_bwd_t *)p;
    const int64_t H = a->H;
    for (int64_t block = begin; block < end; ++block) {
        float *part = a->partial ? a->partial + block * H : 0;
        if (part) memset(part, 0, sizeof(float) * H);
        int64_t last = (block + 1) * NORM_BLOCK < a->rows ? (block + 1) * NORM_BLOCK : a->rows;
        for (int64_t row = block * NORM_BLOCK; row < last; ++row) {
            const float *g = a->g + row * H, *x = a->x + row * H;
            const float r = a->rstd[row];
            if (a->dx) {
                const float mean = dot3(g, a->w, x, H) * r / (float)H;
                float *dx = a->dx + row * H;
                for (int64_t i = 0; i < H; ++i) dx[i] = (g[i] * a->w[i] - (x[i] * r) * mean) * r;
            }
            if (part)
                for (int64_t i = 0; i < H; ++i) part[i] += g[i] * (x[i] * r);
        }
    }
}

typedef struct {
    const float *partial;
    float *dw;
    int64_t blocks, H;
} colsum_t;

CLONES static void colsum_columns(void *p, int64_t begin, int64_t end) {
    colsum_t *a = (colsum_t *)p;
    for (int64_t i = begin; i < end; ++i) a->dw[i] = 0.0f;
    for (int64_t b = 0; b < a->blocks; ++b) {
        const float *part = a->partial + b * a->H;
        for (int64_t i = begin; i < end; ++i) a->dw[i] += part[i];
    }
}

/* dx (when dx) and dw (when dw) of the norm, from the saved rstd.  Returns 0, or 1 when out of memory. */
int ppk_rms_norm_backward(const float *g, const float *x, const float *w, const float *rstd, float *dx, float *dw,
                          int64_t rows, int64_t H, int threads) {
    int64_t blocks = (rows + NORM_BLOCK - 1) / NORM_BLOCK;
    float *partial = 0;
    if (dw) {
        partial = (float *)malloc(sizeof(float) * blocks * H);
        if (!partial) return 1;
    }
    norm_bwd_t a = {g, x, w, rstd, dx, partial, rows, H};
    parallel_for(blocks, NORM_BLOCK * H, threads, norm_bwd_blocks, &a);
    if (dw) {
        colsum_t c = {partial, dw, blocks, H};
        parallel_for(H, blocks, threads, colsum_columns, &c);
        free(partial);
    }
    return 0;
}

/* ---------------------------------------------------------------- rotary embedding */
/* x [B, A1, A2, D]; cos, sin [cos_batches, T, D] where the time axis of x is A1 (time_axis 1) or A2
 * (time_axis 2), cos_batches 1 (shared) or B.  With h = D / 2 (D even):
 *   forward   y = x cos + rotate_half(x) sin,  rotate_half(x) = [-x[h:], x[:h]]
 *   backward  dx = g cos - rotate_half(g sin)  = g cos + [ (g sin)[h:], -(g sin)[:h] ]            */

typedef struct {
    const float *x, *cos, *sin;
    float *y;
    int64_t A1, A2, D, T, cos_batch_stride;
    int time_axis, backward, transpose_out;
} rope_t;

CLONES static void rope_rows(void *p, int64_t begin, int64_t end) {
    rope_t *a = (rope_t *)p;
    const int64_t D = a->D, h = D / 2;
    for (int64_t row = begin; row < end; ++row) { /* row = (b * A1 + i1) * A2 + i2 */
        int64_t i2 = row % a->A2, rest = row / a->A2;
        int64_t i1 = rest % a->A1, b = rest / a->A1;
        int64_t t = a->time_axis == 1 ? i1 : i2;
        const float *c = a->cos + b * a->cos_batch_stride + t * D;
        const float *s = a->sin + b * a->cos_batch_stride + t * D;
        const float *x = a->x + row * D;
        float *y = a->y + (a->transpose_out ? (b * a->A2 + i2) * a->A1 + i1 : row) * D;
        if (!a->backward) {
            for (int64_t i = 0; i < h; ++i) y[i] = x[i] * c[i] + (-x[i + h]) * s[i];
            for (int64_t i = h; i < D; ++i) y[i] = x[i] * c[i] + x[i - h] * s[i];
        } else {
            for (int64_t i = 0; i < h; ++i) y[i] = x[i] * c[i] + x[i + h] * s[i + h];
            for (int64_t i = h; i < D; ++i) y[i] = x[i] * c[i] - x[i - h] * s[i - h];
        }
    }
}

/* transpose_out: y is written [B, A2, A1, D] (the attention's [B, heads, S, D] from [B, S, heads, D]) */
void ppk_rope(const float *x, const float *cos, const float *sin, float *y, int64_t B, int64_t A1, int64_t A2,
              int64_t D, int time_axis, int64_t cos_batches, int backward, int transpose_out, int threads) {
    int64_t T = time_axis == 1 ? A1 : A2;
    rope_t a = {x, cos, sin, y, A1, A2, D, T, cos_batches == 1 ? 0 : T * D, time_axis, backward, transpose_out};
    parallel_for(B * A1 * A2, D, threads, rope_rows, &a);
}

/* exp(x) for float32 (Cephes' expf polynomial: relative error within 2e-7 on [-87, 88]), written
 * so that the compiler vectorizes it (no calls; the clamp and the rounding to the nearest integer
 * are arithmetic). */
static inline float exp_approx(float x_in) {
    float x = x_in < -87.0f ? -87.0f : x_in;
    x = x > 88.0f ? 88.0f : x;
    /* round(x / ln 2): truncation of a positive number (x >= -87) is its floor */
    float n = (float)((int32_t)(x * 1.44269504088896341f + 128.5f) - 128);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23; /* 2^n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x_in < -87.0f ? 0.0f : p * scale; /* (below the smallest normal float: 0, as expf rounds it) */
}

/* ---------------------------------------------------------------- attention softmax */
/* p = softmax(scores scale + bias) over the last axis L, scores [B, H, S, L] and bias [B, bias_heads, S, L]
 * (bias_heads 1: shared by the heads); backward ds = p (dp - sum(dp p)) scale.  The attention's
 * 1 / sqrt(head_dim) as scale, the queries need no multiply of their own (scale 1 is exact). */

typedef struct {
    const float *scores, *bias, *p, *dp;
    float *out;
    int64_t H, S, L, bias_heads;
    float scale;
} softmax_t;

CLONES static void softmax_rows(void *p, int64_t begin, int64_t end) {
    softmax_t *a = (softmax_t *)p;
    const int64_t L = a->L;
    for (int64_t row = begin; row < end; ++row) { /* row = (b * H + h) * S + s */
        int64_t s = row % a->S, bh = row / a->S, h = bh % a->H, b = bh / a->H;
        const float *x = a->scores + row * L;
        const float *bias = a->bias + ((b * a->bias_heads + (a->bias_heads == 1 ? 0 : h)) * a->S + s) * L;
        float *out = a->out + row * L;
        float top = -INFINITY;
        for (int64_t i = 0; i < L; ++i) {
            out[i] = x[i] * a->scale + bias[i];
            top = out[i] > top ? out[i] : top;
        }
        for (int64_t i = 0; i < L; ++i) out[i] = exp_approx(out[i] - top);
        const float inv = 1.0f / sum1(out, L);
        for (int64_t i = 0; i < L; ++i) out[i] *= inv;
    }
}

CLONES static void softmax_grad_rows(void *p, int64_t begin, int64_t end) {
    softmax_t *a = (softmax_t *)p;
    const int64_t L = a->L;
    for (int64_t row = begin; row < end; ++row) {
        const float *pr = a->p + row * L, *dp = a->dp + row * L;
        float *ds = a->out + row * L;
        const float dot = dot2(dp, pr, L);
        for (int64_t i = 0; i < L; ++i) ds[i] = (pr[i] * (dp[i] - dot)) * a->scale;
    }
}

void ppk_softmax_bias(const float *scores, const float *bias, float *out, int64_t B, int64_t H, int64_t S, int64_t L,
                      int64_t bias_heads, float scale, int threads) {
    softmax_t a = {scores, bias, 0, 0, out, H, S, L, bias_heads, scale};
    parallel_for(B * H * S, L, threads, softmax_rows, &a);
}

void ppk_softmax_grad(const float *p, const float *dp, float *ds, int64_t rows, int64_t L, float scale,
                      int threads) {
    softmax_t a = {0, 0, p, dp, ds, 1, 1, L, 1, scale};
    parallel_for(rows, L, threads, softmax_grad_rows, &a);
}

/* ---------------------------------------------------------------- a decode step's attention */
/* One new query per row against the KV cache and the row's own new key and value (the rollout's
 * decode step): q [B, H, D] (scaled), k_new, v_new [B, KV, D], the cache's keys and values
 * [B, KV, T, D] of one layer, bias [B, T] (0, or the dtype's minimum for a slot not to attend:
 * padding, slots not written yet), out [B, H, D].  Query head h reads key / value head
 * h / (H / KV) (grouped-query attention).  out = softmax([q k_t + bias_t, q k_new]) [v_t, v_new];
 * masked slots weigh exactly 0 and are skipped. */

typedef struct {
    const float *q, *k_new, *v_new, *keys, *values, *bias;
    float *out;
    int64_t H, KV, T, D;
    volatile int failed; /* a thread could not allocate its scores */
} dattn_t;

CLONES static void dattn_rows(void *p, int64_t begin, int64_t end) {
    dattn_t *a = (dattn_t *)p;
    const int64_t T = a->T, D = a->D, group = a->H / a->KV;
    float *scores = (float *)malloc(sizeof(float) * (T > 0 ? T : 1));
    if (!scores) {
        a->failed = 1;
        return;
    }
    for (int64_t row = begin; row < end; ++row) { /* row = b * H + h */
        const int64_t b = row / a->H, h = row % a->H, kv = b * a->KV + h / group;
        const float *q = a->q + row * D, *bias = a->bias + b * T;
        const float *keys = a->keys + kv * T * D, *values = a->values + kv * T * D;
        const float *v_new = a->v_new + kv * D;
        float *out = a->out + row * D;
        const float own = dot2(q, a->k_new + kv * D, D);
        float top = own;
        for (int64_t t = 0; t < T; ++t) {
            if (bias[t] < -1e30f) continue;
            scores[t] = dot2(q, keys + t * D, D) + bias[t];
            top = scores[t] > top ? scores[t] : top;
        }
        float weight = exp_approx(own - top), total = weight;
        for (int64_t d = 0; d < D; ++d) out[d] = weight * v_new[d];
        for (int64_t t = 0; t < T; ++t) {
            if (bias[t] < -1e30f) continue;
            weight = exp_approx(scores[t] - top);
            total += weight;
            const float *v = values + t * D;
            for (int64_t d = 0; d < D; ++d) out[d] += weight * v[d];
        }
        const float inv = 1.0f / total;
        for (int64_t d = 0; d < D; ++d) out[d] *= inv;
    }
    free(scores);
}

/* Returns 0, or 1 when out of memory (out is then not written in full). */
int ppk_decode_attention(const float *q, const float *k_new, const float *v_new, const float *keys,
                         const float *values, const float *bias, float *out, int64_t B, int64_t H, int64_t KV,
                         int64_t T, int64_t D, int threads) {
    dattn_t a = {q, k_new, v_new, keys, values, bias, out, H, KV, T, D, 0};
    parallel_for(B * H, (T + 1) * D * 2, threads, dattn_rows, &a);
    return a.failed;
}

/* cache[r, slot:slot + S, :] = rows[r, :, :] for the r < n rows of a cache [n, T, D] and rows [n, S, D]
 * (a decode step's new keys or values into their slot, all layers at once; a prefill's into slots
 * slot .. slot + S - 1) */
void ppk_cache_write(float *cache, const float *rows, int64_t n, int64_t T, int64_t D, int64_t slot, int64_t S) {
    for (int64_t r = 0; r < n; ++r) memcpy(cache + (r * T + slot) * D, rows + r * S * D, sizeof(float) * S * D);
}

/* ---------------------------------------------------------------- token log-probs */
/* Per row of logits x [N, V] with z = x inv_t: lse = logsumexp(z), logp = z[label] - lse and the
 * entropy H = lse - sum softmax(z) z = log s - (sum e d) / s with d = z - max z, e = exp(d),
 * s = sum e: one pass for the maximum, one for the exponentials.  Backward of logp alone:
 * dx = g inv_t (onehot(label) - exp(z - lse)), the exponentials again (nothing [N, V] is kept). */

typedef struct {
    const float *x, *g;
    const int64_t *labels;
    float *logp, *lse, *entropy, *dx;
    int64_t V;
    float inv_t;
} tokens_t;

/* (16 lanes of partial results, combined in a fixed order: vector code without reassociation,
 * which would also keep exp_approx from being inlined) */
#define LANES 16

CLONES static float row_max(const float *restrict x, int64_t n) {
    float m[LANES];
    for (int j = 0; j < LANES; ++j) m[j] = -INFINITY;
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; ++j) m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
    for (; i < n; ++i) m[0] = x[i] > m[0] ? x[i] : m[0];
    float top = m[0];
    for (int j = 1; j < LANES; ++j) top = m[j] > top ? m[j] : top;
    return top;
}

CLONES static float exp_sums(const float *restrict x, int64_t n, float c, float top, float *weighted) {
    float s[LANES] = {0}, w[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; ++j) {
            const float d = x[i + j] * c - top;
            const float e = exp_approx(d);
            s[j] += e;
            w[j] += e * d;
        }
    for (; i < n; ++i) {
        const float d = x[i] * c - top;
        const float e = exp_approx(d);
        s[0] += e;
        w[0] += e * d;
    }
    float total = 0.0f, wsum = 0.0f;
    for (int j = 0; j < LANES; ++j) {
        total += s[j];
        wsum += w[j];
    }
    *weighted = wsum;
    return total;
}

static void tokens_fwd_rows(void *p, int64_t begin, int64_t end) {
    tokens_t *a = (tokens_t *)p;
    const int64_t V = a->V;
    for (int64_t row = begin; row < end; ++row) {
        const float *x = a->x + row * V;
        const float top = row_max(x, V) * a->inv_t; /* (inv_t > 0: the maximum of z, rounded the same) */
        float w;
        const float s = exp_sums(x, V, a->inv_t, top, &w);
        const float lse = top + logf(s);
        a->lse[row] = lse;
        a->logp[row] = x[a->labels[row]] * a->inv_t - lse;
        if (a->entropy) a->entropy[row] = logf(s) - w / s;
    }
}

CLONES static void tokens_bwd_rows(void *p, int64_t begin, int64_t end) {
    tokens_t *a = (tokens_t *)p;
    const int64_t V = a->V;
    const float c = a->inv_t;
    for (int64_t row = begin; row < end; ++row) {
        const float *restrict x = a->x + row * V;
        float *restrict dx = a->dx + row * V;
        const float gc = a->g[row] * c, lse = a->lse[row];
        for (int64_t i = 0; i < V; ++i) dx[i] = -gc * exp_approx(x[i] * c - lse);
        dx[a->labels[row]] += gc;
    }
}

/* 1 (nothing computed) when a label is outside [0, V) or inv_t is not a positive finite number */
static int tokens_refused(const int64_t *labels, int64_t N, int64_t V, float inv_t) {
    if (!(inv_t > 0.0f && inv_t <= 3.4e38f)) return 1;
    for (int64_t r = 0; r < N; ++r)
        if (labels[r] < 0 || labels[r] >= V) return 1;
    return 0;
}

int ppk_token_log_probs(const float *x, const int64_t *labels, float *logp, float *lse, float *entropy, int64_t N,
                        int64_t V, float inv_t, int threads) {
    if (tokens_refused(labels, N, V, inv_t)) return 1;
    tokens_t a = {x, 0, labels, logp, lse, entropy, 0, V, inv_t};
    parallel_for(N, V, threads, tokens_fwd_rows, &a);
    return 0;
}

int ppk_token_log_probs_grad(const float *x, const int64_t *labels, const float *g, const float *lse, float *dx,
                             int64_t N, int64_t V, float inv_t, int threads) {
    if (tokens_refused(labels, N, V, inv_t)) return 1;
    tokens_t a = {x, g, labels, 0, (float *)lse, 0, dx, V, inv_t};
    parallel_for(N, V, threads, tokens_bwd_rows, &a);
    return 0;
}

/* ---------------------------------------------------------------- SwiGLU */
/* out = silu(gate) up = gate sigmoid(gate) up; backward with s = sigmoid(gate):
 * dgate = dout up s (1 + gate (1 - s)),  dup = dout gate s */

typedef struct {
    const float *gate, *up, *dout;
    float *out, *dgate, *dup;
} swiglu_t;

CLONES static void swiglu_fwd_range(void *p, int64_t begin, int64_t end) {
    swiglu_t *a = (swiglu_t *)p;
    const float *restrict g = a->gate, *restrict u = a->up;
    float *restrict o = a->out;
    for (int64_t i = begin; i < end; ++i) o[i] = g[i] / (1.0f + exp_approx(-g[i])) * u[i];
}

CLONES static void swiglu_bwd_range(void *p, int64_t begin, int64_t end) {
    swiglu_t *a = (swiglu_t *)p;
    const float *restrict g = a->gate, *restrict u = a->up, *restrict d = a->dout;
    float *restrict dg = a->dgate, *restrict du = a->dup;
    for (int64_t i = begin; i < end; ++i) {
        float s = 1.0f / (1.0f + exp_approx(-g[i]));
        float ds = d[i] * s;
        dg[i] = ds * u[i] * (1.0f + g[i] * (1.0f - s));
        du[i] = ds * g[i];
    }
}

void ppk_swiglu_forward(const float *gate, const float *up, float *out, int64_t n, int threads) {
    swiglu_t a = {gate, up, 0, out, 0, 0};
    parallel_for(n, 1, threads, swiglu_fwd_range, &a);
}

/* both gradients (dgate and dup must be given) */
void ppk_swiglu_backward(const float *gate, const float *up, const float *dout, float *dgate, float *dup, int64_t n,
                         int threads) {
    swiglu_t a = {gate, up, dout, 0, dgate, dup};
    parallel_for(n, 1, threads, swiglu_bwd_range, &a);
}

/* ---------------------------------------------------------------- a decode step's layers */
/* The layers of a decode step (one new token per row) in one call, the Python work between the
 * kernels gone: per layer q, k, v products, the optional per-head norms (Qwen3), rotary, the
 * attention over the cache, the output product, the residual add with the next norm, gate and up
 * products, SwiGLU, the down product and its residual add with the next norm.  The products call
 * the GEMM the caller hands over: MKL's cblas_sgemm (kind 1, paddle's own CPU matmul) or
 * oneDNN's dnnl_sgemm (kind 2).  Separate projections without biases or adapters only: the
 * caller keeps every other layout on its own path. */

typedef void (*cblas_sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                               float *, int);
typedef int (*dnnl_sgemm_fn)(char, char, int64_t, int64_t, int64_t, float, const float *, int64_t, const float *,
                             int64_t, float, float *, int64_t);

/* c [M, N] = op(a) [M, K] @ op(b) [K, N], row-major with leading dimensions (op transposes where
 * asked); 0 or oneDNN's failure (MKL's cblas_sgemm reports none: the callers keep every size and
 * leading dimension valid and below 2^31) */
static int gemm_call(const void *gemm, int kind, int trans_a, int trans_b, int64_t M, int64_t N, int64_t K,
                     const float *a, int64_t lda, const float *b, int64_t ldb, float *c, int64_t ldc) {
    if (kind == 1) {
        ((cblas_sgemm_fn)gemm)(101, trans_a ? 112 : 111, trans_b ? 112 : 111, (int)M, (int)N, (int)K, 1.0f, a,
                               (int)lda, b, (int)ldb, 0.0f, c, (int)ldc);
        return 0;
    }
    return ((dnnl_sgemm_fn)gemm)(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, 1.0f, a, lda, b, ldb, 0.0f, c,
                                 ldc) != 0;
}

/* y [M, N] = x [M, K] @ w [K, N], all dense */
static int decode_product(const void *gemm, int kind, const float *x, const float *w, float *y, int64_t M,
                          int64_t K, int64_t N) {
    return gemm_call(gemm, kind, 0, 0, M, N, K, x, K, w, N, y, N);
}

enum { DW_Q, DW_K, DW_V, DW_O, DW_GATE, DW_UP, DW_DOWN, DW_POST_NORM, DW_NEXT_NORM, DW_Q_NORM, DW_K_NORM, DW_COUNT };

/* weights: DW_COUNT pointers per layer (q [hidden, H D], k and v [hidden, KV D], o [H D, hidden],
 * gate and up [hidden, I], down [I, hidden], the post-attention norm and the norm after the layer
 * [hidden] (the next layer's input norm, or the final norm), the per-head norms [D] or NULL).
 * x [B, hidden] is the first layer's normalised input and h the residual stream: on return x is
 * the final norm's output and h the stream.  cos_q, sin_q (the attention scale folded in) and
 * cos_k, sin_k are [B, D]; the cache keys / values [layers, B, KV, T, D] and bias [B, T] as in
 * ppk_decode_attention; the step's keys and values are written to new_keys / new_values
 * [layers, B, KV, D].  Returns 0, 1 when out of memory, 2 when a product failed. */
int ppk_decode_layers(const void *gemm, int kind, const float *const *weights, int64_t layers, float *x, float *h,
                      const float *cos_q, const float *sin_q, const float *cos_k, const float *sin_k,
                      const float *keys, const float *values, const float *bias, float *new_keys, float *new_values,
                      int64_t B, int64_t hidden, int64_t H, int64_t KV, int64_t D, int64_t I, int64_t T, float eps,
                      int threads) {
    const int64_t qw = H * D, kw = KV * D;
    float *buffer = (float *)malloc(sizeof(float) * (size_t)(B * (3 * qw + kw + hidden + 3 * I)));
    if (!buffer) return 1;
    float *q = buffer, *q_rot = q + B * qw, *attn = q_rot + B * qw, *k = attn + B * qw; /* (v: into new_values) */
    float *o = k + B * kw, *gate = o + B * hidden, *up = gate + B * I, *act = up + B * I;
    int status = 0;
    for (int64_t layer = 0; layer < layers && !status; ++layer) {
        const float *const *w = weights + layer * DW_COUNT;
        float *k_new = new_keys + layer * B * kw, *v_new = new_values + layer * B * kw;
        status = decode_product(gemm, kind, x, w[DW_Q], q, B, hidden, qw) ||
                 decode_product(gemm, kind, x, w[DW_K], k, B, hidden, kw) ||
                 decode_product(gemm, kind, x, w[DW_V], v_new, B, hidden, kw);
        if (status) break;
        if (w[DW_Q_NORM]) ppk_rms_norm_forward(q, w[DW_Q_NORM], q, 0, B * H, D, eps, threads);
        if (w[DW_K_NORM]) ppk_rms_norm_forward(k, w[DW_K_NORM], k, 0, B * KV, D, eps, threads);
        ppk_rope(q, cos_q, sin_q, q_rot, B, H, 1, D, 2, B, 0, 0, threads);
        ppk_rope(k, cos_k, sin_k, k_new, B, KV, 1, D, 2, B, 0, 0, threads);
        dattn_t a = {q_rot, k_new, v_new, keys + layer * B * kw * T, values + layer * B * kw * T, bias, attn,
                     H, KV, T, D, 0};
        parallel_for(B * H, (T + 1) * D * 2, threads, dattn_rows, &a);
        if (a.failed) {
            status = 1;
            break;
        }
        if ((status = decode_product(gemm, kind, attn, w[DW_O], o, B, qw, hidden))) break;
        ppk_add_rms_norm(o, h, w[DW_POST_NORM], x, h, B, hidden, eps, threads);
        status = decode_product(gemm, kind, x, w[DW_GATE], gate, B, hidden, I) ||
                 decode_product(gemm, kind, x, w[DW_UP], up, B, hidden, I);
        if (status) break;
        ppk_swiglu_forward(gate, up, act, B * I, threads);
        if ((status = decode_product(gemm, kind, act, w[DW_DOWN], o, B, I, hidden))) break;
        ppk_add_rms_norm(o, h, w[DW_NEXT_NORM], x, h, B, hidden, eps, threads);
    }
    free(buffer);
    return status == 1 ? 1 : status ? 2 : 0;
}

/* ---------------------------------------------------------------- batched products */
/* c[o, i] = op(a[o, i]) @ op(b[o, i]) for o < outer, i < inner (the attention's products per
 * sequence and head): each operand a matrix with contiguous rows at base + o * s0 + i * s1 with
 * row stride ld (so transposed views, [B, S, heads, D] read as [B, heads, S, D], need no copy);
 * the items split over the threads, each product on one (the GEMM runs single-threaded inside the
 * parallel region).  paddle's batched matmul reached 45-70 GFLOP/s on [16, 8, 320, 64] products
 * here, where its 2-D products reach 120-150. */

typedef struct {
    const void *gemm;
    int kind, trans_a, trans_b;
    const float *a, *b;
    float *c;
    int64_t inner, sa0, sa1, lda, sb0, sb1, ldb, sc0, sc1, ldc, M, N, K;
    volatile int failed;
} bgemm_t;

static void bgemm_items(void *p, int64_t begin, int64_t end) {
    bgemm_t *g = (bgemm_t *)p;
    for (int64_t item = begin; item < end; ++item) {
        const int64_t o = item / g->inner, i = item % g->inner;
        if (gemm_call(g->gemm, g->kind, g->trans_a, g->trans_b, g->M, g->N, g->K, g->a + o * g->sa0 + i * g->sa1,
                      g->lda, g->b + o * g->sb0 + i * g->sb1, g->ldb, g->c + o * g->sc0 + i * g->sc1, g->ldc))
            g->failed = 1;
    }
}

/* Returns 0, or 1 when a product failed. */
int ppk_batched_gemm(const void *gemm, int kind, int64_t outer, int64_t inner, const float *a, int64_t sa0,
                     int64_t sa1, int64_t lda, int trans_a, const float *b, int64_t sb0, int64_t sb1, int64_t ldb,
                     int trans_b, float *c, int64_t sc0, int64_t sc1, int64_t ldc, int64_t M, int64_t N, int64_t K,
                     int threads) {
    bgemm_t g = {gemm, kind, trans_a, trans_b, a, b, c, inner, sa0, sa1, lda, sb0, sb1, ldb, sc0, sc1, ldc, M, N, K,
                 0};
    parallel_for(outer * inner, M * N, threads, bgemm_items, &g);
    return g.failed;
}
