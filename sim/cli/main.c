/*
 * main.c: `kvsim <command> ...` dispatch, global --version and --help, and the helpers every
 * subcommand shares for its messages. Conventions (README, "Command line"):
 *   kvsim, kvsim --help, kvsim help      the command list (no arguments: on stderr, exit 2)
 *   kvsim help CMD, kvsim CMD --help     CMD's help on stdout, exit 0
 *   usage errors (unknown command or option, missing or malformed argument)
 *                                        "kvsim CMD: <problem>; see 'kvsim CMD --help'", exit 2
 *   runtime failures                     "kvsim CMD: <what>: <why>", exit 1
 */
#include "sim/cli/cli.h"
#include "sim/common/kv_common.h"

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const kv_cmd_t commands[] = {
    {"model", kv_cmd_model, "what kvsim understood of a checkpoint and its tokenizer"},
    {"capture", kv_cmd_capture, "run a model on a prompt and record its attention trace (HDF5)"},
    {"generate", kv_cmd_generate, "greedy (or sampled) continuation of a prompt"},
    {"nll", kv_cmd_nll, "mean negative log-likelihood of a text under a model"},
    {"synth", kv_cmd_synth, "write a synthetic trace with planted attention structure"},
    {"synth-model", kv_cmd_synth_model, "write a random-weight Hugging Face checkpoint of any Llama shape"},
    {"tokenize", kv_cmd_tokenize, "print the token ids (or pieces) of a text under a model's tokenizer"},
    {"info", kv_cmd_info, "describe a trace: shapes, dtype, sizes, compression, provenance"},
    {"replay", kv_cmd_replay, "replay eviction policies x budgets against a trace"},
    {"policies", kv_cmd_policies, "list every policy with its parameters and defaults"},
    {"eval", kv_cmd_eval, "closed loop: decode with each compressed cache, compare with the full cache"},
    {"niah", kv_cmd_niah, "needle in a haystack: retrieval per context length, depth, policy and budget"},
    {"analyze", kv_cmd_analyze, "figures and a report from a trace and replay results"},
    {"sweep", kv_cmd_sweep, "a benchmark of many prompts: capture, replay, merge (MPI, Slurm)"},
    {"demo", kv_cmd_demo, "capture, replay and analyze on the default model (make demo)"},
    {"clean", kv_cmd_clean, "remove temporary files that killed kvsim processes left behind"},
};

int kv_cli_fail(const char *cmd)
{
    fprintf(stderr, "kvsim %s: %s\n", cmd, kv_last_error()[0] ? kv_last_error() : "failed");
    return 1;
}

int kv_cli_usage_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "kvsim %s: ", cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "; see 'kvsim %s --help'\n", cmd);
    return 2;
}

int kv_cli_int(const char *cmd, const char *opt, const char *val, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(val, &end, 10);
    if (errno || end == val || *end || v < lo || v > hi) {
        kv_cli_usage_error(cmd, "%s expects an integer in [%ld, %ld], got '%s'", opt, lo, hi, val);
        return 2;
    }
    *out = v;
    return 0;
}

int kv_cli_bad_option(const char *cmd, int c, char **argv)
{
    /* getopt_long with opterr = 0 and a ':' leading the option string: '?' for an unknown option
     * (optopt 0 for a long one), ':' for a missing value; argv[optind - 1] is the word it was in. */
    const char *word = optind > 0 ? argv[optind - 1] : "";
    char name[128];
    if (!strncmp(word, "--", 2)) {
        snprintf(name, sizeof name, "%s", word);
        char *eq = strchr(name, '=');
        if (c == '?' && optopt != 0 && eq)
            return kv_cli_usage_error(cmd, "option '%.*s' takes no value", (int)(eq - name), name);
        if (eq)
            *eq = 0;
    } else if (optopt > 0 && optopt < 128) {
        snprintf(name, sizeof name, "-%c", optopt);
    } else {
        snprintf(name, sizeof name, "%s", word);
    }
    if (c == ':')
        return kv_cli_usage_error(cmd, "option '%s' needs a value", name);
    return kv_cli_usage_error(cmd, "unknown option '%s'", name);
}

