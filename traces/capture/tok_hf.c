/*
 * tok_hf.c: a Hugging Face tokenizer.json (model.type "BPE") into kv_tokenizer_t, of one of two kinds.
 *
 * Byte-level BPE (Llama 3, Qwen2, SmolLM2, GPT-2: a ByteLevel pre-tokenizer, no byte fallback):
 * the vocabulary's strings are in GPT-2's byte alphabet; every token's piece is stored as the bytes
 * it decodes to (Hugging Face's ByteLevel decoder: a string with a character outside the alphabet
 * decodes to its own bytes, added tokens included). Merges become (left id, right id) -> rank, a
 * pair listed twice keeping its last rank as Hugging Face's merge map does. The normalizer is none
 * or NFC; the pre-tokenizer a Split / Digits / ByteLevel step or a Sequence of them, ByteLevel last
 * (tok_bpe.c runs them); added_tokens keep their lstrip/rstrip/single_word/normalized/special
 * options. BOS: the post_processor's TemplateProcessing (a special token before $A adds it: Llama
 * 3); a tokenizer_config.json beside the file gives bos_token, eos_token and chat_template.
 *
 * SentencePiece-BPE (Llama 1/2, Mistral v0.1, TinyLlama and their fine-tunes): model.type "BPE"
 * with byte_fallback true, spaces written as '\u2581' (bytes E2 96 81) and a dummy '\u2581' put
 * before the text (a Prepend normalizer, or a Metaspace pre-tokenizer that prepends), <unk>, <s>,
 * </s> at ids 0, 1, 2 and <0x00>..<0xFF> at ids 3..258, as kvsim's SentencePiece encoder assumes
 * (kv_tokenizer.h). That encoder then reproduces Hugging Face's tokens: the normalizer's "prepend
 * '\u2581', spaces to '\u2581'" is its dummy-prefix " " plus pieces with '\u2581' turned into ' ';
 * characters outside the vocabulary become byte tokens; merges follow the merges list by rank, a
 * pair listed twice keeping its first rank. Deviation: a Metaspace pre-tokenizer with split true
 * cuts the text before every '\u2581', which the encoder does not; this changes nothing unless a
 * merge joins a piece to a following '\u2581', which SentencePiece vocabularies do not have. BOS is
 * added unless a TemplateProcessing post_processor leaves it out.
 *
 * Refused by name: other model types (Unigram, WordPiece, WordLevel), other normalizers,
 * pre-tokenizers and post-processors, BPE options kvsim does not implement (dropout, subword
 * prefix/suffix).
 */
#include "sim/common/kv_common.h"
#include "traces/capture/kv_tokenizer_internal.h"

#include <errno.h>
#include <json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_FILE (256 << 20)
#define SUPPORTED                                                                                                      \
    "kvsim reads tokenizer.json files of two BPE kinds, SentencePiece-BPE (Llama 1/2, Mistral v0.1: byte_fallback "    \
    "true, '\u2581' for spaces) and byte-level (Llama 3, Qwen2, SmolLM2: a ByteLevel pre-tokenizer), llama2.c "        \
    "tokenizer.bin and GGUF files; kvsim capture, generate and nll take the prompt as text only, so there is no way "  \
    "to give token ids instead"

static const char META[] = "\xe2\x96\x81"; /* U+2581, SentencePiece's space */

static const char *type_of(json_object *o)
{
    json_object *ty;
    if (o && json_object_is_type(o, json_type_object) && json_object_object_get_ex(o, "type", &ty))
        return json_object_get_string(ty);
    return NULL;
}

static json_object *get(json_object *o, const char *key)
{
    json_object *v;
    if (o && json_object_is_type(o, json_type_object) && json_object_object_get_ex(o, key, &v))
        return v;
    return NULL;
}

/* A boolean member (absent or null: def). */
static int get_bool(json_object *o, const char *key, int def)
{
    json_object *v = get(o, key);
    return v && !json_object_is_type(v, json_type_null) ? json_object_get_boolean(v) : def;
}

/* A string member, or NULL (absent, null or not a string). */
static const char *get_str(json_object *o, const char *key)
{
    json_object *v = get(o, key);
    return v && json_object_is_type(v, json_type_string) ? json_object_get_string(v) : NULL;
}

