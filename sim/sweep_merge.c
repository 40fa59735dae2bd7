/*
 * sweep_merge.c: the merge of a sweep's finished samples (see sweep.h) and the bootstrap interval.
 *
 *   results.tsv    every row of every finished sample's results, in dataset order, the cells copied
 *                  as replay wrote them, after a `sample` column; a "#" preamble with the sweep's
 *                  settings and counts (no dates, hosts or timings: the bytes do not depend on how the
 *                  samples were run)
 *   aggregate.tsv  per (policy, budget), over the samples that have it: n_samples, then for each
 *                  metric of the overall rows (layer and head "all") its mean over the samples and
 *                  METRIC_lo, METRIC_hi, the percentile bootstrap interval (kv_bootstrap_mean)
 *   failed.tsv     sample, status (failed or missing) and the error, one line each
 * A finished sample whose prompt_sha256 differs from its prompt now (the dataset changed) is refused,
 * naming its file: remove that file to redo the sample.
 */
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/common/kv_output.h"
#include "sim/common/kv_rng.h"
#include "sim/result.h"
#include "sim/sweep.h"
#include "sim/sweep_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---------------------------------------------------------------- bootstrap */

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Quantile p of sorted v[0..n) with linear interpolation between order statistics (numpy's default,
 * Hyndman and Fan type 7). */
static double quantile(const double *v, int n, double p)
{
    const double h = (n - 1) * p;
    const int k = (int)floor(h);
    if (k >= n - 1)
        return v[n - 1];
    return v[k] + (h - k) * (v[k + 1] - v[k]);
}

int kv_bootstrap_mean(const double *x, int n, int resamples, uint64_t seed, double confidence, double *mean, double *lo,
                      double *hi)
{
    *mean = *lo = *hi = NAN;
    if (resamples < 1 || !(confidence > 0 && confidence < 1))
        return kv_error(KV_EINVAL, "bootstrap: %d resamples at confidence %g", resamples, confidence);
    double *v = kv_malloc(sizeof(double) * (size_t)(n > 0 ? n : 1), "bootstrap values");
    double *means = kv_malloc(sizeof(double) * (size_t)resamples, "bootstrap means");
    int rc = v && means ? KV_OK : KV_ENOMEM, m = 0;
    if (rc)
        goto done;
    for (int i = 0; i < n; i++)
        if (isfinite(x[i]))
            v[m++] = x[i];
    if (m == 0)
        goto done;
    double sum = 0;
    for (int i = 0; i < m; i++)
        sum += v[i];
    *mean = sum / m;
    if (m == 1) {
        *lo = *hi = v[0];
        goto done;
    }
    kv_rng_t r;
    kv_rng_seed(&r, seed);
    for (int b = 0; b < resamples; b++) {
        double s = 0;
        for (int j = 0; j < m; j++)
            s += v[kv_rng_below(&r, (uint64_t)m)];
        means[b] = s / m;
    }
    qsort(means, (size_t)resamples, sizeof(double), cmp_double);
    const double a = (1 - confidence) / 2;
    *lo = quantile(means, resamples, a);
    *hi = quantile(means, resamples, 1 - a);
done:
    kv_free(v);
    kv_free(means);
    return rc;
}

/* ---------------------------------------------------------------- aggregation cells */

/* The metrics of aggregate.tsv, from the overall rows. */
static const char *const METRICS[] = {"budget_tokens", "kept",          "cache_mean", "recall_mean", "recall_p10",
                                      "recall_min",    "err_mean",      "err_p90",    "bound_mean",  "violations",
                                      "wo_err_mean",   "wo_bound_mean", "mem_bytes",  "meta_bytes"};
#define N_METRICS ((int)KV_ARRAY_LEN(METRICS))

typedef struct {
    char *policy, *budget;
    double *v[N_METRICS]; /* (n) values, one per sample that has the cell */
    int n, cap;
} cell_t;

typedef struct {
    cell_t *c;
    int n, cap;
} cells_t;

static void cells_free(cells_t *C)
{
    for (int i = 0; i < C->n; i++) {
        kv_free(C->c[i].policy);
        kv_free(C->c[i].budget);
        for (int k = 0; k < N_METRICS; k++)
            kv_free(C->c[i].v[k]);
    }
    kv_free(C->c);
}

