/*
 * test_capture_interop.c: an independent reader. A capture (tiny random-weight GQA model written by
 * the test, f16 storage, W_O included) is read by tests/interop_read.py through h5py and
 * hdf5plugin's zstd filter; every tensor it dumps must equal, bit for bit, what kvsim's C reader
 * returns (f16 widens to f32 exactly on both sides). Registered only where
 * `python3 -c "import h5py, hdf5plugin"` works; otherwise it says so on stderr.
 */
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "tests/capture_fixtures.h"
#include "tests/kv_test.h"
#include "traces/capture/kv_capture.h"
#include "traces/kv_trace.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

START_TEST(python_reads_what_c_reads)
{
    /* a capture of a tiny model (vocab of the fixture tokenizer, 2 query heads per KV head) */
    fx_model_t x;
    fx_model_init(&x, 32, 64, 3, 4, 2, 259 + FX_EXTRA, 96, 1, 77);
    size_t n;
    unsigned char *img = fx_model_v0(&x, &n);
    char mpath[256], tpath[256], out[256], dir[256];
    kv_test_tmp("interop-model.bin", mpath, sizeof mpath);
    ck_assert_int_eq(fx_write(mpath, img, n), 0);
    free(img);
    fx_model_free(&x);
    img = fx_tokenizer(&n);
    kv_test_tmp("interop-tok.bin", tpath, sizeof tpath);
    ck_assert_int_eq(fx_write(tpath, img, n), 0);
    free(img);
    kv_test_tmp("interop.h5", out, sizeof out);
    kv_capture_opts_t o;
    kv_capture_opts_init(&o);
    o.model_path = mpath;
    o.tokenizer_path = tpath;
    o.prompt = "abc ab xx\n<|endoftext|>\nbc aab abcabc \xc3\xa9x";
    o.out_path = out;
    o.n_decode = 20;
    o.with_wo = 1;
    o.pool = 16;
    o.backend = "cpu";
    kv_capture_result_t r;
    kv_log_set_level(KV_LOG_QUIET);
    ck_assert_msg(kv_capture_run(&o, &r) == KV_OK, "%s", kv_last_error());

    kv_test_tmp("interop-dump", dir, sizeof dir);
    char cmd[1024];
    /* an empty plugin path: the filter must come from hdf5plugin, not from kvsim's own plugin */
    snprintf(cmd, sizeof cmd, "HDF5_PLUGIN_PATH=%s.noplugins python3 tests/interop_read.py %s %s", dir, out, dir);
    ck_assert_msg(system(cmd) == 0, "the Python reader failed: %s", cmd);

    kv_trace_t *t;
    ck_assert_int_eq(kv_trace_open(out, &t), KV_OK);
    const kv_trace_meta_t *m = kv_trace_meta(t);
    char path[512];
    size_t len;
    snprintf(path, sizeof path, "%s/meta.txt", dir);
    char *meta = kv_test_read_file(path, &len), want[256];
    snprintf(want, sizeof want, "n_tokens=%d\n", m->n_tokens);
    ck_assert_ptr_nonnull(strstr(meta, want));
    snprintf(want, sizeof want, "n_prompt=%d\n", m->n_prompt);
    ck_assert_ptr_nonnull(strstr(meta, want));
    snprintf(want, sizeof want, "model_sha256=%s\n", m->model_sha256);
    ck_assert_ptr_nonnull(strstr(meta, want));
    ck_assert_ptr_nonnull(strstr(meta, "format=kvsim-trace\n"));
    ck_assert_ptr_nonnull(strstr(meta, "dtype=f16\n"));
    ck_assert_ptr_nonnull(strstr(meta, "q_dtype=float16\n")); /* numpy sees IEEE half precision */
    snprintf(want, sizeof want, "k_shape=%dx%dx%d\n", m->n_kv_heads, m->n_tokens, m->head_dim);
    ck_assert_ptr_nonnull(strstr(meta, want));
    free(meta);
    snprintf(path, sizeof path, "%s/tokens.i32", dir);
    int32_t *tok = kv_test_read_file(path, &len);
    ck_assert_int_eq(len, sizeof(int32_t) * (size_t)m->n_tokens);
    ck_assert(!memcmp(tok, m->tokens, len));
    free(tok);
    int compared = 0;
    for (int l = 0; l < m->n_layers; l++)
        for (int w = 0; w < KV_T_COUNT; w++) {
            if (!kv_trace_has(t, (kv_tensor_t)w))
                continue;
            size_t ne = kv_tensor_numel(m, (kv_tensor_t)w);
            float *c = malloc(sizeof(float) * ne);
            ck_assert_int_eq(kv_trace_read(t, l, (kv_tensor_t)w, c), KV_OK);
            snprintf(path, sizeof path, "%s/%d_%s.f32", dir, l, kv_tensor_name((kv_tensor_t)w));
            float *py = kv_test_read_file(path, &len);
            ck_assert_msg(len == sizeof(float) * ne, "%s: %zu bytes, expected %zu", path, len, sizeof(float) * ne);
            ck_assert_msg(!memcmp(c, py, len), "layer %d %s: Python and C readers differ", l,
                          kv_tensor_name((kv_tensor_t)w));
            free(c);
            free(py);
            compared++;
        }
    ck_assert_int_eq(compared, m->n_layers * KV_T_COUNT);
    kv_trace_close(t);
}
END_TEST

Suite *suite_capture_interop(void)
{
    Suite *s = suite_create("capture_interop");
    TCase *tc = tcase_create("h5py");
    if (system("python3 -c 'import h5py, hdf5plugin' >/dev/null 2>&1") == 0 &&
        access("tests/interop_read.py", R_OK) == 0)
        tcase_add_test(tc, python_reads_what_c_reads);
    else
        kv_test_skip("capture_interop/python_reads_what_c_reads",
                     "python3 with h5py and hdf5plugin not available (python3 -m pip install h5py hdf5plugin)");
    suite_add_tcase(s, tc);
    return s;
}
