/*
 * tok_bpe.c: the byte-level BPE encoder (KV_TOK_BYTE_BPE: GPT-2, Llama 3, Qwen2, SmolLM2), written to
 * give the ids Hugging Face `tokenizers` gives (Tokenizer.encode(text, add_special_tokens=False)).
 *
 * Steps, as tokenizers runs them (tokenizer/added_vocabulary.rs, pre_tokenizers/, models/bpe/):
 *  1. Added tokens whose normalized flag is off (special tokens) are found in the raw text,
 *     leftmost-longest (the Aho-Corasick MatchKind::LeftmostLongest HF uses): a match preceded or
 *     followed by a word character (\w of Rust's regex: Alphabetic, M, Nd, Pc, Join_Control) is
 *     dropped for single_word tokens; lstrip takes the whitespace before the match (not past the
 *     previous match), rstrip the whitespace after it. Each match is its token's id.
 *  2. Every other stretch is normalized (none or NFC, through ICU's unorm2), then the normalized
 *     added tokens (their content normalized too) are found in it the same way.
 *  3. The rest goes through the pre-tokenizer steps, each splitting every piece of the previous one:
 *     Split (a regex or a literal; Removed, Isolated, MergedWithPrevious, MergedWithNext,
 *     Contiguous; invert), Digits (\p{N}: each alone or in runs), ByteLevel (last: a space put
 *     before a piece that does not start with one when add_prefix_space, then the GPT-2 regex,
 *     Isolated, when use_regex). Empty pieces vanish. Regex matches are found the way the onig
 *     crate's find_iter does: from the end of the previous match, an empty match right where the
 *     previous one ended skipped by one character.
 *  4. Each piece's bytes become their byte-alphabet tokens (a byte whose character is missing from
 *     the vocabulary becomes the BPE model's unk_token when it has one, fused with a preceding one
 *     under fuse_unk, else nothing, as HF and llama.cpp drop it), and are merged by rank with the core's merge loop
 *     (the pair of lowest rank, leftmost on ties: HF's Word::merge_all). With ignore_merges a piece
 *     whose byte string is a vocabulary entry is that one token.
 *
 * Regexes are PCRE2's (UTF, UCP, MULTILINE as Oniguruma's Ruby syntax has ^ and $ match at lines;
 * JIT when the library has it). Engine differences, measured over every code point against
 * tokenizers 0.23.3 (Oniguruma): PCRE2's \s adds U+180E to Oniguruma's (White_Space), so \s and \S
 * are rewritten as \p{White_Space} and \P{White_Space}, which then agree exactly; Oniguruma's \h is
 * a hex digit and is rewritten so. \p{L}, \p{N}, \p{M} agree except for characters assigned after
 * PCRE2 10.42's Unicode 14 (9,272 letters, 120 numbers in Unicode 15-16, e.g. CJK extension H and
 * I): those are unassigned for kvsim, letters or numbers for HF, and text using them may split
 * differently. Digits uses Rust's char::is_numeric, the same \p{N} but at Rust's Unicode version
 * (13 more code points). \w, \d and \b are left to PCRE2 (Oniguruma's \w also holds some So and No
 * characters); no supported tokenizer's regex uses them. NFC is ICU 72's (Unicode 15), HF's its
 * unicode-normalization tables: the two agree on every code point alone and on 1,638 base +
 * combining-mark pairs (measured against tokenizers 0.23.3); characters whose decomposition is newer
 * than either table could compose differently.
 *
 * Text that is not UTF-8 (HF only takes valid strings): every byte of an invalid sequence is a
 * pre-token of its own, never normalized or split, so it becomes its byte's token (or unk, or
 * nothing when the vocabulary lacks the byte); the valid stretches around it are encoded as
 * separate texts would be (a regex never sees across the invalid byte). Decoding gives the bytes
 * back: decode(encode(text)) == text whenever every byte of the text has a token.
 *
 * Encoding allocates its buffers per call and caches nothing: one tokenizer may encode on many
 * threads at once.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "sim/common/kv_common.h"
#include "traces/capture/kv_tokenizer_internal.h"

#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>

typedef struct {
    int start, end, is_match;
} span_t;

typedef struct {
    pcre2_code *re[KV_TOK_MAX_STEPS]; /* Split and Digits steps; ByteLevel's GPT-2 regex */
    pcre2_code *space, *word;         /* \p{White_Space} and Rust's \w, one character, anchored */
    const UNormalizer2 *nfc;
    int *raw_idx, n_raw;         /* added tokens matched in the raw text (indices into t->added) */
    int *norm_idx, n_norm;       /* matched in the normalized text */
    unsigned char first[2][256]; /* 1: some raw (0) / normalized (1) added token starts with this byte */
    char **norm_text;            /* (n_added) the normalized content of normalized tokens (NULL: as is) */
    int n_added;
    int *norm_len;
} compiled_t;

