/* metrics.c: see metrics.h. */
#include "sim/metrics.h"

#include "sim/common/kv_common.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

int kv_bound_violated(double err, double bound, double F, double C, int d)
{
    double tol = bound * KV_BOUND_RTOL + KV_BOUND_ATOL * d * C / (F > 1e-30 ? F : 1e-30);
    return err > bound + tol;
}

void kv_metrics_layer_free(kv_metrics_layer_t *m)
{
    if (!m)
        return;
    kv_free(m->o_full);
    kv_free(m->o_app);
    kv_free(m->p_app);
    kv_free(m->vnorm);
    kv_free(m->C);
    kv_free(m->C_wo);
    memset(m, 0, sizeof *m);
}

int kv_metrics_layer_init(kv_metrics_layer_t *m, const kv_layer_ctx_t *c)
{
    memset(m, 0, sizeof *m);
    m->c = c;
    const int H = c->H, Hkv = c->Hkv, G = c->G, d = c->d, T = c->T, n = c->n_ctx, E = c->n_eval;
    m->o_full = kv_malloc(sizeof(float) * (size_t)H * E * d, "head outputs");
    m->o_app = kv_calloc((size_t)H * E * d, sizeof(float), "appended outputs");
    m->p_app = kv_calloc((size_t)H * E, sizeof(double), "appended mass");
    m->vnorm = kv_malloc(sizeof(float) * (size_t)Hkv * T, "value norms");
    m->C = kv_malloc(sizeof(float) * (size_t)Hkv, "value norm max");
    if (!m->o_full || !m->o_app || !m->p_app || !m->vnorm || !m->C) {
        kv_metrics_layer_free(m);
        return KV_ENOMEM;
    }
    for (int g = 0; g < Hkv; g++) {
        float cmax = 0;
        for (int j = 0; j < T; j++) {
            const float *vj = c->v + ((size_t)g * T + j) * d;
            double s = 0;
            for (int x = 0; x < d; x++)
                s += fabsf(vj[x]);
            m->vnorm[(size_t)g * T + j] = (float)s;
            cmax = (float)s > cmax ? (float)s : cmax;
        }
        m->C[g] = cmax;
    }
    int old = kv_blas_set_threads(1);
#pragma omp parallel for schedule(dynamic, 1)
    for (int h = 0; h < H; h++) {
        const float *V = c->v + (size_t)(h / G) * T * d;
        const float *P = c->p_eval + (size_t)h * E * T;
        /* o = P V over all T keys (masked entries of P are 0) */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, E, d, T, 1.0f, P, T, V, d, 0.0f,
                    m->o_full + (size_t)h * E * d, d);
        for (int e = 0; e < E; e++) {
            const float *p = P + (size_t)e * T;
            float *oa = m->o_app + ((size_t)h * E + e) * d;
            double pa = 0;
            for (int j = n; j <= n + e; j++) {
                pa += p[j];
                const float *vj = V + (size_t)j * d;
                for (int x = 0; x < d; x++)
                    oa[x] += p[j] * vj[x];
            }
            m->p_app[(size_t)h * E + e] = pa;
        }
    }
    kv_blas_set_threads(old);
    if (c->wo && c->meta->model_dim > 0) {
        const int D = c->meta->model_dim;
        m->model_dim = D;
        m->C_wo = kv_malloc(sizeof(float) * (size_t)H, "W_O norms");
        float *tmp = kv_malloc(sizeof(float) * (size_t)T * D, "W_O products");
        if (!m->C_wo || !tmp) {
            kv_free(tmp);
            kv_metrics_layer_free(m);
            return KV_ENOMEM;
        }
        for (int h = 0; h < H; h++) {
            /* (T, D) = V_g (T, d) . (W_O^h)^T, W_O^h = wo[:, h*d:(h+1)*d] with row stride H*d */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, D, d, 1.0f, c->v + (size_t)(h / G) * T * d, d,
                        c->wo + (size_t)h * d, H * d, 0.0f, tmp, D);
            float cmax = 0;
            for (int j = 0; j < T; j++) {
                double s = 0;
                for (int x = 0; x < D; x++)
                    s += fabsf(tmp[(size_t)j * D + x]);
                cmax = (float)s > cmax ? (float)s : cmax;
            }
            m->C_wo[h] = cmax;
        }
        kv_free(tmp);
    }
    return KV_OK;
}

