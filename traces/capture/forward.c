/*
 * forward.c: the Llama forward pass over the backend op table (see kv_forward.h).
 *
 * Memory: the KV cache (2 x n_layers x max_tokens x kv_dim floats), activations for one block of
 * max_batch tokens (x, xb: max_batch x dim; q, att: max_batch x q_dim; hb, hb2: max_batch x
 * hidden_dim), the lse of one block and LOGIT_ROWS rows of logits (all-token logits are produced
 * LOGIT_ROWS rows at a time, so a 32000-token vocabulary never needs a max_batch x vocab buffer).
 *
 * Weights: the model's descriptors (kv_model_weight) in their stored precision, multiplied by the
 * backend's matmul_w op. On a host-memory backend (the CPU) they are used in place, in the mapped
 * checkpoint; elsewhere they are uploaded once: fp32, fp16 and bf16 as stored (rows put in their logical
 * order on the way), ggml's block types and llama2.c's int8 converted to fp32 on the host first (the
 * CUDA backend multiplies the first three only). Token embeddings are converted row by row on the host
 * as tokens come. Norm weights and biases are fp32 arrays.
 *
 * Widths: the attention works in q_dim = n_heads x head_dim, which is the model width dim for
 * llama2.c, Llama 1/2/3 and Qwen2, but not when config.json gives head_dim explicitly (Mistral-Nemo:
 * dim 5120, 32 heads of 128, q_dim 4096): wq maps dim -> q_dim, wo maps q_dim -> dim, and every
 * buffer and stride of Q and of the attention output is q_dim wide.
 */
#include "traces/capture/kv_forward.h"

#include "sim/common/kv_common.h"

#include <math.h>
#include <string.h>

#define LOGIT_ROWS 64

struct kv_fwd {
    const kv_model_t *m;
    kv_backend_t *be;
    int max_tokens, max_batch;
    /* weights in backend memory (aliases of the model's on the CPU backend) */
    kv_layer_weights_t *lw; /* (n_layers) descriptors of backend memory */
    kv_weight_t cls;        /* (vocab_size, dim) */
    kv_weight_t emb;        /* (vocab_size, dim) host memory: rows converted as tokens come */
    const float *rms_att, *rms_ffn, *rms_final;
    const float *bq, *bk, *bv; /* (n_layers, q_dim), (n_layers, kv_dim) x 2; NULL without biases */
    void **wbufs;              /* uploaded weights (non-CPU backends) */
    int n_wbufs;
    size_t weight_bytes;     /* backend memory of uploaded weights */
    float *emb_host;         /* (max_batch, dim) host staging of embedding rows (non-host backends) */
    kv_fwd_stats_t stats_fn; /* kv_fwd_set_stats */
    void *stats_ctx;
    float *k_cache;    /* (n_layers, max_tokens, kv_dim) */
    float *v_cache;    /* (n_layers, max_tokens, kv_dim) */
    float *x, *xb;     /* (max_batch, dim) */
    float *q;          /* (max_batch, q_dim) */
    float *att;        /* (max_batch, q_dim) */
    float *hb, *hb2;   /* (max_batch, hidden_dim) */
    float *lse;        /* (n_heads, max_batch) */
    float *logits;     /* (LOGIT_ROWS, vocab_size) */
    int32_t *pos;      /* (max_batch) backend copy of the positions */
    int32_t *pos_host; /* (max_batch) */
    size_t bytes;
    kv_fwd_attn_fn attn_fn; /* replaces the attention op when set (kv_fwd_set_attention) */
    void *attn_ctx;
};

void kv_fwd_set_attention(kv_fwd_t *f, kv_fwd_attn_fn fn, void *ctx)
{
    f->attn_fn = fn;
    f->attn_ctx = ctx;
}

const kv_model_t *kv_fwd_model(const kv_fwd_t *f)
{
    return f->m;
}
kv_backend_t *kv_fwd_backend(const kv_fwd_t *f)
{
    return f->be;
}
int kv_fwd_max_tokens(const kv_fwd_t *f)
{
    return f->max_tokens;
}
size_t kv_fwd_bytes(const kv_fwd_t *f)
{
    return f->bytes;
}

const float *kv_fwd_k_cache(const kv_fwd_t *f, int layer)
{
    return f->k_cache + (size_t)layer * f->max_tokens * f->m->cfg.kv_dim;
}
const float *kv_fwd_v_cache(const kv_fwd_t *f, int layer)
{
    return f->v_cache + (size_t)layer * f->max_tokens * f->m->cfg.kv_dim;
}

int kv_argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

