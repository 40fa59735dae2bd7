/*
 * kv_params.h: "name(k=v,k=v)" specifications with a typed schema.
 *
 * Policies (and budget lists, backends, ...) are configured on the command line as
 * `snapkv(window=32,pool=max)`. A schema lists every key with its type, default and range.
 * Resolution applies the defaults first, then the given keys; an unknown key is a hard error whose
 * message lists the valid keys. The canonical label prints every key in schema order with its
 * normalised value, and parsing a label gives back the same configuration, so any result row can
 * be re-run by pasting its label.
 *
 * Values may themselves contain parentheses and commas (`adakv(inner=snapkv(window=8))`): a value
 * runs to the next comma at the same nesting depth.
 */
#ifndef KV_PARAMS_H
#define KV_PARAMS_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    KV_PARAM_INT,
    KV_PARAM_FLOAT,
    KV_PARAM_BOOL,   /* true/false, 1/0, yes/no, on/off; printed as 1/0 */
    KV_PARAM_ENUM,   /* one of `choices` ("max|avg") */
    KV_PARAM_STRING, /* free text (for example a nested policy spec) */
} kv_param_type_t;

typedef struct {
    const char *key;
    kv_param_type_t type;
    const char *def;     /* default value as text */
    double min, max;     /* inclusive range for INT and FLOAT (ignored when min > max) */
    const char *choices; /* ENUM: values separated by '|' */
    const char *help;    /* one line */
} kv_param_def_t;

#define KV_PARAMS_MAX 32
#define KV_PARAM_KEY_LEN 32
#define KV_PARAM_VAL_LEN 256

typedef struct {
    int n;
    char key[KV_PARAMS_MAX][KV_PARAM_KEY_LEN];
    char val[KV_PARAMS_MAX][KV_PARAM_VAL_LEN];
} kv_params_t;

/* Split a comma list at nesting depth 0 ("a,b(x=1,y=2)" -> "a", "b(x=1,y=2)"). Items are trimmed.
 * *items is one allocation holding the pointers and the strings: free it with kv_free. */
int kv_spec_split(const char *list, char ***items, int *n_items);

/* Parse "name" or "name(k=v,...)" into the name and the raw key/value pairs (no schema). */
int kv_spec_parse(const char *spec, char *name, size_t name_len, kv_params_t *raw);

/* Defaults of `defs`, then `given` on top; validates keys, types and ranges and normalises values.
 * `owner` names the thing configured, for messages ("policy snapkv"). */
int kv_params_resolve(const kv_param_def_t *defs, int n_defs, const kv_params_t *given, kv_params_t *out,
                      const char *owner);

/* Typed getters on a resolved set (the key must be in the schema: asking for another is a bug). */
/* 1 when s is a plain decimal number: an optional sign (when `sign`), digits with an optional
 * fraction and exponent, and an optional trailing '%' (when `percent`), nothing else: strtod alone
 * would also take hexadecimal ("0x40"), "inf", "nan" and leading spaces. */
int kv_is_decimal(const char *s, int sign, int percent);
long kv_params_int(const kv_params_t *p, const char *key);
double kv_params_float(const kv_params_t *p, const char *key);
int kv_params_bool(const kv_params_t *p, const char *key);
const char *kv_params_str(const kv_params_t *p, const char *key);
/* Set or replace a raw value (before resolve). */
int kv_params_set(kv_params_t *p, const char *key, const char *val);
/* 1 if the key is present. */
int kv_params_has(const kv_params_t *p, const char *key);

/* Canonical label: name(k=v,...) over all keys of the resolved set, in schema order. */
int kv_params_label(const char *name, const kv_params_t *resolved, char *buf, size_t len);

/* "key=default (type[, range][, choices]) help" lines for --help and `kvsim policies`. */
void kv_params_describe(const kv_param_def_t *defs, int n_defs, char *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif
