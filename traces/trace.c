/*
 * trace.c: trace metadata helpers, the reader dispatch and the in-memory trace backend.
 */
#include "traces/kv_trace.h"

#include "sim/common/kv_common.h"
#include "traces/trace_internal.h"

#include <stdio.h>
#include <string.h>

static const char *tensor_names[KV_T_COUNT] = {
    "q",         "k",           "v",        "lse",           "entropy",          "acc_attn",      "pooled",
    "wo",        "acc_attn_sq", "max_attn", "acc_attn_head", "acc_attn_sq_head", "max_attn_head", "keys90",
    "sink_mass", "seg_mass"};

const char *kv_tensor_name(kv_tensor_t which)
{
    return (unsigned)which < KV_T_COUNT ? tensor_names[which] : "?";
}

int kv_tensor_per_token(kv_tensor_t which)
{
    return which <= KV_T_ACC || (which >= KV_T_ACC_SQ && which < KV_T_COUNT);
}

int kv_tensor_present(const kv_trace_meta_t *m, kv_tensor_t which)
{
    if (which <= KV_T_V)
        return 1;
    if (which == KV_T_WO)
        return m->has_wo != 0;
    if (which <= KV_T_POOLED)
        return m->has_summaries != 0;
    return which < KV_T_COUNT && m->has_stats != 0;
}

int kv_tensor_dims(const kv_trace_meta_t *m, kv_tensor_t which, uint64_t dims[3])
{
    switch (which) {
    case KV_T_Q:
        dims[0] = (uint64_t)m->n_heads, dims[1] = (uint64_t)(m->n_tokens - m->q_start), dims[2] = (uint64_t)m->head_dim;
        return 3;
    case KV_T_K:
    case KV_T_V:
        dims[0] = (uint64_t)m->n_kv_heads, dims[1] = (uint64_t)m->n_tokens, dims[2] = (uint64_t)m->head_dim;
        return 3;
    case KV_T_LSE:
    case KV_T_ENTROPY:
    case KV_T_ACC:
    case KV_T_ACC_SQ:
    case KV_T_MAX:
    case KV_T_ACC_HEAD:
    case KV_T_ACC_SQ_HEAD:
    case KV_T_MAX_HEAD:
    case KV_T_KEYS90:
    case KV_T_SINK:
    case KV_T_SEG: dims[0] = (uint64_t)m->n_heads, dims[1] = (uint64_t)m->n_tokens, dims[2] = 1; return 2;
    case KV_T_POOLED:
        dims[0] = (uint64_t)m->n_heads, dims[1] = (uint64_t)m->pool, dims[2] = (uint64_t)m->pool;
        return 3;
    case KV_T_WO:
        dims[0] = (uint64_t)m->model_dim, dims[1] = (uint64_t)m->n_heads * (uint64_t)m->head_dim, dims[2] = 1;
        return 2;
    default: dims[0] = dims[1] = dims[2] = 0; return 0;
    }
}

size_t kv_tensor_numel(const kv_trace_meta_t *m, kv_tensor_t which)
{
    uint64_t d[3];
    int r = kv_tensor_dims(m, which, d);
    size_t n = r ? 1 : 0;
    for (int i = 0; i < r; i++)
        n *= (size_t)d[i];
    return n;
}

int kv_trace_segment_of(const kv_trace_meta_t *m, int t)
{
    int s = 0;
    for (int i = 1; i < m->n_segments; i++)
        if (m->segments[i] <= t)
            s = i;
    return s;
}

void kv_trace_meta_free(kv_trace_meta_t *m)
{
    if (!m)
        return;
    kv_free(m->tokens);
    kv_free(m->positions);
    kv_free(m->segments);
    m->tokens = m->positions = m->segments = NULL;
}

static int32_t *dup_i32(const int32_t *src, int n)
{
    if (!src || n <= 0)
        return NULL;
    int32_t *d = kv_malloc(sizeof(int32_t) * (size_t)n, "trace metadata");
    if (d)
        memcpy(d, src, sizeof(int32_t) * (size_t)n);
    return d;
}

int kv_trace_meta_copy(kv_trace_meta_t *dst, const kv_trace_meta_t *src)
{
    *dst = *src;
    dst->tokens = dup_i32(src->tokens, src->n_tokens);
    dst->positions = dup_i32(src->positions, src->n_tokens);
    dst->segments = dup_i32(src->segments, src->n_segments);
    if ((src->tokens && !dst->tokens) || (src->positions && !dst->positions) || (src->segments && !dst->segments)) {
        kv_trace_meta_free(dst);
        return KV_ENOMEM;
    }
    return KV_OK;
}

