/*
 * bench/replay_scaling.c: `make bench-replay-scaling`. Is replay linear in the context?
 *
 * Synthetic traces of the Llama-3-8B head shape (32/8 heads, head_dim 128, 64 decode tokens, 8
 * segments, f16, with the statistics of trace format version 2) at three prompt lengths: 2K and 8K
 * with the model's 32 layers, 32K with 4 layers (so that it fits the disk and the time; the O(T^2)
 * statistics synth computes once are the slow part). For each: every registered policy x 4 budgets
 * replayed with the stored statistics (--stats trace, the default): wall time, time per context token
 * and per context token and layer, peak RSS of the replay's own process, and, measured in the same
 * process, the time to read and decompress what replay reads (Q, K, V and the stored column
 * statistics of every layer). Then, on the smallest trace, the same replay with --stats recompute
 * (the exact O(T^2) path) for the ratio, and the throughput of that path's attention statistics
 * (backend attn_colstats) against OpenBLAS sgemm on the same Q.K^T products in the same run.
 * Goals (issue 11): time per token 2K -> 32K grows by at most 1.5x; replay at most 1.5x the
 * read-and-decompress time; peak RSS independent of T^2; attn_colstats at >= 70 % of sgemm.
 * Figures are printed, never asserted. Each replay runs in its own process (its own peak RSS); traces
 * are generated once into --dir, in a process of their own, and reused when their label matches.
 *
 *   build/bench_replay_scaling [--sizes 2048:32,8192:32,32768:4] [--budgets 128,256,512,1024]
 *                              [--policies all] [--dir build/bench] [--recompute 1] [--keep 1]
 */
#include "kernels/kv_backend.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/kv_policy.h"
#include "sim/replay.h"
#include "traces/kv_synth.h"
#include "traces/kv_trace.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int prompt, layers;
    double wall, read, t_attn, t_pol, t_eval, rss, file_bytes, layer_f32;
    double cpu, read_cpu;  /* CPU seconds (every thread) of the replay and of the read alone */
    double wall_recompute; /* --stats recompute, 0 when not run */
    int ok;
} row_t;

static double cpu_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void params_for(int prompt, int layers, kv_synth_params_t *p)
{
    kv_synth_defaults(p);
    kv_synth_preset(p, "llama3-8b");
    p->n_layers = layers;
    p->n_tokens = prompt + 64;
    p->n_decode = 64;
    p->n_segments = 8; /* so segment-level policies (ShotKV) run too */
    p->summaries = KV_SYNTH_SUMMARIES_YES;
}

static void path_for(const char *dir, int prompt, int layers, char *buf, size_t len)
{
    snprintf(buf, len, "%s/scaling-l%d-p%d.h5", dir, layers, prompt);
}

/* Generate the trace unless a file with the same generator label and the statistics exists. */
static int ensure_trace(int prompt, int layers, const char *dir)
{
    kv_synth_params_t p;
    params_for(prompt, layers, &p);
    char label[1024], path[1024];
    kv_synth_label(&p, label, sizeof label);
    path_for(dir, prompt, layers, path, sizeof path);
    kv_trace_t *t;
    if (kv_trace_open(path, &t) == KV_OK) {
        int same = !strcmp(kv_trace_meta(t)->generator, label) && kv_trace_meta(t)->has_stats;
        kv_trace_close(t);
        if (same)
            return KV_OK;
    }
    kv_write_opts_t o = {KV_DTYPE_F16, 3, 0};
    double t0 = kv_now();
    int rc = kv_synth_write(&p, path, &o);
    if (rc == KV_OK)
        printf("  generated %s in %.0f s\n", path, kv_now() - t0);
    return rc;
}

