/*
 * figures.c: the named figure recipes of the analysis (see kv_analyze.h), built on plots/kv_plot.h.
 *
 * Every recipe returns a retained kv_fig_t; the caller saves it (PNG, SVG, PDF) or renders it into
 * an in-memory surface (tests). A recipe whose data are missing from its input (no per-layer rows,
 * no head-adaptive policy, ...) returns KV_EUNAVAIL with a message that says what is missing, so
 * the report can say why a figure is absent.
 *
 * Conventions shared by the figures: the Okabe-Ito palette (colour-blind safe, its faint yellow
 * left out) for policies, with the line pattern changing every seven policies and a marker shape
 * per policy, so fifteen policies stay distinguishable in print; short policy names in legends
 * (kv_analyze_short_label); log axes where values span more than a factor of 30; units in every axis label.
 */
#include "analyze/kv_analyze.h"

#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TRY(call)                                                                                                      \
    do {                                                                                                               \
        if ((rc = (call)) != KV_OK)                                                                                    \
            goto done;                                                                                                 \
    } while (0)

static int new_fig(int w, int h, const char *title, kv_fig_t **fig)
{
    int rc = kv_fig_create(w, h, fig);
    if (rc == KV_OK && title)
        rc = kv_fig_set_title(*fig, title);
    return rc;
}

/* Colour of policy i: the first seven Okabe-Ito colours (their yellow is too faint for thin lines
 * on white), repeating. */
#define POL_COLORS 7
static kv_rgba_t pol_color(int i)
{
    return kv_palette(i % POL_COLORS);
}

/* Style of policy i: its colour, a marker shape, and a line pattern that changes every seven
 * policies (solid, dashed, dotted), so no two of the first 21 policies look alike. */
static kv_style_t pol_style(int i, const char *label)
{
    static const kv_dash_t dash[3] = {KV_DASH_SOLID, KV_DASH_DASHED, KV_DASH_DOTTED};
    kv_style_t st = {.label = label,
                     .color = pol_color(i),
                     .width = 2,
                     .dash = dash[(i / POL_COLORS) % 3],
                     .marker = (kv_marker_t)(KV_MARKER_CIRCLE + i % 6),
                     .marker_size = 9};
    return st;
}

/* Positive finite values spanning more than a factor of 30: a log axis reads better. */
static int spans_decades(const double *v, size_t n)
{
    double lo = INFINITY, hi = 0;
    for (size_t i = 0; i < n; i++)
        if (isfinite(v[i]) && v[i] > 0) {
            lo = fmin(lo, v[i]);
            hi = fmax(hi, v[i]);
        }
    return hi > 0 && hi / lo > 30;
}

/* Up to `max` budgets of the set, evenly picked from the sorted list (first and last kept). With
 * pols (n_pols of them), only budgets at which one of those policies has per-layer rows: a sweep
 * merged from several results files need not run every policy at every budget, and a panel of
 * nothing tells the reader nothing. */
static int pick_budgets(const kv_res_set_t *s, const int *pols, int n_pols, int *out, int max)
{
    int all[256];
    const int n_any = kv_res_set_budgets(s, all, 256);
    int n = 0;
    for (int b = 0; b < n_any; b++) {
        int has = !pols;
        for (int i = 0; i < n_pols && !has; i++)
            has = kv_res_set_find(s, pols[i], all[b], 0, -1) != NULL;
        if (has)
            all[n++] = all[b];
    }
    if (n <= max) {
        memcpy(out, all, sizeof(int) * (size_t)n);
        return n;
    }
    int m = 0;
    for (int i = 0; i < max; i++) {
        int k = (int)lround((double)i * (n - 1) / (max - 1));
        if (m == 0 || out[m - 1] != all[k])
            out[m++] = all[k];
    }
    return m;
}

static void grid_shape(int n, int *rows, int *cols)
{
    if (n <= 3) {
        *rows = 1;
        *cols = n < 1 ? 1 : n;
    } else if (n <= 4) {
        *rows = 2;
        *cols = 2;
    } else if (n <= 6) {
        *rows = 2;
        *cols = 3;
    } else if (n <= 8) {
        *rows = 2;
        *cols = 4;
    } else {
        *cols = (int)ceil(sqrt((double)n * 1.6));
        *rows = (n + *cols - 1) / *cols;
    }
}

/* ================================================================ 1. funneling */

