/*
 * cmd_sweep.c: `kvsim sweep MANIFEST` (sim/sweep.h through the CLI): run a sweep (one process, or
 * every rank under mpirun), one Slurm array task's slice (--slice), write the Slurm script (--slurm),
 * merge (--merge) or report where a sweep stands (--status); after a merge, the figures over the
 * dataset (analyze/kv_analyze_sweep.h), whose per-sample statistics the CLI hooks into every unit.
 */
#include "analyze/kv_analyze_sweep.h"
#include "sim/cli/cli.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/sweep.h"

#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void help(void)
{
    printf("usage: kvsim sweep MANIFEST [options]\n"
           "\n"
           "Run a benchmark of many prompts: every sample of the manifest's dataset is captured with its\n"
           "model, replayed with its policies x budgets, and its results are written to OUT/samples/ID.tsv;\n"
           "then OUT/results.tsv (every sample's rows after a 'sample' column), OUT/aggregate.tsv (per\n"
           "policy x budget: the mean over the samples and a 95 %% bootstrap interval), OUT/failed.tsv,\n"
           "OUT/funnel.tsv and figures over the dataset in OUT/figures/. Each sample is done once: a sweep\n"
           "that is killed resumes where it stopped, without redoing or half-writing a finished sample;\n"
           "a sample that fails is recorded with its error and the sweep goes on. Under mpirun every rank\n"
           "takes samples as it becomes free and rank 0 merges (the output folder must be on a file\n"
           "system every rank sees); with Slurm, --slurm writes a job-array script and --merge combines\n"
           "the slices. All give the same merged results as one process.\n"
           "\n"
           "arguments:\n"
           "  MANIFEST     a JSON file: model, dataset (a LongBench-shaped JSONL file or a folder of .txt\n"
           "               files), policies, budgets, capture and replay options, output folder (README,\n"
           "               \"Sweeps and clusters\", documents every key; relative paths are relative to\n"
           "               the manifest's folder)\n"
           "\n"
           "options:\n"
           "  -o, --output DIR     output folder (default: the manifest's \"output\")\n"
           "      --slice K/N      run only samples i with i %% N == K (what Slurm array task K of N runs);\n"
           "                       no merge (default: every sample, then the merge)\n"
           "      --slurm          write OUT/slurm/sweep.sbatch (a job array whose task K runs --slice K/N)\n"
           "                       and print how to submit and merge it; runs nothing\n"
           "      --tasks N        with --slurm: array tasks (default: the manifest's slurm.tasks, else\n"
           "                       the number of samples up to 16)\n"
           "      --merge          merge the finished samples (after the Slurm tasks) and draw the figures;\n"
           "                       runs nothing (missing samples are an error, see --partial)\n"
           "      --partial        merge even when samples are missing (failed.tsv lists them)\n"
           "      --status         print how many samples are finished, failed and missing; runs nothing\n"
           "      --retry-failed   redo the samples recorded as failed (default: skip them)\n"
           "      --no-figures     no figures and no funnel.tsv after the merge (default: the manifest's\n"
           "                       analyze.figures, true unless it says otherwise)\n"
           "  -v, --verbose        also the progress lines of every capture and replay\n"
           "  -q, --quiet          no progress on stderr (failures are still reported)\n"
           "  -h, --help           this help\n"
           "\n"
           "progress:\n"
           "  one line on stderr: samples done, failed, running, to go, and an estimate of the time left\n"
           "  from the rate of this run (rewritten in place on a terminal, every 10 s otherwise)\n"
           "\n"
           "example:\n"
           "  kvsim sweep tests/data/stories_qa.json -o out/sweep\n"
           "  mpirun -n 4 kvsim sweep tests/data/stories_qa.json -o out/sweep\n"
           "  kvsim sweep --slurm --tasks 8 sweep.json && sbatch OUT/slurm/sweep.sbatch\n");
}

static int parse_slice(const char *arg, int *k, int *n)
{
    char *end;
    long a = strtol(arg, &end, 10);
    if (end == arg || *end != '/')
        return -1;
    const char *b = end + 1;
    long c = strtol(b, &end, 10);
    if (end == b || *end || c < 1 || c > 1000000 || a < 0 || a >= c)
        return -1;
    *k = (int)a;
    *n = (int)c;
    return 0;
}

static void print_status(const kv_sweep_t *s, const kv_sweep_summary_t *st)
{
    printf("sweep %s: %d samples: %d finished, %d failed, %d missing (%s)\n", kv_sweep_name(s), st->n_samples, st->done,
           st->failed, st->missing, kv_sweep_output(s));
}

