/*
 * closed_internal.h: what kvsim eval (sim/closed_run.c) and kvsim niah (sim/niah.c) share: the model,
 * tokenizer, backend and forward pass of one run, the prompt's tokenization (capture's own, so that
 * a trace and an evaluation of one prompt see the same tokens) and the results' provenance lines.
 * Private to sim/.
 */
#ifndef KV_CLOSED_INTERNAL_H
#define KV_CLOSED_INTERNAL_H

#include "sim/closed.h"
#include "sim/otable.h"
#include "traces/capture/kv_model.h"
#include "traces/capture/kv_tokenizer.h"

typedef struct {
    kv_model_t *m;
    kv_tokenizer_t *tok; /* NULL when token ids were given and no tokenizer exists */
    kv_backend_t *be;
    kv_fwd_t *f; /* made by the caller (its size depends on the prompts) */
    char tok_path[1100];
    char model_sha[65];
} kv_closed_session_t;

/* Load the model, its tokenizer (-z or the checkpoint's own; required when need_tok) and open the
 * backend. */
int kv_closed_session_open(const char *model, const char *tokenizer, int need_tok, const char *backend, int threads,
                           kv_closed_session_t *s);
void kv_closed_session_free(kv_closed_session_t *s);
/* The prompt's tokens (and segment starts) exactly as kvsim capture makes them: token ids as given
 * (checked against the vocabulary), or the text (wrapped in the chat template with chat) through
 * kv_capture_tokenize. */
int kv_closed_prompt(const kv_closed_session_t *s, const char *text, const int32_t *ids, int n_ids, int chat,
                     const char *system, const char *segments, int32_t **tokens, int *n, int32_t **segs, int *n_segs);
/* tool, git, date, command, model, model_sha256, tokenizer, backend. */
int kv_closed_prov(kv_otable_t *t, const char *command, const kv_closed_session_t *s, const char *model_path);

#endif
