/* kv_test.c: see kv_test.h. */
#include "tests/kv_test.h"

#include "sim/common/kv_common.h"
#include "sim/common/kv_output.h"
#include "sim/common/kv_rng.h"
#include "traces/kv_trace.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

const char *kv_test_shared(const char *rel, char *buf, size_t len)
{
    const char *env = getenv("KVSIM_SHARED");
    const char *roots[] = {env, "../shared", "."};
    for (size_t i = 0; i < sizeof roots / sizeof roots[0]; i++) {
        if (!roots[i])
            continue;
        snprintf(buf, len, "%s/%s", roots[i], rel);
        if (access(buf, R_OK) == 0)
            return buf;
    }
    return NULL;
}

const char *kv_test_tmp(const char *name, char *buf, size_t len)
{
    static int n = 0;
    mkdir("build", 0755);
    mkdir("build/test-tmp", 0755);
    snprintf(buf, len, "build/test-tmp/%d-%d-%s", (int)getpid(), n++, name);
    return buf;
}

int kv_test_temps_of(const char *path)
{
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    const char *base = slash ? path + (slash - dir) + 1 : path;
    if (slash)
        *slash = 0;
    else
        snprintf(dir, sizeof dir, ".");
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    int n = 0;
    struct dirent *e;
    const size_t lb = strlen(base), ls = strlen(KV_OUT_TEMP_SUFFIX);
    while ((e = readdir(d))) {
        const size_t len = strlen(e->d_name);
        n += !strncmp(e->d_name, base, KV_MIN(lb, (size_t)200)) && len > ls &&
             !strcmp(e->d_name + len - ls, KV_OUT_TEMP_SUFFIX);
    }
    closedir(d);
    return n;
}

void kv_test_skip(const char *test, const char *why)
{
    fprintf(stderr, "kvsim tests: not registered: %s (%s)\n", test, why);
}

struct kv_trace *kv_test_trace(int L, int H, int Hkv, int d, int T, int n_prompt, int n_segments, int with_wo,
                               unsigned long long seed)
{
    kv_trace_meta_t m;
    memset(&m, 0, sizeof m);
    m.n_layers = L;
    m.n_heads = H;
    m.n_kv_heads = Hkv;
    m.head_dim = d;
    m.n_tokens = T;
    m.n_prompt = n_prompt;
    m.has_wo = with_wo;
    m.model_dim = H * d;
    m.dtype = KV_DTYPE_F32;
    int32_t seg[64];
    if (n_segments > 64)
        n_segments = 64;
    for (int s = 0; s < n_segments; s++)
        seg[s] = s * (n_prompt / n_segments);
    m.n_segments = n_segments;
    m.segments = n_segments ? seg : NULL;
    kv_trace_t *t = NULL;
    if (kv_trace_mem_create(&m, &t) != KV_OK)
        return NULL;
    kv_rng_t r;
    for (int l = 0; l < L; l++) {
        kv_rng_seed_task(&r, seed, (uint64_t)l, 1, 2);
        float *q = kv_trace_mem_tensor(t, l, KV_T_Q), *k = kv_trace_mem_tensor(t, l, KV_T_K);
        float *v = kv_trace_mem_tensor(t, l, KV_T_V);
        /* a direction every query shares, and a few keys aligned with it (heavy hitters) */
        float dir[512];
        for (int x = 0; x < d; x++)
            dir[x] = (float)kv_rng_normal(&r);
        for (int h = 0; h < H; h++)
            for (int i = 0; i < T; i++)
                for (int x = 0; x < d; x++)
                    q[((size_t)h * T + i) * d + x] = (float)(kv_rng_normal(&r) + 0.5 * dir[x]);
        for (int g = 0; g < Hkv; g++)
            for (int j = 0; j < T; j++) {
                double scale = 0.5 + kv_rng_uniform(&r);
                int heavy = j == 0 || kv_rng_uniform(&r) < 0.08;
                for (int x = 0; x < d; x++) {
                    k[((size_t)g * T + j) * d + x] = (float)(scale * kv_rng_normal(&r) + (heavy ? 0.6 * dir[x] : 0));
                    v[((size_t)g * T + j) * d + x] = (float)kv_rng_normal(&r);
                }
            }
        if (with_wo) {
            float *wo = kv_trace_mem_tensor(t, l, KV_T_WO);
            for (size_t i = 0; i < kv_tensor_numel(&m, KV_T_WO); i++)
                wo[i] = (float)(kv_rng_normal(&r) / sqrt((double)H * d));
        }
    }
    return t;
}

int kv_test_write_trace(struct kv_trace *t, const char *path)
{
    const kv_trace_meta_t *m = kv_trace_meta(t);
    kv_write_opts_t o = {KV_DTYPE_F32, 3, 0};
    kv_trace_writer_t *w;
    int rc = kv_trace_create(path, m, &o, &w);
    if (rc)
        return rc;
    for (int l = 0; l < m->n_layers && rc == KV_OK; l++)
        for (int k = 0; k < KV_T_COUNT && rc == KV_OK; k++) {
            if (!kv_trace_has(t, (kv_tensor_t)k))
                continue;
            size_t n = kv_tensor_numel(m, (kv_tensor_t)k);
            float *x = kv_malloc(n * sizeof(float), "test tensor");
            if (!x)
                rc = KV_ENOMEM;
            if (rc == KV_OK)
                rc = kv_trace_read(t, l, (kv_tensor_t)k, x);
            if (rc == KV_OK)
                rc = kv_trace_write(w, l, (kv_tensor_t)k, x);
            kv_free(x);
        }
    if (rc) {
        kv_trace_abort(w);
        return rc;
    }
    return kv_trace_commit(w);
}
