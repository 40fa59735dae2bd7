/*
 * cmd_capture.c: the model-running subcommands.
 *   kvsim capture   MODEL -z TOKENIZER -i PROMPT -o TRACE.h5 [...]   record an attention trace
 *   kvsim generate  MODEL -z TOKENIZER [-i PROMPT] [-n STEPS]         greedy (or sampled) continuation
 *   kvsim nll       MODEL -z TOKENIZER TEXTFILE                       teacher-forced mean NLL
 * MODEL is a llama2.c checkpoint or a Hugging Face folder (kv_model.h); -z may then be left out when
 * the folder has a tokenizer.json.
 * A prompt is given as text (-i "Once upon a time"), as -i @FILE, or with --prompt-file FILE.
 */
#include "kernels/kv_backend.h"
#include "sim/cli/cli.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/common/kv_output.h"
#include "sim/common/kv_params.h"
#include "traces/capture/kv_capture.h"
#include "traces/capture/kv_eval.h"
#include "traces/capture/kv_forward.h"
#include "traces/capture/kv_model.h"
#include "traces/capture/kv_tokenizer.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Help lines the three subcommands share: the MODEL argument and the -z option. */
#define HELP_MODEL                                                                                                     \
    "  MODEL                  a GGUF file (llama.cpp's format: llama and qwen2 architectures, F32,\n"                  \
    "                         F16, BF16 and the Q4_0..Q8_0, Q4_K..Q6_K quantisations), a Hugging Face\n"               \
    "                         Llama/Mistral/Qwen2 checkpoint (its folder, its config.json or a\n"                      \
    "                         .safetensors file; F32, F16, BF16 weights) or a llama2.c checkpoint\n"                   \
    "                         (version 0 legacy, 1 fp32, 2 Q8_0); weights run in fp32\n"
#define HELP_TOKENIZER                                                                                                 \
    "  -z, --tokenizer FILE   tokenizer: a GGUF file's vocabulary, a Hugging Face tokenizer.json\n"                    \
    "                         (SentencePiece-BPE as Llama 2, or byte-level BPE as Llama 3, Qwen2,\n"                   \
    "                         SmolLM2) or a llama2.c tokenizer.bin (default: the checkpoint's own:\n"                  \
    "                         the GGUF file, the folder's tokenizer.json; required for llama2.c)\n"
#define HELP_IDS                                                                                                       \
    "      --ids FILE         the prompt as token ids instead of text: integers separated by spaces,\n"                \
    "                         newlines or commas, or a JSON list ('-': standard input); used as\n"                     \
    "                         given (no BOS added), each checked against the vocabulary\n"
#define HELP_CHAT                                                                                                      \
    "      --chat             wrap the prompt in the model's chat template as the user's turn, with\n"                 \
    "                         the assistant's header after it (ChatML and Llama 3 templates; others\n"                 \
    "                         are refused by name); special tokens written in any prompt, such as\n"                   \
    "                         <|im_start|>, become their ids with or without it\n"                                     \
    "      --system TEXT      with --chat: the system message (default: the template's own, if any)\n"

/* -z as given, else the checkpoint's own tokenizer (into buf); 0, or the usage error's exit status
 * when there is neither (unless optional: token ids need no tokenizer). */
static int tokenizer_or_default(const char *cmd, const char *model, const char **tok, char *buf, size_t len,
                                int optional)
{
    if (!*tok && !(*tok = kv_model_default_tokenizer(model, buf, len)) && !optional)
        return kv_cli_usage_error(cmd, "-z TOKENIZER is required (a llama2.c checkpoint, or a Hugging Face folder "
                                       "without tokenizer.json)");
    return 0;
}

/* Whole text file into a NUL-terminated string (kv_free); a NUL byte inside is an error. */
static int read_text(const char *path, char **out, size_t *len)
{
    size_t n = 0;
    int rc = kv_read_file(path, (size_t)1 << 30, out, &n);
    if (rc)
        return rc;
    if (strlen(*out) != n) {
        kv_free(*out);
        *out = NULL;
        return kv_error(KV_EFORMAT, "%s: contains NUL bytes (not a text file?)", path);
    }
    if (len)
        *len = n;
    return KV_OK;
}

