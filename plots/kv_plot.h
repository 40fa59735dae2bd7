/*
 * kv_plot.h: a small cairo figure library (figures, axes, series, heat maps, legends, colour).
 *
 * plots/ knows nothing about KV caches: it draws numbers. The analyze module builds its named
 * figures on top of this API.
 *
 * Model. A figure is retained: every call below only records what to draw (data arrays are
 * copied, so callers may free theirs at once). Layout and drawing happen in kv_fig_render /
 * kv_fig_save, once per output surface, so PNG, SVG and PDF show the same content. A figure owns
 * its axes; an axes owns its series. Nothing here is thread-safe per figure, but separate figures
 * may be built and saved on separate threads.
 *
 * Units. Figure sizes, line widths, marker sizes and font sizes are in pixels of the PNG output.
 * SVG and PDF pages are the same drawing at 0.75 pt per pixel, so they open at the PNG's size.
 *
 * Coordinates. Series take data coordinates. A categorical axis puts category i at data position
 * i (so bars and labelled heat-map cells line up). A heat map of R rows and C columns draws cell
 * (r, c) centred at data position (x = c, y = r), its edges at c +- 0.5 and r +- 0.5; a boundary
 * between columns s-1 and s is therefore the vertical line x = s - 0.5. By default heat maps put
 * row 0 at the top (matrix order).
 *
 * Typical use (error checks shortened):
 *
 *     kv_fig_t *fig;
 *     kv_fig_create(1600, 1000, &fig);
 *     kv_fig_set_title(fig, "Recall vs budget");
 *     kv_axes_t *ax = kv_fig_axes(fig, 0, 0);          // the single panel of a 1x1 figure
 *     kv_axes_set_xlabel(ax, "budget (tokens)");
 *     kv_axes_set_xscale(ax, KV_SCALE_LOG2);
 *     kv_plot_line(ax, n, budgets, recall, &(kv_style_t){.label = "snapkv", .marker = KV_MARKER_CIRCLE});
 *     int rc = kv_fig_save(fig, "out/recall.png");     // .png, .svg or .pdf
 *     kv_fig_free(fig);
 *
 * Faint line per series with a bold mean (and a p10..p90 band):
 *
 *     kv_rgba_t c = kv_palette(0);
 *     kv_plot_band(ax, n, x, p10, p90, &(kv_style_t){.label = "p10..p90", .color = c});
 *     for (int h = 0; h < heads; h++)
 *         kv_plot_line(ax, n, x, y[h], &(kv_style_t){.color = kv_rgba_alpha(c, 0.3), .width = 1});
 *     kv_plot_line(ax, n, x, mean, &(kv_style_t){.label = "mean", .color = c, .width = 3.5});
 *
 * Heat-map grid sharing one colour bar, with segment boundaries:
 *
 *     kv_fig_grid(fig, 2, 3);
 *     kv_heat_style_t hs = {.cmap = KV_CMAP_MAGMA, .log = 1};
 *     for (int i = 0; i < 6; i++) {
 *         kv_axes_t *ax = kv_fig_axes(fig, i / 3, i % 3);
 *         kv_axes_set_equal_aspect(ax, 1);
 *         kv_plot_heatmap(ax, T, T, maps[i], &hs);              // maps[i]: (T, T) floats
 *         kv_plot_vline(ax, seg_start - 0.5, &(kv_style_t){.color = {1, 1, 1, 0.8}, .dash = KV_DASH_DASHED});
 *     }
 *     kv_fig_colorbar(fig, &hs, "attention weight");   // one bar; all heat maps share its scale
 *
 * Layout is automatic: margins fit the tick labels, grid panels line up by row and column, tick
 * labels never overlap (fewer ticks, rotated or thinned category labels), a legend goes where no
 * data is, and text that cannot fit its space is shortened with an ellipsis rather than clipped.
 *
 * Errors follow sim/common/kv_common.h: int status (KV_OK or negative KV_E*), message in
 * kv_last_error(). Write failures name the output file.
 */
#ifndef KV_PLOT_H
#define KV_PLOT_H

