/*
 * cli.h: the `kvsim` command line. Each subcommand lives in its own cmd_*.c file and is one line in
 * the table of main.c. Subcommands parse their own options (getopt_long), print their --help, and
 * report failures as "kvsim <cmd>: <what failed>: <why>" with a non-zero exit status.
 */
#ifndef KV_CLI_H
#define KV_CLI_H

typedef struct {
    const char *name;
    int (*run)(int argc, char **argv); /* argv[0] is the subcommand name */
    const char *summary;
} kv_cmd_t;

int kv_cmd_capture(int argc, char **argv);
int kv_cmd_generate(int argc, char **argv);
int kv_cmd_nll(int argc, char **argv);
int kv_cmd_synth(int argc, char **argv);
int kv_cmd_info(int argc, char **argv);
int kv_cmd_replay(int argc, char **argv);
int kv_cmd_policies(int argc, char **argv);
int kv_cmd_analyze(int argc, char **argv);
int kv_cmd_demo(int argc, char **argv);

/* Print "kvsim <cmd>: <last error>" and return the exit status 1. */
int kv_cli_fail(const char *cmd);
/* Print "kvsim <cmd>: <message>; see 'kvsim <cmd> --help'" and return the exit status 2 (usage). */
int kv_cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Parse a positive integer option value or fail with a message naming the option. */
int kv_cli_int(const char *cmd, const char *opt, const char *val, long lo, long hi, long *out);

#endif
