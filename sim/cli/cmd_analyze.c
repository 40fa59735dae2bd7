/* cmd_analyze.c: `kvsim analyze TRACE [RESULTS.tsv ...] -o DIR`: figures and a report (analyze/). */
#include "analyze/kv_analyze.h"
#include "sim/cli/cli.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/common/kv_params.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void help(void)
{
    printf("usage: kvsim analyze TRACE.h5 [RESULTS.tsv ...] [-o DIR] [options]\n"
           "       kvsim analyze RESULTS.tsv ... [-o DIR] [options]   (kvsim eval and niah results alone)\n"
           "\n"
           "Draw figures from a trace and, optionally, replay results, and write a report about them:\n"
           "DIR/report.md (links the figure files beside it) and DIR/report.html (self-contained: figures\n"
           "embedded, inline CSS) with the key tables (per policy and budget, per layer) and the\n"
           "provenance of the trace and the results. Several results files (a sweep) are merged; results\n"
           "whose '# trace_sha256:' differs from the trace's checksum are used with a warning. The path of\n"
           "report.html is printed on stdout.\n"
           "\n"
           "arguments:\n"
           "  TRACE.h5           a trace from kvsim capture or kvsim synth\n"
           "  RESULTS.tsv        results of kvsim replay on that trace (none: only the trace figures), and of\n"
           "                     kvsim eval and kvsim niah (told apart by their columns); without a trace\n"
           "                     (the first argument a .tsv file) eval and niah results alone\n"
           "\n"
           "options:\n"
           "  -o, --output DIR      output folder (default out/analyze; created when missing)\n"
           "      --format F        figures as png (default), svg or pdf\n"
           "      --layers LIST     layers of the funneling figure, e.g. 0,3,5 (default: first, last and\n"
           "                        evenly spaced between, --n-layers of them)\n"
           "      --n-layers N      number of layers shown (default 6)\n"
           "      --heads           also one figure of every head for each shown layer (default: off)\n"
           "      --map SRC         funneling maps: auto (default: pooled maps when the trace has them, else\n"
           "                        exact up to %d tokens, else sampled rows), pooled, exact, sampled\n"
           "      --queries N       sampled queries per head for the row statistics (default: every query\n"
           "                        of short traces, else 64; 0 = all)\n"
           "      --min-keys N      count only queries that see at least N keys (default 16)\n"
           "      --mass F          attention mass of the concentration fraction (default 0.9)\n"
           "      --no-summaries    recompute entropy and sink mass from Q and K even when stored\n"
           "      --title TEXT      report title (default \"kvsim analysis\")\n"
           "      --backend NAME    cpu, cuda or auto (default auto)\n"
           "      --threads N       CPU threads (default: all cores; results do not depend on it)\n"
           "  -q, --quiet           no progress on stderr\n"
           "  -h, --help            this help\n"
           "\n"
           "figures (always):\n"
           "  funneling          attention maps of chosen layers, mean over heads, log colour scale, segment\n"
           "                     starts drawn (PyramidKV's pyramid information funneling)\n"
           "  funnel_curves      per layer: entropy, normalised entropy, fraction of keys for 90%% of the\n"
           "                     attention, sink mass, in-segment mass (faint line per head, bold mean)\n"
           "  head_concentration per head: fraction of keys for 90%%, sorted, per layer and overall (Ada-KV)\n"
           "figures from results:\n"
           "  tradeoff_budget    recall, output error, Ada-KV bound vs budget, per policy\n"
           "  tradeoff_memory    the same vs cache bytes\n"
           "  bound_vs_error     bound vs measured L1 error per layer, log-log with y = x\n"
           "  budget_allocation  tokens kept per layer (snapkv, pyramidkv, adakv) and per head (adakv)\n"
           "  recall_heatmap     recall per policy and layer, one panel per budget\n"
           "figures from kvsim eval and niah results:\n"
           "  closed_loop_budget KL and top-1 agreement of the compressed cache vs budget, per policy\n"
           "  open_vs_closed     replay's recall loss and error vs eval's KL and disagreement, per budget,\n"
           "                     with Spearman's rank correlation (replay and eval results of one prompt)\n"
           "  niah_grid          retrieval per prompt length x needle depth, one panel per configuration\n"
           "  niah_scores        share of the grid retrieved vs budget, per policy\n"
           "\n"
           "example:\n"
           "  kvsim analyze trace.h5 results.tsv -o report\n",
           KV_MAP_EXACT_MAX);
}

static int parse_layers(const char *s, int *out, int max, int *n)
{
    *n = 0;
    const char *p = s;
    while (*p) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > 1 << 20 || (*end && *end != ','))
            return kv_cli_usage_error("analyze", "--layers expects a comma list of layer indices, got '%s'", s);
        if (*n >= max)
            return kv_cli_usage_error("analyze", "--layers: at most %d layers", max);
        out[(*n)++] = (int)v;
        p = *end ? end + 1 : end;
    }
    if (*n == 0)
        return kv_cli_usage_error("analyze", "--layers is empty");
    return 0;
}

