/*
 * test_cli_ux.c: the command line as a user meets it, through the built binary ($KVSIM_BIN, set by
 * `make test`; without it the suite registers nothing and says so).
 *   - every subcommand answers --help with exit 0, on stdout, in the one shape of sim/cli/cli.h
 *     (usage line, options, example), and `kvsim help CMD` prints the same text;
 *   - usage errors (unknown option, option without its value, unknown command, no command) exit 2
 *     and the message names the option and points to --help;
 *   - README's Quickstart, run on a small synthetic trace (`kvsim synth --preset tiny`, shrunk):
 *     info, policies, both replay lines, analyze with `-o DIR/`; each exits 0 and leaves its files;
 *   - `kvsim info` shows what traces/FORMAT.md promises: every root attribute of FORMAT.md's table
 *     appears in `kvsim info --attrs` with the value the trace was made with.
 * Each test runs a handful of short kvsim processes on traces of a few hundred tokens (< 10 s all).
 */
#include "tests/kv_test.h"

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *const COMMANDS[] = {"capture",  "generate", "nll",  "synth",    "info", "replay",
                                       "policies", "analyze",  "demo", "tokenize", "clean"};
#define N_COMMANDS ((int)(sizeof COMMANDS / sizeof COMMANDS[0]))

/* Output of the last run (stdout and stderr), NUL-terminated, at most 64 KiB each. */
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

/* Run "$KVSIM_BIN <args>" through the shell; capture stdout and stderr; return the exit status. */
static int kvsim(const char *args)
{
    char out[256], err[256], cmd[4096];
    kv_test_tmp("stdout", out, sizeof out);
    kv_test_tmp("stderr", err, sizeof err);
    snprintf(cmd, sizeof cmd, "%s %s >%s 2>%s", getenv("KVSIM_BIN"), args, out, err);
    int st = system(cmd);
    slurp(out, g_out, sizeof g_out);
    slurp(err, g_err, sizeof g_err);
    unlink(out);
    unlink(err);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 255;
}

#define ASSERT_HAS(hay, needle, what)                                                                                  \
    ck_assert_msg(strstr((hay), (needle)) != NULL, "%s: '%s' not found in:\n%.1500s", (what), (needle), (hay))

/* Several kvsim runs at once (a process start costs ~0.1 s, mostly the dynamic loader): each
 * args[i] runs in the background, then the outputs and statuses are read back. */
typedef struct {
    int status;
    char out[1 << 14], err[1 << 12];
} run_t;

static void kvsim_batch(int n, const char *const *args, run_t *r)
{
    static char script[1 << 14];
    char base[256];
    kv_test_tmp("batch", base, sizeof base);
    size_t k = 0;
    for (int i = 0; i < n; i++)
        k += (size_t)snprintf(script + k, sizeof script - k, "(%s %s >%s.%d.out 2>%s.%d.err; echo $? >%s.%d.st) & ",
                              getenv("KVSIM_BIN"), args[i], base, i, base, i, base, i);
    snprintf(script + k, sizeof script - k, "wait");
    ck_assert_msg(k < sizeof script - 8, "batch script too long");
    ck_assert_int_eq(system(script), 0);
    for (int i = 0; i < n; i++) {
        char path[300], st[32];
        snprintf(path, sizeof path, "%s.%d.out", base, i);
        slurp(path, r[i].out, sizeof r[i].out);
        unlink(path);
        snprintf(path, sizeof path, "%s.%d.err", base, i);
        slurp(path, r[i].err, sizeof r[i].err);
        unlink(path);
        snprintf(path, sizeof path, "%s.%d.st", base, i);
        slurp(path, st, sizeof st);
        unlink(path);
        r[i].status = st[0] ? atoi(st) : -1;
    }
}

/* 1 when the file holds `needle` (read whole; results files outgrow the capture buffers). */
static int file_has(const char *path, const char *needle)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return 0;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    int found = 0;
    if (buf && fread(buf, 1, (size_t)n, f) == (size_t)n) {
        buf[n] = 0;
        found = strstr(buf, needle) != NULL;
    }
    free(buf);
    fclose(f);
    return found;
}

