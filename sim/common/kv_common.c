/*
 * kv_common.c: per-thread error messages, checked allocation, clocks, SHA-256 (through OpenSSL's
 * libcrypto) and small formatting helpers.
 */
#include "sim/common/kv_common.h"

#include <errno.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#ifndef KV_GIT_REV
#define KV_GIT_REV "unknown"
#endif

static _Thread_local char g_msg[1024];

int kv_error(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_msg, sizeof g_msg, fmt, ap);
    va_end(ap);
    return code;
}

int kv_error_context(int code, const char *fmt, ...)
{
    char prefix[512], old[sizeof g_msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, g_msg, sizeof old);
    if (old[0])
        snprintf(g_msg, sizeof g_msg, "%s: %s", prefix, old);
    else
        snprintf(g_msg, sizeof g_msg, "%s: %s", prefix, kv_strerror(code));
    return code;
}

const char *kv_last_error(void) { return g_msg; }
void kv_clear_error(void) { g_msg[0] = 0; }

const char *kv_strerror(int code)
{
    switch (code) {
    case KV_OK: return "ok";
    case KV_EINVAL: return "invalid argument";
    case KV_EIO: return "I/O error";
    case KV_EFORMAT: return "malformed file";
    case KV_ENOMEM: return "out of memory";
    case KV_EUNAVAIL: return "unavailable";
    case KV_ERANGE: return "out of range";
    case KV_ENOTIMPL: return "not implemented";
    case KV_EINTERNAL: return "internal error";
    default: return "unknown error";
    }
}

void *kv_malloc(size_t bytes, const char *what)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p)
        kv_error(KV_ENOMEM, "out of memory allocating %zu bytes for %s", bytes, what ? what : "buffer");
    return p;
}

void *kv_calloc(size_t n, size_t size, const char *what)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p)
        kv_error(KV_ENOMEM, "out of memory allocating %zu x %zu bytes for %s", n, size,
                 what ? what : "buffer");
    return p;
}

void *kv_realloc(void *p, size_t bytes, const char *what)
{
    void *q = realloc(p, bytes ? bytes : 1);
    if (!q)
        kv_error(KV_ENOMEM, "out of memory growing %s to %zu bytes", what ? what : "buffer", bytes);
    return q;
}

void *kv_malloc_aligned(size_t bytes, const char *what)
{
    void *p = NULL;
    size_t rounded = (bytes + 63) & ~(size_t)63;
    if (posix_memalign(&p, 64, rounded ? rounded : 64) != 0) {
        kv_error(KV_ENOMEM, "out of memory allocating %zu bytes for %s", bytes, what ? what : "buffer");
        return NULL;
    }
    return p;
}

void kv_free(void *p) { free(p); }
void kv_free_aligned(void *p) { free(p); }

char *kv_strdup(const char *s)
{
    if (!s)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = kv_malloc(n, "string");
    if (d)
        memcpy(d, s, n);
    return d;
}

double kv_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void kv_iso_time(char *buf, size_t len)
{
    time_t t = time(NULL);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

size_t kv_peak_rss(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return 0;
    return (size_t)ru.ru_maxrss * 1024; /* Linux reports KiB */
}

const char *kv_fmt_bytes(double bytes, char *buf, size_t len)
{
    static const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (bytes >= 1024.0 && u < 4) {
        bytes /= 1024.0;
        u++;
    }
    snprintf(buf, len, u ? "%.1f %s" : "%.0f %s", bytes, units[u]);
    return buf;
}

int kv_sha256_file(const char *path, char hex[65])
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return kv_error(KV_EIO, "%s: cannot open: %s", path, strerror(errno));
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int rc = KV_OK;
    unsigned char buf[1 << 16], md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (!ctx || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1) {
        rc = kv_error(KV_EINTERNAL, "sha256: cannot initialise digest");
        goto done;
    }
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0)
        EVP_DigestUpdate(ctx, buf, n);
    if (ferror(f)) {
        rc = kv_error(KV_EIO, "%s: read error: %s", path, strerror(errno));
        goto done;
    }
    EVP_DigestFinal_ex(ctx, md, &mdlen);
    for (unsigned i = 0; i < mdlen && i < 32; i++)
        sprintf(hex + 2 * i, "%02x", md[i]);
    hex[64] = 0;
done:
    EVP_MD_CTX_free(ctx);
    fclose(f);
    return rc;
}

const char *kv_git_revision(void) { return KV_GIT_REV; }
