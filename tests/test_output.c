/*
 * test_output.c: the output module (sim/common/kv_output.h) that every writer of kvsim goes through.
 *   - a committed file is complete, replaces the target, keeps its permission bits, leaves no
 *     temporary file; an aborted one leaves the target as it was;
 *   - targets that are not regular files (a FIFO; a character device made with mknod when the tests
 *     run as root) are refused and left alone; a symbolic link's target is written, the link stays;
 *   - an output that is the same file as an input (same name, another spelling, a hard link, a
 *     symbolic link) is refused by kv_out_check;
 *   - names of 246 to 255 bytes work (the temporary name is cut to fit NAME_MAX);
 *   - two writers of one target never share a temporary file; both commit;
 *   - SIGTERM and SIGINT remove the temporary files; SIGKILL leaves one that kv_out_find_stale
 *     reports (a live writer's is not reported) and kv_out_remove_stale removes;
 *   - a write error (a file-size limit: EFBIG; a full tmpfs when root can mount one: ENOSPC) is
 *     reported with its reason, the temporary file is removed and the target untouched;
 *   - standard output: a write error is reported by the commit;
 *   - sets: all members appear together; a failure in one leaves none of them; index members are
 *     never beside a partial set.
 */
#include "sim/common/kv_common.h"
#include "sim/common/kv_output.h"
#include "tests/kv_test.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

/* A fresh empty folder under build/test-tmp. */
static const char *fresh_dir(const char *name, char *buf, size_t len)
{
    kv_test_tmp(name, buf, len);
    ck_assert_int_eq(mkdir(buf, 0755), 0);
    return buf;
}

static void put_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    ck_assert_int_eq(fclose(f), 0);
}

static const char *get_file(const char *path, char *buf, size_t len)
{
    buf[0] = 0;
    FILE *f = fopen(path, "r");
    if (!f)
        return NULL;
    size_t n = fread(buf, 1, len - 1, f);
    buf[n] = 0;
    fclose(f);
    return buf;
}

/* Entries of dir whose name contains `part` (temporary files: ".kvsim-tmp"). */
static int count_named(const char *dir, const char *part)
{
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        n += strstr(e->d_name, part) != NULL;
    closedir(d);
    return n;
}

static int write_one(const char *path, const char *text)
{
    kv_out_t *o;
    int rc = kv_out_open(path, &o);
    if (rc)
        return rc;
    fputs(text, kv_out_stream(o));
    return kv_out_commit(o);
}

START_TEST(commit_replaces_and_keeps_mode)
{
    char dir[256], path[512], buf[256];
    fresh_dir("out", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/r.tsv", dir);
    put_file(path, "old\n");
    ck_assert_int_eq(chmod(path, 0600), 0);
    kv_out_t *o;
    ck_assert_int_eq(kv_out_open(path, &o), KV_OK);
    ck_assert_ptr_nonnull(strstr(kv_out_temp(o), KV_OUT_TEMP_SUFFIX));
    fputs("new\n", kv_out_stream(o));
    ck_assert_str_eq(get_file(path, buf, sizeof buf), "old\n"); /* nothing under the final name yet */
    ck_assert_int_eq(count_named(dir, KV_OUT_TEMP_SUFFIX), 1);
    ck_assert_int_eq(kv_out_commit(o), KV_OK);
    ck_assert_str_eq(get_file(path, buf, sizeof buf), "new\n");
    struct stat st;
    ck_assert_int_eq(stat(path, &st), 0);
    ck_assert_int_eq(st.st_mode & 0777, 0600);
    ck_assert_int_eq(count_named(dir, KV_OUT_TEMP_SUFFIX), 0);
    /* abort: the target stays */
    ck_assert_int_eq(kv_out_open(path, &o), KV_OK);
    fputs("never\n", kv_out_stream(o));
    kv_out_abort(o);
    ck_assert_str_eq(get_file(path, buf, sizeof buf), "new\n");
    ck_assert_int_eq(count_named(dir, KV_OUT_TEMP_SUFFIX), 0);
}
END_TEST

/* Finding 2: an output that is not a regular file is refused, not replaced. */
START_TEST(refuses_non_regular_targets)
{
    char dir[256], fifo[512], sub[512];
    fresh_dir("out", dir, sizeof dir);
    snprintf(fifo, sizeof fifo, "%s/fifo", dir);
    ck_assert_int_eq(mkfifo(fifo, 0644), 0);
    kv_out_t *o = NULL;
    ck_assert_int_eq(kv_out_open(fifo, &o), KV_EIO);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "not a regular file"));
    ck_assert_ptr_nonnull(strstr(kv_last_error(), fifo));
    ck_assert_int_ne(kv_out_check(fifo, NULL, 0), KV_OK);
    struct stat st;
    ck_assert_int_eq(lstat(fifo, &st), 0);
    ck_assert(S_ISFIFO(st.st_mode));
    snprintf(sub, sizeof sub, "%s/sub", dir);
    ck_assert_int_eq(mkdir(sub, 0755), 0);
    ck_assert_int_eq(kv_out_check(sub, NULL, 0), KV_EIO);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "is a folder"));
    snprintf(sub, sizeof sub, "%s/none/x.tsv", dir);
    ck_assert_int_eq(kv_out_check(sub, NULL, 0), KV_EIO);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "does not exist"));
    if (geteuid() == 0) { /* the audit's reproduction: a device node like /dev/null */
        char dev[512];
        snprintf(dev, sizeof dev, "%s/null", dir);
        ck_assert_int_eq(mknod(dev, S_IFCHR | 0666, makedev(1, 3)), 0);
        ck_assert_int_eq(kv_out_open(dev, &o), KV_EIO);
        ck_assert_int_eq(lstat(dev, &st), 0);
        ck_assert(S_ISCHR(st.st_mode));
    }
    ck_assert_int_eq(count_named(dir, KV_OUT_TEMP_SUFFIX), 0);
}
END_TEST

