/*
 * capture.c: prompt -> forward pass -> attention trace (see kv_capture.h).
 *
 * Everything the forward pass produces lives in backend memory; this file moves what the trace
 * needs to the host with the backend's download op, so the same code serves the CPU and CUDA
 * backends. Layouts: the forward pass is token-major ((T, heads, head_dim) and the (T, kv_dim) KV
 * cache), the trace is head-major ((heads, T, head_dim)); `to_head_major` converts one slab.
 */
#include "traces/capture/kv_capture.h"

#include "kernels/kv_backend.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/common/kv_output.h"
#include "traces/capture/kv_eval.h"
#include "traces/capture/kv_forward.h"
#include "traces/capture/kv_model.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void kv_capture_opts_init(kv_capture_opts_t *o)
{
    memset(o, 0, sizeof *o);
    o->n_decode = 64;
    o->dtype = KV_DTYPE_F16;
    o->segments = "auto";
    o->pool = KV_TRACE_DEFAULT_POOL;
    o->zstd_level = 3;
    o->backend = "auto";
    o->q_tail = -1;
}

/* ---- prompt tokenisation ---- */

static int append(int32_t **a, int *n, int *cap, const int32_t *src, int m)
{
    if (*n + m > *cap) {
        int c = KV_MAX(*cap * 2, *n + m);
        int32_t *g = kv_realloc(*a, sizeof(int32_t) * (size_t)c, "prompt tokens");
        if (!g)
            return KV_ENOMEM;
        *a = g;
        *cap = c;
    }
    memcpy(*a + *n, src, sizeof(int32_t) * (size_t)m);
    *n += m;
    return KV_OK;
}

static int parse_offsets(const char *spec, int n_prompt, int32_t **segs, int *n_segs)
{
    int cap = 8, n = 0, rc = KV_OK;
    int32_t *s = kv_malloc(sizeof(int32_t) * (size_t)cap, "segments");
    if (!s)
        return KV_ENOMEM;
    s[n++] = 0; /* implied */
    const char *p = spec;
    int first = 1;
    for (;;) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || (*end && *end != ',') || (*end == ',' && !end[1])) {
            rc = kv_error(KV_EINVAL, "--segments: '%s' is not auto, none or a comma list of token offsets", spec);
            goto fail;
        }
        if (v < 0 || v >= n_prompt) {
            rc = kv_error(KV_ERANGE, "--segments: offset %ld outside the prompt's %d tokens", v, n_prompt);
            goto fail;
        }
        if (!(first && v == 0)) { /* a leading 0 repeats the implied start */
            if (v <= s[n - 1]) {
                rc = kv_error(KV_EINVAL, "--segments: offsets must ascend (%ld after %d)", v, s[n - 1]);
                goto fail;
            }
            if (n == cap) {
                int32_t *g = kv_realloc(s, sizeof(int32_t) * (size_t)cap * 2, "segments");
                if (!g) {
                    rc = KV_ENOMEM;
                    goto fail;
                }
                s = g;
                cap *= 2;
            }
            s[n++] = (int32_t)v;
        }
        first = 0;
        if (!*end)
            break;
        p = end + 1;
    }
    *segs = s;
    *n_segs = n;
    return KV_OK;
fail:
    kv_free(s);
    return rc;
}