static int exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && st.st_size > 0;
}

/* ---------------------------------------------------------------- --help */

START_TEST(every_command_answers_help)
{
    static run_t r[N_COMMANDS + 5];
    const char *args[N_COMMANDS + 5];
    char buf[N_COMMANDS][64];
    for (int i = 0; i < N_COMMANDS; i++) {
        snprintf(buf[i], sizeof buf[i], "%s --help", COMMANDS[i]);
        args[i] = buf[i];
    }
    /* -h and `kvsim help CMD` give the same text (spot checks) */
    args[N_COMMANDS] = "replay -h";
    args[N_COMMANDS + 1] = "help synth";
    /* the command list, on stdout with exit 0 when asked for; the version */
    args[N_COMMANDS + 2] = "--help";
    args[N_COMMANDS + 3] = "help";
    args[N_COMMANDS + 4] = "--version";
    kvsim_batch(N_COMMANDS + 5, args, r);
    for (int i = 0; i < N_COMMANDS; i++) {
        const char *what = args[i], *out = r[i].out;
        char want[64];
        ck_assert_msg(r[i].status == 0, "kvsim %s: exit status %d, not 0", what, r[i].status);
        ck_assert_msg(r[i].err[0] == 0, "kvsim %s wrote to stderr: %s", what, r[i].err);
        snprintf(want, sizeof want, "usage: kvsim %s", COMMANDS[i]);
        ck_assert_msg(!strncmp(out, want, strlen(want)), "kvsim %s: help does not start with '%s':\n%.200s", what, want,
                      out);
        ASSERT_HAS(out, "\noptions:\n", what);
        ASSERT_HAS(out, "-h, --help", what);
        ASSERT_HAS(out, "\nexample:\n  kvsim ", what);
        /* the example section comes last: nothing but example lines after it */
        const char *ex = strstr(out, "\nexample:\n");
        for (const char *l = strchr(ex + 1, '\n') + 1; *l; l = strchr(l, '\n') + 1) {
            ck_assert_msg(!strncmp(l, "  kvsim ", 8), "kvsim %s: line after the example: %.60s", what, l);
            if (!strchr(l, '\n'))
                break;
        }
    }
    ck_assert_int_eq(r[N_COMMANDS].status, 0);
    ck_assert_str_eq(r[N_COMMANDS].out, r[5].out); /* replay */
    ck_assert_int_eq(r[N_COMMANDS + 1].status, 0);
    ck_assert_str_eq(r[N_COMMANDS + 1].out, r[3].out); /* synth */
    ck_assert_int_eq(r[N_COMMANDS + 2].status, 0);
    for (int i = 0; i < N_COMMANDS; i++)
        ASSERT_HAS(r[N_COMMANDS + 2].out, COMMANDS[i], "kvsim --help");
    ck_assert_int_eq(r[N_COMMANDS + 3].status, 0);
    ck_assert_str_eq(r[N_COMMANDS + 3].out, r[N_COMMANDS + 2].out);
    ck_assert_int_eq(r[N_COMMANDS + 4].status, 0);
    ck_assert_msg(!strncmp(r[N_COMMANDS + 4].out, "kvsim ", 6), "kvsim --version: %s", r[N_COMMANDS + 4].out);
}
END_TEST

/* ---------------------------------------------------------------- usage errors */

