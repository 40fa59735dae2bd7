/*
 * trace_hdf5.c: HDF5 storage of traces (layout in traces/FORMAT.md).
 *
 * Reading: whole tensors and chunk-aligned token ranges are fetched as stored chunks and decoded here,
 * in parallel (read_direct, the mirror of the writer's direct chunk writes); anything else is read
 * with a hyperslab through HDF5's pipeline. Either way values come back as float32 (f16 -> f32
 * through kv_f16, not HDF5's slow soft conversion).
 * Writing: datasets are created with their full shape up front, chunked along tokens, filtered by
 * shuffle then zstd (id 32015, one cd_value: the level). The file is written under a temporary name
 * beside the target and renamed on commit through the output module (sim/common/kv_output.h), so an
 * interrupted write never leaves a file under the final name; SIGINT/SIGTERM remove the temporary
 * file.
 */
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/common/kv_output.h"
#include "traces/kv_f16.h"
#include "traces/kv_trace.h"
#include "traces/kv_zstd_filter.h"
#include "traces/trace_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <math.h>
#include <omp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zstd.h>
#include <zstd_errors.h>

/* ---------------------------------------------------------------- HDF5 helpers */

typedef struct {
    char top[256]; /* the outermost frame's description */
    char sys[128]; /* the operating system's reason, when a file driver frame gives one */
} h5_walk_t;

static herr_t walk_cb(unsigned n, const H5E_error2_t *e, void *data)
{
    h5_walk_t *w = data;
    if (!e->desc)
        return 0;
    if (n == 0)
        snprintf(w->top, sizeof w->top, "%s", e->desc);
    /* the sec2 driver's "... errno = 28, error message = 'No space left on device', ..." */
    const char *m = strstr(e->desc, "error message = '");
    if (m && !w->sys[0]) {
        m += strlen("error message = '");
        const char *q = strchr(m, '\'');
        snprintf(w->sys, sizeof w->sys, "%.*s", q ? (int)(q - m) : 100, m);
    }
    return 0;
}

/* The HDF5 error stack's explanation (its outermost message, and the system's reason where a file
 * driver gave one: "can't write unprocessed chunk data: No space left on device"), or "unknown
 * HDF5 error". */
static const char *h5_reason(void)
{
    static _Thread_local char buf[400];
    h5_walk_t w = {"unknown HDF5 error", ""};
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, walk_cb, &w);
    H5Eclear2(H5E_DEFAULT);
    if (w.sys[0])
        snprintf(buf, sizeof buf, "%s: %s", w.top, w.sys);
    else
        snprintf(buf, sizeof buf, "%s", w.top);
    return buf;
}

int kv_trace_init(void)
{
    static int done = 0;
    if (done)
        return KV_OK;
    /* No HDF5 clean-up at exit: after a failed close (a full disk) libhdf5 1.10 keeps the file
     * half-closed and its atexit handler then crashes closing it again. kvsim closes every file it
     * opens itself, and the operating system releases the rest. Must come before any other call. */
    H5dont_atexit();
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    int rc = kv_zstd_filter_register();
    if (rc == KV_OK)
        done = 1;
    return rc;
}

static hid_t f16_type(void)
{
    static hid_t t = -1;
    if (t < 0) {
        t = H5Tcopy(H5T_IEEE_F32LE);
        H5Tset_fields(t, 15, 10, 5, 0, 10);
        H5Tset_size(t, 2);
        H5Tset_ebias(t, 15);
        H5Tlock(t);
    }
    return t;
}

static void dset_path(char *buf, size_t len, int layer, kv_tensor_t which)
{
    snprintf(buf, len, "/layers/%d/%s", layer, kv_tensor_name(which));
}

static int attr_exists(hid_t obj, const char *name)
{
    return H5Aexists(obj, name) > 0;
}

/* Longest string attribute read (the longest kvsim writes is the prompt, cut to 1 KiB). */
#define MAX_STR_ATTR (1u << 20)

/* Open attribute `name` of obj and check it holds exactly one value (scalar or one element) of
 * class `cls` (a second class, or -1). H5Aread writes every element, so an array attribute read into
 * one value would overflow it. *ft gets the file type (the caller closes it). */
static int open_attr1(hid_t obj, const char *name, H5T_class_t cls, int cls2, const char *what, const char *path,
                      hid_t *a, hid_t *ft)
{
    *ft = -1;
    *a = H5Aopen(obj, name, H5P_DEFAULT);
    if (*a < 0)
        return kv_error(KV_EFORMAT, "%s: cannot open attribute '%s' (%s)", path, name, h5_reason());
    hid_t sp = H5Aget_space(*a);
    hssize_t npts = sp < 0 ? -1 : H5Sget_simple_extent_npoints(sp);
    if (sp >= 0)
        H5Sclose(sp);
    if (npts != 1)
        return kv_error(KV_EFORMAT, "%s: attribute '%s' holds %lld values, expected one %s", path, name,
                        (long long)npts, what);
    *ft = H5Aget_type(*a);
    H5T_class_t c = *ft < 0 ? H5T_NO_CLASS : H5Tget_class(*ft);
    if (c != cls && (int)c != cls2)
        return kv_error(KV_EFORMAT, "%s: attribute '%s' is not %s", path, name, what);
    return KV_OK;
}

static void close_attr1(hid_t a, hid_t ft)
{
    if (ft >= 0)
        H5Tclose(ft);
    if (a >= 0)
        H5Aclose(a);
}

static int get_int_attr(hid_t obj, const char *name, long long *v, int required, const char *path)
{
    if (!attr_exists(obj, name)) {
        if (required)
            return kv_error(KV_EFORMAT, "%s: attribute '%s' missing (not a kvsim trace?)", path, name);
        return KV_OK;
    }
    hid_t a, ft;
    int rc = open_attr1(obj, name, H5T_INTEGER, -1, "an integer", path, &a, &ft);
    if (rc == KV_OK && H5Aread(a, H5T_NATIVE_LLONG, v) < 0)
        rc = kv_error(KV_EFORMAT, "%s: attribute '%s' is not an integer (%s)", path, name, h5_reason());
    close_attr1(a, ft);
    return rc;
}

static int get_double_attr(hid_t obj, const char *name, double *v, const char *path)
{
    if (!attr_exists(obj, name))
        return KV_OK;
    hid_t a, ft;
    int rc = open_attr1(obj, name, H5T_FLOAT, H5T_INTEGER, "a number", path, &a, &ft);
    if (rc == KV_OK && H5Aread(a, H5T_NATIVE_DOUBLE, v) < 0)
        rc = kv_error(KV_EFORMAT, "%s: attribute '%s' is not a number (%s)", path, name, h5_reason());
    close_attr1(a, ft);
    return rc;
}

/* Read a string attribute (variable or fixed length) into buf; absent -> "". */
static int get_str_attr(hid_t obj, const char *name, char *buf, size_t len, const char *path)
{
    buf[0] = 0;
    if (!attr_exists(obj, name))
        return KV_OK;
    hid_t a, ft;
    int rc = open_attr1(obj, name, H5T_STRING, -1, "a string", path, &a, &ft);
    if (rc) {
        /* reported */
    } else if (H5Tis_variable_str(ft) > 0) {
        hid_t mt = H5Tcopy(H5T_C_S1);
        H5Tset_size(mt, H5T_VARIABLE);
        H5Tset_cset(mt, H5Tget_cset(ft));
        char *s = NULL;
        if (H5Aread(a, mt, &s) < 0)
            rc = kv_error(KV_EFORMAT, "%s: cannot read attribute '%s' (%s)", path, name, h5_reason());
        else if (s && strlen(s) > MAX_STR_ATTR)
            rc = kv_error(KV_EFORMAT, "%s: attribute '%s' is a string of %zu bytes (absurd; at most %u)", path, name,
                          strlen(s), MAX_STR_ATTR);
        else if (s)
            snprintf(buf, len, "%s", s);
        if (s)
            H5free_memory(s);
        H5Tclose(mt);
    } else if (H5Tget_size(ft) > MAX_STR_ATTR) {
        rc = kv_error(KV_EFORMAT, "%s: attribute '%s' is a string of %zu bytes (absurd; at most %u)", path, name,
                      H5Tget_size(ft), MAX_STR_ATTR);
    } else {
        size_t n = H5Tget_size(ft);
        char *tmp = kv_calloc(n + 1, 1, "attribute");
        hid_t mt = H5Tcopy(H5T_C_S1);
        H5Tset_size(mt, n + 1);
        if (!tmp || H5Aread(a, mt, tmp) < 0)
            rc = kv_error(KV_EFORMAT, "%s: cannot read attribute '%s'", path, name);
        else
            snprintf(buf, len, "%s", tmp);
        H5Tclose(mt);
        kv_free(tmp);
    }
    close_attr1(a, ft);
    return rc;
}

static int put_attr(hid_t obj, const char *name, hid_t type, const void *v)
{
    if (attr_exists(obj, name))
        H5Adelete(obj, name);
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(obj, name, type, sp, H5P_DEFAULT, H5P_DEFAULT);
    herr_t e = a < 0 ? -1 : H5Awrite(a, type, v);
    if (a >= 0)
        H5Aclose(a);
    H5Sclose(sp);
    return e < 0 ? kv_error(KV_EIO, "cannot write attribute '%s' (%s)", name, h5_reason()) : KV_OK;
}

static int put_int(hid_t obj, const char *name, long long v)
{
    return put_attr(obj, name, H5T_NATIVE_LLONG, &v);
}
static int put_double(hid_t obj, const char *name, double v)
{
    return put_attr(obj, name, H5T_NATIVE_DOUBLE, &v);
}
static int put_str(hid_t obj, const char *name, const char *s)
{
    hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, H5T_VARIABLE);
    H5Tset_cset(t, H5T_CSET_UTF8);
    int rc = put_attr(obj, name, t, &s);
    H5Tclose(t);
    return rc;
}

/* ---------------------------------------------------------------- reader */

/* Per-thread state of the direct chunk paths (the writer compresses whole chunks, the reader
 * decompresses them, both on an OpenMP team): one zstd context and one staging area of 2 x cap bytes
 * (a chunk's elements and their shuffled form) per thread, grown on demand and kept from call to
 * call. `decode` picks decompression contexts (reader) or compression contexts (writer). */
typedef struct {
    int n;                 /* threads the arrays are sized for */
    int decode;            /* contexts are ZSTD_DCtx (1) or ZSTD_CCtx (0) */
    void **zctx;           /* (n) zstd contexts */
    unsigned char **stage; /* (n) 2 x cap bytes */
    size_t cap;            /* bytes of one uncompressed chunk the staging holds */
} chunk_pool_t;

static int chunk_pool_reserve(chunk_pool_t *cp, int nt, size_t chunk_bytes, const char *path)
{
    if (nt <= cp->n && chunk_bytes <= cp->cap)
        return KV_OK;
    for (int i = 0; i < cp->n; i++) {
        kv_free_aligned(cp->stage[i]);
        cp->stage[i] = NULL;
    }
    cp->cap = 0;
    if (nt > cp->n) {
        void **z = kv_calloc((size_t)nt, sizeof *z, "zstd contexts");
        unsigned char **st = kv_calloc((size_t)nt, sizeof *st, "chunk staging");
        if (!z || !st) {
            kv_free(z);
            kv_free(st);
            return KV_ENOMEM;
        }
        for (int i = 0; i < cp->n; i++)
            z[i] = cp->zctx[i];
        kv_free(cp->zctx);
        kv_free(cp->stage);
        cp->zctx = z;
        cp->stage = st;
        cp->n = nt;
    }
    for (int i = 0; i < cp->n; i++) {
        if (!cp->zctx[i] && !(cp->zctx[i] = cp->decode ? (void *)ZSTD_createDCtx() : (void *)ZSTD_createCCtx()))
            return kv_error(KV_ENOMEM, "%s: cannot create a zstd context", path);
        if (!(cp->stage[i] = kv_malloc_aligned(2 * chunk_bytes, "chunk staging")))
            return KV_ENOMEM;
    }
    cp->cap = chunk_bytes;
    return KV_OK;
}

static void chunk_pool_free(chunk_pool_t *cp)
{
    for (int i = 0; i < cp->n; i++) {
        if (cp->decode)
            ZSTD_freeDCtx(cp->zctx[i]);
        else
            ZSTD_freeCCtx(cp->zctx[i]);
        kv_free_aligned(cp->stage[i]);
    }
    kv_free(cp->zctx);
    kv_free(cp->stage);
    const int decode = cp->decode;
    memset(cp, 0, sizeof *cp);
    cp->decode = decode;
}

typedef struct {
    hid_t file;
    int has[KV_T_COUNT];
    uint16_t *half; /* scratch for f16 reads */
    size_t half_cap;
    /* direct chunk reads (read_direct), reused from call to call */
    chunk_pool_t pool;   /* per thread: a zstd decompression context, a decompressed and an un-shuffled chunk */
    int n_raw;           /* slots for stored chunks: the batch being decompressed and the one fetched */
    unsigned char **raw; /* (n_raw) stored (compressed) chunks */
    size_t *raw_cap;     /* (n_raw) bytes each slot holds */
} h5_impl_t;

/* A whole tensor or a chunk-aligned row range straight from the stored chunks (defined with the
 * writer's direct path below): KV_OK, an error, or READ_FALLBACK when the dataset or one of its
 * chunks is not as kvsim writes them and HDF5's own pipeline must read it. */
