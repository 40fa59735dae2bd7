/*
 * budget.c: budget lists. "128" is tokens per storage head including the window (SnapKV /
 * KVCache-Factory meaning); "0.25" or "25%" a fraction of the context (kvpress: 1 - compression
 * ratio; B = floor(f * n_ctx), at least 1); "seq:65536" a total for the sequence across all layers
 * and KV heads (B = floor(total / (n_layers * n_kv_heads))); "cr:0.25" kvpress's compression ratio
 * with kvpress's rounding (kvpress/utils.py compute_n_kept, 0.5.5: max(1, int(n * (1 - cr))) in
 * double precision, so cr:0.8 on 20 tokens keeps int(20 x 0.19999999999999996) = 3 where the
 * fraction 0.2 keeps 4).
 */
#include "sim/common/kv_common.h"
#include "sim/common/kv_params.h"
#include "sim/kv_policy.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The smallest fraction a budget may be: below it, no context kvsim can hold (2^31 tokens) gives a
 * token (a fraction that resolves to less than one token on a trace is refused there). */
#define KV_BUDGET_MIN_FRACTION 1e-9

static int parse_one(const char *s, kv_budget_t *b)
{
    memset(b, 0, sizeof *b);
    char *end;
    errno = 0;
    if (!strncmp(s, "seq:", 4)) {
        double v = kv_is_decimal(s + 4, 0, 0) ? strtod(s + 4, &end) : -1;
        if (v < 1 || errno || v != floor(v) || v > 1e15)
            return kv_error(KV_EINVAL, "budget '%s': expected seq:<positive integer>", s);
        b->kind = KV_BUDGET_SEQUENCE;
        b->value = v;
        snprintf(b->text, sizeof b->text, "seq:%.0f", v);
        return KV_OK;
    }
    if (!strncmp(s, "cr:", 3)) {
        double v = kv_is_decimal(s + 3, 0, 0) ? strtod(s + 3, &end) : -1;
        if (v < 0 || *end || errno || !(v >= 0 && v < 1))
            return kv_error(KV_EINVAL, "budget '%s': expected cr:<compression ratio in [0, 1)>", s);
        b->kind = KV_BUDGET_RATIO;
        b->value = v;
        snprintf(b->text, sizeof b->text, "cr:%.6g", v);
        return KV_OK;
    }
    if (!kv_is_decimal(s, 0, 1))
        return kv_error(KV_EINVAL, "budget '%s' is not a decimal number (use 128, 0.25, 25%%, seq:65536 or cr:0.75)",
                        s);
    double v = strtod(s, &end);
    if (end == s || errno || !isfinite(v))
        return kv_error(KV_EINVAL, "budget '%s' is not a number (use 128, 0.25, 25%%, seq:65536 or cr:0.75)", s);
    if (v > 0 && v / (*end == '%' ? 100.0 : 1.0) < KV_BUDGET_MIN_FRACTION)
        return kv_error(KV_ERANGE, "budget '%s' is a fraction below %g: less than one token of any context", s,
                        KV_BUDGET_MIN_FRACTION);
    if (*end == '%' && end[1] == 0) {
        v /= 100.0;
        if (!(v > 0 && v <= 1))
            return kv_error(KV_ERANGE, "budget '%s': a percentage must be in (0, 100]", s);
        b->kind = KV_BUDGET_FRACTION;
    } else if (*end) {
        return kv_error(KV_EINVAL, "budget '%s' is not a number (use 128, 0.25, 25%%, seq:65536 or cr:0.75)", s);
    } else if (v > 0 && v < 1) {
        b->kind = KV_BUDGET_FRACTION;
    } else if (v == 1.0 && strchr(s, '.')) {
        b->kind = KV_BUDGET_FRACTION; /* "1.0" = the whole context */
    } else {
        if (v < 1 || v != floor(v) || v > 1e9)
            return kv_error(KV_ERANGE, "budget '%s': token budgets are positive integers, fractions lie in (0, 1]", s);
        b->kind = KV_BUDGET_TOKENS;
    }
    b->value = v;
    if (b->kind == KV_BUDGET_TOKENS)
        snprintf(b->text, sizeof b->text, "%.0f", v);
    else
        snprintf(b->text, sizeof b->text, "%.6g", v);
    return KV_OK;
}

