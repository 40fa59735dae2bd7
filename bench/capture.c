/*
 * bench/capture.c: `make bench-capture`. Figures are printed, never asserted.
 *
 *  1. Prefill throughput on the CPU path: all prompt tokens in one batch (matrix-matrix products)
 *     against the same prefill run one token at a time through decode (matrix-vector products, the
 *     way a minimal llama2.c-style program runs a prompt), and their ratio. Both compute the logits
 *     of the last token only, so they do the same work. Models: the real stories260K (512 tokens,
 *     its whole context) when ../shared has it, and a random-weight checkpoint at the stories110M
 *     shape (dim 768, 12 layers, 12 heads, 12 KV heads, hidden 2048, vocab 32000, 1024 tokens) that
 *     this program writes into build/ (once; reused while its size matches).
 *  2. Peak memory of a capture, measured in a child process (fork) so the parent's own buffers do
 *     not count, next to the bound it must respect: model + KV cache + one layer of trace buffers
 *     (+ activations, decode queries and summaries, all listed).
 *
 *  3. SmolLM2-135M-Instruct (the GGUF Q4_1 file of ../shared/models), a 2048-token prompt (the
 *     TinyStories sample): kvsim against transformers' forward pass (fp32, sdpa; torch on the same
 *     threads), measured side by side: bench/transformers_prefill.py keeps the model loaded in a child
 *     process and runs the forward pass whenever asked, between kvsim's runs, so both see the same
 *     load; medians of KV_BENCH_REPS (default 3) interleaved rounds. kvsim is timed three ways: the
 *     forward pass alone (weights as stored), the forward pass with the trace statistics (no file),
 *     and the capture prefill (statistics, prompt slabs written by the writer thread); the difference
 *     gives the time split (forward, summaries, compression and writing from the capture's own
 *     accounting). The matrix products of the forward pass (matmul_w, timed through a wrapper of the
 *     backend's op table) are set against OpenBLAS sgemm's rate on a 4096^3 product on the same
 *     threads. Skipped with a message when the model, torch or transformers is missing.
 *  4. The Llama-3-8B shape with random BF16 weights (kvsim synth-model), a 2048-token prompt and 16
 *     decode tokens: wall time, tokens/s and the peak RSS of `kvsim capture` run as a child process
 *     (wait4's ru_maxrss, what /usr/bin/time -v reports), against the goal of the BF16 weights plus
 *     2 GiB. Opt-in: the checkpoint is 16 GB, so it runs when KV_BENCH_8B_DIR names the folder that
 *     holds it or shall (written there when absent, after checking disk space and memory).
 *
 * Environment: KV_BENCH_TBT_TOKENS limits the token-by-token run of the 110M-shape model (default
 * all 1024: about a minute on 2 cores, it is memory-bound); KV_THREADS sets the CPU threads;
 * KV_BENCH_ONLY=memory,throughput,smollm2,8b runs those sections only; KV_BENCH_REPS; KV_BENCH_8B_DIR.
 */
#include "kernels/kv_backend.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/common/kv_output.h"
#include "sim/common/kv_rng.h"
#include "traces/capture/kv_capture.h"
#include "traces/capture/kv_eval.h"
#include "traces/capture/kv_forward.h"
#include "traces/capture/kv_model.h"
#include "traces/capture/kv_model_write.h"
#include "traces/capture/kv_tokenizer.h"
#include "traces/kv_zstd_filter.h"

#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#define BIG_PATH "build/bench-stories110M-shape-random.bin"

static const char *shared_path(const char *rel, char *buf, size_t len)
{
    const char *roots[] = {getenv("KVSIM_SHARED"), "../shared", "."};
    for (size_t i = 0; i < KV_ARRAY_LEN(roots); i++) {
        if (!roots[i])
            continue;
        snprintf(buf, len, "%s/%s", roots[i], rel);
        if (access(buf, R_OK) == 0)
            return buf;
    }
    return NULL;
}

static size_t current_rss(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long pages = 0, res = 0;
    if (f) {
        if (fscanf(f, "%ld %ld", &pages, &res) != 2)
            res = 0;
        fclose(f);
    }
    return (size_t)res * (size_t)sysconf(_SC_PAGESIZE);
}

static const char *mib(double bytes, char *buf, size_t len)
{
    snprintf(buf, len, "%.1f MiB", bytes / 1048576.0);
    return buf;
}

