/*
 * ticks.c: tick positions and tick labels for linear, log10 and log2 axes.
 *
 * Linear axes use "nice" steps m x 10^k with m in {1, 2, 2.5, 5}: the smallest such step that
 * keeps the number of ticks within the budget the layout computed from the axis length. Tick
 * values are computed as k * m / 10^-e (never by repeated addition) so that decimal steps land on
 * the correctly rounded doubles, and labels are printed with exactly the precision of the step,
 * so float noise like 0.30000000000000004 never reaches the page.
 *
 * Log axes put majors at decades (or every 2, 3, 5, 10... decades on very wide ranges) and minor
 * ticks at 2..9 x 10^k, labelling 2 and 5 x 10^k as well when the budget allows. On ranges too narrow to contain two
 * decades, the densest of the label sets {1..9}, {1,2,4,6,8}, {1,2,5}, {1,3} x 10^k that fits is labelled (then linear
 * nice steps), so that an axis always carries at least two labels.
 */
#include "plots/kv_plot.h"
#include "sim/common/kv_common.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static double pow10i(int e)
{
    double r = 1.0;
    int a = e < 0 ? -e : e;
    for (int i = 0; i < a; i++)
        r *= 10.0;
    return e < 0 ? 1.0 / r : r;
}

/* value of k * m * 10^e with as little rounding as possible */
static double scaled(double km, int e)
{
    return e < 0 ? km / pow10i(-e) : km * pow10i(e);
}

static void add_tick(kv_ticks_t *t, double v, int major, int labelled)
{
    if (t->n >= KV_TICKS_MAX)
        return;
    t->t[t->n].value = v;
    t->t[t->n].major = major;
    t->t[t->n].labelled = labelled;
    t->n++;
}

/* Shared by the public linear generator and the log fallback. integer != 0 forbids steps below 1
 * and the 2.5 mantissa (for axes of counts and indices). */
int kv_ticks_linear_ex(double lo, double hi, int max_major, int integer, kv_ticks_t *out);

int kv_ticks_linear_ex(double lo, double hi, int max_major, int integer, kv_ticks_t *out)
{
    if (!out)
        return kv_error(KV_EINVAL, "kv_ticks_linear: NULL output");
    memset(out, 0, sizeof *out);
    if (!isfinite(lo) || !isfinite(hi))
        return kv_error(KV_EINVAL, "tick range [%g, %g] is not finite", lo, hi);
    if (lo > hi) {
        double s = lo;
        lo = hi;
        hi = s;
    }
    if (max_major < 2)
        max_major = 2;
    if (max_major > KV_TICKS_MAX)
        max_major = KV_TICKS_MAX;
    double mag = fmax(fabs(lo), fabs(hi));
    if (hi - lo <= mag * 1e-12 || hi - lo < 1e-300) {
        /* degenerate: widen around the value */
        double d = mag > 0 ? mag * 0.1 : 1.0;
        lo -= d;
        hi += d;
    }
    static const double mant[4] = {1, 2, 2.5, 5};
    double range = hi - lo;
    int e = (int)floor(log10(range / max_major)) - 1;
    /* Steps in increasing order; take the first whose tick count fits. Should that step leave fewer
     * than two ticks in the range, the coarsest finer step with two or more wins, even though it
     * has a few more than max_major: an axis needs two labels to be read. */
    double m_sel = 0, fb_m = 0;
    int e_sel = 0, fb_e = 0;
    for (int guard = 0; guard < 40 && m_sel == 0; guard++, e++) {
        for (int mi = 0; mi < 4; mi++) {
            double m = mant[mi], step = scaled(m, e);
            if (integer && (step < 1 || (m == 2.5 && e == 0)))
                continue;
            double count = floor(hi / step + 1e-9) - ceil(lo / step - 1e-9) + 1;
            if (count <= max_major) {
                m_sel = (count >= 2 || fb_m == 0) ? m : fb_m;
                e_sel = (count >= 2 || fb_m == 0) ? e : fb_e;
                break;
            }
            if (count >= 2 && count <= KV_TICKS_MAX) {
                fb_m = m;
                fb_e = e;
            }
        }
    }
    if (m_sel == 0)
        return kv_error(KV_EINTERNAL, "no tick step found for [%g, %g]", lo, hi);
    double step = scaled(m_sel, e_sel);
    double k0 = ceil(lo / step - 1e-9), k1 = floor(hi / step + 1e-9);
    out->step = step;
    out->decimals = e_sel < 0 ? -e_sel + (m_sel == 2.5) : 0;
    for (double k = k0; k <= k1; k++) {
        double v = scaled(k * m_sel, e_sel);
        if (fabs(v) < step * 1e-9)
            v = 0.0;
        add_tick(out, v, 1, 1);
    }
    /* Scientific labels for tiny values, and for huge ones when that is shorter: 5×10^11 beats
     * 500000000000, but 123456789.025 beats 1.23456789025×10^8. Lengths in characters, counting
     * "×10^k" as four. */
    double top = fmax(fabs(k0 * step), fabs(k1 * step));
    if (top > 0) {
        int E = (int)floor(log10(top) + 1e-9);
        int plain_len = KV_MAX(E, 0) + 1 + (out->decimals ? out->decimals + 1 : 0);
        int sci_len = (E - e_sel + 1) + 1 + 4;
        out->sci = E <= -4 || (E >= 6 && plain_len > sci_len + 2);
    }
    return KV_OK;
}

