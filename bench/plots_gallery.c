/*
 * plots_gallery.c: example figures of the plots/ library on synthetic data, written to
 * build/gallery/ (or the folder given as the first argument). It is the place to look at when
 * changing the library: every kind of figure the analyze module needs appears here once.
 *
 *   make build/bench_plots_gallery && build/bench_plots_gallery [DIR]
 *
 * Figures: a 2x3 grid of heat maps with one shared log colour bar and boundary lines; faint
 * per-series lines with a bold mean and a p10..p90 band on a log y axis; grouped bars with long
 * category names; a log-log scatter with the y = x line; a grid of line plots with one figure
 * legend and shared y; a categorical heat map with row and column labels; the colour maps and the
 * palette; the same line figure as SVG and PDF.
 */
#include "plots/kv_plot.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define CHECK(call)                                                                                                    \
    do {                                                                                                               \
        int rc_ = (call);                                                                                              \
        if (rc_ != KV_OK) {                                                                                            \
            fprintf(stderr, "plots_gallery: %s: %s\n", #call, kv_last_error());                                        \
            exit(1);                                                                                                   \
        }                                                                                                              \
    } while (0)

static char dir[512] = "build/gallery";

static void save(kv_fig_t *fig, const char *name)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    double t0 = kv_now();
    CHECK(kv_fig_save(fig, path));
    fprintf(stderr, "  wrote %s (%.0f ms)\n", path, 1e3 * (kv_now() - t0));
}

static double gauss(kv_rng_t *r)
{
    return kv_rng_normal(r);
}

/* 1. heat-map grid: lower-triangular fields with a bright first column, a bright diagonal, and
 * mass that fades with distance; the fade gets stronger panel by panel. */
static void fig_heat_grid(void)
{
    const int T = 96, P = 6;
    const int seg[] = {20, 44, 70};
    kv_fig_t *fig;
    CHECK(kv_fig_create(1600, 1000, &fig));
    CHECK(kv_fig_set_title(fig, "Heat-map grid: shared log colour scale, boundaries at rows/columns 20, 44, 70"));
    CHECK(kv_fig_grid(fig, 2, 3));
    float *z = malloc(sizeof(float) * T * T);
    for (int p = 0; p < P; p++) {
        double decay = 0.02 + 0.05 * p, sink = 0.05 + 0.1 * p;
        for (int r = 0; r < T; r++) {
            double sum = 0;
            for (int c = 0; c < T; c++) {
                double v = 0;
                if (c <= r) {
                    v = exp(-decay * (r - c)) + (c == 0 ? sink * (r + 1) : 0) + (c == r ? 0.5 : 0);
                    for (int s = 0; s < 3; s++)
                        if (c == seg[s] && r >= seg[s])
                            v += 0.3;
                }
                z[r * T + c] = (float)v;
                sum += v;
            }
            for (int c = 0; c < T; c++)
                z[r * T + c] = (float)(z[r * T + c] / sum);
        }
        kv_axes_t *ax = kv_fig_axes(fig, p / 3, p % 3);
        char title[64];
        snprintf(title, sizeof title, "panel %d (decay %.2f)", p, decay);
        CHECK(kv_axes_set_title(ax, title));
        CHECK(kv_axes_set_xlabel(ax, "column (index)"));
        CHECK(kv_axes_set_ylabel(ax, "row (index)"));
        CHECK(kv_axes_set_equal_aspect(ax, 1));
        kv_heat_style_t hs = {.cmap = KV_CMAP_MAGMA, .log = 1};
        CHECK(kv_plot_heatmap(ax, T, T, z, &hs));
        kv_style_t line = {.color = {1, 1, 1, 0.85}, .width = 1.2, .dash = KV_DASH_DASHED};
        for (int s = 0; s < 3; s++) {
            CHECK(kv_plot_vline(ax, seg[s] - 0.5, &line));
            CHECK(kv_plot_hline(ax, seg[s] - 0.5, &line));
        }
    }
    free(z);
    kv_heat_style_t bar = {.cmap = KV_CMAP_MAGMA, .log = 1};
    CHECK(kv_fig_colorbar(fig, &bar, "weight (fraction of row)"));
    save(fig, "heat_grid.png");
    kv_fig_free(fig);
}

