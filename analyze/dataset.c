/*
 * dataset.c (analyze): figures and statistics over the samples of a sweep; see kv_analyze_sweep.h.
 * Inputs are read by column name (aggregate.tsv, the per-sample funnel files), never by position.
 */
#include "analyze/kv_analyze_sweep.h"

#include "analyze/kv_analyze.h"
#include "plots/kv_plot.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/result.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* The per-sample statistics, their columns and their titles. */
static const struct {
    const char *col, *title, *ylabel;
    int unit; /* y in [0, 1] */
} STATS[] = {
    {"entropy", "Attention entropy", "entropy (nats)", 0},
    {"norm_entropy", "Normalised entropy", "entropy / ln(visible keys)", 1},
    {"frac", "Concentration", "fraction of visible keys for 90 % of attention", 1},
    {"sink", "Mass on the first token (sink)", "attention on token 0 (fraction)", 1},
    {"seg", "Mass inside the query's segment", "attention in own segment (fraction)", 1},
};
#define N_STATS ((int)KV_ARRAY_LEN(STATS))

static void put_num(char *buf, size_t len, double x)
{
    if (isnan(x))
        snprintf(buf, len, "nan");
    else
        snprintf(buf, len, "%.9g", x);
}

int kv_analyze_sweep_funnel(void *ctx, const char *sample_id, kv_trace_t *t, kv_backend_t *be, const char *prefix)
{
    (void)ctx;
    kv_funnel_opts_t fo;
    kv_funnel_opts_init(&fo);
    fo.quiet = 1;
    kv_funnel_t *f = NULL;
    int rc = kv_funnel_compute(t, be, &fo, &f);
    if (rc)
        return rc;
    const size_t cap = 512 + (size_t)f->n_layers * N_STATS * 24;
    char *text = kv_malloc(cap, "funnel table");
    if (!text) {
        kv_funnel_free(f);
        return KV_ENOMEM;
    }
    size_t u = (size_t)snprintf(text, cap,
                                "# kvsim sweep funnel statistics: per layer, means over the query heads\n"
                                "# sample: %s\n# mass: %g\nlayer",
                                sample_id, f->mass);
    for (int k = 0; k < N_STATS; k++)
        u += (size_t)snprintf(text + u, cap - u, "\t%s", STATS[k].col);
    u += (size_t)snprintf(text + u, cap - u, "\n");
    const double *fields[N_STATS] = {f->entropy, f->norm_entropy, f->frac, f->sink, f->seg};
    for (int l = 0; l < f->n_layers; l++) {
        u += (size_t)snprintf(text + u, cap - u, "%d", l);
        for (int k = 0; k < N_STATS; k++) {
            char b[32];
            put_num(b, sizeof b, kv_funnel_layer_mean(f, fields[k], l));
            u += (size_t)snprintf(text + u, cap - u, "\t%s", b);
        }
        u += (size_t)snprintf(text + u, cap - u, "\n");
    }
    char path[4200];
    snprintf(path, sizeof path, "%s.funnel.tsv", prefix);
    rc = kv_sweep_write_file(path, text, u);
    kv_free(text);
    kv_funnel_free(f);
    return rc;
}

/* ---------------------------------------------------------------- policy comparison */

#define TRY(x)                                                                                                         \
    do {                                                                                                               \
        if ((rc = (x)) != KV_OK)                                                                                       \
            goto done;                                                                                                 \
    } while (0)

static kv_style_t pol_style(int i, const char *label)
{
    static const kv_dash_t dash[3] = {KV_DASH_SOLID, KV_DASH_DASHED, KV_DASH_DOTTED};
    kv_style_t st = {.label = label,
                     .color = kv_palette(i % 7),
                     .width = 2,
                     .dash = dash[(i / 7) % 3],
                     .marker = (kv_marker_t)(KV_MARKER_CIRCLE + i % 6),
                     .marker_size = 8};
    return st;
}

