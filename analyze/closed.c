/*
 * closed.c: the closed-loop side of the analysis (see kv_analyze.h): kvsim eval and kvsim niah results
 * read by column name, the comparison of replay's open-loop numbers with eval's closed-loop ones,
 * and their figures.
 *
 * Open vs closed. For each budget that both a replay results set and an eval results set hold, the
 * configurations present in both (matched by canonical policy label and resolved per-head budget)
 * are ranked twice: by replay's attention-recall loss 1 - F and output error E (overall rows), and
 * by eval's KL(full || compressed) and disagreement 1 - agreement (summary rows). Spearman's rank
 * correlation (average ranks for ties) says how well the open-loop ranking predicts the
 * closed-loop one; a pair of configurations is discordant when replay's recall orders it one way
 * and eval's KL the other (ties in either count as neither). Configurations that lose nothing in
 * either loop (recall 1 and KL 0: the full cache, a budget above the prompt) carry no ranking and
 * are left out.
 */
#include "analyze/kv_analyze.h"

#include "sim/common/kv_common.h"
#include "sim/result.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TRY(call)                                                                                                      \
    do {                                                                                                               \
        if ((rc = (call)) != KV_OK)                                                                                    \
            goto done;                                                                                                 \
    } while (0)

/* ---------------------------------------------------------------- loading */

int kv_res_kind(const char *path, kv_res_kind_t *kind)
{
    kv_table_t *t;
    int rc = kv_table_read(path, &t);
    if (rc)
        return rc;
    if (kv_table_col(t, "found") >= 0 && kv_table_col(t, "depth") >= 0)
        *kind = KV_RES_NIAH;
    else if (kv_table_col(t, "kl_mean") >= 0 && kv_table_col(t, "step") >= 0)
        *kind = KV_RES_EVAL;
    else
        *kind = KV_RES_REPLAY;
    kv_table_free(t);
    return KV_OK;
}

int kv_closed_set_create(kv_closed_set_t **out)
{
    *out = kv_calloc(1, sizeof **out, "closed-loop results");
    return *out ? KV_OK : KV_ENOMEM;
}

void kv_closed_set_free(kv_closed_set_t *s)
{
    if (!s)
        return;
    for (int i = 0; i < s->n_pol; i++) {
        kv_free(s->labels[i]);
        kv_free(s->shorts[i]);
    }
    for (int i = 0; i < s->n_files; i++) {
        kv_free(s->files[i]);
        kv_free(s->file_cmd[i]);
    }
    kv_free(s->labels);
    kv_free(s->shorts);
    kv_free(s->files);
    kv_free(s->file_cmd);
    kv_free(s->ev);
    kv_free(s->ni);
    kv_free(s);
}

static int pol_index(kv_closed_set_t *s, const char *label)
{
    for (int i = 0; i < s->n_pol; i++)
        if (!strcmp(s->labels[i], label))
            return i;
    char **l = kv_realloc(s->labels, sizeof(char *) * (size_t)(s->n_pol + 1), "labels");
    if (!l)
        return -1;
    s->labels = l;
    char **sh = kv_realloc(s->shorts, sizeof(char *) * (size_t)(s->n_pol + 1), "labels");
    if (!sh)
        return -1;
    s->shorts = sh;
    char buf[512];
    kv_analyze_short_label(label, buf, sizeof buf);
    s->labels[s->n_pol] = kv_strdup(label);
    s->shorts[s->n_pol] = kv_strdup(buf);
    if (!s->labels[s->n_pol] || !s->shorts[s->n_pol])
        return -1;
    return s->n_pol++;
}

static int grow(void **a, size_t *cap, size_t n, size_t elem)
{
    if (n < *cap)
        return KV_OK;
    size_t c = *cap ? 2 * *cap : 64;
    void *p = kv_realloc(*a, c * elem, "results rows");
    if (!p)
        return KV_ENOMEM;
    *a = p;
    *cap = c;
    return KV_OK;
}

/* Column indices, or an error naming the file and the first missing column. */
static int columns(const kv_table_t *t, const char *path, const char *const *names, int n, int *idx)
{
    for (int i = 0; i < n; i++)
        if ((idx[i] = kv_table_col(t, names[i])) < 0)
            return kv_error(KV_EFORMAT, "%s: no column '%s' (is it a kvsim eval or niah results file?)", path,
                            names[i]);
    return KV_OK;
}

