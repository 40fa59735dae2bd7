/*
 * cpu_backend.c: the reference backend. Matrix products go through OpenBLAS; our own loops are
 * parallelised over heads (or rows) with OpenMP, with each thread owning its outputs, so results
 * are bit-identical whatever the thread count. Inside our parallel regions OpenBLAS runs on one
 * thread (its own pool would oversubscribe the cores).
 *
 * Attention is computed in blocks of ATT_QB queries: S = scale * Q_blk K^T (one sgemm), a causal
 * softmax per row (max-subtracted, sums in double), then O_blk = P V (one sgemm). Memory per
 * thread is ATT_QB x n_keys floats; the T x T matrix is never materialised. With statistics
 * requested (kv_attn_args_t.stats, capture) each block of scores also feeds attn_stats's row pass
 * before the softmax overwrites it, so the scores are computed once for both.
 *
 * Weights in their stored type (matmul_w): each thread converts the tile of weight rows it needs
 * into its own buffer, kept by the backend from call to call, and multiplies it with the same
 * single-threaded BLAS call that matmul makes on that tile of an fp32 matrix.
 */
#include "kernels/kv_backend.h"
#include "sim/common/kv_common.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#define ATT_QB 64

int kv_blas_set_threads(int n)
{
    int old = openblas_get_num_threads();
    openblas_set_num_threads(n);
    return old;
}

static void *cpu_alloc(kv_backend_t *be, size_t bytes)
{
    (void)be;
    return kv_malloc_aligned(bytes, "cpu backend buffer");
}
static void cpu_free(kv_backend_t *be, void *p)
{
    (void)be;
    kv_free_aligned(p);
}
static int cpu_copy(kv_backend_t *be, void *dst, const void *src, size_t bytes)
{
    (void)be;
    if (bytes)
        memcpy(dst, src, bytes);
    return KV_OK;
}
static int cpu_sync(kv_backend_t *be)
{
    (void)be;
    return KV_OK;
}

/* OpenBLAS's own threading splits a product differently for each thread count and the bits of the
 * result change with it (measured: thousands of differing elements for 374x64x64 at 1 vs 2
 * threads). So the product is cut into tiles of a fixed size, MM_MB x MM_NB, whatever the thread
 * count, each computed by single-threaded BLAS on one of our threads: the same tile is always the
 * same call, hence the same bits. Measured on 2 cores this runs at 80-115% of threaded OpenBLAS. */
#define MM_MB 128
#define MM_NB 512

static int cpu_matmul(kv_backend_t *be, float *y, const float *x, const float *w, int M, int N, int K)
{
    (void)be;
    if (M <= 0 || N <= 0 || K <= 0)
        return kv_error(KV_EINVAL, "matmul: bad shape M=%d N=%d K=%d", M, N, K);
    const int mt = (M + MM_MB - 1) / MM_MB, nt = (N + MM_NB - 1) / MM_NB;
    int old = kv_blas_set_threads(1);
#pragma omp parallel for schedule(dynamic, 1) if (mt * nt > 1)
    for (int t = 0; t < mt * nt; t++) {
        const int m0 = (t / nt) * MM_MB, n0 = (t % nt) * MM_NB;
        const int mb = KV_MIN(MM_MB, M - m0), nb = KV_MIN(MM_NB, N - n0);
        if (mb == 1)
            cblas_sgemv(CblasRowMajor, CblasNoTrans, nb, K, 1.0f, w + (size_t)n0 * K, K, x + (size_t)m0 * K, 1, 0.0f,
                        y + (size_t)m0 * N + n0, 1);
        else
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mb, nb, K, 1.0f, x + (size_t)m0 * K, K,
                        w + (size_t)n0 * K, K, 0.0f, y + (size_t)m0 * N + n0, N);
    }
    kv_blas_set_threads(old);
    return KV_OK;
}

/* Per-thread conversion buffers of matmul_w, kept from call to call (an 8B model's widest tile is
 * MM_NB x 14336 floats, 29 MB: allocating it per call would page-fault it in again every time). */
typedef struct {
    int n;
    float **buf;
    size_t *cap; /* floats */
} cpu_ctx_t;

static int ensure_slots(kv_backend_t *be, int n)
{
    cpu_ctx_t *c = be->ctx;
    if (c->n >= n)
        return KV_OK;
    float **b = kv_realloc(c->buf, sizeof *b * (size_t)n, "matmul buffers");
    if (!b)
        return KV_ENOMEM;
    c->buf = b;
    size_t *cap = kv_realloc(c->cap, sizeof *cap * (size_t)n, "matmul buffers");
    if (!cap)
        return KV_ENOMEM;
    c->cap = cap;
    for (int i = c->n; i < n; i++)
        c->buf[i] = NULL, c->cap[i] = 0;
    c->n = n;
    return KV_OK;
}

void kv_backend_cpu_destroy(kv_backend_t *be)
{
    cpu_ctx_t *c = be->ctx;
    if (!c)
        return;
    for (int i = 0; i < c->n; i++)
        kv_free_aligned(c->buf[i]);
    kv_free(c->buf);
    kv_free(c->cap);
    kv_free(c);
    be->ctx = NULL;
}

/* matmul of a weight in its stored type. The (m, n) tiles of cpu_matmul are taken in n-major order
 * in runs of up to `chunk` m-tiles of one n-tile (a work item); a thread converts an n-tile's weight
 * rows into its buffer when its item is of another n-tile than its last, so each weight row is
 * converted about once per thread that needs it, and items are handed out dynamically. Every output
 * tile is still the one BLAS call cpu_matmul makes for it, on the same fp32 values: the same bits
 * for any thread count and any assignment of items to threads. */
