/*
 * kv_forward.h: the Llama forward pass, written once against the backend op table.
 *
 * One call runs a block of consecutive tokens (a whole prompt: batched prefill with matrix-matrix
 * products; or one token: a decode step with matrix-vector products) and appends their keys and
 * values to a token-major KV cache:
 *
 *   x = emb[tok]                                                    (T, dim)
 *   per layer: xb = rmsnorm(x, rms_att); q = xb wq^T                (T, q_dim)
 *              k, v = xb wk^T, xb wv^T (into the cache)             (T, kv_dim)
 *              q += bq; k += bk; v += bv    (Qwen2: cfg.qkv_bias; before RoPE)
 *              rope(q), rope(k) on pairs (2i, 2i+1) of each head, frequencies from cfg.rope
 *              (kernels/kv_rope.h: plain theta, linear, llama3 or per-pair factors);
 *              att = causal GQA attention (scale 1/sqrt(head_dim))  (T, q_dim)
 *              x += att wo^T                                        (T, dim)
 *              xb = rmsnorm(x, rms_ffn); x += (silu(xb w1^T) * xb w3^T) w2^T
 *   logits = rmsnorm(x, rms_final) wcls^T (wcls = emb when shared).
 * q_dim = n_heads * head_dim equals dim except where the checkpoint gives head_dim (Mistral-Nemo).
 *
 * After each layer's attention an optional hook sees that layer's post-RoPE queries, the KV cache
 * and the attention's log-sum-exp (all backend memory), which is how capture records traces
 * without a second forward pass; a statistics callback (kv_fwd_set_stats) has the attention op compute
 * attn_stats's outputs from the same scores. All buffers live in the backend's memory; on a host-memory
 * backend (the CPU) the model's weights are used in place, in their stored precision (no copy),
 * elsewhere they are uploaded once (forward.c says how each type travels).
 */
#ifndef KV_FORWARD_H
#define KV_FORWARD_H

#include "kernels/kv_backend.h"
#include "traces/capture/kv_model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kv_fwd kv_fwd_t;

/* What the hook sees after layer `layer`'s attention on tokens [q_pos0, q_pos0 + n_q). */
typedef struct {
    int layer;
    int n_q, q_pos0;
    const float *q;       /* (n_q, n_heads, head_dim) post-RoPE queries (row stride q_dim) */
    const float *k_cache; /* (max_tokens, kv_dim) post-RoPE keys of this layer, rows [0, q_pos0 + n_q) valid */
    const float *v_cache; /* (max_tokens, kv_dim) values of this layer */
    size_t kv_stride;     /* kv_dim */
    const float *lse;     /* (n_heads, n_q) log-sum-exp of the scaled scores */
} kv_fwd_layer_t;

/* Return KV_OK to continue, an error status to stop the forward pass. */
typedef int (*kv_fwd_hook_t)(void *ctx, const kv_fwd_layer_t *layer);

/* Before layer `layer`'s attention on tokens [q_pos0, q_pos0 + n_q): fill the outputs of *st (zeroed by
 * the caller: outputs, head_end, mass, seg_lo, pool, pool_T, acc_stride) that the attention op is to
 * compute with it (kv_attn_args_t.stats; the forward pass sets its inputs). Return KV_OK to go on. */
typedef int (*kv_fwd_stats_t)(void *ctx, int layer, int n_q, int q_pos0, kv_attn_stats_args_t *st);

/* A forward pass of model `m` on backend `be` with a KV cache of max_tokens tokens, running at
 * most max_batch tokens per block (longer calls are split into blocks). The model must outlive it. */
int kv_fwd_create(const kv_model_t *m, kv_backend_t *be, int max_tokens, int max_batch, kv_fwd_t **out);
void kv_fwd_free(kv_fwd_t *f);

/* The attention of every layer computed by `fn` instead of the backend's attention op (NULL: the op
 * again). fn gets the layer and the op's arguments: the block's queries, the layer's token-major KV
 * cache with the block's own keys and values already in rows [q_pos0, q_pos0 + n_q), and the output
 * (and lse, may be NULL) buffers it must fill. Closed-loop evaluation (sim/eval.c) uses it to attend
 * over a compressed cache instead. */
typedef int (*kv_fwd_attn_fn)(void *ctx, int layer, const kv_attn_args_t *a);
void kv_fwd_set_attention(kv_fwd_t *f, kv_fwd_attn_fn fn, void *ctx);

/* Run tokens[0..n) at positions pos0..pos0+n-1; the cache must already hold positions [0, pos0).
 * logits (host memory, may be NULL): all_logits ? (n, vocab_size) : (vocab_size) of the last token.
 * hook (may be NULL) is called after every layer's attention of every block. */
int kv_fwd_run(kv_fwd_t *f, const int32_t *tokens, int n, int pos0, float *logits, int all_logits, kv_fwd_hook_t hook,
               void *hook_ctx);

/* Statistics with every attention from now on (fn NULL: none). */
void kv_fwd_set_stats(kv_fwd_t *f, kv_fwd_stats_t fn, void *ctx);

/* Backend memory the pass holds, by use (bytes). */
typedef struct {
    size_t weights;     /* uploaded weights (0 on a host-memory backend: the model's own are used) */
    size_t cache;       /* the KV cache, 2 x n_layers x max_tokens x kv_dim floats */
    size_t activations; /* one block's activations, lse, logits rows, positions */
} kv_fwd_mem_t;
void kv_fwd_memory(const kv_fwd_t *f, kv_fwd_mem_t *out);

const kv_model_t *kv_fwd_model(const kv_fwd_t *f);
kv_backend_t *kv_fwd_backend(const kv_fwd_t *f);
int kv_fwd_max_tokens(const kv_fwd_t *f);
/* Layer `l`'s caches (backend memory): (max_tokens, kv_dim). */
const float *kv_fwd_k_cache(const kv_fwd_t *f, int layer);
const float *kv_fwd_v_cache(const kv_fwd_t *f, int layer);
/* Bytes of backend memory held (weights when uploaded, cache, scratch). */
size_t kv_fwd_bytes(const kv_fwd_t *f);

/* Index of the largest logit (the first on ties). */
int kv_argmax(const float *x, int n);

#ifdef __cplusplus
}
#endif
#endif
