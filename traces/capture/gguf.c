/*
 * gguf.c: llama.cpp's GGUF files, versions 2 and 3 (kv_gguf.h): the header, the metadata, the tensor
 * directory, and the dequantisation of ggml's block formats to fp32.
 *
 * Format (ggml's docs/gguf.md and gguf.cpp): little-endian; "GGUF", uint32 version, uint64 tensor
 * count, uint64 metadata count (version 1 had uint32 counts: refused by name); metadata entries
 * (string key, uint32 value type, value; an array is uint32 element type, uint64 count, elements;
 * a string is uint64 length and bytes); tensor infos (string name, uint32 n_dims <= 4, uint64
 * ne[n_dims], uint32 ggml type, uint64 offset); padding to general.alignment (default 32, a power of
 * two); the data section, each tensor at its offset (a multiple of the alignment) from its start.
 * A big-endian GGUF shows up as a byte-swapped version number and is refused by name.
 *
 * Validation. The file is mapped read-only (kv_map_file) and parsed once at open with a cursor
 * that checks every read against the mapping. Counts are bounded twice: by an absolute limit
 * (2^24 keys or tensors) and by the bytes left (each entry takes at least 13 bytes, each tensor
 * info at least 32, each string 8), so a hostile header cannot make the reader allocate more than a
 * small multiple of the file's own size. Keys must be unique, tensor names unique (and neither may
 * hold a NUL byte); nested arrays are refused (ggml refuses them too). A tensor's size comes from
 * its type's block (ne[0] must be a whole number of blocks), with every product overflow-checked;
 * tensors must lie inside the data section, at aligned offsets, and must not overlap. Types that
 * ggml defines but kvsim does not dequantise (Q2_K, IQ2_XXS, ...) are listed with their size and
 * only refused when dequantised; numbers ggml never defined, or whose layout it removed
 * (Q4_0_4_4, ...), are refused at open, by name where there is one. ggml itself is stricter in one
 * place kvsim does not follow: its reader requires tensors back to back in directory order.
 *
 * Metadata is kept as offsets into the mapping (no value is copied); the keys and tensor names are
 * copied once, NUL-terminated, into one arena. Each array of strings gets an index of its elements'
 * offsets at open, so kv_gguf_arr_str is O(1) (tokenizer vocabularies are 50k-250k strings).
 *
 * Dequantisation (kv_gguf_dequant) is kernels/kv_weight.h's, shared with the forward pass's on-the-fly
 * conversion of weights kept in their stored type: ggml-quants.c's dequantize_row_* block by block,
 * bit-identical to ggml's reference code and to the gguf Python package (the block layouts are listed
 * in kernels/cpu/weights.c). kv_gguf_dequant splits a large tensor into chunks of blocks under OpenMP;
 * each output element depends on its own block alone, so the result does not depend on the thread
 * count.
 */
#include "traces/capture/kv_gguf.h"

#include "kernels/kv_weight.h"
#include "sim/common/kv_common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "gguf.c reads fp32 and fp16 tensor data in place: it needs a little-endian host"
#endif

#define MAX_COUNT (1u << 24)     /* keys, tensors */
#define MAX_KEY_LEN 65535u       /* bytes of a metadata key */
#define MAX_NAME_LEN 1024u       /* bytes of a tensor name (ggml's own limit is 63) */
#define MAX_ALIGNMENT (1u << 30) /* general.alignment */
#define DEFAULT_ALIGNMENT 32u
#define HEADER_BYTES 24u
#define MIN_KV_BYTES 13u     /* key length (8) + value type (4) + the smallest value (1) */
#define MIN_TENSOR_BYTES 32u /* name length (8) + n_dims (4) + one ne (8) + type (4) + offset (8) */

/* ---------------------------------------------------------------- types */

typedef struct {
    const char *name; /* NULL: no type of this number */
    int block, bytes; /* 0: no layout (removed from ggml) */
} type_info_t;

/* ggml.h's enum ggml_type, with ggml-common.h's block sizes (the gguf Python package's
 * GGML_QUANT_SIZES agrees). Gaps are numbers ggml retired. */