/* Finding 2: a symbolic link's target is written; the link stays a link. */
START_TEST(symlink_target_is_written)
{
    char dir[256], run[512], latest[512], dangling[512], buf[64];
    fresh_dir("out", dir, sizeof dir);
    snprintf(run, sizeof run, "%s/run.tsv", dir);
    snprintf(latest, sizeof latest, "%s/latest.tsv", dir);
    put_file(run, "old\n");
    ck_assert_int_eq(symlink("run.tsv", latest), 0);
    ck_assert_int_eq(write_one(latest, "new\n"), KV_OK);
    struct stat st;
    ck_assert_int_eq(lstat(latest, &st), 0);
    ck_assert(S_ISLNK(st.st_mode));
    ck_assert_str_eq(get_file(run, buf, sizeof buf), "new\n");
    /* a dangling link: its target is created */
    snprintf(dangling, sizeof dangling, "%s/next.tsv", dir);
    ck_assert_int_eq(symlink("made.tsv", dangling), 0);
    ck_assert_int_eq(write_one(dangling, "made\n"), KV_OK);
    snprintf(run, sizeof run, "%s/made.tsv", dir);
    ck_assert_str_eq(get_file(run, buf, sizeof buf), "made\n");
    ck_assert_int_eq(lstat(dangling, &st), 0);
    ck_assert(S_ISLNK(st.st_mode));
    ck_assert_int_eq(count_named(dir, KV_OUT_TEMP_SUFFIX), 0);
}
END_TEST

/* Finding 4: an output equal to an input, however spelled, is refused before any work. */
START_TEST(output_equal_to_input_refused)
{
    char dir[256], in[512], other[512], lnk[512], hard[512], fresh[512];
    fresh_dir("out", dir, sizeof dir);
    snprintf(in, sizeof in, "%s/t.h5", dir);
    put_file(in, "input\n");
    const char *ins[] = {in};
    ck_assert_int_eq(kv_out_check(in, ins, 1), KV_EINVAL);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "same file"));
    snprintf(other, sizeof other, "%s/./../%s/t.h5", dir, strrchr(dir, '/') + 1);
    ck_assert_int_eq(kv_out_check(other, ins, 1), KV_EINVAL);
    snprintf(lnk, sizeof lnk, "%s/l.h5", dir);
    ck_assert_int_eq(symlink("t.h5", lnk), 0);
    ck_assert_int_eq(kv_out_check(lnk, ins, 1), KV_EINVAL);
    snprintf(hard, sizeof hard, "%s/h.h5", dir);
    ck_assert_int_eq(link(in, hard), 0);
    ck_assert_int_eq(kv_out_check(hard, ins, 1), KV_EINVAL);
    /* two outputs that do not exist yet: the same name spelled twice */
    snprintf(fresh, sizeof fresh, "%s/r.tsv", dir);
    snprintf(other, sizeof other, "%s/./r.tsv", dir);
    const char *outs[] = {other};
    ck_assert_int_eq(kv_out_check(fresh, outs, 1), KV_EINVAL);
    const char *fine[] = {in, NULL, "-"};
    ck_assert_int_eq(kv_out_check(fresh, fine, 3), KV_OK);
    ck_assert_int_eq(kv_out_check("-", ins, 1), KV_OK);
    ck_assert_int_eq(count_named(dir, KV_OUT_TEMP_SUFFIX), 0);
}
END_TEST