int kv_closed_set_load(kv_closed_set_t *s, const char *path)
{
    kv_res_kind_t kind;
    kv_table_t *t = NULL;
    int rc = kv_res_kind(path, &kind);
    if (rc == KV_OK && kind == KV_RES_REPLAY)
        rc = kv_error(KV_EFORMAT, "%s: replay results, not kvsim eval or niah ones", path);
    if (rc == KV_OK)
        rc = kv_table_read(path, &t);
    if (rc)
        return rc;
    char **f = kv_realloc(s->files, sizeof(char *) * (size_t)(s->n_files + 1), "files");
    char **fc = f ? kv_realloc(s->file_cmd, sizeof(char *) * (size_t)(s->n_files + 1), "files") : NULL;
    if (f)
        s->files = f;
    if (fc)
        s->file_cmd = fc;
    if (!f || !fc) {
        kv_table_free(t);
        return KV_ENOMEM;
    }
    const char *cmd = kv_table_prov(t, "command");
    s->files[s->n_files] = kv_strdup(path);
    s->file_cmd[s->n_files] = kv_strdup(cmd ? cmd : "");
    s->n_files++;
    if (kind == KV_RES_EVAL) {
        static const char *const need[] = {"policy", "budget",    "budget_tokens", "step", "kl_mean", "kl_max",
                                           "agree",  "first_div", "nll",           "dnll", "kept",    "mem_bytes"};
        int c[12];
        if ((rc = columns(t, path, need, 12, c)))
            goto done;
        for (size_t r = 0; r < t->n_rows; r++) {
            if (strcmp(kv_table_get(t, r, c[3]), "all"))
                continue; /* the summary rows */
            if ((rc = grow((void **)&s->ev, &s->cap_ev, s->n_ev, sizeof *s->ev)))
                goto done;
            kv_eval_row_t *e = &s->ev[s->n_ev];
            memset(e, 0, sizeof *e);
            if ((e->pol = pol_index(s, kv_table_get(t, r, c[0]))) < 0) {
                rc = KV_ENOMEM;
                goto done;
            }
            snprintf(e->budget, sizeof e->budget, "%s", kv_table_get(t, r, c[1]));
            e->budget_tokens = (int)kv_table_num(t, r, c[2]);
            e->kl = kv_table_num(t, r, c[4]);
            e->kl_max = kv_table_num(t, r, c[5]);
            e->agree = kv_table_num(t, r, c[6]);
            e->first_div = kv_table_num(t, r, c[7]); /* NaN: none */
            e->nll = kv_table_num(t, r, c[8]);
            e->dnll = kv_table_num(t, r, c[9]);
            e->kept = kv_table_num(t, r, c[10]);
            e->mem = kv_table_num(t, r, c[11]);
            s->n_ev++;
        }
    } else {
        static const char *const need[] = {"policy",   "budget", "budget_tokens", "length", "depth",
                                           "n_prompt", "found",  "kl_mean",       "agree"};
        int c[9];
        if ((rc = columns(t, path, need, 9, c)))
            goto done;
        for (size_t r = 0; r < t->n_rows; r++) {
            if ((rc = grow((void **)&s->ni, &s->cap_ni, s->n_ni, sizeof *s->ni)))
                goto done;
            kv_niah_row_t *e = &s->ni[s->n_ni];
            memset(e, 0, sizeof *e);
            if ((e->pol = pol_index(s, kv_table_get(t, r, c[0]))) < 0) {
                rc = KV_ENOMEM;
                goto done;
            }
            snprintf(e->budget, sizeof e->budget, "%s", kv_table_get(t, r, c[1]));
            e->full = !strcmp(e->budget, "none");
            e->budget_tokens = e->full ? -1 : (int)kv_table_num(t, r, c[2]);
            const double len = kv_table_num(t, r, c[3]);
            e->length = isnan(len) ? -1 : (int)len; /* "all": a summary row */
            e->depth = kv_table_num(t, r, c[4]);
            e->n_prompt = kv_table_num(t, r, c[5]);
            e->found = kv_table_num(t, r, c[6]);
            e->kl = kv_table_num(t, r, c[7]);
            e->agree = kv_table_num(t, r, c[8]);
            s->n_ni++;
        }
    }
done:
    kv_table_free(t);
    return rc;
}