int kv_metrics_oneshot(const kv_metrics_layer_t *m, int h0, int nh, const uint8_t *mask, float *recall, float *err,
                       float *bound, float *evec)
{
    const kv_layer_ctx_t *c = m->c;
    const int d = c->d, T = c->T, n = c->n_ctx, E = c->n_eval, g = h0 / c->G;
    int n_keep = 0;
    for (int j = 0; j < n; j++)
        n_keep += mask[j] != 0;
    const int use_kept = n_keep <= n - n_keep;
    const int msub = use_kept ? n_keep : n - n_keep;
    int *idx = kv_malloc(sizeof(int) * (size_t)(msub ? msub : 1), "metric indices");
    float *Vs = kv_malloc(sizeof(float) * (size_t)(msub ? msub : 1) * d, "metric values");
    float *Ps = kv_malloc(sizeof(float) * (size_t)(msub ? msub : 1) * E, "metric probabilities");
    float *Os = kv_malloc(sizeof(float) * (size_t)E * d, "metric outputs");
    float *ev = kv_malloc(sizeof(float) * (size_t)d, "error vector");
    if (!idx || !Vs || !Ps || !Os || !ev) {
        kv_free(idx);
        kv_free(Vs);
        kv_free(Ps);
        kv_free(Os);
        kv_free(ev);
        return KV_ENOMEM;
    }
    int k = 0;
    for (int j = 0; j < n; j++)
        if ((mask[j] != 0) == use_kept)
            idx[k++] = j;
    const float *V = c->v + (size_t)g * T * d;
    for (int r = 0; r < msub; r++)
        memcpy(Vs + (size_t)r * d, V + (size_t)idx[r] * d, sizeof(float) * d);
    for (int hh = 0; hh < nh; hh++) {
        const int h = h0 + hh;
        const float *P = c->p_eval + (size_t)h * E * T;
        for (int e = 0; e < E; e++)
            for (int r = 0; r < msub; r++)
                Ps[(size_t)e * msub + r] = P[(size_t)e * T + idx[r]];
        if (msub > 0)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, E, d, msub, 1.0f, Ps, msub, Vs, d, 0.0f, Os, d);
        else
            memset(Os, 0, sizeof(float) * (size_t)E * d);
        for (int e = 0; e < E; e++) {
            double ps = 0;
            for (int r = 0; r < msub; r++)
                ps += Ps[(size_t)e * msub + r];
            const float *o = m->o_full + ((size_t)h * E + e) * d;
            const float *os = Os + (size_t)e * d;
            const float *oa = m->o_app + ((size_t)h * E + e) * d;
            double F;
            if (use_kept)
                F = ps + m->p_app[(size_t)h * E + e];
            else
                F = 1.0 - ps;
            if (F > 1.0)
                F = 1.0;
            double eabs = 0;
            float *evo = evec ? evec + ((size_t)hh * E + e) * d : ev;
            for (int x = 0; x < d; x++) {
                /* o_hat = (kept part) / F; kept part = os + oa (kept) or o - os (evicted) */
                double kept_part = use_kept ? (double)os[x] + oa[x] : (double)o[x] - os[x];
                double diff = (double)o[x] - kept_part / F;
                evo[x] = (float)diff;
                eabs += fabs(diff);
            }
            recall[(size_t)hh * E + e] = (float)F;
            err[(size_t)hh * E + e] = (float)eabs;
            bound[(size_t)hh * E + e] = (float)(2.0 * (1.0 - F) * m->C[g]);
        }
    }
    kv_free(idx);
    kv_free(Vs);
    kv_free(Ps);
    kv_free(Os);
    kv_free(ev);
    return KV_OK;
}

