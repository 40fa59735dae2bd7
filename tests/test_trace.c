/* test_trace.c: HDF5 trace round trips (f32 bit-exact, f16 within rounding), the zstd filter
 * conventions, atomic writes, corrupt-file errors and the in-memory backend. */
#include "sim/common/kv_common.h"
#include "sim/common/kv_rng.h"
#include "tests/kv_test.h"
#include "traces/kv_f16.h"
#include "traces/kv_trace.h"
#include "traces/kv_zstd_filter.h"

#include <hdf5.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static void small_meta(kv_trace_meta_t *m, int T, int n_prompt)
{
    memset(m, 0, sizeof *m);
    m->n_layers = 2;
    m->n_heads = 4;
    m->n_kv_heads = 2;
    m->head_dim = 16;
    m->n_tokens = T;
    m->n_prompt = n_prompt;
    m->has_summaries = 1;
    m->pool = 8;
    m->has_wo = 1;
    m->has_stats = 1;
    m->stats_split = n_prompt - 10;
    m->model_dim = 64;
    snprintf(m->source, sizeof m->source, "test");
    snprintf(m->model, sizeof m->model, "model.bin");
    m->n_segments = 2;
    static int32_t seg[2] = {0, 10};
    m->segments = seg;
}

/* Fill every tensor with smooth data plus noise (compressible like real activations). */
static float *make_data(size_t n, uint64_t seed, float scale)
{
    float *x = kv_malloc(n * sizeof(float), "test");
    kv_rng_t r;
    kv_rng_seed(&r, seed);
    for (size_t i = 0; i < n; i++)
        x[i] = scale * (float)(sin(0.01 * (double)i) + 0.1 * kv_rng_normal(&r));
    return x;
}

static void write_trace(const char *path, kv_dtype_t dt, float **data /* [layer*KV_T_COUNT+w] */)
{
    kv_trace_meta_t m;
    small_meta(&m, 40, 30);
    kv_write_opts_t o = {dt, 3, 16};
    kv_trace_writer_t *w;
    ck_assert_msg(kv_trace_create(path, &m, &o, &w) == KV_OK, "%s", kv_last_error());
    for (int l = 0; l < m.n_layers; l++)
        for (int t = 0; t < KV_T_COUNT; t++) {
            size_t n = kv_tensor_numel(&m, (kv_tensor_t)t);
            float *x = make_data(n, (uint64_t)(l * 100 + t), 3.0f);
            if (kv_tensor_per_token((kv_tensor_t)t)) {
                /* write in two slabs as capture does: prompt rows, then decode rows */
                uint64_t d[3];
                kv_tensor_dims(&m, (kv_tensor_t)t, d);
                size_t row = (size_t)d[2];
                float *a = kv_malloc(n * sizeof(float), "t"), *b = kv_malloc(n * sizeof(float), "t");
                for (uint64_t h = 0; h < d[0]; h++) {
                    memcpy(a + h * 30 * row, x + (h * 40) * row, 30 * row * sizeof(float));
                    memcpy(b + h * 10 * row, x + (h * 40 + 30) * row, 10 * row * sizeof(float));
                }
                ck_assert_int_eq(kv_trace_write_rows(w, l, (kv_tensor_t)t, 0, 30, a), KV_OK);
                ck_assert_int_eq(kv_trace_write_rows(w, l, (kv_tensor_t)t, 30, 10, b), KV_OK);
                kv_free(a);
                kv_free(b);
            } else {
                ck_assert_int_eq(kv_trace_write(w, l, (kv_tensor_t)t, x), KV_OK);
            }
            data[l * KV_T_COUNT + t] = x;
        }
    kv_trace_meta_t *wm = kv_trace_writer_meta(w);
    int32_t tokens[40];
    for (int i = 0; i < 40; i++)
        tokens[i] = 100 + i;
    wm->tokens = kv_malloc(sizeof tokens, "t");
    memcpy(wm->tokens, tokens, sizeof tokens);
    ck_assert(access(path, F_OK) != 0); /* nothing under the final name before commit */
    ck_assert_msg(kv_trace_commit(w) == KV_OK, "%s", kv_last_error());
    ck_assert(access(path, F_OK) == 0);
}

