/*
 * trace_chunk_fixture.h: the trace shape the direct chunk I/O tests (test_trace_read.c,
 * test_trace_write.c) write and read: T = 200 tokens in chunks of 64 (64, 64, 64 and an edge chunk
 * of 8); W_O has 100 rows in chunks of 64 (an edge chunk of 36 rows); pooled 8 x 8 per head.
 */
#ifndef KV_TRACE_CHUNK_FIXTURE_H
#define KV_TRACE_CHUNK_FIXTURE_H

#include "traces/kv_trace.h"

#include <stdio.h>
#include <string.h>

#define T_TOK 200
#define CHUNK_T 64

static inline void meta_for(kv_trace_meta_t *m)
{
    memset(m, 0, sizeof *m);
    m->n_layers = 2;
    m->n_heads = 4;
    m->n_kv_heads = 2;
    m->head_dim = 16;
    m->n_tokens = T_TOK;
    m->n_prompt = 150;
    m->has_summaries = 1;
    m->pool = 8;
    m->has_wo = 1;
    m->has_stats = 1;
    m->stats_split = 100;
    m->model_dim = 100;
    snprintf(m->source, sizeof m->source, "test");
}

#endif