static void *be_buf(kv_fwd_t *f, size_t n, size_t elem, int *rc)
{
    if (*rc)
        return NULL;
    size_t bytes;
    if (__builtin_mul_overflow(n, elem, &bytes)) {
        *rc = kv_error(KV_ENOMEM, "forward pass buffer of %zu x %zu bytes overflows", n, elem);
        return NULL;
    }
    void *p = kv_be_alloc(f->be, bytes);
    if (!p)
        *rc = KV_ENOMEM;
    else
        f->bytes += bytes;
    return p;
}

/* One buffer of backend memory holding `bytes` copied from host memory. */
static void *upload_buf(kv_fwd_t *f, const void *src, size_t bytes, int *rc)
{
    if (*rc)
        return NULL;
    void **list = kv_realloc(f->wbufs, sizeof *list * (size_t)(f->n_wbufs + 1), "weight buffers");
    if (!list) {
        *rc = KV_ENOMEM;
        return NULL;
    }
    f->wbufs = list;
    void *p = be_buf(f, bytes ? bytes : 1, 1, rc);
    if (!p)
        return NULL;
    f->wbufs[f->n_wbufs++] = p;
    f->weight_bytes += bytes;
    if (bytes && (*rc = f->be->ops->upload(f->be, p, src, bytes)))
        return NULL;
    return p;
}

/* A weight matrix to the backend: fp32/fp16/bf16 as stored with rows in their logical order, any other
 * type converted to fp32 first. *dst describes the copy. Staging: a host buffer of up to 64 MiB. */
static int upload_weight(kv_fwd_t *f, const kv_weight_t *w, kv_weight_t *dst)
{
    int rc = KV_OK;
    const int keep = w->type == KV_WT_F32 || w->type == KV_WT_F16 || w->type == KV_WT_BF16;
    *dst = *w;
    if (keep && w->perm <= 0) {
        dst->data = upload_buf(f, w->data, kv_weight_bytes(w), &rc);
        return rc;
    }
    kv_weight_t out = keep ? *w : kv_weight_f32(NULL, w->rows, w->cols);
    out.perm = 0, out.scales = NULL, out.group = 0;
    const size_t row_out = keep ? w->row_bytes : (size_t)w->cols * sizeof(float);
    unsigned char *stage = kv_malloc(row_out * (size_t)w->rows, "weight staging");
    if (!stage)
        return kv_error_context(KV_ENOMEM, "uploading a %d x %d weight", w->rows, w->cols);
    for (int r = 0; r < w->rows; r++) {
        if (keep) /* a reordered row of stored bytes */
            memcpy(stage + (size_t)r * row_out,
                   (const unsigned char *)w->data + (size_t)kv_weight_row(w, r) * w->row_bytes, row_out);
        else
            kv_weight_rows(w, r, 1, (float *)(void *)(stage + (size_t)r * row_out));
    }
    out.data = upload_buf(f, stage, row_out * (size_t)w->rows, &rc);
    out.row_bytes = row_out;
    kv_free(stage);
    *dst = out;
    return rc;
}

/* The weights to the backend: every matrix (upload_weight), the fp32 norms and biases. */
static int upload_weights(kv_fwd_t *f)
{
    const kv_model_t *m = f->m;
    const kv_model_config_t *c = &m->cfg;
    const size_t L = (size_t)c->n_layers, D = (size_t)c->dim, KV = (size_t)c->kv_dim, Q = (size_t)c->q_dim;
    const size_t nb = c->qkv_bias ? 1 : 0;
    int rc = KV_OK;
    for (int l = 0; l < c->n_layers && rc == KV_OK; l++)
        for (int k = 0; k < KV_MW_N && rc == KV_OK; k++) {
            const kv_weight_t w = kv_model_weight(m, l, k);
            rc = upload_weight(f, &w, &f->lw[l].w[k]);
        }
    const kv_weight_t cls = kv_model_classifier(m);
    if (rc == KV_OK)
        rc = upload_weight(f, &cls, &f->cls);
    f->rms_att = upload_buf(f, m->rms_att, L * D * sizeof(float), &rc);
    f->rms_ffn = upload_buf(f, m->rms_ffn, L * D * sizeof(float), &rc);
    f->rms_final = upload_buf(f, m->rms_final, D * sizeof(float), &rc);
    if (nb) {
        f->bq = upload_buf(f, m->bq, L * Q * sizeof(float), &rc);
        f->bk = upload_buf(f, m->bk, L * KV * sizeof(float), &rc);
        f->bv = upload_buf(f, m->bv, L * KV * sizeof(float), &rc);
    }
    if (rc)
        return kv_error_context(rc, "uploading %s's weights to the %s backend", m->path, f->be->name);
    return KV_OK;
}

