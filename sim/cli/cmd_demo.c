/*
 * cmd_demo.c: `kvsim demo [-o out/demo]` (what `make demo` runs): capture, replay and analyze in one
 * process, on the default real model, in seconds.
 *
 *   1. The model: stories260K (Karpathy's tinyllamas, a real Llama-architecture model trained on
 *      TinyStories), looked for in ../shared/models/stories260K/, ./models/stories260K/ and
 *      $KVSIM_MODELS (the folder itself or its stories260K/ subfolder); every copy must match the
 *      published sha256 (a same-size copy with rearranged weights circulates). When none is found it
 *      is downloaded from the model's public home with curl or wget, when either exists, into
 *      ./models/stories260K/ and checked the same way. Failing all that, the demo runs on a
 *      synthetic trace and says so loudly on stderr and at the top of the report.
 *   2. The prompt: real TinyStories text (../shared/data/tinystories_sample.txt, stories separated by
 *      <|endoftext|> lines), as many whole stories as fit the model's context minus the decode
 *      tokens, each its own segment; when only one story fits, its paragraphs are the segments (so
 *      segment-based policies and the in-segment statistics have something to work with). Without
 *      the file, a short built-in text.
 *   3. Capture (traces/capture), replay of every registered policy at budgets 16, 32, 64 and 128
 *      tokens per head (sim/replay), analyze (analyze/): everything lands in the output folder:
 *      trace.h5, results.tsv, the figures, report.md and report.html.
 * Library calls throughout; the only child processes are the downloader's.
 */
#include "analyze/kv_analyze.h"
#include "sim/cli/cli.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/kv_policy.h"
#include "sim/replay.h"
#include "sim/result.h"
#include "traces/capture/kv_capture.h"
#include "traces/capture/kv_eval.h"
#include "traces/capture/kv_model.h"
#include "traces/capture/kv_tokenizer.h"
#include "traces/kv_synth.h"

#include <errno.h>
#include <getopt.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

/* The published checksums (../shared/models/stories260K/PROVENANCE.md). */
#define SHA_MODEL "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696"
#define SHA_TOKENIZER "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312"
#define MODEL_HOME "https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K/"

/* A short text of our own for when the TinyStories sample is absent; its paragraphs become segments. */
static const char BUILTIN_TEXT[] =
    "Once upon a time, a little fox named Pip lived near a quiet river. Every morning Pip ran to the water "
    "to watch the fish jump and to listen to the birds.\n"
    "One day Pip found a shiny red ball in the grass. He pushed it with his nose and it rolled all the way to "
    "the old oak tree. A small rabbit peeked out and asked if she could play too.\n"
    "Pip said yes. The fox and the rabbit played with the red ball until the sun went down. Then they sat by "
    "the river and watched the stars come out, one by one.\n"
    "From that day on, Pip and the rabbit met by the oak tree every morning, and the red ball was their "
    "favourite toy.";

static void help(void)
{
    printf("usage: kvsim demo [-o DIR] [options]\n"
           "\n"
           "Capture an attention trace of the stories260K model (a real Llama-architecture model trained on\n"
           "TinyStories) on real story text, replay every registered eviction policy at several budgets,\n"
           "and write figures and a report, all in one process (make demo runs kvsim demo -o out/demo).\n"
           "The model is looked for in ../shared/models/stories260K/, ./models/stories260K/ and\n"
           "$KVSIM_MODELS (relative to the current folder; checked against its published sha256); when\n"
           "absent it is downloaded with curl or wget into ./models/stories260K/ from\n"
           "  %s\n"
           "Without any, the demo uses a synthetic trace and says so on stderr and in the report. The\n"
           "report names the kvsim capture, replay and analyze commands that redo each step.\n"
           "\n"
           "options:\n"
           "  -o, --output DIR     output folder (default out/demo): trace.h5, prompt.txt, results.tsv,\n"
           "                       figures, report.md, report.html\n"
           "      --budgets LIST   budgets in tokens per head (default 48,64,96,128: above\n"
           "                       the 32-token window SnapKV and its family always keep)\n"
           "      --policies LIST  policies to replay (default all)\n"
           "      --decode N       greedy decode tokens after the prompt (default 64)\n"
           "      --synthetic      use a synthetic trace even when the model is available\n"
           "      --no-download    never try to download the model (default: try when it is missing)\n"
           "      --format F       figures as png (default), svg or pdf\n"
           "      --backend NAME   cpu, cuda or auto (default auto)\n"
           "      --threads N      CPU threads (default 1: the demo's tensors are tiny)\n"
           "  -q, --quiet          no progress on stderr\n"
           "  -h, --help           this help\n"
           "\n"
           "example:\n"
           "  kvsim demo -o out/demo --budgets 16,64 --policies 'snapkv,pyramidkv,adakv'\n",
           MODEL_HOME);
}