/* 2. faint lines per series, bold mean, p10..p90 band, log y. */
static void make_faint_lines(kv_fig_t **out)
{
    const int S = 12, N = 32;
    kv_rng_t rng;
    kv_rng_seed(&rng, 7);
    kv_fig_t *fig;
    CHECK(kv_fig_create(1600, 1000, &fig));
    CHECK(kv_fig_set_title(fig, "Faint line per series, bold mean, p10..p90 band"));
    kv_axes_t *ax = kv_fig_axes(fig, 0, 0);
    CHECK(kv_axes_set_xlabel(ax, "depth (index)"));
    CHECK(kv_axes_set_ylabel(ax, "fraction needed for 90 % of the mass"));
    CHECK(kv_axes_set_yscale(ax, KV_SCALE_LOG));
    double x[32], y[12][32], mean[32], p10[32], p90[32];
    for (int i = 0; i < N; i++)
        x[i] = i;
    for (int s = 0; s < S; s++) {
        double off = gauss(&rng) * 0.4;
        for (int i = 0; i < N; i++)
            y[s][i] = 0.5 * exp(-0.12 * i + off + 0.15 * gauss(&rng));
    }
    for (int i = 0; i < N; i++) {
        double col[12], m = 0;
        for (int s = 0; s < S; s++) {
            col[s] = y[s][i];
            m += log(col[s]);
        }
        mean[i] = exp(m / S);
        for (int a = 0; a < S; a++)
            for (int b = a + 1; b < S; b++)
                if (col[b] < col[a]) {
                    double t = col[a];
                    col[a] = col[b];
                    col[b] = t;
                }
        p10[i] = col[1];
        p90[i] = col[10];
    }
    kv_rgba_t c = kv_palette(0);
    CHECK(kv_plot_band(ax, N, x, p10, p90, &(kv_style_t){.label = "p10..p90", .color = c}));
    for (int s = 0; s < S; s++)
        CHECK(kv_plot_line(
            ax, N, x, y[s],
            &(kv_style_t){.label = s == 0 ? "per series" : NULL, .color = kv_rgba_alpha(c, 0.3), .width = 1}));
    CHECK(kv_plot_line(ax, N, x, mean, &(kv_style_t){.label = "geometric mean", .color = c, .width = 3.5}));
    CHECK(kv_plot_hline(ax, 0.01, &(kv_style_t){.label = "1 % reference", .dash = KV_DASH_DASHED}));
    *out = fig;
}

/* 3. grouped bars with long category names */
static void fig_bars(void)
{
    const char *cats[] = {"uniform",
                          "pyramid (beta=20)",
                          "head-adaptive (alpha=0.2)",
                          "sliding window",
                          "heavy hitters + recent",
                          "first + last",
                          "random baseline",
                          "oracle top-k"};
    const int G = 8;
    const char *series[] = {"budget 64", "budget 256", "budget 1024"};
    kv_fig_t *fig;
    CHECK(kv_fig_create(1600, 1000, &fig));
    CHECK(kv_fig_set_title(fig, "Grouped bars with long category names"));
    kv_axes_t *ax = kv_fig_axes(fig, 0, 0);
    CHECK(kv_axes_set_xcategories(ax, G, cats));
    CHECK(kv_axes_set_ylabel(ax, "recall (fraction of attention kept)"));
    CHECK(kv_axes_set_xlabel(ax, "allocation scheme"));
    CHECK(kv_axes_set_grid(ax, 0, 1));
    for (int s = 0; s < 3; s++) {
        double v[8];
        for (int g = 0; g < G; g++)
            v[g] = fmin(1.0, 0.35 + 0.2 * s + 0.05 * ((g * 7 + s * 3) % 5) - (g == 6 ? 0.25 : 0) + (g == 7 ? 0.2 : 0));
        CHECK(kv_plot_bars(ax, G, v, &(kv_style_t){.label = series[s]}));
    }
    save(fig, "bars.png");
    kv_fig_free(fig);
}