int kv_ticks_linear(double lo, double hi, int max_major, kv_ticks_t *out)
{
    return kv_ticks_linear_ex(lo, hi, max_major, 0, out);
}

int kv_ticks_log(double lo, double hi, int max_major, kv_ticks_t *out)
{
    if (!out)
        return kv_error(KV_EINVAL, "kv_ticks_log: NULL output");
    memset(out, 0, sizeof *out);
    if (!isfinite(lo) || !isfinite(hi) || lo <= 0 || hi <= 0)
        return kv_error(KV_EINVAL, "log tick range [%g, %g] must be finite and positive", lo, hi);
    if (lo > hi) {
        double s = lo;
        lo = hi;
        hi = s;
    }
    if (hi / lo < 1 + 1e-9) {
        lo /= 2;
        hi *= 2;
    }
    if (max_major < 2)
        max_major = 2;
    const double tol = 1e-9;
    double llo = log10(lo), lhi = log10(hi);
    int d0 = (int)ceil(llo - tol), d1 = (int)floor(lhi + tol);
    int nd = d1 - d0 + 1;
    if (nd >= 2) {
        static const int strides[] = {1, 2, 3, 5, 10, 20, 25, 50, 100, 200, 500};
        int s = 1;
        for (size_t i = 0; i < KV_ARRAY_LEN(strides); i++) {
            s = strides[i];
            int first = (int)ceil((double)d0 / s), last = (int)floor((double)d1 / s);
            if (last - first + 1 <= max_major)
                break;
        }
        out->log = 10;
        out->step = s;
        int minors = s == 1 && nd <= 12;
        /* with room to spare, 2 and 5 x 10^k carry labels too */
        int label25 = 0;
        if (minors) {
            int count = 0;
            for (int d = d0 - 1; d <= d1; d++)
                for (int m = 1; m <= 5; m += (m == 1 ? 1 : 3)) /* 1, 2, 5 */
                    count += m * pow10i(d) >= lo * (1 - tol) && m * pow10i(d) <= hi * (1 + tol);
            label25 = count <= max_major;
        }
        for (int d = d0 - 1; d <= d1; d++) {
            double dec = pow10i(d);
            if (d >= d0) {
                int lab = ((d % s) + s) % s == 0;
                /* skipped decades become unlabelled minor ticks when they are not too dense */
                if (lab || s <= 10)
                    add_tick(out, dec, lab, lab);
            }
            if (minors)
                for (int m = 2; m <= 9; m++) {
                    double v = m * dec;
                    if (v >= lo * (1 - tol) && v <= hi * (1 + tol))
                        add_tick(out, v, 0, label25 && (m == 2 || m == 5));
                }
        }
        return KV_OK;
    }
    /* narrow range: label every m x 10^k that fits, trying m in 1..9, then {1, 2, 4, 6, 8}, then
     * {1, 2, 5}, then {1, 3}, keeping the densest set within the budget with at least two labels */
    static const char *sets[4] = {"123456789", "12468", "125", "13"};
    for (int pass = 0; pass < 4; pass++) {
        kv_ticks_t t;
        memset(&t, 0, sizeof t);
        t.log = 10;
        int labelled = 0;
        for (int d = (int)floor(llo) - 1; d <= (int)ceil(lhi); d++)
            for (int m = 1; m <= 9; m++) {
                double v = m * pow10i(d);
                if (v < lo * (1 - tol) || v > hi * (1 + tol))
                    continue;
                int lab = strchr(sets[pass], '0' + m) != NULL;
                add_tick(&t, v, lab, lab);
                labelled += lab;
            }
        if (labelled >= 2 && labelled <= max_major) {
            *out = t;
            return KV_OK;
        }
    }
    /* less than a factor ~2 wide: linear nice steps, still placed on the log axis */
    int rc = kv_ticks_linear_ex(lo, hi, max_major, 0, out);
    out->log = 0; /* labels formatted as linear; the axis scale stays the caller's */
    return rc;
}