void kv_fwd_set_stats(kv_fwd_t *f, kv_fwd_stats_t fn, void *ctx)
{
    f->stats_fn = fn;
    f->stats_ctx = ctx;
}

void kv_fwd_memory(const kv_fwd_t *f, kv_fwd_mem_t *out)
{
    const kv_model_config_t *c = &f->m->cfg;
    memset(out, 0, sizeof *out);
    out->weights = f->weight_bytes;
    out->cache = 2 * (size_t)c->n_layers * (size_t)f->max_tokens * (size_t)c->kv_dim * sizeof(float);
    out->activations = f->bytes - out->weights - out->cache;
    if (f->emb_host)
        out->activations += (size_t)f->max_batch * (size_t)c->dim * sizeof(float);
}

int kv_fwd_create(const kv_model_t *m, kv_backend_t *be, int max_tokens, int max_batch, kv_fwd_t **out)
{
    *out = NULL;
    const kv_model_config_t *c = &m->cfg;
    const kv_backend_ops_t *o = be->ops;
    const struct {
        const void *fn;
        const char *name;
    } need[] = {{(const void *)o->matmul_w, "matmul_w"}, {(const void *)o->rmsnorm, "rmsnorm"},
                {(const void *)o->rope, "rope"},         {(const void *)o->swiglu, "swiglu"},
                {(const void *)o->add, "add"},           {(const void *)o->attention, "attention"}};
    for (size_t i = 0; i < KV_ARRAY_LEN(need); i++)
        if (!need[i].fn)
            return kv_error(KV_ENOTIMPL, "backend %s has no '%s' op (needed by the forward pass)", be->name,
                            need[i].name);
    if (c->qkv_bias && !o->add_bias)
        return kv_error(KV_ENOTIMPL, "backend %s has no 'add_bias' op (needed by %s's q/k/v biases)", be->name,
                        m->path);
    if (c->qkv_bias && (!m->bq || !m->bk || !m->bv))
        return kv_error(KV_EINVAL, "%s: the configuration has q/k/v biases but the model holds none", m->path);
    if (c->q_dim != c->n_heads * c->head_dim || c->kv_dim != c->n_kv_heads * c->head_dim)
        return kv_error(KV_EINVAL, "%s: q_dim %d / kv_dim %d do not match %d heads (%d KV heads) of %d", m->path,
                        c->q_dim, c->kv_dim, c->n_heads, c->n_kv_heads, c->head_dim);
    if (max_tokens <= 0 || max_tokens > c->seq_len)
        return kv_error(KV_ERANGE, "%s: %d tokens do not fit the model's context of %d (seq_len)", m->path, max_tokens,
                        c->seq_len);
    if (max_batch <= 0 || max_batch > max_tokens)
        max_batch = max_tokens;
    kv_fwd_t *f = kv_calloc(1, sizeof *f, "forward pass");
    if (!f)
        return KV_ENOMEM;
    f->m = m;
    f->be = be;
    f->max_tokens = max_tokens;
    f->max_batch = max_batch;
    int rc = KV_OK;
    f->emb = kv_model_embedding(m);
    f->lw = kv_calloc((size_t)c->n_layers, sizeof *f->lw, "layer weights");
    if (!f->lw) {
        rc = KV_ENOMEM;
        goto fail;
    }
    if (be->host_memory) { /* the model's host weights are backend memory already */
        for (int l = 0; l < c->n_layers; l++)
            for (int k = 0; k < KV_MW_N; k++)
                f->lw[l].w[k] = kv_model_weight(m, l, k);
        f->cls = kv_model_classifier(m);
        f->rms_att = m->rms_att, f->rms_ffn = m->rms_ffn, f->rms_final = m->rms_final;
        f->bq = m->bq, f->bk = m->bk, f->bv = m->bv;
    } else if ((rc = upload_weights(f))) {
        goto fail;
    }
    const size_t cache = (size_t)c->n_layers * (size_t)max_tokens * (size_t)c->kv_dim;
    const size_t B = (size_t)max_batch;
    f->k_cache = be_buf(f, cache, sizeof(float), &rc);
    f->v_cache = be_buf(f, cache, sizeof(float), &rc);
    f->x = be_buf(f, B * c->dim, sizeof(float), &rc);
    f->xb = be_buf(f, B * c->dim, sizeof(float), &rc);
    f->q = be_buf(f, B * c->q_dim, sizeof(float), &rc);
    f->att = be_buf(f, B * c->q_dim, sizeof(float), &rc);
    f->hb = be_buf(f, B * c->hidden_dim, sizeof(float), &rc);
    f->hb2 = be_buf(f, B * c->hidden_dim, sizeof(float), &rc);
    f->lse = be_buf(f, B * c->n_heads, sizeof(float), &rc);
    f->logits = be_buf(f, (size_t)LOGIT_ROWS * c->vocab_size, sizeof(float), &rc);
    f->pos = be_buf(f, B, sizeof(int32_t), &rc);
    if (rc)
        goto fail;
    f->pos_host = kv_malloc(B * sizeof(int32_t), "positions");
    if (!be->host_memory)
        f->emb_host = kv_malloc(B * (size_t)c->dim * sizeof(float), "embedding rows");
    if (!f->pos_host || (!be->host_memory && !f->emb_host)) {
        rc = KV_ENOMEM;
        goto fail;
    }
    *out = f;
    return KV_OK;
fail:
    kv_fwd_free(f);
    return rc ? rc : KV_ENOMEM;
}