/* Bounds far beyond any model (a 1M-token context, 128 heads of 256); larger values mean a corrupt
 * file. With them every tensor of one layer has fewer than 2^62 bytes as float32. */
#define MAX_LAYERS (1 << 16)
#define MAX_HEADS (1 << 16)
#define MAX_HEAD_DIM (1 << 16)
#define MAX_TOKENS (1 << 26)
#define MAX_MODEL_DIM (1 << 20)
#define MAX_TENSOR_FLOATS (1ull << 40)

int kv_trace_meta_validate(const kv_trace_meta_t *m, const char *where)
{
    if (m->n_layers <= 0 || m->n_heads <= 0 || m->n_kv_heads <= 0 || m->head_dim <= 0 || m->n_tokens <= 0)
        return kv_error(KV_EFORMAT, "%s: impossible shape (layers %d, heads %d, kv heads %d, head_dim %d, tokens %d)",
                        where, m->n_layers, m->n_heads, m->n_kv_heads, m->head_dim, m->n_tokens);
    if (m->n_layers > MAX_LAYERS || m->n_heads > MAX_HEADS || m->head_dim > MAX_HEAD_DIM || m->n_tokens > MAX_TOKENS ||
        m->model_dim > MAX_MODEL_DIM || m->model_dim < 0)
        return kv_error(KV_EFORMAT,
                        "%s: absurd shape (layers %d, heads %d, head_dim %d, tokens %d, model dim %d; at most %d, %d, "
                        "%d, %d, %d)",
                        where, m->n_layers, m->n_heads, m->head_dim, m->n_tokens, m->model_dim, MAX_LAYERS, MAX_HEADS,
                        MAX_HEAD_DIM, MAX_TOKENS, MAX_MODEL_DIM);
    if (m->n_heads % m->n_kv_heads)
        return kv_error(KV_EFORMAT, "%s: %d heads is not a multiple of %d KV heads", where, m->n_heads, m->n_kv_heads);
    if (m->n_prompt <= 0 || m->n_prompt > m->n_tokens)
        return kv_error(KV_EFORMAT, "%s: prompt length %d outside [1, %d]", where, m->n_prompt, m->n_tokens);
    if (m->n_segments < 0 || (m->n_segments > 0 && !m->segments))
        return kv_error(KV_EFORMAT, "%s: bad segment table", where);
    for (int s = 0; s < m->n_segments; s++) {
        int lo = s ? m->segments[s - 1] + 1 : 0;
        if ((s == 0 && m->segments[0] != 0) || m->segments[s] < lo || m->segments[s] >= m->n_prompt)
            return kv_error(KV_EFORMAT, "%s: segment %d starts at %d (segments must ascend from 0 inside the prompt)",
                            where, s, m->segments[s]);
    }
    if (m->has_summaries && (m->pool <= 0 || m->pool > m->n_tokens))
        return kv_error(KV_EFORMAT, "%s: pooled map side %d outside [1, %d]", where, m->pool, m->n_tokens);
    if (m->has_wo && m->model_dim <= 0)
        return kv_error(KV_EFORMAT, "%s: W_O present but model dim is %d", where, m->model_dim);
    if (m->q_start < 0 || m->q_start > m->n_prompt)
        return kv_error(KV_EFORMAT, "%s: queries stored from token %d, outside the prompt [0, %d]", where, m->q_start,
                        m->n_prompt);
    if (m->q_start > 0 && !m->has_stats)
        return kv_error(KV_EFORMAT,
                        "%s: a lean trace (queries stored from token %d) must store the statistics (has_stats)", where,
                        m->q_start);
    if (m->has_stats && !m->has_summaries)
        return kv_error(KV_EFORMAT, "%s: statistics (has_stats) without the summaries (has_summaries)", where);
    if (m->has_stats && (m->stats_split < m->q_start || m->stats_split > m->n_prompt))
        return kv_error(KV_EFORMAT, "%s: statistics split at token %d, outside [%d, %d] (stored queries of the prompt)",
                        where, m->stats_split, m->q_start, m->n_prompt);
    for (int w = 0; w < KV_T_COUNT; w++) {
        if (!kv_tensor_present(m, (kv_tensor_t)w))
            continue;
        uint64_t d[3], n = 1;
        int r = kv_tensor_dims(m, (kv_tensor_t)w, d), ok = 1;
        for (int i = 0; i < r && ok; i++)
            ok = !__builtin_mul_overflow(n, d[i], &n);
        if (!ok || n > MAX_TENSOR_FLOATS)
            return kv_error(KV_EFORMAT, "%s: absurd shape: one layer's '%s' would hold more than 2^40 values", where,
                            kv_tensor_name((kv_tensor_t)w));
    }
    if (m->tokens)
        for (int t = 0; t < m->n_tokens; t++)
            if (m->tokens[t] < -1 || (m->vocab_size > 0 && m->tokens[t] >= m->vocab_size))
                return kv_error(KV_EFORMAT, "%s: token %d has id %d, outside [-1, %d)", where, t, m->tokens[t],
                                m->vocab_size > 0 ? m->vocab_size : INT32_MAX);
    return KV_OK;
}

