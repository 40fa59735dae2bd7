/*
 * tok_gguf.c: the tokenizer stored in a GGUF model file (llama.cpp's tokenizer.ggml.* keys), read
 * through the GGUF reader (kv_gguf.h). The keys, as llama.cpp's llama-vocab.cpp reads them:
 *   tokenizer.ggml.model        "gpt2": byte-level BPE; "llama": SentencePiece by scores; others refused
 *   tokenizer.ggml.tokens       the vocabulary (strings; byte-level ones in GPT-2's byte alphabet,
 *                               SentencePiece ones with '\u2581' for spaces); no string twice
 *   tokenizer.ggml.scores       float32 per token (SentencePiece merges by them)
 *   tokenizer.ggml.token_type   int32 per token: 1 normal, 2 unknown, 3 control, 4 user-defined,
 *                               5 unused, 6 byte; control, user-defined and unknown tokens of a
 *                               byte-level vocabulary are the added tokens matched in the text
 *   tokenizer.ggml.merges       "left right" strings in rank order (byte-level)
 *   tokenizer.ggml.{bos,eos,unknown,padding}_token_id, add_bos_token, add_eos_token
 *   tokenizer.ggml.pre          the byte-level pre-tokenizer, by name (table below)
 *   tokenizer.chat_template     the Jinja chat template
 * Every id is range-checked; a malformed vocabulary (wrong types, lengths that disagree, a merge
 * of pieces that are not in it, a repeated token) is an error naming the file and the key.
 *
 * Pre-tokenizers: llama.cpp turns tokenizer.ggml.pre into a list of regexes, each splitting every
 * piece of the previous one with the matches isolated, then maps the bytes; here each regex is a
 * Split(Isolated) step before a ByteLevel step without regex, the same thing. The table holds the
 * names of the default, GPT-2, Llama 3, Qwen2 and SmolLM (StarCoder) families; llama3 and qwen2 use
 * the regex of the models' tokenizer.json ((?i:'s|'t|...)) where llama.cpp writes the contractions
 * as '[sS]|'[tT]|... for std::regex, so 'ſ and 'K (which fold to 's and 'k) split as Hugging Face
 * splits them. ignore_merges and the add_bos default follow llama.cpp (llama3: both on). An absent
 * tokenizer.ggml.pre means "default", as in llama.cpp; an unknown name is refused, listing these.
 * A merge listed twice keeps its last rank (Hugging Face's merge map; llama.cpp keeps the first).
 * Absent BOS/EOS ids are -1 (llama.cpp falls back to 11 for gpt2 vocabularies).
 *
 * SentencePiece ("llama"): Llama 2-style vocabularies only (the encoder's layout: byte tokens
 * <0x00>..<0xFF> at ids 3..258, a dummy prefix: tokenizer.ggml.add_space_prefix not false).
 */
#include "sim/common/kv_common.h"
#include "traces/capture/kv_gguf.h"
#include "traces/capture/kv_tokenizer_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- pre-tokenizers by tokenizer.ggml.pre ---- */

#define RE_DEFAULT_PUNCT "[\\p{P}\\$\\+<=>\\^~\\|]+"
#define RE_DEFAULT_WORDS "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"

typedef struct {
    const char *family;   /* the name shown */
    const char *names;    /* tokenizer.ggml.pre values, space-separated */
    const char *regex[4]; /* Split(Isolated) steps in order */
    const char *label[4]; /* their names in descriptions */
    int ignore_merges, add_bos;
} pre_t;

static const pre_t pres[] = {
    {"default",
     "default",
     {RE_DEFAULT_PUNCT, RE_DEFAULT_WORDS, "\\p{N}+", "[0-9][0-9][0-9]"},
     {"punctuation", "gpt2 (no \\s+)", "\\p{N}+", "3 digits"},
     0,
     0},
    {"gpt2", "gpt-2 gpt2 phi-2 mpt olmo jais exaone4", {kv_tok_re_gpt2}, {"gpt2"}, 0, 0},
    {"llama3", "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral", {kv_tok_re_llama3}, {"llama3"}, 1, 1},
    {"llama3 (dbrx)", "dbrx smaug-bpe", {kv_tok_re_llama3}, {"llama3"}, 0, 0},
    {"qwen2", "qwen2 deepseek-r1-qwen megrez stablelm2", {kv_tok_re_qwen2}, {"qwen2"}, 0, 0},
    {"smollm",
     "smollm starcoder refact command-r codeshell exaone minerva-7b",
     {"\\p{N}", kv_tok_re_gpt2},
     {"\\p{N}", "gpt2"},
     0,
     0},
};

