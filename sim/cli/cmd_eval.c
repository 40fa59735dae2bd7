/*
 * cmd_eval.c: the closed-loop commands (sim/closed.h).
 *   kvsim eval MODEL PROMPT POLICIES BUDGETS   decode with each compressed cache, compare with the full one
 *   kvsim niah MODEL [POLICIES BUDGETS]         needle-in-a-haystack retrieval grid
 */
#include "sim/cli/cli.h"
#include "sim/closed.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/common/kv_output.h"
#include "sim/kv_policy.h"
#include "sim/otable.h"
#include "traces/capture/kv_eval.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    OPT_JSON = 1000,
    OPT_IDS,
    OPT_CHAT,
    OPT_SYSTEM,
    OPT_SEGMENTS,
    OPT_REF,
    OPT_NO_STEPS,
    OPT_SEED,
    OPT_BACKEND,
    OPT_THREADS,
    OPT_NO_CHAT,
    OPT_LENGTHS,
    OPT_DEPTHS,
    OPT_HAYSTACK,
    OPT_NEEDLE,
    OPT_QUESTION,
    OPT_MAX_NEW
};

/* TEXT, or @FILE's contents, into an owned string. */
static int text_arg(const char *arg, char **out)
{
    if (arg[0] != '@') {
        *out = kv_strdup(arg);
        return *out ? KV_OK : KV_ENOMEM;
    }
    size_t n = 0;
    int rc = kv_read_file(arg + 1, (size_t)1 << 28, out, &n);
    if (rc == KV_OK && strlen(*out) != n) {
        kv_free(*out);
        *out = NULL;
        return kv_error(KV_EFORMAT, "%s: contains NUL bytes (not a text file?)", arg + 1);
    }
    return rc;
}

/* Outputs checked before the work: regular files in writable folders, none of them an input (in[0..4),
 * NULL entries skipped) or the other output (kv_output.h). */
static int check_outputs(const char *out, const char *json, const char *const in[4])
{
    const char *for_out[] = {in[0], in[1], in[2], in[3], json}, *for_json[] = {in[0], in[1], in[2], in[3], out};
    if (json && !strcmp(json, "-"))
        return kv_error(KV_EINVAL, "--json -: the JSON results cannot go to standard output");
    if (kv_out_check(out, for_out, 5) != KV_OK || (json && kv_out_check(json, for_json, 5) != KV_OK))
        return KV_EIO;
    return KV_OK;
}

/* ---------------------------------------------------------------- eval */

static void eval_help(void)
{
    printf("usage: kvsim eval MODEL PROMPT POLICIES BUDGETS [options]\n"
           "\n"
           "Closed-loop evaluation: for every policy x budget, the model prefills PROMPT once, the policy\n"
           "(the code replay runs, fed the live Q, K and V of this run) compresses the real KV cache after\n"
           "the prefill (one-shot policies) or at every decode step (decode-time ones), and the model\n"
           "decodes on the compressed cache: only the kept tokens are in it. A reference continuation (the\n"
           "full cache's greedy output of --steps tokens, or --reference) is teacher-forced through every\n"
           "configuration and compared with the full cache on the same tokens: per step KL(full ||\n"
           "compressed) of the next-token distribution, top-1 agreement, the first step whose top-1\n"
           "differs (with the default reference: where greedy decoding leaves the full cache's output),\n"
           "and the NLL of the reference. A configuration that keeps every token computes the full\n"
           "cache's floats exactly (KL 0, agreement 1). The prefill is shared by every configuration.\n"
           "Results: TSV (and JSON) with replay's provenance preamble and policy labels, one summary row\n"
           "(step 'all') per policy x budget, then one row per step. README.md, \"Closed-loop\n"
           "evaluation\", explains the columns and how they compare with replay's.\n"
           "\n"
           "arguments:\n"
           "  MODEL        a GGUF file, a Hugging Face folder or a llama2.c checkpoint (as kvsim capture)\n"
           "  PROMPT       the prompt text, or @FILE for a file's text (not with --ids); documents\n"
           "               separated by <|endoftext|> lines become segments, as in kvsim capture\n"
           "  POLICIES     comma list of policy specs or presets, or 'all' (as kvsim replay; 'all'\n"
           "               leaves out policies that need segments when the prompt has none)\n"
           "  BUDGETS      comma list: 128 (tokens per head, window included), 0.25 or 25%% (fraction of\n"
           "               the prompt), cr:0.75, seq:65536 (as kvsim replay)\n"
           "\n"
           "options:\n"
           "  -o, --output FILE    results as TSV (default: standard output)\n"
           "      --json FILE      also as JSON (default: none)\n"
           "  -n, --steps N        reference tokens: the full cache's greedy output (default 32)\n"
           "      --reference T    teacher-force this text instead (T, or @FILE); its tokens set N\n"
           "  -z, --tokenizer F    tokenizer (default: the checkpoint's own)\n"
           "      --ids FILE       the prompt as token ids (then PROMPT is left out)\n"
           "      --chat           wrap PROMPT in the model's chat template (as kvsim capture --chat)\n"
           "      --system TEXT    with --chat: the system message (default: the template's own)\n"
           "      --segments S     auto, none or token offsets i,j,k (default auto)\n"
           "      --no-step-rows   only the summary row of each configuration (default: also per step)\n"
           "      --seed N         seed of randomised policies (default 0)\n"
           "      --backend NAME   cpu, cuda or auto (default auto)\n"
           "      --threads N      CPU threads (default: all cores)\n"
           "  -q, --quiet          no progress on stderr\n"
           "  -h, --help           this help\n"
           "\n"
           "example:\n"
           "  kvsim eval SmolLM2-135M-Instruct.Q4_1.gguf @prompt.txt 'streaming_llm,snapkv,h2o' 64,256 -o eval.tsv\n");
}

