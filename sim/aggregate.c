/*
 * aggregate.c: result rows from the samples of one (policy, budget) pair (see replay_internal.h):
 * per layer and query head, per layer, and overall, the means, quantiles and extremes that
 * sim/result.h names. Runs after the layers, one pair per thread; pure functions of the samples.
 */
#include "sim/replay_internal.h"

#include "sim/common/kv_common.h"

#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

int kv_samples_alloc(kv_samples_t *g, int L, int H, int E, int S)
{
    memset(g, 0, sizeof *g);
    g->L = L;
    g->H = H;
    g->E = E;
    g->S = S;
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
    g->mem = kv_calloc((size_t)L * S, sizeof(double), "memory");
    g->meta = kv_calloc((size_t)L, sizeof(double), "metadata");
    if (!g->rec || !g->err || !g->bnd || !g->wo_err || !g->wo_bnd || !g->kept || !g->cmean || !g->cpeak || !g->viol ||
        !g->mem || !g->meta)
        return KV_ENOMEM;
    return KV_OK;
}

void kv_samples_free(kv_samples_t *g)
{
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
    memset(g, 0, sizeof *g);
}

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
static void fill_stats(const kv_samples_t *g, int H, int E, int l0, int l1, int h0, int h1, kv_result_row_t *r,
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

/* NaN and inf read by the query heads [h0, h1) of layers [l0, l1): their Q and their groups' K/V. */
static long nonfinite_of(const kv_samples_t *g, int G, int l0, int l1, int h0, int h1)
{
    if (!g->nf_q)
        return 0;
    const int H = g->H, Hkv = H / G;
    long n = 0;
    for (int l = l0; l < l1; l++) {
        for (int h = h0; h < h1; h++)
            n += g->nf_q[(size_t)l * H + h];
        for (int kv = h0 / G; kv <= (h1 - 1) / G; kv++)
            n += g->nf_kv[(size_t)l * Hkv + kv];
    }
    return n;
}

size_t kv_rows_per_cfg(int L, int H, int head_rows)
{
    return 1 + (size_t)L * (1 + (head_rows ? (size_t)H : 0));
}

int kv_emit_rows(const kv_samples_t *g, const kv_policy_t *p, int pi, int bi, int budget_tokens, int G, int has_wo,
                 int head_rows, kv_result_row_t *out)
{
    const int L = g->L, H = g->H, E = g->E, S = g->S;
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
        r.policy = pi;
        r.budget = bi;
        r.budget_tokens = budget_tokens;
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
        set_nonfinite(&r, nonfinite_of(g, G, l0, l1, 0, H));
        out[nr++] = r;
        if (l < 0 || !head_rows)
            continue;
        for (int h = 0; h < H; h++) {
            memset(&r, 0, sizeof r);
            r.policy = pi;
            r.budget = bi;
            r.budget_tokens = budget_tokens;
            r.layer = l;
            r.head = h;
            r.kv_head = h / G;
            fill_stats(g, H, E, l, l + 1, h, h + 1, &r, &sc);
            r.wo_err_mean = r.wo_bound_mean = NAN;
            int s = kv_policy_store_of(p, h, G);
            r.mem_bytes = g->mem[(size_t)l * S + s] / (p->gran == KV_GRAN_KV ? G : 1);
            r.meta_bytes = g->meta[l] / H;
            set_nonfinite(&r, nonfinite_of(g, G, l, l + 1, h, h + 1));
            out[nr++] = r;
        }
    }
done:
    kv_free(sc.rec);
    kv_free(sc.err);
    return rc;
}