START_TEST(usage_errors_exit_2_and_name_the_option)
{
    /* every subcommand: an unknown long option */
    static run_t r[N_COMMANDS];
    const char *args[N_COMMANDS];
    char buf[N_COMMANDS][64];
    for (int i = 0; i < N_COMMANDS; i++) {
        snprintf(buf[i], sizeof buf[i], "%s --no-such-option", COMMANDS[i]);
        args[i] = buf[i];
    }
    kvsim_batch(N_COMMANDS, args, r);
    for (int i = 0; i < N_COMMANDS; i++) {
        const char *what = args[i], *err = r[i].err;
        ck_assert_msg(r[i].status == 2, "kvsim %s: exit status %d, not 2", what, r[i].status);
        ASSERT_HAS(err, "'--no-such-option'", what);
        char pointer[96];
        snprintf(pointer, sizeof pointer, "see 'kvsim %s --help'", COMMANDS[i]);
        ASSERT_HAS(err, pointer, what);
        ck_assert_msg(!strncmp(err, "kvsim ", 6), "kvsim %s: message does not start with 'kvsim ': %s", what, err);
        ck_assert_msg(strchr(err, '\n') == err + strlen(err) - 1, "kvsim %s: more than one line: %s", what, err);
    }
    /* the other usage errors, and one runtime failure: status and a piece of the message */
    static const struct {
        const char *args;
        int status;
        const char *says;
    } cases[] = {
        {"analyze -Y", 2, "unknown option '-Y'"}, /* short option */
        {"synth --tokens", 2, "'--tokens' needs a value"},
        {"replay --quiet=1 a b c", 2, "'--quiet' takes no value"},
        {"capture m.bin -z t.bin -i x -o o.h5 --decode lots", 2, "--decode expects an integer"},
        {"no-such-command", 2, "unknown command 'no-such-command'; see 'kvsim --help'"},
        {"--no-such-option", 2, "unknown option '--no-such-option'; see 'kvsim --help'"},
        {"replay only-a-trace.h5", 2, "expected TRACE POLICIES BUDGETS"},
        {"policies stray", 2, "unexpected argument 'stray'"},
        {"replay --stats exact a b c", 2, "--stats takes trace, recompute or auto, not 'exact'"},
        {"synth -o x.h5 --q-tail -3", 2, "--q-tail"},
        {"", 2, "usage: kvsim <command>"},
        {"info build/test-tmp/no-such-trace.h5", 1, "kvsim info: build/test-tmp/no-such-trace.h5: "},
    };
    enum { NC = sizeof cases / sizeof cases[0] };
    static run_t rc[NC];
    const char *cargs[NC];
    for (int i = 0; i < NC; i++)
        cargs[i] = cases[i].args;
    kvsim_batch(NC, cargs, rc);
    for (int i = 0; i < NC; i++) {
        ck_assert_msg(rc[i].status == cases[i].status, "kvsim %s: exit status %d, not %d (%s)", cases[i].args,
                      rc[i].status, cases[i].status, rc[i].err);
        ASSERT_HAS(rc[i].err, cases[i].says, cases[i].args);
    }
}
END_TEST

/* ---------------------------------------------------------------- README's Quickstart */

