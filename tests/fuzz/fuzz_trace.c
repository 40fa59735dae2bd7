/*
 * fuzz_trace.c: libFuzzer harness for the trace reader (traces/trace_hdf5.c reader side,
 * traces/trace.c validation) and `kvsim info`, structure-aware.
 *
 * Random bytes rarely make an HDF5 file, so the input is a program of changes to a valid trace (2
 * layers, 4 heads over 2 KV heads, head_dim 8, 16 tokens, 3 segments, summaries with an 8 x 8 map,
 * W_O) written once by the library's writer: each change replaces an attribute (any of the
 * reader's names; integer, float or string types; one value or an array; strings up to 2 MiB, with
 * any bytes), removes one, replaces a dataset (integer, float16/32/64 or string type; rank 0 to 4;
 * small dims; values from the input), or puts a group where a dataset was. The changed file is
 * opened; when it opens, every tensor of every layer is read whole and by token ranges (the reader
 * must agree with the shapes it reported), the storage is summed and `kvsim info` prints it (to
 * /dev/null). A failure must name the file. Raw bytes as the file: fuzz_trace_file.c.
 * Not part of `make test`; build and run as described in tests/fuzz/fuzz_model.c (make fuzz).
 */
#include "sim/common/kv_common.h"
#include "tests/kv_test.h"
#include "traces/kv_trace.h"

#include <hdf5.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* kvsim info, linked in with stand-ins for the CLI helpers it calls (sim/cli/main.c has main) */
#include "sim/cli/cmd_info.c"
int kv_cli_fail(const char *cmd)
{
    (void)cmd;
    return 1;
}
int kv_cli_usage_error(const char *cmd, const char *fmt, ...)
{
    (void)cmd, (void)fmt;
    return 2;
}
int kv_cli_bad_option(const char *cmd, int c, char **argv)
{
    (void)cmd, (void)c, (void)argv;
    return 2;
}

static char g_path[256];
static unsigned char *g_base;
static size_t g_base_len;

static void write_bytes(const char *path, const void *b, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(b, 1, n, f) != n)
        abort();
    fclose(f);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    snprintf(g_path, sizeof g_path, "/tmp/kvsim-fuzz-trace-%d.h5", (int)getpid());
    kv_trace_init();
    kv_trace_t *t = kv_test_trace(2, 4, 2, 8, 16, 12, 3, 1, 5);
    kv_trace_meta_t *m = kv_trace_mem_meta(t);
    m->has_summaries = 1;
    m->pool = 8;
    m->vocab_size = 64;
    m->tokens = kv_malloc(sizeof(int32_t) * 16, "tokens");
    m->positions = kv_malloc(sizeof(int32_t) * 16, "positions");
    for (int i = 0; i < 16; i++)
        m->tokens[i] = 10 + i, m->positions[i] = i;
    snprintf(m->prompt, sizeof m->prompt, "a prompt");
    if (kv_test_write_trace(t, g_path) != KV_OK)
        abort();
    kv_trace_close(t);
    FILE *f = fopen(g_path, "rb");
    fseek(f, 0, SEEK_END);
    g_base_len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    g_base = malloc(g_base_len);
    if (fread(g_base, 1, g_base_len, f) != g_base_len)
        abort();
    fclose(f);
    if (!freopen("/dev/null", "w", stdout))
        abort();
    return 0;
}

typedef struct {
    const uint8_t *p;
    size_t n;
} rd_t;

static unsigned u8(rd_t *r)
{
    if (!r->n)
        return 0;
    r->n--;
    return *r->p++;
}

static const char *attr_names[] = {
    "format",     "format_version", "n_layers",   "n_heads",       "n_kv_heads",   "head_dim",     "n_tokens",
    "n_prompt",   "n_decode",       "n_segments", "has_summaries", "pool",         "has_wo",       "model_dim",
    "hidden_dim", "vocab_size",     "seq_len",    "zstd_level",    "f16_overflow", "rope_theta",   "norm_eps",
    "dtype",      "source",         "model",      "model_sha256",  "tokenizer",    "tool_version", "git_revision",
    "created",    "backend",        "generator",  "prompt"};
static const char *dset_names[] = {"/tokens",          "/positions",    "/segments",         "/layers/0/q",
                                   "/layers/0/k",      "/layers/0/v",   "/layers/1/q",       "/layers/1/k",
                                   "/layers/1/v",      "/layers/0/lse", "/layers/1/entropy", "/layers/0/acc_attn",
                                   "/layers/1/pooled", "/layers/0/wo",  "/layers/1",         "/layers/2/q",
                                   "/layers"};
static const long long ints[] = {0,
                                 1,
                                 2,
                                 3,
                                 4,
                                 7,
                                 8,
                                 11,
                                 12,
                                 13,
                                 15,
                                 16,
                                 17,
                                 32,
                                 64,
                                 100,
                                 255,
                                 256,
                                 65535,
                                 65536,
                                 1 << 24,
                                 (1 << 26) + 1,
                                 2147483647LL,
                                 2147483648LL,
                                 -1,
                                 -2,
                                 -2147483648LL,
                                 4294967296LL,
                                 (long long)(1ULL << 62),
                                 (long long)0x8000000000000000ULL};
