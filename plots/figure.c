/*
 * figure.c: building the retained figure (figures, axes, series, heat maps) and saving it.
 *
 * Every kv_plot_* call copies its data into an item of the axes; nothing is drawn until
 * kv_fig_render / kv_fig_save (render.c). Saving draws the figure once per output surface: PNG
 * through an ARGB32 image, SVG and PDF through cairo's vector surfaces at 0.75 pt per pixel (so
 * they open at the PNG's size). kv_fig_write draws to any stream; kv_fig_save writes a file through
 * the output module (sim/common/kv_output.h: a unique temporary file, renamed when complete, removed
 * on failure or a signal); messages name the file and the reason.
 */
#include "plots/plot_internal.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_output.h"

#include <cairo-pdf.h>
#include <cairo-svg.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

/* ---------------------------------------------------------------- axes */

static void axis_init(axis_t *a)
{
    memset(a, 0, sizeof *a);
    a->lo = a->hi = NAN;
    a->grid = 1;
}

static void axis_clear(axis_t *a)
{
    kv_free(a->label);
    for (int i = 0; i < a->ncat; i++)
        kv_free(a->cats[i]);
    kv_free(a->cats);
}

static void item_clear(item_t *it)
{
    kv_free(it->label);
    kv_free(it->x);
    kv_free(it->y);
    kv_free(it->y2);
    kv_free(it->z);
    kv_free(it->text);
    kv_free((char *)it->hs.label);
    kv_free((char *)it->hs.annotate);
}

static kv_axes_t *axes_new(kv_fig_t *fig)
{
    kv_axes_t *ax = kv_calloc(1, sizeof *ax, "axes");
    if (!ax)
        return NULL;
    ax->fig = fig;
    axis_init(&ax->x);
    axis_init(&ax->y);
    ax->legend = KV_LEGEND_AUTO;
    return ax;
}

static void axes_free(kv_axes_t *ax)
{
    if (!ax)
        return;
    for (int i = 0; i < ax->n_items; i++)
        item_clear(&ax->items[i]);
    kv_free(ax->items);
    axis_clear(&ax->x);
    axis_clear(&ax->y);
    kv_free(ax->title);
    kv_free(ax);
}

static int push_axes(kv_fig_t *fig, kv_axes_t *ax)
{
    if (fig->n_axes == fig->cap_axes) {
        int cap = fig->cap_axes ? 2 * fig->cap_axes : 8;
        kv_axes_t **p = kv_realloc(fig->axes, (size_t)cap * sizeof *p, "figure axes");
        if (!p)
            return KV_ENOMEM;
        fig->axes = p;
        fig->cap_axes = cap;
    }
    fig->axes[fig->n_axes++] = ax;
    return KV_OK;
}

/* ---------------------------------------------------------------- figure */

int kv_fig_create(int width_px, int height_px, kv_fig_t **out)
{
    if (!out)
        return kv_error(KV_EINVAL, "kv_fig_create: NULL output");
    *out = NULL;
    if (width_px < 16 || height_px < 16 || width_px > 16384 || height_px > 16384)
        return kv_error(KV_EINVAL, "figure size %dx%d px: each side must be 16..16384", width_px, height_px);
    kv_fig_t *fig = kv_calloc(1, sizeof *fig, "figure");
    if (!fig)
        return KV_ENOMEM;
    fig->w = width_px;
    fig->h = height_px;
    fig->font_scale = 1.0;
    int rc = kv_fig_grid(fig, 1, 1);
    if (rc != KV_OK) {
        kv_fig_free(fig);
        return rc;
    }
    *out = fig;
    return KV_OK;
}

void kv_fig_free(kv_fig_t *fig)
{
    if (!fig)
        return;
    for (int i = 0; i < fig->n_axes; i++)
        axes_free(fig->axes[i]);
    kv_free(fig->axes);
    kv_free(fig->title);
    kv_free(fig->cbar_label);
    kv_free(fig);
}

