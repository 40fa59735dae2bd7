/*
 * cmd_synth_model.c: `kvsim synth-model -o DIR [options]`: a random-weight Hugging Face Llama
 * checkpoint of any shape (traces/capture/kv_model_write.h), to capture at the papers' scale without
 * the real weights.
 */
#include "kernels/kv_weight.h"
#include "sim/cli/cli.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "traces/capture/kv_model_write.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void help(void)
{
    printf("usage: kvsim synth-model -o DIR [--preset NAME] [options]\n"
           "\n"
           "Write a random-weight checkpoint of any Llama shape as transformers writes one:\n"
           "config.json (LlamaForCausalLM) and the weights in safetensors, sharded with a\n"
           "model.safetensors.index.json when they exceed one shard. Entries are uniform with the given\n"
           "standard deviation (norm weights 1), which keeps activations finite at any depth; the bytes\n"
           "depend on the options alone. No tokenizer is written: capture it with --ids. Each file is\n"
           "written under a temporary name and renamed when complete. The Llama-3-8B shape is 8.03 B\n"
           "parameters, 16.1 GB in bf16 (about two minutes on 2 cores, the disk permitting).\n"
           "\n"
           "options:\n"
           "  -o, --output DIR       the checkpoint folder (required; created, or empty unless --force)\n"
           "      --preset NAME      %s (default: none; the shape options\n"
           "                         below are then required); options given with it override it\n"
           "      --dim N            hidden_size\n"
           "      --hidden N         intermediate_size (the feed-forward width)\n"
           "      --layers N         num_hidden_layers\n"
           "      --heads N          num_attention_heads\n"
           "      --kv-heads N       num_key_value_heads (default: --heads)\n"
           "      --head-dim N       head_dim (default: dim / heads)\n"
           "      --vocab N          vocab_size\n"
           "      --context N        max_position_embeddings (default 8192)\n"
           "      --rope-theta X     rope_theta (default 10000, or the preset's)\n"
           "      --tied, --untied   tie the classifier to the embedding or not (default: untied)\n"
           "      --dtype T          bf16 (default), f16 or f32\n"
           "      --shard-size S     the largest shard, bytes with an optional suffix KB, MB, GB (powers\n"
           "                         of 1000) or KiB, MiB, GiB (default 5GB, as save_pretrained)\n"
           "      --std X            standard deviation of the matrix entries (default 0.02)\n"
           "      --seed N           (default 0)\n"
           "      --force            write into a folder that already holds files\n"
           "  -q, --quiet            no progress on stderr\n"
           "  -h, --help             this help\n"
           "\n"
           "example:\n"
           "  kvsim synth-model --preset llama3-8b -o /data/llama3-8b-random\n"
           "  kvsim capture /data/llama3-8b-random --ids prompt_ids.txt --decode 16 -o trace.h5\n",
           kv_model_write_presets());
}

/* "5GB", "4GiB", "123" -> bytes */
static int parse_size(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || !(v > 0))
        return 0;
    static const struct {
        const char *suffix;
        double mult;
    } u[] = {{"", 1},      {"B", 1},        {"KB", 1e3},        {"MB", 1e6},           {"GB", 1e9},
             {"TB", 1e12}, {"KiB", 1024.0}, {"MiB", 1048576.0}, {"GiB", 1073741824.0}, {"TiB", 1099511627776.0}};
    for (size_t i = 0; i < KV_ARRAY_LEN(u); i++)
        if (!strcmp(end, u[i].suffix)) {
            const double b = floor(v * u[i].mult);
            if (b < 1 || b > 1e18)
                return 0;
            *out = (uint64_t)b;
            return 1;
        }
    return 0;
}

enum {
    OPT_PRESET = 1000,
    OPT_DIM,
    OPT_HIDDEN,
    OPT_LAYERS,
    OPT_HEADS,
    OPT_KV_HEADS,
    OPT_HEAD_DIM,
    OPT_VOCAB,
    OPT_CONTEXT,
    OPT_THETA,
    OPT_TIED,
    OPT_UNTIED,
    OPT_DTYPE,
    OPT_SHARD,
    OPT_STD,
    OPT_SEED,
    OPT_FORCE
};

