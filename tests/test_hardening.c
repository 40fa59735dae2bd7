/*
 * test_hardening.c: the reproductions of the outside reliability audit (issue 10), run through the
 * built binary ($KVSIM_BIN; without it the CLI cases are not registered and the suite says so). One
 * test per finding, numbered as in the issue; each failed before its fix:
 *    1 a full disk (a file-size limit everywhere; a 2 MiB tmpfs when the tests run as root): exit 1,
 *      the reason, the path named once, no temporary file, no crash at exit (capture and synth);
 *    2 outputs that are not regular files are refused (a FIFO; a device node as root); a symbolic
 *      link's target is written;
 *    3 write errors on standard output (/dev/full) fail replay, info, policies and generate;
 *    4 an output that is an input (replay's trace, -o equal to --json, capture's model, analyze's
 *      results) is refused before any work and the input is left as it was;
 *    5 a changed stored chunk (tensor and summary) is an error naming file, dataset and chunk;
 *      kvsim info --verify finds it;
 *    6 NaN and inf in a trace (f32 NaN, f16 overflow) are counted: replay's rows that read them are
 *      nan with the count in the nonfinite column and a warning; analyze names the file and rows;
 *    7 one changed byte in the global heap (the audit's GCOL + 25) is an error, not a crash; a
 *      changed attribute string is caught by the attributes' checksum;
 *    8 SIGTERM and SIGINT leave no temporary file; SIGKILL's is reported by kvsim info and removed
 *      by kvsim clean;
 *    9 two analyze runs into one folder both succeed;
 *   10 output names of 246 to 255 bytes work;
 *   11 hand-edited results (layer 9999, head 500, "abc", "1e999") are refused by name; a row
 *      repeated in one file is not reported as coming from "later results files";
 *   12 seq:1000000000000000 resolves (no integer overflow);
 *   13 a malformed --segments is a usage error (2);
 *   14 an empty prompt (-i '' or an empty file) is refused;
 *   15 budgets 0x40 and 1e-300 are refused;
 *   16 kv_fwd_run at pos0 = INT_MAX is a range error (the sanitizer build checks the arithmetic);
 *   17 a failing run leaves no complete-looking partial set (replay's TSV without its JSON,
 *      analyze's figures without the report), and capture -o FOLDER fails before any work.
 */
#include "kernels/kv_backend.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_output.h"
#include "sim/result.h"
#include "tests/capture_fixtures.h"
#include "tests/kv_test.h"
#include "traces/capture/kv_forward.h"
#include "traces/capture/kv_model.h"
#include "traces/kv_trace.h"

#include <check.h>
#include <errno.h>
#include <hdf5.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

static char g_out[1 << 16], g_err[1 << 16];

static void slurp(const char *path, char *buf, size_t len)
{
    buf[0] = 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return;
    size_t n = fread(buf, 1, len - 1, f);
    buf[n] = 0;
    fclose(f);
}

/* Run `sh -c "<prefix> $KVSIM_BIN <args>"`; stdout and stderr into g_out / g_err (unless args
 * redirects them itself); returns the exit status, or 128 + the signal that ended kvsim. */
static int run(const char *prefix, const char *args)
{
    char out[256], err[256], cmd[8192];
    kv_test_tmp("stdout", out, sizeof out);
    kv_test_tmp("stderr", err, sizeof err);
    snprintf(cmd, sizeof cmd, "%s %s %s >%s 2>%s", prefix, getenv("KVSIM_BIN"), args, out, err);
    int st = system(cmd);
    slurp(out, g_out, sizeof g_out);
    slurp(err, g_err, sizeof g_err);
    unlink(out);
    unlink(err);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 255;
}
#define kvsim(args) run("", args)

#define ASSERT_HAS(hay, needle) ck_assert_msg(strstr((hay), (needle)), "'%s' not found in:\n%.2000s", (needle), (hay))

static int count_of(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = strstr(hay, needle); p; p = strstr(p + 1, needle))
        n++;
    return n;
}

static const char *fresh_dir(const char *name, char *buf, size_t len)
{
    kv_test_tmp(name, buf, len);
    ck_assert_int_eq(mkdir(buf, 0755), 0);
    return buf;
}

/* A small synthetic trace (2 layers, 192 + 16 tokens) at dir/name. */
static const char *small_trace(const char *dir, const char *name, char *path, size_t len)
{
    snprintf(path, len, "%s/%s", dir, name);
    char args[600];
    snprintf(args, sizeof args, "synth --preset tiny --layers 2 --tokens 208 --decode 16 -q -o %s", path);
    ck_assert_msg(kvsim(args) == 0, "synth failed: %s", g_err);
    return path;
}

static void sha_of(const char *path, char hex[65])
{
    ck_assert_int_eq(kv_sha256_file(path, hex), KV_OK);
}

/* The tiny llama2.c model and tokenizer of capture_fixtures.h in dir. */
static void fixture_model(const char *dir, char *model, char *tok, size_t len)
{
    fx_model_t m;
    fx_model_init(&m, 32, 64, 2, 4, 2, 259 + FX_EXTRA, 128, 1, 7);
    size_t n;
    unsigned char *b = fx_model_v1(&m, &n);
    snprintf(model, len, "%s/model.bin", dir);
    ck_assert_int_eq(fx_write(model, b, n), 0);
    free(b);
    fx_model_free(&m);
    b = fx_tokenizer(&n);
    snprintf(tok, len, "%s/tok.bin", dir);
    ck_assert_int_eq(fx_write(tok, b, n), 0);
    free(b);
}

