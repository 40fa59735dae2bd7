/*
 * synth.c: synthetic attention traces with planted structure (see kv_synth.h for the API).
 *
 * THE MODEL. For layer l, query head h (KV group g = h / (heads / kv_heads)), query i and key
 * j <= i, the scaled score is designed to be
 *
 *   s_ij = q_i . k_j / sqrt(d)
 *        = c_i [j is a sink] + B [j is a heavy hitter] + E [code(j) = code(i)] + R f(i - j) + n_ij
 *
 *   f(D) = (1/M) sum_m cos(D w_m),   w_m = (1/W)^(m/(M-1)) for m = 0..M-1 (1 rad/token .. 1/W)
 *
 * where, with beta_l = sharp_first + (sharp_last - sharp_first) l / (L-1) (the sharpness),
 * the boosts and jitter of the parameter schema (names as in `kvsim synth --help`) and
 * per-head multipliers u ~ U[1 - head_jitter, 1 + head_jitter]:
 *   R = beta_l recent_boost u_r   recency: f is 1 at D = 0 and decays roughly like
 *                                 log(W / D) / log(W) (log-spaced frequencies: a pair stays
 *                                 coherent while D w_m < 1), so weights fall off like a power of D;
 *   B = beta_l heavy_boost u_h    heavy hitters: a seeded random heavy_frac of the prompt tokens
 *                                 after the sinks, the same tokens for every layer and head;
 *   E = beta_l seg_boost u_s      segments: the prompt is cut into `segments` pieces (lengths
 *                                 jittered by seg_jitter); code(t) = segment(t) mod seg_dims, so
 *                                 with segments <= seg_dims the bonus is exactly "same segment";
 *                                 decode tokens belong to the last segment;
 *   n_ij                          content noise, Gaussian-like with standard deviation about
 *                                 `noise` (given q_i exactly sqrt(sum_x (q_x sigma_x)^2 / d));
 *   c_i                           the sink coefficient, calibrated per query (below).
 * Raising beta with depth sharpens every bonus: low layers attend broadly (high entropy),
 * high layers concentrate on sinks, heavy hitters, the query's segment and the last tokens: the
 * pyramid funnelling shape.
 *
 * CONSTRUCTION. Each (layer, KV head) gives its head_dim dimensions, as pairs placed by a seeded
 * random permutation of the d/2 pair slots, these roles:
 *   sink dim      k = KAPPA_SINK for sink tokens, else 0;  q = c_i sqrt(d) / KAPPA_SINK
 *   heavy dim     k = KAPPA_HEAVY for heavy hitters, else 0;  q = B sqrt(d) / KAPPA_HEAVY
 *   segment dims  one-hot: k = 1 on dim code(j) (not for sinks);  q = E sqrt(d) on dim code(i)
 *   rotary pairs  k = (cos(j w_m + phi_m), sin(j w_m + phi_m)), q = rho (cos(i w_m + phi_m), ...)
 *                 with rho = R sqrt(d) / M, so q.k / sqrt(d) = (R/M) cos((i - j) w_m): RoPE applied
 *                 to constant vectors, with a seeded phase per (layer, KV head, pair);
 *   noise dims    k = a sigma_x z, q = (tau / sigma_x) z', z, z' ~ N(0, 1) (approximately: see
 *                 fast_normal), sigma_x = exp(chan_spread N(0,1)) per channel (outlier-like key
 *                 channels), tau = noise sqrt(d / D_noise); a = key_scale for sink and
 *                 heavy keys (they have lower key norms, as observed in real models), else 1.
 * V is i.i.d. N(0, 1). Query heads of a group share that group's K, V, permutation and phases;
 * their queries differ (own noise, own multipliers u).
 *
 * SINK CALIBRATION. The share of query i on the sinks is e^{c_i} A_i / (e^{c_i} A_i + Z_i) with
 * A_i = sum_{j < sinks} exp(s_ij without the sink term) and Z_i the normaliser over the other keys,
 * so c_i = log(m / (1 - m)) + log Z_i - log A_i. A_i is computed exactly (sinks x d work). Z_i is
 * split in two parts:
 *   - exact scores for the keys with the largest weights: the last EXACT_RECENT (16) keys and the
 *     EXACT_HEAVY (16) nearest heavy hitters before them (32 dot products per query);
 *   - an expectation for all other keys, computed without touching them: the noise enters through
 *     its moment generating function given q_i (E exp(t z) = exp(t^2/2 - t^4/80 + O(t^6)) for our
 *     z, which needs only sum z^2 and sum z^4 of the query's noise), the recency weights
 *     w(D) = exp(R f(D)) through prefix sums, the segment bonus through prefix sums over the
 *     same-code segment ranges, the next HEAVY_NEAR (64) heavy hitters one by one and the
 *     remaining, farther ones as their count times the mean weight of the range they lie in.
 * Cost O(d + 32 d + 64 + segments / seg_dims) per query. What is left is the sample fluctuation of
 * the noise in the second part and f16 rounding. Measured (test_synth.c; and 8 layers x 4 heads,
 * head_dim 128, 8256 tokens): mean sink mass within 0.002 of the target, per-query rms error
 * 0.007-0.02. Queries that see only sinks (i < sinks) put all their mass on them.
 *
 * COST AND DETERMINISM. A layer is O(T d (heads + kv_heads)) plus O(T) tables per head; nothing is
 * T x T. Every (layer, head) draws from its own generator (kv_rng_seed_task(seed, layer, head,
 * stream)), and the tables shared by all layers from seed-derived generators, so the output does
 * not depend on the thread count. Summaries go through the backend ops `attention` and
 * `attn_stats` (deterministic by contract).
 */
#include "traces/kv_synth.h"

#include "kernels/kv_backend.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/common/kv_params.h"
#include "sim/common/kv_rng.h"

#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KAPPA_SINK 4.0
#define KAPPA_HEAVY 2.0
#define HEAVY_NEAR 64   /* heavy hitters whose recency weights enter the sink normaliser one by one */
#define EXACT_RECENT 16 /* last keys scored exactly in the sink normaliser */
#define EXACT_HEAVY 16  /* nearest heavy hitters (before those) scored exactly */

/* Random streams (third coordinate of kv_rng_seed_task). */
enum { STREAM_K = 1, STREAM_V, STREAM_Q, STREAM_KVHEAD, STREAM_QHEAD, STREAM_HEAVY, STREAM_SEGMENTS };
#define GLOBAL_TASK 0xFFFFFFFFull

/* ------------------------------------------------------------------ parameters and schema */

typedef enum { F_INT, F_LONG, F_DOUBLE } ftype_t;

static const kv_param_def_t schema[] = {
    {"layers", KV_PARAM_INT, "8", 1, 4096, NULL, "layers"},
    {"heads", KV_PARAM_INT, "8", 1, 1024, NULL, "query heads"},
    {"kv_heads", KV_PARAM_INT, "2", 1, 1024, NULL, "KV heads (heads must be a multiple)"},
    {"head_dim", KV_PARAM_INT, "64", 4, 4096, NULL, "head dimension (even)"},
    {"tokens", KV_PARAM_INT, "2048", 2, 1e7, NULL, "total tokens T = prompt + decode"},
    {"decode", KV_PARAM_INT, "64", 0, 1e7, NULL, "decode tokens (the last of the T)"},
    {"seed", KV_PARAM_INT, "1", 0, 9e15, NULL, "random seed"},
    {"sinks", KV_PARAM_INT, "1", 0, 64, NULL, "sink tokens at positions 0..sinks-1"},
    {"sink_mass", KV_PARAM_FLOAT, "0.3", 0, 0.99, NULL, "share of each query's attention on the sinks"},
    {"heavy_frac", KV_PARAM_FLOAT, "0.01", 0, 0.5, NULL, "fraction of prompt tokens that are heavy hitters"},
    {"heavy_boost", KV_PARAM_FLOAT, "2", 0, 10, NULL, "heavy-hitter logit bonus at sharpness 1"},
    {"recent_boost", KV_PARAM_FLOAT, "2", 0, 10, NULL, "recency kernel amplitude (logits) at sharpness 1"},
    {"recent_window", KV_PARAM_INT, "1024", 1, 1e8, NULL, "longest rotary wavelength / 2pi (tokens)"},
    {"rope_pairs", KV_PARAM_INT, "8", 0, 1024, NULL, "rotary dimension pairs carrying the recency kernel"},
    {"segments", KV_PARAM_INT, "0", 0, 1 << 16, NULL, "prompt segments (0 or 1: none)"},
    {"seg_jitter", KV_PARAM_FLOAT, "0", 0, 0.9, NULL, "segment lengths vary by +-this fraction"},
    {"seg_boost", KV_PARAM_FLOAT, "1", 0, 10, NULL, "same-segment logit bonus at sharpness 1"},
    {"seg_dims", KV_PARAM_INT, "8", 1, 1024, NULL, "segment code dims (codes repeat modulo this)"},
    {"sharp_first", KV_PARAM_FLOAT, "0.25", 0, 10, NULL, "sharpness of layer 0"},
    {"sharp_last", KV_PARAM_FLOAT, "3", 0, 10, NULL, "sharpness of the last layer (linear between)"},
    {"noise", KV_PARAM_FLOAT, "1", 0, 4, NULL, "std of the content (noise) logit"},
    {"head_jitter", KV_PARAM_FLOAT, "0.5", 0, 0.95, NULL, "per-head bonus multipliers in [1-j, 1+j]"},
    {"key_scale", KV_PARAM_FLOAT, "0.5", 0, 1, NULL, "noise scale of sink and heavy keys (lower norm)"},
    {"chan_spread", KV_PARAM_FLOAT, "0.5", 0, 3, NULL, "log-std of per-channel noise scales"},
};