int kv_analyze_fig_funneling(kv_trace_t *t, kv_backend_t *be, const kv_funneling_opts_t *o, int head_layer,
                             kv_fig_t **out)
{
    *out = NULL;
    const kv_trace_meta_t *m = kv_trace_meta(t);
    kv_funneling_opts_t def = {.n_layers = 6};
    if (!o)
        o = &def;
    int layers[64], n;
    if (head_layer >= 0) {
        if (head_layer >= m->n_layers)
            return kv_error(KV_ERANGE, "funneling figure: layer %d outside [0, %d)", head_layer, m->n_layers);
        n = KV_MIN(m->n_heads, 64);
    } else if (o->layers && o->n_explicit > 0) {
        n = KV_MIN(o->n_explicit, 64);
        for (int i = 0; i < n; i++) {
            if (o->layers[i] < 0 || o->layers[i] >= m->n_layers)
                return kv_error(KV_ERANGE, "funneling figure: layer %d outside [0, %d)", o->layers[i], m->n_layers);
            layers[i] = o->layers[i];
        }
    } else {
        n = kv_analyze_pick_layers(m->n_layers, KV_MIN(o->n_layers > 0 ? o->n_layers : 6, 64), layers);
    }
    int rows, cols;
    grid_shape(n, &rows, &cols);
    const int T = m->n_tokens;
    kv_fig_t *fig = NULL;
    kv_attn_map_t map = {0};
    float *mean = NULL;
    int rc;
    kv_map_src_t src = KV_MAP_AUTO;
    /* square panels: the height follows the width of a column (plus title and legend) */
    const int fw = o->width > 0 ? o->width : 1600;
    const int fh = o->height > 0 ? o->height : KV_MIN(1100, (int)(rows * (fw - 120.0) / cols) + 170);
    TRY(new_fig(fw, fh, NULL, &fig));
    TRY(kv_fig_grid(fig, rows, cols));
    if (m->n_segments > 1 || m->n_prompt < T)
        TRY(kv_fig_legend(fig, KV_LEGEND_BELOW));
    for (int p = 0; p < n; p++) {
        const int layer = head_layer >= 0 ? head_layer : layers[p];
        if (p == 0 || head_layer < 0) {
            kv_attn_map_free(&map);
            TRY(kv_attn_map_layer(t, be, layer, o->src, &map));
            src = map.src;
            kv_free(mean);
            mean = kv_malloc(sizeof(float) * (size_t)map.rows * map.cols, "mean map");
            if (!mean) {
                rc = KV_ENOMEM;
                goto done;
            }
        }
        if (head_layer >= 0)
            memcpy(mean, map.maps + (size_t)p * map.rows * map.cols, sizeof(float) * (size_t)map.rows * map.cols);
        else
            kv_attn_map_mean(&map, mean);
        kv_axes_t *ax = kv_fig_axes(fig, p / cols, p % cols);
        char title[96];
        if (head_layer >= 0)
            snprintf(title, sizeof title, "head %d (KV head %d)", p, p / (m->n_heads / m->n_kv_heads));
        else
            snprintf(title, sizeof title, "layer %d%s", layer,
                     layer == 0                 ? " (first)"
                     : layer == m->n_layers - 1 ? " (last)"
                                                : "");
        TRY(kv_axes_set_title(ax, title));
        if (p / cols == rows - 1 || p + cols >= n)
            TRY(kv_axes_set_xlabel(ax, "key position (token)"));
        /* every panel labelled: panels of a row keep the same size (equal aspect shrinks the ones
         * with wider margins) */
        TRY(kv_axes_set_ylabel(ax, "query position (token)"));
        TRY(kv_axes_set_equal_aspect(ax, 1));
        kv_heat_style_t hs = {.cmap = KV_CMAP_MAGMA,
                              .log = 1,
                              .colorbar = KV_CBAR_NONE,
                              .x0 = -0.5,
                              .x1 = T - 0.5,
                              .y0 = -0.5,
                              .y1 = T - 0.5};
        TRY(kv_plot_heatmap(ax, map.rows, map.cols, mean, &hs));
        /* Boundaries, drawn only where attention exists (on and below the diagonal): a segment start
         * s is a vertical line (keys of the new segment) from query s down and a horizontal one
         * (queries of the new segment) from key 0 to the diagonal. A dark line under a light one
         * keeps them visible on dark and light cells alike. */
        kv_style_t under = {.color = {0, 0, 0, 0.35}, .width = 2.6};
        kv_style_t seg = {.label = "segment start", .color = kv_palette(5), .width = 1.6, .dash = KV_DASH_DASHED};
        /* solid: a dash-dot pattern reads as dashed at this width, like the segment lines */
        kv_style_t dec = {.label = "end of prompt (decode queries below)", .color = kv_palette(2), .width = 1.8};
        const double lo = -0.5, hi = T - 0.5;
        for (int s = 1; s < m->n_segments; s++) {
            const double at = m->segments[s] - 0.5;
            const double vx[2] = {at, at}, vy[2] = {at, hi}, hx[2] = {lo, at}, hy[2] = {at, at};
            TRY(kv_plot_line(ax, 2, vx, vy, &under));
            TRY(kv_plot_line(ax, 2, hx, hy, &under));
            TRY(kv_plot_line(ax, 2, vx, vy, &seg));
            TRY(kv_plot_line(ax, 2, hx, hy, &seg));
        }
        if (m->n_prompt < T) {
            const double at = m->n_prompt - 0.5, px[2] = {lo, at}, py[2] = {at, at};
            TRY(kv_plot_line(ax, 2, px, py, &under));
            TRY(kv_plot_line(ax, 2, px, py, &dec));
        }
    }
    char title[256];
    if (head_layer >= 0)
        snprintf(title, sizeof title, "Attention of every head, layer %d (%s)", head_layer,
                 src == KV_MAP_POOLED  ? "pooled maps"
                 : src == KV_MAP_EXACT ? "exact"
                                       : "sampled rows");
    else
        snprintf(title, sizeof title, "Pyramid information funneling: attention per layer, mean over its %d heads",
                 m->n_heads);
    TRY(kv_fig_set_title(fig, title));
    kv_heat_style_t bar = {.cmap = KV_CMAP_MAGMA, .log = 1};
    const char *blabel = src == KV_MAP_POOLED  ? "attention probability (max over each cell)"
                         : src == KV_MAP_EXACT ? "attention probability"
                                               : "attention probability (max over key cell)";
    TRY(kv_fig_colorbar(fig, &bar, blabel));
    *out = fig;
    fig = NULL;
done:
    kv_attn_map_free(&map);
    kv_free(mean);
    kv_fig_free(fig);
    return rc;
}

