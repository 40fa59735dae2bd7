/*
 * kv_tokenizer_internal.h: what the files of the tokenizer family provide to each other.
 *
 * A format is one row of the format table in tokenizer.c: probe decides from the path (and at most
 * the first bytes of the file) whether the file is of this format, load fills a kv_tokenizer_t the
 * core allocated (pieces, lens, scores, merges, ids, and for byte-level BPE the settings in t->bpe).
 * A kind is one row of the kind table in tokenizer.c: its encoder (text -> ids, no BOS/EOS), its
 * decoder of one token, and for byte-level BPE a prepare step run after load (compile the regexes,
 * index the added tokens) and the release of what prepare made. Formats and encoders call the core
 * (the helpers below, kv_tokenizer_lookup, kv_tokenizer_index); the core calls them only through the
 * two tables.
 */
#ifndef KV_TOKENIZER_INTERNAL_H
#define KV_TOKENIZER_INTERNAL_H

#include "traces/capture/kv_tokenizer.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KV_TOK_MAX_TOKENS (1 << 24) /* more tokens or merges mean a corrupt file */

typedef struct {
    const char *name;               /* "gguf", "tokenizer.json", "llama2.c" */
    int (*probe)(const char *path); /* 1: this format */
    /* Fill t (zeroed by the core, t->path set, ids -1); on failure the core frees t. */
    int (*load)(const char *path, int expect_vocab, kv_tokenizer_t *t);
} kv_tok_format_t;

extern const kv_tok_format_t kv_tok_format_gguf;
extern const kv_tok_format_t kv_tok_format_hf;
extern const kv_tok_format_t kv_tok_format_llama2c;

/* Growing array of token ids (encoders append to it). */
typedef struct {
    int32_t *ids;
    int n, cap;
} kv_tok_ids_t;

int kv_tok_ids_push(kv_tok_ids_t *v, int32_t id);

typedef struct {
    /* Append the ids of `len` bytes of text (no BOS/EOS) to *out. */
    int (*encode)(const kv_tokenizer_t *t, const char *text, size_t len, kv_tok_ids_t *out);
    const char *(*decode)(const kv_tokenizer_t *t, int prev, int id, size_t *len);
    int (*prepare)(kv_tokenizer_t *t); /* NULL: nothing to prepare */
    void (*release)(kv_tokenizer_t *t);
} kv_tok_kind_t;

extern const kv_tok_kind_t kv_tok_kind_spm; /* KV_TOK_SPM and KV_TOK_SPM_HF (tok_spm.c) */
extern const kv_tok_kind_t kv_tok_kind_bpe; /* KV_TOK_BYTE_BPE (tok_bpe.c) */

/* ---- the BPE merge loop (tokenizer.c), shared by the encoders ---- */

/* Scratch of one encode call (never shared between threads): the merge heap and the symbol list. */
typedef struct {
    void *heap;
    size_t heap_cap;
    int *next, *prev;
    size_t cap;
    char *text; /* max_token_length * 2 bytes, for concatenations (score merges) */
} kv_tok_scratch_t;

/* Merge the n symbols ids[0..n) in place until no pair merges: with t->merge_keys the listed pair of
 * lowest rank, else the pair whose concatenation is the best-scoring token; the leftmost on ties.
 * *n gets the new count. */
int kv_tok_merge(const kv_tokenizer_t *t, kv_tok_scratch_t *s, int32_t *ids, int *n);
void kv_tok_scratch_free(kv_tok_scratch_t *s);

/* One merge of a loader: key (left id << 32 | right id), rank, id of the concatenation. */
typedef struct {
    uint64_t key;
    int rank, id;
} kv_tok_merge_t;

/* Sort and store n merges into t->merge_keys/rank/id (m is reordered). A pair listed twice keeps
 * its first rank (last_wins 0) or its last (last_wins 1: Hugging Face's BPE, whose merge table is
 * a map filled in list order). merge_keys is set even when n is 0. */
int kv_tok_set_merges(kv_tokenizer_t *t, kv_tok_merge_t *m, size_t n, int last_wins);

/* Allocate t->pieces, lens, scores, sorted for n tokens and t->blob for `bytes` bytes of pieces
 * (each piece's bytes plus its NUL). Pieces are then copied with kv_tok_put_piece in any id order. */
int kv_tok_alloc(kv_tokenizer_t *t, size_t n, size_t bytes);
/* Copy a piece into the blob (after the previous one) as token `id`; updates max_token_length. */
void kv_tok_put_piece(kv_tokenizer_t *t, char **cursor, int id, const char *s, int len);

/* Position in t->sorted of the first token whose piece is >= (s, len) in byte order. */
int kv_tok_lower_bound(const kv_tokenizer_t *t, const char *s, size_t len);