#define READ_FALLBACK 1
static int read_direct(kv_trace_t *t, hid_t d, const char *name, int f16, int t0, int nt, float *dst);
/* The first chunk of d that covers rows [r0, r0 + nr) of the second axis and does not decode (a
 * checksum mismatch, a damaged frame, a chunk never written): 1 with "the chunk at (..): why" in
 * where, 0 when every chunk decodes (defined with kv_trace_verify below). */
static int find_bad_chunk(hid_t d, size_t r0, size_t nr, char *where, size_t len);
static void read_direct_free(h5_impl_t *hi);

/* An integer vector: exactly `expect` entries (expect >= 0), or at most `max` (expect < 0; *count
 * gets the length). Sizes are checked before anything is allocated. */
static int read_i32_dataset(hid_t file, const char *name, int32_t **out, int expect, int max, int *count,
                            const char *path)
{
    *out = NULL;
    if (count)
        *count = 0;
    if (H5Lexists(file, name, H5P_DEFAULT) <= 0) {
        H5Eclear2(H5E_DEFAULT);
        return KV_OK;
    }
    hid_t d = H5Dopen2(file, name, H5P_DEFAULT);
    hid_t sp = d < 0 ? -1 : H5Dget_space(d);
    hid_t ft = d < 0 ? -1 : H5Dget_type(d);
    hsize_t n = 0;
    int rc = KV_OK;
    if (d < 0) {
        rc = kv_error(KV_EFORMAT, "%s: '%s' is not a dataset (%s)", path, name, h5_reason());
        goto done;
    }
    if (sp < 0 || H5Sget_simple_extent_ndims(sp) != 1) {
        rc = kv_error(KV_EFORMAT, "%s: dataset '%s' is not one-dimensional", path, name);
        goto done;
    }
    if (ft < 0 || H5Tget_class(ft) != H5T_INTEGER) {
        rc = kv_error(KV_EFORMAT, "%s: dataset '%s' does not hold integers", path, name);
        goto done;
    }
    H5Sget_simple_extent_dims(sp, &n, NULL);
    if (expect >= 0 && n != (hsize_t)expect) {
        rc = kv_error(KV_EFORMAT, "%s: dataset '%s' has %llu entries, expected %d", path, name, (unsigned long long)n,
                      expect);
        goto done;
    }
    if (expect < 0 && n > (hsize_t)max) {
        rc = kv_error(KV_EFORMAT, "%s: dataset '%s' has %llu entries, at most %d are possible", path, name,
                      (unsigned long long)n, max);
        goto done;
    }
    if (count)
        *count = (int)n;
    *out = kv_malloc(sizeof(int32_t) * (n ? n : 1), name);
    if (!*out) {
        rc = KV_ENOMEM;
        goto done;
    }
    if (n && H5Dread(d, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, *out) < 0) {
        rc = kv_error(KV_EFORMAT, "%s: cannot read '%s' (%s)", path, name, h5_reason());
        kv_free(*out);
        *out = NULL;
    }
done:
    if (ft >= 0)
        H5Tclose(ft);
    if (sp >= 0)
        H5Sclose(sp);
    if (d >= 0)
        H5Dclose(d);
    return rc;
}

static int check_dims(hid_t file, const kv_trace_meta_t *m, int layer, kv_tensor_t which, const char *path)
{
    char name[64];
    dset_path(name, sizeof name, layer, which);
    hid_t d = H5Dopen2(file, name, H5P_DEFAULT);
    if (d < 0)
        return kv_error(KV_EFORMAT, "%s: dataset '%s' missing", path, name);
    hid_t sp = H5Dget_space(d), ft = H5Dget_type(d);
    hsize_t dims[4] = {0};
    int r = sp < 0 ? -1 : H5Sget_simple_extent_ndims(sp);
    if (r > 0 && r <= 4)
        H5Sget_simple_extent_dims(sp, dims, NULL);
    int is_float = ft >= 0 && H5Tget_class(ft) == H5T_FLOAT;
    if (ft >= 0)
        H5Tclose(ft);
    if (sp >= 0)
        H5Sclose(sp);
    H5Dclose(d);
    if (!is_float)
        return kv_error(KV_EFORMAT, "%s: dataset '%s' does not hold floating-point numbers", path, name);
    uint64_t want[3];
    int wr = kv_tensor_dims(m, which, want);
    int ok = (r == wr);
    for (int i = 0; ok && i < wr; i++)
        ok = dims[i] == want[i];
    if (!ok)
        return kv_error(
            KV_EFORMAT, "%s: dataset '%s' has shape (%llu, %llu, %llu) of rank %d, expected (%llu, %llu, %llu)", path,
            name, (unsigned long long)dims[0], (unsigned long long)dims[1], (unsigned long long)dims[2], r,
            (unsigned long long)want[0], (unsigned long long)want[1], wr == 3 ? (unsigned long long)want[2] : 0ULL);
    return KV_OK;
}

/* SHA-256 of the root attributes' values, as the reader understands them (the meta_sha256 attribute,
 * FORMAT.md): the attributes live in places HDF5 does not checksum (variable-length strings in the
 * global heap, dense attribute storage in fractal heap blocks), where a changed byte would otherwise
 * change a value silently. One "name=value" line per attribute, in FORMAT.md's order. */
static int meta_digest(const kv_trace_meta_t *m, int version, char hex[65])
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f)
        return kv_error(KV_ENOMEM, "out of memory for the attribute checksum");
    const int has_sum = m->has_summaries != 0;
    fprintf(f, "format=%s\nformat_version=%d\n", KV_TRACE_FORMAT, version);
    fprintf(f, "n_layers=%d\nn_heads=%d\nn_kv_heads=%d\nhead_dim=%d\n", m->n_layers, m->n_heads, m->n_kv_heads,
            m->head_dim);
    fprintf(f, "n_tokens=%d\nn_prompt=%d\nn_decode=%d\nn_segments=%d\n", m->n_tokens, m->n_prompt,
            m->n_tokens - m->n_prompt, m->n_segments);
    fprintf(f, "has_summaries=%d\npool=%d\nhas_wo=%d\n", has_sum, has_sum ? m->pool : 0, m->has_wo != 0);
    if (version >= 2) /* the statistics and lean storage of version 2 */
        fprintf(f, "has_stats=%d\nstats_split=%d\nq_start=%d\n", m->has_stats != 0, m->stats_split, m->q_start);
    fprintf(f, "model_dim=%d\nhidden_dim=%d\nvocab_size=%d\nseq_len=%d\n", m->model_dim, m->hidden_dim, m->vocab_size,
            m->seq_len);
    fprintf(f, "rope_theta=%.9g\nnorm_eps=%.9g\n", (double)m->rope_theta, (double)m->norm_eps);
    fprintf(f, "dtype=%s\nf16_overflow=%ld\nnonfinite=%ld\nzstd_level=%d\n", m->dtype == KV_DTYPE_F16 ? "f16" : "f32",
            m->f16_overflow, m->nonfinite, m->zstd_level);
    const char *const strs[][2] = {
        {"source", m->source},
        {"model", m->model},
        {"model_sha256", m->model_sha256},
        {"tokenizer", m->tokenizer},
        {"tool_version", m->tool_version},
        {"git_revision", m->git_revision},
        {"created", m->created},
        {"backend", m->backend},
        {"generator", m->generator},
        {"prompt", m->prompt},
    };
    for (size_t i = 0; i < KV_ARRAY_LEN(strs); i++) /* the length first: no value can mimic a next line */
        fprintf(f, "%s=%zu:%s\n", strs[i][0], strlen(strs[i][1]), strs[i][1]);
    int rc = fclose(f) == 0 ? kv_sha256_buf(buf, len, hex) : kv_error(KV_ENOMEM, "out of memory for a checksum");
    free(buf);
    return rc;
}

static int h5_read_meta(hid_t f, kv_trace_meta_t *m, const char *path)
{
    char fmt[64];
    int rc;
    if ((rc = get_str_attr(f, "format", fmt, sizeof fmt, path)))
        return rc;
    if (strcmp(fmt, KV_TRACE_FORMAT))
        return kv_error(KV_EFORMAT, "%s: not a kvsim trace (attribute 'format' is '%s', expected '%s')", path, fmt,
                        KV_TRACE_FORMAT);
    long long v = 0;
    if ((rc = get_int_attr(f, "format_version", &v, 1, path)))
        return rc;
    if (v != 1 && v != KV_TRACE_FORMAT_VERSION)
        return kv_error(KV_EFORMAT, "%s: trace format version %lld, this kvsim reads versions 1 to %d", path, v,
                        KV_TRACE_FORMAT_VERSION);
    const int version = (int)v;
    struct {
        const char *name;
        int *dst;
        int required;
    } ints[] = {
        {"n_layers", &m->n_layers, 1},
        {"n_heads", &m->n_heads, 1},
        {"n_kv_heads", &m->n_kv_heads, 1},
        {"head_dim", &m->head_dim, 1},
        {"n_tokens", &m->n_tokens, 1},
        {"n_prompt", &m->n_prompt, 1},
        {"has_summaries", &m->has_summaries, 0},
        {"pool", &m->pool, 0},
        {"has_wo", &m->has_wo, 0},
        {"has_stats", &m->has_stats, 0},
        {"stats_split", &m->stats_split, 0},
        {"q_start", &m->q_start, 0},
        {"model_dim", &m->model_dim, 0},
        {"hidden_dim", &m->hidden_dim, 0},
        {"vocab_size", &m->vocab_size, 0},
        {"seq_len", &m->seq_len, 0},
        {"zstd_level", &m->zstd_level, 0},
    };
    for (size_t i = 0; i < KV_ARRAY_LEN(ints); i++) {
        v = 0;
        if ((rc = get_int_attr(f, ints[i].name, &v, ints[i].required, path)))
            return rc;
        if (v < 0 || v > 2000000000LL)
            return kv_error(KV_EFORMAT, "%s: attribute '%s' = %lld out of range", path, ints[i].name, v);
        *ints[i].dst = (int)v;
    }
    m->has_summaries = m->has_summaries != 0;
    m->has_wo = m->has_wo != 0;
    m->has_stats = m->has_stats != 0;
    if (version < 2) /* version 1 had no statistics and stored every query */
        m->has_stats = m->stats_split = m->q_start = 0;
    m->format_version = version;
    if (!m->has_summaries)
        m->pool = 0; /* no pooled map: its side means nothing (kv_trace.h) */
    v = 0;
    if ((rc = get_int_attr(f, "f16_overflow", &v, 0, path)))
        return rc;
    m->f16_overflow = (long)v;
    v = -1; /* absent: a trace of a kvsim that did not count them */
    if ((rc = get_int_attr(f, "nonfinite", &v, 0, path)))
        return rc;
    if (v < -1)
        return kv_error(KV_EFORMAT, "%s: attribute 'nonfinite' = %lld out of range", path, v);
    m->nonfinite = (long)v;
    double d = 0;
    if ((rc = get_double_attr(f, "rope_theta", &d, path)))
        return rc;
    m->rope_theta = (float)d;
    d = 0;
    if ((rc = get_double_attr(f, "norm_eps", &d, path)))
        return rc;
    m->norm_eps = (float)d;
    char dt[16];
    if ((rc = get_str_attr(f, "dtype", dt, sizeof dt, path)))
        return rc;
    if (!strcmp(dt, "f16") || !strcmp(dt, "float16"))
        m->dtype = KV_DTYPE_F16;
    else if (!strcmp(dt, "f32") || !strcmp(dt, "float32"))
        m->dtype = KV_DTYPE_F32;
    else
        return kv_error(KV_EFORMAT, "%s: attribute 'dtype' is '%s' (expected f16 or f32)", path, dt);
    struct {
        const char *name;
        char *dst;
        size_t len;
    } strs[] = {
        {"source", m->source, sizeof m->source},
        {"model", m->model, sizeof m->model},
        {"model_sha256", m->model_sha256, sizeof m->model_sha256},
        {"tokenizer", m->tokenizer, sizeof m->tokenizer},
        {"tool_version", m->tool_version, sizeof m->tool_version},
        {"git_revision", m->git_revision, sizeof m->git_revision},
        {"created", m->created, sizeof m->created},
        {"backend", m->backend, sizeof m->backend},
        {"generator", m->generator, sizeof m->generator},
        {"prompt", m->prompt, sizeof m->prompt},
    };
    for (size_t i = 0; i < KV_ARRAY_LEN(strs); i++)
        if ((rc = get_str_attr(f, strs[i].name, strs[i].dst, strs[i].len, path)))
            return rc;
    if ((rc = kv_trace_meta_validate(m, path)))
        return rc;
    /* segments ascend strictly inside the prompt: at most n_prompt of them */
    if ((rc = read_i32_dataset(f, "/tokens", &m->tokens, m->n_tokens, 0, NULL, path)) ||
        (rc = read_i32_dataset(f, "/positions", &m->positions, m->n_tokens, 0, NULL, path)) ||
        (rc = read_i32_dataset(f, "/segments", &m->segments, -1, m->n_prompt, &m->n_segments, path)))
        return rc;
    if (!m->positions) {
        m->positions = kv_malloc(sizeof(int32_t) * (size_t)m->n_tokens, "positions");
        if (!m->positions)
            return KV_ENOMEM;
        for (int t = 0; t < m->n_tokens; t++)
            m->positions[t] = t;
    }
    if ((rc = kv_trace_meta_validate(m, path)))
        return rc;
    /* the redundant counts, where present, must agree */
    long long n_seg = m->n_segments, n_dec = m->n_tokens - m->n_prompt;
    if ((rc = get_int_attr(f, "n_segments", &n_seg, 0, path)) || (rc = get_int_attr(f, "n_decode", &n_dec, 0, path)))
        return rc;
    if (n_seg != m->n_segments || n_dec != m->n_tokens - m->n_prompt)
        return kv_error(KV_EFORMAT,
                        "%s: attributes n_segments %lld and n_decode %lld disagree with the %d segment starts and "
                        "n_tokens - n_prompt = %d",
                        path, n_seg, n_dec, m->n_segments, m->n_tokens - m->n_prompt);
    /* the attributes' checksum (traces of older kvsim versions have none; one that is there must
     * match, an empty one too: damage in the global heap reads strings back as empty) */
    char want[80] = "", got[65];
    const int has_digest = attr_exists(f, "meta_sha256");
    if (has_digest && (rc = get_str_attr(f, "meta_sha256", want, sizeof want, path)))
        return rc;
    if (has_digest && (rc = meta_digest(m, version, got)))
        return rc;
    if (has_digest && strcmp(want, got))
        return kv_error(KV_EFORMAT,
                        "%s: the root attributes changed since the trace was written (their checksum meta_sha256 "
                        "does not match): the file is damaged",
                        path);
    snprintf(m->meta_sha256, sizeof m->meta_sha256, "%s", has_digest ? got : "");
    return KV_OK;
}

