/*
 * test_robust_trace.c: valid HDF5 files that are not valid traces, and the cases the trace fuzzer
 * (tests/fuzz/fuzz_trace.c) found.
 *
 * Each case writes a small valid trace (2 layers, 4 heads over 2 KV heads, 16 tokens, 3 segments,
 * summaries, W_O) with the library's writer, then changes it with the HDF5 API: an attribute
 * replaced (another value, another type, an array where one value belongs, a string of absurd
 * length), a dataset replaced (another dtype, shape or length) or removed. Opening must fail with
 * a message that names the file and the problem; a few changes that keep the file valid (int32
 * attributes as h5py writes them, fixed-length strings, float64 Q) must still open and read.
 * Before the reader checked that an attribute holds one value, an array attribute was read into a
 * single variable (stack or heap overflow under AddressSanitizer).
 */
#include "sim/common/kv_common.h"
#include "tests/kv_test.h"
#include "traces/kv_trace.h"

#include <hdf5.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BL 2
#define BH 4
#define BKV 2
#define BD 8
#define BT 16
#define BP 12

/* The valid base trace; tokens 10..25, positions 0..15, segments 0, 4, 8. */
static void write_base(const char *path)
{
    kv_trace_t *t = kv_test_trace(BL, BH, BKV, BD, BT, BP, 3, 1, 5);
    ck_assert_ptr_nonnull(t);
    kv_trace_meta_t *m = kv_trace_mem_meta(t);
    m->has_summaries = 1;
    m->has_stats = 1; /* version 2: the statistics too */
    m->stats_split = 8;
    m->pool = 8;
    m->vocab_size = 64;
    m->tokens = kv_malloc(sizeof(int32_t) * BT, "tokens");
    m->positions = kv_malloc(sizeof(int32_t) * BT, "positions");
    for (int i = 0; i < BT; i++)
        m->tokens[i] = 10 + i, m->positions[i] = i;
    snprintf(m->prompt, sizeof m->prompt, "a prompt");
    ck_assert_msg(kv_test_write_trace(t, path) == KV_OK, "%s", kv_last_error());
    kv_trace_close(t);
}

typedef enum {
    M_ATTR_INT,  /* attribute `name` = ival as type `type`, npoints values */
    M_ATTR_F64,  /* attribute `name` = fval (float64) */
    M_ATTR_STR,  /* attribute `name` = sval or `len` 'x', fixed (type 0) or variable length, npoints */
    M_ATTR_DEL,  /* attribute removed */
    M_DSET,      /* dataset `name` replaced: dtype `type`, rank, dims, all values ival */
    M_DSET_VALS, /* 1-D int32 dataset `name` = vals[0..npoints) */
    M_DEL,       /* link `name` removed */
    M_GROUP,     /* link `name` replaced by an empty group */
} mut_kind_t;

enum { T_I8 = 1, T_I32, T_I64, T_U16, T_F32, T_F64, T_F16, T_VLEN };

typedef struct {
    const char *label;
    mut_kind_t kind;
    const char *name;
    int type;
    long long ival;
    double fval;
    int npoints;
    int rank;
    hsize_t dims[4];
    int len;          /* string length of M_ATTR_STR without sval ('x' repeated) */
    const char *sval; /* M_ATTR_STR text */
    int vals[8];
    const char *expect; /* NULL: the file must still open and read */
} mut_t;

static hid_t h5type(int type)
{
    switch (type) {
    case T_I8: return H5Tcopy(H5T_STD_I8LE);
    case T_I32: return H5Tcopy(H5T_STD_I32LE);
    case T_U16: return H5Tcopy(H5T_STD_U16LE);
    case T_F32: return H5Tcopy(H5T_IEEE_F32LE);
    case T_F64: return H5Tcopy(H5T_IEEE_F64LE);
    case T_F16: {
        hid_t t = H5Tcopy(H5T_IEEE_F32LE);
        H5Tset_fields(t, 15, 10, 5, 0, 10);
        H5Tset_size(t, 2);
        H5Tset_ebias(t, 15);
        return t;
    }
    default: return H5Tcopy(H5T_STD_I64LE);
    }
}