START_TEST(quickstart_runs_on_a_synthetic_trace)
{
    char trace[256], res[256], res2[256], json[256], dir[256], args[2048];
    kv_test_tmp("qs.h5", trace, sizeof trace);
    kv_test_tmp("qs.tsv", res, sizeof res);
    kv_test_tmp("qs2.tsv", res2, sizeof res2);
    kv_test_tmp("qs.json", json, sizeof json);
    kv_test_tmp("qs-report", dir, sizeof dir);
    /* the trace (standing in for `kvsim capture`): the tiny preset, shrunk to stay fast */
    snprintf(args, sizeof args, "synth -o %s --preset tiny --tokens 128 --decode 16 --segments 3 -q", trace);
    ck_assert_msg(kvsim(args) == 0, "kvsim %s: %s", args, g_err);
    ck_assert(exists(trace));
    /* kvsim info trace.h5 */
    snprintf(args, sizeof args, "info %s", trace);
    ck_assert_msg(kvsim(args) == 0, "kvsim %s: %s", args, g_err);
    ASSERT_HAS(g_out, "tokens       128 (prompt 112, decode 16)", "info");
    /* kvsim policies */
    ck_assert_int_eq(kvsim("policies"), 0);
    ASSERT_HAS(g_out, "\nsnapkv\n", "policies");
    ASSERT_HAS(g_out, "default: streaming_llm(sinks=4", "policies");
    /* kvsim replay trace.h5 'streaming_llm,h2o,snapkv(window=32),adakv(inner=pyramidkv)' 64,128,256 -o results.tsv
     * (the trace is short: budgets scaled down with it) */
    snprintf(args, sizeof args,
             "replay %s 'streaming_llm,h2o,snapkv(window=32),adakv(inner=pyramidkv)' 16,32,64 -o %s -q", trace, res);
    ck_assert_msg(kvsim(args) == 0, "kvsim %s: %s", args, g_err);
    ck_assert(exists(res));
    /* the preamble records the command as typed, quoted so it can be pasted back into a shell */
    slurp(res, g_out, sizeof g_out);
    ASSERT_HAS(g_out, "# command: kvsim replay ", "results preamble");
    ASSERT_HAS(g_out, "'streaming_llm,h2o,snapkv(window=32),adakv(inner=pyramidkv)' 16,32,64 -o ", "results preamble");
    /* kvsim replay trace.h5 all 0.1,0.25,0.5 -o fractions.tsv --json fractions.json */
    snprintf(args, sizeof args, "replay %s all 0.1,0.25,0.5 -o %s --json %s -q", trace, res2, json);
    ck_assert_msg(kvsim(args) == 0, "kvsim %s: %s", args, g_err);
    ck_assert(exists(res2));
    ck_assert(exists(json));
    ck_assert_msg(file_has(res2, "\nshotkv("), "replay all on a trace with segments: no shotkv rows in %s", res2);
    /* kvsim analyze trace.h5 results.tsv fractions.tsv -o report/ : the trailing slash does not double */
    snprintf(args, sizeof args, "analyze %s %s %s -o %s/ -q", trace, res, res2, dir);
    ck_assert_msg(kvsim(args) == 0, "kvsim %s: %s", args, g_err);
    char html[300], md[300];
    snprintf(html, sizeof html, "%s/report.html", dir);
    snprintf(md, sizeof md, "%s/report.md", dir);
    ck_assert_msg(strstr(g_out, html) == g_out && g_out[strlen(html)] == '\n', "analyze printed '%s', expected %s",
                  g_out, html);
    ck_assert(exists(html));
    ck_assert(exists(md));
    /* the report says how it was made */
    slurp(md, g_out, sizeof g_out);
    ASSERT_HAS(g_out, "This report was written by: kvsim analyze ", "report.md");
    /* both files merged: a fraction budget is named as given */
    ASSERT_HAS(g_out, "- Budget 0.25 (", "report.md highlights");
}
END_TEST

