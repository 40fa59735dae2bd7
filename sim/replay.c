/*
 * replay.c: the replay engine (see replay.h).
 *
 * Per layer:
 *   1. read Q, K, V (and W_O) once;
 *   2. p_eval = softmax of every evaluation query over its keys (backend attn_probs), exact head
 *      outputs and value norms (metrics.c);
 *   3. every policy prepares once (shared statistics such as accumulated attention or window
 *      probabilities are computed on first request and reused by every policy of the layer);
 *   4. every (policy, budget) pair builds the caches its evaluation queries read and measures them,
 *      in parallel, each writing only its own slot (handed out longest first by the previous
 *      layer's times: see schedule_order).
 * Rows are produced at the end in a fixed order: per (policy, budget) an overall row, then per
 * layer a layer row followed by its head rows (aggregated in parallel, appended in that order).
 *
 * Trace-driven caveat (true of every offline replay): evaluation queries are the ones recorded
 * with the full cache; after a real eviction the model's later queries would differ slightly.
 */
#include "sim/replay.h"

#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/metrics.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void kv_replay_defaults(kv_replay_opts_t *o)
{
    memset(o, 0, sizeof *o);
    o->head_rows = 1;
    o->prefetch = KV_PREFETCH_AUTO;
}

#define KV_MAX_GROUP 256 /* query heads per KV head */

/* ---------------------------------------------------------------- shared statistics */

#define MAX_WINDOWS 8

typedef struct {
    kv_backend_t *be;
    kv_replay_stats_t *st;          /* may be NULL */
    const float *hq, *hk;           /* host Q and K of the layer */
    void *dq, *dk;                  /* backend views of them (the host arrays on the CPU) */
    float *colsum, *colsq, *colmax; /* (H, n_ctx) */
    int have_col;
    struct {
        int w;
        float *probs; /* (H, w, n_ctx) */
    } win[MAX_WINDOWS];
    int n_win;
} engine_t;

static void engine_reset(engine_t *e)
{
    kv_be_unview(e->be, e->hq, e->dq);
    kv_be_unview(e->be, e->hk, e->dk);
    e->hq = e->hk = NULL;
    e->dq = e->dk = NULL;
    kv_free(e->colsum);
    kv_free(e->colsq);
    kv_free(e->colmax);
    e->colsum = e->colsq = e->colmax = NULL;
    e->have_col = 0;
    for (int i = 0; i < e->n_win; i++)
        kv_free(e->win[i].probs);
    e->n_win = 0;
}

/* Backend views of the layer's Q and K (uploaded once per layer on device backends). */
static int engine_views(engine_t *e, const kv_layer_ctx_t *c)
{
    if (e->dq)
        return KV_OK;
    int rc = kv_be_view(e->be, c->q, sizeof(float) * (size_t)c->H * c->T * c->d, &e->dq);
    if (rc == KV_OK)
        rc = kv_be_view(e->be, c->k, sizeof(float) * (size_t)c->Hkv * c->T * c->d, &e->dk);
    e->hq = c->q;
    e->hk = c->k;
    return rc;
}

static kv_qk_args_t qk_args(const kv_layer_ctx_t *c, int q0, int nq, int nk)
{
    const engine_t *e = c->engine;
    kv_qk_args_t a = {0};
    a.q = (const float *)e->dq + (size_t)q0 * c->d;
    a.q_head_stride = (size_t)c->T * c->d;
    a.k = (const float *)e->dk;
    a.k_head_stride = (size_t)c->T * c->d;
    a.n_heads = c->H;
    a.n_kv_heads = c->Hkv;
    a.head_dim = c->d;
    a.n_q = nq;
    a.q_pos0 = q0;
    a.n_k = nk;
    a.causal = 1;
    a.scale = 1.0f / sqrtf((float)c->d);
    return a;
}

int kv_ctx_colstats(kv_layer_ctx_t *c, const float **sum, const float **sumsq, const float **max)
{
    engine_t *e = c->engine;
    if (!e->have_col) {
        size_t n = (size_t)c->H * (size_t)(c->n_ctx ? c->n_ctx : 1);
        e->colsum = kv_malloc(n * sizeof(float), "accumulated attention");
        e->colsq = kv_malloc(n * sizeof(float), "accumulated squared attention");
        e->colmax = kv_malloc(n * sizeof(float), "max attention");
        if (!e->colsum || !e->colsq || !e->colmax)
            return KV_ENOMEM;
        int rc = engine_views(e, c);
        if (rc)
            return rc;
        kv_qk_args_t a = qk_args(c, 0, c->n_ctx, c->n_ctx);
        kv_colstats_out_t o = {0};
        size_t bytes = n * sizeof(float);
        if ((rc = kv_be_out(e->be, e->colsum, bytes, (void **)&o.sum)) ||
            (rc = kv_be_out(e->be, e->colsq, bytes, (void **)&o.sumsq)) ||
            (rc = kv_be_out(e->be, e->colmax, bytes, (void **)&o.max)))
            return rc;
        double t0 = kv_now();
        rc = e->be->ops->attn_colstats(e->be, &a, &o);
        if (e->st) {
            e->st->t_attn += kv_now() - t0;
            e->st->attn_flop += (double)c->H * c->n_ctx * (c->n_ctx + 1) / 2.0 * c->d * 2.0;
        }
        int rc2 = kv_be_fetch(e->be, e->colsum, o.sum, bytes);
        int rc3 = kv_be_fetch(e->be, e->colsq, o.sumsq, bytes);
        int rc4 = kv_be_fetch(e->be, e->colmax, o.max, bytes);
        if (rc || (rc = rc2) || (rc = rc3) || (rc = rc4))
            return rc;
        e->have_col = 1;
    }
    if (sum)
        *sum = e->colsum;
    if (sumsq)
        *sumsq = e->colsq;
    if (max)
        *max = e->colmax;
    return KV_OK;
}

int kv_ctx_window_probs(kv_layer_ctx_t *c, int w, const float **probs)
{
    engine_t *e = c->engine;
    if (w < 1 || w > c->n_ctx)
        return kv_error(KV_ERANGE, "observation window %d outside [1, %d] (context length)", w, c->n_ctx);
    for (int i = 0; i < e->n_win; i++)
        if (e->win[i].w == w) {
            *probs = e->win[i].probs;
            return KV_OK;
        }
    if (e->n_win == MAX_WINDOWS)
        return kv_error(KV_EINTERNAL, "more than %d observation windows in one layer", MAX_WINDOWS);
    size_t bytes = sizeof(float) * (size_t)c->H * w * c->n_ctx;
    float *p = kv_malloc(bytes, "window attention");
    if (!p)
        return KV_ENOMEM;
    void *dp = NULL;
    int rc = engine_views(e, c);
    if (rc == KV_OK)
        rc = kv_be_out(e->be, p, bytes, &dp);
    if (rc == KV_OK) {
        kv_qk_args_t a = qk_args(c, c->n_ctx - w, w, c->n_ctx);
        double t0 = kv_now();
        rc = e->be->ops->attn_probs(e->be, &a, dp, NULL);
        if (e->st) {
            e->st->t_attn += kv_now() - t0;
            e->st->attn_flop += (double)c->H * w * c->n_ctx * c->d * 2.0;
        }
        int rc2 = kv_be_fetch(e->be, p, dp, bytes);
        rc = rc ? rc : rc2;
    }
    if (rc) {
        kv_free(p);
        return rc;
    }
    e->win[e->n_win].w = w;
    e->win[e->n_win].probs = p;
    e->n_win++;
    *probs = p;
    return KV_OK;
}

/* p_eval (H, n_eval, T): every evaluation query's softmax over its keys, through the backend. */
static int eval_probs(kv_layer_ctx_t *c, float *p_eval)
{
    engine_t *e = c->engine;
    size_t bytes = sizeof(float) * (size_t)c->H * c->n_eval * c->T;
    void *dp = NULL;
    int rc = engine_views(e, c);
    if (rc == KV_OK)
        rc = kv_be_out(e->be, p_eval, bytes, &dp);
    if (rc)
        return rc;
    kv_qk_args_t a = qk_args(c, c->n_ctx, c->n_eval, c->T);
    double t0 = kv_now();
    rc = e->be->ops->attn_probs(e->be, &a, dp, NULL);
    if (e->st) {
        e->st->t_attn += kv_now() - t0;
        e->st->attn_flop += (double)c->H * c->n_eval * c->T * c->d * 2.0;
    }
    int rc2 = kv_be_fetch(e->be, p_eval, dp, bytes);
    return rc ? rc : rc2;
}

/* ---------------------------------------------------------------- per (policy, budget) state */

typedef struct {
    kv_policy_t *p;
    int pi, bi;
    kv_budget_t b;
    void *cstate;
    int S;                        /* storage heads */
    float *rec, *err, *bnd;       /* (L, H, E) */
    float *wo_err, *wo_bnd;       /* (L, E) */
    double *kept, *cmean, *cpeak; /* (L, H) */
    long *viol;                   /* (L, H) */
    double *mem;                  /* (L, S) bytes per storage head */
    double *meta;                 /* (L) */
    int probe_e;                  /* kv_replay_probe: copy the mask query probe_e reads into probe_mask */
    uint8_t *probe_mask;
    int rc;
    double t_layer; /* seconds eval_cfg took on the last layer: the cost estimate for scheduling */
    char msg[1024];
    const long *nf_q, *nf_kv; /* (L, H), (L, Hkv): NaN and inf in the layers' Q and K/V, shared */
} cfg_t;

static void cfg_free(cfg_t *g)
{
    if (g->cstate && g->p->desc->cstate_free)
        g->p->desc->cstate_free(g->cstate);
    kv_free(g->rec);
    kv_free(g->err);
    kv_free(g->bnd);
    kv_free(g->wo_err);
    kv_free(g->wo_bnd);
    kv_free(g->kept);
    kv_free(g->cmean);
    kv_free(g->cpeak);
    kv_free(g->viol);
    kv_free(g->mem);
    kv_free(g->meta);
}

static int cfg_alloc(cfg_t *g, int L, int H, int Hkv, int E)
{
    g->S = g->p->gran == KV_GRAN_KV ? Hkv : H;
    size_t lhe = (size_t)L * H * E, lh = (size_t)L * H;
    g->rec = kv_calloc(lhe, sizeof(float), "recall samples");
    g->err = kv_calloc(lhe, sizeof(float), "error samples");
    g->bnd = kv_calloc(lhe, sizeof(float), "bound samples");
    g->wo_err = kv_calloc((size_t)L * E, sizeof(float), "model-space errors");
    g->wo_bnd = kv_calloc((size_t)L * E, sizeof(float), "model-space bounds");
    g->kept = kv_calloc(lh, sizeof(double), "kept tokens");
    g->cmean = kv_calloc(lh, sizeof(double), "cache sizes");
    g->cpeak = kv_calloc(lh, sizeof(double), "cache peaks");
    g->viol = kv_calloc(lh, sizeof(long), "violations");
    g->mem = kv_calloc((size_t)L * g->S, sizeof(double), "memory");
    g->meta = kv_calloc((size_t)L, sizeof(double), "metadata");
    if (!g->rec || !g->err || !g->bnd || !g->wo_err || !g->wo_bnd || !g->kept || !g->cmean || !g->cpeak || !g->viol ||
        !g->mem || !g->meta)
        return KV_ENOMEM;
    return KV_OK;
}

