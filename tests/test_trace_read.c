/*
 * test_trace_read.c: the trace reader's direct chunk reads (trace_hdf5.c fetches whole stored chunks
 * with H5Dread_chunk and decodes them itself, in parallel). Every read must give the bytes HDF5's
 * own pipeline gives for the same dataset, so each test compares with an H5Dread of it made here:
 *   - whole tensors, f32 and f16, with edge chunks along the tokens (T = 200 in chunks of 64) and
 *     along W_O's rows, with 1 and 3 threads; the filter's decoder is never called (a counting
 *     stand-in for the filter proves the direct path ran);
 *   - a file whose chunks were made by HDF5's pipeline (H5Dwrite) reads the same, directly;
 *   - row reads: chunk-aligned ranges go direct, ranges that cut chunks go through H5Dread;
 *   - what the writer does not make goes through H5Dread and still reads right: another filter
 *     pipeline, frames without content size, a chunk stored with zstd skipped (filter mask not 0),
 *     a tensor never written (fill value);
 *   - a corrupted chunk is an error that names the file and the dataset, never garbage or a crash,
 *     and bytes flipped anywhere in a chunk give what the pipeline gives (the same values or an
 *     error: zstd frames carry no checksum, so some flips decode to other values in both).
 */
#include "sim/common/kv_common.h"
#include "sim/common/kv_rng.h"
#include "tests/kv_test.h"
#include "tests/trace_chunk_fixture.h"
#include "traces/kv_f16.h"
#include "traces/kv_trace.h"
#include "traces/kv_zstd_filter.h"

#include <hdf5.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

/* Smooth data plus noise, a few values beyond the f16 range (infinities once stored as f16). */
static float *make_data(size_t n, uint64_t seed)
{
    float *x = kv_malloc(n * sizeof(float), "test");
    kv_rng_t r;
    kv_rng_seed(&r, seed);
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(2.0 * sin(0.013 * (double)i) + 0.3 * kv_rng_normal(&r));
    x[kv_rng_below(&r, n)] = 7e4f;
    return x;
}

/* A trace written by kvsim's writer (whole tensors: direct chunk writes); `skip` (layer * KV_T_COUNT
 * + tensor, or -1) is left unwritten. */
static void write_trace(const char *path, kv_dtype_t dt, uint64_t seed, int skip)
{
    kv_trace_meta_t m;
    meta_for(&m);
    kv_write_opts_t o = {dt, 3, CHUNK_T};
    kv_trace_writer_t *w;
    ck_assert_msg(kv_trace_create(path, &m, &o, &w) == KV_OK, "%s", kv_last_error());
    for (int l = 0; l < m.n_layers; l++)
        for (int t = 0; t < KV_T_COUNT; t++) {
            if (l * KV_T_COUNT + t == skip)
                continue;
            float *x = make_data(kv_tensor_numel(&m, (kv_tensor_t)t), seed + (uint64_t)(l * 100 + t));
            ck_assert_msg(kv_trace_write(w, l, (kv_tensor_t)t, x) == KV_OK, "%s", kv_last_error());
            kv_free(x);
        }
    ck_assert_msg(kv_trace_commit(w) == KV_OK, "%s", kv_last_error());
}

/* Rows [t0, t0 + nt) (t0 < 0: all) of dataset `name` as HDF5's pipeline reads them, as floats (f16
 * read in the file's own type and widened by kv_f16). Returns NULL when H5Dread fails. */
static float *pipeline_read(const char *path, const char *name, int t0, int nt, size_t *n_out)
{
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    ck_assert(f >= 0);
    hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
    ck_assert(d >= 0);
    hid_t fs = H5Dget_space(d), ft = H5Dget_type(d);
    hsize_t dims[3] = {1, 1, 1}, start[3] = {0, 0, 0};
    int rank = H5Sget_simple_extent_dims(fs, dims, NULL);
    if (t0 >= 0) {
        start[1] = (hsize_t)t0;
        dims[1] = (hsize_t)nt;
    }
    H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, dims, NULL);
    hid_t ms = H5Screate_simple(rank, dims, NULL);
    size_t n = (size_t)(dims[0] * dims[1] * (rank == 3 ? dims[2] : 1));
    float *x = kv_malloc(n * sizeof(float), "test");
    herr_t e;
    if (H5Tget_size(ft) == 2) {
        uint16_t *h = kv_malloc(n * 2, "test");
        e = H5Dread(d, ft, ms, fs, H5P_DEFAULT, h);
        kv_f16_to_f32_n(h, x, n);
        kv_free(h);
    } else {
        e = H5Dread(d, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, x);
    }
    H5Eclear2(H5E_DEFAULT);
    H5Sclose(ms);
    H5Tclose(ft);
    H5Sclose(fs);
    H5Dclose(d);
    H5Fclose(f);
    if (e < 0) {
        kv_free(x);
        return NULL;
    }
    *n_out = n;
    return x;
}