/* Policies and budgets as replay parses them: malformed lists are usage errors (status 2). */
static int parse_pb(const char *cmd, const char *pl, const char *bl, kv_policy_t ***pols, int *n_pol, kv_budget_t **bud,
                    int *n_bud)
{
    if (kv_policy_create_list(pl, pols, n_pol) != KV_OK)
        return kv_cli_usage_error(cmd, "POLICIES: %s", kv_last_error());
    if (kv_budget_parse_list(bl, bud, n_bud) != KV_OK)
        return kv_cli_usage_error(cmd, "BUDGETS: %s", kv_last_error());
    return 0;
}

int kv_cmd_eval(int argc, char **argv)
{
    static const struct option opts[] = {
        {"output", required_argument, 0, 'o'},
        {"json", required_argument, 0, OPT_JSON},
        {"steps", required_argument, 0, 'n'},
        {"reference", required_argument, 0, OPT_REF},
        {"tokenizer", required_argument, 0, 'z'},
        {"ids", required_argument, 0, OPT_IDS},
        {"chat", no_argument, 0, OPT_CHAT},
        {"system", required_argument, 0, OPT_SYSTEM},
        {"segments", required_argument, 0, OPT_SEGMENTS},
        {"no-step-rows", no_argument, 0, OPT_NO_STEPS},
        {"seed", required_argument, 0, OPT_SEED},
        {"backend", required_argument, 0, OPT_BACKEND},
        {"threads", required_argument, 0, OPT_THREADS},
        {"quiet", no_argument, 0, 'q'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    char cmd[2048];
    kv_cli_command_line(cmd, sizeof cmd, argc, argv);
    kv_eval_opts_t o;
    kv_eval_opts_init(&o);
    o.command = cmd;
    const char *out = "-", *json = NULL, *ids_path = NULL, *ref_arg = NULL;
    long v;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":o:n:z:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'o': out = optarg; break;
        case OPT_JSON: json = optarg; break;
        case 'n':
            if (kv_cli_int("eval", "--steps", optarg, 1, 1 << 20, &v))
                return 2;
            o.steps = (int)v;
            break;
        case OPT_REF: ref_arg = optarg; break;
        case 'z': o.tokenizer_path = optarg; break;
        case OPT_IDS: ids_path = optarg; break;
        case OPT_CHAT: o.chat = 1; break;
        case OPT_SYSTEM: o.system = optarg; break;
        case OPT_SEGMENTS: o.segments = optarg; break;
        case OPT_NO_STEPS: o.step_rows = 0; break;
        case OPT_SEED:
            if (kv_cli_int("eval", "--seed", optarg, 0, 0x7fffffffL, &v))
                return 2;
            o.seed = (uint64_t)v;
            break;
        case OPT_BACKEND: o.backend = optarg; break;
        case OPT_THREADS:
            if (kv_cli_int("eval", "--threads", optarg, 1, 1024, &v))
                return 2;
            o.n_threads = (int)v;
            break;
        case 'q':
            o.quiet = 1;
            kv_log_set_level(KV_LOG_QUIET);
            break;
        case 'h': eval_help(); return 0;
        default: return kv_cli_bad_option("eval", c, argv);
        }
    }
    const int want = ids_path ? 3 : 4;
    if (argc - optind != want)
        return kv_cli_usage_error("eval", "expected MODEL %sPOLICIES BUDGETS, got %d argument%s",
                                  ids_path ? "" : "PROMPT ", argc - optind, argc - optind == 1 ? "" : "s");
    if (o.system && !o.chat)
        return kv_cli_usage_error("eval", "--system needs --chat");
    if (ids_path && o.chat)
        return kv_cli_usage_error("eval", "--ids replaces the prompt text: it goes without --chat");
    o.model_path = argv[optind];
    const char *pl = argv[optind + want - 2], *bl = argv[optind + want - 1];
    kv_policy_t **pols = NULL;
    kv_budget_t *bud = NULL;
    int n_pol = 0, n_bud = 0, status = 1;
    char *prompt = NULL, *ref = NULL;
    int32_t *ids = NULL;
    kv_otable_t *t = NULL;
    int u = parse_pb("eval", pl, bl, &pols, &n_pol, &bud, &n_bud);
    if (u) {
        status = u;
        goto done;
    }
    const char *in[4] = {o.model_path, !ids_path && argv[optind + 1][0] == '@' ? argv[optind + 1] + 1 : ids_path,
                         ref_arg && ref_arg[0] == '@' ? ref_arg + 1 : NULL, o.tokenizer_path};
    if (check_outputs(out, json, in)) {
        status = kv_cli_fail("eval");
        goto done;
    }
    if ((ids_path ? kv_ids_read(ids_path, &ids, &o.n_ids) : text_arg(argv[optind + 1], &prompt)) ||
        (ref_arg && text_arg(ref_arg, &ref))) {
        status = kv_cli_fail("eval");
        goto done;
    }
    o.ids = ids;
    o.prompt = prompt;
    o.reference = ref;
    {
        const int given = o.segments && strcmp(o.segments, "auto") && strcmp(o.segments, "none");
        const int has_seg = given || (prompt && !o.chat && strstr(prompt, KV_DOC_SEPARATOR) &&
                                      !(o.segments && !strcmp(o.segments, "none")));
        kv_cli_skip_unrunnable(pl, has_seg, 1, "the prompt", pols, &n_pol);
    }
    o.pols = pols;
    o.n_pol = n_pol;
    o.budgets = bud;
    o.n_budgets = n_bud;
    kv_info("eval: %s, %d polic%s x %d budget%s", o.model_path, n_pol, n_pol == 1 ? "y" : "ies", n_bud,
            n_bud == 1 ? "" : "s");
    double t0 = kv_now();
    if (kv_eval_run(&o, &t) != KV_OK || kv_otable_write(t, out, json) != KV_OK) {
        status = kv_cli_fail("eval");
        goto done;
    }
    if (strcmp(out, "-"))
        kv_info("eval: %zu rows in %.1f s -> %s%s%s", kv_otable_rows(t), kv_now() - t0, out, json ? ", " : "",
                json ? json : "");
    status = 0;
done:
    for (int i = 0; i < n_pol; i++)
        kv_policy_free(pols[i]);
    kv_free(pols);
    kv_free(bud);
    kv_free(prompt);
    kv_free(ref);
    kv_free(ids);
    kv_otable_free(t);
    return status;
}