/* Evaluate one (policy, budget) on one layer. Runs inside the parallel loop: touches only g. */
static int eval_cfg(cfg_t *g, kv_layer_ctx_t *c, const kv_metrics_layer_t *ml, size_t dtype_bytes)
{
    kv_policy_t *p = g->p;
    const kv_policy_desc_t *d = p->desc;
    const int H = c->H, E = c->n_eval, T = c->T, n = c->n_ctx, G = c->G, S = g->S, l = c->layer;
    const int has_wo = ml->C_wo != NULL;
    kv_keep_t keep = {S, T, kv_calloc((size_t)S * T, 1, "cache mask")};
    float *evec = has_wo ? kv_calloc((size_t)H * E * c->d, sizeof(float), "error vectors") : NULL; /* (H, E, d) */
    float *eq = has_wo ? kv_malloc(sizeof(float) * (size_t)H * c->d, "error vectors") : NULL;      /* (H, d) */
    float *fq = kv_malloc(sizeof(float) * (size_t)H, "recalls");
    float *attn = d->observe ? kv_calloc((size_t)H * T, sizeof(float), "renormalised attention") : NULL;
    double *peak_s = kv_calloc((size_t)S, sizeof(double), "cache peaks");
    kv_metrics_scratch_t ws = {0};
    int rc = KV_OK;
    if (!keep.mask || (has_wo && (!evec || !eq)) || !fq || (d->observe && !attn) || !peak_s) {
        rc = KV_ENOMEM;
        goto done;
    }
    float *rec = g->rec + (size_t)l * H * E, *err = g->err + (size_t)l * H * E, *bnd = g->bnd + (size_t)l * H * E;
    const unsigned fl = p->flags;
    if (fl & (KV_POL_DECODE | KV_POL_PER_QUERY)) {
        if (fl & KV_POL_DECODE) {
            rc = d->select ? d->select(p, c, &g->b, &g->cstate, &keep)
                           : kv_select_uniform(p, c, &g->b, &g->cstate, &keep);
            if (rc)
                goto done;
        }
        for (int e = 0; e < E; e++) {
            const int i = n + e;
            if ((rc = d->admit(p, c, &g->b, &g->cstate, i, &keep)))
                goto done;
            if (g->probe_mask && e == g->probe_e)
                memcpy(g->probe_mask, keep.mask, (size_t)S * T);
            for (int s = 0; s < S; s++) {
                const uint8_t *mk = keep.mask + (size_t)s * T;
                int ctx = 0, tot;
                for (int j = 0; j < n; j++)
                    ctx += mk[j] != 0;
                if (fl & KV_POL_PER_QUERY) {
                    tot = ctx + e + 1;
                } else {
                    tot = ctx;
                    for (int j = n; j <= i; j++)
                        tot += mk[j] != 0;
                }
                if (tot > peak_s[s])
                    peak_s[s] = tot;
                for (int h = (p->gran == KV_GRAN_KV ? s * G : s); h < (p->gran == KV_GRAN_KV ? (s + 1) * G : s + 1);
                     h++) {
                    g->kept[(size_t)l * H + h] += ctx / (double)E;
                    g->cmean[(size_t)l * H + h] += tot / (double)E;
                    if (tot > g->cpeak[(size_t)l * H + h])
                        g->cpeak[(size_t)l * H + h] = tot;
                }
            }
            for (int s = 0; s < S; s++) {
                const int h0 = p->gran == KV_GRAN_KV ? s * G : s, nh = p->gran == KV_GRAN_KV ? G : 1;
                float rr[KV_MAX_GROUP], ee[KV_MAX_GROUP], bb[KV_MAX_GROUP];
                if (nh > KV_MAX_GROUP) {
                    rc = kv_error(KV_ERANGE, "%d query heads per KV head (at most %d)", nh, KV_MAX_GROUP);
                    goto done;
                }
                if ((rc = kv_metrics_query_group(ml, h0, nh, e, keep.mask + (size_t)s * T, (fl & KV_POL_PER_QUERY) != 0,
                                                 rr, ee, bb, has_wo ? eq + (size_t)h0 * c->d : NULL,
                                                 attn ? attn + (size_t)h0 * T : NULL, &ws)))
                    goto done;
                for (int hh = 0; hh < nh; hh++) {
                    size_t o = (size_t)(h0 + hh) * E + e;
                    rec[o] = rr[hh];
                    err[o] = ee[hh];
                    bnd[o] = bb[hh];
                    fq[h0 + hh] = rr[hh];
                }
            }
            if (has_wo)
                kv_metrics_wo(ml, eq, fq, &g->wo_err[(size_t)l * E + e], &g->wo_bnd[(size_t)l * E + e]);
            if (d->observe && (rc = d->observe(p, c, &g->b, &g->cstate, i, &keep, attn)))
                goto done;
        }
    } else {
        rc = d->select ? d->select(p, c, &g->b, &g->cstate, &keep) : kv_select_uniform(p, c, &g->b, &g->cstate, &keep);
        if (rc)
            goto done;
        if (g->probe_mask)
            memcpy(g->probe_mask, keep.mask, (size_t)S * T);
        for (int s = 0; s < S; s++) {
            const int h0 = p->gran == KV_GRAN_KV ? s * G : s, nh = p->gran == KV_GRAN_KV ? G : 1;
            const uint8_t *mk = keep.mask + (size_t)s * T;
            int ctx = 0;
            for (int j = 0; j < n; j++)
                ctx += mk[j] != 0;
            peak_s[s] = ctx + E;
            rc = kv_metrics_oneshot(ml, h0, nh, mk, rec + (size_t)h0 * E, err + (size_t)h0 * E, bnd + (size_t)h0 * E,
                                    has_wo ? evec + (size_t)h0 * E * c->d : NULL);
            if (rc)
                goto done;
            for (int h = h0; h < h0 + nh; h++) {
                g->kept[(size_t)l * H + h] = ctx;
                g->cmean[(size_t)l * H + h] = ctx + (E + 1) / 2.0;
                g->cpeak[(size_t)l * H + h] = ctx + E;
            }
        }
        if (has_wo)
            for (int e = 0; e < E; e++) {
                for (int h = 0; h < H; h++) {
                    memcpy(eq + (size_t)h * c->d, evec + ((size_t)h * E + e) * c->d, sizeof(float) * c->d);
                    fq[h] = rec[(size_t)h * E + e];
                }
                kv_metrics_wo(ml, eq, fq, &g->wo_err[(size_t)l * E + e], &g->wo_bnd[(size_t)l * E + e]);
            }
    }
    for (int h = 0; h < H; h++) {
        const float C = ml->C[h / G];
        long v = 0;
        for (int e = 0; e < E; e++) {
            size_t o = (size_t)h * E + e;
            v += kv_bound_violated(err[o], bnd[o], rec[o], C, c->d);
        }
        g->viol[(size_t)l * H + h] = v;
    }
    for (int s = 0; s < S; s++) {
        double tokens = (fl & KV_POL_NO_EVICT) ? T : peak_s[s];
        g->mem[(size_t)l * S + s] = tokens * c->d * 2.0 * (double)dtype_bytes;
    }
    g->meta[l] = d->meta_bytes ? (double)d->meta_bytes(p, c, &g->b, &keep) : 0.0;
done:
    kv_free(keep.mask);
    kv_free(evec);
    kv_free(eq);
    kv_free(fq);
    kv_free(attn);
    kv_free(peak_s);
    kv_metrics_scratch_free(&ws);
    return rc;
}

/* The order in which the parallel loop hands out the (policy, budget) pairs of a layer: longest
 * first by what each took on the previous layer (layers have the same shape, so that is a good
 * estimate), ties and the first layer by the order on entry (initially the configuration order).
 * Costs differ by an order of magnitude (per-query caches at large budgets against one-shot masks),
 * and in configuration order a long pair often started last and left the other threads idle.
 * Each pair writes only its own slots, so the order changes no result. */
static void schedule_order(const cfg_t *cfg, int n_cfg, int *order)
{
    for (int x = 1; x < n_cfg; x++) { /* stable insertion sort: a few dozen pairs */
        const int k = order[x];
        int y = x;
        while (y > 0 && cfg[order[y - 1]].t_layer < cfg[k].t_layer) {
            order[y] = order[y - 1];
            y--;
        }
        order[y] = k;
    }
}