START_TEST(round_trip_f32_bit_exact)
{
    char path[256];
    kv_test_tmp("rt32.h5", path, sizeof path);
    float *data[2 * KV_T_COUNT];
    write_trace(path, KV_DTYPE_F32, data);
    kv_trace_t *t;
    ck_assert_msg(kv_trace_open(path, &t) == KV_OK, "%s", kv_last_error());
    const kv_trace_meta_t *m = kv_trace_meta(t);
    ck_assert_int_eq(m->n_tokens, 40);
    ck_assert_int_eq(m->n_prompt, 30);
    ck_assert_int_eq(m->n_segments, 2);
    ck_assert_int_eq(m->segments[1], 10);
    ck_assert_int_eq(m->tokens[39], 139);
    ck_assert_int_eq(m->positions[5], 5);
    ck_assert_str_eq(m->source, "test");
    ck_assert_int_eq(m->dtype, KV_DTYPE_F32);
    for (int l = 0; l < 2; l++)
        for (int w = 0; w < KV_T_COUNT; w++) {
            size_t n = kv_tensor_numel(m, (kv_tensor_t)w);
            float *x = kv_malloc(n * sizeof(float), "t");
            ck_assert_int_eq(kv_trace_read(t, l, (kv_tensor_t)w, x), KV_OK);
            ck_assert_msg(memcmp(x, data[l * KV_T_COUNT + w], n * sizeof(float)) == 0, "layer %d %s differs", l,
                          kv_tensor_name((kv_tensor_t)w));
            kv_free(x);
        }
    /* token range read: K rows [25, 35) of KV head 1 */
    float rows[2 * 10 * 16];
    ck_assert_int_eq(kv_trace_read_rows(t, 1, KV_T_K, 25, 10, rows), KV_OK);
    ck_assert(memcmp(rows + 10 * 16, data[1 * KV_T_COUNT + KV_T_K] + (1 * 40 + 25) * 16, 10 * 16 * 4) == 0);
    uint64_t raw, stored;
    ck_assert_int_eq(kv_trace_storage(t, &raw, &stored), KV_OK);
    ck_assert_msg(stored < raw, "stored %llu >= raw %llu", (unsigned long long)stored, (unsigned long long)raw);
    kv_trace_close(t);
    for (int i = 0; i < 2 * KV_T_COUNT; i++)
        kv_free(data[i]);
}
END_TEST

START_TEST(round_trip_f16_within_rounding)
{
    char path[256];
    kv_test_tmp("rt16.h5", path, sizeof path);
    float *data[2 * KV_T_COUNT];
    write_trace(path, KV_DTYPE_F16, data);
    kv_trace_t *t;
    ck_assert_msg(kv_trace_open(path, &t) == KV_OK, "%s", kv_last_error());
    const kv_trace_meta_t *m = kv_trace_meta(t);
    ck_assert_int_eq(m->dtype, KV_DTYPE_F16);
    kv_layer_t L = {0};
    ck_assert_int_eq(kv_trace_read_layer(t, 1, &L), KV_OK);
    size_t n = kv_tensor_numel(m, KV_T_Q);
    const float *ref = data[1 * KV_T_COUNT + KV_T_Q];
    for (size_t i = 0; i < n; i++) {
        /* f16 has an 11-bit significand: round-to-nearest error <= 2^-11 relative (normal range) */
        ck_assert_msg(fabsf(L.q[i] - ref[i]) <= fabsf(ref[i]) * 0x1p-11f + 0x1p-24f, "q[%zu] %g vs %g", i, L.q[i],
                      ref[i]);
        ck_assert(L.q[i] == kv_f16_to_f32(kv_f32_to_f16(ref[i]))); /* same rounding as our converter */
    }
    /* summaries stay f32 */
    float *lse = kv_malloc(kv_tensor_numel(m, KV_T_LSE) * 4, "t");
    ck_assert_int_eq(kv_trace_read(t, 0, KV_T_LSE, lse), KV_OK);
    ck_assert(memcmp(lse, data[KV_T_LSE], kv_tensor_numel(m, KV_T_LSE) * 4) == 0);
    kv_free(lse);
    kv_layer_free(&L);
    kv_trace_close(t);
    for (int i = 0; i < 2 * KV_T_COUNT; i++)
        kv_free(data[i]);
}
END_TEST

