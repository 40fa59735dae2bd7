/*
 * cmd_info.c: `kvsim info TRACE ...`: shapes, dtype, sizes raw and stored, compression, provenance.
 * `--attrs` prints the root attributes of traces/FORMAT.md instead, one `name=value` per line under
 * the same names, for scripts and for checking a trace against the format description.
 * The strings shown come from the file: control characters are never printed raw (summary: '?';
 * --attrs: \n, \\ and \xHH escapes) so a trace cannot drive the terminal, and the prompt is cut
 * on a UTF-8 character boundary.
 */
#include "sim/cli/cli.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_output.h"
#include "traces/kv_trace.h"

#include <getopt.h>
#include <stdio.h>
#include <string.h>

static void help(void)
{
    printf("usage: kvsim info [--attrs | --verify] TRACE.h5 [TRACE.h5 ...]\n"
           "\n"
           "Describe kvsim traces (traces/FORMAT.md): format version, shape, tokens and segments, storage\n"
           "dtype and zstd level, sizes of the layer datasets uncompressed and as stored with their ratio,\n"
           "NaN and infinite values stored, which summaries and W_O are present, and provenance (source and\n"
           "generator command, model file and its sha256, tokenizer, kvsim version, git revision, date,\n"
           "backend, prompt). Stale temporary files that dead kvsim processes left in a trace's folder are\n"
           "reported (kvsim clean removes them). Several traces are described one after the other; the exit\n"
           "status is 1 when any of them cannot be read (with --verify: or is not sound).\n"
           "\n"
           "arguments:\n"
           "  TRACE.h5          a trace written by kvsim capture or kvsim synth\n"
           "\n"
           "options:\n"
           "      --attrs       print the root attributes as name=value lines, under the names of\n"
           "                    traces/FORMAT.md (default: the human-readable summary)\n"
           "      --verify      also read every stored chunk and compare it with its checksum, and check\n"
           "                    every value: Q, K, V, W_O and the summaries finite, entropy in [0, ln(t+1)],\n"
           "                    accumulated attention in [0, the prompt queries that see the key], pooled\n"
           "                    probabilities in [0, 1]; one line per problem, naming dataset and chunk or\n"
           "                    layer and head (default: only what the metadata says)\n"
           "  -h, --help        this help\n"
           "\n"
           "example:\n"
           "  kvsim info --verify out/demo/trace.h5\n");
}

/* One attribute per line; a newline is written as \n, a backslash as \\ and other control characters
 * as \xHH, so each attribute stays one line and the terminal sees no control codes. */
static void attr_s(const char *k, const char *v)
{
    printf("%s=", k);
    for (; *v; v++) {
        if (*v == '\n')
            fputs("\\n", stdout);
        else if (*v == '\\')
            fputs("\\\\", stdout);
        else if ((unsigned char)*v < 0x20 || *v == 0x7f)
            printf("\\x%02x", (unsigned char)*v);
        else
            putchar(*v);
    }
    putchar('\n');
}

static void print_attrs(const kv_trace_meta_t *m)
{
    attr_s("format", KV_TRACE_FORMAT);
    printf("format_version=%d\n", m->format_version ? m->format_version : KV_TRACE_FORMAT_VERSION);
    printf("n_layers=%d\nn_heads=%d\nn_kv_heads=%d\nhead_dim=%d\n", m->n_layers, m->n_heads, m->n_kv_heads,
           m->head_dim);
    printf("n_tokens=%d\nn_prompt=%d\nn_decode=%d\nn_segments=%d\n", m->n_tokens, m->n_prompt,
           m->n_tokens - m->n_prompt, m->n_segments);
    printf("has_summaries=%d\npool=%d\nhas_wo=%d\n", m->has_summaries, m->pool, m->has_wo);
    printf("has_stats=%d\nstats_split=%d\nq_start=%d\n", m->has_stats, m->stats_split, m->q_start);
    printf("model_dim=%d\nhidden_dim=%d\nvocab_size=%d\nseq_len=%d\n", m->model_dim, m->hidden_dim, m->vocab_size,
           m->seq_len);
    printf("rope_theta=%.9g\nnorm_eps=%.9g\n", (double)m->rope_theta, (double)m->norm_eps);
    attr_s("dtype", m->dtype == KV_DTYPE_F16 ? "f16" : "f32");
    printf("f16_overflow=%ld\nzstd_level=%d\n", m->f16_overflow, m->zstd_level);
    if (m->nonfinite >= 0)
        printf("nonfinite=%ld\n", m->nonfinite);
    if (m->meta_sha256[0])
        attr_s("meta_sha256", m->meta_sha256);
    attr_s("source", m->source);
    attr_s("model", m->model);
    attr_s("model_sha256", m->model_sha256);
    attr_s("tokenizer", m->tokenizer);
    attr_s("tool_version", m->tool_version);
    attr_s("git_revision", m->git_revision);
    attr_s("created", m->created);
    attr_s("backend", m->backend);
    attr_s("generator", m->generator);
    attr_s("prompt", m->prompt);
}

