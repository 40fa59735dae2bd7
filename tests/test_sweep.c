/*
 * test_sweep.c: kvsim sweep (sim/sweep.h, analyze/kv_analyze_sweep.h, sim/cli/cmd_sweep.c).
 *   - the bootstrap interval against hand-computed cases, and its determinism given the seed;
 *   - manifest and dataset errors name the file and the key (or the file and the line);
 *   - a folder of .txt files as the dataset: ids from file names, in name order, the template;
 *   - through the built binary on stories260K (6 samples of tests/data/stories_qa.jsonl, about 0.5 s
 *     a sweep): a sweep killed midway (SIGKILL while it works), and an output folder with the
 *     leftovers of a kill inside a unit (temporary files, a finished trace, a lock), resume to the same
 *     merged bytes without rewriting a finished sample; a sample that fails (a prompt longer than the
 *     model's context) is recorded and the others go on, and is not retried unless asked; a folder
 *     made with other settings is refused naming the setting; the Slurm script is generated, its
 *     slices run by hand (the script itself, SLURM_ARRAY_TASK_ID set) and merged give the same bytes,
 *     and a merge with slices missing names them; mpirun -n 2 (when kvsim was built with MPI and
 *     mpirun exists) gives the same bytes as one process.
 */
#include "sim/common/kv_common.h"
#include "sim/sweep.h"
#include "tests/kv_test.h"

#include <check.h>
#include <dirent.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------- bootstrap */

START_TEST(bootstrap_hand_computed)
{
    double mean, lo, hi;
    /* {0, 0, 0, 1}: a resample's mean is k/4 with k ~ Binomial(4, 1/4): P(k = 0) = 0.316 > 0.025, so
     * the 2.5 % quantile is 0; P(k >= 3) = 0.0508 > 0.025 > P(k = 4) = 0.0039, so the 97.5 % quantile
     * is 3/4 (the order statistics around rank 0.975 (B - 1) are all 0.75 whatever the seed, with
     * B = 4000 the neighbouring bands are hundreds of ranks away). */
    const double a[4] = {0, 0, 0, 1};
    for (uint64_t seed = 0; seed < 4; seed++) {
        ck_assert_int_eq(kv_bootstrap_mean(a, 4, 4000, seed, 0.95, &mean, &lo, &hi), KV_OK);
        ck_assert(mean == 0.25);
        ck_assert_msg(lo == 0 && hi == 0.75, "seed %llu: [%g, %g], expected [0, 0.75]", (unsigned long long)seed, lo,
                      hi);
    }
    /* {0, 1}: means 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4: the interval is [0, 1] */
    const double b[2] = {0, 1};
    ck_assert_int_eq(kv_bootstrap_mean(b, 2, 4000, 7, 0.95, &mean, &lo, &hi), KV_OK);
    ck_assert(mean == 0.5 && lo == 0 && hi == 1);
    /* at 40 % confidence the quantiles are 0.3 and 0.7, inside the middle band: [1/2, 1/2] */
    ck_assert_int_eq(kv_bootstrap_mean(b, 2, 4000, 7, 0.4, &mean, &lo, &hi), KV_OK);
    ck_assert(lo == 0.5 && hi == 0.5);
    /* equal values, one value, NaN left out, nothing left */
    const double c[3] = {2, 2, 2}, d[3] = {NAN, 5, NAN}, e[2] = {NAN, NAN};
    ck_assert_int_eq(kv_bootstrap_mean(c, 3, 1000, 0, 0.95, &mean, &lo, &hi), KV_OK);
    ck_assert(mean == 2 && lo == 2 && hi == 2);
    ck_assert_int_eq(kv_bootstrap_mean(d, 3, 1000, 0, 0.95, &mean, &lo, &hi), KV_OK);
    ck_assert(mean == 5 && lo == 5 && hi == 5);
    ck_assert_int_eq(kv_bootstrap_mean(e, 2, 1000, 0, 0.95, &mean, &lo, &hi), KV_OK);
    ck_assert(isnan(mean) && isnan(lo) && isnan(hi));
    ck_assert_int_ne(kv_bootstrap_mean(b, 2, 0, 0, 0.95, &mean, &lo, &hi), KV_OK);
}
END_TEST

