/*
 * render.c: layout and drawing of a retained figure onto any cairo surface.
 *
 * Layout, in order:
 *   1. limits: each axis takes its data range (fixed limits win), padded by 4 % of the span (in log
 *      space on log axes) except at "sticky" edges -- bar baselines and heat-map borders -- which
 *      data touch but padding must not cross; kv_fig_share unites ranges across panels;
 *   2. panels: the figure area (minus title, shared legend, shared colour bar) is cut into grid
 *      cells; inside each cell the plot area is what is left after the margins its labels need.
 *      Tick count depends on the plot size and label width on the ticks, so margins are computed
 *      in three passes; grid panels in one column share left/right margins and panels in one row
 *      share top/bottom margins, so plot areas line up;
 *   3. ticks: as many "nice" ticks as fit with labels at least a gap apart; categorical labels
 *      that would collide are rotated 45 degrees or thinned (whichever keeps more labels), and a
 *      final greedy pass drops any label that would still touch its neighbour;
 *   4. legends: an automatic legend tries eight spots inside the plot (corners first) and takes
 *      the first one with no ink under it, measured by drawing the data into an 8-bit mask; when
 *      every spot covers data it moves outside, right of the plot, and the layout is redone.
 * Drawing goes grid lines, series in insertion order (clipped to the plot area), frame, ticks,
 * labels, colour bars, legends, titles.
 */
#include "plots/plot_internal.h"
#include "sim/common/kv_common.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define PAD_FRAC 0.04 /* automatic limits: padding as a fraction of the data span */
#define OUTER 14.0    /* figure border, px */
#define MAX_STICKY 8

static const unsigned C_TEXT = 0x1f1f1f, C_TICKTEXT = 0x333333, C_FRAME = 0x4d4d4d, C_GRID = 0xe4e4e4,
                      C_GRID_MINOR = 0xf2f2f2;

typedef struct {
    double tick, label, title, suptitle, legend;
    double ticklen, minorlen, pad, s;
} fm_t;

static fm_t fonts(const kv_fig_t *f)
{
    double s = f->font_scale;
    fm_t m = {14 * s, 16 * s, 17 * s, 21 * s, 14 * s, 6 * s, 3.5 * s, 4 * s, s};
    return m;
}

/* Panels with nothing in them are neither drawn nor counted when grid margins are aligned, so an
 * unused cell of a grid stays blank and explicit axes on a fresh figure stand alone. */
static int visible(const kv_axes_t *ax)
{
    return ax->n_items > 0;
}

static void set_rgba(cairo_t *cr, kv_rgba_t c)
{
    cairo_set_source_rgba(cr, c.r, c.g, c.b, c.a);
}

/* ================================================================ limits */

typedef struct {
    double lo, hi;
    int any, nonint;
    double sticky[MAX_STICKY];
    int n_sticky;
} rng_t;

static void rng_init(rng_t *r)
{
    memset(r, 0, sizeof *r);
    r->lo = INFINITY;
    r->hi = -INFINITY;
}

static int valid_on(kv_scale_t sc, double v)
{
    return isfinite(v) && (sc == KV_SCALE_LINEAR || v > 0);
}

static void rng_add(rng_t *r, double v, kv_scale_t sc)
{
    if (!valid_on(sc, v))
        return;
    r->lo = fmin(r->lo, v);
    r->hi = fmax(r->hi, v);
    r->any = 1;
    if (v != floor(v))
        r->nonint = 1;
}

/* A value that is part of the range but that padding must not cross (bar base, heat-map border). */
static void rng_sticky(rng_t *r, double v, kv_scale_t sc)
{
    if (!valid_on(sc, v))
        return;
    r->lo = fmin(r->lo, v);
    r->hi = fmax(r->hi, v);
    r->any = 1;
    if (r->n_sticky < MAX_STICKY)
        r->sticky[r->n_sticky++] = v;
}

static void rng_merge(rng_t *a, const rng_t *b)
{
    if (!b->any)
        return;
    a->lo = fmin(a->lo, b->lo);
    a->hi = fmax(a->hi, b->hi);
    a->any = 1;
    a->nonint |= b->nonint;
    for (int i = 0; i < b->n_sticky && a->n_sticky < MAX_STICKY; i++)
        a->sticky[a->n_sticky++] = b->sticky[i];
}

/* Data extent of a heat map's cell grid: e = {x0, x1, y0, y1} (cell edges, row 0 at y0). */
static void heat_extent(const item_t *it, double e[4])
{
    int xs = it->hs.x0 != 0 || it->hs.x1 != 0, ys = it->hs.y0 != 0 || it->hs.y1 != 0;
    e[0] = xs ? it->hs.x0 : -0.5;
    e[1] = xs ? it->hs.x1 : it->cols - 0.5;
    e[2] = ys ? it->hs.y0 : -0.5;
    e[3] = ys ? it->hs.y1 : it->rows - 0.5;
}

static void axes_ranges(const kv_axes_t *ax, rng_t *rx, rng_t *ry)
{
    rng_init(rx);
    rng_init(ry);
    kv_scale_t sx = ax->x.scale, sy = ax->y.scale;
    for (int k = 0; k < ax->n_items; k++) {
        const item_t *it = &ax->items[k];
        switch (it->kind) {
        case IT_LINE:
        case IT_SCATTER:
        case IT_TEXT:
            for (int i = 0; i < it->n; i++)
                if (valid_on(sx, it->x[i]) && valid_on(sy, it->y[i])) {
                    rng_add(rx, it->x[i], sx);
                    rng_add(ry, it->y[i], sy);
                }
            break;
        case IT_BAND:
            for (int i = 0; i < it->n; i++)
                if (valid_on(sx, it->x[i])) {
                    rng_add(rx, it->x[i], sx);
                    rng_add(ry, it->y[i], sy);
                    rng_add(ry, it->y2[i], sy);
                }
            break;
        case IT_BARS:
            rng_sticky(rx, -0.5, sx);
            rng_sticky(rx, it->n - 0.5, sx);
            for (int i = 0; i < it->n; i++)
                rng_add(ry, it->y[i], sy);
            if (sy == KV_SCALE_LINEAR)
                rng_sticky(ry, 0.0, sy);
            break;
        case IT_HLINE: rng_add(ry, it->y[0], sy); break;
        case IT_VLINE: rng_add(rx, it->x[0], sx); break;
        case IT_IDENTITY: break;
        case IT_HEAT: {
            double e[4];
            heat_extent(it, e);
            rng_sticky(rx, e[0], sx);
            rng_sticky(rx, e[1], sx);
            rng_sticky(ry, e[2], sy);
            rng_sticky(ry, e[3], sy);
            break;
        }
        }
    }
}

static void axis_limits(axis_t *a, const rng_t *r)
{
    int log = a->scale != KV_SCALE_LINEAR;
    double lo, hi;
    if (a->ncat) {
        lo = -0.5;
        hi = a->ncat - 0.5;
    } else if (!r->any) {
        lo = log ? 1 : 0;
        hi = log ? 10 : 1;
    } else {
        /* work in log10 space on log axes */
        double dlo = log ? log10(r->lo) : r->lo, dhi = log ? log10(r->hi) : r->hi;
        double span = dhi - dlo;
        double plo, phi;
        if (span <= 1e-12 * fmax(fabs(dlo), fabs(dhi)) || span == 0) {
            double d = log ? 0.5 : (dlo == 0 ? 0.5 : fabs(dlo) * 0.1);
            plo = dlo - d;
            phi = dhi + d;
        } else {
            plo = dlo - PAD_FRAC * span;
            phi = dhi + PAD_FRAC * span;
            for (int i = 0; i < r->n_sticky; i++) {
                double s = log ? log10(r->sticky[i]) : r->sticky[i];
                if (s <= dlo + 1e-12 * fabs(span) && s > plo)
                    plo = s;
                if (s >= dhi - 1e-12 * fabs(span) && s < phi)
                    phi = s;
            }
        }
        lo = log ? pow(10, plo) : plo;
        hi = log ? pow(10, phi) : phi;
    }
    int fixlo = !isnan(a->lo) && !(log && a->lo <= 0);
    int fixhi = !isnan(a->hi) && !(log && a->hi <= 0);
    if (fixlo)
        lo = a->lo;
    if (fixhi)
        hi = a->hi;
    /* one end fixed on a linear axis: pad the free end by a fraction of the whole shown range, so
     * nearly constant data (a sink mass of 0.30 with lo fixed at 0) does not lie on the frame */
    if (!log && r->any && !a->ncat && fixlo != fixhi) {
        if (fixlo && r->hi > lo)
            hi = fmax(hi, r->hi + PAD_FRAC * (r->hi - lo));
        if (fixhi && r->lo < hi)
            lo = fmin(lo, r->lo - PAD_FRAC * (hi - r->lo));
    }
    if (!(hi > lo)) {
        if (fixlo && !fixhi)
            hi = log ? lo * 10 : lo + fmax(1.0, fabs(lo) * 0.1);
        else
            lo = log ? hi / 10 : hi - fmax(1.0, fabs(hi) * 0.1);
    }
    a->vlo = lo;
    a->vhi = hi;
    a->integer = r->any && !r->nonint && !a->ncat;
}

/* Colour limits of every heat map (shared ones when the figure has a colour bar). */
static void heat_limits_of(const item_t *it, int log, double center, int diverging, double *v0, double *v1)
{
    double lo = INFINITY, hi = -INFINITY, minpos = INFINITY, maxpos = 0;
    size_t cells = (size_t)it->rows * (size_t)it->cols;
    for (size_t i = 0; i < cells; i++) {
        double v = it->z[i];
        if (!isfinite(v))
            continue;
        lo = fmin(lo, v);
        hi = fmax(hi, v);
        if (v > 0) {
            minpos = fmin(minpos, v);
            maxpos = fmax(maxpos, v);
        }
    }
    if (log) {
        *v0 = minpos;
        *v1 = maxpos;
    } else if (diverging) {
        double m = fmax(fabs(lo - center), fabs(hi - center));
        *v0 = center - m;
        *v1 = center + m;
    } else {
        *v0 = lo;
        *v1 = hi;
    }
}

static void fix_heat_limits(int log, double *v0, double *v1)
{
    if (log) {
        if (!(*v1 > 0) || !isfinite(*v1)) {
            *v0 = 0.1;
            *v1 = 1;
            return;
        }
        if (!(*v0 > 0) || !isfinite(*v0) || *v0 < *v1 * 1e-6)
            *v0 = fmax(*v0 > 0 && isfinite(*v0) ? *v0 : 0, *v1 * 1e-6);
        if (!(*v1 > *v0 * (1 + 1e-9))) {
            *v0 = *v1 / 10;
        }
        return;
    }
    if (!isfinite(*v0) || !isfinite(*v1)) {
        *v0 = 0;
        *v1 = 1;
    }
    if (!(*v1 > *v0)) {
        double d = *v0 == 0 ? 1 : fabs(*v0) * 0.1;
        *v0 -= d;
        *v1 += d;
    }
}

