/*
 * test_tokenizer_bpe.c: the byte-level BPE tokenizer (traces/capture/tok_bpe.c), its two formats
 * (tokenizer.json: tok_hf.c; GGUF: tok_gguf.c), chat wrapping (tok_chat.c) and `kvsim tokenize`.
 *  - a synthetic byte-level vocabulary (ids 0..255 the byte characters in byte order, a few longer
 *    pieces) written as tokenizer.json with different pre-tokenizers: ids worked out by hand from
 *    Hugging Face's definitions (merges by rank, leftmost first; ignore_merges; added tokens with
 *    lstrip/rstrip/single_word; Digits; the five Split behaviours and invert; add_prefix_space; NFC;
 *    bytes that are not UTF-8, each its own token), and decode(encode(text)) == text. The same
 *    files gave the same ids in tokenizers 0.23.3 (except the invalid UTF-8, which Python cannot
 *    pass). The same vocabulary as a GGUF file (written here) encodes alike;
 *  - broken tokenizer.json and GGUF vocabularies fail with messages naming the file and the problem;
 *  - SmolLM2-135M-Instruct (GGUF, when models/SmolLM2-135M-Instruct is present): golden ids pinned
 *    from tokenizers 0.23.3 (on a tokenizer.json built from the GGUF's vocabulary and merges with
 *    SmolLM2's own pre-tokenizer and added tokens: tests/tokenizer_ref.py), BOS/EOS and add_bos, the
 *    ChatML wrapping, and the encoder's speed (printed; a 3,000-token prompt must take < 0.25 s);
 *  - interop (also python3 with tokenizers): tests/tokenizer_ref.py writes tokenizer.json files for
 *    SmolLM2's vocabulary with SmolLM2's, a Llama-3-style and a Qwen2-style (NFC) pre-tokenizer and
 *    one with lstrip/rstrip/single_word/normalized added tokens, and Hugging Face's ids for ~30
 *    varied texts and the TinyStories sample (every line and the whole); kvsim's ids must be equal,
 *    from the GGUF and from each tokenizer.json, decode must give the text back, and the chat
 *    wrapping must equal transformers' apply_chat_template for SmolLM2's template and Llama 3.0,
 *    3.1 and 3.2-style ones;
 *  - `kvsim tokenize`: ids, --pieces, exit statuses.
 */
#include "sim/common/kv_common.h"
#include "tests/gguf_fixture.h"
#include "tests/kv_test.h"
#include "traces/capture/kv_tokenizer.h"

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- a synthetic byte-level vocabulary ---- */

/* ids 0..255: byte b's character; then these pieces (as byte-level strings) */
static const char *const EXTRA[] = {
    "ab",  /* 256 */
    "bc",  /* 257 */
    "abc", /* 258 */
    "aa",  /* 259 */
    "\xc4\xa0"
    "a", /* 260 "Ġa": " a" */
    "\xc4\xa0"
    "b",                /* 261 "Ġb" */
    "12",               /* 262 */
    "123",              /* 263 */
    "a-",               /* 264 */
    "-b",               /* 265 */
    "--",               /* 266 */
    "b-",               /* 267 */
    "-c",               /* 268 */
    "\xc3\x83\xc2\xa9", /* 269 "Ã©": the bytes of é */
};
#define N_VOCAB (256 + (int)KV_ARRAY_LEN(EXTRA)) /* 270; added tokens from here */

/* UTF-8 of byte b's character in GPT-2's byte alphabet (written from the definition, not kvsim's) */
static int byte_utf8(int b, char *o)
{
    unsigned c = b <= 0x20                ? 256u + (unsigned)b
                 : b >= 0x7f && b <= 0xa0 ? 256u + 33u + (unsigned)(b - 0x7f)
                 : b == 0xad              ? 256u + 67u
                                          : (unsigned)b;
    if (c < 0x80) {
        o[0] = (char)c;
        return 1;
    }
    o[0] = (char)(0xc0 | (c >> 6));
    o[1] = (char)(0x80 | (c & 0x3f));
    return 2;
}

/* the same as JSON string content */
static void put_byte_char(FILE *f, int b)
{
    char s[2];
    int n = byte_utf8(b, s);
    if (n == 1 && (s[0] == '"' || s[0] == '\\'))
        fputc('\\', f);
    fwrite(s, 1, (size_t)n, f);
}

static void put_vocab(FILE *f)
{
    fputs("\"vocab\": {", f);
    for (int b = 0; b < 256; b++) {
        fputs(b ? ", \"" : "\"", f);
        put_byte_char(f, b);
        fprintf(f, "\": %d", b);
    }
    for (int i = 0; i < (int)KV_ARRAY_LEN(EXTRA); i++)
        fprintf(f, ", \"%s\": %d", EXTRA[i], 256 + i);
    fputs("}", f);
}

#define BL(prefix, regex)                                                                                              \
    "{\"type\": \"ByteLevel\", \"add_prefix_space\": " prefix ", \"trim_offsets\": true, \"use_regex\": " regex "}"
#define SPLIT(pattern, behavior, invert)                                                                               \
    "{\"type\": \"Split\", \"pattern\": " pattern ", \"behavior\": \"" behavior "\", \"invert\": " invert "}"
#define SEQ(a, b) "{\"type\": \"Sequence\", \"pretokenizers\": [" a ", " b "]}"
#define ADDED(id, content, special, lstrip, rstrip, single, normalized)                                                \
    "{\"id\": " #id ", \"content\": \"" content "\", \"single_word\": " single ", \"lstrip\": " lstrip                 \
    ", \"rstrip\": " rstrip ", \"normalized\": " normalized ", \"special\": " special "}"

/* A tokenizer.json of the synthetic vocabulary; returns its path (in buf). */
static const char *write_json(const char *name, const char *pre, const char *norm, const char *merges,
                              const char *added, int ignore_merges, char *buf, size_t len)
{
    kv_test_tmp(name, buf, len);
    FILE *f = fopen(buf, "w");
    ck_assert_ptr_nonnull(f);
    fprintf(
        f,
        "{\"version\": \"1.0\", \"truncation\": null, \"padding\": null, \"added_tokens\": [%s], "
        "\"normalizer\": %s, \"pre_tokenizer\": %s, \"post_processor\": null, \"decoder\": " BL(
            "true", "true") ", \"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": null, "
                            "\"continuing_subword_prefix\": null, \"end_of_word_suffix\": null, \"fuse_unk\": false, "
                            "\"byte_fallback\": false, \"ignore_merges\": %s, ",
        added ? added : "", norm ? norm : "null", pre, ignore_merges ? "true" : "false");
    put_vocab(f);
    fprintf(f, ", \"merges\": [%s]}}\n", merges);
    fclose(f);
    return buf;
}

static kv_tokenizer_t *load_ok(const char *path)
{
    kv_tokenizer_t *t = NULL;
    ck_assert_msg(kv_tokenizer_load(path, 0, &t) == KV_OK, "%s", kv_last_error());
    return t;
}

/* ids of text as "a b c" */
static void enc_str(const kv_tokenizer_t *t, const char *text, size_t len, char *out, size_t olen)
{
    int32_t *ids;
    int n;
    ck_assert_msg(kv_tokenizer_encode(t, text, len, 0, 0, &ids, &n) == KV_OK, "%s", kv_last_error());
    out[0] = 0;
    for (int i = 0; i < n; i++)
        snprintf(out + strlen(out), olen - strlen(out), "%s%d", i ? " " : "", ids[i]);
    kv_free(ids);
}

/* encode == want, and decode_all gives the text back */
static void check_enc(const kv_tokenizer_t *t, const char *text, size_t len, const char *want)
{
    char got[4096];
    enc_str(t, text, len, got, sizeof got);
    ck_assert_msg(!strcmp(got, want), "%s: \"%.*s\": got [%s], expected [%s]", t->path, (int)len, text, got, want);
    int32_t *ids;
    int n;
    char *back;
    size_t bl;
    ck_assert_int_eq(kv_tokenizer_encode(t, text, len, 0, 0, &ids, &n), KV_OK);
    ck_assert_int_eq(kv_tokenizer_decode_all(t, ids, n, &back, &bl), KV_OK);
    ck_assert_msg(bl == len && !memcmp(back, text, len), "%s: \"%.*s\" decodes to \"%s\"", t->path, (int)len, text,
                  back);
    kv_free(back);
    kv_free(ids);
}
#define CHECK(t, text, want) check_enc((t), (text), strlen(text), (want))

START_TEST(merges_by_rank_leftmost_first)
{
    char p[512];
    kv_tokenizer_t *t = load_ok(write_json("rank1.json", BL("false", "true"), NULL,
                                           "\"b c\", \"a b\", \"ab c\", \"a a\"", NULL, 0, p, sizeof p));
    ck_assert_int_eq(t->kind, KV_TOK_BYTE_BPE);
    ck_assert_int_eq(t->vocab_size, N_VOCAB);
    ck_assert_int_eq(t->n_merges, 4);
    CHECK(t, "abc", "97 257");   /* b c (rank 0) before a b; "a bc" is no merge */
    CHECK(t, "abab", "256 256"); /* a b twice */
    CHECK(t, "aaa", "259 97");   /* the leftmost of two equal-rank pairs first */
    CHECK(t, "aaaa", "259 259");
    CHECK(t, "x abc", "120 32 97 257"); /* the GPT-2 regex: "x", " abc"; no "Ġ a" merge */
    kv_tokenizer_free(t);
    t = load_ok(
        write_json("rank2.json", BL("false", "true"), NULL, "\"a b\", \"b c\", \"ab c\"", NULL, 0, p, sizeof p));
    CHECK(t, "abc", "258"); /* a b (rank 0), then ab c (rank 2) */
    CHECK(t, "bcab", "257 256");
    kv_tokenizer_free(t);
    /* a pair listed twice keeps its last rank, as Hugging Face's merge map does */
    t = load_ok(write_json("rank3.json", BL("false", "true"), NULL, "\"a b\", \"b c\", \"a b\", \"ab c\"", NULL, 0, p,
                           sizeof p));
    CHECK(t, "abc", "97 257");
    kv_tokenizer_free(t);
}
END_TEST

START_TEST(ignore_merges_takes_whole_pieces)
{
    char p[512];
    kv_tokenizer_t *t = load_ok(write_json("ign0.json", BL("false", "true"), NULL, "\"b c\"", NULL, 0, p, sizeof p));
    CHECK(t, "abc", "97 257");
    kv_tokenizer_free(t);
    t = load_ok(write_json("ign1.json", BL("false", "true"), NULL, "\"b c\"", NULL, 1, p, sizeof p));
    CHECK(t, "abc", "258");              /* "abc" is a vocabulary entry: one token */
    CHECK(t, "abcabc", "97 257 97 257"); /* not an entry: merged as usual */
    CHECK(t, "12 abc", "262 32 97 257"); /* "12" is an entry; " abc" is not */
    kv_tokenizer_free(t);
}
END_TEST

START_TEST(added_tokens_options)
{
    char p[512];
    kv_tokenizer_t *t = load_ok(write_json("added0.json", BL("false", "true"), NULL, "\"a b\"",
                                           ADDED(270, "<m>", "true", "false", "false", "false", "false") ", " ADDED(
                                               256, "ab", "false", "false", "false", "true", "false"),
                                           0, p, sizeof p));
    ck_assert_int_eq(t->vocab_size, N_VOCAB + 1); /* "ab" is in the vocabulary already (its id must agree) */
    ck_assert_int_eq(t->n_added, 2);
    CHECK(t, "x <m> y", "120 32 270 32 121");
    CHECK(t, "<m><m>", "270 270");
    CHECK(t, "<m", "60 109");
    CHECK(t, "c ab d", "99 32 256 32 100"); /* single_word: a word alone */
    CHECK(t, "cab d", "99 256 32 100");     /* inside a word: not the added token (BPE merges "a b") */
    CHECK(t, "ab-ab", "256 45 256");        /* '-' is no word character */
    kv_tokenizer_free(t);
    /* lstrip and rstrip take the whitespace around the match */
    t = load_ok(write_json("added1.json", BL("false", "true"), NULL, "\"a b\"",
                           ADDED(270, "<m>", "true", "true", "true", "false", "false"), 0, p, sizeof p));
    static const char *const strip[][2] = {
        {"x <m> y", "120 270 121"},
        {"x \t <m>\n\ny", "120 270 121"},
        {"<m>  <m>", "270 270"}, /* the second's lstrip stops where the first's rstrip ended */
    };
    for (size_t i = 0; i < KV_ARRAY_LEN(strip); i++) { /* (the spaces taken do not decode) */
        char got[64];
        enc_str(t, strip[i][0], strlen(strip[i][0]), got, sizeof got);
        ck_assert_msg(!strcmp(got, strip[i][1]), "\"%s\": got [%s], expected [%s]", strip[i][0], got, strip[i][1]);
    }
    kv_tokenizer_free(t);
    /* a normalized added token matches the NFC text: e + U+0301 is é */
    t = load_ok(write_json("added2.json", BL("false", "true"), "{\"type\": \"NFC\"}", "\"a b\"",
                           ADDED(270, "caf\xc3\xa9", "false", "false", "false", "false", "true"), 0, p, sizeof p));
    char got[64];
    enc_str(t, "cafe\xcc\x81!", 7, got, sizeof got); /* (decodes to the NFC text) */
    ck_assert_str_eq(got, "270 33");
    kv_tokenizer_free(t);
}
END_TEST