/* ================================================================ 2. funnel curves */

int kv_analyze_fig_funnel_curves(const kv_funnel_t *f, kv_fig_t **out)
{
    *out = NULL;
    const int L = f->n_layers, H = f->n_heads;
    char fraclab[96];
    snprintf(fraclab, sizeof fraclab, "fraction of visible keys for %.0f %% of attention", 100 * f->mass);
    const struct {
        const double *v;
        const char *title, *ylabel;
        int unit; /* 1: y in [0, 1] */
    } panels[] = {
        {f->entropy, "Attention entropy", "entropy (nats)", 0},
        {f->norm_entropy, "Normalised entropy", "entropy / ln(visible keys)", 1},
        {f->frac, "Concentration", fraclab, 1},
        {f->sink, "Mass on the first token (sink)", "attention on token 0 (fraction)", 1},
        {f->seg, "Mass inside the query's segment", "attention in own segment (fraction)", 1},
    };
    const int np = f->has_segments ? 5 : 4;
    kv_fig_t *fig = NULL;
    double *x = kv_malloc(sizeof(double) * (size_t)L, "layers"), *y = kv_malloc(sizeof(double) * (size_t)L, "curve");
    int rc = (!x || !y) ? KV_ENOMEM : KV_OK;
    if (rc)
        goto done;
    int rows = 2, cols = np == 5 ? 3 : 2;
    TRY(new_fig(1600, 1000, "Funnel statistics per layer: one faint line per head, bold mean over heads", &fig));
    TRY(kv_fig_grid(fig, rows, cols));
    TRY(kv_fig_legend(fig, KV_LEGEND_RIGHT));
    for (int l = 0; l < L; l++)
        x[l] = l;
    const kv_rgba_t c = kv_palette(0);
    for (int p = 0; p < np; p++) {
        kv_axes_t *ax = kv_fig_axes(fig, p / cols, p % cols);
        TRY(kv_axes_set_title(ax, panels[p].title));
        TRY(kv_axes_set_xlabel(ax, "layer"));
        TRY(kv_axes_set_ylabel(ax, panels[p].ylabel));
        if (p != 0 && p != 1 && spans_decades(panels[p].v, (size_t)L * H))
            TRY(kv_axes_set_yscale(ax, KV_SCALE_LOG));
        else if (panels[p].unit)
            TRY(kv_axes_set_ylim(ax, 0, NAN));
        if (L == 1)
            TRY(kv_axes_set_xlim(ax, -0.5, 0.5));
        for (int h = 0; h < H; h++) {
            for (int l = 0; l < L; l++)
                y[l] = panels[p].v[(size_t)l * H + h];
            TRY(kv_plot_line(ax, L, x, y,
                             &(kv_style_t){.label = h == 0 ? "one head" : NULL,
                                           .color = kv_rgba_alpha(c, 0.35),
                                           .width = 1.2,
                                           .marker = L == 1 ? KV_MARKER_CIRCLE : KV_MARKER_NONE,
                                           .marker_size = 5}));
        }
        for (int l = 0; l < L; l++)
            y[l] = kv_funnel_layer_mean(f, panels[p].v, l);
        TRY(kv_plot_line(
            ax, L, x, y,
            &(kv_style_t){
                .label = "mean over heads", .color = c, .width = 3.5, .marker = KV_MARKER_CIRCLE, .marker_size = 8}));
    }
    *out = fig;
    fig = NULL;
done:
    kv_free(x);
    kv_free(y);
    kv_fig_free(fig);
    return rc;
}

