/*
 * bench/stats_agreement.c: how much replay's two sources of column statistics disagree on one trace.
 *
 * --stats trace reads the statistics capture or synth computed from the values before they were
 * rounded to the trace's dtype; --stats recompute computes them from the stored (f16-rounded) Q and K.
 * On an f16 trace the two differ by that rounding; this program says by how much it matters: per
 * policy and budget, the kept sets (the cache of the first evaluation query, every layer and storage
 * head) that differ and by how many tokens, and the recall of the result rows under each source.
 * Cross-layer policies (kvcompress) have no per-layer probe: only their rows are compared. Figures,
 * not assertions (the f32 agreement is asserted by tests/test_stats.c).
 *
 *   build/bench_stats_agreement TRACE.h5 [--policies all] [--budgets 32,64,128,0.25] [--eval-tail N]
 */
#include "kernels/kv_backend.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/kv_policy.h"
#include "sim/replay.h"
#include "sim/result.h"
#include "traces/kv_trace.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s TRACE.h5 [--policies all] [--budgets 32,64,128,0.25] [--eval-tail N]\n", argv[0]);
        return 2;
    }
    const char *path = argv[1], *policies = "all", *budgets = "32,64,128,0.25";
    int eval_tail = 0;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--policies"))
            policies = argv[i + 1];
        else if (!strcmp(argv[i], "--budgets"))
            budgets = argv[i + 1];
        else if (!strcmp(argv[i], "--eval-tail"))
            eval_tail = atoi(argv[i + 1]);
    }
    kv_log_set_level(KV_LOG_QUIET);
    kv_trace_t *t = NULL;
    kv_backend_t *be = NULL;
    kv_policy_t **pols = NULL;
    kv_budget_t *bud = NULL;
    kv_results_t *res[2] = {NULL, NULL};
    int n_pol = 0, n_bud = 0, rc;
    if ((rc = kv_trace_open(path, &t)) || (rc = kv_backend_cpu_open(0, &be)) ||
        (rc = kv_policy_create_list(policies, &pols, &n_pol)) || (rc = kv_budget_parse_list(budgets, &bud, &n_bud)))
        goto done;
    const kv_trace_meta_t *m = kv_trace_meta(t);
    int k = 0; /* policies the trace can run (segments) */
    for (int i = 0; i < n_pol; i++) {
        if ((pols[i]->flags & KV_POL_NEEDS_SEGMENTS) && m->n_segments < 1) {
            kv_policy_free(pols[i]);
            continue;
        }
        pols[k++] = pols[i];
    }
    n_pol = k;
    kv_replay_opts_t o[2];
    for (int s = 0; s < 2; s++) {
        kv_replay_defaults(&o[s]);
        o[s].quiet = 1;
        o[s].eval_tail = eval_tail;
        o[s].stats_source = s ? KV_STATS_RECOMPUTE : KV_STATS_TRACE;
        if ((rc = kv_replay(t, pols, n_pol, bud, n_bud, be, &o[s], &res[s])))
            goto done;
    }
    printf("%s: %d layers, %d/%d heads, %d prompt + %d decode tokens, %s; --eval-tail %d\n", path, m->n_layers,
           m->n_heads, m->n_kv_heads, m->n_prompt, m->n_tokens - m->n_prompt, m->dtype == KV_DTYPE_F16 ? "f16" : "f32",
           eval_tail);
    printf("kept sets: the cache of the first evaluation query, per (layer, storage head); recall: mean over "
           "everything (trace / recompute) and the largest difference of a layer row\n");
    printf("%-40s %8s %16s %16s %18s %11s\n", "policy", "budget", "kept sets differ", "tokens differ",
           "recall tr / rec", "max |d| layer");
    const size_t T = (size_t)m->n_tokens;
    long all_sets = 0, all_diff = 0, all_tok = 0, all_kept = 0;
    for (int i = 0; i < n_pol; i++) {
        kv_policy_t *p = pols[i];
        const int S = p->gran == KV_GRAN_KV ? m->n_kv_heads : m->n_heads;
        const int n_ctx = m->n_prompt - eval_tail;
        uint8_t *mk[2] = {kv_malloc((size_t)m->n_layers * S * T, "masks"),
                          kv_malloc((size_t)m->n_layers * S * T, "masks")};
        for (int b = 0; b < n_bud; b++) {
            long sets = 0, diff = 0, tok = 0, kept = 0;
            int probed = !(p->flags & KV_POL_CROSS_LAYER);
            for (int s = 0; s < 2 && probed; s++)
                if ((rc = kv_replay_probe_all(t, p, &bud[b], 0, &o[s], be, mk[s])))
                    goto done;
            for (int l = 0; l < m->n_layers && probed; l++)
                for (int h = 0; h < S; h++) {
                    const uint8_t *a = mk[0] + ((size_t)l * S + h) * T, *c = mk[1] + ((size_t)l * S + h) * T;
                    long d = 0, kk = 0;
                    for (int j = 0; j < n_ctx; j++) {
                        d += (a[j] != 0) != (c[j] != 0);
                        kk += a[j] != 0;
                    }
                    sets++;
                    diff += d > 0;
                    tok += d;
                    kept += kk;
                }
            double r0 = NAN, r1 = NAN, dmax = 0;
            for (size_t x = 0; x < res[0]->n; x++) {
                const kv_result_row_t *a = &res[0]->rows[x], *c = &res[1]->rows[x];
                if (a->policy != i || a->budget != b || a->head != KV_ALL)
                    continue;
                if (a->layer == KV_ALL) {
                    r0 = a->recall_mean;
                    r1 = c->recall_mean;
                } else {
                    dmax = fmax(dmax, fabs(a->recall_mean - c->recall_mean));
                }
            }
            char lab[41], sd[32], td[32];
            snprintf(lab, sizeof lab, "%.40s", p->label);
            if (probed) {
                snprintf(sd, sizeof sd, "%ld of %ld", diff, sets);
                snprintf(td, sizeof td, "%ld (%.2f %%)", tok / 2, kept ? 100.0 * tok / 2 / kept : 0.0);
            } else {
                snprintf(sd, sizeof sd, "(cross-layer)");
                snprintf(td, sizeof td, "-");
            }
            printf("%-40s %8s %16s %16s %8.4f / %7.4f %11.2g\n", lab, bud[b].text, sd, td, r0, r1, dmax);
            all_sets += sets;
            all_diff += diff;
            all_tok += tok / 2;
            all_kept += kept;
        }
        kv_free(mk[0]);
        kv_free(mk[1]);
    }
    printf("total: %ld of %ld kept sets differ, %ld of %ld kept tokens (%.3f %%)\n", all_diff, all_sets, all_tok,
           all_kept, all_kept ? 100.0 * all_tok / all_kept : 0.0);
done:
    if (rc)
        fprintf(stderr, "bench_stats_agreement: %s\n", kv_last_error());
    kv_results_free(res[0]);
    kv_results_free(res[1]);
    for (int i = 0; i < n_pol; i++)
        kv_policy_free(pols[i]);
    kv_free(pols);
    kv_free(bud);
    kv_backend_close(be);
    kv_trace_close(t);
    return rc ? 1 : 0;
}