static const pre_t *find_pre(const char *name, size_t len)
{
    for (size_t i = 0; i < KV_ARRAY_LEN(pres); i++)
        for (const char *p = pres[i].names; *p;) {
            size_t w = strcspn(p, " ");
            if (w == len && !memcmp(p, name, len))
                return &pres[i];
            p += w + (p[w] == ' ');
        }
    return NULL;
}

/* ---- string -> id (open addressing) ---- */

typedef struct {
    const char **s; /* (n) the vocabulary's strings, in the mapped file */
    size_t *len;
    int *slot; /* id + 1, 0 empty */
    size_t mask;
} strmap_t;

static size_t hash(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return (size_t)h;
}

static int map_find(const strmap_t *m, const char *s, size_t n)
{
    for (size_t i = hash(s, n) & m->mask;; i = (i + 1) & m->mask) {
        int id = m->slot[i] - 1;
        if (id < 0)
            return -1;
        if (m->len[id] == n && !memcmp(m->s[id], s, n))
            return id;
    }
}

/* ---- loading ---- */

static int gguf_probe(const char *path)
{
    FILE *f;
    if (kv_open_input(path, "tokenizer", &f) != KV_OK) {
        kv_clear_error();
        return 0;
    }
    char m[4];
    int ok = fread(m, 1, 4, f) == 4 && !memcmp(m, "GGUF", 4);
    fclose(f);
    return ok;
}

/* An optional token id key: -1 when absent; an error when present and outside [0, n). */
static int get_id(const kv_gguf_t *g, const char *key, int n, int *out)
{
    int64_t v;
    int rc = kv_gguf_get_int(g, key, &v);
    if (rc == KV_EUNAVAIL)
        return KV_OK;
    if (rc)
        return rc;
    if (v < 0 || v >= n)
        return kv_error(KV_EFORMAT, "%s: %s is %lld, outside the vocabulary [0, %d)", kv_gguf_path(g), key,
                        (long long)v, n);
    *out = (int)v;
    return KV_OK;
}

/* An array key of `type` with at least n elements (required: KV_EFORMAT when absent). */
static int check_array(const kv_gguf_t *g, const char *key, int type, uint64_t n, int required, int *present)
{
    int et;
    uint64_t m;
    int rc = kv_gguf_get_arr(g, key, &et, &m);
    *present = 0;
    if (rc == KV_EUNAVAIL)
        return required ? kv_error(KV_EFORMAT, "%s: no %s", kv_gguf_path(g), key) : KV_OK;
    if (rc)
        return rc;
    if (et != type)
        return kv_error(KV_EFORMAT, "%s: %s is an array of GGUF type %d, not %d", kv_gguf_path(g), key, et, type);
    if (m < n)
        return kv_error(KV_EFORMAT, "%s: %s has %llu entries, the vocabulary %llu", kv_gguf_path(g), key,
                        (unsigned long long)m, (unsigned long long)n);
    *present = 1;
    return KV_OK;
}