static const type_info_t types[] = {
    [0] = {"F32", 1, 4},         [1] = {"F16", 1, 2},         [2] = {"Q4_0", 32, 18},      [3] = {"Q4_1", 32, 20},
    [4] = {"Q4_2", 0, 0}, /* removed in 2023 */
    [5] = {"Q4_3", 0, 0}, /* removed in 2023 */
    [6] = {"Q5_0", 32, 22},      [7] = {"Q5_1", 32, 24},      [8] = {"Q8_0", 32, 34},      [9] = {"Q8_1", 32, 40},
    [10] = {"Q2_K", 256, 84},    [11] = {"Q3_K", 256, 110},   [12] = {"Q4_K", 256, 144},   [13] = {"Q5_K", 256, 176},
    [14] = {"Q6_K", 256, 210},   [15] = {"Q8_K", 256, 292},   [16] = {"IQ2_XXS", 256, 66}, [17] = {"IQ2_XS", 256, 74},
    [18] = {"IQ3_XXS", 256, 98}, [19] = {"IQ1_S", 256, 50},   [20] = {"IQ4_NL", 32, 18},   [21] = {"IQ3_S", 256, 110},
    [22] = {"IQ2_S", 256, 82},   [23] = {"IQ4_XS", 256, 136}, [24] = {"I8", 1, 1},         [25] = {"I16", 1, 2},
    [26] = {"I32", 1, 4},        [27] = {"I64", 1, 8},        [28] = {"F64", 1, 8},        [29] = {"IQ1_M", 256, 56},
    [30] = {"BF16", 1, 2},       [31] = {"Q4_0_4_4", 0, 0}, /* 31-33, 36-38: repacked layouts, removed
                                                                               from GGUF files */
    [32] = {"Q4_0_4_8", 0, 0},   [33] = {"Q4_0_8_8", 0, 0},   [34] = {"TQ1_0", 256, 54},   [35] = {"TQ2_0", 256, 66},
    [36] = {"IQ4_NL_4_4", 0, 0}, [37] = {"IQ4_NL_4_8", 0, 0}, [38] = {"IQ4_NL_8_8", 0, 0}, [39] = {"MXFP4", 32, 17},
    [40] = {"NVFP4", 64, 36},    [41] = {"Q1_0", 128, 18},    [42] = {"Q2_0", 0, 0}, /* newest ggml: layout not known
                                                                                        here */
};

static const type_info_t *type_info(int type)
{
    if (type < 0 || (size_t)type >= KV_ARRAY_LEN(types) || !types[type].name)
        return NULL;
    return &types[type];
}

const char *kv_gguf_type_name(int type)
{
    const type_info_t *t = type_info(type);
    return t ? t->name : NULL;
}

int kv_gguf_type_supported(int type)
{
    return type_info(type) && kv_weight_type_name(type) != NULL; /* kernels/kv_weight.h converts it */
}

int kv_gguf_type_block(int type, int *block_elems, int *block_bytes)
{
    const type_info_t *t = type_info(type);
    *block_elems = t ? t->block : 0;
    *block_bytes = t ? t->bytes : 0;
    if (!t)
        return kv_error(KV_EUNAVAIL, "ggml type %d is not defined", type);
    if (!t->block)
        return kv_error(KV_EUNAVAIL, "ggml type %s has no block layout known to kvsim (removed from ggml)", t->name);
    return KV_OK;
}

/* "Q4_K" or "type 77" into buf. */
static const char *type_text(int type, char *buf, size_t len)
{
    const char *n = kv_gguf_type_name(type);
    if (n)
        snprintf(buf, len, "%s", n);
    else
        snprintf(buf, len, "type %d", type);
    return buf;
}

/* ---------------------------------------------------------------- metadata value types */

static const char *const vt_names[] = {"uint8", "int8",   "uint16", "int16",  "uint32", "int32",  "float32",
                                       "bool",  "string", "array",  "uint64", "int64",  "float64"};
static const unsigned vt_size[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8}; /* 0: variable */

static int vt_is_int(int t)
{
    return t == KV_GGUF_UINT8 || t == KV_GGUF_INT8 || t == KV_GGUF_UINT16 || t == KV_GGUF_INT16 ||
           t == KV_GGUF_UINT32 || t == KV_GGUF_INT32 || t == KV_GGUF_UINT64 || t == KV_GGUF_INT64;
}