/* ================================================================ 3. head concentration */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct {
    double v;
    int layer;
} lv_t;

static int cmp_lv(const void *a, const void *b)
{
    const lv_t *x = a, *y = b;
    if (x->v != y->v)
        return (x->v > y->v) - (x->v < y->v);
    return (x->layer > y->layer) - (x->layer < y->layer);
}

/* Colour of layer l of L: palette for a few layers, else viridis from dark (first) to light. */
static kv_rgba_t layer_color(int l, int L)
{
    if (L <= KV_PALETTE_SIZE - 1)
        return kv_palette(l);
    return kv_cmap_eval(KV_CMAP_VIRIDIS, L > 1 ? 0.92 * l / (L - 1) : 0);
}

int kv_analyze_fig_head_concentration(const kv_funnel_t *f, kv_fig_t **out)
{
    *out = NULL;
    const int L = f->n_layers, H = f->n_heads, N = L * H;
    kv_fig_t *fig = NULL;
    double *x = kv_malloc(sizeof(double) * (size_t)(N > H ? N : H), "ranks");
    double *y = kv_malloc(sizeof(double) * (size_t)(N > H ? N : H), "sorted");
    lv_t *all = kv_malloc(sizeof(lv_t) * (size_t)N, "all heads");
    int rc = (!x || !y || !all) ? KV_ENOMEM : KV_OK;
    if (rc)
        goto done;
    char title[192], ylab[96];
    snprintf(title, sizeof title,
             "Head concentration: fraction of the cache needed to collect %.0f %% of a query's attention, per head",
             100 * f->mass);
    snprintf(ylab, sizeof ylab, "fraction of visible keys for %.0f %%", 100 * f->mass);
    TRY(new_fig(1600, 800, title, &fig));
    TRY(kv_fig_grid(fig, 1, 2));
    TRY(kv_fig_share(fig, 0, 1));
    TRY(kv_fig_legend(fig, KV_LEGEND_RIGHT));
    int logy = spans_decades(f->frac, (size_t)N);
    kv_axes_t *a0 = kv_fig_axes(fig, 0, 0), *a1 = kv_fig_axes(fig, 0, 1);
    TRY(kv_axes_set_title(a0, "Per layer: heads sorted"));
    TRY(kv_axes_set_xlabel(a0, "head rank within the layer (most concentrated first)"));
    TRY(kv_axes_set_ylabel(a0, ylab));
    TRY(kv_axes_set_title(a1, "All layers: heads sorted"));
    TRY(kv_axes_set_xlabel(a1, "head rank over all layers"));
    TRY(kv_axes_set_ylabel(a1, ylab));
    if (logy) {
        TRY(kv_axes_set_yscale(a0, KV_SCALE_LOG));
        TRY(kv_axes_set_yscale(a1, KV_SCALE_LOG));
    } else {
        TRY(kv_axes_set_ylim(a0, 0, NAN));
        TRY(kv_axes_set_ylim(a1, 0, NAN));
    }
    int label_every = L <= KV_PALETTE_SIZE - 1 ? 1 : (L + 5) / 6;
    for (int l = 0; l < L; l++) {
        for (int h = 0; h < H; h++) {
            x[h] = h + 1;
            y[h] = f->frac[(size_t)l * H + h];
        }
        qsort(y, (size_t)H, sizeof(double), cmp_double);
        char lab[32];
        snprintf(lab, sizeof lab, "layer %d", l);
        int labelled = l % label_every == 0 || l == L - 1;
        TRY(kv_plot_line(a0, H, x, y,
                         &(kv_style_t){.label = labelled ? lab : NULL,
                                       .color = layer_color(l, L),
                                       .width = 2,
                                       .marker = KV_MARKER_CIRCLE,
                                       .marker_size = 6}));
    }
    for (int l = 0; l < L; l++)
        for (int h = 0; h < H; h++)
            all[(size_t)l * H + h] = (lv_t){f->frac[(size_t)l * H + h], l};
    qsort(all, (size_t)N, sizeof(lv_t), cmp_lv);
    /* the sorted curve over all heads, then each layer's heads as coloured markers on it */
    for (int i = 0; i < N; i++) {
        x[i] = i + 1;
        y[i] = all[i].v;
    }
    TRY(kv_plot_line(a1, N, x, y, &(kv_style_t){.color = {0.55, 0.55, 0.55, 1}, .width = 1.2}));
    for (int l = 0; l < L; l++) {
        int k = 0;
        for (int i = 0; i < N; i++)
            if (all[i].layer == l) {
                x[k] = i + 1;
                y[k] = all[i].v;
                k++;
            }
        char lab[32];
        snprintf(lab, sizeof lab, "layer %d", l);
        int labelled = l % label_every == 0 || l == L - 1;
        TRY(kv_plot_scatter(a1, k, x, y,
                            &(kv_style_t){.label = labelled ? lab : NULL,
                                          .color = layer_color(l, L),
                                          .marker = KV_MARKER_CIRCLE,
                                          .marker_size = N > 200 ? 5 : 8}));
    }
    *out = fig;
    fig = NULL;
done:
    kv_free(x);
    kv_free(y);
    kv_free(all);
    kv_fig_free(fig);
    return rc;
}

/* ================================================================ 4. trade-off curves */

/* Cache memory of a row in bytes (K, V and policy metadata). */
static double row_memory(const kv_res_row_t *r)
{
    return r->mem_bytes + (isnan(r->meta_bytes) ? 0 : r->meta_bytes);
}

int kv_analyze_fig_tradeoff(const kv_res_set_t *s, int by_memory, kv_fig_t **out)
{
    *out = NULL;
    int budgets[256];
    int nb = kv_res_set_budgets(s, budgets, 256);
    if (s->n_pol == 0 || nb == 0)
        return kv_error(KV_EUNAVAIL, "no results rows");
    /* memory unit */
    double maxmem = 0;
    for (size_t r = 0; r < s->n; r++)
        if (s->rows[r].layer < 0)
            maxmem = fmax(maxmem, row_memory(&s->rows[r]));
    const double unit = maxmem >= 1 << 30 ? 1 << 30 : maxmem >= 1 << 20 ? 1 << 20 : 1 << 10;
    const char *uname = unit == 1 << 30 ? "GiB" : unit == 1 << 20 ? "MiB" : "KiB";
    char xlab[96];
    if (by_memory)
        snprintf(xlab, sizeof xlab, "cache memory, K + V + policy metadata (%s)", uname);
    else
        snprintf(xlab, sizeof xlab, "budget (tokens per head, window included)");
    kv_fig_t *fig = NULL;
    double *x = kv_malloc(sizeof(double) * (size_t)nb, "x"), *y = kv_malloc(sizeof(double) * (size_t)nb, "y");
    double *all = kv_malloc(sizeof(double) * (size_t)nb * s->n_pol, "values");
    int rc = (!x || !y || !all) ? KV_ENOMEM : KV_OK;
    if (rc)
        goto done;
    TRY(new_fig(1800, 720,
                by_memory ? "Attention recall, output error and the Ada-KV bound against cache memory (all layers)"
                          : "Attention recall, output error and the Ada-KV bound against the budget (all layers)",
                &fig));
    TRY(kv_fig_grid(fig, 1, 3));
    TRY(kv_fig_legend(fig, KV_LEGEND_RIGHT));
    const char *titles[3] = {"Attention recall (mean)", "Output error (mean)", "Ada-KV bound (mean)"};
    const char *ylabels[3] = {"recall: attention mass kept (fraction)", "||o - ô||_{1} (head output, L_{1})",
                              "2C(1 - F) (L_{1})"};
    for (int k = 0; k < 3; k++) {
        kv_axes_t *ax = kv_fig_axes(fig, 0, k);
        TRY(kv_axes_set_title(ax, titles[k]));
        TRY(kv_axes_set_xlabel(ax, xlab));
        TRY(kv_axes_set_ylabel(ax, ylabels[k]));
        int nv = 0;
        for (int p = 0; p < s->n_pol; p++)
            for (int b = 0; b < nb; b++) {
                const kv_res_row_t *r = kv_res_set_find(s, p, budgets[b], -1, -1);
                all[nv++] = !r ? NAN : k == 0 ? r->recall_mean : k == 1 ? r->err_mean : r->bound_mean;
            }
        if (by_memory)
            TRY(kv_axes_set_xscale(ax, KV_SCALE_LOG));
        else if (nb > 1 && budgets[0] > 0 && (double)budgets[nb - 1] / budgets[0] >= 4)
            TRY(kv_axes_set_xscale(ax, KV_SCALE_LOG2));
        if (k > 0 && spans_decades(all, (size_t)nv))
            TRY(kv_axes_set_yscale(ax, KV_SCALE_LOG));
        for (int p = 0; p < s->n_pol; p++) {
            int n = 0;
            for (int b = 0; b < nb; b++) {
                const kv_res_row_t *r = kv_res_set_find(s, p, budgets[b], -1, -1);
                if (!r)
                    continue;
                x[n] = by_memory ? row_memory(r) / unit : budgets[b];
                y[n] = k == 0 ? r->recall_mean : k == 1 ? r->err_mean : r->bound_mean;
                n++;
            }
            kv_style_t st = pol_style(p, s->shorts[p]);
            if (n)
                TRY(kv_plot_line(ax, n, x, y, &st));
        }
    }
    *out = fig;
    fig = NULL;
done:
    kv_free(x);
    kv_free(y);
    kv_free(all);
    kv_fig_free(fig);
    return rc;
}

