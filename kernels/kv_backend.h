/*
 * kv_backend.h: the one seam between kvsim's algorithms and the hardware that runs them.
 *
 * A backend is a table of operations on float32 tensors that live in the backend's memory (host
 * memory for "cpu", device memory for "cuda"). The forward pass of capture and the dense parts of
 * replay (attention probabilities, accumulated attention) call these ops and nothing else, so the
 * same code runs on every machine and only the op bodies differ. The CPU backend implements every
 * op and is the reference; the CUDA backend implements the same contracts, checked against the CPU
 * by the GPU parity runner (tests/gpu_parity.c).
 *
 * Conventions for every op:
 *   - return KV_OK or a negative KV_E* status with a message (kv_last_error); KV_ENOTIMPL when a
 *     backend lacks the op;
 *   - shapes are given in the comment next to each pointer, row-major, innermost last;
 *   - accumulation is float32 (the CPU reference accumulates dot products in float32 through BLAS,
 *     softmax sums in double);
 *   - results are deterministic: the same inputs give the same bits whatever the thread count.
 */
#ifndef KV_BACKEND_H
#define KV_BACKEND_H

#include "kernels/kv_rope.h"
#include "kernels/kv_weight.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kv_backend kv_backend_t;

/* Causal grouped-query attention over a token-major KV cache (the forward pass layout).
 * Query i sits at key index q_pos0 + i and sees keys [0, q_pos0 + i]. Query head h reads KV head
 * h / (n_heads / n_kv_heads). */
typedef struct {
    float *out;       /* (n_q, n_heads, head_dim) attention output; NULL: lse only (host-memory backends
                         such as the CPU; a device backend refuses it) */
    float *lse;       /* (n_heads, n_q) natural log-sum-exp of the scaled scores; NULL to skip */
    const float *q;   /* (n_q, n_heads, head_dim) post-RoPE queries */
    const float *k;   /* key j of KV head g at k + j*kv_stride + g*head_dim (post-RoPE) */
    const float *v;   /* value j of KV head g at v + j*kv_stride + g*head_dim */
    size_t kv_stride; /* floats between consecutive tokens of k and v (n_kv_heads*head_dim if packed) */
    int n_q, q_pos0;
    int n_heads, n_kv_heads, head_dim;
    float scale; /* 1/sqrt(head_dim) for Llama */
    /* NULL, or the statistics of attn_stats over the same scores, computed in the same pass (capture):
     * its outputs, head_end, mass and seg_lo are read from it, its q, k, lse, kv_stride, n_q, q_pos0,
     * heads and scale are this call's. The results are those of attention then attn_stats, to the
     * bit (the CPU computes each block of scores once for both; another backend may run the two). */
    const struct kv_attn_stats_args *stats;
} kv_attn_args_t;

/* Second pass over the same attention, given the lse of the first: per-query entropy, accumulated
 * attention per key and a max-pooled map of the probabilities, and the statistics a trace stores for
 * replay and analysis (traces/FORMAT.md, "Statistics"): per key the sum of squares and the maximum
 * of p_ij (also over the queries before head_end only), per query the keys needed for a share of its
 * attention, its attention on key 0 and on its own segment. Any output may be NULL; p_ij = exp(s_ij -
 * lse_i) with s_ij the scaled score rounded to float. */
typedef struct kv_attn_stats_args {
    const float *q, *k; /* as kv_attn_args_t */
    const float *lse;   /* (n_heads, n_q) from the attention op */
    size_t kv_stride;
    int n_q, q_pos0;
    int n_heads, n_kv_heads, head_dim;
    float scale;
    float *entropy; /* (n_heads, n_q) -sum_j p_ij log p_ij, nats */
    float *acc;     /* (n_heads, acc_stride): acc[h, j] += sum_i p_ij for j <= q_pos0 + n_q - 1 */
    size_t acc_stride;
    float *pooled;    /* (n_heads, pool, pool): cell (r, c) = max(cell, p_ij) over i, j with
                         r = (q_pos0 + i) * pool / pool_T, c = j * pool / pool_T */
    int pool, pool_T; /* pool <= pool_T; pool_T = total number of tokens the map spans */
    /* per key, (n_heads, acc_stride) like acc, over the same queries: */
    float *acc_sq;  /* acc_sq[h, j] += sum_i p_ij^2 */
    float *acc_max; /* acc_max[h, j] = max(acc_max[h, j], max_i p_ij) (start from 0) */
    /* the same three over the queries at positions q_pos0 + i < head_end only */
    float *acc_head, *acc_sq_head, *acc_max_head;
    int head_end;
    /* per query, (n_heads, n_q): */
    float *keys_mass;      /* the smallest k such that the k largest p_ij (j <= q_pos0 + i) sum to at least
                              mass x (1 - 1e-6) x sum_j p_ij (the 1e-6 absorbs the rounding of the sums) */
    float mass;            /* in (0, 1] */
    float *sink;           /* p_i0 */
    float *seg;            /* sum of p_ij over j in [seg_lo[q_pos0 + i], q_pos0 + i] */
    const int32_t *seg_lo; /* (q_pos0 + n_q) first key of each position's segment (backend memory); NULL:
                              0 for every position, so seg is the whole row's mass */
} kv_attn_stats_args_t;

/* Scaled scores of a head-major query block against head-major keys (the trace layout, used by
 * replay). Query i of head h at q + h*q_head_stride + i*head_dim sits at key index q_pos0 + i and
 * sees keys j in [0, min(n_k, q_pos0 + i + 1)); with causal = 0 it sees all n_k keys. */
typedef struct {
    const float *q;
    size_t q_head_stride;
    const float *k;
    size_t k_head_stride; /* key j of KV head g at k + g*k_head_stride + j*head_dim */
    int n_heads, n_kv_heads, head_dim;
    int n_q, q_pos0, n_k;
    int causal;
    float scale;
} kv_qk_args_t;

/* Column statistics of softmax(scale Q K^T) over a block of queries (never materialising n_q x n_k):
 * any output may be NULL. Used for H2O's accumulated attention (sum), KV-Compress (sum of squares)
 * and the threshold policy (max). */
typedef struct {
    float *sum;   /* (n_heads, n_k) sum_i p_ij */
    float *sumsq; /* (n_heads, n_k) sum_i p_ij^2 */
    float *max;   /* (n_heads, n_k) max_i p_ij */
} kv_colstats_out_t;

/* Attention over a ragged cache: every storage head keeps its own set of tokens (a compressed KV
 * cache, sim/eval.c). Storage head s holds len[s] <= cap entries; entry e has key k + (s*cap + e)*head_dim,
 * value v + (s*cap + e)*head_dim and position pos[s*cap + e], positions strictly ascending within a
 * head (the RoPE rotation is already in the stored keys, so positions serve the causal mask only).
 * Query head h reads storage head h / (n_heads / n_store): n_store = n_kv_heads is a cache per KV
 * head, n_store = n_heads one per query head. Query i sits at position q_pos0 + i and attends to the
 * entries of its storage head whose position is <= q_pos0 + i, in storage order; a query that sees
 * no entry gets a zero output and lse -inf. Each query head is computed on its own, the same way
 * whatever n_store and the other heads, so a cache holding every token in order computes the same
 * floats for every layout (the identity gather of closed-loop evaluation's full-cache reference). */
typedef struct {
    float *out;         /* (n_q, n_heads, head_dim) attention output */
    float *lse;         /* (n_heads, n_q) natural log-sum-exp of the scaled scores; NULL to skip */
    const float *q;     /* (n_q, n_heads, head_dim) post-RoPE queries */
    const float *k;     /* (n_store, cap, head_dim) post-RoPE keys */
    const float *v;     /* (n_store, cap, head_dim) values */
    const int32_t *pos; /* (n_store, cap) positions of the entries (backend memory) */
    const int32_t *len; /* (n_store) entries held per storage head (backend memory) */
    int cap, n_store;
    int n_q, q_pos0;
    int n_heads, head_dim;
    float scale; /* 1/sqrt(head_dim) for Llama */
} kv_attn_ragged_args_t;

