/*
 * test_trace_write.c: the trace writer's direct chunk writes (trace_hdf5.c compresses whole chunks
 * itself, in parallel, and stores them with H5Dwrite_chunk). The format must not change, so every
 * test compares against what HDF5's own filter pipeline makes from the same data:
 *   - round trips: f32 bit-exact, f16 the converter's bits, f16_overflow counted;
 *   - shapes with edge chunks along the tokens (T not a multiple of the chunk) and along W_O's rows;
 *   - the pipeline of every dataset (shuffle, then zstd with one cd_value), each chunk one zstd
 *     frame that records the full chunk's size, decoded here by hand (zstd, then un-shuffle by the
 *     definition output byte b*n + i = input byte i*s + b) with zeros past the dataset's edge;
 *   - every stored chunk byte-identical to the chunk HDF5 stores when the same data goes through
 *     H5Dwrite and its filters (a reference file written here with the same creation properties);
 *   - whole-tensor writes never call the filter's encoder (a counting stand-in for the filter
 *     proves the direct path ran), row writes that cut chunks mix both paths and still match;
 *   - the same chunks with 1 or 3 threads;
 *   - h5py + hdf5plugin read a direct-written trace as kvsim does (where they are installed).
 */
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
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
#include <unistd.h>
#include <zstd.h>

/* Smooth data plus noise (compresses somewhat, like activations); `n_big` values beyond the f16
 * range at seeded places of Q (their count is the expected f16_overflow per tensor). */
static float *make_data(size_t n, uint64_t seed, int n_big)
{
    float *x = kv_malloc(n * sizeof(float), "test");
    kv_rng_t r;
    kv_rng_seed(&r, seed);
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(2.0 * sin(0.013 * (double)i) + 0.3 * kv_rng_normal(&r));
    for (int b = 0; b < n_big; b++)
        x[kv_rng_below(&r, n)] = (b & 1) ? -1e6f : 7e4f;
    return x;
}

#define N_BIG 3 /* per Q tensor */
typedef struct {
    float *x[2][KV_T_COUNT]; /* [layer][tensor] */
    long overflow;           /* values beyond the f16 range, counted here */
} data_t;

static void data_make(const kv_trace_meta_t *m, data_t *D, uint64_t seed)
{
    D->overflow = 0;
    for (int l = 0; l < m->n_layers; l++)
        for (int w = 0; w < KV_T_COUNT; w++) {
            size_t n = kv_tensor_numel(m, (kv_tensor_t)w);
            D->x[l][w] = make_data(n, seed + (uint64_t)(l * 100 + w), w == KV_T_Q ? N_BIG : 0);
            if (w == KV_T_Q)
                for (size_t i = 0; i < n; i++)
                    D->overflow += fabsf(D->x[l][w][i]) > 65520.0f;
        }
}

static void data_free(data_t *D)
{
    for (int l = 0; l < 2; l++)
        for (int w = 0; w < KV_T_COUNT; w++)
            kv_free(D->x[l][w]);
}

/* Write D through kvsim's writer: whole tensors, or per-token tensors in row pieces cut at `cuts`
 * (ascending, ending at T), as capture does. */
static void write_with(const char *path, kv_dtype_t dt, const data_t *D, const int *cuts)
{
    kv_trace_meta_t m;
    meta_for(&m);
    kv_write_opts_t o = {dt, 5, CHUNK_T};
    kv_trace_writer_t *w;
    ck_assert_msg(kv_trace_create(path, &m, &o, &w) == KV_OK, "%s", kv_last_error());
    for (int l = 0; l < m.n_layers; l++)
        for (int t = 0; t < KV_T_COUNT; t++) {
            const float *x = D->x[l][t];
            if (!cuts || !kv_tensor_per_token((kv_tensor_t)t)) {
                ck_assert_msg(kv_trace_write(w, l, (kv_tensor_t)t, x) == KV_OK, "%s", kv_last_error());
                continue;
            }
            uint64_t d[3];
            int rank = kv_tensor_dims(&m, (kv_tensor_t)t, d);
            const size_t row = rank == 3 ? (size_t)d[2] : 1;
            float *piece = kv_malloc(sizeof(float) * (size_t)d[0] * T_TOK * row, "test");
            for (int c = 0, t0 = 0; t0 < T_TOK; t0 = cuts[c++]) {
                const int nt = cuts[c] - t0;
                for (uint64_t h = 0; h < d[0]; h++)
                    memcpy(piece + h * (size_t)nt * row, x + (h * T_TOK + (size_t)t0) * row, sizeof(float) * nt * row);
                ck_assert_msg(kv_trace_write_rows(w, l, (kv_tensor_t)t, t0, nt, piece) == KV_OK, "%s", kv_last_error());
            }
            kv_free(piece);
        }
    kv_trace_meta_t *wm = kv_trace_writer_meta(w);
    wm->tokens = kv_malloc(sizeof(int32_t) * T_TOK, "test");
    for (int i = 0; i < T_TOK; i++)
        wm->tokens[i] = i % 7;
    ck_assert_msg(kv_trace_commit(w) == KV_OK, "%s", kv_last_error());
}