/* Random-weight llama2.c v0 checkpoint (shared classifier): N(0, 0.02) weights, unit norms. */
static int write_random_checkpoint(const char *path, int dim, int hidden, int layers, int heads, int kv_heads,
                                   int vocab, int seq_len)
{
    const size_t L = (size_t)layers, D = (size_t)dim, H = (size_t)hidden, KV = (size_t)(dim / heads * kv_heads);
    const size_t hd = D / (size_t)heads;
    /* order: emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, freq_cis (2 x seq_len x hd/2) */
    const struct {
        size_t n;
        int norm;
    } t[] = {{(size_t)vocab * D, 0}, {L * D, 1},     {L * D * D, 0}, {L * KV * D, 0},
             {L * KV * D, 0},        {L * D * D, 0}, {L * D, 1},     {L * H * D, 0},
             {L * D * H, 0},         {L * H * D, 0}, {D, 1},         {(size_t)seq_len * hd, 1}};
    size_t total = 28;
    for (size_t i = 0; i < KV_ARRAY_LEN(t); i++)
        total += 4 * t[i].n;
    struct stat st;
    if (stat(path, &st) == 0 && (size_t)st.st_size == total)
        return KV_OK; /* written by an earlier run */
    kv_out_t *o;      /* through the output module: a killed run leaves no short checkpoint under the name */
    int rc = kv_out_open(path, &o);
    if (rc)
        return rc;
    FILE *f = kv_out_stream(o);
    if (!f) {
        kv_out_abort(o);
        return KV_ENOMEM;
    }
    int32_t hdr[7] = {dim, hidden, layers, heads, kv_heads, vocab, seq_len};
    fwrite(hdr, sizeof hdr, 1, f);
    enum { CH = 1 << 20 };
    float *buf = malloc(sizeof(float) * CH);
    kv_rng_t r;
    kv_rng_seed(&r, 110);
    for (size_t i = 0; i < KV_ARRAY_LEN(t); i++)
        for (size_t done = 0; done < t[i].n;) {
            size_t n = KV_MIN((size_t)CH, t[i].n - done);
            for (size_t k = 0; k < n; k++)
                buf[k] = t[i].norm ? 1.0f : 0.02f * (float)kv_rng_normal(&r);
            fwrite(buf, sizeof(float), n, f);
            done += n;
        }
    free(buf);
    return kv_out_commit(o);
}

typedef struct {
    double prefill_tps, tbt_tps;
    int n, n_tbt;
} speed_t;

/* Best of `reps` batched prefills, then one token-by-token run over the first n_tbt tokens. */
static int measure(const kv_model_t *m, kv_backend_t *be, const int32_t *tok, int n, int n_tbt, int reps, speed_t *s)
{
    float *lg = malloc(sizeof(float) * (size_t)m->cfg.vocab_size);
    kv_fwd_t *f = NULL;
    int rc = kv_fwd_create(m, be, n, n, &f);
    double best = 1e30;
    for (int r = 0; rc == KV_OK && r < reps; r++) {
        double t0 = kv_now();
        rc = kv_fwd_run(f, tok, n, 0, lg, 0, NULL, NULL);
        double el = kv_now() - t0;
        best = el < best ? el : best;
    }
    kv_fwd_free(f);
    f = NULL;
    if (rc == KV_OK)
        rc = kv_fwd_create(m, be, n, 1, &f);
    double t0 = kv_now();
    for (int t = 0; rc == KV_OK && t < n_tbt; t++)
        rc = kv_fwd_run(f, tok + t, 1, t, t == n_tbt - 1 ? lg : NULL, 0, NULL, NULL);
    double tbt = kv_now() - t0;
    kv_fwd_free(f);
    free(lg);
    s->n = n;
    s->n_tbt = n_tbt;
    s->prefill_tps = n / best;
    s->tbt_tps = n_tbt / tbt;
    return rc;
}

static void print_speed(const char *name, const speed_t *s)
{
    printf("  %-34s prefill %5d tokens: %9.0f tok/s | token by token %5d tokens: %8.0f tok/s | ratio %.1fx\n", name,
           s->n, s->prefill_tps, s->n_tbt, s->tbt_tps, s->prefill_tps / s->tbt_tps);
}

/* A capture in a child process; its peak RSS and timings come back through a pipe. */
static int capture_in_child(const kv_capture_opts_t *o, kv_capture_result_t *r, size_t *rss_start)
{
    int fd[2];
    if (pipe(fd) != 0)
        return kv_error(KV_EIO, "pipe failed");
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        close(fd[0]);
        struct {
            int rc;
            size_t rss0;
            kv_capture_result_t r;
            char msg[512];
        } out;
        memset(&out, 0, sizeof out);
        out.rss0 = kv_peak_rss();
        out.rc = kv_capture_run(o, &out.r);
        snprintf(out.msg, sizeof out.msg, "%s", kv_last_error());
        if (write(fd[1], &out, sizeof out) != (ssize_t)sizeof out)
            _exit(2);
        _exit(0);
    }
    close(fd[1]);
    struct {
        int rc;
        size_t rss0;
        kv_capture_result_t r;
        char msg[512];
    } in;
    ssize_t got = read(fd[0], &in, sizeof in);
    close(fd[0]);
    int st;
    waitpid(pid, &st, 0);
    if (got != (ssize_t)sizeof in)
        return kv_error(KV_EINTERNAL, "capture child died");
    if (in.rc != KV_OK)
        return kv_error(in.rc, "%s", in.msg);
    *r = in.r;
    *rss_start = in.rss0;
    return KV_OK;
}