void kv_cli_append_arg(char *buf, size_t len, const char *arg)
{
    size_t k = strlen(buf);
    int plain = arg[0] != 0;
    for (const char *c = arg; *c; c++)
        if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_=+./,:@%", *c))
            plain = 0;
    if (k && k + 1 < len)
        buf[k++] = ' ';
    if (plain) {
        snprintf(buf + k, len - k, "%s", arg);
        return;
    }
    /* single quotes; a single quote inside becomes '\'' */
    if (k + 1 < len)
        buf[k++] = '\'';
    for (const char *c = arg; *c && k + 5 < len; c++) {
        if (*c == '\'') {
            memcpy(buf + k, "'\\''", 4);
            k += 4;
        } else
            buf[k++] = *c;
    }
    if (k + 1 < len)
        buf[k++] = '\'';
    buf[k < len ? k : len - 1] = 0;
}

void kv_cli_command_line(char *buf, size_t len, int argc, char **argv)
{
    snprintf(buf, len, "kvsim");
    for (int i = 0; i < argc; i++)
        kv_cli_append_arg(buf, len, argv[i]);
}

static void usage(FILE *f)
{
    fprintf(f,
            "kvsim %s: trace-driven simulator for KV-cache eviction policies\n\n"
            "usage: kvsim <command> [options]   (kvsim <command> --help for details)\n\ncommands:\n",
            KV_VERSION);
    for (size_t i = 0; i < KV_ARRAY_LEN(commands); i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\nA typical session:\n"
               "  kvsim model model.gguf                      (check what kvsim understood)\n"
               "  kvsim capture model.gguf -i @prompt.txt -o trace.h5\n"
               "  kvsim replay trace.h5 all 64,128,256 -o results.tsv\n"
               "  kvsim analyze trace.h5 results.tsv -o report/\n"
               "\nkvsim help CMD (or kvsim CMD --help) explains one command; kvsim --version prints the version.\n");
}

static const kv_cmd_t *find_command(const char *name)
{
    for (size_t i = 0; i < KV_ARRAY_LEN(commands); i++)
        if (!strcmp(name, commands[i].name))
            return &commands[i];
    return NULL;
}

static int unknown_command(const char *name)
{
    fprintf(stderr, "kvsim: unknown %s '%s'; see 'kvsim --help' (commands:", name[0] == '-' ? "option" : "command",
            name);
    for (size_t i = 0; i < KV_ARRAY_LEN(commands); i++)
        fprintf(stderr, "%s %s", i ? "," : "", commands[i].name);
    fprintf(stderr, ")\n");
    return 2;
}

/* Standard output is flushed and checked before the exit status is decided: a command whose output
 * did not reach its destination (a full disk, /dev/full, a closed pipe) fails. */
static int finish_stdout(int status)
{
    errno = 0;
    const int bad = fflush(stdout) != 0 || ferror(stdout);
    if (bad) {
        fprintf(stderr, "kvsim: standard output: write failed: %s\n", strerror(errno ? errno : EIO));
        return status ? status : 1;
    }
    return status;
}

int main(int argc, char **argv)
{
    /* OpenMP threads sleep at barriers rather than spin (kv_common.h) */
    kv_omp_passive_reexec(argv);
    opterr = 0; /* subcommands report bad options themselves (kv_cli_bad_option), naming the option */
    /* a file-size limit (ulimit -f) makes writes fail with EFBIG, reported with the file's name, instead
     * of killing the process with a core dump and leaving its temporary files */
    signal(SIGXFSZ, SIG_IGN);
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        if (argc == 2) {
            usage(stdout);
            return finish_stdout(0);
        }
        /* kvsim help CMD: CMD's own --help */
        const kv_cmd_t *c = find_command(argv[2]);
        if (!c)
            return unknown_command(argv[2]);
        char *hargv[] = {(char *)c->name, "--help", NULL};
        return finish_stdout(c->run(2, hargv));
    }
    if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "version")) {
        printf("kvsim %s (git %s)\n", KV_VERSION, kv_git_revision());
        return finish_stdout(0);
    }
    const kv_cmd_t *c = find_command(argv[1]);
    if (c)
        return finish_stdout(c->run(argc - 1, argv + 1));
    return unknown_command(argv[1]);
}