/* Add an added token (text copied). */
int kv_tok_add_added(kv_tokenizer_t *t, int id, const char *text, size_t len, unsigned flags);
/* Replace t->chat_template with a copy of len bytes of text. */
int kv_tok_set_template(kv_tokenizer_t *t, const char *text, size_t len);

/* ---- GPT-2's byte alphabet (tokenizer.c) ---- */

/* Code point that stands for byte b in byte-level vocabularies ('!'..'~', 0xA1..0xAC and 0xAE..0xFF
 * stand for themselves, the other 68 bytes for U+0100.. in byte order). */
unsigned kv_tok_byte_char(int b);
/* UTF-8 of byte b's character into out (at least 3 bytes); returns its length. */
int kv_tok_byte_utf8(int b, char *out);
/* Decode a byte-level vocabulary string (n bytes) into out (at most n bytes): every character in the
 * alphabet becomes its byte; returns the length, or -1 when some character is not in the alphabet
 * (Hugging Face's ByteLevel decoder then keeps the string's own bytes). */
int kv_tok_unbyte(const char *s, size_t n, char *out);

/* ---- byte-level BPE settings (filled by the formats, compiled by tok_bpe.c) ---- */

enum { KV_STEP_SPLIT = 1, KV_STEP_DIGITS, KV_STEP_BYTELEVEL };
/* Split behaviours (Hugging Face's SplitDelimiterBehavior). */
enum { KV_SPLIT_REMOVED = 0, KV_SPLIT_ISOLATED, KV_SPLIT_MERGED_PREV, KV_SPLIT_MERGED_NEXT, KV_SPLIT_CONTIGUOUS };
#define KV_TOK_MAX_STEPS 8

typedef struct {
    int type;          /* KV_STEP_* */
    char *pattern;     /* Split: the pattern (kv_malloc'd), as written in the file */
    int literal;       /* Split: the pattern is a plain string (HF's {"String": ...}) */
    int behavior;      /* Split: KV_SPLIT_* */
    int invert;        /* Split: the matches are the pieces kept, the rest the delimiters */
    int individual;    /* Digits: each digit alone (else runs of digits) */
    int prefix_space;  /* ByteLevel: add_prefix_space */
    int use_regex;     /* ByteLevel: split with the GPT-2 regex first */
    const char *label; /* a known regex's name for descriptions ("gpt2", "llama3", ...), or NULL */
} kv_tok_step_t;

/* Token attributes (kv_tok_bpe.attr). */
enum {
    KV_TOK_ATTR_MODEL = 1, /* in the BPE model's vocabulary (what ignore_merges looks in) */
    KV_TOK_ATTR_BYTES = 2  /* its vocabulary string is in the byte alphabet (its piece is what it decodes to) */
};

typedef struct kv_tok_bpe {
    kv_tok_step_t steps[KV_TOK_MAX_STEPS];
    int n_steps;         /* the last one is ByteLevel */
    int nfc;             /* normalizer: NFC (else none) */
    int ignore_merges;   /* a pre-token that is a vocabulary entry is one token */
    int unk_byte;        /* the BPE model's unk_token id for a byte missing from the vocabulary, -1: none
                            (tokenizer.json's model.unk_token; GGUF: none, llama.cpp drops the byte) */
    int fuse_unk;        /* consecutive unknown bytes are one unk_byte */
    int byte_id[256];    /* id of each byte's character, -1 when the vocabulary lacks it */
    unsigned char *attr; /* (vocab_size) KV_TOK_ATTR_* */
    void *compiled;      /* tok_bpe.c: compiled regexes and the added-token index */
} kv_tok_bpe_t;

/* Allocate t->bpe (byte_id all -1, attr for t->vocab_size tokens, which must be set). */
int kv_tok_bpe_new(kv_tokenizer_t *t);
/* Append a step (the pattern is copied); KV_EFORMAT naming t->path past KV_TOK_MAX_STEPS. */
int kv_tok_bpe_add_step(kv_tokenizer_t *t, const kv_tok_step_t *step);

/* Regexes of the pre-tokenizers kvsim knows by name (their labels in descriptions). */
extern const char kv_tok_re_gpt2[];   /* GPT-2: ByteLevel's own regex */
extern const char kv_tok_re_llama3[]; /* Llama 3 (tokenizer.json's form, with (?i:...)) */
extern const char kv_tok_re_qwen2[];  /* Qwen2 (tokenizer.json's form) */
/* The label of a known regex ("gpt2", "llama3", "qwen2", ...) or NULL. */
const char *kv_tok_regex_label(const char *pattern);

#ifdef __cplusplus
}
#endif
#endif