static void prepare_heat(kv_fig_t *fig)
{
    const kv_heat_style_t *fs = fig->has_cbar ? &fig->cbar : NULL;
    double g0 = INFINITY, g1 = -INFINITY;
    int auto_shared = fs && fs->vmin == 0 && fs->vmax == 0;
    for (int a = 0; a < fig->n_axes; a++) {
        kv_axes_t *ax = fig->axes[a];
        for (int k = 0; k < ax->n_items; k++) {
            item_t *it = &ax->items[k];
            if (it->kind != IT_HEAT)
                continue;
            const kv_heat_style_t *hs = fs ? fs : &it->hs;
            it->cmap = hs->cmap;
            it->clog = hs->log;
            int div = hs->cmap == KV_CMAP_DIVERGING;
            if (hs->vmin != 0 || hs->vmax != 0) {
                it->cv0 = hs->vmin;
                it->cv1 = hs->vmax;
            } else {
                heat_limits_of(it, hs->log, hs->center, div, &it->cv0, &it->cv1);
            }
            if (auto_shared) {
                if (isfinite(it->cv0))
                    g0 = fmin(g0, it->cv0);
                if (isfinite(it->cv1))
                    g1 = fmax(g1, it->cv1);
            } else {
                fix_heat_limits(it->clog, &it->cv0, &it->cv1);
            }
        }
    }
    if (fs) {
        if (auto_shared) {
            if (fs->cmap == KV_CMAP_DIVERGING && !fs->log) {
                double m = fmax(fabs(g0 - fs->center), fabs(g1 - fs->center));
                g0 = fs->center - m;
                g1 = fs->center + m;
            }
            fix_heat_limits(fs->log, &g0, &g1);
        } else {
            g0 = fs->vmin;
            g1 = fs->vmax;
            fix_heat_limits(fs->log, &g0, &g1);
        }
        for (int a = 0; a < fig->n_axes; a++)
            for (int k = 0; k < fig->axes[a]->n_items; k++) {
                item_t *it = &fig->axes[a]->items[k];
                if (it->kind == IT_HEAT) {
                    it->cv0 = g0;
                    it->cv1 = g1;
                }
            }
    }
}

static void compute_limits(kv_fig_t *fig)
{
    rng_t ux, uy;
    rng_init(&ux);
    rng_init(&uy);
    for (int a = 0; a < fig->n_axes; a++) {
        rng_t rx, ry;
        axes_ranges(fig->axes[a], &rx, &ry);
        rng_merge(&ux, &rx);
        rng_merge(&uy, &ry);
    }
    for (int a = 0; a < fig->n_axes; a++) {
        kv_axes_t *ax = fig->axes[a];
        rng_t rx, ry;
        axes_ranges(ax, &rx, &ry);
        axis_limits(&ax->x, fig->share_x ? &ux : &rx);
        axis_limits(&ax->y, fig->share_y ? &uy : &ry);
    }
}

/* ================================================================ coordinates */

/* Position of v along axis a as a fraction of the view (0 = vlo); NAN when not drawable. */
static double axis_frac(const axis_t *a, double v)
{
    if (!isfinite(v))
        return NAN;
    if (a->scale != KV_SCALE_LINEAR) {
        if (v <= 0)
            return NAN;
        return (log(v) - log(a->vlo)) / (log(a->vhi) - log(a->vlo));
    }
    return (v - a->vlo) / (a->vhi - a->vlo);
}

static double map_x(const kv_axes_t *ax, double v)
{
    return ax->px0 + axis_frac(&ax->x, v) * (ax->px1 - ax->px0);
}

static double map_y(const kv_axes_t *ax, double v)
{
    double t = axis_frac(&ax->y, v);
    return ax->y.invert ? ax->py0 + t * (ax->py1 - ax->py0) : ax->py1 - t * (ax->py1 - ax->py0);
}

int kv_axes_data_to_px(const kv_axes_t *ax, double x, double y, double *px, double *py)
{
    if (!ax || !px || !py)
        return kv_error(KV_EINVAL, "kv_axes_data_to_px: NULL argument");
    if (!ax->laid_out)
        return kv_error(KV_EINVAL, "kv_axes_data_to_px: the figure has not been rendered yet");
    double u = map_x(ax, x), v = map_y(ax, y);
    if (!isfinite(u) || !isfinite(v))
        return kv_error(KV_EINVAL, "kv_axes_data_to_px: (%g, %g) is not drawable on these axes", x, y);
    *px = u;
    *py = v;
    return KV_OK;
}

int kv_axes_plot_rect(const kv_axes_t *ax, double *x0, double *y0, double *x1, double *y1)
{
    if (!ax || !x0 || !y0 || !x1 || !y1)
        return kv_error(KV_EINVAL, "kv_axes_plot_rect: NULL argument");
    if (!ax->laid_out)
        return kv_error(KV_EINVAL, "kv_axes_plot_rect: the figure has not been rendered yet");
    *x0 = ax->px0;
    *y0 = ax->py0;
    *x1 = ax->px1;
    *y1 = ax->py1;
    return KV_OK;
}

/* ================================================================ ticks and tick labels */

static void minus_sign(const char *in, char *out, size_t len)
{
    size_t o = 0;
    for (const char *p = in; *p && o + 4 < len; p++) {
        if (*p == '-') {
            memcpy(out + o, "\xe2\x88\x92", 3); /* U+2212 */
            o += 3;
        } else {
            out[o++] = *p;
        }
    }
    out[o] = '\0';
}

/* Widest a categorical label may be before it is shortened with an ellipsis. */
static double cat_cap(const axis_t *a)
{
    return a->rot ? a->cap_r : a->cap_h;
}

/* Text of tick i of axis a (categories shortened to cat_cap). */
static void tick_text(cairo_t *cr, const kv_fig_t *fig, const axis_t *a, int i, char *buf, size_t len)
{
    const fm_t fm = fonts(fig);
    double v = a->ticks.t[i].value;
    if (a->ncat) {
        int c = (int)lround(v);
        const char *s = c >= 0 && c < a->ncat ? a->cats[c] : "";
        char *e = txt_ellipsize(cr, s, fm.tick, 0, cat_cap(a));
        snprintf(buf, len, "%s", e ? e : s);
        kv_free(e);
        return;
    }
    char raw[128];
    kv_ticks_format(&a->ticks, v, raw, sizeof raw);
    minus_sign(raw, buf, len);
}

static double tick_px(const kv_axes_t *ax, const axis_t *a, double v)
{
    return a == &ax->x ? map_x(ax, v) : map_y(ax, v);
}

/* Greedy pass: unlabel any tick whose label would come within `gap` of the previous kept one. */
static void thin_overlaps(cairo_t *cr, const kv_fig_t *fig, const kv_axes_t *ax, axis_t *a, int is_x, double gap)
{
    const fm_t fm = fonts(fig);
    double last_end = -INFINITY;
    int order = 1;
    /* ticks are stored in increasing value; on screen that is increasing x, decreasing y (unless inverted) */
    if (!is_x && !a->invert)
        order = -1;
    int n = a->ticks.n;
    for (int j = 0; j < n; j++) {
        int i = order > 0 ? j : n - 1 - j;
        kv_tick_t *t = &a->ticks.t[i];
        if (!t->labelled)
            continue;
        char buf[256];
        tick_text(cr, fig, a, i, buf, sizeof buf);
        txt_box_t b;
        txt_measure(cr, buf, fm.tick, 0, &b);
        double ext = is_x ? (a->rot ? b.h / 0.7071 : b.w) : b.h;
        double p = tick_px(ax, a, t->value);
        double lo = p - ext / 2, hi = p + ext / 2;
        if (!isfinite(p))
            continue;
        if (lo < last_end + gap) {
            t->labelled = 0;
            continue;
        }
        last_end = hi;
    }
}

/* Ticks of one axis for a plot side of `len` px. Needs ax's plot rect set (for thinning). */
static void axis_ticks(cairo_t *cr, const kv_fig_t *fig, axis_t *a, int is_x, double len)
{
    const fm_t fm = fonts(fig);
    kv_ticks_t *t = &a->ticks;
    a->rot = 0;
    a->thin = 1;
    if (len < 1)
        len = 1;
    if (a->ncat) {
        double spacing = len / (a->vhi - a->vlo);
        double maxw = 0, h = 0;
        for (int c = 0; c < a->ncat; c++) {
            txt_box_t b;
            char *e = txt_ellipsize(cr, a->cats[c], fm.tick, 0, a->cap_h);
            txt_measure(cr, e ? e : a->cats[c], fm.tick, 0, &b);
            kv_free(e);
            maxw = fmax(maxw, b.w);
            h = fmax(h, b.h);
        }
        int thin;
        if (is_x) {
            int kh = (int)ceil((maxw + 12 * fm.s) / spacing);
            int kr = (int)ceil((h + 4 * fm.s) / (spacing * 0.7071));
            if (kh <= 1)
                thin = 1;
            else if (kr < kh) {
                a->rot = 1;
                thin = kr;
            } else
                thin = kh;
        } else {
            thin = (int)ceil((h + 2 * fm.s) / spacing);
        }
        if (thin < 1)
            thin = 1;
        while (a->ncat / thin >= KV_TICKS_MAX)
            thin++;
        a->thin = thin;
        memset(t, 0, sizeof *t);
        for (int c = (int)ceil(a->vlo); c <= (int)floor(a->vhi) && t->n < KV_TICKS_MAX; c++) {
            if (c < 0 || c >= a->ncat || c % thin)
                continue;
            t->t[t->n].value = c;
            t->t[t->n].major = 1;
            t->t[t->n].labelled = 1;
            t->n++;
        }
        return;
    }
    double target = is_x ? 80 * fm.s : 60 * fm.s;
    int maxm = (int)(len / target) + 1; /* ticks = intervals + 1 */
    maxm = maxm < 2 ? 2 : maxm > 9 ? 9 : maxm;
    for (; maxm >= 2; maxm--) {
        int rc;
        if (a->scale == KV_SCALE_LOG)
            rc = kv_ticks_log(a->vlo, a->vhi, maxm, t);
        else if (a->scale == KV_SCALE_LOG2)
            rc = kv_ticks_log2(a->vlo, a->vhi, maxm, t);
        else
            rc = kv_ticks_linear_ex(a->vlo, a->vhi, maxm, a->integer, t);
        if (rc != KV_OK) {
            memset(t, 0, sizeof *t);
            return;
        }
        /* distance check between neighbouring labels, in px along the axis */
        int ok = 1;
        double prev_p = NAN, prev_ext = 0;
        for (int i = 0; i < t->n && ok; i++) {
            if (!t->t[i].labelled)
                continue;
            char buf[256];
            tick_text(cr, fig, a, i, buf, sizeof buf);
            txt_box_t b;
            txt_measure(cr, buf, fm.tick, 0, &b);
            double ext = is_x ? b.w : b.h;
            double p = axis_frac(a, t->t[i].value) * len;
            if (!isnan(prev_p) && fabs(p - prev_p) < (ext + prev_ext) / 2 + (is_x ? 16 : 10) * fm.s)
                ok = 0;
            prev_p = p;
            prev_ext = ext;
        }
        if (ok)
            break;
    }
}

