/*
 * kv_output.c: see kv_output.h. Temporary files are created with O_EXCL beside their target and
 * locked with an open-file-description lock (F_OFD_SETLK: per open file, so it survives other
 * descriptors of the same file being closed, as HDF5 does with its own, and is released by the
 * kernel whatever way the process ends). A registry of the process's temporary files, read by the
 * signal handler without locks (each slot's path is complete before its flag is set), removes them
 * on SIGINT, SIGTERM, SIGHUP and SIGPIPE; a signal that the process inherited as ignored stays
 * ignored. Streams are fopencookie streams over the descriptor, so a write error keeps its errno
 * for the message.
 */
#include "sim/common/kv_output.h"

#include "sim/common/kv_common.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------- the signal registry */

#define MAX_TEMPS 64
static struct {
    volatile sig_atomic_t used;
    char path[PATH_MAX];
} g_temps[MAX_TEMPS];
static pthread_mutex_t g_temps_lock = PTHREAD_MUTEX_INITIALIZER;
static const int g_signals[] = {SIGINT, SIGTERM, SIGHUP, SIGPIPE};
static struct sigaction g_previous[4]; /* what each signal did before (restored to pass it on) */

static void on_signal(int sig)
{
    for (int i = 0; i < MAX_TEMPS; i++)
        if (g_temps[i].used)
            unlink(g_temps[i].path);
    /* then what the signal did before: the default action (the process ends) or the handler that
     * was installed (a test framework's, an embedding program's) */
    for (size_t i = 0; i < KV_ARRAY_LEN(g_signals); i++)
        if (g_signals[i] == sig)
            sigaction(sig, &g_previous[i], NULL);
    raise(sig); /* delivered once this handler returns */
}

static void install_handlers(void)
{
    static int installed = 0;
    if (installed)
        return;
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < KV_ARRAY_LEN(g_signals); i++)
        sigaddset(&sa.sa_mask, g_signals[i]); /* one handler at a time */
    for (size_t i = 0; i < KV_ARRAY_LEN(g_signals); i++)
        /* a signal inherited as ignored (`cmd &` in a non-interactive shell ignores SIGINT) stays
         * ignored: handling it would make the process killable by a signal it was meant to ignore */
        if (sigaction(g_signals[i], NULL, &old) == 0 && old.sa_handler != SIG_IGN) {
            g_previous[i] = old;
            sigaction(g_signals[i], &sa, NULL);
        }
    installed = 1;
}

static int register_temp(const char *path)
{
    pthread_mutex_lock(&g_temps_lock);
    install_handlers();
    int slot = -1;
    for (int i = 0; i < MAX_TEMPS && slot < 0; i++)
        if (!g_temps[i].used) {
            snprintf(g_temps[i].path, sizeof g_temps[i].path, "%s", path);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            g_temps[i].used = 1;
            slot = i;
        }
    pthread_mutex_unlock(&g_temps_lock);
    return slot;
}

static void unregister_temp(int slot)
{
    if (slot < 0)
        return;
    pthread_mutex_lock(&g_temps_lock);
    g_temps[slot].used = 0;
    pthread_mutex_unlock(&g_temps_lock);
}

/* ---------------------------------------------------------------- paths */

/* Folder and last component of `path` ("." for a bare name; "/" for "/x"). */
static void split_path(const char *path, char *dir, size_t dlen, char *base, size_t blen)
{
    const char *slash = strrchr(path, '/');
    if (!slash) {
        snprintf(dir, dlen, ".");
        snprintf(base, blen, "%s", path);
    } else {
        size_t n = (size_t)(slash - path);
        if (n == 0)
            snprintf(dir, dlen, "/");
        else
            snprintf(dir, dlen, "%.*s", (int)n, path);
        snprintf(base, blen, "%s", slash + 1);
    }
}

/* The file `path` names, symbolic links followed (up to 40; a dangling link names its target),
 * into out; *exists and *st tell whether it exists and what it is. */
