/*
 * maps.c: per-layer attention maps for the funneling figure (see kv_analyze.h).
 *
 * Three sources, all (n_heads, rows, cols) with cell (r, c) covering query positions
 * [r T / rows, (r+1) T / rows) and key positions [c T / cols, (c+1) T / cols):
 *   pooled   the trace's POOLED summary: max of p_ij over the cell (traces/FORMAT.md);
 *   exact    softmax(q_i . k_j / sqrt(d)) recomputed from Q and K, one cell per token
 *            (rows = cols = T), for traces of at most KV_MAP_EXACT_MAX tokens;
 *   sampled  long traces without summaries: KV_MAP_SAMPLED_ROWS rows of one query each (the last token
 *            of the row cell), its probabilities max-pooled into KV_MAP_SAMPLED_COLS key cells, so the
 *            O(T^2) work becomes O(rows T): one backend call per row.
 * Cells above the causal diagonal (every key of the column after every query of the row) are NaN
 * (drawn blank), not zero, so the colour scale shows only attention that could exist.
 */
#include "analyze/kv_analyze.h"

#include "sim/common/kv_common.h"

#include <math.h>
#include <string.h>

const char *kv_map_src_name(kv_map_src_t s)
{
    switch (s) {
    case KV_MAP_POOLED: return "pooled maps stored in the trace (max over each cell)";
    case KV_MAP_EXACT: return "exact attention recomputed from Q and K";
    case KV_MAP_SAMPLED: return "one sampled query per row, keys max-pooled (recomputed from Q and K)";
    default: return "auto";
    }
}

void kv_attn_map_free(kv_attn_map_t *m)
{
    if (!m)
        return;
    kv_free(m->maps);
    memset(m, 0, sizeof *m);
}

void kv_attn_map_mean(const kv_attn_map_t *m, float *dst)
{
    const size_t cells = (size_t)m->rows * m->cols;
    for (size_t i = 0; i < cells; i++) {
        double s = 0;
        int n = 0;
        for (int h = 0; h < m->n_heads; h++) {
            float v = m->maps[(size_t)h * cells + i];
            if (!isnan(v)) {
                s += v;
                n++;
            }
        }
        dst[i] = n ? (float)(s / n) : NAN;
    }
}

int kv_analyze_pick_layers(int n_layers, int want, int *layers)
{
    if (want < 1)
        want = 1;
    if (n_layers <= want) {
        for (int l = 0; l < n_layers; l++)
            layers[l] = l;
        return n_layers;
    }
    if (want == 1) {
        layers[0] = n_layers - 1;
        return 1;
    }
    int n = 0;
    for (int i = 0; i < want; i++) {
        int l = (int)lround((double)i * (n_layers - 1) / (want - 1));
        if (n == 0 || l != layers[n - 1])
            layers[n++] = l;
    }
    return n;
}

/* Probabilities of queries [i0, i0 + nq) over keys [0, i0 + nq) into host buffer p (H, nq, i0 + nq). */
static int rows_probs(kv_backend_t *be, const kv_trace_meta_t *m, const void *dq, const void *dk, int i0, int nq,
                      float *p)
{
    const int T = m->n_tokens, d = m->head_dim, nk = i0 + nq;
    kv_qk_args_t a = {.q = (const float *)dq + (size_t)i0 * d,
                      .q_head_stride = (size_t)T * d,
                      .k = dk,
                      .k_head_stride = (size_t)T * d,
                      .n_heads = m->n_heads,
                      .n_kv_heads = m->n_kv_heads,
                      .head_dim = d,
                      .n_q = nq,
                      .q_pos0 = i0,
                      .n_k = nk,
                      .causal = 1,
                      .scale = 1.0f / sqrtf((float)d)};
    const size_t bytes = sizeof(float) * (size_t)m->n_heads * nq * nk;
    void *dp = NULL;
    int rc = kv_be_out(be, p, bytes, &dp);
    if (rc)
        return rc;
    rc = be->ops->attn_probs(be, &a, dp, NULL);
    int rc2 = kv_be_fetch(be, p, dp, bytes);
    return rc ? rc : rc2;
}

/* First token of cell c of n cells over T tokens (tokens j with j n / T == c). */
static int cell_first(int c, int n, int T)
{
    return (int)(((long long)c * T + n - 1) / n);
}

