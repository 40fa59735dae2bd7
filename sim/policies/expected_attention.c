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
 * Rbar = identity. Statistics in double (kvpress: the model dtype).
 */
#include "kernels/kv_rope.h"
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"

#include <math.h>
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
    const size_t dd = (size_t)d * d;
    double *R = kv_malloc(sizeof(double) * dd, "rotation"), *cov = kv_malloc(sizeof(double) * dd, "covariance");
    double *tmp = kv_malloc(sizeof(double) * dd, "covariance"), *mu = kv_malloc(sizeof(double) * 2 * d, "mean");
    double *q = kv_malloc(sizeof(double) * (size_t)(m ? m : 1) * d, "pre-RoPE queries"); /* (m, d) */
    double *z = kv_malloc(sizeof(double) * (size_t)(n ? n : 1), "expected logits");
    float *vn = kv_malloc(sizeof(float) * (size_t)c->Hkv * (n ? n : 1), "value norms"); /* (Hkv, n) */
    int rc = KV_OK;
    if (!R || !cov || !tmp || !mu || !q || !z || !vn) {
        rc = KV_ENOMEM;
        goto done;
    }
    mean_rotation(&rope, d, c->meta->positions ? c->meta->positions[n - 1] + 1 : n,
                  (int)kv_params_int(&p->params, "future"), R);
    for (int g = 0; g < c->Hkv; g++)
        for (int j = 0; j < n; j++) {
            const float *v = c->v + ((size_t)g * T + j) * d;
            double a = 0;
            for (int x = 0; x < d; x++)
                a += (double)v[x] * v[x];
            vn[(size_t)g * n + j] = (float)sqrt(a);
        }
    for (int h = 0; h < c->H; h++) {
        float *out = p->qscores + (size_t)h * n;
        memset(out, 0, sizeof(float) * (size_t)n);
        if (m <= 0)
            continue;
        /* 1. pre-RoPE queries, their mean and covariance */
        double *mu0 = mu, *mu1 = mu + d;
        memset(mu0, 0, sizeof(double) * (size_t)d);
        for (int i = 0; i < m; i++) {
            const float *src = kv_ctx_query(c, h, s + i);
            double *dst = q + (size_t)i * d;
            const double pos = c->meta->positions ? c->meta->positions[s + i] : s + i;
            for (int x = 0; x + 1 < d; x += 2) {
                const double a = rope.theta > 0 ? pos * kv_rope_freq(&rope, x, d) : 0.0, cs = cos(a), sn = sin(a);
                dst[x] = src[x] * cs + src[x + 1] * sn; /* R(pos)^T */
                dst[x + 1] = -src[x] * sn + src[x + 1] * cs;
            }
            if (d % 2)
                dst[d - 1] = src[d - 1];
            for (int x = 0; x < d; x++)
                mu0[x] += dst[x];
        }
        for (int x = 0; x < d; x++)
            mu0[x] /= m;
        if (use_cov) {
            memset(cov, 0, sizeof(double) * dd);
            for (int i = 0; i < m; i++) {
                const double *r = q + (size_t)i * d;
                for (int a = 0; a < d; a++) {
                    const double ca = r[a] - mu0[a];
                    for (int b = 0; b <= a; b++)
                        cov[(size_t)a * d + b] += ca * (r[b] - mu0[b]);
                }
            }
            for (int a = 0; a < d; a++)
                for (int b = 0; b <= a; b++)
                    cov[(size_t)b * d + a] = (cov[(size_t)a * d + b] /= m);
        }
        /* 2. mu' = Rbar mu, Sigma' = Rbar Sigma Rbar^T */
        for (int a = 0; a < d; a++) {
            double t = 0;
            for (int b = 0; b < d; b++)
                t += R[(size_t)a * d + b] * mu0[b];
            mu1[a] = t;
        }
        if (use_cov) {
            for (int a = 0; a < d; a++)
                for (int b = 0; b < d; b++) {
                    double t = 0;
                    for (int x = 0; x < d; x++)
                        t += R[(size_t)a * d + x] * cov[(size_t)x * d + b];
                    tmp[(size_t)a * d + b] = t;
                }
            for (int a = 0; a < d; a++)
                for (int b = 0; b < d; b++) {
                    double t = 0;
                    for (int x = 0; x < d; x++)
                        t += tmp[(size_t)a * d + x] * R[(size_t)b * d + x];
                    cov[(size_t)a * d + b] = t;
                }
        }
        /* 3. expected logits and their softmax over [s, n) */
        const int g = h / c->G;
        double top = -INFINITY;
        for (int j = s; j < n; j++) {
            const float *k = c->k + ((size_t)g * T + j) * d;
            double a = 0, b = 0;
            for (int x = 0; x < d; x++)
                a += mu1[x] * k[x];
            if (use_cov)
                for (int x = 0; x < d; x++) {
                    double t = 0;
                    for (int y = 0; y < d; y++)
                        t += cov[(size_t)x * d + y] * k[y];
                    b += k[x] * t;
                }
            z[j] = a / sqrt((double)d) + b / d / 2;
            top = fmax(top, z[j]);
        }
        double zs = 0;
        for (int j = s; j < n; j++)
            zs += (z[j] = exp(z[j] - top));
        /* 4. times the value norm */
        for (int j = s; j < n; j++) {
            const double pj = z[j] / zs;
            out[j] = (float)(use_vn ? (pj + eps) * vn[(size_t)g * n + j] : pj);
        }
    }
    p->protect_first = s;
    p->scored = 1;
done:
    kv_free(R), kv_free(cov), kv_free(tmp), kv_free(mu), kv_free(q), kv_free(z), kv_free(vn);
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