/* ---------------------------------------------------------------- the model */

typedef struct {
    char model[1024], tokenizer[1024];
} model_files_t;

static int readable(const char *p)
{
    return access(p, R_OK) == 0;
}

/* 1 when the file has the expected sha256. */
static int sha_ok(const char *path, const char *want)
{
    char got[65];
    if (kv_sha256_file(path, got) != KV_OK)
        return 0;
    if (strcmp(got, want)) {
        kv_warn("%s: sha256 %.16s... is not the published %.16s...; not using it", path, got, want);
        return 0;
    }
    return 1;
}

static int try_folder(const char *dir, model_files_t *mf)
{
    char m[1024], t[1024];
    snprintf(m, sizeof m, "%s/stories260K.bin", dir);
    snprintf(t, sizeof t, "%s/tok512.bin", dir);
    if (!readable(m) || !readable(t))
        return 0;
    if (!sha_ok(m, SHA_MODEL) || !sha_ok(t, SHA_TOKENIZER))
        return 0;
    snprintf(mf->model, sizeof mf->model, "%s", m);
    snprintf(mf->tokenizer, sizeof mf->tokenizer, "%s", t);
    return 1;
}

/* Full path of a program found on $PATH into buf, or NULL. */
static const char *which(const char *prog, char *buf, size_t len)
{
    const char *path = getenv("PATH");
    if (!path)
        return NULL;
    while (*path) {
        const char *c = strchr(path, ':');
        size_t n = c ? (size_t)(c - path) : strlen(path);
        if (n > 0 && n < len - strlen(prog) - 2) {
            snprintf(buf, len, "%.*s/%s", (int)n, path, prog);
            if (access(buf, X_OK) == 0)
                return buf;
        }
        path += n + (c ? 1 : 0);
    }
    return NULL;
}

/* Download url to path (via path.part) with curl or wget, then check its sha256. */
static int download(const char *url, const char *path, const char *sha, char *why, size_t wlen)
{
    char tool[1024], part[1100];
    snprintf(part, sizeof part, "%s.part", path);
    const int curl = which("curl", tool, sizeof tool) != NULL;
    if (!curl && !which("wget", tool, sizeof tool)) {
        snprintf(why, wlen, "neither curl nor wget is installed");
        return 0;
    }
    char *argv_curl[] = {"curl", "-fsSL", "--connect-timeout", "10", "--max-time", "120",
                         "-o",   part,    (char *)url,         NULL};
    char *argv_wget[] = {"wget", "-q", "-T", "30", "-t", "2", "-O", part, (char *)url, NULL};
    pid_t pid;
    int st = 0;
    kv_info("demo: downloading %s", url);
    if (posix_spawn(&pid, tool, NULL, NULL, curl ? argv_curl : argv_wget, environ) != 0) {
        snprintf(why, wlen, "cannot run %s: %s", tool, strerror(errno));
        return 0;
    }
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        unlink(part);
        snprintf(why, wlen, "%s %s failed (exit status %d; no network?)", curl ? "curl" : "wget", url,
                 WIFEXITED(st) ? WEXITSTATUS(st) : -1);
        return 0;
    }
    char got[65] = "";
    if (kv_sha256_file(part, got) != KV_OK || strcmp(got, sha)) {
        unlink(part);
        snprintf(why, wlen, "%s: downloaded file has sha256 %.16s..., expected %.16s...", url, got, sha);
        return 0;
    }
    if (rename(part, path) != 0) {
        unlink(part);
        snprintf(why, wlen, "%s: %s", path, strerror(errno));
        return 0;
    }
    return 1;
}