/* ---- UTF-8 ---- */

/* Length of the valid UTF-8 character at s (n bytes available), 0 when s[0] starts no valid one. */
static int utf8_len(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    if (c < 0x80)
        return 1;
    int len = c >= 0xC2 && c < 0xE0 ? 2 : c >= 0xE0 && c < 0xF0 ? 3 : c >= 0xF0 && c < 0xF5 ? 4 : 0;
    if (!len || (size_t)len > n)
        return 0;
    for (int i = 1; i < len; i++)
        if ((s[i] & 0xC0) != 0x80)
            return 0;
    if ((c == 0xE0 && s[1] < 0xA0) || (c == 0xED && s[1] >= 0xA0) || (c == 0xF0 && s[1] < 0x90) ||
        (c == 0xF4 && s[1] >= 0x90))
        return 0; /* overlong, surrogate, beyond U+10FFFF */
    return len;
}

/* Does the one character at s (len bytes) match the anchored class regex? */
static int char_is(const pcre2_code *re, pcre2_match_data *md, const char *s, size_t len)
{
    return pcre2_match(re, (PCRE2_SPTR)s, len, 0, PCRE2_NO_UTF_CHECK, md, NULL) >= 0;
}

/* Start of the valid character ending at s + end (0 < end), or -1. */
static int last_char(const char *s, int end)
{
    int i = end - 1;
    while (i > 0 && end - i < 4 && ((unsigned char)s[i] & 0xC0) == 0x80)
        i--;
    return utf8_len((const unsigned char *)s + i, (size_t)(end - i)) == end - i ? i : -1;
}

/* ---- regex ---- */

/* Oniguruma's meaning of the escapes whose meaning differs in PCRE2 (see the top comment), into a
 * kv_malloc'd pattern; a literal is escaped whole. */
static char *translate(const char *p, int literal)
{
    size_t n = strlen(p);
    char *o = kv_malloc(n * 16 + 1, "regex");
    if (!o)
        return NULL;
    size_t k = 0;
    if (literal) {
        for (const unsigned char *c = (const unsigned char *)p; *c; c++) {
            if (*c < 0x80 && !((*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z')))
                k += (size_t)sprintf(o + k, "\\x{%x}", *c);
            else
                o[k++] = (char)*c;
        }
        o[k] = 0;
        return o;
    }
    int in_class = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '\\' && i + 1 < n) {
            char e = p[++i];
            const char *rep = NULL;
            if (e == 's')
                rep = "\\p{White_Space}";
            else if (e == 'S')
                rep = "\\P{White_Space}";
            else if (e == 'h')
                rep = in_class ? "0-9A-Fa-f" : "[0-9A-Fa-f]";
            else if (e == 'H' && !in_class)
                rep = "[^0-9A-Fa-f]";
            else if (e == 'Q') { /* \Q...\E: copied as is */
                const char *end = strstr(p + i + 1, "\\E");
                size_t stop = end ? (size_t)(end - p) + 2 : n;
                o[k++] = '\\';
                memcpy(o + k, p + i, stop - i);
                k += stop - i;
                i = stop - 1;
                continue;
            }
            if (rep) {
                k += (size_t)sprintf(o + k, "%s", rep);
            } else {
                o[k++] = '\\';
                o[k++] = e;
            }
            continue;
        }
        if (!in_class && p[i] == '[') {
            in_class = 1;
            o[k++] = p[i];
            if (i + 1 < n && p[i + 1] == '^')
                o[k++] = p[++i];
            if (i + 1 < n && p[i + 1] == ']') /* a ']' first in a class is a literal */
                o[k++] = p[++i];
            continue;
        }
        if (in_class && p[i] == '[' && i + 1 < n && p[i + 1] == ':') { /* [:alpha:] */
            const char *end = strstr(p + i + 2, ":]");
            size_t stop = end ? (size_t)(end - p) + 2 : i + 1;
            memcpy(o + k, p + i, stop - i);
            k += stop - i;
            i = stop - 1;
            continue;
        }
        if (in_class && p[i] == ']')
            in_class = 0;
        o[k++] = p[i];
    }
    o[k] = 0;
    return o;
}

static int compile(const kv_tokenizer_t *t, const char *what, const char *pattern, int literal, uint32_t extra,
                   pcre2_code **out)
{
    char *tr = translate(pattern, literal);
    if (!tr)
        return KV_ENOMEM;
    int err;
    PCRE2_SIZE off;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)tr, PCRE2_ZERO_TERMINATED,
                                   PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE | extra, &err, &off, NULL);
    kv_free(tr);
    if (!re) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(err, msg, sizeof msg);
        return kv_error(KV_EFORMAT, "%s: %s: invalid regex \"%.80s\" (near offset %zu): %s", t->path, what, pattern,
                        (size_t)off, (const char *)msg);
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* when unavailable, matching is interpreted */
    *out = re;
    return KV_OK;
}