static const struct {
    ftype_t type;
    size_t off;
} fields[] = {
    {F_INT, offsetof(kv_synth_params_t, n_layers)},
    {F_INT, offsetof(kv_synth_params_t, n_heads)},
    {F_INT, offsetof(kv_synth_params_t, n_kv_heads)},
    {F_INT, offsetof(kv_synth_params_t, head_dim)},
    {F_INT, offsetof(kv_synth_params_t, n_tokens)},
    {F_INT, offsetof(kv_synth_params_t, n_decode)},
    {F_LONG, offsetof(kv_synth_params_t, seed)},
    {F_INT, offsetof(kv_synth_params_t, n_sinks)},
    {F_DOUBLE, offsetof(kv_synth_params_t, sink_mass)},
    {F_DOUBLE, offsetof(kv_synth_params_t, heavy_frac)},
    {F_DOUBLE, offsetof(kv_synth_params_t, heavy_boost)},
    {F_DOUBLE, offsetof(kv_synth_params_t, recent_boost)},
    {F_INT, offsetof(kv_synth_params_t, recent_window)},
    {F_INT, offsetof(kv_synth_params_t, rope_pairs)},
    {F_INT, offsetof(kv_synth_params_t, n_segments)},
    {F_DOUBLE, offsetof(kv_synth_params_t, segment_jitter)},
    {F_DOUBLE, offsetof(kv_synth_params_t, segment_boost)},
    {F_INT, offsetof(kv_synth_params_t, segment_dims)},
    {F_DOUBLE, offsetof(kv_synth_params_t, sharp_first)},
    {F_DOUBLE, offsetof(kv_synth_params_t, sharp_last)},
    {F_DOUBLE, offsetof(kv_synth_params_t, noise)},
    {F_DOUBLE, offsetof(kv_synth_params_t, head_jitter)},
    {F_DOUBLE, offsetof(kv_synth_params_t, planted_key_scale)},
    {F_DOUBLE, offsetof(kv_synth_params_t, channel_spread)},
};

#define N_FIELDS ((int)KV_ARRAY_LEN(schema))
_Static_assert(KV_ARRAY_LEN(schema) == KV_ARRAY_LEN(fields), "schema and fields must match");

static void to_text(const kv_synth_params_t *p, kv_params_t *out)
{
    memset(out, 0, sizeof *out);
    for (int i = 0; i < N_FIELDS; i++) {
        const char *base = (const char *)p + fields[i].off;
        int iv;
        long lv;
        double dv;
        snprintf(out->key[i], KV_PARAM_KEY_LEN, "%s", schema[i].key);
        switch (fields[i].type) {
        case F_INT:
            memcpy(&iv, base, sizeof iv);
            snprintf(out->val[i], KV_PARAM_VAL_LEN, "%d", iv);
            break;
        case F_LONG:
            memcpy(&lv, base, sizeof lv);
            snprintf(out->val[i], KV_PARAM_VAL_LEN, "%ld", lv);
            break;
        case F_DOUBLE:
            memcpy(&dv, base, sizeof dv);
            snprintf(out->val[i], KV_PARAM_VAL_LEN, "%.17g", dv);
            break;
        }
    }
    out->n = N_FIELDS;
}

static void from_text(const kv_params_t *r, kv_synth_params_t *p)
{
    for (int i = 0; i < N_FIELDS; i++) {
        char *base = (char *)p + fields[i].off;
        int iv;
        long lv;
        double dv;
        switch (fields[i].type) {
        case F_INT:
            iv = (int)kv_params_int(r, schema[i].key);
            memcpy(base, &iv, sizeof iv);
            break;
        case F_LONG:
            lv = kv_params_int(r, schema[i].key);
            memcpy(base, &lv, sizeof lv);
            break;
        case F_DOUBLE:
            dv = kv_params_float(r, schema[i].key);
            memcpy(base, &dv, sizeof dv);
            break;
        }
    }
}

void kv_synth_defaults(kv_synth_params_t *p)
{
    memset(p, 0, sizeof *p);
    kv_params_t r;
    /* The schema defaults are valid by construction; a failure here is a programmer error. */
    if (kv_params_resolve(schema, N_FIELDS, NULL, &r, "synth") != KV_OK) {
        fprintf(stderr, "kvsim: internal error: synth schema: %s\n", kv_last_error());
        abort();
    }
    from_text(&r, p);
    p->summaries = KV_SYNTH_SUMMARIES_AUTO;
    p->pool = 0;
    snprintf(p->backend, sizeof p->backend, "cpu");
    p->n_threads = 0;
    p->q_tail = -1;
}

/* Resolve `given` on top of the current values of p. */
static int apply_raw(kv_synth_params_t *p, const kv_params_t *given)
{
    kv_params_t cur, res;
    to_text(p, &cur);
    for (int i = 0; i < given->n; i++) {
        int known = 0;
        for (int j = 0; j < N_FIELDS; j++)
            known |= !strcmp(schema[j].key, given->key[i]);
        if (!known) /* let resolve produce the message that lists the valid keys */
            return kv_params_resolve(schema, N_FIELDS, given, &res, "synth");
        int rc = kv_params_set(&cur, given->key[i], given->val[i]);
        if (rc)
            return rc;
    }
    int rc = kv_params_resolve(schema, N_FIELDS, &cur, &res, "synth");
    if (rc)
        return rc;
    from_text(&res, p);
    return KV_OK;
}

int kv_synth_set(kv_synth_params_t *p, const char *key, const char *val)
{
    kv_params_t g;
    memset(&g, 0, sizeof g);
    int rc = kv_params_set(&g, key, val);
    return rc ? rc : apply_raw(p, &g);
}

int kv_synth_apply(kv_synth_params_t *p, const char *spec)
{
    char name[64];
    kv_params_t raw;
    int rc = kv_spec_parse(spec, name, sizeof name, &raw);
    if (rc)
        return kv_error_context(rc, "synth parameters");
    if (strcmp(name, "synth"))
        return kv_error(KV_EINVAL, "'%s': expected synth(key=value,...), got the name '%s'", spec, name);
    return apply_raw(p, &raw);
}

int kv_synth_parse(const char *label, kv_synth_params_t *p)
{
    kv_synth_defaults(p);
    return kv_synth_apply(p, label);
}

int kv_synth_label(const kv_synth_params_t *p, char *buf, size_t len)
{
    kv_params_t cur, res;
    to_text(p, &cur);
    int rc = kv_params_resolve(schema, N_FIELDS, &cur, &res, "synth");
    return rc ? rc : kv_params_label("synth", &res, buf, len);
}

void kv_synth_describe(char *buf, size_t len)
{
    kv_params_describe(schema, N_FIELDS, buf, len);
}

const char *kv_synth_key(int i)
{
    return i >= 0 && i < N_FIELDS ? schema[i].key : NULL;
}

int kv_synth_preset(kv_synth_params_t *p, const char *name)
{
    static const struct {
        const char *name;
        int layers, heads, kv_heads, head_dim;
    } presets[] = {
        {"llama3-8b", 32, 32, 8, 128}, /* Llama-3-8B / Llama-3.1-8B */
        {"llama2-7b", 32, 32, 32, 128},  {"mistral-7b", 32, 32, 8, 128},
        {"stories110m", 12, 12, 12, 64}, {"tiny", 4, 4, 2, 64},
    };
    char names[128] = "";
    size_t used = 0;
    for (size_t i = 0; i < KV_ARRAY_LEN(presets); i++) {
        if (!strcmp(name, presets[i].name)) {
            p->n_layers = presets[i].layers;
            p->n_heads = presets[i].heads;
            p->n_kv_heads = presets[i].kv_heads;
            p->head_dim = presets[i].head_dim;
            return KV_OK;
        }
        used += (size_t)snprintf(names + used, sizeof names - used, "%s%s", i ? ", " : "", presets[i].name);
    }
    return kv_error(KV_EINVAL, "synth: unknown preset '%s' (known: %s)", name, names);
}

/* Segment dims in use: 0 without segments. */
static int seg_dims_used(const kv_synth_params_t *p)
{
    return p->n_segments >= 2 ? KV_MIN(p->segment_dims, p->n_segments) : 0;
}

/* Logical dims before the noise dims: sink, heavy, segment dims padded to a pair, rotary pairs. */
static int planted_dims(const kv_synth_params_t *p)
{
    int S = seg_dims_used(p);
    return 2 + 2 * ((S + 1) / 2) + 2 * p->rope_pairs;
}

int kv_synth_validate(const kv_synth_params_t *p)
{
    /* Ranges first (a struct filled by hand may hold anything). */
    kv_params_t cur, res;
    to_text(p, &cur);
    int rc = kv_params_resolve(schema, N_FIELDS, &cur, &res, "synth");
    if (rc)
        return rc;
    if (p->n_heads % p->n_kv_heads)
        return kv_error(KV_EINVAL, "synth: heads (%d) is not a multiple of kv_heads (%d)", p->n_heads, p->n_kv_heads);
    if (p->head_dim % 2)
        return kv_error(KV_EINVAL, "synth: head_dim (%d) must be even (rotary dimension pairs)", p->head_dim);
    if (p->n_decode >= p->n_tokens)
        return kv_error(KV_EINVAL,
                        "synth: decode (%d) must be smaller than tokens (%d), which counts prompt and "
                        "decode tokens together",
                        p->n_decode, p->n_tokens);
    int n_prompt = p->n_tokens - p->n_decode;
    if (p->q_tail > n_prompt)
        return kv_error(KV_EINVAL, "synth: --q-tail %d is longer than the prompt (%d tokens)", p->q_tail, n_prompt);
    if (p->q_tail >= 0 && p->summaries == KV_SYNTH_SUMMARIES_NO)
        return kv_error(KV_EINVAL,
                        "synth: a lean trace (--q-tail) stores its statistics, which are computed with the summaries "
                        "(leave --summaries at auto or yes)");
    if (p->n_sinks >= n_prompt)
        return kv_error(KV_EINVAL, "synth: %d sink tokens leave no ordinary token in a prompt of %d", p->n_sinks,
                        n_prompt);
    if (p->sink_mass > 0 && p->n_sinks == 0)
        return kv_error(KV_EINVAL, "synth: sink_mass %g needs sinks >= 1", p->sink_mass);
    if (p->n_segments > n_prompt)
        return kv_error(KV_EINVAL, "synth: %d segments do not fit a prompt of %d tokens", p->n_segments, n_prompt);
    int S = seg_dims_used(p), need = planted_dims(p) + (p->noise > 0 ? 1 : 0);
    if (need > p->head_dim)
        return kv_error(KV_EINVAL,
                        "synth: head_dim %d is too small for the planted dimensions: sink + heavy 2, segment "
                        "codes %d (padded to pairs), rotary 2 x %d, noise >= %d: need >= %d; lower rope_pairs or "
                        "seg_dims, or raise head_dim",
                        p->head_dim, S, p->rope_pairs, p->noise > 0 ? 1 : 0, need);
    if (p->pool < 0 || p->pool > p->n_tokens)
        return kv_error(KV_EINVAL, "synth: pooled map side %d outside [0, %d]", p->pool, p->n_tokens);
    if (p->summaries < KV_SYNTH_SUMMARIES_AUTO || p->summaries > KV_SYNTH_SUMMARIES_NO)
        return kv_error(KV_EINVAL, "synth: bad summaries mode %d", (int)p->summaries);
    /* One layer of float32 Q, K, V must be addressable. */
    double floats = (double)p->n_tokens * p->head_dim * (p->n_heads + 2.0 * p->n_kv_heads);
    if (floats * sizeof(float) > 0.5 * (double)SIZE_MAX)
        return kv_error(KV_EINVAL, "synth: one layer would be %.3g bytes", floats * 4);
    return KV_OK;
}

int kv_synth_want_summaries(const kv_synth_params_t *p)
{
    if (p->summaries == KV_SYNTH_SUMMARIES_YES || p->q_tail >= 0) /* a lean trace needs its statistics */
        return 1;
    if (p->summaries == KV_SYNTH_SUMMARIES_NO)
        return 0;
    return kv_synth_summary_work(p) <= KV_SYNTH_AUTO_SUMMARY_WORK && p->n_tokens <= KV_SYNTH_AUTO_SUMMARY_TOKENS;
}

double kv_synth_summary_work(const kv_synth_params_t *p)
{
    return (double)p->n_layers * p->n_heads * (double)p->n_tokens * p->n_tokens;
}

double kv_synth_sharpness(const kv_synth_params_t *p, int layer)
{
    if (p->n_layers <= 1)
        return p->sharp_last;
    return p->sharp_first + (p->sharp_last - p->sharp_first) * (double)layer / (double)(p->n_layers - 1);
}

/* ------------------------------------------------------------------ token roles and segments */

int kv_synth_roles(const kv_synth_params_t *p, uint8_t *roles, int *n_heavy)
{
    int rc = kv_synth_validate(p);
    if (rc)
        return rc;
    const int T = p->n_tokens, n_prompt = T - p->n_decode, ns = p->n_sinks;
    memset(roles, KV_SYNTH_ORDINARY, (size_t)T);
    for (int j = 0; j < ns; j++)
        roles[j] = KV_SYNTH_SINK;
    const int N = n_prompt - ns;
    const int nh = (int)llround(p->heavy_frac * N);
    if (n_heavy)
        *n_heavy = nh;
    if (nh == 0)
        return KV_OK;
    int32_t *idx = kv_malloc(sizeof(int32_t) * (size_t)N, "synth heavy hitters");
    if (!idx)
        return KV_ENOMEM;
    for (int j = 0; j < N; j++)
        idx[j] = ns + j;
    kv_rng_t r;
    kv_rng_seed_task(&r, (uint64_t)p->seed, GLOBAL_TASK, STREAM_HEAVY, 0);
    for (int a = 0; a < nh; a++) { /* partial Fisher-Yates */
        int b = a + (int)kv_rng_below(&r, (uint64_t)(N - a));
        int32_t t = idx[a];
        idx[a] = idx[b];
        idx[b] = t;
        roles[idx[a]] |= KV_SYNTH_HEAVY;
    }
    kv_free(idx);
    return KV_OK;
}

/* Segment starts (n_seg of them, n_seg >= 2) of the prompt; jittered lengths, strictly ascending. */
static int segment_starts(const kv_synth_params_t *p, int32_t *starts)
{
    const int n = p->n_segments, n_prompt = p->n_tokens - p->n_decode;
    double *w = kv_malloc(sizeof(double) * (size_t)n, "synth segments");
    if (!w)
        return KV_ENOMEM;
    kv_rng_t r;
    kv_rng_seed_task(&r, (uint64_t)p->seed, GLOBAL_TASK, STREAM_SEGMENTS, 0);
    double total = 0, acc = 0;
    for (int s = 0; s < n; s++)
        total += (w[s] = 1.0 + p->segment_jitter * (2.0 * kv_rng_uniform(&r) - 1.0));
    for (int s = 0; s < n; s++) {
        starts[s] = (int32_t)floor((double)n_prompt * acc / total);
        acc += w[s];
    }
    kv_free(w);
    starts[0] = 0;
    for (int s = 1; s < n; s++) /* at least one token each (n <= n_prompt is validated) */
        if (starts[s] <= starts[s - 1])
            starts[s] = starts[s - 1] + 1;
    for (int s = n - 1; s >= 1; s--)
        if (starts[s] > n_prompt - (n - s))
            starts[s] = n_prompt - (n - s);
    return KV_OK;
}