/* -i TEXT, -i @FILE or --prompt-file FILE into an owned string. */
static int load_prompt(const char *arg, const char *file, char **out)
{
    if (file)
        return read_text(file, out, NULL);
    if (arg && arg[0] == '@')
        return read_text(arg + 1, out, NULL);
    *out = kv_strdup(arg ? arg : "");
    return *out ? KV_OK : KV_ENOMEM;
}

/* --segments i,j,k as a usage check (before anything is loaded): auto, none, or ascending non-negative
 * token offsets; whether they fall inside the prompt is known only once it is tokenised. */
static int segments_syntax(const char *spec)
{
    if (!strcmp(spec, "auto") || !strcmp(spec, "none"))
        return 0;
    long prev = -1;
    for (const char *p = spec;;) {
        char *end;
        errno = 0;
        long v = (*p >= '0' && *p <= '9') ? strtol(p, &end, 10) : -1;
        if (v < 0 || errno || v > 2147483647L || (*end && *end != ',') || (*end == ',' && !end[1]))
            return kv_cli_usage_error("capture",
                                      "--segments expects auto, none or a comma list of token offsets, "
                                      "got '%s'",
                                      spec);
        if (v <= prev && !(prev == -1))
            return kv_cli_usage_error("capture", "--segments: offsets must ascend (%ld after %ld in '%s')", v, prev,
                                      spec);
        prev = v;
        if (!*end)
            return 0;
        p = end + 1;
    }
}

enum {
    OPT_PROMPT_FILE = 1000,
    OPT_TEMP,
    OPT_SEED,
    OPT_BACKEND,
    OPT_THREADS,
    OPT_DECODE,
    OPT_DTYPE,
    OPT_WO,
    OPT_QTAIL,
    OPT_SEGMENTS,
    OPT_POOL,
    OPT_ZSTD,
    OPT_IDS,
    OPT_CHAT,
    OPT_SYSTEM
};

/* ---------------------------------------------------------------- generate */

static void generate_help(void)
{
    printf("usage: kvsim generate MODEL [-z TOKENIZER] [-i PROMPT | --ids FILE] [-n STEPS] [options]\n"
           "\n"
           "Continue PROMPT with MODEL and print the prompt and the continuation on stdout.\n"
           "Greedy (deterministic) unless --temperature is given. Generation stops after STEPS tokens,\n"
           "at the end of the model's context, or when the model emits its BOS or EOS token. A timing\n"
           "line goes to stderr.\n"
           "\n"
           "arguments:\n" HELP_MODEL "\n"
           "options:\n" HELP_TOKENIZER
           "  -i, --prompt TEXT      prompt text; -i @FILE reads it from FILE (default: empty, BOS only)\n"
           "      --prompt-file F    read the prompt from file F\n" HELP_IDS HELP_CHAT
           "  -n, --steps N          tokens to generate (default 256, capped by the context)\n"
           "      --temperature T    sample from softmax(logits / T) (default 0 = greedy)\n"
           "      --seed S           sampling seed (default 42)\n"
           "      --backend B        cpu, cuda or auto (default auto)\n"
           "      --threads N        CPU threads (default: all cores)\n"
           "  -q, --quiet            no timing line on stderr\n"
           "  -h, --help             this help\n"
           "\n"
           "example:\n"
           "  kvsim generate stories260K.bin -z tok512.bin -i \"Once upon a time\" -n 64\n"
           "  kvsim generate SmolLM2-135M-Instruct.Q4_1.gguf --chat -i \"What is the capital of France?\"\n");
}

static int open_model(const char *cmd, const char *model_path, const char *tok_path, const char *backend, int threads,
                      kv_model_t **m, kv_tokenizer_t **tok, kv_backend_t **be)
{
    *m = NULL;
    *tok = NULL;
    *be = NULL;
    if (kv_model_load(model_path, m) != KV_OK || kv_tokenizer_load(tok_path, (*m)->cfg.vocab_size, tok) != KV_OK ||
        kv_backend_open(backend, threads, be) != KV_OK) {
        kv_cli_fail(cmd);
        kv_tokenizer_free(*tok);
        kv_model_free(*m);
        *m = NULL;
        *tok = NULL;
        return 1;
    }
    return 0;
}