int kv_capture_tokenize(const kv_tokenizer_t *tok, const char *text, const char *segments, int32_t **tokens,
                        int *n_tokens, int32_t **segs, int *n_segs)
{
    *tokens = NULL;
    *segs = NULL;
    *n_tokens = *n_segs = 0;
    if (!segments)
        segments = "auto";
    const size_t len = strlen(text);
    int rc;
    if (!strcmp(segments, "auto") && strstr(text, KV_DOC_SEPARATOR)) {
        kv_doc_t *docs;
        int nd, n = 0, cap = 0;
        int32_t *all = NULL, *ids = NULL, *starts = NULL;
        if ((rc = kv_split_docs(text, len, &docs, &nd)))
            return rc;
        if (nd == 0) {
            kv_free(docs);
            return kv_error(KV_EINVAL, "the prompt holds only <|endoftext|> separators and no text");
        }
        starts = kv_malloc(sizeof(int32_t) * (size_t)nd, "segments");
        if (!starts) {
            kv_free(docs);
            return KV_ENOMEM;
        }
        for (int d = 0; d < nd; d++) {
            int m;
            if ((rc = kv_tokenizer_encode(tok, docs[d].text, docs[d].len, tok->add_bos, 0, &ids, &m)))
                break;
            starts[d] = n;
            rc = append(&all, &n, &cap, ids, m);
            kv_free(ids);
            ids = NULL;
            if (rc)
                break;
        }
        kv_free(docs);
        if (rc) {
            kv_free(all);
            kv_free(starts);
            return rc;
        }
        *tokens = all;
        *n_tokens = n;
        *segs = starts;
        *n_segs = nd;
        return KV_OK;
    }
    if ((rc = kv_tokenizer_encode(tok, text, len, tok->add_bos, 0, tokens, n_tokens)))
        return rc;
    if (*n_tokens == 0) { /* an empty prompt of a model that adds no BOS: BOS alone when it has one */
        if (tok->bos_id < 0) {
            kv_free(*tokens);
            *tokens = NULL;
            return kv_error(KV_EINVAL, "the prompt encodes to no tokens (and %s has no BOS token)", tok->path);
        }
        kv_free(*tokens);
        if (!(*tokens = kv_malloc(sizeof(int32_t), "tokens")))
            return KV_ENOMEM;
        (*tokens)[0] = tok->bos_id;
        *n_tokens = 1;
    }
    if (!strcmp(segments, "auto") || !strcmp(segments, "none"))
        return KV_OK;
    if ((rc = parse_offsets(segments, *n_tokens, segs, n_segs))) {
        kv_free(*tokens);
        *tokens = NULL;
        *n_tokens = 0;
    }
    return rc;
}

/* ---- the capture ---- */

/* Per-query summaries and statistics: the attn_stats outputs of one block (backend memory, (n_heads,
 * n_prompt)) and every layer's (host memory, (n_layers, n_heads, T)). */
enum { ROW_ENT, ROW_K90, ROW_SINK, ROW_SEG, N_ROW };
static const kv_tensor_t row_tensor[N_ROW] = {KV_T_ENTROPY, KV_T_KEYS90, KV_T_SINK, KV_T_SEG};
/* Per-key statistics of one layer's prompt queries (backend memory, (n_heads, T)), in this order. */
enum { N_COL = 6 };
static const kv_tensor_t col_tensor[N_COL] = {KV_T_ACC,      KV_T_ACC_SQ,      KV_T_MAX,
                                              KV_T_ACC_HEAD, KV_T_ACC_SQ_HEAD, KV_T_MAX_HEAD};

typedef struct {
    kv_trace_writer_t *w;
    kv_backend_t *be;
    const kv_model_config_t *c;
    int T, n_prompt, n_decode, pool, stats_split;
    float scale;
    /* backend memory */
    float *col[N_COL]; /* (n_heads, T) per-key statistics of the layer being prefilled */
    float *pooled;     /* (n_layers, n_heads, pool, pool) */
    float *row[N_ROW]; /* (n_heads, n_prompt) per-query outputs of one block */
    int32_t *seg_lo;   /* (T) first token of each token's segment */
    /* host memory */
    float *lse_all;        /* (n_layers, n_heads, T) */
    float *row_all[N_ROW]; /* (n_layers, n_heads, T) */
    float *dec_q;          /* (n_layers, n_decode, n_heads*head_dim) decode queries, token-major */
    float *tm;       /* (max(n_prompt, n_decode), q_dim) token-major staging (Q rows; K/V rows are kv_dim <= q_dim) */
    float *hm;       /* (max(n_prompt, n_decode), q_dim) head-major staging */
    float *small;    /* (n_heads, max(n_prompt, 1)) */
    float *host_col; /* (n_heads, T) staging of one per-key statistic */
    kv_progress_t prog;
    long done;
} cap_t;

