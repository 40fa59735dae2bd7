/*
 * tok_chat.c: kv_tokenizer_chat, a plain prompt wrapped in the model's chat template as transformers'
 * apply_chat_template(messages, add_generation_prompt=True, tokenize=False) renders it, for the two
 * styles Llama-family models use. kvsim runs no Jinja: a template is recognised by its markers and
 * the strings it would emit are read from its literals (quoted strings in {{ }} / {% %} tags, and
 * text between tags with transformers' trim_blocks/lstrip_blocks and the -/+ whitespace controls):
 *
 * ChatML (<|im_start|> and <|im_end|>: SmolLM2, Qwen2): [system block] "<|im_start|>user\n" USER
 * "<|im_end|>\n" GENERATION. The system block is "<|im_start|>system\n" SYSTEM "<|im_end|>\n" when a
 * system message is given, else the template's own default (a literal that starts with
 * "<|im_start|>system\n" and holds "<|im_end|>", e.g. SmolLM2's "You are a helpful AI assistant named
 * SmolLM, trained by Hugging Face"), else nothing. GENERATION is the template's last literal that
 * starts with "<|im_start|>assistant" ("<|im_start|>assistant\n"). Contents are not trimmed.
 *
 * Llama 3 (<|start_header_id|>, <|end_header_id|>, <|eot_id|>): BOS text (the bos token's text, when
 * the template uses bos_token), then for each message "<|start_header_id|>" ROLE "<|end_header_id|>
 * \n\n" CONTENT|trim "<|eot_id|>", then "<|start_header_id|>assistant<|end_header_id|>\n\n". 3.0
 * has a system message only when one is given. 3.1/3.2 templates ("Cutting Knowledge Date") always
 * open with the system header "Cutting Knowledge Date: <date>\n" "Today Date: " DATE "\n\n" followed
 * by the (trimmed, possibly empty) system message; DATE is the template's default date_string ("26
 * Jul 2024" in 3.1), or today's date ("%d %b %Y", local time, as transformers' strftime_now) when the
 * template calls strftime_now. trim is Python's str.strip().
 *
 * Anything else is refused, quoting the template's start: kvsim cannot tell what it would render.
 */
#include "sim/common/kv_common.h"
#include "traces/capture/kv_tokenizer_internal.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

typedef struct {
    char *s;
    size_t n, cap;
} buf_t;

static int put(buf_t *b, const char *s, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1)
            cap *= 2;
        char *p = kv_realloc(b->s, cap, "chat text");
        if (!p)
            return KV_ENOMEM;
        b->s = p;
        b->cap = cap;
    }
    memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = 0;
    return KV_OK;
}

static int puts_(buf_t *b, const char *s)
{
    return put(b, s, strlen(s));
}

/* ---- the template's literals ---- */

typedef struct {
    char **s;
    int n;
} lits_t;

static void lits_free(lits_t *l)
{
    for (int i = 0; i < l->n; i++)
        kv_free(l->s[i]);
    kv_free(l->s);
}

static int lits_add(lits_t *l, const char *s, size_t n)
{
    char **p = kv_realloc(l->s, sizeof *p * (size_t)(l->n + 1), "template literals");
    if (!p)
        return KV_ENOMEM;
    l->s = p;
    if (!(p[l->n] = kv_malloc(n + 1, "template literal")))
        return KV_ENOMEM;
    memcpy(p[l->n], s, n);
    p[l->n][n] = 0;
    l->n++;
    return KV_OK;
}

/* A quoted Jinja string at t[*i] (the quote) into the literals, escapes resolved; *i past it. */
static int quoted(const char *t, size_t *i, lits_t *l)
{
    char q = t[*i];
    size_t j = *i + 1, n = 0;
    char *s = kv_malloc(strlen(t + j) + 1, "template literal");
    if (!s)
        return KV_ENOMEM;
    for (; t[j] && t[j] != q; j++) {
        if (t[j] == '\\' && t[j + 1]) {
            j++;
            s[n++] = t[j] == 'n' ? '\n' : t[j] == 't' ? '\t' : t[j] == 'r' ? '\r' : t[j];
        } else {
            s[n++] = t[j];
        }
    }
    *i = t[j] ? j + 1 : j;
    int rc = lits_add(l, s, n);
    kv_free(s);
    return rc;
}

