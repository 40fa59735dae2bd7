/*
 * cmd_replay.c: `kvsim replay TRACE POLICIES BUDGETS` (sim/replay.c through the CLI: argument
 * checks before any work, the provenance preamble with the command as typed) and `kvsim policies`
 * (the registry with parameters and defaults).
 */
#include "analyze/kv_analyze.h"
#include "sim/cli/cli.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/common/kv_output.h"
#include "sim/kv_policy.h"
#include "sim/replay.h"
#include "sim/result.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void replay_help(void)
{
    printf("usage: kvsim replay TRACE.h5 POLICIES BUDGETS [options]\n"
           "\n"
           "Replay every policy at every budget against a trace and measure, per layer and query head,\n"
           "over the evaluation queries (the trace's decode steps): attention recall F (the attention mass\n"
           "the cache keeps), the exact output error ||o - o_hat||_1, the Ada-KV bound 2C(1-F) and the\n"
           "memory the cache stores. Results go to a TSV file with named columns after a '#' provenance\n"
           "preamble (README.md, \"What replay measures\", explains every column); they are written only\n"
           "when the whole replay succeeded, and each row's policy label can be pasted back as a policy\n"
           "spec to re-run exactly that configuration.\n"
           "\n"
           "arguments:\n"
           "  TRACE.h5     a trace from kvsim capture or kvsim synth, with decode tokens (or --eval-tail)\n"
           "  POLICIES     comma list of policy specs, e.g. 'streaming_llm,h2o,snapkv(window=32)', or of\n"
           "               presets that reproduce a reference implementation, e.g. 'snapkv@kvpress'; quote\n"
           "               it for the shell. 'all' is every registered policy with its defaults, except\n"
           "               those the trace cannot run (shotkv needs segments, criticalkv W_O), which are\n"
           "               skipped with a warning. kvsim policies lists them with their parameters,\n"
           "               defaults and presets.\n"
           "  BUDGETS      comma list: 128 (tokens per head, window included), 0.25 or 25%% (fraction of\n"
           "               the context), cr:0.75 (kvpress's compression ratio, with its rounding: keeps\n"
           "               max(1, int(n * (1 - 0.75)))), seq:65536 (total tokens for the sequence)\n"
           "\n"
           "options:\n"
           "  -o, --output FILE    results as TSV (default: standard output)\n"
           "      --json FILE      also write the results as JSON (default: no JSON)\n"
           "      --kept FILE.h5   also write the kept token indices per policy x budget x layer x\n"
           "                       storage head (HDF5, gzip; one-shot policies: the context kept after\n"
           "                       prefill; decode-time ones: the cache the last evaluation query reads;\n"
           "                       layout in sim/kept.h and README.md) (default: none)\n"
           "      --eval-tail N    also hold out the last N prompt tokens as evaluation queries (default 0)\n"
           "      --stats SOURCE   where the statistics over the prompt queries (accumulated attention, its\n"
           "                       squares and maxima) come from: trace (stored by capture and synth;\n"
           "                       replay then costs O(T x (windows + evaluation queries)) per layer),\n"
           "                       recompute (exactly, from the stored Q and K: O(T^2) per layer, for\n"
           "                       traces without them and for studies of f16 rounding) or auto (default:\n"
           "                       trace when the trace stores them and they cover the --eval-tail)\n"
           "      --seed N         seed of randomised policies (default 0)\n"
           "      --no-head-rows   only layer and overall rows (default: also one row per query head)\n"
           "      --backend NAME   cpu, cuda or auto (default auto)\n"
           "      --threads N      CPU threads (default: all cores; results do not depend on it)\n"
           "      --prefetch WHEN  on: a background thread reads and decompresses the next layer while\n"
           "                       this one is computed, holding two layers of Q/K/V (and W_O) in memory\n"
           "                       instead of one; off: read each layer when it is needed; auto: on with\n"
           "                       a GPU backend, off on the CPU, whose compute already uses every core\n"
           "                       (default auto; results do not depend on it)\n"
           "  -q, --quiet          no progress on stderr\n"
           "  -h, --help           this help\n"
           "\n"
           "example:\n"
           "  kvsim replay trace.h5 'streaming_llm,h2o,snapkv(window=32)' 64,128,256 -o results.tsv\n");
}