static int fig_comparison(const kv_table_t *t, int n_samples, kv_fig_t **out)
{
    *out = NULL;
    const int cp = kv_table_col(t, "policy"), cbt = kv_table_col(t, "budget_tokens");
    if (cp < 0 || cbt < 0)
        return kv_error(KV_EFORMAT, "aggregate.tsv: no policy or budget_tokens column");
    /* policies in order of first appearance */
    const size_t R = t->n_rows;
    int *pol = kv_malloc(sizeof(int) * (R ? R : 1), "rows"), n_pol = 0;
    const char **names = kv_malloc(sizeof(char *) * (R ? R : 1), "policies");
    double *x = kv_malloc(sizeof(double) * (R ? R : 1), "x"), *y = kv_malloc(sizeof(double) * (R ? R : 1), "y");
    double *lo = kv_malloc(sizeof(double) * (R ? R : 1), "lo"), *hi = kv_malloc(sizeof(double) * (R ? R : 1), "hi");
    kv_fig_t *fig = NULL;
    int rc = pol && names && x && y && lo && hi ? KV_OK : KV_ENOMEM;
    if (rc)
        goto done;
    for (size_t r = 0; r < R; r++) {
        const char *p = kv_table_get(t, r, cp);
        int k = 0;
        while (k < n_pol && strcmp(names[k], p))
            k++;
        if (k == n_pol)
            names[n_pol++] = p;
        pol[r] = k;
    }
    char title[256];
    snprintf(title, sizeof title,
             "Policies over %d samples: mean (line) and bootstrap interval (band) of recall, error and bound",
             n_samples);
    TRY(kv_fig_create(1800, 720, &fig));
    TRY(kv_fig_set_title(fig, title));
    TRY(kv_fig_grid(fig, 1, 3));
    TRY(kv_fig_legend(fig, KV_LEGEND_RIGHT));
    const char *metrics[3] = {"recall_mean", "err_mean", "bound_mean"};
    const char *titles[3] = {"Attention recall (mean)", "Output error (mean)", "Ada-KV bound (mean)"};
    const char *ylabels[3] = {"recall: attention mass kept (fraction)", "||o - ô||_{1} (head output, L_{1})",
                              "2C(1 - F) (L_{1})"};
    double bmin = INFINITY, bmax = 0;
    for (size_t r = 0; r < R; r++) {
        const double b = kv_table_num(t, r, cbt);
        if (b > 0) {
            bmin = fmin(bmin, b);
            bmax = fmax(bmax, b);
        }
    }
    for (int k = 0; k < 3; k++) {
        char clo[64], chi[64];
        snprintf(clo, sizeof clo, "%s_lo", metrics[k]);
        snprintf(chi, sizeof chi, "%s_hi", metrics[k]);
        const int cm = kv_table_col(t, metrics[k]), cl = kv_table_col(t, clo), ch = kv_table_col(t, chi);
        if (cm < 0 || cl < 0 || ch < 0) {
            rc = kv_error(KV_EFORMAT, "aggregate.tsv: no %s, %s or %s column", metrics[k], clo, chi);
            goto done;
        }
        kv_axes_t *ax = kv_fig_axes(fig, 0, k);
        TRY(kv_axes_set_title(ax, titles[k]));
        TRY(kv_axes_set_xlabel(ax, "budget (tokens per head, mean over samples)"));
        TRY(kv_axes_set_ylabel(ax, ylabels[k]));
        if (bmax / bmin >= 4)
            TRY(kv_axes_set_xscale(ax, KV_SCALE_LOG2));
        if (k == 0)
            TRY(kv_axes_set_ylim(ax, NAN, 1.0));
        for (int p = 0; p < n_pol; p++) {
            int n = 0;
            for (size_t r = 0; r < R; r++)
                if (pol[r] == p) {
                    x[n] = kv_table_num(t, r, cbt);
                    y[n] = kv_table_num(t, r, cm);
                    lo[n] = kv_table_num(t, r, cl);
                    hi[n] = kv_table_num(t, r, ch);
                    n++;
                }
            /* by budget */
            for (int a = 1; a < n; a++)
                for (int b = a; b > 0 && x[b - 1] > x[b]; b--) {
                    double *arr[4] = {x, y, lo, hi};
                    for (int q = 0; q < 4; q++) {
                        const double tmp = arr[q][b];
                        arr[q][b] = arr[q][b - 1];
                        arr[q][b - 1] = tmp;
                    }
                }
            char shortl[512];
            if (kv_analyze_short_label(names[p], shortl, sizeof shortl) != KV_OK)
                snprintf(shortl, sizeof shortl, "%s", names[p]);
            kv_style_t st = pol_style(p, shortl);
            kv_style_t band = st;
            band.label = NULL;
            band.color = kv_rgba_alpha(st.color, 0.18);
            if (n) {
                TRY(kv_plot_band(ax, n, x, lo, hi, &band));
                TRY(kv_plot_line(ax, n, x, y,
                                 k == 0 ? &st
                                        : &(kv_style_t){.color = st.color,
                                                        .width = st.width,
                                                        .dash = st.dash,
                                                        .marker = st.marker,
                                                        .marker_size = st.marker_size}));
            }
        }
    }
    *out = fig;
    fig = NULL;
done:
    kv_fig_free(fig);
    kv_free(pol);
    kv_free(names);
    kv_free(x);
    kv_free(y);
    kv_free(lo);
    kv_free(hi);
    return rc;
}

