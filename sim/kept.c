/*
 * kept.c: kept sets of a replay and their HDF5 file (sim/kept.h). The file is written under a
 * temporary name beside the target and renamed once complete, as every kvsim output.
 */
#include "sim/kept.h"

#include "sim/common/kv_common.h"
#include "sim/common/kv_output.h"
#include "traces/kv_trace.h"

#include <hdf5.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int kv_kept_create(int n_pol, int n_budgets, int n_layers, int n_tokens, int n_ctx, kv_kept_t **out)
{
    *out = NULL;
    kv_kept_t *k = kv_calloc(1, sizeof *k, "kept sets");
    if (!k)
        return KV_ENOMEM;
    k->e = kv_calloc((size_t)(n_pol * n_budgets > 0 ? n_pol * n_budgets : 1), sizeof *k->e, "kept sets");
    if (!k->e) {
        kv_free(k);
        return KV_ENOMEM;
    }
    k->n_pol = n_pol;
    k->n_budgets = n_budgets;
    k->n_layers = n_layers;
    k->n_tokens = n_tokens;
    k->n_ctx = n_ctx;
    *out = k;
    return KV_OK;
}

int kv_kept_set(kv_kept_t *k, int pi, int bi, const kv_policy_t *p, const kv_budget_t *b, int n_store, uint8_t *mask)
{
    if (pi < 0 || pi >= k->n_pol || bi < 0 || bi >= k->n_budgets)
        return kv_error(KV_EINTERNAL, "kept sets: entry (%d, %d) out of range", pi, bi);
    kv_kept_entry_t *e = &k->e[pi * k->n_budgets + bi];
    kv_free(e->mask);
    snprintf(e->label, sizeof e->label, "%s", p->label);
    snprintf(e->budget, sizeof e->budget, "%s", b->text);
    e->budget_tokens = b->tokens;
    e->gran = p->gran;
    e->n_store = n_store;
    e->last_query = (p->flags & (KV_POL_DECODE | KV_POL_PER_QUERY)) != 0;
    e->mask = mask;
    return KV_OK;
}

const kv_kept_entry_t *kv_kept_get(const kv_kept_t *k, int pi, int bi)
{
    if (!k || pi < 0 || pi >= k->n_pol || bi < 0 || bi >= k->n_budgets)
        return NULL;
    return &k->e[pi * k->n_budgets + bi];
}

void kv_kept_free(kv_kept_t *k)
{
    if (!k)
        return;
    for (int i = 0; k->e && i < k->n_pol * k->n_budgets; i++)
        kv_free(k->e[i].mask);
    kv_free(k->e);
    kv_free(k);
}

/* ---------------------------------------------------------------- HDF5 */

static int put_attr(hid_t obj, const char *name, hid_t type, const void *v)
{
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(obj, name, type, sp, H5P_DEFAULT, H5P_DEFAULT);
    herr_t e = a < 0 ? -1 : H5Awrite(a, type, v);
    if (a >= 0)
        H5Aclose(a);
    H5Sclose(sp);
    return e < 0 ? kv_error(KV_EIO, "cannot write attribute '%s'", name) : KV_OK;
}

