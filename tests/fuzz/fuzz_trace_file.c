/*
 * fuzz_trace_file.c: libFuzzer harness feeding raw bytes to the trace opener as a .h5 file
 * (seeded with small valid traces). Most mutations stop in HDF5's own superblock and object
 * header parsing (libhdf5, not instrumented here): a crash there is a library bug to report, not
 * one kvsim can fix; what reaches kvsim's reader is checked as in fuzz_trace.c.
 * Not part of `make test`; build and run as described in tests/fuzz/fuzz_model.c (make fuzz).
 */
#include "sim/common/kv_common.h"
#include "traces/kv_trace.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char g_path[256];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    snprintf(g_path, sizeof g_path, "/tmp/kvsim-fuzz-trace-file-%d.h5", (int)getpid());
    kv_trace_init();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    FILE *f = fopen(g_path, "wb");
    if (!f)
        abort();
    fwrite(data, 1, size, f);
    fclose(f);
    kv_trace_t *t = NULL;
    if (kv_trace_open(g_path, &t) != KV_OK) {
        if (t || !strstr(kv_last_error(), g_path))
            abort();
        return 0;
    }
    const kv_trace_meta_t *m = kv_trace_meta(t);
    for (int l = 0; l < m->n_layers && l < 4; l++)
        for (int w = 0; w < KV_T_COUNT; w++) {
            size_t n = kv_tensor_numel(m, (kv_tensor_t)w);
            if (!kv_trace_has(t, (kv_tensor_t)w) || n > (1u << 20))
                continue;
            float *buf = kv_malloc(n * sizeof(float) + 4, "fuzz tensor");
            if (kv_trace_read(t, l, (kv_tensor_t)w, buf) != KV_OK && !strstr(kv_last_error(), g_path))
                abort();
            kv_free(buf);
        }
    kv_trace_close(t);
    return 0;
}