/* The text of the sample, repeated until it encodes to at least n tokens. */
static char *prompt_of(const char *sample, const kv_tokenizer_t *tok, int n)
{
    FILE *f = fopen(sample, "rb");
    if (!f)
        return NULL;
    char one[8192];
    size_t len = fread(one, 1, sizeof one - 1, f);
    fclose(f);
    one[len] = 0;
    for (char *p; (p = strstr(one, KV_DOC_SEPARATOR));) /* one long document */
        memset(p, ' ', strlen(KV_DOC_SEPARATOR));
    char *s = calloc(1, 1);
    size_t sl = 0;
    for (;;) {
        int32_t *ids;
        int m = 0;
        if (kv_tokenizer_encode(tok, s, sl, 1, 0, &ids, &m) != KV_OK)
            return s;
        kv_free(ids);
        if (m >= n)
            break;
        char *g = realloc(s, sl + len + 1);
        if (!g)
            return s;
        s = g;
        memcpy(s + sl, one, len + 1);
        sl += len;
    }
    /* cut back by characters until the prompt is at most n tokens */
    for (;;) {
        int32_t *ids;
        int m = 0;
        kv_tokenizer_encode(tok, s, sl, 1, 0, &ids, &m);
        kv_free(ids);
        if (m <= n)
            break;
        sl -= (size_t)KV_MAX(1, (m - n) * 2);
        s[sl] = 0;
    }
    return s;
}

static void bound_report(const kv_model_t *m, int n_prompt, int n_decode, int pool, size_t rss0,
                         const kv_capture_result_t *r)
{
    const kv_model_config_t *c = &m->cfg;
    const double T = n_prompt + n_decode, L = c->n_layers, H = c->n_heads, f = 4;
    const double P = KV_MIN(pool, (int)T);
    const double model = (double)m->weight_bytes;
    const double cache = 2 * L * T * c->kv_dim * f;
    /* one layer of the slab writer's Q, K, V (token-major) and its head-major staging, the per-key
     * statistics; activations x, xb (dim) and q, att (q_dim), hb, hb2 (hidden) */
    const double layer = n_prompt * (2.0 * c->q_dim + 2.0 * c->kv_dim) * f + 6 * H * T * f;
    const double act =
        n_prompt * (2.0 * c->dim + 2.0 * c->q_dim + 2.0 * c->hidden_dim + H) * f + 64.0 * c->vocab_size * f;
    const double dec = L * n_decode * c->q_dim * f;
    const double summ = L * H * (5 * T + P * P) * f;
    char a[32], b[32], d[32], e[32], g[32], h[32], i[32], j[32], mem[512];
    printf("    peak RSS %s (process before the capture %s, capture's own %s)\n", mib((double)r->peak_rss, a, 32),
           mib((double)rss0, b, 32), mib((double)r->peak_rss - (double)rss0, d, 32));
    printf("    bound: model %s + KV cache %s + one layer of trace buffers %s = %s\n", mib(model, e, 32),
           mib(cache, g, 32), mib(layer, h, 32), mib(model + cache + layer, i, 32));
    printf("    plus activations %s, decode queries %s, summaries %s: total %s\n", mib(act, a, 32), mib(dec, b, 32),
           mib(summ, d, 32), mib(model + cache + layer + act + dec + summ, j, 32));
    printf("    the capture's own account: %s\n", kv_capture_memory_text(r, mem, sizeof mem));
    printf("    capture timings: prefill %.2fs (%.0f tok/s incl. summaries and slab writes), decode %.2fs, write "
           "%.2fs\n",
           r->prefill_s, n_prompt / r->prefill_s, r->decode_s, r->write_s);
}

static int want(const char *section)
{
    const char *only = getenv("KV_BENCH_ONLY");
    if (!only || !*only)
        return strcmp(section, "8b") || getenv("KV_BENCH_8B_DIR");
    const size_t n = strlen(section);
    for (const char *p = only; (p = strstr(p, section)); p += n)
        if ((p == only || p[-1] == ',') && (p[n] == ',' || !p[n]))
            return 1;
    return 0;
}