int kv_cmd_generate(int argc, char **argv)
{
    static const struct option opts[] = {{"tokenizer", required_argument, 0, 'z'},
                                         {"prompt", required_argument, 0, 'i'},
                                         {"prompt-file", required_argument, 0, OPT_PROMPT_FILE},
                                         {"ids", required_argument, 0, OPT_IDS},
                                         {"chat", no_argument, 0, OPT_CHAT},
                                         {"system", required_argument, 0, OPT_SYSTEM},
                                         {"steps", required_argument, 0, 'n'},
                                         {"temperature", required_argument, 0, OPT_TEMP},
                                         {"seed", required_argument, 0, OPT_SEED},
                                         {"backend", required_argument, 0, OPT_BACKEND},
                                         {"threads", required_argument, 0, OPT_THREADS},
                                         {"quiet", no_argument, 0, 'q'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *tok_path = NULL, *prompt_arg = NULL, *prompt_file = NULL, *backend = "auto", *ids_path = NULL;
    const char *system = NULL;
    long steps = 256, threads = 0, seed = 42;
    double temperature = 0;
    int c, chat = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":z:i:n:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'z': tok_path = optarg; break;
        case 'i': prompt_arg = optarg; break;
        case OPT_PROMPT_FILE: prompt_file = optarg; break;
        case OPT_IDS: ids_path = optarg; break;
        case OPT_CHAT: chat = 1; break;
        case OPT_SYSTEM: system = optarg; break;
        case 'n':
            if (kv_cli_int("generate", "--steps", optarg, 0, 1L << 24, &steps))
                return 2;
            break;
        case OPT_TEMP: {
            char *end;
            temperature = strtod(optarg, &end);
            if (!kv_is_decimal(optarg, 0, 0) || *end || end == optarg || !(temperature >= 0 && temperature < 1e6))
                return kv_cli_usage_error("generate", "--temperature expects a number >= 0, got '%s'", optarg);
            break;
        }
        case OPT_SEED:
            if (kv_cli_int("generate", "--seed", optarg, 0, 2147483647L, &seed))
                return 2;
            break;
        case OPT_BACKEND: backend = optarg; break;
        case OPT_THREADS:
            if (kv_cli_int("generate", "--threads", optarg, 0, 4096, &threads))
                return 2;
            break;
        case 'q': kv_log_set_level(KV_LOG_QUIET); break;
        case 'h': generate_help(); return 0;
        default: return kv_cli_bad_option("generate", c, argv);
        }
    }
    if (optind + 1 != argc)
        return kv_cli_usage_error("generate", "expected exactly one MODEL argument");
    if (ids_path && (prompt_arg || prompt_file || chat))
        return kv_cli_usage_error("generate", "--ids replaces the prompt text: it goes without -i, --prompt-file and "
                                              "--chat");
    if (system && !chat)
        return kv_cli_usage_error("generate", "--system needs --chat");
    char deftok[1100];
    int urc = tokenizer_or_default("generate", argv[optind], &tok_path, deftok, sizeof deftok, 0);
    if (urc)
        return urc;
    kv_model_t *m;
    kv_tokenizer_t *tok;
    kv_backend_t *be;
    if (open_model("generate", argv[optind], tok_path, backend, (int)threads, &m, &tok, &be))
        return 1;
    char *prompt = NULL, *wrapped = NULL;
    int32_t *ids = NULL;
    int n_ids = 0;
    kv_fwd_t *f = NULL;
    kv_gen_result_t r = {0};
    int rc = ids_path ? kv_ids_read(ids_path, &ids, &n_ids) : load_prompt(prompt_arg, prompt_file, &prompt);
    if (rc == KV_OK && prompt && !prompt[0] && (prompt_arg || prompt_file))
        kv_warn("generate: the prompt given is empty: generating from %s alone",
                tok->bos_id >= 0 ? "the BOS token" : "nothing");
    if (rc == KV_OK && ids)
        rc = kv_ids_check(ids, n_ids, m->cfg.vocab_size, tok, ids_path);
    if (rc == KV_OK && chat)
        rc = kv_tokenizer_chat(tok, system, prompt, &wrapped);
    if (rc == KV_OK)
        rc = kv_fwd_create(m, be, m->cfg.seq_len, m->cfg.seq_len, &f);
    if (rc == KV_OK && ids)
        rc = kv_generate_ids(f, tok, ids, n_ids, (int)steps, (float)temperature, (uint64_t)seed, stdout, &r);
    else if (rc == KV_OK)
        rc =
            kv_generate(f, tok, wrapped ? wrapped : prompt, (int)steps, (float)temperature, (uint64_t)seed, stdout, &r);
    if (rc == KV_OK) {
        printf("\n");
        int gen = r.n_tokens - r.n_prompt;
        kv_info("generate: %d prompt tokens in %.3fs, %d new tokens in %.3fs (%.1f tok/s), %s", r.n_prompt, r.prefill_s,
                gen, r.decode_s, r.decode_s > 0 ? gen / r.decode_s : 0.0, be->device);
    }
    int status = rc == KV_OK ? 0 : kv_cli_fail("generate");
    kv_free(r.tokens);
    kv_free(prompt);
    kv_free(wrapped);
    kv_free(ids);
    kv_fwd_free(f);
    kv_backend_close(be);
    kv_tokenizer_free(tok);
    kv_model_free(m);
    return status;
}