static int load_merges(kv_tokenizer_t *t, const kv_gguf_t *g, const strmap_t *map)
{
    const char *key = "tokenizer.ggml.merges";
    int et;
    uint64_t nm;
    int rc = kv_gguf_get_arr(g, key, &et, &nm);
    if (rc == KV_EUNAVAIL)
        return kv_error(KV_EFORMAT, "%s: no %s (a byte-level BPE needs its merges)", t->path, key);
    if (rc)
        return rc;
    if (et != KV_GGUF_STRING || nm >= KV_TOK_MAX_TOKENS)
        return kv_error(KV_EFORMAT, "%s: %s is not an array of fewer than %d strings", t->path, key, KV_TOK_MAX_TOKENS);
    kv_tok_merge_t *mg = kv_malloc((nm ? nm : 1) * sizeof *mg, "merges");
    char *both = kv_malloc((size_t)t->max_token_length * 4 + 8, "merge");
    if (!mg || !both) {
        rc = KV_ENOMEM;
        goto done;
    }
    for (uint64_t i = 0; i < nm && rc == KV_OK; i++) {
        const char *s;
        size_t len;
        if ((rc = kv_gguf_arr_str(g, key, i, &s, &len)))
            break;
        const char *sp = len > 1 ? memchr(s + 1, ' ', len - 1) : NULL; /* llama.cpp: find(' ', 1) */
        int a = -1, b = -1, m = -1;
        if (sp) {
            size_t la = (size_t)(sp - s), lb = len - la - 1;
            a = map_find(map, s, la);
            b = map_find(map, sp + 1, lb);
            if (a >= 0 && b >= 0 && la + lb <= (size_t)t->max_token_length * 4) {
                memcpy(both, s, la);
                memcpy(both + la, sp + 1, lb);
                m = map_find(map, both, la + lb);
            }
        }
        if (m < 0)
            rc = kv_error(KV_EFORMAT, "%s: %s[%llu] \"%.*s\" is not two vocabulary pieces joining into a third",
                          t->path, key, (unsigned long long)i, (int)(len < 200 ? len : 200), s);
        mg[i] = (kv_tok_merge_t){(uint64_t)a << 32 | (uint32_t)b, (int)i, m};
    }
    if (rc == KV_OK)
        rc = kv_tok_set_merges(t, mg, nm, 1);
done:
    kv_free(mg);
    kv_free(both);
    return rc;
}

/* The byte-level vocabulary: pieces decoded from the byte alphabet, merges, byte ids, added tokens,
 * pre-tokenizer steps. */
static int load_bytelevel(kv_tokenizer_t *t, const kv_gguf_t *g, const strmap_t *map, const int32_t *types)
{
    int rc;
    if ((rc = kv_tok_bpe_new(t)))
        return rc;
    for (int id = 0; id < t->vocab_size; id++) {
        int r = kv_tok_unbyte(map->s[id], map->len[id], t->pieces[id]);
        t->bpe->attr[id] = KV_TOK_ATTR_MODEL | (r >= 0 ? KV_TOK_ATTR_BYTES : 0);
        if (r >= 0) { /* the decoded bytes replace the string, which was copied there */
            t->lens[id] = r;
            t->pieces[id][r] = 0;
        }
    }
    kv_tokenizer_index(t);
    if ((rc = load_merges(t, g, map)))
        return rc;
    for (int b = 0; b < 256; b++) {
        char s[4];
        t->bpe->byte_id[b] = map_find(map, s, (size_t)kv_tok_byte_utf8(b, s));
    }
    for (int id = 0; types && id < t->vocab_size && rc == KV_OK; id++)
        if ((types[id] == 2 || types[id] == 3 || types[id] == 4) && map->len[id] > 0)
            rc = kv_tok_add_added(t, id, map->s[id], map->len[id], types[id] == 4 ? 0 : KV_TOK_SPECIAL);
    if (rc)
        return rc;
    const char *pre = "default";
    size_t plen = strlen(pre);
    rc = kv_gguf_get_str(g, "tokenizer.ggml.pre", &pre, &plen);
    if (rc == KV_EUNAVAIL)
        pre = "default", plen = strlen(pre), rc = KV_OK;
    if (rc)
        return rc;
    const pre_t *p = find_pre(pre, plen);
    if (!p) {
        char known[512] = "";
        for (size_t i = 0; i < KV_ARRAY_LEN(pres); i++)
            snprintf(known + strlen(known), sizeof known - strlen(known), "%s%s", i ? " " : "", pres[i].names);
        return kv_error(KV_EFORMAT, "%s: tokenizer.ggml.pre \"%.*s\" is not a pre-tokenizer kvsim knows (known: %s)",
                        t->path, (int)(plen < 80 ? plen : 80), pre, known);
    }
    for (int i = 0; i < 4 && p->regex[i] && rc == KV_OK; i++) {
        kv_tok_step_t st = {KV_STEP_SPLIT, (char *)p->regex[i], 0, KV_SPLIT_ISOLATED, 0, 0, 0, 0, p->label[i]};
        rc = kv_tok_bpe_add_step(t, &st);
    }
    kv_tok_step_t bl = {KV_STEP_BYTELEVEL, NULL, 0, 0, 0, 0, 0, 0, NULL};
    if (rc == KV_OK)
        rc = kv_tok_bpe_add_step(t, &bl);
    t->bpe->ignore_merges = p->ignore_merges;
    t->add_bos = p->add_bos;
    snprintf(t->pretok, sizeof t->pretok, "pre '%.*s' (%s)", (int)(plen < 40 ? plen : 40), pre, p->family);
    t->kind = KV_TOK_BYTE_BPE;
    return rc;
}

