/*
 * cmd_clean.c: `kvsim clean [FOLDER ...]`: remove the temporary files that kvsim processes which
 * died (SIGKILL, a crash, a power loss) left beside their outputs. Which files are stale is the
 * output module's decision (sim/common/kv_output.h: no live process holds them); `kvsim info`
 * reports the same files in a trace's folder.
 */
#include "sim/cli/cli.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_output.h"

#include <getopt.h>
#include <stdio.h>
#include <string.h>

static void help(void)
{
    printf("usage: kvsim clean [-n] [-r] [FOLDER|FILE ...]\n"
           "\n"
           "Remove the temporary files that kvsim processes which died (killed with SIGKILL, crashed, or a\n"
           "power loss) left beside their outputs: every file kvsim writes is written as\n"
           "NAME.<pid>-<random>.kvsim-tmp and renamed to NAME when complete, and SIGINT, SIGTERM, SIGHUP\n"
           "and SIGPIPE remove it, but nothing can on SIGKILL. A temporary file is stale when its process\n"
           "no longer runs and no process holds its lock; a file a live kvsim is writing is never touched.\n"
           "Files NAME.tmp-<pid> of older kvsim versions whose process no longer runs are removed too.\n"
           "Each removed file is listed with its size. kvsim info reports stale files beside a trace.\n"
           "\n"
           "arguments:\n"
           "  FOLDER|FILE      folders to clean, or single temporary files (default: the current folder)\n"
           "\n"
           "options:\n"
           "  -n, --dry-run    list the stale files, remove nothing (default: remove them)\n"
           "  -r, --recursive  also clean the subfolders (symbolic links are not followed; default: no)\n"
           "  -q, --quiet      print nothing but errors (default: one line per file and a total)\n"
           "  -h, --help       this help\n"
           "\n"
           "example:\n"
           "  kvsim clean -r out/\n");
}

typedef struct {
    int dry, quiet, failed;
    long n;
    uint64_t bytes;
} clean_t;

static int one(void *ctx, const kv_out_stale_t *s)
{
    clean_t *c = ctx;
    char b[32];
    kv_fmt_bytes((double)s->bytes, b, sizeof b);
    if (!c->dry && kv_out_remove_stale(s->path) != KV_OK) {
        fprintf(stderr, "kvsim clean: %s\n", kv_last_error());
        c->failed = 1;
        return 0;
    }
    c->n++;
    c->bytes += s->bytes;
    if (!c->quiet)
        printf("%s %s (%s, process %d%s)\n", c->dry ? "stale" : "removed", s->path, b, s->pid,
               s->legacy ? ", an older kvsim's name" : "");
    return 0;
}

int kv_cmd_clean(int argc, char **argv)
{
    static const struct option opts[] = {{"dry-run", no_argument, 0, 'n'},
                                         {"recursive", no_argument, 0, 'r'},
                                         {"quiet", no_argument, 0, 'q'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    clean_t c = {0, 0, 0, 0, 0};
    int recursive = 0, opt;
    optind = 1;
    while ((opt = getopt_long(argc, argv, ":nrqh", opts, NULL)) != -1) {
        switch (opt) {
        case 'n': c.dry = 1; break;
        case 'r': recursive = 1; break;
        case 'q': c.quiet = 1; break;
        case 'h': help(); return 0;
        default: return kv_cli_bad_option("clean", opt, argv);
        }
    }
    const char *here[] = {"."};
    char **dirs = optind < argc ? argv + optind : (char **)here;
    const int n = optind < argc ? argc - optind : 1;
    for (int i = 0; i < n; i++)
        if (kv_out_find_stale(dirs[i], recursive, one, &c) != KV_OK) {
            kv_cli_fail("clean");
            c.failed = 1;
        }
    if (!c.quiet) {
        char b[32];
        if (c.n)
            printf("%s %ld stale temporary file%s (%s)\n", c.dry ? "found" : "removed", c.n, c.n == 1 ? "" : "s",
                   kv_fmt_bytes((double)c.bytes, b, sizeof b));
        else
            printf("no stale temporary files\n");
    }
    return c.failed ? 1 : 0;
}
