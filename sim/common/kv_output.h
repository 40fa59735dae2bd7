/*
 * kv_output.h: every file kvsim writes goes through this module: traces (HDF5), results (TSV and
 * JSON), figures, reports, the demo's prompt and downloaded models. What it guarantees:
 *
 *   - A file under its final name is always complete. Data goes to a temporary file beside the
 *     target (same folder, so the rename is atomic); at commit the file is flushed, checked for
 *     write errors, fsync'ed, renamed over the target, and the folder is fsync'ed, so the new name
 *     survives a power loss and not only a kill.
 *   - Only regular files are written. A target that is a folder, a device (/dev/null), a FIFO or
 *     a socket is refused; a symbolic link is followed and the file it points to is replaced (the
 *     link stays a link). A file that replaces an existing one keeps its permission bits.
 *   - An output is never one of the command's inputs or another of its outputs: kv_out_check,
 *     called before any work, compares device and inode of existing files and canonical names of
 *     files that do not exist yet. It also creates (and removes) a file in the target's folder, so
 *     a missing, read-only or full folder is reported before the work, not after it.
 *   - Temporary names are unique (created with O_EXCL; the process id and a random part) and short
 *     enough for any legal target name: "<start of the name>.<pid>-<random>.kvsim-tmp". A writer
 *     holds an open-file-description lock on its temporary file for as long as it lives. SIGINT,
 *     SIGTERM, SIGHUP and SIGPIPE remove every temporary file of the process before it dies; a
 *     temporary file that no live process holds (left by SIGKILL or a power loss) is stale:
 *     kv_out_find_stale lists them (`kvsim info` reports them, `kvsim clean` removes them).
 *   - Sets of files that belong together (analyze's figures and reports, replay's TSV and JSON)
 *     are committed together: every member is written and synced under its temporary name first;
 *     a failure there removes them all and leaves the folder as it was. Only then are they renamed,
 *     with SIGINT/SIGTERM/SIGHUP/SIGPIPE blocked and the folder locked (flock) against another
 *     kvsim committing into it; "index" members (the reports that link the others) are removed
 *     before the others are renamed and renamed last, so a failure in the middle leaves no
 *     complete-looking set.
 *   - "-" is standard output: written directly; kv_out_commit flushes it and reports any write
 *     error ("standard output: write failed: No space left on device").
 *
 * Like the rest of sim/common, this module includes no other project header. Messages name the
 * path as the caller gave it.
 */
#ifndef KV_OUTPUT_H
#define KV_OUTPUT_H

#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KV_OUT_TEMP_SUFFIX ".kvsim-tmp"

typedef struct kv_out kv_out_t;

/* Before the work: `path` can be written (see above), and it is none of `others` (the command's
 * inputs and its other outputs; NULL entries, "-" and "(memory)" are skipped). "-" passes. */
int kv_out_check(const char *path, const char *const *others, int n_others);
/* 1 when a and b name the same file (following symbolic links), 0 otherwise. */
int kv_out_same(const char *a, const char *b);

/* Start writing `path` ("-": standard output): checks as kv_out_check (without others), creates and
 * locks the temporary file and registers it for removal on SIGINT/SIGTERM/SIGHUP/SIGPIPE. */
int kv_out_open(const char *path, kv_out_t **out);
/* Buffered stream on the temporary file (standard output for "-"); write errors are recorded with
 * their errno and reported by kv_out_commit. Do not fclose it. */
FILE *kv_out_stream(kv_out_t *o);
/* The temporary file's name, for libraries that open files by name (HDF5); "-" for stdout. */
const char *kv_out_temp(const kv_out_t *o);
/* The file that will be replaced (symbolic links followed). */
const char *kv_out_target(const kv_out_t *o);
/* Flush, check, fsync, rename over the target and fsync the folder; frees o. On failure the
 * temporary file is removed and the target is untouched. */
int kv_out_commit(kv_out_t *o);
/* Remove the temporary file and free o (NULL is accepted). */
void kv_out_abort(kv_out_t *o);

/* ---- sets of files committed together */
typedef struct kv_out_set kv_out_set_t;
enum { KV_OUT_INDEX = 1 }; /* a member that links the others (a report): removed first, renamed last */

int kv_out_set_create(kv_out_set_t **out);
/* A new member (owned by the set: never commit or abort it yourself). flags: 0 or KV_OUT_INDEX. */
int kv_out_set_open(kv_out_set_t *s, const char *path, int flags, kv_out_t **member);
/* Commit every member as described above; frees s (also on failure, after removing every
 * temporary file that was not renamed yet). */
int kv_out_set_commit(kv_out_set_t *s);
/* Remove every member's temporary file; frees s (NULL is accepted). */
void kv_out_set_abort(kv_out_set_t *s);

/* ---- whole files from a writer callback */
typedef void (*kv_out_put_fn)(const void *ctx, FILE *f);
/* `path` ("-": standard output) written by put(ctx, stream) and committed. */
int kv_out_write_one(const char *path, const void *ctx, kv_out_put_fn put);
/* A table as TSV (`tsv`, "-" for standard output) and, when `json` is not NULL, JSON (never standard
 * output), committed together: a failure leaves neither new file. */
int kv_out_write_pair(const char *tsv, const char *json, const void *ctx, kv_out_put_fn put_tsv,
                      kv_out_put_fn put_json);

/* ---- stale temporary files */
typedef struct {
    const char *path; /* the temporary file */
    uint64_t bytes;   /* its size */
    int pid;          /* the process that wrote it (dead) */
    int legacy;       /* named "<file>.tmp-<pid>" by a kvsim before this module */
} kv_out_stale_t;
/* Call fn for every stale temporary file in `dir` (and, when recursive, in its subfolders; symbolic
 * links are not followed); `dir` may also name one file. fn returns 0 to go on. Returns KV_OK or the
 * first error (a folder that cannot be read). */
int kv_out_find_stale(const char *dir, int recursive, int (*fn)(void *ctx, const kv_out_stale_t *s), void *ctx);
/* Remove one stale temporary file, checking again that no live process holds it. */
int kv_out_remove_stale(const char *path);

#ifdef __cplusplus
}
#endif
#endif