START_TEST(digits_and_prefix_space)
{
    char p[512];
    kv_tokenizer_t *t = load_ok(
        write_json("digits1.json", SEQ("{\"type\": \"Digits\", \"individual_digits\": true}", BL("false", "true")),
                   NULL, "\"1 2\", \"12 3\"", NULL, 0, p, sizeof p));
    CHECK(t, "a123", "97 49 50 51");
    kv_tokenizer_free(t);
    t = load_ok(write_json("digits0.json",
                           SEQ("{\"type\": \"Digits\", \"individual_digits\": false}", BL("false", "true")), NULL,
                           "\"1 2\", \"12 3\"", NULL, 0, p, sizeof p));
    CHECK(t, "a123", "97 263");
    kv_tokenizer_free(t);
    /* add_prefix_space: a space before every piece that does not start with one */
    t = load_ok(
        write_json("prefix.json", BL("true", "true"), NULL, "\"\xc4\xa0 a\", \"\xc4\xa0 b\"", NULL, 0, p, sizeof p));
    int32_t *ids;
    int n;
    ck_assert_int_eq(kv_tokenizer_encode(t, "a b", 3, 0, 0, &ids, &n), KV_OK);
    ck_assert_int_eq(n, 2);
    ck_assert_int_eq(ids[0], 260);
    ck_assert_int_eq(ids[1], 261);
    kv_free(ids);
    ck_assert_int_eq(kv_tokenizer_encode(t, " a", 2, 0, 0, &ids, &n), KV_OK);
    ck_assert_int_eq(n, 1);
    ck_assert_int_eq(ids[0], 260);
    kv_free(ids);
    kv_tokenizer_free(t);
}
END_TEST

START_TEST(split_behaviors)
{
    static const struct {
        const char *name, *pre, *want;
    } cases[] = {
        {"isolated.json", SPLIT("{\"String\": \"-\"}", "Isolated", "false"), "97 45 98 45 45 99"},
        {"removed.json", SPLIT("{\"String\": \"-\"}", "Removed", "false"), "97 98 99"},
        {"mprev.json", SPLIT("{\"String\": \"-\"}", "MergedWithPrevious", "false"), "264 267 45 99"},
        {"mnext.json", SPLIT("{\"String\": \"-\"}", "MergedWithNext", "false"), "97 265 45 268"},
        {"contig.json", SPLIT("{\"String\": \"-\"}", "Contiguous", "false"), "97 45 98 266 99"},
        {"removed-re.json", SPLIT("{\"Regex\": \"[a-c]\"}", "Removed", "false"), "45 266"},
        {"inverted.json", SPLIT("{\"Regex\": \"[a-c]\"}", "Removed", "true"), "97 98 99"},
    };
    for (size_t i = 0; i < KV_ARRAY_LEN(cases); i++) {
        char p[512], pre[512];
        snprintf(pre, sizeof pre, "{\"type\": \"Sequence\", \"pretokenizers\": [%s, %s]}", cases[i].pre,
                 BL("false", "false"));
        kv_tokenizer_t *t = load_ok(
            write_json(cases[i].name, pre, NULL, "\"a -\", \"- b\", \"- -\", \"b -\", \"- c\"", NULL, 0, p, sizeof p));
        char got[256];
        enc_str(t, "a-b--c", 6, got, sizeof got);
        ck_assert_msg(!strcmp(got, cases[i].want), "%s: got [%s], expected [%s]", cases[i].name, got, cases[i].want);
        kv_tokenizer_free(t);
    }
}
END_TEST

START_TEST(nfc_and_invalid_utf8)
{
    char p[512];
    kv_tokenizer_t *t = load_ok(write_json("nfc.json", BL("false", "true"), "{\"type\": \"NFC\"}",
                                           "\"\xc3\x83 \xc2\xa9\"", NULL, 0, p, sizeof p));
    int32_t *ids;
    int n;
    ck_assert_int_eq(kv_tokenizer_encode(t, "e\xcc\x81", 3, 0, 0, &ids, &n), KV_OK);
    ck_assert_int_eq(n, 1);
    ck_assert_int_eq(ids[0], 269); /* NFC: e + U+0301 is é, whose two bytes merge */
    kv_free(ids);
    CHECK(t, "\xc3\xa9", "269");
    kv_tokenizer_free(t);
    t = load_ok(write_json("nonfc.json", BL("false", "true"), NULL, "\"\xc3\x83 \xc2\xa9\"", NULL, 0, p, sizeof p));
    CHECK(t, "e\xcc\x81", "101 204 129");
    /* bytes that are not UTF-8: each its own token, the valid stretches around them as usual */
    check_enc(t,
              "a\xff\xc3"
              "b",
              4, "97 255 195 98");
    check_enc(t, "\xe2\x82", 2, "226 130");
    check_enc(t, "\xc3\xa9\xc3", 3, "269 195");
    check_enc(t, "x\xed\xa0\x80y", 5, "120 237 160 128 121"); /* a UTF-16 surrogate is not UTF-8 */
    check_enc(t, "a\0b", 3, "97 0 98");
    kv_tokenizer_free(t);
}
END_TEST

START_TEST(decode_pieces_and_describe)
{
    char p[512];
    kv_tokenizer_t *t =
        load_ok(write_json("decode.json", BL("false", "true"), NULL, "\"a b\"",
                           ADDED(270, "<|x y|>", "true", "false", "false", "false", "false"), 0, p, sizeof p));
    size_t l;
    const char *s = kv_tokenizer_decode(t, -1, 32, &l); /* "Ġ" */
    ck_assert_int_eq(l, 1);
    ck_assert_int_eq(s[0], ' ');
    s = kv_tokenizer_decode(t, -1, 269, &l); /* "Ã©" -> the bytes of é */
    ck_assert_int_eq(l, 2);
    ck_assert(!memcmp(s, "\xc3\xa9", 2));
    s = kv_tokenizer_piece(t, 270, &l); /* outside the byte alphabet (a space): its own bytes */
    ck_assert_int_eq(l, 7);
    ck_assert(!memcmp(s, "<|x y|>", 7));
    ck_assert_ptr_null(kv_tokenizer_piece(t, N_VOCAB + 1, &l));
    CHECK(t, "ab<|x y|>ab", "256 270 256");
    char d[512];
    kv_tokenizer_describe(t, d, sizeof d);
    ck_assert_msg(strstr(d, "byte-level BPE") && strstr(d, "tokenizer.json") &&
                      strstr(d, "ByteLevel(no prefix space, "
                                "gpt2 regex)"),
                  "%s", d);
    ck_assert_int_eq(t->bos_id, -1);
    ck_assert_int_eq(t->add_bos, 0);
    int32_t *ids;
    int n;
    ck_assert_int_eq(kv_tokenizer_encode(t, "", 0, 1, 1, &ids, &n), KV_OK); /* no BOS/EOS to add */
    ck_assert_int_eq(n, 0);
    kv_free(ids);
    kv_tokenizer_free(t);
}
END_TEST

