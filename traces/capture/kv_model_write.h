/*
 * kv_model_write.h: random-weight Hugging Face checkpoints of any Llama shape (model_write.c), so
 * that capture at the papers' scale (Llama-3-8B: 8.0 B parameters, 16 GB in bf16) can be exercised
 * and measured on a machine that has no copy of the real weights, without Python.
 *
 * The folder is what transformers' save_pretrained writes for LlamaForCausalLM: config.json (the
 * shape, rope_theta, rms_norm_eps, tie_word_embeddings, torch_dtype), the weights as safetensors
 * (model.safetensors, or model-0000i-of-0000n.safetensors shards of at most shard_bytes each with a
 * model.safetensors.index.json listing every tensor's file and the total size) and no tokenizer
 * (capture it with --ids). Tensor names and shapes are transformers' (q_proj and k_proj rows in its
 * rotate_half order, which for random weights is just a different random matrix).
 *
 * Values: every matrix entry is uniform on [-a, a] with a = std sqrt(3) (standard deviation std,
 * default 0.02, transformers' initializer_range for Llama), from a counter-based hash of (seed,
 * tensor, element): the same options give the same bytes, whatever the thread count. Norm weights
 * are 1. With RMSNorm before every projection this keeps activations finite at any depth: at the
 * Llama-3-8B shape the residual stream grows to a few tens after 32 layers, and the logits stay
 * within +-10 or so. Every file is written under a temporary name and renamed when complete.
 */
#ifndef KV_MODEL_WRITE_H
#define KV_MODEL_WRITE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim; /* head_dim 0: dim / n_heads */
    int vocab_size, seq_len;
    double rope_theta, norm_eps;
    int tied;             /* 1: no lm_head (the classifier is the embedding) */
    int dtype;            /* KV_WT_BF16 (default), KV_WT_F16 or KV_WT_F32 (kernels/kv_weight.h) */
    uint64_t shard_bytes; /* the largest shard's tensor bytes (default 5e9, as transformers' "5GB") */
    double std;           /* standard deviation of the matrix entries (default 0.02) */
    uint64_t seed;        /* default 0 */
    int bos_id, eos_id;   /* recorded in config.json (-1: none) */
    int force;            /* 1: write into a folder that already holds files */
} kv_model_write_opts_t;

/* Defaults (bf16, 5e9-byte shards, std 0.02, seed 0) and the shape of a preset: "llama3-8b" (4096
 * wide, 32 layers, 32 heads of 128 with 8 KV heads, feed-forward 14336, vocabulary 128256, untied,
 * theta 500000), "llama3.2-1b", "smollm2-135m", "tiny" (64 wide, 2 layers: tests). NULL: no shape.
 * KV_EINVAL naming the presets for an unknown name. */
int kv_model_write_preset(const char *name, kv_model_write_opts_t *o);
/* The presets' names, comma-separated. */
const char *kv_model_write_presets(void);

typedef struct {
    uint64_t n_params; /* elements of every tensor */
    uint64_t bytes;    /* tensor bytes over all shards */
    int n_shards;
    double seconds;
} kv_model_write_result_t;

/* Write the checkpoint into folder `dir` (created when absent; one that holds files is refused unless
 * o->force). Progress on stderr. res may be NULL. */
int kv_model_write_random(const kv_model_write_opts_t *o, const char *dir, kv_model_write_result_t *res);

#ifdef __cplusplus
}
#endif
#endif
