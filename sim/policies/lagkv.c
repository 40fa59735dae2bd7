/*
 * lagkv.c: LagKV (Liang et al., "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens
 * Are Important", arXiv:2504.04704), as kvpress 0.5.5 runs it (kvpress/presses/lagkv_press.py,
 * LagKVPress): no attention at all; each partition of `lag` tokens is judged against the NEXT one.
 *
 * Per KV head, n = context length, s = sinks, L = lag:
 *   if n < s + 2L: nothing is scored: the sinks score 1, token j >= s scores (j - s) / (n - s) (so a
 *     budget keeps the sinks and the most recent tokens);
 *   else the region [s, e) with e = s + floor((n - s) / L) L is cut into P partitions of L tokens;
 *     partition p < P - 1 is scored against partition p + 1 (its "lag"): per channel c, with min_c
 *     and max_c over the tokens of p + 1, token t of p gets
 *         u_t = std_c ((x_tc - min_c) / (max_c - min_c))      (unbiased std over the d channels)
 *     and softmax_t(u) over the partition's L tokens; computed on the keys and on the values and
 *     averaged; then (cross=0, kvpress's default) replaced by its rank inside the partition divided by
 *     L (ranks 0 .. L - 1, ascending), so every partition keeps the same share; cross=1 keeps the
 *     softmax values, comparable across partitions;
 *   the sinks and the tail (the last partition and the remainder, L + n - e tokens) score 1: kept
 *     first (protected here).
 * Ranks tie across partitions by construction (rank r / L appears P - 1 times), so which partitions
 * keep their rank-r token at the cut is the tie-break: tie=torch keeps exactly the set torch.topk
 * keeps (kvpress), tie=later the later partitions'. The heads of a group share the score.
 * Preset: lagkv@kvpress (sinks 4, lag 128, cross 0, tie=torch).
 * Deviations: a channel constant over the reference partition (max = min) divides by zero in the
 * reference (NaN scores); here its term is 0. Computed in double, rounded to float once.
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"

#include <math.h>
#include <string.h>

static const kv_param_def_t params[] = {
    {"sinks", KV_PARAM_INT, "4", 0, 1 << 20, NULL, "initial tokens always kept"},
    {"lag", KV_PARAM_INT, "128", 1, 1 << 20, NULL, "partition length: each partition is judged against the next"},
    {"cross", KV_PARAM_BOOL, "0", 0, -1, NULL,
     "1: raw softmax scores, comparable across partitions (kvpress "
     "cross_scoring); 0: ranks inside each partition"},
    KV_PARAM_TIE,
};

static const kv_preset_t presets[] = {
    {"kvpress", "sinks=4,lag=128,cross=0,tie=torch,gran=kv,agg=mean", "NVIDIA kvpress 0.5.5 LagKVPress"},
};

static int lagkv_init(kv_policy_t *p)
{
    kv_policy_read_tie(p);
    return KV_OK;
}

/* Softmax over the L tokens of partition x (rows (L, d) of X) of the normalised std against the
 * next partition, into u (L). */
static void partition_score(const float *X, int L, int d, double *u, double *mn, double *mx)
{
    const float *R = X + (size_t)L * d; /* the next partition */
    for (int c = 0; c < d; c++) {
        mn[c] = INFINITY;
        mx[c] = -INFINITY;
        for (int t = 0; t < L; t++) {
            mn[c] = fmin(mn[c], R[(size_t)t * d + c]);
            mx[c] = fmax(mx[c], R[(size_t)t * d + c]);
        }
    }
    double top = -INFINITY;
    for (int t = 0; t < L; t++) {
        double m = 0, q = 0;
        for (int c = 0; c < d; c++) {
            const double r = mx[c] - mn[c], y = r != 0 ? (X[(size_t)t * d + c] - mn[c]) / r : 0.0;
            m += y;
            q += y * y;
        }
        m /= d;
        const double var = d > 1 ? (q - d * m * m) / (d - 1) : 0.0;
        u[t] = sqrt(var > 0 ? var : 0);
        top = fmax(top, u[t]);
    }
    double z = 0;
    for (int t = 0; t < L; t++)
        z += (u[t] = exp(u[t] - top));
    for (int t = 0; t < L; t++)
        u[t] /= z;
}