static int zero_be(kv_backend_t *be, float *p, size_t n)
{
    float *z = kv_calloc(n ? n : 1, sizeof(float), "zeros");
    if (!z)
        return KV_ENOMEM;
    int rc = be->ops->upload(be, p, z, n * sizeof(float));
    kv_free(z);
    return rc;
}

/* (n, heads, d) -> (heads, n, d) */
static void to_head_major(const float *src, float *dst, int n, int heads, int d)
{
    for (int t = 0; t < n; t++)
        for (int h = 0; h < heads; h++)
            memcpy(dst + ((size_t)h * n + t) * d, src + ((size_t)t * heads + h) * d, sizeof(float) * (size_t)d);
}

/* Rows [t0, t0+n) of a token-major tensor in backend memory (row stride = heads*d) -> trace rows. */
static int write_slab(cap_t *s, int layer, kv_tensor_t which, const float *be_src, int t0, int n, int heads)
{
    const int d = s->c->head_dim;
    int rc = s->be->ops->download(s->be, s->tm, be_src, sizeof(float) * (size_t)n * heads * d);
    if (rc)
        return rc;
    to_head_major(s->tm, s->hm, n, heads, d);
    return kv_trace_write_rows(s->w, layer, which, t0, n, s->hm);
}

static int cap_hook(void *ctx, const kv_fwd_layer_t *L)
{
    cap_t *s = ctx;
    const kv_model_config_t *c = s->c;
    const int l = L->layer, H = c->n_heads, n = L->n_q, p0 = L->q_pos0, T = s->T;
    const int prefill = p0 < s->n_prompt;
    int rc;
    /* the per-key statistics sum over the prompt queries, all of them in this one call */
    if (prefill && (p0 != 0 || n != s->n_prompt))
        return kv_error(KV_EINTERNAL, "capture: the prompt was prefilled in pieces ([%d, %d) of %d tokens)", p0, p0 + n,
                        s->n_prompt);
    for (int k = 0; k < N_COL && prefill; k++)
        if ((rc = zero_be(s->be, s->col[k], (size_t)H * T)))
            return rc;
    kv_attn_stats_args_t a = {
        .q = L->q,
        .k = L->k_cache,
        .lse = L->lse,
        .kv_stride = L->kv_stride,
        .n_q = n,
        .q_pos0 = p0,
        .n_heads = H,
        .n_kv_heads = c->n_kv_heads,
        .head_dim = c->head_dim,
        .scale = s->scale,
        .entropy = s->row[ROW_ENT],
        .acc = prefill ? s->col[0] : NULL, /* H2O's score and the others: prompt queries only */
        .acc_stride = (size_t)T,
        .pooled = s->pooled + (size_t)l * H * s->pool * s->pool,
        .pool = s->pool,
        .pool_T = T,
        .acc_sq = prefill ? s->col[1] : NULL,
        .acc_max = prefill ? s->col[2] : NULL,
        .acc_head = prefill ? s->col[3] : NULL,
        .acc_sq_head = prefill ? s->col[4] : NULL,
        .acc_max_head = prefill ? s->col[5] : NULL,
        .head_end = s->stats_split,
        .keys_mass = s->row[ROW_K90],
        .mass = (float)KV_TRACE_KEYS_MASS,
        .sink = s->row[ROW_SINK],
        .seg = s->row[ROW_SEG],
        .seg_lo = s->seg_lo,
    };
    rc = s->be->ops->attn_stats(s->be, &a);
    if (rc)
        return kv_error_context(rc, "layer %d summaries", l);
    /* per-query outputs of these queries: (H, n) -> columns [p0, p0+n) of (H, T) */
    for (int k = -1; k < N_ROW; k++) {
        float *dst = (k < 0 ? s->lse_all : s->row_all[k]) + (size_t)l * H * T;
        if ((rc = s->be->ops->download(s->be, s->small, k < 0 ? L->lse : s->row[k], sizeof(float) * (size_t)H * n)))
            return rc;
        for (int h = 0; h < H; h++)
            memcpy(dst + (size_t)h * T + p0, s->small + (size_t)h * n, sizeof(float) * (size_t)n);
    }
    if (prefill) {
        /* the layer's per-key statistics are complete: to the file, the buffers serve the next layer */
        for (int k = 0; k < N_COL; k++)
            if ((rc = s->be->ops->download(s->be, s->host_col, s->col[k], sizeof(float) * (size_t)H * T)) ||
                (rc = kv_trace_write(s->w, l, col_tensor[k], s->host_col)))
                return rc;
        /* this layer's prompt slab goes to the file now */
        const float *krows = L->k_cache + (size_t)p0 * L->kv_stride, *vrows = L->v_cache + (size_t)p0 * L->kv_stride;
        if ((rc = write_slab(s, l, KV_T_Q, L->q, p0, n, H)) ||
            (rc = write_slab(s, l, KV_T_K, krows, p0, n, c->n_kv_heads)) ||
            (rc = write_slab(s, l, KV_T_V, vrows, p0, n, c->n_kv_heads)))
            return rc;
        s->done++;
        char detail[64];
        snprintf(detail, sizeof detail, "prefill layer %d/%d", l + 1, c->n_layers);
        kv_progress_update(&s->prog, s->done, detail);
    } else {
        const size_t qd = (size_t)c->q_dim; /* n_heads * head_dim */
        float *q = s->dec_q + ((size_t)l * s->n_decode + (size_t)(p0 - s->n_prompt)) * qd;
        if ((rc = s->be->ops->download(s->be, q, L->q, sizeof(float) * qd * (size_t)n)))
            return rc;
    }
    return KV_OK;
}