/* Read and decompress what replay reads: Q, K, V and the stored column statistics of every layer. */
static int read_all(kv_trace_t *t, double *seconds, double *cpu_seconds)
{
    const kv_trace_meta_t *m = kv_trace_meta(t);
    const kv_tensor_t which[] = {KV_T_Q, KV_T_K, KV_T_V, KV_T_ACC, KV_T_ACC_SQ, KV_T_MAX};
    size_t most = 0;
    for (size_t w = 0; w < KV_ARRAY_LEN(which); w++)
        most = KV_MAX(most, kv_tensor_numel(m, which[w]));
    float *buf = kv_malloc_aligned(sizeof(float) * most, "read buffer");
    if (!buf)
        return KV_ENOMEM;
    int rc = KV_OK;
    double t0 = kv_now(), c0 = cpu_now();
    for (int l = 0; l < m->n_layers && rc == KV_OK; l++)
        for (size_t w = 0; w < KV_ARRAY_LEN(which) && rc == KV_OK; w++)
            if (kv_trace_has(t, which[w]))
                rc = kv_trace_read(t, l, which[w], buf);
    *seconds = kv_now() - t0;
    *cpu_seconds = cpu_now() - c0;
    kv_free_aligned(buf);
    return rc;
}

/* One replay in this process; fills r. */
static int run_replay(const char *path, const char *policies, const char *budgets, int source, row_t *r)
{
    kv_trace_t *t = NULL;
    kv_backend_t *be = NULL;
    kv_policy_t **pols = NULL;
    kv_budget_t *bud = NULL;
    kv_results_t *res = NULL;
    int n_pol = 0, n_bud = 0, rc;
    if ((rc = kv_trace_open(path, &t)) || (rc = kv_backend_cpu_open(0, &be)) ||
        (rc = kv_policy_create_list(policies, &pols, &n_pol)) || (rc = kv_budget_parse_list(budgets, &bud, &n_bud)))
        goto done;
    const kv_trace_meta_t *m = kv_trace_meta(t);
    int kept = 0; /* the synthetic traces have no W_O: leave out the policies that need it (as replay's 'all') */
    for (int i = 0; i < n_pol; i++)
        if ((pols[i]->flags & KV_POL_NEEDS_WO) && !m->has_wo)
            kv_policy_free(pols[i]);
        else
            pols[kept++] = pols[i];
    n_pol = kept;
    r->prompt = m->n_prompt;
    r->layers = m->n_layers;
    r->layer_f32 = 4.0 * ((double)m->n_heads + 2.0 * m->n_kv_heads) * m->n_tokens * m->head_dim;
    struct stat st;
    r->file_bytes = stat(path, &st) == 0 ? (double)st.st_size : 0;
    double rd = 0, rdc = 0;
    if (source == KV_STATS_TRACE && (rc = read_all(t, &rd, &rdc)))
        goto done;
    kv_replay_stats_t s;
    kv_replay_opts_t o;
    kv_replay_defaults(&o);
    o.stats = &s;
    o.quiet = 1;
    o.stats_source = source;
    const double c0 = cpu_now();
    if ((rc = kv_replay(t, pols, n_pol, bud, n_bud, be, &o, &res)))
        goto done;
    r->cpu = cpu_now() - c0;
    if (source == KV_STATS_RECOMPUTE) {
        r->wall_recompute = s.t_total;
        goto done;
    }
    double rd2 = 0, rdc2 = 0;
    if ((rc = read_all(t, &rd2, &rdc2)))
        goto done;
    r->wall = s.t_total;
    r->read = rd < rd2 ? rd : rd2; /* warm page cache both times; the smaller of the two */
    r->read_cpu = rdc < rdc2 ? rdc : rdc2;
    r->t_attn = s.t_attn;
    r->t_pol = s.t_policies;
    r->t_eval = s.t_eval;
    r->rss = (double)kv_peak_rss();
    r->ok = 1;
    printf("  %d policies x %d budgets (%s), --stats trace, on %s\n", n_pol, n_bud, budgets, be->device);
    printf("  wall %.1f s: read+decompress inside replay %.1f s, attention (windows, evaluation queries) %.1f s "
           "(%.1f GFLOP), policy scoring %.1f s, caches+metrics %.1f s\n",
           s.t_total, s.t_read, s.t_attn, s.attn_flop / 1e9, s.t_policies, s.t_eval);
    printf("  read and decompress Q, K, V and the stored statistics alone: %.1f s (%.1f s and %.1f s; CPU %.1f s)\n",
           r->read, rd, rd2, r->read_cpu);
    printf("  CPU time of the replay (both threads): %.1f s\n", r->cpu);
done:
    if (rc)
        fprintf(stderr, "bench-replay-scaling: %s\n", kv_last_error());
    kv_results_free(res);
    for (int i = 0; i < n_pol; i++)
        kv_policy_free(pols[i]);
    kv_free(pols);
    kv_free(bud);
    kv_backend_close(be);
    kv_trace_close(t);
    return rc;
}