START_TEST(bootstrap_deterministic_given_seed)
{
    double x[50];
    for (int i = 0; i < 50; i++)
        x[i] = sin(i * 1.7) + 0.01 * i;
    double m1, l1, h1, m2, l2, h2, m3, l3, h3;
    ck_assert_int_eq(kv_bootstrap_mean(x, 50, 999, 42, 0.95, &m1, &l1, &h1), KV_OK);
    ck_assert_int_eq(kv_bootstrap_mean(x, 50, 999, 42, 0.95, &m2, &l2, &h2), KV_OK);
    ck_assert(m1 == m2 && l1 == l2 && h1 == h2); /* bit for bit */
    ck_assert(l1 < m1 && m1 < h1);
    ck_assert_int_eq(kv_bootstrap_mean(x, 50, 999, 43, 0.95, &m3, &l3, &h3), KV_OK);
    ck_assert(m3 == m1);
    ck_assert_msg(l3 != l1 || h3 != h1, "another seed draws other resamples");
    /* the interval of a mean of 50 values with sd ~0.7 is about +-1.96 sd / sqrt(50) = +-0.2 */
    ck_assert_msg(h1 - l1 > 0.25 && h1 - l1 < 0.55, "width %g", h1 - l1);
}
END_TEST

/* ---------------------------------------------------------------- manifests */

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    ck_assert_msg(f != NULL, "%s", path);
    fputs(text, f);
    fclose(f);
}

/* Load a manifest made of `body` (with the dataset file DATA substituted); return the error. */
static const char *load_error(const char *body, const char *data_lines, char *msg, size_t len)
{
    static char man[256], data[256];
    kv_test_tmp("m.json", man, sizeof man);
    kv_test_tmp("d.jsonl", data, sizeof data);
    write_text(data, data_lines);
    char text[4096], *at;
    snprintf(text, sizeof text, "%s", body);
    if ((at = strstr(text, "DATA"))) {
        char rest[4096];
        snprintf(rest, sizeof rest, "%s", at + 4);
        /* the data file's name relative to the manifest's folder (both in build/test-tmp) */
        snprintf(at, sizeof text - (size_t)(at - text), "%s%s", strrchr(data, '/') + 1, rest);
    }
    write_text(man, text);
    kv_sweep_t *s = NULL;
    int rc = kv_sweep_load(man, NULL, &s);
    kv_sweep_free(s);
    snprintf(msg, len, "%s", rc == KV_OK ? "(loaded)" : kv_last_error());
    unlink(man);
    unlink(data);
    return man;
}

#define EXPECT_ERR(body, data, ...)                                                                                    \
    do {                                                                                                               \
        char m_[2048];                                                                                                 \
        const char *f_ = load_error(body, data, m_, sizeof m_);                                                        \
        const char *want_[] = {__VA_ARGS__};                                                                           \
        ck_assert_msg(strstr(m_, strrchr(f_, '/') + 1) || strstr(m_, "d.jsonl"), "no file name in: %s", m_);           \
        for (size_t k_ = 0; k_ < sizeof want_ / sizeof want_[0]; k_++)                                                 \
            ck_assert_msg(strstr(m_, want_[k_]) != NULL, "'%s' not in: %s", want_[k_], m_);                            \
    } while (0)

#define GOOD_DATA "{\"_id\": \"a\", \"context\": \"Once upon a time.\", \"input\": \"Who?\"}\n"
#define BASE "\"model\": \"m.bin\", \"dataset\": \"DATA\", \"policies\": \"h2o\", \"budgets\": [16], \"output\": \"o\""

START_TEST(manifest_errors_name_file_and_key)
{
    char ok[2048];
    load_error("{" BASE "}", GOOD_DATA, ok, sizeof ok);
    ck_assert_msg(!strcmp(ok, "(loaded)"), "a good manifest: %s", ok);
    EXPECT_ERR("{" BASE ", \"capture\": {\"decod\": 4}}", GOOD_DATA, "capture.decod", "unknown key", "decode");
    EXPECT_ERR("{" BASE ", \"capture\": {\"decode\": \"x\"}}", GOOD_DATA, "capture.decode", "integer", "\"x\"");
    EXPECT_ERR("{" BASE ", \"capture\": {\"decode\": -1}}", GOOD_DATA, "capture.decode", "integer");
    EXPECT_ERR("{" BASE ", \"capture\": {\"dtype\": \"f8\"}}", GOOD_DATA, "capture.dtype", "f16");
    EXPECT_ERR("{" BASE ", \"replay\": {\"head_rows\": 1}}", GOOD_DATA, "replay.head_rows", "true or false");
    EXPECT_ERR("{" BASE ", \"bootstrap\": {\"confidence\": 1.5}}", GOOD_DATA, "bootstrap.confidence");
    EXPECT_ERR("{" BASE ", \"slurm\": {\"options\": [\"--mem=1G\", 3]}}", GOOD_DATA, "slurm.options[1]");
    EXPECT_ERR("{" BASE ", \"keep_trace\": true}", GOOD_DATA, "keep_trace", "unknown key", "keep_traces");
    EXPECT_ERR("{" BASE ", \"eval\": {}}", GOOD_DATA, "eval", "issue 13");
    EXPECT_ERR("{\"dataset\": \"DATA\", \"policies\": \"h2o\", \"budgets\": [16], \"output\": \"o\"}", GOOD_DATA,
               "model", "required");
    EXPECT_ERR("{\"model\": \"m.bin\", \"dataset\": \"DATA\", \"policies\": \"nosuch\", \"budgets\": [16], \"output\": "
               "\"o\"}",
               GOOD_DATA, "policies", "nosuch");
    EXPECT_ERR("{\"model\": \"m.bin\", \"dataset\": \"DATA\", \"policies\": \"h2o\", \"budgets\": [true], \"output\": "
               "\"o\"}",
               GOOD_DATA, "budgets[0]");
    EXPECT_ERR("{\"model\": \"m.bin\", \"dataset\": \"DATA\", \"policies\": \"h2o\", \"budgets\": \"16,x\", "
               "\"output\": \"o\"}",
               GOOD_DATA, "budgets", "x");
    EXPECT_ERR("{" BASE ",\n \"threads\": 2,,}", GOOD_DATA, ":2:", "not valid JSON");
    /* the dataset: file and line */
    EXPECT_ERR("{" BASE "}", GOOD_DATA "\n{\"_id\": \"b\", \"context\": 3\n", "d.jsonl:3", "not valid JSON");
    EXPECT_ERR("{" BASE "}", GOOD_DATA "{\"_id\": \"b\", \"text\": \"x\"}\n", "d.jsonl:2", "\"context\"",
               "context_key");
    EXPECT_ERR("{" BASE "}", GOOD_DATA "[1, 2]\n", "d.jsonl:2", "JSON object");
    EXPECT_ERR("{" BASE "}", GOOD_DATA "{\"_id\": \"a\", \"context\": \"y\"}\n", "d.jsonl", "same id 'a'");
    EXPECT_ERR("{" BASE "}", "\n\n", "d.jsonl", "no samples");
    EXPECT_ERR("{\"model\": \"m.bin\", \"dataset\": {\"path\": \"DATA\", \"template\": \"{context} {nope}\"}, "
               "\"policies\": \"h2o\", \"budgets\": [16], \"output\": \"o\"}",
               GOOD_DATA, "d.jsonl:1", "{nope}");
}
END_TEST

