/* main.c: `kvsim <command> ...` dispatch, global --version and --help. */
#include "sim/cli/cli.h"
#include "sim/common/kv_common.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const kv_cmd_t commands[] = {
    {"capture", kv_cmd_capture, "run a model on a prompt and record its attention trace (HDF5)"},
    {"generate", kv_cmd_generate, "greedy text continuation with a llama2.c model"},
    {"nll", kv_cmd_nll, "mean negative log-likelihood of a text under a model"},
    {"synth", kv_cmd_synth, "write a synthetic trace with planted attention structure"},
    {"info", kv_cmd_info, "describe a trace: shapes, dtype, sizes, compression, provenance"},
    {"replay", kv_cmd_replay, "replay eviction policies x budgets against a trace"},
    {"policies", kv_cmd_policies, "list every policy with its parameters and defaults"},
    {"analyze", kv_cmd_analyze, "figures and a report from a trace and replay results"},
    {"demo", kv_cmd_demo, "capture, replay and analyze on the default model (make demo)"},
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

static void usage(FILE *f)
{
    fprintf(f,
            "kvsim %s: trace-driven simulator for KV-cache eviction policies\n\n"
            "usage: kvsim <command> [options]   (kvsim <command> --help for details)\n\ncommands:\n",
            KV_VERSION);
    for (size_t i = 0; i < KV_ARRAY_LEN(commands); i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\nA typical session:\n"
               "  kvsim capture model.bin -z tokenizer.bin -i @prompt.txt -o trace.h5\n"
               "  kvsim replay trace.h5 all 64,128,256 -o results.tsv\n"
               "  kvsim analyze trace.h5 results.tsv -o report/\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "version")) {
        printf("kvsim %s (git %s)\n", KV_VERSION, kv_git_revision());
        return 0;
    }
    for (size_t i = 0; i < KV_ARRAY_LEN(commands); i++)
        if (!strcmp(argv[1], commands[i].name))
            return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "kvsim: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