START_TEST(replay_all_skips_policies_the_trace_cannot_run)
{
    char trace[256], res[256], args[1024];
    kv_test_tmp("noseg.h5", trace, sizeof trace);
    kv_test_tmp("noseg.tsv", res, sizeof res);
    snprintf(args, sizeof args, "synth -o %s --preset tiny --tokens 128 --decode 8 --segments 0 -q", trace);
    ck_assert_msg(kvsim(args) == 0, "kvsim %s: %s", args, g_err);
    /* 'all': shotkv needs segments; it is skipped with a warning naming it, the rest runs. -q
     * silences progress and information, not warnings: every line on stderr is a warning. */
    snprintf(args, sizeof args, "replay %s all 16 -o %s --no-head-rows -q", trace, res);
    ck_assert_msg(kvsim(args) == 0, "kvsim %s: %s", args, g_err);
    ASSERT_HAS(g_err, "skipping shotkv", "replay all -q without segments");
    for (const char *line = g_err; *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : "")
        ck_assert_msg(!strncmp(line, "kvsim: warning: ", 16), "replay -q printed a line that is no warning: %.80s",
                      line);
    ck_assert_msg(!file_has(res, "\nshotkv("), "shotkv rows in %s", res);
    ck_assert_msg(file_has(res, "\nsnapkv("), "no snapkv rows in %s", res);
    unlink(res);
    /* the failures, run together: none may leave a results file */
    char a[4][1024];
    /* named explicitly, shotkv on a trace without segments is an error (exit 1) */
    snprintf(a[0], sizeof a[0], "replay %s 'all,shotkv(rd=0.5)' 16 -o %s -q", trace, res);
    /* malformed POLICIES or BUDGETS are usage errors */
    snprintf(a[1], sizeof a[1], "replay %s no_such_policy 16 -o %s", trace, res);
    snprintf(a[2], sizeof a[2], "replay %s full sixteen -o %s", trace, res);
    /* an output folder that does not exist fails before the work, naming the file */
    snprintf(a[3], sizeof a[3], "replay %s full 16 -o build/test-tmp/no-such-folder/r.tsv", trace);
    const char *args4[4] = {a[0], a[1], a[2], a[3]};
    static run_t r[4];
    kvsim_batch(4, args4, r);
    ck_assert_int_eq(r[0].status, 1);
    ASSERT_HAS(r[0].err, "needs segments", "replay shotkv without segments");
    ck_assert_int_eq(r[1].status, 2);
    ASSERT_HAS(r[1].err, "unknown policy 'no_such_policy'", "unknown policy");
    ck_assert_int_eq(r[2].status, 2);
    ASSERT_HAS(r[2].err, "'sixteen'", "bad budget");
    ck_assert_int_eq(r[3].status, 1);
    ASSERT_HAS(r[3].err, "kvsim replay: build/test-tmp/no-such-folder/r.tsv: ", "missing output folder");
    ck_assert_msg(!strstr(r[3].err, "replay 1/"), "replay ran before finding the output folder missing:\n%s", r[3].err);
    ck_assert_msg(access(res, F_OK) != 0, "a failed replay left %s", res);
    unlink(trace);
}
END_TEST

/* A budget that does not exceed a policy's window leaves its scores nothing to choose: replay says so,
 * once per policy, naming the budgets, and stays silent for budgets above the window. */
START_TEST(replay_warns_when_the_budget_is_the_window)
{
    char trace[256], args[1024];
    kv_test_tmp("window.h5", trace, sizeof trace);
    snprintf(args, sizeof args, "synth -o %s --preset tiny --tokens 160 --decode 8 -q", trace);
    ck_assert_msg(kvsim(args) == 0, "kvsim %s: %s", args, g_err);
    snprintf(args, sizeof args,
             "replay %s 'snapkv,adakv(inner=snapkv(window=8)),h2o,h2o(mode=decode),streaming_llm' 16,32,48 -o - "
             "--no-head-rows",
             trace);
    ck_assert_msg(kvsim(args) == 0, "kvsim %s: %s", args, g_err);
    ASSERT_HAS(g_err, "snapkv always keeps the last 32 context tokens (its window); at budgets 16, 32 (tokens",
               "snapkv at budgets within its window");
    /* window 8 < 16, default h2o window 8, decode-time h2o and streaming_llm have no such window */
    ck_assert_msg(!strstr(g_err, "adakv") && !strstr(g_err, "h2o") && !strstr(g_err, "streaming_llm"),
                  "a warning for a policy whose window is below every budget:\n%s", g_err);
    ck_assert_msg(!strstr(g_err, "16, 32, 48"), "budget 48 exceeds the window:\n%s", g_err);
    unlink(trace);
}
END_TEST

/* ---------------------------------------------------------------- kvsim info vs FORMAT.md */

/* Attribute names from the "Root attributes" table of traces/FORMAT.md (first column, split on
 * ", "); returns how many. */
static int format_md_attributes(char names[][48], int max)
{
    FILE *f = fopen("traces/FORMAT.md", "r");
    if (!f)
        return -1;
    char line[1024];
    int in = 0, n = 0;
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, "## ", 3))
            in = !strncmp(line, "## Root attributes", 18);
        if (!in || line[0] != '|' || !strncmp(line, "| attribute", 11) || !strncmp(line, "|---", 4))
            continue;
        char *cell = line + 1, *end = strchr(cell, '|');
        if (!end)
            continue;
        *end = 0;
        for (char *tok = strtok(cell, ", "); tok && n < max; tok = strtok(NULL, ", "))
            snprintf(names[n++], 48, "%s", tok);
    }
    fclose(f);
    return n;
}