/* Does the normalizer or pre-tokenizer put a '\u2581' before the text? */
static int has_dummy_prefix(json_object *norm, json_object *pre)
{
    const char *nt = type_of(norm);
    if (nt && !strcmp(nt, "Prepend")) {
        json_object *p;
        return json_object_object_get_ex(norm, "prepend", &p) && !strcmp(json_object_get_string(p), META);
    }
    if (nt && !strcmp(nt, "Sequence")) {
        json_object *seq;
        if (json_object_object_get_ex(norm, "normalizers", &seq) && json_object_is_type(seq, json_type_array))
            for (size_t i = 0; i < json_object_array_length(seq); i++)
                if (has_dummy_prefix(json_object_array_get_idx(seq, i), NULL))
                    return 1;
    }
    const char *pt = type_of(pre);
    if (pt && !strcmp(pt, "Metaspace")) {
        json_object *v;
        if (json_object_object_get_ex(pre, "prepend_scheme", &v))
            return strcmp(json_object_get_string(v), "never") != 0;
        if (json_object_object_get_ex(pre, "add_prefix_space", &v))
            return json_object_get_boolean(v);
        return 1;
    }
    return 0;
}

/* Is there a ByteLevel step in the pre-tokenizer (alone or in a Sequence)? */
static int has_bytelevel(json_object *pre)
{
    const char *pt = type_of(pre);
    if (pt && !strcmp(pt, "ByteLevel"))
        return 1;
    json_object *seq = get(pre, "pretokenizers");
    if (pt && !strcmp(pt, "Sequence") && seq && json_object_is_type(seq, json_type_array))
        for (size_t i = 0; i < json_object_array_length(seq); i++)
            if (has_bytelevel(json_object_array_get_idx(seq, i)))
                return 1;
    return 0;
}

/* Piece bytes with every '\u2581' turned into ' ' (in place; returns the new length). */
static int unmeta(char *s, int len)
{
    int o = 0;
    for (int i = 0; i < len;) {
        if (i + 3 <= len && !memcmp(s + i, META, 3)) {
            s[o++] = ' ';
            i += 3;
        } else {
            s[o++] = s[i++];
        }
    }
    return o;
}

/* Id of a piece of the JSON vocabulary (as written there), or -1. */
static int vocab_id(json_object *vocab, json_object *added_map, const char *s)
{
    json_object *v;
    if (json_object_object_get_ex(vocab, s, &v) && json_object_is_type(v, json_type_int))
        return json_object_get_int(v);
    if (added_map && json_object_object_get_ex(added_map, s, &v))
        return json_object_get_int(v);
    return -1;
}

/* Merge i of the list as its two strings: "left right" or ["left", "right"]. */
static int merge_pair(json_object *e, char *left, size_t ll, char *right, size_t rl)
{
    left[0] = right[0] = 0;
    if (json_object_is_type(e, json_type_string)) {
        const char *s = json_object_get_string(e), *sp = strchr(s, ' ');
        if (!(sp && sp > s && sp[1] && !strchr(sp + 1, ' ') && (size_t)(sp - s) < ll && strlen(sp + 1) < rl))
            return 0;
        snprintf(left, ll, "%.*s", (int)(sp - s), s);
        snprintf(right, rl, "%s", sp + 1);
        return 1;
    }
    if (json_object_is_type(e, json_type_array) && json_object_array_length(e) == 2) {
        json_object *a = json_object_array_get_idx(e, 0), *b = json_object_array_get_idx(e, 1);
        return json_object_is_type(a, json_type_string) && json_object_is_type(b, json_type_string) &&
               snprintf(left, ll, "%s", json_object_get_string(a)) < (int)ll &&
               snprintf(right, rl, "%s", json_object_get_string(b)) < (int)rl;
    }
    return 0;
}

