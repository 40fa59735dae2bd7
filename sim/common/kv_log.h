/*
 * kv_log.h: messages and progress on stderr.
 *
 * Long work (capture, synth, replay, analyze) reports progress so a user sees it is alive: on a
 * terminal one line is rewritten in place at most ten times a second; when stderr is a file or a
 * pipe a plain line is printed at most every few seconds. --quiet sets the level to 0: no progress
 * and no information lines; warnings are still printed.
 */
#ifndef KV_LOG_H
#define KV_LOG_H

#ifdef __cplusplus
extern "C" {
#endif

enum { KV_LOG_QUIET = 0, KV_LOG_INFO = 1, KV_LOG_DEBUG = 2 };

void kv_log_set_level(int level);
int kv_log_get_level(void);
/* "kvsim: <message>\n" on stderr when level >= KV_LOG_INFO. */
void kv_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* "kvsim: warning: <message>\n", printed at every level (quiet included). */
void kv_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void kv_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

typedef struct {
    char what[64];
    long total;
    double t0, last;
    int tty, shown;
} kv_progress_t;

void kv_progress_begin(kv_progress_t *p, const char *what, long total);
/* Report `done` of `total` units; `detail` (may be NULL) is appended. Rate-limited. */
void kv_progress_update(kv_progress_t *p, long done, const char *detail);
/* Final line with the elapsed time. */
void kv_progress_end(kv_progress_t *p, const char *detail);

#ifdef __cplusplus
}
#endif
#endif
