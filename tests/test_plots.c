/*
 * test_plots.c: the plots/ figure library: tick generation and labels, colour maps and palette,
 * rendering into in-memory images (size, ink, and marks landing where the data put them), legend
 * placement, file output (PNG / SVG / PDF magic bytes) and error messages.
 *
 * Pixel checks locate marks through kv_axes_data_to_px, so they test the data -> pixel chain end
 * to end without hard-coding layout numbers. Figures are small (<= 800x500) to keep the suite fast.
 */
#include "plots/kv_plot.h"
#include "plots/plot_internal.h" /* last-drawn tick label extents */
#include "sim/common/kv_common.h"
#include "sim/common/kv_rng.h"
#include "tests/kv_test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---------------------------------------------------------------- helpers */

typedef struct {
    int r, g, b;
} px_t;

static px_t pixel(cairo_surface_t *s, int x, int y)
{
    const unsigned char *d = cairo_image_surface_get_data(s);
    int stride = cairo_image_surface_get_stride(s);
    uint32_t v = *(const uint32_t *)(d + (size_t)y * stride + 4 * (size_t)x);
    px_t p = {(int)((v >> 16) & 0xff), (int)((v >> 8) & 0xff), (int)(v & 0xff)};
    return p;
}

static int near_rgb(px_t p, kv_rgba_t c, int tol)
{
    return abs(p.r - (int)lround(c.r * 255)) <= tol && abs(p.g - (int)lround(c.g * 255)) <= tol &&
           abs(p.b - (int)lround(c.b * 255)) <= tol;
}

static double px_lightness(px_t p)
{
    kv_rgba_t c = {p.r / 255.0, p.g / 255.0, p.b / 255.0, 1};
    return kv_rgba_lightness(c);
}

static cairo_surface_t *render(kv_fig_t *fig)
{
    cairo_surface_t *s = NULL;
    int rc = kv_fig_render_image(fig, &s);
    ck_assert_msg(rc == KV_OK, "render failed: %s", kv_last_error());
    ck_assert_ptr_nonnull(s);
    return s;
}

static void plot_rect(kv_axes_t *ax, int *x0, int *y0, int *x1, int *y1)
{
    double a, b, c, d;
    ck_assert_int_eq(kv_axes_plot_rect(ax, &a, &b, &c, &d), KV_OK);
    *x0 = (int)a;
    *y0 = (int)b;
    *x1 = (int)c;
    *y1 = (int)d;
}

static double mantissa(double step)
{
    double e = floor(log10(step) + 1e-9);
    return step / pow(10, e);
}

/* ---------------------------------------------------------------- ticks */

START_TEST(ticks_unit_interval)
{
    kv_ticks_t t;
    ck_assert_int_eq(kv_ticks_linear(0, 1, 6, &t), KV_OK);
    ck_assert_int_eq(t.n, 6);
    const char *want[] = {"0.0", "0.2", "0.4", "0.6", "0.8", "1.0"};
    for (int i = 0; i < 6; i++) {
        /* values are the correctly rounded decimals, not accumulated sums */
        ck_assert(t.t[i].value == (2 * i) / 10.0);
        char buf[64];
        kv_ticks_format(&t, t.t[i].value, buf, sizeof buf);
        ck_assert_str_eq(buf, want[i]);
    }
}
END_TEST

START_TEST(ticks_3_to_97)
{
    kv_ticks_t t;
    ck_assert_int_eq(kv_ticks_linear(3, 97, 10, &t), KV_OK);
    ck_assert_int_eq(t.n, 9);
    for (int i = 0; i < 9; i++)
        ck_assert(t.t[i].value == 10.0 * (i + 1));
    ck_assert_int_eq(kv_ticks_linear(3, 97, 5, &t), KV_OK);
    ck_assert_int_eq(t.n, 4); /* 20, 40, 60, 80 */
    ck_assert(t.t[0].value == 20 && t.t[3].value == 80);
    char buf[64];
    kv_ticks_format(&t, 40, buf, sizeof buf);
    ck_assert_str_eq(buf, "40");
}
END_TEST

/* Property test over many ranges and tick budgets: the ticks are multiples of a step in
 * {1, 2, 2.5, 5} x 10^k, inside the range, evenly spaced, at least two, at most max_major of them
 * (unless only a finer step gives two), and the next finer nice step would have needed more than
 * max_major ticks (so the step is the finest that fits). */
START_TEST(ticks_nice_over_many_ranges)
{
    kv_rng_t rng;
    kv_rng_seed(&rng, 42);
    static const double nice[4] = {1, 2, 2.5, 5};
    for (int it = 0; it < 3000; it++) {
        double mag = pow(10, -9 + 21 * kv_rng_uniform(&rng));
        double lo = (kv_rng_uniform(&rng) * 2 - 1) * mag;
        double span = mag * pow(10, -3 * kv_rng_uniform(&rng)) * (0.1 + kv_rng_uniform(&rng));
        double hi = lo + span;
        int maxm = 2 + (int)kv_rng_below(&rng, 9);
        kv_ticks_t t;
        ck_assert_int_eq(kv_ticks_linear(lo, hi, maxm, &t), KV_OK);
        ck_assert_msg(t.n >= 2, "[%g, %g] max %d: %d ticks", lo, hi, maxm, t.n);
        double m = mantissa(t.step);
        int ok = 0;
        for (int k = 0; k < 4; k++)
            ok |= fabs(m - nice[k]) < 1e-9;
        ck_assert_msg(ok, "[%g, %g]: step %g is not nice", lo, hi, t.step);
        /* tolerance: ticks are k*step rounded to the nearest double, so 1e-9 of a step */
        for (int i = 0; i < t.n; i++) {
            double v = t.t[i].value, q = v / t.step;
            ck_assert_msg(fabs(q - round(q)) < 1e-6, "[%g, %g]: tick %g not a multiple of %g", lo, hi, v, t.step);
            ck_assert(v >= lo - 1e-9 * t.step && v <= hi + 1e-9 * t.step);
            if (i)
                ck_assert(fabs((v - t.t[i - 1].value) - t.step) < 1e-6 * t.step);
        }
        double e = floor(log10(t.step) + 1e-9);
        int mi = 0;
        while (mi < 4 && fabs(m - nice[mi]) > 1e-9)
            mi++;
        if (t.n <= maxm) {
            /* the next finer nice step would not fit */
            double finer = mi == 0 ? 5 * pow(10, e - 1) : nice[mi - 1] * pow(10, e);
            double count = floor(hi / finer + 1e-9) - ceil(lo / finer - 1e-9) + 1;
            ck_assert_msg(count > maxm, "[%g, %g] max %d: finer step %g (%g ticks) would fit", lo, hi, maxm, finer,
                          count);
        } else {
            /* more than max_major only when the next coarser step leaves fewer than two */
            double coarser = mi == 3 ? pow(10, e + 1) : nice[mi + 1] * pow(10, e);
            double count = floor(hi / coarser + 1e-9) - ceil(lo / coarser - 1e-9) + 1;
            ck_assert_msg(count < 2, "[%g, %g] max %d: %d ticks although step %g gives %g", lo, hi, maxm, t.n, coarser,
                          count);
        }
    }
}
END_TEST