static int cpu_matmul_w(kv_backend_t *be, float *y, const float *x, const kv_weight_t *w, int M)
{
    const int N = w->rows, K = w->cols;
    if (M <= 0 || N <= 0 || K <= 0 || !w->data)
        return kv_error(KV_EINVAL, "matmul_w: bad shape M=%d N=%d K=%d", M, N, K);
    if (kv_weight_is_plain_f32(w))
        return cpu_matmul(be, y, x, w->data, M, N, K);
    if (!kv_weight_type_name(w->type))
        return kv_error(KV_ENOTIMPL, "matmul_w: weight type %d is not converted by the CPU backend", w->type);
    const int mt = (M + MM_MB - 1) / MM_MB, nt = (N + MM_NB - 1) / MM_NB;
    const int nth = omp_get_max_threads();
    /* at least about four items per thread, so a thread slowed down by another process sheds work */
    const int chunk = KV_MAX(1, KV_MIN(mt, (mt * nt + 4 * nth - 1) / (4 * nth)));
    const int per_n = (mt + chunk - 1) / chunk, items = nt * per_n;
    const size_t need = (size_t)KV_MIN(MM_NB, N) * (size_t)K;
    int rc = ensure_slots(be, nth);
    if (rc)
        return kv_error_context(rc, "matmul_w");
    cpu_ctx_t *c = be->ctx;
    int old = kv_blas_set_threads(1);
#pragma omp parallel if (items > 1)
    {
        const int tid = omp_get_thread_num();
        if (c->cap[tid] < need) {
            kv_free_aligned(c->buf[tid]);
            c->buf[tid] = kv_malloc_aligned(need * sizeof(float), "matmul_w weight tile");
            c->cap[tid] = c->buf[tid] ? need : 0;
        }
        float *buf = c->buf[tid];
        if (!buf) {
#pragma omp atomic write
            rc = KV_ENOMEM;
        }
        int have = -1; /* the n-tile in buf */
#pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < items; it++) {
            if (!buf)
                continue;
            const int n_t = it / per_n, n0 = n_t * MM_NB, nb = KV_MIN(MM_NB, N - n0);
            if (have != n_t) {
                kv_weight_rows(w, n0, nb, buf);
                have = n_t;
            }
            const int m_end = KV_MIN(mt, (it % per_n + 1) * chunk);
            for (int m_t = (it % per_n) * chunk; m_t < m_end; m_t++) {
                const int m0 = m_t * MM_MB, mb = KV_MIN(MM_MB, M - m0);
                if (mb == 1)
                    cblas_sgemv(CblasRowMajor, CblasNoTrans, nb, K, 1.0f, buf, K, x + (size_t)m0 * K, 1, 0.0f,
                                y + (size_t)m0 * N + n0, 1);
                else
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mb, nb, K, 1.0f, x + (size_t)m0 * K, K, buf, K,
                                0.0f, y + (size_t)m0 * N + n0, N);
            }
        }
    }
    kv_blas_set_threads(old);
    if (rc)
        return kv_error(rc, "matmul_w: no memory for a %d x %d weight tile", KV_MIN(MM_NB, N), K);
    return KV_OK;
}

static int cpu_rmsnorm(kv_backend_t *be, float *y, const float *x, const float *w, int T, int dim, float eps)
{
    (void)be;
#pragma omp parallel for schedule(static) if (T > 16)
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * dim;
        float *yt = y + (size_t)t * dim;
        double ss = 0;
        for (int i = 0; i < dim; i++)
            ss += (double)xt[i] * xt[i];
        float r = (float)(1.0 / sqrt(ss / dim + eps));
        for (int i = 0; i < dim; i++)
            yt[i] = xt[i] * r * w[i];
    }
    return KV_OK;
}

static int cpu_rope(kv_backend_t *be, float *x, const int32_t *pos, int T, int n_heads, int head_dim,
                    const kv_rope_t *rope)
{
    (void)be;
    if (!rope)
        return kv_error(KV_EINVAL, "rope: no RoPE parameters");
    if (head_dim % 2 || head_dim <= 0 || head_dim > 2 * KV_ROPE_MAX_PAIRS)
        return kv_error(KV_EINVAL, "rope: head_dim %d (must be even, at most %d)", head_dim, 2 * KV_ROPE_MAX_PAIRS);
    /* each pair's frequency once: the same double for every token, so the same bits as computing it
     * per token */
    double freq[KV_ROPE_MAX_PAIRS];
    for (int i = 0; i < head_dim; i += 2)
        freq[i / 2] = kv_rope_freq(rope, i, head_dim);
#pragma omp parallel for schedule(static) if (T > 16)
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < head_dim; i += 2) {
            double ang = (double)pos[t] * freq[i / 2];
            float c = (float)cos(ang), s = (float)sin(ang);
            for (int h = 0; h < n_heads; h++) {
                float *p = x + ((size_t)t * n_heads + h) * head_dim + i;
                float a = p[0], b = p[1];
                p[0] = a * c - b * s;
                p[1] = a * s + b * c;
            }
        }
    }
    return KV_OK;
}

static int cpu_swiglu(kv_backend_t *be, float *h, const float *g, size_t n)
{
    (void)be;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) {
        float v = h[i];
        h[i] = v / (1.0f + expf(-v)) * g[i];
    }
    return KV_OK;
}

static int cpu_add(kv_backend_t *be, float *x, const float *y, size_t n)
{
    (void)be;
    for (size_t i = 0; i < n; i++)
        x[i] += y[i];
    return KV_OK;
}

static int cpu_add_bias(kv_backend_t *be, float *y, const float *b, int rows, int cols)
{
    (void)be;
    if (rows < 0 || cols <= 0)
        return kv_error(KV_EINVAL, "add_bias: bad shape rows=%d cols=%d", rows, cols);
#pragma omp parallel for schedule(static) if ((size_t)rows * cols > 65536)
    for (int r = 0; r < rows; r++) {
        float *yr = y + (size_t)r * cols;
        for (int c = 0; c < cols; c++)
            yr[c] += b[c];
    }
    return KV_OK;
}

/* In place: s[j] = exp(s[j] - shift) for j < n, where s[j] - shift <= 0 (a max-subtracted softmax
 * or a log-sum-exp-subtracted one). Returns sum_j e_j in *sum_e and sum_j e_j (s[j] - shift) in
 * *sum_ex (for the entropy), both accumulated in double, 8 lanes at a time in a fixed order.
 *
 * Written with GCC vector types so it is vectorised whatever the target: x = k ln2 + r with
 * k = round(x / ln2) (magic-number rounding) and |r| <= ln2/2, e^r by its degree-7 Taylor
 * polynomial (truncation error < 5e-9 relative, below float rounding), 2^k built in the exponent
 * bits. The result is within about one float ulp of expf; x < -87 gives 0 (probabilities below
 * float's normal range). */
/* 8 lanes where the build targets AVX2 (make's default CPU_ARCH=-march=native), else 4 (SSE2). */
#ifdef __AVX2__
#define KV_VL 8
#else
#define KV_VL 4
#endif
typedef float kv_vf __attribute__((vector_size(4 * KV_VL)));
typedef int32_t kv_vi __attribute__((vector_size(4 * KV_VL)));