/* ---- GGUF files of the vocabulary (tests/gguf_fixture.h, written from the specification) ---- */

/* The synthetic vocabulary's tokens ("<m>" added as a control token when with_added), and n_types
 * token types. */
static void gw_tokens(gf_writer_t *w, int with_added, int n_types)
{
    static char bytes[256][3];
    const char *tok[N_VOCAB + 1];
    uint64_t types[N_VOCAB + 1];
    for (int b = 0; b < 256; b++) {
        bytes[b][byte_utf8(b, bytes[b])] = 0;
        tok[b] = bytes[b];
    }
    for (int i = 0; i < (int)KV_ARRAY_LEN(EXTRA); i++)
        tok[256 + i] = EXTRA[i];
    tok[N_VOCAB] = "<m>";
    for (int i = 0; i <= N_VOCAB; i++)
        types[i] = i >= N_VOCAB ? 3 : 1;
    gf_kv_arr_str(w, "tokenizer.ggml.tokens", tok, (uint64_t)(N_VOCAB + with_added));
    gf_kv_arr(w, "tokenizer.ggml.token_type", KV_GGUF_INT32, types, (uint64_t)n_types, 4);
}

static void gw_kv_bool(gf_writer_t *w, const char *key, int v)
{
    gf_kv_scalar(w, key, KV_GGUF_BOOL, (uint64_t)v, 1);
}