/* The same data written by HDF5 itself: each dataset of `path` recreated in `ref` with its creation
 * properties and type, and filled with one H5Dwrite (so HDF5's shuffle and the zstd filter make the
 * chunks). f16 tensors are written as the converter's bits. */
static void write_reference(const char *path, const char *ref, kv_dtype_t dt, const data_t *D)
{
    kv_trace_meta_t m;
    meta_for(&m);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT), g = H5Fcreate(ref, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    ck_assert(f >= 0 && g >= 0);
    for (int l = 0; l < m.n_layers; l++)
        for (int t = 0; t < KV_T_COUNT; t++) {
            char name[64];
            snprintf(name, sizeof name, "L%d_%s", l, kv_tensor_name((kv_tensor_t)t));
            char src[64];
            snprintf(src, sizeof src, "/layers/%d/%s", l, kv_tensor_name((kv_tensor_t)t));
            hid_t d = H5Dopen2(f, src, H5P_DEFAULT);
            ck_assert(d >= 0);
            hid_t dcpl = H5Dget_create_plist(d), type = H5Dget_type(d), sp = H5Dget_space(d);
            hid_t e = H5Dcreate2(g, name, type, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
            ck_assert(e >= 0);
            size_t n = kv_tensor_numel(&m, (kv_tensor_t)t);
            herr_t st;
            if (dt == KV_DTYPE_F16 && t <= KV_T_V) {
                uint16_t *h = kv_malloc(n * 2, "test");
                kv_f32_to_f16_n(D->x[l][t], h, n);
                st = H5Dwrite(e, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, h);
                kv_free(h);
            } else {
                st = H5Dwrite(e, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, D->x[l][t]);
            }
            ck_assert(st >= 0);
            H5Dclose(e);
            H5Sclose(sp);
            H5Tclose(type);
            H5Pclose(dcpl);
            H5Dclose(d);
        }
    H5Fclose(g);
    H5Fclose(f);
}

/* Every chunk of dataset a equals (filter mask, size, bytes) the chunk at the same place in b. */
static void same_chunks(hid_t a, hid_t b, const char *what)
{
    hid_t sa = H5Dget_space(a), sb = H5Dget_space(b);
    hsize_t na = 0, nb = 0;
    ck_assert(H5Dget_num_chunks(a, sa, &na) >= 0 && H5Dget_num_chunks(b, sb, &nb) >= 0);
    ck_assert_msg(na == nb && na > 0, "%s: %llu vs %llu chunks", what, (unsigned long long)na, (unsigned long long)nb);
    for (hsize_t i = 0; i < na; i++) {
        hsize_t off[3] = {0, 0, 0}, size_a = 0, size_b = 0;
        unsigned mask_a = 9, mask_b = 9;
        haddr_t addr;
        ck_assert(H5Dget_chunk_info(a, sa, i, off, &mask_a, &addr, &size_a) >= 0);
        ck_assert(H5Dget_chunk_info_by_coord(b, off, &mask_b, &addr, &size_b) >= 0);
        ck_assert_msg(mask_a == 0 && mask_b == 0, "%s: filter masks %u, %u", what, mask_a, mask_b);
        ck_assert_msg(size_a == size_b, "%s chunk %llu: %llu vs %llu bytes", what, (unsigned long long)i,
                      (unsigned long long)size_a, (unsigned long long)size_b);
        unsigned char *ba = kv_malloc(size_a, "test"), *bb = kv_malloc(size_b, "test");
        uint32_t fm = 0;
        ck_assert(H5Dread_chunk(a, H5P_DEFAULT, off, &fm, ba) >= 0);
        ck_assert(H5Dread_chunk(b, H5P_DEFAULT, off, &fm, bb) >= 0);
        ck_assert_msg(memcmp(ba, bb, size_a) == 0, "%s chunk %llu differs", what, (unsigned long long)i);
        kv_free(ba);
        kv_free(bb);
    }
    H5Sclose(sa);
    H5Sclose(sb);
}

static void compare_with_reference(const char *path, const char *ref)
{
    kv_trace_meta_t m;
    meta_for(&m);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT), g = H5Fopen(ref, H5F_ACC_RDONLY, H5P_DEFAULT);
    ck_assert(f >= 0 && g >= 0);
    for (int l = 0; l < m.n_layers; l++)
        for (int t = 0; t < KV_T_COUNT; t++) {
            char a[64], b[64];
            snprintf(a, sizeof a, "/layers/%d/%s", l, kv_tensor_name((kv_tensor_t)t));
            snprintf(b, sizeof b, "L%d_%s", l, kv_tensor_name((kv_tensor_t)t));
            hid_t da = H5Dopen2(f, a, H5P_DEFAULT), db = H5Dopen2(g, b, H5P_DEFAULT);
            same_chunks(da, db, a);
            H5Dclose(da);
            H5Dclose(db);
        }
    H5Fclose(g);
    H5Fclose(f);
}

