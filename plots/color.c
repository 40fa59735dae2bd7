/*
 * color.c: the qualitative palette and the sequential / diverging colour maps of plots/.
 *
 * Palette: the eight colours of Okabe & Ito's "Color Universal Design" (2008), a published colour
 * specification chosen so that people with the common forms of colour-vision deficiency can tell
 * them apart. Order: the high-contrast colours first; yellow, weak on white, last.
 *
 * Colour maps are built here, not copied: each map is a path in CIE LCh (the polar form of
 * CIELAB, D65 white) with lightness L* linear in t (so equal steps in value are equal steps in
 * perceived lightness, and the map reads correctly in grey-scale print), hue and chroma
 * interpolated smoothly between a few anchors placed inside the sRGB gamut. Should a colour still
 * fall outside the gamut, chroma is reduced (bisection) until it fits, which keeps L* exact and so
 * keeps the lightness ramp monotone. Formulas: sRGB transfer curve
 * (IEC 61966-2-1), sRGB -> XYZ matrix and CIELAB from CIE 15:2004.
 */
#include "plots/kv_plot.h"

#include <math.h>

static const unsigned okabe_ito[KV_PALETTE_SIZE] = {
    0x0072B2, /* blue */
    0xD55E00, /* vermillion */
    0x009E73, /* bluish green */
    0xCC79A7, /* reddish purple */
    0xE69F00, /* orange */
    0x56B4E9, /* sky blue */
    0x000000, /* black */
    0xF0E442, /* yellow */
};

kv_rgba_t kv_rgb_hex(unsigned rgb)
{
    kv_rgba_t c = {((rgb >> 16) & 0xff) / 255.0, ((rgb >> 8) & 0xff) / 255.0, (rgb & 0xff) / 255.0, 1.0};
    return c;
}

kv_rgba_t kv_palette(int i)
{
    int k = i % KV_PALETTE_SIZE;
    if (k < 0)
        k += KV_PALETTE_SIZE;
    return kv_rgb_hex(okabe_ito[k]);
}

kv_rgba_t kv_rgba_alpha(kv_rgba_t c, double alpha)
{
    c.a *= alpha;
    return c;
}

/* ---- colour-space conversions */

static double srgb_to_linear(double u)
{
    return u <= 0.04045 ? u / 12.92 : pow((u + 0.055) / 1.055, 2.4);
}

static double linear_to_srgb(double u)
{
    return u <= 0.0031308 ? 12.92 * u : 1.055 * pow(u, 1.0 / 2.4) - 0.055;
}

/* D65 reference white */
static const double WX = 0.95047, WY = 1.0, WZ = 1.08883;

static double lab_f(double t)
{
    const double d = 6.0 / 29.0;
    return t > d * d * d ? cbrt(t) : t / (3 * d * d) + 4.0 / 29.0;
}

static double lab_finv(double t)
{
    const double d = 6.0 / 29.0;
    return t > d ? t * t * t : 3 * d * d * (t - 4.0 / 29.0);
}

static void rgb_to_lab(kv_rgba_t c, double lab[3])
{
    double r = srgb_to_linear(c.r), g = srgb_to_linear(c.g), b = srgb_to_linear(c.b);
    double x = 0.4124 * r + 0.3576 * g + 0.1805 * b;
    double y = 0.2126 * r + 0.7152 * g + 0.0722 * b;
    double z = 0.0193 * r + 0.1192 * g + 0.9505 * b;
    double fx = lab_f(x / WX), fy = lab_f(y / WY), fz = lab_f(z / WZ);
    lab[0] = 116 * fy - 16;
    lab[1] = 500 * (fx - fy);
    lab[2] = 200 * (fy - fz);
}

/* Lab -> linear-light RGB (not clamped; components outside [0, 1] mean out of gamut). */
static void lab_to_linear_rgb(double L, double a, double b, double rgb[3])
{
    double fy = (L + 16) / 116, fx = fy + a / 500, fz = fy - b / 200;
    double x = WX * lab_finv(fx), y = WY * lab_finv(fy), z = WZ * lab_finv(fz);
    rgb[0] = 3.2406 * x - 1.5372 * y - 0.4986 * z;
    rgb[1] = -0.9689 * x + 1.8758 * y + 0.0415 * z;
    rgb[2] = 0.0557 * x - 0.2040 * y + 1.0570 * z;
}

static int in_gamut(const double rgb[3])
{
    const double eps = 1e-9;
    for (int i = 0; i < 3; i++)
        if (rgb[i] < -eps || rgb[i] > 1 + eps)
            return 0;
    return 1;
}

/* sRGB colour of (L, C, h in degrees), with C reduced until it fits the gamut. */
static kv_rgba_t lch_to_rgb_clipped(double L, double C, double h)
{
    double hr = h * M_PI / 180.0, rgb[3];
    lab_to_linear_rgb(L, C * cos(hr), C * sin(hr), rgb);
    if (!in_gamut(rgb)) {
        double lo = 0, hi = C;
        for (int it = 0; it < 40; it++) {
            double mid = 0.5 * (lo + hi);
            lab_to_linear_rgb(L, mid * cos(hr), mid * sin(hr), rgb);
            if (in_gamut(rgb))
                lo = mid;
            else
                hi = mid;
        }
        lab_to_linear_rgb(L, lo * cos(hr), lo * sin(hr), rgb);
    }
    double u[3];
    for (int i = 0; i < 3; i++)
        u[i] = fmin(1.0, fmax(0.0, linear_to_srgb(fmin(1.0, fmax(0.0, rgb[i])))));
    kv_rgba_t c = {u[0], u[1], u[2], 1.0};
    return c;
}

double kv_rgba_lightness(kv_rgba_t c)
{
    double lab[3];
    rgb_to_lab(c, lab);
    return lab[0];
}

double kv_rgba_distance(kv_rgba_t a, kv_rgba_t b)
{
    double la[3], lb[3];
    rgb_to_lab(a, la);
    rgb_to_lab(b, lb);
    return sqrt((la[0] - lb[0]) * (la[0] - lb[0]) + (la[1] - lb[1]) * (la[1] - lb[1]) +
                (la[2] - lb[2]) * (la[2] - lb[2]));
}

/* ---- colour maps: lightness endpoints, then (t, hue, chroma) anchors; hue unwrapped (may pass
 * 360). Anchors were placed by reading the sRGB gamut boundary along each path (max chroma per
 * L* and hue) and staying 10-20 % inside it, so the gamut clip below is a safety net that does not
 * engage and leaves no Mach bands; hue and chroma are interpolated with monotone cubic Hermite
 * splines (Fritsch & Carlson 1980), smooth at the anchors. */

#define MAX_ANCHORS 8

typedef struct {
    double t, h, c;
} anchor_t;

typedef struct {
    const char *name;
    double L0, L1;
    int n;
    anchor_t a[MAX_ANCHORS];
} cmap_def_t;

static const cmap_def_t cmaps[KV_CMAP_COUNT] = {
    /* dark violet -> blue -> cyan-blue -> teal -> green -> yellow-green -> yellow */
    [KV_CMAP_VIRIDIS] = {"viridis-lab",
                         18,
                         93,
                         7,
                         {{0.0, 300, 38},
                          {0.227, 275, 33},
                          {0.40, 240, 26},
                          {0.56, 195, 31},
                          {0.76, 150, 55},
                          {0.893, 120, 72},
                          {1.0, 102, 58}}},
    /* near white -> sky -> mid blue -> dark navy */
    [KV_CMAP_BLUES] =
        {"blues", 97, 20, 5, {{0.0, 230, 4}, {0.22, 240, 20}, {0.48, 252, 34}, {0.74, 268, 32}, {1.0, 285, 28}}},
    /* near black -> purple -> magenta -> red -> orange -> pale yellow */
    [KV_CMAP_MAGMA] = {"magma-lab",
                       8,
                       96,
                       7,
                       {{0.0, 290, 20},
                        {0.25, 310, 50},
                        {0.42, 340, 64},
                        {0.568, 380, 60},
                        {0.727, 410, 45},
                        {0.886, 435, 29},
                        {1.0, 455, 15}}},
    /* handled specially: blue half and orange-red half with a shared lightness profile */
    [KV_CMAP_DIVERGING] = {"diverging-lab", 0, 0, 0, {{0, 0, 0}}},
};

const char *kv_cmap_name(kv_cmap_t cmap)
{
    if ((int)cmap < 0 || cmap >= KV_CMAP_COUNT)
        return "?";
    return cmaps[cmap].name;
}

/* Monotone cubic Hermite interpolation of y(t) through n anchors (Fritsch-Carlson slopes). */
static double mono_cubic(const double *t, const double *y, int n, double x)
{
    if (n < 2 || x <= t[0])
        return y[0];
    if (x >= t[n - 1])
        return y[n - 1];
    double d[MAX_ANCHORS] = {0}, m[MAX_ANCHORS] = {0};
    for (int i = 0; i < n - 1; i++)
        d[i] = (y[i + 1] - y[i]) / (t[i + 1] - t[i]);
    m[0] = d[0];
    m[n - 1] = d[n - 2];
    for (int i = 1; i < n - 1; i++)
        m[i] = d[i - 1] * d[i] <= 0 ? 0 : 0.5 * (d[i - 1] + d[i]);
    for (int i = 0; i < n - 1; i++) {
        if (d[i] == 0) {
            m[i] = m[i + 1] = 0;
            continue;
        }
        double a = m[i] / d[i], b = m[i + 1] / d[i], r = a * a + b * b;
        if (r > 9) {
            double k = 3 / sqrt(r);
            m[i] = k * a * d[i];
            m[i + 1] = k * b * d[i];
        }
    }
    int i = 0;
    while (i < n - 2 && x > t[i + 1])
        i++;
    double h = t[i + 1] - t[i], u = (x - t[i]) / h;
    double h00 = (1 + 2 * u) * (1 - u) * (1 - u), h10 = u * (1 - u) * (1 - u), h01 = u * u * (3 - 2 * u),
           h11 = u * u * (u - 1);
    return h00 * y[i] + h10 * h * m[i] + h01 * y[i + 1] + h11 * h * m[i + 1];
}

static void anchors_eval(const cmap_def_t *d, double t, double *h, double *c)
{
    double ts[MAX_ANCHORS], hs[MAX_ANCHORS], cs[MAX_ANCHORS];
    for (int i = 0; i < d->n; i++) {
        ts[i] = d->a[i].t;
        hs[i] = d->a[i].h;
        cs[i] = d->a[i].c;
    }
    *h = mono_cubic(ts, hs, d->n, t);
    *c = mono_cubic(ts, cs, d->n, t);
}

kv_rgba_t kv_cmap_eval(kv_cmap_t cmap, double t)
{
    if (isnan(t)) {
        kv_rgba_t none = {0, 0, 0, 0};
        return none;
    }
    if ((int)cmap < 0 || cmap >= KV_CMAP_COUNT)
        cmap = KV_CMAP_VIRIDIS;
    t = fmin(1.0, fmax(0.0, t));
    if (cmap == KV_CMAP_DIVERGING) {
        /* lightness 40 at both ends, 97 in the middle; blue (h 276) below, orange-red (h 42) above;
         * chroma kept inside the gamut so clipping does not bend the hue */
        double s = fabs(2 * t - 1);
        double L = 97 - 57 * s;
        double C = (t < 0.5 ? 41 : 56) * pow(s, 0.8);
        return lch_to_rgb_clipped(L, C, t < 0.5 ? 276 : 42);
    }
    const cmap_def_t *d = &cmaps[cmap];
    double h, c;
    anchors_eval(d, t, &h, &c);
    return lch_to_rgb_clipped(d->L0 + t * (d->L1 - d->L0), c, fmod(h, 360.0));
}