/* Replace *dst by a copy of s (NULL or "" clears it). */
static int set_str(char **dst, const char *s)
{
    char *c = NULL;
    if (s && *s) {
        c = kv_strdup(s);
        if (!c)
            return kv_error(KV_ENOMEM, "out of memory copying \"%.40s\"", s);
    }
    kv_free(*dst);
    *dst = c;
    return KV_OK;
}

int kv_fig_set_title(kv_fig_t *fig, const char *title)
{
    if (!fig)
        return kv_error(KV_EINVAL, "kv_fig_set_title: NULL figure");
    return set_str(&fig->title, title);
}

int kv_fig_set_font_scale(kv_fig_t *fig, double scale)
{
    if (!fig || !(scale >= 0.25 && scale <= 8))
        return kv_error(KV_EINVAL, "font scale %g: must be 0.25..8", scale);
    fig->font_scale = scale;
    return KV_OK;
}

int kv_fig_grid(kv_fig_t *fig, int rows, int cols)
{
    if (!fig)
        return kv_error(KV_EINVAL, "kv_fig_grid: NULL figure");
    if (rows < 1 || cols < 1 || rows * cols > 256)
        return kv_error(KV_EINVAL, "grid %dx%d: need 1..256 panels", rows, cols);
    /* build the new axes list first (new grid, then the explicit axes) so a failure changes nothing */
    int n_old_grid = fig->rows * fig->cols;
    int n_explicit = fig->n_axes - n_old_grid;
    int cap = rows * cols + n_explicit + 8;
    kv_axes_t **all = kv_calloc((size_t)cap, sizeof *all, "figure axes");
    if (!all)
        return KV_ENOMEM;
    for (int i = 0; i < rows * cols; i++) {
        all[i] = axes_new(fig);
        if (!all[i]) {
            for (int j = 0; j < i; j++)
                axes_free(all[j]);
            kv_free(all);
            return KV_ENOMEM;
        }
        all[i]->row = i / cols;
        all[i]->col = i % cols;
    }
    for (int i = 0; i < n_explicit; i++)
        all[rows * cols + i] = fig->axes[n_old_grid + i];
    for (int i = 0; i < n_old_grid; i++)
        axes_free(fig->axes[i]);
    kv_free(fig->axes);
    fig->axes = all;
    fig->n_axes = rows * cols + n_explicit;
    fig->cap_axes = cap;
    fig->rows = rows;
    fig->cols = cols;
    return KV_OK;
}

kv_axes_t *kv_fig_axes(const kv_fig_t *fig, int row, int col)
{
    if (!fig || row < 0 || col < 0 || row >= fig->rows || col >= fig->cols)
        return NULL;
    return fig->axes[row * fig->cols + col];
}

int kv_fig_add_axes(kv_fig_t *fig, double x, double y, double w, double h, kv_axes_t **out)
{
    if (!fig || !out)
        return kv_error(KV_EINVAL, "kv_fig_add_axes: NULL argument");
    if (!(x >= 0 && y >= 0 && w > 0 && h > 0 && x + w <= 1 + 1e-9 && y + h <= 1 + 1e-9))
        return kv_error(KV_EINVAL, "axes rectangle (%g, %g, %g, %g) must lie inside [0, 1]^2", x, y, w, h);
    kv_axes_t *ax = axes_new(fig);
    if (!ax)
        return KV_ENOMEM;
    ax->explicit_rect = 1;
    ax->fx = x;
    ax->fy = y;
    ax->fw = w;
    ax->fh = h;
    int rc = push_axes(fig, ax);
    if (rc != KV_OK) {
        axes_free(ax);
        return rc;
    }
    *out = ax;
    return KV_OK;
}

int kv_fig_share(kv_fig_t *fig, int share_x, int share_y)
{
    if (!fig)
        return kv_error(KV_EINVAL, "kv_fig_share: NULL figure");
    fig->share_x = share_x != 0;
    fig->share_y = share_y != 0;
    return KV_OK;
}