START_TEST(datasets_ids_and_templates)
{
    char dir[256], man[256], p[512];
    kv_test_tmp("docs", dir, sizeof dir);
    ck_assert_int_eq(mkdir(dir, 0755), 0);
    snprintf(p, sizeof p, "%s/b doc.txt", dir);
    write_text(p, "Second text.");
    snprintf(p, sizeof p, "%s/a.txt", dir);
    write_text(p, "First text.");
    snprintf(p, sizeof p, "%s/notes.md", dir);
    write_text(p, "not a sample");
    kv_test_tmp("folder.json", man, sizeof man);
    char text[1024];
    snprintf(text, sizeof text,
             "{\"model\": \"m.bin\", \"dataset\": {\"path\": \"%s\", \"template\": \"<{context}>\"}, "
             "\"policies\": [\"h2o\", \"snapkv(window=8)\"], \"budgets\": [16, \"0.5\"], \"output\": \"o\"}",
             strrchr(dir, '/') + 1);
    write_text(man, text);
    kv_sweep_t *s = NULL;
    ck_assert_msg(kv_sweep_load(man, NULL, &s) == KV_OK, "%s", kv_last_error());
    ck_assert_int_eq(kv_sweep_n_samples(s), 2);
    ck_assert_str_eq(kv_sweep_sample_id(s, 0), "a");
    ck_assert_str_eq(kv_sweep_sample_id(s, 1), "b_doc");
    ck_assert_str_eq(kv_sweep_sample_prompt(s, 0), "<First text.>");
    kv_sweep_free(s);
    /* JSONL: the default template adds the question; ids from _id, else the line number */
    char data[256];
    kv_test_tmp("q.jsonl", data, sizeof data);
    write_text(data, "{\"_id\": \"x/1\", \"context\": \"Ctx.\", \"input\": \"Who?\", \"answers\": [\"A\"]}\n"
                     "\n"
                     "{\"context\": \"Only context.\", \"input\": \"\"}\n");
    snprintf(text, sizeof text,
             "{\"model\": \"m.bin\", \"dataset\": \"%s\", \"policies\": \"h2o\", \"budgets\": [16], \"output\": "
             "\"o\"}",
             strrchr(data, '/') + 1);
    write_text(man, text);
    ck_assert_msg(kv_sweep_load(man, NULL, &s) == KV_OK, "%s", kv_last_error());
    ck_assert_int_eq(kv_sweep_n_samples(s), 2);
    ck_assert_str_eq(kv_sweep_sample_id(s, 0), "x_1");
    ck_assert_str_eq(kv_sweep_sample_id(s, 1), "000003");
    ck_assert_str_eq(kv_sweep_sample_prompt(s, 0), "Ctx.\n\nQuestion: Who?\nAnswer:");
    ck_assert_str_eq(kv_sweep_sample_prompt(s, 1), "Only context.");
    kv_sweep_free(s);
}
END_TEST

/* ---------------------------------------------------------------- through the binary */

static char g_model[512], g_tok[512], g_data[512];

static void abs_path(const char *p, char *out, size_t len)
{
    char cwd[1024];
    ck_assert(getcwd(cwd, sizeof cwd) != NULL);
    if (p[0] == '/')
        snprintf(out, len, "%s", p);
    else
        snprintf(out, len, "%s/%s", cwd, p);
}

/* A manifest over the first `limit` samples of stories_qa (or of `data`) into man; extra: more keys. */
static void make_manifest(char *man, size_t len, const char *data, int limit, int decode, const char *extra)
{
    kv_test_tmp("sweep.json", man, len);
    char m[1100], t[1100], d[1100], text[8192];
    abs_path(g_model, m, sizeof m);
    abs_path(g_tok, t, sizeof t);
    abs_path(data ? data : g_data, d, sizeof d);
    snprintf(text, sizeof text,
             "{\n  \"name\": \"test\",\n  \"model\": \"%s\",\n  \"tokenizer\": \"%s\",\n"
             "  \"dataset\": {\"path\": \"%s\", \"limit\": %d,\n"
             "              \"template\": \"{context}\\n<|endoftext|>\\nQuestion: {input}\\nAnswer:\"},\n"
             "  \"policies\": [\"streaming_llm\", \"snapkv(window=8)\", \"shotkv\"],\n  \"budgets\": [16, 0.25],\n"
             "  \"capture\": {\"decode\": %d, \"pool\": 32},\n  \"backend\": \"cpu\",\n  \"threads\": 1,\n"
             "  \"output\": \"unused\",%s\n  \"slurm\": {\"tasks\": 3, \"setup\": [\"echo task "
             "$SLURM_ARRAY_TASK_ID\"]}\n}\n",
             m, t, d, limit, decode, extra ? extra : "");
    write_text(man, text);
}

static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...)
{
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 255;
}

static char *slurp(const char *path)
{
    size_t len;
    return kv_test_read_file(path, &len);
}

static void assert_same_file(const char *a, const char *b)
{
    size_t la = 0, lb = 0;
    char *x = kv_test_read_file(a, &la), *y = kv_test_read_file(b, &lb);
    ck_assert_msg(la == lb && !memcmp(x, y, la), "%s and %s differ (%zu vs %zu bytes)", a, b, la, lb);
    free(x);
    free(y);
}

static void assert_same_merge(const char *ref, const char *dir)
{
    const char *files[] = {"results.tsv", "aggregate.tsv", "failed.tsv", "funnel.tsv"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char a[512], b[512];
        snprintf(a, sizeof a, "%s/%s", ref, files[i]);
        snprintf(b, sizeof b, "%s/%s", dir, files[i]);
        assert_same_file(a, b);
    }
}