START_TEST(ticks_degenerate_and_bad)
{
    kv_ticks_t t;
    ck_assert_int_eq(kv_ticks_linear(5, 5, 6, &t), KV_OK);
    ck_assert(t.n >= 2);
    ck_assert(t.t[0].value <= 5 && t.t[t.n - 1].value >= 5);
    ck_assert_int_eq(kv_ticks_linear(0, 0, 6, &t), KV_OK);
    ck_assert(t.n >= 2 && t.t[0].value <= 0 && t.t[t.n - 1].value >= 0);
    /* reversed limits are accepted */
    ck_assert_int_eq(kv_ticks_linear(1, 0, 6, &t), KV_OK);
    ck_assert_int_eq(t.n, 6);
    ck_assert_int_eq(kv_ticks_linear(NAN, 1, 6, &t), KV_EINVAL);
    ck_assert_int_eq(kv_ticks_linear(0, INFINITY, 6, &t), KV_EINVAL);
    ck_assert_int_eq(kv_ticks_log(0, 1, 6, &t), KV_EINVAL);
    ck_assert_int_eq(kv_ticks_log(-1, 1, 6, &t), KV_EINVAL);
}
END_TEST

START_TEST(ticks_tiny_and_huge)
{
    kv_ticks_t t;
    char buf[64], prev[64] = "";
    /* tiny range far from zero: every label distinct and short (no float noise) */
    ck_assert_int_eq(kv_ticks_linear(1.0, 1.0 + 1e-7, 6, &t), KV_OK);
    ck_assert(t.n >= 2);
    for (int i = 0; i < t.n; i++) {
        kv_ticks_format(&t, t.t[i].value, buf, sizeof buf);
        ck_assert_msg(strlen(buf) <= 10, "label %s too long", buf);
        ck_assert_str_ne(buf, prev);
        snprintf(prev, sizeof prev, "%s", buf);
    }
    /* huge: compact exponents */
    ck_assert_int_eq(kv_ticks_linear(0, 3e12, 7, &t), KV_OK);
    ck_assert(t.sci);
    kv_ticks_format(&t, 1e12, buf, sizeof buf);
    ck_assert_str_eq(buf, "10^{12}");
    kv_ticks_format(&t, 1.5e12, buf, sizeof buf);
    ck_assert_str_eq(buf, "1.5\xc3\x97"
                          "10^{12}");
    kv_ticks_format(&t, 0, buf, sizeof buf);
    ck_assert_str_eq(buf, "0");
    /* huge values with a tiny step read better in plain digits */
    ck_assert_int_eq(kv_ticks_linear(123456789.0, 123456789.1, 5, &t), KV_OK);
    ck_assert(!t.sci);
    kv_ticks_format(&t, t.t[1].value, buf, sizeof buf);
    ck_assert_msg(strncmp(buf, "123456789.", 10) == 0 && strlen(buf) <= 13, "label %s", buf);
    /* tiny values */
    ck_assert_int_eq(kv_ticks_linear(0, 4e-5, 5, &t), KV_OK);
    ck_assert(t.sci);
    kv_ticks_format(&t, 1e-5, buf, sizeof buf);
    ck_assert_str_eq(buf, "10^{-5}");
    kv_ticks_format(&t, -2e-5, buf, sizeof buf);
    ck_assert_str_eq(buf, "-2\xc3\x97"
                          "10^{-5}");
}
END_TEST

START_TEST(ticks_format_no_float_noise)
{
    kv_ticks_t t;
    char buf[64];
    ck_assert_int_eq(kv_ticks_linear(0, 0.3, 4, &t), KV_OK);
    ck_assert(fabs(t.step - 0.1) < 1e-15);
    kv_ticks_format(&t, 0.1 + 0.2, buf, sizeof buf); /* 0.30000000000000004 */
    ck_assert_str_eq(buf, "0.3");
    kv_ticks_format(&t, -1e-17, buf, sizeof buf); /* rounds to zero: no "-0.0" */
    ck_assert_str_eq(buf, "0.0");
    ck_assert_int_eq(kv_ticks_linear(0, 1, 5, &t), KV_OK); /* step 0.25: two decimals */
    ck_assert(fabs(t.step - 0.25) < 1e-15);
    kv_ticks_format(&t, 0.75, buf, sizeof buf);
    ck_assert_str_eq(buf, "0.75");
    kv_ticks_format(&t, 0.5, buf, sizeof buf);
    ck_assert_str_eq(buf, "0.50");
}
END_TEST

START_TEST(ticks_log_decades)
{
    kv_ticks_t t;
    ck_assert_int_eq(kv_ticks_log(1e-4, 1, 8, &t), KV_OK);
    int labelled = 0, minors = 0;
    char buf[64];
    for (int i = 0; i < t.n; i++) {
        double v = t.t[i].value;
        ck_assert(v >= 1e-4 * (1 - 1e-9) && v <= 1 + 1e-9);
        if (t.t[i].labelled) {
            /* labels exactly at decades 10^-4 .. 10^0 */
            double d = log10(v);
            ck_assert(fabs(d - round(d)) < 1e-12);
            ck_assert(fabs(d - (-4 + labelled)) < 1e-12);
            kv_ticks_format(&t, v, buf, sizeof buf);
            char want[32];
            snprintf(want, sizeof want, "10^{%d}", -4 + labelled);
            ck_assert_str_eq(buf, want);
            labelled++;
        } else {
            minors++;
        }
    }
    ck_assert_int_eq(labelled, 5);
    ck_assert_int_eq(minors, 4 * 8); /* 2..9 in each of the four decades */

    /* plain decimals when every label lies between 0.001 and 10^4; with room for 1, 2, 5 x 10^k
     * (10 labels on [1, 1000]) those are labelled, and not without it */
    ck_assert_int_eq(kv_ticks_log(1, 1000, 10, &t), KV_OK);
    kv_ticks_format(&t, 100, buf, sizeof buf);
    ck_assert_str_eq(buf, "100");
    labelled = 0;
    for (int i = 0; i < t.n; i++)
        if (t.t[i].labelled) {
            double m = t.t[i].value / pow(10, floor(log10(t.t[i].value) + 1e-9));
            ck_assert(fabs(m - 1) < 1e-9 || fabs(m - 2) < 1e-9 || fabs(m - 5) < 1e-9);
            labelled++;
        }
    ck_assert_int_eq(labelled, 10);
    kv_ticks_format(&t, 0.005, buf, sizeof buf);
    ck_assert_str_eq(buf, "0.005");
    ck_assert_int_eq(kv_ticks_log(1, 1000, 9, &t), KV_OK);
    labelled = 0;
    for (int i = 0; i < t.n; i++)
        labelled += t.t[i].labelled;
    ck_assert_int_eq(labelled, 4);

    /* 24 decades with at most 6 labels: every 5th decade */
    ck_assert_int_eq(kv_ticks_log(1, 1e24, 6, &t), KV_OK);
    labelled = 0;
    for (int i = 0; i < t.n; i++)
        if (t.t[i].labelled) {
            labelled++;
            int d = (int)lround(log10(t.t[i].value));
            ck_assert_int_eq(d % (int)t.step, 0);
        }
    ck_assert(labelled >= 2 && labelled <= 6);

    /* narrow range: still two or more labels, all inside */
    ck_assert_int_eq(kv_ticks_log(20, 80, 4, &t), KV_OK);
    labelled = 0;
    for (int i = 0; i < t.n; i++)
        if (t.t[i].labelled) {
            labelled++;
            ck_assert(t.t[i].value >= 20 && t.t[i].value <= 80);
        }
    ck_assert(labelled >= 2 && labelled <= 4);
    /* a factor of 1.1: falls back to linear steps */
    ck_assert_int_eq(kv_ticks_log(100, 110, 4, &t), KV_OK);
    ck_assert(t.n >= 2);
}
END_TEST

