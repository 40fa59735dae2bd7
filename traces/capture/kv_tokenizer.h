/*
 * kv_tokenizer.h: the tokenizers of Llama-family models, whatever file they come from.
 *
 * The tokenizer family is a core (tokenizer.c: the format dispatch table, lookup, index, encode and
 * decode dispatched by kind, free) and one file per format, each a {name, probe, load} row of the
 * table in tokenizer.c (kv_tokenizer_internal.h). Formats, in the order they are probed:
 *   - GGUF (tok_gguf.c): the tokenizer stored in a llama.cpp model file (tokenizer.ggml.*: model,
 *     tokens, scores, token_type, merges, the special ids, add_bos_token/add_eos_token, pre,
 *     tokenizer.chat_template); model "gpt2" is byte-level BPE with llama.cpp's pre-tokenizer regex
 *     list for tokenizer.ggml.pre, model "llama" is SentencePiece by scores;
 *   - Hugging Face tokenizer.json (tok_hf.c), a path ending in .json: BPE models, either of the
 *     SentencePiece-BPE kind (byte fallback, '\u2581' for spaces) or byte-level (a ByteLevel
 *     pre-tokenizer); a tokenizer_config.json beside it gives the BOS/EOS tokens and the chat template;
 *   - llama2.c tokenizer.bin (tok_llama2c.c), anything else.
 *
 * Three kinds of tokenizer come out, each with its encoder:
 *
 * KV_TOK_SPM, SentencePiece BPE by scores (llama2.c tokenizer.bin, GGUF model "llama"; tok_spm.c).
 * tokenizer.bin: int32 max_token_length, then for every token a float32 score, an int32 byte length
 * and the token's bytes. Ids 0, 1, 2 are <unk>, BOS and EOS; when ids 3..258 are "<0x00>".."<0xFF>"
 * the vocabulary has byte fallback. Encoding follows SentencePiece BPE as llama2.c runs it: optional
 * BOS, a dummy-prefix " " token when the text is non-empty, one token per UTF-8 code point (a lead
 * byte and its continuation bytes) looked up in the vocabulary or, when absent, its bytes as
 * byte-fallback tokens (byte + 3), then repeatedly merge the adjacent pair whose concatenation is the
 * best-scoring vocabulary entry (the leftmost pair on ties) until no pair merges. The merge loop uses
 * a priority queue, so long prompts encode in O(n log n) with exactly the result of the quadratic
 * scan. Decoding maps <0xXX> tokens to the raw byte and drops the leading space of the piece after
 * BOS. Control tokens written in the text are not recognised (they encode as their characters).
 *
 * KV_TOK_SPM_HF, SentencePiece-BPE tokenizer.json (Llama 1/2, Mistral v0.1: model.type BPE with
 * byte_fallback, '\u2581' for spaces, a merges list): its pieces with '\u2581' turned back into ' ',
 * and its merges as a table of (left id, right id) -> rank. The encoder is the one above, merging the
 * adjacent pair of lowest rank (the leftmost on ties) among the pairs listed, which is Hugging Face's
 * BPE.
 *
 * KV_TOK_BYTE_BPE, GPT-2 style byte-level BPE (Llama 3, Qwen2, SmolLM2; tok_bpe.c), as Hugging Face
 * `tokenizers` runs it: added tokens are found in the text first (leftmost-longest, with their
 * lstrip/rstrip/single_word options), the rest is normalized (none or NFC), split by the
 * pre-tokenizer steps (Split by a regex, Digits, ByteLevel with the GPT-2 regex), every piece's
 * bytes mapped to GPT-2's byte alphabet and merged by rank (a piece that is itself in the
 * vocabulary is one token when the model sets ignore_merges). Its pieces are stored as the raw bytes
 * they decode to; tok_bpe.c's top comment lists the known differences from Hugging Face.
 *
 * BOS and EOS: every kind has bos_id/eos_id (-1 when none) and add_bos, the model's own rule for
 * whether an encoded prompt starts with BOS (llama2.c: 1; GGUF: tokenizer.ggml.add_bos_token or
 * llama.cpp's default for the pre-tokenizer; tokenizer.json: the post_processor's TemplateProcessing,
 * and 1 for the SentencePiece kind when it has none, as kvsim has always done).
 */
#ifndef KV_TOKENIZER_H
#define KV_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Tokenizer kinds (kv_tokenizer_t.kind). */
enum {
    KV_TOK_SPM = 0,     /* SentencePiece BPE by piece scores: llama2.c tokenizer.bin, GGUF model "llama" */
    KV_TOK_SPM_HF = 1,  /* SentencePiece-BPE tokenizer.json: merges by rank, byte fallback */
    KV_TOK_BYTE_BPE = 2 /* GPT-2 style byte-level BPE: tokenizer.json or GGUF model "gpt2" */
};

/* Options of an added token (Hugging Face's AddedToken). */
enum {
    KV_TOK_SPECIAL = 1,     /* a special token (control token in GGUF) */
    KV_TOK_LSTRIP = 2,      /* the match takes the whitespace on its left */
    KV_TOK_RSTRIP = 4,      /* the match takes the whitespace on its right */
    KV_TOK_SINGLE_WORD = 8, /* only matched when not inside a word */
    KV_TOK_NORMALIZED = 16  /* matched in the normalized text, after the non-normalized ones */
};

typedef struct {
    int id;
    const char *text; /* content as written in the text, NUL-terminated (owned by the tokenizer) */
    int len;          /* bytes */
    unsigned flags;   /* KV_TOK_* options above */
} kv_tok_added_t;