/* The reference: one process, from scratch. */
static void reference(const char *man, char *ref, size_t len)
{
    kv_test_tmp("ref", ref, len);
    ck_assert_int_eq(sh("%s sweep -q %s -o %s", getenv("KVSIM_BIN"), man, ref), 0);
}

static long count_lines_starting(const char *path, const char *prefix)
{
    char *t = slurp(path);
    long n = 0;
    for (char *l = t; l && *l;) {
        if (!strncmp(l, prefix, strlen(prefix)))
            n++;
        char *nl = strchr(l, '\n');
        l = nl ? nl + 1 : NULL;
    }
    free(t);
    return n;
}

START_TEST(resume_after_kill_same_bytes)
{
    char man[256], ref[256], dir[256], p[600];
    make_manifest(man, sizeof man, NULL, 8, 8, NULL);
    reference(man, ref, sizeof ref);
    snprintf(p, sizeof p, "%s/results.tsv", ref);
    ck_assert_int_eq(count_lines_starting(p, "stories-qa-"), 8 * 2 * 3 * 6); /* samples x budgets x pols x rows */
    /* 1. killed while it works: SIGKILL once two samples are finished */
    kv_test_tmp("killed", dir, sizeof dir);
    pid_t pid = fork();
    ck_assert(pid >= 0);
    if (pid == 0) {
        execl(getenv("KVSIM_BIN"), "kvsim", "sweep", "-q", "--no-figures", man, "-o", dir, (char *)NULL);
        _exit(127);
    }
    char second[600];
    snprintf(second, sizeof second, "%s/samples/stories-qa-01.tsv", dir);
    for (int i = 0; i < 30000 && access(second, F_OK) != 0; i++)
        nanosleep(&(struct timespec){0, 2000000}, NULL);
    kill(pid, SIGKILL);
    int st;
    waitpid(pid, &st, 0);
    ck_assert_msg(WIFSIGNALED(st), "the sweep finished before it was killed");
    /* every finished sample is whole: the reference's rows for it, byte for byte */
    struct {
        char id[64];
        ino_t ino;
        struct timespec mtime;
    } fin[16];
    memset(fin, 0, sizeof fin);
    int n_fin = 0;
    DIR *d;
    snprintf(p, sizeof p, "%s/samples", dir);
    ck_assert((d = opendir(p)) != NULL);
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (l < 5 || strcmp(e->d_name + l - 4, ".tsv") || strstr(e->d_name, ".funnel"))
            continue;
        ck_assert(n_fin < 16);
        snprintf(fin[n_fin].id, sizeof fin[n_fin].id, "%.*s", (int)(l - 4), e->d_name);
        char a[700], b[700];
        snprintf(a, sizeof a, "%s/samples/%s", dir, e->d_name);
        snprintf(b, sizeof b, "%s/results.tsv", ref);
        struct stat sa;
        ck_assert_int_eq(stat(a, &sa), 0);
        fin[n_fin].ino = sa.st_ino;
        fin[n_fin].mtime = sa.st_mtim;
        char prefix[80];
        snprintf(prefix, sizeof prefix, "%s\t", fin[n_fin].id);
        ck_assert_int_eq(count_lines_starting(a, "streaming_llm") + count_lines_starting(a, "snapkv") +
                             count_lines_starting(a, "shotkv"),
                         count_lines_starting(b, prefix));
        n_fin++;
    }
    closedir(d);
    ck_assert_msg(n_fin >= 2 && n_fin < 8, "%d samples finished when killed", n_fin);
    /* resume: the same merged bytes; the finished samples are not redone (same file, same time) */
    ck_assert_int_eq(sh("%s sweep -q %s -o %s", getenv("KVSIM_BIN"), man, dir), 0);
    assert_same_merge(ref, dir);
    for (int i = 0; i < n_fin; i++) {
        struct stat sb;
        snprintf(p, sizeof p, "%s/samples/%s.tsv", dir, fin[i].id);
        ck_assert_int_eq(stat(p, &sb), 0);
        ck_assert_msg(sb.st_ino == fin[i].ino && sb.st_mtim.tv_sec == fin[i].mtime.tv_sec &&
                          sb.st_mtim.tv_nsec == fin[i].mtime.tv_nsec,
                      "%s was rewritten on resume", p);
    }
    /* no temporary file, lock or trace is left */
    ck_assert_int_eq(sh("test -z \"$(cd %s && ls samples traces | grep -e tmp -e lock -e '\\.h5')\"", dir), 0);
    /* 2. what a kill inside a unit leaves: half-written temporaries, a finished trace, a stale lock
     * file; and sample 5's results removed so it is redone (from the trace left there) */
    snprintf(p, sizeof p, "%s/samples/stories-qa-05.tsv", dir);
    ck_assert_int_eq(unlink(p), 0);
    char keep[256];
    make_manifest(keep, sizeof keep, NULL, 8, 8, "\n  \"keep_traces\": true,");
    ck_assert_int_eq(sh("%s sweep -q --no-figures %s -o %s.keep --slice 5/8 && cp %s.keep/traces/stories-qa-05.h5 "
                        "%s/traces/",
                        getenv("KVSIM_BIN"), keep, dir, dir, dir),
                     0);
    snprintf(p, sizeof p, "%s/samples/stories-qa-05.tsv.tmp-99999", dir);
    write_text(p, "policy\tbudget\nhalf");
    snprintf(p, sizeof p, "%s/samples/stories-qa-05.funnel.tsv.tmp-99999", dir);
    write_text(p, "layer\n0");
    snprintf(p, sizeof p, "%s/traces/stories-qa-06.h5.tmp-99999", dir);
    write_text(p, "not hdf5");
    snprintf(p, sizeof p, "%s/samples/stories-qa-05.lock", dir);
    write_text(p, "");
    ck_assert_int_eq(sh("%s sweep -q %s -o %s", getenv("KVSIM_BIN"), man, dir), 0);
    assert_same_merge(ref, dir);
    ck_assert_int_eq(sh("test -z \"$(cd %s && ls samples traces | grep -e tmp -e lock -e '\\.h5')\"", dir), 0);
    sh("rm -rf %s %s %s.keep", ref, dir, dir);
}
END_TEST

START_TEST(failed_sample_recorded_and_skipped)
{
    /* four samples, the second 8 times too long for stories260K's 512-token context */
    char data[256], man[256], dir[256], p[600];
    kv_test_tmp("fail.jsonl", data, sizeof data);
    char *all = slurp(g_data);
    FILE *f = fopen(data, "w");
    ck_assert(f != NULL);
    int line = 0;
    for (char *l = all; l && *l && line < 4; line++) {
        char *nl = strchr(l, '\n');
        if (nl)
            *nl = 0;
        if (line == 1) {
            /* the context repeated: {"_id": ..., "context": "X", ...} -> "XXXXXXXX" */
            char *c = strstr(l, "\"context\": \"") + 12, *end = strstr(c, "\", \"input\"");
            fprintf(f, "%.*s", (int)(c - l), l);
            for (int k = 0; k < 8; k++)
                fprintf(f, "%.*s", (int)(end - c), c);
            fprintf(f, "%s\n", end);
        } else {
            fprintf(f, "%s\n", l);
        }
        l = nl ? nl + 1 : NULL;
    }
    fclose(f);
    free(all);
    make_manifest(man, sizeof man, data, 0, 8, NULL);
    kv_test_tmp("failrun", dir, sizeof dir);
    char err[300];
    kv_test_tmp("err", err, sizeof err);
    ck_assert_int_eq(sh("%s sweep %s -o %s 2>%s", getenv("KVSIM_BIN"), man, dir, err), 0);
    char *e = slurp(err);
    ck_assert_msg(strstr(e, "stories-qa-01 failed (capture)") && strstr(e, "1 of 4 samples failed"), "%s", e);
    ck_assert_msg(strstr(e, "3/4 done, 1 failed, 0 running"), "progress: %s", e);
    free(e);
    snprintf(p, sizeof p, "%s/failed.tsv", dir);
    char *ft = slurp(p);
    ck_assert_msg(strstr(ft, "stories-qa-01\tfailed\tcapture: the prompt (") && strstr(ft, "context of 512 tokens"),
                  "%s", ft);
    free(ft);
    snprintf(p, sizeof p, "%s/results.tsv", dir);
    ck_assert_int_eq(count_lines_starting(p, "stories-qa-01"), 0);
    ck_assert_int_gt(count_lines_starting(p, "stories-qa-03"), 0);
    ck_assert_int_gt(count_lines_starting(p, "# samples: 4 (3 finished, 1 failed, 0 missing)"), 0);
    snprintf(p, sizeof p, "%s/aggregate.tsv", dir);
    ck_assert_int_gt(count_lines_starting(p, "streaming_llm(sinks=4,mode=oneshot,gran=kv,agg=mean)\t16\t3\t"), 0);
    /* a second run does not retry it; --retry-failed does (and it fails again, recorded again) */
    struct stat a, b;
    snprintf(p, sizeof p, "%s/samples/stories-qa-01.failed", dir);
    ck_assert_int_eq(stat(p, &a), 0);
    ck_assert_int_eq(sh("%s sweep -q %s -o %s 2>/dev/null", getenv("KVSIM_BIN"), man, dir), 0);
    ck_assert_int_eq(stat(p, &b), 0);
    ck_assert(a.st_ino == b.st_ino && a.st_mtim.tv_sec == b.st_mtim.tv_sec && a.st_mtim.tv_nsec == b.st_mtim.tv_nsec);
    ck_assert_int_eq(sh("%s sweep -q --retry-failed %s -o %s 2>/dev/null", getenv("KVSIM_BIN"), man, dir), 0);
    ck_assert_int_eq(stat(p, &b), 0);
    ck_assert_msg(a.st_mtim.tv_sec != b.st_mtim.tv_sec || a.st_mtim.tv_nsec != b.st_mtim.tv_nsec,
                  "--retry-failed did not redo the failed sample");
    /* --status counts */
    ck_assert_int_eq(sh("%s sweep --status %s -o %s | grep -q '4 samples: 3 finished, 1 failed, 0 missing'",
                        getenv("KVSIM_BIN"), man, dir),
                     0);
    /* other settings on the same folder are refused, naming the setting */
    char man2[256];
    make_manifest(man2, sizeof man2, data, 0, 4, NULL);
    kv_test_tmp("err2", err, sizeof err);
    ck_assert_int_eq(sh("%s sweep -q %s -o %s 2>%s", getenv("KVSIM_BIN"), man2, dir, err), 1);
    e = slurp(err);
    ck_assert_msg(strstr(e, "sweep.json") && strstr(e, "capture.decode is 4") && strstr(e, "8 there"), "%s", e);
    free(e);
    sh("rm -rf %s", dir);
}
END_TEST