/* ================================================================ 5. bound vs actual */

int kv_analyze_fig_bound(const kv_res_set_t *s, kv_fig_t **out)
{
    *out = NULL;
    size_t n_layer_rows = 0;
    for (size_t r = 0; r < s->n; r++)
        n_layer_rows += s->rows[r].layer >= 0 && s->rows[r].head < 0;
    if (!n_layer_rows)
        return kv_error(KV_EUNAVAIL, "no per-layer rows (layer != all, head == all) in the results");
    kv_fig_t *fig = NULL;
    double *x = kv_malloc(sizeof(double) * n_layer_rows, "x"), *y = kv_malloc(sizeof(double) * n_layer_rows, "y");
    double *vx = kv_malloc(sizeof(double) * n_layer_rows, "vx"), *vy = kv_malloc(sizeof(double) * n_layer_rows, "vy");
    int rc = (!x || !y || !vx || !vy) ? KV_ENOMEM : KV_OK;
    if (rc)
        goto done;
    TRY(new_fig(1300, 1000, "Ada-KV bound vs measured output error, per layer and budget (bound holds below y = x)",
                &fig));
    kv_axes_t *ax = kv_fig_axes(fig, 0, 0);
    TRY(kv_axes_set_xscale(ax, KV_SCALE_LOG));
    TRY(kv_axes_set_yscale(ax, KV_SCALE_LOG));
    TRY(kv_axes_set_equal_aspect(ax, 1));
    TRY(kv_axes_set_xlabel(ax, "bound 2C(1 - F), mean over queries (L_{1})"));
    TRY(kv_axes_set_ylabel(ax, "measured error ||o - ô||_{1}, mean over queries (L_{1})"));
    TRY(kv_axes_set_legend(ax, KV_LEGEND_RIGHT));
    int nviol = 0, drawn = 0;
    double lo = INFINITY, hi = 0; /* one range for both axes: y = x is the diagonal, ticks read alike */
    for (int p = 0; p < s->n_pol; p++) {
        int n = 0;
        for (size_t r = 0; r < s->n; r++) {
            const kv_res_row_t *w = &s->rows[r];
            if (w->pol != p || w->layer < 0 || w->head >= 0 || !(w->bound_mean > 0) || !(w->err_mean > 0))
                continue;
            x[n] = w->bound_mean;
            y[n] = w->err_mean;
            lo = fmin(lo, fmin(x[n], y[n]));
            hi = fmax(hi, fmax(x[n], y[n]));
            n++;
            if (w->violations > 0) {
                vx[nviol] = w->bound_mean;
                vy[nviol] = w->err_mean;
                nviol++;
            }
        }
        if (!n)
            continue;
        kv_style_t st = pol_style(p, s->shorts[p]);
        st.marker_size = 8;
        TRY(kv_plot_scatter(ax, n, x, y, &st));
        drawn++;
    }
    if (!drawn) {
        rc = kv_error(KV_EUNAVAIL, "every per-layer row has a zero error or bound (nothing to draw on log axes)");
        goto done;
    }
    if (nviol)
        TRY(kv_plot_scatter(ax, nviol, vx, vy,
                            &(kv_style_t){.label = "rows with bound violations",
                                          .color = kv_rgb_hex(0xd00000),
                                          .marker = KV_MARKER_CROSS,
                                          .marker_size = 16,
                                          .width = 2.5}));
    TRY(kv_axes_set_xlim(ax, lo / 1.5, hi * 1.5));
    TRY(kv_axes_set_ylim(ax, lo / 1.5, hi * 1.5));
    TRY(kv_plot_identity(ax, &(kv_style_t){.label = "y = x", .dash = KV_DASH_DASHED, .color = {0.25, 0.25, 0.25, 1}}));
    *out = fig;
    fig = NULL;
done:
    kv_free(x);
    kv_free(y);
    kv_free(vx);
    kv_free(vy);
    kv_fig_free(fig);
    return rc;
}

/* ================================================================ 6. budget allocation */

int kv_analyze_fig_allocation(const kv_res_set_t *s, kv_fig_t **out)
{
    *out = NULL;
    const int L = kv_res_set_n_layers(s);
    if (L == 0)
        return kv_error(KV_EUNAVAIL, "no per-layer rows in the results");
    /* per-layer bars, one per kind of allocation as the policies' descriptors declare it: a uniform
     * per-head budget (snapkv, ...), budgets that vary by layer (pyramidkv, cake, kvcompress) and
     * head-adaptive ones (adakv, criticalkv(ada=1)); the strips show the first head-adaptive one */
    const unsigned special = KV_POL_OVER_BUDGET | KV_POL_BUDGET_LAYER | KV_POL_BUDGET_SEQUENCE | KV_POL_NO_EVICT |
                             KV_POL_ORACLE | KV_POL_BUDGET_FREE | KV_POL_RANDOM;
    const unsigned kinds[3][2] = {{0, special},
                                  {KV_POL_OVER_BUDGET | KV_POL_BUDGET_SEQUENCE, KV_POL_NO_EVICT | KV_POL_BUDGET_LAYER},
                                  {KV_POL_BUDGET_LAYER, 0}};
    int bar_pol[3], nbar = 0, strip_pol = -1;
    for (int i = 0; i < 3; i++)
        for (int p = 0; p < s->n_pol; p++) {
            const unsigned f = kv_res_set_policy_flags(s, p);
            if ((f & KV_POL_ONESHOT) && (!kinds[i][0] || (f & kinds[i][0])) && !(f & kinds[i][1])) {
                bar_pol[nbar++] = p;
                strip_pol = i == 2 ? p : strip_pol;
                break;
            }
        }
    if (nbar == 0) /* none of the three: every policy */
        for (int p = 0; p < s->n_pol && nbar < 3; p++)
            bar_pol[nbar++] = p;
    int H = 0;
    for (size_t r = 0; r < s->n; r++)
        if (s->rows[r].pol == strip_pol && s->rows[r].head + 1 > H)
            H = s->rows[r].head + 1;
    const int strips = strip_pol >= 0 && H > 0;
    int budgets[4], with[4], n_with = nbar;
    memcpy(with, bar_pol, sizeof(int) * (size_t)nbar);
    if (strips)
        with[n_with++] = strip_pol;
    const int nb = pick_budgets(s, with, n_with, budgets, 4);
    if (nb == 0)
        return kv_error(KV_EUNAVAIL, "no per-layer rows of the allocation policies");
    kv_fig_t *fig = NULL;
    double *v = kv_malloc(sizeof(double) * (size_t)L, "bars");
    float *z = kv_malloc(sizeof(float) * (size_t)(L * (H > 0 ? H : 1)), "strip");
    char **cats = kv_calloc((size_t)L, sizeof(char *), "layer names");
    int rc = (!v || !z || !cats) ? KV_ENOMEM : KV_OK;
    for (int l = 0; l < L && rc == KV_OK; l++) {
        cats[l] = kv_malloc(16, "layer name");
        if (!cats[l])
            rc = KV_ENOMEM;
        else
            snprintf(cats[l], 16, "%d", l);
    }
    if (rc)
        goto done;
    TRY(new_fig(nb > 2 ? 1800 : 1500, strips ? 1100 : 640,
                strips ? "Budget allocation: context tokens kept per layer (top) and per head, head-adaptive (bottom)"
                       : "Budget allocation: context tokens kept per layer",
                &fig));
    TRY(kv_fig_grid(fig, strips ? 2 : 1, nb));
    TRY(kv_fig_legend(fig, KV_LEGEND_RIGHT));
    for (int b = 0; b < nb; b++) {
        kv_axes_t *ax = kv_fig_axes(fig, 0, b);
        char title[128], bname[96];
        kv_res_budget_name(s, budgets[b], bname, sizeof bname);
        snprintf(title, sizeof title, "budget %s", bname);
        TRY(kv_axes_set_title(ax, title));
        TRY(kv_axes_set_xcategories(ax, L, (const char *const *)cats));
        TRY(kv_axes_set_xlabel(ax, "layer"));
        if (b == 0)
            TRY(kv_axes_set_ylabel(ax, "context tokens kept (mean per head)"));
        TRY(kv_axes_set_grid(ax, 0, 1));
        for (int i = 0; i < nbar; i++) {
            int p = bar_pol[i];
            for (int l = 0; l < L; l++) {
                const kv_res_row_t *r = kv_res_set_find(s, p, budgets[b], l, -1);
                v[l] = r ? r->kept : NAN;
            }
            TRY(kv_plot_bars(ax, L, v, &(kv_style_t){.label = s->shorts[p], .color = pol_color(p)}));
        }
        TRY(kv_plot_hline(
            ax, budgets[b],
            &(kv_style_t){.label = "budget B (uniform)", .dash = KV_DASH_DASHED, .color = {0.2, 0.2, 0.2, 1}}));
        if (!strips)
            continue;
        kv_axes_t *hx = kv_fig_axes(fig, 1, b);
        snprintf(title, sizeof title, "%.60s per head, budget %d", s->shorts[strip_pol], budgets[b]);
        TRY(kv_axes_set_title(hx, title));
        char **hcats = kv_calloc((size_t)H, sizeof(char *), "head names");
        if (!hcats) {
            rc = KV_ENOMEM;
            goto done;
        }
        for (int h = 0; h < H && rc == KV_OK; h++) {
            hcats[h] = kv_malloc(16, "head name");
            if (!hcats[h])
                rc = KV_ENOMEM;
            else
                snprintf(hcats[h], 16, "%d", h);
        }
        if (rc == KV_OK)
            rc = kv_axes_set_xcategories(hx, H, (const char *const *)hcats);
        if (rc == KV_OK)
            rc = kv_axes_set_ycategories(hx, L, (const char *const *)cats);
        for (int h = 0; h < H; h++)
            kv_free(hcats[h]);
        kv_free(hcats);
        if (rc)
            goto done;
        TRY(kv_axes_set_xlabel(hx, "query head"));
        if (b == 0)
            TRY(kv_axes_set_ylabel(hx, "layer"));
        for (int l = 0; l < L; l++)
            for (int h = 0; h < H; h++) {
                const kv_res_row_t *r = kv_res_set_find(s, strip_pol, budgets[b], l, h);
                z[(size_t)l * H + h] = r && budgets[b] > 0 ? (float)(r->kept / budgets[b]) : NAN;
            }
        TRY(kv_plot_heatmap(hx, L, H, z, &(kv_heat_style_t){.annotate = "%.1f"}));
    }
    if (strips) {
        /* one scale for every budget: tokens kept relative to the uniform budget, white at 1 */
        kv_heat_style_t bar = {.cmap = KV_CMAP_DIVERGING, .center = 1};
        TRY(kv_fig_colorbar(fig, &bar, "tokens kept / budget B (1 = uniform)"));
    }
    *out = fig;
    fig = NULL;
done:
    if (cats)
        for (int l = 0; l < L; l++)
            kv_free(cats[l]);
    kv_free(cats);
    kv_free(v);
    kv_free(z);
    kv_fig_free(fig);
    return rc;
}