void kv_fwd_free(kv_fwd_t *f)
{
    if (!f)
        return;
    void *bufs[] = {f->k_cache, f->v_cache, f->x, f->xb, f->q, f->att, f->hb, f->hb2, f->lse, f->logits, f->pos};
    for (size_t i = 0; i < KV_ARRAY_LEN(bufs); i++)
        kv_be_free(f->be, bufs[i]);
    for (int i = 0; i < f->n_wbufs; i++)
        kv_be_free(f->be, f->wbufs[i]);
    kv_free(f->wbufs);
    kv_free(f->lw);
    kv_free(f->emb_host);
    kv_free(f->pos_host);
    kv_free(f);
}

#define TRY(call)                                                                                                      \
    do {                                                                                                               \
        if ((rc = (call)) != KV_OK)                                                                                    \
            return rc;                                                                                                 \
    } while (0)

/* One block of nb <= max_batch tokens at positions pos0... */
static int run_block(kv_fwd_t *f, const int32_t *tokens, int nb, int pos0, float *logits, int logit_row0,
                     kv_fwd_hook_t hook, void *hook_ctx)
{
    const kv_model_t *m = f->m;
    const kv_model_config_t *c = &m->cfg;
    kv_backend_t *be = f->be;
    const kv_backend_ops_t *o = be->ops;
    const int D = c->dim, H = c->hidden_dim, KV = c->kv_dim, hd = c->head_dim, Q = c->q_dim;
    const size_t Dz = (size_t)D, Qz = (size_t)Q;
    int rc;
    /* the tokens' embedding rows, converted on the host (straight into x on a host-memory backend) */
    float *xh = be->host_memory ? f->x : f->emb_host;
    for (int i = 0; i < nb; i++) {
        f->pos_host[i] = pos0 + i;
        kv_weight_rows(&f->emb, tokens[i], 1, xh + (size_t)i * Dz);
    }
    if (!be->host_memory)
        TRY(o->upload(be, f->x, xh, (size_t)nb * Dz * sizeof(float)));
    TRY(o->upload(be, f->pos, f->pos_host, (size_t)nb * sizeof(int32_t)));
    for (int l = 0; l < c->n_layers; l++) {
        const size_t lc = (size_t)l * f->max_tokens * KV;
        float *kc = f->k_cache + lc, *vc = f->v_cache + lc; /* (max_tokens, kv_dim) */
        TRY(o->rmsnorm(be, f->xb, f->x, f->rms_att + (size_t)l * Dz, nb, D, c->norm_eps));
        float *kn = kc + (size_t)pos0 * KV, *vn = vc + (size_t)pos0 * KV; /* (nb, kv_dim): this block's rows */
        const kv_weight_t *w = f->lw[l].w;
        TRY(o->matmul_w(be, f->q, f->xb, &w[KV_MW_Q], nb));
        TRY(o->matmul_w(be, kn, f->xb, &w[KV_MW_K], nb));
        TRY(o->matmul_w(be, vn, f->xb, &w[KV_MW_V], nb));
        if (c->qkv_bias) { /* Qwen2: q, k, v = xb w^T + b, before RoPE */
            TRY(o->add_bias(be, f->q, f->bq + (size_t)l * Qz, nb, Q));
            TRY(o->add_bias(be, kn, f->bk + (size_t)l * KV, nb, KV));
            TRY(o->add_bias(be, vn, f->bv + (size_t)l * KV, nb, KV));
        }
        TRY(o->rope(be, f->q, f->pos, nb, c->n_heads, hd, &c->rope));
        TRY(o->rope(be, kn, f->pos, nb, c->n_kv_heads, hd, &c->rope));
        kv_attn_args_t a = {
            .out = f->att,
            .lse = f->lse,
            .q = f->q,
            .k = kc,
            .v = vc,
            .kv_stride = (size_t)KV,
            .n_q = nb,
            .q_pos0 = pos0,
            .n_heads = c->n_heads,
            .n_kv_heads = c->n_kv_heads,
            .head_dim = hd,
            .scale = (float)(1.0 / sqrt((double)hd)),
        };
        kv_attn_stats_args_t st;
        if (f->stats_fn) { /* statistics of the same scores, computed by the attention op */
            memset(&st, 0, sizeof st);
            TRY(f->stats_fn(f->stats_ctx, l, nb, pos0, &st));
            a.stats = &st;
        }
        if (f->attn_fn && a.stats) /* an override attends over another cache: no statistics of this one */
            return kv_error(KV_EINVAL, "forward: an attention override and trace statistics cannot go together");
        TRY(f->attn_fn ? f->attn_fn(f->attn_ctx, l, &a) : o->attention(be, &a));
        if (hook) {
            kv_fwd_layer_t v = {l, nb, pos0, f->q, kc, vc, (size_t)KV, f->lse};
            TRY(hook(hook_ctx, &v));
        }
        TRY(o->matmul_w(be, f->xb, f->att, &w[KV_MW_O], nb));
        TRY(o->add(be, f->x, f->xb, (size_t)nb * Dz));
        TRY(o->rmsnorm(be, f->xb, f->x, f->rms_ffn + (size_t)l * Dz, nb, D, c->norm_eps));
        TRY(o->matmul_w(be, f->hb, f->xb, &w[KV_MW_GATE], nb));
        TRY(o->matmul_w(be, f->hb2, f->xb, &w[KV_MW_UP], nb));
        TRY(o->swiglu(be, f->hb, f->hb2, (size_t)nb * H));
        TRY(o->matmul_w(be, f->xb, f->hb, &w[KV_MW_DOWN], nb));
        TRY(o->add(be, f->x, f->xb, (size_t)nb * Dz));
    }
    if (!logits || logit_row0 >= nb)
        return KV_OK;
    /* rows [logit_row0, nb) of this block become logits rows [0, nb - logit_row0) */
    const int nr = nb - logit_row0;
    const size_t V = (size_t)c->vocab_size;
    TRY(o->rmsnorm(be, f->xb + (size_t)logit_row0 * Dz, f->x + (size_t)logit_row0 * Dz, f->rms_final, nr, D,
                   c->norm_eps));
    for (int r = 0; r < nr; r += LOGIT_ROWS) {
        int cnt = KV_MIN(LOGIT_ROWS, nr - r);
        TRY(o->matmul_w(be, f->logits, f->xb + (size_t)(logit_row0 + r) * Dz, &f->cls, cnt));
        TRY(o->download(be, logits + (size_t)r * V, f->logits, (size_t)cnt * V * sizeof(float)));
    }
    return KV_OK;
}

