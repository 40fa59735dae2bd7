/*
 * kv_model.h: Llama-family model weights, whatever file they come from.
 *
 * The model family is a core (model.c: the dispatch table, the configuration check, hashing, the
 * weights' two representations, free) and one file per checkpoint format, each a {probe, load, default
 * tokenizer} row of the table in model.c (kv_model_internal.h).
 *
 * Weights. kv_model_load maps the checkpoint's files read-only and keeps every matrix in its stored
 * precision (fp32, fp16, bf16, ggml's quantised blocks, llama2.c's grouped int8), described by a
 * kernels/kv_weight.h descriptor that points into the mapping (kv_model_weight); the forward pass
 * converts tiles of rows to fp32 as it multiplies (the backend's matmul_w), so memory is the file's own
 * size, paged in as it is read, and the numbers are those of the weights converted at load, to the bit.
 * Norm weights and biases (a few KB per layer) are converted to fp32 at load. kv_model_load_f32 converts
 * everything to fp32 arrays at load instead (4 bytes per parameter: the fp32 pointers below), for code
 * that reads weights as floats. Formats, in the order they are probed:
 *   - GGUF (model_gguf.c): llama.cpp's single-file format, versions 2 and 3, architectures llama and
 *     qwen2; the tokenizer is read from the same file;
 *   - Hugging Face (model_hf.c): a folder with config.json and safetensors weights (a directory, a
 *     .json or a .safetensors path; shards listed by model.safetensors.index.json); F32, F16 and BF16
 *     weights; q/k rows read in the interleaved RoPE order (a row permutation of the descriptor);
 *   - llama2.c (model_llama2c.c), anything else:
 *     - version 0 ("legacy"): a header of 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
 *       vocab_size, seq_len), then fp32 weights in the order token_embedding, rms_att, wq, wk, wv, wo,
 *       rms_ffn, w1, w2, w3, rms_final, the unused freq_cis tables (2 x seq_len x head_dim/2 floats,
 *       skipped) and, when vocab_size is negative, a separate classifier wcls of |vocab_size| x dim.
 *     - version 1: a 256-byte header (uint32 magic 0x616b3432 "ak42", int32 version 1, the 7 int32
 *       above with a positive vocab_size, uint8 shared_classifier, zero padding), then fp32 weights in
 *       the order rms_att, rms_ffn, rms_final, token_embedding, wq, wk, wv, wo, w1, w2, w3 [, wcls].
 *     - version 2 (Q8_0): the version-1 header plus an int32 group_size at byte 37, then the fp32
 *       norms (rms_att, rms_ffn, rms_final), then the quantised tensors token_embedding, then wq, wk,
 *       wv, wo, w1, w2, w3 of every layer, [wcls], each as int8 values with one fp32 scale per group
 *       of group_size values, in one of the two arrangements llama2.c has written (model_llama2c.c).
 *     The layouts were read from llama2.c's export.py and runq.c.
 *
 * Every size is validated against the file before a single weight is touched: impossible or
 * absurd dimensions and files whose size does not match their header are errors naming the file
 * and the problem. Weight matrices are row-major W[out][in], as matmul in kv_backend.h expects, and
 * the q/k rows of every head are in the interleaved RoPE order (pairs 2i, 2i + 1) the forward pass
 * rotates.
 */
#ifndef KV_MODEL_H
#define KV_MODEL_H

#include "kernels/kv_rope.h"
#include "kernels/kv_weight.h"

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
    int head_dim;          /* dim / n_heads unless the checkpoint gives it (set before the check) */
    int q_dim;             /* n_heads * head_dim: width of wq's output and of wo's input */
    int kv_dim;            /* n_kv_heads * head_dim */
    int shared_classifier; /* 1: logits use token_embedding */
    int version;           /* llama2.c: 0, 1 or 2; -1 for other formats */
    int group_size;        /* Q8_0 group size (llama2.c version 2), else 0 */
    float rope_theta;      /* == rope.theta (10000 for llama2.c models), as recorded in traces */
    float norm_eps;        /* RMSNorm epsilon, 1e-5 for llama2.c */
    kv_rope_t rope;        /* theta and scaling; rope.theta 0 before the check means plain(rope_theta) */
    int qkv_bias;          /* 1: bq, bk, bv are added after the q/k/v projections (Qwen2) */
    char arch[32];         /* "llama" (llama2.c, Llama, SmolLM2), "mistral", "qwen2" */
} kv_model_config_t;

/* The seven matrices of a layer (W[out][in]): q (q_dim, dim), k and v (kv_dim, dim), o (dim, q_dim),
 * gate = w1 and up = w3 (hidden_dim, dim), down = w2 (dim, hidden_dim). */
enum { KV_MW_Q, KV_MW_K, KV_MW_V, KV_MW_O, KV_MW_GATE, KV_MW_DOWN, KV_MW_UP, KV_MW_N };

typedef struct {
    kv_weight_t w[KV_MW_N]; /* indexed by KV_MW_* */
} kv_layer_weights_t;

