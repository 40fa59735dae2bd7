/*
 * expected_attention.c: Expected Attention (Devoto et al., "Expected Attention: KV Cache Compression
 * by Estimating Attention from Future Queries Distribution", arXiv:2510.00636; kvpress's own press,
 * kvpress/presses/expected_attention_press.py, ExpectedAttentionPress; docs/POLICIES.md §2.11).
 * Query-agnostic: the future queries are modelled as a Gaussian fitted to the context's queries, and
 * a key is scored by the attention it would receive in expectation.
 *
 * Per layer and query head h, n = context length, s = sinks:
 *   1. pre-RoPE queries q_i of the context positions [s, n): the trace holds post-RoPE queries, so
 *      each is rotated back by its recorded position (plain RoPE with the trace's rope_theta);
 *      mean mu and covariance Sigma = sum (q - mu)(q - mu)^T / (n - s) (biased, as kvpress);
 *   2. the average rotation over the next `future` positions, Rbar = mean_{p = n .. n + future - 1}
 *      R(p) (kvpress's position ids arange(q_len, q_len + n_future_positions)); mu' = Rbar mu,
 *      Sigma' = Rbar Sigma Rbar^T;
 *   3. for every post-RoPE key k_j, j in [s, n): z_j = mu'.k_j / sqrt(d) + k_j^T Sigma' k_j / (2 d)
 *      (the log of E[exp(q.k / sqrt(d))] for a Gaussian q; cov=0 drops the second term), and
 *      p = softmax_j(z) over [s, n);
 *   4. score = (p + epsilon) ||v_j||_2 (vnorm=1; with vnorm=0 just p), averaged over the group
 *      (agg=mean: the engine's group mean of (p_h + eps)||v|| is kvpress's (mean p + eps)||v||);
 *   the first s tokens are kept first (kvpress pads them with max + 1).
 * Defaults = kvpress's: future 512, sinks 4, cov 1, vnorm 1, epsilon 0. The kvpress leaderboard's
 * "expected_attention" is AdaKVPress(ExpectedAttentionPress(epsilon=1e-2)): the preset
 * adakv@kvpress_expected_attention. Preset expected_attention@kvpress (tie=torch).
 * A one-shot token scorer: usable inside adakv, chunkkv, criticalkv, decoding.
 * Deviations: the un-rotation assumes plain RoPE: a trace records rope_theta but not a llama3 or
 * linear scaling, so on such a model the pre-RoPE statistics are approximate (kvpress reads the
 * pre-RoPE queries from q_proj); a trace with rope_theta 0 (synthetic) is taken as un-rotated and
 * Rbar = identity. Statistics in double (kvpress: the model dtype), with double BLAS (syrk for the
 * covariance, gemm for K Sigma'); heads in parallel, BLAS single-threaded, so the sums do not depend
 * on the thread count.
 */
#include "kernels/kv_backend.h"
#include "kernels/kv_rope.h"
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <string.h>

static const kv_param_def_t params[] = {
    {"future", KV_PARAM_INT, "512", 1, 1 << 24, NULL, "future positions the rotation is averaged over"},
    {"sinks", KV_PARAM_INT, "4", 0, 1 << 20, NULL, "initial tokens kept first and left out of the statistics"},
    {"cov", KV_PARAM_BOOL, "1", 0, -1, NULL, "use the queries' covariance (0: the mean only)"},
    {"vnorm", KV_PARAM_BOOL, "1", 0, -1, NULL, "multiply by the value's L2 norm"},
    {"epsilon", KV_PARAM_FLOAT, "0", 0, 1e9, NULL, "added to the expected attention before the value norm"},
    KV_PARAM_TIE,
};

static const kv_preset_t presets[] = {
    {"kvpress", "future=512,sinks=4,cov=1,vnorm=1,epsilon=0,tie=torch,gran=kv,agg=mean",
     "NVIDIA kvpress 0.5.5 ExpectedAttentionPress"},
};

static int ea_init(kv_policy_t *p)
{
    kv_policy_read_tie(p);
    return KV_OK;
}

/* Rbar (d x d, row major) for the block-diagonal rotations of positions [p0, p0 + np). */
static void mean_rotation(const kv_rope_t *rope, int d, int p0, int np, double *R)
{
    memset(R, 0, sizeof(double) * (size_t)d * d);
    for (int i = 0; i + 1 < d; i += 2) {
        double cs = 0, sn = 0;
        if (rope->theta > 0) {
            const double f = kv_rope_freq(rope, i, d);
            for (int t = 0; t < np; t++) {
                cs += cos((double)(p0 + t) * f);
                sn += sin((double)(p0 + t) * f);
            }
            cs /= np;
            sn /= np;
        } else {
            cs = 1;
        }
        R[(size_t)i * d + i] = cs;
        R[(size_t)i * d + i + 1] = -sn;
        R[(size_t)(i + 1) * d + i] = sn;
        R[(size_t)(i + 1) * d + i + 1] = cs;
    }
    if (d % 2)
        R[(size_t)(d - 1) * d + d - 1] = 1;
}

/* Scores of query head h into out (n): steps 1-4 above. qd and ks are (m, d) scratch, cov and tmp
 * (d, d), mu (2d); cs/sn the un-rotation of position s + i at [i * d/2 + x/2] (NULL: none); kd the
 * keys of h's group in double (n, d); vn its value norms (n). Single-threaded BLAS. */
static void ea_head(const kv_layer_ctx_t *c, int h, int s, int use_cov, int use_vn, double eps, const double *R,
                    const double *cs, const double *sn, const double *kd, const float *vn, double *qd, double *ks,
                    double *cov, double *tmp, double *mu, double *z, float *out)
{
    const int n = c->n_ctx, d = c->d, m = n - s, hd = d / 2;
    /* 1. pre-RoPE queries, their mean and covariance */
    double *mu0 = mu, *mu1 = mu + d;
    memset(mu0, 0, sizeof(double) * (size_t)d);
    for (int i = 0; i < m; i++) {
        const float *src = kv_ctx_query(c, h, s + i);
        double *dst = qd + (size_t)i * d;
        for (int x = 0; x + 1 < d; x += 2) {
            const double cc = cs ? cs[(size_t)i * hd + x / 2] : 1.0, ss = cs ? sn[(size_t)i * hd + x / 2] : 0.0;
            dst[x] = src[x] * cc + src[x + 1] * ss; /* R(pos)^T */
            dst[x + 1] = -src[x] * ss + src[x + 1] * cc;
        }
        if (d % 2)
            dst[d - 1] = src[d - 1];
        for (int x = 0; x < d; x++)
            mu0[x] += dst[x];
    }
    for (int x = 0; x < d; x++)
        mu0[x] /= m;
    /* 2. mu' = Rbar mu, Sigma' = Rbar Sigma Rbar^T (Sigma biased: / m) */
    cblas_dgemv(CblasRowMajor, CblasNoTrans, d, d, 1.0, R, d, mu0, 1, 0.0, mu1, 1);
    if (use_cov) {
        for (int i = 0; i < m; i++)
            for (int x = 0; x < d; x++)
                qd[(size_t)i * d + x] -= mu0[x];
        cblas_dsyrk(CblasRowMajor, CblasLower, CblasTrans, d, m, 1.0 / m, qd, d, 0.0, cov, d);
        for (int a = 0; a < d; a++)
            for (int b = 0; b < a; b++)
                cov[(size_t)b * d + a] = cov[(size_t)a * d + b];
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d, d, d, 1.0, R, d, cov, d, 0.0, tmp, d);
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, d, d, d, 1.0, tmp, d, R, d, 0.0, cov, d);
    }
    /* 3. expected logits z_j = mu'.k_j / sqrt(d) + k_j^T Sigma' k_j / (2d) and their softmax over [s, n) */
    const double *K = kd + (size_t)s * d;
    cblas_dgemv(CblasRowMajor, CblasNoTrans, m, d, 1.0 / sqrt((double)d), K, d, mu1, 1, 0.0, z + s, 1);
    if (use_cov) {
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, d, d, 1.0, K, d, cov, d, 0.0, ks, d);
        for (int i = 0; i < m; i++) {
            double b = 0;
            for (int x = 0; x < d; x++)
                b += ks[(size_t)i * d + x] * K[(size_t)i * d + x];
            z[s + i] += b / d / 2;
        }
    }
    double top = -INFINITY;
    for (int j = s; j < n; j++)
        top = fmax(top, z[j]);
    double zs = 0;
    for (int j = s; j < n; j++)
        zs += (z[j] = exp(z[j] - top));
    /* 4. times the value norm */
    memset(out, 0, sizeof(float) * (size_t)s);
    for (int j = s; j < n; j++) {
        const double pj = z[j] / zs;
        out[j] = (float)(use_vn ? (pj + eps) * vn[j] : pj);
    }
}