/* Find (or fetch) the model; why gets the reasons when it fails. */
static int find_model(model_files_t *mf, int allow_download, char *why, size_t wlen)
{
    char looked[2048] = "";
    const char *env = getenv("KVSIM_MODELS");
    char envsub[1024] = "";
    if (env && *env)
        snprintf(envsub, sizeof envsub, "%s/stories260K", env);
    const char *dirs[] = {"../shared/models/stories260K", "models/stories260K", envsub[0] ? envsub : NULL,
                          env && *env ? env : NULL};
    for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
        if (!dirs[i])
            continue;
        if (try_folder(dirs[i], mf))
            return 1;
        size_t u = strlen(looked);
        snprintf(looked + u, sizeof looked - u, "%s%s", u ? ", " : "", dirs[i]);
    }
    if (!allow_download) {
        snprintf(why, wlen, "no stories260K model in %s (downloads disabled)", looked);
        return 0;
    }
    mkdir("models", 0755);
    mkdir("models/stories260K", 0755);
    snprintf(mf->model, sizeof mf->model, "models/stories260K/stories260K.bin");
    snprintf(mf->tokenizer, sizeof mf->tokenizer, "models/stories260K/tok512.bin");
    char dl[512] = "";
    if (download(MODEL_HOME "stories260K.bin", mf->model, SHA_MODEL, dl, sizeof dl) &&
        download(MODEL_HOME "tok512.bin", mf->tokenizer, SHA_TOKENIZER, dl, sizeof dl))
        return 1;
    snprintf(why, wlen, "no stories260K model in %s, and the download failed: %s", looked, dl);
    rmdir("models/stories260K"); /* only when empty: nothing of ours is left behind */
    rmdir("models");
    return 0;
}

/* ---------------------------------------------------------------- the prompt */

static char *read_text(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 1 << 16, n = 0;
    char *b = kv_malloc(cap + 1, "text");
    while (b) {
        size_t r = fread(b + n, 1, cap - n, f);
        n += r;
        if (n < cap)
            break;
        cap *= 2;
        char *nb = kv_realloc(b, cap + 1, "text");
        if (!nb) {
            kv_free(b);
            b = NULL;
        } else
            b = nb;
    }
    fclose(f);
    if (b)
        b[n] = 0;
    return b;
}

/* Tokens of one document as capture sees it (BOS included). */
static int doc_tokens(const kv_tokenizer_t *tok, const char *text, size_t len)
{
    int32_t *ids = NULL;
    int n = 0;
    if (kv_tokenizer_encode(tok, text, len, 1, 0, &ids, &n) != KV_OK)
        return -1;
    kv_free(ids);
    return n;
}

/* Token offsets where the paragraphs (lines) of `text` after the first start, as "i,j,k" (empty when
 * there is only one paragraph). Offsets come from decoding the whole-text encoding token by token:
 * decode(encode(text)) is the text, so the running byte count gives each token's first byte, and a
 * paragraph starts at the first token at or after its first byte. */
