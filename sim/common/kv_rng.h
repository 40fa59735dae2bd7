/*
 * kv_rng.h: small deterministic random number generator (xoshiro256** seeded through splitmix64).
 *
 * Every random choice in kvsim (random policy, synthetic traces, test fixtures) draws from an
 * explicitly seeded kv_rng_t, so results never depend on thread scheduling: parallel work derives
 * one generator per task with kv_rng_seed(seed ^ task_id ...).
 */
#ifndef KV_RNG_H
#define KV_RNG_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    uint64_t s[4];
} kv_rng_t;

void kv_rng_seed(kv_rng_t *r, uint64_t seed);
/* Seed from a base seed and up to three task coordinates (layer, head, ...), order-sensitive. */
void kv_rng_seed_task(kv_rng_t *r, uint64_t seed, uint64_t a, uint64_t b, uint64_t c);
uint64_t kv_rng_u64(kv_rng_t *r);
/* Uniform in [0, 1). */
double kv_rng_uniform(kv_rng_t *r);
/* Uniform integer in [0, n). */
uint64_t kv_rng_below(kv_rng_t *r, uint64_t n);
/* Standard normal (Box-Muller). */
double kv_rng_normal(kv_rng_t *r);

#ifdef __cplusplus
}
#endif
#endif