/* `s` with control characters (line breaks included) as '?', at most `max` bytes cut back to the
 * start of a UTF-8 character, into buf; *cut says whether anything was left out. */
static const char *shown(const char *s, size_t max, char *buf, size_t len, int *cut)
{
    size_t n = strlen(s);
    if (n > max)
        n = max;
    if (n >= len)
        n = len - 1;
    if (n < strlen(s))
        while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80) /* s[n] continues a character: back up */
            n--;
    if (cut)
        *cut = n < strlen(s);
    for (size_t i = 0; i < n; i++)
        buf[i] = ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) ? '?' : s[i];
    buf[n] = 0;
    return buf;
}

static int info_one(const char *path, int attrs)
{
    kv_trace_t *t;
    if (kv_trace_open(path, &t) != KV_OK)
        return kv_cli_fail("info");
    const kv_trace_meta_t *m = kv_trace_meta(t);
    if (attrs) {
        print_attrs(m);
        kv_trace_close(t);
        return 0;
    }
    uint64_t raw = 0, stored = 0;
    kv_trace_storage(t, &raw, &stored);
    char a[32], b[32];
    printf("%s\n", path);
    printf("  format       %s version %d\n", KV_TRACE_FORMAT,
           m->format_version ? m->format_version : KV_TRACE_FORMAT_VERSION);
    printf("  shape        %d layers, %d heads, %d KV heads (group %d), head_dim %d\n", m->n_layers, m->n_heads,
           m->n_kv_heads, m->n_heads / m->n_kv_heads, m->head_dim);
    printf("  tokens       %d (prompt %d, decode %d)\n", m->n_tokens, m->n_prompt, m->n_tokens - m->n_prompt);
    if (m->n_segments > 0) {
        printf("  segments     %d, starting at token", m->n_segments);
        for (int s = 0; s < m->n_segments && s < 16; s++)
            printf(" %d", m->segments[s]);
        printf("%s\n", m->n_segments > 16 ? " ..." : "");
    } else {
        printf("  segments     none\n");
    }
    printf("  storage      %s, zstd level %d", m->dtype == KV_DTYPE_F16 ? "f16" : "f32", m->zstd_level);
    if (m->dtype == KV_DTYPE_F16)
        printf(", %ld value%s beyond the f16 range", m->f16_overflow, m->f16_overflow == 1 ? "" : "s");
    if (m->nonfinite > 0)
        printf("\n  NaN/inf      %ld value%s stored (replay reports the rows that read them as nan; info --verify "
               "names layers and heads)",
               m->nonfinite, m->nonfinite == 1 ? "" : "s");
    else if (m->nonfinite < 0)
        printf("\n  NaN/inf      not counted by the kvsim that wrote the trace (info --verify counts them)");
    printf("\n  size         %s uncompressed, %s stored, ratio %.2f (layer datasets; summaries included)\n",
           kv_fmt_bytes((double)raw, a, sizeof a), kv_fmt_bytes((double)stored, b, sizeof b),
           stored ? (double)raw / (double)stored : 0.0);
    printf("  summaries    %s", m->has_summaries ? "lse, entropy, accumulated attention" : "none");
    if (m->has_summaries)
        printf(", pooled map %dx%d", m->pool, m->pool);
    printf("\n  statistics   ");
    if (m->has_stats)
        printf("per key over the prompt queries and over [0, %d), per query keys for 90 %%, sink and segment mass "
               "(replay and analyze read them)\n",
               m->stats_split);
    else
        printf("none (replay recomputes them from Q and K: O(T^2) per layer)\n");
    if (m->q_start > 0)
        printf("  lean         queries stored for tokens %d..%d only (the last %d prompt tokens and the decode "
               "tokens)\n",
               m->q_start, m->n_tokens - 1, m->n_prompt - m->q_start);
    printf("  W_O          %s\n", m->has_wo ? "present" : "absent");
    char s1[sizeof m->generator], s2[sizeof m->model], s3[sizeof m->model_sha256], s4[sizeof m->git_revision];
    char s5[sizeof m->created], s6[sizeof m->backend];
    const size_t all = (size_t)-1;
    printf("  source       %s%s%s\n", shown(m->source, all, s2, sizeof s2, NULL), m->generator[0] ? ": " : "",
           shown(m->generator, all, s1, sizeof s1, NULL));
    if (m->model[0])
        printf("  model        %s (dim %d, hidden %d, vocab %d, seq_len %d, rope theta %g)\n  sha256       %s\n",
               shown(m->model, all, s2, sizeof s2, NULL), m->model_dim, m->hidden_dim, m->vocab_size, m->seq_len,
               m->rope_theta, shown(m->model_sha256, all, s3, sizeof s3, NULL));
    if (m->tokenizer[0])
        printf("  tokenizer    %s\n", shown(m->tokenizer, all, s2, sizeof s2, NULL));
    printf("  written by   kvsim %s (git %s), %s, backend %s\n", shown(m->tool_version, all, s1, sizeof s1, NULL),
           shown(m->git_revision, all, s4, sizeof s4, NULL), shown(m->created, all, s5, sizeof s5, NULL),
           m->backend[0] ? shown(m->backend, all, s6, sizeof s6, NULL) : "?");
    if (m->prompt[0]) {
        char p[81];
        int cut;
        shown(m->prompt, 80, p, sizeof p, &cut);
        printf("  prompt       \"%s%s\"\n", p, cut ? "..." : "");
    }
    kv_trace_close(t);
    return 0;
}

