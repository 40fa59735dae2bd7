/*
 * policy_registry.c: every policy kvsim knows, one line each. Adding a policy = one file in
 * sim/policies/ defining `const kv_policy_desc_t kv_policy_<name>` plus one line here; the contract
 * suite (tests/test_policy_contract.c) then checks it automatically.
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"

extern const kv_policy_desc_t kv_policy_full;
extern const kv_policy_desc_t kv_policy_random;
extern const kv_policy_desc_t kv_policy_oracle;
extern const kv_policy_desc_t kv_policy_streaming_llm;
extern const kv_policy_desc_t kv_policy_h2o;
extern const kv_policy_desc_t kv_policy_tova;
extern const kv_policy_desc_t kv_policy_knorm;
extern const kv_policy_desc_t kv_policy_threshold;
extern const kv_policy_desc_t kv_policy_snapkv;
extern const kv_policy_desc_t kv_policy_pyramidkv;
extern const kv_policy_desc_t kv_policy_adakv;
extern const kv_policy_desc_t kv_policy_chunkkv;
extern const kv_policy_desc_t kv_policy_quest;
extern const kv_policy_desc_t kv_policy_shotkv;
extern const kv_policy_desc_t kv_policy_kvcompress;
extern const kv_policy_desc_t kv_policy_expected_attention;
extern const kv_policy_desc_t kv_policy_keydiff;
extern const kv_policy_desc_t kv_policy_lagkv;
extern const kv_policy_desc_t kv_policy_criticalkv;
extern const kv_policy_desc_t kv_policy_cake;
extern const kv_policy_desc_t kv_policy_decoding;
extern const kv_policy_desc_t kv_policy_simlayerkv;

/* Baselines first, then roughly in the order the methods appeared. */
static const kv_policy_desc_t *const registry[] = {
    &kv_policy_full,  &kv_policy_random,  &kv_policy_oracle,    &kv_policy_streaming_llm, &kv_policy_h2o,
    &kv_policy_tova,  &kv_policy_knorm,   &kv_policy_threshold, &kv_policy_snapkv,        &kv_policy_pyramidkv,
    &kv_policy_adakv, &kv_policy_chunkkv, &kv_policy_quest,     &kv_policy_shotkv,        &kv_policy_kvcompress,
    &kv_policy_simlayerkv, &kv_policy_expected_attention, &kv_policy_keydiff, &kv_policy_lagkv, &kv_policy_criticalkv, &kv_policy_cake,
    &kv_policy_decoding,
};

int kv_policy_count(void)
{
    return (int)KV_ARRAY_LEN(registry);
}

const kv_policy_desc_t *kv_policy_desc_at(int i)
{
    return i >= 0 && i < kv_policy_count() ? registry[i] : NULL;
}
