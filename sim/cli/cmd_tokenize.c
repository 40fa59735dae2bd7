/*
 * cmd_tokenize.c: `kvsim tokenize MODEL TEXT`: the token ids of a text under a model's tokenizer
 * (kv_tokenizer.h), one line of ids, or one "id<TAB>piece" line per token with --pieces. MODEL is a
 * model (its own tokenizer: a GGUF file, a Hugging Face folder's tokenizer.json) or a tokenizer file
 * itself; --chat wraps the text in the model's chat template first. Pieces are printed in double
 * quotes with their bytes made visible (C escapes for control characters, quotes, backslashes and
 * bytes that are not UTF-8), so a piece's spaces and newlines show and a vocabulary cannot drive
 * the terminal.
 */
#include "sim/cli/cli.h"
#include "sim/common/kv_common.h"
#include "traces/capture/kv_model.h"
#include "traces/capture/kv_tokenizer.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

static void help(void)
{
    printf("usage: kvsim tokenize [options] MODEL TEXT\n"
           "\n"
           "Print the token ids of TEXT under MODEL's tokenizer on one line, separated by spaces, or with\n"
           "--pieces one \"id<TAB>piece\" line per token. BOS is put first when the model adds it (the\n"
           "tokenizer's add_bos: llama2.c and Llama 3 do, SmolLM2 and Qwen2 do not); --bos and --no-bos\n"
           "decide instead. Special tokens written in the text (<|im_start|>) become their ids with a\n"
           "byte-level tokenizer. --chat wraps TEXT in the model's chat template with the generation\n"
           "prompt first (ChatML or Llama 3 style, as transformers' apply_chat_template renders it); the\n"
           "template holds the BOS text when the model wants one, so no BOS is added then unless --bos.\n"
           "\n"
           "arguments:\n"
           "  MODEL                  a model whose own tokenizer is used (a GGUF file, a Hugging Face\n"
           "                         folder or its config.json: the tokenizer.json beside it), or a\n"
           "                         tokenizer file (tokenizer.json, llama2.c tokenizer.bin, GGUF)\n"
           "  TEXT                   the text; @FILE reads it from FILE, - from standard input\n"
           "\n"
           "options:\n"
           "  -z, --tokenizer FILE   use this tokenizer instead of MODEL's own\n"
           "  -p, --pieces           one line per token: the id, a tab, the piece in double quotes\n"
           "                         (\\n \\t \\r \\\" \\\\ and \\xHH for other control bytes and bytes that\n"
           "                         are not UTF-8)\n"
           "      --chat             wrap TEXT in the model's chat template (a user message)\n"
           "      --system TEXT      the system message for --chat (default: the template's own)\n"
           "      --bos, --no-bos    put BOS first, or not, whatever the model does\n"
           "  -d, --describe         print a line describing the tokenizer first (kind, pre-tokenizer,\n"
           "                         BOS/EOS, added tokens, chat style)\n"
           "  -h, --help             this help\n"
           "\n"
           "example:\n"
           "  kvsim tokenize --pieces SmolLM2-135M-Instruct.Q4_1.gguf \"Hello, world!\"\n");
}

/* TEXT, @FILE or - into an owned buffer (any bytes). */
static int read_arg(const char *arg, char **out, size_t *len)
{
    *out = NULL;
    *len = 0;
    if (arg[0] != '@' && strcmp(arg, "-")) {
        *len = strlen(arg);
        *out = kv_strdup(arg);
        return *out ? KV_OK : KV_ENOMEM;
    }
    return kv_read_file(arg[0] == '@' ? arg + 1 : "-", (size_t)1 << 30, out, len);
}

/* The tokenizer file: -z, a Hugging Face checkpoint's tokenizer.json, a GGUF model itself, or MODEL. */
static const char *tokenizer_path(const char *model, const char *z, char *buf, size_t len)
{
    if (z)
        return z;
    struct stat st;
    size_t n = strlen(model);
    const char *base = strrchr(model, '/');
    base = base ? base + 1 : model;
    int checkpoint = (stat(model, &st) == 0 && S_ISDIR(st.st_mode)) ||
                     (n >= 12 && !strcmp(model + n - 12, ".safetensors")) || !strcmp(base, "config.json") ||
                     (n >= 11 && !strcmp(model + n - 11, ".index.json"));
    int json = n >= 5 && !strcmp(model + n - 5, ".json");
    if (checkpoint || !json) {
        const char *d = kv_model_default_tokenizer(model, buf, len);
        if (d || checkpoint)
            return d;
    }
    return model;
}

