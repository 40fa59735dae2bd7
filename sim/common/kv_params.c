/* kv_params.c: see kv_params.h. */
#include "sim/common/kv_params.h"

#include "sim/common/kv_common.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *skip_ws(const char *s)
{
    while (*s && isspace((unsigned char)*s))
        s++;
    return s;
}

/* Copy [b, e) trimmed into dst; error when it does not fit. */
static int copy_trim(char *dst, size_t len, const char *b, const char *e, const char *what)
{
    while (b < e && isspace((unsigned char)*b))
        b++;
    while (e > b && isspace((unsigned char)e[-1]))
        e--;
    size_t n = (size_t)(e - b);
    if (n >= len)
        return kv_error(KV_EINVAL, "%s too long: '%.*s'", what, (int)n, b);
    memcpy(dst, b, n);
    dst[n] = 0;
    return KV_OK;
}

int kv_spec_split(const char *list, char ***items, int *n_items)
{
    *items = NULL;
    *n_items = 0;
    size_t len = strlen(list);
    int cap = 1, depth = 0;
    for (const char *s = list; *s; s++) {
        if (*s == '(')
            depth++;
        else if (*s == ')')
            depth--;
        else if (*s == ',' && depth == 0)
            cap++;
        if (depth < 0)
            return kv_error(KV_EINVAL, "unbalanced ')' in '%s'", list);
    }
    if (depth != 0)
        return kv_error(KV_EINVAL, "unbalanced '(' in '%s'", list);
    char **out = kv_malloc(sizeof(char *) * (size_t)cap + len + 1, "spec list");
    if (!out)
        return KV_ENOMEM;
    char *buf = (char *)(out + cap);
    int n = 0;
    const char *b = list;
    depth = 0;
    for (const char *s = list;; s++) {
        if (*s == '(')
            depth++;
        else if (*s == ')')
            depth--;
        if ((*s == ',' && depth == 0) || *s == 0) {
            const char *e = s;
            while (b < e && isspace((unsigned char)*b))
                b++;
            while (e > b && isspace((unsigned char)e[-1]))
                e--;
            if (e > b) {
                memcpy(buf, b, (size_t)(e - b));
                buf[e - b] = 0;
                out[n++] = buf;
                buf += (e - b) + 1;
            }
            if (*s == 0)
                break;
            b = s + 1;
        }
    }
    *items = out;
    *n_items = n;
    return KV_OK;
}

int kv_spec_parse(const char *spec, char *name, size_t name_len, kv_params_t *raw)
{
    memset(raw, 0, sizeof *raw);
    const char *s = skip_ws(spec);
    const char *paren = strchr(s, '(');
    const char *end = s + strlen(s);
    while (end > s && isspace((unsigned char)end[-1]))
        end--;
    int rc;
    if (!paren) {
        if ((rc = copy_trim(name, name_len, s, end, "name")) != KV_OK)
            return rc;
    } else {
        if (end[-1] != ')')
            return kv_error(KV_EINVAL, "'%s': expected ')' at the end", spec);
        if ((rc = copy_trim(name, name_len, s, paren, "name")) != KV_OK)
            return rc;
        const char *b = paren + 1, *stop = end - 1;
        int depth = 0;
        for (const char *p = b;; p++) {
            int at_end = (p == stop);
            if (!at_end) {
                if (*p == '(')
                    depth++;
                else if (*p == ')')
                    depth--;
            }
            if (at_end || (*p == ',' && depth == 0)) {
                const char *eq = NULL;
                for (const char *q = b; q < p; q++)
                    if (*q == '=') {
                        eq = q;
                        break;
                    }
                const char *tb = b, *te = p;
                while (tb < te && isspace((unsigned char)*tb))
                    tb++;
                if (tb < te) {
                    if (!eq)
                        return kv_error(KV_EINVAL, "'%s': expected key=value, got '%.*s'", spec, (int)(te - tb), tb);
                    if (raw->n >= KV_PARAMS_MAX)
                        return kv_error(KV_EINVAL, "'%s': too many parameters", spec);
                    if ((rc = copy_trim(raw->key[raw->n], KV_PARAM_KEY_LEN, b, eq, "key")) != KV_OK ||
                        (rc = copy_trim(raw->val[raw->n], KV_PARAM_VAL_LEN, eq + 1, p, "value")) != KV_OK)
                        return rc;
                    if (!raw->key[raw->n][0])
                        return kv_error(KV_EINVAL, "'%s': empty key", spec);
                    for (int i = 0; i < raw->n; i++)
                        if (!strcmp(raw->key[i], raw->key[raw->n]))
                            return kv_error(KV_EINVAL, "'%s': key '%s' given twice", spec, raw->key[i]);
                    raw->n++;
                }
                if (at_end)
                    break;
                b = p + 1;
            }
        }
    }
    if (!name[0])
        return kv_error(KV_EINVAL, "'%s': empty name", spec);
    for (const char *c = name; *c; c++)
        if (!(isalnum((unsigned char)*c) || *c == '_' || *c == '-'))
            return kv_error(KV_EINVAL, "'%s': bad character '%c' in name", spec, *c);
    return KV_OK;
}