/* Run f in a child process; the child's row comes back through a pipe. */
static int in_child(int (*f)(void *, row_t *), void *arg, row_t *r)
{
    int fd[2];
    if (pipe(fd))
        return KV_EIO;
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        close(fd[0]);
        row_t x;
        memset(&x, 0, sizeof x);
        int rc = f(arg, &x);
        fflush(stdout);
        if (write(fd[1], &x, sizeof x) != (ssize_t)sizeof x)
            rc = KV_EIO;
        _exit(rc ? 1 : 0);
    }
    close(fd[1]);
    row_t x;
    ssize_t got = read(fd[0], &x, sizeof x);
    close(fd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    if (got == (ssize_t)sizeof x)
        *r = x;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 && got == (ssize_t)sizeof x ? KV_OK : KV_EIO;
}

typedef struct {
    int prompt, layers, source;
    const char *dir, *policies, *budgets;
} job_t;

static int job_generate(void *arg, row_t *r)
{
    const job_t *j = arg;
    (void)r;
    return ensure_trace(j->prompt, j->layers, j->dir);
}

static int job_replay(void *arg, row_t *r)
{
    const job_t *j = arg;
    char path[1024];
    path_for(j->dir, j->prompt, j->layers, path, sizeof path);
    return run_replay(path, j->policies, j->budgets, j->source, r);
}

/* The recompute path's statistics (attn_colstats) against OpenBLAS sgemm on the same Q.K^T products
 * (blocks of 64 queries over the keys they see, one BLAS thread per head, as the op makes them), for
 * H heads of n tokens; CPU time (both threads' seconds) and wall time, best of `reps`, interleaved. */