#include <cairo.h>
#include <stddef.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kv_fig kv_fig_t;   /* a figure: size, title, panels, optional shared legend / colour bar */
typedef struct kv_axes kv_axes_t; /* one panel; owned by its figure, never freed by the caller */

/* ---------------------------------------------------------------- colour */

/* An sRGB colour with alpha, components in [0, 1]. In a kv_style_t a colour with a == 0 means
 * "automatic" (the axes' next palette colour). */
typedef struct {
    double r, g, b, a;
} kv_rgba_t;

/* Qualitative colour-blind-safe palette (Okabe & Ito, "Color Universal Design", 2008): 8 colours,
 * ordered so that the first ones have the most contrast on white (blue, vermillion, bluish green,
 * reddish purple, orange, sky blue, black, yellow). kv_palette(i) wraps around for i >= 8. */
#define KV_PALETTE_SIZE 8
kv_rgba_t kv_palette(int i);
/* `c` with its alpha multiplied by `alpha` (for faint lines and bands). */
kv_rgba_t kv_rgba_alpha(kv_rgba_t c, double alpha);
/* Colour from 0xRRGGBB, opaque. */
kv_rgba_t kv_rgb_hex(unsigned rgb);

/* Colour maps, built here by interpolating in CIELAB / LCh (see color.c):
 *   VIRIDIS   perceptually ordered: dark violet -> blue -> teal -> green -> yellow, lightness linear
 *   BLUES     single hue: near white -> dark blue, lightness linear
 *   MAGMA     dark -> purple -> orange -> light yellow, lightness linear (good for attention)
 *   DIVERGING blue -> near white -> orange-red, for signed values around a centre */
typedef enum { KV_CMAP_VIRIDIS = 0, KV_CMAP_BLUES, KV_CMAP_MAGMA, KV_CMAP_DIVERGING, KV_CMAP_COUNT } kv_cmap_t;
/* Colour of map `cmap` at t in [0, 1] (clamped; NaN gives transparent). */
kv_rgba_t kv_cmap_eval(kv_cmap_t cmap, double t);
const char *kv_cmap_name(kv_cmap_t cmap);
/* CIE L* (0 = black, 100 = white) of an sRGB colour (for tests and for picking text colours). */
double kv_rgba_lightness(kv_rgba_t c);
/* CIEDE76 distance (Euclidean in CIELAB) between two opaque colours. */
double kv_rgba_distance(kv_rgba_t a, kv_rgba_t b);

/* ---------------------------------------------------------------- ticks (exposed for tests) */

#define KV_TICKS_MAX 128
typedef struct {
    double value;
    int major;    /* major tick (longer, may carry a label and a grid line) */
    int labelled; /* has a label */
} kv_tick_t;
typedef struct {
    kv_tick_t t[KV_TICKS_MAX];
    int n;
    int log;      /* 0 linear, 10 log10, 2 log2 */
    double step;  /* linear: distance between major ticks; log: decades (or powers of 2) between them */
    int sci;      /* labels use m x 10^k notation */
    int decimals; /* linear fixed notation: digits after the point */
} kv_ticks_t;

/* Major ticks on [lo, hi] at multiples of the smallest step in {1, 2, 2.5, 5} x 10^k that gives
 * at most max_major ticks (max_major >= 2); if that step leaves fewer than two ticks inside, the
 * next finer step with two or more is used instead (an axis needs two labels). lo == hi is widened
 * around the value. Fails on non-finite input. */
int kv_ticks_linear(double lo, double hi, int max_major, kv_ticks_t *out);
/* Log10 ticks on [lo, hi], 0 < lo: majors at decades (every 1, 2, 3, 5, 10... decades so that at
 * most max_major are labelled), minor ticks at 2..9 x 10^k when decades are not skipped, with 2 and
 * 5 x 10^k labelled too when all of 1, 2, 5 x 10^k fit within max_major; if fewer
 * than two decades fall inside, the densest of {1..9}, {1,2,4,6,8}, {1,2,5}, {1,3} x 10^k with at most
 * max_major labels is labelled (linear nice steps when even that fails). */
int kv_ticks_log(double lo, double hi, int max_major, kv_ticks_t *out);
/* Log2 ticks on [lo, hi], 0 < lo: majors at powers of two, every 1, 2, 4... of them. */
int kv_ticks_log2(double lo, double hi, int max_major, kv_ticks_t *out);
/* Label of tick value v under `ticks` into buf. Plain decimals with the step's precision
 * ("0.25", "1200"), exponents as "10^{-3}" or "2.5×10^{-4}" markup (drawn as superscripts) when
 * values are very small or large (log axes: plain while every label lies in [0.001, 10^4]). Never prints float noise
 * ("0.30000000004"). */
void kv_ticks_format(const kv_ticks_t *ticks, double v, char *buf, size_t len);

/* ---------------------------------------------------------------- figure */

/* New figure of width x height pixels (each 16..16384), white background, one panel (1x1 grid).
 * Free with kv_fig_free (accepts NULL). */
int kv_fig_create(int width_px, int height_px, kv_fig_t **out);
void kv_fig_free(kv_fig_t *fig);
/* Figure title, drawn bold above every panel. NULL removes it. */
int kv_fig_set_title(kv_fig_t *fig, const char *title);
/* Multiply every font size by `scale` (default 1: ticks 14 px, labels 16 px, titles 17 px, figure
 * title 21 px, legend 14 px; chosen for a 1600x1000 PNG viewed at 100 %). */
int kv_fig_set_font_scale(kv_fig_t *fig, double scale);
/* Replace the panels by a rows x cols grid of empty axes (row 0 at the top). A panel with no series
 * is not drawn (unused grid cells stay blank; explicit axes on a fresh figure stand alone). */
int kv_fig_grid(kv_fig_t *fig, int rows, int cols);
/* Axes of grid cell (row, col); NULL when out of range. */
kv_axes_t *kv_fig_axes(const kv_fig_t *fig, int row, int col);
/* Add a free-standing axes whose whole box (labels included) is the rectangle (x, y, w, h) in
 * fractions of the figure area below the title (0,0 = top left). */
int kv_fig_add_axes(kv_fig_t *fig, double x, double y, double w, double h, kv_axes_t **out);
/* Axes with the same auto limits: the union of their data ranges (grids of comparable panels). */
int kv_fig_share(kv_fig_t *fig, int share_x, int share_y);

typedef enum {
    KV_LEGEND_AUTO = 0, /* inside, in the corner with no data under it; outside right if none is free */
    KV_LEGEND_NONE,
    KV_LEGEND_RIGHT, /* outside the plot area, right */
    KV_LEGEND_BELOW, /* outside the plot area, below the x label, in columns */
    KV_LEGEND_UPPER_LEFT,
    KV_LEGEND_UPPER_RIGHT,
    KV_LEGEND_LOWER_LEFT,
    KV_LEGEND_LOWER_RIGHT
} kv_legend_pos_t;
/* One legend for the whole figure (entries from every panel, one per distinct label), placed
 * right of (KV_LEGEND_RIGHT or AUTO) or below (KV_LEGEND_BELOW) all panels; per-panel legends are
 * then off. Give a series the same label and colour in every panel to get one entry. */
int kv_fig_legend(kv_fig_t *fig, kv_legend_pos_t pos);

/* Render into `cr`, whose user space must be the figure's pixel space (width x height). */
int kv_fig_render(kv_fig_t *fig, cairo_t *cr);
/* Render into a new ARGB32 image surface of the figure's size (caller destroys it). */
int kv_fig_render_image(kv_fig_t *fig, cairo_surface_t **out);
/* Write PNG, SVG or PDF, chosen by the extension of `path` (case-insensitive), through the output
 * module (sim/common/kv_output.h): a unique temporary file renamed when complete, so a failed save
 * leaves no half file. */
int kv_fig_save(kv_fig_t *fig, const char *path);
/* The figure as `format` ("png", "svg" or "pdf") into stream f; `name` names it in messages. */
int kv_fig_write(kv_fig_t *fig, const char *format, FILE *f, const char *name);

/* ---------------------------------------------------------------- axes */

typedef enum { KV_SCALE_LINEAR = 0, KV_SCALE_LOG, KV_SCALE_LOG2 } kv_scale_t;