static int match_at(const pcre2_code *re, pcre2_match_data *md, const char *s, size_t len, size_t from, size_t *ms,
                    size_t *me)
{
    int rc = pcre2_match(re, (PCRE2_SPTR)s, len, from, PCRE2_NO_UTF_CHECK, md, NULL);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
        rc = pcre2_match(re, (PCRE2_SPTR)s, len, from, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md, NULL);
    if (rc == PCRE2_ERROR_NOMATCH)
        return 0;
    if (rc < 0) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(rc, msg, sizeof msg);
        return kv_error(KV_ERANGE, "pre-tokenizer regex failed on a %zu-byte piece: %s", len, (const char *)msg);
    }
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
    *ms = ov[0];
    *me = ov[1];
    return 1;
}

/* ---- encoding ---- */

typedef struct {
    const kv_tokenizer_t *t;
    const compiled_t *c;
    kv_tok_ids_t *out;
    pcre2_match_data *md;
    kv_tok_scratch_t merge;
    span_t *spans[KV_TOK_MAX_STEPS + 1]; /* per step level */
    int span_cap[KV_TOK_MAX_STEPS + 1];
    char *pre; /* ByteLevel's " " + piece */
    size_t pre_cap;
    int32_t *ids; /* one piece's symbols */
    size_t ids_cap;
    char *norm;    /* a normalized stretch */
    UChar *u16[2]; /* NFC's UTF-16 buffers */
    int32_t u16_cap[2];
} enc_t;

static int grow(void **p, size_t *cap, size_t need, size_t elem, const char *what)
{
    if (need <= *cap)
        return KV_OK;
    size_t c = *cap ? *cap : 64;
    while (c < need)
        c *= 2;
    void *q = kv_realloc(*p, c * elem, what);
    if (!q)
        return KV_ENOMEM;
    *p = q;
    *cap = c;
    return KV_OK;
}

static int push_span(enc_t *e, int level, int *n, span_t s)
{
    if (*n == e->span_cap[level]) {
        size_t cap = (size_t)e->span_cap[level];
        void *p = e->spans[level];
        if (grow(&p, &cap, cap + 1, sizeof(span_t), "pre-tokenizer pieces"))
            return KV_ENOMEM;
        e->spans[level] = p;
        e->span_cap[level] = (int)cap;
    }
    e->spans[level][(*n)++] = s;
    return KV_OK;
}