static int h5_has(const kv_trace_t *t, kv_tensor_t which)
{
    return ((h5_impl_t *)t->impl)->has[which];
}

static int h5_read_hyperslab(kv_trace_t *t, int layer, kv_tensor_t which, int t0, int nt, float *dst)
{
    h5_impl_t *hi = t->impl;
    char name[64];
    dset_path(name, sizeof name, layer, which);
    hid_t d = H5Dopen2(hi->file, name, H5P_DEFAULT);
    if (d < 0)
        return kv_error(KV_EFORMAT, "%s: dataset '%s' missing (%s)", t->path, name, h5_reason());
    uint64_t dims[3];
    int rank = kv_tensor_dims(&t->meta, which, dims);
    hsize_t start[3] = {0, 0, 0}, count[3] = {dims[0], dims[1], dims[2]};
    if (t0 >= 0 && which == KV_T_Q)
        t0 -= t->meta.q_start; /* the stored queries start at token q_start */
    if (t0 >= 0) {
        start[1] = (hsize_t)t0;
        count[1] = (hsize_t)nt;
    }
    size_t n = 1;
    for (int i = 0; i < rank; i++)
        n *= (size_t)count[i];
    hid_t fs = H5Dget_space(d);
    H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL);
    hid_t ms = H5Screate_simple(rank, count, NULL);
    hid_t ft = H5Dget_type(d);
    int half = H5Tget_class(ft) == H5T_FLOAT && H5Tget_size(ft) == 2;
    int rc = read_direct(t, d, name, half, t0, nt, dst);
    herr_t e;
    if (rc != READ_FALLBACK)
        goto done;
    rc = KV_OK;
    if (half) {
        if (hi->half_cap < n) {
            uint16_t *b = kv_malloc(n * sizeof(uint16_t), "f16 read buffer");
            if (!b) {
                rc = KV_ENOMEM;
                goto done;
            }
            kv_free(hi->half);
            hi->half = b;
            hi->half_cap = n;
        }
        e = H5Dread(d, f16_type(), ms, fs, H5P_DEFAULT, hi->half);
        if (e >= 0)
            kv_f16_to_f32_n(hi->half, dst, n);
    } else {
        e = H5Dread(d, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, dst);
    }
    if (e < 0) {
        char why[400], where[160];
        snprintf(why, sizeof why, "%s", h5_reason());
        /* HDF5 does not say which chunk failed: find it (a checksum mismatch names it) */
        if (find_bad_chunk(d, t0 >= 0 ? (size_t)t0 : 0, t0 >= 0 ? (size_t)nt : (size_t)-1, where, sizeof where))
            rc = kv_error(KV_EFORMAT, "%s: '%s': %s (corrupt file)", t->path, name, where);
        else
            rc = kv_error(KV_EIO, "%s: cannot read '%s' (%s)", t->path, name, why);
    }
done:
    H5Tclose(ft);
    H5Sclose(ms);
    H5Sclose(fs);
    H5Dclose(d);
    return rc;
}

static int h5_read_rows(kv_trace_t *t, int layer, kv_tensor_t which, int t0, int nt, float *dst)
{
    return h5_read_hyperslab(t, layer, which, t0, nt, dst);
}

static int h5_read(kv_trace_t *t, int layer, kv_tensor_t which, float *dst)
{
    return h5_read_hyperslab(t, layer, which, -1, 0, dst);
}

static int h5_storage(kv_trace_t *t, uint64_t *raw, uint64_t *stored)
{
    h5_impl_t *hi = t->impl;
    *raw = *stored = 0;
    for (int l = 0; l < t->meta.n_layers; l++)
        for (int w = 0; w < KV_T_COUNT; w++) {
            if (!hi->has[w])
                continue;
            char name[64];
            dset_path(name, sizeof name, l, (kv_tensor_t)w);
            hid_t d = H5Dopen2(hi->file, name, H5P_DEFAULT);
            if (d < 0)
                continue;
            hid_t ft = H5Dget_type(d);
            *raw += (uint64_t)kv_tensor_numel(&t->meta, (kv_tensor_t)w) * H5Tget_size(ft);
            *stored += H5Dget_storage_size(d);
            H5Tclose(ft);
            H5Dclose(d);
        }
    return KV_OK;
}

static void h5_close(kv_trace_t *t)
{
    h5_impl_t *hi = t->impl;
    if (!hi)
        return;
    if (hi->file >= 0)
        H5Fclose(hi->file);
    kv_free(hi->half);
    read_direct_free(hi);
    kv_free(hi);
}

static const kv_trace_vt_t h5_vt = {h5_read_rows, h5_read, h5_has, h5_storage, h5_close};

/* ---------------------------------------------------------------- the sandbox
 *
 * libhdf5 1.10 parses a file's own structures (superblock, object headers, B-trees, the global heap
 * that holds variable-length strings) trusting their bytes: one changed byte can make it read out of
 * bounds and crash, loop, or allocate gigabytes. Checksums (the v110 format kvsim writes, FORMAT.md)
 * catch most of that, not all (the global heap has none) and not in older files. So the parse runs
 * first in a child process, with an address-space limit and an alarm, and only once that child has
 * finished does the calling process repeat it: a crash becomes an error that names the file. The
 * child uses one OpenMP thread (libgomp's pool does not survive fork), default actions for the
 * crash signals (no inherited handler acts for the child) and for the output module's signals
 * (which would remove the parent's temporary files), and ends with _exit. */

#if defined(__SANITIZE_ADDRESS__)
#define KV_UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KV_UNDER_ASAN 1
#endif
#endif

typedef int (*sandbox_fn)(const char *path, void *ctx, FILE *out);

#ifdef KV_UNDER_ASAN
/* Under AddressSanitizer (make test-asan, make fuzz) a sanitizer report ends the child with a status,
 * not a signal. Whose code it is about decides what the parent does: libhdf5's (it copies past its
 * buffers on some damaged files, or passes absurd sizes to memcpy) is the damaged file a release
 * build reports as such; kvsim's is a bug, and the parent aborts so that the test or the fuzzer sees
 * it. The child's death callback walks the stack: the first frame outside the executable (kvsim, and
 * clang's static sanitizer runtime, are in it) and outside the sanitizer's shared runtime decides:
 * libhdf5, or anything else (libc's __libc_start_main below kvsim's frames). */
#include <dlfcn.h>
#include <execinfo.h>
#include <sanitizer/common_interface_defs.h>

static int g_sanitizer_fd = -1;

static void child_death(void)
{
    void *frames[64];
    const int n = backtrace(frames, 64);
    Dl_info self, info;
    const int have_self = dladdr((void *)child_death, &self);
    const char *who = "kvsim";
    for (int i = 0; i < n; i++) {
        if (!dladdr(frames[i], &info) || !info.dli_fname)
            continue;
        if ((have_self && info.dli_fbase == self.dli_fbase) || strstr(info.dli_fname, "libasan") ||
            strstr(info.dli_fname, "libubsan"))
            continue;
        if (strstr(info.dli_fname, "libhdf5"))
            who = "hdf5";
        break;
    }
    char msg[64];
    const int len = snprintf(msg, sizeof msg, "%cKVSIM-SANITIZER:%s", 1, who);
    if (g_sanitizer_fd >= 0 && write(g_sanitizer_fd, msg, (size_t)len) < 0)
        _exit(121);
}
#endif

/* The address space of this process now plus `extra` bytes, as the child's limit (not under ASan,
 * whose shadow memory needs terabytes of address space). */
static void limit_memory(size_t extra)
{
#ifndef KV_UNDER_ASAN
    char buf[64] = "";
    int fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
    if (fd >= 0)
        close(fd);
    if (n <= 0)
        return;
    buf[n] = 0;
    const unsigned long long vm = strtoull(buf, NULL, 10) * (unsigned long long)sysconf(_SC_PAGESIZE);
    struct rlimit rl;
    if (getrlimit(RLIMIT_AS, &rl) == 0 && (rl.rlim_max == RLIM_INFINITY || vm + extra < rl.rlim_max)) {
        rl.rlim_cur = (rlim_t)(vm + extra);
        setrlimit(RLIMIT_AS, &rl);
    }
#else
    (void)extra;
#endif
}

/* fn in this process (where fork is not possible), its text into memory. */
static int run_here(const char *path, sandbox_fn fn, void *ctx, char **text)
{
    size_t len = 0;
    FILE *ms = text ? open_memstream(text, &len) : NULL;
    const int rc = fn(path, ctx, ms);
    if (ms)
        fclose(ms);
    return rc;
}

/* Run fn(path, ctx, out) in a child process. Returns fn's status, with fn's last message recorded as
 * the error, or an error naming the file when the child did not finish (a crash, the alarm). The
 * text fn wrote to `out` goes to *text (kv_free) when text is not NULL. `what` says what the child
 * was doing ("reading", "verifying"), for the message. Where fork fails, fn runs here. */
static int sandboxed(const char *path, const char *what, unsigned alarm_s, size_t extra_memory, sandbox_fn fn,
                     void *ctx, char **text)
{
    if (text)
        *text = NULL;
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0)
        return run_here(path, fn, ctx, text);
    const pid_t pid = fork(); /* the child ends with _exit: what this process has buffered is not written twice */
    if (pid < 0) {
        close(p[0]);
        close(p[1]);
        return run_here(path, fn, ctx, text);
    }
    if (pid == 0) {
        static const int deflt[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGINT, SIGTERM, SIGHUP, SIGPIPE};
        for (size_t i = 0; i < KV_ARRAY_LEN(deflt); i++)
            signal(deflt[i], SIG_DFL);
        close(p[0]);
#ifdef KV_UNDER_ASAN
        g_sanitizer_fd = p[1];
        __sanitizer_set_death_callback(child_death);
#endif
        omp_set_num_threads(1);
        limit_memory(extra_memory);
        if (alarm_s)
            alarm(alarm_s);
        FILE *out = fdopen(p[1], "w");
        if (!out)
            _exit(120);
        const int rc = fn(path, ctx, out);
        /* the trailer: NUL, the status, NUL, the message, NUL */
        fputc(0, out);
        fprintf(out, "%d", rc);
        fputc(0, out);
        fputs(kv_last_error(), out);
        fputc(0, out);
        fflush(out);
        _exit(0);
    }
    close(p[1]);
    size_t n = 0, cap = 4096;
    char *buf = kv_malloc(cap, "child output");
    for (ssize_t r = 1; buf && r > 0;) {
        if (n + 1024 > cap) {
            char *b = kv_realloc(buf, cap * 2, "child output");
            if (!b) {
                kv_free(buf);
                buf = NULL;
                break;
            }
            buf = b;
            cap *= 2;
        }
        /* buf is not NULL here: the loop's condition */
        // cppcheck-suppress nullPointerArithmeticRedundantCheck
        r = read(p[0], buf + n, cap - n - 1);
        if (r < 0 && errno == EINTR)
            r = 1;
        else if (r > 0)
            n += (size_t)r;
    }
    close(p[0]);
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    if (!buf)
        return KV_ENOMEM;
    buf[n] = 0;
    /* text NUL status NUL message NUL */
    int rc = KV_EINTERNAL, done = 0;
    size_t z1 = strlen(buf);
    if (z1 < n) {
        const char *sv = buf + z1 + 1;
        const size_t z2 = z1 + 1 + strlen(sv);
        if (z2 < n && z2 + 1 + strlen(buf + z2 + 1) + 1 == n && WIFEXITED(st) && WEXITSTATUS(st) == 0) {
            rc = atoi(sv);
            if (rc != KV_OK)
                kv_error(rc, "%s", buf + z2 + 1);
            done = 1;
        }
    }
#ifdef KV_UNDER_ASAN
    /* a sanitizer report in the child about kvsim's own code (child_death above) is a bug, not a
     * damaged file: stop here so that the test run or the fuzzer sees it */
    if (!done && memmem(buf, n, "\001KVSIM-SANITIZER:kvsim", 22)) {
        fprintf(stderr, "kvsim: a sanitizer stopped the child process %s %s in kvsim's code: see its report above\n",
                what, path);
        abort();
    }