struct kv_tok_bpe; /* byte-level settings and compiled state (kv_tokenizer_internal.h) */

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
    /* BPE merges sorted by key (merge_keys NULL when the kind merges by score) */
    int n_merges;
    uint64_t *merge_keys; /* (uint64_t)left id << 32 | right id */
    int *merge_rank;      /* position in the merges list: lower merges first */
    int *merge_id;        /* id of the concatenation */

    /* ---- every kind ---- */
    int kind;               /* KV_TOK_* */
    const char *format;     /* "llama2.c", "tokenizer.json" or "gguf" (static string) */
    int bos_id, eos_id;     /* -1 when the tokenizer has none */
    int unk_id, pad_id;     /* -1 when none */
    int add_bos, add_eos;   /* 1: the model's prompts start with BOS (end with EOS) */
    char *chat_template;    /* the model's chat template (Jinja text, NUL-terminated), NULL when none */
    int n_added;            /* added / special tokens, in id order */
    kv_tok_added_t *added;  /* byte-level: matched in the text before anything else; SentencePiece kinds:
                               the control tokens (<unk>, BOS, EOS), which text never encodes to */
    char pretok[256];       /* one line: normalizer and pre-tokenizer ("none" for SentencePiece) */
    struct kv_tok_bpe *bpe; /* byte-level kind only (NULL otherwise) */
} kv_tokenizer_t;

/* Load a tokenizer of any supported format (probed in the order above). expect_vocab > 0: the model's
 * vocabulary size (tokenizer.bin must hold exactly that many tokens; tokenizer.json and GGUF may hold
 * fewer, never more); 0: any. On failure *out is NULL and the message names the file and the problem. */
int kv_tokenizer_load(const char *path, int expect_vocab, kv_tokenizer_t **out);

/* Name of the format `path` would be loaded as ("gguf", "tokenizer.json", "llama2.c"). */
const char *kv_tokenizer_format_of(const char *path);

/* For loaders: build t->sorted and t->byte_fallback once pieces, lens and vocab_size are set. */
void kv_tokenizer_index(kv_tokenizer_t *t);
void kv_tokenizer_free(kv_tokenizer_t *t); /* accepts NULL */

/* Id of a piece (exact bytes), or -1 (the lowest id when several tokens have these bytes). */
int kv_tokenizer_lookup(const kv_tokenizer_t *t, const char *s, size_t len);

/* Encode `len` bytes of text; bos/eos: put bos_id/eos_id around it (nothing when the tokenizer has
 * none); pass t->add_bos for the model's own rule. *out (kv_free) gets the ids, *n_out their count;
 * *out has room for at least one id, even when *n_out is 0.
 * Text that is not valid UTF-8 is encoded too (byte-level kind: each byte of an invalid sequence is a
 * pre-token of its own; SentencePiece kinds: byte fallback). */
int kv_tokenizer_encode(const kv_tokenizer_t *t, const char *text, size_t len, int bos, int eos, int32_t **out,
                        int *n_out);

/* Bytes of token `id` as text following token `prev` (-1 for none): SentencePiece kinds give
 * byte-fallback tokens as their raw byte and drop the leading space of the piece after BOS;
 * byte-level BPE gives the piece's bytes (a special token its text; a token may end inside a
 * UTF-8 character, the next one completes it). *len gets the byte count; "" for ids outside the
 * vocabulary. */
const char *kv_tokenizer_decode(const kv_tokenizer_t *t, int prev, int id, size_t *len);

/* Decode a whole sequence into a NUL-terminated string (kv_free); ids outside the vocabulary are an
 * error. SentencePiece kinds: BOS and EOS produce no text, decode_all(encode(text, bos=1)) == text.
 * Byte-level BPE: every token gives its text, special tokens included (Hugging Face's
 * decode(skip_special_tokens=False), without its replacement of invalid UTF-8), so
 * decode_all(encode(text, bos=0)) == text when every byte of the text has a token. */
int kv_tokenizer_decode_all(const kv_tokenizer_t *t, const int32_t *ids, int n, char **out, size_t *out_len);

/* The vocabulary piece of `id` for display (*len bytes, may contain any byte): SentencePiece kinds as
 * stored (spaces as ' ', byte tokens as "<0x0A>"), byte-level BPE the bytes it decodes to. NULL for
 * ids outside the vocabulary. */
const char *kv_tokenizer_piece(const kv_tokenizer_t *t, int id, size_t *len);

/* One line: kind, format, sizes, pre-tokenizer, BOS/EOS and add_bos, added tokens, chat style. */
const char *kv_tokenizer_describe(const kv_tokenizer_t *t, char *buf, size_t len);

/* Wrap a plain prompt in the model's chat template with the generation prompt, as transformers'
 * apply_chat_template(messages, add_generation_prompt=True, tokenize=False) renders it for the
 * messages [system (when not NULL), user]. Recognised styles (tok_chat.c): ChatML (<|im_start|>
 * role\n content <|im_end|>\n, with the default system message the template inserts when none is
 * given, as SmolLM2 and Qwen2 do) and Llama 3 (header ids, <|eot_id|>, BOS text first; 3.1/3.2's
 * "Cutting Knowledge Date" system header with the template's default date, or today's when the
 * template asks for strftime_now). Any other template, or none, is an error quoting its start.
 * *out (kv_free) gets the NUL-terminated text; encode it with bos=0 (the template holds the BOS text
 * when the model wants one). */
int kv_tokenizer_chat(const kv_tokenizer_t *t, const char *system, const char *user, char **out);

/* "SentencePiece (scores)", "SentencePiece-BPE", "byte-level BPE". */
const char *kv_tokenizer_kind_name(int kind);

#ifdef __cplusplus
}
#endif
#endif