/* ---------------------------------------------------------------- nll */

static void nll_help(void)
{
    printf("usage: kvsim nll MODEL [-z TOKENIZER] TEXTFILE | --ids FILE [options]\n"
           "\n"
           "Teacher-forced negative log-likelihood of TEXTFILE under MODEL, in nats per predicted token.\n"
           "Documents separated by <|endoftext|> lines are scored as separate sequences, each starting\n"
           "with BOS when the model adds one; a document longer than the model's context (seq_len) is\n"
           "split into windows that overlap by one token. Prints one line per document, then the totals;\n"
           "the last line is nll=<mean nats per predicted token>. With --ids, the token ids are scored as\n"
           "one sequence, as given.\n"
           "\n"
           "arguments:\n" HELP_MODEL "  TEXTFILE               the text to score (not with --ids)\n"
           "\n"
           "options:\n" HELP_TOKENIZER HELP_IDS "      --backend B        cpu, cuda or auto (default auto)\n"
           "      --threads N        CPU threads (default: all cores)\n"
           "  -q, --quiet            no per-document lines (default: one per document)\n"
           "  -h, --help             this help\n"
           "\n"
           "example:\n"
           "  kvsim nll stories260K.bin -z tok512.bin tinystories_sample.txt\n");
}

static void nll_doc(void *ctx, int doc, int n_tokens, double sum, long pred)
{
    if (*(int *)ctx)
        printf("doc %d: %d tokens, %ld predicted, nll %.4f\n", doc, n_tokens, pred, pred ? sum / pred : 0.0);
    fflush(stdout);
}

