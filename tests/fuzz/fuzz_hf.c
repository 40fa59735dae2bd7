/*
 * fuzz_hf.c: libFuzzer harness for the Hugging Face checkpoint loader (traces/capture/hf_model.c).
 *
 * Each input fuzzes one of the two files of a checkpoint folder while the other stays valid (a
 * tiny random-weight model from tests/test_capture_fixtures.c): byte 0, bit 0 clear: the rest is
 * model.safetensors beside a valid config.json; set: the rest is config.json beside a valid
 * model.safetensors. A failure must name a file of the folder; a checkpoint the loader accepts must
 * run a forward pass of up to 4 tokens on the CPU backend (which reads every weight).
 * Not part of `make test`; `make fuzz` runs it with the others (seeds from make_seeds.c).
 */
#include "kernels/kv_backend.h"
#include "sim/common/kv_common.h"
#include "tests/capture_fixtures.h"
#include "tests/fuzz/fuzz_forward.h"
#include "traces/capture/kv_model.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static kv_backend_t *g_be;
static char g_dir[256], g_st_path[300], g_cfg_path[300];
static unsigned char *g_st; /* a valid model.safetensors */
static size_t g_st_len;
static char *g_cfg; /* its valid config.json */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    snprintf(g_dir, sizeof g_dir, "/tmp/kvsim-fuzz-hf-%d", (int)getpid());
    mkdir(g_dir, 0755);
    snprintf(g_st_path, sizeof g_st_path, "%s/model.safetensors", g_dir);
    snprintf(g_cfg_path, sizeof g_cfg_path, "%s/config.json", g_dir);
    fx_model_t x;
    fx_model_init(&x, 8, 16, 2, 2, 1, 32, 8, 0, 7);
    g_st = fx_model_safetensors(&x, &g_st_len);
    g_cfg = fx_model_hf_config(&x);
    fx_model_free(&x);
    if (!g_st || !g_cfg || kv_backend_cpu_open(1, &g_be) != KV_OK)
        abort();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    const int fuzz_config = data[0] & 1;
    data++, size--;
    if (fx_write(fuzz_config ? g_cfg_path : g_st_path, data, size) ||
        (fuzz_config ? fx_write(g_st_path, g_st, g_st_len) : fx_write(g_cfg_path, g_cfg, strlen(g_cfg))))
        abort();
    kv_model_t *m = NULL;
    if (kv_model_load(g_dir, &m) != KV_OK) {
        if (m || !strstr(kv_last_error(), g_dir)) {
            fprintf(stderr, "fuzz_hf: failure without a file of the folder named: %s\n", kv_last_error());
            abort();
        }
        return 0;
    }
    fuzz_stored_inside(m);
    fuzz_forward(m, g_be, data, size);
    kv_model_free(m);
    return 0;
}