/* Turn '\u2581' into ' ' in place (SentencePiece pieces), returns the new length. */
static int unmeta(char *s, int len)
{
    int o = 0;
    for (int i = 0; i < len;) {
        if (i + 3 <= len && !memcmp(s + i, "\xe2\x96\x81", 3)) {
            s[o++] = ' ';
            i += 3;
        } else {
            s[o++] = s[i++];
        }
    }
    s[o] = 0;
    return o;
}

static int load_spm(kv_tokenizer_t *t, const kv_gguf_t *g, const int32_t *types)
{
    const char *key = "tokenizer.ggml.scores";
    int present, rc = check_array(g, key, KV_GGUF_FLOAT32, (uint64_t)t->vocab_size, 1, &present);
    for (int id = 0; id < t->vocab_size && rc == KV_OK; id++) {
        double v;
        if ((rc = kv_gguf_arr_float(g, key, (uint64_t)id, &v)))
            break;
        t->scores[id] = (float)v;
        t->lens[id] = unmeta(t->pieces[id], t->lens[id]);
    }
    if (rc)
        return rc;
    t->max_token_length = 0;
    for (int id = 0; id < t->vocab_size; id++)
        t->max_token_length = KV_MAX(t->max_token_length, t->lens[id]);
    kv_tokenizer_index(t);
    int sp = 1;
    if (kv_gguf_get_bool(g, "tokenizer.ggml.add_space_prefix", &sp) == KV_OK && !sp)
        return kv_error(KV_EFORMAT,
                        "%s: tokenizer.ggml.add_space_prefix is false; kvsim's SentencePiece encoder always puts "
                        "the dummy-prefix space first",
                        t->path);
    if (!t->byte_fallback)
        return kv_error(KV_EFORMAT,
                        "%s: ids 3..258 are not the byte tokens <0x00>..<0xFF>; kvsim's SentencePiece encoder needs "
                        "Llama 2's layout",
                        t->path);
    t->kind = KV_TOK_SPM;
    t->unk_id = 0;
    t->bos_id = 1;
    t->eos_id = 2;
    t->add_bos = 1;
    for (int id = 0; types && id < t->vocab_size && rc == KV_OK; id++)
        if (types[id] == 2 || types[id] == 3)
            rc = kv_tok_add_added(t, id, t->pieces[id], (size_t)t->lens[id], KV_TOK_SPECIAL);
    return rc;
}