/* ================================================================ 7. recall heat map */

int kv_analyze_fig_recall_heatmap(const kv_res_set_t *s, kv_fig_t **out)
{
    *out = NULL;
    const int L = kv_res_set_n_layers(s), P = s->n_pol;
    if (L == 0 || P == 0)
        return kv_error(KV_EUNAVAIL, "no per-layer rows in the results");
    int budgets[6];
    const int nb = pick_budgets(s, NULL, 0, budgets, 6);
    int rows, cols;
    grid_shape(nb, &rows, &cols);
    kv_fig_t *fig = NULL;
    float *z = kv_malloc(sizeof(float) * (size_t)P * L, "recall cells");
    char **lcats = kv_calloc((size_t)L, sizeof(char *), "layer names");
    int rc = (!z || !lcats) ? KV_ENOMEM : KV_OK;
    for (int l = 0; l < L && rc == KV_OK; l++) {
        lcats[l] = kv_malloc(16, "layer name");
        if (!lcats[l])
            rc = KV_ENOMEM;
        else
            snprintf(lcats[l], 16, "%d", l);
    }
    if (rc)
        goto done;
    const int panel_h = 90 + 34 * P;
    TRY(new_fig(cols * (L > 12 ? 900 : 640) + 200, rows * panel_h + 80,
                "Attention recall per policy and layer (mean over heads and evaluation queries)", &fig));
    TRY(kv_fig_grid(fig, rows, cols));
    double lo = 1;
    for (int b = 0; b < nb; b++) {
        kv_axes_t *ax = kv_fig_axes(fig, b / cols, b % cols);
        char title[128], bname[96];
        kv_res_budget_name(s, budgets[b], bname, sizeof bname);
        snprintf(title, sizeof title, "budget %s", bname);
        TRY(kv_axes_set_title(ax, title));
        TRY(kv_axes_set_xcategories(ax, L, (const char *const *)lcats));
        TRY(kv_axes_set_ycategories(ax, P, (const char *const *)s->shorts));
        TRY(kv_axes_set_xlabel(ax, "layer"));
        for (int p = 0; p < P; p++)
            for (int l = 0; l < L; l++) {
                const kv_res_row_t *r = kv_res_set_find(s, p, budgets[b], l, -1);
                z[(size_t)p * L + l] = r ? (float)r->recall_mean : NAN;
                if (r && r->recall_mean < lo)
                    lo = r->recall_mean;
            }
        TRY(kv_plot_heatmap(ax, P, L, z, &(kv_heat_style_t){.cmap = KV_CMAP_VIRIDIS, .annotate = "%.2f"}));
    }
    kv_heat_style_t bar = {.cmap = KV_CMAP_VIRIDIS, .vmin = lo < 1 ? floor(lo * 10) / 10 : 0, .vmax = 1};
    TRY(kv_fig_colorbar(fig, &bar, "attention recall (fraction of mass kept)"));
    *out = fig;
    fig = NULL;
done:
    if (lcats)
        for (int l = 0; l < L; l++)
            kv_free(lcats[l]);
    kv_free(lcats);
    kv_free(z);
    kv_fig_free(fig);
    return rc;
}