int kv_fig_legend(kv_fig_t *fig, kv_legend_pos_t pos)
{
    if (!fig)
        return kv_error(KV_EINVAL, "kv_fig_legend: NULL figure");
    if (pos != KV_LEGEND_NONE && pos != KV_LEGEND_RIGHT && pos != KV_LEGEND_BELOW && pos != KV_LEGEND_AUTO)
        return kv_error(KV_EINVAL, "figure legend: position must be right, below, auto or none");
    fig->has_legend = pos != KV_LEGEND_NONE;
    fig->legend = pos == KV_LEGEND_AUTO ? KV_LEGEND_RIGHT : pos;
    return KV_OK;
}

int kv_fig_colorbar(kv_fig_t *fig, const kv_heat_style_t *st, const char *label)
{
    if (!fig)
        return kv_error(KV_EINVAL, "kv_fig_colorbar: NULL figure");
    kv_heat_style_t hs = {0};
    if (st)
        hs = *st;
    if ((int)hs.cmap < 0 || hs.cmap >= KV_CMAP_COUNT)
        return kv_error(KV_EINVAL, "colour bar: unknown colour map %d", (int)hs.cmap);
    if (hs.log && (hs.vmin < 0 || hs.vmax < 0))
        return kv_error(KV_EINVAL, "colour bar: log scale needs positive limits, got [%g, %g]", hs.vmin, hs.vmax);
    int rc = set_str(&fig->cbar_label, label ? label : (st ? st->label : NULL));
    if (rc != KV_OK)
        return rc;
    hs.label = NULL;
    fig->cbar = hs;
    fig->has_cbar = 1;
    return KV_OK;
}

/* ---------------------------------------------------------------- axes setters */

#define CHECK_AX(ax, fn)                                                                                               \
    do {                                                                                                               \
        if (!(ax))                                                                                                     \
            return kv_error(KV_EINVAL, "%s: NULL axes", fn);                                                           \
    } while (0)

int kv_axes_set_title(kv_axes_t *ax, const char *title)
{
    CHECK_AX(ax, "kv_axes_set_title");
    return set_str(&ax->title, title);
}

int kv_axes_set_xlabel(kv_axes_t *ax, const char *label)
{
    CHECK_AX(ax, "kv_axes_set_xlabel");
    return set_str(&ax->x.label, label);
}

int kv_axes_set_ylabel(kv_axes_t *ax, const char *label)
{
    CHECK_AX(ax, "kv_axes_set_ylabel");
    return set_str(&ax->y.label, label);
}

static int set_scale(axis_t *a, kv_scale_t s, const char *fn)
{
    if (s != KV_SCALE_LINEAR && s != KV_SCALE_LOG && s != KV_SCALE_LOG2)
        return kv_error(KV_EINVAL, "%s: unknown scale %d", fn, (int)s);
    if (s != KV_SCALE_LINEAR && a->ncat)
        return kv_error(KV_EINVAL, "%s: a categorical axis cannot be logarithmic", fn);
    a->scale = s;
    return KV_OK;
}

int kv_axes_set_xscale(kv_axes_t *ax, kv_scale_t scale)
{
    CHECK_AX(ax, "kv_axes_set_xscale");
    return set_scale(&ax->x, scale, "kv_axes_set_xscale");
}

int kv_axes_set_yscale(kv_axes_t *ax, kv_scale_t scale)
{
    CHECK_AX(ax, "kv_axes_set_yscale");
    return set_scale(&ax->y, scale, "kv_axes_set_yscale");
}

static int set_lim(axis_t *a, double lo, double hi, const char *fn)
{
    if (isinf(lo) || isinf(hi))
        return kv_error(KV_EINVAL, "%s: limits must be finite or NAN (automatic)", fn);
    if (!isnan(lo) && !isnan(hi) && !(lo < hi))
        return kv_error(KV_EINVAL, "%s: lower limit %g must be below upper limit %g", fn, lo, hi);
    a->lo = lo;
    a->hi = hi;
    return KV_OK;
}

