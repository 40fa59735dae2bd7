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

static long count_nonfinite(const float *x, size_t n)
{
    long k = 0;
    for (size_t i = 0; i < n; i++)
        k += !(fabsf(x[i]) < INFINITY); /* NaN compares false */
    return k;
}

void kv_metrics_nonfinite(const kv_layer_ctx_t *c, long *q_head, long *kv_head)
{
    const size_t per = (size_t)c->T * c->d, per_q = (size_t)(c->T - c->q0) * c->d; /* lean: rows [q0, T) */
    for (int h = 0; h < c->H; h++)
        q_head[h] = count_nonfinite(c->q + (size_t)h * c->q_hs, per_q);
    for (int g = 0; g < c->Hkv; g++)
        kv_head[g] = count_nonfinite(c->k + (size_t)g * per, per) + count_nonfinite(c->v + (size_t)g * per, per);
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

/* Indices j in [j0, j1) whose mask test (mask[j] != 0) equals `want`, appended to idx from *k on.
 * Branch-free: every j is stored and the count advances only on a match (masks are irregular, a
 * branch per key mispredicted often); idx needs room for j1 - j0 entries past *k. */
static void collect(const uint8_t *mask, int j0, int j1, int want, int *idx, int *k)
{
    int kk = *k;
    for (int j = j0; j < j1; j++) {
        idx[kk] = j;
        kk += (mask[j] != 0) == want;
    }
    *k = kk;
}

static int count_set(const uint8_t *mask, int j0, int j1)
{
    int c = 0;
    for (int j = j0; j < j1; j++)
        c += mask[j] != 0;
    return c;
}

/* Ps (nr, msub) = rows[r][idx[0..msub)] and ps[r] = their sum in double, accumulated in index
 * order exactly as a plain loop would. Rows are done four at a time so that four independent
 * double sums overlap (one sum alone is bound by the latency of its additions). */
static void gather_sum(const float *const *rows, int nr, const int *idx, int msub, float *Ps, double *ps)
{
    int r = 0;
    for (; r + 4 <= nr; r += 4) {
        const float *p0 = rows[r], *p1 = rows[r + 1], *p2 = rows[r + 2], *p3 = rows[r + 3];
        float *q0 = Ps + (size_t)r * msub, *q1 = q0 + msub, *q2 = q1 + msub, *q3 = q2 + msub;
        double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (int x = 0; x < msub; x++) {
            const int j = idx[x];
            const float a = p0[j], b = p1[j], c = p2[j], d = p3[j];
            q0[x] = a;
            q1[x] = b;
            q2[x] = c;
            q3[x] = d;
            s0 += a;
            s1 += b;
            s2 += c;
            s3 += d;
        }
        ps[r] = s0;
        ps[r + 1] = s1;
        ps[r + 2] = s2;
        ps[r + 3] = s3;
    }
    for (; r < nr; r++) {
        const float *p0 = rows[r];
        float *q0 = Ps + (size_t)r * msub;
        double s0 = 0;
        for (int x = 0; x < msub; x++) {
            q0[x] = p0[idx[x]];
            s0 += q0[x];
        }
        ps[r] = s0;
    }
}

/* The value rows V[idx[0..msub)] as a dense (msub, d) matrix for sgemm: V itself when the indices
 * are one contiguous run (the same values, so the same product), else gathered into Vs. */
static const float *gather_rows(const float *V, int d, const int *idx, int msub, float *Vs)
{
    if (msub > 0 && idx[msub - 1] - idx[0] == msub - 1)
        return V + (size_t)idx[0] * d;
    for (int r = 0; r < msub; r++)
        memcpy(Vs + (size_t)r * d, V + (size_t)idx[r] * d, sizeof(float) * d);
    return Vs;
}

int kv_metrics_oneshot(const kv_metrics_layer_t *m, int h0, int nh, const uint8_t *mask, float *recall, float *err,
                       float *bound, float *evec)
{
    const kv_layer_ctx_t *c = m->c;
    const int d = c->d, T = c->T, n = c->n_ctx, E = c->n_eval, g = h0 / c->G;
    const int n_keep = count_set(mask, 0, n);
    const int use_kept = n_keep <= n - n_keep;
    const int msub = use_kept ? n_keep : n - n_keep;
    int *idx = kv_malloc(sizeof(int) * (size_t)(n ? n : 1), "metric indices");
    float *Vs = kv_malloc(sizeof(float) * (size_t)(msub ? msub : 1) * d, "metric values");
    float *Ps = kv_malloc(sizeof(float) * (size_t)(msub ? msub : 1) * E, "metric probabilities");
    float *Os = kv_malloc(sizeof(float) * (size_t)E * d, "metric outputs");
    float *ev = kv_malloc(sizeof(float) * (size_t)d, "error vector");
    double *psum = kv_malloc(sizeof(double) * (size_t)E, "metric sums");
    const float **rows = kv_malloc(sizeof(float *) * (size_t)E, "metric rows");
    if (!idx || !Vs || !Ps || !Os || !ev || !psum || !rows) {
        kv_free(idx);
        kv_free(Vs);
        kv_free(Ps);
        kv_free(Os);
        kv_free(ev);
        kv_free(psum);
        kv_free(rows);
        return KV_ENOMEM;
    }
    int k = 0;
    collect(mask, 0, n, use_kept, idx, &k);
    const float *Vm = gather_rows(c->v + (size_t)g * T * d, d, idx, msub, Vs);
    for (int hh = 0; hh < nh; hh++) {
        const int h = h0 + hh;
        const float *P = c->p_eval + (size_t)h * E * T;
        for (int e = 0; e < E; e++)
            rows[e] = P + (size_t)e * T;
        gather_sum(rows, E, idx, msub, Ps, psum);
        if (msub > 0)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, E, d, msub, 1.0f, Ps, msub, Vm, d, 0.0f, Os, d);
        else
            memset(Os, 0, sizeof(float) * (size_t)E * d);
        for (int e = 0; e < E; e++) {
            const double ps = psum[e];
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
    kv_free(psum);
    kv_free(rows);
    return KV_OK;
}

void kv_metrics_scratch_free(kv_metrics_scratch_t *ws)
{
    if (!ws)
        return;
    kv_free(ws->buf);
    memset(ws, 0, sizeof *ws);
}

/* Room for `bytes` in the scratch (grown, never shrunk; the contents are not kept). */
static int scratch_reserve(kv_metrics_scratch_t *ws, size_t bytes)
{
    if (bytes <= ws->cap)
        return KV_OK;
    kv_free(ws->buf);
    ws->cap = 0;
    ws->buf = kv_malloc(bytes, "metric scratch");
    if (!ws->buf)
        return KV_ENOMEM;
    ws->cap = bytes;
    return KV_OK;
}

static void *scratch_at(const kv_metrics_scratch_t *ws, size_t offset)
{
    return (unsigned char *)ws->buf + offset;
}

int kv_metrics_query_group(const kv_metrics_layer_t *m, int h0, int nh, int e, const uint8_t *mask, int append,
                           float *recall, float *err, float *bound, float *evec, float *attn, kv_metrics_scratch_t *ws)
{
    const kv_layer_ctx_t *c = m->c;
    const int d = c->d, T = c->T, n = c->n_ctx, E = c->n_eval, g = h0 / c->G, i = n + e;
    const float *V = c->v + (size_t)g * T * d;
    /* the smaller of the cached and evicted sets among keys [0, i]; keys [n, i] are cached whatever
     * the mask with `append` */
    const int n_keep = count_set(mask, 0, n) + (append ? e + 1 : count_set(mask, n, i + 1));
    const int use_kept = n_keep <= (i + 1) - n_keep;
    const int msub = use_kept ? n_keep : (i + 1) - n_keep;
    kv_metrics_scratch_t local = {0};
    if (!ws)
        ws = &local;
        /* one block, each part 64-byte aligned: idx (i + 1), Vs (msub, d), Ps (nh, msub), Os (nh, d),
         * sums (nh), row pointers (nh) */
#define KV_ALIGN64(x) (((x) + 63) & ~(size_t)63)
    const size_t o_vs = KV_ALIGN64(sizeof(int) * (size_t)(i + 1));
    const size_t o_ps = o_vs + KV_ALIGN64(sizeof(float) * (size_t)msub * d);
    const size_t o_os = o_ps + KV_ALIGN64(sizeof(float) * (size_t)nh * msub);
    const size_t o_sum = o_os + KV_ALIGN64(sizeof(float) * (size_t)nh * d);
    const size_t o_rows = o_sum + KV_ALIGN64(sizeof(double) * (size_t)nh);
    const size_t total = o_rows + KV_ALIGN64(sizeof(float *) * (size_t)nh);
#undef KV_ALIGN64
    if (scratch_reserve(ws, total) != KV_OK)
        return KV_ENOMEM;
    int *idx = scratch_at(ws, 0);
    float *Vs = scratch_at(ws, o_vs), *Ps = scratch_at(ws, o_ps), *Os = scratch_at(ws, o_os);
    double *psum = scratch_at(ws, o_sum);
    const float **rows = scratch_at(ws, o_rows);
    int k = 0;
    collect(mask, 0, n, use_kept, idx, &k);
    if (!append)
        collect(mask, n, i + 1, use_kept, idx, &k);
    else if (use_kept)
        for (int j = n; j <= i; j++)
            idx[k++] = j;
    const float *Vm = gather_rows(V, d, idx, msub, Vs);
    for (int hh = 0; hh < nh; hh++)
        rows[hh] = c->p_eval + ((size_t)(h0 + hh) * E + e) * T;
    gather_sum(rows, nh, idx, msub, Ps, psum);
    if (msub > 0)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nh, d, msub, 1.0f, Ps, msub, Vm, d, 0.0f, Os, d);
    else
        memset(Os, 0, sizeof(float) * (size_t)nh * d);
    for (int hh = 0; hh < nh; hh++) {
        const int h = h0 + hh;
        const float *o = m->o_full + ((size_t)h * E + e) * d;
        const float *os = Os + (size_t)hh * d;
        const double ps = psum[hh];
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
            /* p / F on the cached keys of [0, i], 0 elsewhere; idx lists the cached or the evicted ones */
            const float *p = rows[hh];
            float *a = attn + (size_t)hh * T, inv = (float)(1.0 / F);
            if (use_kept) {
                memset(a, 0, sizeof(float) * (size_t)T);
                for (int r = 0; r < msub; r++)
                    a[idx[r]] = p[idx[r]] * inv;
            } else {
                for (int j = 0; j <= i; j++)
                    a[j] = p[j] * inv;
                for (int r = 0; r < msub; r++)
                    a[idx[r]] = 0.0f;
                memset(a + i + 1, 0, sizeof(float) * (size_t)(T - i - 1));
            }
        }
    }
    kv_metrics_scratch_free(&local);
    return KV_OK;
}

void kv_metrics_query(const kv_metrics_layer_t *m, int h, int e, const uint8_t *mask, int append, float *recall,
                      float *err, float *bound, float *evec, float *attn)
{
    if (kv_metrics_query_group(m, h, 1, e, mask, append, recall, err, bound, evec, attn, NULL) != KV_OK)
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