int kv_cmd_analyze(int argc, char **argv)
{
    static const struct option opts[] = {
        {"output", required_argument, 0, 'o'},  {"format", required_argument, 0, 'f'},
        {"layers", required_argument, 0, 'L'},  {"n-layers", required_argument, 0, 'n'},
        {"heads", no_argument, 0, 'H'},         {"map", required_argument, 0, 'm'},
        {"queries", required_argument, 0, 'Q'}, {"min-keys", required_argument, 0, 'k'},
        {"mass", required_argument, 0, 'M'},    {"no-summaries", no_argument, 0, 'S'},
        {"title", required_argument, 0, 'T'},   {"backend", required_argument, 0, 'b'},
        {"threads", required_argument, 0, 't'}, {"quiet", no_argument, 0, 'q'},
        {"help", no_argument, 0, 'h'},          {0, 0, 0, 0},
    };
    char cmd[2048];
    kv_cli_command_line(cmd, sizeof cmd, argc, argv);
    kv_analyze_opts_t o;
    kv_analyze_opts_init(&o);
    const char *backend = "auto";
    static int layers[64];
    long v, threads = 0;
    int c, n_layers = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":o:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'o': o.out_dir = optarg; break;
        case 'f':
            if (strcmp(optarg, "png") && strcmp(optarg, "svg") && strcmp(optarg, "pdf"))
                return kv_cli_usage_error("analyze", "--format expects png, svg or pdf, got '%s'", optarg);
            o.format = optarg;
            break;
        case 'L':
            if (parse_layers(optarg, layers, 64, &n_layers))
                return 2;
            o.map.layers = layers;
            o.map.n_explicit = n_layers;
            break;
        case 'n':
            if (kv_cli_int("analyze", "--n-layers", optarg, 1, 64, &v))
                return 2;
            o.map.n_layers = (int)v;
            break;
        case 'H': o.per_head = 1; break;
        case 'm':
            if (!strcmp(optarg, "auto"))
                o.map.src = KV_MAP_AUTO;
            else if (!strcmp(optarg, "pooled"))
                o.map.src = KV_MAP_POOLED;
            else if (!strcmp(optarg, "exact"))
                o.map.src = KV_MAP_EXACT;
            else if (!strcmp(optarg, "sampled"))
                o.map.src = KV_MAP_SAMPLED;
            else
                return kv_cli_usage_error("analyze", "--map expects auto, pooled, exact or sampled, got '%s'", optarg);
            break;
        case 'Q':
            if (kv_cli_int("analyze", "--queries", optarg, 0, 1 << 24, &v))
                return 2;
            o.funnel.max_queries = (int)v;
            o.funnel.all_if_short = 0;
            break;
        case 'k':
            if (kv_cli_int("analyze", "--min-keys", optarg, 1, 1 << 24, &v))
                return 2;
            o.funnel.min_keys = (int)v;
            break;
        case 'M': {
            char *end;
            double m = strtod(optarg, &end);
            if (!kv_is_decimal(optarg, 0, 0) || end == optarg || *end || !(m > 0 && m <= 1))
                return kv_cli_usage_error("analyze", "--mass expects a number in (0, 1], got '%s'", optarg);
            o.funnel.mass = m;
            break;
        }
        case 'S': o.funnel.use_summaries = 0; break;
        case 'T': o.title = optarg; break;
        case 'b': backend = optarg; break;
        case 't':
            if (kv_cli_int("analyze", "--threads", optarg, 1, 1024, &threads))
                return 2;
            break;
        case 'q':
            o.quiet = 1;
            kv_log_set_level(KV_LOG_QUIET);
            break;
        case 'h': help(); return 0;
        default: return kv_cli_bad_option("analyze", c, argv);
        }
    }
    if (argc - optind < 1)
        return kv_cli_usage_error("analyze", "expected TRACE [RESULTS.tsv ...] or RESULTS.tsv ...");
    /* "-o report/" names the folder report: no "report//report.html" in messages and the report */
    static char out_dir[1024];
    snprintf(out_dir, sizeof out_dir, "%s", o.out_dir);
    for (size_t n = strlen(out_dir); n > 1 && out_dir[n - 1] == '/'; n--)
        out_dir[n - 1] = 0;
    o.out_dir = out_dir;
    /* how this report was made, shown at its top (the trace's and the results' own commands are in
     * its provenance tables) */
    char made[2300];
    snprintf(made, sizeof made, "This report was written by: %s", cmd);
    o.demo_info = made;
    /* no trace: kvsim eval and niah results alone (a first argument that is a .tsv file) */
    const size_t l0 = strlen(argv[optind]);
    const int no_trace = l0 > 4 && !strcmp(argv[optind] + l0 - 4, ".tsv");
    const char *trace_path = no_trace ? NULL : argv[optind];
    const char *const *results = (const char *const *)argv + optind + (no_trace ? 0 : 1);
    const int n_results = argc - optind - (no_trace ? 0 : 1);
    kv_trace_t *t = NULL;
    kv_backend_t *be = NULL;
    int rc = 1;
    if ((trace_path && kv_trace_open(trace_path, &t) != KV_OK) ||
        kv_backend_open(backend, (int)threads, &be) != KV_OK) {
        rc = kv_cli_fail("analyze");
        goto done;
    }
    if (t) {
        const kv_trace_meta_t *m = kv_trace_meta(t);
        kv_info("analyze: %s (%d layers, %d/%d heads, %d prompt + %d decode tokens), %d results file%s -> %s/",
                trace_path, m->n_layers, m->n_heads, m->n_kv_heads, m->n_prompt, m->n_tokens - m->n_prompt, n_results,
                n_results == 1 ? "" : "s", o.out_dir);
    } else {
        kv_info("analyze: %d results file%s (no trace) -> %s/", n_results, n_results == 1 ? "" : "s", o.out_dir);
    }
    double t0 = kv_now();
    kv_analyze_out_t out;
    if (kv_analyze_run(t, trace_path, results, n_results, be, &o, &out) != KV_OK) {
        rc = kv_cli_fail("analyze");
        goto done;
    }
    kv_info("analyze: %d figures and the report in %.1f s: %s", out.n_figures, kv_now() - t0, out.report_html);
    printf("%s\n", out.report_html);
    rc = 0;
done:
    kv_trace_close(t);
    kv_backend_close(be);
    return rc;
}