int kv_axes_set_xlim(kv_axes_t *ax, double lo, double hi)
{
    CHECK_AX(ax, "kv_axes_set_xlim");
    return set_lim(&ax->x, lo, hi, "kv_axes_set_xlim");
}

int kv_axes_set_ylim(kv_axes_t *ax, double lo, double hi)
{
    CHECK_AX(ax, "kv_axes_set_ylim");
    return set_lim(&ax->y, lo, hi, "kv_axes_set_ylim");
}

int kv_axes_set_yinvert(kv_axes_t *ax, int invert)
{
    CHECK_AX(ax, "kv_axes_set_yinvert");
    ax->y.invert = invert != 0;
    return KV_OK;
}

static int set_cats(axis_t *a, int n, const char *const *labels, const char *fn)
{
    if (n < 1 || !labels)
        return kv_error(KV_EINVAL, "%s: need n >= 1 labels", fn);
    char **c = kv_calloc((size_t)n, sizeof *c, "category labels");
    if (!c)
        return KV_ENOMEM;
    for (int i = 0; i < n; i++) {
        c[i] = kv_strdup(labels[i] ? labels[i] : "");
        if (!c[i]) {
            for (int j = 0; j < i; j++)
                kv_free(c[j]);
            kv_free(c);
            return kv_error(KV_ENOMEM, "%s: out of memory", fn);
        }
    }
    for (int i = 0; i < a->ncat; i++)
        kv_free(a->cats[i]);
    kv_free(a->cats);
    a->cats = c;
    a->ncat = n;
    a->scale = KV_SCALE_LINEAR;
    return KV_OK;
}

int kv_axes_set_xcategories(kv_axes_t *ax, int n, const char *const *labels)
{
    CHECK_AX(ax, "kv_axes_set_xcategories");
    return set_cats(&ax->x, n, labels, "kv_axes_set_xcategories");
}

int kv_axes_set_ycategories(kv_axes_t *ax, int n, const char *const *labels)
{
    CHECK_AX(ax, "kv_axes_set_ycategories");
    return set_cats(&ax->y, n, labels, "kv_axes_set_ycategories");
}

int kv_axes_set_grid(kv_axes_t *ax, int x_on, int y_on)
{
    CHECK_AX(ax, "kv_axes_set_grid");
    ax->x.grid = x_on != 0;
    ax->y.grid = y_on != 0;
    return KV_OK;
}

int kv_axes_set_equal_aspect(kv_axes_t *ax, int on)
{
    CHECK_AX(ax, "kv_axes_set_equal_aspect");
    ax->equal = on != 0;
    return KV_OK;
}

int kv_axes_set_legend(kv_axes_t *ax, kv_legend_pos_t pos)
{
    CHECK_AX(ax, "kv_axes_set_legend");
    if ((int)pos < KV_LEGEND_AUTO || pos > KV_LEGEND_LOWER_RIGHT)
        return kv_error(KV_EINVAL, "kv_axes_set_legend: unknown position %d", (int)pos);
    ax->legend = pos;
    return KV_OK;
}

/* ---------------------------------------------------------------- series */

static item_t *new_item(kv_axes_t *ax, item_kind_t kind)
{
    if (ax->n_items == ax->cap_items) {
        int cap = ax->cap_items ? 2 * ax->cap_items : 8;
        item_t *p = kv_realloc(ax->items, (size_t)cap * sizeof *p, "axes series");
        if (!p)
            return NULL;
        ax->items = p;
        ax->cap_items = cap;
    }
    item_t *it = &ax->items[ax->n_items];
    memset(it, 0, sizeof *it);
    it->kind = kind;
    return it;
}

static double *copy_doubles(const double *src, int n)
{
    double *d = kv_malloc((size_t)n * sizeof *d, "series data");
    if (d)
        memcpy(d, src, (size_t)n * sizeof *d);
    return d;
}

/* Fill the defaults of a style; automatic colours take the axes' next palette slot. Past the 8
 * palette colours, automatic lines change dash pattern so that 16 or 24 series stay distinct. */
static int resolve_style(kv_axes_t *ax, item_t *it, const kv_style_t *in, int auto_color)
{
    kv_style_t st = {0};
    if (in)
        st = *in;
    if ((int)st.dash < 0 || st.dash > KV_DASH_NONE || (int)st.marker < 0 || st.marker > KV_MARKER_AUTO)
        return kv_error(KV_EINVAL, "style: unknown dash %d or marker %d", (int)st.dash, (int)st.marker);
    if (!(st.width >= 0) || !(st.marker_size >= 0) || st.width > 100 || st.marker_size > 200)
        return kv_error(KV_EINVAL, "style: width %g / marker size %g out of range", st.width, st.marker_size);
    int slot = -1;
    if (st.color.a <= 0) {
        if (auto_color) {
            slot = ax->next_color++;
            st.color = kv_palette(slot);
            if (it->kind == IT_LINE && st.dash == KV_DASH_SOLID && slot >= KV_PALETTE_SIZE)
                st.dash = (kv_dash_t)(KV_DASH_DASHED + (slot / KV_PALETTE_SIZE - 1) % 3);
        } else {
            st.color = kv_rgb_hex(0x555555);
        }
    }
    if (st.marker == KV_MARKER_AUTO) {
        int s = slot >= 0 ? slot : ax->n_items;
        st.marker = (kv_marker_t)(KV_MARKER_CIRCLE + s % 6);
    }
    if (st.width == 0)
        st.width = auto_color ? 2.0 : 1.5;
    if (st.marker_size == 0)
        st.marker_size = 8.0;
    if (st.label && *st.label) {
        it->label = kv_strdup(st.label);
        if (!it->label)
            return KV_ENOMEM;
    }
    st.label = it->label;
    it->st = st;
    return KV_OK;
}

static int add_xy(kv_axes_t *ax, item_kind_t kind, int n, const double *x, const double *y, const kv_style_t *st,
                  const char *fn)
{
    CHECK_AX(ax, fn);
    if (n < 1 || !y)
        return kv_error(KV_EINVAL, "%s: need n >= 1 points and y (got n=%d)", fn, n);
    item_t *it = new_item(ax, kind);
    if (!it)
        return KV_ENOMEM;
    it->n = n;
    it->y = copy_doubles(y, n);
    it->x = kv_malloc((size_t)n * sizeof(double), "series x");
    int rc = KV_ENOMEM;
    if (!it->y || !it->x)
        goto fail;
    for (int i = 0; i < n; i++)
        it->x[i] = x ? x[i] : (double)i;
    rc = resolve_style(ax, it, st, 1);
    if (rc != KV_OK)
        goto fail;
    if (kind == IT_SCATTER && it->st.marker == KV_MARKER_NONE)
        it->st.marker = KV_MARKER_CIRCLE;
    ax->n_items++;
    return KV_OK;
fail:
    item_clear(it);
    return rc;
}

int kv_plot_line(kv_axes_t *ax, int n, const double *x, const double *y, const kv_style_t *st)
{
    return add_xy(ax, IT_LINE, n, x, y, st, "kv_plot_line");
}

int kv_plot_scatter(kv_axes_t *ax, int n, const double *x, const double *y, const kv_style_t *st)
{
    return add_xy(ax, IT_SCATTER, n, x, y, st, "kv_plot_scatter");
}

int kv_plot_bars(kv_axes_t *ax, int n, const double *values, const kv_style_t *st)
{
    int rc = add_xy(ax, IT_BARS, n, NULL, values, st, "kv_plot_bars");
    if (rc == KV_OK)
        ax->items[ax->n_items - 1].bar_slot = ax->n_bars++;
    return rc;
}