typedef struct kv_backend_ops {
    /* memory */
    void *(*alloc)(kv_backend_t *be, size_t bytes); /* NULL + message on failure */
    void (*free)(kv_backend_t *be, void *p);        /* accepts NULL */
    int (*upload)(kv_backend_t *be, void *dst, const void *src_host, size_t bytes);
    int (*download)(kv_backend_t *be, void *dst_host, const void *src, size_t bytes);
    int (*sync)(kv_backend_t *be);

    /* model ops */
    /* y (M, N) = x (M, K) . w (N, K)^T ; w is a weight matrix stored W[out][in] */
    int (*matmul)(kv_backend_t *be, float *y, const float *x, const float *w, int M, int N, int K);
    /* y (M, w->rows) = x (M, w->cols) . W^T with W in its stored type (kernels/kv_weight.h; w->data in
     * backend memory, the descriptor itself on the host). fp32 weights in their logical row order give
     * matmul's bits; other types are converted to fp32 a tile of rows at a time into a reused buffer and
     * multiplied the same way, so the result is matmul's on the weights converted at load, to the bit,
     * whatever the thread count. Which stored types a backend takes is its own (CPU: every KV_WT_*). */
    int (*matmul_w)(kv_backend_t *be, float *y, const float *x, const kv_weight_t *w, int M);
    /* y (T, dim) = x / sqrt(mean(x^2) + eps) * w (dim) */
    int (*rmsnorm)(kv_backend_t *be, float *y, const float *x, const float *w, int T, int dim, float eps);
    /* in place on x (T, n_heads, head_dim): rotate the pair (2i, 2i+1) of each head (llama2.c / Meta
     * layout) by the angle pos[t] * f, f = kv_rope_freq(rope, 2i, head_dim) (kernels/kv_rope.h: plain,
     * linear, llama3 or per-pair factors). pos (T) is backend memory; rope is a host struct read during
     * the call (not kept). The angle is computed in double (f in double, times pos[t]), its cos and
     * sin rounded to float, then a*c - b*s and a*s + b*c in float (the CUDA kernel rounds each product;
     * the CPU build, gcc -O3 -march=native, fuses them into multiply-adds where it vectorises: the last
     * bit may differ between backends). head_dim even and at most 2 * KV_ROPE_MAX_PAIRS. */
    int (*rope)(kv_backend_t *be, float *x, const int32_t *pos, int T, int n_heads, int head_dim,
                const kv_rope_t *rope);
    /* h (n) = silu(h) * g */
    int (*swiglu)(kv_backend_t *be, float *h, const float *g, size_t n);
    /* x (n) += y */
    int (*add)(kv_backend_t *be, float *x, const float *y, size_t n);
    /* y (rows, cols) += b (cols) broadcast over the rows (the q/k/v biases of Qwen2): one float
     * addition per element, so every backend gives the same bits */
    int (*add_bias)(kv_backend_t *be, float *y, const float *b, int rows, int cols);
    int (*attention)(kv_backend_t *be, const kv_attn_args_t *a);
    int (*attn_stats)(kv_backend_t *be, const kv_attn_stats_args_t *a);

    /* replay ops */
    /* probs (n_heads, n_q, n_k) = softmax rows (masked entries 0); lse (n_heads, n_q) may be NULL */
    int (*attn_probs)(kv_backend_t *be, const kv_qk_args_t *a, float *probs, float *lse);
    int (*attn_colstats)(kv_backend_t *be, const kv_qk_args_t *a, const kv_colstats_out_t *out);

    /* closed-loop evaluation (sim/eval.c): attention over a compressed, ragged cache */
    int (*attn_ragged)(kv_backend_t *be, const kv_attn_ragged_args_t *a);
} kv_backend_ops_t;

struct kv_backend {
    const char *name; /* "cpu" or "cuda" */
    const kv_backend_ops_t *ops;
    int n_threads;    /* CPU worker threads */
    char device[128]; /* human description ("2 CPU threads, OpenBLAS", "NVIDIA H100 ...") */
    void *ctx;        /* backend private state */
    int host_memory;  /* 1 when backend memory is host memory (CPU): views need no copies */
};

/* Open "cpu", "cuda" or "auto". "cuda" fails with KV_EUNAVAIL and the reason when no usable device
 * exists (no GPU, no driver, built without nvcc); "auto" then falls back to the CPU and logs one line
 * that says why. n_threads <= 0 means all available cores (or $KV_THREADS). */
int kv_backend_open(const char *name, int n_threads, kv_backend_t **out);
void kv_backend_close(kv_backend_t *be);

/* The CPU backend is always present. */
int kv_backend_cpu_open(int n_threads, kv_backend_t **out);
/* CUDA backend: KV_EUNAVAIL with the reason when there is no usable device or no CUDA build. */
int kv_backend_cuda_open(kv_backend_t **out);
/* Why CUDA is unavailable ("" when it is available); probes once. */
const char *kv_cuda_unavailable_reason(void);

/* Name of the first op this backend lacks (NULL when complete). Callers that meet a NULL op report
 * it by this name instead of calling it. */
const char *kv_backend_missing_op(const kv_backend_t *be);

/* Helpers on top of the ops (host code). */
static inline void *kv_be_alloc(kv_backend_t *be, size_t bytes)
{
    return be->ops->alloc(be, bytes);
}
static inline void kv_be_free(kv_backend_t *be, void *p)
{
    be->ops->free(be, p);
}

/* A backend view of host data: the host pointer itself for host-memory backends, otherwise a
 * device copy (free it with kv_be_unview). */
int kv_be_view(kv_backend_t *be, const void *host, size_t bytes, void **view);
void kv_be_unview(kv_backend_t *be, const void *host, void *view);
/* Backend buffer for results that the host reads (host memory itself when possible), and the copy
 * back: kv_be_fetch is a no-op when out == host. */
int kv_be_out(kv_backend_t *be, void *host, size_t bytes, void **out);
int kv_be_fetch(kv_backend_t *be, void *host, const void *out, size_t bytes);

/* Run OpenBLAS single-threaded while our own threads parallelise (returns the previous count). */
int kv_blas_set_threads(int n);

#ifdef __cplusplus
}
#endif
#endif