int kv_synth_trace_roles(const kv_trace_meta_t *m, uint8_t *roles, int *n_heavy)
{
    if (strcmp(m->source, "synth"))
        return kv_error(KV_EINVAL, "trace source is '%s', not a synthetic trace", m->source);
    kv_synth_params_t p;
    int rc = kv_synth_parse(m->generator, &p);
    if (rc)
        return kv_error_context(rc, "synthetic trace generator '%.64s...'", m->generator);
    if (p.n_tokens != m->n_tokens || p.n_tokens - p.n_decode != m->n_prompt)
        return kv_error(KV_EFORMAT, "synthetic trace: generator says %d tokens (%d decode), the trace has %d (%d)",
                        p.n_tokens, p.n_decode, m->n_tokens, m->n_tokens - m->n_prompt);
    return kv_synth_roles(&p, roles, n_heavy);
}

int kv_synth_meta(const kv_synth_params_t *p, kv_trace_meta_t *m)
{
    memset(m, 0, sizeof *m);
    int rc = kv_synth_validate(p);
    if (rc)
        return rc;
    const int T = p->n_tokens;
    m->n_layers = p->n_layers;
    m->n_heads = p->n_heads;
    m->n_kv_heads = p->n_kv_heads;
    m->head_dim = p->head_dim;
    m->n_tokens = T;
    m->n_prompt = T - p->n_decode;
    m->has_summaries = kv_synth_want_summaries(p);
    m->has_stats = m->has_summaries; /* computed in the same pass */
    m->q_start = p->q_tail >= 0 ? m->n_prompt - p->q_tail : 0;
    /* the head statistics end where the stored queries of the prompt begin, or 64 queries before the
     * prompt's end when every query is stored (as capture) */
    m->stats_split = !m->has_stats    ? 0
                     : p->q_tail >= 0 ? m->q_start
                                      : KV_MAX(0, m->n_prompt - KV_TRACE_DEFAULT_STATS_TAIL);
    m->pool = m->has_summaries ? KV_MIN(p->pool > 0 ? p->pool : KV_TRACE_DEFAULT_POOL, T) : 0;
    m->dtype = KV_DTYPE_F32;
    m->tokens = kv_malloc(sizeof(int32_t) * (size_t)T, "synth tokens");
    m->positions = kv_malloc(sizeof(int32_t) * (size_t)T, "synth positions");
    if (!m->tokens || !m->positions) {
        kv_trace_meta_free(m);
        return KV_ENOMEM;
    }
    for (int t = 0; t < T; t++) {
        m->tokens[t] = -1;
        m->positions[t] = t;
    }
    if (p->n_segments >= 2) {
        m->segments = kv_malloc(sizeof(int32_t) * (size_t)p->n_segments, "synth segments");
        if (!m->segments) {
            kv_trace_meta_free(m);
            return KV_ENOMEM;
        }
        m->n_segments = p->n_segments;
        if ((rc = segment_starts(p, m->segments))) {
            kv_trace_meta_free(m);
            return rc;
        }
    }
    snprintf(m->source, sizeof m->source, "synth");
    snprintf(m->backend, sizeof m->backend, "cpu (generator; no summaries)");
    snprintf(m->tool_version, sizeof m->tool_version, "%s", KV_VERSION);
    snprintf(m->git_revision, sizeof m->git_revision, "%s", kv_git_revision());
    kv_iso_time(m->created, sizeof m->created);
    if ((rc = kv_synth_label(p, m->generator, sizeof m->generator))) {
        kv_trace_meta_free(m);
        return kv_error_context(rc, "synth: the parameters do not fit the trace's generator attribute (%zu bytes)",
                                sizeof m->generator);
    }
    return kv_trace_meta_validate(m, "synth");
}

/* ------------------------------------------------------------------ generator state */

struct kv_synth {
    kv_synth_params_t p;
    int T, n_prompt, d, M, S; /* tokens, prompt, head_dim, rotary pairs, segment dims used */
    int d_noise;              /* noise dims */
    int n_seg;                /* segments (>= 2) or 0 */
    int32_t *seg_start;       /* (n_seg) */
    int32_t *seg_end;         /* (n_seg) exclusive; the last one ends at T (decode tokens join it) */
    int32_t *seg_of;          /* (T) segment of each token, 0 without segments */
    uint8_t *roles;           /* (T) KV_SYNTH_* flags */
    int n_heavy;
    int32_t *heavy;       /* (n_heavy) ascending */
    double *omega;        /* (M) rotary frequencies */
    float *cos_t, *sin_t; /* (T, M) cos(t w_m), sin(t w_m) */
    double *f;            /* (T) recency kernel f(D) - 1 (<= 0) */
};

const kv_synth_params_t *kv_synth_params(const kv_synth_t *s)
{
    return &s->p;
}

void kv_synth_free(kv_synth_t *s)
{
    if (!s)
        return;
    kv_free(s->seg_start);
    kv_free(s->seg_end);
    kv_free(s->seg_of);
    kv_free(s->roles);
    kv_free(s->heavy);
    kv_free(s->omega);
    kv_free(s->cos_t);
    kv_free(s->sin_t);
    kv_free(s->f);
    kv_free(s);
}

int kv_synth_create(const kv_synth_params_t *p, kv_synth_t **out)
{

    *out = NULL;
    int rc = kv_synth_validate(p);
    if (rc)
        return rc;
    kv_synth_t *s = kv_calloc(1, sizeof *s, "synth state");
    if (!s)
        return KV_ENOMEM;
    s->p = *p;
    const int T = p->n_tokens, M = p->rope_pairs;
    s->T = T;
    s->n_prompt = T - p->n_decode;
    s->d = p->head_dim;
    s->M = M;
    s->S = seg_dims_used(p);
    s->d_noise = p->head_dim - planted_dims(p);
    s->seg_of = kv_calloc((size_t)T, sizeof(int32_t), "synth segments");
    s->roles = kv_malloc((size_t)T, "synth roles");
    s->f = kv_malloc(sizeof(double) * (size_t)T, "synth recency kernel");
    if (M > 0) {
        s->omega = kv_malloc(sizeof(double) * (size_t)M, "synth rotary");
        s->cos_t = kv_malloc(sizeof(float) * (size_t)T * M, "synth rotary table");
        s->sin_t = kv_malloc(sizeof(float) * (size_t)T * M, "synth rotary table");
    }
    if (!s->seg_of || !s->roles || !s->f || (M > 0 && (!s->omega || !s->cos_t || !s->sin_t))) {
        rc = KV_ENOMEM;
        goto fail;
    }
    if ((rc = kv_synth_roles(p, s->roles, &s->n_heavy)))
        goto fail;
    if (s->n_heavy > 0) {
        if (!(s->heavy = kv_malloc(sizeof(int32_t) * (size_t)s->n_heavy, "synth heavy hitters"))) {
            rc = KV_ENOMEM;
            goto fail;
        }
        int n = 0;
        for (int t = 0; t < T; t++)
            if (s->roles[t] & KV_SYNTH_HEAVY)
                s->heavy[n++] = t;
    }
    if (p->n_segments >= 2) {
        s->n_seg = p->n_segments;
        s->seg_start = kv_malloc(sizeof(int32_t) * (size_t)s->n_seg, "synth segments");
        s->seg_end = kv_malloc(sizeof(int32_t) * (size_t)s->n_seg, "synth segments");
        if (!s->seg_start || !s->seg_end) {
            rc = KV_ENOMEM;
            goto fail;
        }
        if ((rc = segment_starts(p, s->seg_start)))
            goto fail;
        for (int g = 0; g < s->n_seg; g++) {
            s->seg_end[g] = g + 1 < s->n_seg ? s->seg_start[g + 1] : T;
            for (int t = s->seg_start[g]; t < s->seg_end[g]; t++)
                s->seg_of[t] = g;
        }
    }
    /* Rotary frequencies from 1 rad/token down to 1/recent_window, log-spaced. */
    for (int m = 0; m < M; m++)
        s->omega[m] = M == 1 ? 1.0 / p->recent_window : pow(1.0 / p->recent_window, (double)m / (double)(M - 1));
    for (int t = 0; t < T; t++) {
        double fd = 0;
        for (int m = 0; m < M; m++) {
            double a = (double)t * s->omega[m];
            s->cos_t[(size_t)t * M + m] = (float)cos(a);
            s->sin_t[(size_t)t * M + m] = (float)sin(a);
            fd += cos(a);
        }
        s->f[t] = M > 0 ? fd / M - 1.0 : 0.0;
    }
    *out = s;
    return KV_OK;
fail:
    kv_synth_free(s);
    return rc;
}

/* ------------------------------------------------------------------ one layer */

/* Approximately standard normal: the sum of four 16-bit uniforms of one 64-bit draw, centred and
 * scaled to unit variance (Irwin-Hall, |z| <= 3.46). One generator call per value keeps a layer of
 * Llama-3-8B at 8K tokens (50M values) well under a second; its moment generating function
 * E exp(t z) = exp(t^2/2 - t^4/80 + O(t^6)) is what the sink calibration uses. */