/* ================================================================ legend entries */

typedef struct {
    const item_t **e;
    int n, cap;
} entries_t;

static void entries_add_axes(entries_t *L, const kv_axes_t *ax)
{
    for (int k = 0; k < ax->n_items; k++) {
        const item_t *it = &ax->items[k];
        if (!it->label || it->kind == IT_HEAT || it->kind == IT_TEXT)
            continue;
        int dup = 0;
        for (int j = 0; j < L->n; j++)
            if (!strcmp(L->e[j]->label, it->label))
                dup = 1;
        if (dup)
            continue;
        if (L->n == L->cap) {
            int cap = L->cap ? 2 * L->cap : 16;
            const item_t **p = kv_realloc(L->e, (size_t)cap * sizeof *p, "legend entries");
            if (!p)
                return;
            L->e = p;
            L->cap = cap;
        }
        L->e[L->n++] = it;
    }
}

typedef struct {
    double w, h; /* box */
    double row_h, col_w, handle_w, pad;
    double cap; /* widest label, px (longer ones get an ellipsis) */
    int cols, rows;
} lgsize_t;

/* Legend box for entries L laid out in at most max_w px width (0: one column), labels at most cap px. */
static void legend_size(cairo_t *cr, const fm_t *fm, const entries_t *L, double max_w, double cap, lgsize_t *z)
{
    memset(z, 0, sizeof *z);
    z->cap = cap;
    z->pad = 8 * fm->s;
    z->handle_w = 34 * fm->s;
    z->row_h = fm->legend * 1.55;
    double tw = 0;
    for (int i = 0; i < L->n; i++) {
        txt_box_t b;
        char *e = txt_ellipsize(cr, L->e[i]->label, fm->legend, 0, cap);
        txt_measure(cr, e ? e : L->e[i]->label, fm->legend, 0, &b);
        kv_free(e);
        tw = fmax(tw, b.w);
    }
    z->col_w = z->handle_w + 8 * fm->s + tw + 16 * fm->s;
    z->cols = 1;
    if (max_w > 0) {
        z->cols = (int)((max_w - 2 * z->pad) / z->col_w);
        if (z->cols < 1)
            z->cols = 1;
        if (z->cols > L->n)
            z->cols = L->n;
    }
    z->rows = (L->n + z->cols - 1) / z->cols;
    z->w = 2 * z->pad + z->cols * z->col_w - 16 * fm->s;
    z->h = 2 * z->pad + z->rows * z->row_h;
}

/* ================================================================ per-panel layout */

typedef struct {
    double ml, mr, mt, mb; /* margins around the plot area */
    /* colour bar of this panel */
    int cbar;
    const item_t *heat;
    kv_ticks_t cb_ticks;
    double cb_w; /* width of bar + ticks + labels + label */
    /* legend */
    entries_t L;
    lgsize_t lg;
    int lg_mode; /* 0 none, 1 inside, 2 right, 3 below */
    double lgx, lgy;
} lay_t;

static void cbar_ticks(const item_t *h, double len, const fm_t *fm, kv_ticks_t *t)
{
    int maxm = (int)(len / (58 * fm->s));
    maxm = maxm < 2 ? 2 : maxm > 8 ? 8 : maxm;
    if (h->clog)
        kv_ticks_log(h->cv0, h->cv1, maxm, t);
    else
        kv_ticks_linear(h->cv0, h->cv1, maxm, t);
}

/* width of a vertical colour bar block (gap + bar + ticks + labels + rotated label) */
static double cbar_width(cairo_t *cr, const fm_t *fm, const kv_ticks_t *t, const char *label)
{
    double maxw = 0;
    for (int i = 0; i < t->n; i++) {
        if (!t->t[i].labelled)
            continue;
        char raw[128], buf[160];
        kv_ticks_format(t, t->t[i].value, raw, sizeof raw);
        minus_sign(raw, buf, sizeof buf);
        txt_box_t b;
        txt_measure(cr, buf, fm->tick, 0, &b);
        maxw = fmax(maxw, b.w);
    }
    double w = 18 * fm->s + 20 * fm->s + fm->ticklen + fm->pad + maxw;
    if (label && *label) {
        txt_box_t b;
        txt_measure(cr, label, fm->label, 0, &b);
        w += 10 * fm->s + b.h;
    }
    return w;
}

/* Margins of one panel given its plot size; also chooses its ticks. */
static void measure_panel(cairo_t *cr, const kv_fig_t *fig, kv_axes_t *ax, lay_t *ly, double pw, double ph)
{
    const fm_t fm = fonts(fig);
    double cw = ax->cx1 - ax->cx0, ch = ax->cy1 - ax->cy0;
    ax->x.cap_h = 0.9 * cw;
    ax->x.cap_r = 0.45 * ch;
    ax->y.cap_h = ax->y.cap_r = 0.3 * cw;
    double lg_cap = fmax(60 * fm.s, 0.28 * cw);
    axis_ticks(cr, fig, &ax->x, 1, pw);
    axis_ticks(cr, fig, &ax->y, 0, ph);
    /* thinning needs pixel positions: use a provisional rect of the right size */
    double ox0 = ax->px0, oy0 = ax->py0, ox1 = ax->px1, oy1 = ax->py1;
    ax->px0 = 0;
    ax->px1 = pw;
    ax->py0 = 0;
    ax->py1 = ph;
    thin_overlaps(cr, fig, ax, &ax->x, 1, 10 * fm.s);
    thin_overlaps(cr, fig, ax, &ax->y, 0, 4 * fm.s);
    ax->px0 = ox0;
    ax->px1 = ox1;
    ax->py0 = oy0;
    ax->py1 = oy1;

    /* y tick labels */
    double ytw = 0, yth = 0;
    for (int i = 0; i < ax->y.ticks.n; i++) {
        if (!ax->y.ticks.t[i].labelled)
            continue;
        char buf[256];
        tick_text(cr, fig, &ax->y, i, buf, sizeof buf);
        txt_box_t b;
        txt_measure(cr, buf, fm.tick, 0, &b);
        ytw = fmax(ytw, b.w);
        yth = fmax(yth, b.h);
    }
    /* x tick labels: height, and how far the end labels stick out sideways */
    double xth = 0, over_l = 0, over_r = 0;
    for (int i = 0; i < ax->x.ticks.n; i++) {
        if (!ax->x.ticks.t[i].labelled)
            continue;
        char buf[256];
        tick_text(cr, fig, &ax->x, i, buf, sizeof buf);
        txt_box_t b;
        txt_measure(cr, buf, fm.tick, 0, &b);
        double f = axis_frac(&ax->x, ax->x.ticks.t[i].value);
        if (!isfinite(f))
            continue;
        if (ax->x.rot) {
            double rw, rh;
            txt_rotated_size(&b, M_PI / 4, &rw, &rh);
            xth = fmax(xth, rh);
            over_l = fmax(over_l, rw - f * pw);
        } else {
            xth = fmax(xth, b.h);
            over_l = fmax(over_l, b.w / 2 - f * pw);
            over_r = fmax(over_r, b.w / 2 - (1 - f) * pw);
        }
    }
    double ml = fm.ticklen + fm.pad + ytw + 6 * fm.s;
    if (ax->y.label) {
        txt_box_t b;
        txt_measure(cr, ax->y.label, fm.label, 0, &b);
        ml += 8 * fm.s + b.h;
    }
    ml = fmax(ml, over_l + 4 * fm.s);
    double mb = fm.ticklen + fm.pad + xth + 4 * fm.s;
    if (ax->x.label) {
        txt_box_t b;
        txt_measure(cr, ax->x.label, fm.label, 0, &b);
        mb += 6 * fm.s + b.h;
    }
    double mt = fmax(8 * fm.s, yth / 2 + 2);
    if (ax->title) {
        txt_box_t b;
        txt_measure(cr, ax->title, fm.title, 0, &b);
        mt = b.h + 10 * fm.s;
    }
    double mr = fmax(over_r + 4 * fm.s, 12 * fm.s);

    /* colour bar */
    ly->cbar = 0;
    ly->heat = NULL;
    for (int k = 0; k < ax->n_items; k++)
        if (ax->items[k].kind == IT_HEAT) {
            ly->heat = &ax->items[k];
            break;
        }
    if (ly->heat && !fig->has_cbar && ly->heat->hs.colorbar == KV_CBAR_AXES) {
        ly->cbar = 1;
        cbar_ticks(ly->heat, ph, &fm, &ly->cb_ticks);
        ly->cb_w = cbar_width(cr, &fm, &ly->cb_ticks, ly->heat->hs.label);
        mr = fmax(mr, ly->cb_w + 6 * fm.s);
    }

    /* legend outside: right, unless it would take more than a third of the cell; then below */
    if (ly->lg_mode == 2) {
        legend_size(cr, &fm, &ly->L, 0, lg_cap, &ly->lg);
        if (ly->lg.w + 14 * fm.s > cw / 3 && ax->legend != KV_LEGEND_RIGHT)
            ly->lg_mode = 3;
        else
            mr += 14 * fm.s + ly->lg.w;
    }
    if (ly->lg_mode == 3) {
        legend_size(cr, &fm, &ly->L, cw - 8 * fm.s, lg_cap, &ly->lg);
        mb += 8 * fm.s + ly->lg.h;
    } else if (ly->lg_mode == 1) {
        legend_size(cr, &fm, &ly->L, 0, lg_cap, &ly->lg);
    }
    ly->ml = ml;
    ly->mr = mr;
    ly->mt = mt;
    ly->mb = mb;
}

/* ================================================================ figure layout */