static cell_t *cell_get(cells_t *C, const char *policy, const char *budget)
{
    for (int i = 0; i < C->n; i++)
        if (!strcmp(C->c[i].policy, policy) && !strcmp(C->c[i].budget, budget))
            return &C->c[i];
    if (C->n == C->cap) {
        int cap = C->cap ? 2 * C->cap : 32;
        cell_t *a = kv_realloc(C->c, sizeof(cell_t) * (size_t)cap, "aggregate cells");
        if (!a)
            return NULL;
        C->c = a;
        C->cap = cap;
    }
    cell_t *c = &C->c[C->n];
    memset(c, 0, sizeof *c);
    c->policy = kv_strdup(policy);
    c->budget = kv_strdup(budget);
    if (!c->policy || !c->budget) {
        kv_free(c->policy);
        kv_free(c->budget);
        return NULL;
    }
    C->n++;
    return c;
}

static int cell_add(cell_t *c, const double *vals)
{
    if (c->n == c->cap) {
        int cap = c->cap ? 2 * c->cap : 64;
        for (int k = 0; k < N_METRICS; k++) {
            double *a = kv_realloc(c->v[k], sizeof(double) * (size_t)cap, "aggregate values");
            if (!a)
                return KV_ENOMEM;
            c->v[k] = a;
        }
        c->cap = cap;
    }
    for (int k = 0; k < N_METRICS; k++)
        c->v[k][c->n] = vals[k];
    c->n++;
    return KV_OK;
}

static void put_num(FILE *f, double x)
{
    if (isnan(x))
        fputs("nan", f);
    else if (x == floor(x) && fabs(x) < 1e15)
        fprintf(f, "%.0f", x);
    else
        fprintf(f, "%.9g", x);
}

/* ---------------------------------------------------------------- output files */

/* The merge's three files are one set of the output module (sim/common/kv_output.h): written and
 * synced under temporary names, then renamed together, results.tsv (the index: removed first,
 * renamed last) after aggregate.tsv and failed.tsv, so a results.tsv is always of the same merge
 * as the other two; a failure or a signal leaves the previous merge's files as they were. */
typedef struct {
    FILE *f;
} out_t;

static int out_open(kv_out_set_t *set, out_t *o, const char *dir, const char *name, int flags)
{
    char path[KV_SWEEP_PATH + 64];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    kv_out_t *k;
    int rc = kv_out_set_open(set, path, flags, &k);
    if (rc == KV_OK && !(o->f = kv_out_stream(k)))
        rc = KV_ENOMEM;
    return rc;
}

/* One line of text with tabs and line breaks made spaces. */
static void put_clean(FILE *f, const char *s)
{
    for (; *s; s++)
        fputc(*s == '\t' || *s == '\n' || *s == '\r' ? ' ' : *s, f);
}

static void preamble(FILE *f, const kv_sweep_t *s, const char *what, const kv_sweep_summary_t *st)
{
    fprintf(f, "# kvsim sweep %s\n", what);
    fprintf(f, "# tool: kvsim %s\n", KV_VERSION);
    fprintf(f, "# git: %s\n", kv_git_revision());
    fputs("# sweep: ", f);
    put_clean(f, s->name);
    fputs("\n# manifest: ", f);
    put_clean(f, s->manifest);
    fputs("\n# model: ", f);
    put_clean(f, s->model_text);
    fputs("\n# dataset: ", f);
    put_clean(f, s->dataset_text);
    fputs("\n# policies: ", f);
    put_clean(f, s->policies);
    fputs("\n# budgets: ", f);
    put_clean(f, s->budgets);
    fprintf(f, "\n# samples: %d (%d finished, %d failed, %d missing)\n", st->n_samples, st->done, st->failed,
            st->missing);
}

static void sha256_text(const char *data, char hex[65])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    EVP_Digest(data, strlen(data), md, &n, EVP_sha256(), NULL);
    for (unsigned i = 0; i < 32 && i < n; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    hex[64] = 0;
}

/* Copy one finished sample's rows into results.tsv and its overall rows into the cells. */
static int merge_sample(const kv_sweep_t *s, int i, FILE *out, cells_t *C)
{
    char path[KV_SWEEP_PATH + 256];
    snprintf(path, sizeof path, "%s/samples/%s.tsv", s->output, s->ids[i]);
    kv_table_t *t = NULL;
    int rc = kv_table_read(path, &t);
    if (rc)
        return rc;
    int nc;
    const char *const *cols = kv_results_columns(&nc);
    if (t->n_cols != nc) {
        rc = kv_error(KV_EFORMAT, "%s: %d columns, this kvsim writes %d (a sample of another kvsim version?)", path,
                      t->n_cols, nc);
        goto done;
    }
    for (int c = 0; c < nc; c++)
        if (strcmp(t->cols[c], cols[c])) {
            rc = kv_error(KV_EFORMAT, "%s: column %d is '%s', this kvsim writes '%s' there", path, c + 1, t->cols[c],
                          cols[c]);
            goto done;
        }
    const char *psha = kv_table_prov(t, "prompt_sha256");
    char want[65];
    sha256_text(s->prompts[i], want);
    if (!psha || strcmp(psha, want)) {
        rc = kv_error(KV_EINVAL,
                      "%s: made from another prompt than sample %s has now (the dataset or its template changed); "
                      "remove the file to redo the sample",
                      path, s->ids[i]);
        goto done;
    }
    const int cp = kv_table_col(t, "policy"), cb = kv_table_col(t, "budget"), cl = kv_table_col(t, "layer"),
              ch = kv_table_col(t, "head");
    int mc[N_METRICS];
    for (int k = 0; k < N_METRICS; k++)
        mc[k] = kv_table_col(t, METRICS[k]);
    for (size_t r = 0; r < t->n_rows; r++) {
        fputs(s->ids[i], out);
        for (int c = 0; c < nc; c++) {
            fputc('\t', out);
            fputs(t->cells[r][c], out);
        }
        fputc('\n', out);
        if (strcmp(kv_table_get(t, r, cl), "all") || strcmp(kv_table_get(t, r, ch), "all"))
            continue;
        cell_t *cell = cell_get(C, kv_table_get(t, r, cp), kv_table_get(t, r, cb));
        if (!cell) {
            rc = KV_ENOMEM;
            goto done;
        }
        double vals[N_METRICS];
        for (int k = 0; k < N_METRICS; k++)
            vals[k] = kv_table_num(t, r, mc[k]);
        if ((rc = cell_add(cell, vals)))
            goto done;
    }
done:
    kv_table_free(t);
    return rc;
}

static int write_aggregate(kv_out_set_t *set, const kv_sweep_t *s, const cells_t *C, const kv_sweep_summary_t *st)
{
    out_t o = {0};
    int rc = out_open(set, &o, s->output, "aggregate.tsv", 0);
    if (rc)
        return rc;
    FILE *f = o.f;
    char what[256];
    snprintf(what, sizeof what,
             "aggregate: per policy and budget, the mean over the samples of each metric of the overall rows and "
             "its %g %% percentile bootstrap interval",
             100 * s->confidence);
    preamble(f, s, what, st);
    fprintf(f, "# bootstrap: %d resamples of the samples, seed %llu, confidence %g\n", s->resamples,
            (unsigned long long)s->boot_seed, s->confidence);
    fputs("policy\tbudget\tn_samples", f);
    for (int k = 0; k < N_METRICS; k++)
        fprintf(f, "\t%s\t%s_lo\t%s_hi", METRICS[k], METRICS[k], METRICS[k]);
    fputc('\n', f);
    for (int i = 0; i < C->n; i++) {
        const cell_t *c = &C->c[i];
        fprintf(f, "%s\t%s\t%d", c->policy, c->budget, c->n);
        for (int k = 0; k < N_METRICS; k++) {
            double mean, lo, hi;
            if ((rc = kv_bootstrap_mean(c->v[k], c->n, s->resamples, s->boot_seed, s->confidence, &mean, &lo, &hi)))
                return rc; /* the set is aborted by the caller */
            const double v3[3] = {mean, lo, hi};
            for (int j = 0; j < 3; j++) {
                fputc('\t', f);
                put_num(f, v3[j]);
            }
        }
        fputc('\n', f);
    }
    return KV_OK;
}