static inline float fast_normal(kv_rng_t *r)
{
    uint64_t x = kv_rng_u64(r);
    uint32_t s =
        (uint32_t)(x & 0xFFFF) + (uint32_t)((x >> 16) & 0xFFFF) + (uint32_t)((x >> 32) & 0xFFFF) + (uint32_t)(x >> 48);
    return ((float)s - 131070.0f) * (1.7320508075688772f / 65536.0f);
}

/* Dot product with a fixed summation order (8 partial sums: vectorisable, thread-independent). */
static inline float dotf(const float *a, const float *b, int n)
{
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int x = 0;
    for (; x + 8 <= n; x += 8)
        for (int u = 0; u < 8; u++)
            acc[u] += a[x + u] * b[x + u];
    float r = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; x < n; x++)
        r += a[x] * b[x];
    return r;
}

/* exp of a score relative to R: float where it cannot overflow (the common case), else double. */
static inline double exp_score(float a)
{
    return a < 80.0f ? (double)expf(a) : exp((double)a);
}

/* sum_x log E exp(c z_x z') over fast_normal's z', given sum z_x^2 and sum z_x^4:
 * log E exp(t z') = t^2/2 - t^4/80 + O(t^6). */
static inline double log_mgf_sum(double c, double z2, double z4)
{
    const double c2 = c * c;
    return 0.5 * c2 * z2 - c2 * c2 * z4 / 80.0;
}

/* Per (layer, KV head): where each logical dim lives, noise channel scales and rotary phases. */
typedef struct {
    int *phys;          /* (d) physical index of logical dim x */
    float *sigma;       /* (d_noise) channel scales */
    float *cphi, *sphi; /* (M) cos and sin of the phases */
} kvhead_t;

/* Per (layer, query head): bonuses in logits. */
typedef struct {
    double R, B, E;
} qhead_t;

/* Logical dims: 0 sink, 1 heavy, [2, 2+S) segment codes, then pairs of rotary (cos, sin) starting
 * at rot0, noise dims at [noise0, d) (plus the odd segment pad dim, unused). */
static inline int rot0(const kv_synth_t *s)
{
    return 2 + 2 * ((s->S + 1) / 2);
}
static inline int noise0(const kv_synth_t *s)
{
    return rot0(s) + 2 * s->M;
}