/* ---- dispatch ---- */

int kv_trace_open(const char *path, kv_trace_t **out)
{
    return kv_trace_hdf5_open(path, out);
}

void kv_trace_close(kv_trace_t *t)
{
    if (!t)
        return;
    t->vt->close(t);
    kv_trace_meta_free(&t->meta);
    kv_free(t);
}

const kv_trace_meta_t *kv_trace_meta(const kv_trace_t *t)
{
    return &t->meta;
}
const char *kv_trace_path(const kv_trace_t *t)
{
    return t->path;
}
int kv_trace_has(const kv_trace_t *t, kv_tensor_t which)
{
    return t->vt->has(t, which);
}

static int check_layer(const kv_trace_t *t, int layer, kv_tensor_t which)
{
    if (layer < 0 || layer >= t->meta.n_layers)
        return kv_error(KV_ERANGE, "%s: layer %d outside [0, %d)", t->path, layer, t->meta.n_layers);
    if ((unsigned)which >= KV_T_COUNT)
        return kv_error(KV_EINVAL, "%s: bad tensor id %d", t->path, (int)which);
    if (!t->vt->has(t, which))
        return kv_error(KV_EINVAL, "%s: the trace has no '%s' tensor", t->path, kv_tensor_name(which));
    return KV_OK;
}

int kv_trace_read_rows(kv_trace_t *t, int layer, kv_tensor_t which, int t0, int nt, float *dst)
{
    int rc = check_layer(t, layer, which);
    if (rc)
        return rc;
    if (!kv_tensor_per_token(which))
        return kv_error(KV_EINVAL, "%s: '%s' is not indexed by token", t->path, kv_tensor_name(which));
    if (t0 < 0 || nt < 0 || t0 + nt > t->meta.n_tokens)
        return kv_error(KV_ERANGE, "%s: tokens [%d, %d) outside [0, %d)", t->path, t0, t0 + nt, t->meta.n_tokens);
    if (nt == 0)
        return KV_OK;
    if (which == KV_T_Q && t0 < t->meta.q_start)
        return kv_error(
            KV_EUNAVAIL,
            "%s: the queries of tokens [%d, %d) are not stored: this lean trace keeps the queries of tokens "
            "%d..%d only (captured with --q-tail %d)",
            t->path, t0, t0 + nt, t->meta.q_start, t->meta.n_tokens - 1, t->meta.n_prompt - t->meta.q_start);
    return t->vt->read_rows(t, layer, which, t0, nt, dst);
}

int kv_trace_read(kv_trace_t *t, int layer, kv_tensor_t which, float *dst)
{
    int rc = check_layer(t, layer, which);
    if (rc)
        return rc;
    return t->vt->read(t, layer, which, dst);
}

int kv_trace_storage(kv_trace_t *t, uint64_t *raw, uint64_t *stored)
{
    return t->vt->storage(t, raw, stored);
}

static int grow(float **p, size_t *cap, size_t n)
{
    if (*cap >= n)
        return KV_OK;
    float *q = kv_malloc_aligned(n * sizeof(float), "trace layer buffer");
    if (!q)
        return KV_ENOMEM;
    kv_free_aligned(*p);
    *p = q;
    *cap = n;
    return KV_OK;
}

int kv_trace_read_layer(kv_trace_t *t, int layer, kv_layer_t *L)
{
    const kv_trace_meta_t *m = &t->meta;
    size_t nq = kv_tensor_numel(m, KV_T_Q), nkv = kv_tensor_numel(m, KV_T_K);
    size_t capk = L->cap_kv;
    int rc;
    if ((rc = grow(&L->q, &L->cap_q, nq)) || (rc = grow(&L->k, &capk, nkv)) || (rc = grow(&L->v, &L->cap_kv, nkv)))
        return rc;
    if ((rc = kv_trace_read(t, layer, KV_T_Q, L->q)) || (rc = kv_trace_read(t, layer, KV_T_K, L->k)) ||
        (rc = kv_trace_read(t, layer, KV_T_V, L->v)))
        return rc;
    return KV_OK;
}

