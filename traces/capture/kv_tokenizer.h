/*
 * kv_tokenizer.h: llama2.c `tokenizer.bin` (SentencePiece BPE vocabulary with scores).
 *
 * File: int32 max_token_length, then for every token a float32 score, an int32 byte length and
 * the token's bytes. Ids 0, 1, 2 are <unk>, BOS and EOS; when ids 3..258 are "<0x00>".."<0xFF>"
 * the vocabulary has byte fallback.
 *
 * Encoding follows SentencePiece BPE as llama2.c runs it: optional BOS, a dummy-prefix " " token
 * when the text is non-empty, one token per UTF-8 code point (a lead byte and its continuation
 * bytes) looked up in the vocabulary or, when absent, its bytes as byte-fallback tokens (byte + 3),
 * then repeatedly merge the adjacent pair whose concatenation is the best-scoring vocabulary entry
 * (the leftmost pair on ties) until no pair merges. The merge loop uses a priority queue, so long
 * prompts encode in O(n log n) with exactly the result of the quadratic scan.
 * Decoding maps <0xXX> tokens to the raw byte and drops the leading space of the piece after BOS.
 *
 * A Hugging Face tokenizer.json of the SentencePiece-BPE kind (Llama 1/2, Mistral v0.1: model.type
 * BPE with byte_fallback, '▁' for spaces, a merges list) loads into the same structure
 * (hf_tokenizer.c): its pieces with '▁' turned back into ' ', and its merges as a table of
 * (left id, right id) -> rank. With a merge table the encoder merges the adjacent pair of lowest
 * rank (the leftmost on ties) among the pairs listed, which is Hugging Face's BPE; without one it
 * merges by the score of the concatenation, as above.
 */
#ifndef KV_TOKENIZER_H
#define KV_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int vocab_size;
    int max_token_length; /* from the header (every piece is at most this long) */
    char **pieces;        /* (vocab_size) bytes of each token, NUL-terminated; may contain NUL */
    int *lens;            /* (vocab_size) byte length of each piece */
    float *scores;        /* (vocab_size) merge score */
    int *sorted;          /* (vocab_size) ids sorted by piece bytes, for lookup */
    int byte_fallback;    /* 1 when ids 3..258 are <0x00>..<0xFF> */
    char path[1024];
    char *blob; /* storage of the pieces */
    /* Hugging Face BPE merges sorted by key (merge_keys NULL for tokenizer.bin) */
    int n_merges;
    uint64_t *merge_keys; /* (uint64_t)left id << 32 | right id */
    int *merge_rank;      /* position in tokenizer.json's merges list: lower merges first */
    int *merge_id;        /* id of the concatenation */
} kv_tokenizer_t;

/* Load `path` (a tokenizer.json when its name ends in .json, else a tokenizer.bin). expect_vocab > 0:
 * the file must hold exactly that many tokens (the model's vocab; a tokenizer.json may hold fewer,
 * never more); 0: read tokens up to the end of the file. Errors name the file and the problem. */
int kv_tokenizer_load(const char *path, int expect_vocab, kv_tokenizer_t **out);

/* The Hugging Face tokenizer.json loader behind kv_tokenizer_load (hf_tokenizer.c). */
int kv_hf_tokenizer_load(const char *path, int expect_vocab, kv_tokenizer_t **out);

/* For loaders: build t->sorted and t->byte_fallback once pieces, lens and vocab_size are set. */
void kv_tokenizer_index(kv_tokenizer_t *t);
void kv_tokenizer_free(kv_tokenizer_t *t);

/* Id of a piece (exact bytes), or -1. */
int kv_tokenizer_lookup(const kv_tokenizer_t *t, const char *s, size_t len);

/* Encode `len` bytes of text. *out (kv_free) gets the ids, *n_out their count. */
int kv_tokenizer_encode(const kv_tokenizer_t *t, const char *text, size_t len, int bos, int eos, int32_t **out,
                        int *n_out);

/* Bytes of token `id` as text following token `prev` (-1 for none): byte-fallback tokens give their
 * raw byte, the piece after BOS loses its leading space. *len gets the byte count. */
const char *kv_tokenizer_decode(const kv_tokenizer_t *t, int prev, int id, size_t *len);

/* Decode a whole sequence into a NUL-terminated string (kv_free): BOS and EOS produce no text,
 * ids outside the vocabulary are an error. decode_all(encode(text, bos=1)) == text. */
int kv_tokenizer_decode_all(const kv_tokenizer_t *t, const int32_t *ids, int n, char **out, size_t *out_len);

#ifdef __cplusplus
}
#endif
#endif