int kv_axes_set_title(kv_axes_t *ax, const char *title);
/* Axis labels: put the unit in the text ("budget (tokens)", "time (ms)"). Text may use ^{...}
 * and _{...} for super- and subscripts. */
int kv_axes_set_xlabel(kv_axes_t *ax, const char *label);
int kv_axes_set_ylabel(kv_axes_t *ax, const char *label);
/* Log axes ignore non-positive data when choosing limits and break lines there. */
int kv_axes_set_xscale(kv_axes_t *ax, kv_scale_t scale);
int kv_axes_set_yscale(kv_axes_t *ax, kv_scale_t scale);
/* Fixed limits; pass NAN for either end to keep it automatic. */
int kv_axes_set_xlim(kv_axes_t *ax, double lo, double hi);
int kv_axes_set_ylim(kv_axes_t *ax, double lo, double hi);
/* y grows downward (set automatically by heat maps unless origin_lower). */
int kv_axes_set_yinvert(kv_axes_t *ax, int invert);
/* Categorical axis: category i at position i, labelled labels[i] (copied). Limits become
 * [-0.5, n-0.5]. Long labels are rotated, too many are thinned, so labels never overlap. */
int kv_axes_set_xcategories(kv_axes_t *ax, int n, const char *const *labels);
int kv_axes_set_ycategories(kv_axes_t *ax, int n, const char *const *labels);
/* Grid lines at major ticks (default on for y and x; heat maps turn them off). */
int kv_axes_set_grid(kv_axes_t *ax, int x_on, int y_on);
/* Same pixel length per data unit on x and y (square heat-map cells), or per decade when both axes
 * are logarithmic (y = x at 45 degrees); the panel shrinks to fit. Ignored for mixed scales. */
int kv_axes_set_equal_aspect(kv_axes_t *ax, int on);
/* Where this panel's legend goes (default KV_LEGEND_AUTO; only labelled series appear). */
int kv_axes_set_legend(kv_axes_t *ax, kv_legend_pos_t pos);
/* Pixel position of data point (x, y) in the last render; KV_EINVAL before any render or when a
 * coordinate is not drawable (non-positive on a log axis). For tests and annotations. */
int kv_axes_data_to_px(const kv_axes_t *ax, double x, double y, double *px, double *py);
/* Plot-area rectangle in pixels from the last render. */
int kv_axes_plot_rect(const kv_axes_t *ax, double *x0, double *y0, double *x1, double *y1);

/* ---------------------------------------------------------------- series */

typedef enum { KV_DASH_SOLID = 0, KV_DASH_DASHED, KV_DASH_DOTTED, KV_DASH_DASHDOT, KV_DASH_NONE } kv_dash_t;
typedef enum {
    KV_MARKER_NONE = 0,
    KV_MARKER_CIRCLE,
    KV_MARKER_SQUARE,
    KV_MARKER_TRIANGLE,
    KV_MARKER_DIAMOND,
    KV_MARKER_CROSS,
    KV_MARKER_PLUS,
    KV_MARKER_AUTO /* a marker shape chosen from the series' palette slot */
} kv_marker_t;

/* Style of a series. Every field's zero value means the default, so compound literals read well:
 * &(kv_style_t){.label = "mean", .width = 3}. A NULL style pointer means all defaults. */
typedef struct {
    const char *label;  /* legend text (copied); NULL or "" keeps the series out of the legend */
    kv_rgba_t color;    /* a == 0: next palette colour of the axes */
    double width;       /* line width in px; 0: 2 (lines), 1.5 (reference lines) */
    kv_dash_t dash;     /* line pattern; scatter ignores it */
    kv_marker_t marker; /* marker shape; 0: none for lines, circle for scatter */
    double marker_size; /* marker diameter in px; 0: 8 */
} kv_style_t;