int kv_cmd_synth_model(int argc, char **argv)
{
    static const struct option opts[] = {{"output", required_argument, 0, 'o'},
                                         {"preset", required_argument, 0, OPT_PRESET},
                                         {"dim", required_argument, 0, OPT_DIM},
                                         {"hidden", required_argument, 0, OPT_HIDDEN},
                                         {"layers", required_argument, 0, OPT_LAYERS},
                                         {"heads", required_argument, 0, OPT_HEADS},
                                         {"kv-heads", required_argument, 0, OPT_KV_HEADS},
                                         {"head-dim", required_argument, 0, OPT_HEAD_DIM},
                                         {"vocab", required_argument, 0, OPT_VOCAB},
                                         {"context", required_argument, 0, OPT_CONTEXT},
                                         {"rope-theta", required_argument, 0, OPT_THETA},
                                         {"tied", no_argument, 0, OPT_TIED},
                                         {"untied", no_argument, 0, OPT_UNTIED},
                                         {"dtype", required_argument, 0, OPT_DTYPE},
                                         {"shard-size", required_argument, 0, OPT_SHARD},
                                         {"std", required_argument, 0, OPT_STD},
                                         {"seed", required_argument, 0, OPT_SEED},
                                         {"force", no_argument, 0, OPT_FORCE},
                                         {"quiet", no_argument, 0, 'q'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *out = NULL, *preset = NULL;
    /* the preset is applied first, whatever the order of the options: scan for it */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--preset") && i + 1 < argc)
            preset = argv[i + 1];
        else if (!strncmp(argv[i], "--preset=", 9))
            preset = argv[i] + 9;
    }
    kv_model_write_opts_t o;
    if (kv_model_write_preset(preset, &o) != KV_OK)
        return kv_cli_usage_error("synth-model", "%s", kv_last_error());
    if (!preset)
        o.seq_len = 8192;
    int kv_heads_given = preset != NULL;
    long v;
    int c;
    char *end;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":o:qh", opts, NULL)) != -1) {
        int *dst = NULL;
        long lo = 1, hi = 1 << 24;
        switch (c) {
        case 'o': out = optarg; break;
        case OPT_PRESET: break; /* applied above */
        case OPT_DIM: dst = &o.dim, hi = 65536; break;
        case OPT_HIDDEN: dst = &o.hidden_dim, hi = 1 << 20; break;
        case OPT_LAYERS: dst = &o.n_layers, hi = 1024; break;
        case OPT_HEADS: dst = &o.n_heads, hi = 1024; break;
        case OPT_KV_HEADS: dst = &o.n_kv_heads, hi = 1024, kv_heads_given = 1; break;
        case OPT_HEAD_DIM: dst = &o.head_dim, hi = 1024; break;
        case OPT_VOCAB: dst = &o.vocab_size; break;
        case OPT_CONTEXT: dst = &o.seq_len; break;
        case OPT_SEED:
            if (kv_cli_int("synth-model", "--seed", optarg, 0, 1L << 62, &v))
                return 2;
            o.seed = (uint64_t)v;
            break;
        case OPT_THETA:
        case OPT_STD: {
            errno = 0;
            const double x = strtod(optarg, &end);
            if (errno || end == optarg || *end || !(x > 0) || !isfinite(x))
                return kv_cli_usage_error("synth-model", "%s expects a positive number, got '%s'",
                                          c == OPT_THETA ? "--rope-theta" : "--std", optarg);
            *(c == OPT_THETA ? &o.rope_theta : &o.std) = x;
            break;
        }
        case OPT_TIED: o.tied = 1; break;
        case OPT_UNTIED: o.tied = 0; break;
        case OPT_DTYPE:
            if (!strcmp(optarg, "bf16"))
                o.dtype = KV_WT_BF16;
            else if (!strcmp(optarg, "f16"))
                o.dtype = KV_WT_F16;
            else if (!strcmp(optarg, "f32"))
                o.dtype = KV_WT_F32;
            else
                return kv_cli_usage_error("synth-model", "--dtype expects bf16, f16 or f32, got '%s'", optarg);
            break;
        case OPT_SHARD:
            if (!parse_size(optarg, &o.shard_bytes))
                return kv_cli_usage_error("synth-model", "--shard-size expects a size such as 5GB or 512MiB, got '%s'",
                                          optarg);
            break;
        case OPT_FORCE: o.force = 1; break;
        case 'q': kv_log_set_level(KV_LOG_QUIET); break;
        case 'h': help(); return 0;
        default: return kv_cli_bad_option("synth-model", c, argv);
        }
        if (dst) {
            char name[32] = "";
            for (size_t k = 0; opts[k].name; k++)
                if (opts[k].val == c)
                    snprintf(name, sizeof name, "--%s", opts[k].name);
            if (kv_cli_int("synth-model", name, optarg, lo, hi, &v))
                return 2;
            *dst = (int)v;
        }
    }
    if (optind != argc)
        return kv_cli_usage_error("synth-model", "unexpected argument '%s'", argv[optind]);
    if (!out)
        return kv_cli_usage_error("synth-model", "-o DIR is required");
    if (!kv_heads_given)
        o.n_kv_heads = o.n_heads;
    if (!o.dim || !o.hidden_dim || !o.n_layers || !o.n_heads || !o.vocab_size)
        return kv_cli_usage_error("synth-model", "without --preset, --dim, --hidden, --layers, --heads and --vocab "
                                                 "are required");
    kv_model_write_result_t r;
    if (kv_model_write_random(&o, out, &r) != KV_OK)
        return kv_cli_fail("synth-model");
    printf("%s: %.3f B parameters, %.2f GB of %s in %d file%s, %.1fs\n", out, (double)r.n_params / 1e9,
           (double)r.bytes / 1e9,
           o.dtype == KV_WT_F32   ? "f32"
           : o.dtype == KV_WT_F16 ? "f16"
                                  : "bf16",
           r.n_shards, r.n_shards == 1 ? "" : "s", r.seconds);
    return 0;
}