/* kvsim's read of every tensor (or rows [t0, t0 + nt) of the per-token ones) equals the pipeline's
 * bit for bit; returns how many reads there were. */
static int check_all(const char *path, int t0, int nt)
{
    kv_trace_t *t;
    ck_assert_msg(kv_trace_open(path, &t) == KV_OK, "%s", kv_last_error());
    const kv_trace_meta_t *m = kv_trace_meta(t);
    int reads = 0;
    for (int l = 0; l < m->n_layers; l++)
        for (int w = 0; w < KV_T_COUNT; w++) {
            const int rows = t0 >= 0 && kv_tensor_per_token((kv_tensor_t)w);
            if (t0 >= 0 && !rows)
                continue;
            char name[64];
            snprintf(name, sizeof name, "/layers/%d/%s", l, kv_tensor_name((kv_tensor_t)w));
            size_t n = 0;
            const long decodes = kv_test_filter_decodes; /* counts kvsim's reads only */
            float *want = pipeline_read(path, name, rows ? t0 : -1, nt, &n);
            kv_test_filter_decodes = decodes;
            ck_assert_msg(want != NULL, "%s: the pipeline cannot read it", name);
            float *got = kv_malloc(n * sizeof(float), "test");
            int rc =
                rows ? kv_trace_read_rows(t, l, (kv_tensor_t)w, t0, nt, got) : kv_trace_read(t, l, (kv_tensor_t)w, got);
            ck_assert_msg(rc == KV_OK, "%s: %s", name, kv_last_error());
            ck_assert_msg(!memcmp(got, want, n * sizeof(float)), "%s (rows %d + %d): differs from the pipeline", name,
                          t0, nt);
            reads++;
            kv_free(got);
            kv_free(want);
        }
    kv_trace_close(t);
    return reads;
}

START_TEST(whole_tensors_equal_the_pipeline)
{
    const kv_dtype_t dt = (_i & 1) ? KV_DTYPE_F16 : KV_DTYPE_F32;
    const int threads = (_i & 2) ? 3 : 1;
    char path[256];
    kv_test_tmp("read.h5", path, sizeof path);
    write_trace(path, dt, 21, -1);
    const int old = omp_get_max_threads();
    omp_set_num_threads(threads);
    kv_test_count_filter(1);
    kv_trace_t *t;
    ck_assert_int_eq(kv_trace_open(path, &t), KV_OK);
    float *x = kv_malloc(sizeof(float) * 4 * T_TOK * 16, "test"); /* Q, the largest */
    for (int w = 0; w < KV_T_COUNT; w++)
        ck_assert_int_eq(kv_trace_read(t, 1, (kv_tensor_t)w, x), KV_OK);
    kv_free(x);
    kv_trace_close(t);
    /* every whole-tensor read decoded its chunks itself */
    ck_assert_int_eq(kv_test_filter_decodes, 0);
    kv_test_count_filter(0);
    ck_assert_int_eq(check_all(path, -1, 0), 2 * KV_T_COUNT);
    omp_set_num_threads(old);
}
END_TEST

/* The same data, each dataset rewritten through H5Dwrite: HDF5's shuffle and the zstd filter make
 * the chunks (frames with content size, as hdf5plugin's), and kvsim reads them directly. */
