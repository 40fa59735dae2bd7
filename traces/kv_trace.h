/*
 * kv_trace.h: attention traces, the data every kvsim stage shares.
 *
 * A trace holds, for every layer, the post-RoPE queries, keys and values of one model run (a prompt
 * followed by greedily decoded tokens), attention summaries computed at capture time and optionally
 * the output projection W_O. Two backends implement the same reader interface:
 *   - HDF5 files (traces/FORMAT.md; zstd-compressed, f16 or f32 on disk), written atomically by the
 *     streaming writer below, one layer at a time;
 *   - in-memory traces, built by tests and by code that synthesises data on the fly.
 * Whatever the storage dtype, readers always return float32.
 *
 * Tensor layouts (per layer), all head-major:
 *   Q        (n_heads, n_tokens - q_start, head_dim)   queries of tokens [q_start, n_tokens); q_start
 *            is 0 except in lean traces (capture --q-tail N), which store only the last N prompt
 *            queries and the decode queries; kv_trace_read_rows takes token indices >= q_start
 *   K, V     (n_kv_heads, n_tokens, head_dim)
 *   LSE      (n_heads, n_tokens)   natural log-sum-exp of query t's scaled scores over keys [0, t]
 *   ENTROPY  (n_heads, n_tokens)   attention entropy of query t in nats
 *   ACC      (n_heads, n_tokens)   sum over prompt queries i of p_ij (H2O's accumulated attention)
 *   POOLED   (n_heads, pool, pool) max-pooled causal attention probabilities (for figures)
 *   WO       (model_dim, n_heads * head_dim) output projection, W[out][in]
 * Statistics (has_stats; traces/FORMAT.md, "Statistics"), each (n_heads, n_tokens), f32:
 *   ACC_SQ, MAX            per key j: sum over prompt queries i of p_ij^2, max over them of p_ij
 *   ACC_HEAD, ACC_SQ_HEAD, MAX_HEAD   ACC, ACC_SQ, MAX over the prompt queries [0, stats_split)
 *   KEYS90                 per query: keys (largest first) holding 90 % of its attention
 *   SINK                   per query: p_i0, the attention on the first token
 *   SEG                    per query: attention on the keys of its own segment, [start, i]
 */
#ifndef KV_TRACE_H
#define KV_TRACE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KV_TRACE_FORMAT "kvsim-trace"
#define KV_TRACE_FORMAT_VERSION 2      /* written; version 1 files are read too */
#define KV_TRACE_DEFAULT_STATS_TAIL 64 /* prompt queries after stats_split in traces that store every query */
#define KV_TRACE_KEYS_MASS 0.9         /* the attention share KEYS90 counts keys for */
#define KV_TRACE_DEFAULT_POOL 256

typedef enum { KV_DTYPE_F32 = 0, KV_DTYPE_F16 = 1 } kv_dtype_t;

typedef enum {
    KV_T_Q = 0,
    KV_T_K,
    KV_T_V,
    KV_T_LSE,
    KV_T_ENTROPY,
    KV_T_ACC,
    KV_T_POOLED,
    KV_T_WO,
    KV_T_ACC_SQ,
    KV_T_MAX,
    KV_T_ACC_HEAD,
    KV_T_ACC_SQ_HEAD,
    KV_T_MAX_HEAD,
    KV_T_KEYS90,
    KV_T_SINK,
    KV_T_SEG,
    KV_T_COUNT
} kv_tensor_t;

typedef struct {
    /* shape */
    int n_layers, n_heads, n_kv_heads, head_dim;
    int n_tokens;       /* T = prompt + decode */
    int n_prompt;       /* decode tokens are [n_prompt, n_tokens) */
    int32_t *tokens;    /* (n_tokens) token ids, -1 where unknown (synthetic traces) */
    int32_t *positions; /* (n_tokens) RoPE positions */
    int n_segments;     /* 0 when the trace has no segments */
    int32_t *segments;  /* (n_segments) start of each segment, ascending from 0; segment s spans
                           [segments[s], segments[s+1]) and the last one ends at n_prompt */
    /* what else is stored */
    int has_summaries;  /* LSE, ENTROPY, ACC, POOLED present */
    int pool;           /* POOLED side (0 when absent) */
    int has_wo;         /* WO present */
    int has_stats;      /* the statistics ACC_SQ .. SEG present (and LSE, ENTROPY, ACC: has_summaries) */
    int stats_split;    /* the *_HEAD statistics cover the prompt queries [0, stats_split) */
    int q_start;        /* queries are stored for tokens [q_start, n_tokens): 0, or lean traces */
    int format_version; /* of the file read (writers always write KV_TRACE_FORMAT_VERSION; 0 in memory) */
    /* model configuration (0 where unknown) */
    int model_dim, hidden_dim, vocab_size, seq_len;
    float rope_theta, norm_eps;
    /* storage */
    kv_dtype_t dtype;  /* on-disk dtype of Q, K, V */
    long f16_overflow; /* values beyond the f16 range stored as +-inf */
    long nonfinite;    /* NaN and +-inf values stored in Q, K, V, the summaries and W_O, counted by the
                          writer (f16 overflows included); -1: not counted (a trace of an older kvsim) */
    int zstd_level;
    /* provenance */
    char source[32];       /* "capture", "synth" or "memory" */
    char model[256];       /* model file */
    char model_sha256[65]; /* of the model file */
    char tokenizer[256];
    char tool_version[32];
    char git_revision[48];
    char created[32];     /* ISO 8601 UTC */
    char backend[160];    /* backend that computed the trace */
    char generator[512];  /* synth: the generator's parameters; capture: the command options */
    char prompt[1024];    /* prompt text (truncated), for reports */
    char meta_sha256[65]; /* SHA-256 of the root attributes (FORMAT.md, "Integrity"), checked by the reader;
                             "" for traces of older kvsim versions (written on commit, not read from meta) */
} kv_trace_meta_t;

/* Meta owns its arrays. */
void kv_trace_meta_free(kv_trace_meta_t *m);
int kv_trace_meta_copy(kv_trace_meta_t *dst, const kv_trace_meta_t *src);
/* Check shapes and arrays for consistency; `where` names the file for messages. */
int kv_trace_meta_validate(const kv_trace_meta_t *m, const char *where);
/* Number of floats in one layer's tensor and its dims (up to 3; returns the rank). */
size_t kv_tensor_numel(const kv_trace_meta_t *m, kv_tensor_t which);
int kv_tensor_dims(const kv_trace_meta_t *m, kv_tensor_t which, uint64_t dims[3]);
const char *kv_tensor_name(kv_tensor_t which); /* "q", "k", ... (the HDF5 dataset name) */
/* 1 for Q, K, V, LSE, ENTROPY, ACC and the statistics: tensors indexed by token on their second
 * axis (Q's starts at token q_start). */
int kv_tensor_per_token(kv_tensor_t which);
/* 1 when a trace with this meta holds the tensor (Q, K, V always; the rest by has_summaries,
 * has_wo, has_stats): the one place that decides which datasets exist. */
int kv_tensor_present(const kv_trace_meta_t *m, kv_tensor_t which);
/* Segment index of token t (0 when the trace has no segments). */
int kv_trace_segment_of(const kv_trace_meta_t *m, int t);

/* ---- reading (both backends) ---- */
typedef struct kv_trace kv_trace_t;

int kv_trace_open(const char *path, kv_trace_t **out);
void kv_trace_close(kv_trace_t *t);
const kv_trace_meta_t *kv_trace_meta(const kv_trace_t *t);
const char *kv_trace_path(const kv_trace_t *t); /* "(memory)" for in-memory traces */
int kv_trace_has(const kv_trace_t *t, kv_tensor_t which);
/* Tokens [t0, t0+nt) of a per-token tensor for every head into dst (heads, nt[, head_dim]). For Q,
 * t0 >= q_start (KV_EUNAVAIL with a message otherwise: a lean trace does not store those queries). */
int kv_trace_read_rows(kv_trace_t *t, int layer, kv_tensor_t which, int t0, int nt, float *dst);
/* A whole tensor of one layer into dst (kv_tensor_numel floats; Q: the stored rows). */
int kv_trace_read(kv_trace_t *t, int layer, kv_tensor_t which, float *dst);
/* Bytes of Q/K/V (and everything) as float32 and as stored (for `kvsim info`). */
int kv_trace_storage(kv_trace_t *t, uint64_t *raw_bytes, uint64_t *stored_bytes);

