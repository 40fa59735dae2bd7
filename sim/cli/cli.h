/*
 * cli.h: the `kvsim` command line. Each subcommand lives in its own cmd_*.c file and is one line in
 * the table of main.c. Subcommands parse their own options (getopt_long), print their --help, and
 * report failures as "kvsim <cmd>: <what failed>: <why>" with exit status 1, and usage errors as
 * "kvsim <cmd>: <problem>; see 'kvsim <cmd> --help'" with exit status 2.
 *
 * Every --help has one shape: a usage line, one paragraph, "arguments:" (positional ones, when
 * any), "options:" with their defaults, further sections where a command needs them, and
 * "example:" last.
 */
#ifndef KV_CLI_H
#define KV_CLI_H

#include "sim/kv_policy.h"
#include "sim/replay.h"

#include <stddef.h>

typedef struct {
    const char *name;
    int (*run)(int argc, char **argv); /* argv[0] is the subcommand name */
    const char *summary;
} kv_cmd_t;

int kv_cmd_model(int argc, char **argv);
int kv_cmd_capture(int argc, char **argv);
int kv_cmd_generate(int argc, char **argv);
int kv_cmd_nll(int argc, char **argv);
int kv_cmd_synth(int argc, char **argv);
int kv_cmd_synth_model(int argc, char **argv);
int kv_cmd_info(int argc, char **argv);
int kv_cmd_tokenize(int argc, char **argv);
int kv_cmd_replay(int argc, char **argv);
int kv_cmd_policies(int argc, char **argv);
int kv_cmd_analyze(int argc, char **argv);
int kv_cmd_demo(int argc, char **argv);
int kv_cmd_clean(int argc, char **argv);
int kv_cmd_sweep(int argc, char **argv);
int kv_cmd_eval(int argc, char **argv);
int kv_cmd_niah(int argc, char **argv);

/* Print "kvsim <cmd>: <last error>" and return the exit status 1. */
int kv_cli_fail(const char *cmd);
/* Print "kvsim <cmd>: <message>; see 'kvsim <cmd> --help'" and return the exit status 2 (usage). */
int kv_cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* getopt_long returned '?' or ':' (the option string starts with ':'; opterr is 0): print
 * "kvsim <cmd>: unknown option '--x'" or "option '--x' needs a value" with the --help pointer and
 * return 2. */
int kv_cli_bad_option(const char *cmd, int c, char **argv);
/* Append " arg" to buf, single-quoted for the shell when it holds anything but plain characters. */
void kv_cli_append_arg(char *buf, size_t len, const char *arg);
/* "kvsim a b 'c(d)'" from a subcommand's argc/argv (call before getopt permutes argv). */
void kv_cli_command_line(char *buf, size_t len, int argc, char **argv);
struct kv_policy;
/* POLICIES containing 'all' on a trace without segments: drop (with a warning) the policies that
 * need segments and were not also named explicitly; *n is updated. */
void kv_cli_skip_unrunnable(const char *list, int n_segments, int has_wo, const char *trace_path,
                            struct kv_policy **pols, int *n);
/* POLICIES containing 'all' on a lean trace (capture --q-tail): drop (with a warning saying why) the
 * policies that need prompt queries the trace does not store and were not also named explicitly
 * (kv_replay_check_policies); *n is updated. */
int kv_cli_skip_lean(kv_trace_t *t, const char *list, struct kv_policy **pols, int *n, kv_backend_t *be,
                     const kv_replay_opts_t *ro);
/* Warn, once per policy, about the budgets that do not exceed the context tokens the policy always
 * keeps (the observation window of snapkv, pyramidkv and one-shot h2o, kvcompress's protected
 * tokens, the inner scorer's window of adakv and chunkkv): there it keeps the last B context tokens
 * and its scores select nothing. n_ctx: the context tokens of the replay. */
void kv_cli_warn_window_budgets(const kv_trace_meta_t *m, int n_ctx, struct kv_policy *const *pols, int n_pol,
                                const kv_budget_t *budgets, int n_bud);
/* Parse a positive integer option value or fail with a message naming the option. */
int kv_cli_int(const char *cmd, const char *opt, const char *val, long lo, long hi, long *out);

#endif