/* Merges into t (pairs of vocabulary strings joining into a third). */
static int load_merges(const char *path, kv_tokenizer_t *t, json_object *merges, json_object *vocab,
                       json_object *added_map, int last_wins)
{
    size_t nm = json_object_array_length(merges);
    if (nm >= KV_TOK_MAX_TOKENS)
        return kv_error(KV_EFORMAT, "%s: %zu merges (at most %d are read)", path, nm, KV_TOK_MAX_TOKENS - 1);
    kv_tok_merge_t *mg = kv_malloc((nm ? nm : 1) * sizeof *mg, "merges");
    if (!mg)
        return KV_ENOMEM;
    int rc = KV_OK;
    for (size_t i = 0; i < nm && rc == KV_OK; i++) {
        json_object *e = json_object_array_get_idx(merges, i);
        char left[1024], right[1024];
        int ok = merge_pair(e, left, sizeof left, right, sizeof right);
        int a = ok ? vocab_id(vocab, added_map, left) : -1, b = ok ? vocab_id(vocab, added_map, right) : -1;
        int m = -1;
        if (a >= 0 && b >= 0) {
            char both[2048];
            snprintf(both, sizeof both, "%s%s", left, right);
            m = vocab_id(vocab, added_map, both);
        }
        if (!ok || a < 0 || b < 0 || m < 0)
            rc = kv_error(KV_EFORMAT, "%s: merge %zu (%s) is not two vocabulary pieces joining into a third", path, i,
                          json_object_to_json_string(e));
        mg[i].key = (uint64_t)a << 32 | (uint32_t)b;
        mg[i].rank = (int)i;
        mg[i].id = m;
    }
    if (rc == KV_OK)
        rc = kv_tok_set_merges(t, mg, nm, last_wins);
    kv_free(mg);
    return rc;
}

/* add_bos/bos_id (and add_eos/eos_id) from a TemplateProcessing post_processor (in a Sequence too).
 * *seen: a TemplateProcessing was found. */
static int read_post(const char *path, kv_tokenizer_t *t, json_object *post, int *seen)
{
    const char *ty = type_of(post);
    if (!ty || !strcmp(ty, "ByteLevel"))
        return KV_OK;
    if (!strcmp(ty, "Sequence")) {
        json_object *seq = get(post, "processors");
        int rc = KV_OK;
        for (size_t i = 0; seq && json_object_is_type(seq, json_type_array) && i < json_object_array_length(seq); i++)
            if ((rc = read_post(path, t, json_object_array_get_idx(seq, i), seen)))
                return rc;
        return rc;
    }
    if (strcmp(ty, "TemplateProcessing"))
        return kv_error(KV_EFORMAT,
                        "%s: post_processor %s is not supported (kvsim reads TemplateProcessing and ByteLevel)", path,
                        ty);
    *seen = 1;
    json_object *single = get(post, "single"), *specials = get(post, "special_tokens");
    if (!single || !json_object_is_type(single, json_type_array))
        return kv_error(KV_EFORMAT, "%s: post_processor TemplateProcessing has no \"single\" template", path);
    int after_seq = 0, n_before = 0, n_after = 0;
    for (size_t i = 0; i < json_object_array_length(single); i++) {
        json_object *it = json_object_array_get_idx(single, i), *sp = get(it, "SpecialToken");
        if (get(it, "Sequence")) {
            after_seq = 1;
            continue;
        }
        const char *name = get_str(sp, "id");
        json_object *ids = get(get(specials, name ? name : ""), "ids");
        json_object *id0 = ids && json_object_is_type(ids, json_type_array) && json_object_array_length(ids) == 1
                               ? json_object_array_get_idx(ids, 0)
                               : NULL;
        if (!name || !id0 || !json_object_is_type(id0, json_type_int))
            return kv_error(KV_EFORMAT,
                            "%s: post_processor TemplateProcessing: item %zu of \"single\" is not $A or a special "
                            "token with one id in special_tokens",
                            path, i);
        int id = json_object_get_int(id0);
        if (id < 0 || id >= t->vocab_size)
            return kv_error(KV_EFORMAT, "%s: post_processor TemplateProcessing: token %s has id %d outside [0, %d)",
                            path, name, id, t->vocab_size);
        if (after_seq) {
            n_after++;
            t->add_eos = 1;
            if (t->eos_id < 0)
                t->eos_id = id;
        } else {
            n_before++;
            t->add_bos = 1;
            t->bos_id = id;
        }
    }
    if (n_before > 1 || n_after > 1)
        return kv_error(KV_EFORMAT,
                        "%s: post_processor TemplateProcessing puts %d tokens before the text and %d after; kvsim "
                        "adds at most one BOS and one EOS",
                        path, n_before, n_after);
    return KV_OK;
}

/* ---- SentencePiece-BPE ---- */