/* kvsim's reader returns exactly the data (f32), or the converter's f16 values. */
static void check_round_trip(const char *path, kv_dtype_t dt, const data_t *D)
{
    kv_trace_t *t;
    ck_assert_msg(kv_trace_open(path, &t) == KV_OK, "%s", kv_last_error());
    const kv_trace_meta_t *m = kv_trace_meta(t);
    ck_assert_int_eq(m->dtype, dt);
    ck_assert_int_eq(m->zstd_level, 5);
    const long want_overflow = dt == KV_DTYPE_F16 ? D->overflow : 0;
    ck_assert_int_eq(m->f16_overflow, want_overflow);
    for (int l = 0; l < m->n_layers; l++)
        for (int w = 0; w < KV_T_COUNT; w++) {
            size_t n = kv_tensor_numel(m, (kv_tensor_t)w);
            float *x = kv_malloc(n * sizeof(float), "test");
            ck_assert_int_eq(kv_trace_read(t, l, (kv_tensor_t)w, x), KV_OK);
            const float *ref = D->x[l][w];
            for (size_t i = 0; i < n; i++) {
                float want = (dt == KV_DTYPE_F16 && w <= KV_T_V) ? kv_f16_to_f32(kv_f32_to_f16(ref[i])) : ref[i];
                ck_assert_msg(memcmp(&x[i], &want, 4) == 0, "layer %d %s[%zu]: %a, want %a", l,
                              kv_tensor_name((kv_tensor_t)w), i, x[i], want);
            }
            kv_free(x);
        }
    kv_trace_close(t);
}

START_TEST(whole_tensors_match_the_pipeline)
{
    const kv_dtype_t dt = _i ? KV_DTYPE_F16 : KV_DTYPE_F32;
    kv_trace_meta_t m;
    meta_for(&m);
    data_t D;
    data_make(&m, &D, 11);
    char path[256], ref[256];
    kv_test_tmp("direct.h5", path, sizeof path);
    kv_test_tmp("direct-ref.h5", ref, sizeof ref);
    kv_test_count_filter(1);
    write_with(path, dt, &D, NULL);
    /* every tensor was written whole: no chunk went through the filter's encoder */
    ck_assert_int_eq(kv_test_filter_encodes, 0);
    write_reference(path, ref, dt, &D);
    ck_assert_int_gt(kv_test_filter_encodes, 0); /* the stand-in does count HDF5's own compression */
    kv_test_count_filter(0);
    check_round_trip(path, dt, &D);
    compare_with_reference(path, ref);
    data_free(&D);
}
END_TEST

START_TEST(chunks_are_frames_of_shuffled_elements)
{
    kv_trace_meta_t m;
    meta_for(&m);
    data_t D;
    data_make(&m, &D, 12);
    char path[256];
    kv_test_tmp("frames.h5", path, sizeof path);
    write_with(path, KV_DTYPE_F16, &D, NULL);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    ck_assert(f >= 0);
    /* (tensor, element size, chunk shape, dims): Q (f16, edge chunk along T) and W_O (f32, edge
     * chunk along its rows) */
    struct {
        kv_tensor_t which;
        size_t es;
        hsize_t chunk[3];
    } cases[] = {{KV_T_Q, 2, {1, CHUNK_T, 16}}, {KV_T_WO, 4, {64, 64, 1}}, {KV_T_LSE, 4, {1, CHUNK_T, 1}}};
    for (size_t c = 0; c < KV_ARRAY_LEN(cases); c++) {
        char name[64];
        snprintf(name, sizeof name, "/layers/1/%s", kv_tensor_name(cases[c].which));
        hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
        hid_t dcpl = H5Dget_create_plist(d);
        /* the pipeline: shuffle, then zstd with exactly one cd_value (the level) */
        ck_assert_int_eq(H5Pget_nfilters(dcpl), 2);
        unsigned flags, cd[8];
        size_t ncd = 8;
        char fname[64];
        ck_assert_int_eq(H5Pget_filter2(dcpl, 0, &flags, &ncd, cd, sizeof fname, fname, NULL), H5Z_FILTER_SHUFFLE);
        ncd = 8;
        ck_assert_int_eq(H5Pget_filter2(dcpl, 1, &flags, &ncd, cd, sizeof fname, fname, NULL), KV_ZSTD_FILTER_ID);
        ck_assert_uint_eq(ncd, 1);
        ck_assert_uint_eq(cd[0], 5);
        hsize_t chunk[3] = {1, 1, 1};
        int rank = H5Pget_chunk(dcpl, 3, chunk);
        for (int i = 0; i < rank; i++)
            ck_assert_uint_eq(chunk[i], cases[c].chunk[i]);
        uint64_t dims[3] = {1, 1, 1};
        kv_tensor_dims(&m, cases[c].which, dims);
        const size_t es = cases[c].es, cn = (size_t)(chunk[0] * chunk[1] * chunk[2]);
        hid_t sp = H5Dget_space(d);
        hsize_t nchunks = 0;
        H5Dget_num_chunks(d, sp, &nchunks);
        ck_assert_uint_gt(nchunks, 1);
        for (hsize_t i = 0; i < nchunks; i++) {
            hsize_t off[3] = {0, 0, 0}, size;
            unsigned mask;
            haddr_t addr;
            ck_assert(H5Dget_chunk_info(d, sp, i, off, &mask, &addr, &size) >= 0);
            unsigned char *raw = kv_malloc(size, "test"), *shuf = kv_malloc(cn * es, "test");
            uint32_t fm = 1;
            ck_assert(H5Dread_chunk(d, H5P_DEFAULT, off, &fm, raw) >= 0);
            ck_assert_uint_eq(fm, 0);
            /* one complete frame, its header recording the full chunk's size (edge chunks too) */
            ck_assert(raw[0] == 0x28 && raw[1] == 0xb5 && raw[2] == 0x2f && raw[3] == 0xfd);
            ck_assert_uint_eq(ZSTD_findFrameCompressedSize(raw, size), size);
            ck_assert_uint_eq(ZSTD_getFrameContentSize(raw, size), cn * es);
            ck_assert_uint_eq(ZSTD_decompress(shuf, cn * es, raw, size), cn * es);
            /* un-shuffle: element i's byte b is at b*n + i; compare with the data (or 0 past the
             * dataset's edge) */
            const float *x = D.x[1][cases[c].which];
            for (size_t e = 0; e < cn; e++) {
                size_t i0 = e / (chunk[1] * chunk[2]), i1 = e / chunk[2] % chunk[1], i2 = e % chunk[2];
                size_t g0 = off[0] + i0, g1 = off[1] + i1, g2 = off[2] + i2;
                unsigned char want[4] = {0, 0, 0, 0}, got[4] = {0, 0, 0, 0};
                if (g0 < dims[0] && g1 < dims[1] && g2 < (rank == 3 ? dims[2] : 1)) {
                    float v = x[(g0 * dims[1] + g1) * (rank == 3 ? dims[2] : 1) + g2];
                    if (es == 2) {
                        uint16_t h = kv_f32_to_f16(v);
                        memcpy(want, &h, 2);
                    } else {
                        memcpy(want, &v, 4);
                    }
                }
                for (size_t b = 0; b < es; b++)
                    got[b] = shuf[b * cn + e];
                ck_assert_msg(memcmp(got, want, es) == 0, "%s chunk %llu element %zu", name, (unsigned long long)i, e);
            }
            kv_free(raw);
            kv_free(shuf);
        }
        H5Sclose(sp);
        H5Pclose(dcpl);
        H5Dclose(d);
    }
    H5Fclose(f);
    data_free(&D);
}
END_TEST

