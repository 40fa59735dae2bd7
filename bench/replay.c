/*
 * bench/replay.c: `make bench-replay`. Replays every registered policy at 4 budgets on synthetic
 * Llama-3-8B-shape traces (32 layers, 32/8 heads, head_dim 128, 64 decode tokens) with a 2K and an
 * 8K prompt on the CPU backend, and prints the wall time with its breakdown, the GFLOP/s of the
 * attention statistics (the Q.K^T products behind evaluation-query probabilities, observation
 * windows and accumulated attention), and the peak resident memory next to the size of one layer
 * and of the whole trace. Each size runs in its own process so its peak memory is its own.
 * Figures are printed, never asserted.
 *
 *   build/bench_replay [--prompts 2048,8192] [--layers 32] [--budgets 128,256,512,1024]
 *                      [--policies all] [--dir build/bench] [--prefetch 0|1]
 * --prefetch 1 turns the replay's layer prefetch on (default: kv_replay_defaults', off on the CPU
 * backend); with it the read time is the reader thread's and the line also says how long the engine
 * waited for layers.
 * Traces are generated once into --dir and reused when their generator label matches.
 */
#include "sim/replay.h"
#include "kernels/kv_backend.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/kv_policy.h"
#include "traces/kv_synth.h"
#include "traces/kv_trace.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static int ensure_trace(const kv_synth_params_t *p, const char *path)
{
    char label[1024];
    kv_synth_label(p, label, sizeof label);
    kv_trace_t *t;
    if (kv_trace_open(path, &t) == KV_OK) {
        int same = !strcmp(kv_trace_meta(t)->generator, label);
        kv_trace_close(t);
        if (same)
            return KV_OK;
    }
    kv_write_opts_t o = {KV_DTYPE_F16, 3, 0};
    double t0 = kv_now();
    int rc = kv_synth_write(p, path, &o);
    if (rc == KV_OK)
        printf("  generated %s in %.1f s\n", path, kv_now() - t0);
    return rc;
}