int kv_attn_map_layer(kv_trace_t *t, kv_backend_t *be, int layer, kv_map_src_t src, kv_attn_map_t *out)
{
    memset(out, 0, sizeof *out);
    const kv_trace_meta_t *m = kv_trace_meta(t);
    const int H = m->n_heads, Hkv = m->n_kv_heads, d = m->head_dim, T = m->n_tokens;
    if (layer < 0 || layer >= m->n_layers)
        return kv_error(KV_ERANGE, "%s: layer %d outside [0, %d)", kv_trace_path(t), layer, m->n_layers);
    if (src == KV_MAP_AUTO) {
        if (kv_trace_has(t, KV_T_POOLED) && m->pool > 0)
            src = KV_MAP_POOLED;
        else if (T <= KV_MAP_EXACT_MAX && (double)H * T * T <= 64.0 * 1024 * 1024)
            src = KV_MAP_EXACT;
        else
            src = KV_MAP_SAMPLED;
    }
    if (src == KV_MAP_POOLED && !(kv_trace_has(t, KV_T_POOLED) && m->pool > 0))
        return kv_error(KV_EINVAL, "%s: the trace has no pooled attention maps (no summaries)", kv_trace_path(t));
    if (src != KV_MAP_POOLED && m->q_start > 0)
        return kv_error(KV_EUNAVAIL,
                        "%s: attention maps recomputed from Q and K need every query, and this lean trace stores the "
                        "queries from token %d on only (use its pooled maps)",
                        kv_trace_path(t), m->q_start);
    const int rows = src == KV_MAP_POOLED ? m->pool : src == KV_MAP_EXACT ? T : KV_MIN(KV_MAP_SAMPLED_ROWS, T);
    const int cols = src == KV_MAP_POOLED ? m->pool : src == KV_MAP_EXACT ? T : KV_MIN(KV_MAP_SAMPLED_COLS, T);
    const size_t cells = (size_t)rows * cols;
    out->src = src;
    out->rows = rows;
    out->cols = cols;
    out->n_tokens = T;
    out->n_heads = H;
    out->maps = kv_malloc(sizeof(float) * (size_t)H * cells, "attention maps");
    if (!out->maps)
        return KV_ENOMEM;
    int rc = KV_OK;
    if (src == KV_MAP_POOLED) {
        rc = kv_trace_read(t, layer, KV_T_POOLED, out->maps);
    } else {
        float *q = kv_malloc(sizeof(float) * (size_t)H * T * d, "map Q");
        float *k = kv_malloc(sizeof(float) * (size_t)Hkv * T * d, "map K");
        const int B = src == KV_MAP_EXACT ? KV_MAX(1, KV_MIN(T, (int)((4u << 20) / ((size_t)H * T + 1)))) : 1;
        float *p = kv_malloc(sizeof(float) * (size_t)H * B * T, "map rows");
        void *dq = NULL, *dk = NULL;
        rc = (!q || !k || !p) ? KV_ENOMEM : KV_OK;
        if (rc == KV_OK && !(rc = kv_trace_read(t, layer, KV_T_Q, q)) && !(rc = kv_trace_read(t, layer, KV_T_K, k)) &&
            !(rc = kv_be_view(be, q, sizeof(float) * (size_t)H * T * d, &dq)))
            rc = kv_be_view(be, k, sizeof(float) * (size_t)Hkv * T * d, &dk);
        if (rc == KV_OK && src == KV_MAP_EXACT) {
            for (int i0 = 0; i0 < T && rc == KV_OK; i0 += B) {
                const int nq = KV_MIN(B, T - i0), nk = i0 + nq;
                if ((rc = rows_probs(be, m, dq, dk, i0, nq, p)))
                    break;
                for (int h = 0; h < H; h++)
                    for (int r = 0; r < nq; r++) {
                        const float *src_row = p + ((size_t)h * nq + r) * nk;
                        float *dst = out->maps + (size_t)h * cells + (size_t)(i0 + r) * cols;
                        for (int j = 0; j < T; j++)
                            dst[j] = j <= i0 + r ? src_row[j] : NAN;
                    }
            }
        } else if (rc == KV_OK) {
            for (int r = 0; r < rows && rc == KV_OK; r++) {
                const int i = cell_first(r + 1, rows, T) - 1; /* the last query of row cell r */
                if ((rc = rows_probs(be, m, dq, dk, i, 1, p)))
                    break;
                for (int h = 0; h < H; h++) {
                    float *dst = out->maps + (size_t)h * cells + (size_t)r * cols;
                    for (int c = 0; c < cols; c++)
                        dst[c] = 0;
                    const float *row = p + (size_t)h * (i + 1);
                    for (int j = 0; j <= i; j++) {
                        int c = (int)((long long)j * cols / T);
                        if (row[j] > dst[c])
                            dst[c] = row[j];
                    }
                }
            }
        }
        kv_be_unview(be, q, dq);
        kv_be_unview(be, k, dk);
        kv_free(q);
        kv_free(k);
        kv_free(p);
    }
    if (rc) {
        kv_attn_map_free(out);
        return rc;
    }
    /* column cells whose first key comes after the last query of the row cell: blank */
    for (int r = 0; r < rows; r++) {
        const int last_q = cell_first(r + 1, rows, T) - 1;
        for (int c = 0; c < cols; c++)
            if (cell_first(c, cols, T) > last_q)
                for (int h = 0; h < H; h++)
                    out->maps[(size_t)h * cells + (size_t)r * cols + c] = NAN;
    }
    return KV_OK;
}