typedef struct {
    double x0, y0, x1, y1; /* area for panels */
    double title_h;
    entries_t L; /* figure legend */
    lgsize_t lg;
    double lgx, lgy;
    double cb_w;
    kv_ticks_t cb_ticks;
    const item_t *cb_item;
    double cbx, cby0, cby1;
} figlay_t;

static void cell_rect(const kv_fig_t *fig, const figlay_t *fl, const kv_axes_t *ax, double *x0, double *y0, double *x1,
                      double *y1)
{
    double W = fl->x1 - fl->x0, H = fl->y1 - fl->y0;
    if (ax->explicit_rect) {
        *x0 = fl->x0 + ax->fx * W;
        *y0 = fl->y0 + ax->fy * H;
        *x1 = *x0 + ax->fw * W;
        *y1 = *y0 + ax->fh * H;
        return;
    }
    double cw = W / fig->cols, ch = H / fig->rows;
    *x0 = fl->x0 + ax->col * cw;
    *y0 = fl->y0 + ax->row * ch;
    *x1 = *x0 + cw;
    *y1 = *y0 + ch;
}

/* Apply margins to the cells (grid panels aligned by row and column) and set plot rects. */
static void place_panels(kv_fig_t *fig, const figlay_t *fl, lay_t *ly, int first_pass)
{
    double colL[256], colR[256], rowT[256], rowB[256];
    for (int i = 0; i < 256; i++)
        colL[i] = colR[i] = rowT[i] = rowB[i] = 0;
    const fm_t fm = fonts(fig);
    for (int a = 0; a < fig->n_axes; a++) {
        kv_axes_t *ax = fig->axes[a];
        if (first_pass) {
            ly[a].ml = 80 * fm.s;
            ly[a].mr = 20 * fm.s;
            ly[a].mt = 36 * fm.s;
            ly[a].mb = 60 * fm.s;
        }
        if (ax->explicit_rect || !visible(ax))
            continue;
        colL[ax->col] = fmax(colL[ax->col], ly[a].ml);
        colR[ax->col] = fmax(colR[ax->col], ly[a].mr);
        rowT[ax->row] = fmax(rowT[ax->row], ly[a].mt);
        rowB[ax->row] = fmax(rowB[ax->row], ly[a].mb);
    }
    for (int a = 0; a < fig->n_axes; a++) {
        kv_axes_t *ax = fig->axes[a];
        double x0, y0, x1, y1;
        cell_rect(fig, fl, ax, &x0, &y0, &x1, &y1);
        ax->cx0 = x0;
        ax->cy0 = y0;
        ax->cx1 = x1;
        ax->cy1 = y1;
        double ml = ax->explicit_rect ? ly[a].ml : colL[ax->col];
        double mr = ax->explicit_rect ? ly[a].mr : colR[ax->col];
        double mt = ax->explicit_rect ? ly[a].mt : rowT[ax->row];
        double mb = ax->explicit_rect ? ly[a].mb : rowB[ax->row];
        double px0 = round(x0 + ml), px1 = round(x1 - mr), py0 = round(y0 + mt), py1 = round(y1 - mb);
        if (px1 < px0 + 10)
            px1 = px0 + 10;
        if (py1 < py0 + 10)
            py1 = py0 + 10;
        /* equal aspect: same px per data unit (per decade / octave on log axes); both axes of one kind */
        int lx = ax->x.scale != KV_SCALE_LINEAR, lyg = ax->y.scale != KV_SCALE_LINEAR;
        if (ax->equal && lx == lyg) {
            double sx = lx ? log10(ax->x.vhi / ax->x.vlo) : ax->x.vhi - ax->x.vlo;
            double sy = lyg ? log10(ax->y.vhi / ax->y.vlo) : ax->y.vhi - ax->y.vlo;
            double ux = sx / (px1 - px0), uy = sy / (py1 - py0);
            if (ux > uy) {
                double h = sy / ux, c = 0.5 * (py0 + py1);
                py0 = round(c - h / 2);
                py1 = round(c + h / 2);
            } else if (uy > ux) {
                double w = sx / uy, c = 0.5 * (px0 + px1);
                px0 = round(c - w / 2);
                px1 = round(c + w / 2);
            }
        }
        ax->px0 = px0;
        ax->px1 = px1;
        ax->py0 = py0;
        ax->py1 = py1;
    }
}

static void layout(cairo_t *cr, kv_fig_t *fig, figlay_t *fl, lay_t *ly)
{
    const fm_t fm = fonts(fig);
    double W = fig->w, H = fig->h;
    fl->x0 = OUTER * fm.s;
    fl->y0 = OUTER * fm.s * 0.7;
    fl->x1 = W - OUTER * fm.s;
    fl->y1 = H - OUTER * fm.s * 0.7;
    fl->title_h = 0;
    if (fig->title) {
        txt_box_t b;
        txt_measure(cr, fig->title, fm.suptitle, 1, &b);
        fl->title_h = b.h + 10 * fm.s;
        fl->y0 += fl->title_h;
    }
    /* figure legend */
    if (fig->has_legend && fl->L.n) {
        if (fig->legend == KV_LEGEND_BELOW) {
            legend_size(cr, &fm, &fl->L, fl->x1 - fl->x0, 0.3 * fig->w, &fl->lg);
            fl->y1 -= fl->lg.h + 6 * fm.s;
        } else {
            legend_size(cr, &fm, &fl->L, 0, 0.25 * fig->w, &fl->lg);
            fl->x1 -= fl->lg.w + 12 * fm.s;
        }
    }
    /* figure colour bar */
    fl->cb_item = NULL;
    if (fig->has_cbar) {
        for (int a = 0; a < fig->n_axes && !fl->cb_item; a++)
            for (int k = 0; k < fig->axes[a]->n_items; k++)
                if (fig->axes[a]->items[k].kind == IT_HEAT) {
                    fl->cb_item = &fig->axes[a]->items[k];
                    break;
                }
        if (fl->cb_item) {
            cbar_ticks(fl->cb_item, 0.6 * (fl->y1 - fl->y0), &fm, &fl->cb_ticks);
            fl->cb_w = cbar_width(cr, &fm, &fl->cb_ticks, fig->cbar_label);
            fl->x1 -= fl->cb_w;
        }
    }
    /* panels: three passes of margins <-> ticks */
    for (int pass = 0; pass < 3; pass++) {
        place_panels(fig, fl, ly, pass == 0);
        for (int a = 0; a < fig->n_axes; a++) {
            kv_axes_t *ax = fig->axes[a];
            measure_panel(cr, fig, ax, &ly[a], ax->px1 - ax->px0, ax->py1 - ax->py0);
        }
    }
    place_panels(fig, fl, ly, 0);
    for (int a = 0; a < fig->n_axes; a++) {
        kv_axes_t *ax = fig->axes[a];
        /* final ticks for the final size (margins were computed for this size in the last pass) */
        axis_ticks(cr, fig, &ax->x, 1, ax->px1 - ax->px0);
        axis_ticks(cr, fig, &ax->y, 0, ax->py1 - ax->py0);
        ax->laid_out = 1;
        thin_overlaps(cr, fig, ax, &ax->x, 1, 10 * fm.s);
        thin_overlaps(cr, fig, ax, &ax->y, 0, 4 * fm.s);
        if (ly[a].cbar)
            cbar_ticks(ly[a].heat, ax->py1 - ax->py0, &fm, &ly[a].cb_ticks);
    }
    /* figure colour bar spans the panels that hold heat maps */
    if (fl->cb_item) {
        double y0 = INFINITY, y1 = -INFINITY, xr = -INFINITY;
        for (int a = 0; a < fig->n_axes; a++) {
            kv_axes_t *ax = fig->axes[a];
            int has_heat = 0;
            for (int k = 0; k < ax->n_items; k++)
                has_heat |= ax->items[k].kind == IT_HEAT;
            if (!has_heat)
                continue;
            y0 = fmin(y0, ax->py0);
            y1 = fmax(y1, ax->py1);
            xr = fmax(xr, ax->px1);
        }
        fl->cby0 = y0;
        fl->cby1 = y1;
        fl->cbx = fmin(fl->x1, xr + 6 * fm.s);
        cbar_ticks(fl->cb_item, y1 - y0, &fm, &fl->cb_ticks);
    }
    /* figure legend position */
    if (fig->has_legend && fl->L.n) {
        double top = INFINITY, bot = -INFINITY, left = INFINITY, right = -INFINITY;
        for (int a = 0; a < fig->n_axes; a++) {
            if (!visible(fig->axes[a]))
                continue;
            top = fmin(top, fig->axes[a]->py0);
            bot = fmax(bot, fig->axes[a]->py1);
            left = fmin(left, fig->axes[a]->px0);
            right = fmax(right, fig->axes[a]->px1);
        }
        if (fig->legend == KV_LEGEND_BELOW) {
            fl->lgx = round(0.5 * (left + right) - fl->lg.w / 2);
            fl->lgy = round(fl->y1 + 6 * fm.s);
        } else {
            double xr = -INFINITY;
            for (int a = 0; a < fig->n_axes; a++)
                xr = fmax(xr, fig->axes[a]->cx1);
            fl->lgx = round(fl->x1 + (fl->cb_item ? fl->cb_w : 0) + 12 * fm.s);
            fl->lgy = round(fmax(top, 0.5 * (top + bot) - fl->lg.h / 2));
        }
    }
}

/* ================================================================ drawing series */

static void set_dash(cairo_t *cr, kv_dash_t d, double w)
{
    double u = fmax(w, 1.2);
    switch (d) {
    case KV_DASH_DASHED: {
        double p[2] = {4.5 * u, 2.5 * u};
        cairo_set_dash(cr, p, 2, 0);
        cairo_set_line_cap(cr, CAIRO_LINE_CAP_BUTT);
        break;
    }
    case KV_DASH_DOTTED: {
        double p[2] = {0, 2.2 * u};
        cairo_set_dash(cr, p, 2, 0);
        cairo_set_line_cap(cr, CAIRO_LINE_CAP_ROUND);
        break;
    }
    case KV_DASH_DASHDOT: {
        double p[4] = {5 * u, 2.2 * u, 0, 2.2 * u};
        cairo_set_dash(cr, p, 4, 0);
        cairo_set_line_cap(cr, CAIRO_LINE_CAP_ROUND);
        break;
    }
    default:
        cairo_set_dash(cr, NULL, 0, 0);
        cairo_set_line_cap(cr, CAIRO_LINE_CAP_BUTT);
        break;
    }
}