static uint64_t le(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/* ---------------------------------------------------------------- the handle */

typedef struct {
    const char *key;  /* NUL-terminated, in the arena */
    uint64_t key_off; /* arena offset while parsing */
    int type;         /* KV_GGUF_* */
    int elem_type;    /* arrays: element type */
    uint64_t n;       /* arrays: element count */
    uint64_t val;     /* file offset of the value (arrays: of the first element) */
    uint64_t str0;    /* arrays of strings: index of element 0 in str_off */
} entry_t;

struct kv_gguf {
    char *path;
    int version;
    const unsigned char *map;
    size_t size;
    int map_given; /* kv_gguf_give_mapping: the caller unmaps it */
    uint64_t alignment, data_off;
    int n_kv, n_tensors;
    entry_t *kv;
    int *kv_order; /* indices sorted by key */
    kv_gguf_tensor_t *t;
    uint64_t *t_name_off; /* arena offsets while parsing */
    int *t_order;         /* indices sorted by name */
    char *arena;          /* keys and tensor names, NUL-terminated */
    size_t arena_len, arena_cap;
    uint64_t *str_off; /* file offsets of the strings (their length field) of every string array */
    size_t n_str, str_cap;
};

/* A bounds-checked cursor over the mapping. */
typedef struct {
    const unsigned char *b;
    uint64_t size, pos;
    const char *path;
} cur_t;

static int truncated(const cur_t *c, uint64_t need, const char *what)
{
    return kv_error(KV_EFORMAT, "%s: truncated GGUF file: %s at byte %llu needs %llu bytes, the file has %llu left",
                    c->path, what, (unsigned long long)c->pos, (unsigned long long)need,
                    (unsigned long long)(c->size - c->pos));
}

static int take(cur_t *c, uint64_t n, uint64_t *at, const char *what)
{
    if (n > c->size - c->pos)
        return truncated(c, n, what);
    *at = c->pos;
    c->pos += n;
    return KV_OK;
}

static int rd_u32(cur_t *c, uint32_t *v, const char *what)
{
    uint64_t at = 0;
    int rc = take(c, 4, &at, what);
    if (rc == KV_OK)
        *v = (uint32_t)le(c->b + at, 4);
    return rc;
}

static int rd_u64(cur_t *c, uint64_t *v, const char *what)
{
    uint64_t at = 0;
    int rc = take(c, 8, &at, what);
    if (rc == KV_OK)
        *v = le(c->b + at, 8);
    return rc;
}

/* A string: *off = file offset of its bytes, *len their count. */
static int rd_str(cur_t *c, uint64_t *off, uint64_t *len, const char *what)
{
    int rc;
    if ((rc = rd_u64(c, len, what)))
        return rc;
    if (*len > c->size - c->pos)
        return kv_error(KV_EFORMAT,
                        "%s: %s: string length %llu at byte %llu runs past the end of the file (%llu bytes left)",
                        c->path, what, (unsigned long long)*len, (unsigned long long)(c->pos - 8),
                        (unsigned long long)(c->size - c->pos));
    *off = c->pos;
    c->pos += *len;
    return KV_OK;
}

/* Copy n bytes at file offset off into the arena, NUL-terminated; *at = arena offset. */
static int arena_add(kv_gguf_t *g, uint64_t off, uint64_t n, uint64_t *at)
{
    if (g->arena_len + n + 1 > g->arena_cap) {
        size_t cap = g->arena_cap ? g->arena_cap : 4096;
        while (cap < g->arena_len + n + 1)
            cap *= 2;
        char *a = kv_realloc(g->arena, cap, "GGUF names");
        if (!a)
            return kv_error_context(KV_ENOMEM, "%s", g->path);
        g->arena = a, g->arena_cap = cap;
    }
    memcpy(g->arena + g->arena_len, g->map + off, (size_t)n);
    g->arena[g->arena_len + n] = 0;
    *at = g->arena_len;
    g->arena_len += n + 1;
    return KV_OK;
}

static int str_index_add(kv_gguf_t *g, uint64_t off)
{
    if (g->n_str == g->str_cap) {
        size_t cap = g->str_cap ? 2 * g->str_cap : 1024;
        uint64_t *s = kv_realloc(g->str_off, cap * sizeof *s, "GGUF string index");
        if (!s)
            return kv_error_context(KV_ENOMEM, "%s", g->path);
        g->str_off = s, g->str_cap = cap;
    }
    g->str_off[g->n_str++] = off;
    return KV_OK;
}

/* Entry i's value: its type, and for arrays the element type, count and (strings) index. */
static int parse_value(kv_gguf_t *g, cur_t *c, entry_t *e)
{
    int rc;
    uint32_t type;
    char what[160];
    snprintf(what, sizeof what, "value type of key %.80s", g->arena + e->key_off);
    if ((rc = rd_u32(c, &type, what)))
        return rc;
    if (type > KV_GGUF_FLOAT64)
        return kv_error(KV_EFORMAT, "%s: key %s has unknown value type %u (GGUF defines 0..12)", g->path,
                        g->arena + e->key_off, type);
    e->type = (int)type;
    snprintf(what, sizeof what, "value of key %.80s", g->arena + e->key_off);
    if (type == KV_GGUF_STRING) {
        uint64_t off, len;
        e->val = c->pos;
        return rd_str(c, &off, &len, what);
    }
    if (type != KV_GGUF_ARRAY) {
        uint64_t at = 0;
        if ((rc = take(c, vt_size[type], &at, what)))
            return rc;
        e->val = at;
        return KV_OK;
    }
    uint32_t et;
    if ((rc = rd_u32(c, &et, what)) || (rc = rd_u64(c, &e->n, what)))
        return rc;
    if (et > KV_GGUF_FLOAT64)
        return kv_error(KV_EFORMAT, "%s: key %s is an array of unknown value type %u", g->path, g->arena + e->key_off,
                        et);
    if (et == KV_GGUF_ARRAY)
        return kv_error(KV_EFORMAT, "%s: key %s is an array of arrays (nested arrays are not supported)", g->path,
                        g->arena + e->key_off);
    e->elem_type = (int)et;
    e->val = c->pos;
    const uint64_t left = c->size - c->pos;
    const uint64_t min_elem = et == KV_GGUF_STRING ? 8 : vt_size[et];
    if (e->n > left / min_elem)
        return kv_error(
            KV_EFORMAT, "%s: key %s: array of %llu %s elements needs at least %llu bytes, the file has %llu left",
            g->path, g->arena + e->key_off, (unsigned long long)e->n, vt_names[et],
            e->n > UINT64_MAX / min_elem ? (unsigned long long)UINT64_MAX : (unsigned long long)(e->n * min_elem),
            (unsigned long long)left);
    if (et != KV_GGUF_STRING) {
        c->pos += e->n * min_elem;
        return KV_OK;
    }
    e->str0 = g->n_str;
    for (uint64_t i = 0; i < e->n; i++) {
        uint64_t off, len;
        const uint64_t at = c->pos;
        if ((rc = rd_str(c, &off, &len, what)) || (rc = str_index_add(g, at)))
            return rc;
    }
    return KV_OK;
}

static int has_nul(const unsigned char *p, uint64_t n)
{
    return memchr(p, 0, (size_t)n) != NULL;
}

/* qsort contexts (qsort has no user pointer; open is not reentrant on one handle only). */
static _Thread_local const kv_gguf_t *sort_g;

static int cmp_key(const void *a, const void *b)
{
    return strcmp(sort_g->kv[*(const int *)a].key, sort_g->kv[*(const int *)b].key);
}

static int cmp_name(const void *a, const void *b)
{
    return strcmp(sort_g->t[*(const int *)a].name, sort_g->t[*(const int *)b].name);
}

static int cmp_offset(const void *a, const void *b)
{
    const kv_gguf_tensor_t *x = &sort_g->t[*(const int *)a], *y = &sort_g->t[*(const int *)b];
    return (x->data > y->data) - (x->data < y->data);
}

static int parse_tensor_info(kv_gguf_t *g, cur_t *c, int i, uint64_t *offset)
{
    int rc;
    char what[160];
    kv_gguf_tensor_t *t = &g->t[i];
    snprintf(what, sizeof what, "name of tensor %d", i);
    uint64_t off, len;
    if ((rc = rd_str(c, &off, &len, what)))
        return rc;
    if (len == 0 || len > MAX_NAME_LEN || has_nul(g->map + off, len))
        return kv_error(KV_EFORMAT, "%s: tensor %d has a name of %llu bytes%s (1..%u bytes without NUL are accepted)",
                        g->path, i, (unsigned long long)len, len && len <= MAX_NAME_LEN ? " holding a NUL byte" : "",
                        MAX_NAME_LEN);
    if ((rc = arena_add(g, off, len, &g->t_name_off[i])))
        return rc;
    const char *name = g->arena + g->t_name_off[i];
    snprintf(what, sizeof what, "shape of tensor %.100s", name);
    uint32_t nd, type;
    if ((rc = rd_u32(c, &nd, what)))
        return rc;
    if (nd < 1 || nd > 4)
        return kv_error(KV_EFORMAT, "%s: tensor %s has %u dimensions (1 to 4 are possible)", g->path, name, nd);
    t->n_dims = (int)nd;
    uint64_t n = 1;
    int ok = 1;
    for (int d = 0; d < 4; d++) {
        t->ne[d] = 1;
        if (d < (int)nd && (rc = rd_u64(c, &t->ne[d], what)))
            return rc;
        if (t->ne[d] > (uint64_t)INT64_MAX)
            return kv_error(KV_EFORMAT, "%s: tensor %s: ne[%d] = %llu is beyond int64", g->path, name, d,
                            (unsigned long long)t->ne[d]);
        ok &= !__builtin_mul_overflow(n, t->ne[d], &n);
    }
    if (!ok || n > (uint64_t)INT64_MAX)
        return kv_error(KV_EFORMAT, "%s: tensor %s: the element count [%llu, %llu, %llu, %llu] overflows int64",
                        g->path, name, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
                        (unsigned long long)t->ne[2], (unsigned long long)t->ne[3]);
    t->n_elements = n;
    snprintf(what, sizeof what, "type of tensor %.100s", name);
    if ((rc = rd_u32(c, &type, what)))
        return rc;
    const type_info_t *ti = type_info(type > 1000u ? -1 : (int)type);
    if (!ti)
        return kv_error(KV_EFORMAT, "%s: tensor %s has ggml type %u, which ggml does not define", g->path, name, type);
    if (!ti->block)
        return kv_error(KV_EFORMAT,
                        "%s: tensor %s has ggml type %s, whose layout ggml no longer defines (re-quantise the "
                        "model with a current llama.cpp)",
                        g->path, name, ti->name);
    t->type = (int)type;
    if (t->ne[0] % (uint64_t)ti->block)
        return kv_error(KV_EFORMAT, "%s: tensor %s: ne[0] = %llu is not a multiple of the %s block of %d values",
                        g->path, name, (unsigned long long)t->ne[0], ti->name, ti->block);
    if (__builtin_mul_overflow(n / (uint64_t)ti->block, (uint64_t)ti->bytes, &t->n_bytes))
        return kv_error(KV_EFORMAT, "%s: tensor %s: the byte count overflows 64 bits", g->path, name);
    snprintf(what, sizeof what, "offset of tensor %.100s", name);
    return rd_u64(c, offset, what);
}

/* The alignment: general.alignment when present (an unsigned integer, a power of two). */
static int read_alignment(kv_gguf_t *g)
{
    g->alignment = DEFAULT_ALIGNMENT;
    int i = kv_gguf_find(g, "general.alignment");
    if (i < 0)
        return KV_OK;
    const entry_t *e = &g->kv[i];
    if (e->type != KV_GGUF_UINT32 && e->type != KV_GGUF_UINT64 && e->type != KV_GGUF_UINT16 && e->type != KV_GGUF_UINT8)
        return kv_error(KV_EFORMAT, "%s: general.alignment is of type %s (an unsigned integer is needed)", g->path,
                        vt_names[e->type]);
    const uint64_t a = le(g->map + e->val, (int)vt_size[e->type]);
    if (a == 0 || (a & (a - 1)) || a > MAX_ALIGNMENT)
        return kv_error(KV_EFORMAT, "%s: general.alignment is %llu (a power of two up to 2^30 is needed)", g->path,
                        (unsigned long long)a);
    g->alignment = a;
    return KV_OK;
}

/* Offsets, alignment, uniqueness and overlap of the tensor directory. */
static int check_tensors(kv_gguf_t *g, const uint64_t *offsets)
{
    const uint64_t data_len = g->size - g->data_off;
    for (int i = 0; i < g->n_tensors; i++) {
        kv_gguf_tensor_t *t = &g->t[i];
        if (offsets[i] % g->alignment)
            return kv_error(KV_EFORMAT, "%s: tensor %s: offset %llu is not a multiple of the alignment %llu", g->path,
                            t->name, (unsigned long long)offsets[i], (unsigned long long)g->alignment);
        if (offsets[i] > data_len || t->n_bytes > data_len - offsets[i])
            return kv_error(KV_EFORMAT,
                            "%s: tensor %s: data at offset %llu, %llu bytes, runs past the end of the file (the data "
                            "section is %llu bytes; truncated?)",
                            g->path, t->name, (unsigned long long)offsets[i], (unsigned long long)t->n_bytes,
                            (unsigned long long)data_len);
        t->data = g->map + g->data_off + offsets[i];
    }
    sort_g = g;
    for (int i = 0; i < g->n_tensors; i++)
        g->t_order[i] = i;
    qsort(g->t_order, (size_t)g->n_tensors, sizeof *g->t_order, cmp_name);
    for (int i = 1; i < g->n_tensors; i++)
        if (!strcmp(g->t[g->t_order[i]].name, g->t[g->t_order[i - 1]].name))
            return kv_error(KV_EFORMAT, "%s: tensor name %s appears twice", g->path, g->t[g->t_order[i]].name);
    int *by_off = kv_malloc((size_t)(g->n_tensors ? g->n_tensors : 1) * sizeof *by_off, "GGUF tensor order");
    if (!by_off)
        return kv_error_context(KV_ENOMEM, "%s", g->path);
    int k = 0;
    for (int i = 0; i < g->n_tensors; i++)
        if (g->t[i].n_bytes)
            by_off[k++] = i;
    qsort(by_off, (size_t)k, sizeof *by_off, cmp_offset);
    int rc = KV_OK;
    for (int i = 1; i < k && rc == KV_OK; i++) {
        const kv_gguf_tensor_t *a = &g->t[by_off[i - 1]], *b = &g->t[by_off[i]];
        if (b->data < a->data + a->n_bytes)
            rc = kv_error(KV_EFORMAT, "%s: tensors %s (offset %llu, %llu bytes) and %s (offset %llu) overlap", g->path,
                          a->name, (unsigned long long)(a->data - g->map - g->data_off), (unsigned long long)a->n_bytes,
                          b->name, (unsigned long long)(b->data - g->map - g->data_off));
    }
    kv_free(by_off);
    return rc;
}

static int parse(kv_gguf_t *g)
{
    int rc;
    cur_t c = {g->map, g->size, 0, g->path};
    uint64_t n_tensors, n_kv;
    uint64_t *offsets = NULL;
    if (memcmp(g->map, "GGUF", 4))
        return kv_error(KV_EFORMAT, "%s: not a GGUF file (the first 4 bytes are not \"GGUF\")", g->path);
    c.pos = 4;
    uint32_t version;
    rd_u32(&c, &version, "version"); /* 24 bytes are there: kv_map_file checked */
    if (version == 1)
        return kv_error(KV_EFORMAT,
                        "%s: GGUF version 1 is not supported (kvsim reads versions 2 and 3; convert the model again "
                        "with a current llama.cpp)",
                        g->path);
    if ((version & 0xffffu) == 0 && __builtin_bswap32(version) >= 1 && __builtin_bswap32(version) <= 3)
        return kv_error(KV_EFORMAT,
                        "%s: big-endian GGUF file (version %u byte-swapped): kvsim reads little-endian only", g->path,
                        __builtin_bswap32(version));
    if (version != 2 && version != 3)
        return kv_error(KV_EFORMAT, "%s: GGUF version %u is not supported (kvsim reads versions 2 and 3)", g->path,
                        version);
    g->version = (int)version;
    rd_u64(&c, &n_tensors, "tensor count");
    rd_u64(&c, &n_kv, "metadata count");
    if (n_tensors > MAX_COUNT || n_kv > MAX_COUNT)
        return kv_error(KV_EFORMAT, "%s: absurd header: %llu tensors and %llu metadata entries (at most %u each)",
                        g->path, (unsigned long long)n_tensors, (unsigned long long)n_kv, MAX_COUNT);
    if (n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_BYTES > g->size - HEADER_BYTES)
        return kv_error(KV_EFORMAT,
                        "%s: header promises %llu metadata entries and %llu tensors, more than the file's %llu bytes "
                        "can hold (truncated or corrupt?)",
                        g->path, (unsigned long long)n_kv, (unsigned long long)n_tensors, (unsigned long long)g->size);
    g->kv = kv_calloc((size_t)n_kv + 1, sizeof *g->kv, "GGUF metadata");
    g->kv_order = kv_calloc((size_t)n_kv + 1, sizeof *g->kv_order, "GGUF metadata order");
    g->t = kv_calloc((size_t)n_tensors + 1, sizeof *g->t, "GGUF tensors");
    g->t_name_off = kv_calloc((size_t)n_tensors + 1, sizeof *g->t_name_off, "GGUF tensor names");
    g->t_order = kv_calloc((size_t)n_tensors + 1, sizeof *g->t_order, "GGUF tensor order");
    offsets = kv_calloc((size_t)n_tensors + 1, sizeof *offsets, "GGUF tensor offsets");
    if (!g->kv || !g->kv_order || !g->t || !g->t_name_off || !g->t_order || !offsets) {
        rc = kv_error_context(KV_ENOMEM, "%s", g->path);
        goto done;
    }
    /* metadata */
    for (uint64_t i = 0; i < n_kv; i++) {
        entry_t *e = &g->kv[i];
        char what[64];
        uint64_t off, len;
        snprintf(what, sizeof what, "key of metadata entry %llu", (unsigned long long)i);
        if ((rc = rd_str(&c, &off, &len, what)))
            goto done;
        if (len == 0 || len > MAX_KEY_LEN || has_nul(g->map + off, len)) {
            rc = kv_error(KV_EFORMAT, "%s: metadata entry %llu has a key of %llu bytes%s (1..%u bytes without NUL)",
                          g->path, (unsigned long long)i, (unsigned long long)len,
                          len && len <= MAX_KEY_LEN ? " holding a NUL byte" : "", MAX_KEY_LEN);
            goto done;
        }
        if ((rc = arena_add(g, off, len, &e->key_off)) || (rc = parse_value(g, &c, e)))
            goto done;
        g->n_kv = (int)i + 1;
    }
    /* tensor infos */
    for (uint64_t i = 0; i < n_tensors; i++) {
        if ((rc = parse_tensor_info(g, &c, (int)i, &offsets[i])))
            goto done;
        g->n_tensors = (int)i + 1;
    }
    /* the arena is final: point the keys and names into it, then sort */
    for (int i = 0; i < g->n_kv; i++)
        g->kv[i].key = g->arena + g->kv[i].key_off;
    for (int i = 0; i < g->n_tensors; i++)
        g->t[i].name = g->arena + g->t_name_off[i];
    sort_g = g;
    for (int i = 0; i < g->n_kv; i++)
        g->kv_order[i] = i;
    qsort(g->kv_order, (size_t)g->n_kv, sizeof *g->kv_order, cmp_key);
    for (int i = 1; i < g->n_kv; i++)
        if (!strcmp(g->kv[g->kv_order[i]].key, g->kv[g->kv_order[i - 1]].key)) {
            rc = kv_error(KV_EFORMAT, "%s: metadata key %s appears twice", g->path, g->kv[g->kv_order[i]].key);
            goto done;
        }
    if ((rc = read_alignment(g)))
        goto done;
    g->data_off = (c.pos + g->alignment - 1) / g->alignment * g->alignment;
    if (g->n_tensors > 0 && g->data_off > g->size) {
        rc = kv_error(KV_EFORMAT,
                      "%s: truncated GGUF file: the data section would start at byte %llu, the file has %llu bytes",
                      g->path, (unsigned long long)g->data_off, (unsigned long long)g->size);
        goto done;
    }
    rc = check_tensors(g, offsets);
done:
    kv_free(offsets);
    return rc;
}

int kv_gguf_open(const char *path, kv_gguf_t **out)
{
    *out = NULL;
    kv_gguf_t *g = kv_calloc(1, sizeof *g, "GGUF reader");
    if (!g)
        return KV_ENOMEM;
    int rc;
    void *map = NULL;
    size_t len = 0;
    if (!(g->path = kv_strdup(path))) {
        rc = KV_ENOMEM;
        goto fail;
    }
    if ((rc = kv_map_file(path, "GGUF file", HEADER_BYTES, "24-byte GGUF header", &map, &len)))
        goto fail;
    g->map = map, g->size = len;
    if ((rc = parse(g)))
        goto fail;
    *out = g;
    return KV_OK;
fail:
    kv_gguf_close(g);
    return rc;
}

void kv_gguf_close(kv_gguf_t *g)
{
    if (!g)
        return;
    if (g->map && !g->map_given)
        munmap((void *)g->map, g->size);
    kv_free(g->kv);
    kv_free(g->kv_order);
    kv_free(g->t);
    kv_free(g->t_name_off);
    kv_free(g->t_order);
    kv_free(g->arena);
    kv_free(g->str_off);
    kv_free(g->path);
    kv_free(g);
}

void kv_gguf_give_mapping(kv_gguf_t *g, void **map, size_t *len)
{
    *map = (void *)g->map;
    *len = g->size;
    g->map_given = 1;
}

const char *kv_gguf_path(const kv_gguf_t *g)
{
    return g->path;
}

int kv_gguf_version(const kv_gguf_t *g)
{
    return g->version;
}

const unsigned char *kv_gguf_mapping(const kv_gguf_t *g, size_t *len)
{
    *len = g->size;
    return g->map;
}

/* ---------------------------------------------------------------- metadata getters */

int kv_gguf_n_kv(const kv_gguf_t *g)
{
    return g->n_kv;
}

const char *kv_gguf_key(const kv_gguf_t *g, int i)
{
    return i >= 0 && i < g->n_kv ? g->kv[i].key : NULL;
}

int kv_gguf_kv_type(const kv_gguf_t *g, int i)
{
    return i >= 0 && i < g->n_kv ? g->kv[i].type : -1;
}

int kv_gguf_find(const kv_gguf_t *g, const char *key)
{
    int lo = 0, hi = g->n_kv - 1;
    while (lo <= hi) {
        const int mid = lo + (hi - lo) / 2, i = g->kv_order[mid];
        const int c = strcmp(g->kv[i].key, key);
        if (c == 0)
            return i;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return -1;
}

/* "array of string" or "uint32" into buf. */
static const char *entry_type_text(const entry_t *e, char *buf, size_t len)
{
    if (e->type == KV_GGUF_ARRAY)
        snprintf(buf, len, "array of %s", vt_names[e->elem_type]);
    else
        snprintf(buf, len, "%s", vt_names[e->type]);
    return buf;
}

static int wrong_type(const kv_gguf_t *g, const entry_t *e, const char *wanted)
{
    char t[32];
    return kv_error(KV_EFORMAT, "%s: metadata %s is %s, %s was expected", g->path, e->key,
                    entry_type_text(e, t, sizeof t), wanted);
}

/* The entry of `key` (NULL with KV_EUNAVAIL when absent). */
static const entry_t *lookup(const kv_gguf_t *g, const char *key)
{
    const int i = kv_gguf_find(g, key);
    return i < 0 ? NULL : &g->kv[i];
}

/* A scalar of integer type t at p into int64 (0: out of range). */
static int int_at(const unsigned char *p, int t, int64_t *out)
{
    const uint64_t u = le(p, (int)vt_size[t]);
    switch (t) {
    case KV_GGUF_INT8: *out = (int8_t)u; return 1;
    case KV_GGUF_INT16: *out = (int16_t)u; return 1;
    case KV_GGUF_INT32: *out = (int32_t)u; return 1;
    case KV_GGUF_INT64: *out = (int64_t)u; return 1;
    default: /* unsigned */
        if (u > (uint64_t)INT64_MAX)
            return 0;
        *out = (int64_t)u;
        return 1;
    }
}

/* An integer of type t at p as a double (uint64 beyond int64 included). */
static double int_as_double(const unsigned char *p, int t)
{
    int64_t v;
    if (int_at(p, t, &v))
        return (double)v;
    return (double)le(p, 8); /* an unsigned value beyond int64 */
}

static double float_at(const unsigned char *p, int t)
{
    if (t == KV_GGUF_FLOAT32) {
        const uint32_t u = (uint32_t)le(p, 4);
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    const uint64_t u = le(p, 8);
    double d;
    memcpy(&d, &u, 8);
    return d;
}

int kv_gguf_get_int(const kv_gguf_t *g, const char *key, int64_t *out)
{
    const entry_t *e = lookup(g, key);
    if (!e)
        return KV_EUNAVAIL;
    if (!vt_is_int(e->type))
        return wrong_type(g, e, "an integer");
    if (!int_at(g->map + e->val, e->type, out))
        return kv_error(KV_ERANGE, "%s: metadata %s is %llu, beyond int64", g->path, key,
                        (unsigned long long)le(g->map + e->val, 8));
    return KV_OK;
}

int kv_gguf_get_float(const kv_gguf_t *g, const char *key, double *out)
{
    const entry_t *e = lookup(g, key);
    if (!e)
        return KV_EUNAVAIL;
    if (e->type == KV_GGUF_FLOAT32 || e->type == KV_GGUF_FLOAT64) {
        *out = float_at(g->map + e->val, e->type);
        return KV_OK;
    }
    if (vt_is_int(e->type)) {
        *out = int_as_double(g->map + e->val, e->type);
        return KV_OK;
    }
    return wrong_type(g, e, "a number");
}

int kv_gguf_get_bool(const kv_gguf_t *g, const char *key, int *out)
{
    const entry_t *e = lookup(g, key);
    if (!e)
        return KV_EUNAVAIL;
    if (e->type != KV_GGUF_BOOL)
        return wrong_type(g, e, "a bool");
    *out = g->map[e->val] != 0;
    return KV_OK;
}

int kv_gguf_get_str(const kv_gguf_t *g, const char *key, const char **s, size_t *len)
{
    const entry_t *e = lookup(g, key);
    if (!e)
        return KV_EUNAVAIL;
    if (e->type != KV_GGUF_STRING)
        return wrong_type(g, e, "a string");
    *len = (size_t)le(g->map + e->val, 8);
    *s = (const char *)g->map + e->val + 8;
    return KV_OK;
}

int kv_gguf_get_arr(const kv_gguf_t *g, const char *key, int *elem_type, uint64_t *n)
{
    const entry_t *e = lookup(g, key);
    if (!e)
        return KV_EUNAVAIL;
    if (e->type != KV_GGUF_ARRAY)
        return wrong_type(g, e, "an array");
    *elem_type = e->elem_type;
    *n = e->n;
    return KV_OK;
}

/* The array entry of key with element i in range (NULL: *rc says why). */
static const entry_t *arr_elem(const kv_gguf_t *g, const char *key, uint64_t i, int *rc)
{
    const entry_t *e = lookup(g, key);
    if (!e) {
        *rc = KV_EUNAVAIL;
        return NULL;
    }
    if (e->type != KV_GGUF_ARRAY) {
        *rc = wrong_type(g, e, "an array");
        return NULL;
    }
    if (i >= e->n) {
        *rc = kv_error(KV_ERANGE, "%s: metadata %s: element %llu of an array of %llu", g->path, key,
                       (unsigned long long)i, (unsigned long long)e->n);
        return NULL;
    }
    *rc = KV_OK;
    return e;
}

int kv_gguf_arr_str(const kv_gguf_t *g, const char *key, uint64_t i, const char **s, size_t *len)
{
    int rc;
    const entry_t *e = arr_elem(g, key, i, &rc);
    if (!e)
        return rc;
    if (e->elem_type != KV_GGUF_STRING)
        return wrong_type(g, e, "an array of strings");
    const uint64_t off = g->str_off[e->str0 + i];
    *len = (size_t)le(g->map + off, 8);
    *s = (const char *)g->map + off + 8;
    return KV_OK;
}

int kv_gguf_arr_int(const kv_gguf_t *g, const char *key, uint64_t i, int64_t *out)
{
    int rc;
    const entry_t *e = arr_elem(g, key, i, &rc);
    if (!e)
        return rc;
    if (!vt_is_int(e->elem_type))
        return wrong_type(g, e, "an array of integers");
    const unsigned char *p = g->map + e->val + i * vt_size[e->elem_type];
    if (!int_at(p, e->elem_type, out))
        return kv_error(KV_ERANGE, "%s: metadata %s: element %llu is beyond int64", g->path, key,
                        (unsigned long long)i);
    return KV_OK;
}

int kv_gguf_arr_float(const kv_gguf_t *g, const char *key, uint64_t i, double *out)
{
    int rc;
    const entry_t *e = arr_elem(g, key, i, &rc);
    if (!e)
        return rc;
    const unsigned char *p = g->map + e->val + i * vt_size[e->elem_type];
    if (e->elem_type == KV_GGUF_FLOAT32 || e->elem_type == KV_GGUF_FLOAT64) {
        *out = float_at(p, e->elem_type);
        return KV_OK;
    }
    if (!vt_is_int(e->elem_type))
        return wrong_type(g, e, "an array of numbers");
    *out = int_as_double(p, e->elem_type);
    return KV_OK;
}

/* ---------------------------------------------------------------- tensors */

int kv_gguf_n_tensors(const kv_gguf_t *g)
{
    return g->n_tensors;
}

const kv_gguf_tensor_t *kv_gguf_tensor(const kv_gguf_t *g, int i)
{
    return i >= 0 && i < g->n_tensors ? &g->t[i] : NULL;
}

const kv_gguf_tensor_t *kv_gguf_find_tensor(const kv_gguf_t *g, const char *name)
{
    int lo = 0, hi = g->n_tensors - 1;
    while (lo <= hi) {
        const int mid = lo + (hi - lo) / 2, i = g->t_order[mid];
        const int c = strcmp(g->t[i].name, name);
        if (c == 0)
            return &g->t[i];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return NULL;
}

/* ---------------------------------------------------------------- dequantisation */

#define DEQ_CHUNK 16384 /* values per parallel work item */

int kv_gguf_dequant(int type, const void *src, uint64_t n, float *dst)
{
    const type_info_t *ti = type_info(type);
    char tn[32];
    if (!kv_gguf_type_supported(type))
        return kv_error(KV_EFORMAT,
                        "cannot dequantise ggml type %s (kvsim dequantises F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, "
                        "Q8_0, Q4_K, Q5_K and Q6_K)",
                        type_text(type, tn, sizeof tn));
    if (n % (uint64_t)ti->block)
        return kv_error(KV_EINVAL, "dequantising %s: %llu values is not a whole number of blocks of %d", ti->name,
                        (unsigned long long)n, ti->block);
    const uint64_t nb = n / (uint64_t)ti->block, per = KV_MAX(1, DEQ_CHUNK / ti->block);
    const int64_t chunks = (int64_t)((nb + per - 1) / per);
    const unsigned char *s = src;
#pragma omp parallel for schedule(static) if (n > 4 * DEQ_CHUNK)
    for (int64_t c = 0; c < chunks; c++) {
        const uint64_t b0 = (uint64_t)c * per, cnt = KV_MIN(per, nb - b0);
        kv_weight_dequant(type, s + b0 * (uint64_t)ti->bytes, cnt * (uint64_t)ti->block,
                          dst + b0 * (uint64_t)ti->block);
    }
    return KV_OK;
}