/* ---------------------------------------------------------------- 1 */

START_TEST(f01_full_disk_is_an_error)
{
    char dir[256], path[512], model[512], tok[512], args[2048];
    fresh_dir("full", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/s.h5", dir);
    snprintf(args, sizeof args, "synth --preset tiny -q -o %s", path);
    ck_assert_int_eq(run("ulimit -f 64;", args), 1); /* 32 KiB */
    ASSERT_HAS(g_err, "File too large");
    ck_assert_msg(count_of(g_err, path) == 1, "the path is named %d times:\n%s", count_of(g_err, path), g_err);
    ck_assert_int_eq(access(path, F_OK), -1);
    ck_assert_int_eq(kv_test_temps_of(path), 0);
    /* capture: the same writer, after a forward pass */
    fixture_model(dir, model, tok, sizeof model);
    snprintf(path, sizeof path, "%s/c.h5", dir);
    snprintf(args, sizeof args, "capture %s -z %s -i 'hello world, a small prompt' --decode 4 -q -o %s", model, tok,
             path);
    ck_assert_msg(run("ulimit -f 2;", args) == 1, "capture: %s", g_err);
    ASSERT_HAS(g_err, "File too large");
    ck_assert_int_eq(kv_test_temps_of(path), 0);
    if (geteuid() != 0)
        return;
    /* the audit's reproduction: a 2 MiB tmpfs; SIGSEGV in libhdf5's exit handler before the fix */
    char mnt[256];
    fresh_dir("tmpfs", mnt, sizeof mnt);
    if (mount("tmpfs", mnt, "tmpfs", 0, "size=2m") != 0) {
        fprintf(stderr, "kvsim tests: f01: cannot mount a tmpfs (%s): the file-size limit covers it\n",
                strerror(errno));
        return;
    }
    snprintf(path, sizeof path, "%s/s.h5", mnt);
    snprintf(args, sizeof args, "synth --preset tiny -q -o %s", path);
    const int st = kvsim(args);
    umount2(mnt, MNT_DETACH);
    ck_assert_msg(st == 1, "exit status %d (139: the crash at exit):\n%s", st, g_err);
    ASSERT_HAS(g_err, "No space left on device");
    ck_assert_int_eq(count_of(g_err, path), 1);
}
END_TEST

/* ---------------------------------------------------------------- 2 */

START_TEST(f02_only_regular_files_are_written)
{
    char dir[256], t[512], fifo[512], args[2048], run_tsv[512], latest[512];
    fresh_dir("nonreg", dir, sizeof dir);
    small_trace(dir, "t.h5", t, sizeof t);
    snprintf(fifo, sizeof fifo, "%s/fifo", dir);
    ck_assert_int_eq(mkfifo(fifo, 0644), 0);
    snprintf(args, sizeof args, "replay %s snapkv 64 -q -o %s", t, fifo);
    ck_assert_int_eq(kvsim(args), 1);
    ASSERT_HAS(g_err, "not a regular file");
    struct stat st;
    ck_assert_int_eq(lstat(fifo, &st), 0);
    ck_assert(S_ISFIFO(st.st_mode));
    if (geteuid() == 0) { /* the audit's `mknod n c 1 3`: a /dev/null of our own */
        char dev[512];
        snprintf(dev, sizeof dev, "%s/n", dir);
        ck_assert_int_eq(mknod(dev, S_IFCHR | 0666, makedev(1, 3)), 0);
        snprintf(args, sizeof args, "replay %s snapkv 64 -q -o %s", t, dev);
        ck_assert_int_eq(kvsim(args), 1);
        ck_assert_int_eq(lstat(dev, &st), 0);
        ck_assert(S_ISCHR(st.st_mode));
    }
    /* the mirror image: inputs read at random (a trace, a model, a tokenizer) that are FIFOs are
     * refused at once (opening one alone blocked before) */
    char model[512], tok[512];
    fixture_model(dir, model, tok, sizeof model);
    snprintf(args, sizeof args, "info %s", fifo);
    ck_assert_int_eq(run("timeout 20", args), 1);
    ASSERT_HAS(g_err, "not a regular file");
    snprintf(args, sizeof args, "capture %s -z %s -i 'hello' -q -o %s/c.h5", fifo, tok, dir);
    ck_assert_int_eq(run("timeout 20", args), 1);
    ASSERT_HAS(g_err, "not a regular file");
    snprintf(args, sizeof args, "capture %s -z %s -i 'hello' -q -o %s/c.h5", model, fifo, dir);
    ck_assert_int_eq(run("timeout 20", args), 1);
    ASSERT_HAS(g_err, "not a regular file");
    /* latest.tsv -> run.tsv: run.tsv is written, the link stays */
    snprintf(run_tsv, sizeof run_tsv, "%s/run.tsv", dir);
    snprintf(latest, sizeof latest, "%s/latest.tsv", dir);
    ck_assert_int_eq(symlink("run.tsv", latest), 0);
    snprintf(args, sizeof args, "replay %s snapkv 64 -q -o %s", t, latest);
    ck_assert_msg(kvsim(args) == 0, "%s", g_err);
    ck_assert_int_eq(lstat(latest, &st), 0);
    ck_assert(S_ISLNK(st.st_mode));
    ck_assert_int_eq(stat(run_tsv, &st), 0);
    ck_assert(S_ISREG(st.st_mode) && st.st_size > 100);
}
END_TEST

/* ---------------------------------------------------------------- 3 */

START_TEST(f03_stdout_write_errors_fail)
{
    char dir[256], t[512], args[2048], model[512], tok[512];
    fresh_dir("full-stdout", dir, sizeof dir);
    small_trace(dir, "t.h5", t, sizeof t);
    fixture_model(dir, model, tok, sizeof model);
    const char *cmds[] = {"replay %s snapkv 64 -q", "info %s", "policies", "generate %s -z %s -i 'hello' -n 4 -q"};
    for (size_t i = 0; i < sizeof cmds / sizeof *cmds; i++) {
        char a[1024];
        if (i == 3)
            snprintf(a, sizeof a, cmds[i], model, tok);
        else
            snprintf(a, sizeof a, cmds[i], t);
        snprintf(args, sizeof args, "%s >/dev/full", a);
        char cmd[4096], err[256];
        kv_test_tmp("stderr", err, sizeof err);
        snprintf(cmd, sizeof cmd, "%s %s 2>%s", getenv("KVSIM_BIN"), args, err);
        int st = system(cmd);
        slurp(err, g_err, sizeof g_err);
        unlink(err);
        ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 1, "%s: status %d\n%s", a, st, g_err);
        ASSERT_HAS(g_err, "standard output: write failed: No space left on device");
    }
}
END_TEST