static void marker_path(cairo_t *cr, kv_marker_t m, double x, double y, double size)
{
    double r = size / 2;
    switch (m) {
    case KV_MARKER_SQUARE:
        r *= 0.89;
        cairo_rectangle(cr, x - r, y - r, 2 * r, 2 * r);
        break;
    case KV_MARKER_TRIANGLE:
        r *= 1.2;
        cairo_move_to(cr, x, y - r);
        cairo_line_to(cr, x + r * 0.866, y + r * 0.5);
        cairo_line_to(cr, x - r * 0.866, y + r * 0.5);
        cairo_close_path(cr);
        break;
    case KV_MARKER_DIAMOND:
        r *= 1.2;
        cairo_move_to(cr, x, y - r);
        cairo_line_to(cr, x + r * 0.8, y);
        cairo_line_to(cr, x, y + r);
        cairo_line_to(cr, x - r * 0.8, y);
        cairo_close_path(cr);
        break;
    case KV_MARKER_CROSS:
        cairo_move_to(cr, x - r, y - r);
        cairo_line_to(cr, x + r, y + r);
        cairo_move_to(cr, x - r, y + r);
        cairo_line_to(cr, x + r, y - r);
        break;
    case KV_MARKER_PLUS:
        r *= 1.15;
        cairo_move_to(cr, x - r, y);
        cairo_line_to(cr, x + r, y);
        cairo_move_to(cr, x, y - r);
        cairo_line_to(cr, x, y + r);
        break;
    default:
        cairo_new_sub_path(cr);
        cairo_arc(cr, x, y, r, 0, 2 * M_PI);
        break;
    }
}

static void draw_marker(cairo_t *cr, kv_marker_t m, double x, double y, double size, kv_rgba_t c)
{
    set_rgba(cr, c);
    cairo_new_path(cr);
    marker_path(cr, m, x, y, size);
    if (m == KV_MARKER_CROSS || m == KV_MARKER_PLUS) {
        cairo_set_dash(cr, NULL, 0, 0);
        cairo_set_line_width(cr, fmax(1.5, size / 4));
        cairo_set_line_cap(cr, CAIRO_LINE_CAP_ROUND);
        cairo_stroke(cr);
    } else {
        cairo_fill(cr);
    }
}

/* Liang-Barsky: clip segment to rect; 0 when nothing is left. */
static int clip_seg(double *x0, double *y0, double *x1, double *y1, double rx0, double ry0, double rx1, double ry1)
{
    double t0 = 0, t1 = 1, dx = *x1 - *x0, dy = *y1 - *y0;
    double p[4] = {-dx, dx, -dy, dy}, q[4] = {*x0 - rx0, rx1 - *x0, *y0 - ry0, ry1 - *y0};
    for (int i = 0; i < 4; i++) {
        if (p[i] == 0) {
            if (q[i] < 0)
                return 0;
            continue;
        }
        double r = q[i] / p[i];
        if (p[i] < 0) {
            if (r > t1)
                return 0;
            if (r > t0)
                t0 = r;
        } else {
            if (r < t0)
                return 0;
            if (r < t1)
                t1 = r;
        }
    }
    double ax = *x0 + t0 * dx, ay = *y0 + t0 * dy, bx = *x0 + t1 * dx, by = *y0 + t1 * dy;
    *x0 = ax;
    *y0 = ay;
    *x1 = bx;
    *y1 = by;
    return 1;
}

/* Polyline through pixel points; NaN breaks it; segments clipped to a rect around the plot. */
static void polyline(cairo_t *cr, const kv_axes_t *ax, int n, const double *xs, const double *ys)
{
    double m = 50;
    double rx0 = ax->px0 - m, ry0 = ax->py0 - m, rx1 = ax->px1 + m, ry1 = ax->py1 + m;
    double cx = NAN, cy = NAN; /* current pen */
    double lx = NAN, ly = NAN; /* previous valid point */
    cairo_new_path(cr);
    for (int i = 0; i < n; i++) {
        double x = map_x(ax, xs[i]), y = map_y(ax, ys[i]);
        if (!isfinite(x) || !isfinite(y)) {
            lx = ly = NAN;
            continue;
        }
        if (!isnan(lx)) {
            double a0 = lx, b0 = ly, a1 = x, b1 = y;
            if (clip_seg(&a0, &b0, &a1, &b1, rx0, ry0, rx1, ry1)) {
                if (!(a0 == cx && b0 == cy))
                    cairo_move_to(cr, a0, b0);
                cairo_line_to(cr, a1, b1);
                cx = a1;
                cy = b1;
            }
        } else if (x >= rx0 && x <= rx1 && y >= ry0 && y <= ry1) {
            cairo_move_to(cr, x, y);
            cairo_line_to(cr, x, y); /* a lone point still shows with round caps */
            cx = x;
            cy = y;
        }
        lx = x;
        ly = y;
    }
}

static kv_rgba_t mask_color(kv_rgba_t c, int mask)
{
    if (mask) {
        kv_rgba_t k = {0, 0, 0, 1};
        return k;
    }
    return c;
}

/* Colour-map position of value v under the heat map's scale, in [0, 1] (NaN stays NaN). */
static double heat_t(const item_t *it, double v)
{
    if (isnan(v))
        return NAN;
    double t;
    if (it->clog)
        t = v <= it->cv0 ? 0 : (log10(v) - log10(it->cv0)) / (log10(it->cv1) - log10(it->cv0));
    else
        t = (v - it->cv0) / (it->cv1 - it->cv0);
    return fmin(1, fmax(0, t));
}

/* Values printed in the cells, when every label fits inside its cell. */
static void annotate_cells(cairo_t *cr, const kv_fig_t *fig, const kv_axes_t *ax, const item_t *it,
                           const kv_rgba_t *lut)
{
    const fm_t fm = fonts(fig);
    double e[4];
    heat_extent(it, e);
    const double wx = (e[1] - e[0]) / it->cols, wy = (e[3] - e[2]) / it->rows;
    double cw = fabs(map_x(ax, e[0] + wx) - map_x(ax, e[0])), ch = fabs(map_y(ax, e[2] + wy) - map_y(ax, e[2]));
    double size = fmin(fm.tick, 0.6 * ch);
    if (size < 9 || (size_t)it->rows * it->cols > 4096)
        return;
    char buf[64];
    for (int pass = 0; pass < 2; pass++) /* pass 0: do all labels fit? pass 1: draw */
        for (int r = 0; r < it->rows; r++)
            for (int c = 0; c < it->cols; c++) {
                double v = it->z[(size_t)r * it->cols + c];
                if (isnan(v))
                    continue;
                snprintf(buf, sizeof buf, it->hs.annotate, v);
                /* a value that rounds to zero prints without a minus sign ("-0.00") */
                char *minus = strchr(buf, '-');
                if (minus && !strpbrk(buf, "123456789")) {
                    if (strchr(it->hs.annotate, '+'))
                        *minus = '+';
                    else
                        memmove(minus, minus + 1, strlen(minus));
                }
                char lab[96];
                minus_sign(buf, lab, sizeof lab);
                if (pass == 0) {
                    txt_box_t b;
                    txt_measure(cr, lab, size, 0, &b);
                    if (b.w > cw - 4 || b.h > ch)
                        return;
                    continue;
                }
                kv_rgba_t cell = lut[(int)lround(heat_t(it, v) * 255)];
                kv_rgba_t ink = kv_rgba_lightness(cell) > 58 ? kv_rgb_hex(C_TEXT) : kv_rgb_hex(0xffffff);
                txt_draw(cr, lab, size, 0, map_x(ax, e[0] + (c + 0.5) * wx), map_y(ax, e[2] + (r + 0.5) * wy), 0.5, 0.5,
                         0, ink);
            }
}

static void draw_heat(cairo_t *cr, const kv_fig_t *fig, const kv_axes_t *ax, const item_t *it, int mask)
{
    double e[4];
    heat_extent(it, e);
    const double wx = (e[1] - e[0]) / it->cols, wy = (e[3] - e[2]) / it->rows;
    if (mask) {
        double x0 = map_x(ax, e[0]), x1 = map_x(ax, e[1]);
        double y0 = map_y(ax, e[2]), y1 = map_y(ax, e[3]);
        if (!isfinite(x0 + x1 + y0 + y1))
            return;
        cairo_set_source_rgba(cr, 0, 0, 0, 1);
        cairo_rectangle(cr, fmin(x0, x1), fmin(y0, y1), fabs(x1 - x0), fabs(y1 - y0));
        cairo_fill(cr);
        return;
    }
    /* 256-entry lookup of the map */
    kv_rgba_t lut[256];
    for (int i = 0; i < 256; i++)
        lut[i] = kv_cmap_eval(it->cmap, i / 255.0);
    int linear_axes = ax->x.scale == KV_SCALE_LINEAR && ax->y.scale == KV_SCALE_LINEAR;
    if (!linear_axes) {
        /* cells as rectangles (rare: heat map on a log axis) */
        for (int r = 0; r < it->rows; r++)
            for (int c = 0; c < it->cols; c++) {
                double v = it->z[(size_t)r * it->cols + c];
                if (isnan(v))
                    continue;
                kv_rgba_t col = lut[(int)lround(heat_t(it, v) * 255)];
                double x0 = map_x(ax, e[0] + c * wx), x1 = map_x(ax, e[0] + (c + 1) * wx),
                       y0 = map_y(ax, e[2] + r * wy), y1 = map_y(ax, e[2] + (r + 1) * wy);
                if (!isfinite(x0 + x1 + y0 + y1))
                    continue;
                set_rgba(cr, col);
                cairo_rectangle(cr, fmin(x0, x1), fmin(y0, y1), fabs(x1 - x0), fabs(y1 - y0));
                cairo_fill(cr);
            }
        return;
    }
    /* one image pixel per cell; on vector surfaces upscale so that viewers that smooth images
     * still show sharp cells */
    /* pixels per cell (signed: the image is flipped when an axis runs backwards) */
    const double bx = (map_x(ax, e[1]) - map_x(ax, e[0])) / it->cols,
                 by = (map_y(ax, e[3]) - map_y(ax, e[2])) / it->rows;
    double cw = fabs(bx), ch = fabs(by);
    int k = 1;
    if (cairo_surface_get_type(cairo_get_target(cr)) != CAIRO_SURFACE_TYPE_IMAGE) {
        k = (int)ceil(fmax(cw, ch));
        int maxdim = KV_MAX(it->rows, it->cols);
        if (k * maxdim > 4096)
            k = KV_MAX(1, 4096 / maxdim);
        if (k > 64)
            k = 64;
    }
    int iw = it->cols * k, ih = it->rows * k;
    cairo_surface_t *img = cairo_image_surface_create(CAIRO_FORMAT_ARGB32, iw, ih);
    if (cairo_surface_status(img) != CAIRO_STATUS_SUCCESS) {
        cairo_surface_destroy(img);
        return;
    }
    cairo_surface_flush(img);
    unsigned char *data = cairo_image_surface_get_data(img);
    int stride = cairo_image_surface_get_stride(img);
    for (int r = 0; r < it->rows; r++) {
        for (int c = 0; c < it->cols; c++) {
            double v = it->z[(size_t)r * it->cols + c];
            uint32_t px = 0;
            if (!isnan(v)) {
                kv_rgba_t col = lut[(int)lround(heat_t(it, v) * 255)];
                px = 0xff000000u | (uint32_t)lround(col.r * 255) << 16 | (uint32_t)lround(col.g * 255) << 8 |
                     (uint32_t)lround(col.b * 255);
            }
            for (int dy = 0; dy < k; dy++) {
                uint32_t *row = (uint32_t *)(data + (size_t)(r * k + dy) * stride);
                for (int dx = 0; dx < k; dx++)
                    row[c * k + dx] = px;
            }
        }
    }
    cairo_surface_mark_dirty(img);
    double ox = map_x(ax, e[0]), oy = map_y(ax, e[2]);
    cairo_save(cr);
    cairo_translate(cr, ox, oy);
    cairo_scale(cr, bx / k, by / k);
    cairo_set_source_surface(cr, img, 0, 0);
    cairo_pattern_t *pat = cairo_get_source(cr);
    /* enlarging: crisp cells; shrinking (cells under a pixel): average, so no cell is dropped */
    cairo_pattern_set_filter(pat, (cw >= 1 && ch >= 1) ? CAIRO_FILTER_NEAREST : CAIRO_FILTER_GOOD);
    cairo_pattern_set_extend(pat, CAIRO_EXTEND_PAD);
    cairo_rectangle(cr, 0, 0, iw, ih);
    cairo_fill(cr);
    cairo_restore(cr);
    cairo_surface_destroy(img);
    if (it->hs.annotate)
        annotate_cells(cr, fig, ax, it, lut);
}