START_TEST(ticks_log2_budgets)
{
    kv_ticks_t t;
    ck_assert_int_eq(kv_ticks_log2(32, 2048, 9, &t), KV_OK);
    const char *want[] = {"32", "64", "128", "256", "512", "1024", "2048"};
    ck_assert_int_eq(t.n, 7);
    for (int i = 0; i < 7; i++) {
        char buf[32];
        ck_assert(t.t[i].labelled);
        kv_ticks_format(&t, t.t[i].value, buf, sizeof buf);
        ck_assert_str_eq(buf, want[i]);
    }
    ck_assert_int_eq(kv_ticks_log2(1, 1 << 20, 6, &t), KV_OK);
    int labelled = 0;
    for (int i = 0; i < t.n; i++)
        labelled += t.t[i].labelled;
    ck_assert(labelled >= 2 && labelled <= 6);
}
END_TEST

/* ---------------------------------------------------------------- colour */

START_TEST(palette_distinct)
{
    /* Okabe-Ito colours are far apart in CIELAB; 25 units is a clearly visible difference (a "just
     * noticeable" one is about 2.3) */
    for (int i = 0; i < KV_PALETTE_SIZE; i++) {
        kv_rgba_t a = kv_palette(i);
        ck_assert(a.a == 1);
        ck_assert_msg(kv_rgba_lightness(a) < 92, "palette %d too light for white paper", i);
        for (int j = i + 1; j < KV_PALETTE_SIZE; j++)
            ck_assert_msg(kv_rgba_distance(a, kv_palette(j)) > 25, "palette %d and %d too close: %.1f", i, j,
                          kv_rgba_distance(a, kv_palette(j)));
    }
    kv_rgba_t w = kv_palette(KV_PALETTE_SIZE), z = kv_palette(0), m = kv_palette(-1),
              l = kv_palette(KV_PALETTE_SIZE - 1);
    ck_assert(w.r == z.r && w.g == z.g && w.b == z.b);
    ck_assert(m.r == l.r && m.g == l.g && m.b == l.b);
}
END_TEST

START_TEST(cmaps_endpoints_and_lightness)
{
    /* sequential maps: lightness strictly monotone and linear in t. Lightness is exact by
     * construction (only chroma is reduced for the gamut), so the tolerance on each step is 1 % of
     * the mean step, allowing for the round trip through sRGB. */
    kv_cmap_t seq[3] = {KV_CMAP_VIRIDIS, KV_CMAP_BLUES, KV_CMAP_MAGMA};
    for (int k = 0; k < 3; k++) {
        double L0 = kv_rgba_lightness(kv_cmap_eval(seq[k], 0)), L1 = kv_rgba_lightness(kv_cmap_eval(seq[k], 1));
        ck_assert_msg(fabs(L1 - L0) > 60, "%s: lightness range %.1f..%.1f too small", kv_cmap_name(seq[k]), L0, L1);
        double mean = (L1 - L0) / 255, prevL = L0;
        kv_rgba_t prev = kv_cmap_eval(seq[k], 0);
        for (int i = 1; i < 256; i++) {
            kv_rgba_t c = kv_cmap_eval(seq[k], i / 255.0);
            double L = kv_rgba_lightness(c);
            ck_assert_msg(fabs((L - prevL) - mean) < 0.01 * fabs(mean), "%s: step %d lightness %.3f -> %.3f",
                          kv_cmap_name(seq[k]), i, prevL, L);
            /* no jumps in colour either: neighbouring steps within 3 Lab units (mean is ~0.3-0.5) */
            ck_assert(kv_rgba_distance(prev, c) < 3);
            prevL = L;
            prev = c;
        }
    }
    /* direction: viridis and magma dark -> light, blues light -> dark */
    ck_assert(kv_rgba_lightness(kv_cmap_eval(KV_CMAP_VIRIDIS, 0)) < 25);
    ck_assert(kv_rgba_lightness(kv_cmap_eval(KV_CMAP_VIRIDIS, 1)) > 85);
    ck_assert(kv_rgba_lightness(kv_cmap_eval(KV_CMAP_BLUES, 0)) > 90);
    ck_assert(kv_rgba_lightness(kv_cmap_eval(KV_CMAP_BLUES, 1)) < 30);
    /* diverging: symmetric lightness, lightest (and grey) in the middle, two different hues */
    for (int i = 0; i <= 50; i++) {
        double t = i / 100.0;
        kv_assert_close(kv_rgba_lightness(kv_cmap_eval(KV_CMAP_DIVERGING, t)),
                        kv_rgba_lightness(kv_cmap_eval(KV_CMAP_DIVERGING, 1 - t)), 0.05, 0, "diverging symmetry");
    }
    kv_rgba_t mid = kv_cmap_eval(KV_CMAP_DIVERGING, 0.5);
    ck_assert(kv_rgba_lightness(mid) > 95 && fabs(mid.r - mid.b) < 0.01);
    ck_assert(kv_rgba_distance(kv_cmap_eval(KV_CMAP_DIVERGING, 0), kv_cmap_eval(KV_CMAP_DIVERGING, 1)) > 50);
    /* clamping and NaN */
    kv_rgba_t a = kv_cmap_eval(KV_CMAP_VIRIDIS, -3), b = kv_cmap_eval(KV_CMAP_VIRIDIS, 0);
    ck_assert(a.r == b.r && a.g == b.g && a.b == b.b);
    ck_assert(kv_cmap_eval(KV_CMAP_VIRIDIS, NAN).a == 0);
}
END_TEST

/* ---------------------------------------------------------------- rendering */