int kv_cmd_nll(int argc, char **argv)
{
    static const struct option opts[] = {{"tokenizer", required_argument, 0, 'z'},
                                         {"ids", required_argument, 0, OPT_IDS},
                                         {"backend", required_argument, 0, OPT_BACKEND},
                                         {"threads", required_argument, 0, OPT_THREADS},
                                         {"quiet", no_argument, 0, 'q'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *tok_path = NULL, *backend = "auto", *ids_path = NULL;
    long threads = 0;
    int c, verbose = 1;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":z:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'z': tok_path = optarg; break;
        case OPT_IDS: ids_path = optarg; break;
        case OPT_BACKEND: backend = optarg; break;
        case OPT_THREADS:
            if (kv_cli_int("nll", "--threads", optarg, 0, 4096, &threads))
                return 2;
            break;
        case 'q':
            verbose = 0;
            kv_log_set_level(KV_LOG_QUIET);
            break;
        case 'h': nll_help(); return 0;
        default: return kv_cli_bad_option("nll", c, argv);
        }
    }
    if (optind + (ids_path ? 1 : 2) != argc)
        return kv_cli_usage_error("nll", ids_path ? "expected MODEL (and no TEXTFILE with --ids)"
                                                  : "expected MODEL and TEXTFILE (or --ids FILE)");
    char deftok[1100];
    int urc = tokenizer_or_default("nll", argv[optind], &tok_path, deftok, sizeof deftok, ids_path != NULL);
    if (urc)
        return urc;
    char *text = NULL;
    size_t len = 0;
    int32_t *ids = NULL;
    int n_ids = 0;
    if (ids_path ? kv_ids_read(ids_path, &ids, &n_ids) != KV_OK : read_text(argv[optind + 1], &text, &len) != KV_OK)
        return kv_cli_fail("nll");
    kv_model_t *m = NULL;
    kv_tokenizer_t *tok = NULL;
    kv_backend_t *be = NULL;
    int open_failed =
        tok_path ? open_model("nll", argv[optind], tok_path, backend, (int)threads, &m, &tok, &be)
                 : (kv_model_load(argv[optind], &m) != KV_OK || kv_backend_open(backend, (int)threads, &be) != KV_OK);
    if (open_failed) {
        if (!tok_path)
            kv_cli_fail("nll");
        kv_model_free(m);
        kv_free(text);
        kv_free(ids);
        return 1;
    }
    kv_fwd_t *f = NULL;
    kv_nll_result_t r;
    double t0 = kv_now();
    int rc = ids ? kv_ids_check(ids, n_ids, m->cfg.vocab_size, tok, ids_path) : KV_OK;
    if (rc == KV_OK)
        rc = kv_fwd_create(m, be, m->cfg.seq_len, m->cfg.seq_len, &f);
    if (rc == KV_OK && ids) {
        rc = kv_nll_ids(f, ids, n_ids, &r);
        if (rc == KV_OK)
            nll_doc(&verbose, 0, n_ids, r.nll_sum, r.n_predicted);
    } else if (rc == KV_OK) {
        rc = kv_nll_text(f, tok, text, len, &r, nll_doc, &verbose);
    }
    if (rc == KV_OK) {
        double el = kv_now() - t0;
        printf("docs=%d tokens=%ld predicted=%ld windows=%d seconds=%.3f\n", r.n_docs, r.n_tokens, r.n_predicted,
               r.n_windows, el);
        printf("nll=%.6f\n", r.n_predicted ? r.nll_sum / (double)r.n_predicted : 0.0);
    }
    int status = rc == KV_OK ? 0 : kv_cli_fail("nll");
    kv_fwd_free(f);
    kv_backend_close(be);
    kv_tokenizer_free(tok);
    kv_model_free(m);
    kv_free(text);
    kv_free(ids);
    return status;
}

/* ---------------------------------------------------------------- capture */