/* ---------------------------------------------------------------- 4 */

START_TEST(f04_an_output_is_never_an_input)
{
    char dir[256], t[512], args[2048], before[65], after[65], model[512], tok[512], out[512], res[512];
    fresh_dir("inout", dir, sizeof dir);
    small_trace(dir, "t.h5", t, sizeof t);
    sha_of(t, before);
    snprintf(args, sizeof args, "replay %s snapkv 64 -q -o %s", t, t);
    ck_assert_int_eq(kvsim(args), 1);
    ASSERT_HAS(g_err, "same file");
    sha_of(t, after);
    ck_assert_str_eq(before, after);
    /* another spelling of it */
    snprintf(args, sizeof args, "replay %s snapkv 64 -q -o %s/./t.h5", t, dir);
    ck_assert_int_eq(kvsim(args), 1);
    /* -o equal to --json */
    snprintf(args, sizeof args, "replay %s snapkv 64 -q -o %s/r.tsv --json %s/r.tsv", t, dir, dir);
    ck_assert_int_eq(kvsim(args), 1);
    ASSERT_HAS(g_err, "same file");
    /* capture over its own model */
    fixture_model(dir, model, tok, sizeof model);
    sha_of(model, before);
    snprintf(args, sizeof args, "capture %s -z %s -i 'hello' --decode 2 -q -o %s", model, tok, model);
    ck_assert_int_eq(kvsim(args), 1);
    ASSERT_HAS(g_err, "same file");
    sha_of(model, after);
    ck_assert_str_eq(before, after);
    /* analyze whose results file is where the report goes */
    snprintf(out, sizeof out, "%s/rep", dir);
    ck_assert_int_eq(mkdir(out, 0755), 0);
    snprintf(res, sizeof res, "%s/report.md", out);
    snprintf(args, sizeof args, "replay %s snapkv 64 -q -o %s", t, res);
    ck_assert_int_eq(kvsim(args), 0);
    sha_of(res, before);
    snprintf(args, sizeof args, "analyze %s %s -q -o %s", t, res, out);
    ck_assert_int_eq(kvsim(args), 1);
    ASSERT_HAS(g_err, "same file");
    sha_of(res, after);
    ck_assert_str_eq(before, after);
}
END_TEST

/* ---------------------------------------------------------------- 5 */

/* Overwrite 16 bytes in the middle of the stored chunk `index` of dataset `name`. */
static void damage_chunk(const char *path, const char *name, int index)
{
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
    ck_assert(f >= 0 && d >= 0);
    hsize_t off[3];
    unsigned mask;
    haddr_t addr;
    hsize_t size;
    hid_t sp = H5Dget_space(d);
    ck_assert(H5Dget_chunk_info(d, sp, (hsize_t)index, off, &mask, &addr, &size) >= 0);
    H5Sclose(sp);
    H5Dclose(d);
    H5Fclose(f);
    FILE *fp = fopen(path, "r+b");
    ck_assert_ptr_nonnull(fp);
    ck_assert_int_eq(fseek(fp, (long)(addr + size / 2), SEEK_SET), 0);
    const unsigned char junk[16] = {0};
    ck_assert_int_eq(fwrite(junk, 1, 16, fp), 16);
    fclose(fp);
}