/* Decode rows, summaries and W_O of every layer, at the end. */
static int write_rest(cap_t *s, kv_fwd_t *f, const kv_model_t *m, int with_wo)
{
    const kv_model_config_t *c = s->c;
    const int H = c->n_heads, T = s->T, N = s->n_decode, np = s->n_prompt, P = s->pool;
    int rc = KV_OK;
    float *host = kv_malloc(sizeof(float) * (size_t)H * KV_MAX((size_t)T, (size_t)P * P), "summary staging");
    if (!host)
        return KV_ENOMEM;
    for (int l = 0; l < c->n_layers && rc == KV_OK; l++) {
        if (N > 0) {
            to_head_major(s->dec_q + (size_t)l * N * H * c->head_dim, s->hm, N, H, c->head_dim);
            if ((rc = kv_trace_write_rows(s->w, l, KV_T_Q, np, N, s->hm)) ||
                (rc = write_slab(s, l, KV_T_K, kv_fwd_k_cache(f, l) + (size_t)np * c->kv_dim, np, N, c->n_kv_heads)) ||
                (rc = write_slab(s, l, KV_T_V, kv_fwd_v_cache(f, l) + (size_t)np * c->kv_dim, np, N, c->n_kv_heads)))
                break;
        }
        if ((rc = kv_trace_write(s->w, l, KV_T_LSE, s->lse_all + (size_t)l * H * T)))
            break;
        for (int k = 0; k < N_ROW && rc == KV_OK; k++)
            rc = kv_trace_write(s->w, l, row_tensor[k], s->row_all[k] + (size_t)l * H * T);
        if (rc)
            break;
        if ((rc = s->be->ops->download(s->be, host, s->pooled + (size_t)l * H * P * P,
                                       sizeof(float) * (size_t)H * P * P)) ||
            (rc = kv_trace_write(s->w, l, KV_T_POOLED, host)))
            break;
        /* W_O of layer l: (dim, q_dim), the trace's (model_dim, n_heads * head_dim) */
        if (with_wo && (rc = kv_trace_write(s->w, l, KV_T_WO, m->wo + (size_t)l * c->dim * c->q_dim)))
            break;
    }
    kv_free(host);
    return rc;
}