START_TEST(render_size_and_ink)
{
    kv_fig_t *fig;
    ck_assert_int_eq(kv_fig_create(640, 400, &fig), KV_OK);
    double y[5] = {1, 3, 2, 5, 4};
    ck_assert_int_eq(kv_plot_line(kv_fig_axes(fig, 0, 0), 5, NULL, y, NULL), KV_OK);
    cairo_surface_t *s = render(fig);
    ck_assert_int_eq(cairo_image_surface_get_width(s), 640);
    ck_assert_int_eq(cairo_image_surface_get_height(s), 400);
    long ink = 0;
    for (int yy = 0; yy < 400; yy++)
        for (int xx = 0; xx < 640; xx++) {
            px_t p = pixel(s, xx, yy);
            ink += p.r < 200 || p.g < 200 || p.b < 200;
        }
    /* a frame, ticks, labels and a line: thousands of dark pixels, but far from all of them */
    ck_assert_msg(ink > 1500 && ink < 640 * 400 / 4, "ink %ld", ink);
    /* rendering is deterministic */
    cairo_surface_t *s2 = render(fig);
    ck_assert_int_eq(memcmp(cairo_image_surface_get_data(s), cairo_image_surface_get_data(s2),
                            (size_t)cairo_image_surface_get_stride(s) * 400),
                     0);
    cairo_surface_destroy(s);
    cairo_surface_destroy(s2);
    kv_fig_free(fig);
}
END_TEST

START_TEST(render_heatmap_hot_cell)
{
    enum { R = 10, C = 12 };
    float z[R * C];
    memset(z, 0, sizeof z);
    z[3 * C + 7] = 1.0f; /* row 3, column 7 */
    kv_fig_t *fig;
    ck_assert_int_eq(kv_fig_create(640, 480, &fig), KV_OK);
    kv_axes_t *ax = kv_fig_axes(fig, 0, 0);
    ck_assert_int_eq(kv_plot_heatmap(ax, R, C, z, &(kv_heat_style_t){.cmap = KV_CMAP_VIRIDIS, .label = "value"}),
                     KV_OK);
    cairo_surface_t *s = render(fig);
    int x0, y0, x1, y1;
    plot_rect(ax, &x0, &y0, &x1, &y1);
    /* the brightest pixel of the plot area lies in cell (3, 7) */
    double best = -1;
    int bx = -1, by = -1;
    for (int y = y0 + 1; y < y1 - 1; y++)
        for (int x = x0 + 1; x < x1 - 1; x++) {
            double L = px_lightness(pixel(s, x, y));
            if (L > best) {
                best = L;
                bx = x;
                by = y;
            }
        }
    double cx0, cy0, cx1, cy1;
    ck_assert_int_eq(kv_axes_data_to_px(ax, 6.5, 2.5, &cx0, &cy0), KV_OK);
    ck_assert_int_eq(kv_axes_data_to_px(ax, 7.5, 3.5, &cx1, &cy1), KV_OK);
    ck_assert_msg(bx >= cx0 - 1 && bx <= cx1 + 1 && by >= fmin(cy0, cy1) - 1 && by <= fmax(cy0, cy1) + 1,
                  "brightest pixel (%d, %d) outside cell [%g..%g] x [%g..%g]", bx, by, cx0, cx1, cy0, cy1);
    /* row 0 at the top by default */
    ck_assert(cy0 < cy1);
    /* the cell centre has the top colour of the map, another cell the bottom colour (8-bit rounding: 2) */
    double px, py;
    kv_axes_data_to_px(ax, 7, 3, &px, &py);
    ck_assert(near_rgb(pixel(s, (int)px, (int)py), kv_cmap_eval(KV_CMAP_VIRIDIS, 1), 2));
    kv_axes_data_to_px(ax, 2, 8, &px, &py);
    ck_assert(near_rgb(pixel(s, (int)px, (int)py), kv_cmap_eval(KV_CMAP_VIRIDIS, 0), 2));
    /* a colour bar was drawn right of the plot: its top holds the top colour */
    int found = 0;
    for (int x = x1 + 2; x < 640 && !found; x++)
        found = near_rgb(pixel(s, x, y0 + 3), kv_cmap_eval(KV_CMAP_VIRIDIS, 1), 12);
    ck_assert_msg(found, "no colour bar right of the heat map");
    cairo_surface_destroy(s);
    kv_fig_free(fig);
}
END_TEST

/* A heat map with a data extent: 4 x 5 cells over x in [0, 100], y in [10, 30]; the hot cell (row 1,
 * column 3) covers x in [60, 80] and y in [15, 20]; axis limits are the extent. */
START_TEST(render_heatmap_extent)
{
    enum { R = 4, C = 5 };
    float z[R * C];
    memset(z, 0, sizeof z);
    z[1 * C + 3] = 1.0f;
    kv_fig_t *fig;
    ck_assert_int_eq(kv_fig_create(640, 480, &fig), KV_OK);
    kv_axes_t *ax = kv_fig_axes(fig, 0, 0);
    ck_assert_int_eq(kv_plot_heatmap(ax, R, C, z, &(kv_heat_style_t){.x0 = 0, .x1 = 100, .y0 = 10, .y1 = 30}), KV_OK);
    ck_assert_int_eq(kv_plot_heatmap(ax, R, C, z, &(kv_heat_style_t){.x0 = 5, .x1 = 5}), KV_EINVAL);
    cairo_surface_t *s = render(fig);
    int x0, y0, x1, y1;
    plot_rect(ax, &x0, &y0, &x1, &y1);
    double ax0, ay0, ax1, ay1;
    ck_assert_int_eq(kv_axes_data_to_px(ax, 0, 10, &ax0, &ay0), KV_OK);
    ck_assert_int_eq(kv_axes_data_to_px(ax, 100, 30, &ax1, &ay1), KV_OK);
    /* limits are the extent (1 px for rounding of the plot rectangle) */
    ck_assert_msg(fabs(ax0 - x0) <= 1 && fabs(ax1 - x1) <= 1, "x extent %g..%g vs plot %d..%d", ax0, ax1, x0, x1);
    ck_assert_msg(fabs(ay0 - y0) <= 1 && fabs(ay1 - y1) <= 1, "y extent %g..%g vs plot %d..%d", ay0, ay1, y0, y1);
    double px, py;
    kv_axes_data_to_px(ax, 70, 17.5, &px, &py); /* centre of the hot cell */
    ck_assert(near_rgb(pixel(s, (int)px, (int)py), kv_cmap_eval(KV_CMAP_VIRIDIS, 1), 2));
    kv_axes_data_to_px(ax, 50, 17.5, &px, &py); /* its left neighbour */
    ck_assert(near_rgb(pixel(s, (int)px, (int)py), kv_cmap_eval(KV_CMAP_VIRIDIS, 0), 2));
    kv_axes_data_to_px(ax, 70, 22.5, &px, &py); /* the cell below it */
    ck_assert(near_rgb(pixel(s, (int)px, (int)py), kv_cmap_eval(KV_CMAP_VIRIDIS, 0), 2));
    cairo_surface_destroy(s);
    kv_fig_free(fig);
}
END_TEST