static void capture_help(void)
{
    printf("usage: kvsim capture MODEL [-z TOKENIZER] -i PROMPT | --ids FILE -o TRACE.h5 [options]\n"
           "\n"
           "Run MODEL on PROMPT, then decode greedily, and record the attention trace in HDF5\n"
           "(traces/FORMAT.md): per layer the post-RoPE Q (n_heads, T, head_dim), K and V (n_kv_heads, T,\n"
           "head_dim) of all T = prompt + decode tokens; token ids, positions, the prompt length and\n"
           "segment starts; summaries computed during the forward pass (log-sum-exp and entropy of every\n"
           "query, accumulated attention per key over the prompt queries, a max-pooled map of the causal\n"
           "attention); optionally W_O. Provenance (model path and sha256, tokenizer, backend, date,\n"
           "prompt, the command line) is stored as attributes. The file is written under a temporary name\n"
           "and renamed at the end. Memory: the model, its KV cache, one layer of Q/K/V staging, the\n"
           "decode queries and the summaries.\n"
           "\n"
           "arguments:\n" HELP_MODEL "\n"
           "options:\n" HELP_TOKENIZER
           "  -i, --prompt TEXT      prompt text; -i @FILE reads it from FILE (required, or --prompt-file\n"
           "                         or --ids)\n"
           "      --prompt-file F    read the prompt from file F\n" HELP_IDS HELP_CHAT
           "  -o, --output FILE      trace file to write (required)\n"
           "      --decode N         greedy decode tokens recorded after the prompt (default 64);\n"
           "                         exactly N are generated (EOS does not stop); prompt + N must fit\n"
           "                         the model's seq_len\n"
           "      --dtype f16|f32    storage of Q, K, V (default f16; values beyond the f16 range are\n"
           "                         counted in the f16_overflow attribute)\n"
           "      --with-wo          also store W_O (model_dim x n_heads*head_dim) per layer (default: no)\n"
           "      --q-tail N         a lean trace: store the queries of the last N prompt tokens and of the\n"
           "                         decode tokens only (queries are most of a trace's bytes); replay then\n"
           "                         needs --eval-tail <= N and observation windows within N (default:\n"
           "                         every query)\n"
           "      --segments S       auto (default): documents separated by <|endoftext|> lines in the\n"
           "                         prompt are tokenised separately, each with BOS when the model adds\n"
           "                         one, and their starts recorded (a prompt without separators, one\n"
           "                         with --chat and token ids have no segments);\n"
           "                         none: the whole prompt is one sequence, no segments;\n"
           "                         i,j,k: token offsets where segments start (0 implied) in the\n"
           "                         prompt tokenised as one sequence (separator lines stay text)\n"
           "      --pool N           side of the pooled attention map, min(N, T) (default 256)\n"
           "      --zstd-level N     compression level 1..22 (default 3)\n"
           "      --backend B        cpu, cuda or auto (default auto: CUDA when usable, else CPU)\n"
           "      --threads N        CPU threads (default: all cores; results do not depend on it)\n"
           "  -q, --quiet            no progress on stderr\n"
           "  -h, --help             this help\n"
           "\n"
           "example:\n"
           "  kvsim capture stories260K.bin -z tok512.bin -i @prompt.txt -o trace.h5 --decode 64\n"
           "  kvsim capture SmolLM2-135M-Instruct.Q4_1.gguf --chat -i @question.txt -o trace.h5\n");
}