int kv_capture_run(const kv_capture_opts_t *o, kv_capture_result_t *res)
{
    memset(res, 0, sizeof *res);
    kv_model_t *m = NULL;
    kv_tokenizer_t *tok = NULL;
    kv_backend_t *be = NULL;
    kv_fwd_t *f = NULL;
    kv_trace_writer_t *w = NULL;
    int32_t *tokens = NULL, *segs = NULL;
    float *logits = NULL;
    char *chat_text = NULL; /* the prompt in the chat template (o->chat) */
    int n_prompt = 0, n_segs = 0, rc;
    cap_t s;
    memset(&s, 0, sizeof s);
    double t0 = kv_now();

    char deftok[1100];
    const char *tok_path = o->tokenizer_path;
    if (!tok_path && o->model_path) /* a Hugging Face folder's own tokenizer.json */
        tok_path = kv_model_default_tokenizer(o->model_path, deftok, sizeof deftok);
    if (!o->model_path || (!tok_path && !o->ids) || (!o->prompt && !o->ids) || !o->out_path)
        return kv_error(KV_EINVAL, "capture: model, tokenizer, prompt (or token ids) and output are all required");
    if (o->ids && o->n_ids <= 0)
        return kv_error(KV_EINVAL, "capture: the token id list is empty");
    if (!o->ids && !o->prompt[0])
        return kv_error(KV_EINVAL, "capture: the prompt is empty (a trace needs context tokens to evict from)");
    if (o->n_decode < 0)
        return kv_error(KV_EINVAL, "--decode must be >= 0 (got %d)", o->n_decode);
    if (o->pool <= 0)
        return kv_error(KV_EINVAL, "--pool must be positive (got %d)", o->pool);
    /* the output: a regular file in a writable folder, none of the inputs (checked before the work;
     * the model's own files once it is loaded) */
    const char *inputs[] = {o->model_path, tok_path, o->ids_source};
    if ((rc = kv_out_check(o->out_path, inputs, (int)KV_ARRAY_LEN(inputs))))
        return rc;
    if ((rc = kv_model_load(o->model_path, &m)))
        goto done;
    for (int i = 0; i < m->n_files && rc == KV_OK; i++) {
        const char *mf = m->files[i];
        rc = kv_out_check(o->out_path, &mf, 1);
    }
    if (rc)
        goto done;
    const kv_model_config_t *c = &m->cfg;
    if (tok_path && (rc = kv_tokenizer_load(tok_path, c->vocab_size, &tok)))
        goto done;
    if (o->ids) {
        if ((rc = kv_ids_check(o->ids, o->n_ids, c->vocab_size, tok, o->ids_source ? o->ids_source : "--ids")))
            goto done;
        if (!(tokens = kv_malloc(sizeof(int32_t) * (size_t)o->n_ids, "prompt tokens"))) {
            rc = KV_ENOMEM;
            goto done;
        }
        memcpy(tokens, o->ids, sizeof(int32_t) * (size_t)o->n_ids);
        n_prompt = o->n_ids;
        const char *sg = o->segments ? o->segments : "auto";
        if (strcmp(sg, "auto") && strcmp(sg, "none") && (rc = parse_offsets(sg, n_prompt, &segs, &n_segs)))
            goto done;
    } else if (o->chat) {
        if ((rc = kv_tokenizer_chat(tok, o->system, o->prompt, &chat_text)))
            goto done;
        const char *sg = o->segments && strcmp(o->segments, "auto") ? o->segments : "none";
        if ((rc = kv_capture_tokenize(tok, chat_text, sg, &tokens, &n_prompt, &segs, &n_segs)))
            goto done;
    } else if ((rc = kv_capture_tokenize(tok, o->prompt, o->segments, &tokens, &n_prompt, &segs, &n_segs))) {
        goto done;
    }
    if ((long long)n_prompt + o->n_decode > c->seq_len) {
        rc = kv_error(KV_ERANGE,
                      "the prompt (%d tokens) plus %d decode tokens makes %lld, beyond the model's context "
                      "of %d tokens (seq_len of %s)",
                      n_prompt, o->n_decode, (long long)n_prompt + o->n_decode, c->seq_len, o->model_path);
        goto done;
    }
    const int T = n_prompt + o->n_decode;
    if ((rc = kv_backend_open(o->backend ? o->backend : "auto", o->n_threads, &be)))
        goto done;
    if (!be->ops->attn_stats) {
        rc = kv_error(KV_ENOTIMPL, "backend %s has no 'attn_stats' op (needed for capture summaries)", be->name);
        goto done;
    }
    snprintf(res->device, sizeof res->device, "%s: %s", be->name, be->device);
    if ((rc = kv_fwd_create(m, be, T, n_prompt, &f)))
        goto done;
    res->load_s = kv_now() - t0;

    /* the trace's metadata: everything but the decoded tokens is known now */
    kv_trace_meta_t meta;
    memset(&meta, 0, sizeof meta);
    meta.n_layers = c->n_layers;
    meta.n_heads = c->n_heads;
    meta.n_kv_heads = c->n_kv_heads;
    meta.head_dim = c->head_dim;
    meta.n_tokens = T;
    meta.n_prompt = n_prompt;
    meta.has_summaries = 1;
    meta.has_stats = 1;
    if (o->q_tail > n_prompt) {
        rc = kv_error(KV_ERANGE, "--q-tail %d is longer than the prompt (%d tokens)", o->q_tail, n_prompt);
        goto done;
    }
    meta.q_start = o->q_tail >= 0 ? n_prompt - o->q_tail : 0;
    /* the head statistics end where the stored queries of the prompt begin, or 64 queries before the
     * prompt's end when every query is stored (replay --eval-tail up to that many uses them) */
    meta.stats_split = o->q_tail >= 0 ? meta.q_start : KV_MAX(0, n_prompt - KV_TRACE_DEFAULT_STATS_TAIL);
    meta.pool = KV_MIN(o->pool, T);
    meta.has_wo = o->with_wo != 0;
    meta.model_dim = c->dim;
    meta.hidden_dim = c->hidden_dim;
    meta.vocab_size = c->vocab_size;
    meta.seq_len = c->seq_len;
    meta.rope_theta = c->rope_theta;
    meta.norm_eps = c->norm_eps;
    meta.n_segments = n_segs;
    meta.segments = segs;
    meta.tokens = kv_malloc(sizeof(int32_t) * (size_t)T, "tokens");
    meta.positions = kv_malloc(sizeof(int32_t) * (size_t)T, "positions");
    if (!meta.tokens || !meta.positions) {
        kv_free(meta.tokens);
        kv_free(meta.positions);
        rc = KV_ENOMEM;
        goto done;
    }
    for (int t = 0; t < T; t++) {
        meta.tokens[t] = t < n_prompt ? tokens[t] : -1;
        meta.positions[t] = t;
    }
    snprintf(meta.source, sizeof meta.source, "capture");
    snprintf(meta.model, sizeof meta.model, "%s", o->model_path);
    snprintf(meta.tokenizer, sizeof meta.tokenizer, "%s", tok_path ? tok_path : "(none: token ids given)");
    snprintf(meta.backend, sizeof meta.backend, "%s", res->device);
    if (o->prompt) {
        snprintf(meta.prompt, sizeof meta.prompt, "%s", chat_text ? chat_text : o->prompt);
    } else if (tok) { /* token ids: their text, as the tokenizer decodes it */
        char *text = NULL;
        size_t tl = 0;
        if (kv_tokenizer_decode_all(tok, tokens, n_prompt, &text, &tl) == KV_OK)
            snprintf(meta.prompt, sizeof meta.prompt, "%s", text);
        kv_free(text);
    } else {
        size_t k = (size_t)snprintf(meta.prompt, sizeof meta.prompt, "(token ids)");
        for (int i = 0; i < n_prompt && k + 16 < sizeof meta.prompt; i++)
            k += (size_t)snprintf(meta.prompt + k, sizeof meta.prompt - k, " %d", tokens[i]);
    }
    kv_iso_time(meta.created, sizeof meta.created);
    if (o->generator) {
        snprintf(meta.generator, sizeof meta.generator, "%s", o->generator);
    } else {
        /* the RoPE scaling is named here when there is one: the trace's rope_theta attribute alone
         * does not say that a llama3 or linear scaling was applied (the CLI passes its command line
         * as the generator instead, which must stay a command that re-creates the trace) */
        char d[96], r[256] = "";
        if (c->rope.type != KV_ROPE_DEFAULT) {
            char rd[240];
            snprintf(r, sizeof r, ", RoPE %s", kv_rope_describe(&c->rope, rd, sizeof rd));
        }
        char qt[32] = "";
        if (o->q_tail >= 0)
            snprintf(qt, sizeof qt, " --q-tail %d", o->q_tail);
        snprintf(meta.generator, sizeof meta.generator,
                 "kvsim capture --decode %d --dtype %s%s%s --segments %s --pool %d --zstd-level %d --backend %s "
                 "--threads %d; model %s%s",
                 o->n_decode, o->dtype == KV_DTYPE_F16 ? "f16" : "f32", o->with_wo ? " --with-wo" : "", qt,
                 o->segments ? o->segments : "auto", o->pool, o->zstd_level, o->backend ? o->backend : "auto",
                 o->n_threads, kv_model_describe(m, d, sizeof d), r);
    }
    rc = kv_model_sha256(m, meta.model_sha256);
    if (rc == KV_OK) {
        kv_write_opts_t wo = {o->dtype, o->zstd_level, 0};
        rc = kv_trace_create(o->out_path, &meta, &wo, &w);
    }
    kv_free(meta.tokens);
    kv_free(meta.positions);
    if (rc)
        goto done;

    /* summary and staging buffers */
    const int H = c->n_heads, P = KV_MIN(o->pool, T), N = o->n_decode;
    const size_t rows = (size_t)KV_MAX(n_prompt, N);
    s.w = w;
    s.be = be;
    s.c = c;
    s.T = T;
    s.n_prompt = n_prompt;
    s.n_decode = N;
    s.pool = P;
    s.scale = (float)(1.0 / sqrt((double)c->head_dim));
    s.stats_split = kv_trace_writer_meta(w)->stats_split;
    const size_t LHT = (size_t)c->n_layers * H * T, LHPP = (size_t)c->n_layers * H * P * P;
    int nomem = 0;
    for (int k = 0; k < N_COL; k++)
        nomem |= !(s.col[k] = kv_be_alloc(be, (size_t)H * T * sizeof(float)));
    for (int k = 0; k < N_ROW; k++) {
        nomem |= !(s.row[k] = kv_be_alloc(be, (size_t)H * n_prompt * sizeof(float)));
        nomem |= !(s.row_all[k] = kv_calloc(LHT, sizeof(float), "per-query statistics"));
    }
    s.pooled = kv_be_alloc(be, LHPP * sizeof(float));
    s.seg_lo = kv_be_alloc(be, (size_t)T * sizeof(int32_t));
    s.lse_all = kv_calloc(LHT, sizeof(float), "lse");
    s.dec_q = kv_malloc(sizeof(float) * (size_t)c->n_layers * (size_t)(N ? N : 1) * c->q_dim, "decode queries");
    s.tm = kv_malloc(sizeof(float) * rows * c->q_dim, "staging");
    s.hm = kv_malloc(sizeof(float) * rows * c->q_dim, "staging");
    s.small = kv_malloc(sizeof(float) * (size_t)H * n_prompt, "staging");
    s.host_col = kv_malloc(sizeof(float) * (size_t)H * T, "staging");
    logits = kv_malloc(sizeof(float) * (size_t)c->vocab_size, "logits");
    if (nomem || !s.pooled || !s.seg_lo || !s.lse_all || !s.dec_q || !s.tm || !s.hm || !s.small || !s.host_col ||
        !logits) {
        rc = KV_ENOMEM;
        goto done;
    }
    if ((rc = zero_be(be, s.pooled, LHPP)))
        goto done;
    {
        /* the first token of each token's segment (decode tokens continue the last segment) */
        int32_t *lo = kv_malloc(sizeof(int32_t) * (size_t)T, "segment starts");
        if (!lo) {
            rc = KV_ENOMEM;
            goto done;
        }
        const kv_trace_meta_t *wm0 = kv_trace_writer_meta(w);
        for (int t = 0; t < T; t++)
            lo[t] = wm0->n_segments > 0 ? wm0->segments[kv_trace_segment_of(wm0, KV_MIN(t, n_prompt - 1))] : 0;
        rc = be->ops->upload(be, s.seg_lo, lo, sizeof(int32_t) * (size_t)T);
        kv_free(lo);
        if (rc)
            goto done;
    }

    /* prefill: the hook writes every layer's prompt slab as soon as the layer is done */
    t0 = kv_now();
    kv_progress_begin(&s.prog, "capture", (long)c->n_layers + N);
    if ((rc = kv_fwd_run(f, tokens, n_prompt, 0, logits, 0, cap_hook, &s)))
        goto done;
    res->prefill_s = kv_now() - t0;

    /* greedy decode of exactly N tokens */
    t0 = kv_now();
    kv_trace_meta_t *wm = kv_trace_writer_meta(w);
    for (int i = 0; i < N; i++) {
        int32_t next = kv_argmax(logits, c->vocab_size);
        wm->tokens[n_prompt + i] = next;
        if ((rc = kv_fwd_run(f, &next, 1, n_prompt + i, logits, 0, cap_hook, &s)))
            goto done;
        s.done++;
        char detail[64];
        snprintf(detail, sizeof detail, "decode %d/%d", i + 1, N);
        kv_progress_update(&s.prog, s.done, detail);
    }
    res->decode_s = kv_now() - t0;

    t0 = kv_now();
    if ((rc = write_rest(&s, f, m, o->with_wo)))
        goto done;
    rc = kv_trace_commit(w);
    w = NULL;
    if (rc)
        goto done;
    res->write_s = kv_now() - t0;
    res->n_prompt = n_prompt;
    res->n_tokens = T;
    res->n_segments = n_segs;
    res->peak_rss = kv_peak_rss();
    {
        char a[32], detail[128];
        snprintf(detail, sizeof detail, "%d prompt + %d decode tokens, peak RSS %s", n_prompt, N,
                 kv_fmt_bytes((double)res->peak_rss, a, sizeof a));
        kv_progress_end(&s.prog, detail);
    }
done:
    if (w)
        kv_trace_abort(w);
    if (be) {
        for (int k = 0; k < N_COL; k++)
            kv_be_free(be, s.col[k]);
        for (int k = 0; k < N_ROW; k++)
            kv_be_free(be, s.row[k]);
        kv_be_free(be, s.pooled);
        kv_be_free(be, s.seg_lo);
    }
    for (int k = 0; k < N_ROW; k++)
        kv_free(s.row_all[k]);
    kv_free(s.host_col);
    kv_free(s.lse_all);
    kv_free(s.dec_q);
    kv_free(s.tm);
    kv_free(s.hm);
    kv_free(s.small);
    kv_free(logits);
    kv_free(tokens);
    kv_free(segs);
    kv_free(chat_text);
    kv_fwd_free(f);
    kv_backend_close(be);
    kv_tokenizer_free(tok);
    kv_model_free(m);
    return rc;
}