START_TEST(f05_changed_chunks_are_errors)
{
    char dir[256], t[512], args[2048];
    fresh_dir("chunks", dir, sizeof dir);
    small_trace(dir, "t.h5", t, sizeof t);
    damage_chunk(t, "/layers/1/k", 1);
    snprintf(args, sizeof args, "replay %s snapkv 64 -q", t);
    ck_assert_int_eq(kvsim(args), 1);
    ASSERT_HAS(g_err, t);
    ASSERT_HAS(g_err, "/layers/1/k");
    ASSERT_HAS(g_err, "chunk at (1, 0, 0)");
    snprintf(args, sizeof args, "info --verify %s", t);
    ck_assert_int_eq(kvsim(args), 1);
    ASSERT_HAS(g_out, "/layers/1/k: the chunk at (1, 0, 0): checksum mismatch");
    /* a summary: the pooled map analyze draws (its pooled "probabilities" of 2.3e9 before) */
    small_trace(dir, "u.h5", t, sizeof t);
    damage_chunk(t, "/layers/0/pooled", 2);
    snprintf(args, sizeof args, "analyze %s -q -o %s/rep", t, dir);
    ck_assert_int_eq(kvsim(args), 1);
    ASSERT_HAS(g_err, "/layers/0/pooled");
    snprintf(args, sizeof args, "info --verify %s", t);
    ck_assert_int_eq(kvsim(args), 1);
    ASSERT_HAS(g_out, "/layers/0/pooled: the chunk at (2, 0, 0)");
    /* the undamaged trace verifies */
    small_trace(dir, "v.h5", t, sizeof t);
    snprintf(args, sizeof args, "info --verify %s", t);
    ck_assert_msg(kvsim(args) == 0, "%s%s", g_out, g_err);
    ASSERT_HAS(g_out, "sound");
}
END_TEST

/* ---------------------------------------------------------------- 6 */

/* A 2-layer trace with a NaN in layer 1's K (KV head 0) in f32, or values beyond the f16 range in
 * layer 0's V (KV head 1) stored as f16. */
static void nonfinite_trace(const char *path, int f16)
{
    kv_trace_t *mem = kv_test_trace(2, 4, 2, 16, 96, 80, 0, 0, 11);
    const kv_trace_meta_t *m = kv_trace_meta(mem);
    kv_write_opts_t wo = {f16 ? KV_DTYPE_F16 : KV_DTYPE_F32, 0, 0};
    kv_trace_writer_t *w;
    ck_assert_int_eq(kv_trace_create(path, m, &wo, &w), KV_OK);
    for (int l = 0; l < 2; l++)
        for (int which = KV_T_Q; which <= KV_T_V; which++) {
            float *x = kv_trace_mem_tensor(mem, l, (kv_tensor_t)which);
            if (!f16 && l == 1 && which == KV_T_K)
                x[5 * 16 + 3] = NAN; /* head 0, token 5 */
            if (f16 && l == 0 && which == KV_T_V)
                x[(size_t)96 * 16 + 7] = 1e5f; /* head 1, token 0: inf in f16 */
            ck_assert_int_eq(kv_trace_write(w, l, (kv_tensor_t)which, x), KV_OK);
        }
    ck_assert_int_eq(kv_trace_commit(w), KV_OK);
    kv_trace_close(mem);
}

/* The value of column `col` in the TSV row whose first fields are "policy<TAB>budget<TAB>...". */
static double tsv_value(const char *path, const char *policy, int layer, int head, const char *col)
{
    kv_table_t *t;
    ck_assert_int_eq(kv_table_read(path, &t), KV_OK);
    int cp = kv_table_col(t, "policy"), cl = kv_table_col(t, "layer"), ch = kv_table_col(t, "head"),
        cc = kv_table_col(t, col);
    ck_assert(cp >= 0 && cl >= 0 && ch >= 0 && cc >= 0);
    char ls[16], hs[16];
    snprintf(ls, sizeof ls, "%d", layer);
    snprintf(hs, sizeof hs, "%d", head);
    double v = -12345;
    for (size_t r = 0; r < t->n_rows; r++)
        if (!strncmp(kv_table_get(t, r, cp), policy, strlen(policy)) &&
            !strcmp(kv_table_get(t, r, cl), layer < 0 ? "all" : ls) &&
            !strcmp(kv_table_get(t, r, ch), head < 0 ? "all" : hs)) {
            v = kv_table_num(t, r, cc);
            break;
        }
    kv_table_free(t);
    return v;
}