static int spm_load(const char *path, int expect_vocab, kv_tokenizer_t *t, json_object *j, json_object *model)
{
    int rc = KV_OK;
    json_object *added_map = NULL;
    json_object *vocab, *merges, *pre = get(j, "pre_tokenizer"), *norm = get(j, "normalizer"),
                                 *added = get(j, "added_tokens"), *v;
    const char *pt = type_of(pre);
    if (pt && strcmp(pt, "Metaspace"))
        return kv_error(KV_EFORMAT, "%s: pre_tokenizer %s (without a ByteLevel step) is not supported; %s", path, pt,
                        SUPPORTED);
    if (!json_object_object_get_ex(model, "byte_fallback", &v) || !json_object_get_boolean(v))
        return kv_error(KV_EFORMAT, "%s: a BPE without byte_fallback or a ByteLevel pre-tokenizer is not supported; %s",
                        path, SUPPORTED);
    if (!has_dummy_prefix(norm, pre))
        return kv_error(KV_EFORMAT,
                        "%s: neither the normalizer nor the pre_tokenizer prepends '\u2581' to the text; %s", path,
                        SUPPORTED);
    if (!json_object_object_get_ex(model, "vocab", &vocab) || !json_object_is_type(vocab, json_type_object) ||
        !json_object_object_get_ex(model, "merges", &merges) || !json_object_is_type(merges, json_type_array))
        return kv_error(KV_EFORMAT, "%s: model.vocab (object) or model.merges (array) is missing", path);
    /* ids: the vocabulary plus added tokens not in it; they must be 0..n-1, each once */
    added_map = json_object_new_object();
    if (!added_map)
        return KV_ENOMEM;
    size_t n = (size_t)json_object_object_length(vocab);
    if (added && json_object_is_type(added, json_type_array))
        for (size_t i = 0; i < json_object_array_length(added); i++) {
            json_object *a = json_object_array_get_idx(added, i), *c, *id;
            if (!json_object_object_get_ex(a, "content", &c) || !json_object_object_get_ex(a, "id", &id) ||
                !json_object_is_type(id, json_type_int)) {
                rc = kv_error(KV_EFORMAT, "%s: added_tokens[%zu] needs content and an integer id", path, i);
                goto done;
            }
            const char *cs = json_object_get_string(c);
            if (vocab_id(vocab, NULL, cs) < 0 && vocab_id(added_map, NULL, cs) < 0) {
                json_object_object_add(added_map, cs, json_object_new_int(json_object_get_int(id)));
                n++;
            }
        }
    if (n < 259 || n > KV_TOK_MAX_TOKENS) {
        rc = kv_error(KV_EFORMAT, "%s: %zu tokens (a byte-fallback vocabulary has at least 259)", path, n);
        goto done;
    }
    if (expect_vocab > 0 && n > (size_t)expect_vocab) {
        rc = kv_error(KV_EFORMAT,
                      "%s: %zu tokens, more than the model's vocabulary of %d (a tokenizer for another "
                      "model?)",
                      path, n, expect_vocab);
        goto done;
    }
    size_t bytes = 0;
    json_object *maps[2] = {vocab, added_map};
    for (int k = 0; k < 2; k++) {
        json_object_object_foreach(maps[k], piece, idv)
        {
            (void)idv;
            bytes += strlen(piece) + 1;
        }
    }
    if ((rc = kv_tok_alloc(t, n, bytes)))
        goto done;
    char *p = t->blob;
    for (int k = 0; k < 2; k++) {
        json_object_object_foreach(maps[k], piece, idv)
        {
            int64_t id = json_object_get_int64(idv);
            if (!json_object_is_type(idv, json_type_int) || id < 0 || id >= (int64_t)n || t->pieces[id]) {
                rc = kv_error(KV_EFORMAT, "%s: token \"%s\" has id %s: ids must be 0..%zu, each used once", path, piece,
                              json_object_to_json_string(idv), n - 1);
                goto done;
            }
            int len = (int)strlen(piece);
            memcpy(p, piece, (size_t)len + 1);
            len = unmeta(p, len);
            kv_tok_put_piece(t, &p, (int)id, p, len);
        }
    }
    if (strcmp(t->pieces[0], "<unk>") || strcmp(t->pieces[1], "<s>") || strcmp(t->pieces[2], "</s>")) {
        rc = kv_error(KV_EFORMAT,
                      "%s: ids 0, 1, 2 are \"%s\", \"%s\", \"%s\"; kvsim's encoder needs <unk>, <s> (BOS), </s> "
                      "(EOS) there, as in Llama-2",
                      path, t->pieces[0], t->pieces[1], t->pieces[2]);
        goto done;
    }
    kv_tokenizer_index(t);
    if (!t->byte_fallback) {
        rc = kv_error(KV_EFORMAT, "%s: ids 3..258 are not the byte tokens <0x00>..<0xFF> (as in Llama-2); %s", path,
                      SUPPORTED);
        goto done;
    }
    /* merges: "left right" strings or [left, right] pairs, in priority order */
    if ((rc = load_merges(path, t, merges, vocab, added_map, 0)))
        goto done;
    t->kind = KV_TOK_SPM_HF;
    t->unk_id = 0;
    t->bos_id = 1;
    t->eos_id = 2;
    int seen = 0;
    if ((rc = read_post(path, t, get(j, "post_processor"), &seen)))
        goto done;
    if (!seen)
        t->add_bos = 1; /* no TemplateProcessing: Llama 2's <s> first, as kvsim has always done */
    t->bos_id = 1;
    t->eos_id = 2;
    for (int id = 0; id < 3 && rc == KV_OK; id++)
        rc = kv_tok_add_added(t, id, t->pieces[id], (size_t)t->lens[id], KV_TOK_SPECIAL);
done:
    json_object_put(added_map);
    return rc;
}