/* ---------------------------------------------------------------- open vs closed */

/* Ranks of v[0..n) (1 = smallest), ties at their average rank. */
static void ranks(const double *v, int n, double *r)
{
    for (int i = 0; i < n; i++) {
        int below = 0, equal = 0;
        for (int j = 0; j < n; j++) {
            below += v[j] < v[i];
            equal += v[j] == v[i];
        }
        r[i] = below + (equal + 1) / 2.0;
    }
}

double kv_spearman(const double *x, const double *y, int n)
{
    if (n < 3)
        return NAN;
    double *rx = kv_malloc(sizeof(double) * (size_t)n * 2, "ranks");
    if (!rx)
        return NAN;
    double *ry = rx + n;
    ranks(x, n, rx);
    ranks(y, n, ry);
    double mx = 0, my = 0, sxy = 0, sxx = 0, syy = 0;
    for (int i = 0; i < n; i++) {
        mx += rx[i] / n;
        my += ry[i] / n;
    }
    for (int i = 0; i < n; i++) {
        sxy += (rx[i] - mx) * (ry[i] - my);
        sxx += (rx[i] - mx) * (rx[i] - mx);
        syy += (ry[i] - my) * (ry[i] - my);
    }
    kv_free(rx);
    return sxx > 0 && syy > 0 ? sxy / sqrt(sxx * syy) : NAN;
}

void kv_open_closed_free(kv_open_closed_t *oc)
{
    if (!oc)
        return;
    for (int b = 0; b < oc->n_budgets; b++)
        kv_free(oc->b[b].cfg);
    kv_free(oc->b);
    memset(oc, 0, sizeof *oc);
}