typedef struct {
    kv_model_config_t cfg;
    char path[1024];
    /* Weights as stored (kv_model_load): descriptors into the mapped files. NULL (layers) when the
     * model holds fp32 arrays instead (the pointers below): kv_model_load_f32, llama2.c's fp32 files
     * (their arrays are the mapping itself), models assembled in memory. kv_model_weight serves both. */
    kv_layer_weights_t *layers; /* (n_layers) */
    kv_weight_t emb_w;          /* (vocab_size, dim) */
    kv_weight_t cls_w;          /* (vocab_size, dim); the embedding's descriptor when shared */
    /* fp32 arrays (host memory, read-only): the matrices only when layers is NULL; the norms always,
     * the biases whenever the configuration has them */
    const float *token_embedding; /* (vocab_size, dim) */
    const float *rms_att;         /* (n_layers, dim) */
    const float *wq;              /* (n_layers, q_dim, dim) */
    const float *wk;              /* (n_layers, kv_dim, dim) */
    const float *wv;              /* (n_layers, kv_dim, dim) */
    const float *wo;              /* (n_layers, dim, q_dim) */
    const float *rms_ffn;         /* (n_layers, dim) */
    const float *w1;              /* (n_layers, hidden_dim, dim) */
    const float *w2;              /* (n_layers, dim, hidden_dim) */
    const float *w3;              /* (n_layers, hidden_dim, dim) */
    const float *rms_final;       /* (dim) */
    const float *wcls;            /* (vocab_size, dim); == token_embedding when shared */
    const float *bq;              /* (n_layers, q_dim) or NULL (cfg.qkv_bias == 0) */
    const float *bk, *bv;         /* (n_layers, kv_dim) or NULL */
    /* storage */
    int n_maps;      /* read-only mappings of the checkpoint's files, held while the model lives */
    void **maps;     /* (n_maps) */
    size_t *map_len; /* (n_maps) bytes */
    float *owned;    /* fp32 arrays the model allocated (converted weights, or the norms and biases) */
    size_t n_params; /* weights counted once (no freq_cis, no duplicate classifier) */
    size_t weight_bytes; /* bytes of the weights as held: stored matrices + fp32 norms and biases */
    const char *format; /* "llama2.c", "safetensors" or "gguf" (static string) */
    char dtypes[128];   /* the weights' dtypes as stored, most frequent first: "Q4_1 x210, F32 x61, Q8_0 x1" */
    /* Hugging Face checkpoints only (hf == 0 otherwise) */
    int hf;              /* 1: loaded from config.json + safetensors */
    char hf_dtype[16];   /* dtype of the weights in the files: "F32", "F16", "BF16" or "mixed" */
    int n_files;         /* files of the checkpoint, in kv_model_sha256 order (0: the one file at path) */
    char (*files)[1024]; /* config.json, [model.safetensors.index.json], the safetensors files by name */
} kv_model_t;

/* Load a checkpoint of any supported format (probed in the order above), its matrices in their stored
 * precision. On failure *out is NULL and the message names the file and the problem. */
int kv_model_load(const char *path, kv_model_t **out);
/* The same, every weight converted to fp32 arrays at load (the fp32 pointers; layers NULL). */
int kv_model_load_f32(const char *path, kv_model_t **out);
/* Convert a loaded model's stored matrices to fp32 arrays in place (nothing to do when layers is
 * NULL); the mappings are released. */
int kv_model_to_f32(kv_model_t *m);

/* Matrix `which` (KV_MW_*) of layer `layer`, the token embedding and the classifier, as descriptors of
 * host memory, whichever representation the model holds. */
kv_weight_t kv_model_weight(const kv_model_t *m, int layer, int which);
kv_weight_t kv_model_embedding(const kv_model_t *m);
kv_weight_t kv_model_classifier(const kv_model_t *m);
/* Bytes of the model's mapped files now resident in memory (mincore), 0 when nothing is mapped. */
size_t kv_model_resident_bytes(const kv_model_t *m);
/* Record a mapping for kv_model_free to release (format loaders). */
int kv_model_add_map(kv_model_t *m, void *map, size_t len);

/* Name of the format `path` would be loaded as ("gguf", "safetensors", "llama2.c"). */
const char *kv_model_format_of(const char *path);

/* 1 when `path` names a Hugging Face checkpoint: a directory, a .json file (its config.json or
 * index) or a .safetensors file (config.json beside it). Decided by the path alone. */
int kv_model_is_hf_path(const char *path);

/* The tokenizer that comes with the checkpoint, into buf: a Hugging Face folder's tokenizer.json,
 * the GGUF file itself; NULL when the format has none (llama2.c) or the file is absent. */
const char *kv_model_default_tokenizer(const char *path, char *buf, size_t len);

/* SHA-256 (hex) identifying the checkpoint: of the file for llama2.c and GGUF; for Hugging Face, of
 * the bytes of m->files concatenated in order (config.json, the index when sharded, the safetensors
 * files in file-name order). */
int kv_model_sha256(const kv_model_t *m, char hex[65]);
void kv_model_free(kv_model_t *m);

/* Validate dimensions (positive, bounded, divisible: n_heads by n_kv_heads, even head_dim; dim by
 * n_heads unless head_dim was given) and fill head_dim (when 0), q_dim, kv_dim and rope (when
 * rope.theta is 0: plain RoPE with rope_theta). `path` names the file in messages. */
int kv_model_config_check(kv_model_config_t *c, const char *path);

/* Per-layer strides (floats) and pointers. */
static inline const float *kv_layer_ptr(const float *base, int layer, size_t per_layer)
{
    return base + (size_t)layer * per_layer;
}

/* "llama2.c v0 (legacy fp32)", "llama2.c v2 (Q8_0, group 64, as stored)", "GGUF (Q4_1 x210, ..., as
 * stored)" into buf. */
const char *kv_model_describe(const kv_model_t *m, char *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif
