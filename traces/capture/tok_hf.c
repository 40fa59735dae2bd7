/*
 * hf_tokenizer.c: a Hugging Face tokenizer.json of the SentencePiece-BPE kind into kv_tokenizer_t.
 *
 * Accepted (Llama 1/2, Mistral v0.1, TinyLlama and their fine-tunes): model.type "BPE" with
 * byte_fallback true, spaces written as '\u2581' (bytes E2 96 81) and a dummy '\u2581' put before
 * the text (a Prepend normalizer, or a Metaspace pre-tokenizer that prepends), <unk>, <s>, </s> at
 * ids 0, 1, 2 and <0x00>..<0xFF> at ids 3..258, as kvsim's encoder assumes (kv_tokenizer.h).
 * That encoder then reproduces Hugging Face's tokens: the normalizer's "prepend '\u2581', spaces to
 * '\u2581'" is its dummy-prefix " " plus pieces with '\u2581' turned into ' '; characters outside the
 * vocabulary become byte tokens; merges follow the merges list by rank (kv_tokenizer.h). Deviation:
 * a Metaspace pre-tokenizer with split true cuts the text before every '\u2581', which the encoder
 * does not; this changes nothing unless a merge joins a piece to a following '\u2581', which
 * SentencePiece vocabularies do not have.
 * Refused by name: other model types (Unigram, WordPiece, WordLevel) and byte-level BPE (Llama 3,
 * GPT-2: a ByteLevel or regex Split pre-tokenizer, no byte fallback), whose pre-tokenization the
 * encoder does not implement.
 */
#include "traces/capture/kv_tokenizer.h"

#include "sim/common/kv_common.h"

#include <errno.h>
#include <json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_FILE (256 << 20)
#define MAX_TOKENS (1 << 24)
#define SUPPORTED                                                                                                      \
    "kvsim reads tokenizer.json files of the SentencePiece-BPE kind (Llama 1/2, Mistral v0.1: model.type BPE, "        \
    "byte_fallback true, '\u2581' for spaces) and llama2.c tokenizer.bin files; kvsim capture, generate and nll "      \
    "take the prompt as text only, so there is no way to give token ids instead"

static const char META[] = "\xe2\x96\x81"; /* U+2581, SentencePiece's space */