START_TEST(render_log_heatmap_with_zeros)
{
    enum { N = 8 };
    float z[N * N];
    for (int i = 0; i < N * N; i++)
        z[i] = (i % 3 == 0) ? 0.0f : (float)pow(10, -(i % 5));
    z[0] = 0.0f;
    z[1] = 1.0f;
    kv_fig_t *fig;
    ck_assert_int_eq(kv_fig_create(500, 400, &fig), KV_OK);
    kv_axes_t *ax = kv_fig_axes(fig, 0, 0);
    ck_assert_int_eq(kv_plot_heatmap(ax, N, N, z, &(kv_heat_style_t){.cmap = KV_CMAP_MAGMA, .log = 1}), KV_OK);
    cairo_surface_t *s = render(fig);
    double px, py;
    /* zero cell (0, 0) gets the floor colour, not a hole */
    kv_axes_data_to_px(ax, 0, 0, &px, &py);
    ck_assert(near_rgb(pixel(s, (int)px, (int)py), kv_cmap_eval(KV_CMAP_MAGMA, 0), 2));
    /* cell (0, 1) = 1 is the maximum */
    kv_axes_data_to_px(ax, 1, 0, &px, &py);
    ck_assert(near_rgb(pixel(s, (int)px, (int)py), kv_cmap_eval(KV_CMAP_MAGMA, 1), 2));
    /* 10^-2 sits at (log10(1e-2) - log10(1e-4)) / 4 = 0.5 of the map (limits 1e-4 .. 1): cell i = 2 */
    kv_axes_data_to_px(ax, 2, 0, &px, &py);
    ck_assert(near_rgb(pixel(s, (int)px, (int)py), kv_cmap_eval(KV_CMAP_MAGMA, 0.5), 3));
    cairo_surface_destroy(s);
    kv_fig_free(fig);
    /* a log scale with a negative lower limit is refused */
    ck_assert_int_eq(kv_fig_create(100, 100, &fig), KV_OK);
    ck_assert_int_eq(
        kv_plot_heatmap(kv_fig_axes(fig, 0, 0), N, N, z, &(kv_heat_style_t){.log = 1, .vmin = -1, .vmax = 1}),
        KV_EINVAL);
    kv_fig_free(fig);
}
END_TEST

START_TEST(render_line_peak_lands)
{
    double x[7] = {0, 1, 2, 3, 4, 5, 6}, y[7] = {1, 1.5, 1, 9, 1, 2, 1};
    kv_rgba_t col = kv_palette(1);
    kv_fig_t *fig;
    ck_assert_int_eq(kv_fig_create(640, 400, &fig), KV_OK);
    kv_axes_t *ax = kv_fig_axes(fig, 0, 0);
    kv_axes_set_xlabel(ax, "x (units)");
    kv_axes_set_ylabel(ax, "y (units)");
    ck_assert_int_eq(kv_plot_line(ax, 7, x, y, &(kv_style_t){.color = col, .width = 3}), KV_OK);
    cairo_surface_t *s = render(fig);
    int x0, y0, x1, y1;
    plot_rect(ax, &x0, &y0, &x1, &y1);
    /* topmost pixel of the line colour */
    int top = -1, topx = -1;
    for (int yy = y0; yy < y1 && top < 0; yy++)
        for (int xx = x0; xx < x1; xx++)
            if (near_rgb(pixel(s, xx, yy), col, 30)) {
                top = yy;
                topx = xx;
                break;
            }
    double px, py;
    ck_assert_int_eq(kv_axes_data_to_px(ax, 3, 9, &px, &py), KV_OK);
    /* within the line's half width plus the round join and anti-aliasing: 4 px */
    ck_assert_msg(top >= 0 && fabs(top - py) <= 4 && fabs(topx - px) <= 4,
                  "peak drawn at (%d, %d), expected (%.1f, %.1f)", topx, top, px, py);
    /* the peak is inside the plot area with some padding above it */
    ck_assert(py > y0 + 5);
    /* before rendering, positions are refused */
    kv_fig_t *f2;
    kv_fig_create(100, 100, &f2);
    double a, b;
    ck_assert_int_eq(kv_axes_data_to_px(kv_fig_axes(f2, 0, 0), 0, 0, &a, &b), KV_EINVAL);
    kv_fig_free(f2);
    cairo_surface_destroy(s);
    kv_fig_free(fig);
}
END_TEST

START_TEST(render_bars_tallest)
{
    const char *cats[] = {"a", "b", "c", "d"};
    double v1[4] = {1, 2, 7, 3}, v2[4] = {2, 2, 2, 2};
    kv_rgba_t c1 = kv_palette(0), c2 = kv_palette(2);
    kv_fig_t *fig;
    ck_assert_int_eq(kv_fig_create(640, 400, &fig), KV_OK);
    kv_axes_t *ax = kv_fig_axes(fig, 0, 0);
    ck_assert_int_eq(kv_axes_set_xcategories(ax, 4, cats), KV_OK);
    ck_assert_int_eq(kv_plot_bars(ax, 4, v1, &(kv_style_t){.color = c1, .label = "first"}), KV_OK);
    ck_assert_int_eq(kv_plot_bars(ax, 4, v2, &(kv_style_t){.color = c2, .label = "second"}), KV_OK);
    cairo_surface_t *s = render(fig);
    int x0, y0, x1, y1;
    plot_rect(ax, &x0, &y0, &x1, &y1);
    /* column whose c1-coloured run reaches highest */
    int best_top = 1 << 30, best_x = -1;
    for (int xx = x0 + 1; xx < x1 - 1; xx++)
        for (int yy = y0 + 1; yy < y1 - 1; yy++)
            if (near_rgb(pixel(s, xx, yy), c1, 3)) {
                if (yy < best_top) {
                    best_top = yy;
                    best_x = xx;
                }
                break;
            }
    double lo, hi, py, base;
    kv_axes_data_to_px(ax, 1.6, 7, &lo, &py); /* category 2 spans 1.6 .. 2.4, first series the left half */
    kv_axes_data_to_px(ax, 2.0, 0, &hi, &base);
    ck_assert_msg(best_x >= lo && best_x <= hi, "tallest bar at x=%d, expected %.0f..%.0f", best_x, lo, hi);
    ck_assert_msg(abs(best_top - (int)round(py)) <= 1, "bar top %d, expected %.1f", best_top, py);
    /* bars start at 0, which sits on the bottom of the plot (no padding below a zero baseline) */
    ck_assert(fabs(base - y1) <= 1);
    /* the second series sits right of the first within each category */
    double sx, sy;
    kv_axes_data_to_px(ax, 2.2, 1, &sx, &sy);
    ck_assert(near_rgb(pixel(s, (int)sx, (int)sy), c2, 3));
    cairo_surface_destroy(s);
    kv_fig_free(fig);
}
END_TEST

/* Data pixels of a figure with an automatic legend equal those of the same figure without one:
 * the legend covers nothing. */