/* Finding 10: names up to NAME_MAX work (the temporary name is cut, not the target's). */
START_TEST(long_names)
{
    char dir[256], path[1024], name[300], buf[64];
    fresh_dir("out", dir, sizeof dir);
    for (int len = 246; len <= 255; len++) {
        memset(name, 'a' + (len % 26), (size_t)len);
        name[len] = 0;
        snprintf(path, sizeof path, "%s/%s", dir, name);
        ck_assert_int_eq(kv_out_check(path, NULL, 0), KV_OK);
        ck_assert_msg(write_one(path, "x\n") == KV_OK, "%d bytes: %s", len, kv_last_error());
        ck_assert_str_eq(get_file(path, buf, sizeof buf), "x\n");
    }
    memset(name, 'z', 256);
    name[256] = 0;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    ck_assert_int_eq(kv_out_check(path, NULL, 0), KV_EIO);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "too long"));
    ck_assert_int_eq(count_named(dir, KV_OUT_TEMP_SUFFIX), 0);
}
END_TEST

/* Finding 9: two writers of one file have their own temporary files and both commit. */
START_TEST(concurrent_writers)
{
    char dir[256], path[512], buf[64];
    fresh_dir("out", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/fig.png", dir);
    kv_out_t *a, *b;
    ck_assert_int_eq(kv_out_open(path, &a), KV_OK);
    ck_assert_int_eq(kv_out_open(path, &b), KV_OK);
    ck_assert_str_ne(kv_out_temp(a), kv_out_temp(b));
    fputs("a\n", kv_out_stream(a));
    fputs("b\n", kv_out_stream(b));
    ck_assert_int_eq(kv_out_commit(a), KV_OK);
    ck_assert_int_eq(kv_out_commit(b), KV_OK);
    ck_assert_str_eq(get_file(path, buf, sizeof buf), "b\n");
    ck_assert_int_eq(count_named(dir, KV_OUT_TEMP_SUFFIX), 0);
}
END_TEST

/* A child that opens an output, writes and then gets `sig`; returns how it ended. */
static int child_killed_by(const char *path, int sig)
{
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        signal(sig, SIG_DFL);
        kv_out_t *o;
        if (kv_out_open(path, &o) != KV_OK)
            _exit(3);
        fputs("partial", kv_out_stream(o));
        fflush(kv_out_stream(o));
        raise(sig);
        _exit(4);
    }
    int st;
    ck_assert_int_eq(waitpid(pid, &st, 0), pid);
    return WIFSIGNALED(st) ? WTERMSIG(st) : -WEXITSTATUS(st);
}

static int collect_stale(void *ctx, const kv_out_stale_t *s)
{
    char(*list)[512] = ctx;
    for (int i = 0; i < 8; i++)
        if (!list[i][0]) {
            snprintf(list[i], 512, "%s", s->path);
            break;
        }
    return 0;
}