START_TEST(slurm_slices_merge_to_same_bytes)
{
    char man[256], ref[256], dir[256], p[600], err[300];
    make_manifest(man, sizeof man, NULL, 7, 8, NULL);
    reference(man, ref, sizeof ref);
    kv_test_tmp("slurm", dir, sizeof dir);
    ck_assert_int_eq(sh("%s sweep --slurm %s -o %s >/dev/null 2>&1", getenv("KVSIM_BIN"), man, dir), 0);
    snprintf(p, sizeof p, "%s/slurm/sweep.sbatch", dir);
    char *script = slurp(p);
    ck_assert_msg(strstr(script, "#!/bin/bash\n") == script, "%s", script);
    ck_assert_msg(strstr(script, "#SBATCH --array=0-2\n") && strstr(script, "--slice \"$SLURM_ARRAY_TASK_ID/3\"") &&
                      strstr(script, "echo task $SLURM_ARRAY_TASK_ID\n") && strstr(script, "#SBATCH --output="),
                  "%s", script);
    free(script);
    /* two of three slices: the merge refuses, naming what is missing */
    for (int k = 0; k < 2; k++)
        ck_assert_int_eq(sh("SLURM_ARRAY_TASK_ID=%d bash %s >/dev/null 2>&1", k, p), 0);
    kv_test_tmp("err", err, sizeof err);
    ck_assert_int_eq(sh("%s sweep --merge %s -o %s 2>%s", getenv("KVSIM_BIN"), man, dir, err), 1);
    char *e = slurp(err);
    ck_assert_msg(strstr(e, "2 of 7 samples are not finished: stories-qa-02 (sample 3), stories-qa-05 (sample 6)"),
                  "%s", e);
    free(e);
    /* the third slice, then the merge: the single process's bytes */
    ck_assert_int_eq(sh("SLURM_ARRAY_TASK_ID=2 bash %s >/dev/null 2>&1", p), 0);
    ck_assert_int_eq(sh("%s sweep -q --merge %s -o %s", getenv("KVSIM_BIN"), man, dir), 0);
    assert_same_merge(ref, dir);
    snprintf(p, sizeof p, "%s/figures/comparison.png", dir);
    ck_assert_int_eq(access(p, F_OK), 0);
    sh("rm -rf %s %s", ref, dir);
}
END_TEST

START_TEST(mpi_two_ranks_same_bytes)
{
    char man[256], ref[256], dir[256], err[300];
    make_manifest(man, sizeof man, NULL, 6, 8, NULL);
    reference(man, ref, sizeof ref);
    kv_test_tmp("mpi", dir, sizeof dir);
    kv_test_tmp("err", err, sizeof err);
    const int rc = sh("timeout 120 mpirun --allow-run-as-root --oversubscribe -n 2 %s sweep %s -o %s 2>%s",
                      getenv("KVSIM_BIN"), man, dir, err);
    char *e = slurp(err);
    ck_assert_msg(rc == 0, "mpirun: %d: %s", rc, e);
    ck_assert_msg(strstr(e, "on 2 MPI ranks") && strstr(e, "6/6 done, 0 failed"), "%s", e);
    free(e);
    assert_same_merge(ref, dir);
    sh("rm -rf %s %s", ref, dir);
}
END_TEST

START_TEST(cli_help_and_usage)
{
    char out[300];
    kv_test_tmp("out", out, sizeof out);
    ck_assert_int_eq(sh("%s sweep --help >%s", getenv("KVSIM_BIN"), out), 0);
    char *t = slurp(out);
    ck_assert_msg(strstr(t, "usage: kvsim sweep MANIFEST") == t && strstr(t, "\noptions:\n") && strstr(t, "--slurm") &&
                      strstr(t, "--merge") && strstr(t, "\nexample:\n"),
                  "%s", t);
    free(t);
    ck_assert_int_eq(sh("%s sweep >/dev/null 2>%s", getenv("KVSIM_BIN"), out), 2);
    ck_assert_int_eq(sh("%s sweep --slice 3/3 m.json >/dev/null 2>%s", getenv("KVSIM_BIN"), out), 2);
    t = slurp(out);
    ck_assert_msg(strstr(t, "--slice expects K/N") && strstr(t, "kvsim sweep --help"), "%s", t);
    free(t);
    ck_assert_int_eq(sh("%s sweep --merge --slurm m.json >/dev/null 2>/dev/null", getenv("KVSIM_BIN")), 2);
    ck_assert_int_eq(sh("%s sweep nosuch.json >/dev/null 2>%s", getenv("KVSIM_BIN"), out), 1);
    t = slurp(out);
    ck_assert_msg(strstr(t, "kvsim sweep: ") && strstr(t, "nosuch.json"), "%s", t);
    free(t);
}
END_TEST

Suite *suite_sweep(void)
{
    Suite *s = suite_create("sweep");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, bootstrap_hand_computed);
    tcase_add_test(tc, bootstrap_deterministic_given_seed);
    tcase_add_test(tc, manifest_errors_name_file_and_key);
    tcase_add_test(tc, datasets_ids_and_templates);
    const int bin = getenv("KVSIM_BIN") != NULL;
    if (bin)
        tcase_add_test(tc, cli_help_and_usage);
    else
        kv_test_skip("sweep cli", "KVSIM_BIN not set (run through make test)");
    const int model = kv_test_shared("models/stories260K/stories260K.bin", g_model, sizeof g_model) &&
                      kv_test_shared("models/stories260K/tok512.bin", g_tok, sizeof g_tok);
    snprintf(g_data, sizeof g_data, "tests/data/stories_qa.jsonl");
    if (bin && model && access(g_data, R_OK) == 0) {
        tcase_add_test(tc, resume_after_kill_same_bytes);
        tcase_add_test(tc, failed_sample_recorded_and_skipped);
        tcase_add_test(tc, slurm_slices_merge_to_same_bytes);
        if (!kv_sweep_mpi_available())
            kv_test_skip("sweep mpi_two_ranks_same_bytes", "kvsim was built without MPI (no mpicc)");
        else if (system("command -v mpirun >/dev/null 2>&1") != 0)
            kv_test_skip("sweep mpi_two_ranks_same_bytes", "mpirun is not installed (apt-get install openmpi-bin)");
        else
            tcase_add_test(tc, mpi_two_ranks_same_bytes);
    } else {
        kv_test_skip("sweep runs", bin ? "stories260K or tests/data/stories_qa.jsonl not found"
                                       : "KVSIM_BIN not set (run through make test)");
    }
    suite_add_tcase(s, tc);
    return s;
}