/* One layer's Q, K and V, with buffers reused from call to call. */
typedef struct {
    float *q; /* (n_heads, n_tokens, head_dim) */
    float *k; /* (n_kv_heads, n_tokens, head_dim) */
    float *v; /* (n_kv_heads, n_tokens, head_dim) */
    size_t cap_q, cap_kv;
} kv_layer_t;
int kv_trace_read_layer(kv_trace_t *t, int layer, kv_layer_t *L);
void kv_layer_free(kv_layer_t *L);

/* ---- in-memory traces ---- */
/* A trace whose tensors live in memory, zero-filled; the meta is copied. */
int kv_trace_mem_create(const kv_trace_meta_t *meta, kv_trace_t **out);
/* Writable pointer to one layer's tensor (allocated on first use); NULL for a non-memory trace. */
float *kv_trace_mem_tensor(kv_trace_t *t, int layer, kv_tensor_t which);
/* Mutable meta of an in-memory trace (to mark summaries present, ...). */
kv_trace_meta_t *kv_trace_mem_meta(kv_trace_t *t);

/* ---- writing HDF5 ---- */
typedef struct {
    kv_dtype_t dtype; /* Q, K, V storage (summaries and W_O are always f32) */
    int zstd_level;   /* 1..22, 0 = default (3) */
    int chunk_tokens; /* tokens per chunk along T, 0 = automatic */
} kv_write_opts_t;

typedef struct kv_trace_writer kv_trace_writer_t;

/* Create `path` via a temporary file beside it; tensors are created with their full shape.
 * meta->has_summaries / has_wo decide which datasets exist. */
int kv_trace_create(const char *path, const kv_trace_meta_t *meta, const kv_write_opts_t *opts,
                    kv_trace_writer_t **out);
/* The writer's copy of the meta: tokens, positions, segments and provenance may be updated before
 * commit (capture learns the decoded tokens at the end). Shapes must not change. */
kv_trace_meta_t *kv_trace_writer_meta(kv_trace_writer_t *w);
/* Write tokens [t0, t0+nt) of a per-token tensor: src (heads, nt[, head_dim]). Q rows of tokens
 * before q_start are dropped (a lean trace does not store them). */
int kv_trace_write_rows(kv_trace_writer_t *w, int layer, kv_tensor_t which, int t0, int nt, const float *src);
/* Write a whole tensor of one layer (kv_tensor_numel floats; Q: the rows of tokens [q_start, T)). */
int kv_trace_write(kv_trace_writer_t *w, int layer, kv_tensor_t which, const float *src);
/* Write the metadata, close and rename to the final name. Frees w (also on failure, after
 * removing the temporary file). */
int kv_trace_commit(kv_trace_writer_t *w);
/* Close and delete the temporary file; frees w. Accepts NULL. */
void kv_trace_abort(kv_trace_writer_t *w);

/* ---- verification (kvsim info --verify) */
typedef struct {
    long datasets, chunks; /* checked */
    long unchecksummed;    /* chunks stored without a checksum (traces of older kvsim versions) */
    long bad_chunks;       /* chunks that were never written, do not decode or whose checksum differs */
    long nonfinite;        /* NaN and infinite values in Q, K, V, W_O and the summaries */
    long out_of_range;     /* summary values outside their ranges: entropy in [0, ln(t + 1)], accumulated
                              attention in [0, prompt queries that see the key], pooled in [0, 1] */
} kv_verify_t;
/* Check every stored chunk of the trace at `path` against its checksum, then every value, in a child
 * process (a crash inside libhdf5 on a damaged file is an error). *report gets one line per problem
 * (at most 40, naming the dataset and the chunk, or the layer and head; kv_free); the counts go to
 * *v. Returns KV_OK when the file could be checked (sound or not: see v), an error when it could not. */
int kv_trace_verify(const char *path, char **report, kv_verify_t *v);

/* Initialise HDF5 for kvsim: silence its error printing and register the zstd filter. */
int kv_trace_init(void);

#ifdef __cplusplus
}
#endif
#endif