/* 4. log-log scatter with y = x */
static void fig_scatter(void)
{
    kv_rng_t rng;
    kv_rng_seed(&rng, 11);
    kv_fig_t *fig;
    CHECK(kv_fig_create(1600, 1000, &fig));
    CHECK(kv_fig_set_title(fig, "Bound vs measured, log-log, with y = x"));
    kv_axes_t *ax = kv_fig_axes(fig, 0, 0);
    CHECK(kv_axes_set_xscale(ax, KV_SCALE_LOG));
    CHECK(kv_axes_set_yscale(ax, KV_SCALE_LOG));
    CHECK(kv_axes_set_xlabel(ax, "bound (L_{1} distance)"));
    CHECK(kv_axes_set_ylabel(ax, "measured error (L_{1} distance)"));
    CHECK(kv_axes_set_equal_aspect(ax, 1));
    const char *names[] = {"method A", "method B", "method C", "method D", "method E"};
    for (int p = 0; p < 5; p++) {
        double x[60], y[60];
        for (int i = 0; i < 60; i++) {
            x[i] = pow(10, -4 + 4 * kv_rng_uniform(&rng));
            y[i] = x[i] * pow(10, -0.2 - 0.25 * p - 0.5 * fabs(gauss(&rng)));
        }
        CHECK(kv_plot_scatter(ax, 60, x, y, &(kv_style_t){.label = names[p], .marker = KV_MARKER_AUTO}));
    }
    CHECK(kv_plot_identity(ax, &(kv_style_t){.label = "y = x", .dash = KV_DASH_DASHED, .color = {0.3, 0.3, 0.3, 1}}));
    save(fig, "scatter_loglog.png");
    kv_fig_free(fig);
}

/* 5. grid of line plots, one figure legend, shared y, log2 x */
static void fig_line_grid(void)
{
    const char *names[] = {"full",     "window", "heavy hitters", "pooled scores", "pyramid",
                           "adaptive", "random", "oracle",        "quantized",     "chunked"};
    const int M = 10;
    kv_fig_t *fig;
    CHECK(kv_fig_create(1600, 1000, &fig));
    CHECK(kv_fig_set_title(fig, "Grid of line plots: shared y, one legend, log2 x"));
    CHECK(kv_fig_grid(fig, 2, 2));
    CHECK(kv_fig_share(fig, 0, 1));
    CHECK(kv_fig_legend(fig, KV_LEGEND_RIGHT));
    double b[7] = {32, 64, 128, 256, 512, 1024, 2048};
    for (int p = 0; p < 4; p++) {
        kv_axes_t *ax = kv_fig_axes(fig, p / 2, p % 2);
        char t[64];
        snprintf(t, sizeof t, "input set %d", p + 1);
        CHECK(kv_axes_set_title(ax, t));
        CHECK(kv_axes_set_xscale(ax, KV_SCALE_LOG2));
        CHECK(kv_axes_set_xlabel(ax, "budget (tokens)"));
        CHECK(kv_axes_set_ylabel(ax, "recall"));
        for (int m = 0; m < M; m++) {
            double y[7];
            for (int i = 0; i < 7; i++)
                y[i] = m == 0 ? 1.0 : fmin(1.0, 1 - (0.9 - 0.07 * m - 0.03 * p) * exp(-0.45 * i * (0.5 + 0.1 * m)));
            CHECK(kv_plot_line(ax, 7, b, y,
                               &(kv_style_t){.label = names[m],
                                             .color = kv_palette(m),
                                             .dash = m >= 8 ? KV_DASH_DASHED : KV_DASH_SOLID,
                                             .marker = (kv_marker_t)(KV_MARKER_CIRCLE + m % 6)}));
        }
    }
    save(fig, "line_grid.png");
    kv_fig_free(fig);
}

/* 6. categorical heat map (rows x columns with labels), diverging map centred on 0 */
static void fig_cat_heat(void)
{
    const char *rows[] = {"full", "window", "heavy hitters", "pooled scores", "pyramid", "adaptive", "random"};
    const int R = 7, C = 16;
    char colbuf[16][8];
    const char *cols[16];
    for (int c = 0; c < C; c++) {
        snprintf(colbuf[c], sizeof colbuf[c], "L%d", c);
        cols[c] = colbuf[c];
    }
    float z[7 * 16];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            z[r * C + c] = (float)(r == 0 ? 0 : 0.3 * sin(0.4 * c + r) - 0.05 * r + (c < 2 ? -0.2 : 0));
    kv_fig_t *fig;
    CHECK(kv_fig_create(1600, 700, &fig));
    CHECK(kv_fig_set_title(fig, "Categorical heat map, diverging map centred on 0, values in the cells"));
    kv_axes_t *ax = kv_fig_axes(fig, 0, 0);
    CHECK(kv_axes_set_xcategories(ax, C, cols));
    CHECK(kv_axes_set_ycategories(ax, R, rows));
    CHECK(kv_axes_set_xlabel(ax, "layer"));
    CHECK(kv_plot_heatmap(
        ax, R, C, z,
        &(kv_heat_style_t){.cmap = KV_CMAP_DIVERGING, .label = "recall change vs full", .annotate = "%+.2f"}));
    save(fig, "heat_categorical.png");
    kv_fig_free(fig);
}