static const size_t lens[] = {0, 1, 2, 3, 8, 63, 64, 65, 1000, 60000, 70000, (1u << 20) + 1, 2u << 20};
static const hsize_t dimv[] = {0, 1, 2, 3, 4, 7, 8, 12, 15, 16, 17, 32, 100};

static hid_t int_type(unsigned k)
{
    switch (k % 8) {
    case 0: return H5Tcopy(H5T_STD_I8LE);
    case 1: return H5Tcopy(H5T_STD_I16LE);
    case 2: return H5Tcopy(H5T_STD_I32LE);
    case 3: return H5Tcopy(H5T_STD_I64LE);
    case 4: return H5Tcopy(H5T_STD_U8LE);
    case 5: return H5Tcopy(H5T_STD_U32BE);
    case 6: return H5Tcopy(H5T_STD_U64LE);
    default: return H5Tcopy(H5T_STD_I32BE);
    }
}

static hid_t any_type(unsigned k)
{
    switch (k % 8) {
    case 0: return H5Tcopy(H5T_IEEE_F32LE);
    case 1: return H5Tcopy(H5T_IEEE_F64LE);
    case 2: {
        hid_t t = H5Tcopy(H5T_IEEE_F32LE);
        H5Tset_fields(t, 15, 10, 5, 0, 10);
        H5Tset_size(t, 2);
        H5Tset_ebias(t, 15);
        return t;
    }
    case 3: {
        hid_t t = H5Tcopy(H5T_C_S1);
        H5Tset_size(t, 4);
        return t;
    }
    case 4: return H5Tcopy(H5T_IEEE_F32BE);
    default: return int_type(k / 8);
    }
}

static hid_t space(rd_t *r)
{
    unsigned k = u8(r);
    if (k % 4)
        return H5Screate(H5S_SCALAR);
    hsize_t n = 1 + u8(r) % 70;
    return H5Screate_simple(1, &n, NULL);
}