/* ---------------------------------------------------------------- funnel over samples */

typedef struct {
    int L, n;    /* layers, samples */
    double *v;   /* (N_STATS, L, n) */
    double *agg; /* (N_STATS, L, 3): mean, lo, hi */
} funnel_set_t;

static int read_funnels(kv_sweep_t *s, funnel_set_t *fs)
{
    const char **ids = NULL;
    int n_ids = 0, rc = kv_sweep_done_ids(s, &ids, &n_ids);
    memset(fs, 0, sizeof *fs);
    if (rc)
        return rc;
    for (int i = 0; i < n_ids && rc == KV_OK; i++) {
        char path[4300];
        snprintf(path, sizeof path, "%s/samples/%s.funnel.tsv", kv_sweep_output(s), ids[i]);
        struct stat st;
        if (stat(path, &st) != 0)
            continue;
        kv_table_t *t = NULL;
        if ((rc = kv_table_read(path, &t)))
            break;
        const int cl = kv_table_col(t, "layer");
        int cs[N_STATS];
        for (int k = 0; k < N_STATS; k++)
            cs[k] = kv_table_col(t, STATS[k].col);
        if (cl < 0 || cs[0] < 0) {
            rc = kv_error(KV_EFORMAT, "%s: no layer or entropy column", path);
        } else {
            if (!fs->v) {
                fs->L = (int)t->n_rows;
                fs->v = kv_malloc(sizeof(double) * N_STATS * (size_t)(fs->L ? fs->L : 1) * (size_t)n_ids, "funnel");
                if (!fs->v)
                    rc = KV_ENOMEM;
            }
            if (rc == KV_OK && (int)t->n_rows != fs->L)
                rc = kv_error(KV_EFORMAT, "%s: %zu layers, other samples have %d", path, t->n_rows, fs->L);
            for (int k = 0; k < N_STATS && rc == KV_OK; k++)
                for (int l = 0; l < fs->L; l++)
                    fs->v[((size_t)k * fs->L + l) * n_ids + fs->n] =
                        cs[k] >= 0 ? kv_table_num(t, (size_t)l, cs[k]) : NAN;
            if (rc == KV_OK)
                fs->n++;
        }
        kv_table_free(t);
    }
    /* compact to stride n */
    if (rc == KV_OK && fs->v && fs->n != n_ids)
        for (int k = 0; k < N_STATS; k++)
            for (int l = 0; l < fs->L; l++)
                memmove(fs->v + ((size_t)k * fs->L + l) * fs->n, fs->v + ((size_t)k * fs->L + l) * n_ids,
                        sizeof(double) * (size_t)fs->n);
    kv_free(ids);
    return rc;
}

static int write_funnel_tsv(kv_sweep_t *s, funnel_set_t *fs)
{
    int resamples;
    uint64_t seed;
    double conf;
    kv_sweep_bootstrap_settings(s, &resamples, &seed, &conf);
    fs->agg = kv_malloc(sizeof(double) * N_STATS * (size_t)fs->L * 3, "funnel aggregate");
    const size_t cap = 1024 + (size_t)fs->L * (N_STATS * 3 + 2) * 20;
    char *text = kv_malloc(cap, "funnel.tsv");
    int rc = fs->agg && text ? KV_OK : KV_ENOMEM;
    if (rc)
        goto done;
    size_t u =
        (size_t)snprintf(text, cap,
                         "# kvsim sweep funnel statistics over the samples: per layer, the mean over samples of "
                         "each statistic (itself a mean over heads) and its %g %% percentile bootstrap interval\n"
                         "# sweep: %s\n# samples: %d\n# bootstrap: %d resamples of the samples, seed %llu, "
                         "confidence %g\nlayer\tn_samples",
                         100 * conf, kv_sweep_name(s), fs->n, resamples, (unsigned long long)seed, conf);
    for (int k = 0; k < N_STATS; k++)
        u += (size_t)snprintf(text + u, cap - u, "\t%s\t%s_lo\t%s_hi", STATS[k].col, STATS[k].col, STATS[k].col);
    u += (size_t)snprintf(text + u, cap - u, "\n");
    for (int l = 0; l < fs->L; l++) {
        u += (size_t)snprintf(text + u, cap - u, "%d\t%d", l, fs->n);
        for (int k = 0; k < N_STATS; k++) {
            double *a = fs->agg + ((size_t)k * fs->L + l) * 3;
            if ((rc = kv_bootstrap_mean(fs->v + ((size_t)k * fs->L + l) * fs->n, fs->n, resamples, seed, conf, &a[0],
                                        &a[1], &a[2])))
                goto done;
            for (int j = 0; j < 3; j++) {
                char b[32];
                put_num(b, sizeof b, a[j]);
                u += (size_t)snprintf(text + u, cap - u, "\t%s", b);
            }
        }
        u += (size_t)snprintf(text + u, cap - u, "\n");
    }
    char path[4200];
    snprintf(path, sizeof path, "%s/funnel.tsv", kv_sweep_output(s));
    rc = kv_sweep_write_file(path, text, u);
done:
    kv_free(text);
    return rc;
}