/* 7. colour maps (one 1 x 256 heat map each) and the palette */
static void fig_colormaps(void)
{
    kv_fig_t *fig;
    CHECK(kv_fig_create(1600, 1000, &fig));
    CHECK(kv_fig_set_title(fig, "Colour maps, with their lightness L^{*} drawn in white"));
    CHECK(kv_fig_grid(fig, KV_CMAP_COUNT, 1));
    float z[256];
    for (int i = 0; i < 256; i++)
        z[i] = (float)(i / 255.0);
    for (int m = 0; m < KV_CMAP_COUNT; m++) {
        kv_axes_t *ax = kv_fig_axes(fig, m, 0);
        const char *name = kv_cmap_name((kv_cmap_t)m);
        CHECK(kv_axes_set_ycategories(ax, 1, &name));
        CHECK(kv_plot_heatmap(
            ax, 1, 256, z, &(kv_heat_style_t){.cmap = (kv_cmap_t)m, .vmin = 0, .vmax = 1, .colorbar = KV_CBAR_NONE}));
        double lx[65], ly[65];
        for (int i = 0; i <= 64; i++) {
            lx[i] = i * 255.0 / 64;
            ly[i] = 0.45 - 0.9 * kv_rgba_lightness(kv_cmap_eval((kv_cmap_t)m, i / 64.0)) / 100.0;
        }
        CHECK(kv_plot_line(ax, 65, lx, ly, &(kv_style_t){.color = {1, 1, 1, 0.9}, .width = 1.5}));
    }
    CHECK(kv_axes_set_xlabel(kv_fig_axes(fig, KV_CMAP_COUNT - 1, 0), "position in the map (of 256 steps)"));
    save(fig, "colormaps.png");
    kv_fig_free(fig);

    CHECK(kv_fig_create(1600, 1000, &fig));
    CHECK(kv_fig_set_title(fig, "Qualitative palette (Okabe-Ito)"));
    kv_axes_t *bx = kv_fig_axes(fig, 0, 0);
    CHECK(kv_axes_set_xlabel(bx, "x (radians)"));
    CHECK(kv_axes_set_ylabel(bx, "palette index + 0.4 sin(x)"));
    CHECK(kv_axes_set_legend(bx, KV_LEGEND_RIGHT));
    for (int p = 0; p < KV_PALETTE_SIZE; p++) {
        double x[100], y[100];
        for (int i = 0; i < 100; i++) {
            x[i] = i / 10.0;
            y[i] = p + 0.4 * sin(x[i] + p);
        }
        char lab[32];
        snprintf(lab, sizeof lab, "palette %d", p);
        CHECK(kv_plot_line(bx, 100, x, y, &(kv_style_t){.label = lab, .width = 3}));
    }
    save(fig, "palette.png");
    kv_fig_free(fig);
}