static int paragraph_segments(const kv_tokenizer_t *tok, const char *text, char *out, size_t len, int *n_seg)
{
    out[0] = 0;
    *n_seg = 1;
    int32_t *ids = NULL;
    int n = 0;
    int rc = kv_tokenizer_encode(tok, text, strlen(text), 1, 0, &ids, &n);
    if (rc)
        return rc;
    size_t *start = kv_malloc(sizeof(size_t) * (size_t)(n + 1), "token offsets");
    if (!start) {
        kv_free(ids);
        return KV_ENOMEM;
    }
    size_t pos = 0;
    for (int t = 0; t < n; t++) {
        size_t bl = 0;
        if (ids[t] != tok->bos_id)
            kv_tokenizer_decode(tok, t ? ids[t - 1] : -1, ids[t], &bl);
        start[t] = pos;
        pos += bl;
    }
    if (pos == strlen(text)) { /* else decoding did not reproduce the text: no paragraph segments */
        size_t k = 0;
        int last = 0, t = 0;
        for (const char *nl = strchr(text, '\n'); nl; nl = strchr(nl + 1, '\n')) {
            if (nl[1] == 0 || nl[1] == '\n')
                continue;
            const size_t b = (size_t)(nl + 1 - text);
            while (t < n && start[t] < b)
                t++;
            if (t < n && t > last && k + 16 < len) {
                k += (size_t)snprintf(out + k, len - k, "%s%d", k ? "," : "", t);
                last = t;
                (*n_seg)++;
            }
        }
    }
    kv_free(start);
    kv_free(ids);
    return KV_OK;
}

typedef struct {
    char *text;          /* the prompt (owned) */
    char segments[1024]; /* capture's --segments value */
    char desc[512];      /* for the report */
} prompt_t;

static int build_prompt(const kv_tokenizer_t *tok, int room, prompt_t *pr)
{
    memset(pr, 0, sizeof *pr);
    const char *paths[] = {"../shared/data/tinystories_sample.txt", "data/tinystories_sample.txt"};
    char *all = NULL;
    const char *src = NULL;
    for (size_t i = 0; i < 2 && !all; i++)
        if ((all = read_text(paths[i])))
            src = paths[i];
    kv_doc_t *docs = NULL;
    int nd = 0, rc;
    if (all && (rc = kv_split_docs(all, strlen(all), &docs, &nd))) {
        kv_free(all);
        return rc;
    }
    /* whole stories, in file order, skipping any that would overflow */
    int used = 0, taken = 0;
    size_t bytes = 0;
    int *take = kv_calloc((size_t)(nd > 0 ? nd : 1), sizeof(int), "stories");
    if (!take) {
        kv_free(docs);
        kv_free(all);
        return KV_ENOMEM;
    }
    for (int d = 0; d < nd; d++) {
        int n = doc_tokens(tok, docs[d].text, docs[d].len);
        if (n > 0 && used + n <= room) {
            take[d] = 1;
            used += n;
            taken++;
            bytes += docs[d].len + 32;
        }
    }
    rc = KV_OK;
    if (taken >= 2) {
        pr->text = kv_malloc(bytes + 1, "prompt");
        if (!pr->text)
            rc = KV_ENOMEM;
        else {
            size_t k = 0;
            int first = 1;
            for (int d = 0; d < nd; d++)
                if (take[d]) {
                    k += (size_t)snprintf(pr->text + k, bytes + 1 - k, "%s%.*s", first ? "" : "\n<|endoftext|>\n",
                                          (int)docs[d].len, docs[d].text);
                    first = 0;
                }
            snprintf(pr->segments, sizeof pr->segments, "auto");
            snprintf(pr->desc, sizeof pr->desc, "%d whole stories from %s (%d prompt tokens), one segment each", taken,
                     src, used);
        }
    } else {
        const char *body = NULL;
        size_t blen = 0;
        if (taken == 1)
            for (int d = 0; d < nd; d++)
                if (take[d]) {
                    body = docs[d].text;
                    blen = docs[d].len;
                }
        if (!body) {
            body = BUILTIN_TEXT;
            blen = strlen(BUILTIN_TEXT);
        }
        pr->text = kv_malloc(blen + 1, "prompt");
        if (!pr->text)
            rc = KV_ENOMEM;
        else {
            memcpy(pr->text, body, blen);
            pr->text[blen] = 0;
            int ns = 1;
            rc = paragraph_segments(tok, pr->text, pr->segments, sizeof pr->segments, &ns);
            if (!pr->segments[0])
                snprintf(pr->segments, sizeof pr->segments, "none");
            int nt = doc_tokens(tok, pr->text, strlen(pr->text));
            if (body == BUILTIN_TEXT)
                snprintf(pr->desc, sizeof pr->desc,
                         "kvsim's built-in short story (%d prompt tokens; %s not found), its %d paragraphs as segments",
                         nt, paths[0], ns);
            else
                snprintf(pr->desc, sizeof pr->desc,
                         "1 whole story from %s (%d prompt tokens; no second story fits the context), its %d "
                         "paragraphs as segments",
                         src, nt, ns);
        }
    }
    kv_free(take);
    kv_free(docs);
    kv_free(all);
    return rc;
}

/* ---------------------------------------------------------------- the run */

int kv_cmd_demo(int argc, char **argv)
{
    static const struct option opts[] = {
        {"output", required_argument, 0, 'o'},   {"budgets", required_argument, 0, 'B'},
        {"policies", required_argument, 0, 'P'}, {"decode", required_argument, 0, 'd'},
        {"synthetic", no_argument, 0, 'S'},      {"no-download", no_argument, 0, 'N'},
        {"format", required_argument, 0, 'f'},   {"backend", required_argument, 0, 'b'},
        {"threads", required_argument, 0, 't'},  {"quiet", no_argument, 0, 'q'},
        {"help", no_argument, 0, 'h'},           {0, 0, 0, 0},
    };
    const char *out_dir = "out/demo", *budgets = "48,64,96,128", *policies = "all", *backend = "auto", *format = "png";
    int synthetic = 0, allow_download = 1, quiet = 0, c;
    /* One thread by default: the demo's tensors are tiny (stories260K has head_dim 8), so a second
     * thread only adds synchronisation, and OpenMP/BLAS threads that spin-wait make every stage
     * several times slower when the machine is busy (measured on the 2-core machine at load 4:
     * 16 s with two threads, 2.3 s with one). Results do not depend on it. */
    long v, n_decode = 64, threads = 1;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":o:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'o': out_dir = optarg; break;
        case 'B': budgets = optarg; break;
        case 'P': policies = optarg; break;
        case 'd':
            if (kv_cli_int("demo", "--decode", optarg, 1, 1 << 16, &v))
                return 2;
            n_decode = v;
            break;
        case 'S': synthetic = 1; break;
        case 'N': allow_download = 0; break;
        case 'f':
            if (strcmp(optarg, "png") && strcmp(optarg, "svg") && strcmp(optarg, "pdf"))
                return kv_cli_usage_error("demo", "--format expects png, svg or pdf, got '%s'", optarg);
            format = optarg;
            break;
        case 'b': backend = optarg; break;
        case 't':
            if (kv_cli_int("demo", "--threads", optarg, 1, 1024, &threads))
                return 2;
            break;
        case 'q':
            quiet = 1;
            kv_log_set_level(KV_LOG_QUIET);
            break;
        case 'h': help(); return 0;
        default: return kv_cli_bad_option("demo", c, argv);
        }
    }
    if (optind != argc)
        return kv_cli_usage_error("demo", "unexpected argument '%s'", argv[optind]);

    const double t0 = kv_now();
    int rc = 1;
    char trace_path[1100], results_path[1100], prompt_path[1100], note[1024] = "", info[6144] = "", why[1024] = "";
    kv_policy_t **pols = NULL;
    int n_pol = 0, n_bud = 0;
    kv_budget_t *bud = NULL;
    kv_tokenizer_t *tok = NULL;
    kv_model_t *model = NULL;
    kv_trace_t *t = NULL;
    kv_backend_t *be = NULL;
    kv_results_t *res = NULL;
    prompt_t pr = {0};
    /* validate the cheap things first */
    if (kv_policy_create_list(policies, &pols, &n_pol) != KV_OK) {
        rc = kv_cli_usage_error("demo", "--policies: %s", kv_last_error());
        goto done;
    }
    if (kv_budget_parse_list(budgets, &bud, &n_bud) != KV_OK) {
        rc = kv_cli_usage_error("demo", "--budgets: %s", kv_last_error());
        goto done;
    }
    {
        /* the output folder, parents included */
        char buf[1024];
        snprintf(buf, sizeof buf, "%s", out_dir);
        for (char *p = buf + 1; *p; p++)
            if (*p == '/') {
                *p = 0;
                mkdir(buf, 0755);
                *p = '/';
            }
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) {
            fprintf(stderr, "kvsim demo: %s: cannot create folder: %s\n", out_dir, strerror(errno));
            goto done;
        }
    }
    snprintf(trace_path, sizeof trace_path, "%s/trace.h5", out_dir);
    snprintf(results_path, sizeof results_path, "%s/results.tsv", out_dir);
    snprintf(prompt_path, sizeof prompt_path, "%s/prompt.txt", out_dir);

    /* the replay and analyze steps as command lines, quoted for the shell (for the report) */
    char rep_cmd[1400], ana_cmd[1400];
    snprintf(rep_cmd, sizeof rep_cmd, "kvsim replay");
    const char *rep_args[] = {trace_path, policies, budgets, "-o", results_path};
    for (size_t i = 0; i < KV_ARRAY_LEN(rep_args); i++)
        kv_cli_append_arg(rep_cmd, sizeof rep_cmd, rep_args[i]);
    snprintf(ana_cmd, sizeof ana_cmd, "kvsim analyze");
    const char *ana_args[] = {trace_path, results_path, "-o", out_dir};
    for (size_t i = 0; i < KV_ARRAY_LEN(ana_args); i++)
        kv_cli_append_arg(ana_cmd, sizeof ana_cmd, ana_args[i]);

    /* ---- 1. trace */
    model_files_t mf;
    int real = !synthetic && find_model(&mf, allow_download, why, sizeof why);
    if (synthetic)
        snprintf(why, sizeof why, "--synthetic was given");
    if (real) {
        kv_info("demo: model %s (tokenizer %s)", mf.model, mf.tokenizer);
        if (kv_model_load(mf.model, &model) != KV_OK ||
            kv_tokenizer_load(mf.tokenizer, model->cfg.vocab_size, &tok) != KV_OK) {
            rc = kv_cli_fail("demo");
            goto done;
        }
        const int room = model->cfg.seq_len - (int)n_decode;
        if (room < 16) {
            fprintf(stderr, "kvsim demo: --decode %ld leaves no room for a prompt in the model's %d-token context\n",
                    n_decode, model->cfg.seq_len);
            goto done;
        }
        if (build_prompt(tok, room, &pr) != KV_OK) {
            rc = kv_cli_fail("demo");
            goto done;
        }
        kv_info("demo: prompt: %s", pr.desc);
        /* the prompt beside the trace, so the capture can be re-run from the command line */
        FILE *pf = fopen(prompt_path, "w");
        if (!pf || fputs(pr.text, pf) < 0 || fclose(pf) != 0) {
            fprintf(stderr, "kvsim demo: %s: cannot write: %s\n", prompt_path, strerror(errno));
            goto done;
        }
        /* the command lines that redo each step, quoted for the shell: in the trace's generator
         * attribute and at the top of the report */
        char cap_cmd[1400], num[32];
        snprintf(num, sizeof num, "%ld", n_decode);
        snprintf(cap_cmd, sizeof cap_cmd, "kvsim capture");
        const char *cap_args[] = {"--decode",   num,  "--with-wo", "--segments", pr.segments, "-z",
                                  mf.tokenizer, "-i", NULL,        "-o",         trace_path,  mf.model};
        char at[1200];
        snprintf(at, sizeof at, "@%s", prompt_path);
        cap_args[8] = at;
        for (size_t i = 0; i < KV_ARRAY_LEN(cap_args); i++)
            kv_cli_append_arg(cap_cmd, sizeof cap_cmd, cap_args[i]);
        kv_capture_opts_t co;
        kv_capture_opts_init(&co);
        co.model_path = mf.model;
        co.tokenizer_path = mf.tokenizer;
        co.prompt = pr.text;
        co.out_path = trace_path;
        co.n_decode = (int)n_decode;
        co.with_wo = 1;
        co.segments = pr.segments;
        co.backend = backend;
        co.n_threads = (int)threads;
        co.generator = cap_cmd;
        kv_capture_result_t cr;
        if (kv_capture_run(&co, &cr) != KV_OK) {
            rc = kv_cli_fail("demo");
            goto done;
        }
        /* a story of one paragraph has no segments: 'all' then skips shotkv, as kvsim replay does */
        kv_cli_skip_unrunnable(policies, cr.n_segments, trace_path, pols, &n_pol);
        kv_info("demo: captured %s: %d prompt + %d decode tokens, %d segments (prefill %.2f s, decode %.2f s)",
                trace_path, cr.n_prompt, cr.n_tokens - cr.n_prompt, cr.n_segments, cr.prefill_s, cr.decode_s);
        snprintf(info, sizeof info,
                 "This demo captured the real stories260K model (%s: %d layers, %d query heads, %d KV heads, "
                 "head_dim %d, context %d) on %s, followed by %ld greedily decoded tokens, replayed %d "
                 "policies at budgets %s tokens per head against the decode queries, and analyzed the "
                 "result. The same from the command line, run in the folder the demo ran in: %s; %s; %s.",
                 mf.model, model->cfg.n_layers, model->cfg.n_heads, model->cfg.n_kv_heads, model->cfg.head_dim,
                 model->cfg.seq_len, pr.desc, n_decode, n_pol, budgets, cap_cmd, rep_cmd, ana_cmd);
    } else {
        snprintf(note, sizeof note,
                 "SYNTHETIC DATA: no real model was used (%s). This trace is generated with planted "
                 "structure (sinks, recent window, heavy hitters, segments, sharpening with depth); its "
                 "numbers illustrate the tools and say nothing about any real model. Put stories260K.bin and "
                 "tok512.bin in ./models/stories260K/ (or set KVSIM_MODELS) to run on the real model.",
                 why);
        /* on stderr even with --quiet: nobody should mistake these numbers for a model's */
        fprintf(stderr, "kvsim demo: warning: %s\n", note);
        kv_synth_params_t sp;
        kv_synth_defaults(&sp);
        sp.n_layers = 8;
        sp.n_heads = 8;
        sp.n_kv_heads = 2;
        sp.head_dim = 64;
        sp.n_decode = (int)n_decode;
        sp.n_tokens = 448 + (int)n_decode;
        sp.n_segments = 4;
        sp.summaries = KV_SYNTH_SUMMARIES_YES;
        snprintf(sp.backend, sizeof sp.backend, "%s", backend);
        sp.n_threads = (int)threads;
        if (kv_synth_write(&sp, trace_path, NULL) != KV_OK) {
            rc = kv_cli_fail("demo");
            goto done;
        }
        char label[1024];
        kv_synth_label(&sp, label, sizeof label);
        char syn_cmd[1400];
        snprintf(syn_cmd, sizeof syn_cmd, "kvsim synth");
        const char *syn_args[] = {"--params", label, "--summaries", "yes", "-o", trace_path};
        for (size_t i = 0; i < KV_ARRAY_LEN(syn_args); i++)
            kv_cli_append_arg(syn_cmd, sizeof syn_cmd, syn_args[i]);
        snprintf(info, sizeof info,
                 "This demo generated a synthetic trace (%s) with kvsim synth, replayed %d policies at budgets "
                 "%s tokens per head against its decode queries, and analyzed the result. The same from the "
                 "command line, run in the folder the demo ran in: %s; %s; %s.",
                 label, n_pol, budgets, syn_cmd, rep_cmd, ana_cmd);
    }

    /* ---- 2. replay */
    if (kv_trace_open(trace_path, &t) != KV_OK || kv_backend_open(backend, (int)threads, &be) != KV_OK) {
        rc = kv_cli_fail("demo");
        goto done;
    }
    char sha[65];
    if (kv_sha256_file(trace_path, sha) != KV_OK) {
        rc = kv_cli_fail("demo");
        goto done;
    }
    kv_info("demo: replaying %d policies x %d budgets (%s)", n_pol, n_bud, budgets);
    kv_cli_warn_window_budgets(kv_trace_meta(t), kv_trace_meta(t)->n_prompt, pols, n_pol, bud, n_bud);
    kv_replay_opts_t ro;
    kv_replay_defaults(&ro);
    ro.quiet = quiet;
    if (kv_replay(t, pols, n_pol, bud, n_bud, be, &ro, &res) != KV_OK) {
        rc = kv_cli_fail("demo");
        goto done;
    }
    {
        const kv_trace_meta_t *m = kv_trace_meta(t);
        char now[32], cmd[1600], ctx[96];
        kv_iso_time(now, sizeof now);
        snprintf(cmd, sizeof cmd, "kvsim demo, replaying as %s", rep_cmd);
        snprintf(ctx, sizeof ctx, "%d context tokens, %d evaluation queries", m->n_prompt, m->n_tokens - m->n_prompt);
        if (kv_results_add_prov(res, "tool", "kvsim " KV_VERSION) ||
            kv_results_add_prov(res, "git", kv_git_revision()) || kv_results_add_prov(res, "date", now) ||
            kv_results_add_prov(res, "command", cmd) || kv_results_add_prov(res, "trace", trace_path) ||
            kv_results_add_prov(res, "trace_sha256", sha) || kv_results_add_prov(res, "trace_source", m->source) ||
            kv_results_add_prov(res, "trace_model", m->model) ||
            kv_results_add_prov(res, "trace_dtype", m->dtype == KV_DTYPE_F16 ? "f16" : "f32") ||
            kv_results_add_prov(res, "evaluation", ctx) || kv_results_add_prov(res, "eval_tail", "0") ||
            kv_results_add_prov(res, "seed", "0") || kv_results_add_prov(res, "backend", be->device) ||
            kv_results_write_tsv(res, results_path) != KV_OK) {
            rc = kv_cli_fail("demo");
            goto done;
        }
        kv_info("demo: %zu result rows -> %s", res->n, results_path);
    }

    /* ---- 3. analyze */
    kv_analyze_opts_t ao;
    kv_analyze_opts_init(&ao);
    ao.out_dir = out_dir;
    ao.format = format;
    ao.quiet = quiet;
    ao.note = note[0] ? note : NULL;
    ao.demo_info = info;
    ao.title = real ? "kvsim demo: KV-cache eviction on stories260K" : "kvsim demo (SYNTHETIC trace)";
    const char *files[1] = {results_path};
    kv_analyze_out_t ares;
    if (kv_analyze_run(t, trace_path, files, 1, be, &ao, &ares) != KV_OK) {
        rc = kv_cli_fail("demo");
        goto done;
    }
    if (!real)
        fprintf(stderr, "kvsim demo: warning: the report is about a SYNTHETIC trace (%s)\n", why);
    fprintf(stderr, "kvsim demo: done in %.1f s. Report: %s (self-contained) and %s\n", kv_now() - t0, ares.report_html,
            ares.report_md);
    rc = 0;
done:
    for (int i = 0; i < n_pol; i++)
        kv_policy_free(pols[i]);
    kv_free(pols);
    kv_free(bud);
    kv_free(pr.text);
    kv_tokenizer_free(tok);
    kv_model_free(model);
    kv_results_free(res);
    kv_trace_close(t);
    kv_backend_close(be);
    return rc;
}