static void draw_item(cairo_t *cr, const kv_fig_t *fig, const kv_axes_t *ax, const item_t *it, int mask)
{
    const fm_t fm = fonts(fig);
    kv_rgba_t col = mask_color(it->st.color, mask);
    cairo_set_line_join(cr, CAIRO_LINE_JOIN_ROUND);
    switch (it->kind) {
    case IT_LINE:
    case IT_SCATTER:
        if (it->kind == IT_LINE && it->st.dash != KV_DASH_NONE) {
            set_rgba(cr, col);
            cairo_set_line_width(cr, it->st.width);
            set_dash(cr, it->st.dash, it->st.width);
            if (it->st.dash == KV_DASH_SOLID)
                cairo_set_line_cap(cr, CAIRO_LINE_CAP_ROUND);
            polyline(cr, ax, it->n, it->x, it->y);
            cairo_stroke(cr);
            cairo_set_dash(cr, NULL, 0, 0);
        }
        if (it->st.marker != KV_MARKER_NONE)
            for (int i = 0; i < it->n; i++) {
                double x = map_x(ax, it->x[i]), y = map_y(ax, it->y[i]);
                if (!isfinite(x) || !isfinite(y) || x < ax->px0 - 20 || x > ax->px1 + 20 || y < ax->py0 - 20 ||
                    y > ax->py1 + 20)
                    continue;
                draw_marker(cr, it->st.marker, x, y, it->st.marker_size, col);
            }
        break;
    case IT_BARS: {
        int nb = KV_MAX(ax->n_bars, 1);
        double group = 0.8, bw = group / nb;
        double base;
        if (ax->y.scale == KV_SCALE_LINEAR)
            base = map_y(ax, fmin(fmax(0.0, ax->y.vlo), ax->y.vhi));
        else
            base = ax->y.invert ? ax->py0 : ax->py1;
        set_rgba(cr, col);
        for (int i = 0; i < it->n; i++) {
            double top = map_y(ax, it->y[i]);
            if (!isfinite(top))
                continue;
            double x0 = map_x(ax, i - group / 2 + it->bar_slot * bw),
                   x1 = map_x(ax, i - group / 2 + (it->bar_slot + 1) * bw);
            if (!isfinite(x0) || !isfinite(x1))
                continue;
            double gap = (x1 - x0) > 6 ? 0.75 : 0; /* hairline between neighbouring bars */
            top = fmin(fmax(top, ax->py0 - 2), ax->py1 + 2);
            cairo_rectangle(cr, x0 + gap, fmin(top, base), (x1 - x0) - 2 * gap, fabs(base - top));
        }
        cairo_fill(cr);
        break;
    }
    case IT_BAND: {
        set_rgba(cr, col);
        /* one polygon per run of drawable points */
        int i = 0;
        while (i < it->n) {
            while (i < it->n &&
                   !(isfinite(map_x(ax, it->x[i])) && isfinite(map_y(ax, it->y[i])) && isfinite(map_y(ax, it->y2[i]))))
                i++;
            int s = i;
            while (i < it->n && isfinite(map_x(ax, it->x[i])) && isfinite(map_y(ax, it->y[i])) &&
                   isfinite(map_y(ax, it->y2[i])))
                i++;
            if (i - s < 2)
                continue;
            cairo_new_path(cr);
            for (int j = s; j < i; j++)
                cairo_line_to(cr, map_x(ax, it->x[j]), map_y(ax, it->y2[j]));
            for (int j = i - 1; j >= s; j--)
                cairo_line_to(cr, map_x(ax, it->x[j]), map_y(ax, it->y[j]));
            cairo_close_path(cr);
            cairo_fill(cr);
        }
        break;
    }
    case IT_HLINE:
    case IT_VLINE:
    case IT_IDENTITY: {
        set_rgba(cr, col);
        cairo_set_line_width(cr, it->st.width);
        set_dash(cr, it->st.dash, it->st.width);
        cairo_new_path(cr);
        if (it->kind == IT_HLINE) {
            double y = map_y(ax, it->y[0]);
            if (isfinite(y)) {
                cairo_move_to(cr, ax->px0, y);
                cairo_line_to(cr, ax->px1, y);
            }
        } else if (it->kind == IT_VLINE) {
            double x = map_x(ax, it->x[0]);
            if (isfinite(x)) {
                cairo_move_to(cr, x, ax->py0);
                cairo_line_to(cr, x, ax->py1);
            }
        } else {
            double lo = fmax(ax->x.vlo, ax->y.vlo), hi = fmin(ax->x.vhi, ax->y.vhi);
            if (hi > lo) {
                double xs[257], ys[257];
                int logx = ax->x.scale != KV_SCALE_LINEAR && lo > 0;
                for (int i = 0; i <= 256; i++) {
                    double f = i / 256.0;
                    xs[i] = ys[i] = logx ? lo * pow(hi / lo, f) : lo + f * (hi - lo);
                }
                polyline(cr, ax, 257, xs, ys);
            }
        }
        cairo_stroke(cr);
        cairo_set_dash(cr, NULL, 0, 0);
        break;
    }
    case IT_TEXT: {
        double x = map_x(ax, it->x[0]), y = map_y(ax, it->y[0]);
        if (isfinite(x) && isfinite(y))
            txt_draw(cr, it->text, it->size > 0 ? it->size * fm.s : fm.tick, 0, x, y, it->anchor_x, it->anchor_y, 0,
                     mask_color(it->tcolor, mask));
        break;
    }
    case IT_HEAT: draw_heat(cr, fig, ax, it, mask); break;
    }
}

/* ================================================================ automatic legend placement */

/* Inked pixels of the data of `ax`, as a summed-area table over its plot rect. */
typedef struct {
    int w, h;
    double *sat; /* (h+1, w+1) */
} inkmap_t;

static int ink_build(const kv_fig_t *fig, const kv_axes_t *ax, inkmap_t *m)
{
    int w = (int)ceil(ax->px1 - ax->px0), h = (int)ceil(ax->py1 - ax->py0);
    m->w = w;
    m->h = h;
    m->sat = NULL;
    if (w < 1 || h < 1)
        return KV_EINVAL;
    cairo_surface_t *s = cairo_image_surface_create(CAIRO_FORMAT_A8, w, h);
    if (cairo_surface_status(s) != CAIRO_STATUS_SUCCESS) {
        cairo_surface_destroy(s);
        return KV_ENOMEM;
    }
    cairo_t *cr = cairo_create(s);
    cairo_translate(cr, -ax->px0, -ax->py0);
    cairo_rectangle(cr, ax->px0, ax->py0, w, h);
    cairo_clip(cr);
    for (int k = 0; k < ax->n_items; k++)
        draw_item(cr, fig, ax, &ax->items[k], 1);
    cairo_destroy(cr);
    cairo_surface_flush(s);
    m->sat = kv_calloc((size_t)(w + 1) * (size_t)(h + 1), sizeof(double), "legend placement map");
    if (!m->sat) {
        cairo_surface_destroy(s);
        return KV_ENOMEM;
    }
    const unsigned char *d = cairo_image_surface_get_data(s);
    int stride = cairo_image_surface_get_stride(s);
    for (int y = 0; y < h; y++) {
        double rowsum = 0;
        for (int x = 0; x < w; x++) {
            rowsum += d[(size_t)y * stride + x] / 255.0;
            m->sat[(size_t)(y + 1) * (w + 1) + x + 1] = m->sat[(size_t)y * (w + 1) + x + 1] + rowsum;
        }
    }
    cairo_surface_destroy(s);
    return KV_OK;
}

/* Ink inside [x0, x1) x [y0, y1) in plot-rect pixel coordinates (clamped). */
static double ink_sum(const inkmap_t *m, double x0, double y0, double x1, double y1)
{
    int a = (int)floor(fmax(0, x0)), b = (int)floor(fmax(0, y0));
    int c = (int)ceil(fmin(m->w, x1)), d = (int)ceil(fmin(m->h, y1));
    if (c <= a || d <= b)
        return 0;
    size_t W = (size_t)m->w + 1;
    return m->sat[(size_t)d * W + c] - m->sat[(size_t)b * W + c] - m->sat[(size_t)d * W + a] +
           m->sat[(size_t)b * W + a];
}

