/*
 * policy.c: configuring policies from "name(k=v,...)" specs against their schema (plus the common
 * granularity keys), presets ("name@preset(k=v,...)": the descriptor's named parameter set, the
 * given keys on top), canonical labels, and policy lists ("all"). Nothing here knows a policy by
 * name: whatever differs between policies is in their descriptors.
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
const int kv_policy_n_common_params = (int)KV_ARRAY_LEN(kv_policy_common_params);

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

/* Names of d's presets, for messages. */
static void preset_names(const kv_policy_desc_t *d, char *buf, size_t len)
{
    size_t used = 0;
    buf[0] = 0;
    for (int i = 0; i < d->n_presets && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, "%s%s@%s", i ? ", " : "", d->name, d->presets[i].name);
    if (!d->n_presets)
        snprintf(buf, len, "none");
}

int kv_policy_spec_expand(const char *spec, const kv_policy_desc_t **desc, kv_params_t *raw, kv_params_t *given)
{
    *desc = NULL;
    /* "name@preset(...)": the preset word sits between '@' and the parameters */
    char base[2 * KV_PARAM_VAL_LEN + 64], preset[64] = "";
    const char *paren = strchr(spec, '('), *at = strchr(spec, '@');
    if (at && (!paren || at < paren)) {
        const char *pe = paren ? paren : spec + strlen(spec);
        while (pe > at + 1 && pe[-1] == ' ')
            pe--;
        if ((size_t)(pe - at - 1) >= sizeof preset || (size_t)(at - spec) + strlen(pe) >= sizeof base)
            return kv_error(KV_EINVAL, "'%s': policy spec too long", spec);
        snprintf(preset, sizeof preset, "%.*s", (int)(pe - at - 1), at + 1);
        snprintf(base, sizeof base, "%.*s%s", (int)(at - spec), spec, paren ? paren : "");
    } else if (strlen(spec) >= sizeof base) {
        return kv_error(KV_EINVAL, "'%s': policy spec too long", spec);
    } else {
        snprintf(base, sizeof base, "%s", spec);
    }
    char name[64];
    int rc = kv_spec_parse(base, name, sizeof name, raw);
    if (rc)
        return rc;
    const kv_policy_desc_t *d = kv_policy_find(name);
    if (!d)
        return kv_error(KV_EINVAL, "unknown policy '%s' (valid: %s)", name, kv_policy_names());
    if (given)
        *given = *raw;
    if (at && (!paren || at < paren)) {
        const kv_preset_t *ps = NULL;
        for (int i = 0; i < d->n_presets; i++)
            if (!strcmp(d->presets[i].name, preset))
                ps = &d->presets[i];
        if (!ps) {
            char names[512];
            preset_names(d, names, sizeof names);
            return kv_error(KV_EINVAL, "policy %s has no preset '%s' (presets: %s)", name, preset, names);
        }
        char pspec[2 * KV_PARAM_VAL_LEN + 64];
        kv_params_t pr;
        snprintf(pspec, sizeof pspec, "%s(%s)", name, ps->params);
        if ((rc = kv_spec_parse(pspec, name, sizeof name, &pr)))
            return kv_error_context(rc, "preset %s@%s", d->name, ps->name);
        for (int i = 0; i < pr.n; i++) /* the given keys win */
            if (!kv_params_has(raw, pr.key[i]) && (rc = kv_params_set(raw, pr.key[i], pr.val[i])))
                return rc;
    }
    *desc = d;
    return KV_OK;
}

int kv_policy_create(const char *spec, kv_policy_t **out)
{
    *out = NULL;
    kv_params_t raw;
    const kv_policy_desc_t *d;
    int rc = kv_policy_spec_expand(spec, &d, &raw, NULL);
    if (rc)
        return rc;
    const char *name = d->name;
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
    return p->desc->kept_window ? p->desc->kept_window(p) : 0;
}

int kv_policy_budget_slack(const kv_policy_t *p, int n_ctx, int B)
{
    return p->desc->budget_slack ? p->desc->budget_slack(p, n_ctx, B) : 0;
}