START_TEST(render_legend_avoids_data)
{
    /* two curves that leave different corners free: y = x^2 (upper left free) and y = (49 - x)^2
     * (upper right free), so a legend parked in any fixed corner would cover one of them */
    kv_rgba_t col = kv_palette(0);
    cairo_surface_t *img[2];
    kv_fig_t *fig[2];
    int rect[2][4];
    for (int shape = 0; shape < 2; shape++) {
        double x[50], y[50];
        for (int i = 0; i < 50; i++) {
            x[i] = i;
            y[i] = shape ? (49.0 - i) * (49.0 - i) : (double)i * i;
        }
        for (int k = 0; k < 2; k++) {
            ck_assert_int_eq(kv_fig_create(640, 400, &fig[k]), KV_OK);
            kv_axes_t *ax = kv_fig_axes(fig[k], 0, 0);
            ck_assert_int_eq(kv_plot_line(ax, 50, x, y, &(kv_style_t){.color = col, .label = k ? "quadratic" : NULL}),
                             KV_OK);
            ck_assert_int_eq(kv_plot_hline(ax, 1200, &(kv_style_t){.label = k ? "level" : NULL}), KV_OK);
            img[k] = render(fig[k]);
            plot_rect(ax, &rect[k][0], &rect[k][1], &rect[k][2], &rect[k][3]);
        }
        /* the legend went inside (same plot area) */
        ck_assert_int_eq(memcmp(rect[0], rect[1], sizeof rect[0]), 0);
        long data_px = 0, legend_px = 0;
        for (int yy = rect[0][1]; yy < rect[0][3]; yy++)
            for (int xx = rect[0][0]; xx < rect[0][2]; xx++) {
                px_t a = pixel(img[0], xx, yy), b = pixel(img[1], xx, yy);
                if (near_rgb(a, col, 40)) {
                    data_px++;
                    ck_assert_msg(a.r == b.r && a.g == b.g && a.b == b.b, "shape %d: legend covers data at (%d, %d)",
                                  shape, xx, yy);
                }
                legend_px += a.r != b.r || a.g != b.g || a.b != b.b;
            }
        ck_assert(data_px > 100);
        ck_assert_msg(legend_px > 200, "no legend drawn inside the plot (%ld pixels differ)", legend_px);
        for (int k = 0; k < 2; k++) {
            cairo_surface_destroy(img[k]);
            kv_fig_free(fig[k]);
        }
    }

    /* data everywhere: the legend moves outside, the plot area shrinks, and no data is covered */
    kv_rng_t rng;
    kv_rng_seed(&rng, 5);
    double sx[600], sy[600];
    for (int i = 0; i < 600; i++) {
        sx[i] = kv_rng_uniform(&rng);
        sy[i] = kv_rng_uniform(&rng);
    }
    int r2[2][4];
    for (int k = 0; k < 2; k++) {
        ck_assert_int_eq(kv_fig_create(500, 400, &fig[k]), KV_OK);
        kv_axes_t *ax = kv_fig_axes(fig[k], 0, 0);
        ck_assert_int_eq(kv_plot_scatter(ax, 600, sx, sy, &(kv_style_t){.label = k ? "points" : NULL}), KV_OK);
        img[k] = render(fig[k]);
        plot_rect(ax, &r2[k][0], &r2[k][1], &r2[k][2], &r2[k][3]);
    }
    ck_assert_msg(r2[1][2] < r2[0][2] - 40, "legend did not move outside (right edge %d vs %d)", r2[1][2], r2[0][2]);
    for (int k = 0; k < 2; k++) {
        cairo_surface_destroy(img[k]);
        kv_fig_free(fig[k]);
    }
}
END_TEST

START_TEST(render_shared_colorbar_scale)
{
    enum { N = 6 };
    float a[N * N], b[N * N];
    for (int i = 0; i < N * N; i++)
        a[i] = b[i] = 0.5f;
    a[0] = 1.0f;  /* panel 0 peak: 1 */
    b[0] = 10.0f; /* panel 1 peak: 10, the shared maximum */
    kv_fig_t *fig;
    ck_assert_int_eq(kv_fig_create(800, 400, &fig), KV_OK);
    ck_assert_int_eq(kv_fig_grid(fig, 1, 2), KV_OK);
    kv_axes_t *p0 = kv_fig_axes(fig, 0, 0), *p1 = kv_fig_axes(fig, 0, 1);
    ck_assert_ptr_null(kv_fig_axes(fig, 1, 0));
    kv_heat_style_t hs = {.cmap = KV_CMAP_VIRIDIS};
    ck_assert_int_eq(kv_plot_heatmap(p0, N, N, a, &hs), KV_OK);
    ck_assert_int_eq(kv_plot_heatmap(p1, N, N, b, &hs), KV_OK);
    ck_assert_int_eq(kv_fig_colorbar(fig, &hs, "value (units)"), KV_OK);
    cairo_surface_t *s = render(fig);
    double x, y;
    kv_axes_data_to_px(p0, 0, 0, &x, &y);
    px_t peak0 = pixel(s, (int)x, (int)y);
    kv_axes_data_to_px(p1, 0, 0, &x, &y);
    px_t peak1 = pixel(s, (int)x, (int)y);
    /* with one scale, 10 is the top colour and 1 is low on the map: (1 - 0.5) / (10 - 0.5) = 0.053 */
    ck_assert(near_rgb(peak1, kv_cmap_eval(KV_CMAP_VIRIDIS, 1), 2));
    ck_assert(near_rgb(peak0, kv_cmap_eval(KV_CMAP_VIRIDIS, 0.5 / 9.5), 3));
    cairo_surface_destroy(s);
    kv_fig_free(fig);
}
END_TEST

START_TEST(render_edge_inputs)
{
    kv_fig_t *fig;
    /* empty figure, NaNs, a single point, log axes with non-positive data: all render */
    ck_assert_int_eq(kv_fig_create(300, 200, &fig), KV_OK);
    cairo_surface_t *s = render(fig);
    cairo_surface_destroy(s);
    kv_axes_t *ax = kv_fig_axes(fig, 0, 0);
    double y[4] = {NAN, -1, 0, 2};
    ck_assert_int_eq(kv_axes_set_yscale(ax, KV_SCALE_LOG), KV_OK);
    ck_assert_int_eq(kv_plot_line(ax, 4, NULL, y, NULL), KV_OK);
    ck_assert_int_eq(kv_plot_scatter(ax, 1, NULL, y + 3, NULL), KV_OK);
    ck_assert_int_eq(kv_axes_set_title(ax, "a title that is much longer than this small figure is wide"), KV_OK);
    s = render(fig);
    cairo_surface_destroy(s);
    kv_fig_free(fig);
    /* bad arguments */
    ck_assert_int_eq(kv_fig_create(0, 100, &fig), KV_EINVAL);
    ck_assert_int_eq(kv_fig_create(100, 100, &fig), KV_OK);
    ck_assert_int_eq(kv_plot_line(kv_fig_axes(fig, 0, 0), 0, NULL, y, NULL), KV_EINVAL);
    ck_assert_int_eq(kv_axes_set_xlim(kv_fig_axes(fig, 0, 0), 2, 1), KV_EINVAL);
    ck_assert_int_eq(kv_fig_grid(fig, 0, 3), KV_EINVAL);
    ck_assert_int_eq(kv_plot_line(NULL, 1, NULL, y, NULL), KV_EINVAL);
    kv_fig_free(fig);
    kv_fig_free(NULL);
}
END_TEST

