/*
 * forward.c: the Llama forward pass over the backend op table (see kv_forward.h).
 *
 * Memory: the KV cache (2 x n_layers x max_tokens x kv_dim floats), activations for one block of
 * max_batch tokens (x, xb: max_batch x dim; q, att: max_batch x q_dim; hb, hb2: max_batch x
 * hidden_dim), the lse of one block and LOGIT_ROWS rows of logits (all-token logits are produced
 * LOGIT_ROWS rows at a time, so a 32000-token vocabulary never needs a max_batch x vocab buffer).
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
    const float *rms_att, *wq, *wk, *wv, *wo, *rms_ffn, *w1, *w2, *w3, *rms_final, *wcls;
    const float *bq, *bk, *bv; /* (n_layers, q_dim), (n_layers, kv_dim) x 2; NULL without biases */
    float *wbuf;               /* uploaded weights (non-CPU backends) */
    float *k_cache;            /* (n_layers, max_tokens, kv_dim) */
    float *v_cache;            /* (n_layers, max_tokens, kv_dim) */
    float *x, *xb;             /* (max_batch, dim) */
    float *q;                  /* (max_batch, q_dim) */
    float *att;                /* (max_batch, q_dim) */
    float *hb, *hb2;           /* (max_batch, hidden_dim) */
    float *lse;                /* (n_heads, max_batch) */
    float *logits;             /* (LOGIT_ROWS, vocab_size) */
    int32_t *pos;              /* (max_batch) backend copy of the positions */
    int32_t *pos_host;         /* (max_batch) */
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

/* Copy the weights to the backend (one block, model order). */
static int upload_weights(kv_fwd_t *f)
{
    const kv_model_t *m = f->m;
    const kv_model_config_t *c = &m->cfg;
    const size_t L = (size_t)c->n_layers, D = (size_t)c->dim, H = (size_t)c->hidden_dim, KV = (size_t)c->kv_dim;
    const size_t V = (size_t)c->vocab_size, Q = (size_t)c->q_dim, nb = c->qkv_bias ? 1 : 0;
    struct {
        const float *src;
        size_t n;
        const float **dst;
    } t[] = {
        {m->rms_att, L * D, &f->rms_att}, {m->wq, L * Q * D, &f->wq},   {m->wk, L * KV * D, &f->wk},
        {m->wv, L * KV * D, &f->wv},      {m->wo, L * D * Q, &f->wo},   {m->rms_ffn, L * D, &f->rms_ffn},
        {m->w1, L * H * D, &f->w1},       {m->w2, L * D * H, &f->w2},   {m->w3, L * H * D, &f->w3},
        {m->rms_final, D, &f->rms_final}, {m->wcls, V * D, &f->wcls},   {m->bq, nb * L * Q, &f->bq},
        {m->bk, nb * L * KV, &f->bk},     {m->bv, nb * L * KV, &f->bv},
    };
    size_t total = 0;
    for (size_t i = 0; i < KV_ARRAY_LEN(t); i++)
        total += t[i].n;
    int rc = KV_OK;
    f->wbuf = be_buf(f, total, sizeof(float), &rc);
    if (rc)
        return kv_error_context(rc, "uploading %zu weights to the %s backend", total, f->be->name);
    size_t off = 0;
    for (size_t i = 0; i < KV_ARRAY_LEN(t); i++) {
        if (!t[i].n)
            continue; /* no biases: the pointer stays NULL */
        if ((rc = f->be->ops->upload(f->be, f->wbuf + off, t[i].src, t[i].n * sizeof(float))))
            return rc;
        *t[i].dst = f->wbuf + off;
        off += t[i].n;
    }
    return KV_OK;
}

int kv_fwd_create(const kv_model_t *m, kv_backend_t *be, int max_tokens, int max_batch, kv_fwd_t **out)
{
    *out = NULL;
    const kv_model_config_t *c = &m->cfg;
    const kv_backend_ops_t *o = be->ops;
    const struct {
        const void *fn;
        const char *name;
    } need[] = {{(const void *)o->matmul, "matmul"}, {(const void *)o->rmsnorm, "rmsnorm"},
                {(const void *)o->rope, "rope"},     {(const void *)o->swiglu, "swiglu"},
                {(const void *)o->add, "add"},       {(const void *)o->attention, "attention"}};
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
    if (be->host_memory) { /* the model's host weights are backend memory already */
        f->rms_att = m->rms_att, f->wq = m->wq, f->wk = m->wk, f->wv = m->wv, f->wo = m->wo;
        f->rms_ffn = m->rms_ffn, f->w1 = m->w1, f->w2 = m->w2, f->w3 = m->w3;
        f->rms_final = m->rms_final, f->wcls = m->wcls;
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
    if (!f->pos_host) {
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
    void *bufs[] = {f->wbuf, f->k_cache, f->v_cache, f->x,   f->xb,     f->q,
                    f->att,  f->hb,      f->hb2,     f->lse, f->logits, f->pos};
    for (size_t i = 0; i < KV_ARRAY_LEN(bufs); i++)
        kv_be_free(f->be, bufs[i]);
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
    for (int i = 0; i < nb; i++) {
        f->pos_host[i] = pos0 + i;
        TRY(o->upload(be, f->x + (size_t)i * Dz, m->token_embedding + (size_t)tokens[i] * Dz, Dz * sizeof(float)));
    }
    TRY(o->upload(be, f->pos, f->pos_host, (size_t)nb * sizeof(int32_t)));
    for (int l = 0; l < c->n_layers; l++) {
        const size_t lc = (size_t)l * f->max_tokens * KV;
        float *kc = f->k_cache + lc, *vc = f->v_cache + lc; /* (max_tokens, kv_dim) */
        TRY(o->rmsnorm(be, f->xb, f->x, f->rms_att + (size_t)l * Dz, nb, D, c->norm_eps));
        float *kn = kc + (size_t)pos0 * KV, *vn = vc + (size_t)pos0 * KV; /* (nb, kv_dim): this block's rows */
        TRY(o->matmul(be, f->q, f->xb, f->wq + (size_t)l * Qz * Dz, nb, Q, D));
        TRY(o->matmul(be, kn, f->xb, f->wk + (size_t)l * KV * Dz, nb, KV, D));
        TRY(o->matmul(be, vn, f->xb, f->wv + (size_t)l * KV * Dz, nb, KV, D));
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
        TRY(f->attn_fn ? f->attn_fn(f->attn_ctx, l, &a) : o->attention(be, &a));
        if (hook) {
            kv_fwd_layer_t v = {l, nb, pos0, f->q, kc, vc, (size_t)KV, f->lse};
            TRY(hook(hook_ctx, &v));
        }
        TRY(o->matmul(be, f->xb, f->att, f->wo + (size_t)l * Dz * Qz, nb, D, Q));
        TRY(o->add(be, f->x, f->xb, (size_t)nb * Dz));
        TRY(o->rmsnorm(be, f->xb, f->x, f->rms_ffn + (size_t)l * Dz, nb, D, c->norm_eps));
        TRY(o->matmul(be, f->hb, f->xb, f->w1 + (size_t)l * H * Dz, nb, H, D));
        TRY(o->matmul(be, f->hb2, f->xb, f->w3 + (size_t)l * H * Dz, nb, H, D));
        TRY(o->swiglu(be, f->hb, f->hb2, (size_t)nb * H));
        TRY(o->matmul(be, f->xb, f->hb, f->w2 + (size_t)l * Dz * H, nb, D, H));
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
        TRY(o->matmul(be, f->logits, f->xb + (size_t)(logit_row0 + r) * Dz, f->wcls, cnt, c->vocab_size, D));
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