int kv_metrics_query_group(const kv_metrics_layer_t *m, int h0, int nh, int e, const uint8_t *mask, int append,
                           float *recall, float *err, float *bound, float *evec, float *attn)
{
    const kv_layer_ctx_t *c = m->c;
    const int d = c->d, T = c->T, n = c->n_ctx, E = c->n_eval, g = h0 / c->G, i = n + e;
    const float *V = c->v + (size_t)g * T * d;
    /* the smaller of the cached and evicted sets among keys [0, i] */
    int n_keep = 0;
    for (int j = 0; j <= i; j++)
        n_keep += (mask[j] || (append && j >= n));
    const int use_kept = n_keep <= (i + 1) - n_keep;
    const int msub = use_kept ? n_keep : (i + 1) - n_keep;
    int *idx = kv_malloc(sizeof(int) * (size_t)(msub ? msub : 1), "metric indices");
    float *Vs = kv_malloc(sizeof(float) * (size_t)(msub ? msub : 1) * d, "metric values");
    float *Ps = kv_malloc(sizeof(float) * (size_t)(msub ? msub : 1) * nh, "metric probabilities");
    float *Os = kv_malloc(sizeof(float) * (size_t)nh * d, "metric outputs");
    if (!idx || !Vs || !Ps || !Os) {
        kv_free(idx);
        kv_free(Vs);
        kv_free(Ps);
        kv_free(Os);
        return KV_ENOMEM;
    }
    int k = 0;
    for (int j = 0; j <= i; j++)
        if ((mask[j] || (append && j >= n)) == use_kept)
            idx[k++] = j;
    for (int r = 0; r < msub; r++)
        memcpy(Vs + (size_t)r * d, V + (size_t)idx[r] * d, sizeof(float) * d);
    for (int hh = 0; hh < nh; hh++) {
        const float *p = c->p_eval + ((size_t)(h0 + hh) * E + e) * T;
        for (int r = 0; r < msub; r++)
            Ps[(size_t)hh * msub + r] = p[idx[r]];
    }
    if (msub > 0)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nh, d, msub, 1.0f, Ps, msub, Vs, d, 0.0f, Os, d);
    else
        memset(Os, 0, sizeof(float) * (size_t)nh * d);
    for (int hh = 0; hh < nh; hh++) {
        const int h = h0 + hh;
        const float *o = m->o_full + ((size_t)h * E + e) * d;
        const float *os = Os + (size_t)hh * d;
        double ps = 0;
        for (int r = 0; r < msub; r++)
            ps += Ps[(size_t)hh * msub + r];
        double F = use_kept ? ps : 1.0 - ps;
        if (F > 1.0)
            F = 1.0;
        double eabs = 0;
        for (int x = 0; x < d; x++) {
            double kept_part = use_kept ? (double)os[x] : (double)o[x] - os[x];
            double diff = (double)o[x] - kept_part / F;
            if (evec)
                evec[(size_t)hh * d + x] = (float)diff;
            eabs += fabs(diff);
        }
        recall[hh] = (float)F;
        err[hh] = (float)eabs;
        bound[hh] = (float)(2.0 * (1.0 - F) * m->C[g]);
        if (attn) {
            const float *p = c->p_eval + ((size_t)h * E + e) * T;
            float *a = attn + (size_t)hh * T, inv = (float)(1.0 / F);
            for (int j = 0; j < T; j++)
                a[j] = (j <= i && (mask[j] || (append && j >= n))) ? p[j] * inv : 0.0f;
        }
    }
    kv_free(idx);
    kv_free(Vs);
    kv_free(Ps);
    kv_free(Os);
    return KV_OK;
}

void kv_metrics_query(const kv_metrics_layer_t *m, int h, int e, const uint8_t *mask, int append, float *recall,
                      float *err, float *bound, float *evec, float *attn)
{
    if (kv_metrics_query_group(m, h, 1, e, mask, append, recall, err, bound, evec, attn) != KV_OK)
        *recall = *err = *bound = NAN;
}

void kv_metrics_wo(const kv_metrics_layer_t *m, const float *evec, const float *recall, float *err, float *bound)
{
    const kv_layer_ctx_t *c = m->c;
    const int H = c->H, d = c->d, D = m->model_dim;
    double e = 0, b = 0;
    for (int x = 0; x < D; x++) {
        const float *w = c->wo + (size_t)x * H * d;
        double y = 0;
        for (int k = 0; k < H * d; k++)
            y += (double)w[k] * evec[k];
        e += fabs(y);
    }
    for (int h = 0; h < H; h++)
        b += 2.0 * (1.0 - recall[h]) * m->C_wo[h];
    *err = (float)e;
    *bound = (float)b;
}