/* Position of a legend box inside the plot rect for a given spot. */
static void spot_xy(const kv_axes_t *ax, const lgsize_t *z, int spot, double inset, double *x, double *y)
{
    double L = ax->px0 + inset, R = ax->px1 - inset - z->w, T = ax->py0 + inset, B = ax->py1 - inset - z->h;
    double CX = 0.5 * (ax->px0 + ax->px1 - z->w), CY = 0.5 * (ax->py0 + ax->py1 - z->h);
    switch (spot) {
    case 0:
        *x = R;
        *y = T;
        break; /* upper right */
    case 1:
        *x = L;
        *y = T;
        break; /* upper left */
    case 2:
        *x = L;
        *y = B;
        break; /* lower left */
    case 3:
        *x = R;
        *y = B;
        break; /* lower right */
    case 4:
        *x = CX;
        *y = T;
        break; /* upper centre */
    case 5:
        *x = CX;
        *y = B;
        break; /* lower centre */
    case 6:
        *x = R;
        *y = CY;
        break; /* centre right */
    default:
        *x = L;
        *y = CY;
        break; /* centre left */
    }
}

/* Decide where AUTO legends go; returns 1 when some legend moved outside (layout must be redone). */
static int place_legends(cairo_t *cr, const kv_fig_t *fig, lay_t *ly)
{
    const fm_t fm = fonts(fig);
    int moved = 0;
    for (int a = 0; a < fig->n_axes; a++) {
        kv_axes_t *ax = fig->axes[a];
        lay_t *l = &ly[a];
        if (l->lg_mode != 1)
            continue;
        legend_size(cr, &fm, &l->L, 0, fmax(60 * fm.s, 0.28 * (ax->cx1 - ax->cx0)), &l->lg);
        double inset = 10 * fm.s;
        int fits = l->lg.w + 2 * inset <= ax->px1 - ax->px0 && l->lg.h + 2 * inset <= ax->py1 - ax->py0;
        int spot = -1;
        if (ax->legend >= KV_LEGEND_UPPER_LEFT) {
            static const int fixed[4] = {1, 0, 2, 3}; /* UPPER_LEFT, UPPER_RIGHT, LOWER_LEFT, LOWER_RIGHT */
            spot = fixed[ax->legend - KV_LEGEND_UPPER_LEFT];
        } else if (fits) {
            inkmap_t m;
            if (ink_build(fig, ax, &m) == KV_OK) {
                double best = INFINITY;
                double margin = 5 * fm.s;
                for (int s = 0; s < 8; s++) {
                    double x, y;
                    spot_xy(ax, &l->lg, s, inset, &x, &y);
                    double ink = ink_sum(&m, x - ax->px0 - margin, y - ax->py0 - margin, x - ax->px0 + l->lg.w + margin,
                                         y - ax->py0 + l->lg.h + margin);
                    if (ink < best - 1e-9) {
                        best = ink;
                        spot = s;
                    }
                }
                /* tolerate anti-aliasing fringes only: about one pixel's worth of ink */
                if (best > 1.0)
                    spot = -1;
            }
            kv_free(m.sat);
        }
        if (spot < 0) {
            l->lg_mode = 2;
            moved = 1;
            continue;
        }
        spot_xy(ax, &l->lg, spot, inset, &l->lgx, &l->lgy);
        l->lgx = round(l->lgx);
        l->lgy = round(l->lgy);
    }
    return moved;
}

/* ================================================================ drawing frames, ticks, legends */

static void draw_handle(cairo_t *cr, const item_t *it, double x, double y, double w, double h)
{
    kv_rgba_t c = it->st.color;
    double cy = y + h / 2;
    switch (it->kind) {
    case IT_BARS:
    case IT_BAND: {
        double s = fmin(h * 0.8, 16);
        set_rgba(cr, c);
        cairo_rectangle(cr, x + w / 2 - s * 0.9, cy - s / 2, s * 1.8, s);
        cairo_fill(cr);
        break;
    }
    case IT_SCATTER: draw_marker(cr, it->st.marker, x + w / 2, cy, fmin(it->st.marker_size, h * 0.9), c); break;
    default:
        if (it->st.dash != KV_DASH_NONE) {
            set_rgba(cr, c);
            double lw = fmin(it->st.width, 5);
            cairo_set_line_width(cr, lw);
            set_dash(cr, it->st.dash, lw);
            cairo_move_to(cr, x, round(cy) + 0.5 * ((int)lround(lw) % 2));
            cairo_line_to(cr, x + w, round(cy) + 0.5 * ((int)lround(lw) % 2));
            cairo_stroke(cr);
            cairo_set_dash(cr, NULL, 0, 0);
        }
        if (it->st.marker != KV_MARKER_NONE)
            draw_marker(cr, it->st.marker, x + w / 2, cy, fmin(it->st.marker_size, h * 0.9), c);
        break;
    }
}

static void draw_legend(cairo_t *cr, const fm_t *fm, const entries_t *L, const lgsize_t *z, double x, double y,
                        int framed)
{
    if (framed) {
        cairo_rectangle(cr, x + 0.5, y + 0.5, round(z->w) - 1, round(z->h) - 1);
        cairo_set_source_rgba(cr, 1, 1, 1, 0.92);
        cairo_fill_preserve(cr);
        cairo_set_source_rgb(cr, 0.80, 0.80, 0.80);
        cairo_set_line_width(cr, 1);
        cairo_stroke(cr);
    }
    for (int i = 0; i < L->n; i++) {
        int col = i / z->rows, row = i % z->rows;
        if (z->cols > 1) { /* fill rows first when in several columns (reads left to right) */
            col = i % z->cols;
            row = i / z->cols;
        }
        double ex = x + z->pad + col * z->col_w, ey = y + z->pad + row * z->row_h;
        draw_handle(cr, L->e[i], ex, ey, z->handle_w, z->row_h);
        txt_draw_fit(cr, L->e[i]->label, fm->legend, 0, z->cap, ex + z->handle_w + 8 * fm->s, ey + z->row_h / 2, 0, 0.5,
                     0, kv_rgb_hex(C_TEXT));
    }
}

static void draw_colorbar(cairo_t *cr, const fm_t *fm, const item_t *h, const kv_ticks_t *t, const char *label,
                          double x, double y0, double y1)
{
    double bw = 20 * fm->s, bx = round(x + 18 * fm->s);
    y0 = round(y0);
    y1 = round(y1);
    cairo_pattern_t *g = cairo_pattern_create_linear(0, y1, 0, y0);
    for (int i = 0; i <= 64; i++) {
        kv_rgba_t c = kv_cmap_eval(h->cmap, i / 64.0);
        cairo_pattern_add_color_stop_rgb(g, i / 64.0, c.r, c.g, c.b);
    }
    cairo_rectangle(cr, bx, y0, bw, y1 - y0);
    cairo_set_source(cr, g);
    cairo_fill(cr);
    cairo_pattern_destroy(g);
    cairo_rectangle(cr, bx + 0.5, y0 + 0.5, bw - 1, y1 - y0 - 1);
    set_rgba(cr, kv_rgb_hex(C_FRAME));
    cairo_set_line_width(cr, 1);
    cairo_stroke(cr);
    double l0 = h->clog ? log10(h->cv0) : h->cv0, l1 = h->clog ? log10(h->cv1) : h->cv1;
    double maxw = 0;
    for (int i = 0; i < t->n; i++) {
        double v = t->t[i].value;
        double f = ((h->clog ? log10(v) : v) - l0) / (l1 - l0);
        if (!(f >= -1e-9 && f <= 1 + 1e-9))
            continue;
        double py = round(y1 - f * (y1 - y0)) + 0.5;
        double len = t->t[i].major ? fm->ticklen : fm->minorlen;
        set_rgba(cr, kv_rgb_hex(C_FRAME));
        cairo_move_to(cr, bx + bw, py);
        cairo_line_to(cr, bx + bw + len, py);
        cairo_stroke(cr);
        if (!t->t[i].labelled)
            continue;
        char raw[128], buf[160];
        kv_ticks_format(t, v, raw, sizeof raw);
        minus_sign(raw, buf, sizeof buf);
        txt_box_t b;
        txt_measure(cr, buf, fm->tick, 0, &b);
        maxw = fmax(maxw, b.w);
        txt_draw(cr, buf, fm->tick, 0, bx + bw + fm->ticklen + fm->pad, py, 0, 0.5, 0, kv_rgb_hex(C_TICKTEXT));
    }
    if (label && *label)
        txt_draw_fit(cr, label, fm->label, 0, y1 - y0, bx + bw + fm->ticklen + fm->pad + maxw + 10 * fm->s,
                     0.5 * (y0 + y1), 0.5, 0, -M_PI / 2, kv_rgb_hex(C_TEXT));
}