static int write_failed(kv_out_set_t *set, const kv_sweep_t *s, const kv_sweep_summary_t *st)
{
    out_t o = {0};
    int rc = out_open(set, &o, s->output, "failed.tsv", 0);
    if (rc)
        return rc;
    preamble(o.f, s, "failures: the samples without results and why", st);
    fputs("sample\tstatus\terror\n", o.f);
    for (int i = 0; i < s->n; i++) {
        char p[KV_SWEEP_PATH + 256];
        snprintf(p, sizeof p, "%s/samples/%s.tsv", s->output, s->ids[i]);
        if (access(p, F_OK) == 0)
            continue;
        snprintf(p, sizeof p, "%s/samples/%s.failed", s->output, s->ids[i]);
        char *msg = NULL;
        if (access(p, F_OK) == 0 && kv_read_file(p, 1 << 16, &msg, NULL) == KV_OK) {
            size_t n = strlen(msg);
            while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
                msg[--n] = 0;
            fprintf(o.f, "%s\tfailed\t", s->ids[i]);
            put_clean(o.f, msg);
            fputc('\n', o.f);
        } else {
            fprintf(o.f, "%s\tmissing\tnot run yet (or still running)\n", s->ids[i]);
        }
        kv_free(msg);
    }
    return KV_OK;
}

int kv_sweep_merge(kv_sweep_t *s, const kv_sweep_opts_t *opts, kv_sweep_summary_t *sum)
{
    kv_sweep_summary_t st;
    int rc = kv_sweep_status(s, &st);
    if (rc)
        return rc;
    if (st.missing && !opts->partial) {
        char list[1024];
        size_t u = 0;
        int shown = 0;
        char p[KV_SWEEP_PATH + 256];
        for (int i = 0; i < s->n && shown < 8; i++) {
            snprintf(p, sizeof p, "%s/samples/%s.tsv", s->output, s->ids[i]);
            if (access(p, F_OK) == 0)
                continue;
            snprintf(p, sizeof p, "%s/samples/%s.failed", s->output, s->ids[i]);
            if (access(p, F_OK) == 0)
                continue;
            u += (size_t)snprintf(list + u, u < sizeof list ? sizeof list - u : 0, "%s%s (sample %d)",
                                  shown ? ", " : "", s->ids[i], i + 1);
            shown++;
        }
        return kv_error(KV_EINVAL,
                        "%s: %d of %d samples are not finished: %s%s; run the sweep (or its missing slices) again, "
                        "or merge what there is with --partial",
                        s->output, st.missing, st.n_samples, list, st.missing > shown ? ", ..." : "");
    }
    cells_t C = {0};
    out_t res = {0};
    kv_out_set_t *set = NULL;
    if ((rc = kv_out_set_create(&set)) || (rc = out_open(set, &res, s->output, "results.tsv", KV_OUT_INDEX))) {
        kv_out_set_abort(set);
        return rc;
    }
    preamble(res.f, s, "results: every finished sample's replay results after a sample column", &st);
    int nc;
    const char *const *cols = kv_results_columns(&nc);
    fputs("sample", res.f);
    for (int c = 0; c < nc; c++)
        fprintf(res.f, "\t%s", cols[c]);
    fputc('\n', res.f);
    for (int i = 0; i < s->n && rc == KV_OK; i++) {
        char p[KV_SWEEP_PATH + 256];
        snprintf(p, sizeof p, "%s/samples/%s.tsv", s->output, s->ids[i]);
        if (access(p, F_OK) == 0)
            rc = merge_sample(s, i, res.f, &C);
    }
    if (rc == KV_OK)
        rc = write_failed(set, s, &st);
    if (rc == KV_OK)
        rc = write_aggregate(set, s, &C, &st);
    /* results.tsv last (the index): when it is there, the other two are the same merge's */
    if (rc == KV_OK)
        rc = kv_out_set_commit(set);
    else
        kv_out_set_abort(set);
    cells_free(&C);
    if (rc == KV_OK) {
        kv_info("sweep: merged %d samples (%d failed, %d missing) -> %s/results.tsv, aggregate.tsv, failed.tsv",
                st.done, st.failed, st.missing, s->output);
    }
    if (sum) {
        const int ran = sum->ran, ran_failed = sum->ran_failed, ranks = sum->ranks, root = sum->root;
        const double secs = sum->seconds;
        *sum = st;
        sum->ran = ran;
        sum->ran_failed = ran_failed;
        sum->ranks = ranks ? ranks : 1;
        sum->root = root;
        sum->seconds = secs;
        sum->merged = rc == KV_OK;
    }
    return rc;
}