void kv_layer_free(kv_layer_t *L)
{
    if (!L)
        return;
    kv_free_aligned(L->q);
    kv_free_aligned(L->k);
    kv_free_aligned(L->v);
    memset(L, 0, sizeof *L);
}

/* ---- in-memory backend ---- */

typedef struct {
    float **tensors; /* [layer * KV_T_COUNT + which] */
} mem_impl_t;

static float *mem_get(kv_trace_t *t, int layer, kv_tensor_t which, int alloc)
{
    mem_impl_t *mi = t->impl;
    float **slot = &mi->tensors[(size_t)layer * KV_T_COUNT + which];
    if (!*slot && alloc)
        *slot = kv_calloc(kv_tensor_numel(&t->meta, which), sizeof(float), "in-memory trace tensor");
    return *slot;
}

static int mem_read_rows(kv_trace_t *t, int layer, kv_tensor_t which, int t0, int nt, float *dst)
{
    uint64_t d[3];
    kv_tensor_dims(&t->meta, which, d);
    const float *src = mem_get(t, layer, which, 0);
    size_t row = (size_t)d[2]; /* floats per token (head_dim, or 1 for per-token scalars) */
    if (which == KV_T_Q)
        t0 -= t->meta.q_start; /* the stored rows start at q_start */
    for (uint64_t h = 0; h < d[0]; h++) {
        float *o = dst + (size_t)h * nt * row;
        if (src)
            memcpy(o, src + ((size_t)h * d[1] + (size_t)t0) * row, sizeof(float) * nt * row);
        else
            memset(o, 0, sizeof(float) * nt * row);
    }
    return KV_OK;
}

static int mem_read(kv_trace_t *t, int layer, kv_tensor_t which, float *dst)
{
    const float *src = mem_get(t, layer, which, 0);
    size_t n = kv_tensor_numel(&t->meta, which);
    if (src)
        memcpy(dst, src, sizeof(float) * n);
    else
        memset(dst, 0, sizeof(float) * n);
    return KV_OK;
}

static int mem_has(const kv_trace_t *t, kv_tensor_t which)
{
    return kv_tensor_present(&t->meta, which);
}

static int mem_storage(kv_trace_t *t, uint64_t *raw, uint64_t *stored)
{
    uint64_t n = 0;
    for (int w = 0; w < KV_T_COUNT; w++)
        if (mem_has(t, (kv_tensor_t)w))
            n += kv_tensor_numel(&t->meta, (kv_tensor_t)w) * sizeof(float) * (uint64_t)t->meta.n_layers;
    *raw = *stored = n;
    return KV_OK;
}

static void mem_close(kv_trace_t *t)
{
    mem_impl_t *mi = t->impl;
    if (!mi)
        return;
    for (size_t i = 0; i < (size_t)t->meta.n_layers * KV_T_COUNT; i++)
        kv_free(mi->tensors[i]);
    kv_free(mi->tensors);
    kv_free(mi);
}

static const kv_trace_vt_t mem_vt = {mem_read_rows, mem_read, mem_has, mem_storage, mem_close};

int kv_trace_mem_create(const kv_trace_meta_t *meta, kv_trace_t **out)
{
    *out = NULL;
    int rc = kv_trace_meta_validate(meta, "(memory)");
    if (rc)
        return rc;
    kv_trace_t *t = kv_calloc(1, sizeof *t, "trace");
    mem_impl_t *mi = kv_calloc(1, sizeof *mi, "trace");
    if (!t || !mi) {
        kv_free(t);
        kv_free(mi);
        return KV_ENOMEM;
    }
    mi->tensors = kv_calloc((size_t)meta->n_layers * KV_T_COUNT, sizeof(float *), "trace tensors");
    if (!mi->tensors || kv_trace_meta_copy(&t->meta, meta) != KV_OK) {
        kv_free(mi->tensors);
        kv_free(mi);
        kv_free(t);
        return KV_ENOMEM;
    }
    if (!t->meta.source[0])
        snprintf(t->meta.source, sizeof t->meta.source, "memory");
    t->vt = &mem_vt;
    t->impl = mi;
    snprintf(t->path, sizeof t->path, "(memory)");
    *out = t;
    return KV_OK;
}

float *kv_trace_mem_tensor(kv_trace_t *t, int layer, kv_tensor_t which)
{
    if (t->vt != &mem_vt || layer < 0 || layer >= t->meta.n_layers || (unsigned)which >= KV_T_COUNT)
        return NULL;
    return mem_get(t, layer, which, 1);
}

kv_trace_meta_t *kv_trace_mem_meta(kv_trace_t *t)
{
    return t->vt == &mem_vt ? &t->meta : NULL;
}