START_TEST(chunks_from_the_pipeline_read_directly)
{
    char path[256];
    kv_test_tmp("pipeline.h5", path, sizeof path);
    write_trace(path, KV_DTYPE_F16, 22, -1);
    kv_trace_meta_t m;
    meta_for(&m);
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    ck_assert(f >= 0);
    kv_test_count_filter(1);
    for (int w = 0; w < KV_T_COUNT; w++) {
        char name[64];
        snprintf(name, sizeof name, "/layers/0/%s", kv_tensor_name((kv_tensor_t)w));
        hid_t d = H5Dopen2(f, name, H5P_DEFAULT), ft = H5Dget_type(d);
        size_t n = kv_tensor_numel(&m, (kv_tensor_t)w);
        float *x = make_data(n, 500 + (uint64_t)w);
        herr_t e;
        if (H5Tget_size(ft) == 2) {
            uint16_t *h = kv_malloc(n * 2, "test");
            kv_f32_to_f16_n(x, h, n);
            e = H5Dwrite(d, ft, H5S_ALL, H5S_ALL, H5P_DEFAULT, h);
            kv_free(h);
        } else {
            e = H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, x);
        }
        ck_assert(e >= 0);
        kv_free(x);
        H5Tclose(ft);
        H5Dclose(d);
    }
    H5Fclose(f);
    kv_test_filter_decodes = 0; /* (HDF5 read the edge chunks back to complete them) */
    kv_trace_t *t;
    ck_assert_int_eq(kv_trace_open(path, &t), KV_OK);
    float *x = kv_malloc(sizeof(float) * 4 * T_TOK * 16, "test");
    for (int w = 0; w < KV_T_COUNT; w++)
        ck_assert_int_eq(kv_trace_read(t, 0, (kv_tensor_t)w, x), KV_OK);
    ck_assert_int_eq(kv_test_filter_decodes, 0);
    /* and the values are the data (through f16 for Q, K, V) */
    float *want = make_data(kv_tensor_numel(&m, KV_T_LSE), 500 + KV_T_LSE);
    ck_assert_int_eq(kv_trace_read(t, 0, KV_T_LSE, x), KV_OK);
    ck_assert(!memcmp(x, want, sizeof(float) * kv_tensor_numel(&m, KV_T_LSE)));
    kv_free(want);
    kv_free(x);
    kv_trace_close(t);
    kv_test_count_filter(0);
    check_all(path, -1, 0);
}
END_TEST

START_TEST(row_reads_direct_when_they_cover_whole_chunks)
{
    char path[256];
    kv_test_tmp("rows.h5", path, sizeof path);
    write_trace(path, KV_DTYPE_F16, 23, -1);
    /* (t0, nt, direct): aligned inside, aligned to the edge (the padded edge chunk), cut chunks */
    static const int cases[][3] = {{64, 128, 1}, {128, 72, 1}, {192, 8, 1}, {0, 200, 1}, {10, 100, 0}, {64, 70, 0}};
    for (size_t c = 0; c < KV_ARRAY_LEN(cases); c++) {
        kv_test_count_filter(1);
        int reads = check_all(path, cases[c][0], cases[c][1]);
        ck_assert_int_eq(reads, 2 * 14); /* Q, K, V, LSE, entropy, acc_attn and the 8 statistics of 2 layers */
        if (cases[c][2])
            ck_assert_msg(kv_test_filter_decodes == 0, "rows %d + %d: %ld chunks went through the filter", cases[c][0],
                          cases[c][1], kv_test_filter_decodes);
        else
            ck_assert_msg(kv_test_filter_decodes > 0, "rows %d + %d: expected HDF5's pipeline", cases[c][0],
                          cases[c][1]);
    }
    kv_test_count_filter(0);
}
END_TEST

/* Chunk (h, 64 * c) of `name` replaced by a frame of the same data made by `how`: 0 = zstd without
 * content size; 1 = stored with zstd skipped (filter mask bit 1: only shuffled). */
static void restore_chunk(const char *path, const char *name, int h, int c, int how)
{
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
    ck_assert(d >= 0);
    hsize_t off[3] = {(hsize_t)h, (hsize_t)(CHUNK_T * c), 0}, size = 0;
    ck_assert(H5Dget_chunk_storage_size(d, off, &size) >= 0);
    unsigned char *raw = kv_malloc(size, "test");
    uint32_t mask = 1;
    ck_assert(H5Dread_chunk(d, H5P_DEFAULT, off, &mask, raw) >= 0);
    ck_assert_uint_eq(mask, 0);
    unsigned long long cn = ZSTD_getFrameContentSize(raw, size);
    unsigned char *plain = kv_malloc(cn, "test");
    ck_assert_uint_eq(ZSTD_decompress(plain, cn, raw, size), cn);
    if (how == 0) {
        ZSTD_CCtx *cc = ZSTD_createCCtx();
        size_t cap = ZSTD_compressBound(cn);
        unsigned char *fr = kv_malloc(cap, "test");
        ZSTD_CCtx_setParameter(cc, ZSTD_c_contentSizeFlag, 0);
        size_t got = ZSTD_compress2(cc, fr, cap, plain, cn);
        ck_assert(!ZSTD_isError(got));
        ck_assert(ZSTD_getFrameContentSize(fr, got) == ZSTD_CONTENTSIZE_UNKNOWN);
        ck_assert(H5Dwrite_chunk(d, H5P_DEFAULT, 0, off, got, fr) >= 0);
        ZSTD_freeCCtx(cc);
        kv_free(fr);
    } else {
        ck_assert(H5Dwrite_chunk(d, H5P_DEFAULT, 1u << 1, off, cn, plain) >= 0);
    }
    kv_free(plain);
    kv_free(raw);
    H5Dclose(d);
    H5Fclose(f);
}