START_TEST(row_pieces_mix_both_paths)
{
    /* pieces that cut chunks ([0,50) none whole; [50,130) chunk 1 whole; [130,200) the edge chunk
     * whole, chunk 2 finished by read-modify-write), then the same with one piece per chunk
     * boundary, then every row at once */
    static const int cut_sets[3][4] = {{50, 130, 200}, {64, 128, 192, 200}, {200}};
    const kv_dtype_t dt = KV_DTYPE_F16;
    kv_trace_meta_t m;
    meta_for(&m);
    data_t D;
    data_make(&m, &D, 13);
    for (int s = 0; s < 3; s++) {
        char path[256], ref[256];
        kv_test_tmp("rows.h5", path, sizeof path);
        kv_test_tmp("rows-ref.h5", ref, sizeof ref);
        kv_test_count_filter(1);
        write_with(path, dt, &D, cut_sets[s]);
        if (s == 0)
            ck_assert_int_gt(kv_test_filter_encodes, 0); /* partly covered chunks went through HDF5 */
        else
            ck_assert_int_eq(kv_test_filter_encodes, 0); /* chunk-aligned pieces: all direct */
        kv_test_count_filter(0);
        check_round_trip(path, dt, &D);
        write_reference(path, ref, dt, &D);
        compare_with_reference(path, ref);
    }
    data_free(&D);
}
END_TEST

START_TEST(rewriting_a_tensor_replaces_it)
{
    kv_trace_meta_t m;
    meta_for(&m);
    data_t A, B;
    data_make(&m, &A, 14);
    data_make(&m, &B, 15);
    char path[256];
    kv_test_tmp("rewrite.h5", path, sizeof path);
    kv_write_opts_t o = {KV_DTYPE_F32, 5, CHUNK_T};
    kv_trace_writer_t *w;
    ck_assert_int_eq(kv_trace_create(path, &m, &o, &w), KV_OK);
    const size_t row = 16, nk = 2 * T_TOK * row;
    /* K: rows [10, 100) of A (partial chunks, then chunk 1 whole), then all of B (direct over chunks
     * that already exist) */
    float *piece = kv_malloc(sizeof(float) * nk, "test");
    for (int h = 0; h < 2; h++)
        memcpy(piece + (size_t)h * 90 * row, A.x[0][KV_T_K] + ((size_t)h * T_TOK + 10) * row, sizeof(float) * 90 * row);
    ck_assert_int_eq(kv_trace_write_rows(w, 0, KV_T_K, 10, 90, piece), KV_OK);
    ck_assert_int_eq(kv_trace_write(w, 0, KV_T_K, B.x[0][KV_T_K]), KV_OK);
    /* then rows [100, 150) of A again: chunk 1's second half and chunk 2's start */
    for (int h = 0; h < 2; h++)
        memcpy(piece + (size_t)h * 50 * row, A.x[0][KV_T_K] + ((size_t)h * T_TOK + 100) * row,
               sizeof(float) * 50 * row);
    ck_assert_int_eq(kv_trace_write_rows(w, 0, KV_T_K, 100, 50, piece), KV_OK);
    ck_assert_int_eq(kv_trace_commit(w), KV_OK);
    kv_trace_t *t;
    ck_assert_int_eq(kv_trace_open(path, &t), KV_OK);
    ck_assert_int_eq(kv_trace_read(t, 0, KV_T_K, piece), KV_OK);
    for (int h = 0; h < 2; h++)
        for (int tok = 0; tok < T_TOK; tok++) {
            const float *want = (tok >= 100 && tok < 150 ? A : B).x[0][KV_T_K] + ((size_t)h * T_TOK + tok) * row;
            ck_assert_msg(!memcmp(piece + ((size_t)h * T_TOK + tok) * row, want, row * 4), "head %d token %d", h, tok);
        }
    kv_trace_close(t);
    kv_free(piece);
    data_free(&A);
    data_free(&B);
}
END_TEST

START_TEST(same_chunks_whatever_the_thread_count)
{
    kv_trace_meta_t m;
    meta_for(&m);
    data_t D;
    data_make(&m, &D, 16);
    char p1[256], p3[256];
    kv_test_tmp("threads1.h5", p1, sizeof p1);
    kv_test_tmp("threads3.h5", p3, sizeof p3);
    const int old = omp_get_max_threads();
    omp_set_num_threads(1);
    write_with(p1, KV_DTYPE_F16, &D, NULL);
    omp_set_num_threads(3);
    write_with(p3, KV_DTYPE_F16, &D, NULL);
    omp_set_num_threads(old);
    hid_t a = H5Fopen(p1, H5F_ACC_RDONLY, H5P_DEFAULT), b = H5Fopen(p3, H5F_ACC_RDONLY, H5P_DEFAULT);
    for (int l = 0; l < m.n_layers; l++)
        for (int w = 0; w < KV_T_COUNT; w++) {
            char name[64];
            snprintf(name, sizeof name, "/layers/%d/%s", l, kv_tensor_name((kv_tensor_t)w));
            hid_t da = H5Dopen2(a, name, H5P_DEFAULT), db = H5Dopen2(b, name, H5P_DEFAULT);
            same_chunks(da, db, name);
            /* stored in the same order: the same file addresses */
            haddr_t aa, ab;
            hsize_t s, off[3] = {0, 0, 0};
            unsigned fm;
            hid_t sp = H5Dget_space(da);
            hsize_t n = 0;
            H5Dget_num_chunks(da, sp, &n);
            for (hsize_t i = 0; i < n; i++) {
                H5Dget_chunk_info(da, sp, i, off, &fm, &aa, &s);
                H5Dget_chunk_info_by_coord(db, off, &fm, &ab, &s);
                ck_assert_msg(aa == ab, "%s chunk %llu stored at %llu and %llu", name, (unsigned long long)i,
                              (unsigned long long)aa, (unsigned long long)ab);
            }
            H5Sclose(sp);
            H5Dclose(da);
            H5Dclose(db);
        }
    H5Fclose(a);
    H5Fclose(b);
    data_free(&D);
}
END_TEST

START_TEST(python_reads_direct_chunks)
{
    kv_trace_meta_t m;
    meta_for(&m);
    data_t D;
    data_make(&m, &D, 17);
    char path[256], dir[256];
    kv_test_tmp("py.h5", path, sizeof path);
    write_with(path, KV_DTYPE_F16, &D, NULL);
    kv_test_tmp("py-dump", dir, sizeof dir);
    char cmd[1024];
    /* an empty plugin path: the filter must come from hdf5plugin, not from kvsim's own plugin */
    snprintf(cmd, sizeof cmd, "HDF5_PLUGIN_PATH=%s.noplugins python3 tests/interop_read.py %s %s >/dev/null", dir, path,
             dir);
    ck_assert_msg(system(cmd) == 0, "the Python reader failed: %s", cmd);
    kv_trace_t *t;
    ck_assert_int_eq(kv_trace_open(path, &t), KV_OK);
    for (int l = 0; l < m.n_layers; l++)
        for (int w = 0; w < KV_T_COUNT; w++) {
            size_t ne = kv_tensor_numel(&m, (kv_tensor_t)w), len;
            float *c = kv_malloc(sizeof(float) * ne, "test");
            ck_assert_int_eq(kv_trace_read(t, l, (kv_tensor_t)w, c), KV_OK);
            char f[512];
            snprintf(f, sizeof f, "%s/%d_%s.f32", dir, l, kv_tensor_name((kv_tensor_t)w));
            float *py = kv_test_read_file(f, &len);
            ck_assert_uint_eq(len, sizeof(float) * ne);
            ck_assert_msg(!memcmp(c, py, len), "layer %d %s: Python and C readers differ", l,
                          kv_tensor_name((kv_tensor_t)w));
            free(py);
            kv_free(c);
        }
    kv_trace_close(t);
    data_free(&D);
}
END_TEST

Suite *suite_trace_write(void)
{
    Suite *s = suite_create("trace_write");
    TCase *tc = tcase_create("direct_chunks");
    tcase_add_loop_test(tc, whole_tensors_match_the_pipeline, 0, 2); /* f32, f16 */
    tcase_add_test(tc, chunks_are_frames_of_shuffled_elements);
    tcase_add_test(tc, row_pieces_mix_both_paths);
    tcase_add_test(tc, rewriting_a_tensor_replaces_it);
    tcase_add_test(tc, same_chunks_whatever_the_thread_count);
    if (system("python3 -c 'import h5py, hdf5plugin' >/dev/null 2>&1") == 0 &&
        access("tests/interop_read.py", R_OK) == 0)
        tcase_add_test(tc, python_reads_direct_chunks);
    else
        kv_test_skip("trace_write/python_reads_direct_chunks",
                     "python3 with h5py and hdf5plugin not available (python3 -m pip install h5py hdf5plugin)");
    suite_add_tcase(s, tc);
    return s;
}