/* lanes of a where m is set (all ones), else b */
static inline __attribute__((always_inline)) kv_vf vsel(kv_vi m, kv_vf a, kv_vf b)
{
    return (kv_vf)(((kv_vi)a & m) | ((kv_vi)b & ~m));
}

static inline __attribute__((always_inline)) kv_vf vexp(kv_vf x)
{
    const kv_vf zero = {0};
    kv_vi under = x < -87.0f;
    x = vsel(under, zero - 87.0f, x);
    kv_vf t = x * 1.44269504088896341f + 12582912.0f; /* 1.5 * 2^23: rounds to the nearest integer */
    kv_vf k = t - 12582912.0f;
    kv_vf r = (x - k * 0.693145751953125f) - k * 1.42860682030941723e-6f;
    kv_vf p = zero + 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    kv_vi ki = __builtin_convertvector(k, kv_vi);
    kv_vf two_k = (kv_vf)((ki + 127) << 23);
    return vsel(under, zero, p * two_k);
}

static void exp_shift(float *s, int n, float shift, double *sum_e, double *sum_ex)
{
    const kv_vf zero = {0};
    double se = 0, sx = 0;
    int j = 0;
    for (; j + KV_VL <= n; j += KV_VL) {
        kv_vf x, e;
        memcpy(&x, s + j, sizeof x);
        x = x - shift;
        x = vsel(x > 0.0f, zero, x);
        e = vexp(x);
        memcpy(s + j, &e, sizeof e);
        kv_vf ex = e * x;
        float a = 0, b = 0;
        for (int l = 0; l < KV_VL; l++) {
            a += e[l];
            b += ex[l];
        }
        se += a;
        sx += b;
    }
    if (j < n) {
        kv_vf x = zero, e;
        for (int l = 0; j + l < n; l++)
            x[l] = s[j + l] - shift > 0 ? 0.0f : s[j + l] - shift;
        e = vexp(x);
        for (int l = 0; j + l < n; l++) {
            s[j + l] = e[l];
            se += e[l];
            sx += e[l] * x[l];
        }
    }
    *sum_e = se;
    if (sum_ex)
        *sum_ex = sx;
}

/* a * b + c in one rounding where the machine has fused multiply-adds (the column statistics' exp: the
 * other ops keep vexp, whose products and sums round apart, so their bits do not change) */
static inline __attribute__((always_inline)) kv_vf vfma(kv_vf a, kv_vf b, kv_vf c)
{
#if defined(__FMA__) && KV_VL == 8
    return __builtin_ia32_vfmaddps256(a, b, c);
#else
    return a * b + c;
#endif
}

/* vexp with fused multiply-adds in the reduction and the polynomial: the same formula, half the
 * operations, within about one float ulp of expf like vexp. */
static inline __attribute__((always_inline)) kv_vf vexp_fma(kv_vf x)
{
    const kv_vf zero = {0};
    kv_vi under = x < -87.0f;
    x = vsel(under, zero - 87.0f, x);
    kv_vf t = vfma(x, zero + 1.44269504088896341f, zero + 12582912.0f);
    kv_vf k = t - 12582912.0f;
    kv_vf r = vfma(k, zero - 0.693145751953125f, x);
    r = vfma(k, zero - 1.42860682030941723e-6f, r);
    kv_vf p = zero + 1.0f / 5040;
    p = vfma(p, r, zero + 1.0f / 720);
    p = vfma(p, r, zero + 1.0f / 120);
    p = vfma(p, r, zero + 1.0f / 24);
    p = vfma(p, r, zero + 1.0f / 6);
    p = vfma(p, r, zero + 0.5f);
    p = vfma(p, r, zero + 1.0f);
    p = vfma(p, r, zero + 1.0f);
    kv_vi ki = __builtin_convertvector(k, kv_vi);
    kv_vf two_k = (kv_vf)((ki + 127) << 23);
    return vsel(under, zero, p * two_k);
}

/* In place: s[j] = exp(s[j] - shift) for j < n (s[j] <= shift), returning sum_j s[j]: float lanes over
 * runs of EXP_RUN vectors (at most that many additions per lane), each run's lanes added in double, in
 * a fixed order (deterministic). exp_shift's twin without the entropy sum and the per-vector horizontal
 * additions: the column statistics call it for every attention row. */
#define EXP_RUN 16
static double exp_sum(float *s, int n, float shift)
{
    const kv_vf zero = {0};
    double z = 0;
    int j = 0;
    while (j + KV_VL <= n) {
        kv_vf acc = zero;
        for (int v = 0; v < EXP_RUN && j + KV_VL <= n; v++, j += KV_VL) {
            kv_vf x;
            memcpy(&x, s + j, sizeof x);
            x = x - shift;
            x = vsel(x > 0.0f, zero, x);
            const kv_vf e = vexp_fma(x);
            memcpy(s + j, &e, sizeof e);
            acc += e;
        }
        for (int l = 0; l < KV_VL; l++)
            z += acc[l];
    }
    if (j < n) {
        kv_vf x = zero, e;
        for (int l = 0; j + l < n; l++)
            x[l] = s[j + l] - shift > 0 ? 0.0f : s[j + l] - shift;
        e = vexp_fma(x);
        for (int l = 0; j + l < n; l++) {
            s[j + l] = e[l];
            z += e[l];
        }
    }
    return z;
}

/* max of s[0, n), n >= 1 (vector lanes, then across them) */
static float row_max(const float *s, int n)
{
    int j = 0;
    float m = -INFINITY;
    if (n >= KV_VL) {
        kv_vf vm;
        memcpy(&vm, s, sizeof vm);
        for (j = KV_VL; j + KV_VL <= n; j += KV_VL) {
            kv_vf x;
            memcpy(&x, s + j, sizeof x);
            vm = vsel(x > vm, x, vm);
        }
        for (int l = 0; l < KV_VL; l++)
            m = vm[l] > m ? vm[l] : m;
    }
    for (; j < n; j++)
        m = s[j] > m ? s[j] : m;
    return m;
}

/* attn_stats's row pass: in place s[j] = exp(s[j] - lse) for j < n (with fused multiply-adds, as the
 * column statistics), *sum_e = sum_j s[j] and *sum_ex = sum_j s[j] (s_j - lse) (for the entropy), float
 * lanes added in double every EXP_RUN vectors in a fixed order. */