START_TEST(what_the_writer_does_not_make_goes_through_hdf5)
{
    char path[256];
    kv_test_tmp("fallback.h5", path, sizeof path);
    /* layer 1's V never written: its chunks do not exist and read as the fill value, 0 */
    write_trace(path, KV_DTYPE_F16, 24, 1 * KV_T_COUNT + KV_T_V);
    restore_chunk(path, "/layers/0/q", 1, 1, 0);
    restore_chunk(path, "/layers/0/k", 0, 3, 0); /* the edge chunk */
    restore_chunk(path, "/layers/1/q", 2, 2, 1);
    /* layer 0's LSE recreated with deflate instead of shuffle + zstd */
    kv_trace_meta_t m;
    meta_for(&m);
    size_t n_lse = kv_tensor_numel(&m, KV_T_LSE);
    float *lse = make_data(n_lse, 77);
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    ck_assert(H5Ldelete(f, "/layers/0/lse", H5P_DEFAULT) >= 0);
    hsize_t dims[2] = {4, T_TOK}, chunk[2] = {1, CHUNK_T};
    hid_t sp = H5Screate_simple(2, dims, NULL), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, 2, chunk);
    H5Pset_deflate(dcpl, 4);
    hid_t d = H5Dcreate2(f, "/layers/0/lse", H5T_IEEE_F32LE, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    ck_assert(d >= 0);
    ck_assert(H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, lse) >= 0);
    H5Dclose(d);
    H5Pclose(dcpl);
    H5Sclose(sp);
    H5Fclose(f);
    kv_test_count_filter(1);
    kv_trace_t *t;
    ck_assert_int_eq(kv_trace_open(path, &t), KV_OK);
    float *x = kv_malloc(sizeof(float) * 4 * T_TOK * 16, "test");
    ck_assert_int_eq(kv_trace_read(t, 0, KV_T_LSE, x), KV_OK);
    ck_assert(!memcmp(x, lse, sizeof(float) * n_lse));
    ck_assert_int_eq(kv_test_filter_decodes, 0); /* deflate: not the zstd filter */
    ck_assert_int_eq(kv_trace_read(t, 0, KV_T_Q, x), KV_OK);
    ck_assert_int_gt(kv_test_filter_decodes, 0); /* the frame without content size sent Q to the pipeline */
    kv_test_filter_decodes = 0;
    ck_assert_int_eq(kv_trace_read(t, 1, KV_T_Q, x), KV_OK);
    ck_assert_int_gt(kv_test_filter_decodes, 0); /* the chunk stored with zstd skipped too */
    ck_assert_int_eq(kv_trace_read(t, 1, KV_T_V, x), KV_OK);
    for (size_t i = 0; i < (size_t)2 * T_TOK * 16; i++)
        ck_assert(x[i] == 0.0f);
    kv_trace_close(t);
    kv_free(x);
    kv_free(lse);
    kv_test_count_filter(0);
    check_all(path, -1, 0);
    check_all(path, 64, 136);
}
END_TEST

/* The stored bytes of chunk (h, 64 * c) of `name`, modified by `edit`, written back as they are. */
static void corrupt_chunk(const char *path, const char *name, int h, int c, void (*edit)(unsigned char *, size_t, int),
                          int arg)
{
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
    ck_assert(d >= 0);
    hsize_t off[3] = {(hsize_t)h, (hsize_t)(CHUNK_T * c), 0}, size = 0;
    ck_assert(H5Dget_chunk_storage_size(d, off, &size) >= 0);
    unsigned char *raw = kv_malloc(size, "test");
    uint32_t mask = 0;
    ck_assert(H5Dread_chunk(d, H5P_DEFAULT, off, &mask, raw) >= 0);
    edit(raw, size, arg);
    ck_assert(H5Dwrite_chunk(d, H5P_DEFAULT, 0, off, size, raw) >= 0);
    kv_free(raw);
    H5Dclose(d);
    H5Fclose(f);
}

/* Everything after the frame header 0xff: the first block header then names the reserved block
 * type, which every zstd decoder rejects. The header (RFC 8878, 3.1.1.1): magic, descriptor, window
 * byte unless single-segment, dictionary id of 0/1/2/4 bytes, content size of 0 or 1/2/4/8 bytes. */
