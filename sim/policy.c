/*
 * policy.c: configuring policies from "name(k=v,...)" specs against their schema (plus the common
 * granularity keys), canonical labels, and policy lists ("all").
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"

#include <stdio.h>
#include <string.h>

const kv_param_def_t kv_policy_common_params[] = {
    {"gran", KV_PARAM_ENUM, "kv", 0, -1, "kv|query",
     "cache per KV head (real grouped-query memory) or per query head (reference repos' layout, G x memory)"},
    {"agg", KV_PARAM_ENUM, "mean", 0, -1, "mean|max|sum", "how per-query-head scores combine over a KV group"},
};
const int kv_policy_n_common_params = 2;

const kv_policy_desc_t *kv_policy_find(const char *name)
{
    for (int i = 0; i < kv_policy_count(); i++)
        if (!strcmp(kv_policy_desc_at(i)->name, name))
            return kv_policy_desc_at(i);
    return NULL;
}

const char *kv_policy_names(void)
{
    static char buf[1024];
    if (!buf[0]) {
        size_t used = 0;
        for (int i = 0; i < kv_policy_count() && used < sizeof buf; i++)
            used += (size_t)snprintf(buf + used, sizeof buf - used, "%s%s", i ? ", " : "", kv_policy_desc_at(i)->name);
    }
    return buf;
}

int kv_policy_create(const char *spec, kv_policy_t **out)
{
    *out = NULL;
    char name[64];
    kv_params_t raw;
    int rc = kv_spec_parse(spec, name, sizeof name, &raw);
    if (rc)
        return rc;
    const kv_policy_desc_t *d = kv_policy_find(name);
    if (!d)
        return kv_error(KV_EINVAL, "unknown policy '%s' (valid: %s)", name, kv_policy_names());
    kv_param_def_t defs[KV_PARAMS_MAX];
    int n = 0;
    for (int i = 0; i < d->n_params && n < KV_PARAMS_MAX; i++)
        defs[n++] = d->params[i];
    for (int i = 0; i < kv_policy_n_common_params && n < KV_PARAMS_MAX; i++)
        defs[n++] = kv_policy_common_params[i];
    kv_policy_t *p = kv_calloc(1, sizeof *p, "policy");
    if (!p)
        return KV_ENOMEM;
    p->desc = d;
    p->flags = d->flags;
    char owner[96];
    snprintf(owner, sizeof owner, "policy %s", name);
    if ((rc = kv_params_resolve(defs, n, &raw, &p->params, owner)))
        goto fail;
    p->gran = strcmp(kv_params_str(&p->params, "gran"), "query") ? KV_GRAN_KV : KV_GRAN_QUERY;
    const char *agg = kv_params_str(&p->params, "agg");
    p->agg = !strcmp(agg, "max") ? KV_AGG_MAX : !strcmp(agg, "sum") ? KV_AGG_SUM : KV_AGG_MEAN;
    if ((rc = kv_params_label(name, &p->params, p->label, sizeof p->label)))
        goto fail;
    if (d->init && (rc = d->init(p)) != KV_OK) {
        kv_error_context(rc, "%s", owner);
        goto fail;
    }
    *out = p;
    return KV_OK;
fail:
    kv_policy_free(p);
    return rc;
}

void kv_policy_free(kv_policy_t *p)
{
    if (!p)
        return;
    if (p->desc && p->desc->fini)
        p->desc->fini(p);
    kv_policy_free(p->inner);
    kv_free(p->qscores);
    kv_free(p->sscores);
    kv_free(p->order);
    kv_free(p);
}

int kv_policy_create_list(const char *list, kv_policy_t ***out, int *n_out)
{
    *out = NULL;
    *n_out = 0;
    char **items = NULL;
    int n_items = 0, rc;
    if ((rc = kv_spec_split(list, &items, &n_items)))
        return rc;
    int cap = 0;
    for (int i = 0; i < n_items; i++)
        cap += !strcmp(items[i], "all") ? kv_policy_count() : 1;
    kv_policy_t **ps = kv_calloc((size_t)(cap ? cap : 1), sizeof *ps, "policy list");
    int n = 0;
    if (!ps) {
        kv_free(items);
        return KV_ENOMEM;
    }
    for (int i = 0; i < n_items && rc == KV_OK; i++) {
        if (!strcmp(items[i], "all")) {
            for (int j = 0; j < kv_policy_count() && rc == KV_OK; j++)
                rc = kv_policy_create(kv_policy_desc_at(j)->name, &ps[n++]);
        } else {
            rc = kv_policy_create(items[i], &ps[n++]);
        }
    }
    kv_free(items);
    if (rc == KV_OK && n == 0)
        rc = kv_error(KV_EINVAL, "empty policy list");
    /* the same label twice would produce duplicate result rows */
    for (int i = 0; rc == KV_OK && i < n; i++)
        for (int j = 0; j < i; j++)
            if (!strcmp(ps[i]->label, ps[j]->label)) {
                rc = kv_error(KV_EINVAL, "policy %s listed twice", ps[i]->label);
                break;
            }
    if (rc != KV_OK) {
        for (int i = 0; i < n; i++)
            kv_policy_free(ps[i]);
        kv_free(ps);
        return rc;
    }
    *out = ps;
    *n_out = n;
    return KV_OK;
}

/* See kv_policy.h. */
int kv_policy_kept_window(const kv_policy_t *p)
{
    const char *name = p->desc->name;
    if (!strcmp(name, "kvcompress"))
        return (int)kv_params_int(&p->params, "protect");
    if (!strcmp(name, "adakv") || !strcmp(name, "chunkkv")) {
        kv_policy_t *in = NULL;
        int w = 0;
        if (kv_policy_create(kv_params_str(&p->params, "inner"), &in) == KV_OK)
            w = kv_policy_kept_window(in);
        kv_policy_free(in);
        return w;
    }
    if (!strcmp(name, "snapkv") || !strcmp(name, "pyramidkv") || (!strcmp(name, "h2o") && !(p->flags & KV_POL_DECODE)))
        return (int)kv_params_int(&p->params, "window");
    return 0;
}