static void kvhead_params(const kv_synth_t *s, int layer, int g, kvhead_t *kh)
{
    const int d = s->d, np = d / 2;
    kv_rng_t r;
    kv_rng_seed_task(&r, (uint64_t)s->p.seed, (uint64_t)layer, (uint64_t)g, STREAM_KVHEAD);
    int perm[2048] = {0}; /* np <= 2048: head_dim <= 4096 in the schema */
    for (int i = 0; i < np; i++)
        perm[i] = i;
    for (int i = np - 1; i > 0; i--) {
        int j = (int)kv_rng_below(&r, (uint64_t)i + 1);
        int t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    for (int x = 0; x < d; x++)
        kh->phys[x] = 2 * perm[x / 2] + (x & 1);
    for (int x = 0; x < s->d_noise; x++)
        kh->sigma[x] = (float)exp(s->p.channel_spread * kv_rng_normal(&r));
    for (int m = 0; m < s->M; m++) {
        double phi = 2.0 * M_PI * kv_rng_uniform(&r);
        kh->cphi[m] = (float)cos(phi);
        kh->sphi[m] = (float)sin(phi);
    }
}

static void qhead_params(const kv_synth_t *s, int layer, int h, qhead_t *qh)
{
    kv_rng_t r;
    kv_rng_seed_task(&r, (uint64_t)s->p.seed, (uint64_t)layer, (uint64_t)h, STREAM_QHEAD);
    const double beta = kv_synth_sharpness(&s->p, layer), j = s->p.head_jitter;
    double ur = 1 + j * (2 * kv_rng_uniform(&r) - 1);
    double uh = 1 + j * (2 * kv_rng_uniform(&r) - 1);
    double us = 1 + j * (2 * kv_rng_uniform(&r) - 1);
    qh->R = s->M > 0 ? beta * s->p.recent_boost * ur : 0;
    qh->B = s->n_heavy > 0 ? beta * s->p.heavy_boost * uh : 0;
    qh->E = s->S > 0 ? beta * s->p.segment_boost * us : 0;
}

/* Rotary (cos, sin) of token t at pair m with the head's phase. */
static inline void rot_at(const kv_synth_t *s, const kvhead_t *kh, int t, int m, float *c, float *sn)
{
    float a = s->cos_t[(size_t)t * s->M + m], b = s->sin_t[(size_t)t * s->M + m];
    *c = a * kh->cphi[m] - b * kh->sphi[m];
    *sn = b * kh->cphi[m] + a * kh->sphi[m];
}

static void gen_kv(const kv_synth_t *s, int layer, int g, const kvhead_t *kh, float *k, float *v)
{
    const int T = s->T, d = s->d, S = s->S, r0 = rot0(s), n0 = noise0(s);
    const float lam = (float)s->p.planted_key_scale;
    kv_rng_t rk, rv;
    kv_rng_seed_task(&rk, (uint64_t)s->p.seed, (uint64_t)layer, (uint64_t)g, STREAM_K);
    kv_rng_seed_task(&rv, (uint64_t)s->p.seed, (uint64_t)layer, (uint64_t)g, STREAM_V);
    for (int j = 0; j < T; j++) {
        float *kj = k + (size_t)j * d, *vj = v + (size_t)j * d;
        memset(kj, 0, sizeof(float) * (size_t)d);
        const uint8_t role = s->roles[j];
        if (role & KV_SYNTH_SINK)
            kj[kh->phys[0]] = (float)KAPPA_SINK;
        if (role & KV_SYNTH_HEAVY)
            kj[kh->phys[1]] = (float)KAPPA_HEAVY;
        if (S > 0 && !(role & KV_SYNTH_SINK))
            kj[kh->phys[2 + s->seg_of[j] % S]] = 1.0f;
        for (int m = 0; m < s->M; m++)
            rot_at(s, kh, j, m, &kj[kh->phys[r0 + 2 * m]], &kj[kh->phys[r0 + 2 * m + 1]]);
        const float a = role ? lam : 1.0f;
        for (int x = 0; x < s->d_noise; x++)
            kj[kh->phys[n0 + x]] = a * kh->sigma[x] * fast_normal(&rk);
        for (int x = 0; x < d; x++)
            vj[x] = fast_normal(&rv);
    }
}

/* sum_{j=a}^{b} w(i - j) from prefix sums P[n] = sum_{D<n} w(D); 0 when a > b. */
static inline double rsum(const double *P, int i, int a, int b)
{
    return a > b ? 0.0 : P[i - a + 1] - P[i - b];
}

/* sum_{j=a}^{b} w(i - j) e^{E [code(j) = code(i)]} with a >= sinks, b <= i. */
static double seg_sum(const kv_synth_t *s, const double *P, double eE1 /* e^E - 1 */, int i, int a, int b)
{
    double z = rsum(P, i, a, b);
    if (s->S == 0 || a > b)
        return z;
    const int si = s->seg_of[i];
    for (int g = si % s->S; g <= si; g += s->S) {
        int lo = KV_MAX(a, s->seg_start[g]), hi = KV_MIN(b, s->seg_end[g] - 1);
        if (lo <= hi)
            z += eE1 * rsum(P, i, lo, hi);
    }
    return z;
}

static int gen_q(const kv_synth_t *s, int layer, int h, const kvhead_t *kh, const qhead_t *qh, const float *kg,
                 float *q)
{
    const int T = s->T, d = s->d, S = s->S, M = s->M, r0 = rot0(s), n0 = noise0(s), ns = s->p.n_sinks;
    const double sqd = sqrt((double)d), lam = s->p.planted_key_scale;
    const double m = s->p.sink_mass, logit_m = m > 0 ? log(m / (1.0 - m)) : 0;
    const float q_heavy = (float)(qh->B * sqd / KAPPA_HEAVY), q_seg = (float)(qh->E * sqd);
    const float rho = M > 0 ? (float)(qh->R * sqd / M) : 0.0f;
    const double tau = s->d_noise > 0 ? s->p.noise * sqrt((double)d / s->d_noise) : 0.0, ct = tau / sqd;
    float qscale[4096] = {0}; /* tau / sigma_x (d_noise < head_dim <= 4096) */
    for (int x = 0; x < s->d_noise; x++)
        qscale[x] = (float)(tau / kh->sigma[x]);
    double *w = NULL, *P = NULL;
    const int calibrate = m > 0 && ns > 0;
    if (calibrate) {
        w = kv_malloc(sizeof(double) * (size_t)T, "synth weights");
        P = kv_malloc(sizeof(double) * ((size_t)T + 1), "synth weights");
        if (!w || !P) {
            kv_free(w);
            kv_free(P);
            return KV_ENOMEM;
        }
        /* w(D) = exp(R (f(D) - 1)): the recency weights scaled by e^{-R} (<= 1, no overflow). */
        P[0] = 0;
        for (int D = 0; D < T; D++) {
            w[D] = exp(qh->R * s->f[D]);
            P[D + 1] = P[D] + w[D];
        }
    }
    const double eE1 = expm1(qh->E);
    kv_rng_t r;
    kv_rng_seed_task(&r, (uint64_t)s->p.seed, (uint64_t)layer, (uint64_t)h, STREAM_Q);
    int kh_count = 0; /* heavy hitters <= i */
    for (int i = 0; i < T; i++) {
        float *qi = q + (size_t)i * d;
        memset(qi, 0, sizeof(float) * (size_t)d);
        qi[kh->phys[1]] = q_heavy;
        const int code = S > 0 ? s->seg_of[i] % S : 0;
        if (S > 0)
            qi[kh->phys[2 + code]] = q_seg;
        for (int mm = 0; mm < M; mm++) {
            float c, sn;
            rot_at(s, kh, i, mm, &c, &sn);
            qi[kh->phys[r0 + 2 * mm]] = rho * c;
            qi[kh->phys[r0 + 2 * mm + 1]] = rho * sn;
        }
        /* Noise dims: q_x = (tau / sigma_x) z_x, so the noise logit against a key with
         * k_x = a sigma_x z'_x is sum_x (a tau / sqrt(d)) z_x z'_x: its log-MGF over the key's z'
         * needs only sum z^2 and sum z^4 (log_mgf expanded). */
        float z2 = 0, z4 = 0;
        for (int x = 0; x < s->d_noise; x++) {
            const float z = fast_normal(&r), zz = z * z;
            qi[kh->phys[n0 + x]] = qscale[x] * z;
            z2 += zz;
            z4 += zz * zz;
        }
        const double lo = log_mgf_sum(ct, z2, z4), lh = log_mgf_sum(ct * lam, z2, z4);
        while (kh_count < s->n_heavy && s->heavy[kh_count] <= i)
            kh_count++;
        if (!calibrate || i < ns)
            continue;
        /* A: exact scores of the sinks (the sink dim of q is still 0), in log space. */
        double la[64], amax = -INFINITY;
        for (int j = 0; j < ns; j++) {
            la[j] = dotf(qi, kg + (size_t)j * d, d) / sqd;
            amax = la[j] > amax ? la[j] : amax;
        }
        double asum = 0; /* >= 1: the maximum contributes exp(0) (ns >= 1 when calibrating) */
        for (int j = 0; j < ns; j++)
            asum += exp(la[j] - amax);
        // cppcheck-suppress invalidFunctionArg
        const double logA = amax + log(asum);
        /* Z scaled by e^{-R}. Exact scores for the last EXACT_RECENT keys and the EXACT_HEAVY
         * nearest heavy hitters before them (the keys with the largest weights, whose noise would
         * otherwise dominate the error); expectations for the rest. */
        const int rec0 = KV_MAX(ns, i - EXACT_RECENT + 1);
        double zx = 0, wx = 0, hs = 0;
        const float isqd = (float)(1.0 / sqd), fR = (float)qh->R;
        for (int j = rec0; j <= i; j++)
            zx += exp_score(dotf(qi, kg + (size_t)j * d, d) * isqd - fR);
        int hb = kh_count; /* heavy hitters < rec0 */
        while (hb > 0 && s->heavy[hb - 1] >= rec0)
            hb--;
        const int hx0 = KV_MAX(0, hb - EXACT_HEAVY);
        for (int k = hx0; k < hb; k++) {
            const int j = s->heavy[k];
            zx += exp_score(dotf(qi, kg + (size_t)j * d, d) * isqd - fR);
            wx += w[i - j] * ((S > 0 && s->seg_of[j] % S == code) ? eE1 + 1.0 : 1.0);
        }
        const int near0 = KV_MAX(0, hx0 - HEAVY_NEAR);
        for (int k = near0; k < hx0; k++) {
            const int j = s->heavy[k];
            hs += w[i - j] * ((S > 0 && s->seg_of[j] % S == code) ? eE1 + 1.0 : 1.0);
        }
        if (near0 > 0) { /* farther heavy hitters: their share of the range before the near ones */
            const int cut = s->heavy[near0];
            hs += (double)near0 / (double)(cut - ns) * seg_sum(s, P, eE1, i, ns, cut - 1);
        }
        double zo = (rec0 > ns ? seg_sum(s, P, eE1, i, ns, rec0 - 1) : 0.0) - wx - hs;
        if (zo < 0)
            zo = 0;
        const double zs = zx + exp(lo) * zo + exp(qh->B + lh) * hs;
        const double logZ = qh->R + log(zs);
        const double c = logit_m + logZ - logA;
        qi[kh->phys[0]] = (float)(c * sqd / KAPPA_SINK);
    }
    kv_free(w);
    kv_free(P);
    return KV_OK;
}

static int n_threads_of(const kv_synth_params_t *p)
{
    return p->n_threads > 0 ? p->n_threads : omp_get_max_threads();
}

int kv_synth_layer(const kv_synth_t *s, int layer, float *q, float *k, float *v)
{
    const kv_synth_params_t *p = &s->p;
    if (layer < 0 || layer >= p->n_layers)
        return kv_error(KV_ERANGE, "synth: layer %d outside [0, %d)", layer, p->n_layers);
    const int Hkv = p->n_kv_heads, H = p->n_heads, G = H / Hkv, d = s->d, M = s->M;
    const size_t TD = (size_t)s->T * d;
    int rc = KV_OK;
    kvhead_t *kh = kv_calloc((size_t)Hkv, sizeof *kh, "synth heads");
    qhead_t *qh = kv_calloc((size_t)H, sizeof *qh, "synth heads");
    int *phys = kv_malloc(sizeof(int) * (size_t)Hkv * d, "synth heads");
    float *fl = kv_malloc(sizeof(float) * (size_t)Hkv * (s->d_noise + 2 * M + 1), "synth heads");
    if (!kh || !qh || !phys || !fl) {
        rc = KV_ENOMEM;
        goto done;
    }
    for (int g = 0; g < Hkv; g++) {
        float *b = fl + (size_t)g * (s->d_noise + 2 * M + 1);
        kh[g].phys = phys + (size_t)g * d;
        kh[g].sigma = b;
        kh[g].cphi = b + s->d_noise;
        kh[g].sphi = b + s->d_noise + M;
        kvhead_params(s, layer, g, &kh[g]);
    }
    for (int h = 0; h < H; h++)
        qhead_params(s, layer, h, &qh[h]);
    const int nt = n_threads_of(p);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int g = 0; g < Hkv; g++)
        gen_kv(s, layer, g, &kh[g], k + (size_t)g * TD, v + (size_t)g * TD);
    int fail = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int h = 0; h < H; h++) {
        if (gen_q(s, layer, h, &kh[h / G], &qh[h], k + (size_t)(h / G) * TD, q + (size_t)h * TD) != KV_OK) {
#pragma omp atomic write
            fail = 1;
        }
    }
    if (fail)
        rc = kv_error(KV_ENOMEM, "synth: out of memory for the sink normaliser (%d tokens)", s->T);
done:
    kv_free(kh);
    kv_free(qh);
    kv_free(phys);
    kv_free(fl);
    return rc;
}

/* ------------------------------------------------------------------ summaries */

/* (heads, T, d) head-major -> (T, heads, d) token-major. */
static void to_token_major(float *dst, const float *src, int heads, int T, int d)
{
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++)
        for (int h = 0; h < heads; h++)
            memcpy(dst + ((size_t)t * heads + h) * d, src + ((size_t)h * T + t) * d, sizeof(float) * (size_t)d);
}