static void exp_ent(float *s, int n, float lse, double *sum_e, double *sum_ex)
{
    const kv_vf zero = {0};
    double se = 0, sx = 0;
    int j = 0;
    while (j + KV_VL <= n) {
        kv_vf ae = zero, ax = zero;
        for (int v = 0; v < EXP_RUN && j + KV_VL <= n; v++, j += KV_VL) {
            kv_vf x;
            memcpy(&x, s + j, sizeof x);
            x = x - lse;
            x = vsel(x > 0.0f, zero, x);
            const kv_vf e = vexp_fma(x);
            memcpy(s + j, &e, sizeof e);
            ae += e;
            ax = vfma(e, x, ax);
        }
        for (int l = 0; l < KV_VL; l++) {
            se += ae[l];
            sx += ax[l];
        }
    }
    for (; j < n; j++) {
        kv_vf x = zero;
        x[0] = s[j] - lse > 0 ? 0.0f : s[j] - lse;
        const float e = vexp_fma(x)[0];
        s[j] = e;
        se += e;
        sx += (double)e * x[0];
    }
    *sum_e = se;
    *sum_ex = sx;
}

/* Softmax of row s[0..n) in place over the first `vis` entries; the rest become 0. Returns lse. */
static float softmax_row(float *s, int n, int vis)
{
    const float m = vis > 0 ? row_max(s, vis) : -INFINITY; /* vector lanes: the same maximum */
    double sum;
    exp_shift(s, vis, m, &sum, NULL);
    float inv = (float)(1.0 / sum);
    for (int j = 0; j < vis; j++)
        s[j] *= inv;
    for (int j = vis; j < n; j++)
        s[j] = 0.0f;
    return m + (float)log(sum);
}

/* out may be NULL: then only the lse is computed (the row's max and sum; synth's summaries need no
 * attention output). */
/* out may be NULL: then only the lse is computed (the row's max and sum; synth's summaries need no
 * attention output). */
static int attention_with_stats(const kv_attn_args_t *a);

static int cpu_attention(kv_backend_t *be, const kv_attn_args_t *a)
{
    (void)be;
    if (a->stats)
        return attention_with_stats(a);
    const int H = a->n_heads, d = a->head_dim, G = a->n_heads / a->n_kv_heads;
    const int nk_all = a->q_pos0 + a->n_q;
    int rc = KV_OK;
    int old = kv_blas_set_threads(1);
#pragma omp parallel
    {
        float *S = kv_malloc_aligned(sizeof(float) * ATT_QB * (size_t)nk_all, "attention scores");
        if (!S) {
#pragma omp atomic write
            rc = KV_ENOMEM;
        }
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (int h = 0; h < H; h++)
            for (int i0 = 0; i0 < a->n_q; i0 += ATT_QB) {
                if (!S)
                    continue;
                const int g = h / G;
                const int nb = KV_MIN(ATT_QB, a->n_q - i0);
                const int nk = a->q_pos0 + i0 + nb; /* keys seen by the last query of the block */
                const float *Q = a->q + (size_t)i0 * H * d + (size_t)h * d;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nb, nk, d, a->scale, Q, H * d,
                            a->k + (size_t)g * d, (int)a->kv_stride, 0.0f, S, nk);
                if (!a->out) {
                    for (int r = 0; r < nb; r++) {
                        float *row = S + (size_t)r * nk;
                        const int vis = a->q_pos0 + i0 + r + 1;
                        const float m = row_max(row, vis);
                        if (a->lse)
                            a->lse[(size_t)h * a->n_q + i0 + r] = m + (float)log(exp_sum(row, vis, m));
                    }
                    continue;
                }
                for (int r = 0; r < nb; r++) {
                    float l = softmax_row(S + (size_t)r * nk, nk, a->q_pos0 + i0 + r + 1);
                    if (a->lse)
                        a->lse[(size_t)h * a->n_q + i0 + r] = l;
                }
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nb, d, nk, 1.0f, S, nk, a->v + (size_t)g * d,
                            (int)a->kv_stride, 0.0f, a->out + (size_t)i0 * H * d + (size_t)h * d, H * d);
            }
        kv_free_aligned(S);
    }
    kv_blas_set_threads(old);
    if (rc != KV_OK)
        return kv_error(rc, "attention: out of memory for %d keys", nk_all);
    return KV_OK;
}

/* ---- the smallest number of keys holding a share of a row's attention (attn_stats keys_mass) */

static void swapf(float *a, float *b)
{
    float t = *a;
    *a = *b;
    *b = t;
}

/* The smallest k such that the k largest of a[0, n) (all >= 0, reordered) sum to >= need: quickselect
 * from the top, a three-way partition around a pivot (> | == | <), taking the whole upper part while
 * it is not enough and recursing into it otherwise; equal values count ceil(remaining / value). */
static int select_mass(float *a, int n, double need)
{
    int lo = 0, hi = n, count = 0;
    while (hi > lo) {
        const float x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi - 1];
        const float piv = x > y ? (y > z ? y : (x > z ? z : x)) : (x > z ? x : (y > z ? z : y)); /* median */
        int gt = lo, i = lo, lt = hi;
        while (i < lt) {
            if (a[i] > piv)
                swapf(&a[gt++], &a[i++]);
            else if (a[i] < piv)
                swapf(&a[i], &a[--lt]);
            else
                i++;
        }
        double s_gt = 0;
        for (int k = lo; k < gt; k++)
            s_gt += a[k];
        if (s_gt >= need) {
            hi = gt;
            continue;
        }
        count += gt - lo;
        need -= s_gt;
        const int neq = lt - gt;
        if ((double)neq * piv >= need) {
            int k = piv > 0 ? (int)ceil(need / piv) : neq;
            return count + (k < 1 ? 1 : k > neq ? neq : k);
        }
        count += neq;
        need -= (double)neq * piv;
        lo = lt;
    }
    return count;
}

#define MASS_BUCKETS 1024 /* eighth-octave buckets of p in [0, 1]: the float's bits >> 20 */
#define MASS_DIRECT 128   /* rows up to this many keys go straight to select_mass */

typedef struct {
    int cnt[MASS_BUCKETS];
    double mass[MASS_BUCKETS];
    float *scratch; /* (n) */
} mass_ws_t;

/* keys_mass of one row p[0, n) (p >= 0; total = their sum): one pass files every p in a bucket by its
 * exponent and top three mantissa bits (counts and masses), the buckets are walked from the top to the
 * one where the mass reaches `need`, and only that bucket's values are selected exactly. O(n). */
