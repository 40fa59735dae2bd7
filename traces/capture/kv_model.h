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
 * Hugging Face checkpoints (a folder with config.json and safetensors weights) are read by hf_model.c,
 * described in kv_hf_model_load below; they come out in the same kv_model_t.
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
    float *owned;    /* dequantised weights (version 2), converted weights (Hugging Face) */
    size_t n_params; /* weights counted once (no freq_cis, no duplicate classifier) */
    /* Hugging Face checkpoints only (hf == 0 for llama2.c) */
    int hf;              /* 1: loaded from config.json + safetensors */
    char hf_dtype[16];   /* dtype of the weights in the files: "F32", "F16", "BF16" or "mixed" */
    int n_files;         /* files of the checkpoint, in kv_model_sha256 order */
    char (*files)[1024]; /* config.json, [model.safetensors.index.json], the safetensors files by name */
} kv_model_t;

/* Load a checkpoint: a llama2.c file, or a Hugging Face checkpoint when kv_model_is_hf_path(path).
 * On failure *out is NULL and the message names the file and the problem. */
int kv_model_load(const char *path, kv_model_t **out);

/* 1 when `path` names a Hugging Face checkpoint: a directory, a .json file (its config.json or
 * index) or a .safetensors file (config.json beside it). Decided by the path alone. */
int kv_model_is_hf_path(const char *path);

/* Hugging Face Llama-family checkpoint (LlamaForCausalLM, MistralForCausalLM): config.json and
 * model.safetensors, or shards listed in model.safetensors.index.json; F32, F16 and BF16 weights
 * are converted to fp32 at load and the q_proj/k_proj rows are put back in llama2.c's RoPE order
 * (hf_model.c says why and how). `path` is the folder, its config.json, the index or one
 * .safetensors file. */
int kv_hf_model_load(const char *path, kv_model_t **out);

/* The tokenizer.json beside a Hugging Face checkpoint's config.json, into buf; NULL when `path` is
 * not a Hugging Face path or there is no such file. */
const char *kv_model_default_tokenizer(const char *path, char *buf, size_t len);

/* SHA-256 (hex) identifying the checkpoint: of the file for llama2.c; for Hugging Face, of the bytes
 * of m->files concatenated in order (config.json, the index when sharded, the safetensors files in
 * file-name order). */
int kv_model_sha256(const kv_model_t *m, char hex[65]);
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