int kv_synth_summarize(kv_backend_t *be, const kv_trace_meta_t *m, const float *q, const float *k, const float *v,
                       float *lse, float *entropy, float *acc, float *pooled, const kv_synth_stats_t *st)
{
    const int H = m->n_heads, Hkv = m->n_kv_heads, d = m->head_dim, T = m->n_tokens, np = m->n_prompt;
    const int nd = T - np, pool = m->pool > 0 ? m->pool : KV_MIN(KV_TRACE_DEFAULT_POOL, T);
    if (!be->ops->attention || !be->ops->attn_stats)
        return kv_error(KV_ENOTIMPL, "synth summaries: backend %s lacks %s", be->name,
                        be->ops->attention ? "attn_stats" : "attention");
    const kv_synth_stats_t none = {0};
    if (!st)
        st = &none;
    const int host = !strcmp(be->name, "cpu"); /* CPU backend memory is host memory */
    const size_t nq = (size_t)T * H * d, nkv = (size_t)T * Hkv * d, HT = (size_t)H * T;
    /* per-key outputs (prompt queries): acc, acc_sq, max, then the three over [0, stats_split);
     * per-query outputs, packed [prompt block (H, np)][decode block (H, nd)]: lse, entropy, keys90,
     * sink, seg */
    enum { N_COL = 6, N_ROW = 5 };
    float *col_out[N_COL] = {acc, st->acc_sq, st->max, st->acc_head, st->acc_sq_head, st->max_head};
    float *row_out[N_ROW] = {lse, entropy, st->keys90, st->sink, st->seg};
    float *dcol[N_COL] = {NULL}, *drow[N_ROW] = {NULL};
    int rc = KV_OK;
    float *stage = NULL, *dq = NULL, *dk = NULL, *dv = NULL, *dout = NULL, *dpool = NULL, *hbuf = NULL;
    int32_t *dseg = NULL, *seg_lo = NULL;
    dq = kv_be_alloc(be, nq * sizeof(float));
    dk = kv_be_alloc(be, nkv * sizeof(float));
    dv = kv_be_alloc(be, nkv * sizeof(float));
    dout = host ? NULL : kv_be_alloc(be, nq * sizeof(float));
    dpool = kv_be_alloc(be, (size_t)H * pool * pool * sizeof(float));
    dseg = kv_be_alloc(be, (size_t)T * sizeof(int32_t));
    int nomem = !dq || !dk || !dv || (!host && !dout) || !dpool || !dseg;
    for (int c = 0; c < N_COL; c++)
        if (col_out[c])
            nomem |= !(dcol[c] = kv_be_alloc(be, HT * sizeof(float)));
    for (int r = 0; r < N_ROW; r++) /* lse is always needed (attn_stats reads it) */
        if (row_out[r] || r == 0)
            nomem |= !(drow[r] = kv_be_alloc(be, HT * sizeof(float)));
    hbuf = kv_calloc((size_t)H * KV_MAX((size_t)T, (size_t)pool * pool), sizeof(float), "summaries");
    seg_lo = kv_malloc(sizeof(int32_t) * (size_t)T, "segment starts");
    if (!host)
        stage = kv_malloc(nq * sizeof(float), "summaries staging");
    if (nomem || !hbuf || !seg_lo || (!host && !stage)) {
        rc = kv_error(KV_ENOMEM, "synth summaries: out of memory for one layer of %d tokens", T);
        goto done;
    }
    /* Token-major copies of Q, K, V in backend memory; zeroed accumulators; segment starts. */
    const struct {
        float *dst;
        const float *src;
        int heads;
    } tm[3] = {{dq, q, H}, {dk, k, Hkv}, {dv, v, Hkv}};
    for (int i = 0; i < 3 && rc == KV_OK; i++) {
        size_t n = (size_t)T * tm[i].heads * d;
        if (host) {
            to_token_major(tm[i].dst, tm[i].src, tm[i].heads, T, d);
        } else {
            to_token_major(stage, tm[i].src, tm[i].heads, T, d);
            rc = be->ops->upload(be, tm[i].dst, stage, n * sizeof(float));
        }
    }
    for (int c = 0; c < N_COL && rc == KV_OK; c++)
        if (dcol[c])
            rc = be->ops->upload(be, dcol[c], hbuf, HT * sizeof(float));
    if (rc == KV_OK)
        rc = be->ops->upload(be, dpool, hbuf, (size_t)H * pool * pool * sizeof(float));
    for (int t = 0; t < T; t++)
        seg_lo[t] = m->n_segments > 0 ? m->segments[kv_trace_segment_of(m, KV_MIN(t, np - 1))] : 0;
    if (rc == KV_OK)
        rc = be->ops->upload(be, dseg, seg_lo, (size_t)T * sizeof(int32_t));
    /* Prompt queries then decode queries, so that the per-query outputs are packed (heads, n_q) per
     * call and the per-key statistics sum prompt queries only. */
    for (int part = 0; part < 2 && rc == KV_OK; part++) {
        const int q0 = part ? np : 0, n_q = part ? nd : np;
        if (n_q == 0)
            continue;
        float *rp[N_ROW];
        for (int r = 0; r < N_ROW; r++)
            rp[r] = drow[r] ? drow[r] + (size_t)H * q0 : NULL;
        kv_attn_args_t a = {.out = host ? NULL : dout, /* lse is what the statistics need */
                            .lse = rp[0],
                            .q = dq + (size_t)q0 * H * d,
                            .k = dk,
                            .v = dv,
                            .kv_stride = (size_t)Hkv * d,
                            .n_q = n_q,
                            .q_pos0 = q0,
                            .n_heads = H,
                            .n_kv_heads = Hkv,
                            .head_dim = d,
                            .scale = (float)(1.0 / sqrt((double)d))};
        if ((rc = be->ops->attention(be, &a)))
            break;
        kv_attn_stats_args_t sa = {.q = a.q,
                                   .k = dk,
                                   .lse = rp[0],
                                   .kv_stride = a.kv_stride,
                                   .n_q = n_q,
                                   .q_pos0 = q0,
                                   .n_heads = H,
                                   .n_kv_heads = Hkv,
                                   .head_dim = d,
                                   .scale = a.scale,
                                   .entropy = rp[1],
                                   .acc = part ? NULL : dcol[0],
                                   .acc_stride = (size_t)T,
                                   .pooled = dpool,
                                   .pool = pool,
                                   .pool_T = T,
                                   .acc_sq = part ? NULL : dcol[1],
                                   .acc_max = part ? NULL : dcol[2],
                                   .acc_head = part ? NULL : dcol[3],
                                   .acc_sq_head = part ? NULL : dcol[4],
                                   .acc_max_head = part ? NULL : dcol[5],
                                   .head_end = m->stats_split,
                                   .keys_mass = rp[2],
                                   .mass = (float)KV_TRACE_KEYS_MASS,
                                   .sink = rp[3],
                                   .seg = rp[4],
                                   .seg_lo = dseg};
        rc = be->ops->attn_stats(be, &sa);
    }
    if (rc == KV_OK)
        rc = be->ops->sync(be);
    /* per-query outputs are stored as [prompt block (H, np)][decode block (H, nd)]: unpack to (H, T) */
    for (int r = 0; r < N_ROW && rc == KV_OK; r++) {
        if (!row_out[r])
            continue;
        if ((rc = be->ops->download(be, hbuf, drow[r], HT * sizeof(float))))
            break;
        for (int h = 0; h < H; h++) {
            memcpy(row_out[r] + (size_t)h * T, hbuf + (size_t)h * np, sizeof(float) * (size_t)np);
            if (nd)
                memcpy(row_out[r] + (size_t)h * T + np, hbuf + (size_t)H * np + (size_t)h * nd,
                       sizeof(float) * (size_t)nd);
        }
    }
    for (int c = 0; c < N_COL && rc == KV_OK; c++)
        if (col_out[c])
            rc = be->ops->download(be, col_out[c], dcol[c], HT * sizeof(float));
    if (rc == KV_OK && pooled)
        rc = be->ops->download(be, pooled, dpool, (size_t)H * pool * pool * sizeof(float));
    if (rc)
        kv_error_context(rc, "synth summaries (backend %s)", be->name);
done:
    kv_be_free(be, dq);
    kv_be_free(be, dk);
    kv_be_free(be, dv);
    kv_be_free(be, dout);
    kv_be_free(be, dpool);
    kv_be_free(be, dseg);
    for (int c = 0; c < N_COL; c++)
        kv_be_free(be, dcol[c]);
    for (int r = 0; r < N_ROW; r++)
        kv_be_free(be, drow[r]);
    kv_free(hbuf);
    kv_free(seg_lo);
    kv_free(stage);
    return rc;
}

/* ------------------------------------------------------------------ whole traces */

/* Where one layer goes: an HDF5 writer or an in-memory trace. */
typedef struct {
    kv_trace_writer_t *w;
    kv_trace_t *mem;
} sink_t;