static const char *type_of(json_object *o)
{
    json_object *ty;
    if (o && json_object_is_type(o, json_type_object) && json_object_object_get_ex(o, "type", &ty))
        return json_object_get_string(ty);
    return NULL;
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

typedef struct {
    uint64_t key;
    int rank, id;
} merge_t;

static int cmp_merge(const void *a, const void *b)
{
    const merge_t *x = a, *y = b;
    if (x->key != y->key)
        return (x->key > y->key) - (x->key < y->key);
    return (x->rank > y->rank) - (x->rank < y->rank);
}

/* Id of a piece of the JSON vocabulary (as written there, with '\u2581'), or -1. */
static int vocab_id(json_object *vocab, json_object *added_map, const char *s)
{
    json_object *v;
    if (json_object_object_get_ex(vocab, s, &v) && json_object_is_type(v, json_type_int))
        return json_object_get_int(v);
    if (added_map && json_object_object_get_ex(added_map, s, &v))
        return json_object_get_int(v);
    return -1;
}

int kv_hf_tokenizer_load(const char *path, int expect_vocab, kv_tokenizer_t **out)
{
    *out = NULL;
    int rc = KV_OK;
    json_object *j = NULL, *added_map = NULL;
    char *text = NULL;
    merge_t *mg = NULL;
    kv_tokenizer_t *t = kv_calloc(1, sizeof *t, "tokenizer");
    if (!t)
        return KV_ENOMEM;
    snprintf(t->path, sizeof t->path, "%s", path);
    FILE *f = fopen(path, "rb");
    if (!f) {
        rc = kv_error(KV_EIO, "%s: cannot open tokenizer: %s", path, strerror(errno));
        goto fail;
    }
    long size = -1;
    if (fseek(f, 0, SEEK_END) == 0)
        size = ftell(f);
    if (size < 0 || size > MAX_FILE || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        rc = kv_error(KV_EFORMAT, "%s: cannot read, or larger than %d MiB", path, MAX_FILE >> 20);
        goto fail;
    }
    text = kv_malloc((size_t)size + 1, "tokenizer.json");
    size_t got = text ? fread(text, 1, (size_t)size, f) : 0;
    fclose(f);
    if (!text || got != (size_t)size) {
        rc = text ? kv_error(KV_EIO, "%s: short read", path) : KV_ENOMEM;
        goto fail;
    }
    text[size] = 0;
    json_tokener *tok = json_tokener_new();
    if (!tok) {
        rc = KV_ENOMEM;
        goto fail;
    }
    j = json_tokener_parse_ex(tok, text, (int)size);
    enum json_tokener_error je = json_tokener_get_error(tok);
    json_tokener_free(tok);
    if (!j || je != json_tokener_success || !json_object_is_type(j, json_type_object)) {
        rc = kv_error(KV_EFORMAT, "%s: not a JSON object (%s)", path, json_tokener_error_desc(je));
        goto fail;
    }
    json_object *model, *vocab, *merges, *pre = NULL, *norm = NULL, *added = NULL, *v;
    json_object_object_get_ex(j, "pre_tokenizer", &pre);
    json_object_object_get_ex(j, "normalizer", &norm);
    if (!json_object_object_get_ex(j, "model", &model) || !json_object_is_type(model, json_type_object)) {
        rc = kv_error(KV_EFORMAT, "%s: no \"model\" object (not a Hugging Face tokenizer.json?); %s", path, SUPPORTED);
        goto fail;
    }
    const char *mt = type_of(model), *pt = type_of(pre);
    if (!mt || strcmp(mt, "BPE")) {
        rc = kv_error(KV_EFORMAT, "%s: model.type is %s; %s", path, mt ? mt : "missing", SUPPORTED);
        goto fail;
    }
    if (pt && strcmp(pt, "Metaspace")) {
        rc = kv_error(KV_EFORMAT,
                      "%s: pre_tokenizer %s (a byte-level or regex-split BPE such as Llama 3 or GPT-2) is not "
                      "supported; %s",
                      path, pt, SUPPORTED);
        goto fail;
    }
    if (!json_object_object_get_ex(model, "byte_fallback", &v) || !json_object_get_boolean(v)) {
        rc = kv_error(KV_EFORMAT, "%s: a BPE without byte_fallback is not supported; %s", path, SUPPORTED);
        goto fail;
    }
    if (!has_dummy_prefix(norm, pre)) {
        rc = kv_error(KV_EFORMAT, "%s: neither the normalizer nor the pre_tokenizer prepends '\u2581' to the text; %s",
                      path, SUPPORTED);
        goto fail;
    }
    if (!json_object_object_get_ex(model, "vocab", &vocab) || !json_object_is_type(vocab, json_type_object) ||
        !json_object_object_get_ex(model, "merges", &merges) || !json_object_is_type(merges, json_type_array)) {
        rc = kv_error(KV_EFORMAT, "%s: model.vocab (object) or model.merges (array) is missing", path);
        goto fail;
    }
    /* ids: the vocabulary plus added tokens not in it; they must be 0..n-1, each once */
    json_object_object_get_ex(j, "added_tokens", &added);
    added_map = json_object_new_object();
    if (!added_map) {
        rc = KV_ENOMEM;
        goto fail;
    }
    size_t n = (size_t)json_object_object_length(vocab);
    if (added && json_object_is_type(added, json_type_array))
        for (size_t i = 0; i < json_object_array_length(added); i++) {
            json_object *a = json_object_array_get_idx(added, i), *c, *id;
            if (!json_object_object_get_ex(a, "content", &c) || !json_object_object_get_ex(a, "id", &id) ||
                !json_object_is_type(id, json_type_int)) {
                rc = kv_error(KV_EFORMAT, "%s: added_tokens[%zu] needs content and an integer id", path, i);
                goto fail;
            }
            const char *cs = json_object_get_string(c);
            if (vocab_id(vocab, NULL, cs) < 0 && vocab_id(added_map, NULL, cs) < 0) {
                json_object_object_add(added_map, cs, json_object_new_int(json_object_get_int(id)));
                n++;
            }
        }
    if (n < 259 || n > MAX_TOKENS) {
        rc = kv_error(KV_EFORMAT, "%s: %zu tokens (a byte-fallback vocabulary has at least 259)", path, n);
        goto fail;
    }
    if (expect_vocab > 0 && n > (size_t)expect_vocab) {
        rc = kv_error(KV_EFORMAT,
                      "%s: %zu tokens, more than the model's vocabulary of %d (a tokenizer for another "
                      "model?)",
                      path, n, expect_vocab);
        goto fail;
    }
    t->vocab_size = (int)n;
    t->pieces = kv_calloc(n, sizeof(char *), "tokenizer pieces");
    t->lens = kv_calloc(n, sizeof(int), "tokenizer lengths");
    t->scores = kv_calloc(n, sizeof(float), "tokenizer scores");
    t->sorted = kv_calloc(n, sizeof(int), "tokenizer index");
    size_t bytes = 0;
    json_object *maps[2] = {vocab, added_map};
    for (int k = 0; k < 2; k++) {
        json_object_object_foreach(maps[k], piece, idv)
        {
            (void)idv;
            bytes += strlen(piece) + 1;
        }
    }
    t->blob = kv_malloc(bytes, "tokenizer pieces");
    if (!t->pieces || !t->lens || !t->scores || !t->sorted || !t->blob) {
        rc = kv_error_context(KV_ENOMEM, "%s", path);
        goto fail;
    }
    char *p = t->blob;
    for (int k = 0; k < 2; k++) {
        json_object_object_foreach(maps[k], piece, idv)
        {
            int64_t id = json_object_get_int64(idv);
            if (!json_object_is_type(idv, json_type_int) || id < 0 || id >= (int64_t)n || t->pieces[id]) {
                rc = kv_error(KV_EFORMAT, "%s: token \"%s\" has id %s: ids must be 0..%zu, each used once", path, piece,
                              json_object_to_json_string(idv), n - 1);
                goto fail;
            }
            int len = (int)strlen(piece);
            memcpy(p, piece, (size_t)len + 1);
            len = unmeta(p, len);
            p[len] = 0;
            t->pieces[id] = p;
            t->lens[id] = len;
            if (len > t->max_token_length)
                t->max_token_length = len;
            p += len + 1;
        }
    }
    if (strcmp(t->pieces[0], "<unk>") || strcmp(t->pieces[1], "<s>") || strcmp(t->pieces[2], "</s>")) {
        rc = kv_error(KV_EFORMAT,
                      "%s: ids 0, 1, 2 are \"%s\", \"%s\", \"%s\"; kvsim's encoder needs <unk>, <s> (BOS), </s> "
                      "(EOS) there, as in Llama-2",
                      path, t->pieces[0], t->pieces[1], t->pieces[2]);
        goto fail;
    }
    kv_tokenizer_index(t);
    if (!t->byte_fallback) {
        rc = kv_error(KV_EFORMAT, "%s: ids 3..258 are not the byte tokens <0x00>..<0xFF> (as in Llama-2); %s", path,
                      SUPPORTED);
        goto fail;
    }
    /* merges: "left right" strings or [left, right] pairs, in priority order */
    size_t nm = json_object_array_length(merges);
    if (nm >= MAX_TOKENS) {
        rc = kv_error(KV_EFORMAT, "%s: %zu merges (at most %d are read)", path, nm, MAX_TOKENS - 1);
        goto fail;
    }
    mg = kv_malloc((nm ? nm : 1) * sizeof *mg, "merges");
    if (!mg) {
        rc = KV_ENOMEM;
        goto fail;
    }
    for (size_t i = 0; i < nm && rc == KV_OK; i++) {
        json_object *e = json_object_array_get_idx(merges, i);
        char left[1024], right[1024];
        left[0] = right[0] = 0;
        int ok = 0;
        if (json_object_is_type(e, json_type_string)) {
            const char *s = json_object_get_string(e), *sp = strchr(s, ' ');
            ok = sp && sp > s && sp[1] && !strchr(sp + 1, ' ') && (size_t)(sp - s) < sizeof left &&
                 strlen(sp + 1) < sizeof right;
            if (ok) {
                snprintf(left, sizeof left, "%.*s", (int)(sp - s), s);
                snprintf(right, sizeof right, "%s", sp + 1);
            }
        } else if (json_object_is_type(e, json_type_array) && json_object_array_length(e) == 2) {
            ok = snprintf(left, sizeof left, "%s", json_object_get_string(json_object_array_get_idx(e, 0))) <
                     (int)sizeof left &&
                 snprintf(right, sizeof right, "%s", json_object_get_string(json_object_array_get_idx(e, 1))) <
                     (int)sizeof right;
        }
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
    if (rc)
        goto fail;
    qsort(mg, nm, sizeof *mg, cmp_merge);
    t->merge_keys = kv_malloc((nm ? nm : 1) * sizeof(uint64_t), "merges");
    t->merge_rank = kv_malloc((nm ? nm : 1) * sizeof(int), "merges");
    t->merge_id = kv_malloc((nm ? nm : 1) * sizeof(int), "merges");
    if (!t->merge_keys || !t->merge_rank || !t->merge_id) {
        rc = KV_ENOMEM;
        goto fail;
    }
    int k = 0;
    for (size_t i = 0; i < nm; i++) {
        if (k > 0 && t->merge_keys[k - 1] == mg[i].key)
            continue; /* a repeated pair: its first (lowest) rank counts */
        t->merge_keys[k] = mg[i].key;
        t->merge_rank[k] = mg[i].rank;
        t->merge_id[k] = mg[i].id;
        k++;
    }
    t->n_merges = k; /* t->merge_keys is set even when k == 0: a BPE with no merges merges nothing */
    kv_free(mg);
    kv_free(text);
    json_object_put(added_map);
    json_object_put(j);
    *out = t;
    return KV_OK;
fail:
    kv_free(mg);
    kv_free(text);
    json_object_put(added_map);
    json_object_put(j);
    kv_tokenizer_free(t);
    return rc;
}
