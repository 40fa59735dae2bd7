/*
 * cmd_model.c: `kvsim model MODEL`: what kvsim understood of a checkpoint, before a long capture.
 *
 * Loads the model (every check of its format runs, so a refused config or a broken file fails here
 * exactly as it would in capture) and its tokenizer (the checkpoint's own, or -z), then prints one
 * `key: value` line per fact: format and stored dtypes, architecture, dimensions, heads, RoPE,
 * norm, biases, embeddings, context, parameters and memory; the tokenizer's kind, size, special
 * tokens and chat style. Strings that come from the file are printed with control characters
 * escaped.
 */
#include "sim/cli/cli.h"
#include "sim/common/kv_common.h"
#include "traces/capture/kv_model.h"
#include "traces/capture/kv_tokenizer.h"

#include <getopt.h>
#include <stdio.h>
#include <string.h>

static void help(void)
{
    printf("usage: kvsim model [options] MODEL\n"
           "\n"
           "Load a checkpoint and its tokenizer and print what kvsim understood of them: file format and the\n"
           "weights' stored dtypes, architecture, layers, model and feed-forward widths, query and KV heads,\n"
           "head_dim, RoPE (theta and scaling), RMSNorm epsilon, q/k/v biases, tied embeddings, context\n"
           "length, parameter count and memory at load; the tokenizer's kind, vocabulary, special tokens,\n"
           "whether BOS is added, and the chat template's style. Check it before a long capture: a config\n"
           "key kvsim refuses fails here with the same message, and keys it does not know are warned about.\n"
           "\n"
           "arguments:\n"
           "  MODEL                 a GGUF file, a Hugging Face folder (or its config.json or a .safetensors\n"
           "                        file) or a llama2.c checkpoint\n"
           "\n"
           "options:\n"
           "  -z, --tokenizer FILE  tokenizer (default: the checkpoint's own: the GGUF file, the folder's\n"
           "                        tokenizer.json; a llama2.c checkpoint has none and needs -z)\n"
           "  -h, --help            this help\n"
           "\n"
           "example:\n"
           "  kvsim model ../shared/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf\n");
}

/* A string from a file, control characters as \xHH. */
static void put_safe(const char *s)
{
    for (; *s; s++) {
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            printf("\\x%02x", (unsigned char)*s);
        else
            putchar(*s);
    }
}

static const char *rope_text(const kv_rope_t *r, char *buf, size_t len)
{
    switch (r->type) {
    case KV_ROPE_LINEAR: snprintf(buf, len, "theta %g, linear scaling (factor %g)", r->theta, r->factor); break;
    case KV_ROPE_LLAMA3:
        snprintf(buf, len,
                 "theta %g, llama3 scaling (factor %g, low_freq_factor %g, high_freq_factor %g, original context %g)",
                 r->theta, r->factor, r->low_freq_factor, r->high_freq_factor, r->original_max_pos);
        break;
    case KV_ROPE_FACTORS: snprintf(buf, len, "theta %g, per-frequency divisors from the file", r->theta); break;
    default: snprintf(buf, len, "theta %g, no scaling", r->theta); break;
    }
    return buf;
}

static void print_model(const kv_model_t *m)
{
    const kv_model_config_t *c = &m->cfg;
    char buf[512];
    printf("model:        ");
    put_safe(m->path);
    printf("\nformat:       %s\n", kv_model_describe(m, buf, sizeof buf));
    printf("dtypes:       %s\n", m->dtypes[0] ? m->dtypes : "(not recorded)");
    printf("architecture: %s (RMSNorm, SwiGLU feed-forward, rotary positions, causal attention)\n", c->arch);
    printf("layers:       %d\n", c->n_layers);
    printf("dim:          %d (feed-forward %d)\n", c->dim, c->hidden_dim);
    printf("heads:        %d query, %d KV", c->n_heads, c->n_kv_heads);
    if (c->n_heads != c->n_kv_heads)
        printf(" (grouped-query attention, %d query heads per KV head)", c->n_heads / c->n_kv_heads);
    printf("\nhead_dim:     %d%s\n", c->head_dim,
           c->q_dim != c->dim ? " (given by the checkpoint, not dim / heads)" : "");
    printf("rope:         %s\n", rope_text(&c->rope, buf, sizeof buf));
    printf("norm:         RMSNorm, eps %g\n", (double)c->norm_eps);
    printf("biases:       %s\n", c->qkv_bias ? "q, k and v projections" : "none");
    printf("embeddings:   %s\n",
           c->shared_classifier ? "tied (the classifier is the token embedding)" : "separate classifier");
    printf("context:      %d tokens\n", c->seq_len);
    printf("vocabulary:   %d\n", c->vocab_size);
    printf("parameters:   %.2f M: %.0f MiB as stored (mapped, what capture holds), %.0f MiB in fp32\n",
           (double)m->n_params / 1e6, (double)m->weight_bytes / (1 << 20), (double)m->n_params * 4.0 / (1 << 20));
}

int kv_cmd_model(int argc, char **argv)
{
    static const struct option opts[] = {
        {"tokenizer", required_argument, 0, 'z'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    const char *tok_path = NULL;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":z:h", opts, NULL)) != -1) {
        switch (c) {
        case 'z': tok_path = optarg; break;
        case 'h': help(); return 0;
        default: return kv_cli_bad_option("model", c, argv);
        }
    }
    if (optind + 1 != argc)
        return kv_cli_usage_error("model", optind == argc ? "MODEL is missing" : "unexpected argument '%s'",
                                  argv[optind + 1 < argc ? optind + 1 : optind]);
    const char *path = argv[optind];
    kv_model_t *m = NULL;
    kv_tokenizer_t *tok = NULL;
    int rc = 1;
    if (kv_model_load(path, &m) != KV_OK) {
        rc = kv_cli_fail("model");
        goto done;
    }
    print_model(m);
    char deftok[1100];
    if (!tok_path)
        tok_path = kv_model_default_tokenizer(path, deftok, sizeof deftok);
    if (!tok_path) {
        printf("tokenizer:    none with the checkpoint (give one with -z)\n");
    } else if (kv_tokenizer_load(tok_path, m->cfg.vocab_size, &tok) != KV_OK) {
        fflush(stdout);
        rc = kv_cli_fail("model");
        goto done;
    } else {
        char d[1024];
        printf("tokenizer:    ");
        put_safe(tok_path);
        printf("\n              ");
        put_safe(kv_tokenizer_describe(tok, d, sizeof d));
        printf("\n");
    }
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "kvsim model: standard output: write error\n");
        goto done;
    }
    rc = 0;
done:
    kv_tokenizer_free(tok);
    kv_model_free(m);
    return rc;
}
