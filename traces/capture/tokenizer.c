/*
 * tokenizer.c: llama2.c tokenizer.bin loading, BPE encoding and decoding (see kv_tokenizer.h).
 *
 * The merge loop keeps the symbols of the text in a doubly linked list and the candidate merges in
 * a binary max-heap ordered by (score, then leftmost position). A heap entry remembers the two ids
 * it merges; when popped it is applied only if both symbols are still alive, adjacent and carry
 * those ids (otherwise it is stale and dropped). The best valid entry is exactly the pair the
 * quadratic "scan all pairs, keep the best score, first one on ties" loop would pick, because
 * every adjacent pair that exists was pushed when it was formed and positions never reorder.
 */
#include "traces/capture/kv_tokenizer.h"

#include "sim/common/kv_common.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define MAX_PIECE (1 << 16) /* longer pieces mean a corrupt file */
#define MAX_FILE (1 << 30)  /* 16M tokens of 64 bytes; real tokenizers are a few MB */

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

int kv_tokenizer_load(const char *path, int expect_vocab, kv_tokenizer_t **out)
{
    *out = NULL;
    size_t plen = strlen(path);
    if (plen >= 5 && !strcmp(path + plen - 5, ".json"))
        return kv_hf_tokenizer_load(path, expect_vocab, out);
    int rc = KV_OK;
    unsigned char *buf = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return kv_error(KV_EIO, "%s: cannot open tokenizer: %s", path, strerror(errno));
    kv_tokenizer_t *t = kv_calloc(1, sizeof *t, "tokenizer");
    if (!t) {
        fclose(f);
        return KV_ENOMEM;
    }
    snprintf(t->path, sizeof t->path, "%s", path);
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        rc = kv_error(KV_EIO, "%s: not a regular file", path);
        goto fail;
    }
    long size = -1;
    if (fseek(f, 0, SEEK_END) == 0)
        size = ftell(f);
    if (size < 0 || fseek(f, 0, SEEK_SET) != 0) {
        rc = kv_error(KV_EIO, "%s: cannot read tokenizer size: %s", path, strerror(errno));
        goto fail;
    }
    if (size < 4) {
        rc = kv_error(KV_EFORMAT, "%s: tokenizer file is %ld bytes, too short for its header", path, size);
        goto fail;
    }
    /* The header is checked before the file is read whole: a model checkpoint passed by mistake
     * must not be read into memory first. */
    int32_t maxlen;
    if (fread(&maxlen, 1, 4, f) != 4 || fseek(f, 0, SEEK_SET) != 0) {
        rc = kv_error(KV_EIO, "%s: cannot read the tokenizer header", path);
        goto fail;
    }
    if (maxlen <= 0 || maxlen > MAX_PIECE) {
        rc = kv_error(KV_EFORMAT, "%s: max_token_length %d is impossible (corrupt tokenizer?)", path, maxlen);
        goto fail;
    }
    if (size > MAX_FILE) {
        rc = kv_error(KV_EFORMAT,
                      "%s: tokenizer file is %ld bytes, more than the %d MiB any tokenizer.bin needs (a model "
                      "checkpoint?)",
                      path, size, MAX_FILE >> 20);
        goto fail;
    }
    buf = kv_malloc((size_t)size, "tokenizer file");
    if (!buf) {
        rc = kv_error_context(KV_ENOMEM, "%s", path);
        goto fail;
    }
    if (fread(buf, 1, (size_t)size, f) != (size_t)size) {
        rc = kv_error(KV_EIO, "%s: short read of the tokenizer", path);
        goto fail;
    }
    t->max_token_length = maxlen;
    /* First pass: count and validate records. */
    size_t off = 4, n = 0, bytes = 0;
    while (off < (size_t)size && (expect_vocab <= 0 || n < (size_t)expect_vocab)) {
        if ((size_t)size - off < 8) {
            rc = kv_error(KV_EFORMAT,
                          "%s: truncated: token %zu's score and length need 8 bytes at offset %zu, only "
                          "%zu remain",
                          path, n, off, (size_t)size - off);
            goto fail;
        }
        float score;
        int32_t len;
        memcpy(&score, buf + off, 4);
        memcpy(&len, buf + off + 4, 4);
        if (!isfinite(score)) {
            rc = kv_error(KV_EFORMAT, "%s: token %zu has a non-finite score (corrupt tokenizer?)", path, n);
            goto fail;
        }
        if (len < 0 || len > maxlen) {
            rc = kv_error(KV_EFORMAT,
                          "%s: token %zu has length %d outside [0, max_token_length %d] (corrupt "
                          "tokenizer?)",
                          path, n, len, maxlen);
            goto fail;
        }
        off += 8;
        if ((size_t)size - off < (size_t)len) {
            rc = kv_error(KV_EFORMAT, "%s: truncated: token %zu needs %d bytes at offset %zu, only %zu remain", path, n,
                          len, off, (size_t)size - off);
            goto fail;
        }
        off += (size_t)len;
        bytes += (size_t)len + 1;
        n++;
        if (n > (1u << 24)) {
            rc = kv_error(KV_EFORMAT, "%s: more than 16M tokens (corrupt tokenizer?)", path);
            goto fail;
        }
    }
    if (expect_vocab > 0 && n < (size_t)expect_vocab) {
        rc = kv_error(KV_EFORMAT,
                      "%s: tokenizer has %zu tokens, the model's vocabulary has %d (truncated or a "
                      "tokenizer for another model)",
                      path, n, expect_vocab);
        goto fail;
    }
    if (off != (size_t)size) {
        rc = kv_error(KV_EFORMAT,
                      "%s: %zu bytes after the %zu tokens the model expects (a tokenizer for another "
                      "model?)",
                      path, (size_t)size - off, n);
        goto fail;
    }
    if (n < 3) {
        rc = kv_error(KV_EFORMAT, "%s: only %zu tokens (need at least <unk>, BOS and EOS)", path, n);
        goto fail;
    }
    t->vocab_size = (int)n;
    t->pieces = kv_calloc(n, sizeof(char *), "tokenizer pieces");
    t->lens = kv_calloc(n, sizeof(int), "tokenizer lengths");
    t->scores = kv_calloc(n, sizeof(float), "tokenizer scores");
    t->sorted = kv_calloc(n, sizeof(int), "tokenizer index");
    t->blob = kv_malloc(bytes, "tokenizer pieces");
    if (!t->pieces || !t->lens || !t->scores || !t->sorted || !t->blob) {
        rc = kv_error_context(KV_ENOMEM, "%s", path);
        goto fail;
    }
    /* Second pass: copy (sizes already validated). */
    off = 4;
    char *p = t->blob;
    for (size_t i = 0; i < n; i++) {
        int32_t len;
        memcpy(&t->scores[i], buf + off, 4);
        memcpy(&len, buf + off + 4, 4);
        off += 8;
        memcpy(p, buf + off, (size_t)len);
        p[len] = 0;
        t->pieces[i] = p;
        t->lens[i] = len;
        p += len + 1;
        off += (size_t)len;
    }
    kv_tokenizer_index(t);
    kv_free(buf);
    fclose(f);
    *out = t;
    return KV_OK;