int kv_ticks_log2(double lo, double hi, int max_major, kv_ticks_t *out)
{
    if (!out)
        return kv_error(KV_EINVAL, "kv_ticks_log2: NULL output");
    memset(out, 0, sizeof *out);
    if (!isfinite(lo) || !isfinite(hi) || lo <= 0 || hi <= 0)
        return kv_error(KV_EINVAL, "log2 tick range [%g, %g] must be finite and positive", lo, hi);
    if (lo > hi) {
        double s = lo;
        lo = hi;
        hi = s;
    }
    if (max_major < 2)
        max_major = 2;
    const double tol = 1e-9;
    int p0 = (int)ceil(log2(lo) - tol), p1 = (int)floor(log2(hi) + tol);
    if (p1 - p0 + 1 < 2) {
        int rc = kv_ticks_linear_ex(lo, hi, max_major, 0, out);
        out->log = 0;
        return rc;
    }
    int s = 1;
    while ((int)floor((double)p1 / s) - (int)ceil((double)p0 / s) + 1 > max_major)
        s *= 2;
    out->log = 2;
    out->step = s;
    for (int p = p0; p <= p1; p++) {
        int lab = ((p % s) + s) % s == 0;
        add_tick(out, ldexp(1.0, p), lab, lab);
    }
    return KV_OK;
}

/* "1.50" -> "1.5", "2.00" -> "2" */
static void trim_zeros(char *s)
{
    char *dot = strchr(s, '.');
    if (!dot)
        return;
    char *end = s + strlen(s) - 1;
    while (end > dot && *end == '0')
        *end-- = '\0';
    if (end == dot)
        *end = '\0';
}

/* m x 10^p markup for v != 0 with `digits` digits after the mantissa's point (then trimmed) */
static void format_sci(double v, int digits, char *buf, size_t len)
{
    int p = (int)floor(log10(fabs(v)) + 1e-9);
    if (digits < 0)
        digits = 0;
    if (digits > 15)
        digits = 15;
    char m[64];
    snprintf(m, sizeof m, "%.*f", digits, v / pow10i(p));
    if (strcmp(m, "10") == 0 || strncmp(m, "10.", 3) == 0 || strcmp(m, "-10") == 0 || strncmp(m, "-10.", 4) == 0) {
        p++;
        snprintf(m, sizeof m, "%.*f", digits, v / pow10i(p));
    }
    trim_zeros(m);
    if (strcmp(m, "1") == 0)
        snprintf(buf, len, "10^{%d}", p);
    else if (strcmp(m, "-1") == 0)
        snprintf(buf, len, "-10^{%d}", p);
    else
        snprintf(buf, len,
                 "%s\xc3\x97"
                 "10^{%d}",
                 m, p); /* U+00D7 multiplication sign */
}

void kv_ticks_format(const kv_ticks_t *ticks, double v, char *buf, size_t len)
{
    if (!buf || len == 0)
        return;
    if (!ticks || !isfinite(v)) {
        snprintf(buf, len, "%g", v);
        return;
    }
    if (v == 0) {
        snprintf(buf, len, "%.*f", ticks->log ? 0 : ticks->decimals, 0.0);
        if (ticks->sci)
            snprintf(buf, len, "0");
        return;
    }
    if (ticks->log == 2) {
        int p = (int)lround(log2(fabs(v)));
        if (fabs(ldexp(1.0, p) - fabs(v)) <= fabs(v) * 1e-9 && p >= -6 && p <= 20)
            snprintf(buf, len, "%.*f", p < 0 ? -p : 0, v);
        else if (fabs(ldexp(1.0, p) - fabs(v)) <= fabs(v) * 1e-9)
            snprintf(buf, len, "2^{%d}", p);
        else
            snprintf(buf, len, "%g", v);
        return;
    }
    if (ticks->log == 10) {
        /* plain decimals when every labelled value is between 0.001 and 10^4, else powers of ten */
        int plain = 1;
        for (int i = 0; i < ticks->n; i++)
            if (ticks->t[i].labelled && (ticks->t[i].value < 0.000999 || ticks->t[i].value > 10001))
                plain = 0;
        int d = (int)floor(log10(fabs(v)) + 1e-9);
        if (plain) {
            snprintf(buf, len, "%.*f", d < 0 ? -d : 0, v);
            return;
        }
        format_sci(v, 0, buf, len);
        return;
    }
    if (ticks->sci) {
        /* enough mantissa digits to show the step: digits = exponent of v minus exponent of step */
        int pv = (int)floor(log10(fabs(v)) + 1e-9);
        int ps = (int)floor(log10(ticks->step) + 1e-9);
        double ms = ticks->step / pow10i(ps);
        int digits = pv - ps + (fabs(ms - 2.5) < 1e-9);
        format_sci(v, digits, buf, len);
        return;
    }
    snprintf(buf, len, "%.*f", ticks->decimals, v);
    if (strcmp(buf, "-0") == 0 || (strncmp(buf, "-0.", 3) == 0 && strspn(buf + 3, "0") == strlen(buf + 3)))
        memmove(buf, buf + 1, strlen(buf));
}
