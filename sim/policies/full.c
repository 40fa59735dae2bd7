/*
 * full.c: no eviction, the ceiling every policy is compared against. Keeps every context token
 * whatever the budget (recall 1, error 0); memory is the whole cache (at gran=query the engine's
 * per-query-head layout counts it G times; a real grouped-query cache is the gran=kv figure).
 */
#include "sim/kv_policy.h"

#include <string.h>

static int full_select(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, kv_keep_t *keep)
{
    (void)p, (void)b, (void)cstate;
    for (int s = 0; s < keep->n_store; s++)
        memset(keep->mask + (size_t)s * keep->T, 1, (size_t)c->n_ctx);
    return 0;
}

const kv_policy_desc_t kv_policy_full = {
    .name = "full",
    .doc = "no eviction: the full cache (the ceiling)",
    .paper = "-",
    .code = "-",
    .flags = KV_POL_ONESHOT | KV_POL_NESTED | KV_POL_NO_EVICT,
    .select = full_select,
};