/* idx[0..L) = 0..L-1 sorted by u ascending, equal values by position (a stable insertion sort: L is
 * a partition, and prepare may run inside another policy's parallel re-scoring). */
static void rank_sort(const double *u, int L, int *idx)
{
    for (int t = 0; t < L; t++) {
        int y = t;
        while (y > 0 && u[idx[y - 1]] > u[t]) {
            idx[y] = idx[y - 1];
            y--;
        }
        idx[y] = t;
    }
}

static int lagkv_prepare(kv_policy_t *p, kv_layer_ctx_t *c)
{
    const int n = c->n_ctx, d = c->d, s = KV_MIN((int)kv_params_int(&p->params, "sinks"), n);
    const int L = (int)kv_params_int(&p->params, "lag"), cross = kv_params_bool(&p->params, "cross");
    float *sc = kv_malloc(sizeof(float) * (size_t)(n ? n : 1), "lagkv scores");
    double *u = kv_malloc(sizeof(double) * (size_t)L * 2, "lagkv partition");
    double *mm = kv_malloc(sizeof(double) * (size_t)d * 2, "lagkv min/max");
    int *idx = kv_malloc(sizeof(int) * (size_t)L, "lagkv ranks");
    if (!sc || !u || !mm || !idx) {
        kv_free(sc), kv_free(u), kv_free(mm), kv_free(idx);
        return KV_ENOMEM;
    }
    const int compress = n >= s + 2 * L;
    const int e = compress ? s + ((n - s) / L) * L : n, P = compress ? (e - s) / L : 0;
    for (int g = 0; g < c->Hkv; g++) {
        for (int j = 0; j < n; j++) /* sinks and tail: 1; the uncompressed case: by position */
            sc[j] = j < s || compress ? 1.0f : (float)(j - s) / (float)(n - s);
        for (int x = 0; x + 1 < P; x++) {
            const int j0 = s + x * L;
            partition_score(c->k + ((size_t)g * c->T + j0) * d, L, d, u, mm, mm + d);
            partition_score(c->v + ((size_t)g * c->T + j0) * d, L, d, u + L, mm, mm + d);
            for (int t = 0; t < L; t++)
                u[t] = (u[t] + u[L + t]) / 2;
            if (cross) {
                for (int t = 0; t < L; t++)
                    sc[j0 + t] = (float)u[t];
            } else { /* argsort(argsort(u)) / L: the rank of each token inside its partition */
                rank_sort(u, L, idx);
                for (int r = 0; r < L; r++)
                    sc[j0 + idx[r]] = (float)r / (float)L;
            }
        }
        for (int h = g * c->G; h < (g + 1) * c->G; h++)
            memcpy(p->qscores + (size_t)h * n, sc, sizeof(float) * (size_t)n);
    }
    kv_free(sc), kv_free(u), kv_free(mm), kv_free(idx);
    p->protect_first = s;
    p->protect_last = compress ? L + n - e : 0;
    p->scored = 1;
    return KV_OK;
}

const kv_policy_desc_t kv_policy_lagkv = {
    .name = "lagkv",
    .doc = "attention-free: each partition's keys and values scored against the next partition's range "
           "(Liang et al. 2025)",
    .paper = "arXiv:2504.04704",
    .code = "NVIDIA/kvpress kvpress/presses/lagkv_press.py",
    .params = params,
    .n_params = (int)KV_ARRAY_LEN(params),
    .presets = presets,
    .n_presets = (int)KV_ARRAY_LEN(presets),
    .flags = KV_POL_ONESHOT | KV_POL_NESTED | KV_POL_SCORER,
    .variants = "lag=8;lag=8,tie=torch;lag=4,cross=1,sinks=2;lag=64",
    .init = lagkv_init,
    .prepare = lagkv_prepare,
};