/* ---- byte-level BPE ---- */

static int read_normalizer(const char *path, kv_tokenizer_t *t, json_object *norm)
{
    const char *ty = type_of(norm);
    if (!ty)
        return KV_OK;
    if (!strcmp(ty, "NFC")) {
        t->bpe->nfc = 1;
        return KV_OK;
    }
    if (!strcmp(ty, "Sequence")) {
        json_object *seq = get(norm, "normalizers");
        for (size_t i = 0; seq && json_object_is_type(seq, json_type_array) && i < json_object_array_length(seq); i++) {
            int rc = read_normalizer(path, t, json_object_array_get_idx(seq, i));
            if (rc)
                return rc;
        }
        return KV_OK;
    }
    return kv_error(KV_EFORMAT, "%s: normalizer %s is not supported in a byte-level BPE (kvsim applies none or NFC)",
                    path, ty);
}

static int read_step(const char *path, kv_tokenizer_t *t, json_object *s)
{
    const char *ty = type_of(s);
    kv_tok_step_t st = {0};
    if (ty && !strcmp(ty, "Sequence")) {
        json_object *seq = get(s, "pretokenizers");
        for (size_t i = 0; seq && json_object_is_type(seq, json_type_array) && i < json_object_array_length(seq); i++) {
            int rc = read_step(path, t, json_object_array_get_idx(seq, i));
            if (rc)
                return rc;
        }
        return KV_OK;
    }
    if (t->bpe->n_steps && t->bpe->steps[t->bpe->n_steps - 1].type == KV_STEP_BYTELEVEL)
        return kv_error(KV_EFORMAT, "%s: pre_tokenizer step %s comes after ByteLevel; kvsim needs ByteLevel last", path,
                        ty ? ty : "(no type)");
    if (ty && !strcmp(ty, "Split")) {
        static const char *const behaviors[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext",
                                                "Contiguous"};
        json_object *pat = get(s, "pattern");
        const char *re = get_str(pat, "Regex"), *lit = get_str(pat, "String"), *bh = get_str(s, "behavior");
        if (!re && !lit)
            return kv_error(KV_EFORMAT, "%s: pre_tokenizer Split needs a pattern {\"Regex\": ...} or {\"String\": ...}",
                            path);
        st.type = KV_STEP_SPLIT;
        st.pattern = (char *)(re ? re : lit);
        st.literal = !re;
        st.behavior = -1;
        for (int b = 0; bh && b < (int)KV_ARRAY_LEN(behaviors); b++)
            if (!strcmp(bh, behaviors[b]))
                st.behavior = b;
        if (st.behavior < 0)
            return kv_error(KV_EFORMAT,
                            "%s: pre_tokenizer Split has behavior %s (kvsim knows Removed, Isolated, "
                            "MergedWithPrevious, MergedWithNext, Contiguous)",
                            path, bh ? bh : "missing");
        st.invert = get_bool(s, "invert", 0);
        st.label = re ? kv_tok_regex_label(re) : NULL;
    } else if (ty && !strcmp(ty, "Digits")) {
        st.type = KV_STEP_DIGITS;
        st.individual = get_bool(s, "individual_digits", 0);
    } else if (ty && !strcmp(ty, "ByteLevel")) {
        st.type = KV_STEP_BYTELEVEL;
        st.prefix_space = get_bool(s, "add_prefix_space", 1);
        st.use_regex = get_bool(s, "use_regex", 1);
    } else {
        return kv_error(KV_EFORMAT,
                        "%s: pre_tokenizer %s is not supported in a byte-level BPE (kvsim reads Split, Digits and "
                        "ByteLevel, alone or in a Sequence)",
                        path, ty ? ty : "without a type");
    }
    return kv_tok_bpe_add_step(t, &st);
}