int kv_plot_band(kv_axes_t *ax, int n, const double *x, const double *lo, const double *hi, const kv_style_t *st)
{
    CHECK_AX(ax, "kv_plot_band");
    if (!hi)
        return kv_error(KV_EINVAL, "kv_plot_band: NULL upper edge");
    int rc = add_xy(ax, IT_BAND, n, x, lo, st, "kv_plot_band");
    if (rc != KV_OK)
        return rc;
    item_t *it = &ax->items[ax->n_items - 1];
    it->y2 = copy_doubles(hi, n);
    if (!it->y2) {
        item_clear(it);
        ax->n_items--;
        return KV_ENOMEM;
    }
    if (!(st && st->color.a > 0 && st->color.a < 1))
        it->st.color.a *= 0.25;
    return KV_OK;
}

static int add_ref(kv_axes_t *ax, item_kind_t kind, double v, const kv_style_t *st, const char *fn)
{
    CHECK_AX(ax, fn);
    if (!isfinite(v))
        return kv_error(KV_EINVAL, "%s: value %g is not finite", fn, v);
    item_t *it = new_item(ax, kind);
    if (!it)
        return KV_ENOMEM;
    it->n = 1;
    it->x = kv_malloc(sizeof(double), "reference line");
    it->y = kv_malloc(sizeof(double), "reference line");
    int rc = KV_ENOMEM;
    if (!it->x || !it->y)
        goto fail;
    it->x[0] = it->y[0] = v;
    kv_style_t s = {0};
    if (st)
        s = *st;
    if (!st)
        s.dash = KV_DASH_DASHED;
    rc = resolve_style(ax, it, &s, 0);
    if (rc != KV_OK)
        goto fail;
    ax->n_items++;
    return KV_OK;
fail:
    item_clear(it);
    return rc;
}

int kv_plot_hline(kv_axes_t *ax, double y, const kv_style_t *st)
{
    return add_ref(ax, IT_HLINE, y, st, "kv_plot_hline");
}

int kv_plot_vline(kv_axes_t *ax, double x, const kv_style_t *st)
{
    return add_ref(ax, IT_VLINE, x, st, "kv_plot_vline");
}

int kv_plot_identity(kv_axes_t *ax, const kv_style_t *st)
{
    return add_ref(ax, IT_IDENTITY, 0, st, "kv_plot_identity");
}

int kv_plot_text(kv_axes_t *ax, double x, double y, const char *text, double anchor_x, double anchor_y, double size_px,
                 kv_rgba_t color)
{
    CHECK_AX(ax, "kv_plot_text");
    if (!text || !isfinite(x) || !isfinite(y) || !(size_px >= 0 && size_px < 500))
        return kv_error(KV_EINVAL, "kv_plot_text: need text, finite position and size 0..500 px");
    item_t *it = new_item(ax, IT_TEXT);
    if (!it)
        return KV_ENOMEM;
    it->n = 1;
    it->x = copy_doubles(&x, 1);
    it->y = copy_doubles(&y, 1);
    it->text = kv_strdup(text);
    if (!it->x || !it->y || !it->text) {
        item_clear(it);
        return KV_ENOMEM;
    }
    it->anchor_x = anchor_x;
    it->anchor_y = anchor_y;
    it->size = size_px;
    it->tcolor = color.a > 0 ? color : kv_rgb_hex(0x222222);
    ax->n_items++;
    return KV_OK;
}

/* A printf format that consumes exactly one double: one %[flags][width][.prec](f|e|g|F|E|G), any
 * number of "%%", nothing else (so a user's format can never read a missing argument). */
static int one_double_format(const char *f)
{
    int conv = 0;
    for (const char *p = f; *p; p++) {
        if (*p != '%')
            continue;
        p++;
        if (*p == '%')
            continue;
        while (*p && strchr("-+ #0", *p))
            p++;
        for (int i = 0; i < 3 && *p >= '0' && *p <= '9'; i++)
            p++;
        if (*p == '.') {
            p++;
            for (int i = 0; i < 2 && *p >= '0' && *p <= '9'; i++)
                p++;
        }
        if (!*p || !strchr("feEgGF", *p))
            return 0;
        conv++;
    }
    return conv == 1;
}

