/*
 * tok_spm.c: the SentencePiece encoder and decoder of the kinds KV_TOK_SPM (merge by piece score:
 * llama2.c tokenizer.bin, GGUF model "llama") and KV_TOK_SPM_HF (merge by rank: tokenizer.json of
 * the SentencePiece-BPE kind), as kv_tokenizer.h describes them.
 *
 * The text becomes a dummy-prefix " " token (when the text is non-empty), then one token per UTF-8
 * code point (a lead byte and up to 3 continuation bytes) found in the vocabulary, else its bytes as
 * byte-fallback tokens (byte + 3; <unk> 0 without byte fallback); the core's merge loop
 * (kv_tok_merge) then merges by score or by rank. Bytes that are not UTF-8 go through byte fallback
 * like any character outside the vocabulary.
 */
#include "sim/common/kv_common.h"
#include "traces/capture/kv_tokenizer_internal.h"

#include <string.h>

/* Length of the UTF-8 "code point" starting at s[0]: a lead byte plus up to 3 continuation bytes. */
static size_t cp_len(const unsigned char *s, size_t avail)
{
    size_t n = 1;
    while (n < avail && n < 4 && (s[n] & 0xC0) == 0x80)
        n++;
    return n;
}

static int spm_encode(const kv_tokenizer_t *t, const char *text, size_t len, kv_tok_ids_t *out)
{
    if (len == 0)
        return KV_OK;
    int rc = KV_OK;
    kv_tok_scratch_t s = {0};
    int32_t *ids = kv_malloc((len + 1) * sizeof(int32_t), "token ids"); /* dummy prefix, one id per byte */
    if (!ids)
        return KV_ENOMEM;
    int n = 0;
    int sp = kv_tokenizer_lookup(t, " ", 1);
    if (sp >= 0)
        ids[n++] = sp;
    else if (t->byte_fallback)
        ids[n++] = ' ' + 3;
    else
        ids[n++] = 0;
    const unsigned char *u = (const unsigned char *)text;
    for (size_t i = 0; i < len;) {
        size_t cl = cp_len(u + i, len - i);
        int id = kv_tokenizer_lookup(t, text + i, cl);
        if (id >= 0) {
            ids[n++] = id;
        } else {
            for (size_t k = 0; k < cl; k++)
                ids[n++] = t->byte_fallback ? (int)u[i + k] + 3 : 0;
        }
        i += cl;
    }
    rc = kv_tok_merge(t, &s, ids, &n);
    for (int i = 0; i < n && rc == KV_OK; i++)
        rc = kv_tok_ids_push(out, ids[i]);
    kv_tok_scratch_free(&s);
    kv_free(ids);
    return rc;
}

static const char *spm_decode(const kv_tokenizer_t *t, int prev, int id, size_t *len)
{
    static const char bytes[256] = {
#define B4(x) (char)(x), (char)(x + 1), (char)(x + 2), (char)(x + 3)
#define B16(x) B4(x), B4(x + 4), B4(x + 8), B4(x + 12)
        B16(0),   B16(16),  B16(32),  B16(48),  B16(64),  B16(80),  B16(96),  B16(112),
        B16(128), B16(144), B16(160), B16(176), B16(192), B16(208), B16(224), B16(240),
#undef B16
#undef B4
    };
    const char *p = t->pieces[id];
    size_t n = (size_t)t->lens[id];
    if (prev == t->bos_id && prev >= 0 && n > 0 && p[0] == ' ') {
        p++;
        n--;
    }
    if (n == 6 && p[0] == '<' && p[1] == '0' && p[2] == 'x' && p[5] == '>') {
        static const char hex[] = "0123456789ABCDEF";
        const char *h = strchr(hex, p[3]), *l = strchr(hex, p[4]);
        if (h && l && p[3] && p[4]) {
            *len = 1;
            return &bytes[(h - hex) * 16 + (l - hex)];
        }
    }
    *len = n;
    return p;
}

const kv_tok_kind_t kv_tok_kind_spm = {spm_encode, spm_decode, NULL, NULL};