static int put_int(hid_t obj, const char *name, long long v)
{
    return put_attr(obj, name, H5T_NATIVE_LLONG, &v);
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

static int get_int(hid_t obj, const char *name, long long *v, const char *path)
{
    hid_t a = H5Aexists(obj, name) > 0 ? H5Aopen(obj, name, H5P_DEFAULT) : -1;
    herr_t e = a < 0 ? -1 : H5Aread(a, H5T_NATIVE_LLONG, v);
    if (a >= 0)
        H5Aclose(a);
    return e < 0 ? kv_error(KV_EFORMAT, "%s: missing or bad attribute '%s'", path, name) : KV_OK;
}

static int get_str(hid_t obj, const char *name, char *buf, size_t len, const char *path)
{
    buf[0] = 0;
    hid_t a = H5Aexists(obj, name) > 0 ? H5Aopen(obj, name, H5P_DEFAULT) : -1;
    if (a < 0)
        return kv_error(KV_EFORMAT, "%s: missing attribute '%s'", path, name);
    hid_t ft = H5Aget_type(a), mt = H5Tcopy(H5T_C_S1);
    int rc = KV_OK;
    if (H5Tget_class(ft) != H5T_STRING) {
        rc = kv_error(KV_EFORMAT, "%s: attribute '%s' is not a string", path, name);
    } else if (H5Tis_variable_str(ft) > 0) {
        char *s = NULL;
        H5Tset_size(mt, H5T_VARIABLE);
        H5Tset_cset(mt, H5Tget_cset(ft));
        if (H5Aread(a, mt, &s) < 0)
            rc = kv_error(KV_EFORMAT, "%s: cannot read attribute '%s'", path, name);
        else if (s)
            snprintf(buf, len, "%s", s);
        if (s)
            H5free_memory(s);
    } else {
        const size_t n = H5Tget_size(ft);
        char *tmp = kv_calloc(n + 1, 1, "attribute");
        H5Tset_size(mt, n + 1);
        if (!tmp || H5Aread(a, mt, tmp) < 0)
            rc = kv_error(KV_EFORMAT, "%s: cannot read attribute '%s'", path, name);
        else
            snprintf(buf, len, "%s", tmp);
        kv_free(tmp);
    }
    H5Tclose(mt);
    H5Tclose(ft);
    H5Aclose(a);
    return rc;
}

/* A 1-D or 2-D int32 dataset, gzip + shuffle when it is not empty. */
static int put_i32(hid_t g, const char *name, int rank, const hsize_t *dims, const int32_t *data)
{
    hsize_t n = 1, chunk[2];
    for (int r = 0; r < rank; r++)
        n *= dims[r];
    hid_t sp = H5Screate_simple(rank, dims, NULL), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    if (n > 0) {
        for (int r = 0; r < rank; r++)
            chunk[r] = dims[r];
        if (rank == 1 && chunk[0] > 65536)
            chunk[0] = 65536;
        H5Pset_chunk(dcpl, rank, chunk);
        H5Pset_shuffle(dcpl);
        H5Pset_deflate(dcpl, 4);
    }
    hid_t d = H5Dcreate2(g, name, H5T_STD_I32LE, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    herr_t e = d < 0 ? -1 : n > 0 ? H5Dwrite(d, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) : 0;
    if (d >= 0)
        H5Dclose(d);
    H5Pclose(dcpl);
    H5Sclose(sp);
    return e < 0 ? kv_error(KV_EIO, "cannot write dataset '%s'", name) : KV_OK;
}

static int write_entry(hid_t f, int pi, int bi, const kv_kept_entry_t *e, const kv_kept_t *k)
{
    char name[48];
    snprintf(name, sizeof name, "p%d_b%d", pi, bi);
    hid_t g = H5Gcreate2(f, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (g < 0)
        return kv_error(KV_EIO, "cannot create group %s", name);
    const int L = k->n_layers, S = e->n_store, T = k->n_tokens;
    size_t total = 0;
    for (size_t x = 0; x < (size_t)L * S * T; x++)
        total += e->mask[x] != 0;
    int32_t *counts = kv_malloc(sizeof(int32_t) * (size_t)L * S, "kept counts");
    int32_t *idx = kv_malloc(sizeof(int32_t) * (total ? total : 1), "kept indices");
    int rc = KV_OK;
    if (!counts || !idx) {
        rc = KV_ENOMEM;
        goto done;
    }
    size_t w = 0;
    for (int l = 0; l < L; l++)
        for (int s = 0; s < S; s++) {
            const uint8_t *mk = e->mask + ((size_t)l * S + s) * T;
            int c = 0;
            for (int j = 0; j < T; j++)
                if (mk[j]) {
                    idx[w++] = j;
                    c++;
                }
            counts[(size_t)l * S + s] = c;
        }
    const hsize_t cd[2] = {(hsize_t)L, (hsize_t)S}, id[1] = {(hsize_t)total};
    if ((rc = put_str(g, "policy", e->label)) || (rc = put_str(g, "budget", e->budget)) ||
        (rc = put_int(g, "budget_tokens", e->budget_tokens)) ||
        (rc = put_str(g, "granularity", e->gran == KV_GRAN_KV ? "kv" : "query")) || (rc = put_int(g, "n_store", S)) ||
        (rc = put_str(g, "cache", e->last_query ? "last_query" : "prefill")) ||
        (rc = put_i32(g, "counts", 2, cd, counts)) || (rc = put_i32(g, "indices", 1, id, idx)))
        goto done;
done:
    kv_free(counts);
    kv_free(idx);
    H5Gclose(g);
    return rc;
}

int kv_kept_write(const kv_kept_t *k, const char *path, const char *trace, const char *trace_sha256)
{
    int rc = kv_trace_init(); /* HDF5's error printing off */
    if (rc)
        return rc;
    kv_out_t *out; /* temporary file, renamed over path once complete (sim/common/kv_output.h) */
    if ((rc = kv_out_open(path, &out)))
        return rc;
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    H5Pset_file_locking(fapl, 0, 1); /* the output module holds the temporary file's lock */
    hid_t f = H5Fcreate(kv_out_temp(out), H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    if (f < 0) {
        kv_out_abort(out);
        return kv_error(KV_EIO, "%s: cannot create the kept-sets file", path);
    }
    if ((rc = put_str(f, "format", "kvsim-kept")) || (rc = put_int(f, "format_version", 1)) ||
        (rc = put_int(f, "n_layers", k->n_layers)) || (rc = put_int(f, "n_tokens", k->n_tokens)) ||
        (rc = put_int(f, "n_ctx", k->n_ctx)) || (rc = put_str(f, "trace", trace ? trace : "")) ||
        (rc = put_str(f, "trace_sha256", trace_sha256 ? trace_sha256 : "")) ||
        (rc = put_str(f, "tool", "kvsim " KV_VERSION)))
        goto fail;
    for (int pi = 0; pi < k->n_pol; pi++)
        for (int bi = 0; bi < k->n_budgets; bi++) {
            const kv_kept_entry_t *e = kv_kept_get(k, pi, bi);
            if (e->mask && (rc = write_entry(f, pi, bi, e, k)))
                goto fail;
        }
    if (H5Fclose(f) < 0) {
        kv_out_abort(out);
        return kv_error(KV_EIO, "%s: cannot close (disk full?)", path);
    }
    return kv_out_commit(out);
fail:
    H5Fclose(f);
    kv_out_abort(out);
    return kv_error_context(rc, "%s", path);
}

static int read_i32(hid_t g, const char *name, size_t n, int32_t *out, const char *path)
{
    hid_t d = H5Dopen2(g, name, H5P_DEFAULT);
    if (d < 0)
        return kv_error(KV_EFORMAT, "%s: missing dataset '%s'", path, name);
    hid_t sp = H5Dget_space(d);
    const hssize_t np = H5Sget_simple_extent_npoints(sp);
    herr_t e = np != (hssize_t)n ? -1 : n > 0 ? H5Dread(d, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, out) : 0;
    H5Sclose(sp);
    H5Dclose(d);
    return e < 0 ? kv_error(KV_EFORMAT, "%s: dataset '%s' has %lld values, expected %zu", path, name, (long long)np, n)
                 : KV_OK;
}

int kv_kept_read(const char *path, kv_kept_t **out)
{
    *out = NULL;
    int rc = kv_trace_init();
    if (rc)
        return rc;
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0)
        return kv_error(KV_EIO, "%s: cannot open as HDF5", path);
    char fmt[32];
    long long L = 0, T = 0, n_ctx = 0;
    kv_kept_t *k = NULL;
    if ((rc = get_str(f, "format", fmt, sizeof fmt, path)) || (rc = get_int(f, "n_layers", &L, path)) ||
        (rc = get_int(f, "n_tokens", &T, path)) || (rc = get_int(f, "n_ctx", &n_ctx, path)))
        goto done;
    if (strcmp(fmt, "kvsim-kept") || L < 1 || T < 1 || L > 1 << 16 || T > 1 << 28) {
        rc = kv_error(KV_EFORMAT, "%s: not a kvsim kept-sets file", path);
        goto done;
    }
    /* the group names give the extent: p<i>_b<j> */
    H5G_info_t gi;
    int n_pol = 0, n_bud = 0;
    H5Gget_info(f, &gi);
    for (hsize_t x = 0; x < gi.nlinks; x++) {
        char nm[64];
        int pi, bi;
        if (H5Lget_name_by_idx(f, ".", H5_INDEX_NAME, H5_ITER_INC, x, nm, sizeof nm, H5P_DEFAULT) > 0 &&
            sscanf(nm, "p%d_b%d", &pi, &bi) == 2) {
            n_pol = KV_MAX(n_pol, pi + 1);
            n_bud = KV_MAX(n_bud, bi + 1);
        }
    }
    if ((rc = kv_kept_create(n_pol, n_bud, (int)L, (int)T, (int)n_ctx, &k)))
        goto done;
    for (int pi = 0; pi < n_pol; pi++)
        for (int bi = 0; bi < n_bud; bi++) {
            char nm[48];
            snprintf(nm, sizeof nm, "p%d_b%d", pi, bi);
            if (H5Lexists(f, nm, H5P_DEFAULT) <= 0)
                continue;
            hid_t g = H5Gopen2(f, nm, H5P_DEFAULT);
            kv_kept_entry_t *e = &k->e[pi * n_bud + bi];
            long long S = 0, bt = 0;
            char gran[16], cache[16];
            int32_t *counts = NULL, *idx = NULL;
            rc = get_str(g, "policy", e->label, sizeof e->label, path);
            if (!rc)
                rc = get_str(g, "budget", e->budget, sizeof e->budget, path);
            if (!rc)
                rc = get_int(g, "budget_tokens", &bt, path);
            if (!rc)
                rc = get_int(g, "n_store", &S, path);
            if (!rc)
                rc = get_str(g, "granularity", gran, sizeof gran, path);
            if (!rc)
                rc = get_str(g, "cache", cache, sizeof cache, path);
            if (!rc && (S < 1 || S > 1 << 16))
                rc = kv_error(KV_EFORMAT, "%s: %s: n_store %lld", path, nm, S);
            if (!rc) {
                e->budget_tokens = (int)bt;
                e->n_store = (int)S;
                e->gran = strcmp(gran, "query") ? KV_GRAN_KV : KV_GRAN_QUERY;
                e->last_query = !strcmp(cache, "last_query");
                counts = kv_malloc(sizeof(int32_t) * (size_t)(L * S), "kept counts");
                e->mask = kv_calloc((size_t)(L * S * T), 1, "kept sets");
                if (!counts || !e->mask)
                    rc = KV_ENOMEM;
            }
            if (!rc)
                rc = read_i32(g, "counts", (size_t)(L * S), counts, path);
            size_t total = 0;
            for (long long x = 0; !rc && x < L * S; x++) {
                if (counts[x] < 0 || counts[x] > T)
                    rc = kv_error(KV_EFORMAT, "%s: %s: bad count %d", path, nm, counts[x]);
                total += (size_t)counts[x];
            }
            if (!rc && !(idx = kv_malloc(sizeof(int32_t) * (total ? total : 1), "kept indices")))
                rc = KV_ENOMEM;
            if (!rc)
                rc = read_i32(g, "indices", total, idx, path);
            size_t r = 0;
            for (long long x = 0; !rc && x < L * S; x++)
                for (int c = 0; c < counts[x]; c++, r++) {
                    if (idx[r] < 0 || idx[r] >= T) {
                        rc = kv_error(KV_EFORMAT, "%s: %s: token index %d out of range", path, nm, idx[r]);
                        break;
                    }
                    e->mask[(size_t)x * T + idx[r]] = 1;
                }
            kv_free(counts);
            kv_free(idx);
            H5Gclose(g);
            if (rc)
                goto done;
        }
done:
    H5Fclose(f);
    if (rc) {
        kv_kept_free(k);
        return rc;
    }
    *out = k;
    return KV_OK;
}