#endif
    if (!done) {
        if (WIFSIGNALED(st) && WTERMSIG(st) == SIGALRM)
            rc = kv_error(KV_EFORMAT,
                          "%s: libhdf5 did not finish %s the file in %u s: its HDF5 structures are damaged (or "
                          "it is not a trace kvsim wrote)",
                          path, what, alarm_s);
        else if (WIFSIGNALED(st))
            rc = kv_error(KV_EFORMAT,
                          "%s: the file's HDF5 structures are damaged: libhdf5 crashed %s them (%s); kvsim stopped "
                          "it in a child process",
                          path, what, strsignal(WTERMSIG(st)));
        else
            rc = kv_error(KV_EFORMAT,
                          "%s: the file's HDF5 structures are damaged: %s them failed in a child process (exit "
                          "status %d; out of memory?)",
                          path, what, WIFEXITED(st) ? WEXITSTATUS(st) : -1);
        z1 = 0;
    }
    if (text && done) {
        buf[z1] = 0;
        *text = buf;
        buf = NULL;
    }
    kv_free(buf);
    return rc;
}

static int h5_open(const char *path, kv_trace_t **out);

/* A trace is read at random: a regular file, readable (a FIFO or a device would block libhdf5). */
static int regular_input(const char *path)
{
    FILE *f;
    int rc = kv_open_input(path, "trace", &f);
    if (rc == KV_OK)
        fclose(f);
    return rc;
}

static int probe_open(const char *path, void *ctx, FILE *out)
{
    (void)ctx, (void)out;
    kv_trace_t *t = NULL;
    int rc = h5_open(path, &t);
    kv_trace_close(t);
    return rc;
}

int kv_trace_hdf5_open(const char *path, kv_trace_t **out)
{
    *out = NULL;
    int rc = kv_trace_init();
    if (rc)
        return rc;
    if ((rc = regular_input(path)))
        return rc;
    if (H5Fis_hdf5(path) <= 0) {
        H5Eclear2(H5E_DEFAULT);
        return kv_error(KV_EFORMAT, "%s: not an HDF5 file", path);
    }
    /* the parse in a child first (1 GiB more address space, 20 s: a trace's metadata needs far less,
     * a few hundred object headers even from a cold disk), then here */
    if ((rc = sandboxed(path, "reading", 20, (size_t)1 << 30, probe_open, NULL, NULL)))
        return rc;
    return h5_open(path, out);
}

static int h5_open(const char *path, kv_trace_t **out)
{
    *out = NULL;
    int rc;
    kv_trace_t *t = kv_calloc(1, sizeof *t, "trace");
    h5_impl_t *hi = kv_calloc(1, sizeof *hi, "trace");
    if (!t || !hi) {
        kv_free(t);
        kv_free(hi);
        return KV_ENOMEM;
    }
    hi->pool.decode = 1;
    t->vt = &h5_vt;
    t->impl = hi;
    snprintf(t->path, sizeof t->path, "%s", path);
    hi->file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (hi->file < 0) {
        rc = kv_error(KV_EIO, "%s: cannot open HDF5 file (%s)", path, h5_reason());
        goto fail;
    }
    if ((rc = h5_read_meta(hi->file, &t->meta, path)))
        goto fail;
    for (int w = 0; w < KV_T_COUNT; w++)
        hi->has[w] = kv_tensor_present(&t->meta, (kv_tensor_t)w);
    for (int l = 0; l < t->meta.n_layers; l++)
        for (int w = 0; w < KV_T_COUNT; w++)
            if (hi->has[w] && (rc = check_dims(hi->file, &t->meta, l, (kv_tensor_t)w, path)))
                goto fail;
    *out = t;
    return KV_OK;
fail:
    kv_trace_close(t);
    return rc;
}

/* ---------------------------------------------------------------- writer */

struct kv_trace_writer {
    hid_t file;
    kv_trace_meta_t meta;
    kv_write_opts_t opts;
    char path[4096];
    kv_out_t *out;        /* the temporary file and its commit (sim/common/kv_output.h) */
    long *nonfinite;      /* (n_layers, KV_T_COUNT, n_heads) NaN and inf values stored per layer, tensor and head
                             (W_O: its rows' total under head 0) */
    unsigned char *plain; /* staging of the H5Dwrite path: f16 conversion, gathered rows */
    size_t plain_cap;
    /* direct chunk writes (write_direct), reused from call to call */
    chunk_pool_t pool;     /* per thread: a zstd compression context, a chunk's elements and their shuffled form */
    unsigned char *frames; /* compressed chunks of the batch being made and the one being stored */
    size_t frames_cap;
};

static hid_t make_dcpl(const kv_trace_meta_t *m, kv_tensor_t which, const kv_write_opts_t *o, int *rank_out,
                       hsize_t dims[3])
{
    uint64_t d[3];
    int rank = kv_tensor_dims(m, which, d);
    for (int i = 0; i < 3; i++)
        dims[i] = d[i];
    *rank_out = rank;
    hsize_t chunk[3] = {1, dims[1], dims[2]};
    if (kv_tensor_per_token(which)) {
        size_t per_tok = (rank == 3 ? (size_t)dims[2] : 1) * (o->dtype == KV_DTYPE_F16 && which <= KV_T_V ? 2 : 4);
        size_t ct = o->chunk_tokens > 0 ? (size_t)o->chunk_tokens : (1u << 20) / per_tok;
        if (ct < 64)
            ct = 64;
        if (ct > dims[1])
            ct = dims[1];
        chunk[1] = ct;
    } else if (which == KV_T_WO) {
        chunk[0] = dims[0] < 64 ? dims[0] : 64;
    }
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, rank, chunk);
    H5Pset_shuffle(dcpl);
    unsigned int level = (unsigned)(o->zstd_level > 0 ? o->zstd_level : KV_ZSTD_DEFAULT_LEVEL);
    H5Pset_filter(dcpl, KV_ZSTD_FILTER_ID, H5Z_FLAG_MANDATORY, 1, &level);
    return dcpl;
}