/* 1 when `list` names policy `name` explicitly ("name" or "name(...)" as a top-level item). */
static int names_policy(const char *list, const char *name)
{
    const size_t n = strlen(name);
    int depth = 0;
    for (const char *item = list, *c = list;; c++) {
        if (*c == '(')
            depth++;
        else if (*c == ')')
            depth--;
        if (*c == 0 || (*c == ',' && depth == 0)) {
            while (*item == ' ')
                item++;
            if (!strncmp(item, name, n) && (item[n] == '(' || item[n] == ',' || item[n] == ' ' || item[n] == 0))
                return 1;
            if (*c == 0)
                return 0;
            item = c + 1;
        }
    }
}

void kv_cli_skip_unrunnable(const char *list, int n_segments, int has_wo, const char *trace_path,
                            struct kv_policy **pols, int *n)
{
    /* 'all' means every policy this trace can run: policies that need segments (or W_O) are skipped
     * on a trace without them, unless they were also named explicitly (then replay reports the error) */
    if ((n_segments >= 1 && has_wo) || !names_policy(list, "all"))
        return;
    int k = 0;
    for (int i = 0; i < *n; i++) {
        const int no_seg = (pols[i]->flags & KV_POL_NEEDS_SEGMENTS) && n_segments < 1;
        const int no_wo = (pols[i]->flags & KV_POL_NEEDS_WO) && !has_wo;
        if ((no_seg || no_wo) && !names_policy(list, pols[i]->desc->name)) {
            if (no_seg)
                kv_warn("%s has no segments: skipping %s (capture a prompt with <|endoftext|> separators or "
                        "--segments to run it)",
                        trace_path, pols[i]->desc->name);
            else
                kv_warn("%s has no W_O: skipping %s (capture with --with-wo to run it)", trace_path,
                        pols[i]->desc->name);
            kv_policy_free(pols[i]);
            continue;
        }
        pols[k++] = pols[i];
    }
    *n = k;
}

void kv_cli_warn_window_budgets(const kv_trace_meta_t *m, int n_ctx, kv_policy_t *const *pols, int n_pol,
                                const kv_budget_t *budgets, int n_bud)
{
    for (int i = 0; i < n_pol; i++) {
        const int w = kv_policy_kept_window(pols[i]);
        if (w <= 0)
            continue;
        char list[256] = "";
        size_t len = 0;
        int n = 0;
        for (int b = 0; b < n_bud; b++) {
            kv_budget_t r = budgets[b];
            if (kv_budget_resolve(&r, m, n_ctx) != KV_OK || r.tokens > w || r.tokens >= n_ctx)
                continue;
            len +=
                (size_t)snprintf(list + len, len < sizeof list ? sizeof list - len : 0, "%s%s", n ? ", " : "", r.text);
            if (len >= sizeof list)
                len = sizeof list - 1;
            n++;
        }
        char name[512];
        if (n && kv_analyze_short_label(pols[i]->label, name, sizeof name) == KV_OK)
            kv_warn("%s always keeps the last %d context tokens (its window); at budget%s %s (tokens per head, "
                    "window included) it keeps only the last B tokens and its scores select nothing (a larger "
                    "budget or a smaller window makes it choose)",
                    name, w, n == 1 ? "" : "s", list);
    }
}

int kv_cli_skip_lean(kv_trace_t *t, const char *list, kv_policy_t **pols, int *n, kv_backend_t *be,
                     const kv_replay_opts_t *ro)
{
    /* a lean trace lacks the early prompt queries: 'all' skips the policies that need them (a long
     * observation window), unless they were also named explicitly (then replay reports the error) */
    if (!names_policy(list, "all"))
        return KV_OK;
    int *ok = kv_malloc(sizeof(int) * (size_t)(*n ? *n : 1), "policy check");
    char(*why)[1024] = kv_malloc(sizeof *why * (size_t)(*n ? *n : 1), "policy check");
    int rc = ok && why ? kv_replay_check_policies(t, pols, *n, be, ro, ok, why) : KV_ENOMEM;
    if (rc == KV_OK) {
        int k = 0;
        for (int i = 0; i < *n; i++) {
            if (!ok[i] && !names_policy(list, pols[i]->desc->name)) {
                /* the innermost message (after the "LABEL: layer 0: " prefixes of composite policies) */
                const char *w = why[i], *x;
                while ((x = strstr(w, "layer 0: ")))
                    w = x + 9;
                kv_warn("skipping %s on %s: %s", pols[i]->desc->name, kv_trace_path(t), w);
                kv_policy_free(pols[i]);
                continue;
            }
            pols[k++] = pols[i];
        }
        *n = k;
    }
    kv_free(ok);
    kv_free(why);
    return rc;
}

int kv_cmd_replay(int argc, char **argv)
{
    static const struct option opts[] = {
        {"output", required_argument, 0, 'o'},
        {"json", required_argument, 0, 'j'},
        {"kept", required_argument, 0, 'k'},
        {"eval-tail", required_argument, 0, 'e'},
        {"seed", required_argument, 0, 's'},
        {"no-head-rows", no_argument, 0, 'n'},
        {"backend", required_argument, 0, 'b'},
        {"threads", required_argument, 0, 't'},
        {"prefetch", required_argument, 0, 'p'},
        {"stats", required_argument, 0, 'S'},
        {"quiet", no_argument, 0, 'q'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    /* the command as typed, for the provenance preamble (getopt_long reorders argv) */
    char cmd[2048];
    kv_cli_command_line(cmd, sizeof cmd, argc, argv);
    const char *out = "-", *json = NULL, *kept_path = NULL, *backend = "auto";
    kv_replay_opts_t ro;
    kv_replay_defaults(&ro);
    long v, threads = 0;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":o:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'o': out = optarg; break;
        case 'j': json = optarg; break;
        case 'k': kept_path = optarg; break;
        case 'e':
            if (kv_cli_int("replay", "--eval-tail", optarg, 0, 1 << 30, &v))
                return 2;
            ro.eval_tail = (int)v;
            break;
        case 's':
            if (kv_cli_int("replay", "--seed", optarg, 0, 0x7fffffffL, &v))
                return 2;
            ro.seed = (uint64_t)v;
            break;
        case 'n': ro.head_rows = 0; break;
        case 'b': backend = optarg; break;
        case 't':
            if (kv_cli_int("replay", "--threads", optarg, 1, 1024, &threads))
                return 2;
            break;
        case 'p':
            if (!strcmp(optarg, "on"))
                ro.prefetch = 1;
            else if (!strcmp(optarg, "off"))
                ro.prefetch = 0;
            else if (!strcmp(optarg, "auto"))
                ro.prefetch = KV_PREFETCH_AUTO;
            else
                return kv_cli_usage_error("replay", "--prefetch takes on, off or auto, not '%s'", optarg);
            break;
        case 'S':
            if (!strcmp(optarg, "trace"))
                ro.stats_source = KV_STATS_TRACE;
            else if (!strcmp(optarg, "recompute"))
                ro.stats_source = KV_STATS_RECOMPUTE;
            else if (!strcmp(optarg, "auto"))
                ro.stats_source = KV_STATS_AUTO;
            else
                return kv_cli_usage_error("replay", "--stats takes trace, recompute or auto, not '%s'", optarg);
            break;
        case 'q':
            ro.quiet = 1;
            kv_log_set_level(KV_LOG_QUIET);
            break;
        case 'h': replay_help(); return 0;
        default: return kv_cli_bad_option("replay", c, argv);
        }
    }
    if (argc - optind != 3)
        return kv_cli_usage_error("replay", "expected TRACE POLICIES BUDGETS, got %d argument%s", argc - optind,
                                  argc - optind == 1 ? "" : "s");
    if (json && !strcmp(json, "-"))
        return kv_cli_usage_error("replay", "--json takes a file (standard output is for the TSV)");
    const char *trace_path = argv[optind], *pol_list = argv[optind + 1], *bud_list = argv[optind + 2];
    kv_policy_t **pols = NULL;
    kv_budget_t *bud = NULL;
    int n_pol = 0, n_bud = 0, rc = 1;
    kv_trace_t *t = NULL;
    kv_backend_t *be = NULL;
    kv_results_t *res = NULL;
    kv_kept_t *kept = NULL;
    if (kept_path)
        ro.kept = &kept;
    /* malformed POLICIES or BUDGETS are usage errors */
    if (kv_policy_create_list(pol_list, &pols, &n_pol) != KV_OK) {
        rc = kv_cli_usage_error("replay", "POLICIES: %s", kv_last_error());
        goto done;
    }
    if (kv_budget_parse_list(bud_list, &bud, &n_bud) != KV_OK) {
        rc = kv_cli_usage_error("replay", "BUDGETS: %s", kv_last_error());
        goto done;
    }
    /* output paths are checked before the work, not after it: regular files in writable folders,
     * none of them the trace or each other */
    const char *for_out[] = {trace_path, json, kept_path}, *for_json[] = {trace_path, out, kept_path},
               *for_kept[] = {trace_path, out, json};
    if (kv_out_check(out, for_out, 3) != KV_OK || (json && kv_out_check(json, for_json, 3) != KV_OK) ||
        (kept_path && kv_out_check(kept_path, for_kept, 3) != KV_OK)) {
        rc = kv_cli_fail("replay");
        goto done;
    }
    if (kv_trace_open(trace_path, &t) != KV_OK) {
        rc = kv_cli_fail("replay");
        goto done;
    }
    const kv_trace_meta_t *m = kv_trace_meta(t);
    kv_cli_skip_unrunnable(pol_list, m->n_segments, m->has_wo, trace_path, pols, &n_pol);
    kv_cli_warn_window_budgets(m, m->n_prompt - ro.eval_tail, pols, n_pol, bud, n_bud);
    if (kv_backend_open(backend, (int)threads, &be) != KV_OK) {
        rc = kv_cli_fail("replay");
        goto done;
    }
    if (m->q_start > 0 && kv_cli_skip_lean(t, pol_list, pols, &n_pol, be, &ro) != KV_OK) {
        rc = kv_cli_fail("replay");
        goto done;
    }
    kv_info("replay: %s (%d layers, %d/%d heads, %d prompt + %d decode tokens), %d polic%s x %d budget%s on %s",
            trace_path, m->n_layers, m->n_heads, m->n_kv_heads, m->n_prompt, m->n_tokens - m->n_prompt, n_pol,
            n_pol == 1 ? "y" : "ies", n_bud, n_bud == 1 ? "" : "s", be->device);
    /* the checksum for the provenance reads the whole file: seconds for a multi-GiB trace */
    struct stat tst;
    if (stat(trace_path, &tst) == 0 && tst.st_size > (off_t)1 << 30) {
        char sz[32];
        kv_info("replay: computing the SHA-256 of %s (%s) for the results' provenance", trace_path,
                kv_fmt_bytes((double)tst.st_size, sz, sizeof sz));
    }
    char sha[65] = "";
    if (kv_sha256_file(trace_path, sha) != KV_OK) {
        rc = kv_cli_fail("replay");
        goto done;
    }
    double t0 = kv_now();
    if (kv_replay(t, pols, n_pol, bud, n_bud, be, &ro, &res) != KV_OK) {
        rc = kv_cli_fail("replay");
        goto done;
    }
    char now[32], buf[64];
    kv_iso_time(now, sizeof now);
    snprintf(buf, sizeof buf, "%d", ro.eval_tail);
    char seed[32];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)ro.seed);
    char ctx[64];
    snprintf(ctx, sizeof ctx, "%d context tokens, %d evaluation queries", m->n_prompt - ro.eval_tail,
             m->n_tokens - (m->n_prompt - ro.eval_tail));
    if (kv_results_add_prov(res, "tool", "kvsim " KV_VERSION) || kv_results_add_prov(res, "git", kv_git_revision()) ||
        kv_results_add_prov(res, "date", now) || kv_results_add_prov(res, "command", cmd) ||
        kv_results_add_prov(res, "trace", trace_path) || kv_results_add_prov(res, "trace_sha256", sha) ||
        kv_results_add_prov(res, "trace_source", m->source) || kv_results_add_prov(res, "trace_model", m->model) ||
        kv_results_add_prov(res, "trace_dtype", m->dtype == KV_DTYPE_F16 ? "f16" : "f32") ||
        kv_results_add_prov(res, "evaluation", ctx) || kv_results_add_prov(res, "eval_tail", buf) ||
        kv_results_add_prov(res, "seed", seed) || kv_results_add_prov(res, "backend", be->device)) {
        rc = kv_cli_fail("replay");
        goto done;
    }
    if (kv_results_write(res, out, json) != KV_OK ||
        (kept_path && kv_kept_write(kept, kept_path, trace_path, sha) != KV_OK)) {
        rc = kv_cli_fail("replay");
        goto done;
    }
    if (strcmp(out, "-"))
        kv_info("replay: %zu rows in %.1f s -> %s%s%s", res->n, kv_now() - t0, out, json ? ", " : "", json ? json : "");
    rc = 0;
