/*
 * tokenizer.c: the tokenizer family's core (kv_tokenizer.h): the format table (probe, load), the kind
 * table (encode, decode, prepare), lookup and index, the BPE merge loop the encoders share, encode
 * and decode around the kind's codec (BOS, EOS), describe, free, and GPT-2's byte alphabet.
 *
 * Formats are probed in table order and the first that claims the path loads it; the last row
 * (llama2.c, whose files have no magic) claims everything, so a file of an unknown kind gets the
 * tokenizer.bin loader's size and header checks, which name what is wrong.
 *
 * The merge loop keeps the symbols in a doubly linked list and the candidate merges in a binary
 * max-heap ordered by (score, then leftmost position); a rank merge has score -rank, so the lowest
 * rank pops first (ranks are below 2^24, exact in a float). A heap entry remembers the two ids it
 * merges; when popped it is applied only if both symbols are still alive, adjacent and carry those
 * ids (otherwise it is stale and dropped). The best valid entry is exactly the pair the quadratic
 * "scan all pairs, keep the best, first one on ties" loop would pick, because every adjacent pair
 * that exists was pushed when it was formed and positions never reorder. This is Hugging Face's
 * Word::merge_all (a min-heap on (rank, position)) and llama2.c's score loop.
 */
#include "traces/capture/kv_tokenizer.h"

#include "sim/common/kv_common.h"
#include "traces/capture/kv_tokenizer_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const kv_tok_format_t *const formats[] = {
    &kv_tok_format_gguf,
    &kv_tok_format_hf,
    &kv_tok_format_llama2c,
};

static const kv_tok_kind_t *kind_of(const kv_tokenizer_t *t)
{
    return t->kind == KV_TOK_BYTE_BPE ? &kv_tok_kind_bpe : &kv_tok_kind_spm;
}

static const kv_tok_format_t *format_of(const char *path)
{
    for (size_t i = 0; i < KV_ARRAY_LEN(formats); i++)
        if (formats[i]->probe(path))
            return formats[i];
    return formats[KV_ARRAY_LEN(formats) - 1];
}

const char *kv_tokenizer_format_of(const char *path)
{
    return format_of(path)->name;
}

const char *kv_tokenizer_kind_name(int kind)
{
    switch (kind) {
    case KV_TOK_SPM: return "SentencePiece (scores)";
    case KV_TOK_SPM_HF: return "SentencePiece-BPE";
    case KV_TOK_BYTE_BPE: return "byte-level BPE";
    default: return "unknown";
    }
}

int kv_tokenizer_load(const char *path, int expect_vocab, kv_tokenizer_t **out)
{
    *out = NULL;
    kv_tokenizer_t *t = kv_calloc(1, sizeof *t, "tokenizer");
    if (!t)
        return KV_ENOMEM;
    snprintf(t->path, sizeof t->path, "%s", path);
    t->bos_id = t->eos_id = t->unk_id = t->pad_id = -1;
    const kv_tok_format_t *f = format_of(path);
    t->format = f->name;
    int rc = f->load(path, expect_vocab, t);
    if (rc == KV_OK && kind_of(t)->prepare)
        rc = kind_of(t)->prepare(t);
    if (rc == KV_OK && !t->pretok[0])
        snprintf(t->pretok, sizeof t->pretok, "none");
    if (rc) {
        kv_tokenizer_free(t);
        return rc;
    }
    *out = t;
    return KV_OK;
}

/* ---- vocabulary ---- */

static const kv_tokenizer_t *g_sort_tok; /* qsort has no context argument; loading is not concurrent */

static int cmp_bytes(const char *a, int la, const char *b, int lb)
{
    int n = la < lb ? la : lb;
    int c = memcmp(a, b, (size_t)n);
    return c ? c : (la > lb) - (la < lb);
}

static int cmp_ids(const void *pa, const void *pb)
{
    const kv_tokenizer_t *t = g_sort_tok;
    int a = *(const int *)pa, b = *(const int *)pb;
    int c = cmp_bytes(t->pieces[a], t->lens[a], t->pieces[b], t->lens[b]);
    return c ? c : (a > b) - (a < b); /* duplicates: the lower id first (lookup returns it) */
}

static int is_byte_piece(const char *p, int len, int *byte)
{
    static const char hex[] = "0123456789ABCDEF";
    if (len != 6 || p[0] != '<' || p[1] != '0' || p[2] != 'x' || p[5] != '>')
        return 0;
    const char *h = strchr(hex, p[3]), *l = strchr(hex, p[4]);
    if (!h || !l || !p[3] || !p[4])
        return 0;
    *byte = (int)((h - hex) * 16 + (l - hex));
    return 1;
}

void kv_tokenizer_index(kv_tokenizer_t *t)
{
    const int n = t->vocab_size;
    for (int i = 0; i < n; i++)
        t->sorted[i] = i;
    g_sort_tok = t;
    qsort(t->sorted, (size_t)n, sizeof(int), cmp_ids);
    g_sort_tok = NULL;
    t->byte_fallback = n >= 259;
    for (int b = 0; b < 256 && t->byte_fallback; b++) {
        int v;
        t->byte_fallback = is_byte_piece(t->pieces[3 + b], t->lens[3 + b], &v) && v == b;
    }
}

void kv_tokenizer_free(kv_tokenizer_t *t)
{
    if (!t)
        return;
    if (t->bpe) {
        if (t->bpe->compiled)
            kind_of(t)->release(t);
        for (int i = 0; i < t->bpe->n_steps; i++)
            kv_free(t->bpe->steps[i].pattern);
        kv_free(t->bpe->attr);
        kv_free(t->bpe);
    }
    for (int i = 0; i < t->n_added; i++)
        kv_free((char *)t->added[i].text);
    kv_free(t->added);
    kv_free(t->chat_template);
    kv_free(t->merge_keys);
    kv_free(t->merge_rank);
    kv_free(t->merge_id);
    kv_free(t->pieces);
    kv_free(t->lens);
    kv_free(t->scores);
    kv_free(t->sorted);
    kv_free(t->blob);
    kv_free(t);
}

