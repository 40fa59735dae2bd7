/*
 * policy_registry.c: every policy kvsim knows, one line each. Adding a policy = one file in
 * sim/policies/ defining `const kv_policy_desc_t kv_policy_<name>` plus one X(<name>) line here;
 * the contract suite (tests/test_policy_contract.c) then checks it automatically.
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"

/* Baselines first, then roughly in the order the methods appeared. */
/* clang-format off */
#define KV_POLICIES(X)      \
    X(full)                 \
    X(random)               \
    X(oracle)               \
    X(streaming_llm)        \
    X(h2o)                  \
    X(tova)                 \
    X(knorm)                \
    X(threshold)            \
    X(snapkv)               \
    X(pyramidkv)            \
    X(adakv)                \
    X(chunkkv)              \
    X(quest)                \
    X(shotkv)               \
    X(kvcompress)           \
    X(simlayerkv)           \
    X(expected_attention)   \
    X(keydiff)              \
    X(lagkv)                \
    X(criticalkv)           \
    X(cake)                 \
    X(decoding)
/* clang-format on */

#define KV_POLICY_DECLARE(name) extern const kv_policy_desc_t kv_policy_##name;
#define KV_POLICY_ENTRY(name) &kv_policy_##name,
KV_POLICIES(KV_POLICY_DECLARE)
static const kv_policy_desc_t *const registry[] = {KV_POLICIES(KV_POLICY_ENTRY)};

int kv_policy_count(void)
{
    return (int)KV_ARRAY_LEN(registry);
}

const kv_policy_desc_t *kv_policy_desc_at(int i)
{
    return i >= 0 && i < kv_policy_count() ? registry[i] : NULL;
}