static int resolve(const char *shown, const char *path, char *out, size_t len, int *exists, struct stat *st)
{
    char cur[PATH_MAX];
    snprintf(cur, sizeof cur, "%s", path);
    for (int hop = 0; hop < 40; hop++) {
        if (lstat(cur, st) != 0) {
            if (errno == ENAMETOOLONG)
                return kv_error(KV_EIO, "%s: cannot write: the name is too long for the file system", shown);
            if (errno != ENOENT)
                return kv_error(KV_EIO, "%s: cannot write: %s", shown, strerror(errno));
            *exists = 0;
            snprintf(out, len, "%s", cur);
            return KV_OK;
        }
        if (!S_ISLNK(st->st_mode)) {
            *exists = 1;
            snprintf(out, len, "%s", cur);
            return KV_OK;
        }
        char link[PATH_MAX];
        ssize_t n = readlink(cur, link, sizeof link - 1);
        if (n < 0)
            return kv_error(KV_EIO, "%s: cannot read the symbolic link %s: %s", shown, cur, strerror(errno));
        link[n] = 0;
        if (link[0] == '/') {
            snprintf(cur, sizeof cur, "%s", link);
        } else {
            char dir[PATH_MAX], base[PATH_MAX], next[PATH_MAX];
            split_path(cur, dir, sizeof dir, base, sizeof base);
            if ((size_t)snprintf(next, sizeof next, "%s/%s", dir, link) >= sizeof next)
                return kv_error(KV_EIO, "%s: cannot write: the path is too long", shown);
            snprintf(cur, sizeof cur, "%s", next);
        }
    }
    return kv_error(KV_EIO, "%s: cannot write: too many levels of symbolic links", shown);
}

/* Canonical name of a file that may not exist: its folder's realpath, then its name. */
static int canonical(const char *target, char *out, size_t len)
{
    char dir[PATH_MAX], base[PATH_MAX], real[PATH_MAX];
    split_path(target, dir, sizeof dir, base, sizeof base);
    if (!realpath(dir, real))
        return -1;
    snprintf(out, len, "%s/%s", strcmp(real, "/") ? real : "", base);
    return 0;
}

int kv_out_same(const char *a, const char *b)
{
    char ra[PATH_MAX], rb[PATH_MAX];
    struct stat sa, sb;
    int ea, eb;
    if (resolve(a, a, ra, sizeof ra, &ea, &sa) || resolve(b, b, rb, sizeof rb, &eb, &sb)) {
        kv_clear_error();
        return !strcmp(a, b);
    }
    if (ea && eb)
        return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
    if (ea != eb)
        return 0;
    char ca[PATH_MAX], cb[PATH_MAX];
    if (canonical(ra, ca, sizeof ca) || canonical(rb, cb, sizeof cb))
        return !strcmp(ra, rb);
    return !strcmp(ca, cb);
}

/* The longest file name the folder takes (NAME_MAX where it cannot say). */
static size_t name_max(const char *dir)
{
    long n = pathconf(dir, _PC_NAME_MAX);
    return n > 0 ? (size_t)n : (size_t)NAME_MAX;
}

/* Everything kv_out_check and kv_out_open check but the others: target resolved into target (its
 * folder into dir, its name into base); *exists and *st describe it. */
static int check_target(const char *path, char *target, char *dir, char *base, int *exists, struct stat *st)
{
    if (!path || !path[0])
        return kv_error(KV_EINVAL, "empty output path");
    int rc = resolve(path, path, target, PATH_MAX, exists, st);
    if (rc)
        return rc;
    split_path(target, dir, PATH_MAX, base, PATH_MAX);
    if (!base[0] || !strcmp(base, ".") || !strcmp(base, ".."))
        return kv_error(KV_EINVAL, "%s: names a folder, not a file", path);
    if (*exists && S_ISDIR(st->st_mode))
        return kv_error(KV_EIO, "%s: is a folder (kvsim writes a file here; name one inside it)", path);
    if (*exists && !S_ISREG(st->st_mode))
        return kv_error(KV_EIO, "%s: not a regular file (a device, FIFO or socket); kvsim writes only regular files",
                        path);
    struct stat ds;
    if (stat(dir, &ds) != 0)
        return kv_error(KV_EIO, "%s: cannot write: folder %s %s", path, dir,
                        errno == ENOENT ? "does not exist" : strerror(errno));
    if (!S_ISDIR(ds.st_mode))
        return kv_error(KV_EIO, "%s: cannot write: %s is not a folder", path, dir);
    size_t nm = name_max(dir);
    if (strlen(base) > nm)
        return kv_error(KV_EIO, "%s: cannot write: the file name is %zu bytes, too long for the folder (at most %zu)",
                        path, strlen(base), nm);
    return KV_OK;
}

/* ---------------------------------------------------------------- temporary files */

struct kv_out {
    int fd;                /* the temporary file; -1 for standard output */
    FILE *f;               /* stream, created on first use (stdout for "-") */
    int err;               /* errno of the first failed write through the stream */
    int is_stdout;         /* "-" */
    int slot;              /* registry slot */
    int flags;             /* KV_OUT_INDEX */
    int synced;            /* flushed, checked and fsync'ed */
    int have_mode;         /* mode: the replaced file's permission bits */
    mode_t mode;           /* (applied at open) */
    char shown[PATH_MAX];  /* the path as the caller gave it */
    char target[PATH_MAX]; /* the file to replace, links followed */
    char dir[PATH_MAX];    /* its folder */
    char temp[PATH_MAX];
};

/* `base` cut to at most n bytes on a UTF-8 character boundary. */
static size_t utf8_cut(const char *base, size_t n)
{
    size_t len = strlen(base);
    if (len <= n)
        return len;
    while (n > 0 && ((unsigned char)base[n] & 0xC0) == 0x80)
        n--;
    return n;
}

static unsigned random_u32(void)
{
    unsigned r = 0;
    if (getrandom(&r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        static unsigned counter;
        r = (unsigned)ts.tv_nsec ^ ((unsigned)getpid() << 12) ^ (++counter * 2654435761u);
    }
    return r;
}

/* The signals the registry handles blocked (old: the mask to restore), so that a temporary file
 * never exists unregistered: between its creation and its registration, or a probe's creation and
 * removal, a signal waits. */
static void block_signals(sigset_t *old)
{
    sigset_t block;
    sigemptyset(&block);
    for (size_t i = 0; i < KV_ARRAY_LEN(g_signals); i++)
        sigaddset(&block, g_signals[i]);
    pthread_sigmask(SIG_BLOCK, &block, old);
}

/* Create and lock a temporary file for target base `base` in `dir` (signals blocked by the caller). */
static int create_temp(kv_out_t *o, const char *base)
{
    const size_t nm = name_max(o->dir);
    for (int attempt = 0; attempt < 100; attempt++) {
        char suffix[64];
        snprintf(suffix, sizeof suffix, ".%d-%06x%s", (int)getpid(), random_u32() & 0xffffff, KV_OUT_TEMP_SUFFIX);
        const size_t keep = utf8_cut(base, nm > strlen(suffix) ? nm - strlen(suffix) : 0);
        if ((size_t)snprintf(o->temp, sizeof o->temp, "%s/%.*s%s", o->dir, (int)keep, base, suffix) >= sizeof o->temp)
            return kv_error(KV_EIO, "%s: cannot write: the path is too long", o->shown);
        o->fd = open(o->temp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (o->fd >= 0)
            break;
        if (errno != EEXIST)
            return kv_error(KV_EIO, "%s: cannot create a file in folder %s: %s", o->shown, o->dir, strerror(errno));
    }
    if (o->fd < 0)
        return kv_error(KV_EIO, "%s: cannot create a unique temporary file in %s", o->shown, o->dir);
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    (void)fcntl(o->fd, F_OFD_SETLK, &fl); /* file systems without such locks: the pid decides */
    if (o->have_mode)
        (void)fchmod(o->fd, o->mode);
    o->slot = register_temp(o->temp);
    if (o->slot < 0) {
        unlink(o->temp);
        close(o->fd);
        o->fd = -1;
        return kv_error(KV_EINTERNAL, "%s: more than %d files open for writing at once", o->shown, MAX_TEMPS);
    }
    return KV_OK;
}

int kv_out_check(const char *path, const char *const *others, int n_others)
{
    if (path && !strcmp(path, "-"))
        return KV_OK;
    char target[PATH_MAX], dir[PATH_MAX], base[PATH_MAX];
    int exists;
    struct stat st;
    int rc = check_target(path, target, dir, base, &exists, &st);
    if (rc)
        return rc;
    for (int i = 0; i < n_others; i++) {
        const char *x = others[i];
        if (!x || !strcmp(x, "-") || !strcmp(x, "(memory)"))
            continue;
        if (kv_out_same(path, x))
            return kv_error(KV_EINVAL,
                            "%s: is the same file as %s, which this command also reads or writes (kvsim "
                            "never writes over a file it uses)",
                            path, x);
    }
    /* the folder takes a new file now (not only at the end of the work) */
    kv_out_t probe;
    memset(&probe, 0, sizeof probe);
    probe.fd = -1;
    snprintf(probe.shown, sizeof probe.shown, "%s", path);
    snprintf(probe.dir, sizeof probe.dir, "%s", dir);
    sigset_t old;
    block_signals(&old);
    if ((rc = create_temp(&probe, base)) == KV_OK) {
        unlink(probe.temp);
        unregister_temp(probe.slot);
        close(probe.fd);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}

static ssize_t cookie_write(void *c, const char *buf, size_t n)
{
    kv_out_t *o = c;
    size_t done = 0;
    while (done < n) {
        ssize_t w = write(o->fd, buf + done, n - done);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            if (!o->err)
                o->err = w < 0 ? errno : EIO;
            return 0; /* the stream's error flag is set; the errno is kept in o->err */
        }
        done += (size_t)w;
    }
    return (ssize_t)n;
}

static int cookie_close(void *c)
{
    (void)c; /* the descriptor is closed by kv_out itself, after the rename (it holds the lock) */
    return 0;
}

int kv_out_open(const char *path, kv_out_t **out)
{
    *out = NULL;
    kv_out_t *o = kv_calloc(1, sizeof *o, "output");
    if (!o)
        return KV_ENOMEM;
    o->fd = -1;
    o->slot = -1;
    snprintf(o->shown, sizeof o->shown, "%s", path ? path : "");
    if (path && !strcmp(path, "-")) {
        o->is_stdout = 1;
        o->f = stdout;
        snprintf(o->temp, sizeof o->temp, "-");
        snprintf(o->target, sizeof o->target, "-");
        *out = o;
        return KV_OK;
    }
    char base[PATH_MAX];
    int exists;
    struct stat st;
    int rc = check_target(path, o->target, o->dir, base, &exists, &st);
    if (rc == KV_OK) {
        if (exists) {
            o->have_mode = 1;
            o->mode = st.st_mode & 07777;
        }
        sigset_t old;
        block_signals(&old);
        rc = create_temp(o, base);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    if (rc) {
        kv_free(o);
        return rc;
    }
    *out = o;
    return KV_OK;
}

FILE *kv_out_stream(kv_out_t *o)
{
    if (!o->f) {
        cookie_io_functions_t io = {NULL, cookie_write, NULL, cookie_close};
        o->f = fopencookie(o, "w", io);
        if (o->f)
            setvbuf(o->f, NULL, _IOFBF, 1 << 16);
        else
            kv_error(KV_ENOMEM, "%s: cannot create a stream", o->shown);
    }
    return o->f;
}

const char *kv_out_temp(const kv_out_t *o)
{
    return o->temp;
}

const char *kv_out_target(const kv_out_t *o)
{
    return o->target;
}

/* Release the stream and the descriptor (the lock goes with it) and the registry slot. */
static void out_release(kv_out_t *o)
{
    if (o->f && !o->is_stdout)
        fclose(o->f);
    o->f = NULL;
    if (o->fd >= 0)
        close(o->fd);
    o->fd = -1;
    unregister_temp(o->slot);
    o->slot = -1;
}

/* Flush the stream, check that every write reached the file and fsync it. */
static int out_sync(kv_out_t *o)
{
    if (o->synced)
        return KV_OK;
    if (o->f && fflush(o->f) != 0 && !o->err)
        o->err = errno ? errno : EIO;
    if (o->f && ferror(o->f) && !o->err)
        o->err = EIO;
    if (o->err)
        return kv_error(KV_EIO, "%s: write failed: %s", o->shown, strerror(o->err));
    if (fsync(o->fd) != 0 && errno != EINVAL && errno != EROFS)
        return kv_error(KV_EIO, "%s: write failed: %s", o->shown, strerror(errno));
    o->synced = 1;
    return KV_OK;
}

static void sync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd); /* some file systems refuse fsync on folders (EINVAL): the rename is done anyway */
        close(fd);
    }
}

static int out_rename(kv_out_t *o)
{
    if (rename(o->temp, o->target) != 0)
        return kv_error(KV_EIO, "%s: cannot replace it with the new file: %s", o->shown, strerror(errno));
    o->temp[0] = 0; /* renamed: nothing to remove any more */
    return KV_OK;
}

void kv_out_abort(kv_out_t *o)
{
    if (!o)
        return;
    if (!o->is_stdout && o->temp[0])
        unlink(o->temp);
    out_release(o);
    kv_free(o);
}

int kv_out_commit(kv_out_t *o)
{
    if (!o)
        return kv_error(KV_EINVAL, "kv_out_commit: no output");
    int rc = KV_OK;
    if (o->is_stdout) {
        errno = 0;
        int e = fflush(stdout) != 0 ? (errno ? errno : EIO) : ferror(stdout) ? EIO : 0;
        if (e)
            rc = kv_error(KV_EIO, "standard output: write failed: %s", strerror(e));
        clearerr(stdout); /* reported here: not again when the program exits */
        kv_free(o);
        return rc;
    }
    if ((rc = out_sync(o)) == KV_OK) {
        sigset_t old;
        block_signals(&old);
        if ((rc = out_rename(o)) == KV_OK)
            unregister_temp(o->slot); /* renamed: the name is the target's now */
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (rc == KV_OK) {
            o->slot = -1;
            sync_dir(o->dir);
        }
    }
    kv_out_abort(o); /* removes the temporary file unless it was renamed */
    return rc;
}

/* ---------------------------------------------------------------- sets */

struct kv_out_set {
    kv_out_t **m;
    int n, cap;
};

int kv_out_set_create(kv_out_set_t **out)
{
    *out = kv_calloc(1, sizeof **out, "output set");
    return *out ? KV_OK : KV_ENOMEM;
}

int kv_out_set_open(kv_out_set_t *s, const char *path, int flags, kv_out_t **member)
{
    *member = NULL;
    if (path && !strcmp(path, "-"))
        return kv_error(KV_EINVAL, "a set of output files cannot include standard output");
    for (int i = 0; i < s->n; i++)
        if (kv_out_same(path, s->m[i]->shown))
            return kv_error(KV_EINVAL, "%s: named twice among the files of one output", path);
    if (s->n == s->cap) {
        int cap = s->cap ? 2 * s->cap : 16;
        kv_out_t **m = kv_realloc(s->m, sizeof *m * (size_t)cap, "output set");
        if (!m)
            return KV_ENOMEM;
        s->m = m;
        s->cap = cap;
    }
    int rc = kv_out_open(path, &s->m[s->n]);
    if (rc)
        return rc;
    s->m[s->n]->flags = flags;
    *member = s->m[s->n++];
    return KV_OK;
}

void kv_out_set_abort(kv_out_set_t *s)
{
    if (!s)
        return;
    for (int i = 0; i < s->n; i++)
        kv_out_abort(s->m[i]);
    kv_free(s->m);
    kv_free(s);
}

/* flock on each distinct folder of the set, in (device, inode) order so that two processes never
 * wait for each other; fds[i] = -1 where a folder repeats. */
static int cmp_dev_ino(const void *a, const void *b)
{
    const struct stat *x = a, *y = b;
    if (x->st_dev != y->st_dev)
        return x->st_dev < y->st_dev ? -1 : 1;
    return x->st_ino < y->st_ino ? -1 : x->st_ino > y->st_ino;
}

int kv_out_set_commit(kv_out_set_t *s)
{
    int rc = KV_OK;
    for (int i = 0; i < s->n && rc == KV_OK; i++)
        rc = out_sync(s->m[i]);
    if (rc) {
        kv_out_set_abort(s);
        return rc;
    }
    /* the renames: uninterruptible by the signals that would leave a mixed set */
    sigset_t old;
    block_signals(&old);
    struct stat *ds = kv_calloc((size_t)(s->n ? s->n : 1), sizeof *ds, "output folders");
    int *dfd = kv_calloc((size_t)(s->n ? s->n : 1), sizeof *dfd, "output folders");
    int nd = 0;
    if (!ds || !dfd)
        rc = KV_ENOMEM;
    for (int i = 0; i < s->n && rc == KV_OK; i++) {
        struct stat st;
        if (stat(s->m[i]->dir, &st) != 0) {
            rc = kv_error(KV_EIO, "%s: folder %s: %s", s->m[i]->shown, s->m[i]->dir, strerror(errno));
            break;
        }
        int dup = 0;
        for (int k = 0; k < nd; k++)
            dup |= !cmp_dev_ino(&ds[k], &st);
        if (!dup)
            ds[nd++] = st;
    }
    qsort(ds, (size_t)nd, sizeof *ds, cmp_dev_ino);
    for (int k = 0; k < nd; k++)
        dfd[k] = -1;
    for (int k = 0; k < nd && rc == KV_OK; k++) /* reopen each folder by a member's name, in sorted order */
        for (int i = 0; i < s->n && dfd[k] < 0; i++) {
            struct stat st;
            if (stat(s->m[i]->dir, &st) == 0 && !cmp_dev_ino(&ds[k], &st)) {
                dfd[k] = open(s->m[i]->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
                if (dfd[k] >= 0)
                    while (flock(dfd[k], LOCK_EX) != 0 && errno == EINTR)
                        ;
            }
        }
    /* index members go first, so a failure below leaves no report beside a partial set */
    for (int i = 0; i < s->n && rc == KV_OK; i++)
        if ((s->m[i]->flags & KV_OUT_INDEX) && unlink(s->m[i]->target) != 0 && errno != ENOENT)
            rc = kv_error(KV_EIO, "%s: cannot remove the previous file: %s", s->m[i]->shown, strerror(errno));
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < s->n && rc == KV_OK; i++)
            if (((s->m[i]->flags & KV_OUT_INDEX) != 0) == pass)
                rc = out_rename(s->m[i]);
    for (int k = 0; k < nd; k++)
        if (dfd[k] >= 0) {
            (void)fsync(dfd[k]);
            close(dfd[k]); /* releases the flock */
        }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    kv_free(ds);
    kv_free(dfd);
    kv_out_set_abort(s); /* removes what was not renamed */
    return rc;
}

/* ---------------------------------------------------------------- stale temporary files */

/* The writer's pid from a temporary file's name: "<...>.<pid>-<hex>.kvsim-tmp" (legacy 0), or
 * "<...>.tmp-<pid>" (legacy 1); 0 when the name is neither. */
static int temp_pid(const char *name, int *legacy)
{
    const size_t n = strlen(name), ls = strlen(KV_OUT_TEMP_SUFFIX);
    *legacy = 0;
    if (n > ls && !strcmp(name + n - ls, KV_OUT_TEMP_SUFFIX)) {
        const char *end = name + n - ls, *dot = end;
        while (dot > name && dot[-1] != '.')
            dot--;
        if (dot == name)
            return 0;
        char *e;
        long pid = strtol(dot, &e, 10);
        if (e == dot || *e != '-' || pid <= 0 || pid > INT_MAX)
            return 0;
        for (const char *h = e + 1; h < end; h++)
            if (!strchr("0123456789abcdef", *h))
                return 0;
        return (int)pid;
    }
    const char *t = strstr(name, ".tmp-");
    while (t && strstr(t + 1, ".tmp-"))
        t = strstr(t + 1, ".tmp-");
    if (!t || t == name || !t[5])
        return 0;
    for (const char *c = t + 5; *c; c++)
        if (*c < '0' || *c > '9')
            return 0;
    long pid = strtol(t + 5, NULL, 10);
    if (pid <= 0 || pid > INT_MAX)
        return 0;
    *legacy = 1;
    return (int)pid;
}

static int pid_alive(int pid)
{
    return kill(pid, 0) == 0 || errno != ESRCH;
}

/* 1 when `path` is a stale temporary file (*s filled), 0 when it is not one or still alive. */
static int is_stale(const char *path, const char *name, kv_out_stale_t *s)
{
    int legacy, pid = temp_pid(name, &legacy);
    if (pid <= 0)
        return 0;
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return 0;
    struct stat st;
    int stale = fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
    if (stale && !legacy) {
        struct flock fl;
        memset(&fl, 0, sizeof fl);
        fl.l_type = F_WRLCK;
        fl.l_whence = SEEK_SET;
        if (fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK)
            stale = 0; /* a live writer holds it */
    }
    close(fd);
    /* unlocked and its writer gone (a file system without locks, or the instant between creating
     * and locking, leaves a live writer's file unlocked: its pid still runs) */
    if (!stale || pid == (int)getpid() || pid_alive(pid))
        return 0;
    s->path = path;
    s->bytes = (uint64_t)st.st_size;
    s->pid = pid;
    s->legacy = legacy;
    return 1;
}