/* One pre-token: bytes -> byte tokens -> merges (or the whole piece with ignore_merges). */
static int bpe_piece(enc_t *e, const char *s, size_t len)
{
    const kv_tokenizer_t *t = e->t;
    const kv_tok_bpe_t *b = t->bpe;
    if (len == 0)
        return KV_OK;
    if (b->ignore_merges && len <= (size_t)t->max_token_length) {
        for (int pos = kv_tok_lower_bound(t, s, len); pos < t->vocab_size; pos++) {
            int id = t->sorted[pos];
            if ((size_t)t->lens[id] != len || memcmp(t->pieces[id], s, len))
                break;
            if ((b->attr[id] & (KV_TOK_ATTR_MODEL | KV_TOK_ATTR_BYTES)) == (KV_TOK_ATTR_MODEL | KV_TOK_ATTR_BYTES))
                return kv_tok_ids_push(e->out, id);
        }
    }
    void *p = e->ids;
    if (grow(&p, &e->ids_cap, len, sizeof(int32_t), "token ids"))
        return KV_ENOMEM;
    e->ids = p;
    int n = 0, prev_unk = 0;
    for (size_t i = 0; i < len; i++) {
        int id = b->byte_id[(unsigned char)s[i]];
        if (id >= 0) {
            e->ids[n++] = id;
            prev_unk = 0;
        } else if (b->unk_byte >= 0) {
            if (!(b->fuse_unk && prev_unk))
                e->ids[n++] = b->unk_byte;
            prev_unk = 1;
        }
    }
    int rc = kv_tok_merge(t, &e->merge, e->ids, &n);
    for (int i = 0; i < n && rc == KV_OK; i++)
        rc = kv_tok_ids_push(e->out, e->ids[i]);
    return rc;
}

/* HF's Pattern::find_matches: the matches and the gaps between them, in order. */
static int find_matches(enc_t *e, const pcre2_code *re, const char *s, size_t len, int level, int *n)
{
    *n = 0;
    size_t pos = 0, prev = 0, ms = 0, me = 0;
    long last_end = -1;
    int rc;
    while (pos <= len && (rc = match_at(re, e->md, s, len, pos, &ms, &me)) != 0) {
        if (rc < 0)
            return rc;
        if (ms == me && last_end == (long)me) { /* an empty match right after the previous match */
            int cl = pos < len ? utf8_len((const unsigned char *)s + pos, len - pos) : 1;
            pos += cl > 0 ? (size_t)cl : 1;
            continue;
        }
        pos = me;
        last_end = (long)me;
        if (prev != ms && (rc = push_span(e, level, n, (span_t){(int)prev, (int)ms, 0})))
            return rc;
        if ((rc = push_span(e, level, n, (span_t){(int)ms, (int)me, 1})))
            return rc;
        prev = me;
    }
    if (prev != len && (rc = push_span(e, level, n, (span_t){(int)prev, (int)len, 0})))
        return rc;
    return KV_OK;
}

/* The pieces a behaviour keeps (normalizer.rs NormalizedString::split), in place; matches are
 * flipped first under invert. */
static int apply_behavior(span_t *sp, int n, int behavior, int invert)
{
    if (invert)
        for (int i = 0; i < n; i++)
            sp[i].is_match = !sp[i].is_match;
    int m = 0, prev_match = 0;
    switch (behavior) {
    case KV_SPLIT_ISOLATED: return n;
    case KV_SPLIT_REMOVED:
        for (int i = 0; i < n; i++)
            if (!sp[i].is_match)
                sp[m++] = sp[i];
        return m;
    case KV_SPLIT_CONTIGUOUS:
        for (int i = 0; i < n; i++) {
            int is = sp[i].is_match;
            if (is == prev_match && m > 0)
                sp[m - 1].end = sp[i].end;
            else
                sp[m++] = sp[i];
            prev_match = is;
        }
        return m;
    case KV_SPLIT_MERGED_PREV:
        for (int i = 0; i < n; i++) {
            int is = sp[i].is_match;
            if (is && !prev_match && m > 0)
                sp[m - 1].end = sp[i].end;
            else
                sp[m++] = sp[i];
            prev_match = is;
        }
        return m;
    case KV_SPLIT_MERGED_NEXT: /* from the end, each match joins the piece after it */
        m = n;
        for (int i = n - 1; i >= 0; i--) {
            int is = sp[i].is_match;
            if (is && !prev_match && m < n)
                sp[m].start = sp[i].start;
            else
                sp[--m] = sp[i];
            prev_match = is;
        }
        memmove(sp, sp + m, sizeof *sp * (size_t)(n - m));
        return n - m;
    default: return n;
    }
}

static int pretokenize(enc_t *e, int level, const char *s, size_t len);