done:
    for (int i = 0; i < n_pol; i++)
        kv_policy_free(pols[i]);
    kv_free(pols);
    kv_free(bud);
    kv_results_free(res);
    kv_kept_free(kept);
    kv_trace_close(t);
    kv_backend_close(be);
    return rc;
}

static void flags_text(unsigned f, char *buf, size_t len)
{
    snprintf(buf, len, "%s%s%s%s%s%s%s%s%s",
             f & KV_POL_DECODE      ? "decode-time"
             : f & KV_POL_PER_QUERY ? "per-query"
                                    : "one-shot after prefill",
             f & KV_POL_NESTED ? ", nested" : "", f & KV_POL_NEEDS_SEGMENTS ? ", needs segments" : "",
             f & KV_POL_CROSS_LAYER ? ", cross-layer" : "", f & KV_POL_NO_EVICT ? ", no eviction" : "",
             f & KV_POL_BUDGET_LAYER ? ", head-adaptive (budget per layer)" : "",
             f & KV_POL_BUDGET_SEQUENCE ? ", budget per sequence" : "",
             f & KV_POL_OVER_BUDGET ? ", may exceed the budget (as the reference)" : "",
             f & KV_POL_BUDGET_FREE ? ", threshold rule (may evict below the budget)" : "");
    if (f & KV_POL_NEEDS_WO)
        snprintf(buf + strlen(buf), len - strlen(buf), ", needs W_O (--with-wo)");
    if (f & KV_POL_ORACLE)
        snprintf(buf + strlen(buf), len - strlen(buf), ", reads the future (a ceiling)");
}