START_TEST(f06_nonfinite_values_are_reported)
{
    char dir[256], t[512], r[512], args[2048];
    fresh_dir("nan", dir, sizeof dir);
    snprintf(t, sizeof t, "%s/nan.h5", dir);
    nonfinite_trace(t, 0);
    kv_trace_t *tr;
    ck_assert_int_eq(kv_trace_open(t, &tr), KV_OK);
    ck_assert_int_eq(kv_trace_meta(tr)->nonfinite, 1);
    kv_trace_close(tr);
    snprintf(r, sizeof r, "%s/r.tsv", dir);
    snprintf(args, sizeof args, "replay %s full,snapkv 16 -q -o %s", t, r);
    ck_assert_msg(kvsim(args) == 0, "%s", g_err);
    ASSERT_HAS(g_err, "NaN or infinite");
    ASSERT_HAS(g_err, "nonfinite column");
    /* full's rows that read layer 1, KV head 0 (query heads 0 and 1): nan, never recall 1 */
    ck_assert(isnan(tsv_value(r, "full", 1, 0, "recall_mean")));
    ck_assert(isnan(tsv_value(r, "full", 1, 1, "err_max")));
    ck_assert(tsv_value(r, "full", 1, 0, "nonfinite") == 1);
    ck_assert(isnan(tsv_value(r, "full", -1, -1, "recall_mean")));
    ck_assert(tsv_value(r, "full", 1, 2, "recall_mean") == 1); /* KV head 1 is finite */
    ck_assert(tsv_value(r, "full", 0, -1, "recall_mean") == 1);
    ck_assert(tsv_value(r, "full", 0, -1, "nonfinite") == 0);
    /* analyze: the rows are named and left out; the figures are drawn from the rest */
    snprintf(args, sizeof args, "analyze %s %s -q -o %s/rep", t, r, dir);
    ck_assert_msg(kvsim(args) == 0, "%s", g_err);
    ASSERT_HAS(g_err, r);
    ASSERT_HAS(g_err, "nan or infinite metrics left out (data rows");
    ASSERT_HAS(g_err, "the funnel statistics of 2 heads are nan (layer 1 head 0, layer 1 head 1)");
    /* f16 overflow: inf stored, counted at write time, reported the same way */
    snprintf(t, sizeof t, "%s/f16.h5", dir);
    nonfinite_trace(t, 1);
    snprintf(args, sizeof args, "info %s", t);
    ck_assert_int_eq(kvsim(args), 0);
    ASSERT_HAS(g_out, "NaN/inf      1 value stored");
    snprintf(args, sizeof args, "replay %s full 16 -q -o %s", t, r);
    ck_assert_int_eq(kvsim(args), 0);
    ck_assert(isnan(tsv_value(r, "full", 0, 2, "recall_mean")));
    ck_assert(tsv_value(r, "full", 0, 2, "nonfinite") == 1);
    ck_assert(tsv_value(r, "full", 0, 0, "recall_mean") == 1);
    snprintf(args, sizeof args, "info --verify %s", t);
    ck_assert_int_eq(kvsim(args), 1);
    ASSERT_HAS(g_out, "layers/0/v head 1: 1 NaN or infinite value");
}
END_TEST

/* ---------------------------------------------------------------- 7 */

START_TEST(f07_damaged_hdf5_structures_are_errors)
{
    char dir[256], t[512], args[2048];
    fresh_dir("gcol", dir, sizeof dir);
    small_trace(dir, "t.h5", t, sizeof t);
    FILE *f = fopen(t, "r+b");
    ck_assert_ptr_nonnull(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    unsigned char *b = malloc((size_t)n);
    fseek(f, 0, SEEK_SET);
    ck_assert_int_eq(fread(b, 1, (size_t)n, f), n);
    long gcol = -1;
    for (long i = 0; i + 4 <= n && gcol < 0; i++)
        if (!memcmp(b + i, "GCOL", 4))
            gcol = i;
    ck_assert_int_ge(gcol, 0);
    /* the audit's byte: an object's size in the global heap (libhdf5 1.10 crashed in H5HG_read) */
    b[gcol + 25] = 0xff;
    fseek(f, 0, SEEK_SET);
    ck_assert_int_eq(fwrite(b, 1, (size_t)n, f), n);
    fclose(f);
    snprintf(args, sizeof args, "info %s", t);
    ck_assert_msg(kvsim(args) == 1, "status: %s", g_err);
    ASSERT_HAS(g_err, t);
    ASSERT_HAS(g_err, "damaged");
    snprintf(args, sizeof args, "replay %s snapkv 64 -q", t);
    ck_assert_int_eq(kvsim(args), 1);
    /* a string attribute's text changed (no crash, no HDF5 error): the attributes' checksum */
    small_trace(dir, "u.h5", t, sizeof t);
    f = fopen(t, "r+b");
    ck_assert_int_eq(fread(b, 1, (size_t)n, f), n);
    long at = -1;
    for (long i = 0; i + 12 <= n && at < 0; i++)
        if (!memcmp(b + i, "synth(layers", 12))
            at = i;
    ck_assert_int_ge(at, 0);
    fseek(f, at, SEEK_SET);
    fputc('S', f);
    fclose(f);
    free(b);
    snprintf(args, sizeof args, "info %s", t);
    ck_assert_int_eq(kvsim(args), 1);
    ASSERT_HAS(g_err, "meta_sha256");
}
END_TEST

/* ---------------------------------------------------------------- 8 */

/* Start `kvsim <args>` in the background, wait until a temporary file of `target` exists, send
 * `sig`; returns how kvsim ended (128 + signal, or its exit status). */
static int signal_mid_write(const char *args, const char *target, int sig)
{
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        char cmd[4096];
        snprintf(cmd, sizeof cmd, "exec %s %s >/dev/null 2>&1", getenv("KVSIM_BIN"), args);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    for (int i = 0; i < 2000 && kv_test_temps_of(target) == 0; i++)
        usleep(5000);
    ck_assert_msg(kv_test_temps_of(target) > 0, "no temporary file of %s appeared", target);
    kill(pid, sig);
    int st;
    ck_assert_int_eq(waitpid(pid, &st, 0), pid);
    return WIFSIGNALED(st) ? 128 + WTERMSIG(st) : WEXITSTATUS(st);
}

START_TEST(f08_temporary_files_never_stay)
{
    char dir[256], t[512], big[512], args[2048];
    fresh_dir("signals", dir, sizeof dir);
    small_trace(dir, "t.h5", t, sizeof t);
    snprintf(big, sizeof big, "%s/big.h5", dir);
    snprintf(args, sizeof args, "synth --layers 12 --heads 8 --kv-heads 4 --tokens 3000 --decode 16 -q -o %s", big);
    const int sigs[] = {SIGTERM, SIGINT};
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(signal_mid_write(args, big, sigs[i]), 128 + sigs[i]);
        ck_assert_int_eq(kv_test_temps_of(big), 0);
        ck_assert_int_eq(access(big, F_OK), -1);
    }
    /* SIGKILL: nothing can remove it; info reports it, clean removes it */
    ck_assert_int_eq(signal_mid_write(args, big, SIGKILL), 128 + SIGKILL);
    ck_assert_int_eq(kv_test_temps_of(big), 1);
    snprintf(args, sizeof args, "info %s", t);
    ck_assert_int_eq(kvsim(args), 0);
    ASSERT_HAS(g_out, "stale temps  1 temporary file");
    snprintf(args, sizeof args, "clean -n %s", dir);
    ck_assert_int_eq(kvsim(args), 0);
    ASSERT_HAS(g_out, "stale ");
    ck_assert_int_eq(kv_test_temps_of(big), 1);
    snprintf(args, sizeof args, "clean %s", dir);
    ck_assert_int_eq(kvsim(args), 0);
    ASSERT_HAS(g_out, "removed 1 stale temporary file");
    ck_assert_int_eq(kv_test_temps_of(big), 0);
    ck_assert_int_eq(access(t, F_OK), 0); /* the trace itself stays */
    snprintf(args, sizeof args, "info %s", t);
    ck_assert_int_eq(kvsim(args), 0);
    ck_assert_ptr_null(strstr(g_out, "stale temps"));
}
END_TEST