/* ByteLevel: prefix space, the GPT-2 regex, then each piece's BPE. */
static int bytelevel(enc_t *e, int level, const kv_tok_step_t *st, const char *s, size_t len)
{
    if (st->prefix_space && s[0] != ' ') {
        void *p = e->pre;
        if (grow(&p, &e->pre_cap, len + 1, 1, "pre-tokenizer piece"))
            return KV_ENOMEM;
        e->pre = p;
        e->pre[0] = ' ';
        memcpy(e->pre + 1, s, len);
        s = e->pre;
        len++;
    }
    if (!st->use_regex)
        return bpe_piece(e, s, len);
    int n, rc;
    if ((rc = find_matches(e, e->c->re[level], s, len, level, &n)))
        return rc;
    for (int i = 0; i < n && rc == KV_OK; i++) {
        span_t sp = e->spans[level][i];
        rc = bpe_piece(e, s + sp.start, (size_t)(sp.end - sp.start));
    }
    return rc;
}

/* Step `level` of the pre-tokenizer on one piece (valid UTF-8, non-empty). */
static int pretokenize(enc_t *e, int level, const char *s, size_t len)
{
    const kv_tok_bpe_t *b = e->t->bpe;
    if (len == 0)
        return KV_OK;
    if (level == b->n_steps)
        return bpe_piece(e, s, len);
    const kv_tok_step_t *st = &b->steps[level];
    if (st->type == KV_STEP_BYTELEVEL)
        return bytelevel(e, level, st, s, len);
    int n, rc;
    if ((rc = find_matches(e, e->c->re[level], s, len, level, &n)))
        return rc;
    int behavior =
        st->type == KV_STEP_DIGITS ? (st->individual ? KV_SPLIT_ISOLATED : KV_SPLIT_CONTIGUOUS) : st->behavior;
    n = apply_behavior(e->spans[level], n, behavior, st->type == KV_STEP_SPLIT && st->invert);
    for (int i = 0; i < n && rc == KV_OK; i++) {
        span_t sp = e->spans[level][i]; /* a copy: deeper levels use their own arrays */
        rc = pretokenize(e, level + 1, s + sp.start, (size_t)(sp.end - sp.start));
    }
    return rc;
}

/* Leftmost-longest added-token matches of the set idx[0..n) in s, with single_word, lstrip and
 * rstrip as HF's find_matches applies them; every stretch between matches goes to `gap`. */
static int split_added(enc_t *e, const int *idx, int n_idx, int normalized, const char *s, size_t len,
                       int (*gap)(enc_t *, const char *, size_t))
{
    const kv_tokenizer_t *t = e->t;
    const compiled_t *c = e->c;
    size_t start_offset = 0;
    int rc = KV_OK;
    for (size_t i = 0; i < len && n_idx > 0;) {
        if (!c->first[normalized][(unsigned char)s[i]]) {
            i++;
            continue;
        }
        int best = -1, best_len = 0;
        for (int k = 0; k < n_idx; k++) {
            const kv_tok_added_t *a = &t->added[idx[k]];
            const char *txt = normalized && c->norm_text[idx[k]] ? c->norm_text[idx[k]] : a->text;
            int tl = normalized && c->norm_text[idx[k]] ? c->norm_len[idx[k]] : a->len;
            if (tl > best_len && (size_t)tl <= len - i && !memcmp(s + i, txt, (size_t)tl)) {
                best = idx[k];
                best_len = tl;
            }
        }
        if (best < 0) {
            i++;
            continue;
        }
        const kv_tok_added_t *a = &t->added[best];
        size_t start = i, stop = i + (size_t)best_len;
        i = stop; /* the next search starts after this match, whatever its options */
        if (a->flags & KV_TOK_SINGLE_WORD) {
            int lc = start > 0 ? last_char(s, (int)start) : -1;
            int fl = stop < len ? utf8_len((const unsigned char *)s + stop, len - stop) : 0;
            int word_before = lc >= 0 && char_is(c->word, e->md, s + lc, start - (size_t)lc);
            int word_after = fl > 0 && char_is(c->word, e->md, s + stop, (size_t)fl);
            if (word_before || word_after)
                continue;
        }
        if (a->flags & KV_TOK_LSTRIP) {
            size_t ns = start;
            for (int lc;
                 ns > 0 && (lc = last_char(s, (int)ns)) >= 0 && char_is(c->space, e->md, s + lc, ns - (size_t)lc);)
                ns = (size_t)lc;
            start = ns > start_offset ? ns : start_offset;
        }
        if (a->flags & KV_TOK_RSTRIP)
            for (int fl; stop < len && (fl = utf8_len((const unsigned char *)s + stop, len - stop)) > 0 &&
                         char_is(c->space, e->md, s + stop, (size_t)fl);)
                stop += (size_t)fl;
        if (start_offset < start && (rc = gap(e, s + start_offset, start - start_offset)))
            return rc;
        if ((rc = kv_tok_ids_push(e->out, a->id)))
            return rc;
        start_offset = stop;
    }
    if (start_offset < len)
        rc = gap(e, s + start_offset, len - start_offset);
    return rc;
}

