/* kv_rng.c: xoshiro256** (Blackman and Vigna, 2018) with splitmix64 seeding. */
#include "sim/common/kv_rng.h"

#include <math.h>

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void kv_rng_seed(kv_rng_t *r, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&x);
}

void kv_rng_seed_task(kv_rng_t *r, uint64_t seed, uint64_t a, uint64_t b, uint64_t c)
{
    uint64_t x = seed;
    uint64_t h = splitmix64(&x);
    x = h ^ (a * 0x9e3779b97f4a7c15ULL);
    h = splitmix64(&x);
    x = h ^ (b * 0xc2b2ae3d27d4eb4fULL);
    h = splitmix64(&x);
    x = h ^ (c * 0x165667b19e3779f9ULL);
    kv_rng_seed(r, splitmix64(&x));
}

static inline uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

uint64_t kv_rng_u64(kv_rng_t *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double kv_rng_uniform(kv_rng_t *r)
{
    return (double)(kv_rng_u64(r) >> 11) * 0x1.0p-53;
}

uint64_t kv_rng_below(kv_rng_t *r, uint64_t n)
{
    if (n == 0)
        return 0;
    /* Lemire's nearly-divisionless method would be faster; rejection keeps it obviously unbiased. */
    uint64_t lim = UINT64_MAX - UINT64_MAX % n;
    uint64_t x;
    do
        x = kv_rng_u64(r);
    while (x >= lim);
    return x % n;
}

double kv_rng_normal(kv_rng_t *r)
{
    double u1 = kv_rng_uniform(r), u2 = kv_rng_uniform(r);
    if (u1 < 1e-300)
        u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}