/* ---------------------------------------------------------------- 9 */

START_TEST(f09_two_analyze_runs_into_one_folder)
{
    char dir[256], t[512], r[512], cmd[4096];
    fresh_dir("twoanalyze", dir, sizeof dir);
    small_trace(dir, "t.h5", t, sizeof t);
    snprintf(r, sizeof r, "%s/r.tsv", dir);
    char args[2048];
    snprintf(args, sizeof args, "replay %s snapkv,streaming_llm 32,64 -q -o %s", t, r);
    ck_assert_int_eq(kvsim(args), 0);
    snprintf(cmd, sizeof cmd,
             "K=%s; ($K analyze %s %s -q -o %s/rep >/dev/null 2>%s/e1; echo $? >%s/s1) & "
             "($K analyze %s %s -q -o %s/rep >/dev/null 2>%s/e2; echo $? >%s/s2) & wait",
             getenv("KVSIM_BIN"), t, r, dir, dir, dir, t, r, dir, dir, dir);
    ck_assert_int_eq(system(cmd), 0);
    char s1[16], s2[16], p[600];
    snprintf(p, sizeof p, "%s/s1", dir);
    slurp(p, s1, sizeof s1);
    snprintf(p, sizeof p, "%s/s2", dir);
    slurp(p, s2, sizeof s2);
    snprintf(p, sizeof p, "%s/e1", dir);
    slurp(p, g_err, sizeof g_err);
    ck_assert_msg(atoi(s1) == 0 && atoi(s2) == 0, "statuses %s %s:\n%s", s1, s2, g_err);
    snprintf(p, sizeof p, "%s/rep/report.html", dir);
    ck_assert_int_eq(access(p, F_OK), 0);
    snprintf(p, sizeof p, "%s/rep/funneling.png", dir);
    ck_assert_int_eq(kv_test_temps_of(p), 0);
}
END_TEST

/* ---------------------------------------------------------------- 10 */

START_TEST(f10_long_output_names)
{
    char dir[256], t[512], name[300], args[2048], path[1024];
    fresh_dir("long", dir, sizeof dir);
    small_trace(dir, "t.h5", t, sizeof t);
    for (int len = 246; len <= 255; len += 3) {
        memset(name, 'a' + len % 26, (size_t)len);
        strcpy(name + len - 4, ".tsv");
        snprintf(path, sizeof path, "%s/%s", dir, name);
        snprintf(args, sizeof args, "replay %s snapkv 64 -q -o %s", t, path);
        ck_assert_msg(kvsim(args) == 0, "%d bytes: %s", len, g_err);
        ck_assert_int_eq(access(path, F_OK), 0);
    }
}
END_TEST

/* ---------------------------------------------------------------- 11 */

/* r.tsv with the first data row's `col` cell replaced by `value`. */
static void edit_results(const char *src, const char *dst, const char *col, const char *value)
{
    kv_table_t *t;
    ck_assert_int_eq(kv_table_read(src, &t), KV_OK);
    const int c = kv_table_col(t, col);
    ck_assert_int_ge(c, 0);
    FILE *f = fopen(dst, "w");
    for (int i = 0; i < t->n_prov; i++)
        fprintf(f, "# %s: %s\n", t->prov_keys[i], t->prov_vals[i]);
    for (int k = 0; k < t->n_cols; k++)
        fprintf(f, "%s%s", k ? "\t" : "", t->cols[k]);
    fputc('\n', f);
    for (size_t r = 0; r < t->n_rows; r++) {
        for (int k = 0; k < t->n_cols; k++)
            fprintf(f, "%s%s", k ? "\t" : "", r == 3 && k == c ? value : t->cells[r][k]);
        fputc('\n', f);
    }
    fclose(f);
    kv_table_free(t);
}