/* Write the file, then start a new one in w. */
static const char *gw_write(gf_writer_t *w, const char *name, char *buf, size_t len)
{
    kv_test_tmp(name, buf, len);
    size_t n;
    unsigned char *b = gf_finish(w, &n);
    FILE *f = fopen(buf, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(fwrite(b, 1, n, f), n);
    fclose(f);
    free(b);
    gf_free(w);
    gf_init(w, 3);
    return buf;
}

static const char *const MERGES[] = {"b c", "a b", "ab c", "a a", "1 2", "12 3"};

START_TEST(gguf_vocabulary_encodes_like_json)
{
    char p[512];
    gf_writer_t w;
    gf_init(&w, 3);
    gf_kv_str(&w, "general.architecture", "llama");
    gf_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    gf_kv_str(&w, "tokenizer.ggml.pre", "smollm");
    gw_tokens(&w, 1, N_VOCAB + 1);
    gf_kv_arr_str(&w, "tokenizer.ggml.merges", MERGES, KV_ARRAY_LEN(MERGES));
    gf_kv_u32(&w, "tokenizer.ggml.bos_token_id", 256);
    gf_kv_u32(&w, "tokenizer.ggml.eos_token_id", N_VOCAB);
    gw_kv_bool(&w, "tokenizer.ggml.add_bos_token", 1);
    gf_kv_str(&w, "tokenizer.chat_template", "{{ '<|im_start|>' }}{{ '<|im_end|>' }}{{ '<|im_start|>assistant\n' }}");
    kv_tokenizer_t *t = load_ok(gw_write(&w, "vocab.gguf", p, sizeof p));
    ck_assert_int_eq(t->kind, KV_TOK_BYTE_BPE);
    ck_assert_str_eq(t->format, "gguf");
    ck_assert_int_eq(t->bos_id, 256);
    ck_assert_int_eq(t->eos_id, N_VOCAB);
    ck_assert_int_eq(t->add_bos, 1);
    ck_assert_int_eq(t->n_added, 1);
    ck_assert_ptr_nonnull(strstr(t->pretok, "smollm"));
    CHECK(t, "abc a123 <m>", "97 257 32 97 49 50 51 32 270"); /* \p{N} splits the digits: no 1 2 merge */
    int32_t *ids;
    int n;
    ck_assert_int_eq(kv_tokenizer_encode(t, "aa", 2, t->add_bos, 1, &ids, &n), KV_OK);
    ck_assert_int_eq(n, 3);
    ck_assert_int_eq(ids[0], 256);
    ck_assert_int_eq(ids[1], 259);
    ck_assert_int_eq(ids[2], N_VOCAB);
    kv_free(ids);
    char *chat;
    ck_assert_int_eq(kv_tokenizer_chat(t, NULL, "hi", &chat), KV_OK);
    ck_assert_str_eq(chat, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    kv_free(chat);
    kv_tokenizer_free(t);
    /* llama3's pre-tokenizer: digits in threes, ignore_merges and BOS by default */
    gf_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    gf_kv_str(&w, "tokenizer.ggml.pre", "llama-bpe");
    gw_tokens(&w, 0, N_VOCAB);
    gf_kv_arr_str(&w, "tokenizer.ggml.merges", MERGES, KV_ARRAY_LEN(MERGES));
    gf_kv_u32(&w, "tokenizer.ggml.bos_token_id", 0);
    t = load_ok(gw_write(&w, "vocab-llama3.gguf", p, sizeof p));
    gf_free(&w);
    ck_assert_int_eq(t->add_bos, 1);
    CHECK(t, "abc a1234", "258 260 263 52"); /* ignore_merges: "abc", " a", then "123" and "4" */
    kv_tokenizer_free(t);
}
END_TEST

/* ---- broken inputs ---- */

static void expect_fail(const char *path, const char *says)
{
    kv_tokenizer_t *t = (kv_tokenizer_t *)1;
    ck_assert_msg(kv_tokenizer_load(path, 0, &t) != KV_OK, "%s loaded", path);
    ck_assert_ptr_null(t);
    const char *e = kv_last_error();
    ck_assert_msg(strstr(e, path) && strstr(e, says), "%s: expected \"%s\" in: %s", path, says, e);
}

START_TEST(broken_tokenizer_json)
{
    char p[512];
    expect_fail(write_json("bad-merge.json", BL("false", "true"), NULL, "\"a b\", \"q zz\"", NULL, 0, p, sizeof p),
                "merge 1 (\"q zz\") is not two vocabulary pieces joining into a third");
    expect_fail(write_json("bad-merge2.json", BL("false", "true"), NULL, "\"c a\"", NULL, 0, p, sizeof p), "merge 0");
    expect_fail(write_json("bad-regex.json",
                           SEQ(SPLIT("{\"Regex\": \"(ab\"}", "Isolated", "false"), BL("false", "false")), NULL,
                           "\"a b\"", NULL, 0, p, sizeof p),
                "invalid regex \"(ab\"");
    expect_fail(write_json("bad-pre.json", SEQ("{\"type\": \"Whitespace\"}", BL("false", "false")), NULL, "\"a b\"",
                           NULL, 0, p, sizeof p),
                "pre_tokenizer Whitespace is not supported");
    expect_fail(write_json("bad-order.json", SEQ(BL("false", "false"), "{\"type\": \"Digits\"}"), NULL, "\"a b\"", NULL,
                           0, p, sizeof p),
                "comes after ByteLevel");
    expect_fail(
        write_json("bad-norm.json", BL("false", "true"), "{\"type\": \"Lowercase\"}", "\"a b\"", NULL, 0, p, sizeof p),
        "normalizer Lowercase is not supported");
    expect_fail(write_json("bad-behavior.json",
                           SEQ(SPLIT("{\"String\": \"-\"}", "Sideways", "false"), BL("false", "false")), NULL,
                           "\"a b\"", NULL, 0, p, sizeof p),
                "behavior Sideways");
    expect_fail(write_json("bad-added-id.json", BL("false", "true"), NULL, "\"a b\"",
                           ADDED(275, "<m>", "true", "false", "false", "false", "false"), 0, p, sizeof p),
                "added token \"<m>\" has id 275");
    expect_fail(write_json("bad-added-id2.json", BL("false", "true"), NULL, "\"a b\"",
                           ADDED(3, "ab", "true", "false", "false", "false", "false"), 0, p, sizeof p),
                "added token \"ab\" has id 3 but the vocabulary gives it 256");
    /* ids outside 0..n-1, a missing model.vocab */
    kv_test_tmp("bad-id.json", p, sizeof p);
    FILE *f = fopen(p, "w");
    fputs("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 7}, \"merges\": []}, \"pre_tokenizer\": "
          "{\"type\": \"ByteLevel\"}}",
          f);
    fclose(f);
    expect_fail(p, "token \"b\" has id 7: ids must be 0..1");
    kv_test_tmp("no-vocab.json", p, sizeof p);
    f = fopen(p, "w");
    fputs("{\"model\": {\"type\": \"BPE\", \"merges\": []}, \"pre_tokenizer\": {\"type\": \"ByteLevel\"}}", f);
    fclose(f);
    expect_fail(p, "model.vocab (object) or model.merges (array) is missing");
    kv_test_tmp("bad-post.json", p, sizeof p);
    f = fopen(p, "w");
    fputs("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}, \"pre_tokenizer\": {\"type\": "
          "\"ByteLevel\"}, \"post_processor\": {\"type\": \"RobertaProcessing\"}}",
          f);
    fclose(f);
    expect_fail(p, "post_processor RobertaProcessing is not supported");
}
END_TEST

START_TEST(broken_gguf_vocabulary)
{
    char p[512];
    gf_writer_t w;
    gf_init(&w, 3);
    gf_kv_str(&w, "tokenizer.ggml.model", "bert");
    expect_fail(gw_write(&w, "bert.gguf", p, sizeof p), "tokenizer.ggml.model \"bert\" is not supported");
    gf_kv_str(&w, "general.architecture", "llama");
    expect_fail(gw_write(&w, "none.gguf", p, sizeof p), "no tokenizer.ggml.model");
    gf_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    expect_fail(gw_write(&w, "notokens.gguf", p, sizeof p), "no tokenizer.ggml.tokens");
    gf_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    gf_kv_str(&w, "tokenizer.ggml.pre", "bogus-pre");
    gw_tokens(&w, 0, N_VOCAB);
    gf_kv_arr_str(&w, "tokenizer.ggml.merges", MERGES, 2);
    expect_fail(gw_write(&w, "pre.gguf", p, sizeof p), "tokenizer.ggml.pre \"bogus-pre\" is not a pre-tokenizer "
                                                       "kvsim knows (known: default");
    static const char *const bad_merges[] = {"a b", "a zz"};
    gf_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    gw_tokens(&w, 0, N_VOCAB);
    gf_kv_arr_str(&w, "tokenizer.ggml.merges", bad_merges, 2);
    expect_fail(gw_write(&w, "merge.gguf", p, sizeof p), "tokenizer.ggml.merges[1] \"a zz\" is not two vocabulary");
    gf_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    gw_tokens(&w, 0, N_VOCAB);
    gf_kv_arr_str(&w, "tokenizer.ggml.merges", MERGES, 2);
    gf_kv_u32(&w, "tokenizer.ggml.eos_token_id", 100000);
    expect_fail(gw_write(&w, "eos.gguf", p, sizeof p), "tokenizer.ggml.eos_token_id is 100000, outside the "
                                                       "vocabulary [0, 270)");
    gf_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    gw_tokens(&w, 0, 10);
    gf_kv_arr_str(&w, "tokenizer.ggml.merges", MERGES, 2);
    expect_fail(gw_write(&w, "types.gguf", p, sizeof p),
                "tokenizer.ggml.token_type has 10 entries, the vocabulary 270");
    gf_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    gw_tokens(&w, 0, N_VOCAB);
    expect_fail(gw_write(&w, "nomerges.gguf", p, sizeof p), "no tokenizer.ggml.merges");
    gf_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    gf_kv_u32(&w, "tokenizer.ggml.tokens", 7);
    expect_fail(gw_write(&w, "tokentype.gguf", p, sizeof p), "tokenizer.ggml.tokens");
    /* a token listed twice */
    gf_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    static const char *const dup[] = {"a", "b", "a"};
    gf_kv_arr_str(&w, "tokenizer.ggml.tokens", dup, 3);
    expect_fail(gw_write(&w, "dup.gguf", p, sizeof p), "\"a\" is token 0 and token 2");
    gf_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    gw_tokens(&w, 0, N_VOCAB);
    gf_kv_arr_str(&w, "tokenizer.ggml.merges", MERGES, 2);
    gw_kv_bool(&w, "tokenizer.ggml.add_bos_token", 1);
    expect_fail(gw_write(&w, "nobos.gguf", p, sizeof p), "add_bos_token is true but there is no");
    gf_free(&w);
}
END_TEST

START_TEST(chat_templates_refused_by_name)
{
    char p[512];
    gf_writer_t w;
    gf_init(&w, 3);
    gf_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    gw_tokens(&w, 0, N_VOCAB);
    gf_kv_arr_str(&w, "tokenizer.ggml.merges", MERGES, 2);
    gf_kv_str(&w, "tokenizer.chat_template", "{% for m in messages %}[INST] {{ m.content }}{% endfor %}");
    kv_tokenizer_t *t = load_ok(gw_write(&w, "mistral.gguf", p, sizeof p));
    gf_free(&w);
    char *out = (char *)1;
    ck_assert_int_ne(kv_tokenizer_chat(t, NULL, "hi", &out), KV_OK);
    ck_assert_ptr_null(out);
    ck_assert_msg(strstr(kv_last_error(), "chat template \"{% for m in messages %}[INST] {{ m.content }}{% endfor %}\" "
                                          "is neither ChatML"),
                  "%s", kv_last_error());
    kv_tokenizer_free(t);
    t = load_ok(write_json("notmpl.json", BL("false", "true"), NULL, "\"a b\"", NULL, 0, p, sizeof p));
    ck_assert_int_ne(kv_tokenizer_chat(t, NULL, "hi", &out), KV_OK);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "has no chat template"));
    kv_tokenizer_free(t);
}
END_TEST