static int keys_for_mass(const float *p, int n, double total, double mass, mass_ws_t *ws)
{
    const double need = mass * total * (1 - 1e-6);
    if (!(need > 0))
        return 0;
    if (n <= MASS_DIRECT) {
        memcpy(ws->scratch, p, sizeof(float) * (size_t)n);
        return select_mass(ws->scratch, n, need);
    }
    memset(ws->cnt, 0, sizeof ws->cnt);
    memset(ws->mass, 0, sizeof ws->mass);
    for (int j = 0; j < n; j++) {
        uint32_t u;
        memcpy(&u, &p[j], sizeof u);
        const uint32_t b = u >> 20 < MASS_BUCKETS ? u >> 20 : MASS_BUCKETS - 1; /* p > 1 (rounding): top */
        ws->cnt[b]++;
        ws->mass[b] += p[j];
    }
    double above = 0;
    int count = 0, b = MASS_BUCKETS - 1;
    for (; b >= 0; b--) {
        if (above + ws->mass[b] >= need)
            break;
        above += ws->mass[b];
        count += ws->cnt[b];
    }
    if (b < 0)
        return n; /* the rounding of the bucket sums left `need` out of reach: every key */
    int m = 0;
    for (int j = 0; j < n; j++) { /* the bucket's values in key order, with no branch to mispredict */
        uint32_t u;
        memcpy(&u, &p[j], sizeof u);
        ws->scratch[m] = p[j];
        m += (u >> 20 < MASS_BUCKETS ? (int)(u >> 20) : MASS_BUCKETS - 1) == b;
    }
    return count + select_mass(ws->scratch, m, need - above);
}

/* dst[j] = max(dst[j], p[j]) over the pooled cells: the keys of cell c are [ceil(c T / P), ceil((c+1) T / P)). */
static void pool_row(float *prow, const float *p, int vis, int pool, int pool_T)
{
    for (int c = 0; c < pool; c++) {
        const int j0 = (int)(((int64_t)c * pool_T + pool - 1) / pool);
        int j1 = (int)(((int64_t)(c + 1) * pool_T + pool - 1) / pool);
        if (j0 >= vis)
            break;
        j1 = j1 < vis ? j1 : vis;
        float mx = prow[c];
        for (int j = j0; j < j1; j++)
            mx = p[j] > mx ? p[j] : mx;
        prow[c] = mx;
    }
}

static void add_row(float *restrict dst, const float *restrict p, int n)
{
    for (int j = 0; j < n; j++)
        dst[j] += p[j];
}
static void add_sq_row(float *restrict dst, const float *restrict p, int n)
{
    for (int j = 0; j < n; j++)
        dst[j] += p[j] * p[j];
}
static void max_row(float *restrict dst, const float *restrict p, int n)
{
    for (int j = 0; j < n; j++)
        dst[j] = p[j] > dst[j] ? p[j] : dst[j];
}

/* attn_stats's row pass for query i of head h: s (the row's vis = q_pos0 + i + 1 scaled scores) becomes
 * the probabilities exp(s - lse) in place, and every requested output takes its share. The per-key
 * outputs of head h are added to in query order: callers run one head's rows on one thread, in order. */
static void stats_row(const kv_attn_stats_args_t *a, int h, int i, float *s, float lse, mass_ws_t *ws)
{
    const int pos = a->q_pos0 + i, vis = pos + 1;
    const size_t ro = (size_t)h * a->n_q + i, ko = (size_t)h * a->acc_stride;
    /* probabilities in place; entropy = -sum_j p_j log p_j = -sum_j p_j (s_j - lse) */
    double psum, plogp;
    exp_ent(s, vis, lse, &psum, &plogp);
    if (a->entropy)
        a->entropy[ro] = (float)-plogp;
    if (a->acc)
        add_row(a->acc + ko, s, vis);
    if (a->acc_sq)
        add_sq_row(a->acc_sq + ko, s, vis);
    if (a->acc_max)
        max_row(a->acc_max + ko, s, vis);
    if (pos < a->head_end) {
        if (a->acc_head)
            add_row(a->acc_head + ko, s, vis);
        if (a->acc_sq_head)
            add_sq_row(a->acc_sq_head + ko, s, vis);
        if (a->acc_max_head)
            max_row(a->acc_max_head + ko, s, vis);
    }
    if (a->pooled) {
        const int rb = (int)((int64_t)pos * a->pool / a->pool_T);
        pool_row(a->pooled + ((size_t)h * a->pool + rb) * a->pool, s, vis, a->pool, a->pool_T);
    }
    if (a->sink)
        a->sink[ro] = s[0];
    if (a->seg) {
        int lo = a->seg_lo ? a->seg_lo[pos] : 0;
        lo = lo < 0 ? 0 : lo > vis ? vis : lo;
        double m = 0;
        for (int j = lo; j < vis; j++)
            m += s[j];
        a->seg[ro] = (float)m;
    }
    if (a->keys_mass)
        a->keys_mass[ro] = (float)keys_for_mass(s, vis, psum, a->mass, ws);
}

/* Validation shared by attn_stats and the attention op's statistics. */
static int check_stats(const kv_attn_stats_args_t *a)
{
    const int nk_all = a->q_pos0 + a->n_q;
    if (a->pooled && (a->pool <= 0 || a->pool > a->pool_T || nk_all > a->pool_T))
        return kv_error(KV_EINVAL, "attn_stats: pool %d does not fit %d tokens", a->pool, a->pool_T);
    if (a->keys_mass && !(a->mass > 0 && a->mass <= 1))
        return kv_error(KV_EINVAL, "attn_stats: mass %g outside (0, 1]", (double)a->mass);
    return KV_OK;
}

/* keys_mass's workspace for rows of up to n keys (NULL when keys_mass is not requested or on failure) */
static mass_ws_t *mass_ws_new(const kv_attn_stats_args_t *a, int n)
{
    if (!a->keys_mass)
        return NULL;
    mass_ws_t *ws = kv_malloc(sizeof *ws, "keys-for-mass workspace");
    if (ws && !(ws->scratch = kv_malloc(sizeof(float) * (size_t)n, "keys-for-mass workspace"))) {
        kv_free(ws);
        ws = NULL;
    }
    return ws;
}

static void mass_ws_free(mass_ws_t *ws)
{
    if (ws)
        kv_free(ws->scratch);
    kv_free(ws);
}