int kv_plot_heatmap(kv_axes_t *ax, int rows, int cols, const float *z, const kv_heat_style_t *st)
{
    CHECK_AX(ax, "kv_plot_heatmap");
    if (rows < 1 || cols < 1 || !z || (long long)rows * cols > 64LL * 1024 * 1024)
        return kv_error(KV_EINVAL, "kv_plot_heatmap: need 1..2^26 cells and data (got %dx%d)", rows, cols);
    kv_heat_style_t hs = {0};
    if (st)
        hs = *st;
    if ((int)hs.cmap < 0 || hs.cmap >= KV_CMAP_COUNT)
        return kv_error(KV_EINVAL, "kv_plot_heatmap: unknown colour map %d", (int)hs.cmap);
    if (!isfinite(hs.vmin) || !isfinite(hs.vmax) || (hs.vmin != 0 || hs.vmax != 0 ? !(hs.vmin < hs.vmax) : 0))
        return kv_error(KV_EINVAL, "kv_plot_heatmap: colour limits [%g, %g] must be finite with vmin < vmax", hs.vmin,
                        hs.vmax);
    if (hs.log && (hs.vmin < 0 || (hs.vmin == 0 && hs.vmax != 0)))
        return kv_error(KV_EINVAL, "kv_plot_heatmap: log colour scale needs vmin > 0 (got %g)", hs.vmin);
    if (!isfinite(hs.x0) || !isfinite(hs.x1) || !isfinite(hs.y0) || !isfinite(hs.y1) ||
        ((hs.x0 != 0 || hs.x1 != 0) && !(hs.x0 < hs.x1)) || ((hs.y0 != 0 || hs.y1 != 0) && !(hs.y0 < hs.y1)))
        return kv_error(KV_EINVAL, "kv_plot_heatmap: extent x [%g, %g], y [%g, %g] must be finite and increasing",
                        hs.x0, hs.x1, hs.y0, hs.y1);
    if (hs.annotate && !one_double_format(hs.annotate))
        return kv_error(KV_EINVAL, "kv_plot_heatmap: annotation format \"%s\" must hold exactly one %%f, %%e or %%g",
                        hs.annotate);
    item_t *it = new_item(ax, IT_HEAT);
    if (!it)
        return KV_ENOMEM;
    it->rows = rows;
    it->cols = cols;
    size_t cells = (size_t)rows * (size_t)cols;
    it->z = kv_malloc(cells * sizeof(float), "heat map cells");
    if (!it->z)
        return KV_ENOMEM;
    memcpy(it->z, z, cells * sizeof(float));
    const char *label = hs.label, *annotate = hs.annotate;
    hs.label = label ? kv_strdup(label) : NULL;
    hs.annotate = annotate ? kv_strdup(annotate) : NULL;
    it->hs = hs;
    if ((label && !hs.label) || (annotate && !hs.annotate)) {
        item_clear(it);
        return KV_ENOMEM;
    }
    it->st.color = kv_rgb_hex(0x000000);
    ax->n_items++;
    ax->x.grid = ax->y.grid = 0;
    if (!hs.origin_lower)
        ax->y.invert = 1;
    return KV_OK;
}

/* ---------------------------------------------------------------- saving */

typedef struct {
    FILE *f;
    int failed;
    int err;
} sink_t;

static cairo_status_t sink_write(void *closure, const unsigned char *data, unsigned int length)
{
    sink_t *s = closure;
    if (s->failed)
        return CAIRO_STATUS_WRITE_ERROR;
    if (length && fwrite(data, 1, length, s->f) != length) {
        s->failed = 1;
        s->err = errno ? errno : EIO;
        return CAIRO_STATUS_WRITE_ERROR;
    }
    return CAIRO_STATUS_SUCCESS;
}