static int ea_prepare(kv_policy_t *p, kv_layer_ctx_t *c)
{
    const int n = c->n_ctx, d = c->d, T = c->T;
    const int s = KV_MIN((int)kv_params_int(&p->params, "sinks"), n), m = n - s;
    if (m > 0 && s < c->q0)
        return kv_error(KV_EUNAVAIL,
                        "expected_attention reads the prompt queries from token %d on, and this lean trace stores "
                        "them from token %d on only (captured with --q-tail %d)",
                        s, c->q0, c->meta ? c->meta->n_prompt - c->q0 : c->n_ctx - c->q0);
    const int use_cov = kv_params_bool(&p->params, "cov"), use_vn = kv_params_bool(&p->params, "vnorm");
    const double eps = kv_params_float(&p->params, "epsilon");
    const kv_rope_t rope = kv_rope_plain(c->meta->rope_theta > 0 ? c->meta->rope_theta : 0.0);
    const size_t dd = (size_t)d * d, hd = (size_t)d / 2;
    const int nt = omp_get_max_threads();
    double *R = kv_malloc(sizeof(double) * dd, "rotation");
    double *kd = kv_malloc(sizeof(double) * (size_t)c->Hkv * (n ? n : 1) * d, "keys in double"); /* (Hkv, n, d) */
    float *vn = kv_malloc(sizeof(float) * (size_t)c->Hkv * (n ? n : 1), "value norms");          /* (Hkv, n) */
    double *cs = NULL, *sn = NULL;
    /* per thread: queries then K Sigma' (m, d), covariance and scratch (d, d) x 2, means (2d), logits (n) */
    const size_t per = (size_t)(m > 0 ? m : 1) * d + 2 * dd + 2 * (size_t)d + (size_t)(n ? n : 1);
    double *scratch = kv_malloc(sizeof(double) * per * (size_t)nt, "expected attention scratch");
    int rc = KV_OK;
    if (!R || !kd || !vn || !scratch) {
        rc = KV_ENOMEM;
        goto done;
    }
    if (rope.theta > 0 && m > 0) { /* the un-rotation of every context position, shared by the heads */
        cs = kv_malloc(sizeof(double) * (size_t)m * hd, "rotations");
        sn = kv_malloc(sizeof(double) * (size_t)m * hd, "rotations");
        if (!cs || !sn) {
            rc = KV_ENOMEM;
            goto done;
        }
        for (int i = 0; i < m; i++) {
            const double pos = c->meta->positions ? c->meta->positions[s + i] : s + i;
            for (size_t x = 0; x < hd; x++) {
                const double a = pos * kv_rope_freq(&rope, (int)(2 * x), d);
                cs[(size_t)i * hd + x] = cos(a);
                sn[(size_t)i * hd + x] = sin(a);
            }
        }
    }
    mean_rotation(&rope, d, c->meta->positions ? c->meta->positions[n - 1] + 1 : n,
                  (int)kv_params_int(&p->params, "future"), R);
    for (int g = 0; g < c->Hkv; g++)
        for (int j = 0; j < n; j++) {
            const float *v = c->v + ((size_t)g * T + j) * d, *k = c->k + ((size_t)g * T + j) * d;
            double a = 0;
            for (int x = 0; x < d; x++) {
                a += (double)v[x] * v[x];
                kd[((size_t)g * n + j) * d + x] = k[x];
            }
            vn[(size_t)g * n + j] = (float)sqrt(a);
        }
    /* heads in parallel, each with single-threaded BLAS: the same sums whatever the thread count */
    const int old = kv_blas_set_threads(1);
#pragma omp parallel for schedule(dynamic, 1)
    for (int h = 0; h < c->H; h++) {
        float *out = p->qscores + (size_t)h * n;
        if (m <= 0) {
            memset(out, 0, sizeof(float) * (size_t)n);
            continue;
        }
        double *w = scratch + per * (size_t)omp_get_thread_num();
        double *qd = w, *cov = qd + (size_t)m * d, *tmp = cov + dd, *mu = tmp + dd, *z = mu + 2 * (size_t)d;
        const int g = h / c->G;
        ea_head(c, h, s, use_cov, use_vn, eps, R, cs, sn, kd + (size_t)g * n * d, vn + (size_t)g * n, qd, qd, cov, tmp,
                mu, z, out);
    }
    kv_blas_set_threads(old);
    p->protect_first = s;
    p->scored = 1;
done:
    kv_free(R), kv_free(kd), kv_free(vn), kv_free(cs), kv_free(sn), kv_free(scratch);
    return rc;
}

const kv_policy_desc_t kv_policy_expected_attention = {
    .name = "expected_attention",
    .doc = "expected attention of future queries modelled as a Gaussian fitted to the context's queries, "
           "times the value norm (Devoto et al. 2025, kvpress)",
    .paper = "arXiv:2510.00636",
    .code = "NVIDIA/kvpress kvpress/presses/expected_attention_press.py",
    .params = params,
    .n_params = (int)KV_ARRAY_LEN(params),
    .presets = presets,
    .n_presets = (int)KV_ARRAY_LEN(presets),
    .flags = KV_POL_ONESHOT | KV_POL_NESTED | KV_POL_SCORER,
    .variants = "cov=0;vnorm=0,sinks=0;epsilon=0.01,future=16,tie=torch",
    .init = ea_init,
    .prepare = ea_prepare,
};
