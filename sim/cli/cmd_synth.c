/*
 * cmd_synth.c: `kvsim synth -o TRACE.h5 [options]`: write a synthetic trace with planted attention
 * structure (traces/kv_synth.h). Every generation parameter of the synth schema is an option
 * (--sink-mass for sink_mass); --params takes a whole label, as printed by `kvsim info`, so a trace
 * can be regenerated from its file. Output options (dtype, compression, summaries, backend) do not
 * change Q, K and V.
 */
#include "sim/cli/cli.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/common/kv_params.h"
#include "traces/kv_synth.h"
#include "traces/kv_trace.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static void help(void)
{
    char params[4096];
    kv_synth_describe(params, sizeof params);
    printf("usage: kvsim synth -o TRACE.h5 [options]\n"
           "\n"
           "Write a synthetic attention trace (kvsim trace format, traces/FORMAT.md) whose attention has\n"
           "planted, controllable structure: attention sinks with a given mass, recency, heavy-hitter\n"
           "tokens, per-segment locality, and concentration that narrows with depth (the pyramid\n"
           "funnelling shape). Generation streams one layer at a time, up to Llama-3-8B shape at 32K\n"
           "tokens; the output depends only on the parameters (stored in the generator attribute), not\n"
           "on the thread count. Output options (dtype, compression, summaries, backend) do not change\n"
           "Q, K and V.\n"
           "\n"
           "options:\n"
           "  -o, --output PATH     trace to write (required; written atomically)\n"
           "      --preset NAME     shape preset: llama3-8b (32 layers, 32/8 heads, head_dim 128),\n"
           "                        llama2-7b, mistral-7b, stories110m, tiny (default: none, the\n"
           "                        parameter defaults below); options given with it still override it\n"
           "      --params LABEL    start from a label 'synth(k=v,...)' (the generator= line of\n"
           "                        `kvsim info --attrs`); other options override it\n"
           "      --dtype f16|f32   storage of Q, K, V (default f16)\n"
           "      --zstd-level N    1..22 (default 3)\n"
           "      --summaries MODE  yes, no or auto (default). LSE, entropy, accumulated attention,\n"
           "                        the pooled map and the statistics replay and analyze read\n"
           "                        (traces/FORMAT.md) cost O(T^2) per head and layer, computed once\n"
           "                        here so that replay is linear in T; auto writes them when tokens\n"
           "                        <= %d and layers x heads x tokens^2 <= 5e9 (Llama-3-8B shape: up\n"
           "                        to 2209 tokens, a few minutes)\n"
           "      --q-tail N        a lean trace: store the queries of the last N prompt tokens and of\n"
           "                        the decode tokens only (queries are most of a trace's bytes);\n"
           "                        implies the summaries. Replay then needs --eval-tail <= N and\n"
           "                        observation windows within N (default: every query)\n"
           "      --pool N          pooled attention map side (default %d, at most tokens)\n"
           "      --backend NAME    backend for the summaries: cpu (default), cuda, auto\n"
           "      --threads N       threads (default: all cores)\n"
           "      --print-planted   print the sink and heavy-hitter positions on stdout\n"
           "  -q, --quiet           no progress on stderr\n"
           "  -h, --help            this help\n"
           "\n"
           "generation parameters (--key value; '_' in a key may be written '-'):\n%s"
           "\n"
           "the planted structure:\n"
           "  For query i and key j <= i of layer l the scaled score q_i.k_j/sqrt(d) is built to be\n"
           "\n"
           "    c_i [j sink] + B [j heavy hitter] + E [j in i's segment] + R f(i-j) + noise\n"
           "\n"
           "  f(D) = mean over rotary pairs m of cos(D w_m), w_m log-spaced from 1 to 1/recent-window:\n"
           "         1 at D = 0, decaying roughly like log(W/D)/log(W) (RoPE on constant vectors);\n"
           "  B, E, R = sharpness(l) x heavy-boost, seg-boost, recent-boost x a per-head factor in\n"
           "         [1 - head-jitter, 1 + head-jitter]; sharpness grows linearly from sharp-first\n"
           "         (layer 0) to sharp-last (last layer): broad, high-entropy attention low, a few\n"
           "         tokens high (pyramid funnelling);\n"
           "  c_i  = calibrated per query so that the sinks (tokens 0..sinks-1) take sink-mass of\n"
           "         the attention: the 32 most influential keys are scored exactly, the softmax\n"
           "         normaliser over the rest is estimated analytically (no T x T work); measured:\n"
           "         mean within 0.002 of the target, per-query rms error 0.007-0.02;\n"
           "  heavy hitters: a seeded random heavy-frac of the prompt tokens, shared by all heads;\n"
           "  segments: the prompt is cut into --segments pieces (meta.segments); decode tokens join\n"
           "         the last one.\n"
           "  Each feature lives in dedicated dimensions of Q and K (sink, heavy, one-hot segment code,\n"
           "  rotary pairs, noise), permuted per layer and KV head. Query heads of a GQA group share K\n"
           "  and V; queries differ per head. Positions are 0..T-1 and token ids -1. Generation is\n"
           "  O(T x head_dim x heads) per layer.\n"
           "\n"
           "example:\n"
           "  kvsim synth -o out/tiny.h5 --preset tiny --tokens 512 --decode 32 --segments 4\n"
           "  kvsim synth -o out/l3.h5 --preset llama3-8b --tokens 8256 --decode 64 --summaries no\n",
           KV_SYNTH_AUTO_SUMMARY_TOKENS, KV_TRACE_DEFAULT_POOL, params);
}