static void throughput(int n, int reps)
{
    const int H = 32, Hkv = 8, G = H / Hkv, d = 128, qb = 64;
    kv_backend_t *be;
    if (kv_backend_cpu_open(0, &be) != KV_OK)
        return;
    float *q = kv_malloc_aligned(sizeof(float) * (size_t)H * n * d, "q");
    float *k = kv_malloc_aligned(sizeof(float) * (size_t)Hkv * n * d, "k");
    float *out = kv_malloc(sizeof(float) * 3 * (size_t)H * n, "colstats");
    if (!q || !k || !out)
        goto done;
    uint64_t x = 88172645463325252ull;
    for (size_t i = 0; i < (size_t)H * n * d; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        q[i] = (float)((double)(x >> 11) / 9007199254740992.0 - 0.5) * 2.0f;
    }
    for (size_t i = 0; i < (size_t)Hkv * n * d; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        k[i] = (float)((double)(x >> 11) / 9007199254740992.0 - 0.5) * 2.0f;
    }
    kv_qk_args_t a = {q, (size_t)n * d, k, (size_t)n * d, H, Hkv, d, n, 0, n, 1, 1.0f / sqrtf((float)d)};
    kv_colstats_out_t o = {out, out + (size_t)H * n, out + 2 * (size_t)H * n};
    const double flop = (double)H * n * (n + 1) / 2.0 * d * 2.0;
    double bc = 1e30, bs = 1e30, wc = 1e30, ws = 1e30;
    for (int rep = 0; rep < reps; rep++) {
        double c0 = cpu_now(), w0 = kv_now();
        be->ops->attn_colstats(be, &a, &o);
        bc = KV_MIN(bc, cpu_now() - c0);
        wc = KV_MIN(wc, kv_now() - w0);
        int old = kv_blas_set_threads(1);
        c0 = cpu_now(), w0 = kv_now();
#pragma omp parallel
        {
            float *S = kv_malloc_aligned(sizeof(float) * qb * (size_t)n, "scores");
#pragma omp for schedule(dynamic, 1)
            for (int h = 0; h < H; h++)
                for (int i0 = 0; i0 < n && S; i0 += qb) {
                    const int nb = KV_MIN(qb, n - i0), nc = i0 + nb;
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nb, nc, d, a.scale,
                                q + ((size_t)h * n + i0) * d, d, k + (size_t)(h / G) * n * d, d, 0.0f, S, nc);
                }
            kv_free_aligned(S);
        }
        bs = KV_MIN(bs, cpu_now() - c0);
        ws = KV_MIN(ws, kv_now() - w0);
        kv_blas_set_threads(old);
    }
    /* a large square product, OpenBLAS's own threading, for context */
    const int sq = 2048;
    float *A = kv_malloc_aligned(sizeof(float) * (size_t)sq * sq, "A"),
          *C = kv_malloc_aligned(sizeof(float) * (size_t)sq * sq, "C");
    double wsq = 1e30;
    if (A && C) {
        for (size_t i = 0; i < (size_t)sq * sq; i++)
            A[i] = 0.5f;
        for (int rep = 0; rep < 3; rep++) {
            double w0 = kv_now();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, sq, sq, sq, 1.0f, A, sq, A, sq, 0.0f, C, sq);
            wsq = KV_MIN(wsq, kv_now() - w0);
        }
    }
    printf("\n== the recompute path's statistics: attn_colstats vs OpenBLAS sgemm, same run\n");
    printf("  %d heads (%d KV heads) x %d tokens, head_dim %d, causal; GFLOP/s count the Q.K^T multiply-adds "
           "x 2 of the causal half\n",
           H, Hkv, n, d);
    printf("  attn_colstats (sum, sum of squares, max)    %6.1f GFLOP/s wall, %6.1f per CPU-second\n", flop / wc / 1e9,
           flop / bc / 1e9);
    printf("  sgemm alone on the same blocks (64 queries) %6.1f GFLOP/s wall, %6.1f per CPU-second\n", flop / ws / 1e9,
           flop / bs / 1e9);
    printf("  -> attn_colstats at %.0f %% of sgemm by CPU time (%.0f %% by wall time; best of %d each, interleaved)\n",
           100.0 * bs / bc, 100.0 * ws / wc, reps);
    if (A && C)
        printf("  (for context: a %dx%dx%d sgemm with OpenBLAS's threads runs at %.1f GFLOP/s wall)\n", sq, sq, sq,
               2.0 * sq * (double)sq * sq / wsq / 1e9);
    kv_free_aligned(A);
    kv_free_aligned(C);
done:
    kv_free_aligned(q);
    kv_free_aligned(k);
    kv_free(out);
    kv_backend_close(be);
}