static int cpu_attn_stats(kv_backend_t *be, const kv_attn_stats_args_t *a)
{
    (void)be;
    const int H = a->n_heads, d = a->head_dim, G = a->n_heads / a->n_kv_heads;
    const int nk_all = a->q_pos0 + a->n_q;
    int rc = check_stats(a);
    if (rc)
        return rc;
    int old = kv_blas_set_threads(1);
#pragma omp parallel
    {
        float *S = kv_malloc_aligned(sizeof(float) * ATT_QB * (size_t)nk_all, "attention scores");
        mass_ws_t *ws = mass_ws_new(a, nk_all);
        if (!S || (a->keys_mass && !ws)) {
#pragma omp atomic write
            rc = KV_ENOMEM;
        }
        /* Parallel over heads only: the per-key rows of a head are written by one thread. */
#pragma omp for schedule(dynamic, 1)
        for (int h = 0; h < H; h++) {
            if (!S || (a->keys_mass && !ws))
                continue;
            const int g = h / G;
            for (int i0 = 0; i0 < a->n_q; i0 += ATT_QB) {
                const int nb = KV_MIN(ATT_QB, a->n_q - i0);
                const int nk = a->q_pos0 + i0 + nb;
                const float *Q = a->q + (size_t)i0 * H * d + (size_t)h * d;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nb, nk, d, a->scale, Q, H * d,
                            a->k + (size_t)g * d, (int)a->kv_stride, 0.0f, S, nk);
                for (int r = 0; r < nb; r++)
                    stats_row(a, h, i0 + r, S + (size_t)r * nk, a->lse[(size_t)h * a->n_q + i0 + r], ws);
            }
        }
        mass_ws_free(ws);
        kv_free_aligned(S);
    }
    kv_blas_set_threads(old);
    if (rc != KV_OK)
        return kv_error(rc, "attn_stats: out of memory for %d keys", nk_all);
    return KV_OK;
}

/* The attention op with statistics (kv_attn_args_t.stats). Each block of scores is made by the sgemm
 * both ops make for it; every row is copied before the softmax normalises it in place, and the copy goes
 * through attn_stats's row pass with the lse just computed: the outputs are attention's and attn_stats's,
 * to the bit, for half the score products. Parallel over heads only, a head's blocks in order on one
 * thread (its per-key statistics add up the queries in order, as attn_stats does). */
static int attention_with_stats(const kv_attn_args_t *a)
{
    kv_attn_stats_args_t st = *a->stats;
    st.q = a->q, st.k = a->k, st.lse = a->lse, st.kv_stride = a->kv_stride;
    st.n_q = a->n_q, st.q_pos0 = a->q_pos0, st.n_heads = a->n_heads, st.n_kv_heads = a->n_kv_heads;
    st.head_dim = a->head_dim, st.scale = a->scale;
    if (!a->out || !a->lse)
        return kv_error(KV_EINVAL, "attention: statistics need the attention output and its lse");
    int rc = check_stats(&st);
    if (rc)
        return rc;
    const int H = a->n_heads, d = a->head_dim, G = a->n_heads / a->n_kv_heads;
    const int nk_all = a->q_pos0 + a->n_q;
    int old = kv_blas_set_threads(1);
#pragma omp parallel
    {
        float *S = kv_malloc_aligned(sizeof(float) * (ATT_QB + 1) * (size_t)nk_all, "attention scores");
        mass_ws_t *ws = mass_ws_new(&st, nk_all);
        if (!S || (st.keys_mass && !ws)) {
#pragma omp atomic write
            rc = KV_ENOMEM;
        }
        float *raw = S ? S + (size_t)ATT_QB * nk_all : NULL; /* one row's scores, kept for the statistics */
#pragma omp for schedule(dynamic, 1)
        for (int h = 0; h < H; h++) {
            if (!S || (st.keys_mass && !ws))
                continue;
            const int g = h / G;
            for (int i0 = 0; i0 < a->n_q; i0 += ATT_QB) {
                const int nb = KV_MIN(ATT_QB, a->n_q - i0);
                const int nk = a->q_pos0 + i0 + nb;
                const float *Q = a->q + (size_t)i0 * H * d + (size_t)h * d;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nb, nk, d, a->scale, Q, H * d,
                            a->k + (size_t)g * d, (int)a->kv_stride, 0.0f, S, nk);
                for (int r = 0; r < nb; r++) {
                    float *row = S + (size_t)r * nk;
                    const int vis = a->q_pos0 + i0 + r + 1;
                    memcpy(raw, row, sizeof(float) * (size_t)vis);
                    const float l = softmax_row(row, nk, vis);
                    a->lse[(size_t)h * a->n_q + i0 + r] = l;
                    stats_row(&st, h, i0 + r, raw, l, ws);
                }
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nb, d, nk, 1.0f, S, nk, a->v + (size_t)g * d,
                            (int)a->kv_stride, 0.0f, a->out + (size_t)i0 * H * d + (size_t)h * d, H * d);
            }
        }
        mass_ws_free(ws);
        kv_free_aligned(S);
    }
    kv_blas_set_threads(old);
    if (rc != KV_OK)
        return kv_error(rc, "attention: out of memory for %d keys", nk_all);
    return KV_OK;
}

static int check_qk(const kv_qk_args_t *a, const char *op)
{
    if (a->n_heads <= 0 || a->n_kv_heads <= 0 || a->n_heads % a->n_kv_heads || a->head_dim <= 0 || a->n_q < 0 ||
        a->n_k < 0 || a->q_pos0 < 0)
        return kv_error(KV_EINVAL, "%s: bad shape (heads %d/%d, head_dim %d, n_q %d, n_k %d, q_pos0 %d)", op,
                        a->n_heads, a->n_kv_heads, a->head_dim, a->n_q, a->n_k, a->q_pos0);
    return KV_OK;
}

static inline int visible(const kv_qk_args_t *a, int i)
{
    if (!a->causal)
        return a->n_k;
    int v = a->q_pos0 + i + 1;
    return v < a->n_k ? v : a->n_k;
}