/* --verify: every chunk against its checksum, every value against its range. */
static int verify_one(const char *path)
{
    char *report = NULL;
    kv_verify_t v;
    if (kv_trace_verify(path, &report, &v) != KV_OK)
        return kv_cli_fail("info");
    const int bad = v.bad_chunks || v.nonfinite || v.out_of_range;
    printf("  verify       %s: %ld chunk%s of %ld datasets read", bad ? "FAILED" : "sound", v.chunks,
           v.chunks == 1 ? "" : "s", v.datasets);
    if (v.unchecksummed == 0 && v.bad_chunks == 0)
        printf(", every checksum matches");
    else if (v.unchecksummed)
        printf(", %ld without a checksum (written by an older kvsim: their bytes cannot be checked)", v.unchecksummed);
    printf("\n");
    if (!bad)
        printf("               values: no NaN or infinity; summaries within their ranges\n");
    else
        printf("               %ld bad chunk%s, %ld NaN or infinite value%s, %ld summary value%s out of range\n",
               v.bad_chunks, v.bad_chunks == 1 ? "" : "s", v.nonfinite, v.nonfinite == 1 ? "" : "s", v.out_of_range,
               v.out_of_range == 1 ? "" : "s");
    for (char *line = report, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = 0;
        char safe[512];
        printf("               %s\n", shown(line, sizeof safe - 1, safe, sizeof safe, NULL));
        if (!next)
            break;
    }
    kv_free(report);
    if (bad)
        fprintf(stderr, "kvsim info: %s: verification failed (%ld bad chunks, %ld NaN/inf, %ld out of range)\n", path,
                v.bad_chunks, v.nonfinite, v.out_of_range);
    return bad;
}

/* Stale temporary files in the folder of `path` (once per folder): reported, not removed. */
typedef struct {
    long n;
    uint64_t bytes;
} stale_sum_t;

static int add_stale(void *ctx, const kv_out_stale_t *s)
{
    stale_sum_t *sum = ctx;
    sum->n++;
    sum->bytes += s->bytes;
    return 0;
}

static void report_stale(const char *path, char seen[][1024], int *n_seen)
{
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash)
        *(slash == dir ? slash + 1 : slash) = 0;
    else
        snprintf(dir, sizeof dir, ".");
    for (int i = 0; i < *n_seen; i++)
        if (!strcmp(seen[i], dir))
            return;
    if (*n_seen < 16)
        snprintf(seen[(*n_seen)++], 1024, "%s", dir);
    stale_sum_t sum = {0, 0};
    if (kv_out_find_stale(dir, 0, add_stale, &sum) != KV_OK || sum.n == 0)
        return;
    char b[32];
    printf("  stale temps  %ld temporary file%s (%s) in %s left by kvsim processes that died (killed, or a power "
           "loss); kvsim clean %s removes them\n",
           sum.n, sum.n == 1 ? "" : "s", kv_fmt_bytes((double)sum.bytes, b, sizeof b), dir, dir);
}

int kv_cmd_info(int argc, char **argv)
{
    static const struct option opts[] = {
        {"attrs", no_argument, 0, 'a'}, {"verify", no_argument, 0, 'v'}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    int c, attrs = 0, verify = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'a': attrs = 1; break;
        case 'v': verify = 1; break;
        case 'h': help(); return 0;
        default: return kv_cli_bad_option("info", c, argv);
        }
    }
    if (optind >= argc)
        return kv_cli_usage_error("info", "expected a trace file");
    if (attrs && verify)
        return kv_cli_usage_error("info", "--attrs and --verify go separately (--attrs prints only the attributes)");
    int rc = 0, n_seen = 0;
    char seen[16][1024];
    for (int i = optind; i < argc; i++) {
        int r = info_one(argv[i], attrs);
        if (r == 0 && verify)
            r = verify_one(argv[i]);
        if (!attrs)
            report_stale(argv[i], seen, &n_seen);
        rc |= r;
    }
    return rc;
}