/* Library messages start with "synth: "; the CLI prefix already says "kvsim synth: ". */
static const char *synth_msg(void)
{
    const char *e = kv_last_error();
    return !strncmp(e, "synth: ", 7) ? e + 7 : e;
}

enum {
    OPT_PRESET = 256,
    OPT_PARAMS,
    OPT_DTYPE,
    OPT_ZSTD,
    OPT_SUMMARIES,
    OPT_POOL,
    OPT_BACKEND,
    OPT_THREADS,
    OPT_PRINT,
    OPT_QTAIL,
    OPT_KEY0 = 1000
};

static void print_planted(const kv_synth_params_t *p)
{
    uint8_t *roles = kv_malloc((size_t)p->n_tokens, "roles");
    int nh = 0;
    if (!roles || kv_synth_roles(p, roles, &nh) != KV_OK) {
        kv_free(roles);
        return;
    }
    printf("sinks:");
    for (int t = 0; t < p->n_tokens; t++)
        if (roles[t] & KV_SYNTH_SINK)
            printf(" %d", t);
    printf("\nheavy hitters (%d):", nh);
    for (int t = 0; t < p->n_tokens; t++)
        if (roles[t] & KV_SYNTH_HEAVY)
            printf(" %d", t);
    printf("\n");
    kv_free(roles);
}