fail:
    kv_free(buf);
    fclose(f);
    kv_tokenizer_free(t);
    return rc;
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

int kv_tokenizer_lookup(const kv_tokenizer_t *t, const char *s, size_t len)
{
    if (len > (size_t)t->max_token_length)
        return -1;
    int lo = 0, hi = t->vocab_size - 1, found = -1;
    while (lo <= hi) { /* lower bound: the first (lowest id) among equal pieces */
        int mid = lo + (hi - lo) / 2, id = t->sorted[mid];
        int c = cmp_bytes(t->pieces[id], t->lens[id], s, (int)len);
        if (c < 0) {
            lo = mid + 1;
        } else {
            if (c == 0)
                found = id;
            hi = mid - 1;
        }
    }
    return found;
}

/* ---- encoding ---- */

typedef struct {
    float score;
    int left, right; /* symbol positions */
    int id_l, id_r;  /* ids when pushed (staleness check) */
    int merged;      /* id of the concatenation */
} cand_t;

typedef struct {
    cand_t *a;
    size_t n, cap;
} heap_t;

/* a ranks above b: higher score, then the leftmost pair */
static int above(const cand_t *a, const cand_t *b)
{
    if (a->score != b->score)
        return a->score > b->score;
    return a->left < b->left;
}

static int heap_push(heap_t *h, cand_t c)
{
    if (h->n == h->cap) {
        size_t cap = h->cap ? 2 * h->cap : 64;
        cand_t *a = kv_realloc(h->a, cap * sizeof *a, "tokenizer merge queue");
        if (!a)
            return KV_ENOMEM;
        h->a = a;
        h->cap = cap;
    }
    size_t i = h->n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!above(&c, &h->a[p]))
            break;
        h->a[i] = h->a[p];
        i = p;
    }
    h->a[i] = c;
    return KV_OK;
}

static cand_t heap_pop(heap_t *h)
{
    cand_t top = h->a[0], last = h->a[--h->n];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, best = i;
        const cand_t *bv = &last;
        if (l < h->n && above(&h->a[l], bv))
            best = l, bv = &h->a[l];
        if (r < h->n && above(&h->a[r], bv))
            best = r;
        if (best == i)
            break;
        h->a[i] = h->a[best];
        i = best;
    }
    if (h->n)
        h->a[i] = last;
    return top;
}

/* Push the merge of symbols l and r: with a merge table when the pair is listed (score -rank, so
 * the lowest rank pops first), else when their concatenation is a token (its score). */
static int try_pair(const kv_tokenizer_t *t, heap_t *h, const int *ids, int l, int r, char *scratch)
{
    int a = ids[l], b = ids[r];
    if (t->merge_keys) {
        uint64_t key = (uint64_t)a << 32 | (uint32_t)b;
        int lo = 0, hi = t->n_merges - 1;
        while (lo <= hi) {
            int mid = lo + (hi - lo) / 2;
            if (t->merge_keys[mid] == key) {
                cand_t c = {-(float)t->merge_rank[mid], l, r, a, b, t->merge_id[mid]};
                return heap_push(h, c);
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
    memcpy(scratch, t->pieces[a], (size_t)la);
    memcpy(scratch + la, t->pieces[b], (size_t)lb);
    int m = kv_tokenizer_lookup(t, scratch, (size_t)(la + lb));
    if (m < 0)
        return KV_OK;
    cand_t c = {t->scores[m], l, r, a, b, m};
    return heap_push(h, c);
}

/* Length of the UTF-8 "code point" starting at s[0]: a lead byte plus up to 3 continuation bytes. */
static size_t cp_len(const unsigned char *s, size_t avail)
{
    size_t n = 1;
    while (n < avail && n < 4 && (s[n] & 0xC0) == 0x80)
        n++;
    return n;
}

int kv_tokenizer_encode(const kv_tokenizer_t *t, const char *text, size_t len, int bos, int eos, int32_t **out,
                        int *n_out)
{
    *out = NULL;
    *n_out = 0;
    int rc = KV_OK;
    heap_t h = {0};
    /* at most: BOS, dummy prefix, one id per byte, EOS */
    if (len > (size_t)INT32_MAX - 8)
        return kv_error(KV_ERANGE, "text of %zu bytes is too long to encode", len);
    size_t cap = len + 3;
    int *ids = kv_malloc(cap * sizeof(int), "token ids");
    int *next = kv_malloc(cap * sizeof(int), "token list");
    int *prev = kv_malloc(cap * sizeof(int), "token list");
    char *scratch = kv_malloc((size_t)t->max_token_length * 2 + 8, "tokenizer scratch");
    int32_t *res = NULL;
    if (!ids || !next || !prev || !scratch) {
        rc = KV_ENOMEM;
        goto done;
    }
    int n = 0;
    if (len > 0) {
        int sp = kv_tokenizer_lookup(t, " ", 1);
        if (sp >= 0)
            ids[n++] = sp;
        else if (t->byte_fallback)
            ids[n++] = ' ' + 3;
        else
            ids[n++] = 0;
    }
    const unsigned char *s = (const unsigned char *)text;
    for (size_t i = 0; i < len;) {
        size_t cl = cp_len(s + i, len - i);
        int id = kv_tokenizer_lookup(t, text + i, cl);
        if (id >= 0) {
            ids[n++] = id;
        } else {
            for (size_t k = 0; k < cl; k++)
                ids[n++] = t->byte_fallback ? (int)s[i + k] + 3 : 0;
        }
        i += cl;
    }
    for (int i = 0; i < n; i++) {
        prev[i] = i - 1;
        next[i] = i + 1 < n ? i + 1 : -1;
    }
    for (int i = 0; i + 1 < n; i++)
        if ((rc = try_pair(t, &h, ids, i, i + 1, scratch)))
            goto done;
    int alive = n;
    while (h.n) {
        cand_t c = heap_pop(&h);
        if (ids[c.left] != c.id_l || ids[c.right] != c.id_r || next[c.left] != c.right || ids[c.right] < 0)
            continue; /* stale: one side merged since */
        ids[c.left] = c.merged;
        ids[c.right] = -1;
        int r2 = next[c.right];
        next[c.left] = r2;
        if (r2 >= 0)
            prev[r2] = c.left;
        alive--;
        if (prev[c.left] >= 0 && (rc = try_pair(t, &h, ids, prev[c.left], c.left, scratch)))
            goto done;
        if (r2 >= 0 && (rc = try_pair(t, &h, ids, c.left, r2, scratch)))
            goto done;
    }
    res = kv_malloc(sizeof(int32_t) * (size_t)(alive + 2), "token ids");
    if (!res) {
        rc = KV_ENOMEM;
        goto done;
    }
    int m = 0;
    if (bos)
        res[m++] = 1;
    for (int i = n ? 0 : -1; i >= 0; i = next[i])
        res[m++] = ids[i];
    if (eos)
        res[m++] = 2;
    *out = res;
    *n_out = m;
done:
    kv_free(h.a);
    kv_free(ids);
    kv_free(next);
    kv_free(prev);
    kv_free(scratch);
    return rc;
}

/* ---- decoding ---- */

const char *kv_tokenizer_decode(const kv_tokenizer_t *t, int prev, int id, size_t *len)
{
    static const char bytes[256] = {
#define B4(x) (char)(x), (char)(x + 1), (char)(x + 2), (char)(x + 3)
#define B16(x) B4(x), B4(x + 4), B4(x + 8), B4(x + 12)
        B16(0),   B16(16),  B16(32),  B16(48),  B16(64),  B16(80),  B16(96),  B16(112),
        B16(128), B16(144), B16(160), B16(176), B16(192), B16(208), B16(224), B16(240),
#undef B16
#undef B4
    };
    *len = 0;
    if (id < 0 || id >= t->vocab_size)
        return "";
    const char *p = t->pieces[id];
    size_t n = (size_t)t->lens[id];
    if (prev == 1 && n > 0 && p[0] == ' ') {
        p++;
        n--;
    }
    int b;
    if (is_byte_piece(p, (int)n, &b)) {
        *len = 1;
        return &bytes[b];
    }
    *len = n;
    return p;
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
    size_t m = 0;
    for (int i = 0; i < n; i++) {
        if (ids[i] == 1 || ids[i] == 2)
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
