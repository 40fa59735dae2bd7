/*
 * plot_internal.h: the retained figure model shared by figure.c (building), render.c (layout and
 * drawing) and text.c (markup text). Not part of the public API.
 */
#ifndef KV_PLOT_INTERNAL_H
#define KV_PLOT_INTERNAL_H

#include "plots/kv_plot.h"

typedef enum { IT_LINE, IT_SCATTER, IT_BARS, IT_BAND, IT_HLINE, IT_VLINE, IT_IDENTITY, IT_TEXT, IT_HEAT } item_kind_t;

typedef struct {
    item_kind_t kind;
    kv_style_t st; /* resolved: colour, width, marker size filled in; st.label == label */
    char *label;   /* owned; NULL when not in the legend */
    int n;
    double *x, *y, *y2; /* owned. line/scatter: x, y (n); band: x, lo = y, hi = y2; bars: y;
                           hline: y[0]; vline: x[0]; text: x[0], y[0] */
    int bar_slot;       /* bars: index among the axes' bar series */
    /* heat map */
    int rows, cols;
    float *z; /* (rows, cols) owned */
    kv_heat_style_t hs;
    /* text */
    char *text;
    double anchor_x, anchor_y, size;
    kv_rgba_t tcolor;
    /* heat map colour scale in effect for the last render */
    double cv0, cv1;
    kv_cmap_t cmap;
    int clog;
} item_t;

typedef struct {
    kv_scale_t scale;
    double lo, hi; /* fixed limits, NAN = automatic */
    char *label;
    int ncat;
    char **cats;
    int invert;
    int grid;
    /* computed by the last layout */
    double vlo, vhi; /* view limits */
    int integer;     /* data are integers: no fractional ticks */
    kv_ticks_t ticks;
    int rot;             /* tick labels rotated 45 degrees */
    int thin;            /* label every thin-th category */
    double cap_h, cap_r; /* widest category label, px, when horizontal / rotated (from the cell size) */
    /* tick labels as last drawn (for tests): extent along the axis that must not overlap between
     * neighbours (for 45-degree labels: the band across their baselines), and the bounding box */
    int n_lab;
    double lab_lo[KV_TICKS_MAX], lab_hi[KV_TICKS_MAX];
    double lab_box[KV_TICKS_MAX][4]; /* x0, y0, x1, y1 */
} axis_t;

struct kv_axes {
    kv_fig_t *fig;
    int explicit_rect;
    double fx, fy, fw, fh; /* explicit rectangle, fractions of the area below the title */
    int row, col;          /* grid cell when !explicit_rect */
    char *title;
    axis_t x, y;
    int equal;
    kv_legend_pos_t legend;
    item_t *items;
    int n_items, cap_items;
    int n_bars;
    int next_color;
    /* last layout */
    int laid_out;
    double cx0, cy0, cx1, cy1; /* cell rectangle */
    double px0, py0, px1, py1; /* plot area */
    int legend_outside;        /* AUTO resolved to outside-right */
    kv_legend_pos_t legend_at; /* resolved inside corner */
    double lg_w, lg_h;
    double hs_vmin, hs_vmax; /* colour limits of the (first) heat map */
};

struct kv_fig {
    int w, h;
    char *title;
    double font_scale;
    int rows, cols;
    kv_axes_t **axes; /* rows*cols grid axes first, then explicit ones */
    int n_axes, cap_axes;
    int share_x, share_y;
    int has_legend;
    kv_legend_pos_t legend;
    int has_cbar;
    kv_heat_style_t cbar;
    char *cbar_label;
};

/* ticks.c: linear ticks, optionally restricted to integer steps */
int kv_ticks_linear_ex(double lo, double hi, int max_major, int integer, kv_ticks_t *out);

/* text.c: one line of text with ^{...} / _{...} super- and subscripts. The box is the advance
 * width by ascent+descent of the font (plus room for raised superscripts): every label in a row
 * shares its baseline whatever its glyphs. */
typedef struct {
    double w, h;     /* box size */
    double baseline; /* distance from the box top to the baseline */
} txt_box_t;
void txt_measure(cairo_t *cr, const char *s, double size, int bold, txt_box_t *box);
/* Draw s so that the point (anchor_x, anchor_y) of its box (fractions: 0,0 = top left) lands at
 * (x, y), the box rotated by angle (radians, cairo's direction: positive turns clockwise). */
void txt_draw(cairo_t *cr, const char *s, double size, int bold, double x, double y, double anchor_x, double anchor_y,
              double angle, kv_rgba_t color);
/* Size of the box once rotated by angle. */
void txt_rotated_size(const txt_box_t *b, double angle, double *w, double *h);
/* Copy of s shortened with an ellipsis so its width is at most max_w (caller frees). */
char *txt_ellipsize(cairo_t *cr, const char *s, double size, int bold, double max_w);
/* txt_draw of s shortened to at most max_w px wide (max_w <= 0: no limit). */
void txt_draw_fit(cairo_t *cr, const char *s, double size, int bold, double max_w, double x, double y, double anchor_x,
                  double anchor_y, double angle, kv_rgba_t color);

#endif