START_TEST(render_heatmap_annotations)
{
    enum { R = 2, C = 3 };
    float z[R * C] = {0.1f, 0.5f, 0.9f, -0.0001f, 0.3f, 0.7f};
    kv_fig_t *fig;
    /* formats must consume exactly one double */
    ck_assert_int_eq(kv_fig_create(500, 300, &fig), KV_OK);
    kv_axes_t *ax = kv_fig_axes(fig, 0, 0);
    const char *bad[] = {"%s", "%d", "%.2f %.2f", "%n", "value", "%.2f%", "%*f"};
    for (size_t i = 0; i < KV_ARRAY_LEN(bad); i++)
        ck_assert_msg(kv_plot_heatmap(ax, R, C, z, &(kv_heat_style_t){.annotate = bad[i]}) == KV_EINVAL,
                      "format %s accepted", bad[i]);
    /* with and without values: text pixels appear only inside the cells when asked for */
    cairo_surface_t *img[2];
    for (int k = 0; k < 2; k++) {
        kv_fig_free(fig);
        ck_assert_int_eq(kv_fig_create(500, 300, &fig), KV_OK);
        ax = kv_fig_axes(fig, 0, 0);
        ck_assert_int_eq(kv_plot_heatmap(ax, R, C, z, &(kv_heat_style_t){.annotate = k ? "%.2f%%" : NULL}), KV_OK);
        img[k] = render(fig);
    }
    double px, py, qx, qy;
    kv_axes_data_to_px(ax, -0.5, -0.5, &px, &py);
    kv_axes_data_to_px(ax, 0.5, 0.5, &qx, &qy);
    long changed = 0;
    for (int y = (int)py + 1; y < (int)qy - 1; y++)
        for (int x = (int)px + 1; x < (int)qx - 1; x++) {
            px_t a = pixel(img[0], x, y), b = pixel(img[1], x, y);
            changed += a.r != b.r || a.g != b.g || a.b != b.b;
        }
    /* "0.10%" at 14 px covers a few hundred pixels of its cell, never most of it */
    ck_assert_msg(changed > 50 && changed < (qx - px) * (qy - py) / 2, "cell (0, 0): %ld pixels changed", changed);
    for (int k = 0; k < 2; k++)
        cairo_surface_destroy(img[k]);
    kv_fig_free(fig);
}
END_TEST

/* Tick labels never overlap their neighbours and stay inside the figure, whatever the axis: many
 * short categories (thinned), long ones (rotated), wide numbers, log axes, small panels. */
static void check_labels(const kv_axes_t *ax, int W, int H, const char *what)
{
    for (int pass = 0; pass < 2; pass++) {
        const axis_t *a = pass ? &ax->y : &ax->x;
        ck_assert_msg(a->n_lab >= 2 || a->ncat == 1, "%s: %s axis has %d labels", what, pass ? "y" : "x", a->n_lab);
        for (int i = 0; i < a->n_lab; i++) {
            const double *b = a->lab_box[i];
            /* 1 px of slack for anti-aliasing */
            ck_assert_msg(b[0] >= -1 && b[1] >= -1 && b[2] <= W + 1 && b[3] <= H + 1,
                          "%s: label %d at [%.0f %.0f %.0f %.0f] leaves the %dx%d figure", what, i, b[0], b[1], b[2],
                          b[3], W, H);
            for (int j = i + 1; j < a->n_lab; j++)
                ck_assert_msg(a->lab_hi[i] <= a->lab_lo[j] || a->lab_hi[j] <= a->lab_lo[i],
                              "%s: %s labels %d [%.1f, %.1f] and %d [%.1f, %.1f] overlap", what, pass ? "y" : "x", i,
                              a->lab_lo[i], a->lab_hi[i], j, a->lab_lo[j], a->lab_hi[j]);
        }
    }
}

START_TEST(render_tick_labels_never_overlap)
{
    static const int sizes[3][2] = {{1600, 1000}, {640, 400}, {320, 240}};
    char names[200][40];
    const char *cats[200];
    for (int i = 0; i < 200; i++) {
        snprintf(names[i], sizeof names[i], i % 3 ? "c%d" : "a much longer category %d", i);
        cats[i] = names[i];
    }
    double x[64], y[64];
    for (int sz = 0; sz < 3; sz++) {
        int W = sizes[sz][0], H = sizes[sz][1];
        for (int kind = 0; kind < 5; kind++) {
            kv_fig_t *fig;
            ck_assert_int_eq(kv_fig_create(W, H, &fig), KV_OK);
            kv_axes_t *ax = kv_fig_axes(fig, 0, 0);
            int n = kind == 0 ? 200 : kind == 1 ? 12 : 64;
            for (int i = 0; i < 64; i++) {
                /* kind 2: 13-character labels; kind 3: a narrow log range (20..80) whose labels
                 * crowd at the top end */
                x[i] = kind == 2 ? 123456789 + 0.001 * i : kind == 3 ? 20 * pow(4, i / 63.0) : i;
                y[i] = kind == 3 ? pow(2, 0.3 * i) : kind == 4 ? -123456.75 + 3.3 * i * i : sin(i);
            }
            if (kind <= 1) {
                ck_assert_int_eq(kv_axes_set_xcategories(ax, n, cats), KV_OK);
                ck_assert_int_eq(kv_axes_set_ycategories(ax, n < 50 ? n : 50, cats), KV_OK);
                double v[200];
                for (int i = 0; i < n; i++)
                    v[i] = i % 50;
                ck_assert_int_eq(kv_plot_bars(ax, n, v, NULL), KV_OK);
            } else {
                if (kind == 3) {
                    kv_axes_set_xscale(ax, KV_SCALE_LOG);
                    kv_axes_set_yscale(ax, KV_SCALE_LOG2);
                }
                ck_assert_int_eq(kv_plot_line(ax, 64, x, y, NULL), KV_OK);
            }
            kv_axes_set_xlabel(ax, "x (units)");
            kv_axes_set_ylabel(ax, "y (units)");
            cairo_surface_t *s = render(fig);
            char what[64];
            snprintf(what, sizeof what, "%dx%d kind %d", W, H, kind);
            check_labels(ax, W, H, what);
            cairo_surface_destroy(s);
            kv_fig_free(fig);
        }
    }
}
END_TEST

/* The vector path (any non-image surface: SVG, PDF, here a recording surface) draws the same
 * picture as the image path: replayed into an image, it matches the direct render. */