int kv_tok_lower_bound(const kv_tokenizer_t *t, const char *s, size_t len)
{
    int lo = 0, hi = t->vocab_size;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2, id = t->sorted[mid];
        if (cmp_bytes(t->pieces[id], t->lens[id], s, (int)len) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

int kv_tokenizer_lookup(const kv_tokenizer_t *t, const char *s, size_t len)
{
    if (len > (size_t)t->max_token_length)
        return -1;
    int pos = kv_tok_lower_bound(t, s, len);
    if (pos >= t->vocab_size)
        return -1;
    int id = t->sorted[pos]; /* the first (lowest id) among equal pieces */
    return cmp_bytes(t->pieces[id], t->lens[id], s, (int)len) ? -1 : id;
}

int kv_tok_alloc(kv_tokenizer_t *t, size_t n, size_t bytes)
{
    t->vocab_size = (int)n;
    t->pieces = kv_calloc(n, sizeof(char *), "tokenizer pieces");
    t->lens = kv_calloc(n, sizeof(int), "tokenizer lengths");
    t->scores = kv_calloc(n, sizeof(float), "tokenizer scores");
    t->sorted = kv_calloc(n, sizeof(int), "tokenizer index");
    t->blob = kv_malloc(bytes ? bytes : 1, "tokenizer pieces");
    if (!t->pieces || !t->lens || !t->scores || !t->sorted || !t->blob)
        return kv_error_context(KV_ENOMEM, "%s", t->path);
    return KV_OK;
}

void kv_tok_put_piece(kv_tokenizer_t *t, char **cursor, int id, const char *s, int len)
{
    char *p = *cursor;
    memmove(p, s, (size_t)len); /* s may be p itself (a piece rewritten in place) */
    p[len] = 0;
    t->pieces[id] = p;
    t->lens[id] = len;
    if (len > t->max_token_length)
        t->max_token_length = len;
    *cursor = p + len + 1;
}

int kv_tok_add_added(kv_tokenizer_t *t, int id, const char *text, size_t len, unsigned flags)
{
    kv_tok_added_t *a = kv_realloc(t->added, sizeof *a * (size_t)(t->n_added + 1), "added tokens");
    if (!a)
        return KV_ENOMEM;
    t->added = a;
    char *s = kv_malloc(len + 1, "added token");
    if (!s)
        return KV_ENOMEM;
    memcpy(s, text, len);
    s[len] = 0;
    a[t->n_added++] = (kv_tok_added_t){id, s, (int)len, flags};
    return KV_OK;
}

int kv_tok_set_template(kv_tokenizer_t *t, const char *text, size_t len)
{
    char *s = kv_malloc(len + 1, "chat template");
    if (!s)
        return KV_ENOMEM;
    memcpy(s, text, len);
    s[len] = 0;
    kv_free(t->chat_template);
    t->chat_template = s;
    return KV_OK;
}

int kv_tok_bpe_new(kv_tokenizer_t *t)
{
    t->bpe = kv_calloc(1, sizeof *t->bpe, "byte-level tokenizer");
    if (!t->bpe)
        return KV_ENOMEM;
    for (int b = 0; b < 256; b++)
        t->bpe->byte_id[b] = -1;
    t->bpe->unk_byte = -1;
    t->bpe->attr = kv_calloc((size_t)(t->vocab_size ? t->vocab_size : 1), 1, "token attributes");
    return t->bpe->attr ? KV_OK : KV_ENOMEM;
}

int kv_tok_bpe_add_step(kv_tokenizer_t *t, const kv_tok_step_t *step)
{
    kv_tok_bpe_t *b = t->bpe;
    if (b->n_steps == KV_TOK_MAX_STEPS)
        return kv_error(KV_EFORMAT, "%s: more than %d pre-tokenizer steps", t->path, KV_TOK_MAX_STEPS);
    kv_tok_step_t *s = &b->steps[b->n_steps];
    *s = *step;
    s->pattern = NULL;
    if (step->pattern && !(s->pattern = kv_strdup(step->pattern)))
        return KV_ENOMEM;
    b->n_steps++;
    return KV_OK;
}

/* ---- merges ---- */

static int cmp_merge(const void *a, const void *b)
{
    const kv_tok_merge_t *x = a, *y = b;
    if (x->key != y->key)
        return (x->key > y->key) - (x->key < y->key);
    return (x->rank > y->rank) - (x->rank < y->rank);
}

int kv_tok_set_merges(kv_tokenizer_t *t, kv_tok_merge_t *m, size_t n, int last_wins)
{
    qsort(m, n, sizeof *m, cmp_merge);
    t->merge_keys = kv_malloc((n ? n : 1) * sizeof(uint64_t), "merges");
    t->merge_rank = kv_malloc((n ? n : 1) * sizeof(int), "merges");
    t->merge_id = kv_malloc((n ? n : 1) * sizeof(int), "merges");
    if (!t->merge_keys || !t->merge_rank || !t->merge_id)
        return KV_ENOMEM;
    int k = 0;
    for (size_t i = 0; i < n; i++) {
        if (k > 0 && t->merge_keys[k - 1] == m[i].key) {
            if (last_wins) { /* equal keys are sorted by rank: the later one replaces */
                t->merge_rank[k - 1] = m[i].rank;
                t->merge_id[k - 1] = m[i].id;
            }
            continue;
        }
        t->merge_keys[k] = m[i].key;
        t->merge_rank[k] = m[i].rank;
        t->merge_id[k] = m[i].id;
        k++;
    }
    t->n_merges = k;
    return KV_OK;
}

/* ---- the merge loop ---- */

typedef struct {
    float score;
    int left, right; /* symbol positions */
    int id_l, id_r;  /* ids when pushed (staleness check) */
    int merged;      /* id of the concatenation */
} cand_t;

/* a ranks above b: higher score, then the leftmost pair */
static int above(const cand_t *a, const cand_t *b)
{
    if (a->score != b->score)
        return a->score > b->score;
    return a->left < b->left;
}

static int heap_push(kv_tok_scratch_t *s, size_t *n, cand_t c)
{
    cand_t *h = s->heap;
    if (*n == s->heap_cap) {
        size_t cap = s->heap_cap ? 2 * s->heap_cap : 64;
        h = kv_realloc(s->heap, cap * sizeof *h, "tokenizer merge queue");
        if (!h)
            return KV_ENOMEM;
        s->heap = h;
        s->heap_cap = cap;
    }
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!above(&c, &h[p]))
            break;
        h[i] = h[p];
        i = p;
    }
    h[i] = c;
    return KV_OK;
}