START_TEST(f16_conversion_edges)
{
    ck_assert_uint_eq(kv_f32_to_f16(1.0f), 0x3c00);
    ck_assert_uint_eq(kv_f32_to_f16(-2.0f), 0xc000);
    ck_assert_uint_eq(kv_f32_to_f16(65504.0f), 0x7bff);
    ck_assert_uint_eq(kv_f32_to_f16(65520.0f), 0x7c00);        /* rounds past the largest finite: inf */
    ck_assert_uint_eq(kv_f32_to_f16(0x1p-24f), 0x0001);        /* smallest subnormal */
    ck_assert_uint_eq(kv_f32_to_f16(0x1p-25f), 0x0000);        /* tie to even: zero */
    ck_assert_uint_eq(kv_f32_to_f16(1.0f + 0x1p-11f), 0x3c00); /* tie to even */
    ck_assert_uint_eq(kv_f32_to_f16(1.0f + 0x1p-11f + 0x1p-20f), 0x3c01);
    ck_assert(kv_f16_to_f32(0x0001) == 0x1p-24f);
    ck_assert(kv_f16_to_f32(0x3555) == 0.333251953125f);
    ck_assert(isinf(kv_f16_to_f32(0xfc00)) && kv_f16_to_f32(0xfc00) < 0);
    ck_assert(isnan(kv_f16_to_f32(kv_f32_to_f16(NAN))));
    /* every half value converts to float and back unchanged (bulk path too) */
    static uint16_t h[65536], h2[65536];
    static float f[65536];
    for (int i = 0; i < 65536; i++)
        h[i] = (uint16_t)i;
    kv_f16_to_f32_n(h, f, 65536);
    size_t over = kv_f32_to_f16_n(f, h2, 65536);
    ck_assert_uint_eq(over, 0);
    for (int i = 0; i < 65536; i++) {
        ck_assert(f[i] == kv_f16_to_f32(h[i]) || (isnan(f[i]) && isnan(kv_f16_to_f32(h[i]))));
        if (!isnan(f[i]))
            ck_assert_uint_eq(h2[i], h[i]);
    }
    float big[3] = {70000.0f, -1e9f, 100.0f};
    ck_assert_uint_eq(kv_f32_to_f16_n(big, h2, 3), 2);
}
END_TEST