static void mutate(hid_t f, rd_t *r)
{
    const unsigned op = u8(r) % 7;
    const char *an = attr_names[u8(r) % (sizeof attr_names / sizeof *attr_names)];
    const char *dn = dset_names[u8(r) % (sizeof dset_names / sizeof *dset_names)];
    if (op <= 2 && H5Aexists(f, an) > 0)
        H5Adelete(f, an);
    if (op >= 3 && op <= 5 && H5Lexists(f, dn, H5P_DEFAULT) > 0)
        H5Ldelete(f, dn, H5P_DEFAULT);
    H5Eclear2(H5E_DEFAULT);
    if (op == 0) { /* integer or float attribute */
        unsigned k = u8(r);
        hid_t t = k & 1 ? any_type(k >> 1) : int_type(k >> 1), sp = space(r);
        hssize_t np = H5Sget_simple_extent_npoints(sp);
        long long v = ints[u8(r) % (sizeof ints / sizeof *ints)];
        double *dv = malloc(sizeof(double) * (size_t)np);
        long long *iv = malloc(sizeof(long long) * (size_t)np);
        for (hssize_t i = 0; i < np; i++)
            iv[i] = v, dv[i] = u8(r) & 1 ? (double)v : (double)v + 0.5;
        hid_t a = H5Acreate2(f, an, t, sp, H5P_DEFAULT, H5P_DEFAULT);
        if (a >= 0) {
            if (H5Tget_class(t) == H5T_FLOAT)
                H5Awrite(a, H5T_NATIVE_DOUBLE, dv);
            else if (H5Tget_class(t) == H5T_INTEGER)
                H5Awrite(a, H5T_NATIVE_LLONG, iv);
            H5Aclose(a);
        }
        free(dv);
        free(iv);
        H5Sclose(sp);
        H5Tclose(t);
    } else if (op == 1) { /* string attribute: fixed or variable length, bytes from the input */
        const int vlen = u8(r) & 1;
        size_t len = lens[u8(r) % (sizeof lens / sizeof *lens)];
        if (!vlen && len == 0)
            len = 1;
        hid_t t = H5Tcopy(H5T_C_S1), sp = space(r);
        hssize_t np = H5Sget_simple_extent_npoints(sp);
        H5Tset_size(t, vlen ? H5T_VARIABLE : len);
        char *s = malloc(len + 1);
        for (size_t i = 0; i < len; i++)
            s[i] = r->n ? (char)u8(r) : 'x';
        s[len] = 0;
        hid_t a = H5Acreate2(f, an, t, sp, H5P_DEFAULT, H5P_DEFAULT);
        if (a >= 0) {
            if (vlen) {
                char **ptr = malloc(sizeof(char *) * (size_t)np);
                for (hssize_t i = 0; i < np; i++)
                    ptr[i] = s;
                H5Awrite(a, t, ptr);
                free(ptr);
            } else {
                char *all = malloc(len * (size_t)np);
                for (hssize_t i = 0; i < np; i++)
                    memcpy(all + (size_t)i * len, s, len);
                H5Awrite(a, t, all);
                free(all);
            }
            H5Aclose(a);
        }
        free(s);
        H5Sclose(sp);
        H5Tclose(t);
    } else if (op == 3) { /* dataset: type, rank, dims, values */
        hid_t t = any_type(u8(r));
        int rank = (int)(u8(r) % 5);
        hsize_t dims[4];
        size_t n = 1;
        for (int i = 0; i < rank; i++) {
            dims[i] = dimv[u8(r) % (sizeof dimv / sizeof *dimv)];
            n *= (size_t)dims[i];
        }
        if (n > (1u << 16))
            rank = 1, dims[0] = 16, n = 16;
        hid_t sp = rank ? H5Screate_simple(rank, dims, NULL) : H5Screate(H5S_SCALAR);
        hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
        if (rank && n && (u8(r) & 1))
            H5Pset_chunk(dcpl, rank, dims);
        hid_t d = H5Dcreate2(f, dn, t, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
        if (d >= 0 && H5Tget_class(t) != H5T_STRING && n) {
            double *v = malloc(sizeof(double) * n);
            long long base = ints[u8(r) % (sizeof ints / sizeof *ints)];
            for (size_t i = 0; i < n; i++)
                v[i] = (double)(base + (long long)(r->n ? u8(r) % 8 : i));
            H5Dwrite(d, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, v);
            free(v);
        }
        if (d >= 0)
            H5Dclose(d);
        H5Pclose(dcpl);
        H5Sclose(sp);
        H5Tclose(t);
    } else if (op == 5) { /* a group where a dataset was */
        hid_t g = H5Gcreate2(f, dn, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        if (g >= 0)
            H5Gclose(g);
    } else if (op == 6) { /* ascending or not: an int32 segment table */
        hsize_t n = u8(r) % 20;
        int32_t v[20];
        for (hsize_t i = 0; i < n; i++)
            v[i] = (int32_t)ints[u8(r) % (sizeof ints / sizeof *ints)];
        if (H5Lexists(f, "/segments", H5P_DEFAULT) > 0)
            H5Ldelete(f, "/segments", H5P_DEFAULT);
        hid_t sp = H5Screate_simple(1, &n, NULL);
        hid_t d = H5Dcreate2(f, "/segments", H5T_STD_I32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        if (d >= 0) {
            if (n)
                H5Dwrite(d, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, v);
            H5Dclose(d);
        }
        H5Sclose(sp);
    }
    /* op 2: attribute removed, op 4: link removed */
    H5Eclear2(H5E_DEFAULT);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    write_bytes(g_path, g_base, g_base_len);
    hid_t f = H5Fopen(g_path, H5F_ACC_RDWR, H5P_DEFAULT);
    if (f < 0)
        abort();
    rd_t r = {data, size};
    for (int k = 0; k < 8 && r.n; k++)
        mutate(f, &r);
    H5Fclose(f);
    kv_trace_t *t = NULL;
    if (kv_trace_open(g_path, &t) != KV_OK) {
        if (t || !strstr(kv_last_error(), g_path)) {
            fprintf(stderr, "fuzz_trace: failure without the file named: %s\n", kv_last_error());
            abort();
        }
        return 0;
    }
    const kv_trace_meta_t *m = kv_trace_meta(t);
    for (int l = 0; l < m->n_layers; l++)
        for (int w = 0; w < KV_T_COUNT; w++) {
            if (!kv_trace_has(t, (kv_tensor_t)w))
                continue;
            size_t n = kv_tensor_numel(m, (kv_tensor_t)w);
            if (n > (1u << 22))
                continue; /* a consistent but huge shape: reading it is legitimate, not tested here */
            float *buf = kv_malloc(n * sizeof(float) + 4, "fuzz tensor");
            if (kv_trace_read(t, l, (kv_tensor_t)w, buf) != KV_OK && !strstr(kv_last_error(), g_path))
                abort();
            if (kv_tensor_per_token((kv_tensor_t)w) && m->n_tokens > 1) {
                const int t0 = (int)(n % (size_t)m->n_tokens), nt = m->n_tokens - t0;
                if (kv_trace_read_rows(t, l, (kv_tensor_t)w, t0, nt, buf) != KV_OK && !strstr(kv_last_error(), g_path))
                    abort();
            }
            kv_free(buf);
        }
    for (int i = 0; i < m->n_tokens && i < 64; i++)
        if (kv_trace_segment_of(m, i) < 0 || (m->n_segments && kv_trace_segment_of(m, i) >= m->n_segments))
            abort();
    uint64_t raw, stored;
    kv_trace_storage(t, &raw, &stored);
    kv_trace_close(t);
    char *argv[] = {"info", g_path, NULL};
    kv_cmd_info(2, argv);
    return 0;
}
