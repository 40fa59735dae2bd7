/*
 * trace_hdf5.c: HDF5 storage of traces (layout in traces/FORMAT.md).
 *
 * Reading: every tensor is read with a hyperslab (whole tensor or a token range) and converted to
 * float32 here (f16 -> f32 through kv_f16, not HDF5's slow soft conversion).
 * Writing: datasets are created with their full shape up front, chunked along tokens, filtered by
 * shuffle then zstd (id 32015, one cd_value: the level). The file is written under a temporary name
 * beside the target and renamed on commit, so an interrupted write never leaves a file under the
 * final name; SIGINT/SIGTERM remove the temporary file.
 */
#include "sim/common/kv_common.h"
#include "traces/kv_f16.h"
#include "traces/kv_trace.h"
#include "traces/kv_zstd_filter.h"
#include "traces/trace_internal.h"

#include <errno.h>
#include <hdf5.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---------------------------------------------------------------- HDF5 helpers */

static herr_t walk_cb(unsigned n, const H5E_error2_t *e, void *data)
{
    char *out = data;
    if (n == 0 && e->desc)
        snprintf(out, 256, "%s", e->desc);
    return 0;
}

/* Innermost message of the HDF5 error stack (HDF5's own explanation), or "unknown HDF5 error". */
static const char *h5_reason(void)
{
    static _Thread_local char buf[256];
    snprintf(buf, sizeof buf, "unknown HDF5 error");
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, walk_cb, buf);
    H5Eclear2(H5E_DEFAULT);
    return buf;
}

int kv_trace_init(void)
{
    static int done = 0;
    if (done)
        return KV_OK;
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

typedef struct {
    hid_t file;
    int has[KV_T_COUNT];
    uint16_t *half; /* scratch for f16 reads */
    size_t half_cap;
} h5_impl_t;

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
    if (v != KV_TRACE_FORMAT_VERSION)
        return kv_error(KV_EFORMAT, "%s: trace format version %lld, this kvsim reads version %d", path, v,
                        KV_TRACE_FORMAT_VERSION);
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
    if (!m->has_summaries)
        m->pool = 0; /* no pooled map: its side means nothing (kv_trace.h) */
    v = 0;
    if ((rc = get_int_attr(f, "f16_overflow", &v, 0, path)))
        return rc;
    m->f16_overflow = (long)v;
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
    int rc = KV_OK;
    herr_t e;
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
    if (e < 0)
        rc = kv_error(KV_EIO, "%s: cannot read '%s' (%s)", t->path, name, h5_reason());
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
    kv_free(hi);
}

static const kv_trace_vt_t h5_vt = {h5_read_rows, h5_read, h5_has, h5_storage, h5_close};

int kv_trace_hdf5_open(const char *path, kv_trace_t **out)
{
    *out = NULL;
    int rc = kv_trace_init();
    if (rc)
        return rc;
    if (access(path, R_OK) != 0)
        return kv_error(KV_EIO, "%s: cannot open: %s", path, strerror(errno));
    if (H5Fis_hdf5(path) <= 0) {
        H5Eclear2(H5E_DEFAULT);
        return kv_error(KV_EFORMAT, "%s: not an HDF5 file", path);
    }
    kv_trace_t *t = kv_calloc(1, sizeof *t, "trace");
    h5_impl_t *hi = kv_calloc(1, sizeof *hi, "trace");
    if (!t || !hi) {
        kv_free(t);
        kv_free(hi);
        return KV_ENOMEM;
    }
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
    hi->has[KV_T_Q] = hi->has[KV_T_K] = hi->has[KV_T_V] = 1;
    hi->has[KV_T_LSE] = hi->has[KV_T_ENTROPY] = hi->has[KV_T_ACC] = hi->has[KV_T_POOLED] = t->meta.has_summaries;
    hi->has[KV_T_WO] = t->meta.has_wo;
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

#define MAX_PENDING 8
static char g_pending[MAX_PENDING][4096]; /* temporary files to remove on SIGINT/SIGTERM */

static void on_signal(int sig)
{
    for (int i = 0; i < MAX_PENDING; i++)
        if (g_pending[i][0])
            unlink(g_pending[i]);
    signal(sig, SIG_DFL);
    raise(sig);
}

static int pending_add(const char *p)
{
    static int installed = 0;
    if (!installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_signal;
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGTERM, &sa, NULL);
        installed = 1;
    }
    for (int i = 0; i < MAX_PENDING; i++)
        if (!g_pending[i][0]) {
            snprintf(g_pending[i], sizeof g_pending[i], "%s", p);
            return i;
        }
    return -1;
}

static void pending_remove(int slot)
{
    if (slot >= 0)
        g_pending[slot][0] = 0;
}