START_TEST(render_vector_path_matches_image)
{
    enum { N = 16 };
    float z[N * N];
    for (int i = 0; i < N * N; i++)
        z[i] = (float)((i * 37) % 101) / 100.0f;
    kv_fig_t *fig;
    ck_assert_int_eq(kv_fig_create(600, 300, &fig), KV_OK);
    ck_assert_int_eq(kv_fig_grid(fig, 1, 2), KV_OK);
    double y[5] = {3, 1, 4, 1, 5};
    ck_assert_int_eq(
        kv_plot_line(kv_fig_axes(fig, 0, 0), 5, NULL, y, &(kv_style_t){.label = "pi", .marker = KV_MARKER_SQUARE}),
        KV_OK);
    ck_assert_int_eq(kv_plot_heatmap(kv_fig_axes(fig, 0, 1), N, N, z, NULL), KV_OK);
    cairo_surface_t *direct = render(fig);
    cairo_rectangle_t extent = {0, 0, 600, 300};
    cairo_surface_t *rec = cairo_recording_surface_create(CAIRO_CONTENT_COLOR_ALPHA, &extent);
    cairo_t *cr = cairo_create(rec);
    ck_assert_int_eq(kv_fig_render(fig, cr), KV_OK);
    cairo_destroy(cr);
    cairo_surface_t *replay = cairo_image_surface_create(CAIRO_FORMAT_ARGB32, 600, 300);
    cr = cairo_create(replay);
    cairo_set_source_surface(cr, rec, 0, 0);
    cairo_paint(cr);
    cairo_destroy(cr);
    cairo_surface_flush(replay);
    /* tolerance: identical geometry; only heat-map cell edges may be resampled differently (the
     * vector path upscales the cell image), so at most 2 % of pixels differ by more than 8 levels */
    long differ = 0;
    for (int yy = 0; yy < 300; yy++)
        for (int xx = 0; xx < 600; xx++) {
            px_t a = pixel(direct, xx, yy), b = pixel(replay, xx, yy);
            differ += abs(a.r - b.r) > 8 || abs(a.g - b.g) > 8 || abs(a.b - b.b) > 8;
        }
    ck_assert_msg(differ < 600 * 300 / 50, "%ld pixels differ between image and vector paths", differ);
    cairo_surface_destroy(direct);
    cairo_surface_destroy(replay);
    cairo_surface_destroy(rec);
    kv_fig_free(fig);
}
END_TEST

/* ---------------------------------------------------------------- files */

static void check_magic(const char *path, const char *magic, size_t len)
{
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "%s not written", path);
    char buf[16] = {0};
    size_t n = fread(buf, 1, sizeof buf, f);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    ck_assert_msg(n >= len && memcmp(buf, magic, len) == 0, "%s: wrong magic bytes", path);
    ck_assert_msg(size > 1000, "%s: only %ld bytes", path, size);
}

START_TEST(save_formats)
{
    kv_fig_t *fig;
    ck_assert_int_eq(kv_fig_create(400, 300, &fig), KV_OK);
    kv_axes_t *ax = kv_fig_axes(fig, 0, 0);
    double y[3] = {1, 2, 3};
    float z[4] = {1, 2, 3, 4};
    kv_fig_set_title(fig, "formats");
    ck_assert_int_eq(kv_plot_line(ax, 3, NULL, y, &(kv_style_t){.label = "line"}), KV_OK);
    kv_axes_t *hx;
    ck_assert_int_eq(kv_fig_add_axes(fig, 0.6, 0.6, 0.4, 0.4, &hx), KV_OK);
    ck_assert_int_eq(kv_plot_heatmap(hx, 2, 2, z, NULL), KV_OK);
    char png[256], svg[256], pdf[256], PNG[256], tmp[300];
    kv_test_tmp("fig.png", png, sizeof png);
    kv_test_tmp("fig.svg", svg, sizeof svg);
    kv_test_tmp("fig.pdf", pdf, sizeof pdf);
    kv_test_tmp("FIG.PNG", PNG, sizeof PNG);
    ck_assert_msg(kv_fig_save(fig, png) == KV_OK, "%s", kv_last_error());
    ck_assert_msg(kv_fig_save(fig, svg) == KV_OK, "%s", kv_last_error());
    ck_assert_msg(kv_fig_save(fig, pdf) == KV_OK, "%s", kv_last_error());
    ck_assert_msg(kv_fig_save(fig, PNG) == KV_OK, "%s", kv_last_error());
    check_magic(png, "\x89PNG\r\n\x1a\n", 8);
    check_magic(PNG, "\x89PNG\r\n\x1a\n", 8);
    check_magic(pdf, "%PDF-", 5);
    check_magic(svg, "<?xml", 5);
    /* the PNG decodes back to the figure's size */
    cairo_surface_t *s = cairo_image_surface_create_from_png(png);
    ck_assert_int_eq(cairo_surface_status(s), CAIRO_STATUS_SUCCESS);
    ck_assert_int_eq(cairo_image_surface_get_width(s), 400);
    ck_assert_int_eq(cairo_image_surface_get_height(s), 300);
    cairo_surface_destroy(s);
    /* no temporary files left behind */
    snprintf(tmp, sizeof tmp, "%s.tmp", png);
    ck_assert_int_ne(access(tmp, F_OK), 0);
    for (int i = 0; i < 3; i++)
        unlink(i == 0 ? png : i == 1 ? svg : pdf);
    unlink(PNG);
    kv_fig_free(fig);
}
END_TEST

START_TEST(save_errors_name_the_file)
{
    kv_fig_t *fig;
    ck_assert_int_eq(kv_fig_create(200, 100, &fig), KV_OK);
    const char *bad = "build/test-tmp/no-such-dir/figure.png";
    ck_assert_int_eq(kv_fig_save(fig, bad), KV_EIO);
    ck_assert_msg(strstr(kv_last_error(), bad) != NULL, "message does not name the file: %s", kv_last_error());
    ck_assert_int_eq(kv_fig_save(fig, "build/test-tmp/no-such-dir/figure.pdf"), KV_EIO);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "figure.pdf"));
    ck_assert_int_eq(kv_fig_save(fig, "figure.bmp"), KV_EINVAL);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "figure.bmp"));
    ck_assert_ptr_nonnull(strstr(kv_last_error(), ".png"));
    kv_fig_free(fig);
}
END_TEST

Suite *suite_plots(void)
{
    Suite *s = suite_create("plots");
    TCase *t = tcase_create("ticks");
    tcase_add_test(t, ticks_unit_interval);
    tcase_add_test(t, ticks_3_to_97);
    tcase_add_test(t, ticks_nice_over_many_ranges);
    tcase_add_test(t, ticks_degenerate_and_bad);
    tcase_add_test(t, ticks_tiny_and_huge);
    tcase_add_test(t, ticks_format_no_float_noise);
    tcase_add_test(t, ticks_log_decades);
    tcase_add_test(t, ticks_log2_budgets);
    suite_add_tcase(s, t);
    t = tcase_create("colour");
    tcase_add_test(t, palette_distinct);
    tcase_add_test(t, cmaps_endpoints_and_lightness);
    suite_add_tcase(s, t);
    t = tcase_create("render");
    tcase_add_test(t, render_size_and_ink);
    tcase_add_test(t, render_heatmap_hot_cell);
    tcase_add_test(t, render_heatmap_extent);
    tcase_add_test(t, render_log_heatmap_with_zeros);
    tcase_add_test(t, render_line_peak_lands);
    tcase_add_test(t, render_bars_tallest);
    tcase_add_test(t, render_legend_avoids_data);
    tcase_add_test(t, render_shared_colorbar_scale);
    tcase_add_test(t, render_edge_inputs);
    tcase_add_test(t, render_vector_path_matches_image);
    tcase_add_test(t, render_heatmap_annotations);
    tcase_add_test(t, render_tick_labels_never_overlap);
    suite_add_tcase(s, t);
    t = tcase_create("files");
    tcase_add_test(t, save_formats);
    tcase_add_test(t, save_errors_name_the_file);
    suite_add_tcase(s, t);
    return s;
}