static int bpe_load(const char *path, int expect_vocab, kv_tokenizer_t *t, json_object *j, json_object *model)
{
    int rc = KV_OK;
    json_object *vocab = get(model, "vocab"), *merges = get(model, "merges"), *added = get(j, "added_tokens");
    const char **strs = NULL;
    char *buf = NULL;
    if (!vocab || !json_object_is_type(vocab, json_type_object) || !merges ||
        !json_object_is_type(merges, json_type_array))
        return kv_error(KV_EFORMAT, "%s: model.vocab (object) or model.merges (array) is missing", path);
    if (get_bool(model, "byte_fallback", 0))
        return kv_error(KV_EFORMAT, "%s: a byte-level BPE with byte_fallback is not supported; %s", path, SUPPORTED);
    json_object *dropout = get(model, "dropout");
    if (dropout && !json_object_is_type(dropout, json_type_null) && json_object_get_double(dropout) > 0)
        return kv_error(KV_EFORMAT, "%s: BPE dropout %g is not supported (encoding would be random)", path,
                        json_object_get_double(dropout));
    const char *csp = get_str(model, "continuing_subword_prefix"), *eow = get_str(model, "end_of_word_suffix");
    if ((csp && csp[0]) || (eow && eow[0]))
        return kv_error(KV_EFORMAT, "%s: BPE continuing_subword_prefix/end_of_word_suffix are not supported", path);
    if (added && !json_object_is_type(added, json_type_array))
        return kv_error(KV_EFORMAT, "%s: added_tokens is not an array", path);
    /* ids: the vocabulary plus added tokens not in it, 0..n-1 each once */
    size_t nv = (size_t)json_object_object_length(vocab), n = nv, na = added ? json_object_array_length(added) : 0;
    for (size_t i = 0; i < na; i++) {
        json_object *a = json_object_array_get_idx(added, i), *id = get(a, "id");
        const char *c = get_str(a, "content");
        if (!c || !c[0] || !id || !json_object_is_type(id, json_type_int))
            return kv_error(KV_EFORMAT, "%s: added_tokens[%zu] needs a non-empty content and an integer id", path, i);
        int vid = vocab_id(vocab, NULL, c);
        if (vid >= 0 && vid != json_object_get_int(id))
            return kv_error(KV_EFORMAT, "%s: added token \"%s\" has id %d but the vocabulary gives it %d", path, c,
                            json_object_get_int(id), vid);
        int dup = 0;
        for (size_t k = 0; k < i && !dup; k++)
            dup = !strcmp(get_str(json_object_array_get_idx(added, k), "content"), c);
        n += vid < 0 && !dup;
    }
    if (n == 0 || n > KV_TOK_MAX_TOKENS)
        return kv_error(KV_EFORMAT, "%s: %zu tokens", path, n);
    if (expect_vocab > 0 && n > (size_t)expect_vocab)
        return kv_error(KV_EFORMAT,
                        "%s: %zu tokens, more than the model's vocabulary of %d (a tokenizer for another model?)", path,
                        n, expect_vocab);
    strs = kv_calloc(n, sizeof *strs, "token strings");
    if (!strs)
        return KV_ENOMEM;
    size_t bytes = 0;
    {
        json_object_object_foreach(vocab, piece, idv)
        {
            int64_t id = json_object_get_int64(idv);
            if (!json_object_is_type(idv, json_type_int) || id < 0 || id >= (int64_t)n || strs[id]) {
                rc = kv_error(KV_EFORMAT, "%s: token \"%s\" has id %s: ids must be 0..%zu, each used once", path, piece,
                              json_object_to_json_string(idv), n - 1);
                goto done;
            }
            strs[id] = piece;
            bytes += strlen(piece) + 1;
        }
    }
    for (size_t i = 0; i < na; i++) {
        json_object *a = json_object_array_get_idx(added, i);
        const char *c = get_str(a, "content");
        int64_t id = json_object_get_int64(get(a, "id"));
        if (vocab_id(vocab, NULL, c) >= 0)
            continue;
        if (id >= 0 && id < (int64_t)n && strs[id] && !strcmp(strs[id], c))
            continue; /* listed twice */
        if (id < 0 || id >= (int64_t)n || strs[id]) {
            rc = kv_error(KV_EFORMAT, "%s: added token \"%s\" has id %lld: ids must be 0..%zu, each used once", path, c,
                          (long long)id, n - 1);
            goto done;
        }
        strs[id] = c;
        bytes += strlen(c) + 1;
    }
    if ((rc = kv_tok_alloc(t, n, bytes)) || (rc = kv_tok_bpe_new(t)))
        goto done;
    char *p = t->blob;
    for (size_t id = 0; id < n; id++) {
        size_t len = strlen(strs[id]);
        int r = kv_tok_unbyte(strs[id], len, p); /* decodes in place into the blob: never longer */
        if (r >= 0) {
            t->bpe->attr[id] |= KV_TOK_ATTR_BYTES;
            kv_tok_put_piece(t, &p, (int)id, p, r);
        } else {
            kv_tok_put_piece(t, &p, (int)id, strs[id], (int)len);
        }
        if (vocab_id(vocab, NULL, strs[id]) == (int)id)
            t->bpe->attr[id] |= KV_TOK_ATTR_MODEL;
    }
    kv_tokenizer_index(t);
    t->kind = KV_TOK_BYTE_BPE;
    for (size_t i = 0; i < na && rc == KV_OK; i++) {
        json_object *a = json_object_array_get_idx(added, i);
        const char *c = get_str(a, "content");
        int id = vocab_id(vocab, NULL, c);
        int dup = 0;
        for (int k = 0; k < t->n_added && !dup; k++)
            dup = !strcmp(t->added[k].text, c);
        if (dup)
            continue;
        unsigned special = get_bool(a, "special", 0);
        unsigned fl = (special ? KV_TOK_SPECIAL : 0) | (get_bool(a, "lstrip", 0) ? KV_TOK_LSTRIP : 0) |
                      (get_bool(a, "rstrip", 0) ? KV_TOK_RSTRIP : 0) |
                      (get_bool(a, "single_word", 0) ? KV_TOK_SINGLE_WORD : 0) |
                      (get_bool(a, "normalized", !special) ? KV_TOK_NORMALIZED : 0);
        rc = kv_tok_add_added(t, id >= 0 ? id : json_object_get_int(get(a, "id")), c, strlen(c), fl);
    }
    if (rc || (rc = load_merges(path, t, merges, vocab, NULL, 1)))
        goto done;
    for (int b = 0; b < 256; b++) {
        char s[4];
        s[kv_tok_byte_utf8(b, s)] = 0;
        t->bpe->byte_id[b] = vocab_id(vocab, NULL, s);
    }
    const char *unk = get_str(model, "unk_token");
    if (unk && (t->unk_id = t->bpe->unk_byte = vocab_id(vocab, NULL, unk)) < 0) {
        rc = kv_error(KV_EFORMAT, "%s: model.unk_token \"%s\" is not in the vocabulary", path, unk);
        goto done;
    }
    t->bpe->fuse_unk = get_bool(model, "fuse_unk", 0);
    t->bpe->ignore_merges = get_bool(model, "ignore_merges", 0);
    if ((rc = read_normalizer(path, t, get(j, "normalizer"))) || (rc = read_step(path, t, get(j, "pre_tokenizer"))))
        goto done;
    int seen = 0;
    rc = read_post(path, t, get(j, "post_processor"), &seen);
done:
    kv_free(buf);
    kv_free(strs);
    return rc;
}