static int cmp_dbl(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *x, int n)
{
    qsort(x, (size_t)n, sizeof *x, cmp_dbl);
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

static void print_runs(const double *x, int n)
{
    printf("(");
    for (int i = 0; i < n; i++)
        printf("%s%.2f", i ? " " : "", x[i]);
    printf(")");
}

/* ---- the matrix products of a forward pass, timed through a wrapper of the op table ---- */

static const kv_backend_ops_t *g_inner;
static double g_mm_s, g_mm_flop;

static int timed_matmul_w(kv_backend_t *be, float *y, const float *x, const kv_weight_t *w, int M)
{
    const double t0 = kv_now();
    int rc = g_inner->matmul_w(be, y, x, w, M);
    g_mm_s += kv_now() - t0;
    g_mm_flop += 2.0 * M * w->rows * w->cols;
    return rc;
}

/* OpenBLAS sgemm on n x n x n with its own threads (n_threads): the best of `tries`, FLOP/s. */
static double sgemm_peak(int n, int n_threads, int tries)
{
    float *a = kv_malloc_aligned(sizeof(float) * (size_t)n * n, "a"),
          *b = kv_malloc_aligned(sizeof(float) * n * n, "b"),
          *c = kv_malloc_aligned(sizeof(float) * (size_t)n * n, "c");
    for (size_t i = 0; i < (size_t)n * n; i++)
        a[i] = (float)(i % 7) * 0.1f, b[i] = (float)(i % 5) * 0.1f;
    const int old = kv_blas_set_threads(n_threads);
    double best = 1e30;
    for (int r = 0; r < tries; r++) {
        const double t0 = kv_now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        best = KV_MIN(best, kv_now() - t0);
    }
    kv_blas_set_threads(old);
    kv_free_aligned(a), kv_free_aligned(b), kv_free_aligned(c);
    return 2.0 * n * (double)n * n / best;
}

/* ---- transformers in a child process ---- */

typedef struct {
    pid_t pid;
    FILE *to, *from;
    char versions[128];
} py_t;

static int py_start(py_t *p, const char *model, const char *ids, int threads)
{
    int in[2], out[2];
    memset(p, 0, sizeof *p);
    if (pipe(in) || pipe(out))
        return 0;
    fflush(stdout);
    p->pid = fork();
    if (p->pid == 0) {
        dup2(in[0], 0), dup2(out[1], 1);
        close(in[1]), close(out[0]);
        char th[16];
        snprintf(th, sizeof th, "%d", threads);
        setenv("TQDM_DISABLE", "1", 1); /* the gguf loader's progress bars */
        setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1", 1);
        execlp("python3", "python3", "bench/transformers_prefill.py", model, ids, th, (char *)NULL);
        _exit(127);
    }
    close(in[0]), close(out[1]);
    p->to = fdopen(in[1], "w");
    p->from = fdopen(out[0], "r");
    char line[256];
    if (!p->from || !fgets(line, sizeof line, p->from) || strncmp(line, "ready ", 6)) {
        int st;
        if (p->to)
            fclose(p->to);
        if (p->from)
            fclose(p->from);
        waitpid(p->pid, &st, 0);
        return 0;
    }
    line[strcspn(line, "\n")] = 0;
    snprintf(p->versions, sizeof p->versions, "%s", line + 6);
    return 1;
}

static double py_run(py_t *p)
{
    char line[64];
    fputs("run\n", p->to);
    fflush(p->to);
    if (!fgets(line, sizeof line, p->from))
        return NAN;
    return atof(line);
}

static void py_stop(py_t *p)
{
    int st;
    fputs("quit\n", p->to);
    fclose(p->to);
    fclose(p->from);
    waitpid(p->pid, &st, 0);
}

/* ---- statistics without a trace (the capture's attn_stats outputs, for the time split) ---- */

typedef struct {
    int T, H, n_prompt, pool;
    float *col[6], *row[4], *pooled;
    int32_t *seg_lo;
} stats_bufs_t;

static int bench_stats(void *ctx, int l, int n, int p0, kv_attn_stats_args_t *a)
{
    stats_bufs_t *s = ctx;
    (void)l, (void)n;
    const int prefill = p0 < s->n_prompt;
    for (int k = 0; k < 6 && prefill; k++)
        memset(s->col[k], 0, sizeof(float) * (size_t)s->H * s->T);
    a->entropy = s->row[0], a->keys_mass = s->row[1], a->sink = s->row[2], a->seg = s->row[3];
    a->mass = (float)KV_TRACE_KEYS_MASS;
    a->acc = prefill ? s->col[0] : NULL, a->acc_sq = prefill ? s->col[1] : NULL,
    a->acc_max = prefill ? s->col[2] : NULL;
    a->acc_head = prefill ? s->col[3] : NULL, a->acc_sq_head = prefill ? s->col[4] : NULL;
    a->acc_max_head = prefill ? s->col[5] : NULL;
    a->acc_stride = (size_t)s->T;
    a->head_end = KV_MAX(0, s->n_prompt - KV_TRACE_DEFAULT_STATS_TAIL);
    a->pooled = s->pooled, a->pool = s->pool, a->pool_T = s->T;
    a->seg_lo = s->seg_lo;
    return KV_OK;
}

/* The first n ids of the TinyStories sample (repeated) under tok, into a file; NULL when unavailable. */
static int32_t *sample_ids(const char *sample, const kv_tokenizer_t *tok, int n, const char *path)
{
    char *prompt = prompt_of(sample, tok, n + 64);
    int32_t *ids = NULL;
    int np = 0;
    if (!prompt || kv_tokenizer_encode(tok, prompt, strlen(prompt), tok->add_bos, 0, &ids, &np) != KV_OK || np < n) {
        free(prompt);
        kv_free(ids);
        return NULL;
    }
    free(prompt);
    FILE *f = fopen(path, "w");
    if (!f) {
        kv_free(ids);
        return NULL;
    }
    for (int i = 0; i < n; i++)
        fprintf(f, "%d%c", ids[i], i + 1 < n ? ' ' : '\n');
    fclose(f);
    return ids;
}

static void bench_smollm2(const char *sample, int reps)
{
    char mp[512];
    const int n = 2048;
    const char *ids_path = "build/bench-smollm2-ids.txt";
    printf("\nSmolLM2-135M-Instruct (GGUF Q4_1), %d-token prompt: kvsim against transformers, side by side\n", n);
    if (!shared_path("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf", mp, sizeof mp) || !sample) {
        printf("  skipped: models/SmolLM2-135M-Instruct or data/tinystories_sample.txt not found\n");
        return;
    }
    kv_model_t *m = NULL;
    kv_tokenizer_t *tok = NULL;
    kv_backend_t *be = NULL;
    kv_fwd_t *f = NULL;
    int32_t *ids = NULL;
    float *lg = NULL;
    stats_bufs_t sb;
    memset(&sb, 0, sizeof sb);
    if (kv_model_load(mp, &m) || kv_tokenizer_load(mp, 0, &tok) || kv_backend_open("cpu", 0, &be)) {
        printf("  failed: %s\n", kv_last_error());
        goto done;
    }
    if (!(ids = sample_ids(sample, tok, n, ids_path))) {
        printf("  skipped: could not make a %d-token prompt\n", n);
        goto done;
    }
    py_t py;
    if (!py_start(&py, mp, ids_path, be->n_threads)) {
        printf("  skipped: transformers' side did not start (python3 with torch, transformers and gguf is needed: "
               "python3 bench/transformers_prefill.py %s %s %d)\n",
               mp, ids_path, be->n_threads);
        goto done;
    }
    /* the op table with matmul_w timed */
    static kv_backend_ops_t wrapped;
    g_inner = be->ops;
    wrapped = *be->ops;
    wrapped.matmul_w = timed_matmul_w;
    be->ops = &wrapped;
    const kv_model_config_t *c = &m->cfg;
    sb.T = n, sb.H = c->n_heads, sb.n_prompt = n, sb.pool = KV_MIN(KV_TRACE_DEFAULT_POOL, n);
    int nomem = 0;
    for (int k = 0; k < 6; k++)
        nomem |= !(sb.col[k] = kv_malloc(sizeof(float) * (size_t)sb.H * n, "stats"));
    for (int k = 0; k < 4; k++)
        nomem |= !(sb.row[k] = kv_malloc(sizeof(float) * (size_t)sb.H * n, "stats"));
    nomem |= !(sb.pooled = kv_calloc((size_t)sb.H * sb.pool * sb.pool, sizeof(float), "pooled"));
    nomem |= !(sb.seg_lo = kv_calloc((size_t)n, sizeof(int32_t), "seg_lo"));
    lg = malloc(sizeof(float) * (size_t)c->vocab_size);
    if (nomem || !lg || kv_fwd_create(m, be, n, n, &f) != KV_OK) {
        printf("  failed: %s\n", kv_last_error());
        py_stop(&py);
        goto done;
    }
    double t_py[16], t_fwd[16], t_stats[16], t_cap[16], t_comp[16], t_write[16], t_wait[16], mm_s[16], peaks[16];
    double mm_flop = 0;
    reps = KV_MAX(1, KV_MIN(reps, 16));
    for (int r = 0; r < reps; r++) {
        t_py[r] = py_run(&py);
        peaks[r] = sgemm_peak(4096, be->n_threads, 1); /* in every round: the same load as the products */
        /* the forward pass alone */
        kv_fwd_set_stats(f, NULL, NULL);
        g_mm_s = g_mm_flop = 0;
        double t0 = kv_now();
        kv_fwd_run(f, ids, n, 0, lg, 0, NULL, NULL);
        t_fwd[r] = kv_now() - t0;
        mm_s[r] = g_mm_s;
        mm_flop = g_mm_flop;
        /* with the trace statistics */
        kv_fwd_set_stats(f, bench_stats, &sb);
        t0 = kv_now();
        kv_fwd_run(f, ids, n, 0, lg, 0, NULL, NULL);
        t_stats[r] = kv_now() - t0;
        /* the capture */
        kv_capture_opts_t o;
        kv_capture_opts_init(&o);
        o.model_path = mp, o.ids = ids, o.n_ids = n, o.n_decode = 0, o.backend = "cpu";
        o.out_path = "build/bench-smollm2.h5";
        kv_capture_result_t cr;
        if (kv_capture_run(&o, &cr) != KV_OK) {
            printf("  capture failed: %s\n", kv_last_error());
            py_stop(&py);
            goto done;
        }
        t_cap[r] = cr.prefill_s, t_comp[r] = cr.compress_s, t_wait[r] = cr.writer_wait_s;
        t_write[r] = cr.writer_busy_s; /* wall time of the writer thread; compress_s is CPU time on all threads */
        unlink(o.out_path);
    }
    py_stop(&py);
    const double peak = median(peaks, reps);
    double runs_py[16], runs_cap[16], runs_fwd[16];
    memcpy(runs_py, t_py, sizeof(double) * reps), memcpy(runs_cap, t_cap, sizeof(double) * reps);
    memcpy(runs_fwd, t_fwd, sizeof(double) * reps);
    const double py_m = median(t_py, reps), fwd = median(t_fwd, reps), st = median(t_stats, reps);
    const double cap = median(t_cap, reps), comp = median(t_comp, reps), wr = median(t_write, reps);
    const double wait = median(t_wait, reps), mm = median(mm_s, reps);
    printf("  %s, medians of %d rounds (transformers, forward, forward + statistics, capture, interleaved)\n",
           be->device, reps);
    printf("  %s, fp32, sdpa, %d threads, forward pass: %.2f s ", py.versions, be->n_threads, py_m);
    print_runs(runs_py, reps);
    printf("\n  kvsim forward pass (weights as stored, Q4_1):                %.2f s ", fwd);
    print_runs(runs_fwd, reps);
    printf("  transformers / kvsim: %.2fx\n", py_m / fwd);
    printf("  kvsim forward pass + trace statistics (no file):           %.2f s\n", st);
    printf("  kvsim capture prefill (statistics, slabs written alongside): %.2f s ", cap);
    print_runs(runs_cap, reps);
    printf("  transformers / kvsim: %.2fx (goal: 1.5x)\n", py_m / cap);
    printf("  time split of the capture prefill: forward pass %.2f s, summaries (statistics) %.2f s, the rest %.2f s "
           "(trace\n    hand-over and the last layer's write); alongside it the writer thread was busy %.2f s "
           "(f16 conversion, zstd on\n    every core, HDF5) with %.2f s of zstd CPU time, and the forward pass waited "
           "%.2f s for it\n",
           fwd, st - fwd, cap - st, wr, comp, wait);
    printf(
        "  matrix products (matmul_w, every layer's 7 projections and the logits): %.1f GFLOP in %.2f s = %.1f "
        "GFLOP/s,\n    %.0f %% of OpenBLAS sgemm's %.1f GFLOP/s (4096^3, %d threads, in each round) on this machine (goal: "
        "70 %%)\n",
        mm_flop / 1e9, mm, mm_flop / mm / 1e9, 100.0 * (mm_flop / mm) / peak, peak / 1e9, be->n_threads);
done:
    if (be && be->ops != g_inner && g_inner)
        be->ops = g_inner;
    for (int k = 0; k < 6; k++)
        kv_free(sb.col[k]);
    for (int k = 0; k < 4; k++)
        kv_free(sb.row[k]);
    kv_free(sb.pooled);
    kv_free(sb.seg_lo);
    free(lg);
    kv_fwd_free(f);
    kv_backend_close(be);
    kv_free(ids);
    kv_tokenizer_free(tok);
    kv_model_free(m);
}

/* ---- the Llama-3-8B shape ---- */

static size_t mem_available(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    size_t kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %zu kB", &kb) == 1)
            break;
    if (f)
        fclose(f);
    return kb * 1024;
}

static void bench_8b(void)
{
    const char *dir = getenv("KV_BENCH_8B_DIR");
    const int n = 2048, n_decode = 16;
    printf("\nLlama-3-8B shape, random BF16 weights, %d-token prompt + %d decode tokens (kvsim capture, a child "
           "process)\n",
           n, n_decode);
    if (!dir || !*dir) {
        printf("  skipped: set KV_BENCH_8B_DIR to a folder for the 16 GB checkpoint (written there when absent)\n");
        return;
    }
    kv_model_write_opts_t o;
    kv_model_write_preset("llama3-8b", &o);
    char cfg[1100];
    snprintf(cfg, sizeof cfg, "%s/config.json", dir);
    if (access(cfg, R_OK) != 0) {
        printf("  writing the checkpoint: kvsim synth-model --preset llama3-8b -o %s\n", dir);
        fflush(stdout);
        kv_model_write_result_t wr;
        if (kv_model_write_random(&o, dir, &wr) != KV_OK) {
            printf("  skipped: %s\n", kv_last_error());
            return;
        }
        printf("  %.2f B parameters, %.2f GB in %d files, %.0f s\n", wr.n_params / 1e9, wr.bytes / 1e9, wr.n_shards,
               wr.seconds);
    }
    kv_model_t *m;
    if (kv_model_load(dir, &m) != KV_OK) {
        printf("  skipped: %s\n", kv_last_error());
        return;
    }
    const double wbytes = (double)m->weight_bytes, goal = wbytes + 2.0 * 1073741824.0;
    kv_model_free(m);
    if ((double)mem_available() < wbytes + 1073741824.0)
        printf("  warning: %.1f GiB of memory available for %.1f GiB of weights: pages will be read again from "
               "disk\n",
               mem_available() / 1073741824.0, wbytes / 1073741824.0);
    const char *ids_path = "build/bench-8b-ids.txt", *out = "build/bench-8b.h5";
    FILE *f = fopen(ids_path, "w");
    kv_rng_t r;
    kv_rng_seed(&r, 8);
    for (int i = 0; i < n && f; i++)
        fprintf(f, "%d%c", (int)kv_rng_below(&r, 128000), i + 1 < n ? ' ' : '\n');
    if (f)
        fclose(f);
    char nd[16];
    snprintf(nd, sizeof nd, "%d", n_decode);
    printf("  command: build/kvsim capture %s --ids %s --decode %s -o %s\n", dir, ids_path, nd, out);
    fflush(stdout);
    const double t0 = kv_now();
    pid_t pid = fork();
    if (pid == 0) {
        execl("build/kvsim", "kvsim", "capture", dir, "--ids", ids_path, "--decode", nd, "-o", out, "-q", (char *)NULL);
        _exit(127);
    }
    int st = 0;
    struct rusage ru;
    memset(&ru, 0, sizeof ru);
    wait4(pid, &st, 0, &ru);
    const double wall = kv_now() - t0, rss = (double)ru.ru_maxrss * 1024.0;
    if (!WIFEXITED(st) || WEXITSTATUS(st)) {
        printf("  capture failed (status %d)\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
        return;
    }
    printf("  wall %.1f s for %d tokens (%.2f tokens/s overall); peak RSS %.2f GiB (wait4 ru_maxrss), goal <= BF16 "
           "weights %.2f GiB + 2 GiB = %.2f GiB: %s\n",
           wall, n + n_decode, (n + n_decode) / wall, rss / 1073741824.0, wbytes / 1073741824.0, goal / 1073741824.0,
           rss <= goal ? "met" : "NOT met");
    struct stat sst;
    if (stat(out, &sst) == 0)
        printf("  trace file %.2f GiB\n", sst.st_size / 1073741824.0);
    unlink(out);
}

int main(int argc, char **argv)
{
    (void)argc;
    kv_omp_passive_reexec(argv); /* as the kvsim command does; transformers' child inherits it too */
    char mpath[512], tpath[512], spath[512], t32[512];
    const int have260 = shared_path("models/stories260K/stories260K.bin", mpath, sizeof mpath) &&
                        shared_path("models/stories260K/tok512.bin", tpath, sizeof tpath);
    const char *sample = shared_path("data/tinystories_sample.txt", spath, sizeof spath);
    const char *tok32 = shared_path("models/llama2c-tokenizer-32k/tokenizer.bin", t32, sizeof t32);
    kv_log_set_level(KV_LOG_QUIET);
    mkdir("build", 0755);
    const size_t rss_start = current_rss();
    int rc;
    printf("kvsim bench-capture (CPU path)\n");

    const char *reps_env = getenv("KV_BENCH_REPS");
    const int reps = reps_env && atoi(reps_env) > 0 ? atoi(reps_env) : 3;
    const int need_big = want("memory") || want("throughput");
    /* 110M-shape checkpoint first (streamed to disk: the parent stays small for the fork below) */
    const double t0 = kv_now();
    if (need_big && (rc = write_random_checkpoint(BIG_PATH, 768, 2048, 12, 12, 12, 32000, 1024))) {
        fprintf(stderr, "bench-capture: %s\n", kv_last_error());
        return 1;
    }
    if (need_big)
        printf("  random-weight checkpoint %s ready (%.1fs)\n", BIG_PATH, kv_now() - t0);

    /* ---- peak memory of captures, each in a child process ---- */
    if (want("memory"))
        printf("\npeak memory of a capture (child process; baseline RSS of this program %.1f MiB: linked libraries)\n",
               rss_start / 1048576.0);
    struct {
        const char *name, *model, *tok;
        int n_prompt, n_decode;
    } caps[] = {
        {"stories260K", have260 ? mpath : NULL, tpath, 448, 64},
        {"stories110M shape (random)", BIG_PATH, tok32, 960, 64},
    };
    for (size_t ci = 0; ci < KV_ARRAY_LEN(caps) && want("memory"); ci++) {
        if (!caps[ci].model || !caps[ci].tok || !sample) {
            printf("  %s: skipped (model, tokenizer or data/tinystories_sample.txt not found)\n", caps[ci].name);
            continue;
        }
        kv_model_t *m;
        kv_tokenizer_t *tok;
        if (kv_model_load(caps[ci].model, &m) != KV_OK || kv_tokenizer_load(caps[ci].tok, 0, &tok) != KV_OK) {
            fprintf(stderr, "bench-capture: %s\n", kv_last_error());
            return 1;
        }
        char *prompt = prompt_of(sample, tok, caps[ci].n_prompt);
        int32_t *ids;
        int np = 0;
        kv_tokenizer_encode(tok, prompt, strlen(prompt), 1, 0, &ids, &np);
        kv_free(ids);
        kv_tokenizer_free(tok);
        kv_capture_opts_t o;
        kv_capture_opts_init(&o);
        o.model_path = caps[ci].model;
        o.tokenizer_path = caps[ci].tok;
        o.prompt = prompt;
        o.out_path = "build/bench-capture.h5";
        o.n_decode = caps[ci].n_decode;
        o.backend = "cpu";
        kv_capture_result_t r;
        memset(&r, 0, sizeof r);
        size_t rss0 = 0;
        printf("  %s: %d prompt + %d decode tokens, f16, %d layers\n", caps[ci].name, np, o.n_decode, m->cfg.n_layers);
        if ((rc = capture_in_child(&o, &r, &rss0)) != KV_OK)
            printf("    capture failed: %s\n", kv_last_error());
        else
            bound_report(m, np, o.n_decode, o.pool, rss0, &r);
        struct stat st;
        if (stat(o.out_path, &st) == 0)
            printf("    trace file %.1f MiB\n", st.st_size / 1048576.0);
        unlink(o.out_path);
        free(prompt);
        kv_model_free(m);
    }

    /* ---- throughput ---- */
    if (want("smollm2"))
        bench_smollm2(sample, reps);
    if (want("8b"))
        bench_8b();
    if (!want("throughput"))
        return 0;
    kv_backend_t *be;
    if (kv_backend_open("cpu", 0, &be) != KV_OK) {
        fprintf(stderr, "bench-capture: %s\n", kv_last_error());
        return 1;
    }
    printf("\nprefill throughput (%s)\n", be->device);
    if (have260) {
        kv_model_t *m;
        kv_tokenizer_t *tok;
        if (kv_model_load(mpath, &m) == KV_OK && kv_tokenizer_load(tpath, 512, &tok) == KV_OK) {
            const int n = m->cfg.seq_len;
            int32_t *ids = NULL;
            int np = 0;
            char *prompt = sample ? prompt_of(sample, tok, n) : NULL;
            int32_t *tk = malloc(sizeof(int32_t) * (size_t)n);
            if (prompt)
                kv_tokenizer_encode(tok, prompt, strlen(prompt), 1, 0, &ids, &np);
            kv_rng_t rr;
            kv_rng_seed(&rr, 5);
            for (int i = 0; i < n; i++)
                tk[i] = i < np ? ids[i] : (i == 0 ? KV_BOS : 3 + (int32_t)kv_rng_below(&rr, 509));
            speed_t s;
            if (measure(m, be, tk, n, n, 5, &s) == KV_OK)
                print_speed("stories260K", &s);
            kv_free(ids);
            free(tk);
            free(prompt);
            kv_tokenizer_free(tok);
            kv_model_free(m);
        }
    } else {
        printf("  stories260K: skipped (not found under $KVSIM_SHARED, ../shared or .)\n");
    }
    {
        kv_model_t *m;
        if (kv_model_load(BIG_PATH, &m) != KV_OK) {
            fprintf(stderr, "bench-capture: %s\n", kv_last_error());
            return 1;
        }
        const int n = 1024;
        int n_tbt = n;
        const char *env = getenv("KV_BENCH_TBT_TOKENS");
        if (env && atoi(env) > 0)
            n_tbt = KV_MIN(n, atoi(env));
        int32_t *tk = malloc(sizeof(int32_t) * n);
        kv_rng_t rr;
        kv_rng_seed(&rr, 6);
        tk[0] = KV_BOS;
        for (int i = 1; i < n; i++)
            tk[i] = 3 + (int32_t)kv_rng_below(&rr, 31997);
        speed_t s;
        if (measure(m, be, tk, n, n_tbt, 2, &s) == KV_OK)
            print_speed("stories110M shape (random weights)", &s);
        else
            printf("  110M shape failed: %s\n", kv_last_error());
        free(tk);
        kv_model_free(m);
    }
    kv_backend_close(be);
    return 0;
}