static int is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Every literal the template can emit: quoted strings inside tags, raw text between tags (with
 * trim_blocks: the newline after a %} goes; lstrip_blocks: spaces before a {% on its line go; "-"
 * in a tag strips the whitespace on that side). Comments {# #} emit nothing. */
static int literals(const char *t, lits_t *l)
{
    size_t i = 0, len = strlen(t);
    int rc = KV_OK, strip_next = 0, after_block = 0;
    while (i < len && rc == KV_OK) {
        const char *open = strstr(t + i, "{");
        size_t j = i;
        while (open && open[1] != '{' && open[1] != '%' && open[1] != '#')
            open = strstr(open + 1, "{");
        size_t end = open ? (size_t)(open - t) : len;
        /* raw text t[i..end) */
        size_t a = i, b = end;
        if (strip_next)
            while (a < b && is_ws(t[a]))
                a++;
        else if (after_block && a < b && t[a] == '\n')
            a++;
        if (open && (open[2] == '-'))
            while (b > a && is_ws(t[b - 1]))
                b--;
        else if (open && open[1] == '%') {
            size_t k = b;
            while (k > a && (t[k - 1] == ' ' || t[k - 1] == '\t'))
                k--;
            if (k == a ? (a == 0 || t[a - 1] == '\n') : t[k - 1] == '\n')
                b = k;
        }
        if (b > a)
            rc = lits_add(l, t + a, b - a);
        if (!open || rc)
            break;
        char kind = open[1];
        const char *close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
        j = end + 2;
        while (j < len && strncmp(t + j, close, 2) && rc == KV_OK) {
            if (kind != '#' && (t[j] == '\'' || t[j] == '"'))
                rc = quoted(t, &j, l);
            else
                j++;
        }
        strip_next = j > 0 && j < len && t[j - 1] == '-';
        after_block = kind != '{';
        i = j + 2;
    }
    return rc;
}

/* ---- helpers ---- */

/* Python's str.strip(): the whitespace code points str.isspace() knows. */
static size_t space_at(const unsigned char *s, size_t n)
{
    if (n >= 1 && ((s[0] >= 0x09 && s[0] <= 0x0d) || (s[0] >= 0x1c && s[0] <= 0x20)))
        return 1;
    if (n >= 2 && s[0] == 0xc2 && (s[1] == 0x85 || s[1] == 0xa0))
        return 2;
    if (n >= 3 && s[0] == 0xe1 && s[1] == 0x9a && s[2] == 0x80) /* U+1680 */
        return 3;
    if (n >= 3 && s[0] == 0xe2 && s[1] == 0x80 && (s[2] <= 0x8a || s[2] == 0xa8 || s[2] == 0xa9 || s[2] == 0xaf))
        return 3;                                               /* U+2000..200A, 2028, 2029, 202F */
    if (n >= 3 && s[0] == 0xe2 && s[1] == 0x81 && s[2] == 0x9f) /* U+205F */
        return 3;
    if (n >= 3 && s[0] == 0xe3 && s[1] == 0x80 && s[2] == 0x80) /* U+3000 */
        return 3;
    return 0;
}

static int put_trimmed(buf_t *b, const char *s)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t a = 0, e = strlen(s), k, last;
    while (a < e && (k = space_at(u + a, e - a)))
        a += k;
    last = a; /* the end of the last byte that is not part of a space */
    for (size_t p = a; p < e;) {
        if ((k = space_at(u + p, e - p)))
            p += k;
        else
            last = ++p;
    }
    return put(b, s + a, last - a);
}

static const char *find_lit(const lits_t *l, const char *prefix, const char *contains, int last)
{
    const char *found = NULL;
    for (int i = 0; i < l->n; i++)
        if (!strncmp(l->s[i], prefix, strlen(prefix)) && (!contains || strstr(l->s[i], contains))) {
            found = l->s[i];
            if (!last)
                break;
        }
    return found;
}

static int refuse(const kv_tokenizer_t *t, const char *why)
{
    char q[256];
    size_t k = 0;
    for (const char *p = t->chat_template; *p && k < 60 && k + 4 < sizeof q; p++)
        if (*p == '\n')
            q[k++] = '\\', q[k++] = 'n';
        else
            q[k++] = *p;
    q[k] = 0;
    return kv_error(KV_EINVAL, "%s: chat template \"%s%s\" %s", t->path, q, strlen(t->chat_template) > 60 ? "..." : "",
                    why);
}

/* ---- the two styles ---- */