int kv_cmd_capture(int argc, char **argv)
{
    static const struct option opts[] = {{"tokenizer", required_argument, 0, 'z'},
                                         {"prompt", required_argument, 0, 'i'},
                                         {"prompt-file", required_argument, 0, OPT_PROMPT_FILE},
                                         {"ids", required_argument, 0, OPT_IDS},
                                         {"chat", no_argument, 0, OPT_CHAT},
                                         {"system", required_argument, 0, OPT_SYSTEM},
                                         {"output", required_argument, 0, 'o'},
                                         {"decode", required_argument, 0, OPT_DECODE},
                                         {"dtype", required_argument, 0, OPT_DTYPE},
                                         {"with-wo", no_argument, 0, OPT_WO},
                                         {"q-tail", required_argument, 0, OPT_QTAIL},
                                         {"segments", required_argument, 0, OPT_SEGMENTS},
                                         {"pool", required_argument, 0, OPT_POOL},
                                         {"zstd-level", required_argument, 0, OPT_ZSTD},
                                         {"backend", required_argument, 0, OPT_BACKEND},
                                         {"threads", required_argument, 0, OPT_THREADS},
                                         {"quiet", no_argument, 0, 'q'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    kv_capture_opts_t o;
    kv_capture_opts_init(&o);
    const char *prompt_arg = NULL, *prompt_file = NULL, *ids_path = NULL;
    long v;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":z:i:o:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'z': o.tokenizer_path = optarg; break;
        case 'i': prompt_arg = optarg; break;
        case OPT_PROMPT_FILE: prompt_file = optarg; break;
        case OPT_IDS: ids_path = optarg; break;
        case OPT_CHAT: o.chat = 1; break;
        case OPT_SYSTEM: o.system = optarg; break;
        case 'o': o.out_path = optarg; break;
        case OPT_DECODE:
            if (kv_cli_int("capture", "--decode", optarg, 0, 1L << 24, &v))
                return 2;
            o.n_decode = (int)v;
            break;
        case OPT_DTYPE:
            if (!strcmp(optarg, "f16"))
                o.dtype = KV_DTYPE_F16;
            else if (!strcmp(optarg, "f32"))
                o.dtype = KV_DTYPE_F32;
            else
                return kv_cli_usage_error("capture", "--dtype expects f16 or f32, got '%s'", optarg);
            break;
        case OPT_WO: o.with_wo = 1; break;
        case OPT_QTAIL:
            if (kv_cli_int("capture", "--q-tail", optarg, 0, 1L << 30, &v))
                return 2;
            o.q_tail = (int)v;
            break;
        case OPT_SEGMENTS: o.segments = optarg; break;
        case OPT_POOL:
            if (kv_cli_int("capture", "--pool", optarg, 1, 65536, &v))
                return 2;
            o.pool = (int)v;
            break;
        case OPT_ZSTD:
            if (kv_cli_int("capture", "--zstd-level", optarg, 1, 22, &v))
                return 2;
            o.zstd_level = (int)v;
            break;
        case OPT_BACKEND: o.backend = optarg; break;
        case OPT_THREADS:
            if (kv_cli_int("capture", "--threads", optarg, 0, 4096, &v))
                return 2;
            o.n_threads = (int)v;
            break;
        case 'q': kv_log_set_level(KV_LOG_QUIET); break;
        case 'h': capture_help(); return 0;
        default: return kv_cli_bad_option("capture", c, argv);
        }
    }
    if (optind + 1 != argc)
        return kv_cli_usage_error("capture", "expected exactly one MODEL argument");
    if (ids_path && (prompt_arg || prompt_file || o.chat))
        return kv_cli_usage_error("capture", "--ids replaces the prompt text: it goes without -i, --prompt-file and "
                                             "--chat");
    if (o.system && !o.chat)
        return kv_cli_usage_error("capture", "--system needs --chat");
    if (segments_syntax(o.segments))
        return 2;
    if (prompt_arg && !prompt_arg[0])
        return kv_cli_usage_error("capture", "-i: the prompt is empty (a trace needs context tokens to evict from)");
    char deftok[1100];
    int urc = tokenizer_or_default("capture", argv[optind], &o.tokenizer_path, deftok, sizeof deftok, ids_path != NULL);
    if (urc)
        return urc;
    if (!o.out_path)
        return kv_cli_usage_error("capture", "-o TRACE.h5 is required");
    if (!prompt_arg && !prompt_file && !ids_path)
        return kv_cli_usage_error("capture",
                                  "a prompt is required (-i TEXT, -i @FILE, --prompt-file FILE or --ids FILE)");
    o.model_path = argv[optind];
    /* -o is checked before anything is loaded: not a file the capture reads, a writable folder */
    const char *inputs[] = {o.model_path, o.tokenizer_path, prompt_file,
                            prompt_arg && prompt_arg[0] == '@' ? prompt_arg + 1 : NULL, ids_path};
    if (kv_out_check(o.out_path, inputs, (int)KV_ARRAY_LEN(inputs)) != KV_OK)
        return kv_cli_fail("capture");
    char *prompt = NULL;
    int32_t *ids = NULL;
    if (ids_path) {
        if (kv_ids_read(ids_path, &ids, &o.n_ids) != KV_OK)
            return kv_cli_fail("capture");
        o.ids = ids;
        o.ids_source = ids_path;
    } else {
        if (load_prompt(prompt_arg, prompt_file, &prompt) != KV_OK)
            return kv_cli_fail("capture");
        if (!prompt[0]) {
            kv_free(prompt);
            kv_error(KV_EINVAL, "%s: the prompt file is empty (a trace needs context tokens to evict from)",
                     prompt_file ? prompt_file : prompt_arg + 1);
            return kv_cli_fail("capture");
        }
        o.prompt = prompt;
    }
    if (prompt && strcmp(o.segments, "auto") && strstr(prompt, KV_DOC_SEPARATOR))
        kv_warn("capture: --segments %s: the prompt's %s lines are tokenised as plain text, not as document "
                "boundaries (only --segments auto, the default, splits the documents there, each with BOS)",
                o.segments, KV_DOC_SEPARATOR);
    /* the generator attribute: a command line that re-creates this trace (options first, so a
     * truncation at the attribute's 511 bytes loses paths that have their own attributes) */
    char gen[512], num[64];
    snprintf(gen, sizeof gen, "kvsim capture");
    snprintf(num, sizeof num, "%d", o.n_decode);
    kv_cli_append_arg(gen, sizeof gen, "--decode");
    kv_cli_append_arg(gen, sizeof gen, num);
    kv_cli_append_arg(gen, sizeof gen, "--dtype");
    kv_cli_append_arg(gen, sizeof gen, o.dtype == KV_DTYPE_F16 ? "f16" : "f32");
    if (o.with_wo)
        kv_cli_append_arg(gen, sizeof gen, "--with-wo");
    if (o.q_tail >= 0) {
        snprintf(num, sizeof num, "%d", o.q_tail);
        kv_cli_append_arg(gen, sizeof gen, "--q-tail");
        kv_cli_append_arg(gen, sizeof gen, num);
    }
    kv_cli_append_arg(gen, sizeof gen, "--segments");
    kv_cli_append_arg(gen, sizeof gen, o.segments);
    snprintf(num, sizeof num, "%d", o.pool);
    kv_cli_append_arg(gen, sizeof gen, "--pool");
    kv_cli_append_arg(gen, sizeof gen, num);
    snprintf(num, sizeof num, "%d", o.zstd_level);
    kv_cli_append_arg(gen, sizeof gen, "--zstd-level");
    kv_cli_append_arg(gen, sizeof gen, num);
    kv_cli_append_arg(gen, sizeof gen, "--backend");
    kv_cli_append_arg(gen, sizeof gen, o.backend);
    if (o.tokenizer_path) {
        kv_cli_append_arg(gen, sizeof gen, "-z");
        kv_cli_append_arg(gen, sizeof gen, o.tokenizer_path);
    }
    if (o.chat)
        kv_cli_append_arg(gen, sizeof gen, "--chat");
    if (o.system) {
        kv_cli_append_arg(gen, sizeof gen, "--system");
        kv_cli_append_arg(gen, sizeof gen, strlen(o.system) <= 80 ? o.system : "<system message>");
    }
    kv_cli_append_arg(gen, sizeof gen, ids_path ? "--ids" : "-i");
    if (ids_path) {
        kv_cli_append_arg(gen, sizeof gen, ids_path);
    } else if (prompt_file || (prompt_arg && prompt_arg[0] == '@')) {
        char at[1100];
        snprintf(at, sizeof at, "@%s", prompt_file ? prompt_file : prompt_arg + 1);
        kv_cli_append_arg(gen, sizeof gen, at);
    } else if (strlen(prompt) <= 160) {
        kv_cli_append_arg(gen, sizeof gen, prompt);
    } else {
        kv_cli_append_arg(gen, sizeof gen, "<prompt attribute>"); /* the text is in the prompt attribute */
    }
    kv_cli_append_arg(gen, sizeof gen, "-o");
    kv_cli_append_arg(gen, sizeof gen, o.out_path);
    kv_cli_append_arg(gen, sizeof gen, o.model_path);
    o.generator = gen;
    kv_capture_result_t r;
    int rc = kv_capture_run(&o, &r);
    kv_free(prompt);
    kv_free(ids);
    if (rc != KV_OK)
        return kv_cli_fail("capture");
    char a[32];
    char segs[32] = "no segments";
    if (r.n_segments > 0)
        snprintf(segs, sizeof segs, "%d segment%s", r.n_segments, r.n_segments == 1 ? "" : "s");
    printf("%s: %d prompt + %d decode tokens, %s; load %.2fs, prefill %.2fs (%.0f tok/s), decode %.2fs, "
           "write %.2fs; peak RSS %s; %s\n",
           o.out_path, r.n_prompt, r.n_tokens - r.n_prompt, segs, r.load_s, r.prefill_s,
           r.prefill_s > 0 ? r.n_prompt / r.prefill_s : 0.0, r.decode_s, r.write_s,
           kv_fmt_bytes((double)r.peak_rss, a, sizeof a), r.device);
    return 0;
}