int main(int argc, char **argv)
{
    const char *sizes = "2048:32,8192:32,32768:4", *budgets = "128,256,512,1024", *policies = "all",
               *dir = "build/bench";
    int recompute = 1, keep = 1, tput_n = 4096;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--sizes"))
            sizes = argv[i + 1];
        else if (!strcmp(argv[i], "--budgets"))
            budgets = argv[i + 1];
        else if (!strcmp(argv[i], "--policies"))
            policies = argv[i + 1];
        else if (!strcmp(argv[i], "--dir"))
            dir = argv[i + 1];
        else if (!strcmp(argv[i], "--recompute"))
            recompute = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--keep"))
            keep = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--throughput-tokens"))
            tput_n = atoi(argv[i + 1]);
        else {
            fprintf(stderr,
                    "usage: %s [--sizes 2048:32,8192:32,32768:4] [--budgets LIST] [--policies LIST] [--dir DIR] "
                    "[--recompute 0|1] [--keep 0|1] [--throughput-tokens N]\n",
                    argv[0]);
            return 2;
        }
    }
    mkdir(dir, 0755);
    kv_log_set_level(KV_LOG_QUIET);
    printf("kvsim bench-replay-scaling (CPU backend; figures are measurements, not assertions)\n");
    row_t rows[8];
    int n = 0, fail = 0;
    char *list = kv_strdup(sizes);
    for (char *tok = strtok(list, ","); tok && n < 8; tok = strtok(NULL, ",")) {
        job_t j = {atoi(tok), strchr(tok, ':') ? atoi(strchr(tok, ':') + 1) : 32, KV_STATS_TRACE, dir, policies,
                   budgets};
        printf("\n== Llama-3-8B head shape: %d layers, 32/8 heads, head_dim 128, %d prompt + 64 decode tokens, f16\n",
               j.layers, j.prompt);
        row_t r;
        memset(&r, 0, sizeof r);
        if (in_child(job_generate, &j, &r) || in_child(job_replay, &j, &r)) {
            fail = 1;
            continue;
        }
        if (recompute && n == 0) { /* the exact O(T^2) path, on the smallest trace */
            row_t x;
            j.source = KV_STATS_RECOMPUTE;
            if (in_child(job_replay, &j, &x) == KV_OK) {
                r.wall_recompute = x.wall_recompute;
                printf("  the same replay with --stats recompute: %.1f s\n", x.wall_recompute);
            }
        }
        rows[n++] = r;
        if (!keep) {
            char path[1024];
            path_for(dir, j.prompt, j.layers, path, sizeof path);
            unlink(path);
        }
    }
    kv_free(list);
    if (n) {
        char a[32], b[32], c[32];
        printf("\n== summary (replay --stats trace; per token: per context token; per token-layer: per context "
               "token and layer; replay/read: wall times, CPU ratio: the same in CPU seconds of every thread)\n");
        printf("  %7s %6s %9s %10s %14s %9s %8s %12s %10s %10s %12s\n", "prompt", "layers", "wall s", "ms/token",
               "us/token-layer", "vs first", "read s", "replay/read", "CPU ratio", "peak RSS", "trace file");
        const double base = rows[0].wall / ((double)rows[0].prompt * rows[0].layers);
        for (int i = 0; i < n; i++) {
            const row_t *r = &rows[i];
            const double ptl = r->wall / ((double)r->prompt * r->layers);
            printf("  %7d %6d %9.1f %10.3f %14.2f %8.2fx %8.1f %11.2fx %9.2fx %10s %12s\n", r->prompt, r->layers,
                   r->wall, 1e3 * r->wall / r->prompt, 1e6 * ptl, ptl / base, r->read,
                   r->read > 0 ? r->wall / r->read : 0.0, r->read_cpu > 0 ? r->cpu / r->read_cpu : 0.0,
                   kv_fmt_bytes(r->rss, a, sizeof a), kv_fmt_bytes(r->file_bytes, b, sizeof b));
        }
        printf("  peak RSS against the data: ");
        for (int i = 0; i < n; i++) {
            const double t2 = 4.0 * 32 * (double)(rows[i].prompt + 64) * (rows[i].prompt + 64);
            printf("%s%dK: %.1f layers of Q/K/V as f32 (%s), H x T^2 f32 would be %s", i ? "; " : "",
                   rows[i].prompt / 1024, rows[i].rss / rows[i].layer_f32, kv_fmt_bytes(rows[i].layer_f32, a, sizeof a),
                   kv_fmt_bytes(t2, c, sizeof c));
        }
        printf("\n");
        if (rows[0].wall_recompute > 0)
            printf("  %d tokens with --stats recompute: %.1f s (%.1fx the --stats trace replay)\n", rows[0].prompt,
                   rows[0].wall_recompute, rows[0].wall_recompute / rows[0].wall);
    }
    throughput(tput_n, 5);
    return fail;
}
