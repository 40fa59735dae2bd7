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
 * Environment: KV_BENCH_TBT_TOKENS limits the token-by-token run of the 110M-shape model (default
 * all 1024: about a minute on 2 cores, it is memory-bound); KV_THREADS sets the CPU threads.
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
#include "traces/capture/kv_tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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
    const double model = (double)m->map_len + (m->owned ? 4.0 * (double)m->n_params : 0);
    const double cache = 2 * L * T * c->kv_dim * f;
    /* staging of Q rows (q_dim = n_heads * head_dim wide, which is dim except with an explicit
     * head_dim); activations x, xb (dim) and q, att (q_dim) */
    const double layer = 2 * n_prompt * (double)c->q_dim * f + 2 * n_prompt * H * f;
    const double act =
        n_prompt * (2.0 * c->dim + 2.0 * c->q_dim + 2.0 * c->hidden_dim + H) * f + 64.0 * c->vocab_size * f;
    const double dec = L * n_decode * c->q_dim * f;
    const double summ = L * H * (3 * T + P * P) * f;
    char a[32], b[32], d[32], e[32], g[32], h[32], i[32], j[32];
    printf("    peak RSS %s (process before the capture %s, capture's own %s)\n", mib((double)r->peak_rss, a, 32),
           mib((double)rss0, b, 32), mib((double)r->peak_rss - (double)rss0, d, 32));
    printf("    bound: model %s + KV cache %s + one layer of trace buffers %s = %s\n", mib(model, e, 32),
           mib(cache, g, 32), mib(layer, h, 32), mib(model + cache + layer, i, 32));
    printf("    plus activations %s, decode queries %s, summaries %s: total %s\n", mib(act, a, 32), mib(dec, b, 32),
           mib(summ, d, 32), mib(model + cache + layer + act + dec + summ, j, 32));
    printf("    capture timings: prefill %.2fs (%.0f tok/s incl. summaries and slab writes), decode %.2fs, write "
           "%.2fs\n",
           r->prefill_s, n_prompt / r->prefill_s, r->decode_s, r->write_s);
}

int main(void)
{
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

    /* 110M-shape checkpoint first (streamed to disk: the parent stays small for the fork below) */
    const double t0 = kv_now();
    if ((rc = write_random_checkpoint(BIG_PATH, 768, 2048, 12, 12, 12, 32000, 1024))) {
        fprintf(stderr, "bench-capture: %s\n", kv_last_error());
        return 1;
    }
    printf("  random-weight checkpoint %s ready (%.1fs)\n", BIG_PATH, kv_now() - t0);

    /* ---- peak memory of captures, each in a child process ---- */
    printf("\npeak memory of a capture (child process; baseline RSS of this program %.1f MiB: linked libraries)\n",
           rss_start / 1048576.0);
    struct {
        const char *name, *model, *tok;
        int n_prompt, n_decode;
    } caps[] = {
        {"stories260K", have260 ? mpath : NULL, tpath, 448, 64},
        {"stories110M shape (random)", BIG_PATH, tok32, 960, 64},
    };
    for (size_t ci = 0; ci < KV_ARRAY_LEN(caps); ci++) {
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