/* ---------------------------------------------------------------- niah */

static void niah_help(void)
{
    printf("usage: kvsim niah MODEL [POLICIES BUDGETS] [options]\n"
           "\n"
           "Needle in a haystack, closed loop: prompts of several lengths hide a needle sentence with a\n"
           "key (a 5-digit number, new in every cell) at several depths of a filler text and ask for it;\n"
           "the full cache and every policy x budget answer greedily with their own cache, and an answer\n"
           "retrieves the needle when it contains the key. Each prompt is prefilled once for all\n"
           "configurations. The filler is the passkey test's (\"The grass is green. The sky is blue. ...\")\n"
           "or --haystack's sentences, repeated as needed; with the model's chat template (when it has\n"
           "one) the question asks for the number, without it the prompt ends \"The pass key is\". Results:\n"
           "one row per cell and configuration (the full cache's with budget 'none'), with the answer, then\n"
           "one summary row per configuration (length and depth 'all': found = share retrieved). kvsim\n"
           "analyze draws the length x depth grid per policy and the scores per budget.\n"
           "\n"
           "arguments:\n"
           "  MODEL        a GGUF file, a Hugging Face folder or a llama2.c checkpoint (with -z)\n"
           "  POLICIES     comma list of policy specs or presets (default: none, the full cache alone)\n"
           "  BUDGETS      comma list of budgets as kvsim replay takes them (with POLICIES)\n"
           "\n"
           "options:\n"
           "  -o, --output FILE    results as TSV (default: standard output)\n"
           "      --json FILE      also as JSON (default: none)\n"
           "      --lengths LIST   prompt lengths in tokens, chat template included (default\n"
           "                       256,512,1024,2048; each prompt is the longest within its length)\n"
           "      --depths LIST    needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)\n"
           "      --haystack FILE  filler text (default: the passkey test's filler sentences)\n"
           "      --needle TEXT    the needle, {key} for the key (default \"The pass key is {key}. Remember\n"
           "                       it. {key} is the pass key.\")\n"
           "      --question TEXT  with the chat template (default \"What is the pass key? Answer with the\n"
           "                       number only.\")\n"
           "      --chat, --no-chat  use the model's chat template or not (default: when it has one)\n"
           "      --max-new N      answer tokens (default 16)\n"
           "  -z, --tokenizer F    tokenizer (default: the checkpoint's own)\n"
           "      --seed N         seed of the keys and of randomised policies (default 0)\n"
           "      --backend NAME   cpu, cuda or auto (default auto)\n"
           "      --threads N      CPU threads (default: all cores)\n"
           "  -q, --quiet          no progress on stderr\n"
           "  -h, --help           this help\n"
           "\n"
           "example:\n"
           "  kvsim niah SmolLM2-135M-Instruct.Q4_1.gguf 'snapkv,pyramidkv,streaming_llm' 64,128 -o niah.tsv\n");
}