/* The statistics of one layer: the 8 tensors KV_T_ACC_SQ .. KV_T_SEG, in kv_synth_stats_t's order. */
#define N_STATS 8
static kv_synth_stats_t stats_of(float *const st[N_STATS])
{
    kv_synth_stats_t x = {st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7]};
    return x;
}

/* (H, T, d) -> the rows of tokens [q0, T) of each head, packed (H, T - q0, d), in place. */
static void keep_tail_rows(float *q, int H, int T, int d, int q0)
{
    for (int h = 0; h < H; h++)
        memmove(q + (size_t)h * (T - q0) * d, q + ((size_t)h * T + q0) * d, sizeof(float) * (size_t)(T - q0) * d);
}

/* Generate every layer into `out`; `what` names the progress line (NULL: no progress). */
static int run(const kv_synth_params_t *p, kv_trace_meta_t *meta, sink_t *out, const char *what)
{
    kv_synth_t *s = NULL;
    kv_backend_t *be = NULL;
    float *q = NULL, *k = NULL, *v = NULL, *sum[4] = {NULL, NULL, NULL, NULL}, *st[N_STATS] = {NULL};
    float *qfull = NULL; /* lean traces: every query of the layer, for the statistics */
    int rc = kv_synth_create(p, &s);
    if (rc)
        return rc;
    const int lean = meta->q_start > 0, H = meta->n_heads, T = meta->n_tokens, d = meta->head_dim;
    const size_t nq_all = (size_t)H * T * d, nkv = kv_tensor_numel(meta, KV_T_K);
    if (meta->has_summaries) {
        if ((rc = kv_backend_open(p->backend, p->n_threads, &be)))
            goto done;
        snprintf(meta->backend, sizeof meta->backend, "%s", be->device);
        if (out->w)
            snprintf(kv_trace_writer_meta(out->w)->backend, sizeof meta->backend, "%s", be->device);
    }
    if (lean && !(qfull = kv_malloc_aligned(nq_all * sizeof(float), "synth layer Q"))) {
        rc = KV_ENOMEM;
        goto done;
    }
    if (out->w) {
        q = lean ? qfull : kv_malloc_aligned(nq_all * sizeof(float), "synth layer Q");
        k = kv_malloc_aligned(nkv * sizeof(float), "synth layer K");
        v = kv_malloc_aligned(nkv * sizeof(float), "synth layer V");
        if (!q || !k || !v) {
            rc = KV_ENOMEM;
            goto done;
        }
        for (int w = 0; w < 4 && meta->has_summaries; w++)
            if (!(sum[w] = kv_malloc(kv_tensor_numel(meta, (kv_tensor_t)(KV_T_LSE + w)) * sizeof(float),
                                     "synth summaries"))) {
                rc = KV_ENOMEM;
                goto done;
            }
        for (int w = 0; w < N_STATS && meta->has_stats; w++)
            if (!(st[w] = kv_malloc(kv_tensor_numel(meta, (kv_tensor_t)(KV_T_ACC_SQ + w)) * sizeof(float),
                                    "synth statistics"))) {
                rc = KV_ENOMEM;
                goto done;
            }
    }
    kv_progress_t pg;
    const int level = kv_log_get_level();
    if (!what)
        kv_log_set_level(KV_LOG_QUIET); /* the progress API prints at INFO level */
    kv_progress_begin(&pg, what ? what : "synth", p->n_layers);
    double t_gen = 0, t_sum = 0, t_write = 0, t0;
    for (int l = 0; l < p->n_layers && rc == KV_OK; l++) {
        float *qdst = q; /* where the stored queries go */
        if (out->mem) {
            qdst = kv_trace_mem_tensor(out->mem, l, KV_T_Q);
            q = lean ? qfull : qdst;
            k = kv_trace_mem_tensor(out->mem, l, KV_T_K);
            v = kv_trace_mem_tensor(out->mem, l, KV_T_V);
            for (int w = 0; w < 4 && meta->has_summaries; w++)
                sum[w] = kv_trace_mem_tensor(out->mem, l, (kv_tensor_t)(KV_T_LSE + w));
            for (int w = 0; w < N_STATS && meta->has_stats; w++)
                st[w] = kv_trace_mem_tensor(out->mem, l, (kv_tensor_t)(KV_T_ACC_SQ + w));
            int missing = !qdst || !k || !v || (meta->has_summaries && (!sum[0] || !sum[1] || !sum[2] || !sum[3]));
            for (int w = 0; w < N_STATS && meta->has_stats; w++)
                missing |= !st[w];
            if (missing) {
                rc = KV_ENOMEM;
                break;
            }
        }
        t0 = kv_now();
        if ((rc = kv_synth_layer(s, l, q, k, v)))
            break;
        t_gen += kv_now() - t0;
        t0 = kv_now();
        const kv_synth_stats_t sst = stats_of(st);
        if (meta->has_summaries &&
            (rc = kv_synth_summarize(be, meta, q, k, v, sum[0], sum[1], sum[2], sum[3], meta->has_stats ? &sst : NULL)))
            break;
        t_sum += kv_now() - t0;
        if (lean) { /* keep the queries of tokens [q_start, T) */
            keep_tail_rows(q, H, T, d, meta->q_start);
            if (out->mem)
                memcpy(qdst, q, sizeof(float) * kv_tensor_numel(meta, KV_T_Q));
        }
        t0 = kv_now();
        if (out->w) {
            if ((rc = kv_trace_write(out->w, l, KV_T_Q, q)) || (rc = kv_trace_write(out->w, l, KV_T_K, k)) ||
                (rc = kv_trace_write(out->w, l, KV_T_V, v)))
                break;
            for (int w = 0; w < 4 && meta->has_summaries && rc == KV_OK; w++)
                rc = kv_trace_write(out->w, l, (kv_tensor_t)(KV_T_LSE + w), sum[w]);
            for (int w = 0; w < N_STATS && meta->has_stats && rc == KV_OK; w++)
                rc = kv_trace_write(out->w, l, (kv_tensor_t)(KV_T_ACC_SQ + w), st[w]);
        }
        t_write += kv_now() - t0;
        char detail[64];
        snprintf(detail, sizeof detail, "layer %d/%d", l + 1, p->n_layers);
        kv_progress_update(&pg, l + 1, detail);
    }
    if (rc == KV_OK) {
        char detail[160], b[32];
        snprintf(detail, sizeof detail, "(generate %.1fs, summaries %.1fs, write %.1fs), peak RSS %s", t_gen, t_sum,
                 t_write, kv_fmt_bytes((double)kv_peak_rss(), b, sizeof b));
        kv_progress_end(&pg, detail);
    }
    kv_log_set_level(level);
done:
    if (out->w) {
        if (q != qfull)
            kv_free_aligned(q);
        kv_free_aligned(k);
        kv_free_aligned(v);
        for (int w = 0; w < 4; w++)
            kv_free(sum[w]);
        for (int w = 0; w < N_STATS; w++)
            kv_free(st[w]);
    }
    kv_free_aligned(qfull);
    kv_backend_close(be);
    kv_synth_free(s);
    return rc;
}

int kv_synth_write(const kv_synth_params_t *p, const char *path, const kv_write_opts_t *opts)
{
    kv_trace_meta_t meta;
    int rc = kv_synth_meta(p, &meta);
    if (rc)
        return rc;
    sink_t out = {NULL, NULL};
    if ((rc = kv_trace_create(path, &meta, opts, &out.w)))
        goto done;
    if ((rc = run(p, &meta, &out, "synth"))) {
        kv_trace_abort(out.w);
        if (strncmp(kv_last_error(), path, strlen(path))) /* name the file once */
            kv_error_context(rc, "%s", path);
        goto done;
    }
    rc = kv_trace_commit(out.w);
done:
    kv_trace_meta_free(&meta);
    return rc;
}

int kv_synth_memory(const kv_synth_params_t *p, kv_trace_t **out)
{
    *out = NULL;
    kv_trace_meta_t meta;
    int rc = kv_synth_meta(p, &meta);
    if (rc)
        return rc;
    sink_t o = {NULL, NULL};
    if ((rc = kv_trace_mem_create(&meta, &o.mem)))
        goto done;
    if ((rc = run(p, &meta, &o, NULL))) { /* in-memory traces are small: no progress lines */
        kv_trace_close(o.mem);
        goto done;
    }
    snprintf(kv_trace_mem_meta(o.mem)->backend, sizeof meta.backend, "%s", meta.backend);
    *out = o.mem;
done:
    kv_trace_meta_free(&meta);
    return rc;
}