START_TEST(f11_edited_results_are_refused)
{
    char dir[256], t[512], r[512], e[512], args[2048];
    fresh_dir("edited", dir, sizeof dir);
    small_trace(dir, "t.h5", t, sizeof t);
    snprintf(r, sizeof r, "%s/r.tsv", dir);
    snprintf(args, sizeof args, "replay %s snapkv 64 -q -o %s", t, r);
    ck_assert_int_eq(kvsim(args), 0);
    snprintf(e, sizeof e, "%s/e.tsv", dir);
    const char *edits[][3] = {{"layer", "9999", "layer 9999"},
                              {"head", "500", "head 500"},
                              {"recall_mean", "abc", "'abc' is not a number"},
                              {"err_mean", "1e999", "'1e999' is out of the range"},
                              {"recall_min", "1.5", "outside [0, 1"},
                              {"violations", "0x10", "not a number"}};
    for (size_t i = 0; i < sizeof edits / sizeof *edits; i++) {
        edit_results(r, e, edits[i][0], edits[i][1]);
        snprintf(args, sizeof args, "analyze %s %s -q -o %s/rep", t, e, dir);
        ck_assert_msg(kvsim(args) == 1, "%s=%s accepted", edits[i][0], edits[i][1]);
        ASSERT_HAS(g_err, e);
        ASSERT_HAS(g_err, edits[i][2]);
    }
    /* a row repeated inside one file: said so, not as "later results files" */
    FILE *f = fopen(r, "a");
    char line[4096];
    kv_table_t *tab;
    ck_assert_int_eq(kv_table_read(r, &tab), KV_OK);
    line[0] = 0;
    for (int k = 0; k < tab->n_cols; k++) {
        strcat(line, k ? "\t" : "");
        strcat(line, tab->cells[5][k]);
    }
    kv_table_free(tab);
    fprintf(f, "%s\n", line);
    fclose(f);
    snprintf(args, sizeof args, "analyze %s %s -q -o %s/rep", t, r, dir);
    ck_assert_msg(kvsim(args) == 0, "%s", g_err);
    ASSERT_HAS(g_err, "1 row repeat");
    ck_assert_ptr_null(strstr(g_err, "later results files"));
}
END_TEST

/* ---------------------------------------------------------------- 12-15: arguments */

START_TEST(f12_15_arguments)
{
    char dir[256], t[512], args[2048], model[512], tok[512], empty[512];
    fresh_dir("args", dir, sizeof dir);
    small_trace(dir, "t.h5", t, sizeof t);
    /* 12: a huge sequence budget keeps everything, no overflow */
    snprintf(args, sizeof args, "replay %s snapkv seq:1000000000000000 -q", t);
    ck_assert_msg(kvsim(args) == 0, "%s", g_err);
    ck_assert_ptr_null(strstr(g_err, "less than one token"));
    ASSERT_HAS(g_out, "seq:1000000000000000\t1000000000\t");
    /* 15: hexadecimal and a vanishing fraction */
    const char *bad[] = {"0x40", "1e-300", "inf", "0x1p6", "nan", "1e"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        snprintf(args, sizeof args, "replay %s snapkv '%s' -q", t, bad[i]);
        ck_assert_msg(kvsim(args) == 2, "budget '%s': %s", bad[i], g_err);
        ASSERT_HAS(g_err, "BUDGETS");
    }
    /* a fraction of less than half a token of this context */
    snprintf(args, sizeof args, "replay %s snapkv 0.001 -q", t);
    ck_assert_int_eq(kvsim(args), 1);
    ASSERT_HAS(g_err, "less than half a token");
    /* 13: --segments x,y is a usage error, checked before the model is even read */
    fixture_model(dir, model, tok, sizeof model);
    snprintf(args, sizeof args, "capture %s -z %s -i 'hello world' -q -o %s/c.h5 --segments x,y", model, tok, dir);
    ck_assert_int_eq(kvsim(args), 2);
    ASSERT_HAS(g_err, "--segments");
    snprintf(args, sizeof args, "capture %s -z %s -i 'hello world' -q -o %s/c.h5 --segments 3,1", model, tok, dir);
    ck_assert_int_eq(kvsim(args), 2);
    /* 14: an empty prompt */
    snprintf(args, sizeof args, "capture %s -z %s -i '' -q -o %s/c.h5", model, tok, dir);
    ck_assert_int_eq(kvsim(args), 2);
    ASSERT_HAS(g_err, "the prompt is empty");
    snprintf(empty, sizeof empty, "%s/empty.txt", dir);
    FILE *f = fopen(empty, "w");
    fclose(f);
    snprintf(args, sizeof args, "capture %s -z %s -i @%s -q -o %s/c.h5", model, tok, empty, dir);
    ck_assert_int_eq(kvsim(args), 1);
    ASSERT_HAS(g_err, "empty.txt: the prompt file is empty");
    snprintf(args, sizeof args, "capture %s -z %s --prompt-file %s -q -o %s/c.h5", model, tok, empty, dir);
    ck_assert_int_eq(kvsim(args), 1);
    ck_assert_int_eq(access(empty, F_OK), 0);
}
END_TEST

/* ---------------------------------------------------------------- 16 */

START_TEST(f16_forward_position_overflow)
{
    char dir[256], model[512], tok[512];
    fresh_dir("fwd", dir, sizeof dir);
    fixture_model(dir, model, tok, sizeof model);
    kv_model_t *m;
    kv_backend_t *be;
    kv_fwd_t *f;
    ck_assert_int_eq(kv_model_load(model, &m), KV_OK);
    ck_assert_int_eq(kv_backend_open("cpu", 1, &be), KV_OK);
    ck_assert_int_eq(kv_fwd_create(m, be, 16, 16, &f), KV_OK);
    const int32_t tokens[2] = {1, 2};
    ck_assert_int_eq(kv_fwd_run(f, tokens, 2, INT_MAX, NULL, 0, NULL, NULL), KV_ERANGE);
    ASSERT_HAS(kv_last_error(), "2147483649");
    ck_assert_int_eq(kv_fwd_run(f, tokens, 2, INT_MAX - 1, NULL, 0, NULL, NULL), KV_ERANGE);
    kv_fwd_free(f);
    kv_backend_close(be);
    kv_model_free(m);
}
END_TEST

/* ---------------------------------------------------------------- 17 */

START_TEST(f17_no_complete_looking_partial_outputs)
{
    char dir[256], t[512], args[2048], tsv[512], json[512], rep[512], p[700];
    fresh_dir("partial", dir, sizeof dir);
    small_trace(dir, "t.h5", t, sizeof t);
    /* replay: a file-size limit between the TSV's size (~27 KiB) and the JSON's: neither is written */
    snprintf(tsv, sizeof tsv, "%s/r.tsv", dir);
    snprintf(json, sizeof json, "%s/r.json", dir);
    snprintf(args, sizeof args, "replay %s snapkv,streaming_llm 32,64 -q -o %s --json %s", t, tsv, json);
    ck_assert_int_eq(kvsim(args), 0);
    struct stat st_t, st_j;
    ck_assert_int_eq(stat(tsv, &st_t), 0);
    ck_assert_int_eq(stat(json, &st_j), 0);
    ck_assert(st_j.st_size > st_t.st_size + 1024);
    unlink(tsv);
    unlink(json);
    char limit[64];
    snprintf(limit, sizeof limit, "ulimit -f %ld;", (long)(st_t.st_size + st_j.st_size) / 2 / 512);
    ck_assert_int_eq(run(limit, args), 1);
    ASSERT_HAS(g_err, json);
    ck_assert_int_eq(access(tsv, F_OK), -1);
    ck_assert_int_eq(access(json, F_OK), -1);
    ck_assert_int_eq(kv_test_temps_of(tsv) + kv_test_temps_of(json), 0);
    /* analyze: a previous report stays whole when a new run fails while drawing */
    snprintf(args, sizeof args, "replay %s snapkv 64 -q -o %s", t, tsv);
    ck_assert_int_eq(kvsim(args), 0);
    snprintf(rep, sizeof rep, "%s/rep", dir);
    snprintf(args, sizeof args, "analyze %s %s -q -o %s", t, tsv, rep);
    ck_assert_int_eq(kvsim(args), 0);
    snprintf(p, sizeof p, "%s/report.html", rep);
    char before[65], after[65];
    sha_of(p, before);
    snprintf(args, sizeof args, "analyze %s %s -q -o %s --title 'another title'", t, tsv, rep);
    ck_assert_int_eq(run("ulimit -f 40;", args), 1);
    sha_of(p, after);
    ck_assert_str_eq(before, after);
    snprintf(p, sizeof p, "%s/funneling.png", rep);
    ck_assert_int_eq(kv_test_temps_of(p), 0);
    /* capture -o FOLDER: refused before anything is loaded (this model path does not even exist) */
    snprintf(args, sizeof args, "capture %s/no-model.bin -z %s/no-tok.bin -i 'hello' -q -o %s", dir, dir, rep);
    ck_assert_int_eq(kvsim(args), 1);
    ASSERT_HAS(g_err, "is a folder");
}
END_TEST

Suite *suite_hardening(void)
{
    Suite *s = suite_create("hardening");
    TCase *tc = tcase_create("audit");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, f16_forward_position_overflow);
    if (!getenv("KVSIM_BIN")) {
        kv_test_skip("hardening (the audit's CLI reproductions)", "KVSIM_BIN not set (run through make test)");
    } else {
        tcase_add_test(tc, f01_full_disk_is_an_error);
        tcase_add_test(tc, f02_only_regular_files_are_written);
        tcase_add_test(tc, f03_stdout_write_errors_fail);
        tcase_add_test(tc, f04_an_output_is_never_an_input);
        tcase_add_test(tc, f05_changed_chunks_are_errors);
        tcase_add_test(tc, f06_nonfinite_values_are_reported);
        tcase_add_test(tc, f07_damaged_hdf5_structures_are_errors);
        tcase_add_test(tc, f08_temporary_files_never_stay);
        tcase_add_test(tc, f09_two_analyze_runs_into_one_folder);
        tcase_add_test(tc, f10_long_output_names);
        tcase_add_test(tc, f11_edited_results_are_refused);
        tcase_add_test(tc, f12_15_arguments);
        tcase_add_test(tc, f17_no_complete_looking_partial_outputs);
    }
    suite_add_tcase(s, tc);
    return s;
}