static void policies_help(void)
{
    printf("usage: kvsim policies [--labels]\n"
           "\n"
           "List every registered eviction policy: its one-line description and paper, its kind (one-shot\n"
           "after prefill, decode-time, per-query), its reference implementation, its canonical label\n"
           "with every default, its presets and each parameter with its type, range and default.\n"
           "Parameters are set in a policy spec as name(k=v,...); the parameters gran and agg are\n"
           "common to every policy. A preset, name@preset, is the parameter set that reproduces a\n"
           "reference implementation (snapkv@kvpress); parameters given after it override it\n"
           "(snapkv@kvpress(window=32)).\n"
           "\n"
           "options:\n"
           "  -l, --labels  print only the canonical label of each policy, with its defaults (default:\n"
           "                the full description)\n"
           "  -h, --help    this help\n"
           "\n"
           "example:\n"
           "  kvsim policies --labels\n");
}

int kv_cmd_policies(int argc, char **argv)
{
    static const struct option opts[] = {{"labels", no_argument, 0, 'l'}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    int labels = 0, c;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":lh", opts, NULL)) != -1) {
        switch (c) {
        case 'l': labels = 1; break;
        case 'h': policies_help(); return 0;
        default: return kv_cli_bad_option("policies", c, argv);
        }
    }
    if (optind < argc)
        return kv_cli_usage_error("policies", "unexpected argument '%s'", argv[optind]);
    for (int i = 0; i < kv_policy_count(); i++) {
        const kv_policy_desc_t *d = kv_policy_desc_at(i);
        kv_policy_t *p;
        if (kv_policy_create(d->name, &p) != KV_OK)
            return kv_cli_fail("policies");
        if (labels) {
            printf("%s\n", p->label);
        } else {
            char fl[256], desc[4096];
            flags_text(p->flags, fl, sizeof fl);
            printf("%s\n  %s\n  paper: %s; %s\n  reference code: %s\n  default: %s\n", d->name, d->doc, d->paper, fl,
                   d->code ? d->code : "-", p->label);
            for (int k = 0; k < d->n_presets; k++)
                printf("  preset %s@%s: %s\n    = %s\n", d->name, d->presets[k].name, d->presets[k].what,
                       d->presets[k].params);
            kv_params_describe(d->params, d->n_params, desc, sizeof desc);
            printf("%s", desc);
            kv_params_describe(kv_policy_common_params, kv_policy_n_common_params, desc, sizeof desc);
            printf("%s\n", desc);
        }
        kv_policy_free(p);
    }
    return 0;
}