static int after_normalized_added(enc_t *e, const char *s, size_t len)
{
    return pretokenize(e, 0, s, len);
}

/* A valid UTF-8 stretch: normalize, then the normalized added tokens, then the pre-tokenizer. */
static int valid_stretch(enc_t *e, const char *s, size_t len)
{
    if (e->t->bpe->nfc) {
        int ascii = 1;
        for (size_t i = 0; i < len && ascii; i++)
            ascii = !((unsigned char)s[i] & 0x80);
        if (!ascii) {
            UErrorCode err = U_ZERO_ERROR;
            int32_t n16 = 0, nn = 0, n8 = 0;
            if (len > INT32_MAX / 4)
                return kv_error(KV_ERANGE, "a %zu-byte stretch of text is too long to normalize", len);
            for (int k = 0; k < 2; k++) {
                if (e->u16_cap[k] < (int32_t)(len * 3 + 16)) {
                    UChar *p = kv_realloc(e->u16[k], sizeof(UChar) * (len * 3 + 16), "NFC buffer");
                    if (!p)
                        return KV_ENOMEM;
                    e->u16[k] = p;
                    e->u16_cap[k] = (int32_t)(len * 3 + 16);
                }
            }
            u_strFromUTF8(e->u16[0], e->u16_cap[0], &n16, s, (int32_t)len, &err);
            if (U_SUCCESS(err))
                nn = unorm2_normalize(e->c->nfc, e->u16[0], n16, e->u16[1], e->u16_cap[1], &err);
            char *o = U_SUCCESS(err) ? kv_realloc(e->norm, (size_t)nn * 3 + 1, "normalized text") : NULL;
            if (o) {
                e->norm = o;
                u_strToUTF8(e->norm, nn * 3 + 1, &n8, e->u16[1], nn, &err);
            }
            if (!o || U_FAILURE(err))
                return o ? kv_error(KV_EINTERNAL, "NFC normalization failed: %s", u_errorName(err)) : KV_ENOMEM;
            s = e->norm;
            len = (size_t)n8;
        }
    }
    return split_added(e, e->c->norm_idx, e->c->n_norm, 1, s, len, after_normalized_added);
}

/* A stretch between raw added tokens: valid UTF-8 runs and, alone, each byte of an invalid sequence. */
static int after_raw_added(enc_t *e, const char *s, size_t len)
{
    size_t run = 0;
    int rc = KV_OK;
    for (size_t i = 0; i < len && rc == KV_OK;) {
        int cl = utf8_len((const unsigned char *)s + i, len - i);
        if (cl > 0) {
            i += (size_t)cl;
            continue;
        }
        if (run < i)
            rc = valid_stretch(e, s + run, i - run);
        if (rc == KV_OK)
            rc = bpe_piece(e, s + i, 1);
        run = ++i;
    }
    if (rc == KV_OK && run < len)
        rc = valid_stretch(e, s + run, len - run);
    return rc;
}

static int bpe_encode(const kv_tokenizer_t *t, const char *text, size_t len, kv_tok_ids_t *out)
{
    if (len == 0)
        return KV_OK;
    enc_t e = {0};
    e.t = t;
    e.c = t->bpe->compiled;
    e.out = out;
    e.md = pcre2_match_data_create(1, NULL);
    if (!e.md)
        return kv_error(KV_ENOMEM, "out of memory for regex match data");
    int rc = split_added(&e, e.c->raw_idx, e.c->n_raw, 0, text, len, after_raw_added);
    pcre2_match_data_free(e.md);
    kv_tok_scratch_free(&e.merge);
    for (int i = 0; i <= KV_TOK_MAX_STEPS; i++)
        kv_free(e.spans[i]);
    kv_free(e.pre);
    kv_free(e.ids);
    kv_free(e.norm);
    kv_free(e.u16[0]);
    kv_free(e.u16[1]);
    return rc;
}

static const char *bpe_decode(const kv_tokenizer_t *t, int prev, int id, size_t *len)
{
    (void)prev;
    *len = (size_t)t->lens[id];
    return t->pieces[id];
}

/* ---- prepare ---- */

static void release(kv_tokenizer_t *t)
{
    compiled_t *c = t->bpe->compiled;
    if (!c)
        return;
    for (int i = 0; i < KV_TOK_MAX_STEPS; i++)
        pcre2_code_free(c->re[i]);
    pcre2_code_free(c->space);
    pcre2_code_free(c->word);
    if (c->norm_text)
        for (int i = 0; i < c->n_added; i++)
            kv_free(c->norm_text[i]);
    kv_free(c->norm_text);
    kv_free(c->norm_len);
    kv_free(c->raw_idx);
    kv_free(c->norm_idx);
    kv_free(c);
    t->bpe->compiled = NULL;
}

/* NFC of an added token's content (kv_malloc'd), or NULL on failure. */
static char *nfc_of(const UNormalizer2 *nfc, const char *s, int len, int *out_len)
{
    UErrorCode err = U_ZERO_ERROR;
    int32_t n16 = 0, nn = 0, n8 = 0;
    UChar *a = kv_malloc(sizeof(UChar) * ((size_t)len * 3 + 16), "NFC"),
          *b = kv_malloc(sizeof(UChar) * ((size_t)len * 3 + 16), "NFC");
    char *o = kv_malloc((size_t)len * 9 + 16, "NFC");
    if (a && b && o) {
        u_strFromUTF8(a, len * 3 + 16, &n16, s, len, &err);
        if (U_SUCCESS(err))
            nn = unorm2_normalize(nfc, a, n16, b, len * 3 + 16, &err);
        if (U_SUCCESS(err))
            u_strToUTF8(o, len * 9 + 16, &n8, b, nn, &err);
    }
    kv_free(a);
    kv_free(b);
    if (!o || U_FAILURE(err)) {
        kv_free(o);
        return NULL;
    }
    *out_len = n8;
    return o;
}

static void describe(kv_tokenizer_t *t)
{
    const kv_tok_bpe_t *b = t->bpe;
    static const char *const behaviors[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext",
                                            "Contiguous"};
    char buf[sizeof t->pretok];
    size_t k = (size_t)snprintf(buf, sizeof buf, "%s%s%s", t->pretok, t->pretok[0] ? ": " : "", b->nfc ? "NFC, " : "");
    for (int i = 0; i < b->n_steps && k < sizeof buf; i++) {
        const kv_tok_step_t *s = &b->steps[i];
        const char *sep = i ? " > " : "";
        if (s->type == KV_STEP_SPLIT && s->label)
            k += (size_t)snprintf(buf + k, sizeof buf - k, "%sSplit(%s regex, %s%s)", sep, s->label,
                                  behaviors[s->behavior], s->invert ? ", inverted" : "");
        else if (s->type == KV_STEP_SPLIT)
            k += (size_t)snprintf(buf + k, sizeof buf - k, "%sSplit(%s /%.24s%s/, %s%s)", sep,
                                  s->literal ? "string" : "regex", s->pattern, strlen(s->pattern) > 24 ? "..." : "",
                                  behaviors[s->behavior], s->invert ? ", inverted" : "");
        else if (s->type == KV_STEP_DIGITS)
            k += (size_t)snprintf(buf + k, sizeof buf - k, "%sDigits(%s)", sep, s->individual ? "individual" : "runs");
        else
            k += (size_t)snprintf(buf + k, sizeof buf - k, "%sByteLevel(%s, %s)", sep,
                                  s->prefix_space ? "prefix space" : "no prefix space",
                                  s->use_regex ? "gpt2 regex" : "no regex");
    }
    if (b->ignore_merges && k < sizeof buf)
        snprintf(buf + k, sizeof buf - k, ", ignore_merges");
    snprintf(t->pretok, sizeof t->pretok, "%s", buf);
}