/* ---- tokenizer_config.json beside the file ---- */

static int read_json(const char *path, json_object **out)
{
    *out = NULL;
    FILE *f;
    int orc = kv_open_input(path, "tokenizer", &f);
    if (orc)
        return orc;
    long size = -1;
    if (fseek(f, 0, SEEK_END) == 0)
        size = ftell(f);
    if (size < 0 || size > MAX_FILE || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return kv_error(KV_EFORMAT, "%s: cannot read, or larger than %d MiB", path, MAX_FILE >> 20);
    }
    char *text = kv_malloc((size_t)size + 1, "tokenizer.json");
    size_t got = text ? fread(text, 1, (size_t)size, f) : 0;
    fclose(f);
    if (!text || got != (size_t)size) {
        kv_free(text);
        return text ? kv_error(KV_EIO, "%s: short read", path) : KV_ENOMEM;
    }
    text[size] = 0;
    json_tokener *tok = json_tokener_new();
    if (!tok) {
        kv_free(text);
        return KV_ENOMEM;
    }
    json_object *j = json_tokener_parse_ex(tok, text, (int)size);
    enum json_tokener_error je = json_tokener_get_error(tok);
    json_tokener_free(tok);
    kv_free(text);
    if (!j || je != json_tokener_success || !json_object_is_type(j, json_type_object)) {
        json_object_put(j);
        return kv_error(KV_EFORMAT, "%s: not a JSON object (%s)", path, json_tokener_error_desc(je));
    }
    *out = j;
    return KV_OK;
}