int kv_trace_create(const char *path, const kv_trace_meta_t *meta, const kv_write_opts_t *opts, kv_trace_writer_t **out)
{
    *out = NULL;
    int rc = kv_trace_init();
    if (rc)
        return rc;
    if ((rc = kv_trace_meta_validate(meta, path)))
        return rc;
    kv_trace_writer_t *w = kv_calloc(1, sizeof *w, "trace writer");
    if (!w)
        return KV_ENOMEM;
    w->file = -1;
    w->opts = opts ? *opts : (kv_write_opts_t){KV_DTYPE_F16, KV_ZSTD_DEFAULT_LEVEL, 0};
    if (w->opts.zstd_level <= 0)
        w->opts.zstd_level = KV_ZSTD_DEFAULT_LEVEL;
    if (w->opts.zstd_level > 22)
        w->opts.zstd_level = 22;
    if ((rc = kv_trace_meta_copy(&w->meta, meta))) {
        kv_free(w);
        return rc;
    }
    w->meta.dtype = w->opts.dtype;
    w->meta.zstd_level = w->opts.zstd_level;
    w->meta.f16_overflow = 0;
    w->meta.nonfinite = 0;
    if (!(w->nonfinite = kv_calloc((size_t)meta->n_layers * KV_T_COUNT * (size_t)meta->n_heads, sizeof(long),
                                   "non-finite counts"))) {
        rc = KV_ENOMEM;
        goto fail;
    }
    snprintf(w->path, sizeof w->path, "%s", path);
    if ((rc = kv_out_open(path, &w->out)))
        goto fail;
    /* the temporary file is this writer's alone: no HDF5 file lock (it would conflict with the
     * output module's lock where flock is emulated by fcntl locks, as on NFS) */
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    H5Pset_file_locking(fapl, 0, 1);
    /* HDF5 1.10's file format: checksummed superblock, object headers and chunk indexes (FORMAT.md,
     * "Integrity"), so a damaged byte there is an error, not a crash or another chunk's values */
    H5Pset_libver_bounds(fapl, H5F_LIBVER_V110, H5F_LIBVER_V110);
    w->file = H5Fcreate(kv_out_temp(w->out), H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    if (w->file < 0) {
        rc = kv_error(KV_EIO, "%s: cannot create (%s)", path, h5_reason());
        goto fail;
    }
    hid_t layers = H5Gcreate2(w->file, "/layers", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    for (int l = 0; l < meta->n_layers && rc == KV_OK; l++) {
        char g[32];
        snprintf(g, sizeof g, "%d", l);
        hid_t gid = H5Gcreate2(layers, g, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        for (int which = 0; which < KV_T_COUNT && rc == KV_OK; which++) {
            if (!kv_tensor_present(meta, (kv_tensor_t)which))
                continue;
            int rank;
            hsize_t dims[3];
            hid_t dcpl = make_dcpl(meta, (kv_tensor_t)which, &w->opts, &rank, dims);
            hid_t sp = H5Screate_simple(rank, dims, NULL);
            hid_t type = (which <= KV_T_V && w->opts.dtype == KV_DTYPE_F16) ? f16_type() : H5T_IEEE_F32LE;
            hid_t d = H5Dcreate2(gid, kv_tensor_name((kv_tensor_t)which), type, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
            if (d < 0)
                rc = kv_error(KV_EIO, "%s: cannot create dataset layers/%d/%s (%s)", path, l,
                              kv_tensor_name((kv_tensor_t)which), h5_reason());
            else
                H5Dclose(d);
            H5Sclose(sp);
            H5Pclose(dcpl);
        }
        H5Gclose(gid);
    }
    H5Gclose(layers);
    if (rc)
        goto fail;
    *out = w;
    return KV_OK;
fail:
    kv_trace_abort(w);
    return rc;
}

kv_trace_meta_t *kv_trace_writer_meta(kv_trace_writer_t *w)
{
    return &w->meta;
}

/* ---------------------------------------------------------------- writing tensors
 *
 * HDF5 runs its filter pipeline (shuffle, zstd) on the calling thread, one chunk after the other,
 * and that pipeline was two thirds of a trace's write time. So whole chunks are compressed here, in
 * parallel, exactly as the pipeline would (write_direct), and stored as they are with
 * H5Dwrite_chunk (filter mask 0: every filter applied). Only rows that fill part of a chunk take
 * HDF5's own path (write_plain). The stored chunks are the bytes the pipeline makes (a test compares
 * them), so the format does not change. */

/* What write_direct needs to know about a dataset, from its creation properties: rank 2 is padded
 * with a unit third axis. */
typedef struct {
    int rank;
    size_t dims[3], chunk[3];
    size_t esize; /* bytes per element in the file (2: f16, 4: f32) */
    int level;    /* zstd level (the filter's one cd_value) */
} direct_plan_t;

/* 1 when the dataset is chunked with exactly shuffle then zstd (one cd_value), and its element type
 * is `want` (f16_type() or H5T_IEEE_F32LE) in this machine's byte order, so chunks can be made here. */
static int direct_plan(hid_t d, hid_t want, direct_plan_t *p)
{
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    (void)d, (void)want, (void)p;
    return 0; /* the elements would need swapping to the file's little-endian order */
#else
    memset(p, 0, sizeof *p);
    hid_t dcpl = H5Dget_create_plist(d), ft = H5Dget_type(d), sp = H5Dget_space(d);
    int ok = dcpl >= 0 && ft >= 0 && sp >= 0 && H5Pget_layout(dcpl) == H5D_CHUNKED && H5Tequal(ft, want) > 0;
    hsize_t dims[3] = {1, 1, 1}, chunk[3] = {1, 1, 1};
    if (ok) {
        p->rank = H5Sget_simple_extent_ndims(sp);
        ok = (p->rank == 2 || p->rank == 3) && H5Pget_chunk(dcpl, 3, chunk) == p->rank &&
             H5Sget_simple_extent_dims(sp, dims, NULL) == p->rank && H5Pget_nfilters(dcpl) == 2;
        p->esize = H5Tget_size(ft);
    }
    unsigned flags, cd[4];
    size_t ncd = 4;
    char fname[32];
    if (ok)
        ok = H5Pget_filter2(dcpl, 0, &flags, &ncd, cd, sizeof fname, fname, NULL) == H5Z_FILTER_SHUFFLE && ncd >= 1 &&
             cd[0] == p->esize;
    ncd = 4;
    if (ok)
        ok = H5Pget_filter2(dcpl, 1, &flags, &ncd, cd, sizeof fname, fname, NULL) == KV_ZSTD_FILTER_ID && ncd == 1;
    p->level = ok ? (int)cd[0] : 0;
    for (int i = 0; i < 3; i++) {
        p->dims[i] = (size_t)dims[i];
        p->chunk[i] = (size_t)chunk[i];
        ok = ok && chunk[i] > 0;
    }
    if (dcpl >= 0)
        H5Pclose(dcpl);
    if (ft >= 0)
        H5Tclose(ft);
    if (sp >= 0)
        H5Sclose(sp);
    H5Eclear2(H5E_DEFAULT);
    return ok;
#endif
}

/* n floats as file elements: f16 (counting overflows, the return value) or f32 copied. */
static size_t put_run(const float *src, unsigned char *dst, size_t n, size_t esize)
{
    if (esize == 2)
        return kv_f32_to_f16_n(src, (uint16_t *)(void *)dst, n);
    memcpy(dst, src, n * sizeof(float));
    return 0;
}

/* One chunk, whose first element is at `origin` in the dataset, from the slab `src` that holds the
 * dataset's rows [s0, s0 + S[1]) (S[0] x S[1] x S[2] floats) into out as file elements; the part
 * past the dataset's edge is zero (HDF5 stores edge chunks whole). Returns f16 overflows. */
static size_t gather_chunk(const direct_plan_t *p, const float *src, const size_t S[3], size_t s0,
                           const size_t origin[3], unsigned char *out)
{
    const size_t *ch = p->chunk, es = p->esize;
    size_t v[3];
    for (int i = 0; i < 3; i++)
        v[i] = KV_MIN(ch[i], p->dims[i] - origin[i]);
    if (v[0] < ch[0] || v[1] < ch[1] || v[2] < ch[2])
        memset(out, 0, ch[0] * ch[1] * ch[2] * es);
    const size_t r1 = origin[1] - s0;
    size_t over = 0;
    if (v[2] == ch[2] && v[2] == S[2]) { /* whole rows: one run per index on the first axis */
        for (size_t i0 = 0; i0 < v[0]; i0++)
            over +=
                put_run(src + ((origin[0] + i0) * S[1] + r1) * S[2], out + i0 * ch[1] * ch[2] * es, v[1] * v[2], es);
    } else {
        for (size_t i0 = 0; i0 < v[0]; i0++)
            for (size_t i1 = 0; i1 < v[1]; i1++)
                over += put_run(src + ((origin[0] + i0) * S[1] + r1 + i1) * S[2] + origin[2],
                                out + (i0 * ch[1] + i1) * ch[2] * es, v[2], es);
    }
    return over;
}

/* Byte lanes of 16-byte vectors: the even (odd) bytes of a then b. */
typedef unsigned char kv_v16u8 __attribute__((vector_size(16)));
#define EVEN_BYTES(a, b) __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
#define ODD_BYTES(a, b) __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31)

/* HDF5's shuffle filter: for n elements of s bytes, output byte b*n + i is input byte i*s + b.
 * 16 elements at a time for s = 2 and 4 (s = 4 is two rounds of even/odd splits), which compiles
 * to a few vector instructions per 16 bytes even for plain SSE2; byte by byte for the rest. */
static void shuffle_bytes(const unsigned char *restrict in, unsigned char *restrict out, size_t n, size_t s)
{
    size_t i = 0;
    kv_v16u8 a, b, c, d;
    if (s == 2) {
        for (; i + 16 <= n; i += 16) {
            memcpy(&a, in + 2 * i, 16);
            memcpy(&b, in + 2 * i + 16, 16);
            kv_v16u8 b0 = EVEN_BYTES(a, b), b1 = ODD_BYTES(a, b);
            memcpy(out + i, &b0, 16);
            memcpy(out + n + i, &b1, 16);
        }
    } else if (s == 4) {
        for (; i + 16 <= n; i += 16) {
            memcpy(&a, in + 4 * i, 16);
            memcpy(&b, in + 4 * i + 16, 16);
            memcpy(&c, in + 4 * i + 32, 16);
            memcpy(&d, in + 4 * i + 48, 16);
            /* bytes 0 and 2 of each element, then bytes 1 and 3; split again */
            kv_v16u8 e0 = EVEN_BYTES(a, b), o0 = ODD_BYTES(a, b), e1 = EVEN_BYTES(c, d), o1 = ODD_BYTES(c, d);
            kv_v16u8 b0 = EVEN_BYTES(e0, e1), b1 = EVEN_BYTES(o0, o1), b2 = ODD_BYTES(e0, e1), b3 = ODD_BYTES(o0, o1);
            memcpy(out + i, &b0, 16);
            memcpy(out + n + i, &b1, 16);
            memcpy(out + 2 * n + i, &b2, 16);
            memcpy(out + 3 * n + i, &b3, 16);
        }
    }
    for (size_t k = 0; k < s; k++)
        for (size_t j = i; j < n; j++)
            out[k * n + j] = in[j * s + k];
}

/* Per-thread zstd contexts and staging (a chunk's elements, then shuffled) for nt threads and chunks
 * of chunk_bytes, and frames_bytes for compressed chunks; kept from call to call. */
static int direct_scratch(kv_trace_writer_t *w, int nt, size_t chunk_bytes, size_t frames_bytes)
{
    int rc = chunk_pool_reserve(&w->pool, nt, chunk_bytes, w->path);
    if (rc)
        return rc;
    if (frames_bytes > w->frames_cap) {
        kv_free_aligned(w->frames);
        w->frames_cap = 0;
        if (!(w->frames = kv_malloc_aligned(frames_bytes, "compressed chunks")))
            return KV_ENOMEM;
        w->frames_cap = frames_bytes;
    }
    return KV_OK;
}

static void direct_free(kv_trace_writer_t *w)
{
    chunk_pool_free(&w->pool);
    kv_free_aligned(w->frames);
    w->frames = NULL;
    w->frames_cap = 0;
}

/* Raw bytes per batch of chunks, at least (a batch is also at least one chunk per thread). */
#define DIRECT_BATCH_BYTES (1u << 20)

/* Chunks [c_lo, c_hi) along the second axis (all of them along the others) from the slab src, which
 * holds the dataset's rows [s0, s0 + S[1]) and covers those chunks whole.
 *
 * Chunks are made (gathered, converted to f16, shuffled, compressed) by OpenMP tasks, a batch at a
 * time; while the team makes batch k, the calling thread stores batch k-1 with H5Dwrite_chunk and
 * then joins in. So HDF5 is only ever called from the calling thread, chunks are stored in index
 * order whatever the thread count (the file is the same too), and memory is two batches of frames.
 * kv_error's message is per thread, so tasks only note failures. */
static int write_direct(kv_trace_writer_t *w, hid_t d, const char *name, const direct_plan_t *p, const float *src,
                        const size_t S[3], size_t s0, size_t c_lo, size_t c_hi)
{
    const size_t *ch = p->chunk;
    const size_t n0 = (p->dims[0] + ch[0] - 1) / ch[0], n1 = c_hi - c_lo, n2 = (p->dims[2] + ch[2] - 1) / ch[2];
    const size_t n_chunks = n0 * n1 * n2, chunk_n = ch[0] * ch[1] * ch[2], chunk_bytes = chunk_n * p->esize;
    const size_t frame_cap = ZSTD_compressBound(chunk_bytes);
    const int nt = (int)KV_MAX((size_t)1, KV_MIN((size_t)omp_get_max_threads(), n_chunks));
    const size_t batch = KV_MIN(n_chunks, KV_MAX((size_t)nt, DIRECT_BATCH_BYTES / chunk_bytes));
    const size_t n_slots = 2 * batch, n_batches = (n_chunks + batch - 1) / batch;
    int rc = direct_scratch(w, nt, chunk_bytes, n_slots * frame_cap);
    if (rc)
        return rc;
    size_t *fsize = kv_calloc(2 * n_slots, sizeof(size_t), "chunk sizes");
    if (!fsize)
        return KV_ENOMEM;
    size_t *over = fsize + n_slots;
    (void)kv_f32_to_f16_n(NULL, NULL, 0); /* settles the converter's CPU dispatch before threads use it */
    int failed = 0;                       /* set by the calling thread: the tasks left skip their work */
#pragma omp parallel num_threads(nt) if (nt > 1)
#pragma omp master
    for (size_t k = 0; k <= n_batches; k++) {
        for (size_t i = k * batch; k < n_batches && i < KV_MIN((k + 1) * batch, n_chunks); i++) {
#pragma omp task firstprivate(i)
            {
                const size_t slot = i % n_slots, c0 = i / (n1 * n2), c1 = c_lo + i / n2 % n1, c2 = i % n2;
                const size_t origin[3] = {c0 * ch[0], c1 * ch[1], c2 * ch[2]};
                unsigned char *elems = w->pool.stage[omp_get_thread_num()], *shuf = elems + chunk_bytes;
                int stop;
#pragma omp atomic read
                stop = failed;
                fsize[slot] = 0;
                if (!stop) {
                    over[slot] = gather_chunk(p, src, S, s0, origin, elems);
                    shuffle_bytes(elems, shuf, chunk_n, p->esize);
                    fsize[slot] = kv_zstd_compress_chunk((ZSTD_CCtx *)w->pool.zctx[omp_get_thread_num()], p->level,
                                                         w->frames + slot * frame_cap, frame_cap, shuf, chunk_bytes);
                }
            }
        }
        /* store the previous batch while the team makes this one */
        for (size_t i = k ? (k - 1) * batch : 0; k > 0 && rc == KV_OK && i < KV_MIN(k * batch, n_chunks); i++) {
            const size_t slot = i % n_slots, c0 = i / (n1 * n2), c1 = c_lo + i / n2 % n1, c2 = i % n2;
            const hsize_t off[3] = {c0 * ch[0], c1 * ch[1], c2 * ch[2]};
            if (fsize[slot] == 0)
                rc = kv_error(KV_EIO, "%s: cannot compress a chunk of %s (zstd level %d)", w->path, name, p->level);
            else if (H5Dwrite_chunk(d, H5P_DEFAULT, 0, off, fsize[slot], w->frames + slot * frame_cap) < 0)
                rc = kv_error(KV_EIO, "%s: cannot write a chunk of %s (%s)", w->path, name, h5_reason());
            else
                w->meta.f16_overflow += (long)over[slot];
            if (rc != KV_OK) {
#pragma omp atomic write
                failed = 1;
            }
        }
#pragma omp taskwait
    }
    kv_free(fsize);
    return rc;
}

/* Rows [r0, r0 + rn) of the dataset through H5Dwrite (HDF5's filter pipeline), from the slab src
 * that holds rows [s0, s0 + S[1]) (S[0] x S[1] x S[2] floats). */
static int write_plain(kv_trace_writer_t *w, hid_t d, const char *name, int rank, int f16, const float *src,
                       const size_t S[3], size_t s0, size_t r0, size_t rn)
{
    const size_t es = f16 ? 2 : 4, run = rn * S[2], n = S[0] * run;
    const void *buf = src;
    long over = 0;
    if (f16 || rn != S[1]) { /* converted or gathered into (S[0], rn, S[2]) */
        if (w->plain_cap < n * es) {
            unsigned char *b = kv_malloc(n * es, "trace write buffer");
            if (!b)
                return KV_ENOMEM;
            kv_free(w->plain);
            w->plain = b;
            w->plain_cap = n * es;
        }
        for (size_t i0 = 0; i0 < S[0]; i0++)
            over += (long)put_run(src + (i0 * S[1] + (r0 - s0)) * S[2], w->plain + i0 * run * es, run, es);
        buf = w->plain;
    }
    hsize_t start[3] = {0, r0, 0}, count[3] = {S[0], rn, S[2]};
    hid_t fs = H5Dget_space(d);
    H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL);
    hid_t ms = H5Screate_simple(rank, count, NULL);
    int rc = KV_OK;
    if (H5Dwrite(d, f16 ? f16_type() : H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, buf) < 0)
        rc = kv_error(KV_EIO, "%s: cannot write %s (%s)", w->path, name, h5_reason());
    else
        w->meta.f16_overflow += over;
    H5Sclose(ms);
    H5Sclose(fs);
    return rc;
}

/* NaN and inf among the values the slab stores (with f16 storage, finite values that round beyond
 * its range become inf too), per head of the first axis. */
static void count_nonfinite(kv_trace_writer_t *w, int layer, kv_tensor_t which, const float *src, const size_t S[3],
                            int f16)
{
    const size_t per = S[1] * S[2];
    long *nf = w->nonfinite + ((size_t)layer * KV_T_COUNT + (size_t)which) * (size_t)w->meta.n_heads;
    for (size_t h = 0; h < S[0]; h++) {
        const float *x = src + h * per;
        long n = 0;
        for (size_t i = 0; i < per; i++)
            n += !(fabsf(x[i]) < (f16 ? 65520.0f : INFINITY)); /* NaN compares false */
        if (n) {
            nf[which == KV_T_WO ? 0 : h] += n;
            w->meta.nonfinite += n;
        }
    }
}

/* Commit's warning: where the writer stored NaN or inf, layer, tensor and head, at most 8 places. */
static void warn_nonfinite(const kv_trace_writer_t *w)
{
    if (w->meta.nonfinite <= 0)
        return;
    char list[512] = "";
    size_t k = 0;
    int shown = 0, places = 0;
    const int H = w->meta.n_heads;
    for (int l = 0; l < w->meta.n_layers; l++)
        for (int t = 0; t < KV_T_COUNT; t++)
            for (int h = 0; h < H; h++) {
                const long n = w->nonfinite[((size_t)l * KV_T_COUNT + (size_t)t) * (size_t)H + (size_t)h];
                if (!n)
                    continue;
                places++;
                if (shown++ >= 8 || k >= sizeof list)
                    continue;
                if (t == KV_T_WO)
                    k += (size_t)snprintf(list + k, sizeof list - k, "%slayer %d wo: %ld", shown > 1 ? ", " : "", l, n);
                else
                    k += (size_t)snprintf(list + k, sizeof list - k, "%slayer %d %s head %d: %ld",
                                          shown > 1 ? ", " : "", l, kv_tensor_name((kv_tensor_t)t), h, n);
            }
    kv_warn("%s: %ld NaN or infinite value%s stored (%s%s)%s; replay reports the rows that read them as nan", w->path,
            w->meta.nonfinite, w->meta.nonfinite == 1 ? "" : "s", list, places > 8 ? ", ..." : "",
            w->meta.f16_overflow ? "; f16 overflows are among them (--dtype f32 keeps those values)" : "");
}

static int write_slab(kv_trace_writer_t *w, int layer, kv_tensor_t which, int t0, int nt, const float *src)
{
    const kv_trace_meta_t *m = &w->meta;
    if (layer < 0 || layer >= m->n_layers || (unsigned)which >= KV_T_COUNT)
        return kv_error(KV_ERANGE, "%s: layer %d / tensor %d out of range", w->path, layer, (int)which);
    if (!kv_tensor_present(m, which))
        return kv_error(KV_EINVAL, "%s: tensor '%s' was not declared in the trace meta", w->path,
                        kv_tensor_name(which));
    char name[64];
    dset_path(name, sizeof name, layer, which);
    uint64_t dims[3];
    int rank = kv_tensor_dims(m, which, dims);
    /* the slab: rows [s0, s0 + S[1]) of the second axis, everything of the others (rank 2: S[2] = 1) */
    size_t S[3] = {(size_t)dims[0], (size_t)dims[1], rank == 3 ? (size_t)dims[2] : 1}, s0 = 0;
    if (t0 >= 0) {
        if (t0 + nt > m->n_tokens)
            return kv_error(KV_ERANGE, "%s: rows [%d, %d) beyond %d tokens", w->path, t0, t0 + nt, m->n_tokens);
        if (which == KV_T_Q && t0 < m->q_start)
            return kv_error(KV_EINTERNAL, "%s: query rows before q_start %d reached the writer", w->path, m->q_start);
        s0 = (size_t)(which == KV_T_Q ? t0 - m->q_start : t0);
        S[1] = (size_t)nt;
    }
    if (S[0] * S[1] * S[2] == 0)
        return KV_OK;
    hid_t d = H5Dopen2(w->file, name, H5P_DEFAULT);
    if (d < 0)
        return kv_error(KV_EIO, "%s: dataset %s missing (%s)", w->path, name, h5_reason());
    const int f16 = which <= KV_T_V && w->opts.dtype == KV_DTYPE_F16;
    count_nonfinite(w, layer, which, src, S, f16);
    /* chunks the slab covers whole along the second axis (the last one may end at the dataset's
     * edge), [c_lo, c_hi); the rows of partly covered chunks before and after them go to write_plain */
    direct_plan_t p;
    size_t c_lo = 0, c_hi = 0, a = s0, b = s0;
    if (direct_plan(d, f16 ? f16_type() : H5T_IEEE_F32LE, &p)) {
        const size_t ct = p.chunk[1], end = s0 + S[1];
        c_lo = (s0 + ct - 1) / ct;
        c_hi = end == p.dims[1] ? (end + ct - 1) / ct : end / ct;
        if (c_hi > c_lo) {
            a = c_lo * ct;
            b = KV_MIN(c_hi * ct, end);
        }
    }
    int rc = KV_OK;
    if (b > a)
        rc = write_direct(w, d, name, &p, src, S, s0, c_lo, c_hi);
    if (rc == KV_OK && a > s0)
        rc = write_plain(w, d, name, rank, f16, src, S, s0, s0, a - s0);
    if (rc == KV_OK && s0 + S[1] > b)
        rc = write_plain(w, d, name, rank, f16, src, S, s0, b, s0 + S[1] - b);
    H5Dclose(d);
    return rc;
}

int kv_trace_write_rows(kv_trace_writer_t *w, int layer, kv_tensor_t which, int t0, int nt, const float *src)
{
    if (!kv_tensor_per_token(which))
        return kv_error(KV_EINVAL, "%s: '%s' is not indexed by token", w->path, kv_tensor_name(which));
    if (t0 < 0 || nt < 0)
        return kv_error(KV_ERANGE, "%s: bad row range", w->path);
    const int qs = w->meta.q_start;
    if (which == KV_T_Q && t0 < qs) { /* a lean trace: drop the rows of tokens before q_start */
        const int skip = KV_MIN(qs - t0, nt), keep = nt - skip, H = w->meta.n_heads, d = w->meta.head_dim;
        if (keep <= 0)
            return KV_OK;
        float *tail = kv_malloc(sizeof(float) * (size_t)H * keep * d, "query rows");
        if (!tail)
            return KV_ENOMEM;
        for (int h = 0; h < H; h++)
            memcpy(tail + (size_t)h * keep * d, src + ((size_t)h * nt + skip) * d, sizeof(float) * (size_t)keep * d);
        int rc = write_slab(w, layer, which, qs, keep, tail);
        kv_free(tail);
        return rc;
    }
    return write_slab(w, layer, which, t0, nt, src);
}

int kv_trace_write(kv_trace_writer_t *w, int layer, kv_tensor_t which, const float *src)
{
    return write_slab(w, layer, which, -1, 0, src);
}

/* A 1-D integer dataset, chunked with HDF5's Fletcher32 checksum filter (built into every HDF5), so
 * that its stored bytes are checked on every read like the zstd frames of the tensors. */
static int write_i32(hid_t file, const char *name, const int32_t *v, int n)
{
    hsize_t dims[1] = {(hsize_t)n}, chunk[1] = {(hsize_t)KV_MIN(KV_MAX(n, 1), 1 << 20)};
    hid_t sp = H5Screate_simple(1, dims, NULL), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, 1, chunk);
    H5Pset_fletcher32(dcpl);
    hid_t d = H5Dcreate2(file, name, H5T_STD_I32LE, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    herr_t e = d < 0 ? -1 : H5Dwrite(d, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, v);
    if (d >= 0)
        H5Dclose(d);
    H5Pclose(dcpl);
    H5Sclose(sp);
    return e < 0 ? kv_error(KV_EIO, "cannot write dataset %s (%s)", name, h5_reason()) : KV_OK;
}

static int write_meta(kv_trace_writer_t *w)
{
    kv_trace_meta_t *m = &w->meta;
    hid_t f = w->file;
    int rc;
    if (!m->tool_version[0])
        snprintf(m->tool_version, sizeof m->tool_version, "%s", KV_VERSION);
    if (!m->git_revision[0])
        snprintf(m->git_revision, sizeof m->git_revision, "%s", kv_git_revision());
    if (!m->created[0])
        kv_iso_time(m->created, sizeof m->created);
    if ((rc = put_str(f, "format", KV_TRACE_FORMAT)) || (rc = put_int(f, "format_version", KV_TRACE_FORMAT_VERSION)))
        return rc;
    struct {
        const char *name;
        long long v;
    } ints[] = {
        {"n_layers", m->n_layers},
        {"n_heads", m->n_heads},
        {"n_kv_heads", m->n_kv_heads},
        {"head_dim", m->head_dim},
        {"n_tokens", m->n_tokens},
        {"n_prompt", m->n_prompt},
        {"n_decode", m->n_tokens - m->n_prompt},
        {"n_segments", m->n_segments},
        {"has_summaries", m->has_summaries},
        {"has_stats", m->has_stats},
        {"stats_split", m->stats_split},
        {"q_start", m->q_start},
        {"pool", m->pool},
        {"has_wo", m->has_wo},
        {"model_dim", m->model_dim},
        {"hidden_dim", m->hidden_dim},
        {"vocab_size", m->vocab_size},
        {"seq_len", m->seq_len},
        {"zstd_level", m->zstd_level},
        {"f16_overflow", m->f16_overflow},
        {"nonfinite", m->nonfinite},
    };
    for (size_t i = 0; i < KV_ARRAY_LEN(ints); i++)
        if ((rc = put_int(f, ints[i].name, ints[i].v)))
            return rc;
    if ((rc = put_double(f, "rope_theta", m->rope_theta)) || (rc = put_double(f, "norm_eps", m->norm_eps)))
        return rc;
    struct {
        const char *name, *v;
    } strs[] = {
        {"dtype", m->dtype == KV_DTYPE_F16 ? "f16" : "f32"},
        {"source", m->source},
        {"model", m->model},
        {"model_sha256", m->model_sha256},
        {"tokenizer", m->tokenizer},
        {"tool_version", m->tool_version},
        {"git_revision", m->git_revision},
        {"created", m->created},
        {"backend", m->backend},
        {"generator", m->generator},
        {"prompt", m->prompt},
    };
    for (size_t i = 0; i < KV_ARRAY_LEN(strs); i++)
        if ((rc = put_str(f, strs[i].name, strs[i].v)))
            return rc;
    if (m->tokens && (rc = write_i32(f, "/tokens", m->tokens, m->n_tokens)))
        return rc;
    if (m->positions && (rc = write_i32(f, "/positions", m->positions, m->n_tokens)))
        return rc;
    if (m->n_segments > 0 && (rc = write_i32(f, "/segments", m->segments, m->n_segments)))
        return rc;
    if ((rc = meta_digest(m, KV_TRACE_FORMAT_VERSION, m->meta_sha256)) ||
        (rc = put_str(f, "meta_sha256", m->meta_sha256)))
        return rc;
    return KV_OK;
}

int kv_trace_commit(kv_trace_writer_t *w)
{
    int rc = kv_trace_meta_validate(&w->meta, w->path);
    if (rc == KV_OK)
        rc = write_meta(w);
    if (rc != KV_OK) {
        kv_trace_abort(w);
        return rc;
    }
    herr_t e = H5Fclose(w->file);
    w->file = -1;
    if (e < 0) {
        rc = kv_error(KV_EIO, "%s: cannot finish writing (%s)", w->path, h5_reason());
        kv_trace_abort(w);
        return rc;
    }
    rc = kv_out_commit(w->out); /* fsync, rename, folder fsync; removes the temporary file on failure */
    w->out = NULL;
    if (rc) {
        kv_trace_abort(w);
        return rc;
    }
    warn_nonfinite(w);
    kv_free(w->nonfinite);
    kv_trace_meta_free(&w->meta);
    kv_free(w->plain);
    direct_free(w);
    kv_free(w);
    return KV_OK;
}

void kv_trace_abort(kv_trace_writer_t *w)
{
    if (!w)
        return;
    if (w->file >= 0 && H5Fclose(w->file) < 0)
        H5Eclear2(H5E_DEFAULT); /* a file that cannot be flushed (a full disk): removed below anyway */
    kv_out_abort(w->out);
    kv_free(w->nonfinite);
    kv_trace_meta_free(&w->meta);
    kv_free(w->plain);
    direct_free(w);
    kv_free(w);
}

/* ---------------------------------------------------------------- reading whole chunks
 *
 * The mirror image of write_direct: HDF5 would decompress and un-shuffle one chunk after the other
 * on the calling thread (a fifth of a replay's time on a 2-core machine, most of it on a GPU host).
 * So whole chunks are fetched as stored with H5Dread_chunk and decoded here, in parallel: zstd (one
 * frame per chunk that records its size, kv_zstd_filter.h), un-shuffle, f16 -> f32, and only the
 * part inside the dataset copied to the destination (edge chunks are stored padded). The result is
 * the bytes HDF5's pipeline gives (the decoding is the same; a test compares them). Anything the
 * writer does not make goes back to H5Dread: another pipeline, a chunk stored with a filter
 * skipped (mask not 0) or never written, a frame without content size or of another size, rows
 * that cut chunks. */

/* Inverse of shuffle_bytes: output byte i*s + b is input byte b*n + i (interleaving byte lanes). */
#define LO_HALVES(a, b) __builtin_shufflevector(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23)
#define HI_HALVES(a, b) __builtin_shufflevector(a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31)
static void unshuffle_bytes(const unsigned char *restrict in, unsigned char *restrict out, size_t n, size_t s)
{
    size_t i = 0;
    kv_v16u8 a, b, c, d;
    if (s == 2) {
        for (; i + 16 <= n; i += 16) {
            memcpy(&a, in + i, 16);
            memcpy(&b, in + n + i, 16);
            kv_v16u8 o0 = LO_HALVES(a, b), o1 = HI_HALVES(a, b);
            memcpy(out + 2 * i, &o0, 16);
            memcpy(out + 2 * i + 16, &o1, 16);
        }
    } else if (s == 4) {
        for (; i + 16 <= n; i += 16) {
            memcpy(&a, in + i, 16);
            memcpy(&b, in + n + i, 16);
            memcpy(&c, in + 2 * n + i, 16);
            memcpy(&d, in + 3 * n + i, 16);
            /* bytes 0 and 2 of each element side by side, bytes 1 and 3 too; then those pairs */
            kv_v16u8 x0 = LO_HALVES(a, c), x1 = HI_HALVES(a, c), y0 = LO_HALVES(b, d), y1 = HI_HALVES(b, d);
            kv_v16u8 o0 = LO_HALVES(x0, y0), o1 = HI_HALVES(x0, y0), o2 = LO_HALVES(x1, y1), o3 = HI_HALVES(x1, y1);
            memcpy(out + 4 * i, &o0, 16);
            memcpy(out + 4 * i + 16, &o1, 16);
            memcpy(out + 4 * i + 32, &o2, 16);
            memcpy(out + 4 * i + 48, &o3, 16);
        }
    }
    for (size_t k = 0; k < s; k++)
        for (size_t j = i; j < n; j++)
            out[j * s + k] = in[k * n + j];
}

/* n file elements as floats: f16 converted, f32 copied. */
static void get_run(const unsigned char *src, float *dst, size_t n, size_t esize)
{
    if (esize == 2)
        kv_f16_to_f32_n((const uint16_t *)(const void *)src, dst, n);
    else
        memcpy(dst, src, n * sizeof(float));
}

/* Inverse of gather_chunk: the part inside the dataset of the chunk at `origin` (file elements in
 * `in`) into dst, which holds the dataset's rows [r0, r0 + D[1]) (D[0] x D[1] x D[2] floats). */
static void scatter_chunk(const direct_plan_t *p, const unsigned char *in, float *dst, const size_t D[3], size_t r0,
                          const size_t origin[3])
{
    const size_t *ch = p->chunk, es = p->esize;
    size_t v[3];
    for (int i = 0; i < 3; i++)
        v[i] = KV_MIN(ch[i], p->dims[i] - origin[i]);
    const size_t r1 = origin[1] - r0;
    if (v[2] == ch[2] && v[2] == D[2]) { /* whole rows: one run per index on the first axis */
        for (size_t i0 = 0; i0 < v[0]; i0++)
            get_run(in + i0 * ch[1] * ch[2] * es, dst + ((origin[0] + i0) * D[1] + r1) * D[2], v[1] * v[2], es);
    } else {
        for (size_t i0 = 0; i0 < v[0]; i0++)
            for (size_t i1 = 0; i1 < v[1]; i1++)
                get_run(in + (i0 * ch[1] + i1) * ch[2] * es,
                        dst + ((origin[0] + i0) * D[1] + r1 + i1) * D[2] + origin[2], v[2], es);
    }
}

/* Per-thread zstd contexts and staging for nt threads and chunks of chunk_bytes, and n_raw slots
 * for stored chunks; kept from call to call. */
static int read_scratch(h5_impl_t *hi, int nt, size_t chunk_bytes, int n_raw, const char *path)
{
    int rc = chunk_pool_reserve(&hi->pool, nt, chunk_bytes, path);
    if (rc)
        return rc;
    if (n_raw > hi->n_raw) {
        unsigned char **r = kv_calloc((size_t)n_raw, sizeof *r, "stored chunks");
        size_t *cap = kv_calloc((size_t)n_raw, sizeof *cap, "stored chunks");
        if (!r || !cap) {
            kv_free(r);
            kv_free(cap);
            return KV_ENOMEM;
        }
        for (int i = 0; i < hi->n_raw; i++) {
            r[i] = hi->raw[i];
            cap[i] = hi->raw_cap[i];
        }
        kv_free(hi->raw);
        kv_free(hi->raw_cap);
        hi->raw = r;
        hi->raw_cap = cap;
        hi->n_raw = n_raw;
    }
    return KV_OK;
}

static void read_direct_free(h5_impl_t *hi)
{
    chunk_pool_free(&hi->pool);
    for (int i = 0; i < hi->n_raw; i++)
        kv_free(hi->raw[i]);
    kv_free(hi->raw);
    kv_free(hi->raw_cap);
    hi->raw = NULL;
    hi->raw_cap = NULL;
    hi->n_raw = 0;
}

/* Fetch the stored chunk at `off` into slot `slot` (calling thread: HDF5). Returns KV_OK,
 * READ_FALLBACK when the chunk is not one kvsim writes, or an error. *size gets its bytes. */
static int fetch_chunk(h5_impl_t *hi, kv_trace_t *t, hid_t d, const char *name, const hsize_t off[3],
                       size_t chunk_bytes, size_t slot, size_t *size)
{
    hsize_t stored = 0;
    uint32_t mask = 0;
    *size = 0;
    if (H5Dget_chunk_storage_size(d, off, &stored) < 0 || stored == 0) {
        H5Eclear2(H5E_DEFAULT);
        return READ_FALLBACK; /* never written: HDF5 gives the fill value */
    }
    if (stored > hi->raw_cap[slot]) {
        kv_free(hi->raw[slot]);
        hi->raw_cap[slot] = 0;
        if (!(hi->raw[slot] = kv_malloc((size_t)stored, "stored chunk")))
            return KV_ENOMEM;
        hi->raw_cap[slot] = (size_t)stored;
    }
    if (H5Dread_chunk(d, H5P_DEFAULT, off, &mask, hi->raw[slot]) < 0)
        return kv_error(KV_EIO, "%s: cannot read a chunk of '%s' at (%llu, %llu, %llu) (%s)", t->path, name,
                        (unsigned long long)off[0], (unsigned long long)off[1], (unsigned long long)off[2],
                        h5_reason());
    if (mask != 0)
        return READ_FALLBACK; /* a filter was skipped for this chunk: the pipeline knows which */
    unsigned long long content = ZSTD_getFrameContentSize(hi->raw[slot], (size_t)stored);
    if (content == ZSTD_CONTENTSIZE_ERROR)
        return kv_error(KV_EFORMAT, "%s: '%s': the chunk at (%llu, %llu, %llu) is not a zstd frame (corrupt file)",
                        t->path, name, (unsigned long long)off[0], (unsigned long long)off[1],
                        (unsigned long long)off[2]);
    if (content != (unsigned long long)chunk_bytes)
        return READ_FALLBACK; /* no content size (another writer's convention) or another size */
    *size = (size_t)stored;
    return KV_OK;
}

/* Raw bytes per batch of chunks, at least (a batch is also at least one chunk per thread). Larger
 * than the writer's: each batch ends in a taskwait, which costs most when other processes share the
 * cores (on a loaded 2-core machine, 1 MiB batches read a 2K Llama-shape trace slower than 8 MiB
 * ones in each of three interleaved runs: 89-116 against 39-95 ms a layer). Memory: the stored chunks of two batches,
 * 16 of kvsim's 1 MiB chunks for up to 8 threads, two per thread beyond. */
#define READ_BATCH_BYTES (8u << 20)

/* Chunks are fetched a batch at a time by the calling thread (the only one that calls HDF5) and
 * decoded by OpenMP tasks while it fetches the next batch; each task writes only its chunk's part of
 * dst, so the result does not depend on the thread count. Tasks note zstd failures in their slot
 * (kv_error's message is per thread) and the calling thread reports them. */
static int read_direct(kv_trace_t *t, hid_t d, const char *name, int f16, int t0, int nt, float *dst)
{
    h5_impl_t *hi = t->impl;
    direct_plan_t p;
    if (!direct_plan(d, f16 ? f16_type() : H5T_IEEE_F32LE, &p))
        return READ_FALLBACK;
    const size_t *ch = p.chunk, ct = ch[1];
    /* rows [r0, r1): whole chunks only (the last may end at the dataset's edge) */
    const size_t r0 = t0 >= 0 ? (size_t)t0 : 0, r1 = t0 >= 0 ? (size_t)t0 + (size_t)nt : p.dims[1];
    if (r0 % ct || (r1 % ct && r1 != p.dims[1]) || r1 <= r0)
        return READ_FALLBACK;
    const size_t c_lo = r0 / ct, n0 = (p.dims[0] + ch[0] - 1) / ch[0], n1 = (r1 + ct - 1) / ct - c_lo,
                 n2 = (p.dims[2] + ch[2] - 1) / ch[2];
    const size_t n_chunks = n0 * n1 * n2, chunk_n = ch[0] * ch[1] * ch[2], chunk_bytes = chunk_n * p.esize;
    const size_t D[3] = {p.dims[0], r1 - r0, p.dims[2]};
    const int nt_omp = (int)KV_MAX((size_t)1, KV_MIN((size_t)omp_get_max_threads(), n_chunks));
    const size_t batch = KV_MIN(n_chunks, KV_MAX((size_t)nt_omp, READ_BATCH_BYTES / chunk_bytes));
    const size_t n_slots = 2 * batch, n_batches = (n_chunks + batch - 1) / batch;
    int rc = read_scratch(hi, nt_omp, chunk_bytes, (int)n_slots, t->path);
    if (rc)
        return rc;
    size_t *fsize = kv_calloc(2 * n_slots, sizeof(size_t), "chunk sizes");
    if (!fsize)
        return KV_ENOMEM;
    size_t *zret = fsize + n_slots; /* per slot: what ZSTD_decompressDCtx returned */
    kv_f16_to_f32_n(NULL, NULL, 0); /* settles the converter's CPU dispatch before threads use it */
    int failed = 0;                 /* set by the calling thread: the tasks left skip their work */
#pragma omp parallel num_threads(nt_omp) if (nt_omp > 1)
#pragma omp master
    for (size_t k = 0; k <= n_batches; k++) {
        /* fetch batch k while the team decodes batch k-1 */
        for (size_t i = k * batch; k < n_batches && rc == KV_OK && i < KV_MIN((k + 1) * batch, n_chunks); i++) {
            const size_t slot = i % n_slots, c0 = i / (n1 * n2), c1 = c_lo + i / n2 % n1, c2 = i % n2;
            const hsize_t off[3] = {c0 * ch[0], c1 * ch[1], c2 * ch[2]};
            rc = fetch_chunk(hi, t, d, name, off, chunk_bytes, slot, &fsize[slot]);
        }
        if (rc != KV_OK) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp taskwait
        /* batch k-1 is decoded: report its failures */
        for (size_t i = k ? (k - 1) * batch : 0; k > 0 && rc == KV_OK && i < KV_MIN(k * batch, n_chunks); i++) {
            const size_t slot = i % n_slots;
            if (zret[slot] != chunk_bytes) {
                const size_t c0 = i / (n1 * n2), c1 = c_lo + i / n2 % n1, c2 = i % n2;
                rc = kv_error(KV_EFORMAT, "%s: '%s': cannot decompress the chunk at (%zu, %zu, %zu): %s (corrupt file)",
                              t->path, name, c0 * ch[0], c1 * ch[1], c2 * ch[2],
                              ZSTD_isError(zret[slot]) ? ZSTD_getErrorName(zret[slot]) : "wrong size");
#pragma omp atomic write
                failed = 1;
            }
        }
        for (size_t i = k * batch; k < n_batches && rc == KV_OK && i < KV_MIN((k + 1) * batch, n_chunks); i++) {
#pragma omp task firstprivate(i)
            {
                const size_t slot = i % n_slots, c0 = i / (n1 * n2), c1 = c_lo + i / n2 % n1, c2 = i % n2;
                const size_t origin[3] = {c0 * ch[0], c1 * ch[1], c2 * ch[2]};
                const int me = omp_get_thread_num();
                unsigned char *shuf = hi->pool.stage[me], *elems = shuf + chunk_bytes;
                int stop;
#pragma omp atomic read
                stop = failed;
                zret[slot] = 0;
                if (!stop) {
                    zret[slot] = ZSTD_decompressDCtx((ZSTD_DCtx *)hi->pool.zctx[me], shuf, chunk_bytes, hi->raw[slot],
                                                     fsize[slot]);
                    if (zret[slot] == chunk_bytes) {
                        unshuffle_bytes(shuf, elems, chunk_n, p.esize);
                        scatter_chunk(&p, elems, dst, D, r0, origin);
                    }
                }
            }
        }
    }
    kv_free(fsize);
    return rc;
}

/* ---------------------------------------------------------------- checking chunks and values
 *
 * Every chunk kvsim writes is checksummed: the tensors' zstd frames carry zstd's content checksum,
 * the 1-D integer datasets have HDF5's Fletcher32 filter. check_chunk decodes one stored zstd chunk
 * as read_direct does and says whether it is sound; kv_trace_verify runs it on every chunk and then
 * checks every value (in a child process: see the sandbox above). */

/* The chunk layout of d: rank (1..3), dims, chunk dims, element bytes, the index of the zstd filter
 * in its pipeline (-1: none) and whether it has Fletcher32. 0 when d is not chunked. */
typedef struct {
    int rank, zstd, fletcher;
    hsize_t dims[3], chunk[3];
    size_t esize;
} chunk_layout_t;

static int chunk_layout(hid_t d, chunk_layout_t *L)
{
    memset(L, 0, sizeof *L);
    L->zstd = -1;
    hid_t dcpl = H5Dget_create_plist(d), sp = H5Dget_space(d), ft = H5Dget_type(d);
    int ok = dcpl >= 0 && sp >= 0 && ft >= 0 && H5Pget_layout(dcpl) == H5D_CHUNKED;
    if (ok) {
        L->rank = H5Sget_simple_extent_ndims(sp);
        ok = L->rank >= 1 && L->rank <= 3 && H5Pget_chunk(dcpl, 3, L->chunk) == L->rank &&
             H5Sget_simple_extent_dims(sp, L->dims, NULL) == L->rank;
        L->esize = ft >= 0 ? H5Tget_size(ft) : 0;
        for (int i = L->rank; i < 3; i++)
            L->dims[i] = L->chunk[i] = 1;
        for (int i = 0; ok && i < 3; i++)
            ok = L->chunk[i] > 0;
        const int nf = ok ? H5Pget_nfilters(dcpl) : 0;
        for (int i = 0; i < nf; i++) {
            unsigned flags, cd[8];
            size_t ncd = 8;
            char fname[64];
            H5Z_filter_t id = H5Pget_filter2(dcpl, (unsigned)i, &flags, &ncd, cd, sizeof fname, fname, NULL);
            if (id == KV_ZSTD_FILTER_ID)
                L->zstd = i;
            else if (id == H5Z_FILTER_FLETCHER32)
                L->fletcher = 1;
        }
    }
    if (dcpl >= 0)
        H5Pclose(dcpl);
    if (sp >= 0)
        H5Sclose(sp);
    if (ft >= 0)
        H5Tclose(ft);
    H5Eclear2(H5E_DEFAULT);
    return ok;
}

typedef struct {
    ZSTD_DCtx *z;
    unsigned char *raw, *dec;
    size_t raw_cap, dec_cap;
} chunk_check_t;

static void chunk_check_free(chunk_check_t *c)
{
    ZSTD_freeDCtx(c->z);
    kv_free(c->raw);
    kv_free(c->dec);
    memset(c, 0, sizeof *c);
}

/* The zstd chunk of d at `off`: 0 when it decodes and its checksum matches, 1 when it decodes but
 * carries no checksum (an older writer, or zstd skipped for it), -1 when it is bad (why says how),
 * -2 when out of memory. */
static int check_chunk(hid_t d, const chunk_layout_t *L, const hsize_t off[3], chunk_check_t *c, char *why, size_t wlen)
{
    const size_t bytes = (size_t)(L->chunk[0] * L->chunk[1] * L->chunk[2]) * L->esize;
    hsize_t stored = 0;
    if (H5Dget_chunk_storage_size(d, off, &stored) < 0 || stored == 0) {
        H5Eclear2(H5E_DEFAULT);
        snprintf(why, wlen, "never written (reads as zeros)");
        return -1;
    }
    if (!c->z && !(c->z = ZSTD_createDCtx()))
        return -2;
    if (stored > c->raw_cap) {
        kv_free(c->raw);
        c->raw_cap = 0;
        if (!(c->raw = kv_malloc((size_t)stored, "stored chunk")))
            return -2;
        c->raw_cap = (size_t)stored;
    }
    if (bytes > c->dec_cap) {
        kv_free(c->dec);
        c->dec_cap = 0;
        if (!(c->dec = kv_malloc(bytes ? bytes : 1, "decoded chunk")))
            return -2;
        c->dec_cap = bytes;
    }
    uint32_t mask = 0;
    if (H5Dread_chunk(d, H5P_DEFAULT, off, &mask, c->raw) < 0) {
        snprintf(why, wlen, "cannot be read (%s)", h5_reason());
        return -1;
    }
    if (mask & (1u << L->zstd))
        return 1; /* stored without zstd, so without its checksum */
    const unsigned char *r = c->raw;
    if (stored < 6 || r[0] != 0x28 || r[1] != 0xb5 || r[2] != 0x2f || r[3] != 0xfd) {
        snprintf(why, wlen, "not a zstd frame");
        return -1;
    }
    const int has_checksum = (r[4] >> 2) & 1; /* Frame_Header_Descriptor: Content_Checksum_flag */
    const size_t got = ZSTD_decompressDCtx(c->z, c->dec, bytes, c->raw, (size_t)stored);
    if (ZSTD_isError(got)) {
        snprintf(why, wlen, "%s (zstd: %s)",
                 ZSTD_getErrorCode(got) == ZSTD_error_checksum_wrong ? "checksum mismatch" : "cannot be decompressed",
                 ZSTD_getErrorName(got));
        return -1;
    }
    if (got != bytes) {
        snprintf(why, wlen, "decompresses to %zu bytes, a chunk has %zu", got, bytes);
        return -1;
    }
    return has_checksum ? 0 : 1;
}

/* Chunk coordinates of chunk number i, in row-major order, with the second axis limited to chunks
 * [c_lo, c_lo + n1). */
static void chunk_origin(const chunk_layout_t *L, size_t i, size_t c_lo, size_t n1, hsize_t off[3])
{
    const size_t n2 = (size_t)((L->dims[2] + L->chunk[2] - 1) / L->chunk[2]);
    off[0] = (hsize_t)(i / (n1 * n2)) * L->chunk[0];
    off[1] = (hsize_t)(c_lo + i / n2 % n1) * L->chunk[1];
    off[2] = (hsize_t)(i % n2) * L->chunk[2];
}

static void where_chunk(const chunk_layout_t *L, const hsize_t off[3], char *buf, size_t len)
{
    if (L->rank == 1)
        snprintf(buf, len, "(%llu)", (unsigned long long)off[0]);
    else if (L->rank == 2)
        snprintf(buf, len, "(%llu, %llu)", (unsigned long long)off[0], (unsigned long long)off[1]);
    else
        snprintf(buf, len, "(%llu, %llu, %llu)", (unsigned long long)off[0], (unsigned long long)off[1],
                 (unsigned long long)off[2]);
}

static int find_bad_chunk(hid_t d, size_t r0, size_t nr, char *where, size_t len)
{
    chunk_layout_t L;
    if (!chunk_layout(d, &L) || L.zstd < 0 || L.rank < 2)
        return 0;
    const size_t ct = (size_t)L.chunk[1], rows = (size_t)L.dims[1];
    const size_t end = nr == (size_t)-1 ? rows : KV_MIN(rows, r0 + nr);
    const size_t c_lo = r0 / ct, n1 = end > r0 ? (end + ct - 1) / ct - c_lo : 0;
    const size_t n0 = (size_t)((L.dims[0] + L.chunk[0] - 1) / L.chunk[0]);
    const size_t n2 = (size_t)((L.dims[2] + L.chunk[2] - 1) / L.chunk[2]);
    chunk_check_t c = {0};
    int found = 0;
    for (size_t i = 0; i < n0 * n1 * n2 && !found; i++) {
        hsize_t off[3];
        char why[256], at[96];
        chunk_origin(&L, i, c_lo, n1, off);
        if (check_chunk(d, &L, off, &c, why, sizeof why) == -1) {
            where_chunk(&L, off, at, sizeof at);
            snprintf(where, len, "the chunk at %s: %s", at, why);
            found = 1;
        }
    }
    chunk_check_free(&c);
    return found;
}

typedef struct {
    kv_verify_t v;
    FILE *out;
    long lines;
} verify_t;

__attribute__((format(printf, 2, 3))) static void problem(verify_t *c, const char *fmt, ...)
{
    if (c->lines++ >= 40) {
        if (c->lines == 41)
            fprintf(c->out, "...\n");
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    vfprintf(c->out, fmt, ap);
    va_end(ap);
    fputc('\n', c->out);
}

/* Every chunk of dataset `name` (absent: skipped). */
static int verify_chunks(hid_t f, const char *name, verify_t *c, chunk_check_t *cc)
{
    if (H5Lexists(f, name, H5P_DEFAULT) <= 0) {
        H5Eclear2(H5E_DEFAULT);
        return KV_OK;
    }
    hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
    if (d < 0) {
        problem(c, "%s: cannot be opened (%s)", name, h5_reason());
        c->v.bad_chunks++;
        return KV_OK;
    }
    c->v.datasets++;
    chunk_layout_t L;
    int rc = KV_OK;
    if (!chunk_layout(d, &L)) { /* contiguous: no checksum can cover it */
        c->v.chunks++;
        c->v.unchecksummed++;
    } else {
        size_t n = 1;
        for (int i = 0; i < 3; i++)
            n *= (size_t)((L.dims[i] + L.chunk[i] - 1) / L.chunk[i]);
        if (L.zstd >= 0) {
            const size_t n1 = (size_t)((L.dims[1] + L.chunk[1] - 1) / L.chunk[1]);
            for (size_t i = 0; i < n && rc == KV_OK; i++) {
                hsize_t off[3];
                char why[256], at[96];
                chunk_origin(&L, i, 0, n1, off);
                const int r = check_chunk(d, &L, off, cc, why, sizeof why);
                c->v.chunks++;
                if (r == -2) {
                    rc = KV_ENOMEM;
                } else if (r == -1) {
                    where_chunk(&L, off, at, sizeof at);
                    problem(c, "%s: the chunk at %s: %s", name, at, why);
                    c->v.bad_chunks++;
                } else if (r == 1) {
                    c->v.unchecksummed++;
                }
            }
        } else {
            /* Fletcher32 (the 1-D datasets), or another writer's pipeline: HDF5 reads every chunk */
            size_t bytes = L.esize;
            for (int i = 0; i < 3; i++)
                bytes *= (size_t)L.dims[i];
            void *buf = kv_malloc(bytes ? bytes : 1, "dataset");
            hid_t ft = H5Dget_type(d);
            if (!buf) {
                rc = KV_ENOMEM;
            } else if (H5Dread(d, ft, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0) {
                char where[400];
                snprintf(where, sizeof where, "%s", h5_reason());
                problem(c, "%s: %s (%s)", name, L.fletcher ? "checksum mismatch" : "cannot be read", where);
                c->v.bad_chunks++;
            }
            H5Tclose(ft);
            kv_free(buf);
            c->v.chunks += (long)n;
            if (!L.fletcher)
                c->v.unchecksummed += (long)n;
        }
    }
    H5Dclose(d);
    return rc;
}

/* Values of one tensor of one layer: non-finite ones, and summaries outside their ranges, per head. */
static void verify_values(const kv_trace_meta_t *m, int l, kv_tensor_t w, const float *x, verify_t *c)
{
    uint64_t dims[3];
    const int rank = kv_tensor_dims(m, w, dims);
    const size_t per = (size_t)dims[1] * (rank == 3 ? (size_t)dims[2] : 1);
    for (size_t h = 0; h < (size_t)dims[0]; h++) {
        const float *p = x + h * per;
        long bad = 0, out = 0;
        double worst = 0;
        for (size_t i = 0; i < per; i++) {
            const float v = p[i];
            if (!isfinite(v)) {
                bad++;
                continue;
            }
            double lo = -INFINITY, hi = INFINITY;
            const size_t t = i; /* (H, T) summaries: i is the token */
            if (w == KV_T_ENTROPY) {
                lo = -1e-4;
                hi = log((double)t + 1) + 1e-3;
            } else if (w == KV_T_ACC) {
                lo = -1e-4;
                hi = (double)(t < (size_t)m->n_prompt ? (size_t)m->n_prompt - t : 0) * 1.001 + 1e-3;
            } else if (w == KV_T_POOLED) {
                lo = -1e-6;
                hi = 1 + 1e-5;
            }
            if (v < lo || v > hi) {
                if (!out++ || fabs(v) > fabs(worst))
                    worst = v;
            }
        }
        const char *unit = w == KV_T_WO ? "row" : "head";
        if (bad) {
            problem(c, "layers/%d/%s %s %zu: %ld NaN or infinite value%s", l, kv_tensor_name(w), unit, h, bad,
                    bad == 1 ? "" : "s");
            c->v.nonfinite += bad;
        }
        if (out) {
            problem(c, "layers/%d/%s head %zu: %ld value%s outside %s (e.g. %.4g)", l, kv_tensor_name(w), h, out,
                    out == 1 ? "" : "s",
                    w == KV_T_ENTROPY ? "[0, ln(t + 1)]"
                    : w == KV_T_ACC   ? "[0, prompt queries that see the key]"
                                      : "[0, 1]",
                    worst);
            c->v.out_of_range += out;
        }
    }
}

static int verify_in_child(const char *path, void *ctx, FILE *out)
{
    (void)ctx;
    verify_t c;
    memset(&c, 0, sizeof c);
    c.out = out;
    kv_trace_t *t = NULL;
    chunk_check_t cc = {0};
    float *buf = NULL;
    int rc = h5_open(path, &t);
    if (rc)
        goto done;
    const kv_trace_meta_t *m = &t->meta;
    const hid_t f = ((h5_impl_t *)t->impl)->file;
    static const char *const one_d[] = {"/tokens", "/positions", "/segments"};
    for (size_t i = 0; i < KV_ARRAY_LEN(one_d) && rc == KV_OK; i++)
        rc = verify_chunks(f, one_d[i], &c, &cc);
    size_t cap = 0;
    for (int w = 0; w < KV_T_COUNT; w++)
        if (kv_trace_has(t, (kv_tensor_t)w))
            cap = KV_MAX(cap, kv_tensor_numel(m, (kv_tensor_t)w));
    if (rc == KV_OK && !(buf = kv_malloc(cap * sizeof(float), "verified tensor")))
        rc = KV_ENOMEM;
    for (int l = 0; l < m->n_layers && rc == KV_OK; l++)
        for (int w = 0; w < KV_T_COUNT && rc == KV_OK; w++) {
            if (!kv_trace_has(t, (kv_tensor_t)w))
                continue;
            char name[64];
            dset_path(name, sizeof name, l, (kv_tensor_t)w);
            const long bad_before = c.v.bad_chunks;
            if ((rc = verify_chunks(f, name, &c, &cc)))
                break;
            if (c.v.bad_chunks > bad_before)
                continue; /* its values cannot all be read */
            if (kv_trace_read(t, l, (kv_tensor_t)w, buf) != KV_OK) {
                problem(&c, "%s: %s", name, kv_last_error());
                c.v.bad_chunks++;
                continue;
            }
            verify_values(m, l, (kv_tensor_t)w, buf, &c);
        }
done:
    /* the counts first, then the problem lines (kv_trace_verify reads them back) */
    if (rc == KV_OK)
        fprintf(out, "\n%ld %ld %ld %ld %ld %ld\n", c.v.datasets, c.v.chunks, c.v.unchecksummed, c.v.bad_chunks,
                c.v.nonfinite, c.v.out_of_range);
    kv_free(buf);
    chunk_check_free(&cc);
    kv_trace_close(t);
    return rc;
}

int kv_trace_verify(const char *path, char **report, kv_verify_t *v)
{
    *report = NULL;
    memset(v, 0, sizeof *v);
    int rc = kv_trace_init();
    if (rc)
        return rc;
    if ((rc = regular_input(path)))
        return rc;
    if (H5Fis_hdf5(path) <= 0) {
        H5Eclear2(H5E_DEFAULT);
        return kv_error(KV_EFORMAT, "%s: not an HDF5 file", path);
    }
    char *text = NULL;
    /* no alarm (a large trace takes a while); memory for a tensor and its chunks, with room */
    if ((rc = sandboxed(path, "verifying", 0, (size_t)16 << 30, verify_in_child, NULL, &text)))
        return rc;
    /* problem lines, then "\n<counts>\n" */
    char *counts = text ? strrchr(text, '\n') : NULL;
    if (counts && counts > text)
        *counts = 0;
    counts = text ? strrchr(text, '\n') : NULL;
    if (!counts || sscanf(counts + 1, "%ld %ld %ld %ld %ld %ld", &v->datasets, &v->chunks, &v->unchecksummed,
                          &v->bad_chunks, &v->nonfinite, &v->out_of_range) != 6) {
        kv_free(text);
        return kv_error(KV_EINTERNAL, "%s: the verification gave no counts", path);
    }
    *counts = 0;
    *report = text;
    return KV_OK;
}
