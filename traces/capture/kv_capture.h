/*
 * kv_capture.h: run a model on a prompt and record its attention trace (traces/kv_trace.h).
 *
 * The prompt is prefilled in one batch; a hook after each layer's attention computes that layer's
 * summaries and statistics (attn_stats op: per query lse, entropy, the keys holding 90 % of its
 * attention, its sink and segment mass; per key the sum, sum of squares and maximum of the attention
 * the prompt queries gave it, also over the queries before stats_split; the max-pooled map) and
 * writes its prompt slab of Q, K, V, head-major, and its per-key statistics to the trace right away.
 * Then exactly n_decode tokens are decoded greedily (EOS does not stop the run); their Q rows are
 * buffered (n_layers x n_decode x dim floats) and their K, V rows are read back from the KV cache at
 * the end. With q_tail >= 0 (a lean trace) only the queries of the last q_tail prompt tokens and of
 * the decode tokens are stored. The statistics are computed by the attention op from the same scores
 * as the attention (kv_fwd_set_stats), and each prompt slab is written by a thread of its own while the
 * forward pass goes on (capture_writer.c). Peak memory is the model's weights as stored (mapped, paged
 * in as they are read), its KV cache, one layer of trace buffers (Q, K, V and the per-key statistics:
 * 6 n_heads x T floats, plus a head-major staging copy), the activations of one block, the decode Q
 * rows and the per-query summaries (n_layers x n_heads x (5 T + pool^2) floats); the result has each.
 */
#ifndef KV_CAPTURE_H
#define KV_CAPTURE_H

#include "traces/capture/kv_tokenizer.h"
#include "traces/kv_trace.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const char *model_path;     /* llama2.c checkpoint */
    const char *tokenizer_path; /* tokenizer.bin, tokenizer.json or GGUF; NULL: the checkpoint's own
                                   (kv_model_default_tokenizer); optional with ids */
    const char *prompt;         /* prompt text (NULL when ids are given) */
    const int32_t *ids;         /* (n_ids) the prompt as token ids instead of text, used as given (no
                                   BOS added); checked against the model's and the tokenizer's vocabulary */
    int n_ids;
    const char *ids_source; /* where the ids came from, for messages (default "--ids") */
    int chat;               /* 1: wrap the prompt text in the tokenizer's chat template (as the user's
                               turn, with the generation prompt), tokenised as one sequence */
    const char *system;     /* with chat: the system message, NULL for the template's default */
    const char *out_path;   /* trace file (.h5) */
    int n_decode;           /* greedy decode tokens recorded after the prompt (default 64) */
    kv_dtype_t dtype;       /* Q, K, V storage */
    int with_wo;            /* store W_O per layer */
    const char *segments;   /* "auto" (default), "none" or "i,j,k" token offsets */
    int pool;               /* pooled map side (min with T), default 256 */
    int zstd_level;         /* 1..22, default 3 */
    const char *backend;    /* "cpu", "cuda", "auto" (default) */
    int n_threads;          /* CPU threads, 0 = all */
    const char *generator;  /* text recorded as the trace's generator (the options); NULL: built here */
    int q_tail;             /* >= 0: a lean trace, queries stored only for the last q_tail prompt tokens
                               and the decode tokens; -1 (default): every query */
    int weights_f32;        /* 1: convert the weights to fp32 at load (kv_model_load_f32; the same
                               numbers, 4 bytes a parameter) instead of keeping them as stored */
    int no_writer_thread;   /* 1: write each layer's slab on the capture's thread (no overlap) */
} kv_capture_opts_t;

/* Defaults for everything but the paths and the prompt. */
void kv_capture_opts_init(kv_capture_opts_t *o);

typedef struct {
    int n_prompt, n_tokens, n_segments;
    double load_s, prefill_s, decode_s, write_s;
    double prefill_compute_s; /* the prefill's forward pass with its statistics (prefill_s adds the wait for
                                 the last layer's slab) */
    double writer_busy_s;     /* time the slab writer spent writing the prompt slabs (overlapped) */
    double writer_wait_s;     /* time the forward pass waited for the slab writer */
    double compress_s;        /* zstd compression, on every thread (within writer_busy_s and write_s) */
    int writer_threaded;      /* 1: the slabs were written by their own thread */
    size_t peak_rss;          /* bytes, after the capture */
    /* memory by use (bytes): the model's weights as held (mapped or allocated) and how much of them is
     * resident at the end; the KV cache; one layer of trace buffers; activations; the summaries and
     * statistics held for the whole trace */
    size_t mem_weights, mem_weights_resident, mem_cache, mem_trace, mem_activations, mem_summaries;
    char device[128]; /* backend description */
} kv_capture_result_t;

/* "peak RSS 1.2 GiB: weights 98 MiB mapped (97 MiB resident) + KV cache ... + ..." into buf. */
const char *kv_capture_memory_text(const kv_capture_result_t *r, char *buf, size_t len);

int kv_capture_run(const kv_capture_opts_t *o, kv_capture_result_t *res);

/* Tokenise a prompt for capture. BOS leads each sequence when the model adds one (tok->add_bos);
 * an empty prompt is BOS alone. segments "auto": when the text holds <|endoftext|>, every
 * document is tokenised separately and the start of each is a segment (the separator is text
 * split off before tokenization: it is no token of the trace even where the vocabulary has it, as
 * SmolLM2's id 0); otherwise (and for "none") the whole text is one sequence without segments.
 * "i,j,k": the whole
 * text, segments starting at those token offsets (0 is implied, ascending, inside the prompt).
 * Outputs are kv_free'd by the caller; *segs is NULL when *n_segs is 0. */
int kv_capture_tokenize(const kv_tokenizer_t *tok, const char *text, const char *segments, int32_t **tokens,
                        int *n_tokens, int32_t **segs, int *n_segs);

#ifdef __cplusplus
}
#endif
#endif