struct kv_trace_writer {
    hid_t file;
    kv_trace_meta_t meta;
    kv_write_opts_t opts;
    char path[4096], tmp[4096];
    int slot;
    uint16_t *half;
    size_t half_cap;
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
    w->slot = -1;
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
    snprintf(w->path, sizeof w->path, "%s", path);
    snprintf(w->tmp, sizeof w->tmp, "%s.tmp-%d", path, (int)getpid());
    w->slot = pending_add(w->tmp);
    w->file = H5Fcreate(w->tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (w->file < 0) {
        rc = kv_error(KV_EIO, "%s: cannot create (%s: %s)", path, h5_reason(), strerror(errno));
        goto fail;
    }
    hid_t layers = H5Gcreate2(w->file, "/layers", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    for (int l = 0; l < meta->n_layers && rc == KV_OK; l++) {
        char g[32];
        snprintf(g, sizeof g, "%d", l);
        hid_t gid = H5Gcreate2(layers, g, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        for (int which = 0; which < KV_T_COUNT && rc == KV_OK; which++) {
            int present = which <= KV_T_V || (which == KV_T_WO ? meta->has_wo : meta->has_summaries);
            if (!present)
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

static int write_slab(kv_trace_writer_t *w, int layer, kv_tensor_t which, int t0, int nt, const float *src)
{
    const kv_trace_meta_t *m = &w->meta;
    if (layer < 0 || layer >= m->n_layers || (unsigned)which >= KV_T_COUNT)
        return kv_error(KV_ERANGE, "%s: layer %d / tensor %d out of range", w->path, layer, (int)which);
    int present = which <= KV_T_V || (which == KV_T_WO ? m->has_wo : m->has_summaries);
    if (!present)
        return kv_error(KV_EINVAL, "%s: tensor '%s' was not declared in the trace meta", w->path,
                        kv_tensor_name(which));
    char name[64];
    dset_path(name, sizeof name, layer, which);
    uint64_t dims[3];
    int rank = kv_tensor_dims(m, which, dims);
    hsize_t start[3] = {0, 0, 0}, count[3] = {dims[0], dims[1], dims[2]};
    if (t0 >= 0) {
        if (t0 + nt > m->n_tokens)
            return kv_error(KV_ERANGE, "%s: rows [%d, %d) beyond %d tokens", w->path, t0, t0 + nt, m->n_tokens);
        start[1] = (hsize_t)t0;
        count[1] = (hsize_t)nt;
    }
    size_t n = 1;
    for (int i = 0; i < rank; i++)
        n *= (size_t)count[i];
    if (n == 0)
        return KV_OK;
    hid_t d = H5Dopen2(w->file, name, H5P_DEFAULT);
    if (d < 0)
        return kv_error(KV_EIO, "%s: dataset %s missing (%s)", w->path, name, h5_reason());
    hid_t fs = H5Dget_space(d);
    H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL);
    hid_t ms = H5Screate_simple(rank, count, NULL);
    int rc = KV_OK;
    herr_t e;
    if (which <= KV_T_V && w->opts.dtype == KV_DTYPE_F16) {
        if (w->half_cap < n) {
            uint16_t *b = kv_malloc(n * sizeof(uint16_t), "f16 write buffer");
            if (!b) {
                rc = KV_ENOMEM;
                goto done;
            }
            kv_free(w->half);
            w->half = b;
            w->half_cap = n;
        }
        w->meta.f16_overflow += (long)kv_f32_to_f16_n(src, w->half, n);
        e = H5Dwrite(d, f16_type(), ms, fs, H5P_DEFAULT, w->half);
    } else {
        e = H5Dwrite(d, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, src);
    }
    if (e < 0)
        rc = kv_error(KV_EIO, "%s: cannot write %s (%s)", w->path, name, h5_reason());
done:
    H5Sclose(ms);
    H5Sclose(fs);
    H5Dclose(d);
    return rc;
}

int kv_trace_write_rows(kv_trace_writer_t *w, int layer, kv_tensor_t which, int t0, int nt, const float *src)
{
    if (!kv_tensor_per_token(which))
        return kv_error(KV_EINVAL, "%s: '%s' is not indexed by token", w->path, kv_tensor_name(which));
    if (t0 < 0 || nt < 0)
        return kv_error(KV_ERANGE, "%s: bad row range", w->path);
    return write_slab(w, layer, which, t0, nt, src);
}

int kv_trace_write(kv_trace_writer_t *w, int layer, kv_tensor_t which, const float *src)
{
    return write_slab(w, layer, which, -1, 0, src);
}

static int write_i32(hid_t file, const char *name, const int32_t *v, int n)
{
    hsize_t dims[1] = {(hsize_t)n};
    hid_t sp = H5Screate_simple(1, dims, NULL);
    hid_t d = H5Dcreate2(file, name, H5T_STD_I32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    herr_t e = d < 0 ? -1 : H5Dwrite(d, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, v);
    if (d >= 0)
        H5Dclose(d);
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
        {"pool", m->pool},
        {"has_wo", m->has_wo},
        {"model_dim", m->model_dim},
        {"hidden_dim", m->hidden_dim},
        {"vocab_size", m->vocab_size},
        {"seq_len", m->seq_len},
        {"zstd_level", m->zstd_level},
        {"f16_overflow", m->f16_overflow},
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
    if (rename(w->tmp, w->path) != 0) {
        rc = kv_error(KV_EIO, "%s: cannot rename from %s: %s", w->path, w->tmp, strerror(errno));
        kv_trace_abort(w);
        return rc;
    }
    pending_remove(w->slot);
    kv_trace_meta_free(&w->meta);
    kv_free(w->half);
    kv_free(w);
    return KV_OK;
}

void kv_trace_abort(kv_trace_writer_t *w)
{
    if (!w)
        return;
    if (w->file >= 0)
        H5Fclose(w->file);
    unlink(w->tmp);
    pending_remove(w->slot);
    kv_trace_meta_free(&w->meta);
    kv_free(w->half);
    kv_free(w);
}