static int prepare(kv_tokenizer_t *t)
{
    kv_tok_bpe_t *b = t->bpe;
    int rc = KV_OK;
    if (!b || b->n_steps == 0 || b->steps[b->n_steps - 1].type != KV_STEP_BYTELEVEL)
        return kv_error(KV_EFORMAT, "%s: a byte-level BPE needs a ByteLevel pre-tokenizer step last", t->path);
    if (!t->merge_keys)
        return kv_error(KV_EINTERNAL, "%s: byte-level BPE without a merge table", t->path);
    compiled_t *c = kv_calloc(1, sizeof *c, "byte-level tokenizer");
    if (!c)
        return KV_ENOMEM;
    b->compiled = c;
    for (int i = 0; i < b->n_steps && rc == KV_OK; i++) {
        const kv_tok_step_t *s = &b->steps[i];
        char what[64];
        snprintf(what, sizeof what, "pre-tokenizer step %d (%s)", i + 1,
                 s->type == KV_STEP_SPLIT    ? "Split"
                 : s->type == KV_STEP_DIGITS ? "Digits"
                                             : "ByteLevel");
        if (s->type == KV_STEP_SPLIT)
            rc = compile(t, what, s->pattern, s->literal, 0, &c->re[i]);
        else if (s->type == KV_STEP_DIGITS)
            rc = compile(t, what, "\\p{N}", 0, 0, &c->re[i]);
        else if (s->use_regex)
            rc = compile(t, what, kv_tok_re_gpt2, 0, 0, &c->re[i]);
    }
    if (rc == KV_OK)
        rc = compile(t, "whitespace class", "\\s", 0, PCRE2_ANCHORED, &c->space);
    if (rc == KV_OK)
        rc = compile(t, "word class", "[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}]", 0, PCRE2_ANCHORED,
                     &c->word);
    if (rc)
        return rc;
    UErrorCode err = U_ZERO_ERROR;
    if (b->nfc && !(c->nfc = unorm2_getNFCInstance(&err)))
        return kv_error(KV_EUNAVAIL, "%s: ICU's NFC normalizer is unavailable: %s", t->path, u_errorName(err));
    int na = t->n_added ? t->n_added : 1;
    c->raw_idx = kv_malloc(sizeof(int) * (size_t)na, "added tokens");
    c->norm_idx = kv_malloc(sizeof(int) * (size_t)na, "added tokens");
    c->norm_text = kv_calloc((size_t)na, sizeof(char *), "added tokens");
    c->norm_len = kv_calloc((size_t)na, sizeof(int), "added tokens");
    c->n_added = t->n_added;
    if (!c->raw_idx || !c->norm_idx || !c->norm_text || !c->norm_len)
        return KV_ENOMEM;
    for (int i = 0; i < t->n_added; i++) {
        if (!(t->added[i].flags & KV_TOK_NORMALIZED)) {
            c->raw_idx[c->n_raw++] = i;
            continue;
        }
        c->norm_idx[c->n_norm++] = i;
        if (b->nfc && !(c->norm_text[i] = nfc_of(c->nfc, t->added[i].text, t->added[i].len, &c->norm_len[i])))
            return kv_error(KV_EFORMAT, "%s: added token \"%s\" cannot be normalized", t->path, t->added[i].text);
    }
    for (int k = 0; k < c->n_raw; k++)
        c->first[0][(unsigned char)t->added[c->raw_idx[k]].text[0]] = 1;
    for (int k = 0; k < c->n_norm; k++) {
        int i = c->norm_idx[k];
        if (c->norm_text[i] ? c->norm_len[i] > 0 : t->added[i].len > 0)
            c->first[1][(unsigned char)(c->norm_text[i] ? c->norm_text[i] : t->added[i].text)[0]] = 1;
    }
    describe(t);
    return KV_OK;
}

const kv_tok_kind_t kv_tok_kind_bpe = {bpe_encode, bpe_decode, prepare, release};