int kv_fwd_run(kv_fwd_t *f, const int32_t *tokens, int n, int pos0, float *logits, int all_logits, kv_fwd_hook_t hook,
               void *hook_ctx)
{
    const kv_model_config_t *c = &f->m->cfg;
    if (n <= 0 || pos0 < 0 || pos0 > f->max_tokens - n)
        return kv_error(KV_ERANGE, "forward: tokens [%d, %lld) outside the KV cache of %d tokens", pos0,
                        (long long)pos0 + n, f->max_tokens); /* in 64 bits: pos0 may be near INT_MAX */
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab_size)
            return kv_error(KV_ERANGE, "forward: token id %d at position %d outside the vocabulary [0, %d)", tokens[i],
                            pos0 + i, c->vocab_size);
    int rc = KV_OK;
    for (int b0 = 0; b0 < n; b0 += f->max_batch) {
        const int nb = KV_MIN(f->max_batch, n - b0);
        const int last = b0 + nb == n;
        float *lg = NULL;
        int row0 = nb;
        if (logits && all_logits) {
            lg = logits + (size_t)b0 * c->vocab_size;
            row0 = 0;
        } else if (logits && last) {
            lg = logits;
            row0 = nb - 1;
        }
        if ((rc = run_block(f, tokens + b0, nb, pos0 + b0, lg, row0, hook, hook_ctx)))
            return rc;
    }
    return KV_OK;
}