static int cpu_attn_probs(kv_backend_t *be, const kv_qk_args_t *a, float *probs, float *lse)
{
    (void)be;
    int rc = check_qk(a, "attn_probs");
    if (rc)
        return rc;
    if (a->n_q == 0 || a->n_k == 0)
        return KV_OK;
    const int G = a->n_heads / a->n_kv_heads, d = a->head_dim;
    int old = kv_blas_set_threads(1);
#pragma omp parallel for schedule(dynamic, 1)
    for (int h = 0; h < a->n_heads; h++) {
        float *P = probs + (size_t)h * a->n_q * a->n_k;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, a->n_q, a->n_k, d, a->scale,
                    a->q + (size_t)h * a->q_head_stride, d, a->k + (size_t)(h / G) * a->k_head_stride, d, 0.0f, P,
                    a->n_k);
        for (int i = 0; i < a->n_q; i++) {
            int vis = visible(a, i);
            float l = vis > 0 ? softmax_row(P + (size_t)i * a->n_k, a->n_k, vis) : -INFINITY;
            if (lse)
                lse[(size_t)h * a->n_q + i] = l;
        }
    }
    kv_blas_set_threads(old);
    return KV_OK;
}

/* Column statistics in blocks of CS_QB queries. For each block, the scores S = scale Q_blk K^T over the
 * keys it sees are made CS_CT keys at a time (one sgemm per tile, into the block's rows at the tile's
 * columns) and each tile is turned into exp(s - m_tile) with its own row maxima while it is still in
 * the cache (the row's sum is carried from tile to tile, rescaled when its running max grows); keys a
 * query does not see become 0. Then the columns are reduced across the block's rows, CS_VW keys at a
 * time in vector registers, with p = e * exp(m_tile - m_row) / sum_row formed on the fly, and added to
 * the outputs once per block (not once per row: per-row passes that read and wrote the (n_k) outputs
 * for every query were half of the old kernel's time, and a separate max pass over a whole row of
 * scores another quarter). One thread per head, so every sum has a fixed order whatever the thread
 * count. */
#define CS_QB 64
#define CS_CT 1024

/* Add the block's columns [j0, j1) to the outputs: p[r][j] = S[r][j] * w[r] (w: the row's scale for
 * this tile). */
static void colstats_block(const float *S, size_t ld, int nb, int j0, int j1, const float *w, float *sum, float *sq,
                           float *mx)
{
    int j = j0;
    for (; j + KV_VL <= j1; j += KV_VL) {
        kv_vf vs = {0}, vq = {0}, vm = {0};
        for (int r = 0; r < nb; r++) {
            kv_vf e;
            memcpy(&e, S + (size_t)r * ld + j, sizeof e);
            const kv_vf p = e * w[r];
            vs += p;
            vq += p * p;
            vm = vsel(p > vm, p, vm);
        }
        if (sum) {
            kv_vf o;
            memcpy(&o, sum + j, sizeof o);
            o += vs;
            memcpy(sum + j, &o, sizeof o);
        }
        if (sq) {
            kv_vf o;
            memcpy(&o, sq + j, sizeof o);
            o += vq;
            memcpy(sq + j, &o, sizeof o);
        }
        if (mx) {
            kv_vf o;
            memcpy(&o, mx + j, sizeof o);
            o = vsel(vm > o, vm, o);
            memcpy(mx + j, &o, sizeof o);
        }
    }
    for (; j < j1; j++) {
        float fs = 0, fq = 0, fm = 0;
        for (int r = 0; r < nb; r++) {
            const float p = S[(size_t)r * ld + j] * w[r];
            fs += p;
            fq += p * p;
            fm = p > fm ? p : fm;
        }
        if (sum)
            sum[j] += fs;
        if (sq)
            sq[j] += fq;
        if (mx)
            mx[j] = fm > mx[j] ? fm : mx[j];
    }
}

static int cpu_attn_colstats(kv_backend_t *be, const kv_qk_args_t *a, const kv_colstats_out_t *o)
{
    (void)be;
    int rc = check_qk(a, "attn_colstats");
    if (rc)
        return rc;
    const int G = a->n_heads / a->n_kv_heads, d = a->head_dim, nk = a->n_k;
    for (int h = 0; h < a->n_heads; h++) {
        if (o->sum)
            memset(o->sum + (size_t)h * nk, 0, sizeof(float) * nk);
        if (o->sumsq)
            memset(o->sumsq + (size_t)h * nk, 0, sizeof(float) * nk);
        if (o->max)
            memset(o->max + (size_t)h * nk, 0, sizeof(float) * nk);
    }
    if (a->n_q == 0 || nk == 0)
        return KV_OK;
    const int qb = CS_QB, n_tiles = (nk + CS_CT - 1) / CS_CT;
    int old = kv_blas_set_threads(1);
#pragma omp parallel
    {
        float *S = kv_malloc_aligned(sizeof(float) * (size_t)qb * (size_t)nk, "colstats scores");
        float *mt = kv_malloc(sizeof(float) * (size_t)qb * n_tiles, "colstats tile maxima"); /* (qb, n_tiles) */
        if (!S || !mt) {
#pragma omp atomic write
            rc = KV_ENOMEM;
        }
#pragma omp for schedule(dynamic, 1)
        for (int h = 0; h < a->n_heads; h++) {
            if (!S || !mt)
                continue;
            float *sum = o->sum ? o->sum + (size_t)h * nk : NULL;
            float *sq = o->sumsq ? o->sumsq + (size_t)h * nk : NULL;
            float *mx = o->max ? o->max + (size_t)h * nk : NULL;
            float m_row[CS_QB], w[CS_QB];
            double z_row[CS_QB];
            int vis[CS_QB];
            for (int i0 = 0; i0 < a->n_q; i0 += qb) {
                const int nb = KV_MIN(qb, a->n_q - i0);
                const int ncols = a->causal ? KV_MIN(nk, a->q_pos0 + i0 + nb) : nk;
                if (ncols <= 0)
                    continue;
                for (int r = 0; r < nb; r++) {
                    vis[r] = visible(a, i0 + r);
                    m_row[r] = -INFINITY;
                    z_row[r] = 0;
                }
                const int nt = (ncols + CS_CT - 1) / CS_CT;
                for (int t = 0; t < nt; t++) {
                    const int c0 = t * CS_CT, ct = KV_MIN(CS_CT, ncols - c0);
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nb, ct, d, a->scale,
                                a->q + (size_t)h * a->q_head_stride + (size_t)i0 * d, d,
                                a->k + (size_t)(h / G) * a->k_head_stride + (size_t)c0 * d, d, 0.0f, S + c0, ncols);
                    for (int r = 0; r < nb; r++) {
                        float *p = S + (size_t)r * ncols + c0;
                        const int v = KV_MAX(0, KV_MIN(ct, vis[r] - c0)); /* keys of the tile the query sees */
                        float m = -INFINITY;
                        if (v > 0) {
                            m = row_max(p, v);
                            const double zt = exp_sum(p, v, m);
                            if (m > m_row[r]) {
                                z_row[r] = z_row[r] * exp((double)m_row[r] - m) + zt;
                                m_row[r] = m;
                            } else {
                                z_row[r] += zt * exp((double)m - m_row[r]);
                            }
                        }
                        mt[(size_t)r * n_tiles + t] = m;
                        for (int j = v; j < ct; j++)
                            p[j] = 0.0f; /* keys the query does not see */
                    }
                }
                for (int t = 0; t < nt; t++) {
                    for (int r = 0; r < nb; r++) {
                        const float m = mt[(size_t)r * n_tiles + t];
                        w[r] = m == -INFINITY ? 0.0f : (float)(exp((double)m - m_row[r]) / z_row[r]);
                    }
                    colstats_block(S, (size_t)ncols, nb, t * CS_CT, KV_MIN(ncols, (t + 1) * CS_CT), w, sum, sq, mx);
                }
            }
        }
        kv_free(mt);
        kv_free_aligned(S);
    }
    kv_blas_set_threads(old);
    if (rc != KV_OK)
        return kv_error(rc, "attn_colstats: out of memory for %d keys", nk);
    return KV_OK;
}

