/*
 * kv_common.h: status codes, error messages and small helpers shared by every kvsim module.
 *
 * Every library function that can fail returns an int status: KV_OK (0) on success or a negative
 * KV_E* code. The function that detects the failure records a human-readable message with
 * kv_error(); callers read it with kv_last_error(). Messages are per thread. Library code never
 * exits; the CLI prints "kvsim: <message>" and exits non-zero.
 */
#ifndef KV_COMMON_H
#define KV_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KV_VERSION "0.1.0"

enum {
    KV_OK = 0,
    KV_EINVAL = -1,   /* bad argument or parameter */
    KV_EIO = -2,      /* file system or HDF5 I/O failure */
    KV_EFORMAT = -3,  /* malformed input file */
    KV_ENOMEM = -4,   /* allocation failed */
    KV_EUNAVAIL = -5, /* backend or feature not available here */
    KV_ERANGE = -6,   /* value out of range */
    KV_ENOTIMPL = -7, /* operation not implemented by this backend */
    KV_EINTERNAL = -8 /* invariant broken: a bug */
};

/* Record a printf-style message for the current thread and return `code` (for `return kv_error(...)`). */
int kv_error(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prefix the current message with "<prefix>: " (adds context on the way up), return `code`. */
int kv_error_context(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Last message recorded on this thread ("" if none). */
const char *kv_last_error(void);
/* Short name of a status code ("invalid argument", ...). */
const char *kv_strerror(int code);
void kv_clear_error(void);

/* Checked allocation: NULL on failure with a message naming `what`. Free with kv_free (accepts NULL). */
void *kv_malloc(size_t bytes, const char *what);
void *kv_calloc(size_t n, size_t size, const char *what);
void *kv_realloc(void *p, size_t bytes, const char *what);
/* 64-byte aligned allocation (for SIMD and BLAS buffers); free with kv_free_aligned. */
void *kv_malloc_aligned(size_t bytes, const char *what);
void kv_free(void *p);
void kv_free_aligned(void *p);
char *kv_strdup(const char *s);

/* Wall clock in seconds (monotonic). */
double kv_now(void);
/* Current UTC date-time as ISO 8601 into buf (>= 32 bytes). */
void kv_iso_time(char *buf, size_t len);
/* Peak resident set size of this process in bytes (0 when unknown). */
size_t kv_peak_rss(void);
/* Human-readable byte count ("12.3 MiB") into buf. */
const char *kv_fmt_bytes(double bytes, char *buf, size_t len);

/* SHA-256 of a whole file as 64 lowercase hex chars + NUL. */
int kv_sha256_file(const char *path, char hex[65]);
/* SHA-256 of n bytes, the same way. */
int kv_sha256_buf(const void *data, size_t n, char hex[65]);
/* Open an input that must be a regular file (a model, tokenizer, trace: read at random, never a
 * FIFO or a device, on which opening alone would block or reading would never end) for reading.
 * Errors name the file: "cannot open <what>: <reason>" or "not a regular file". */
int kv_open_input(const char *path, const char *what, FILE **out);
/* The whole of a file ("-": standard input) into a NUL-terminated buffer (kv_free) of *len bytes (len
 * may be NULL; the bytes may hold NULs). More than `max` bytes is an error naming the file. */
int kv_read_file(const char *path, size_t max, char **out, size_t *len);
/* Map a regular file read-only into *map (*len bytes; release with munmap). Errors name the file:
 * "cannot open <what>", "not a regular file", and when it is shorter than min_size bytes "file is N
 * bytes, shorter than the <min_what>". */
int kv_map_file(const char *path, const char *what, size_t min_size, const char *min_what, void **map, size_t *len);

/* Git revision the binary was built from ("unknown" outside a checkout). */
const char *kv_git_revision(void);

#define KV_MIN(a, b) ((a) < (b) ? (a) : (b))
#define KV_MAX(a, b) ((a) > (b) ? (a) : (b))
#define KV_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

#ifdef __cplusplus
}
#endif
#endif