int kv_cmd_sweep(int argc, char **argv)
{
    enum { OPT_SLICE = 256, OPT_SLURM, OPT_TASKS, OPT_MERGE, OPT_PARTIAL, OPT_STATUS, OPT_RETRY, OPT_NOFIG };
    static const struct option opts[] = {
        {"output", required_argument, 0, 'o'},
        {"slice", required_argument, 0, OPT_SLICE},
        {"slurm", no_argument, 0, OPT_SLURM},
        {"tasks", required_argument, 0, OPT_TASKS},
        {"merge", no_argument, 0, OPT_MERGE},
        {"partial", no_argument, 0, OPT_PARTIAL},
        {"status", no_argument, 0, OPT_STATUS},
        {"retry-failed", no_argument, 0, OPT_RETRY},
        {"no-figures", no_argument, 0, OPT_NOFIG},
        {"verbose", no_argument, 0, 'v'},
        {"quiet", no_argument, 0, 'q'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    const char *output = NULL;
    kv_sweep_opts_t o;
    kv_sweep_opts_init(&o);
    int slurm = 0, merge_only = 0, status = 0, no_figures = 0, c;
    long tasks = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":o:vqh", opts, NULL)) != -1) {
        switch (c) {
        case 'o': output = optarg; break;
        case OPT_SLICE:
            if (parse_slice(optarg, &o.slice_k, &o.slice_n))
                return kv_cli_usage_error("sweep", "--slice expects K/N with 0 <= K < N, got '%s'", optarg);
            break;
        case OPT_SLURM: slurm = 1; break;
        case OPT_TASKS:
            if (kv_cli_int("sweep", "--tasks", optarg, 1, 1000000, &tasks))
                return 2;
            break;
        case OPT_MERGE: merge_only = 1; break;
        case OPT_PARTIAL: o.partial = 1; break;
        case OPT_STATUS: status = 1; break;
        case OPT_RETRY: o.retry_failed = 1; break;
        case OPT_NOFIG: no_figures = 1; break;
        case 'v': o.verbose = 1; break;
        case 'q':
            o.quiet = 1;
            kv_log_set_level(KV_LOG_QUIET);
            break;
        case 'h': help(); return 0;
        default: return kv_cli_bad_option("sweep", c, argv);
        }
    }
    if (argc - optind != 1)
        return kv_cli_usage_error("sweep", "expected one MANIFEST, got %d argument%s", argc - optind,
                                  argc - optind == 1 ? "" : "s");
    if (slurm + merge_only + status > 1)
        return kv_cli_usage_error("sweep", "--slurm, --merge and --status exclude each other");
    if (o.slice_n && (slurm || merge_only || status))
        return kv_cli_usage_error("sweep", "--slice runs a slice; it does not go with --slurm, --merge or --status");
    if (tasks && !slurm)
        return kv_cli_usage_error("sweep", "--tasks goes with --slurm");
    const char *manifest = argv[optind];
    kv_sweep_t *s = NULL;
    int rc = 1;
    if (kv_sweep_load(manifest, output, &s) != KV_OK) {
        rc = kv_cli_fail("sweep");
        goto done;
    }
    int funnel = 0, figures = 0;
    const char *format = "png";
    kv_sweep_analyze_settings(s, &funnel, &figures, &format);
    if (no_figures)
        figures = 0;
    if (funnel) {
        o.on_trace = kv_analyze_sweep_funnel;
        o.on_trace_ctx = NULL;
    }
    kv_sweep_summary_t sum;
    memset(&sum, 0, sizeof sum);
    if (status) {
        if (kv_sweep_status(s, &sum) != KV_OK) {
            rc = kv_cli_fail("sweep");
            goto done;
        }
        print_status(s, &sum);
        rc = 0;
        goto done;
    }
    if (slurm) {
        char exe[PATH_MAX], path[PATH_MAX + 64];
        if (!realpath("/proc/self/exe", exe))
            snprintf(exe, sizeof exe, "kvsim");
        if (kv_sweep_write_slurm(s, exe, (int)tasks, path, sizeof path) != KV_OK) {
            rc = kv_cli_fail("sweep");
            goto done;
        }
        printf("%s\n", path);
        kv_info("sweep: wrote %s; submit it with: sbatch %s; when every task has finished: kvsim sweep --merge%s%s "
                "%s",
                path, path, output ? " -o " : "", output ? output : "", manifest);
        rc = 0;
        goto done;
    }
    if (merge_only) {
        if (kv_sweep_merge(s, &o, &sum) != KV_OK) {
            rc = kv_cli_fail("sweep");
            goto done;
        }
        sum.root = 1;
    } else if (kv_sweep_run(s, &o, &sum) != KV_OK) {
        rc = kv_cli_fail("sweep");
        goto done;
    }
    if (sum.root && sum.merged && figures) {
        kv_analyze_sweep_out_t ao;
        if (kv_analyze_sweep(s, format, &ao) != KV_OK) {
            rc = kv_cli_fail("sweep");
            goto done;
        }
        for (int i = 0; i < ao.n_figures; i++)
            kv_info("sweep: figure %s/%s", kv_sweep_output(s), ao.figures[i]);
    }
    if (sum.root && sum.failed)
        kv_warn("sweep: %d of %d samples failed; %s/failed.tsv has their errors (--retry-failed redoes them)",
                sum.failed, sum.n_samples, kv_sweep_output(s));
    if (sum.root && !o.quiet && !merge_only)
        kv_info("sweep: %d samples run in %.1f s%s", sum.ran, sum.seconds, sum.ranks > 1 ? " (MPI)" : "");
    rc = 0;
done:
    kv_sweep_free(s);
    return rc;
}