int kv_cmd_synth(int argc, char **argv)
{
    static const char *cmd = "synth";
    enum { MAX_OPTS = 64 };
    struct option opts[MAX_OPTS];
    char names[KV_PARAMS_MAX][KV_PARAM_KEY_LEN];
    int n = 0;
    const struct option fixed[] = {
        {"output", required_argument, 0, 'o'},
        {"preset", required_argument, 0, OPT_PRESET},
        {"params", required_argument, 0, OPT_PARAMS},
        {"dtype", required_argument, 0, OPT_DTYPE},
        {"zstd-level", required_argument, 0, OPT_ZSTD},
        {"summaries", required_argument, 0, OPT_SUMMARIES},
        {"pool", required_argument, 0, OPT_POOL},
        {"backend", required_argument, 0, OPT_BACKEND},
        {"threads", required_argument, 0, OPT_THREADS},
        {"print-planted", no_argument, 0, OPT_PRINT},
        {"q-tail", required_argument, 0, OPT_QTAIL},
        {"quiet", no_argument, 0, 'q'},
        {"help", no_argument, 0, 'h'},
    };
    for (size_t i = 0; i < KV_ARRAY_LEN(fixed); i++)
        opts[n++] = fixed[i];
    int n_keys = 0;
    for (const char *key; (key = kv_synth_key(n_keys)) && n_keys < KV_PARAMS_MAX; n_keys++) {
        snprintf(names[n_keys], KV_PARAM_KEY_LEN, "%s", key);
        for (char *c = names[n_keys]; *c; c++)
            if (*c == '_')
                *c = '-';
        opts[n++] = (struct option){names[n_keys], required_argument, 0, OPT_KEY0 + n_keys};
        /* also accept the underscore spelling of keys that have one */
        if (strchr(key, '_') && n < MAX_OPTS - 1)
            opts[n++] = (struct option){key, required_argument, 0, OPT_KEY0 + n_keys};
    }
    opts[n] = (struct option){0, 0, 0, 0};

    const char *out = NULL, *preset = NULL, *label = NULL;
    kv_params_t given;
    memset(&given, 0, sizeof given);
    kv_write_opts_t wo = {KV_DTYPE_F16, 0, 0};
    kv_synth_summaries_t summaries = KV_SYNTH_SUMMARIES_AUTO;
    long pool = 0, threads = 0, level = 0, q_tail = -1;
    const char *backend = "cpu";
    int print = 0, c;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":o:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'o': out = optarg; break;
        case 'q': kv_log_set_level(KV_LOG_QUIET); break;
        case 'h': help(); return 0;
        case OPT_PRESET: preset = optarg; break;
        case OPT_PARAMS: label = optarg; break;
        case OPT_DTYPE:
            if (!strcmp(optarg, "f16"))
                wo.dtype = KV_DTYPE_F16;
            else if (!strcmp(optarg, "f32"))
                wo.dtype = KV_DTYPE_F32;
            else
                return kv_cli_usage_error(cmd, "--dtype expects f16 or f32, got '%s'", optarg);
            break;
        case OPT_ZSTD:
            if (kv_cli_int(cmd, "--zstd-level", optarg, 1, 22, &level))
                return 2;
            wo.zstd_level = (int)level;
            break;
        case OPT_SUMMARIES:
            if (!strcmp(optarg, "yes"))
                summaries = KV_SYNTH_SUMMARIES_YES;
            else if (!strcmp(optarg, "no"))
                summaries = KV_SYNTH_SUMMARIES_NO;
            else if (!strcmp(optarg, "auto"))
                summaries = KV_SYNTH_SUMMARIES_AUTO;
            else
                return kv_cli_usage_error(cmd, "--summaries expects yes, no or auto, got '%s'", optarg);
            break;
        case OPT_POOL:
            if (kv_cli_int(cmd, "--pool", optarg, 1, 1 << 20, &pool))
                return 2;
            break;
        case OPT_BACKEND: backend = optarg; break;
        case OPT_THREADS:
            if (kv_cli_int(cmd, "--threads", optarg, 1, 4096, &threads))
                return 2;
            break;
        case OPT_PRINT: print = 1; break;
        case OPT_QTAIL:
            if (kv_cli_int(cmd, "--q-tail", optarg, 0, 1L << 30, &q_tail))
                return 2;
            break;
        default:
            if (c >= OPT_KEY0 && c < OPT_KEY0 + n_keys) {
                if (kv_params_set(&given, kv_synth_key(c - OPT_KEY0), optarg) != KV_OK)
                    return kv_cli_usage_error(cmd, "%s", synth_msg());
                break;
            }
            return kv_cli_bad_option(cmd, c, argv);
        }
    }
    if (optind < argc)
        return kv_cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
    if (!out)
        return kv_cli_usage_error(cmd, "-o TRACE.h5 is required");

    kv_synth_params_t p;
    kv_synth_defaults(&p);
    if (label && kv_synth_apply(&p, label) != KV_OK)
        return kv_cli_usage_error(cmd, "--params: %s", synth_msg());
    if (preset && kv_synth_preset(&p, preset) != KV_OK)
        return kv_cli_usage_error(cmd, "--preset: %s", synth_msg());
    for (int i = 0; i < given.n; i++) {
        char opt[KV_PARAM_KEY_LEN + 2];
        snprintf(opt, sizeof opt, "%s", given.key[i]);
        for (char *ch = opt; *ch; ch++)
            if (*ch == '_')
                *ch = '-';
        if (kv_synth_set(&p, given.key[i], given.val[i]) != KV_OK)
            return kv_cli_usage_error(cmd, "--%s: %s", opt, synth_msg());
    }
    p.summaries = summaries;
    p.pool = (int)pool;
    p.n_threads = (int)threads;
    p.q_tail = (int)q_tail;
    snprintf(p.backend, sizeof p.backend, "%s", backend);
    if (kv_synth_validate(&p) != KV_OK)
        return kv_cli_usage_error(cmd, "%s", synth_msg());

    const int T = p.n_tokens, want = kv_synth_want_summaries(&p);
    if (want && kv_synth_summary_work(&p) > KV_SYNTH_AUTO_SUMMARY_WORK)
        kv_warn("summaries cost layers x heads x tokens^2 = %.3g score evaluations (x3): this will take a while",
                kv_synth_summary_work(&p));
    double t0 = kv_now();
    if (kv_synth_write(&p, out, &wo) != KV_OK)
        return kv_cli_fail(cmd);
    double el = kv_now() - t0;

    kv_trace_t *t;
    if (kv_trace_open(out, &t) != KV_OK)
        return kv_cli_fail(cmd);
    uint64_t raw = 0, stored = 0;
    kv_trace_storage(t, &raw, &stored);
    kv_trace_close(t);
    struct stat st;
    double fsize = stat(out, &st) == 0 ? (double)st.st_size : 0;
    uint8_t *roles = kv_malloc((size_t)T, "roles");
    int nh = 0;
    if (roles)
        kv_synth_roles(&p, roles, &nh);
    kv_free(roles);
    char a[32], b[32], f[32], r[32];
    printf("wrote %s: %d layers, %d heads / %d KV heads, head_dim %d, %d tokens (%d prompt + %d decode), %s\n", out,
           p.n_layers, p.n_heads, p.n_kv_heads, p.head_dim, T, T - p.n_decode, p.n_decode,
           wo.dtype == KV_DTYPE_F16 ? "f16" : "f32");
    char segs[32] = "no segments";
    if (p.n_segments >= 2)
        snprintf(segs, sizeof segs, "%d segments", p.n_segments);
    printf("  planted: %d sink%s (mass %g), %d heavy hitters (%g of the prompt), %s, sharpness %g -> %g\n", p.n_sinks,
           p.n_sinks == 1 ? "" : "s", p.sink_mass, nh, p.heavy_frac, segs, p.sharp_first, p.sharp_last);
    printf("  summaries: %s\n",
           want ? "lse, entropy, accumulated attention, pooled map; statistics for replay and analyze" : "none");
    if (p.q_tail >= 0)
        printf("  lean: queries stored for the last %d prompt tokens and the %d decode tokens only\n", p.q_tail,
               p.n_decode);
    printf("  file %s (tensors %s uncompressed, %s stored), %.1f s, peak RSS %s\n", kv_fmt_bytes(fsize, f, sizeof f),
           kv_fmt_bytes((double)raw, a, sizeof a), kv_fmt_bytes((double)stored, b, sizeof b), el,
           kv_fmt_bytes((double)kv_peak_rss(), r, sizeof r));
    if (print)
        print_planted(&p);
    return 0;
}
