/*
 * kv_model.h: Llama-family model weights from llama2.c checkpoints.
 *
 * Three checkpoint layouts are read (all little-endian):
 *   - version 0 ("legacy"): a header of 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
 *     vocab_size, seq_len), then fp32 weights in the order token_embedding, rms_att, wq, wk, wv, wo,
 *     rms_ffn, w1, w2, w3, rms_final, the unused freq_cis tables (2 x seq_len x head_dim/2 floats,
 *     skipped) and, when vocab_size is negative, a separate classifier wcls of |vocab_size| x dim.
 *   - version 1: a 256-byte header (uint32 magic 0x616b3432 "ak42", int32 version 1, the 7 int32
 *     above with a positive vocab_size, uint8 shared_classifier, zero padding), then fp32 weights in
 *     the order rms_att, rms_ffn, rms_final, token_embedding, wq, wk, wv, wo, w1, w2, w3 [, wcls].
 *   - version 2 (Q8_0): the version-1 header plus an int32 group_size at byte 37, then the fp32 norms
 *     (rms_att, rms_ffn, rms_final), then the quantised tensors token_embedding, then wq, wk, wv, wo,
 *     w1, w2, w3 of every layer, [wcls], each as int8 values with one fp32 scale per group of
 *     group_size values. llama2.c has used two arrangements of the same bytes: each tensor (each
 *     layer's matrix separately) followed by its own scales (export.py today, and what runq.c
 *     reads), or all the int8 values first and all the scales after them (export.py as first
 *     published). Both are read; which one a file uses is told by its scales (model.c). Weights are
 *     dequantised to fp32 at load (value = int8 * scale of its group).
 * The layouts were read from llama2.c's export.py (legacy_export, version1_export, version2_export)
 * and runq.c.
 *
 * Every size is validated against the file before a single weight is touched: impossible or
 * absurd dimensions and files whose size does not match their header are errors naming the file
 * and the problem. fp32 files are mapped read-only (no copy); Q8_0 files are dequantised into one
 * allocation. Weight matrices are row-major W[out][in], as matmul in kv_backend.h expects.
 */
#ifndef KV_MODEL_H
#define KV_MODEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KV_LLAMA2C_MAGIC 0x616b3432u
#define KV_BOS 1
#define KV_EOS 2

typedef struct {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
    int head_dim;          /* dim / n_heads */
    int kv_dim;            /* n_kv_heads * head_dim */
    int shared_classifier; /* 1: logits use token_embedding */
    int version;           /* 0, 1 or 2 */
    int group_size;        /* Q8_0 group size (version 2), else 0 */
    float rope_theta;      /* 10000 for llama2.c models */
    float norm_eps;        /* 1e-5 */
} kv_model_config_t;

typedef struct {
    kv_model_config_t cfg;
    char path[1024];
    /* fp32 weights (host memory, read-only) */
    const float *token_embedding; /* (vocab_size, dim) */
    const float *rms_att;         /* (n_layers, dim) */
    const float *wq;              /* (n_layers, n_heads*head_dim, dim) */
    const float *wk;              /* (n_layers, kv_dim, dim) */
    const float *wv;              /* (n_layers, kv_dim, dim) */
    const float *wo;              /* (n_layers, dim, n_heads*head_dim) */
    const float *rms_ffn;         /* (n_layers, dim) */
    const float *w1;              /* (n_layers, hidden_dim, dim) */
    const float *w2;              /* (n_layers, dim, hidden_dim) */
    const float *w3;              /* (n_layers, hidden_dim, dim) */
    const float *rms_final;       /* (dim) */
    const float *wcls;            /* (vocab_size, dim); == token_embedding when shared */
    /* storage */
    void *map; /* mmap of the file (fp32 layouts) */
    size_t map_len;
    float *owned;    /* dequantised weights (version 2) */
    size_t n_params; /* weights counted once (no freq_cis, no duplicate classifier) */
} kv_model_t;

/* Load a checkpoint. On failure *out is NULL and the message names the file and the problem. */
int kv_model_load(const char *path, kv_model_t **out);
void kv_model_free(kv_model_t *m);

/* Validate dimensions (positive, bounded, divisible: dim by n_heads, n_heads by n_kv_heads, even
 * head_dim) and fill head_dim/kv_dim. `path` names the file in messages. */
int kv_model_config_check(kv_model_config_t *c, const char *path);

/* Per-layer strides (floats) and pointers. */
static inline const float *kv_layer_ptr(const float *base, int layer, size_t per_layer)
{
    return base + (size_t)layer * per_layer;
}

/* "llama2.c v0 (legacy fp32)", "llama2.c v2 (Q8_0, group 64)", ... into buf. */
const char *kv_model_describe(const kv_model_t *m, char *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif
