/*
 * kv_model_internal.h: what a checkpoint format file provides to the model core (model.c).
 *
 * A format is one row of the dispatch table in model.c: probe decides from the path (and at most
 * the first bytes of the file) whether the format is this one, load fills a kv_model_t (calling
 * kv_model_config_check before it trusts any dimension), default_tokenizer names the tokenizer
 * that travels with the checkpoint. Format files call the core (kv_model_config_check,
 * kv_model_free, kv_model_set_dtypes); the core calls formats only through the table.
 */
#ifndef KV_MODEL_INTERNAL_H
#define KV_MODEL_INTERNAL_H

#include "traces/capture/kv_model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const char *name;               /* "gguf", "safetensors", "llama2.c" */
    int (*probe)(const char *path); /* 1: this format */
    int (*load)(const char *path, kv_model_t **out);
    const char *(*default_tokenizer)(const char *path, char *buf, size_t len); /* NULL: none */
} kv_model_format_t;

extern const kv_model_format_t kv_model_format_gguf;
extern const kv_model_format_t kv_model_format_hf;
extern const kv_model_format_t kv_model_format_llama2c;

/* The parts of a model's weights in the order of kv_model.h's fp32 pointers (the layout of an fp32
 * conversion), and their element counts for configuration c (with biases when `bias`): the classifier
 * counts 0 when it is shared, the biases 0 without them. Bounded by kv_model_config_check. */
enum {
    KV_PART_EMB,
    KV_PART_RMS_ATT,
    KV_PART_WQ,
    KV_PART_WK,
    KV_PART_WV,
    KV_PART_WO,
    KV_PART_RMS_FFN,
    KV_PART_W1,
    KV_PART_W2,
    KV_PART_W3,
    KV_PART_RMS_FINAL,
    KV_PART_WCLS,
    KV_PART_BQ,
    KV_PART_BK,
    KV_PART_BV,
    KV_N_PARTS
};
/* Fills sizes (KV_N_PARTS) and returns their sum. */
uint64_t kv_model_part_sizes(const kv_model_config_t *c, int bias, uint64_t *sizes);

/* m->dtypes from counts of tensors per dtype name (n entries): "Q4_1 x210, F32 x61, Q8_0 x1", most
 * frequent first. */
void kv_model_set_dtypes(kv_model_t *m, const char *const *names, const int *counts, int n);

/* 1 when the file at `path` starts with the `n` bytes of `magic` (regular file, readable). */
int kv_model_file_starts_with(const char *path, const void *magic, size_t n);

/* How the Hugging Face loader treats config.json key `key` for the architecture class `arch_class`
 * ("LlamaForCausalLM", ...): read and used, ignored as harmless, or checked (a value that changes
 * the computation is refused by name); -1 for a key it does not know (a warning names it) or an
 * architecture it does not run. model_hf.c's key table; for tests. */
enum { KV_HF_KEY_USED = 0, KV_HF_KEY_IGNORED = 1, KV_HF_KEY_CHECKED = 2 };
int kv_model_hf_key_kind(const char *key, const char *arch_class);
/* Entry i of that table (its key and treatment); 0 past the end. */
int kv_model_hf_key_at(int i, const char **key, int *kind);

#ifdef __cplusplus
}
#endif
#endif