START_TEST(zstd_filter_conventions)
{
    ck_assert_int_eq(kv_trace_init(), KV_OK);
    ck_assert(kv_zstd_filter_available());
    char path[256];
    kv_test_tmp("filter.h5", path, sizeof path);
    float *data[2 * KV_T_COUNT];
    write_trace(path, KV_DTYPE_F16, data);
    for (int i = 0; i < 2 * KV_T_COUNT; i++)
        kv_free(data[i]);
    /* the filter pipeline of a dataset: shuffle, then zstd with exactly one cd_value (the level) */
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t d = H5Dopen2(f, "/layers/0/q", H5P_DEFAULT);
    hid_t dcpl = H5Dget_create_plist(d);
    ck_assert_int_eq(H5Pget_nfilters(dcpl), 2);
    unsigned flags, cd[8];
    size_t ncd = 8;
    char name[64];
    ck_assert_int_eq(H5Pget_filter2(dcpl, 0, &flags, &ncd, cd, sizeof name, name, NULL), H5Z_FILTER_SHUFFLE);
    ncd = 8;
    ck_assert_int_eq(H5Pget_filter2(dcpl, 1, &flags, &ncd, cd, sizeof name, name, NULL), KV_ZSTD_FILTER_ID);
    ck_assert_uint_eq(ncd, 1);
    ck_assert_uint_eq(cd[0], 3);
    /* each chunk is one zstd frame that records its content size */
    haddr_t addr;
    hsize_t size, off[3] = {0, 0, 0};
    unsigned fmask;
    ck_assert(H5Dget_chunk_info_by_coord(d, off, &fmask, &addr, &size) >= 0);
    unsigned char buf[64 * 1024];
    ck_assert(size <= sizeof buf);
    uint32_t filter_mask = 0;
    ck_assert(H5Dread_chunk(d, H5P_DEFAULT, off, &filter_mask, buf) >= 0);
    /* zstd frame magic 0xFD2FB528 little-endian, and a known content size */
    ck_assert(buf[0] == 0x28 && buf[1] == 0xb5 && buf[2] == 0x2f && buf[3] == 0xfd);
    int fcs_flag = buf[4] >> 6, single = (buf[4] >> 5) & 1;
    ck_assert_msg(fcs_flag != 0 || single, "frame header has no content size");
    H5Pclose(dcpl);
    H5Dclose(d);
    H5Fclose(f);
}
END_TEST

START_TEST(abort_leaves_nothing)
{
    char path[256];
    kv_test_tmp("aborted.h5", path, sizeof path);
    kv_trace_meta_t m;
    small_meta(&m, 40, 30);
    kv_trace_writer_t *w;
    ck_assert_int_eq(kv_trace_create(path, &m, NULL, &w), KV_OK);
    ck_assert_int_eq(kv_test_temps_of(path), 1);
    kv_trace_abort(w);
    ck_assert(access(path, F_OK) != 0);
    ck_assert_int_eq(kv_test_temps_of(path), 0);
}
END_TEST

/* The writer removes its temporary file on SIGTERM/SIGINT, but leaves a signal the process inherited
 * as ignored alone (a background job of a script ignores SIGINT and must not become killable by it).
 * Run in a child: SIGINT ignored there, a writer opened, SIGINT raised (survived), SIGTERM raised
 * (killed by it, no temporary file and no final file left). */