int kv_budget_parse_list(const char *list, kv_budget_t **out, int *n)
{
    *out = NULL;
    *n = 0;
    char **items;
    int k, rc = kv_spec_split(list, &items, &k);
    if (rc)
        return rc;
    if (k == 0) {
        kv_free(items);
        return kv_error(KV_EINVAL, "empty budget list");
    }
    kv_budget_t *b = kv_calloc((size_t)k, sizeof *b, "budgets");
    if (!b) {
        kv_free(items);
        return KV_ENOMEM;
    }
    for (int i = 0; i < k && rc == KV_OK; i++) {
        rc = parse_one(items[i], &b[i]);
        for (int j = 0; rc == KV_OK && j < i; j++)
            if (!strcmp(b[i].text, b[j].text))
                rc = kv_error(KV_EINVAL, "budget %s listed twice", b[i].text);
    }
    kv_free(items);
    if (rc) {
        kv_free(b);
        return rc;
    }
    *out = b;
    *n = k;
    return KV_OK;
}

int kv_budget_resolve(kv_budget_t *b, const kv_trace_meta_t *m, int n_ctx)
{
    long per_seq_heads = (long)m->n_layers * m->n_kv_heads;
    switch (b->kind) {
    case KV_BUDGET_TOKENS:
        b->tokens = (int)b->value;
        b->total = (long)b->tokens * per_seq_heads;
        break;
    case KV_BUDGET_FRACTION:
        if (b->value * n_ctx < 0.5) /* rounding a fraction of a token up to a whole one would hide a typo */
            return kv_error(KV_ERANGE, "budget %s is less than half a token of the %d context tokens", b->text, n_ctx);
        b->tokens = (int)floor(b->value * n_ctx + 1e-9);
        if (b->tokens < 1)
            b->tokens = 1;
        b->total = (long)b->tokens * per_seq_heads;
        break;
    case KV_BUDGET_RATIO: {
        const double kept = (double)n_ctx * (1.0 - b->value); /* Python: k_len * (1 - compression_ratio) */
        b->tokens = (int)kept;                                /* int() truncates, as C's conversion */
        if (b->tokens < 1)
            b->tokens = 1;
        b->total = (long)b->tokens * per_seq_heads;
        break;
    }
    case KV_BUDGET_SEQUENCE: {
        /* in floating point: a total up to 1e15 over few heads is beyond any int (and beyond any
         * context: capped at the largest token budget, which keeps every token) */
        const double per_head = floor(b->value / (double)per_seq_heads);
        if (per_head < 1)
            return kv_error(KV_ERANGE, "budget %s is less than one token per head (%ld layers x KV heads)", b->text,
                            per_seq_heads);
        b->total = (long)b->value;
        b->tokens = per_head > 1e9 ? 1000000000 : (int)per_head;
        break;
    }
    }
    return KV_OK;
}

double kv_budget_exact(const kv_budget_t *b, int n_ctx)
{
    switch (b->kind) {
    case KV_BUDGET_RATIO: return (double)n_ctx * (1.0 - b->value);
    case KV_BUDGET_FRACTION: return (double)n_ctx * b->value;
    default: return (double)b->tokens;
    }
}

double kv_budget_fraction(const kv_budget_t *b, int n_ctx)
{
    switch (b->kind) {
    case KV_BUDGET_RATIO: return 1.0 - b->value; /* Python: (1 - compression_ratio) */
    case KV_BUDGET_FRACTION: return b->value;
    default: return n_ctx > 0 ? (double)b->tokens / n_ctx : 1.0;
    }
}