/* Id of a special token's text (an added token, else a piece), or -1. */
static int token_of(const kv_tokenizer_t *t, const char *s)
{
    for (int i = 0; i < t->n_added; i++)
        if (!strcmp(t->added[i].text, s))
            return t->added[i].id;
    return kv_tokenizer_lookup(t, s, strlen(s));
}

/* bos_token / eos_token of tokenizer_config.json: a string or {"content": ...}. */
static const char *config_token(json_object *cfg, const char *key)
{
    json_object *v = get(cfg, key);
    if (v && json_object_is_type(v, json_type_object))
        return get_str(v, "content");
    return get_str(cfg, key);
}

static int read_config(const char *path, kv_tokenizer_t *t)
{
    char cpath[1100];
    const char *slash = strrchr(path, '/');
    snprintf(cpath, sizeof cpath, "%.*stokenizer_config.json", slash ? (int)(slash - path + 1) : 0, path);
    FILE *f = fopen(cpath, "rb");
    if (!f)
        return KV_OK; /* optional */
    fclose(f);
    json_object *cfg;
    int rc = read_json(cpath, &cfg);
    if (rc)
        return rc;
    json_object *ct = get(cfg, "chat_template");
    if (ct && json_object_is_type(ct, json_type_string)) {
        rc = kv_tok_set_template(t, json_object_get_string(ct), (size_t)json_object_get_string_len(ct));
    } else if (ct && json_object_is_type(ct, json_type_array)) { /* [{name, template}]: "default", else the first */
        json_object *pick = NULL;
        for (size_t i = 0; i < json_object_array_length(ct); i++) {
            json_object *e = json_object_array_get_idx(ct, i);
            const char *name = get_str(e, "name");
            if (!pick || (name && !strcmp(name, "default")))
                pick = e;
        }
        const char *tt = get_str(pick, "template");
        if (tt)
            rc = kv_tok_set_template(t, tt, strlen(tt));
    }
    const char *keys[2] = {"bos_token", "eos_token"};
    for (int k = 0; k < 2 && rc == KV_OK && t->kind == KV_TOK_BYTE_BPE; k++) {
        const char *s = config_token(cfg, keys[k]);
        if (!s)
            continue;
        int id = token_of(t, s);
        if (id < 0)
            rc = kv_error(KV_EFORMAT, "%s: %s \"%s\" is not a token of %s", cpath, keys[k], s, path);
        else if (k == 0 && !t->add_bos)
            t->bos_id = id; /* when the post_processor adds BOS, its token is the BOS */
        else if (k == 1)
            t->eos_id = id;
    }
    json_object_put(cfg);
    return rc;
}

static int hf_probe(const char *path)
{
    size_t n = strlen(path);
    return n >= 5 && !strcmp(path + n - 5, ".json");
}

static int hf_load(const char *path, int expect_vocab, kv_tokenizer_t *t)
{
    json_object *j;
    int rc = read_json(path, &j);
    if (rc)
        return rc;
    json_object *model = get(j, "model");
    const char *mt = type_of(model);
    if (!model || !json_object_is_type(model, json_type_object))
        rc = kv_error(KV_EFORMAT, "%s: no \"model\" object (not a Hugging Face tokenizer.json?); %s", path, SUPPORTED);
    else if (!mt || strcmp(mt, "BPE"))
        rc = kv_error(KV_EFORMAT, "%s: model.type is %s; %s", path, mt ? mt : "missing", SUPPORTED);
    else if (has_bytelevel(get(j, "pre_tokenizer")))
        rc = bpe_load(path, expect_vocab, t, j, model);
    else
        rc = spm_load(path, expect_vocab, t, j, model);
    if (rc == KV_OK)
        rc = read_config(path, t);
    json_object_put(j);
    return rc;
}

const kv_tok_format_t kv_tok_format_hf = {"tokenizer.json", hf_probe, hf_load};