/* 8. awkward axes: tiny and huge ranges, negatives, a narrow log range, many categories, small size */
static void fig_edge_cases(void)
{
    kv_fig_t *fig;
    CHECK(kv_fig_create(1600, 1000, &fig));
    CHECK(kv_fig_set_title(fig, "Awkward axes"));
    CHECK(kv_fig_grid(fig, 2, 3));
    double x[50], y[50];
    /* tiny range around 1 */
    kv_axes_t *ax = kv_fig_axes(fig, 0, 0);
    for (int i = 0; i < 50; i++) {
        x[i] = i;
        y[i] = 1 + 3e-7 * sin(i / 5.0);
    }
    CHECK(kv_axes_set_title(ax, "tiny range around 1"));
    CHECK(kv_axes_set_xlabel(ax, "step"));
    CHECK(kv_axes_set_ylabel(ax, "value"));
    CHECK(kv_plot_line(ax, 50, x, y, NULL));
    /* huge values */
    ax = kv_fig_axes(fig, 0, 1);
    for (int i = 0; i < 50; i++) {
        x[i] = i * 2.5e11;
        y[i] = 3e-5 * i;
    }
    CHECK(kv_axes_set_title(ax, "huge x, tiny y"));
    CHECK(kv_axes_set_xlabel(ax, "bytes"));
    CHECK(kv_axes_set_ylabel(ax, "seconds"));
    CHECK(kv_plot_scatter(ax, 50, x, y, NULL));
    /* negatives, reference line at 0 */
    ax = kv_fig_axes(fig, 0, 2);
    for (int i = 0; i < 50; i++) {
        x[i] = -2.5 + 0.1 * i;
        y[i] = x[i] * x[i] * x[i] - 2 * x[i];
    }
    CHECK(kv_axes_set_title(ax, "negative values"));
    CHECK(kv_axes_set_xlabel(ax, "x"));
    CHECK(kv_axes_set_ylabel(ax, "x^{3} - 2x"));
    CHECK(kv_plot_hline(ax, 0, NULL));
    CHECK(kv_plot_vline(ax, 0, NULL));
    CHECK(kv_plot_line(ax, 50, x, y, &(kv_style_t){.label = "x^{3} - 2x"}));
    /* narrow log range */
    ax = kv_fig_axes(fig, 1, 0);
    for (int i = 0; i < 50; i++) {
        x[i] = 20 + i * 1.2;
        y[i] = 25 + 50 * i / 49.0;
    }
    CHECK(kv_axes_set_title(ax, "log axes over 20..80"));
    CHECK(kv_axes_set_xscale(ax, KV_SCALE_LOG));
    CHECK(kv_axes_set_yscale(ax, KV_SCALE_LOG));
    CHECK(kv_axes_set_xlabel(ax, "size (tokens)"));
    CHECK(kv_axes_set_ylabel(ax, "time (ms)"));
    CHECK(kv_plot_line(ax, 50, x, y, &(kv_style_t){.marker = KV_MARKER_CIRCLE, .marker_size = 5}));
    /* 40 categories */
    ax = kv_fig_axes(fig, 1, 1);
    const char *cats[40];
    char cb[40][16];
    double v[40];
    for (int i = 0; i < 40; i++) {
        snprintf(cb[i], sizeof cb[i], "layer %d", i);
        cats[i] = cb[i];
        v[i] = 1 + sin(i / 4.0);
    }
    CHECK(kv_axes_set_title(ax, "40 categories"));
    CHECK(kv_axes_set_xcategories(ax, 40, cats));
    CHECK(kv_axes_set_ylabel(ax, "tokens kept (thousands)"));
    CHECK(kv_plot_bars(ax, 40, v, NULL));
    /* many decades */
    ax = kv_fig_axes(fig, 1, 2);
    for (int i = 0; i < 50; i++) {
        x[i] = pow(10, -12 + 24 * i / 49.0);
        y[i] = pow(x[i], 0.5);
    }
    CHECK(kv_axes_set_title(ax, "24 decades"));
    CHECK(kv_axes_set_xscale(ax, KV_SCALE_LOG));
    CHECK(kv_axes_set_yscale(ax, KV_SCALE_LOG));
    CHECK(kv_axes_set_xlabel(ax, "x"));
    CHECK(kv_axes_set_ylabel(ax, "x^{1/2}"));
    CHECK(kv_plot_line(ax, 50, x, y, NULL));
    save(fig, "edge_cases.png");
    kv_fig_free(fig);

    /* a small figure with a legend that has nowhere inside to go */
    CHECK(kv_fig_create(640, 420, &fig));
    ax = kv_fig_axes(fig, 0, 0);
    CHECK(kv_axes_set_title(ax, "Small figure, crowded data"));
    CHECK(kv_axes_set_xlabel(ax, "x"));
    CHECK(kv_axes_set_ylabel(ax, "y"));
    kv_rng_t rng;
    kv_rng_seed(&rng, 3);
    for (int s = 0; s < 3; s++) {
        double xs[400], ys[400];
        for (int i = 0; i < 400; i++) {
            xs[i] = kv_rng_uniform(&rng);
            ys[i] = kv_rng_uniform(&rng);
        }
        char lab[32];
        snprintf(lab, sizeof lab, "sample %d", s + 1);
        CHECK(kv_plot_scatter(ax, 400, xs, ys, &(kv_style_t){.label = lab, .marker_size = 5}));
    }
    save(fig, "small_crowded.png");
    kv_fig_free(fig);
}

int main(int argc, char **argv)
{
    if (argc > 1)
        snprintf(dir, sizeof dir, "%s", argv[1]);
    mkdir("build", 0755);
    mkdir(dir, 0755);
    fprintf(stderr, "plots gallery -> %s\n", dir);
    fig_heat_grid();
    kv_fig_t *fig;
    make_faint_lines(&fig);
    save(fig, "faint_lines.png");
    save(fig, "faint_lines.svg");
    save(fig, "faint_lines.pdf");
    kv_fig_free(fig);
    fig_bars();
    fig_scatter();
    fig_line_grid();
    fig_cat_heat();
    fig_colormaps();
    fig_edge_cases();
    return 0;
}