static const char *ext_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    const char *dot = strrchr(path, '.');
    if (!dot || (slash && dot < slash))
        return "";
    return dot + 1;
}

/* 0 png, 1 svg, 2 pdf, -1 unknown (case-insensitive). */
static int format_kind(const char *fmt)
{
    return !strcasecmp(fmt, "png") ? 0 : !strcasecmp(fmt, "svg") ? 1 : !strcasecmp(fmt, "pdf") ? 2 : -1;
}

int kv_fig_write(kv_fig_t *fig, const char *format, FILE *f, const char *name)
{
    if (!fig || !format || !f)
        return kv_error(KV_EINVAL, "kv_fig_write: NULL figure, format or stream");
    if (!name)
        name = "figure";
    const int kind = format_kind(format);
    if (kind < 0)
        return kv_error(KV_EINVAL, "%s: unknown figure format \"%s\" (png, svg or pdf)", name, format);
    int rc = KV_OK;
    cairo_surface_t *surf = NULL;
    cairo_t *cr = NULL;
    sink_t sink = {f, 0, 0};
    if (kind == 0) {
        rc = kv_fig_render_image(fig, &surf);
        if (rc != KV_OK)
            goto done;
        cairo_status_t st = cairo_surface_write_to_png_stream(surf, sink_write, &sink);
        if (st != CAIRO_STATUS_SUCCESS) {
            rc = kv_error(KV_EIO, "%s: writing PNG failed: %s", name,
                          sink.failed ? strerror(sink.err) : cairo_status_to_string(st));
            goto done;
        }
    } else {
        double w = fig->w * 0.75, h = fig->h * 0.75;
        surf = kind == 1 ? cairo_svg_surface_create_for_stream(sink_write, &sink, w, h)
                         : cairo_pdf_surface_create_for_stream(sink_write, &sink, w, h);
        if (cairo_surface_status(surf) != CAIRO_STATUS_SUCCESS) {
            rc = kv_error(KV_EIO, "%s: cannot start %s output: %s", name, kind == 1 ? "SVG" : "PDF",
                          cairo_status_to_string(cairo_surface_status(surf)));
            goto done;
        }
        if (kind == 2)
            cairo_pdf_surface_set_metadata(surf, CAIRO_PDF_METADATA_CREATOR, "kvsim plots");
        cr = cairo_create(surf);
        cairo_scale(cr, 0.75, 0.75);
        rc = kv_fig_render(fig, cr);
        if (rc != KV_OK) {
            kv_error_context(rc, "%s", name);
            goto done;
        }
        cairo_destroy(cr);
        cr = NULL;
        cairo_surface_finish(surf);
        cairo_status_t st = cairo_surface_status(surf);
        if (st != CAIRO_STATUS_SUCCESS || sink.failed) {
            rc = kv_error(KV_EIO, "%s: writing %s failed: %s", name, kind == 1 ? "SVG" : "PDF",
                          sink.failed ? strerror(sink.err) : cairo_status_to_string(st));
            goto done;
        }
    }
done:
    if (cr)
        cairo_destroy(cr);
    if (surf)
        cairo_surface_destroy(surf);
    return rc;
}

int kv_fig_save(kv_fig_t *fig, const char *path)
{
    if (!fig || !path || !*path)
        return kv_error(KV_EINVAL, "kv_fig_save: NULL figure or empty path");
    const char *ext = ext_of(path);
    if (format_kind(ext) < 0)
        return kv_error(KV_EINVAL, "%s: unknown figure format \".%s\" (use .png, .svg or .pdf)", path, ext);
    kv_out_t *o;
    int rc = kv_out_open(path, &o);
    if (rc)
        return rc;
    FILE *f = kv_out_stream(o);
    rc = f ? kv_fig_write(fig, ext, f, path) : KV_ENOMEM;
    if (rc) {
        kv_out_abort(o);
        return rc;
    }
    return kv_out_commit(o);
}
