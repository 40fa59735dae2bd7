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
#include "traces/kv_trace.h"

#include <getopt.h>
#include <stdio.h>
#include <string.h>

static void help(void)
{
    printf("usage: kvsim info [--attrs] TRACE.h5 [TRACE.h5 ...]\n"
           "\n"
           "Describe kvsim traces (traces/FORMAT.md): format version, shape, tokens and segments, storage\n"
           "dtype and zstd level, sizes of the layer datasets uncompressed and as stored with their ratio,\n"
           "which summaries and W_O are present, and provenance (source and generator command, model file\n"
           "and its sha256, tokenizer, kvsim version, git revision, date, backend, prompt). Several traces\n"
           "are described one after the other; the exit status is 1 when any of them cannot be read.\n"
           "\n"
           "arguments:\n"
           "  TRACE.h5          a trace written by kvsim capture or kvsim synth\n"
           "\n"
           "options:\n"
           "      --attrs       print the root attributes as name=value lines, under the names of\n"
           "                    traces/FORMAT.md (default: the human-readable summary)\n"
           "  -h, --help        this help\n"
           "\n"
           "example:\n"
           "  kvsim info out/demo/trace.h5\n");
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

int kv_cmd_info(int argc, char **argv)
{
    static const struct option opts[] = {{"attrs", no_argument, 0, 'a'}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    int c, attrs = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'a': attrs = 1; break;
        case 'h': help(); return 0;
        default: return kv_cli_bad_option("info", c, argv);
        }
    }
    if (optind >= argc)
        return kv_cli_usage_error("info", "expected a trace file");
    int rc = 0;
    for (int i = optind; i < argc; i++)
        rc |= info_one(argv[i], attrs);
    return rc;
}