/* ---- attention over a ragged cache (closed-loop evaluation) */

/* Entries of p[0, n) (ascending) at positions <= x. */
static int count_upto(const int32_t *p, int n, int32_t x)
{
    int lo = 0, hi = n;
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (p[mid] <= x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* cpu_attention's computation on a gathered cache: per query head and block of ATT_QB queries, one
 * sgemm for the scores over the entries the block's last query sees, softmax_row over each query's
 * visible prefix, one sgemm for the output. The query head's own entries only, so the bits do not
 * depend on n_store. */
static int cpu_attn_ragged(kv_backend_t *be, const kv_attn_ragged_args_t *a)
{
    (void)be;
    const int H = a->n_heads, d = a->head_dim, S = a->n_store;
    if (H <= 0 || d <= 0 || S <= 0 || H % S || a->n_q < 0 || a->cap < 0)
        return kv_error(KV_EINVAL, "attn_ragged: %d heads over %d storage heads, head_dim %d, %d queries, capacity %d",
                        H, S, d, a->n_q, a->cap);
    for (int s = 0; s < S; s++)
        if (a->len[s] < 0 || a->len[s] > a->cap)
            return kv_error(KV_EINVAL, "attn_ragged: storage head %d holds %d entries (capacity %d)", s, a->len[s],
                            a->cap);
    const int G = H / S;
    int rc = KV_OK;
    int old = kv_blas_set_threads(1);
#pragma omp parallel
    {
        float *Sc = kv_malloc_aligned(sizeof(float) * ATT_QB * (size_t)(a->cap ? a->cap : 1), "attention scores");
        if (!Sc) {
#pragma omp atomic write
            rc = KV_ENOMEM;
        }
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (int h = 0; h < H; h++)
            for (int i0 = 0; i0 < a->n_q; i0 += ATT_QB) {
                if (!Sc)
                    continue;
                const int s = h / G, nb = KV_MIN(ATT_QB, a->n_q - i0);
                const int32_t *P = a->pos + (size_t)s * a->cap;
                const float *K = a->k + (size_t)s * a->cap * d, *V = a->v + (size_t)s * a->cap * d;
                const int nk = count_upto(P, a->len[s], a->q_pos0 + i0 + nb - 1); /* seen by the block's last */
                float *O = a->out + (size_t)i0 * H * d + (size_t)h * d;
                if (nk == 0) {
                    for (int r = 0; r < nb; r++) {
                        memset(O + (size_t)r * H * d, 0, sizeof(float) * (size_t)d);
                        if (a->lse)
                            a->lse[(size_t)h * a->n_q + i0 + r] = -INFINITY;
                    }
                    continue;
                }
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nb, nk, d, a->scale,
                            a->q + (size_t)i0 * H * d + (size_t)h * d, H * d, K, d, 0.0f, Sc, nk);
                for (int r = 0; r < nb; r++) {
                    const int vis = count_upto(P, nk, a->q_pos0 + i0 + r);
                    float *row = Sc + (size_t)r * nk;
                    float l = -INFINITY;
                    if (vis > 0)
                        l = softmax_row(row, nk, vis);
                    else
                        memset(row, 0, sizeof(float) * (size_t)nk);
                    if (a->lse)
                        a->lse[(size_t)h * a->n_q + i0 + r] = l;
                }
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nb, d, nk, 1.0f, Sc, nk, V, d, 0.0f, O, H * d);
            }
        kv_free_aligned(Sc);
    }
    kv_blas_set_threads(old);
    if (rc != KV_OK)
        return kv_error(rc, "attn_ragged: out of memory for %d entries", a->cap);
    return KV_OK;
}

static const kv_backend_ops_t cpu_ops = {
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .sync = cpu_sync,
    .matmul = cpu_matmul,
    .matmul_w = cpu_matmul_w,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .swiglu = cpu_swiglu,
    .add = cpu_add,
    .add_bias = cpu_add_bias,
    .attention = cpu_attention,
    .attn_stats = cpu_attn_stats,
    .attn_probs = cpu_attn_probs,
    .attn_colstats = cpu_attn_colstats,
    .attn_ragged = cpu_attn_ragged,
};

int kv_backend_cpu_open(int n_threads, kv_backend_t **out)
{
    *out = NULL;
    kv_backend_t *be = kv_calloc(1, sizeof *be, "backend");
    cpu_ctx_t *ctx = kv_calloc(1, sizeof *ctx, "cpu backend");
    if (!be || !ctx) {
        kv_free(be);
        kv_free(ctx);
        return KV_ENOMEM;
    }
    if (n_threads <= 0) {
        const char *env = getenv("KV_THREADS");
        n_threads = env ? atoi(env) : 0;
    }
    if (n_threads <= 0)
        n_threads = omp_get_num_procs();
    omp_set_num_threads(n_threads);
    openblas_set_num_threads(n_threads);
    be->name = "cpu";
    be->ops = &cpu_ops;
    be->n_threads = n_threads;
    be->host_memory = 1;
    be->ctx = ctx;
    snprintf(be->device, sizeof be->device, "%d CPU thread%s, %s", n_threads, n_threads == 1 ? "" : "s",
             openblas_get_config());
    *out = be;
    return KV_OK;
}