static int gguf_load(const char *path, int expect_vocab, kv_tokenizer_t *t)
{
    kv_gguf_t *g = NULL;
    strmap_t map = {0};
    int32_t *types = NULL;
    int rc = kv_gguf_open(path, &g);
    if (rc)
        return rc;
    const char *model;
    size_t mlen;
    if ((rc = kv_gguf_get_str(g, "tokenizer.ggml.model", &model, &mlen))) {
        if (rc == KV_EUNAVAIL)
            rc = kv_error(KV_EFORMAT, "%s: no tokenizer.ggml.model (a GGUF file without a tokenizer?)", path);
        goto done;
    }
    int bpe = mlen == 4 && !memcmp(model, "gpt2", 4), spm = mlen == 5 && !memcmp(model, "llama", 5);
    if (!bpe && !spm) {
        rc = kv_error(KV_EFORMAT,
                      "%s: tokenizer.ggml.model \"%.*s\" is not supported (kvsim reads gpt2, byte-level BPE, and "
                      "llama, SentencePiece)",
                      path, (int)(mlen < 40 ? mlen : 40), model);
        goto done;
    }
    const char *key = "tokenizer.ggml.tokens";
    int et, present;
    uint64_t n;
    if ((rc = kv_gguf_get_arr(g, key, &et, &n))) {
        if (rc == KV_EUNAVAIL)
            rc = kv_error(KV_EFORMAT, "%s: no %s", path, key);
        goto done;
    }
    if (et != KV_GGUF_STRING || n == 0 || n > KV_TOK_MAX_TOKENS) {
        rc = kv_error(KV_EFORMAT, "%s: %s is not an array of 1 to %d strings", path, key, KV_TOK_MAX_TOKENS);
        goto done;
    }
    if (expect_vocab > 0 && n > (uint64_t)expect_vocab) {
        rc = kv_error(KV_EFORMAT, "%s: %llu tokens, more than the model's vocabulary of %d", path,
                      (unsigned long long)n, expect_vocab);
        goto done;
    }
    map.s = kv_calloc(n, sizeof *map.s, "token strings");
    map.len = kv_calloc(n, sizeof *map.len, "token strings");
    size_t cap = 16;
    while (cap < 2 * n)
        cap *= 2;
    map.slot = kv_calloc(cap, sizeof *map.slot, "token map");
    map.mask = cap - 1;
    if (!map.s || !map.len || !map.slot) {
        rc = KV_ENOMEM;
        goto done;
    }
    size_t bytes = 0;
    for (uint64_t i = 0; i < n; i++) {
        if ((rc = kv_gguf_arr_str(g, key, i, &map.s[i], &map.len[i])))
            goto done;
        if (map.len[i] > (1 << 16)) {
            rc = kv_error(KV_EFORMAT, "%s: %s[%llu] is %zu bytes long (corrupt vocabulary?)", path, key,
                          (unsigned long long)i, map.len[i]);
            goto done;
        }
        int dup = map_find(&map, map.s[i], map.len[i]);
        if (dup >= 0) {
            rc = kv_error(KV_EFORMAT, "%s: %s: \"%.*s\" is token %d and token %llu", path, key,
                          (int)(map.len[i] < 80 ? map.len[i] : 80), map.s[i], dup, (unsigned long long)i);
            goto done;
        }
        size_t h = hash(map.s[i], map.len[i]) & map.mask;
        while (map.slot[h])
            h = (h + 1) & map.mask;
        map.slot[h] = (int)i + 1;
        bytes += map.len[i] + 1;
    }
    if ((rc = kv_tok_alloc(t, n, bytes)))
        goto done;
    char *p = t->blob;
    for (uint64_t i = 0; i < n; i++)
        kv_tok_put_piece(t, &p, (int)i, map.s[i], (int)map.len[i]);
    if ((rc = check_array(g, "tokenizer.ggml.token_type", KV_GGUF_INT32, n, 0, &present)))
        goto done;
    if (present) {
        if (!(types = kv_malloc(sizeof *types * n, "token types"))) {
            rc = KV_ENOMEM;
            goto done;
        }
        for (uint64_t i = 0; i < n && rc == KV_OK; i++) {
            int64_t v;
            rc = kv_gguf_arr_int(g, "tokenizer.ggml.token_type", i, &v);
            types[i] = (int32_t)v;
        }
        if (rc)
            goto done;
    }
    if ((rc = bpe ? load_bytelevel(t, g, &map, types) : load_spm(t, g, types)))
        goto done;
    if ((rc = get_id(g, "tokenizer.ggml.bos_token_id", (int)n, &t->bos_id)) ||
        (rc = get_id(g, "tokenizer.ggml.eos_token_id", (int)n, &t->eos_id)) ||
        (rc = get_id(g, "tokenizer.ggml.unknown_token_id", (int)n, &t->unk_id)) ||
        (rc = get_id(g, "tokenizer.ggml.padding_token_id", (int)n, &t->pad_id)))
        goto done;
    int v;
    if ((rc = kv_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &v)) == KV_OK)
        t->add_bos = v;
    else if (rc != KV_EUNAVAIL)
        goto done;
    if ((rc = kv_gguf_get_bool(g, "tokenizer.ggml.add_eos_token", &v)) == KV_OK)
        t->add_eos = v;
    else if (rc != KV_EUNAVAIL)
        goto done;
    rc = KV_OK;
    if (t->add_bos && t->bos_id < 0) {
        rc = kv_error(KV_EFORMAT, "%s: add_bos_token is true but there is no tokenizer.ggml.bos_token_id", path);
        goto done;
    }
    const char *tmpl;
    size_t tlen;
    if ((rc = kv_gguf_get_str(g, "tokenizer.chat_template", &tmpl, &tlen)) == KV_OK)
        rc = kv_tok_set_template(t, tmpl, tlen);
    else if (rc == KV_EUNAVAIL)
        rc = KV_OK;
done:
    kv_free(types);
    kv_free(map.s);
    kv_free(map.len);
    kv_free(map.slot);
    kv_gguf_close(g);
    return rc;
}

const kv_tok_format_t kv_tok_format_gguf = {"gguf", gguf_probe, gguf_load};