/* ---- SmolLM2 ---- */

static char g_smollm[1024];

/* Ids from tokenizers 0.23.3, Tokenizer.encode(text, add_special_tokens=False), on the tokenizer.json
 * tests/tokenizer_ref.py builds from the GGUF (SmolLM2's pre-tokenizer and special tokens). */
static const struct {
    const char *text, *ids;
} GOLDEN[] = {
    {"Hello, world! How are you doing today?", "19556 28 905 17 1073 359 346 2567 1834 47"},
    {"I'm sure they'll say it's fine, don't you think? We've seen it. I'd go. You're right.",
     "57 5248 2090 502 3060 1643 357 506 4979 28 1326 982 346 1510 47 1046 3543 2269 357 30 339 6737 685 30 1206 2316 "
     "1048 30"},
    {"Numbers: 3.14159, 1,000,000 and 2024-12-04; call 555-0199 or 12345678901234567890.",
     "39006 42 216 35 30 33 36 33 37 41 28 216 33 28 32 32 32 28 32 32 32 284 216 34 32 34 36 29 33 34 29 32 36 43 "
     "946 216 37 37 37 29 32 33 41 41 355 216 33 34 35 36 37 38 39 40 41 32 33 34 35 36 37 38 39 40 41 32 30"},
    {"  leading spaces, multiple   internal    spaces,\ttabs\tand trailing   ",
     "216 2899 5600 28 2701 256 4611 333 5600 28 197 100 7366 197 397 35079 333"},
    {"newlines\n\nparagraph two\r\nwindows line\n\n\n   indented\n",
     "2241 5110 198 198 41099 827 201 198 37066 1761 1116 11181 641 6574 198"},
    {"Caf\xc3\xa9 na\xc3\xafve r\xc3\xa9sum\xc3\xa9 fa\xc3\xa7"
     "ade \xc3\x85ngstr\xc3\xb6m \xe2\x80\x94 \xe2\x80\x9cquotes\xe2\x80\x9d \xe2\x80\x98single\xe2\x80\x99 "
     "\xe2\x80\xa6 Stra\xc3\x9f"
     "e",
     "51 1939 2756 15486 46494 412 2756 5422 2756 40852 5549 223 863 1321 45682 1841 619 385 2346 573 1551 18536 417 "
     "5548 19144 34878 85"},
    {"\xe4\xbd\xa0\xe5\xa5\xbd\xef\xbc\x8c\xe4\xb8\x96\xe7\x95\x8c\xef\xbc\x81\xe8\xbf\x99\xe6\x98\xaf\xe4\xb8\x80"
     "\xe4\xb8\xaa\xe6\xb5\x8b\xe8\xaf\x95\xe3\x80\x82\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e\xe3\x81\xae\xe3\x83\x86"
     "\xe3\x82\xad\xe3\x82\xb9\xe3\x83\x88\xe3\x80\x81\xe3\x82\xab\xe3\x82\xbf\xe3\x82\xab\xe3\x83\x8a\xe3\x80\x82"
     "\xed\x95\x9c\xea\xb5\xad\xec\x96\xb4 \xed\x85\x8d\xec\x8a\xa4\xed\x8a\xb8\xec\x9e\x85\xeb\x8b\x88\xeb\x8b\xa4",
     "18645 250 48392 138 12831 7906 240 178 239 230 8083 219 48287 27830 43340 43222 229 16313 239 19076 23274 115 "
     "40993 179 120 248 26453 11100 224 10391 251 10391 134 11100 226 29917 10391 121 10391 140 10391 121 11100 228 "
     "19076 33085 246 181 130 251 183 240 129 48138 223 231 183 228 114 184 228 133 183 248 223 41259 226 41259 114"},
    {"Emoji: \xf0\x9f\x98\x80\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd\xf0\x9f\x87\xba\xf0\x9f\x87\xb8 \xe2\x9d\xa4\xef\xb8\x8f "
     "and \xf0\x9f\xa7\x91\xe2\x80\x8d\xf0\x9f\x92\xbb family "
     "\xf0\x9f\x91\xa8\xe2\x80\x8d\xf0\x9f\x91\xa9\xe2\x80\x8d\xf0\x9f\x91\xa7\xe2\x80\x8d\xf0\x9f\x91\xa6",
     "10809 33777 42 40303 218 10813 235 231 10813 233 138 10813 225 135 10813 225 133 4636 247 114 31752 284 15107 "
     "117 235 321 231 10813 236 136 1564 15107 235 118 321 231 10813 235 119 321 231 10813 235 117 321 231 10813 235 "
     "116"},
    {"<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
     "1 4093 198 1780 314 216 34 27 34 47 2 198 1 520 9531 198 36 2 198"},
    {"def foo(x):\n    return x ** 2  # comment\n\n\tif x != None:\n        print(f\"{x!r}\")",
     "1604 29856 24 104 727 472 1003 1792 1903 216 34 216 907 5189 1116 197 342 1792 6541 1943 42 448 1628 24 86 "
     "14737 104 17 98 15201"},
    {"e\xcc\x81 combining vs \xc3\xa9 precomposed; A\xcc\x8a; Zu\xcc\x88rich; \xe1\xba\x9b\xcc\xa3 \xe2\x84\xab "
     "\xe2\x84\xa6",
     "85 151 219 9301 6375 26411 622 824 11312 43 330 151 228 43 1777 101 151 226 5130 43 15822 135 245 151 113 4636 "
     "222 121 4636 222 116"},
    {"URL https://example.com/path?q=1&r=2#frag and e-mail me@example.org",
     "14492 5141 1742 7434 30 824 31 1537 47 97 45 33 22 98 45 34 19 28082 284 297 29 8925 549 48 7434 30 2295"},
};