static void print_piece(const char *p, size_t n)
{
    putchar('"');
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)p[i];
        int cl = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
        int ok = cl > 1 && i + (size_t)cl <= n && !(c == 0xC2 && (unsigned char)p[i + 1] < 0xA0); /* no C1 controls */
        for (int k = 1; ok && k < cl; k++)
            ok = ((unsigned char)p[i + (size_t)k] & 0xC0) == 0x80;
        if (ok) {
            fwrite(p + i, 1, (size_t)cl, stdout);
            i += (size_t)cl;
            continue;
        }
        if (c == '\n')
            fputs("\\n", stdout);
        else if (c == '\t')
            fputs("\\t", stdout);
        else if (c == '\r')
            fputs("\\r", stdout);
        else if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20 || c >= 0x7f)
            printf("\\x%02X", c);
        else
            putchar(c);
        i++;
    }
    putchar('"');
}

enum { OPT_CHAT = 1000, OPT_SYSTEM, OPT_BOS, OPT_NO_BOS };

int kv_cmd_tokenize(int argc, char **argv)
{
    static const struct option opts[] = {{"tokenizer", required_argument, 0, 'z'},
                                         {"pieces", no_argument, 0, 'p'},
                                         {"chat", no_argument, 0, OPT_CHAT},
                                         {"system", required_argument, 0, OPT_SYSTEM},
                                         {"bos", no_argument, 0, OPT_BOS},
                                         {"no-bos", no_argument, 0, OPT_NO_BOS},
                                         {"describe", no_argument, 0, 'd'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *z = NULL, *system = NULL;
    int pieces = 0, chat = 0, bos = -1, describe = 0, c;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":z:pdh", opts, NULL)) != -1) {
        switch (c) {
        case 'z': z = optarg; break;
        case 'p': pieces = 1; break;
        case OPT_CHAT: chat = 1; break;
        case OPT_SYSTEM: system = optarg; break;
        case OPT_BOS:
        case OPT_NO_BOS:
            if (bos >= 0 && bos != (c == OPT_BOS))
                return kv_cli_usage_error("tokenize", "--bos and --no-bos contradict each other");
            bos = c == OPT_BOS;
            break;
        case 'd': describe = 1; break;
        case 'h': help(); return 0;
        default: return kv_cli_bad_option("tokenize", c, argv);
        }
    }
    if (optind + 2 != argc)
        return kv_cli_usage_error("tokenize", "expected MODEL and TEXT");
    if (system && !chat)
        return kv_cli_usage_error("tokenize", "--system needs --chat");
    char buf[1100];
    const char *tpath = tokenizer_path(argv[optind], z, buf, sizeof buf);
    if (!tpath)
        return kv_cli_usage_error("tokenize", "%s has no tokenizer.json beside its config.json; give -z TOKENIZER",
                                  argv[optind]);
    kv_tokenizer_t *t = NULL;
    char *text = NULL, *wrapped = NULL;
    int32_t *ids = NULL;
    size_t len = 0;
    int n = 0;
    int rc = read_arg(argv[optind + 1], &text, &len);
    if (rc == KV_OK)
        rc = kv_tokenizer_load(tpath, 0, &t);
    if (rc == KV_OK && chat) {
        if (memchr(text, 0, len))
            rc = kv_error(KV_EINVAL, "--chat: the text holds a NUL byte");
        else if ((rc = kv_tokenizer_chat(t, system, text, &wrapped)) == KV_OK)
            len = strlen(wrapped);
    }
    if (rc == KV_OK)
        rc = kv_tokenizer_encode(t, wrapped ? wrapped : text, len, bos >= 0 ? bos : chat ? 0 : t->add_bos, 0, &ids, &n);
    if (rc == KV_OK) {
        if (describe) {
            char d[1024];
            printf("%s: %s\n", tpath, kv_tokenizer_describe(t, d, sizeof d));
        }
        for (int i = 0; i < n; i++) {
            if (pieces) {
                size_t pl;
                const char *p = kv_tokenizer_piece(t, ids[i], &pl);
                printf("%d\t", ids[i]);
                print_piece(p, pl);
                putchar('\n');
            } else {
                printf("%s%d", i ? " " : "", ids[i]);
            }
        }
        if (!pieces)
            putchar('\n');
    }
    int status = rc == KV_OK ? 0 : kv_cli_fail("tokenize");
    kv_free(ids);
    kv_free(wrapped);
    kv_free(text);
    kv_tokenizer_free(t);
    return status;
}
