/* kv_log.c: see kv_log.h. */
#include "sim/common/kv_log.h"

#include "sim/common/kv_common.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int g_level = KV_LOG_INFO;

void kv_log_set_level(int level)
{
    g_level = level;
}
int kv_log_get_level(void)
{
    return g_level;
}

static void vlog(const char *tag, const char *fmt, va_list ap)
{
    fprintf(stderr, "kvsim: %s", tag);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

void kv_info(const char *fmt, ...)
{
    if (g_level < KV_LOG_INFO)
        return;
    va_list ap;
    va_start(ap, fmt);
    vlog("", fmt, ap);
    va_end(ap);
}

void kv_warn(const char *fmt, ...)
{
    /* printed even when quiet: --quiet silences progress and information, never a warning about
     * the results (a skipped policy, a degenerate budget, a mismatched trace) */
    va_list ap;
    va_start(ap, fmt);
    vlog("warning: ", fmt, ap);
    va_end(ap);
}

void kv_debug(const char *fmt, ...)
{
    if (g_level < KV_LOG_DEBUG)
        return;
    va_list ap;
    va_start(ap, fmt);
    vlog("debug: ", fmt, ap);
    va_end(ap);
}

void kv_progress_begin(kv_progress_t *p, const char *what, long total)
{
    memset(p, 0, sizeof *p);
    snprintf(p->what, sizeof p->what, "%s", what);
    p->total = total;
    p->t0 = kv_now();
    p->last = -1e9;
    p->tty = isatty(STDERR_FILENO);
}

static void show(kv_progress_t *p, long done, const char *detail, int final)
{
    double el = kv_now() - p->t0;
    char pct[32] = "";
    if (p->total > 0)
        snprintf(pct, sizeof pct, " %ld/%ld (%3.0f%%)", done, p->total, 100.0 * done / p->total);
    fprintf(stderr, "%skvsim: %s%s %.1fs%s%s%s", p->tty ? "\r\033[K" : "", p->what, pct, el, detail ? " " : "",
            detail ? detail : "", (p->tty && !final) ? "" : "\n");
    fflush(stderr);
    p->shown = 1;
}

void kv_progress_update(kv_progress_t *p, long done, const char *detail)
{
    if (g_level < KV_LOG_INFO)
        return;
    double t = kv_now();
    double gap = p->tty ? 0.1 : 5.0;
    if (t - p->last < gap)
        return;
    p->last = t;
    show(p, done, detail, 0);
}

void kv_progress_end(kv_progress_t *p, const char *detail)
{
    if (g_level < KV_LOG_INFO)
        return;
    show(p, p->total, detail, 1);
}
