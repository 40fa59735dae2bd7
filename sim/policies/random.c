/*
 * random.c: keeps a uniformly random subset of the context (the floor a scoring policy must beat).
 * Scores are i.i.d. uniform per (query head, token), drawn from a generator seeded by (seed, layer,
 * head) so runs are reproducible and independent of thread scheduling; with a KV-head cache the
 * group's scores are averaged, which is still a uniformly random ranking. Nested: a larger budget
 * keeps a superset. No sinks or window are protected.
 */
#include "sim/common/kv_common.h"
#include "sim/common/kv_rng.h"
#include "sim/kv_policy.h"

static const kv_param_def_t params[] = {
    {"seed", KV_PARAM_INT, "0", 0, 4294967295.0, NULL, "added to the replay seed"},
};

static int random_prepare(kv_policy_t *p, kv_layer_ctx_t *c)
{
    uint64_t seed = c->seed + (uint64_t)kv_params_int(&p->params, "seed");
    for (int h = 0; h < c->H; h++) {
        kv_rng_t r;
        kv_rng_seed_task(&r, seed, (uint64_t)c->layer, (uint64_t)h, 0x72616e64);
        float *s = p->qscores + (size_t)h * c->n_ctx;
        for (int j = 0; j < c->n_ctx; j++)
            s[j] = (float)kv_rng_uniform(&r);
    }
    p->scored = 1;
    return 0;
}

const kv_policy_desc_t kv_policy_random = {
    .name = "random",
    .doc = "uniformly random context tokens (seeded): the floor",
    .paper = "-",
    .code = "-",
    .params = params,
    .n_params = (int)KV_ARRAY_LEN(params),
    .flags = KV_POL_ONESHOT | KV_POL_NESTED | KV_POL_RANDOM | KV_POL_SCORER,
    .prepare = random_prepare,
};