START_TEST(signals_remove_the_temporary_file)
{
    char path[256];
    kv_test_tmp("signalled.h5", path, sizeof path);
    fflush(NULL);
    pid_t pid = fork();
    ck_assert(pid >= 0);
    if (pid == 0) {
        signal(SIGTERM, SIG_DFL); /* not the test framework's handler (it would end the whole test) */
        signal(SIGINT, SIG_IGN);
        kv_trace_meta_t m;
        small_meta(&m, 40, 30);
        kv_trace_writer_t *w;
        if (kv_trace_create(path, &m, NULL, &w) != KV_OK)
            _exit(10);
        struct sigaction cur;
        if (sigaction(SIGINT, NULL, &cur) != 0 || cur.sa_handler != SIG_IGN)
            _exit(11); /* the ignored SIGINT was replaced */
        if (sigaction(SIGTERM, NULL, &cur) != 0 || cur.sa_handler == SIG_DFL || cur.sa_handler == SIG_IGN)
            _exit(12); /* SIGTERM has no clean-up handler */
        raise(SIGINT);
        raise(SIGTERM);
        _exit(13); /* not reached: SIGTERM ends the process */
    }
    int status = 0;
    ck_assert(waitpid(pid, &status, 0) == pid);
    ck_assert_msg(!WIFEXITED(status),
                  "child exited with status %d (10: create failed, 11: SIGINT handled, "
                  "12: SIGTERM not handled, 13: SIGTERM did not end it)",
                  WEXITSTATUS(status));
    ck_assert_msg(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM, "child ended by signal %d",
                  WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    ck_assert_msg(kv_test_temps_of(path) == 0, "temporary file of %s left behind", path);
    ck_assert(access(path, F_OK) != 0);
}
END_TEST

START_TEST(corrupt_files_are_named)
{
    char path[256];
    kv_trace_t *t;
    ck_assert_int_eq(kv_trace_open("build/test-tmp/does-not-exist.h5", &t), KV_EIO);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "does-not-exist.h5"));
    kv_test_tmp("garbage.h5", path, sizeof path);
    FILE *f = fopen(path, "wb");
    fputs("this is not hdf5", f);
    fclose(f);
    ck_assert_int_eq(kv_trace_open(path, &t), KV_EFORMAT);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "not an HDF5 file"));
    /* an HDF5 file that is not a trace */
    kv_test_tmp("plain.h5", path, sizeof path);
    hid_t h = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    H5Fclose(h);
    ck_assert_int_eq(kv_trace_open(path, &t), KV_EFORMAT);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), path));
    /* a truncated trace */
    float *data[2 * KV_T_COUNT];
    kv_test_tmp("trunc.h5", path, sizeof path);
    write_trace(path, KV_DTYPE_F16, data);
    for (int i = 0; i < 2 * KV_T_COUNT; i++)
        kv_free(data[i]);
    struct stat st;
    stat(path, &st);
    ck_assert_int_eq(truncate(path, st.st_size / 2), 0);
    int rc = kv_trace_open(path, &t);
    if (rc == KV_OK) { /* the superblock may survive: then reading the data must fail cleanly */
        float *x = kv_malloc(kv_tensor_numel(kv_trace_meta(t), KV_T_Q) * 4, "t");
        int bad = 0;
        for (int l = 0; l < 2; l++)
            bad |= kv_trace_read(t, l, KV_T_Q, x) != KV_OK || kv_trace_read(t, l, KV_T_V, x) != KV_OK;
        ck_assert(bad);
        kv_free(x);
        kv_trace_close(t);
    } else {
        ck_assert_ptr_nonnull(strstr(kv_last_error(), "trunc.h5"));
    }
}
END_TEST

START_TEST(memory_trace_reads_like_a_file)
{
    kv_trace_meta_t m;
    small_meta(&m, 40, 30);
    kv_trace_t *t;
    ck_assert_int_eq(kv_trace_mem_create(&m, &t), KV_OK);
    float *k = kv_trace_mem_tensor(t, 1, KV_T_K);
    for (size_t i = 0; i < kv_tensor_numel(&m, KV_T_K); i++)
        k[i] = (float)i;
    float rows[2 * 5 * 16];
    ck_assert_int_eq(kv_trace_read_rows(t, 1, KV_T_K, 3, 5, rows), KV_OK);
    ck_assert(rows[0] == 3 * 16);
    ck_assert(rows[5 * 16] == (40 + 3) * 16);
    ck_assert_int_ne(kv_trace_read_rows(t, 1, KV_T_K, 38, 5, rows), KV_OK);
    ck_assert_int_ne(kv_trace_read(t, 2, KV_T_K, rows), KV_OK);
    kv_trace_close(t);
}
END_TEST

Suite *suite_trace(void)
{
    Suite *s = suite_create("trace");
    TCase *tc = tcase_create("hdf5");
    tcase_add_test(tc, round_trip_f32_bit_exact);
    tcase_add_test(tc, round_trip_f16_within_rounding);
    tcase_add_test(tc, f16_conversion_edges);
    tcase_add_test(tc, zstd_filter_conventions);
    tcase_add_test(tc, abort_leaves_nothing);
    tcase_add_test(tc, signals_remove_the_temporary_file);
    tcase_add_test(tc, corrupt_files_are_named);
    tcase_add_test(tc, memory_trace_reads_like_a_file);
    suite_add_tcase(s, tc);
    return s;
}