static void edit_blocks(unsigned char *raw, size_t size, int arg)
{
    (void)arg;
    const unsigned fhd = raw[4], fcs = fhd >> 6, single = (fhd >> 5) & 1, did = fhd & 3;
    static const size_t did_bytes[4] = {0, 1, 2, 4}, fcs_bytes[4] = {0, 2, 4, 8};
    size_t hdr = 5 + !single + did_bytes[did] + (fcs == 0 ? single : fcs_bytes[fcs]);
    ck_assert(hdr + 3 < size);
    memset(raw + hdr, 0xff, size - hdr);
}
static void edit_magic(unsigned char *raw, size_t size, int arg)
{
    (void)size, (void)arg;
    raw[0] ^= 0x5a;
}
static void edit_flip(unsigned char *raw, size_t size, int arg)
{
    kv_rng_t r;
    kv_rng_seed(&r, (uint64_t)arg);
    for (int i = 0; i < 4; i++)
        raw[kv_rng_below(&r, size)] ^= (unsigned char)(1u << kv_rng_below(&r, 8));
}

START_TEST(a_corrupt_chunk_is_an_error_naming_the_dataset)
{
    char path[256];
    kv_test_tmp("corrupt.h5", path, sizeof path);
    void (*edits[2])(unsigned char *, size_t, int) = {edit_blocks, edit_magic};
    for (int e = 0; e < 2; e++) {
        write_trace(path, KV_DTYPE_F16, 25, -1);
        corrupt_chunk(path, "/layers/1/k", 1, 2, edits[e], 0);
        kv_trace_t *t;
        ck_assert_int_eq(kv_trace_open(path, &t), KV_OK);
        float *x = kv_malloc(sizeof(float) * 2 * T_TOK * 16, "test");
        ck_assert_int_eq(kv_trace_read(t, 1, KV_T_K, x), KV_EFORMAT);
        ck_assert_msg(strstr(kv_last_error(), "layers/1/k") && strstr(kv_last_error(), path), "message: %s",
                      kv_last_error());
        ck_assert_int_eq(kv_trace_read(t, 1, KV_T_V, x), KV_OK); /* the rest reads */
        kv_layer_t L = {0};
        ck_assert_int_ne(kv_trace_read_layer(t, 1, &L), KV_OK);
        kv_layer_free(&L);
        kv_free(x);
        kv_trace_close(t);
        /* the pipeline fails on it too */
        size_t n;
        ck_assert_ptr_null(pipeline_read(path, "/layers/1/k", -1, 0, &n));
    }
    /* bytes flipped anywhere: what the pipeline gives, values or an error */
    for (int s = 1; s <= 12; s++) {
        write_trace(path, KV_DTYPE_F16, 25, -1);
        corrupt_chunk(path, "/layers/0/q", 3, s % 4, edit_flip, s);
        size_t n = 0;
        float *want = pipeline_read(path, "/layers/0/q", -1, 0, &n);
        kv_trace_t *t;
        ck_assert_int_eq(kv_trace_open(path, &t), KV_OK);
        float *x = kv_malloc(sizeof(float) * 4 * T_TOK * 16, "test");
        int rc = kv_trace_read(t, 0, KV_T_Q, x);
        if (want) {
            ck_assert_msg(rc == KV_OK, "flip seed %d: the pipeline reads it, kvsim: %s", s, kv_last_error());
            ck_assert_msg(!memcmp(x, want, n * sizeof(float)), "flip seed %d: values differ from the pipeline's", s);
        } else {
            ck_assert_msg(rc != KV_OK, "flip seed %d: the pipeline fails, kvsim read it", s);
            ck_assert_ptr_nonnull(strstr(kv_last_error(), "layers/0/q"));
        }
        kv_free(x);
        kv_free(want);
        kv_trace_close(t);
    }
}
END_TEST

Suite *suite_trace_read(void)
{
    Suite *s = suite_create("trace_read");
    TCase *tc = tcase_create("direct_chunks");
    tcase_add_loop_test(tc, whole_tensors_equal_the_pipeline, 0, 4); /* f32, f16 x 1, 3 threads */
    tcase_add_test(tc, chunks_from_the_pipeline_read_directly);
    tcase_add_test(tc, row_reads_direct_when_they_cover_whole_chunks);
    tcase_add_test(tc, what_the_writer_does_not_make_goes_through_hdf5);
    tcase_add_test(tc, a_corrupt_chunk_is_an_error_naming_the_dataset);
    suite_add_tcase(s, tc);
    return s;
}