START_TEST(info_shows_what_format_md_promises)
{
    char names[64][48];
    const int n = format_md_attributes(names, 64);
    ck_assert_msg(n >= 20, "found %d attributes in traces/FORMAT.md's table (run from the repository root)", n);
    char trace[256], args[1024];
    kv_test_tmp("info.h5", trace, sizeof trace);
    snprintf(args, sizeof args, "synth -o %s --preset tiny --tokens 96 --decode 8 --segments 2 --dtype f32 -q", trace);
    ck_assert_msg(kvsim(args) == 0, "kvsim %s: %s", args, g_err);
    /* every attribute of the table, under its FORMAT.md name */
    snprintf(args, sizeof args, "info --attrs %s", trace);
    ck_assert_msg(kvsim(args) == 0, "kvsim %s: %s", args, g_err);
    for (int i = 0; i < n; i++) {
        char key[64];
        snprintf(key, sizeof key, "\n%s=", names[i]);
        ck_assert_msg(strstr(g_out, key) || !strncmp(g_out, key + 1, strlen(key) - 1),
                      "FORMAT.md attribute '%s' missing from kvsim info --attrs:\n%.1500s", names[i], g_out);
    }
    /* with the values the trace was made with */
    ASSERT_HAS(g_out, "format=kvsim-trace\n", "info --attrs");
    ASSERT_HAS(g_out, "\nformat_version=2\n", "info --attrs");
    ASSERT_HAS(g_out, "\nhas_stats=1\n", "info --attrs");
    ASSERT_HAS(g_out, "\nstats_split=24\n", "info --attrs");
    ASSERT_HAS(g_out, "\nq_start=0\n", "info --attrs");
    ASSERT_HAS(g_out, "\nn_tokens=96\n", "info --attrs");
    ASSERT_HAS(g_out, "\nn_prompt=88\n", "info --attrs");
    ASSERT_HAS(g_out, "\nn_decode=8\n", "info --attrs");
    ASSERT_HAS(g_out, "\nn_segments=2\n", "info --attrs");
    ASSERT_HAS(g_out, "\ndtype=f32\n", "info --attrs");
    ASSERT_HAS(g_out, "\nsource=synth\n", "info --attrs");
    ASSERT_HAS(g_out, "\ngenerator=synth(", "info --attrs");
    /* the human-readable form: shapes, dtype, sizes raw and stored, ratio, provenance (README) */
    snprintf(args, sizeof args, "info %s", trace);
    ck_assert_msg(kvsim(args) == 0, "kvsim %s: %s", args, g_err);
    const char *fields[] = {"  format       kvsim-trace version 2",
                            "  shape        ",
                            "  tokens       96 (prompt 88, decode 8)",
                            "  segments     2, starting at token 0 ",
                            "  storage      f32, zstd level 3",
                            " uncompressed, ",
                            " stored, ratio ",
                            "  summaries    ",
                            "  statistics   per key over the prompt queries and over [0, 24)",
                            "  W_O          absent",
                            "  source       synth: synth(",
                            "  written by   kvsim "};
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
        ASSERT_HAS(g_out, fields[i], "kvsim info");
    unlink(trace);
}
END_TEST

Suite *suite_cli_ux(void)
{
    Suite *s = suite_create("cli_ux");
    if (!getenv("KVSIM_BIN")) {
        kv_test_skip("cli ux", "KVSIM_BIN not set (run through make test)");
        return s;
    }
    TCase *tc = tcase_create("cli");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, every_command_answers_help);
    tcase_add_test(tc, usage_errors_exit_2_and_name_the_option);
    tcase_add_test(tc, quickstart_runs_on_a_synthetic_trace);
    tcase_add_test(tc, replay_all_skips_policies_the_trace_cannot_run);
    tcase_add_test(tc, replay_warns_when_the_budget_is_the_window);
    tcase_add_test(tc, info_shows_what_format_md_promises);
    suite_add_tcase(s, tc);
    return s;
}
