/*
 * capture_fixtures.h: tiny llama2.c checkpoints and tokenizers written by the tests themselves.
 *
 * The writers follow the layouts documented in traces/capture/kv_model.h (read from llama2.c's
 * export.py) but share no code with the loaders, so a loader bug cannot hide behind a symmetric
 * writer bug. Weights are random (fixed seed); a Q8_0 export also returns the exact dequantised
 * values the loader must produce.
 */
#ifndef KV_CAPTURE_FIXTURES_H
#define KV_CAPTURE_FIXTURES_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    int dim, hidden, layers, heads, kv_heads, vocab, seq_len;
    int shared; /* classifier shared with the embedding */
    /* (layers, ...) row-major W[out][in] */
    float *emb, *rms_att, *wq, *wk, *wv, *wo, *rms_ffn, *w1, *w2, *w3, *rms_final, *wcls;
} fx_model_t;

/* Random weights of the given shape (wcls random too; ignored when shared). */
void fx_model_init(fx_model_t *m, int dim, int hidden, int layers, int heads, int kv_heads, int vocab, int seq_len,
                   int shared, uint64_t seed);
void fx_model_free(fx_model_t *m);

/* Serialised checkpoints (malloc'd bytes). v2 also fills *deq (when not NULL) with the dequantised
 * model (allocated like fx_model_init). */
unsigned char *fx_model_v0(const fx_model_t *m, size_t *len);
unsigned char *fx_model_v1(const fx_model_t *m, size_t *len);
unsigned char *fx_model_v2(const fx_model_t *m, int group, size_t *len, fx_model_t *deq);

/* A Hugging Face safetensors file of the same weights (F32, Hugging Face tensor names, rows as
 * stored here: the rotate_half permutation of q/k is left out, so logits differ from fx_model_v1's;
 * for loaders' robustness, not for numerical checks) and its config.json text (malloc'd). */
unsigned char *fx_model_safetensors(const fx_model_t *m, size_t *len);
char *fx_model_hf_config(const fx_model_t *m);

/* The tiny tokenizer of the tests: <unk>, BOS, EOS, 256 byte tokens, then FX_EXTRA pieces with
 * the scores below (vocab = 259 + FX_EXTRA). */
#define FX_EXTRA 13
unsigned char *fx_tokenizer(size_t *len);

int fx_write(const char *path, const void *buf, size_t len);
void fx_put_i32(unsigned char *buf, size_t off, int32_t v);

#endif