/* ---------------------------------------------------------------- aggregation */

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Linear-interpolated quantile of a sorted array. */
static double quantile(const float *sorted, size_t n, double q)
{
    if (n == 0)
        return NAN;
    double pos = q * (double)(n - 1);
    size_t lo = (size_t)floor(pos);
    size_t hi = lo + 1 < n ? lo + 1 : lo;
    double f = pos - (double)lo;
    return sorted[lo] * (1 - f) + sorted[hi] * f;
}

/* Rearrange a[0, n) so that a[k] holds the value sorting would put there, with nothing larger
 * before it and nothing smaller after it (Hoare quickselect). Only for values that order totally:
 * no NaN, and no -0 (which compares equal to +0 and would make "the" value ambiguous). */
static void select_kth(float *a, size_t n, size_t k)
{
    ptrdiff_t lo = 0, hi = (ptrdiff_t)n - 1;
    const ptrdiff_t kk = (ptrdiff_t)k;
    while (lo < hi) {
        const float piv = a[lo + (hi - lo) / 2];
        ptrdiff_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < piv)
                i++;
            while (a[j] > piv)
                j--;
            if (i <= j) {
                const float t = a[i];
                a[i++] = a[j];
                a[j--] = t;
            }
        }
        if (kk <= j)
            hi = j;
        else if (kk >= i)
            lo = i;
        else
            break;
    }
}

/* The same value as quantile() after a full sort, from a partial order: the samples of an overall
 * row number L x H x E and were sorted twice per row, a serial cost worth avoiding. Falls back to
 * sorting when a value is NaN or -0 (see select_kth). */
static double quantile_select(float *a, size_t n, double q)
{
    if (n == 0)
        return NAN;
    for (size_t x = 0; x < n; x++)
        if (isnan(a[x]) || (a[x] == 0 && signbit(a[x]))) {
            qsort(a, n, sizeof(float), cmp_float);
            return quantile(a, n, q);
        }
    double pos = q * (double)(n - 1);
    size_t lo = (size_t)floor(pos);
    size_t hi = lo + 1 < n ? lo + 1 : lo;
    double f = pos - (double)lo;
    select_kth(a, n, lo);
    float vlo = a[lo], vhi = vlo;
    if (hi != lo) { /* the next order statistic: the smallest of what follows a[lo] */
        vhi = a[hi];
        for (size_t x = hi + 1; x < n; x++)
            vhi = a[x] < vhi ? a[x] : vhi;
    }
    return vlo * (1 - f) + vhi * f;
}

typedef struct {
    float *rec, *err; /* scratch for the quantiles (reordered) */
} agg_scratch_t;

/* Fill the sample statistics of a row from the (layer, head) blocks [l0, l1) x [h0, h1). */
static void fill_stats(const cfg_t *g, int H, int E, int l0, int l1, int h0, int h1, kv_result_row_t *r,
                       agg_scratch_t *sc)
{
    size_t k = 0;
    double rs = 0, es = 0, bs = 0, gap = INFINITY;
    float rmin = INFINITY, emax = 0;
    long viol = 0;
    int any_nan = 0; /* a NaN sample makes every statistic NaN, never a minimum or maximum that skips it */
    double kept = 0, cmean = 0, cpeak = 0;
    for (int l = l0; l < l1; l++)
        for (int h = h0; h < h1; h++) {
            kept += g->kept[(size_t)l * H + h];
            cmean += g->cmean[(size_t)l * H + h];
            if (g->cpeak[(size_t)l * H + h] > cpeak)
                cpeak = g->cpeak[(size_t)l * H + h];
            viol += g->viol[(size_t)l * H + h];
            for (int e = 0; e < E; e++) {
                size_t o = ((size_t)l * H + h) * E + e;
                float rr = g->rec[o], ee = g->err[o], bb = g->bnd[o];
                sc->rec[k] = rr;
                sc->err[k] = ee;
                k++;
                rs += rr;
                es += ee;
                bs += bb;
                rmin = rr < rmin ? rr : rmin;
                emax = ee > emax ? ee : emax;
                gap = (bb - ee) < gap ? (bb - ee) : gap;
                any_nan |= isnan(rr) || isnan(ee) || isnan(bb);
            }
        }
    size_t cells = (size_t)(l1 - l0) * (h1 - h0);
    r->kept = kept / (double)cells;
    r->cache_mean = cmean / (double)cells;
    r->cache_peak = cpeak;
    r->recall_mean = rs / (double)k;
    r->recall_p10 = quantile_select(sc->rec, k, 0.10);
    r->recall_min = rmin;
    r->err_mean = es / (double)k;
    r->err_p90 = quantile_select(sc->err, k, 0.90);
    r->err_max = emax;
    r->bound_mean = bs / (double)k;
    r->bound_gap_min = gap;
    r->violations = viol;
    r->n_queries = (long)k;
    if (any_nan)
        r->recall_p10 = r->recall_min = r->err_p90 = r->err_max = r->bound_gap_min = NAN;
}

/* A row whose evaluations read n NaN or infinite inputs: its metrics mean nothing (a full cache
 * would report recall 1), so they are NaN and the count says why. */
static void set_nonfinite(kv_result_row_t *r, long n)
{
    r->nonfinite = n;
    if (n > 0)
        r->recall_mean = r->recall_p10 = r->recall_min = r->err_mean = r->err_p90 = r->err_max = r->bound_mean =
            r->bound_gap_min = r->wo_err_mean = r->wo_bound_mean = NAN;
}

/* Rows emitted per (policy, budget): the overall row, then per layer a layer row and its head rows. */
static size_t rows_per_cfg(int L, int H, int head_rows)
{
    return 1 + (size_t)L * (1 + (head_rows ? (size_t)H : 0));
}

/* The rows of one (policy, budget) into out[0, rows_per_cfg) in emission order. Pure: the pairs
 * are aggregated in parallel (sorting the samples for the quantiles takes a while) and appended
 * to the results in configuration order afterwards. */