static int cmp_int(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

int kv_open_closed_compute(const kv_res_set_t *rs, const kv_closed_set_t *cs, kv_open_closed_t *oc)
{
    memset(oc, 0, sizeof *oc);
    int bud[256] = {0}, nb = 0;
    for (size_t i = 0; i < cs->n_ev && nb < 256; i++) {
        int have = 0;
        for (int k = 0; k < nb; k++)
            have |= bud[k] == cs->ev[i].budget_tokens;
        if (!have)
            bud[nb++] = cs->ev[i].budget_tokens;
    }
    qsort(bud, (size_t)nb, sizeof(int), cmp_int);
    oc->b = kv_calloc((size_t)(nb ? nb : 1), sizeof *oc->b, "open vs closed");
    if (!oc->b)
        return KV_ENOMEM;
    for (int k = 0; k < nb; k++) {
        kv_oc_budget_t *B = &oc->b[oc->n_budgets];
        B->budget_tokens = bud[k];
        B->cfg = kv_calloc(cs->n_ev ? cs->n_ev : 1, sizeof *B->cfg, "configurations");
        if (!B->cfg)
            return KV_ENOMEM;
        for (size_t i = 0; i < cs->n_ev; i++) {
            const kv_eval_row_t *e = &cs->ev[i];
            if (e->budget_tokens != bud[k] || isnan(e->kl))
                continue;
            int rp = -1;
            for (int p = 0; p < rs->n_pol && rp < 0; p++)
                if (!strcmp(rs->labels[p], cs->labels[e->pol]))
                    rp = p;
            const kv_res_row_t *r = rp >= 0 ? kv_res_set_find(rs, rp, bud[k], -1, -1) : NULL;
            if (!r || isnan(r->recall_mean) || (r->recall_mean >= 1 && e->kl == 0))
                continue;
            int dup = 0;
            for (int j = 0; j < B->n; j++)
                dup |= B->cfg[j].pol == e->pol;
            if (dup)
                continue;
            if (!B->budget[0])
                snprintf(B->budget, sizeof B->budget, "%s", e->budget);
            B->cfg[B->n++] = (kv_oc_cfg_t){.pol = e->pol,
                                           .pol_replay = rp,
                                           .loss = 1 - r->recall_mean,
                                           .err = r->err_mean,
                                           .kl = e->kl,
                                           .disagree = 1 - e->agree};
        }
        if (B->n < 2) {
            kv_free(B->cfg);
            memset(B, 0, sizeof *B);
            continue;
        }
        const int n = B->n;
        double *v = kv_malloc(sizeof(double) * (size_t)n * 4, "ranks");
        if (!v)
            return KV_ENOMEM;
        for (int j = 0; j < n; j++) {
            v[j] = B->cfg[j].loss;
            v[n + j] = B->cfg[j].err;
            v[2 * n + j] = B->cfg[j].kl;
            v[3 * n + j] = B->cfg[j].disagree;
        }
        B->rho_loss_kl = kv_spearman(v, v + 2 * n, n);
        B->rho_err_kl = kv_spearman(v + n, v + 2 * n, n);
        B->rho_loss_dis = kv_spearman(v, v + 3 * n, n);
        B->rho_err_dis = kv_spearman(v + n, v + 3 * n, n);
        double *rl = kv_malloc(sizeof(double) * (size_t)n * 2, "ranks");
        if (!rl) {
            kv_free(v);
            return KV_ENOMEM;
        }
        ranks(v, n, rl);
        ranks(v + 2 * n, n, rl + n);
        for (int j = 0; j < n; j++) {
            B->cfg[j].rank_open = rl[j];
            B->cfg[j].rank_closed = rl[n + j];
            for (int i = j + 1; i < n; i++) {
                const double a = B->cfg[i].loss - B->cfg[j].loss, c = B->cfg[i].kl - B->cfg[j].kl;
                if (a != 0 && c != 0) {
                    B->pairs++;
                    B->discordant += (a > 0) != (c > 0);
                }
            }
        }
        kv_free(rl);
        kv_free(v);
        oc->n_budgets++;
    }
    return KV_OK;
}

/* ---------------------------------------------------------------- figures */

#define POL_COLORS 7
static kv_style_t pol_style(int i, const char *label)
{
    static const kv_dash_t dash[3] = {KV_DASH_SOLID, KV_DASH_DASHED, KV_DASH_DOTTED};
    kv_style_t st = {.label = label,
                     .color = kv_palette(i % POL_COLORS),
                     .width = 2,
                     .dash = dash[(i / POL_COLORS) % 3],
                     .marker = (kv_marker_t)(KV_MARKER_CIRCLE + i % 6),
                     .marker_size = 10};
    return st;
}

static void grid_of(int n, int *rows, int *cols)
{
    *cols = n <= 3 ? (n < 1 ? 1 : n) : n <= 4 ? 2 : n <= 6 ? 3 : n <= 8 ? 4 : (int)ceil(sqrt(n * 1.6));
    *rows = (n + *cols - 1) / *cols;
}

/* Budgets (at most max) of the eval rows, sorted. */
static int eval_budgets(const kv_closed_set_t *s, int *out, int max)
{
    int n = 0;
    for (size_t i = 0; i < s->n_ev; i++) {
        int have = 0;
        for (int k = 0; k < n; k++)
            have |= out[k] == s->ev[i].budget_tokens;
        if (!have && n < max)
            out[n++] = s->ev[i].budget_tokens;
    }
    qsort(out, (size_t)n, sizeof(int), cmp_int);
    return n;
}

int kv_analyze_fig_open_closed(const kv_closed_set_t *cs, const kv_open_closed_t *oc, kv_fig_t **out)
{
    *out = NULL;
    if (oc->n_budgets == 0)
        return kv_error(KV_EUNAVAIL, "no budget with at least two configurations in both the replay and the eval "
                                     "results (same policy labels and budgets, one prompt)");
    const int nb = KV_MIN(oc->n_budgets, 4);
    kv_fig_t *fig = NULL;
    int rc;
    TRY(kv_fig_create(520 * nb + 320, 1000, &fig));
    TRY(kv_fig_set_title(fig, "Open loop (replay) vs closed loop (eval): the same prompt, policies and budgets"));
    TRY(kv_fig_grid(fig, 2, nb));
    for (int k = 0; k < nb; k++) {
        const kv_oc_budget_t *B = &oc->b[oc->n_budgets <= 4 ? k : (int)lround((double)k * (oc->n_budgets - 1) / 3)];
        for (int row = 0; row < 2; row++) {
            kv_axes_t *ax = kv_fig_axes(fig, row, k);
            char title[160];
            if (row == 0)
                snprintf(title, sizeof title, "B = %d: Spearman %.2f, %d/%d pairs discordant", B->budget_tokens,
                         B->rho_loss_kl, B->discordant, B->pairs);
            else
                snprintf(title, sizeof title, "B = %d: Spearman %.2f", B->budget_tokens, B->rho_err_dis);
            TRY(kv_axes_set_title(ax, title));
            TRY(kv_axes_set_xlabel(ax, row == 0 ? "replay: attention lost, 1 - recall" : "replay: output error (L1)"));
            TRY(kv_axes_set_ylabel(ax, row == 0 ? "eval: KL(full || compressed), nats" : "eval: top-1 disagreement"));
            double xs[256], ys[256];
            int n = 0;
            for (int j = 0; j < B->n && n < 256; j++) {
                const kv_oc_cfg_t *c = &B->cfg[j];
                xs[n] = row == 0 ? c->loss : c->err;
                ys[n] = row == 0 ? c->kl : c->disagree;
                n++;
            }
            int logx = 1, logy = row == 0;
            for (int j = 0; j < n; j++) {
                logx &= xs[j] > 0;
                logy &= ys[j] > 0;
            }
            if (logx)
                TRY(kv_axes_set_xscale(ax, KV_SCALE_LOG));
            if (logy)
                TRY(kv_axes_set_yscale(ax, KV_SCALE_LOG));
            for (int j = 0; j < B->n; j++) {
                const kv_oc_cfg_t *c = &B->cfg[j];
                kv_style_t st = pol_style(c->pol, cs->shorts[c->pol]);
                TRY(kv_plot_scatter(ax, 1, &xs[j], &ys[j], &st));
            }
        }
    }
    TRY(kv_fig_legend(fig, KV_LEGEND_RIGHT));
    *out = fig;
    fig = NULL;
done:
    kv_fig_free(fig);
    return rc;
}

int kv_analyze_fig_eval_budget(const kv_closed_set_t *s, kv_fig_t **out)
{
    *out = NULL;
    if (s->n_ev == 0)
        return kv_error(KV_EUNAVAIL, "no kvsim eval rows");
    int bud[64] = {0};
    const int nb = eval_budgets(s, bud, 64);
    kv_fig_t *fig = NULL;
    int rc;
    double *x = kv_malloc(sizeof(double) * 64 * 3, "curve"), *y1 = x ? x + 64 : NULL, *y2 = x ? x + 128 : NULL;
    if (!x)
        return KV_ENOMEM;
    TRY(kv_fig_create(1700, 700, &fig));
    TRY(kv_fig_set_title(fig, "Closed loop: what the model loses when it decodes with the compressed cache"));
    TRY(kv_fig_grid(fig, 1, 2));
    kv_axes_t *a0 = kv_fig_axes(fig, 0, 0), *a1 = kv_fig_axes(fig, 0, 1);
    TRY(kv_axes_set_xlabel(a0, "budget (tokens per head)"));
    TRY(kv_axes_set_ylabel(a0, "mean KL(full || compressed), nats"));
    TRY(kv_axes_set_xlabel(a1, "budget (tokens per head)"));
    TRY(kv_axes_set_ylabel(a1, "top-1 agreement with the full cache"));
    TRY(kv_axes_set_xscale(a0, KV_SCALE_LOG2));
    TRY(kv_axes_set_xscale(a1, KV_SCALE_LOG2));
    TRY(kv_axes_set_yscale(a0, KV_SCALE_LOG));
    for (int p = 0; p < s->n_pol; p++) {
        int n = 0;
        for (int b = 0; b < nb; b++)
            for (size_t i = 0; i < s->n_ev; i++)
                if (s->ev[i].pol == p && s->ev[i].budget_tokens == bud[b]) {
                    x[n] = bud[b];
                    y1[n] = s->ev[i].kl;
                    y2[n] = s->ev[i].agree;
                    n++;
                    break;
                }
        if (!n)
            continue;
        kv_style_t st = pol_style(p, s->shorts[p]);
        TRY(kv_plot_line(a0, n, x, y1, &st));
        TRY(kv_plot_line(a1, n, x, y2, &st));
    }
    TRY(kv_fig_legend(fig, KV_LEGEND_RIGHT));
    *out = fig;
    fig = NULL;
done:
    kv_free(x);
    kv_fig_free(fig);
    return rc;
}

/* The configurations of the NIAH rows: the full cache first, then (policy, budget) pairs in file order. */
typedef struct {
    int pol, budget_tokens, full;
    char budget[32];
    double score; /* summary row's found */
} niah_cfg_t;

static int niah_cfgs(const kv_closed_set_t *s, niah_cfg_t *out, int max)
{
    int n = 0;
    for (size_t i = 0; i < s->n_ni; i++) {
        const kv_niah_row_t *r = &s->ni[i];
        int k = 0;
        while (k < n && !(out[k].pol == r->pol && !strcmp(out[k].budget, r->budget)))
            k++;
        if (k == n) {
            if (n == max)
                continue;
            out[n] = (niah_cfg_t){r->pol, r->budget_tokens, r->full, "", NAN};
            snprintf(out[n].budget, sizeof out[n].budget, "%s", r->budget);
            n++;
        }
        if (r->length < 0)
            out[k].score = r->found;
        else if (!r->full)
            out[k].budget_tokens = r->budget_tokens;
    }
    /* the full cache first */
    for (int k = 1; k < n; k++)
        if (out[k].full) {
            niah_cfg_t f = out[k];
            memmove(out + 1, out, sizeof *out * (size_t)k);
            out[0] = f;
            break;
        }
    return n;
}

int kv_analyze_fig_niah_grid(const kv_closed_set_t *s, kv_fig_t **out)
{
    *out = NULL;
    niah_cfg_t cfg[64];
    const int nc = niah_cfgs(s, cfg, 64);
    int L[64], nl = 0;
    double D[64];
    int nd = 0;
    for (size_t i = 0; i < s->n_ni; i++) {
        const kv_niah_row_t *r = &s->ni[i];
        if (r->length < 0)
            continue;
        int hl = 0, hd = 0;
        for (int k = 0; k < nl; k++)
            hl |= L[k] == r->length;
        for (int k = 0; k < nd; k++)
            hd |= D[k] == r->depth;
        if (!hl && nl < 64)
            L[nl++] = r->length;
        if (!hd && nd < 64)
            D[nd++] = r->depth;
    }
    if (nc == 0 || nl == 0 || nd == 0)
        return kv_error(KV_EUNAVAIL, "no kvsim niah rows");
    qsort(L, (size_t)nl, sizeof(int), cmp_int);
    for (int i = 1; i < nd; i++) /* depths ascending */
        for (int j = i; j > 0 && D[j] < D[j - 1]; j--) {
            double t = D[j];
            D[j] = D[j - 1];
            D[j - 1] = t;
        }
    const int np = KV_MIN(nc, 24);
    int rows, cols;
    grid_of(np, &rows, &cols);
    kv_fig_t *fig = NULL;
    int rc;
    float *z = kv_malloc(sizeof(float) * (size_t)nl * nd, "cells");
    char **lc = kv_calloc((size_t)nl, sizeof(char *), "labels"), **dc = kv_calloc((size_t)nd, sizeof(char *), "labels");
    if (!z || !lc || !dc) {
        rc = KV_ENOMEM;
        goto done;
    }
    for (int i = 0; i < nl; i++)
        if ((lc[i] = kv_malloc(16, "label")))
            snprintf(lc[i], 16, "%d", L[i]);
    for (int i = 0; i < nd; i++)
        if ((dc[i] = kv_malloc(16, "label")))
            snprintf(dc[i], 16, "%.0f%%", 100 * D[i]);
    TRY(kv_fig_create(cols * (110 + 70 * nl) + 260, rows * (130 + 48 * nd) + 80, &fig));
    TRY(kv_fig_set_title(fig, "Needle in a haystack: retrieved (1) or not (0) per prompt length and needle depth"));
    TRY(kv_fig_grid(fig, rows, cols));
    for (int k = 0; k < np; k++) {
        kv_axes_t *ax = kv_fig_axes(fig, k / cols, k % cols);
        char title[160];
        if (cfg[k].full)
            snprintf(title, sizeof title, "full cache: %.0f%%", 100 * cfg[k].score);
        else
            snprintf(title, sizeof title, "%s, B=%d: %.0f%%", s->shorts[cfg[k].pol], cfg[k].budget_tokens,
                     100 * cfg[k].score);
        TRY(kv_axes_set_title(ax, title));
        for (int d = 0; d < nd; d++)
            for (int l = 0; l < nl; l++) {
                double sum = 0;
                int cnt = 0;
                for (size_t i = 0; i < s->n_ni; i++) {
                    const kv_niah_row_t *r = &s->ni[i];
                    if (r->pol == cfg[k].pol && !strcmp(r->budget, cfg[k].budget) && r->length == L[l] &&
                        r->depth == D[d] && !isnan(r->found)) {
                        sum += r->found;
                        cnt++;
                    }
                }
                z[(size_t)d * nl + l] = cnt ? (float)(sum / cnt) : NAN;
            }
        TRY(kv_axes_set_xcategories(ax, nl, (const char *const *)lc));
        TRY(kv_axes_set_ycategories(ax, nd, (const char *const *)dc));
        if (k / cols == rows - 1)
            TRY(kv_axes_set_xlabel(ax, "prompt length (tokens)"));
        if (k % cols == 0)
            TRY(kv_axes_set_ylabel(ax, "needle depth"));
        TRY(kv_plot_heatmap(ax, nd, nl, z, &(kv_heat_style_t){.cmap = KV_CMAP_VIRIDIS, .annotate = "%.0f"}));
    }
    kv_heat_style_t bar = {.cmap = KV_CMAP_VIRIDIS, .vmin = 0, .vmax = 1};
    TRY(kv_fig_colorbar(fig, &bar, "retrieved (share of cells)"));
    *out = fig;
    fig = NULL;
done:
    if (lc)
        for (int i = 0; i < nl; i++)
            kv_free(lc[i]);
    if (dc)
        for (int i = 0; i < nd; i++)
            kv_free(dc[i]);
    kv_free(lc);
    kv_free(dc);
    kv_free(z);
    kv_fig_free(fig);
    return rc;
}

int kv_analyze_fig_niah_summary(const kv_closed_set_t *s, kv_fig_t **out)
{
    *out = NULL;
    niah_cfg_t cfg[64];
    const int nc = niah_cfgs(s, cfg, 64);
    if (nc == 0)
        return kv_error(KV_EUNAVAIL, "no kvsim niah rows");
    kv_fig_t *fig = NULL;
    int rc;
    TRY(kv_fig_create(1300, 750, &fig));
    TRY(kv_fig_set_title(fig, "Needle in a haystack: share of the grid retrieved, per policy and budget"));
    kv_axes_t *ax = kv_fig_axes(fig, 0, 0);
    TRY(kv_axes_set_xlabel(ax, "budget (tokens per head)"));
    TRY(kv_axes_set_ylabel(ax, "retrieved (share of length x depth cells)"));
    TRY(kv_axes_set_xscale(ax, KV_SCALE_LOG2));
    TRY(kv_axes_set_ylim(ax, -0.02, 1.05));
    for (int k = 0; k < nc; k++)
        if (cfg[k].full)
            TRY(kv_plot_hline(ax, cfg[k].score,
                              &(kv_style_t){.label = "full cache", .dash = KV_DASH_DASHED, .width = 2}));
    for (int p = 0; p < s->n_pol; p++) {
        double x[64], y[64];
        int n = 0;
        for (int k = 0; k < nc; k++)
            if (!cfg[k].full && cfg[k].pol == p && cfg[k].budget_tokens > 0) {
                x[n] = cfg[k].budget_tokens;
                y[n] = cfg[k].score;
                n++;
            }
        for (int i = 1; i < n; i++) /* by budget */
            for (int j = i; j > 0 && x[j] < x[j - 1]; j--) {
                double t = x[j];
                x[j] = x[j - 1];
                x[j - 1] = t;
                t = y[j];
                y[j] = y[j - 1];
                y[j - 1] = t;
            }
        if (n) {
            kv_style_t st = pol_style(p, s->shorts[p]);
            TRY(kv_plot_line(ax, n, x, y, &st));
        }
    }
    TRY(kv_axes_set_legend(ax, KV_LEGEND_RIGHT));
    *out = fig;
    fig = NULL;
done:
    kv_fig_free(fig);
    return rc;
}
