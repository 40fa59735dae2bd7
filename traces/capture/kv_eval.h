/*
 * kv_eval.h: text-level uses of the forward pass: documents, teacher-forced NLL, generation.
 *
 * Documents: a text holding several documents separates them with `<|endoftext|>` (normally on a
 * line of its own, as TinyStories dumps do). Each document is the text between separators with
 * the surrounding line breaks removed; empty documents are dropped. Each is scored or captured as
 * its own sequence, starting with BOS when the model adds one (the tokenizer's add_bos: llama2.c and
 * Llama 3 do, SmolLM2 and Qwen2 do not). The separator is found as text before tokenization, so it
 * never becomes a token, even in a vocabulary where <|endoftext|> is one (SmolLM2: id 0).
 */
#ifndef KV_EVAL_H
#define KV_EVAL_H

#include "traces/capture/kv_forward.h"
#include "traces/capture/kv_tokenizer.h"

#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KV_DOC_SEPARATOR "<|endoftext|>"

typedef struct {
    const char *text; /* points into the input */
    size_t len;
} kv_doc_t;

/* Split at KV_DOC_SEPARATOR. *docs (kv_free) gets the non-empty documents. A text without a
 * separator is one document (trimmed the same way). */
int kv_split_docs(const char *text, size_t len, kv_doc_t **docs, int *n_docs);

typedef struct {
    double nll_sum;   /* nats over all predicted tokens */
    long n_predicted; /* tokens predicted (every token but each document's first) */
    int n_docs;
    int n_windows; /* sequences run (documents longer than the context are split) */
    long n_tokens; /* tokens including BOS (when the model adds it) */
} kv_nll_result_t;

/* Called after each document: its index, tokens (with BOS when added), and its own sum/count. */
typedef void (*kv_nll_doc_cb)(void *ctx, int doc, int n_tokens, double nll_sum, long n_predicted);

/* Teacher-forced negative log-likelihood of `text` (natural log). Each document is [BOS +] its
 * tokens; a document longer than the forward pass's context (kv_fwd_max_tokens) is split into
 * windows that overlap by one token, each run from position 0, so every token after the first is
 * predicted exactly once. */
int kv_nll_text(kv_fwd_t *f, const kv_tokenizer_t *tok, const char *text, size_t len, kv_nll_result_t *res,
                kv_nll_doc_cb cb, void *cb_ctx);

typedef struct {
    int32_t *tokens; /* (n_tokens) prompt (with BOS when the model adds it, or BOS alone for an empty
                        prompt) then generated ids; kv_free */
    int n_tokens, n_prompt;
    double prefill_s, decode_s;
} kv_gen_result_t;

/* Greedy (temperature <= 0) or sampled continuation of `prompt` for up to `steps` tokens, stopping
 * early at the tokenizer's BOS or EOS, capped by the context. The prompt and then each new piece
 * are written to `out` as they come (out may be NULL; BOS and EOS are not written). */
int kv_generate(kv_fwd_t *f, const kv_tokenizer_t *tok, const char *prompt, int steps, float temperature, uint64_t seed,
                FILE *out, kv_gen_result_t *res);

/* The same from token ids (used as given: no BOS is added); tok may be NULL (nothing is written). */
int kv_generate_ids(kv_fwd_t *f, const kv_tokenizer_t *tok, const int32_t *ids, int n_ids, int steps, float temperature,
                    uint64_t seed, FILE *out, kv_gen_result_t *res);

/* Teacher-forced NLL of one sequence of token ids (one document, split into windows as above). */
int kv_nll_ids(kv_fwd_t *f, const int32_t *ids, int n, kv_nll_result_t *res);

/* Token ids written as text: integers separated by whitespace and/or commas ("1 2 3", "1,2,3"), or a
 * JSON list ("[1, 2, 3]"). *ids (kv_free) gets them; errors name `where` and the offending byte
 * offset. At least one id; each in [0, 2^31). */
int kv_ids_parse(const char *text, size_t len, const char *where, int32_t **ids, int *n);
/* kv_ids_parse of a whole file ("-": standard input). */
int kv_ids_read(const char *path, int32_t **ids, int *n);
/* Every id inside the model's vocabulary [0, vocab) and, when tok is given, the tokenizer's;
 * errors name `where`, the position and the id. */
int kv_ids_check(const int32_t *ids, int n, int vocab, const kv_tokenizer_t *tok, const char *where);

/* Index drawn from softmax(logits / temperature) with uniform variate u in [0, 1). */
int kv_sample(const float *logits, int n, float temperature, double u);

#ifdef __cplusplus
}
#endif
#endif