static int emit_rows(const cfg_t *g, const kv_trace_meta_t *m, int E, int has_wo, int head_rows, kv_result_row_t *out)
{
    const int L = m->n_layers, H = m->n_heads, G = m->n_heads / m->n_kv_heads, S = g->S;
    agg_scratch_t sc;
    sc.rec = kv_malloc(sizeof(float) * (size_t)L * H * E, "aggregation");
    sc.err = kv_malloc(sizeof(float) * (size_t)L * H * E, "aggregation");
    int rc = KV_OK;
    size_t nr = 0;
    if (!sc.rec || !sc.err) {
        rc = KV_ENOMEM;
        goto done;
    }
    kv_result_row_t r;
    for (int l = -1; l < L; l++) {
        /* l == -1: the overall row */
        memset(&r, 0, sizeof r);
        r.policy = g->pi;
        r.budget = g->bi;
        r.budget_tokens = g->b.tokens;
        r.layer = l < 0 ? KV_ALL : l;
        r.head = r.kv_head = KV_ALL;
        int l0 = l < 0 ? 0 : l, l1 = l < 0 ? L : l + 1;
        fill_stats(g, H, E, l0, l1, 0, H, &r, &sc);
        double we = 0, wb = 0, mem = 0, meta = 0;
        for (int ll = l0; ll < l1; ll++) {
            for (int e = 0; e < E; e++) {
                we += g->wo_err[(size_t)ll * E + e];
                wb += g->wo_bnd[(size_t)ll * E + e];
            }
            for (int s = 0; s < S; s++)
                mem += g->mem[(size_t)ll * S + s];
            meta += g->meta[ll];
        }
        r.wo_err_mean = has_wo ? we / ((double)(l1 - l0) * E) : NAN;
        r.wo_bound_mean = has_wo ? wb / ((double)(l1 - l0) * E) : NAN;
        r.mem_bytes = mem;
        r.meta_bytes = meta;
        long nf = 0;
        for (int ll = l0; ll < l1; ll++) {
            for (int h = 0; h < H; h++)
                nf += g->nf_q[(size_t)ll * H + h];
            for (int kv = 0; kv < m->n_kv_heads; kv++)
                nf += g->nf_kv[(size_t)ll * m->n_kv_heads + kv];
        }
        set_nonfinite(&r, nf);
        out[nr++] = r;
        if (l < 0 || !head_rows)
            continue;
        for (int h = 0; h < H; h++) {
            memset(&r, 0, sizeof r);
            r.policy = g->pi;
            r.budget = g->bi;
            r.budget_tokens = g->b.tokens;
            r.layer = l;
            r.head = h;
            r.kv_head = h / G;
            fill_stats(g, H, E, l, l + 1, h, h + 1, &r, &sc);
            r.wo_err_mean = r.wo_bound_mean = NAN;
            int s = kv_policy_store_of(g->p, h, G);
            r.mem_bytes = g->mem[(size_t)l * S + s] / (g->p->gran == KV_GRAN_KV ? G : 1);
            r.meta_bytes = g->meta[l] / H;
            set_nonfinite(&r, g->nf_q[(size_t)l * H + h] + g->nf_kv[(size_t)l * m->n_kv_heads + h / G]);
            out[nr++] = r;
        }
    }
done:
    kv_free(sc.rec);
    kv_free(sc.err);
    return rc;
}

/* ---------------------------------------------------------------- layer streaming
 *
 * The engine reads the layers in a fixed sequence (0..L-1, twice with a cross-layer pre-pass). With
 * prefetch, one reader thread walks that sequence ahead of the engine: it reads and decompresses
 * layer i+1 into the second of two layer buffers while the engine computes on layer i, and waits
 * while both buffers are in use. The reader owns every HDF5 call while it runs (libhdf5 here is the
 * serial build: one thread at a time), the engine only takes filled buffers and gives them back.
 * A reader failure is kept with its message and handed to the engine at the layer that failed; an
 * engine failure (or the end) stops the reader and joins it before anything is freed. Without
 * prefetch the same calls read each layer on the engine's thread into the first buffer, so the
 * computation, and the results, are the same either way. */

typedef struct {
    kv_layer_t lay;
    float *wo; /* W_O of the layer, when the trace has it */
} layer_buf_t;

typedef struct {
    kv_trace_t *t;
    int n_layers, n_seq; /* layer i of the sequence is i % n_layers */
    int async;           /* a reader thread (prefetch) */
    int omp_threads;     /* the engine's OpenMP thread count, for the reader's decoding */
    layer_buf_t buf[2];
    pthread_t th;
    int started;
    pthread_mutex_t mu; /* guards what follows */
    pthread_cond_t cv;
    int produced;   /* layers of the sequence read so far */
    int consumed;   /* layers the engine gave back */
    int stop;       /* the engine asks the reader to stop */
    int rc;         /* the reader's failure (at layer `produced` of the sequence) */
    char msg[1024]; /* its message (kv_error's messages are per thread) */
    double t_read;  /* seconds the reader spent reading */
    double t_wait;  /* seconds the engine waited for layers */
    long layers_read;
} stream_t;

/* The one place replay allocates the host buffers a layer is read into (twice with prefetch). A GPU
 * backend uploads Q and K from them every layer; page-locked (pinned) memory would make those copies
 * faster and asynchronous. kv_backend_ops_t has no host-allocation op yet (its alloc/free are device
 * memory): when one exists (cudaHostAlloc behind it), allocate with it here and free with its
 * counterpart in layer_buf_free. The capacities are set so kv_trace_read_layer never reallocates. */
static int layer_buf_alloc(layer_buf_t *b, const kv_trace_meta_t *m)
{
    const size_t nq = kv_tensor_numel(m, KV_T_Q), nkv = kv_tensor_numel(m, KV_T_K);
    memset(b, 0, sizeof *b);
    b->lay.q = kv_malloc_aligned(nq * sizeof(float), "trace layer buffer");
    b->lay.k = kv_malloc_aligned(nkv * sizeof(float), "trace layer buffer");
    b->lay.v = kv_malloc_aligned(nkv * sizeof(float), "trace layer buffer");
    b->lay.cap_q = nq;
    b->lay.cap_kv = nkv;
    if (m->has_wo)
        b->wo = kv_malloc(sizeof(float) * kv_tensor_numel(m, KV_T_WO), "W_O");
    if (!b->lay.q || !b->lay.k || !b->lay.v || (m->has_wo && !b->wo))
        return KV_ENOMEM;
    return KV_OK;
}

static void layer_buf_free(layer_buf_t *b)
{
    kv_layer_free(&b->lay);
    kv_free(b->wo);
    b->wo = NULL;
}

/* Read layer l's Q, K, V and, when the buffer has room for it, its W_O. */
static int read_layer(kv_trace_t *t, int l, layer_buf_t *b)
{
    int rc = kv_trace_read_layer(t, l, &b->lay);
    if (rc == KV_OK && b->wo)
        rc = kv_trace_read(t, l, KV_T_WO, b->wo);
    return rc;
}

static void *stream_reader(void *arg)
{
    stream_t *s = arg;
    omp_set_num_threads(s->omp_threads); /* a new thread starts from the default */
    for (int i = 0; i < s->n_seq; i++) {
        pthread_mutex_lock(&s->mu);
        while (!s->stop && i - s->consumed >= 2)
            pthread_cond_wait(&s->cv, &s->mu);
        const int stop = s->stop;
        pthread_mutex_unlock(&s->mu);
        if (stop)
            break;
        double t0 = kv_now();
        int rc = read_layer(s->t, i % s->n_layers, &s->buf[i % 2]);
        pthread_mutex_lock(&s->mu);
        s->t_read += kv_now() - t0;
        s->layers_read++;
        if (rc) {
            s->rc = rc;
            snprintf(s->msg, sizeof s->msg, "%s", kv_last_error());
        } else {
            s->produced = i + 1;
        }
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        if (rc)
            break;
    }
    return NULL;
}

static int stream_open(stream_t *s, kv_trace_t *t, int n_seq, int async)
{
    const kv_trace_meta_t *m = kv_trace_meta(t);
    memset(s, 0, sizeof *s);
    s->t = t;
    s->n_layers = m->n_layers;
    s->n_seq = n_seq;
    s->async = async;
    s->omp_threads = omp_get_max_threads();
    int rc = layer_buf_alloc(&s->buf[0], m);
    if (rc == KV_OK && async)
        rc = layer_buf_alloc(&s->buf[1], m);
    if (rc || !async)
        return rc;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    int e = pthread_create(&s->th, NULL, stream_reader, s);
    if (e) {
        pthread_cond_destroy(&s->cv);
        pthread_mutex_destroy(&s->mu);
        return kv_error(KV_EUNAVAIL, "cannot start the layer reader thread: %s", strerror(e));
    }
    s->started = 1;
    return KV_OK;
}

/* Layer i of the sequence: *b gets its buffer, which stays the engine's until stream_done(s, i). */
static int stream_get(stream_t *s, int i, layer_buf_t **b)
{
    double t0 = kv_now();
    int rc = KV_OK;
    if (!s->async) {
        rc = read_layer(s->t, i % s->n_layers, &s->buf[0]);
        s->t_read += kv_now() - t0;
        s->layers_read++;
        *b = &s->buf[0];
    } else {
        pthread_mutex_lock(&s->mu);
        while (s->produced <= i && s->rc == KV_OK)
            pthread_cond_wait(&s->cv, &s->mu);
        if (s->produced <= i)
            rc = kv_error(s->rc, "%s", s->msg);
        pthread_mutex_unlock(&s->mu);
        *b = &s->buf[i % 2];
    }
    s->t_wait += kv_now() - t0;
    return rc;
}

static void stream_done(stream_t *s, int i)
{
    if (!s->async)
        return;
    pthread_mutex_lock(&s->mu);
    s->consumed = i + 1;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

/* Stop and join the reader (it finishes the layer it is reading), add the times to st, free. */
static void stream_close(stream_t *s, kv_replay_stats_t *st)
{
    if (s->started) {
        pthread_mutex_lock(&s->mu);
        s->stop = 1;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->th, NULL);
        pthread_cond_destroy(&s->cv);
        pthread_mutex_destroy(&s->mu);
        s->started = 0;
    }
    if (st) {
        st->t_read += s->t_read;
        st->t_read_wait += s->t_wait;
        st->layers_read += s->layers_read;
    }
    layer_buf_free(&s->buf[0]);
    layer_buf_free(&s->buf[1]);
}

/* ---------------------------------------------------------------- the engine */

static void fill_ctx(kv_layer_ctx_t *c, const kv_trace_meta_t *m, int layer, int n_ctx, const layer_buf_t *b,
                     kv_backend_t *be, engine_t *eng, uint64_t seed)
{
    memset(c, 0, sizeof *c);
    c->meta = m;
    c->layer = layer;
    c->n_layers = m->n_layers;
    c->H = m->n_heads;
    c->Hkv = m->n_kv_heads;
    c->G = m->n_heads / m->n_kv_heads;
    c->d = m->head_dim;
    c->T = m->n_tokens;
    c->n_ctx = n_ctx;
    c->n_eval = m->n_tokens - n_ctx;
    c->q = b->lay.q;
    c->k = b->lay.k;
    c->v = b->lay.v;
    c->wo = b->wo;
    c->be = be;
    c->seed = seed;
    c->engine = eng;
}

/* Loud, once per replay: the layers and heads whose Q, K or V hold NaN or inf (their rows report nan
 * and the count), and rows whose metrics came out NaN from finite inputs (scores beyond float). */
static void warn_nonfinite(const char *path, const kv_trace_meta_t *m, const long *nf_q, const long *nf_kv,
                           const kv_results_t *res)
{
    const int H = m->n_heads, Hkv = m->n_kv_heads;
    long total = 0;
    int places = 0;
    char list[512] = "";
    size_t k = 0;
    for (int l = 0; l < m->n_layers; l++) {
        long q = 0, kv = 0;
        for (int h = 0; h < H; h++)
            q += nf_q[(size_t)l * H + h];
        for (int g = 0; g < Hkv; g++)
            kv += nf_kv[(size_t)l * Hkv + g];
        if (!q && !kv)
            continue;
        total += q + kv;
        if (places++ < 6 && k < sizeof list)
            k += (size_t)snprintf(list + k, sizeof list - k, "%slayer %d: %ld in Q, %ld in K/V", places > 1 ? "; " : "",
                                  l, q, kv);
    }
    if (total)
        kv_warn("%s: %ld NaN or infinite values in the trace's Q, K and V (%s%s): every result row that reads them "
                "reports nan metrics and the count in its nonfinite column",
                path, total, list, places > 6 ? "; ..." : "");
    long nan_rows = 0;
    for (size_t i = 0; i < res->n; i++)
        nan_rows += res->rows[i].nonfinite == 0 && isnan(res->rows[i].recall_mean);
    if (nan_rows)
        kv_warn(
            "%s: %ld result rows have nan metrics from finite Q, K and V (attention scores beyond the float range?)",
            path, nan_rows);
}

int kv_replay(kv_trace_t *t, kv_policy_t **pols, int n_pol, const kv_budget_t *budgets, int n_budgets, kv_backend_t *be,
              const kv_replay_opts_t *opts, kv_results_t **out)
{
    *out = NULL;
    kv_replay_opts_t o;
    if (opts)
        o = *opts;
    else
        kv_replay_defaults(&o);
    const kv_trace_meta_t *m = kv_trace_meta(t);
    const char *path = kv_trace_path(t);
    const int L = m->n_layers, H = m->n_heads, T = m->n_tokens;
    if (o.eval_tail < 0 || o.eval_tail >= m->n_prompt)
        return kv_error(KV_ERANGE, "--eval-tail %d must leave at least one context token (prompt has %d)", o.eval_tail,
                        m->n_prompt);
    const int n_ctx = m->n_prompt - o.eval_tail, E = T - n_ctx;
    if (E <= 0)
        return kv_error(KV_EINVAL,
                        "%s: the trace has no decode queries to evaluate (capture with --decode N, or replay "
                        "with --eval-tail N to hold out the end of the prompt)",
                        path);
    const char *missing = kv_backend_missing_op(be);
    if (missing && (!be->ops->attn_probs || !be->ops->attn_colstats))
        return kv_error(KV_EUNAVAIL, "backend %s lacks the '%s' op needed by replay", be->name, missing);
    for (int i = 0; i < n_pol; i++)
        if ((pols[i]->flags & KV_POL_NEEDS_SEGMENTS) && m->n_segments < 1)
            return kv_error(KV_EINVAL,
                            "%s: policy %s needs segments and the trace has none (capture a prompt with "
                            "<|endoftext|> separators or --segments)",
                            path, pols[i]->label);
    const size_t dtype_bytes = m->dtype == KV_DTYPE_F16 ? 2 : 4;
    int n_cfg = n_pol * n_budgets, rc = KV_OK;
    cfg_t *cfg = kv_calloc((size_t)n_cfg, sizeof *cfg, "replay configurations");
    kv_budget_t *bud = kv_malloc(sizeof *bud * (size_t)n_budgets, "budgets");
    kv_results_t *res = NULL;
    stream_t stream = {0};
    layer_buf_t *lb = NULL;
    engine_t eng = {.be = be, .st = o.stats};
    kv_metrics_layer_t ml = {0};
    float *p_eval = NULL;
    int *order = NULL;
    long *nf_q = NULL, *nf_kv = NULL;
    kv_result_row_t *rows = NULL;
    double t_start = kv_now(), t_mark;
    if (o.stats)
        memset(o.stats, 0, sizeof *o.stats);
    if (!cfg || !bud || kv_results_create(&res) != KV_OK) {
        rc = KV_ENOMEM;
        goto done;
    }
    for (int b = 0; b < n_budgets; b++) {
        bud[b] = budgets[b];
        if ((rc = kv_budget_resolve(&bud[b], m, n_ctx)))
            goto done;
        if (bud[b].tokens >= n_ctx && !o.quiet)
            kv_info("budget %s keeps the whole context (%d tokens): no compression at this budget", bud[b].text, n_ctx);
        if ((rc = kv_results_add_budget(res, bud[b].text)))
            goto done;
    }
    for (int i = 0; i < n_pol; i++)
        if ((rc = kv_results_add_label(res, pols[i]->label)))
            goto done;
    for (int i = 0; i < n_pol; i++)
        for (int b = 0; b < n_budgets; b++) {
            cfg_t *g = &cfg[i * n_budgets + b];
            g->p = pols[i];
            g->pi = i;
            g->bi = b;
            g->b = bud[b];
            if ((rc = cfg_alloc(g, L, H, m->n_kv_heads, E)))
                goto done;
        }
    p_eval = kv_malloc(sizeof(float) * (size_t)H * E * T, "evaluation attention");
    order = kv_malloc(sizeof(int) * (size_t)n_cfg, "schedule");
    nf_q = kv_calloc((size_t)L * H, sizeof(long), "non-finite counts");
    nf_kv = kv_calloc((size_t)L * m->n_kv_heads, sizeof(long), "non-finite counts");
    if (!p_eval || !order || !nf_q || !nf_kv) {
        rc = KV_ENOMEM;
        goto done;
    }
    for (int k = 0; k < n_cfg; k++) {
        cfg[k].nf_q = nf_q;
        cfg[k].nf_kv = nf_kv;
    }
    for (int k = 0; k < n_cfg; k++)
        order[k] = k;
    int cross = 0;
    for (int i = 0; i < n_pol; i++)
        cross |= (pols[i]->flags & KV_POL_CROSS_LAYER) != 0;
    const int prefetch = o.prefetch == KV_PREFETCH_AUTO ? !be->host_memory : o.prefetch != 0;
    if (o.stats)
        o.stats->prefetched = prefetch;
    /* the layers in the order they are used: the pre-pass, then the replay */
    if ((rc = stream_open(&stream, t, L * (cross ? 2 : 1), prefetch)))
        goto done;
    int seq = 0;
    kv_progress_t prog;
    kv_progress_begin(&prog, "replay", (long)L * (cross ? 2 : 1));
    long step = 0;
    kv_layer_ctx_t c;
    char detail[128];
    if (cross) {
        for (int l = 0; l < L && rc == KV_OK; l++, seq++) {
            if ((rc = stream_get(&stream, seq, &lb)))
                break;
            engine_reset(&eng);
            fill_ctx(&c, m, l, n_ctx, lb, be, &eng, o.seed);
            for (int i = 0; i < n_pol && rc == KV_OK; i++)
                if ((pols[i]->flags & KV_POL_CROSS_LAYER) && pols[i]->desc->prescore)
                    rc = pols[i]->desc->prescore(pols[i], &c);
            engine_reset(&eng); /* nothing of the layer is used after this point */
            stream_done(&stream, seq);
            snprintf(detail, sizeof detail, "pre-pass layer %d", l);
            if (!o.quiet)
                kv_progress_update(&prog, ++step, detail);
        }
        for (int i = 0; i < n_pol && rc == KV_OK; i++)
            if ((pols[i]->flags & KV_POL_CROSS_LAYER) && pols[i]->desc->allocate)
                rc = pols[i]->desc->allocate(pols[i], m, n_ctx, bud, n_budgets);
    }
    for (int l = 0; l < L && rc == KV_OK; l++, seq++) {
        if ((rc = stream_get(&stream, seq, &lb)))
            break;
        engine_reset(&eng);
        fill_ctx(&c, m, l, n_ctx, lb, be, &eng, o.seed);
        kv_metrics_nonfinite(&c, nf_q + (size_t)l * H, nf_kv + (size_t)l * m->n_kv_heads);
        if ((rc = eval_probs(&c, p_eval)))
            break;
        c.p_eval = p_eval;
        kv_metrics_layer_free(&ml);
        if ((rc = kv_metrics_layer_init(&ml, &c)))
            break;
        t_mark = kv_now();
        double attn0 = o.stats ? o.stats->t_attn : 0;
        for (int i = 0; i < n_pol && rc == KV_OK; i++)
            rc = kv_policy_prepare(pols[i], &c);
        if (rc)
            break;
        if (o.stats) /* shared statistics computed on a policy's request count as attention time */
            o.stats->t_policies += (kv_now() - t_mark) - (o.stats->t_attn - attn0);
        t_mark = kv_now();
        int old = kv_blas_set_threads(1);
        schedule_order(cfg, n_cfg, order);
#pragma omp parallel for schedule(dynamic, 1)
        for (int x = 0; x < n_cfg; x++) {
            cfg_t *g = &cfg[order[x]];
            if (g->rc)
                continue;
            double t0 = kv_now();
            g->rc = eval_cfg(g, &c, &ml, dtype_bytes);
            g->t_layer = kv_now() - t0;
            if (g->rc)
                snprintf(g->msg, sizeof g->msg, "%s at budget %s, layer %d: %s", g->p->label, g->b.text, l,
                         kv_last_error());
        }
        kv_blas_set_threads(old);
        if (o.stats)
            o.stats->t_eval += kv_now() - t_mark;
        for (int k = 0; k < n_cfg; k++)
            if (cfg[k].rc) {
                rc = kv_error(cfg[k].rc, "%s", cfg[k].msg);
                break;
            }
        stream_done(&stream, seq);
        snprintf(detail, sizeof detail, "layer %d, %d polic%s x %d budget%s", l, n_pol, n_pol == 1 ? "y" : "ies",
                 n_budgets, n_budgets == 1 ? "" : "s");
        if (!o.quiet)
            kv_progress_update(&prog, ++step, detail);
    }
    if (rc)
        goto done;
    if (!o.quiet)
        kv_progress_end(&prog, NULL);
    const size_t per_cfg = rows_per_cfg(L, H, o.head_rows);
    rows = kv_malloc(sizeof *rows * per_cfg * (size_t)n_cfg, "result rows");
    if (!rows) {
        rc = KV_ENOMEM;
        goto done;
    }
#pragma omp parallel for schedule(dynamic, 1)
    for (int k = 0; k < n_cfg; k++)
        cfg[k].rc = emit_rows(&cfg[k], m, E, m->has_wo, o.head_rows, rows + (size_t)k * per_cfg);
    for (int k = 0; k < n_cfg && rc == KV_OK; k++) {
        if (cfg[k].rc) {
            rc = kv_error(cfg[k].rc, "aggregating the samples of %s at budget %s: out of memory", cfg[k].p->label,
                          cfg[k].b.text);
            break;
        }
        for (size_t x = 0; x < per_cfg && rc == KV_OK; x++)
            rc = kv_results_append(res, &rows[(size_t)k * per_cfg + x]);
        long v = 0;
        for (size_t x = 0; x < (size_t)L * H; x++)
            v += cfg[k].viol[x];
        if (v)
            kv_warn("BOUND VIOLATED: %s at budget %s: %ld queries have an output error above the Ada-KV bound "
                    "(beyond float tolerance); this is a bug, please report it",
                    cfg[k].p->label, cfg[k].b.text, v);
    }
    if (rc == KV_OK) {
        warn_nonfinite(path, m, nf_q, nf_kv, res);
        *out = res;
        res = NULL;
    }
done:
    kv_free(nf_q);
    kv_free(nf_kv);
    stream_close(&stream, o.stats); /* first: the reader may still be filling a buffer */
    if (o.stats)
        o.stats->t_total = kv_now() - t_start;
    if (cfg)
        for (int k = 0; k < n_cfg; k++)
            cfg_free(&cfg[k]);
    kv_free(cfg);
    kv_free(bud);
    kv_results_free(res);
    kv_free(p_eval);
    kv_free(order);
    kv_free(rows);
    kv_metrics_layer_free(&ml);
    engine_reset(&eng);
    return rc;
}

int kv_replay_probe(kv_trace_t *t, int layer, kv_policy_t *p, const kv_budget_t *b, int eval_index,
                    const kv_replay_opts_t *opts, kv_backend_t *be, uint8_t *mask)
{
    kv_replay_opts_t o;
    if (opts)
        o = *opts;
    else
        kv_replay_defaults(&o);
    const kv_trace_meta_t *m = kv_trace_meta(t);
    const int n_ctx = m->n_prompt - o.eval_tail, E = m->n_tokens - n_ctx, L = m->n_layers;
    if (layer < 0 || layer >= L || E <= 0 || eval_index < 0 || eval_index >= E)
        return kv_error(KV_ERANGE, "probe: layer %d / evaluation query %d out of range", layer, eval_index);
    if (p->flags & KV_POL_CROSS_LAYER)
        return kv_error(KV_EINVAL, "probe: cross-layer policies need a full replay");
    cfg_t g = {0};
    g.p = p;
    g.b = *b;
    int rc = kv_budget_resolve(&g.b, m, n_ctx);
    stream_t stream = {0};
    layer_buf_t *lb = NULL;
    float *p_eval = NULL;
    engine_t eng = {.be = be};
    kv_metrics_layer_t ml = {0};
    kv_layer_ctx_t c;
    if (rc || (rc = cfg_alloc(&g, L, m->n_heads, m->n_kv_heads, E)))
        goto done;
    p_eval = kv_malloc(sizeof(float) * (size_t)m->n_heads * E * m->n_tokens, "evaluation attention");
    if (!p_eval) {
        rc = KV_ENOMEM;
        goto done;
    }
    /* layers before `layer` run too: policies may carry state across layers (ChunkKV reuse) */
    if ((rc = stream_open(&stream, t, layer + 1, 0)))
        goto done;
    for (int l = 0; l <= layer && rc == KV_OK; l++) {
        if ((rc = stream_get(&stream, l, &lb)))
            break;
        engine_reset(&eng);
        fill_ctx(&c, m, l, n_ctx, lb, be, &eng, o.seed);
        if ((rc = eval_probs(&c, p_eval)))
            break;
        c.p_eval = p_eval;
        kv_metrics_layer_free(&ml);
        if ((rc = kv_metrics_layer_init(&ml, &c)) || (rc = kv_policy_prepare(p, &c)))
            break;
        g.probe_e = eval_index;
        g.probe_mask = l == layer ? mask : NULL;
        rc = eval_cfg(&g, &c, &ml, 2);
    }
done:
    stream_close(&stream, NULL);
    cfg_free(&g);
    kv_free(p_eval);
    kv_metrics_layer_free(&ml);
    engine_reset(&eng);
    return rc;
}