static int fig_funnel(const funnel_set_t *fs, kv_fig_t **out)
{
    *out = NULL;
    int np = 0, idx[N_STATS];
    for (int k = 0; k < N_STATS; k++) {
        int any = 0;
        for (int l = 0; l < fs->L; l++)
            any |= !isnan(fs->agg[((size_t)k * fs->L + l) * 3]);
        if (any)
            idx[np++] = k;
    }
    kv_fig_t *fig = NULL;
    const int L = fs->L;
    double *x = kv_malloc(sizeof(double) * (size_t)L, "x"), *y = kv_malloc(sizeof(double) * (size_t)L, "y");
    double *lo = kv_malloc(sizeof(double) * (size_t)L, "lo"), *hi = kv_malloc(sizeof(double) * (size_t)L, "hi");
    int rc = x && y && lo && hi ? KV_OK : KV_ENOMEM;
    if (rc)
        goto done;
    char title[200];
    snprintf(title, sizeof title,
             "Funnel statistics per layer over %d samples: mean (line) and bootstrap interval "
             "(band)",
             fs->n);
    TRY(kv_fig_create(1600, 1000, &fig));
    TRY(kv_fig_set_title(fig, title));
    const int cols = np > 4 ? 3 : 2, rows = (np + cols - 1) / cols;
    TRY(kv_fig_grid(fig, rows > 0 ? rows : 1, cols));
    for (int l = 0; l < L; l++)
        x[l] = l;
    const kv_rgba_t c = kv_palette(0);
    for (int p = 0; p < np; p++) {
        const int k = idx[p];
        kv_axes_t *ax = kv_fig_axes(fig, p / cols, p % cols);
        TRY(kv_axes_set_title(ax, STATS[k].title));
        TRY(kv_axes_set_xlabel(ax, "layer"));
        TRY(kv_axes_set_ylabel(ax, STATS[k].ylabel));
        if (STATS[k].unit)
            TRY(kv_axes_set_ylim(ax, 0, NAN));
        if (L == 1)
            TRY(kv_axes_set_xlim(ax, -0.5, 0.5));
        for (int l = 0; l < L; l++) {
            const double *a = fs->agg + ((size_t)k * L + l) * 3;
            y[l] = a[0];
            lo[l] = a[1];
            hi[l] = a[2];
        }
        TRY(kv_plot_band(ax, L, x, lo, hi, &(kv_style_t){.color = kv_rgba_alpha(c, 0.25)}));
        TRY(kv_plot_line(ax, L, x, y,
                         &(kv_style_t){.color = c, .width = 3, .marker = KV_MARKER_CIRCLE, .marker_size = 7}));
    }
    *out = fig;
    fig = NULL;
done:
    kv_fig_free(fig);
    kv_free(x);
    kv_free(y);
    kv_free(lo);
    kv_free(hi);
    return rc;
}

int kv_analyze_sweep(kv_sweep_t *s, const char *format, kv_analyze_sweep_out_t *out)
{
    memset(out, 0, sizeof *out);
    char dir[4200], path[4300];
    snprintf(dir, sizeof dir, "%s/figures", kv_sweep_output(s));
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return kv_error(KV_EIO, "%s: cannot create folder: %s", dir, strerror(errno));
    kv_table_t *t = NULL;
    kv_fig_t *fig = NULL;
    funnel_set_t fs = {0};
    snprintf(path, sizeof path, "%s/aggregate.tsv", kv_sweep_output(s));
    int rc = kv_table_read(path, &t);
    if (rc)
        goto done;
    int n_samples = 0;
    const int cn = kv_table_col(t, "n_samples");
    for (size_t r = 0; r < t->n_rows; r++)
        n_samples = KV_MAX(n_samples, (int)kv_table_num(t, r, cn));
    if (t->n_rows > 0) {
        TRY(fig_comparison(t, n_samples, &fig));
        snprintf(out->figures[out->n_figures], sizeof out->figures[0], "figures/comparison.%s", format);
        snprintf(path, sizeof path, "%s/%s", kv_sweep_output(s), out->figures[out->n_figures]);
        TRY(kv_fig_save(fig, path));
        out->n_figures++;
        kv_fig_free(fig);
        fig = NULL;
    }
    TRY(read_funnels(s, &fs));
    out->funnel_samples = fs.n;
    if (fs.n > 0 && fs.L > 0) {
        TRY(write_funnel_tsv(s, &fs));
        TRY(fig_funnel(&fs, &fig));
        snprintf(out->figures[out->n_figures], sizeof out->figures[0], "figures/funnel.%s", format);
        snprintf(path, sizeof path, "%s/%s", kv_sweep_output(s), out->figures[out->n_figures]);
        TRY(kv_fig_save(fig, path));
        out->n_figures++;
    }
done:
    kv_fig_free(fig);
    kv_table_free(t);
    kv_free(fs.v);
    kv_free(fs.agg);
    return rc;
}