static int chatml(const kv_tokenizer_t *t, const lits_t *l, const char *system, const char *user, buf_t *b)
{
    const char *gen = find_lit(l, "<|im_start|>assistant", NULL, 1);
    if (!gen)
        return refuse(t, "has ChatML markers but no \"<|im_start|>assistant\" generation prompt kvsim can read");
    const char *def = find_lit(l, "<|im_start|>system\n", "<|im_end|>", 0);
    int rc = KV_OK;
    if (system) {
        if ((rc = puts_(b, "<|im_start|>system\n")) || (rc = puts_(b, system)) || (rc = puts_(b, "<|im_end|>\n")))
            return rc;
    } else if (def) {
        const char *e = strstr(def, "<|im_end|>") + strlen("<|im_end|>");
        if ((rc = put(b, def, (size_t)(e - def))) || (rc = puts_(b, "\n")))
            return rc;
    }
    if ((rc = puts_(b, "<|im_start|>user\n")) || (rc = puts_(b, user)) || (rc = puts_(b, "<|im_end|>\n")))
        return rc;
    return puts_(b, gen);
}

static int llama3(const kv_tokenizer_t *t, const lits_t *l, const char *system, const char *user, buf_t *b)
{
    const char *tmpl = t->chat_template;
    int rc = KV_OK;
    if (strstr(tmpl, "bos_token") && t->bos_id >= 0 && (rc = put(b, t->pieces[t->bos_id], (size_t)t->lens[t->bos_id])))
        return rc;
    if (strstr(tmpl, "Cutting Knowledge Date")) {
        const char *know = find_lit(l, "Cutting Knowledge Date:", NULL, 0),
                   *today = find_lit(l, "Today Date: ", NULL, 0);
        char date[64] = "";
        if (strstr(tmpl, "strftime_now")) {
            time_t now = time(NULL);
            struct tm tm;
            localtime_r(&now, &tm);
            strftime(date, sizeof date, "%d %b %Y", &tm);
        } else {
            const char *d = strstr(tmpl, "set date_string = ");
            const char *q = d ? d + strlen("set date_string = ") : NULL;
            const char *qe = q && (*q == '"' || *q == '\'') ? strchr(q + 1, *q) : NULL;
            if (qe && qe - q - 1 < (long)sizeof date)
                snprintf(date, sizeof date, "%.*s", (int)(qe - q - 1), q + 1);
        }
        if (!know || !today || !date[0])
            return refuse(t, "has a Llama 3.1 system header whose knowledge date or date_string kvsim cannot read");
        if ((rc = puts_(b, "<|start_header_id|>system<|end_header_id|>\n\n")) || (rc = puts_(b, know)) ||
            (rc = puts_(b, today)) || (rc = puts_(b, date)) || (rc = puts_(b, "\n\n")) ||
            (rc = put_trimmed(b, system ? system : "")) || (rc = puts_(b, "<|eot_id|>")))
            return rc;
    } else if (system) {
        if ((rc = puts_(b, "<|start_header_id|>system<|end_header_id|>\n\n")) || (rc = put_trimmed(b, system)) ||
            (rc = puts_(b, "<|eot_id|>")))
            return rc;
    }
    if ((rc = puts_(b, "<|start_header_id|>user<|end_header_id|>\n\n")) || (rc = put_trimmed(b, user)) ||
        (rc = puts_(b, "<|eot_id|>")))
        return rc;
    return puts_(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

int kv_tokenizer_chat(const kv_tokenizer_t *t, const char *system, const char *user, char **out)
{
    *out = NULL;
    const char *tmpl = t->chat_template;
    if (!tmpl)
        return kv_error(KV_EINVAL, "%s: the tokenizer has no chat template", t->path);
    lits_t l = {0};
    buf_t b = {0};
    int rc = literals(tmpl, &l);
    if (rc == KV_OK) {
        if (strstr(tmpl, "<|im_start|>") && strstr(tmpl, "<|im_end|>"))
            rc = chatml(t, &l, system, user, &b);
        else if (strstr(tmpl, "<|start_header_id|>") && strstr(tmpl, "<|end_header_id|>") && strstr(tmpl, "<|eot_id|>"))
            rc = llama3(t, &l, system, user, &b);
        else
            rc = refuse(t, "is neither ChatML (<|im_start|>) nor Llama 3 (<|start_header_id|>); kvsim renders only "
                           "those");
    }
    lits_free(&l);
    if (rc == KV_OK && !b.s)
        rc = put(&b, "", 0);
    if (rc) {
        kv_free(b.s);
        return rc;
    }
    *out = b.s;
    return KV_OK;
}