static int find(const kv_params_t *p, const char *key)
{
    for (int i = 0; i < p->n; i++)
        if (!strcmp(p->key[i], key))
            return i;
    return -1;
}

int kv_params_has(const kv_params_t *p, const char *key)
{
    return find(p, key) >= 0;
}

int kv_params_set(kv_params_t *p, const char *key, const char *val)
{
    int i = find(p, key);
    if (i < 0) {
        if (p->n >= KV_PARAMS_MAX)
            return kv_error(KV_EINVAL, "too many parameters");
        i = p->n++;
        snprintf(p->key[i], KV_PARAM_KEY_LEN, "%s", key);
    }
    if (strlen(val) >= KV_PARAM_VAL_LEN)
        return kv_error(KV_EINVAL, "value of '%s' too long", key);
    snprintf(p->val[i], KV_PARAM_VAL_LEN, "%s", val);
    return KV_OK;
}

static int choice_ok(const char *choices, const char *v)
{
    size_t n = strlen(v);
    const char *c = choices;
    while (*c) {
        const char *bar = strchr(c, '|');
        size_t m = bar ? (size_t)(bar - c) : strlen(c);
        if (m == n && !strncmp(c, v, n))
            return 1;
        if (!bar)
            break;
        c = bar + 1;
    }
    return 0;
}

int kv_is_decimal(const char *s, int sign, int percent)
{
    const char *p = s;
    if (sign && (*p == '-' || *p == '+'))
        p++;
    const char *d0 = p;
    while (*p >= '0' && *p <= '9')
        p++;
    int digits = p > d0;
    if (*p == '.') {
        const char *q = ++p;
        while (*p >= '0' && *p <= '9')
            p++;
        digits |= p > q;
    }
    if (digits && (*p == 'e' || *p == 'E')) {
        p++;
        if (*p == '+' || *p == '-')
            p++;
        const char *q = p;
        while (*p >= '0' && *p <= '9')
            p++;
        if (p == q)
            return 0;
    }
    return digits && (*p == 0 || (percent && *p == '%' && p[1] == 0));
}

/* Normalise one value in place according to its definition. */
static int normalise(const kv_param_def_t *d, char *val, const char *owner)
{
    char *end;
    switch (d->type) {
    case KV_PARAM_INT: {
        errno = 0;
        double x = strtod(val, &end);
        if (!kv_is_decimal(val, 1, 0) || end == val || *skip_ws(end) || errno || x != floor(x) || fabs(x) > 9e15)
            return kv_error(KV_EINVAL, "%s: %s=%s is not an integer", owner, d->key, val);
        if (d->min <= d->max && (x < d->min || x > d->max))
            return kv_error(KV_ERANGE, "%s: %s=%s out of range [%g, %g]", owner, d->key, val, d->min, d->max);
        snprintf(val, KV_PARAM_VAL_LEN, "%lld", (long long)x);
        return KV_OK;
    }
    case KV_PARAM_FLOAT: {
        errno = 0;
        double x = strtod(val, &end);
        if (!kv_is_decimal(val, 1, 0) || end == val || *skip_ws(end) || errno || !isfinite(x))
            return kv_error(KV_EINVAL, "%s: %s=%s is not a decimal number", owner, d->key, val);
        if (d->min <= d->max && (x < d->min || x > d->max))
            return kv_error(KV_ERANGE, "%s: %s=%s out of range [%g, %g]", owner, d->key, val, d->min, d->max);
        snprintf(val, KV_PARAM_VAL_LEN, "%.9g", x);
        return KV_OK;
    }
    case KV_PARAM_BOOL:
        if (!strcmp(val, "1") || !strcmp(val, "true") || !strcmp(val, "yes") || !strcmp(val, "on"))
            strcpy(val, "1");
        else if (!strcmp(val, "0") || !strcmp(val, "false") || !strcmp(val, "no") || !strcmp(val, "off"))
            strcpy(val, "0");
        else
            return kv_error(KV_EINVAL, "%s: %s=%s is not a boolean (use 1/0, true/false)", owner, d->key, val);
        return KV_OK;
    case KV_PARAM_ENUM:
        if (!choice_ok(d->choices, val))
            return kv_error(KV_EINVAL, "%s: %s=%s is not one of %s", owner, d->key, val, d->choices);
        return KV_OK;
    case KV_PARAM_STRING: return KV_OK;
    }
    return kv_error(KV_EINTERNAL, "bad parameter type");
}