static cand_t heap_pop(kv_tok_scratch_t *s, size_t *n)
{
    cand_t *h = s->heap;
    cand_t top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, best = i;
        const cand_t *bv = &last;
        if (l < *n && above(&h[l], bv))
            best = l, bv = &h[l];
        if (r < *n && above(&h[r], bv))
            best = r;
        if (best == i)
            break;
        h[i] = h[best];
        i = best;
    }
    if (*n)
        h[i] = last;
    return top;
}

/* Push the merge of symbols l and r: with a merge table when the pair is listed (score -rank, so
 * the lowest rank pops first), else when their concatenation is a token (its score). */
static int try_pair(const kv_tokenizer_t *t, kv_tok_scratch_t *s, size_t *hn, const int32_t *ids, int l, int r)
{
    int a = ids[l], b = ids[r];
    if (t->merge_keys) {
        uint64_t key = (uint64_t)a << 32 | (uint32_t)b;
        int lo = 0, hi = t->n_merges - 1;
        while (lo <= hi) {
            int mid = lo + (hi - lo) / 2;
            if (t->merge_keys[mid] == key) {
                cand_t c = {-(float)t->merge_rank[mid], l, r, a, b, t->merge_id[mid]};
                return heap_push(s, hn, c);
            }
            if (t->merge_keys[mid] < key)
                lo = mid + 1;
            else
                hi = mid - 1;
        }
        return KV_OK;
    }
    int la = t->lens[a], lb = t->lens[b];
    if (la + lb > t->max_token_length)
        return KV_OK;
    memcpy(s->text, t->pieces[a], (size_t)la);
    memcpy(s->text + la, t->pieces[b], (size_t)lb);
    int m = kv_tokenizer_lookup(t, s->text, (size_t)(la + lb));
    if (m < 0)
        return KV_OK;
    cand_t c = {t->scores[m], l, r, a, b, m};
    return heap_push(s, hn, c);
}

int kv_tok_merge(const kv_tokenizer_t *t, kv_tok_scratch_t *s, int32_t *ids, int *n_io)
{
    const int n = *n_io;
    if (n < 2)
        return KV_OK;
    if ((size_t)n > s->cap) {
        size_t cap = (size_t)n > 2 * s->cap ? (size_t)n : 2 * s->cap;
        int *nx = kv_realloc(s->next, cap * sizeof(int), "token list");
        if (!nx)
            return KV_ENOMEM;
        s->next = nx;
        int *pv = kv_realloc(s->prev, cap * sizeof(int), "token list");
        if (!pv)
            return KV_ENOMEM;
        s->prev = pv;
        s->cap = cap;
    }
    if (!t->merge_keys && !s->text && !(s->text = kv_malloc((size_t)t->max_token_length * 2 + 8, "tokenizer scratch")))
        return KV_ENOMEM;
    int *next = s->next, *prev = s->prev;
    for (int i = 0; i < n; i++) {
        prev[i] = i - 1;
        next[i] = i + 1 < n ? i + 1 : -1;
    }
    size_t hn = 0;
    int rc;
    for (int i = 0; i + 1 < n; i++)
        if ((rc = try_pair(t, s, &hn, ids, i, i + 1)))
            return rc;
    while (hn) {
        cand_t c = heap_pop(s, &hn);
        if (ids[c.left] != c.id_l || ids[c.right] != c.id_r || next[c.left] != c.right || ids[c.right] < 0)
            continue; /* stale: one side merged since */
        ids[c.left] = c.merged;
        ids[c.right] = -1;
        int r2 = next[c.right];
        next[c.left] = r2;
        if (r2 >= 0)
            prev[r2] = c.left;
        if (prev[c.left] >= 0 && (rc = try_pair(t, s, &hn, ids, prev[c.left], c.left)))
            return rc;
        if (r2 >= 0 && (rc = try_pair(t, s, &hn, ids, c.left, r2)))
            return rc;
    }
    int m = 0;
    for (int i = 0; i >= 0; i = next[i])
        ids[m++] = ids[i];
    *n_io = m;
    return KV_OK;
}

void kv_tok_scratch_free(kv_tok_scratch_t *s)
{
    kv_free(s->heap);
    kv_free(s->next);
    kv_free(s->prev);
    kv_free(s->text);
    memset(s, 0, sizeof *s);
}

/* ---- encode / decode ---- */

int kv_tok_ids_push(kv_tok_ids_t *v, int32_t id)
{
    if (v->n == v->cap) {
        int cap = v->cap ? 2 * v->cap : 64;
        int32_t *p = kv_realloc(v->ids, sizeof(int32_t) * (size_t)cap, "token ids");
        if (!p)
            return KV_ENOMEM;
        v->ids = p;
        v->cap = cap;
    }
    v->ids[v->n++] = id;
    return KV_OK;
}

int kv_tokenizer_encode(const kv_tokenizer_t *t, const char *text, size_t len, int bos, int eos, int32_t **out,
                        int *n_out)
{
    *out = NULL;
    *n_out = 0;
    if (len > (size_t)INT32_MAX - 8)
        return kv_error(KV_ERANGE, "text of %zu bytes is too long to encode", len);
    kv_tok_ids_t v = {0};
    int rc = KV_OK;
    if (bos && t->bos_id >= 0)
        rc = kv_tok_ids_push(&v, t->bos_id);
    if (rc == KV_OK)
        rc = kind_of(t)->encode(t, text, len, &v);
    if (rc == KV_OK && eos && t->eos_id >= 0)
        rc = kv_tok_ids_push(&v, t->eos_id);
    if (rc == KV_OK && !v.ids && !(v.ids = kv_malloc(sizeof(int32_t), "token ids")))
        rc = KV_ENOMEM; /* nothing encoded: still a (non-NULL) array */
    if (rc) {
        kv_free(v.ids);
        return rc;
    }
    *out = v.ids;
    *n_out = v.n;
    return KV_OK;
}

const char *kv_tokenizer_decode(const kv_tokenizer_t *t, int prev, int id, size_t *len)
{
    *len = 0;
    if (id < 0 || id >= t->vocab_size)
        return "";
    return kind_of(t)->decode(t, prev, id, len);
}

int kv_tokenizer_decode_all(const kv_tokenizer_t *t, const int32_t *ids, int n, char **out, size_t *out_len)
{
    *out = NULL;
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->vocab_size)
            return kv_error(KV_ERANGE, "%s: token id %d outside the vocabulary [0, %d)", t->path, ids[i],
                            t->vocab_size);
        total += (size_t)t->lens[ids[i]];
    }
    char *s = kv_malloc(total + 1, "decoded text");
    if (!s)
        return KV_ENOMEM;
    const int skip_bos_eos = t->kind != KV_TOK_BYTE_BPE;
    size_t m = 0;
    for (int i = 0; i < n; i++) {
        if (skip_bos_eos && (ids[i] == t->bos_id || ids[i] == t->eos_id))
            continue; /* BOS / EOS mark boundaries, they are not text */
        size_t l;
        const char *p = kv_tokenizer_decode(t, i ? ids[i - 1] : -1, ids[i], &l);
        memcpy(s + m, p, l);
        m += l;
    }
    s[m] = 0;
    *out = s;
    if (out_len)
        *out_len = m;
    return KV_OK;
}

const char *kv_tokenizer_piece(const kv_tokenizer_t *t, int id, size_t *len)
{
    *len = 0;
    if (id < 0 || id >= t->vocab_size)
        return NULL;
    *len = (size_t)t->lens[id];
    return t->pieces[id];
}

/* "<|im_start|>" or "3" (the piece when it is short and printable) */
static void id_text(const kv_tokenizer_t *t, int id, char *buf, size_t len)
{
    int printable = id >= 0 && id < t->vocab_size && t->lens[id] > 0 && t->lens[id] < 40;
    for (int i = 0; printable && i < t->lens[id]; i++)
        printable = (unsigned char)t->pieces[id][i] > 0x20 && (unsigned char)t->pieces[id][i] < 0x7f;
    if (id < 0)
        snprintf(buf, len, "none");
    else if (printable)
        snprintf(buf, len, "%d %s", id, t->pieces[id]);
    else
        snprintf(buf, len, "%d", id);
}

static const char *chat_style(const char *tmpl)
{
    if (!tmpl)
        return "none";
    if (strstr(tmpl, "<|im_start|>") && strstr(tmpl, "<|im_end|>"))
        return "ChatML";
    if (strstr(tmpl, "<|start_header_id|>") && strstr(tmpl, "<|eot_id|>"))
        return strstr(tmpl, "Cutting Knowledge Date") ? "Llama 3.1" : "Llama 3";
    return "unrecognised";
}

const char *kv_tokenizer_describe(const kv_tokenizer_t *t, char *buf, size_t len)
{
    char bos[64], eos[64], merges[32] = "";
    id_text(t, t->bos_id, bos, sizeof bos);
    id_text(t, t->eos_id, eos, sizeof eos);
    if (t->merge_keys)
        snprintf(merges, sizeof merges, ", %d merges", t->n_merges);
    snprintf(buf, len, "%s (%s, %d tokens%s; pre-tokenizer %s; BOS %s%s; EOS %s; %d added tokens; chat %s)",
             kv_tokenizer_kind_name(t->kind), t->format, t->vocab_size, merges, t->pretok, bos,
             t->add_bos ? ", added" : ", not added", eos, t->n_added, chat_style(t->chat_template));
    return buf;
}

/* ---- GPT-2's byte alphabet ---- */

/* The 188 bytes '!'..'~', 0xA1..0xAC and 0xAE..0xFF stand for themselves; the other 68 (0x00..0x20,
 * 0x7F..0xA0, 0xAD) for U+0100..U+0143 in byte order. */
unsigned kv_tok_byte_char(int b)
{
    if (b <= 0x20)
        return 256u + (unsigned)b;
    if (b >= 0x7F && b <= 0xA0)
        return 256u + 33u + (unsigned)(b - 0x7F);
    if (b == 0xAD)
        return 256u + 67u;
    return (unsigned)b;
}

static int char_byte(unsigned c) /* the inverse: the byte of code point c, -1 outside the alphabet */
{
    if (c < 256)
        return c > 0x20 && !(c >= 0x7F && c <= 0xA0) && c != 0xAD ? (int)c : -1;
    if (c < 256 + 33)
        return (int)(c - 256);
    if (c < 256 + 67)
        return (int)(c - 256 - 33 + 0x7F);
    return c == 256 + 67 ? 0xAD : -1;
}

int kv_tok_byte_utf8(int b, char *out)
{
    unsigned c = kv_tok_byte_char(b);
    if (c < 0x80) {
        out[0] = (char)c;
        return 1;
    }
    out[0] = (char)(0xC0 | (c >> 6));
    out[1] = (char)(0x80 | (c & 0x3F));
    return 2;
}

int kv_tok_unbyte(const char *s, size_t n, char *out)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        unsigned c;
        if (u[i] < 0x80) {
            c = u[i++];
        } else if ((u[i] & 0xE0) == 0xC0 && i + 1 < n && (u[i + 1] & 0xC0) == 0x80) {
            c = (unsigned)(u[i] & 0x1F) << 6 | (u[i + 1] & 0x3F);
            i += 2;
            if (c < 0x80)
                return -1; /* an overlong form is not UTF-8 */
        } else {
            return -1; /* 3- and 4-byte characters are never in the alphabet */
        }
        int b = char_byte(c);
        if (b < 0)
            return -1;
        out[o++] = (char)b;
    }
    return (int)o;
}

/* ---- known pre-tokenizer regexes ---- */

const char kv_tok_re_gpt2[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
const char kv_tok_re_llama3[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
                                "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const char kv_tok_re_qwen2[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
                               "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

const char *kv_tok_regex_label(const char *pattern)
{
    static const struct {
        const char *label, *re;
    } known[] = {{"gpt2", kv_tok_re_gpt2}, {"llama3", kv_tok_re_llama3}, {"qwen2", kv_tok_re_qwen2}};
    for (size_t i = 0; i < KV_ARRAY_LEN(known); i++)
        if (!strcmp(pattern, known[i].re))
            return known[i].label;
    return NULL;
}