/* A comma list of integers in [lo, hi] (at most max). */
static int int_list(const char *opt, const char *s, long lo, long hi, int *out, int max, int *n)
{
    *n = 0;
    for (const char *p = s; *p;) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || (*end && *end != ',') || v < lo || v > hi || *n == max)
            return kv_cli_usage_error("niah", "%s expects a comma list of at most %d integers in [%ld, %ld], got '%s'",
                                      opt, max, lo, hi, s);
        out[(*n)++] = (int)v;
        p = *end ? end + 1 : end;
    }
    return *n ? 0 : kv_cli_usage_error("niah", "%s is empty", opt);
}

static int frac_list(const char *opt, const char *s, double *out, int max, int *n)
{
    *n = 0;
    for (const char *p = s; *p;) {
        char *end;
        double v = strtod(p, &end);
        if (end == p || (*end && *end != ',') || !(v >= 0 && v <= 1) || *n == max)
            return kv_cli_usage_error("niah", "%s expects a comma list of at most %d numbers in [0, 1], got '%s'", opt,
                                      max, s);
        out[(*n)++] = v;
        p = *end ? end + 1 : end;
    }
    return *n ? 0 : kv_cli_usage_error("niah", "%s is empty", opt);
}

int kv_cmd_niah(int argc, char **argv)
{
    static const struct option opts[] = {
        {"output", required_argument, 0, 'o'},
        {"json", required_argument, 0, OPT_JSON},
        {"lengths", required_argument, 0, OPT_LENGTHS},
        {"depths", required_argument, 0, OPT_DEPTHS},
        {"haystack", required_argument, 0, OPT_HAYSTACK},
        {"needle", required_argument, 0, OPT_NEEDLE},
        {"question", required_argument, 0, OPT_QUESTION},
        {"chat", no_argument, 0, OPT_CHAT},
        {"no-chat", no_argument, 0, OPT_NO_CHAT},
        {"max-new", required_argument, 0, OPT_MAX_NEW},
        {"tokenizer", required_argument, 0, 'z'},
        {"seed", required_argument, 0, OPT_SEED},
        {"backend", required_argument, 0, OPT_BACKEND},
        {"threads", required_argument, 0, OPT_THREADS},
        {"quiet", no_argument, 0, 'q'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    char cmd[2048];
    kv_cli_command_line(cmd, sizeof cmd, argc, argv);
    kv_niah_opts_t o;
    kv_niah_opts_init(&o);
    o.command = cmd;
    const char *out = "-", *json = NULL;
    int lengths[64], n_len = 0, n_dep = 0, c, u;
    double depths[64];
    long v;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":o:z:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'o': out = optarg; break;
        case OPT_JSON: json = optarg; break;
        case OPT_LENGTHS:
            if ((u = int_list("--lengths", optarg, 1, 1 << 20, lengths, 64, &n_len)))
                return u;
            o.lengths = lengths;
            o.n_lengths = n_len;
            break;
        case OPT_DEPTHS:
            if ((u = frac_list("--depths", optarg, depths, 64, &n_dep)))
                return u;
            o.depths = depths;
            o.n_depths = n_dep;
            break;
        case OPT_HAYSTACK: o.haystack_path = optarg; break;
        case OPT_NEEDLE:
            if (!strstr(optarg, "{key}"))
                return kv_cli_usage_error("niah", "--needle must hold {key} (where the key goes)");
            o.needle = optarg;
            break;
        case OPT_QUESTION: o.question = optarg; break;
        case OPT_CHAT: o.chat = 1; break;
        case OPT_NO_CHAT: o.chat = 0; break;
        case OPT_MAX_NEW:
            if (kv_cli_int("niah", "--max-new", optarg, 1, 4096, &v))
                return 2;
            o.max_new = (int)v;
            break;
        case 'z': o.tokenizer_path = optarg; break;
        case OPT_SEED:
            if (kv_cli_int("niah", "--seed", optarg, 0, 0x7fffffffL, &v))
                return 2;
            o.seed = (uint64_t)v;
            break;
        case OPT_BACKEND: o.backend = optarg; break;
        case OPT_THREADS:
            if (kv_cli_int("niah", "--threads", optarg, 1, 1024, &v))
                return 2;
            o.n_threads = (int)v;
            break;
        case 'q':
            o.quiet = 1;
            kv_log_set_level(KV_LOG_QUIET);
            break;
        case 'h': niah_help(); return 0;
        default: return kv_cli_bad_option("niah", c, argv);
        }
    }
    const int npos = argc - optind;
    if (npos != 1 && npos != 3)
        return kv_cli_usage_error("niah", "expected MODEL [POLICIES BUDGETS], got %d argument%s", npos,
                                  npos == 1 ? "" : "s");
    o.model_path = argv[optind];
    kv_policy_t **pols = NULL;
    kv_budget_t *bud = NULL;
    int n_pol = 0, n_bud = 0, status = 1;
    kv_otable_t *t = NULL;
    if (npos == 3 && (u = parse_pb("niah", argv[optind + 1], argv[optind + 2], &pols, &n_pol, &bud, &n_bud))) {
        status = u;
        goto done;
    }
    if (npos == 3)
        kv_cli_skip_unrunnable(argv[optind + 1], 0, 1, "a needle prompt", pols, &n_pol);
    const char *in[4] = {o.model_path, o.haystack_path, o.tokenizer_path, NULL};
    if (check_outputs(out, json, in)) {
        status = kv_cli_fail("niah");
        goto done;
    }
    o.pols = pols;
    o.n_pol = n_pol;
    o.budgets = bud;
    o.n_budgets = n_bud;
    kv_info("niah: %s, %d length%s x %d depth%s, the full cache and %d polic%s x %d budget%s", o.model_path,
            o.n_lengths, o.n_lengths == 1 ? "" : "s", o.n_depths, o.n_depths == 1 ? "" : "s", n_pol,
            n_pol == 1 ? "y" : "ies", n_bud, n_bud == 1 ? "" : "s");
    double t0 = kv_now();
    if (kv_niah_run(&o, &t) != KV_OK || kv_otable_write(t, out, json) != KV_OK) {
        status = kv_cli_fail("niah");
        goto done;
    }
    if (strcmp(out, "-"))
        kv_info("niah: %zu rows in %.1f s -> %s", kv_otable_rows(t), kv_now() - t0, out);
    status = 0;
done:
    for (int i = 0; i < n_pol; i++)
        kv_policy_free(pols[i]);
    kv_free(pols);
    kv_free(bud);
    kv_otable_free(t);
    return status;
}