START_TEST(smollm_golden_ids)
{
    kv_tokenizer_t *t = load_ok(g_smollm);
    ck_assert_int_eq(t->kind, KV_TOK_BYTE_BPE);
    ck_assert_int_eq(t->vocab_size, 49152);
    ck_assert_int_eq(t->n_merges, 48900);
    ck_assert_int_eq(t->bos_id, 1);
    ck_assert_int_eq(t->eos_id, 2);
    ck_assert_int_eq(t->add_bos, 0);
    ck_assert_int_eq(t->n_added, 17);
    for (size_t i = 0; i < KV_ARRAY_LEN(GOLDEN); i++)
        CHECK(t, GOLDEN[i].text, GOLDEN[i].ids);
    /* the model's own rule: no BOS; asked for, it is <|im_start|> (id 1) */
    int32_t *ids;
    int n;
    ck_assert_int_eq(kv_tokenizer_encode(t, "Hi", 2, 1, 0, &ids, &n), KV_OK);
    ck_assert_int_eq(n, 2);
    ck_assert_int_eq(ids[0], 1);
    kv_free(ids);
    char *chat;
    ck_assert_int_eq(kv_tokenizer_chat(t, NULL, "Hi", &chat), KV_OK);
    ck_assert_str_eq(chat, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                           "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    kv_free(chat);
    ck_assert_int_eq(kv_tokenizer_chat(t, "Be brief.", "Hi", &chat), KV_OK);
    ck_assert_str_eq(chat, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                           "<|im_start|>assistant\n");
    kv_free(chat);
    kv_tokenizer_free(t);
}
END_TEST

START_TEST(smollm_speed)
{
    char path[1024];
    kv_tokenizer_t *t = load_ok(g_smollm);
    FILE *f = fopen(kv_test_shared("data/tinystories_sample.txt", path, sizeof path), "rb");
    ck_assert_ptr_nonnull(f);
    char sample[8192];
    size_t sl = fread(sample, 1, sizeof sample, f);
    fclose(f);
    /* the sample repeated to ~400 KB */
    size_t len = 0, cap = 400000 + sl;
    char *text = kv_malloc(cap, "text");
    while (len + sl <= cap) {
        memcpy(text + len, sample, sl);
        len += sl;
    }
    int32_t *ids;
    int n;
    double t0 = kv_now();
    ck_assert_int_eq(kv_tokenizer_encode(t, text, len, 0, 0, &ids, &n), KV_OK);
    double dt = kv_now() - t0;
    fprintf(stderr,
            "kvsim tests: byte-level BPE encodes %d tokens (%zu bytes of TinyStories) in %.3f s: %.0f tokens/s\n", n,
            len, dt, n / dt);
    kv_free(ids);
    /* a 3,000-token prompt */
    size_t cut = (size_t)((double)len * 3000 / n);
    t0 = kv_now();
    ck_assert_int_eq(kv_tokenizer_encode(t, text, cut, 0, 0, &ids, &n), KV_OK);
    dt = kv_now() - t0;
    fprintf(stderr, "kvsim tests: a %d-token prompt encodes in %.4f s\n", n, dt);
    ck_assert_msg(dt < 0.25, "%d tokens took %.3f s", n, dt);
    kv_free(ids);
    kv_free(text);
    kv_tokenizer_free(t);
}
END_TEST

/* ---- interop with Hugging Face (python3 + tokenizers) ---- */

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* hex text into buf (NUL-terminated); returns the byte count */
static size_t unhex(const char *h, size_t hl, char *buf)
{
    size_t n = 0;
    for (size_t i = 0; i + 1 < hl; i += 2)
        buf[n++] = (char)(hexval(h[i]) * 16 + hexval(h[i + 1]));
    buf[n] = 0;
    return n;
}

START_TEST(interop_hf_tokenizers)
{
    char dir[512], cmd[4096], data[1024], path[1200];
    kv_test_tmp("tokref", dir, sizeof dir);
    snprintf(cmd, sizeof cmd, "python3 tests/tokenizer_ref.py '%s' '%s' '%s' >%s.log 2>&1", g_smollm, dir,
             kv_test_shared("data/tinystories_sample.txt", data, sizeof data), dir);
    int st = system(cmd);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "tests/tokenizer_ref.py failed: %s (see %s.log)", cmd, dir);
    static const char *const variants[] = {"smollm", "llama3", "qwen2", "flags"};
    kv_tokenizer_t *tok[5];
    for (int v = 0; v < 4; v++) {
        snprintf(path, sizeof path, "%s/%s.tokenizer.json", dir, variants[v]);
        tok[v] = load_ok(path);
    }
    tok[4] = load_ok(g_smollm);
    ck_assert_int_eq(tok[1]->add_bos, 1);
    ck_assert_int_eq(tok[1]->bos_id, 0);
    snprintf(path, sizeof path, "%s/cases.txt", dir);
    FILE *f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    static char line[1 << 20], text[1 << 19], want[1 << 19], got[1 << 19];
    int agree[6] = {0}, total[6] = {0};
    while (fgets(line, sizeof line, f)) {
        char *t1 = strchr(line, '\t'), *t2 = t1 ? strchr(t1 + 1, '\t') : NULL;
        ck_assert_ptr_nonnull(t2);
        *t1 = 0;
        size_t len = unhex(t1 + 1, (size_t)(t2 - t1 - 1), text);
        snprintf(want, sizeof want, "%s", t2 + 1);
        want[strcspn(want, "\n")] = 0;
        int bos = !strcmp(line, "llama3+bos");
        int v = bos ? 1 : !strcmp(line, "smollm") ? 0 : !strcmp(line, "llama3") ? 1 : !strcmp(line, "qwen2") ? 2 : 3;
        for (int k = 0; k < (v == 0 ? 2 : 1); k++) {
            const kv_tokenizer_t *t = k ? tok[4] : tok[v];
            int slot = k ? 5 : bos ? 4 : v;
            int32_t *ids;
            int n;
            ck_assert_int_eq(kv_tokenizer_encode(t, text, len, bos ? t->add_bos : 0, 0, &ids, &n), KV_OK);
            got[0] = 0;
            size_t o = 0;
            for (int i = 0; i < n && o + 16 < sizeof got; i++)
                o += (size_t)snprintf(got + o, sizeof got - o, "%s%d", i ? " " : "", ids[i]);
            total[slot]++;
            agree[slot] += !strcmp(got, want);
            if (strcmp(got, want))
                fprintf(stderr, "interop %s%s: \"%.60s\": kvsim [%.200s], HF [%.200s]\n", line, k ? " (gguf)" : "",
                        text, got, want);
            /* round trip, where the text is not changed on the way (NFC, stripped spaces) and every byte
             * has a token (SmolLM2's vocabulary lacks \x04 and \x06, which are dropped) */
            char *back;
            size_t bl;
            ck_assert_int_eq(kv_tokenizer_decode_all(t, ids, n, &back, &bl), KV_OK);
            if (!memchr(text, 4, len) && !memchr(text, 6, len) && !bos && slot != 2 && slot != 3)
                ck_assert_msg(bl == len && !memcmp(back, text, len), "%s: \"%.60s\" decodes to \"%.60s\"", line, text,
                              back);
            kv_free(back);
            kv_free(ids);
        }
    }
    fclose(f);
    static const char *const slots[] = {
        "smollm", "llama3", "qwen2+NFC", "added-token options", "llama3+BOS", "smollm from the GGUF"};
    for (int s = 0; s < 6; s++) {
        fprintf(stderr, "kvsim tests: interop %-20s %d/%d texts give Hugging Face's ids\n", slots[s], agree[s],
                total[s]);
        ck_assert_int_gt(total[s], 10);
        ck_assert_int_eq(agree[s], total[s]);
    }
    /* chat wrapping == transformers' apply_chat_template */
    snprintf(path, sizeof path, "%s/chat.txt", dir);
    f = fopen(path, "r");
    if (!f) { /* neither transformers nor jinja2 in this Python */
        fprintf(stderr, "kvsim tests: interop chat not checked: python3 has neither transformers nor jinja2\n");
        for (int v = 0; v < 5; v++)
            kv_tokenizer_free(tok[v]);
        return;
    }
    int n_chat = 0;
    while (fgets(line, sizeof line, f)) {
        char *c[4] = {line};
        for (int k = 1; k < 4; k++) {
            c[k] = strchr(c[k - 1], '\t');
            ck_assert_ptr_nonnull(c[k]);
            *c[k]++ = 0;
        }
        static char sys[4096], user[4096];
        unhex(c[1], strlen(c[1]), sys);
        unhex(c[2], strlen(c[2]), user);
        unhex(c[3], strcspn(c[3], "\n"), want);
        kv_tokenizer_t *t = tok[4];
        if (strcmp(c[0], "smollm")) {
            snprintf(path, sizeof path, "%s/%s/tokenizer.json", dir, c[0]);
            t = load_ok(path);
        }
        char *out;
        ck_assert_msg(kv_tokenizer_chat(t, strcmp(c[1], "-") ? sys : NULL, user, &out) == KV_OK, "%s", kv_last_error());
        ck_assert_msg(!strcmp(out, want), "%s chat:\nkvsim:\n%s\ntransformers:\n%s", c[0], out, want);
        kv_free(out);
        if (t != tok[4])
            kv_tokenizer_free(t);
        n_chat++;
    }
    fclose(f);
    fprintf(stderr, "kvsim tests: interop chat: %d renderings equal transformers' apply_chat_template\n", n_chat);
    ck_assert_int_eq(n_chat, 16);
    for (int v = 0; v < 5; v++)
        kv_tokenizer_free(tok[v]);
}
END_TEST

/* ---- kvsim tokenize ---- */

static int run(const char *args, char *out, size_t len)
{
    char o[512], cmd[2048];
    kv_test_tmp("tokenize.out", o, sizeof o);
    snprintf(cmd, sizeof cmd, "%s %s >%s 2>&1", getenv("KVSIM_BIN"), args, o);
    int st = system(cmd);
    FILE *f = fopen(o, "r");
    size_t n = f ? fread(out, 1, len - 1, f) : 0;
    out[n] = 0;
    if (f)
        fclose(f);
    unlink(o);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 255;
}

START_TEST(cli_tokenize)
{
    char p[512], args[2048], out[8192];
    write_json("cli.json", BL("false", "true"), NULL, "\"a b\"",
               ADDED(270, "<m>", "true", "false", "false", "false", "false"), 0, p, sizeof p);
    snprintf(args, sizeof args, "tokenize %s 'ab <m> x'", p);
    ck_assert_int_eq(run(args, out, sizeof out), 0);
    ck_assert_str_eq(out, "256 32 270 32 120\n");
    char txt[512];
    kv_test_tmp("cli-text", txt, sizeof txt);
    FILE *f = fopen(txt, "wb");
    fwrite("ab \"\\\n\xff", 1, 7, f);
    fclose(f);
    snprintf(args, sizeof args, "tokenize --pieces %s @%s", p, txt);
    ck_assert_int_eq(run(args, out, sizeof out), 0);
    ck_assert_str_eq(out, "256\t\"ab\"\n32\t\" \"\n34\t\"\\\"\"\n92\t\"\\\\\"\n10\t\"\\n\"\n255\t\"\\xFF\"\n");
    snprintf(args, sizeof args, "tokenize %s - <%s", p, p); /* stdin */
    ck_assert_int_eq(run(args, out, sizeof out), 0);
    snprintf(args, sizeof args, "tokenize --bos %s ab", p);
    ck_assert_int_eq(run(args, out, sizeof out), 0);
    ck_assert_str_eq(out, "256\n"); /* no BOS to put */
    ck_assert_int_eq(run("tokenize --help", out, sizeof out), 0);
    ck_assert_ptr_nonnull(strstr(out, "usage: kvsim tokenize"));
    ck_assert_int_eq(run("tokenize onlyone", out, sizeof out), 2);
    ck_assert_ptr_nonnull(strstr(out, "expected MODEL and TEXT; see 'kvsim tokenize --help'"));
    snprintf(args, sizeof args, "tokenize --bos --no-bos %s a", p);
    ck_assert_int_eq(run(args, out, sizeof out), 2);
    ck_assert_int_eq(run("tokenize /nonexistent/tok.json a", out, sizeof out), 1);
    ck_assert_ptr_nonnull(strstr(out, "kvsim tokenize: /nonexistent/tok.json: cannot open"));
    snprintf(args, sizeof args, "tokenize --chat %s a", p);
    ck_assert_int_eq(run(args, out, sizeof out), 1);
    ck_assert_ptr_nonnull(strstr(out, "has no chat template"));
}
END_TEST

Suite *suite_tokenizer_bpe(void)
{
    Suite *s = suite_create("tokenizer_bpe");
    TCase *tc = tcase_create("bpe");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, merges_by_rank_leftmost_first);
    tcase_add_test(tc, ignore_merges_takes_whole_pieces);
    tcase_add_test(tc, added_tokens_options);
    tcase_add_test(tc, digits_and_prefix_space);
    tcase_add_test(tc, split_behaviors);
    tcase_add_test(tc, nfc_and_invalid_utf8);
    tcase_add_test(tc, decode_pieces_and_describe);
    tcase_add_test(tc, gguf_vocabulary_encodes_like_json);
    tcase_add_test(tc, broken_tokenizer_json);
    tcase_add_test(tc, broken_gguf_vocabulary);
    tcase_add_test(tc, chat_templates_refused_by_name);
    if (getenv("KVSIM_BIN"))
        tcase_add_test(tc, cli_tokenize);
    else
        kv_test_skip("tokenizer_bpe/cli_tokenize", "KVSIM_BIN not set (make test sets it)");
    if (kv_test_shared("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf", g_smollm, sizeof g_smollm)) {
        char data[1024];
        tcase_add_test(tc, smollm_golden_ids);
        if (kv_test_shared("data/tinystories_sample.txt", data, sizeof data)) {
            tcase_add_test(tc, smollm_speed);
            if (system("python3 -c 'import tokenizers' >/dev/null 2>&1") == 0 &&
                access("tests/tokenizer_ref.py", R_OK) == 0)
                tcase_add_test(tc, interop_hf_tokenizers);
            else
                kv_test_skip("tokenizer_bpe/interop_hf_tokenizers",
                             "python3 with tokenizers not available (python3 -m pip install tokenizers)");
        } else {
            kv_test_skip("tokenizer_bpe (2 tests)", "data/tinystories_sample.txt not found");
        }
    } else {
        kv_test_skip("tokenizer_bpe (3 tests)", "models/SmolLM2-135M-Instruct not found");
    }
    suite_add_tcase(s, tc);
    return s;
}