static int scan_dir(const char *dir, int recursive, int depth, int (*fn)(void *, const kv_out_stale_t *), void *ctx)
{
    DIR *d = opendir(dir);
    if (!d)
        return kv_error(KV_EIO, "%s: cannot read the folder: %s", dir, strerror(errno));
    int rc = KV_OK;
    struct dirent *e;
    while (rc == KV_OK && (e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        char path[PATH_MAX];
        if ((size_t)snprintf(path, sizeof path, "%s/%s", strcmp(dir, "/") ? dir : "", e->d_name) >= sizeof path)
            continue;
        struct stat st;
        if (lstat(path, &st) != 0)
            continue;
        kv_out_stale_t s;
        if (S_ISDIR(st.st_mode)) {
            if (recursive && depth < 64 && (rc = scan_dir(path, recursive, depth + 1, fn, ctx)) == KV_EIO)
                rc = KV_OK; /* an unreadable subfolder: skipped */
        } else if (S_ISREG(st.st_mode) && is_stale(path, e->d_name, &s) && fn(ctx, &s)) {
            break;
        }
    }
    closedir(d);
    return rc;
}

int kv_out_find_stale(const char *dir, int recursive, int (*fn)(void *ctx, const kv_out_stale_t *s), void *ctx)
{
    struct stat st;
    if (stat(dir, &st) != 0)
        return kv_error(KV_EIO, "%s: %s", dir, strerror(errno));
    if (S_ISDIR(st.st_mode))
        return scan_dir(dir, recursive, 0, fn, ctx);
    char d[PATH_MAX], base[PATH_MAX];
    split_path(dir, d, sizeof d, base, sizeof base);
    kv_out_stale_t s;
    if (is_stale(dir, base, &s))
        fn(ctx, &s);
    return KV_OK;
}

int kv_out_remove_stale(const char *path)
{
    char d[PATH_MAX], base[PATH_MAX];
    split_path(path, d, sizeof d, base, sizeof base);
    kv_out_stale_t s;
    if (!is_stale(path, base, &s))
        return kv_error(KV_EINVAL, "%s: not a stale kvsim temporary file (or its writer is alive)", path);
    if (unlink(path) != 0)
        return kv_error(KV_EIO, "%s: cannot remove: %s", path, strerror(errno));
    return KV_OK;
}

/* ---------------------------------------------------------------- whole files from a callback */

int kv_out_write_one(const char *path, const void *ctx, kv_out_put_fn put)
{
    kv_out_t *o;
    int rc = kv_out_open(path, &o);
    if (rc)
        return rc;
    FILE *f = kv_out_stream(o);
    if (!f) {
        kv_out_abort(o);
        return KV_ENOMEM;
    }
    put(ctx, f);
    return kv_out_commit(o);
}

int kv_out_write_pair(const char *tsv, const char *json, const void *ctx, kv_out_put_fn put_tsv, kv_out_put_fn put_json)
{
    if (!json)
        return kv_out_write_one(tsv, ctx, put_tsv);
    if (!strcmp(json, "-"))
        return kv_error(KV_EINVAL, "the JSON results cannot go to standard output");
    kv_out_set_t *s = NULL;
    kv_out_t *t = NULL, *j = NULL;
    int rc = kv_out_set_create(&s);
    if (rc == KV_OK && strcmp(tsv, "-"))
        rc = kv_out_set_open(s, tsv, 0, &t);
    if (rc == KV_OK)
        rc = kv_out_set_open(s, json, 0, &j);
    if (rc == KV_OK && ((t && !kv_out_stream(t)) || !kv_out_stream(j)))
        rc = KV_ENOMEM;
    if (rc) {
        kv_out_set_abort(s);
        return rc;
    }
    put_json(ctx, kv_out_stream(j));
    if (t) {
        put_tsv(ctx, kv_out_stream(t));
    } else if ((rc = kv_out_write_one("-", ctx, put_tsv))) { /* standard output first: its failure keeps the JSON out */
        kv_out_set_abort(s);
        return rc;
    }
    return kv_out_set_commit(s); /* both together */
}