/* Line through (x[i], y[i]), i < n; x NULL means x[i] = i. NaN (or <= 0 on a log axis) breaks it. */
int kv_plot_line(kv_axes_t *ax, int n, const double *x, const double *y, const kv_style_t *st);
/* Markers only. */
int kv_plot_scatter(kv_axes_t *ax, int n, const double *x, const double *y, const kv_style_t *st);
/* One bar series of n bars at categories 0..n-1. Successive bar series on one axes are grouped
 * side by side within each category. Bars start at 0 (at the axis bottom on a log axis). */
int kv_plot_bars(kv_axes_t *ax, int n, const double *values, const kv_style_t *st);
/* Filled band between lo[i] and hi[i] (e.g. p10..p90), drawn with the style colour at 25 %
 * opacity unless the colour carries its own alpha. */
int kv_plot_band(kv_axes_t *ax, int n, const double *x, const double *lo, const double *hi, const kv_style_t *st);
/* Reference lines across the whole plot area. A NULL style draws 1.5 px dark grey dashed; with a
 * style, an unset colour is dark grey and an unset dash solid. hline/vline values count toward
 * automatic limits; the identity line y = x does not. */
int kv_plot_hline(kv_axes_t *ax, double y, const kv_style_t *st);
int kv_plot_vline(kv_axes_t *ax, double x, const kv_style_t *st);
int kv_plot_identity(kv_axes_t *ax, const kv_style_t *st);
/* Text at data position (x, y); anchor_x / anchor_y in [0, 1] pick which point of the text box
 * sits there (0,0 = left top; 0.5,0.5 = centre). Size 0: tick font size. */
int kv_plot_text(kv_axes_t *ax, double x, double y, const char *text, double anchor_x, double anchor_y, double size_px,
                 kv_rgba_t color);

/* ---------------------------------------------------------------- heat maps */

typedef enum {
    KV_CBAR_AXES = 0, /* colour bar right of this panel */
    KV_CBAR_NONE      /* no bar (use kv_fig_colorbar for one shared bar) */
} kv_cbar_t;

typedef struct {
    kv_cmap_t cmap;    /* default KV_CMAP_VIRIDIS */
    int log;           /* log10 colour scale */
    double vmin, vmax; /* colour limits; both 0 (the default) means automatic: data min..max,
                          and on a log scale min = max(smallest positive, max * 1e-6). Values
                          <= vmin (zeros included) take the lowest colour, >= vmax the highest */
    kv_cbar_t colorbar;
    const char *label;    /* colour-bar label with unit (copied) */
    int origin_lower;     /* row 0 at the bottom instead of the top */
    double center;        /* KV_CMAP_DIVERGING only: automatic limits become symmetric around
                             it, so it is drawn white (with fixed limits the midpoint is white) */
    const char *annotate; /* printf format for one double ("%.2f", "%.0f%%"): each cell shows its
                             value when every label fits its cell; text is dark or white by the
                             cell's lightness. NULL: no values. Only %f, %e, %g conversions. */
    double x0, x1;        /* data extent of the cell grid along x: column c spans
                             [x0 + c w, x0 + (c+1) w], w = (x1 - x0) / cols (e.g. token positions of
                             pooled cells). Both 0 (the default): cell c centred at c, edges c +- 0.5 */
    double y0, y1;        /* the same along y for rows (row 0 starts at y0) */
} kv_heat_style_t;

/* Heat map of z, shape (rows, cols) row-major, NaN cells left blank. Sets the axes limits to the
 * cells, turns grid lines off, and (unless origin_lower) puts row 0 at the top. Draw lines over it
 * with kv_plot_hline/vline/line afterwards (boundary between rows s-1 and s: y = s - 0.5, or the
 * extent's coordinates when st->x0..y1 are set). */
int kv_plot_heatmap(kv_axes_t *ax, int rows, int cols, const float *z /* (rows, cols) */, const kv_heat_style_t *st);
/* One colour bar for the whole figure, right of the panels, with style `st` (cmap, log, limits,
 * center) and `label`. Every heat map in the figure is then drawn with this bar's colour map and
 * scale (their own cmap/log/limits and per-panel bars are ignored); automatic limits are taken
 * over all of them. */
int kv_fig_colorbar(kv_fig_t *fig, const kv_heat_style_t *st, const char *label);

#ifdef __cplusplus
}
#endif
#endif
