/*
 * text.c: measuring and drawing one line of label text with cairo's toy font API.
 *
 * Fonts are "DejaVu Sans" (Debian's default sans-serif, present wherever cairo is), with metric
 * hinting off so that PNG, SVG and PDF lay out identically. A tiny markup gives super- and
 * subscripts: "10^{-3}", "d_{head}". A '^' or '_' not followed by '{' is literal. Superscripts are
 * drawn at 70 % size, raised by 0.42 em; subscripts at 70 %, lowered by 0.18 em.
 */
#include "plots/plot_internal.h"
#include "sim/common/kv_common.h"

#include <math.h>
#include <string.h>

#define FONT_FAMILY "DejaVu Sans"
#define SCRIPT_SCALE 0.70
#define SUP_RISE 0.42
#define SUB_DROP 0.18

typedef struct {
    const char *s;
    size_t len;
    int level; /* 0 normal, 1 superscript, -1 subscript */
} run_t;

/* Split s into at most cap runs. */
static int parse_runs(const char *s, run_t *runs, int cap)
{
    int n = 0;
    const char *p = s;
    while (*p && n < cap) {
        if ((p[0] == '^' || p[0] == '_') && p[1] == '{') {
            const char *close = strchr(p + 2, '}');
            if (close) {
                runs[n].s = p + 2;
                runs[n].len = (size_t)(close - (p + 2));
                runs[n].level = p[0] == '^' ? 1 : -1;
                n++;
                p = close + 1;
                continue;
            }
        }
        const char *q = p + 1;
        while (*q && !((q[0] == '^' || q[0] == '_') && q[1] == '{'))
            q++;
        runs[n].s = p;
        runs[n].len = (size_t)(q - p);
        runs[n].level = 0;
        n++;
        p = q;
    }
    return n;
}

static void set_font(cairo_t *cr, double size, int bold)
{
    cairo_select_font_face(cr, FONT_FAMILY, CAIRO_FONT_SLANT_NORMAL,
                           bold ? CAIRO_FONT_WEIGHT_BOLD : CAIRO_FONT_WEIGHT_NORMAL);
    cairo_set_font_size(cr, size);
    cairo_font_options_t *fo = cairo_font_options_create();
    cairo_font_options_set_hint_metrics(fo, CAIRO_HINT_METRICS_OFF);
    cairo_font_options_set_hint_style(fo, CAIRO_HINT_STYLE_NONE);
    cairo_set_font_options(cr, fo);
    cairo_font_options_destroy(fo);
}

static double run_advance(cairo_t *cr, const run_t *r)
{
    char buf[512];
    size_t n = r->len < sizeof buf - 1 ? r->len : sizeof buf - 1;
    memcpy(buf, r->s, n);
    buf[n] = '\0';
    cairo_text_extents_t te;
    cairo_text_extents(cr, buf, &te);
    return te.x_advance;
}

void txt_measure(cairo_t *cr, const char *s, double size, int bold, txt_box_t *box)
{
    run_t runs[32];
    int n = parse_runs(s ? s : "", runs, 32);
    cairo_save(cr);
    set_font(cr, size, bold);
    cairo_font_extents_t fe;
    cairo_font_extents(cr, &fe);
    double w = 0, top = fe.ascent, bottom = fe.descent;
    for (int i = 0; i < n; i++) {
        if (runs[i].level) {
            set_font(cr, size * SCRIPT_SCALE, bold);
            w += run_advance(cr, &runs[i]);
            double a = fe.ascent * SCRIPT_SCALE, d = fe.descent * SCRIPT_SCALE;
            if (runs[i].level > 0)
                top = fmax(top, SUP_RISE * size + a);
            else
                bottom = fmax(bottom, SUB_DROP * size + d);
            set_font(cr, size, bold);
        } else {
            w += run_advance(cr, &runs[i]);
        }
    }
    cairo_restore(cr);
    box->w = w;
    box->h = top + bottom;
    box->baseline = top;
}

void txt_rotated_size(const txt_box_t *b, double angle, double *w, double *h)
{
    double c = fabs(cos(angle)), s = fabs(sin(angle));
    *w = b->w * c + b->h * s;
    *h = b->w * s + b->h * c;
}

void txt_draw(cairo_t *cr, const char *s, double size, int bold, double x, double y, double anchor_x, double anchor_y,
              double angle, kv_rgba_t color)
{
    if (!s || !*s)
        return;
    txt_box_t box;
    txt_measure(cr, s, size, bold, &box);
    run_t runs[32];
    int n = parse_runs(s, runs, 32);
    cairo_save(cr);
    cairo_translate(cr, x, y);
    cairo_rotate(cr, angle);
    cairo_set_source_rgba(cr, color.r, color.g, color.b, color.a);
    double pen = -anchor_x * box.w, base = -anchor_y * box.h + box.baseline;
    for (int i = 0; i < n; i++) {
        char buf[512];
        size_t len = runs[i].len < sizeof buf - 1 ? runs[i].len : sizeof buf - 1;
        memcpy(buf, runs[i].s, len);
        buf[len] = '\0';
        double sz = runs[i].level ? size * SCRIPT_SCALE : size;
        double dy = runs[i].level > 0 ? -SUP_RISE * size : runs[i].level < 0 ? SUB_DROP * size : 0;
        set_font(cr, sz, bold);
        cairo_move_to(cr, pen, base + dy);
        cairo_show_text(cr, buf);
        cairo_text_extents_t te;
        cairo_text_extents(cr, buf, &te);
        pen += te.x_advance;
    }
    cairo_restore(cr);
}

/* Length of the UTF-8 character starting at s. */
static size_t utf8_len(const char *s)
{
    unsigned char c = (unsigned char)*s;
    if (c < 0x80)
        return 1;
    if ((c & 0xE0) == 0xC0)
        return 2;
    if ((c & 0xF0) == 0xE0)
        return 3;
    return 4;
}

char *txt_ellipsize(cairo_t *cr, const char *s, double size, int bold, double max_w)
{
    txt_box_t b;
    txt_measure(cr, s, size, bold, &b);
    if (b.w <= max_w)
        return kv_strdup(s);
    size_t n = strlen(s);
    char *buf = kv_malloc(n + 4, "ellipsized label");
    if (!buf)
        return NULL;
    /* longest prefix (whole characters) that fits with the ellipsis */
    size_t keep = 0;
    for (size_t i = 0; i < n;) {
        size_t step = utf8_len(s + i);
        if (i + step > n)
            break;
        memcpy(buf, s, i + step);
        memcpy(buf + i + step, "\xe2\x80\xa6", 4); /* U+2026 */
        txt_measure(cr, buf, size, bold, &b);
        if (b.w > max_w)
            break;
        keep = i + step;
        i += step;
    }
    memcpy(buf, s, keep);
    memcpy(buf + keep, "\xe2\x80\xa6", 4);
    return buf;
}

void txt_draw_fit(cairo_t *cr, const char *s, double size, int bold, double max_w, double x, double y, double anchor_x,
                  double anchor_y, double angle, kv_rgba_t color)
{
    if (!s || !*s)
        return;
    if (max_w <= 0) {
        txt_draw(cr, s, size, bold, x, y, anchor_x, anchor_y, angle, color);
        return;
    }
    char *e = txt_ellipsize(cr, s, size, bold, max_w);
    txt_draw(cr, e ? e : s, size, bold, x, y, anchor_x, anchor_y, angle, color);
    kv_free(e);
}