static int run_size(int prompt, int layers, const char *budgets, const char *policies, const char *dir, int prefetch)
{
    kv_synth_params_t p;
    kv_synth_defaults(&p);
    int rc = kv_synth_preset(&p, "llama3-8b");
    if (rc)
        return rc;
    p.n_layers = layers;
    p.n_tokens = prompt + 64;
    p.n_decode = 64;
    p.summaries = KV_SYNTH_SUMMARIES_NO;
    p.n_segments = 8; /* so segment-level policies (ShotKV) run too */
    char path[1024];
    snprintf(path, sizeof path, "%s/replay-l%d-p%d.h5", dir, layers, prompt);
    printf("\n== Llama-3-8B shape: %d layers, 32/8 heads, head_dim 128, %d prompt + 64 decode tokens\n", layers,
           prompt);
    fflush(stdout);
    if ((rc = ensure_trace(&p, path)))
        return rc;
    kv_trace_t *t = NULL;
    kv_backend_t *be = NULL;
    kv_policy_t **pols = NULL;
    kv_budget_t *bud = NULL;
    kv_results_t *res = NULL;
    int n_pol = 0, n_bud = 0;
    if ((rc = kv_trace_open(path, &t)) || (rc = kv_backend_cpu_open(0, &be)) ||
        (rc = kv_policy_create_list(policies, &pols, &n_pol)) || (rc = kv_budget_parse_list(budgets, &bud, &n_bud)))
        goto done;
    const kv_trace_meta_t *m = kv_trace_meta(t);
    uint64_t raw = 0, stored = 0;
    kv_trace_storage(t, &raw, &stored);
    kv_replay_stats_t st;
    kv_replay_opts_t o;
    kv_replay_defaults(&o);
    o.stats = &st;
    o.quiet = 1;
    if (prefetch >= 0)
        o.prefetch = prefetch;
    size_t rss0 = kv_peak_rss();
    if ((rc = kv_replay(t, pols, n_pol, bud, n_bud, be, &o, &res)))
        goto done;
    double layer_f32 = 4.0 * ((double)m->n_heads + 2.0 * m->n_kv_heads) * m->n_tokens * m->head_dim;
    double trace_f32 = layer_f32 * m->n_layers;
    double p_eval = 4.0 * m->n_heads * 64.0 * m->n_tokens;
    char a[32], b[32], c[32], d[32], e[32];
    printf("  %d policies x %d budgets (%s) on %s\n", n_pol, n_bud, budgets, be->device);
    printf("  wall            %8.1f s\n", st.t_total);
    printf("    read+decompress %6.1f s  (%ld layer reads, %s stored", st.t_read, st.layers_read,
           kv_fmt_bytes((double)stored, a, sizeof a));
    if (st.prefetched)
        printf("; prefetched by a reader thread, the engine waited %.1f s", st.t_read_wait);
    printf(")\n");
    printf("    attention stats %6.1f s  %.1f GFLOP -> %.1f GFLOP/s\n", st.t_attn, st.attn_flop / 1e9,
           st.t_attn > 0 ? st.attn_flop / st.t_attn / 1e9 : 0.0);
    printf("    policy scoring  %6.1f s\n", st.t_policies);
    printf("    caches+metrics  %6.1f s  (%d (policy, budget) pairs x %d layers)\n", st.t_eval, n_pol * n_bud,
           m->n_layers);
    printf("  peak RSS        %s (before replay %s); one layer of Q/K/V as f32 %s%s, evaluation attention %s, "
           "whole trace as f32 %s\n",
           kv_fmt_bytes((double)kv_peak_rss(), b, sizeof b), kv_fmt_bytes((double)rss0, c, sizeof c),
           kv_fmt_bytes(layer_f32, d, sizeof d), st.prefetched ? " (held twice: prefetch)" : "",
           kv_fmt_bytes(p_eval, e, sizeof e), kv_fmt_bytes(trace_f32, a, sizeof a));
    printf("  mean recall by policy and budget:\n  %-28s", "policy");
    for (int j = 0; j < n_bud; j++)
        printf(" %8s", bud[j].text);
    printf("\n");
    for (int i = 0; i < n_pol; i++) {
        printf("  %-28.28s", pols[i]->label);
        for (int j = 0; j < n_bud; j++)
            for (size_t r = 0; r < res->n; r++)
                if (res->rows[r].policy == i && res->rows[r].budget == j && res->rows[r].layer == KV_ALL)
                    printf(" %8.4f", res->rows[r].recall_mean);
        printf("\n");
    }
done:
    if (rc)
        fprintf(stderr, "bench-replay: %s\n", kv_last_error());
    kv_results_free(res);
    for (int i = 0; i < n_pol; i++)
        kv_policy_free(pols[i]);
    kv_free(pols);
    kv_free(bud);
    kv_backend_close(be);
    kv_trace_close(t);
    return rc;
}

int main(int argc, char **argv)
{
    const char *prompts = "2048,8192", *budgets = "128,256,512,1024", *policies = "all", *dir = "build/bench";
    int layers = 32, prefetch = -1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--prompts"))
            prompts = argv[i + 1];
        else if (!strcmp(argv[i], "--layers"))
            layers = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--budgets"))
            budgets = argv[i + 1];
        else if (!strcmp(argv[i], "--policies"))
            policies = argv[i + 1];
        else if (!strcmp(argv[i], "--dir"))
            dir = argv[i + 1];
        else if (!strcmp(argv[i], "--prefetch"))
            prefetch = atoi(argv[i + 1]);
        else {
            fprintf(stderr,
                    "usage: %s [--prompts 2048,8192] [--layers 32] [--budgets LIST] [--policies LIST] "
                    "[--dir DIR] [--prefetch 0|1]\n",
                    argv[0]);
            return 2;
        }
    }
    mkdir(dir, 0755);
    kv_log_set_level(KV_LOG_QUIET);
    printf("kvsim bench-replay (CPU backend; figures are measurements, not assertions)\n");
    char *list = kv_strdup(prompts);
    int fail = 0;
    for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            int rc = run_size(atoi(tok), layers, budgets, policies, dir, prefetch);
            fflush(stdout);
            _exit(rc ? 1 : 0);
        }
        int status = 0;
        waitpid(pid, &status, 0);
        fail |= !WIFEXITED(status) || WEXITSTATUS(status);
    }
    kv_free(list);
    return fail;
}