static void draw_axes(cairo_t *cr, const kv_fig_t *fig, kv_axes_t *ax, lay_t *ly)
{
    const fm_t fm = fonts(fig);
    double x0 = ax->px0, y0 = ax->py0, x1 = ax->px1, y1 = ax->py1;
    /* grid */
    cairo_set_line_width(cr, 1);
    for (int pass = 0; pass < 2; pass++) {
        axis_t *a = pass == 0 ? &ax->x : &ax->y;
        if (!a->grid || a->ncat)
            continue;
        for (int i = 0; i < a->ticks.n; i++) {
            const kv_tick_t *t = &a->ticks.t[i];
            if (!t->major && a->scale == KV_SCALE_LINEAR)
                continue;
            double p = pass == 0 ? map_x(ax, t->value) : map_y(ax, t->value);
            if (!isfinite(p) || p < (pass == 0 ? x0 : y0) + 0.5 || p > (pass == 0 ? x1 : y1) - 0.5)
                continue;
            p = floor(p) + 0.5;
            set_rgba(cr, kv_rgb_hex(t->major ? C_GRID : C_GRID_MINOR));
            if (pass == 0) {
                cairo_move_to(cr, p, y0);
                cairo_line_to(cr, p, y1);
            } else {
                cairo_move_to(cr, x0, p);
                cairo_line_to(cr, x1, p);
            }
            cairo_stroke(cr);
        }
    }
    /* series, clipped */
    cairo_save(cr);
    cairo_rectangle(cr, x0, y0, x1 - x0, y1 - y0);
    cairo_clip(cr);
    for (int k = 0; k < ax->n_items; k++)
        draw_item(cr, fig, ax, &ax->items[k], 0);
    cairo_restore(cr);
    /* frame */
    set_rgba(cr, kv_rgb_hex(C_FRAME));
    cairo_set_line_width(cr, 1);
    cairo_rectangle(cr, x0 + 0.5, y0 + 0.5, x1 - x0 - 1, y1 - y0 - 1);
    cairo_stroke(cr);
    /* ticks and labels */
    ax->x.n_lab = ax->y.n_lab = 0;
    double xlab_bottom = y1 + fm.ticklen + fm.pad;
    for (int i = 0; i < ax->x.ticks.n; i++) {
        const kv_tick_t *t = &ax->x.ticks.t[i];
        double p = map_x(ax, t->value);
        if (!isfinite(p) || p < x0 - 0.5 || p > x1 + 0.5)
            continue;
        double pp = fmin(fmax(floor(p) + 0.5, x0 + 0.5), x1 - 0.5);
        set_rgba(cr, kv_rgb_hex(C_FRAME));
        cairo_move_to(cr, pp, y1);
        cairo_line_to(cr, pp, y1 + (t->major ? fm.ticklen : fm.minorlen));
        cairo_stroke(cr);
        if (!t->labelled)
            continue;
        char buf[256];
        tick_text(cr, fig, &ax->x, i, buf, sizeof buf);
        txt_box_t b;
        txt_measure(cr, buf, fm.tick, 0, &b);
        double ly0 = y1 + fm.ticklen + fm.pad;
        int k = ax->x.n_lab < KV_TICKS_MAX ? ax->x.n_lab++ : KV_TICKS_MAX - 1;
        if (ax->x.rot) {
            double axp = p + 0.35 * b.h;
            txt_draw(cr, buf, fm.tick, 0, axp, ly0, 1, 0.5, -M_PI / 4, kv_rgb_hex(C_TICKTEXT));
            double rw, rh;
            txt_rotated_size(&b, M_PI / 4, &rw, &rh);
            xlab_bottom = fmax(xlab_bottom, ly0 + rh);
            /* box corners (-w..0) x (-h/2..h/2) turned by -45 degrees about the anchor */
            double c = M_SQRT1_2, bx0 = INFINITY, by0 = INFINITY, bx1 = -INFINITY, by1 = -INFINITY;
            for (int q = 0; q < 4; q++) {
                double u = q & 1 ? 0 : -b.w, v = q & 2 ? b.h / 2 : -b.h / 2;
                double X = axp + c * u + c * v, Y = ly0 - c * u + c * v;
                bx0 = fmin(bx0, X);
                bx1 = fmax(bx1, X);
                by0 = fmin(by0, Y);
                by1 = fmax(by1, Y);
            }
            ax->x.lab_lo[k] = axp - b.h / c / 2;
            ax->x.lab_hi[k] = axp + b.h / c / 2;
            double box[4] = {bx0, by0, bx1, by1};
            memcpy(ax->x.lab_box[k], box, sizeof box);
        } else {
            txt_draw(cr, buf, fm.tick, 0, p, ly0, 0.5, 0, 0, kv_rgb_hex(C_TICKTEXT));
            xlab_bottom = fmax(xlab_bottom, ly0 + b.h);
            ax->x.lab_lo[k] = p - b.w / 2;
            ax->x.lab_hi[k] = p + b.w / 2;
            double box[4] = {p - b.w / 2, ly0, p + b.w / 2, ly0 + b.h};
            memcpy(ax->x.lab_box[k], box, sizeof box);
        }
    }
    double ylab_left = x0 - fm.ticklen - fm.pad;
    for (int i = 0; i < ax->y.ticks.n; i++) {
        const kv_tick_t *t = &ax->y.ticks.t[i];
        double p = map_y(ax, t->value);
        if (!isfinite(p) || p < y0 - 0.5 || p > y1 + 0.5)
            continue;
        double pp = fmin(fmax(floor(p) + 0.5, y0 + 0.5), y1 - 0.5);
        set_rgba(cr, kv_rgb_hex(C_FRAME));
        cairo_move_to(cr, x0, pp);
        cairo_line_to(cr, x0 - (t->major ? fm.ticklen : fm.minorlen), pp);
        cairo_stroke(cr);
        if (!t->labelled)
            continue;
        char buf[256];
        tick_text(cr, fig, &ax->y, i, buf, sizeof buf);
        txt_box_t b;
        txt_measure(cr, buf, fm.tick, 0, &b);
        txt_draw(cr, buf, fm.tick, 0, x0 - fm.ticklen - fm.pad, p, 1, 0.5, 0, kv_rgb_hex(C_TICKTEXT));
        ylab_left = fmin(ylab_left, x0 - fm.ticklen - fm.pad - b.w);
        int k = ax->y.n_lab < KV_TICKS_MAX ? ax->y.n_lab++ : KV_TICKS_MAX - 1;
        ax->y.lab_lo[k] = p - b.h / 2;
        ax->y.lab_hi[k] = p + b.h / 2;
        double box[4] = {x0 - fm.ticklen - fm.pad - b.w, p - b.h / 2, x0 - fm.ticklen - fm.pad, p + b.h / 2};
        memcpy(ax->y.lab_box[k], box, sizeof box);
    }
    /* axis labels and title */
    if (ax->x.label)
        txt_draw_fit(cr, ax->x.label, fm.label, 0, ax->cx1 - ax->cx0 - 8 * fm.s, 0.5 * (x0 + x1),
                     xlab_bottom + 6 * fm.s, 0.5, 0, 0, kv_rgb_hex(C_TEXT));
    if (ax->y.label) {
        /* the label may run past the plot's ends, up to the title above and the cell edge below */
        double top = ax->title ? y0 - 6 * fm.s : ax->cy0, mid = 0.5 * (y0 + y1);
        double room = 2 * fmin(mid - top, ax->cy1 - mid);
        txt_draw_fit(cr, ax->y.label, fm.label, 0, fmax(room, y1 - y0), ylab_left - 8 * fm.s, 0.5 * (y0 + y1), 0.5, 1,
                     -M_PI / 2, kv_rgb_hex(C_TEXT));
    }
    if (ax->title)
        txt_draw_fit(cr, ax->title, fm.title, 0, ax->cx1 - ax->cx0 - 8 * fm.s, 0.5 * (x0 + x1), y0 - 8 * fm.s, 0.5, 1,
                     0, kv_rgb_hex(C_TEXT));
    /* colour bar */
    if (ly->cbar)
        draw_colorbar(cr, &fm, ly->heat, &ly->cb_ticks, ly->heat->hs.label, x1, y0, y1);
    /* legend */
    if (ly->lg_mode == 1) {
        draw_legend(cr, &fm, &ly->L, &ly->lg, ly->lgx, ly->lgy, 1);
    } else if (ly->lg_mode == 2) {
        double lx = x1 + 14 * fm.s + (ly->cbar ? ly->cb_w : 0);
        draw_legend(cr, &fm, &ly->L, &ly->lg, round(lx), round(y0), 0);
    } else if (ly->lg_mode == 3) {
        double lx = 0.5 * (x0 + x1) - ly->lg.w / 2;
        double ly0 = ax->cy1 - ly->lg.h - 2 * fm.s;
        draw_legend(cr, &fm, &ly->L, &ly->lg, round(lx), round(ly0), 0);
    }
}

/* ================================================================ entry points */

int kv_fig_render(kv_fig_t *fig, cairo_t *cr)
{
    if (!fig || !cr)
        return kv_error(KV_EINVAL, "kv_fig_render: NULL argument");
    if (cairo_status(cr) != CAIRO_STATUS_SUCCESS)
        return kv_error(KV_EINVAL, "kv_fig_render: cairo context in error: %s",
                        cairo_status_to_string(cairo_status(cr)));
    int rc = KV_OK;
    lay_t *ly = kv_calloc((size_t)fig->n_axes, sizeof *ly, "figure layout");
    figlay_t fl;
    memset(&fl, 0, sizeof fl);
    if (!ly)
        return KV_ENOMEM;
    cairo_save(cr);
    prepare_heat(fig);
    compute_limits(fig);
    /* legends */
    if (fig->has_legend)
        for (int a = 0; a < fig->n_axes; a++)
            entries_add_axes(&fl.L, fig->axes[a]);
    for (int a = 0; a < fig->n_axes; a++) {
        kv_axes_t *ax = fig->axes[a];
        if (fig->has_legend)
            continue;
        entries_add_axes(&ly[a].L, ax);
        if (!ly[a].L.n || ax->legend == KV_LEGEND_NONE)
            ly[a].lg_mode = 0;
        else if (ax->legend == KV_LEGEND_RIGHT)
            ly[a].lg_mode = 2;
        else if (ax->legend == KV_LEGEND_BELOW)
            ly[a].lg_mode = 3;
        else
            ly[a].lg_mode = 1;
    }
    layout(cr, fig, &fl, ly);
    /* every round moves at least one legend outside, so this ends; the last call places the rest */
    for (int it = 0; it <= fig->n_axes && place_legends(cr, fig, ly); it++)
        layout(cr, fig, &fl, ly);

    /* paint */
    cairo_set_source_rgb(cr, 1, 1, 1);
    cairo_paint(cr);
    const fm_t fm = fonts(fig);
    for (int a = 0; a < fig->n_axes; a++)
        if (visible(fig->axes[a]))
            draw_axes(cr, fig, fig->axes[a], &ly[a]);
    if (fl.cb_item)
        draw_colorbar(cr, &fm, fl.cb_item, &fl.cb_ticks, fig->cbar_label, fl.cbx, fl.cby0, fl.cby1);
    if (fig->has_legend && fl.L.n)
        draw_legend(cr, &fm, &fl.L, &fl.lg, fl.lgx, fl.lgy, 0);
    if (fig->title)
        txt_draw_fit(cr, fig->title, fm.suptitle, 1, fig->w - 2 * OUTER * fm.s, 0.5 * fig->w, OUTER * fm.s * 0.7, 0.5,
                     0, 0, kv_rgb_hex(C_TEXT));
    cairo_restore(cr);
    if (cairo_status(cr) != CAIRO_STATUS_SUCCESS)
        rc = kv_error(KV_EINTERNAL, "rendering failed: %s", cairo_status_to_string(cairo_status(cr)));
    for (int a = 0; a < fig->n_axes; a++)
        kv_free(ly[a].L.e);
    kv_free(fl.L.e);
    kv_free(ly);
    return rc;
}

int kv_fig_render_image(kv_fig_t *fig, cairo_surface_t **out)
{
    if (!fig || !out)
        return kv_error(KV_EINVAL, "kv_fig_render_image: NULL argument");
    *out = NULL;
    cairo_surface_t *s = cairo_image_surface_create(CAIRO_FORMAT_ARGB32, fig->w, fig->h);
    if (cairo_surface_status(s) != CAIRO_STATUS_SUCCESS) {
        cairo_surface_destroy(s);
        return kv_error(KV_ENOMEM, "cannot create a %dx%d image", fig->w, fig->h);
    }
    cairo_t *cr = cairo_create(s);
    int rc = kv_fig_render(fig, cr);
    cairo_destroy(cr);
    if (rc != KV_OK) {
        cairo_surface_destroy(s);
        return rc;
    }
    cairo_surface_flush(s);
    *out = s;
    return KV_OK;
}