static hid_t space_of(int npoints)
{
    hsize_t n = (hsize_t)npoints;
    return npoints <= 1 ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, &n, NULL);
}

static void apply(const char *path, const mut_t *m)
{
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    ck_assert_int_ge(f, 0);
    const int np = m->npoints > 0 ? m->npoints : 1;
    if (m->kind <= M_ATTR_DEL && H5Aexists(f, m->name) > 0)
        ck_assert_int_ge(H5Adelete(f, m->name), 0);
    /* an edited attribute would fail the attributes' checksum first (tests/test_hardening.c checks
     * that); without it the file is one of another writer, and the reader's own checks are tested */
    if (m->kind <= M_ATTR_DEL && H5Aexists(f, "meta_sha256") > 0)
        ck_assert_int_ge(H5Adelete(f, "meta_sha256"), 0);
    if (m->kind >= M_DSET && H5Lexists(f, m->name, H5P_DEFAULT) > 0)
        ck_assert_int_ge(H5Ldelete(f, m->name, H5P_DEFAULT), 0);
    herr_t e = 0;
    if (m->kind == M_ATTR_INT || m->kind == M_ATTR_F64) {
        hid_t t = h5type(m->kind == M_ATTR_F64 ? T_F64 : m->type), sp = space_of(np);
        hid_t a = H5Acreate2(f, m->name, t, sp, H5P_DEFAULT, H5P_DEFAULT);
        long long *iv = malloc(sizeof(long long) * (size_t)np);
        double *fv = malloc(sizeof(double) * (size_t)np);
        for (int i = 0; i < np; i++)
            iv[i] = m->ival, fv[i] = m->fval;
        e = m->kind == M_ATTR_F64 ? H5Awrite(a, H5T_NATIVE_DOUBLE, fv) : H5Awrite(a, H5T_NATIVE_LLONG, iv);
        free(iv);
        free(fv);
        H5Aclose(a);
        H5Sclose(sp);
        H5Tclose(t);
    } else if (m->kind == M_ATTR_STR) {
        const size_t len = m->sval ? strlen(m->sval) : (size_t)m->len;
        hid_t t = H5Tcopy(H5T_C_S1), sp = space_of(np);
        H5Tset_size(t, m->type == T_VLEN ? H5T_VARIABLE : len);
        char *s = malloc(len + 1);
        memset(s, 'x', len);
        if (m->sval)
            memcpy(s, m->sval, len);
        s[len] = 0;
        hid_t a = H5Acreate2(f, m->name, t, sp, H5P_DEFAULT, H5P_DEFAULT);
        if (m->type == T_VLEN) {
            char **ptrs = malloc(sizeof(char *) * (size_t)np);
            for (int i = 0; i < np; i++)
                ptrs[i] = s;
            e = H5Awrite(a, t, ptrs);
            free(ptrs);
        } else {
            char *all = malloc(len * (size_t)np);
            for (int i = 0; i < np; i++)
                memcpy(all + (size_t)i * len, s, len);
            e = H5Awrite(a, t, all);
            free(all);
        }
        free(s);
        H5Aclose(a);
        H5Sclose(sp);
        H5Tclose(t);
    } else if (m->kind == M_DSET || m->kind == M_DSET_VALS) {
        const int rank = m->kind == M_DSET_VALS ? 1 : m->rank;
        hsize_t dims[4] = {(hsize_t)np};
        size_t n = 1;
        if (m->kind == M_DSET)
            for (int i = 0; i < rank; i++)
                dims[i] = m->dims[i], n *= (size_t)m->dims[i];
        else
            n = (size_t)np;
        hid_t t = h5type(m->kind == M_DSET_VALS ? T_I32 : m->type);
        hid_t sp = rank ? H5Screate_simple(rank, dims, NULL) : H5Screate(H5S_SCALAR);
        hid_t d = H5Dcreate2(f, m->name, t, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        ck_assert_int_ge(d, 0);
        double *v = malloc(sizeof(double) * (n ? n : 1));
        for (size_t i = 0; i < n; i++)
            v[i] = m->kind == M_DSET_VALS ? m->vals[i] : (double)m->ival;
        e = H5Dwrite(d, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, v);
        free(v);
        H5Dclose(d);
        H5Sclose(sp);
        H5Tclose(t);
    } else if (m->kind == M_GROUP) {
        hid_t g = H5Gcreate2(f, m->name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        ck_assert_int_ge(g, 0);
        H5Gclose(g);
    }
    ck_assert_msg(e >= 0, "%s: the test could not apply its change", m->label);
    H5Fclose(f);
}

#define AINT(lbl, nm, v, ex)                                                                                           \
    {                                                                                                                  \
        .label = lbl, .kind = M_ATTR_INT, .name = nm, .type = T_I64, .ival = v, .expect = ex                           \
    }
#define DSET3(lbl, nm, ty, a, b, c, ex)                                                                                \
    {                                                                                                                  \
        .label = lbl, .kind = M_DSET, .name = nm, .type = ty, .rank = 3, .dims = {a, b, c}, .expect = ex               \
    }
#define SEGS(lbl, n, a, b, c, ex)                                                                                      \
    {                                                                                                                  \
        .label = lbl, .kind = M_DSET_VALS, .name = "/segments", .npoints = n, .vals = {a, b, c}, .expect = ex          \
    }

static const mut_t muts[] = {
    AINT("n_tokens-negative", "n_tokens", -5, "'n_tokens' = -5 out of range"),
    AINT("n_tokens-huge", "n_tokens", 5000000000LL, "out of range"),
    AINT("n_tokens-absurd", "n_tokens", 1999999999, "absurd shape"),
    AINT("n_tokens-disagrees", "n_tokens", 1 << 25, "'/tokens' has 16 entries, expected 33554432"),
    AINT("heads-not-multiple", "n_kv_heads", 3, "4 heads is not a multiple of 3 KV heads"),
    AINT("kv-heads-zero", "n_kv_heads", 0, "impossible shape"),
    AINT("layers-more-than-stored", "n_layers", 3, "dataset '/layers/2/q' missing"),
    AINT("head-dim-absurd", "head_dim", 1 << 20, "absurd shape"),
    AINT("pool-zero", "pool", 0, "pooled map side 0"),
    AINT("pool-beyond-tokens", "pool", 1000000, "pooled map side 1000000"),
    AINT("prompt-zero", "n_prompt", 0, "prompt length 0"),
    AINT("prompt-beyond-tokens", "n_prompt", 17, "prompt length 17"),
    AINT("wo-without-dim", "model_dim", 0, "W_O present but model dim is 0"),
    AINT("vocab-below-token-ids", "vocab_size", 20, "token 10 has id 20"),
    AINT("n_segments-disagrees", "n_segments", 5, "n_segments 5"),
    AINT("n_decode-disagrees", "n_decode", 3, "n_decode 3"),
    AINT("format-version-3", "format_version", 3, "format version 3"),
    AINT("q-start-beyond-prompt", "q_start", 13, "queries stored from token 13, outside the prompt"),
    AINT("q-start-shape", "q_start", 3, "'/layers/0/q' has shape (4, 16, 8) of rank 3, expected (4, 13, 8)"),
    AINT("stats-without-summaries", "has_summaries", 0, "statistics (has_stats) without the summaries"),
    AINT("stats-split-beyond-prompt", "stats_split", 13, "statistics split at token 13"),
    AINT("stats-split-before-q-start", "stats_split", -1, "'stats_split' = -1 out of range"),
    {.label = "n_tokens-float",
     .kind = M_ATTR_F64,
     .name = "n_tokens",
     .fval = 16,
     .expect = "'n_tokens' is not an integer"},
    {.label = "n_layers-array",
     .kind = M_ATTR_INT,
     .name = "n_layers",
     .type = T_I64,
     .ival = 2,
     .npoints = 64,
     .expect = "'n_layers' holds 64 values"},
    {.label = "rope-array",
     .kind = M_ATTR_F64,
     .name = "rope_theta",
     .fval = 1e4,
     .npoints = 32,
     .expect = "'rope_theta' holds 32 values"},
    {.label = "n_heads-string",
     .kind = M_ATTR_STR,
     .name = "n_heads",
     .type = T_VLEN,
     .sval = "4",
     .expect = "'n_heads' is not an integer"},
    {.label = "prompt-fixed-array",
     .kind = M_ATTR_STR,
     .name = "prompt",
     .sval = "a prompt",
     .npoints = 8,
     .expect = "'prompt' holds 8 values"},
    {.label = "model-vlen-array",
     .kind = M_ATTR_STR,
     .name = "model",
     .type = T_VLEN,
     .sval = "m.bin",
     .npoints = 4,
     .expect = "'model' holds 4 values"},
    {.label = "generator-2MiB",
     .kind = M_ATTR_STR,
     .name = "generator",
     .type = T_VLEN,
     .len = 2 << 20,
     .expect = "'generator' is a string of 2097152 bytes (absurd"},
    {.label = "format-missing", .kind = M_ATTR_DEL, .name = "format", .expect = "not a kvsim trace"},
    {.label = "n_heads-missing", .kind = M_ATTR_DEL, .name = "n_heads", .expect = "'n_heads' missing"},
    {.label = "dtype-bf16",
     .kind = M_ATTR_STR,
     .name = "dtype",
     .type = T_VLEN,
     .sval = "bf16",
     .expect = "attribute 'dtype' is 'bf16'"},
    {.label = "dtype-int",
     .kind = M_ATTR_INT,
     .name = "dtype",
     .type = T_I32,
     .ival = 1,
     .expect = "'dtype' is not a string"},
    DSET3("q-int32", "/layers/0/q", T_I32, BH, BT, BD, "'/layers/0/q' does not hold floating-point"),
    DSET3("k-short", "/layers/1/k", T_F32, BKV, BT - 1, BD, "'/layers/1/k' has shape (2, 15, 8)"),
    DSET3("pooled-wrong-side", "/layers/0/pooled", T_F32, BH, 7, 7, "'/layers/0/pooled' has shape (4, 7, 7)"),
    {.label = "v-rank4",
     .kind = M_DSET,
     .name = "/layers/0/v",
     .type = T_F32,
     .rank = 4,
     .dims = {BKV, BT, BD, 1},
     .expect = "of rank 4"},
    {.label = "q-scalar", .kind = M_DSET, .name = "/layers/0/q", .type = T_F32, .rank = 0, .expect = "of rank 0"},
    {.label = "lse-missing", .kind = M_DEL, .name = "/layers/1/lse", .expect = "'/layers/1/lse' missing"},
    {.label = "keys90-missing", .kind = M_DEL, .name = "/layers/1/keys90", .expect = "'/layers/1/keys90' missing"},
    {.label = "layer-missing", .kind = M_DEL, .name = "/layers/1", .expect = "'/layers/1/q' missing"},
    {.label = "tokens-float",
     .kind = M_DSET,
     .name = "/tokens",
     .type = T_F32,
     .ival = 3,
     .rank = 1,
     .dims = {BT},
     .expect = "'/tokens' does not hold integers"},
    {.label = "tokens-2d",
     .kind = M_DSET,
     .name = "/tokens",
     .type = T_I32,
     .ival = 3,
     .rank = 2,
     .dims = {4, 4},
     .expect = "'/tokens' is not one-dimensional"},
    {.label = "tokens-negative",
     .kind = M_DSET,
     .name = "/tokens",
     .type = T_I32,
     .ival = -7,
     .rank = 1,
     .dims = {BT},
     .expect = "token 0 has id -7"},
    {.label = "positions-short",
     .kind = M_DSET,
     .name = "/positions",
     .type = T_I32,
     .rank = 1,
     .dims = {BT - 1},
     .expect = "'/positions' has 15 entries"},
    {.label = "positions-group", .kind = M_GROUP, .name = "/positions", .expect = "'/positions' is not a dataset"},
    SEGS("segments-unsorted", 3, 0, 5, 3, "segment 2 starts at 3"),
    SEGS("segments-not-from-0", 2, 1, 4, 0, "segment 0 starts at 1"),
    SEGS("segments-beyond-prompt", 3, 0, 4, 12, "segment 2 starts at 12"),
    SEGS("segments-repeated", 3, 0, 4, 4, "segment 2 starts at 4"),
    {.label = "segments-too-many",
     .kind = M_DSET,
     .name = "/segments",
     .type = T_I32,
     .rank = 1,
     .dims = {100},
     .expect = "'/segments' has 100 entries, at most 12 are possible"},
    {.label = "segments-float",
     .kind = M_DSET,
     .name = "/segments",
     .type = T_F64,
     .rank = 1,
     .dims = {3},
     .expect = "'/segments' does not hold integers"},
    /* still valid */
    {.label = "n_layers-int32", .kind = M_ATTR_INT, .name = "n_layers", .type = T_I32, .ival = BL},
    {.label = "n_heads-uint16", .kind = M_ATTR_INT, .name = "n_heads", .type = T_U16, .ival = BH},
    {.label = "dtype-fixed-string", .kind = M_ATTR_STR, .name = "dtype", .sval = "f32"},
    {.label = "prompt-fixed-60000", .kind = M_ATTR_STR, .name = "prompt", .len = 60000},
    {.label = "rope-int", .kind = M_ATTR_INT, .name = "rope_theta", .type = T_I32, .ival = 10000},
    DSET3("q-float64", "/layers/0/q", T_F64, BH, BT, BD, NULL),
    DSET3("k-float16", "/layers/1/k", T_F16, BKV, BT, BD, NULL),
};

START_TEST(broken_traces_are_named)
{
    for (size_t i = 0; i < KV_ARRAY_LEN(muts); i++) {
        const mut_t *m = &muts[i];
        char path[256], name[96];
        snprintf(name, sizeof name, "robust-%s.h5", m->label);
        kv_test_tmp(name, path, sizeof path);
        write_base(path);
        apply(path, m);
        kv_trace_t *t = (kv_trace_t *)0x1;
        int rc = kv_trace_open(path, &t);
        if (!m->expect) {
            ck_assert_msg(rc == KV_OK, "%s: a valid change was refused: %s", m->label, kv_last_error());
            /* every tensor of every layer reads (values of a replaced dataset are all 0) */
            const kv_trace_meta_t *mt = kv_trace_meta(t);
            float *buf = malloc(sizeof(float) * 4096);
            for (int l = 0; l < mt->n_layers; l++)
                for (int w = 0; w < KV_T_COUNT; w++)
                    if (kv_trace_has(t, (kv_tensor_t)w)) {
                        ck_assert_uint_le(kv_tensor_numel(mt, (kv_tensor_t)w), 4096);
                        ck_assert_msg(kv_trace_read(t, l, (kv_tensor_t)w, buf) == KV_OK, "%s: %s", m->label,
                                      kv_last_error());
                    }
            free(buf);
            kv_trace_close(t);
            continue;
        }
        ck_assert_msg(rc != KV_OK, "%s: opened a broken trace", m->label);
        ck_assert_ptr_null(t);
        ck_assert_msg(strstr(kv_last_error(), path), "%s: the file is not named: %s", m->label, kv_last_error());
        ck_assert_msg(strstr(kv_last_error(), m->expect), "%s: the message lacks \"%s\": %s", m->label, m->expect,
                      kv_last_error());
    }
}
END_TEST

/* The base trace opens, with its tokens and segments (so the cases above start from a valid file). */
START_TEST(base_trace_is_valid)
{
    char path[256];
    kv_test_tmp("robust-base.h5", path, sizeof path);
    write_base(path);
    kv_trace_t *t;
    ck_assert_msg(kv_trace_open(path, &t) == KV_OK, "%s", kv_last_error());
    const kv_trace_meta_t *m = kv_trace_meta(t);
    ck_assert_int_eq(m->n_tokens, BT);
    ck_assert_int_eq(m->n_segments, 3);
    ck_assert_int_eq(m->segments[2], 8);
    ck_assert_int_eq(m->tokens[5], 15);
    ck_assert_int_eq(m->pool, 8);
    ck_assert(kv_trace_has(t, KV_T_WO) && kv_trace_has(t, KV_T_POOLED));
    kv_trace_close(t);
}
END_TEST

/* `kvsim info` on a trace whose strings hold terminal escapes and a multi-byte character across the
 * 80-byte cut of the prompt: no control byte reaches the output, the cut keeps whole characters. */
START_TEST(info_shows_hostile_strings_safely)
{
    const char *bin = getenv("KVSIM_BIN");
    char path[256];
    kv_test_tmp("robust-info.h5", path, sizeof path);
    kv_trace_t *t = kv_test_trace(1, 2, 1, 4, 8, 6, 0, 0, 3);
    kv_trace_meta_t *m = kv_trace_mem_meta(t);
    char prompt[128];
    memset(prompt, 'p', sizeof prompt);
    memcpy(prompt + 79, "\xc3\xa9", 2); /* é over bytes 79-80: the cut at 80 must drop it whole */
    memcpy(prompt + 10, "\x1b[2J\x07\r", 6);
    memcpy(prompt + 30, "\n", 1);
    prompt[100] = 0;
    snprintf(m->prompt, sizeof m->prompt, "%s", prompt);
    snprintf(m->model, sizeof m->model, "model\x1b]0;title\x07.bin");
    ck_assert_msg(kv_test_write_trace(t, path) == KV_OK, "%s", kv_last_error());
    kv_trace_close(t);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "'%s' info '%s'", bin, path);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    char out[8192];
    size_t n = fread(out, 1, sizeof out - 1, p);
    out[n] = 0;
    ck_assert_int_eq(pclose(p), 0);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(out[i] == '\n' || (unsigned char)out[i] >= 0x20, "control byte 0x%02x at %zu of:\n%s",
                      (unsigned char)out[i], i, out);
    const char *pl = strstr(out, "prompt       \"");
    ck_assert_ptr_nonnull(pl);
    ck_assert_msg(!strncmp(pl + 79 + 14, "...\"\n", 5), "prompt line: %s", pl);
    ck_assert_ptr_null(strstr(pl, "\xc3\""));
    ck_assert_ptr_nonnull(strstr(out, "model?]0;title?.bin"));
}
END_TEST

/* Every root attribute is under the checksum meta_sha256, those of version 2 too: an integer
 * rewritten in place (to a value every other check accepts) is refused by the checksum alone. */
START_TEST(edited_attributes_fail_the_checksum)
{
    static const struct {
        const char *name;
        long long value;
    } edits[] = {{"stats_split", 7}, {"q_start", 0}, {"has_wo", 0}, {"zstd_level", 4}};
    for (size_t i = 0; i < sizeof edits / sizeof edits[0]; i++) {
        char path[256];
        kv_test_tmp("robust-digest.h5", path, sizeof path);
        write_base(path);
        hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
        ck_assert_int_ge(f, 0);
        hid_t a = H5Aopen(f, edits[i].name, H5P_DEFAULT);
        ck_assert_msg(a >= 0, "attribute %s", edits[i].name);
        long long old = -1;
        ck_assert_int_ge(H5Aread(a, H5T_NATIVE_LLONG, &old), 0);
        const long long v = old == edits[i].value ? edits[i].value + 1 : edits[i].value;
        ck_assert_int_ge(H5Awrite(a, H5T_NATIVE_LLONG, &v), 0);
        H5Aclose(a);
        H5Fclose(f);
        kv_trace_t *t = NULL;
        const int rc = kv_trace_open(path, &t);
        ck_assert_msg(rc != KV_OK, "%s %lld -> %lld: opened", edits[i].name, old, v);
        ck_assert_msg(strstr(kv_last_error(), "meta_sha256") || strstr(kv_last_error(), edits[i].name), "%s: %s",
                      edits[i].name, kv_last_error());
    }
}
END_TEST

Suite *suite_robust_trace(void)
{
    Suite *s = suite_create("robust_trace");
    TCase *tc = tcase_create("reader");
    tcase_add_test(tc, base_trace_is_valid);
    tcase_add_test(tc, broken_traces_are_named);
    tcase_add_test(tc, edited_attributes_fail_the_checksum);
    if (getenv("KVSIM_BIN"))
        tcase_add_test(tc, info_shows_hostile_strings_safely);
    else
        kv_test_skip("robust_trace info_shows_hostile_strings_safely", "KVSIM_BIN not set (run through make test)");
    suite_add_tcase(s, tc);
    return s;
}