/* Finding 8: signals remove temporary files; SIGKILL's are found and removed as stale. */
START_TEST(signals_and_stale_temps)
{
    char dir[256], path[512];
    fresh_dir("out", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/r.tsv", dir);
    ck_assert_int_eq(child_killed_by(path, SIGTERM), SIGTERM);
    ck_assert_int_eq(child_killed_by(path, SIGINT), SIGINT);
    ck_assert_int_eq(child_killed_by(path, SIGHUP), SIGHUP);
    ck_assert_int_eq(count_named(dir, KV_OUT_TEMP_SUFFIX), 0);
    ck_assert_int_eq(access(path, F_OK), -1);
    ck_assert_int_eq(child_killed_by(path, SIGKILL), SIGKILL);
    ck_assert_int_eq(count_named(dir, KV_OUT_TEMP_SUFFIX), 1);
    /* a live writer's temporary file (this process's) is not stale */
    kv_out_t *live;
    ck_assert_int_eq(kv_out_open(path, &live), KV_OK);
    char found[8][512];
    memset(found, 0, sizeof found);
    ck_assert_int_eq(kv_out_find_stale(dir, 0, collect_stale, found), KV_OK);
    ck_assert_msg(found[0][0] && !found[1][0], "one stale file expected, got '%s', '%s'", found[0], found[1]);
    ck_assert_str_ne(found[0], kv_out_temp(live));
    ck_assert_int_ne(kv_out_remove_stale(kv_out_temp(live)), KV_OK);
    ck_assert_int_eq(kv_out_remove_stale(found[0]), KV_OK);
    ck_assert_int_eq(count_named(dir, KV_OUT_TEMP_SUFFIX), 1); /* the live one */
    kv_out_abort(live);
    ck_assert_int_eq(count_named(dir, KV_OUT_TEMP_SUFFIX), 0);
    /* a legacy temporary file of a dead process ("x.tmp-PID") is stale; one of a live process is not */
    pid_t dead = fork();
    if (dead == 0)
        _exit(0);
    waitpid(dead, NULL, 0);
    char legacy[600], alive[600];
    snprintf(legacy, sizeof legacy, "%s/trace.h5.tmp-%d", dir, (int)dead);
    snprintf(alive, sizeof alive, "%s/trace.h5.tmp-%d", dir, (int)getpid());
    put_file(legacy, "x");
    put_file(alive, "x");
    memset(found, 0, sizeof found);
    ck_assert_int_eq(kv_out_find_stale(dir, 1, collect_stale, found), KV_OK);
    ck_assert_str_eq(found[0], legacy);
    ck_assert(!found[1][0]);
}
END_TEST

/* Finding 1 / 17 without root: a file-size limit makes writes fail (EFBIG); the error is reported,
 * the temporary file removed and the previous file kept. */
START_TEST(write_error_reported)
{
    char dir[256], path[512], buf[64];
    fresh_dir("out", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/big.tsv", dir);
    put_file(path, "old\n");
    pid_t pid = fork();
    if (pid == 0) {
        signal(SIGXFSZ, SIG_IGN);
        struct rlimit rl = {4096, 4096};
        setrlimit(RLIMIT_FSIZE, &rl);
        kv_out_t *o;
        if (kv_out_open(path, &o) != KV_OK)
            _exit(3);
        for (int i = 0; i < 10000; i++)
            fputs("0123456789\n", kv_out_stream(o));
        int rc = kv_out_commit(o);
        _exit(rc != KV_OK && strstr(kv_last_error(), "File too large") && strstr(kv_last_error(), path) ? 0 : 5);
    }
    int st;
    waitpid(pid, &st, 0);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %d", st);
    ck_assert_str_eq(get_file(path, buf, sizeof buf), "old\n");
    ck_assert_int_eq(count_named(dir, KV_OUT_TEMP_SUFFIX), 0);
}
END_TEST

/* Finding 3: a write error on standard output is reported by the commit. */
START_TEST(stdout_write_error)
{
    pid_t pid = fork();
    if (pid == 0) {
        if (!freopen("/dev/full", "w", stdout))
            _exit(3);
        kv_out_t *o;
        if (kv_out_open("-", &o) != KV_OK)
            _exit(4);
        fputs("rows\n", kv_out_stream(o));
        int rc = kv_out_commit(o);
        _exit(rc == KV_EIO && strstr(kv_last_error(), "standard output") ? 0 : 5);
    }
    int st;
    waitpid(pid, &st, 0);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %d", st);
}
END_TEST

/* Finding 17: a set appears whole or not at all; index members never sit beside a partial set. */
START_TEST(sets)
{
    char dir[256], a[512], b[512], idx[512], buf[64];
    fresh_dir("out", dir, sizeof dir);
    snprintf(a, sizeof a, "%s/a.png", dir);
    snprintf(b, sizeof b, "%s/b.png", dir);
    snprintf(idx, sizeof idx, "%s/report.html", dir);
    put_file(a, "old a\n");
    put_file(idx, "old report\n");
    kv_out_set_t *s;
    kv_out_t *m;
    ck_assert_int_eq(kv_out_set_create(&s), KV_OK);
    ck_assert_int_eq(kv_out_set_open(s, idx, KV_OUT_INDEX, &m), KV_OK);
    fputs("report\n", kv_out_stream(m));
    ck_assert_int_eq(kv_out_set_open(s, a, 0, &m), KV_OK);
    fputs("a\n", kv_out_stream(m));
    ck_assert_int_ne(kv_out_set_open(s, a, 0, &m), KV_OK); /* a member named twice */
    ck_assert_int_eq(kv_out_set_open(s, b, 0, &m), KV_OK);
    fputs("b\n", kv_out_stream(m));
    ck_assert_str_eq(get_file(a, buf, sizeof buf), "old a\n");
    ck_assert_int_eq(kv_out_set_commit(s), KV_OK);
    ck_assert_str_eq(get_file(a, buf, sizeof buf), "a\n");
    ck_assert_str_eq(get_file(b, buf, sizeof buf), "b\n");
    ck_assert_str_eq(get_file(idx, buf, sizeof buf), "report\n");
    ck_assert_int_eq(count_named(dir, KV_OUT_TEMP_SUFFIX), 0);
    /* a member whose write fails: nothing of the set changes */
    pid_t pid = fork();
    if (pid == 0) {
        signal(SIGXFSZ, SIG_IGN);
        struct rlimit rl = {4096, 4096};
        setrlimit(RLIMIT_FSIZE, &rl);
        kv_out_set_t *t;
        kv_out_t *x;
        if (kv_out_set_create(&t) || kv_out_set_open(t, idx, KV_OUT_INDEX, &x))
            _exit(3);
        fputs("new report\n", kv_out_stream(x));
        if (kv_out_set_open(t, a, 0, &x))
            _exit(3);
        fputs("new a\n", kv_out_stream(x));
        if (kv_out_set_open(t, b, 0, &x))
            _exit(3);
        for (int i = 0; i < 10000; i++)
            fputs("0123456789\n", kv_out_stream(x));
        _exit(kv_out_set_commit(t) != KV_OK && strstr(kv_last_error(), b) ? 0 : 5);
    }
    int st;
    waitpid(pid, &st, 0);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %d", st);
    ck_assert_str_eq(get_file(a, buf, sizeof buf), "a\n");
    ck_assert_str_eq(get_file(idx, buf, sizeof buf), "report\n");
    ck_assert_int_eq(count_named(dir, KV_OUT_TEMP_SUFFIX), 0);
    /* abort */
    ck_assert_int_eq(kv_out_set_create(&s), KV_OK);
    ck_assert_int_eq(kv_out_set_open(s, a, 0, &m), KV_OK);
    fputs("never\n", kv_out_stream(m));
    kv_out_set_abort(s);
    ck_assert_str_eq(get_file(a, buf, sizeof buf), "a\n");
    ck_assert_int_eq(count_named(dir, KV_OUT_TEMP_SUFFIX), 0);
}
END_TEST

/* Finding 1 with a real full disk: a 64 KiB tmpfs (root only; the RLIMIT_FSIZE test above covers
 * the same path everywhere). */
START_TEST(full_disk_tmpfs)
{
    char dir[256], path[512];
    fresh_dir("full", dir, sizeof dir);
    if (mount("tmpfs", dir, "tmpfs", 0, "size=64k") != 0) {
        fprintf(stderr, "kvsim tests: full_disk_tmpfs: cannot mount a tmpfs (%s); covered by write_error_reported\n",
                strerror(errno));
        return;
    }
    snprintf(path, sizeof path, "%s/r.tsv", dir);
    kv_out_t *o;
    ck_assert_int_eq(kv_out_open(path, &o), KV_OK);
    for (int i = 0; i < 100000; i++)
        fputs("0123456789\n", kv_out_stream(o));
    ck_assert_int_eq(kv_out_commit(o), KV_EIO);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "No space left on device"));
    ck_assert_int_eq(access(path, F_OK), -1);
    ck_assert_int_eq(count_named(dir, KV_OUT_TEMP_SUFFIX), 0);
    umount2(dir, MNT_DETACH);
}
END_TEST

Suite *suite_output(void)
{
    Suite *s = suite_create("output");
    TCase *tc = tcase_create("output");
    tcase_add_test(tc, commit_replaces_and_keeps_mode);
    tcase_add_test(tc, refuses_non_regular_targets);
    tcase_add_test(tc, symlink_target_is_written);
    tcase_add_test(tc, output_equal_to_input_refused);
    tcase_add_test(tc, long_names);
    tcase_add_test(tc, concurrent_writers);
    tcase_add_test(tc, signals_and_stale_temps);
    tcase_add_test(tc, write_error_reported);
    tcase_add_test(tc, stdout_write_error);
    tcase_add_test(tc, sets);
    if (geteuid() == 0)
        tcase_add_test(tc, full_disk_tmpfs);
    else
        kv_test_skip("output/full_disk_tmpfs", "not root: cannot mount a tmpfs; write_error_reported covers it");
    suite_add_tcase(s, tc);
    return s;
}