int kv_params_resolve(const kv_param_def_t *defs, int n_defs, const kv_params_t *given, kv_params_t *out,
                      const char *owner)
{
    memset(out, 0, sizeof *out);
    if (n_defs > KV_PARAMS_MAX)
        return kv_error(KV_EINTERNAL, "%s: schema too large", owner);
    for (int i = 0; given && i < given->n; i++) {
        int ok = 0;
        for (int j = 0; j < n_defs; j++)
            ok |= !strcmp(defs[j].key, given->key[i]);
        if (!ok) {
            char valid[512] = "";
            size_t used = 0;
            for (int j = 0; j < n_defs && used < sizeof valid; j++)
                used += (size_t)snprintf(valid + used, sizeof valid - used, "%s%s", j ? ", " : "", defs[j].key);
            return kv_error(KV_EINVAL, "%s: unknown parameter '%s' (valid: %s)", owner, given->key[i],
                            n_defs ? valid : "none");
        }
    }
    for (int j = 0; j < n_defs; j++) {
        snprintf(out->key[j], KV_PARAM_KEY_LEN, "%s", defs[j].key);
        int g = given ? find(given, defs[j].key) : -1;
        snprintf(out->val[j], KV_PARAM_VAL_LEN, "%s", g >= 0 ? given->val[g] : defs[j].def);
        int rc = normalise(&defs[j], out->val[j], owner);
        if (rc != KV_OK)
            return rc;
    }
    out->n = n_defs;
    return KV_OK;
}

static const char *get(const kv_params_t *p, const char *key)
{
    int i = find(p, key);
    if (i < 0) {
        fprintf(stderr, "kvsim: internal error: parameter '%s' is not in the schema\n", key);
        abort(); /* programmer error */
    }
    return p->val[i];
}

long kv_params_int(const kv_params_t *p, const char *key)
{
    return strtol(get(p, key), NULL, 10);
}
double kv_params_float(const kv_params_t *p, const char *key)
{
    return strtod(get(p, key), NULL);
}
int kv_params_bool(const kv_params_t *p, const char *key)
{
    return get(p, key)[0] == '1';
}
const char *kv_params_str(const kv_params_t *p, const char *key)
{
    return get(p, key);
}

int kv_params_label(const char *name, const kv_params_t *r, char *buf, size_t len)
{
    size_t used = (size_t)snprintf(buf, len, "%s", name);
    if (r->n > 0) {
        for (int i = 0; i < r->n && used < len; i++)
            used += (size_t)snprintf(buf + used, len - used, "%c%s=%s", i ? ',' : '(', r->key[i], r->val[i]);
        if (used < len)
            used += (size_t)snprintf(buf + used, len - used, ")");
    }
    if (used >= len)
        return kv_error(KV_ERANGE, "label of %s too long", name);
    return KV_OK;
}

void kv_params_describe(const kv_param_def_t *defs, int n_defs, char *buf, size_t len)
{
    size_t used = 0;
    buf[0] = 0;
    for (int j = 0; j < n_defs && used < len; j++) {
        const kv_param_def_t *d = &defs[j];
        char range[96] = "";
        static const char *tn[] = {"int", "float", "bool", "enum", "string"};
        if ((d->type == KV_PARAM_INT || d->type == KV_PARAM_FLOAT) && d->min <= d->max)
            snprintf(range, sizeof range, ", %.15g..%.15g", d->min, d->max);
        else if (d->type == KV_PARAM_ENUM)
            snprintf(range, sizeof range, ", %s", d->choices);
        used += (size_t)snprintf(buf + used, len - used, "    %-12s = %-8s (%s%s) %s\n", d->key, d->def, tn[d->type],
                                 range, d->help ? d->help : "");
    }
}
