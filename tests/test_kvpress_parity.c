/*
 * test_kvpress_parity.c: kvsim's kept sets against NVIDIA kvpress's on the same model and tokens.
 *
 * tests/kvpress_parity.py writes the stories260K checkpoint as a Hugging Face Llama checkpoint; kvsim
 * captures a trace from that folder (f32, W_O, a 453-token story and 12 decode tokens); the script
 * runs every press of the table below with transformers at three settings (compression ratios 0.25,
 * 0.5, 0.75 for the scorer presses; n_recent and target sizes at a quarter, half and three quarters
 * of the context for SimLayerKV and the decoding press) and records, per layer and KV head, the
 * token indices the cache keeps and the scores the press ranked them by; kvsim replays the trace with
 * the counterpart preset at the same budgets ("cr:0.25" is kvpress's compression ratio with its
 * rounding), writes its kept sets with --kept's writer and reads them back, and every (press,
 * setting, layer, KV head) cell is compared: 16 presses x 3 settings x 5 layers x 4 KV heads.
 *
 * Equal, or a tie: the two sides compute Q/K/V with different forward passes (kvsim's C, transformers'
 * torch; ~1e-6 relative), so two tokens whose scores are equal in exact arithmetic (a token repeated
 * at layer 0 has the same key before RoPE, hence the same key norm after it; a softmax underflowing
 * to 0) can swap. A layer's differences count as ties when the tokens only kvsim keeps and the tokens
 * only kvpress keeps, pooled over the layer's heads (Ada-KV moves budget across heads), have the same
 * kvpress scores pairwise in sorted order within 1e-5 relative (plus 1e-6 of the layer's largest
 * |score|); anything else fails and is printed with the press, setting, layer, head and the
 * symmetric difference (+ only kvsim keeps it, - only kvpress does). Ties are bounded: at most a
 * fifth of a press's cells. Presses without recorded scores (ChunkKV's chunks, SimLayerKV,
 * CriticalAdaKV's stages) must be equal.
 *
 * Registered only where a Python that imports torch, transformers, kvpress and safetensors exists
 * ($KVSIM_KVPRESS_PYTHON, else build/kvpress-venv/bin/python3, else python3; .ci/run makes the
 * second with scripts/kvpress-venv.sh) and ../shared has stories260K; otherwise said on stderr.
 */
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/kept.h"
#include "sim/kv_policy.h"
#include "sim/replay.h"
#include "tests/kv_test.h"
#include "traces/capture/kv_capture.h"
#include "traces/kv_trace.h"

#include <json-c/json.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* kvpress press (tests/kvpress_parity.py's name) -> kvsim spec */
static const struct {
    const char *press, *spec;
} PRESSES[] = {
    {"snapkv", "snapkv@kvpress"},
    {"streaming_llm", "streaming_llm@kvpress"},
    {"observed_attention", "h2o@kvpress"},
    {"tova", "tova@kvpress"},
    {"knorm", "knorm@kvpress"},
    {"pyramidkv", "pyramidkv@kvpress"},
    {"chunkkv", "chunkkv@kvpress"},
    {"adakv", "adakv@kvpress"},
    {"expected_attention", "expected_attention@kvpress"},
    {"adakv_expected_attention", "adakv@kvpress_expected_attention"},
    {"keydiff", "keydiff@kvpress"},
    {"lagkv", "lagkv@kvpress"},
    {"criticalkv", "criticalkv@kvpress"},
    {"criticaladakv", "criticalkv@kvpress_ada"},
    {"simlayerkv", "simlayerkv@kvpress"},
    {"decoding", "decoding@kvpress(interval=8)"},
};

static const char PROMPT[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends. "
    "One day, she saw a big red ball under a tree. She ran to the ball and picked it up. It was very shiny and round. "
    "Lily wanted to share the ball with her friend Tom. Tom was sad because he lost his toy car. Lily said, \"Tom, "
    "do you want to play with my ball?\" Tom smiled and said, \"Yes, thank you, Lily!\" They played with the ball all "
    "day. They threw it high in the sky and caught it. The sun was warm and the birds were singing. When it was time "
    "to go home, Lily's mom came to the park. She said, \"Lily, it is time for dinner.\" Lily gave Tom a big hug and "
    "said goodbye. At home, Lily ate her soup and bread. She told her mom about the ball and her friend Tom. Her mom "
    "was happy that Lily was kind. That night, Lily dreamed of the park, the ball and the sun. The next day, Lily and "
    "Tom went to the park again. They found a little dog near the pond. The dog was lost and hungry. Lily gave the dog "
    "some of her bread. Tom looked for the dog's home. They saw a sign with a picture of the dog. ";

static char g_python[1024], g_model[512], g_tok[512], g_dir[512], g_trace_path[700];
static int g_ready = -1; /* -1 not tried, 0 failed (message in g_why), 1 ready */
static char g_why[1024];
static json_object *g_ref;
static kv_trace_t *g_trace;

static void prepare(void)
{
    if (g_ready >= 0)
        return;
    g_ready = 0;
    kv_test_tmp("kvpress-parity", g_dir, sizeof g_dir);
    mkdir(g_dir, 0755);
    char cmd[4096], path[700], hf[700];
    snprintf(hf, sizeof hf, "%s/hf", g_dir);
    snprintf(cmd, sizeof cmd, "%s tests/kvpress_parity.py model %s %s > %s/model.log 2>&1", g_python, g_model, hf,
             g_dir);
    if (system(cmd) != 0) {
        snprintf(g_why, sizeof g_why, "writing the Hugging Face checkpoint failed: see %s/model.log", g_dir);
        return;
    }
    /* the capture runs in a child process: the runner must stay free of threads (OpenMP, OpenBLAS)
     * when Check forks the tests, or their parallel regions hang in the forked children */
    snprintf(path, sizeof path, "%s/trace.h5", g_dir);
    pid_t pid = fork();
    if (pid == 0) {
        kv_capture_opts_t co;
        kv_capture_opts_init(&co);
        co.model_path = hf;
        co.tokenizer_path = g_tok;
        co.prompt = PROMPT;
        co.out_path = path;
        co.n_decode = 12;
        co.dtype = KV_DTYPE_F32;
        co.with_wo = 1;
        co.backend = "cpu";
        kv_capture_result_t cr;
        kv_log_set_level(KV_LOG_QUIET);
        int rc = kv_capture_run(&co, &cr);
        if (rc != KV_OK)
            fprintf(stderr, "kvsim tests: kvpress parity: capture from %s: %s\n", hf, kv_last_error());
        _exit(rc == KV_OK ? 0 : 1);
    }
    int status = 1;
    if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0 ||
        kv_trace_open(path, &g_trace) != KV_OK) {
        snprintf(g_why, sizeof g_why, "capture from %s failed (see stderr)", hf);
        return;
    }
    const kv_trace_meta_t *m = kv_trace_meta(g_trace);
    snprintf(g_trace_path, sizeof g_trace_path, "%s", path);
    const int n_prompt = m->n_prompt;
    snprintf(path, sizeof path, "%s/ids.txt", g_dir);
    FILE *f = fopen(path, "w");
    for (int t = 0; f && t < m->n_tokens; t++)
        fprintf(f, "%d ", m->tokens[t]);
    if (f)
        fclose(f);
    kv_trace_close(g_trace); /* each test opens its own */
    g_trace = NULL;
    snprintf(cmd, sizeof cmd, "%s tests/kvpress_parity.py run %s %s %d %s/kvpress.json > %s/run.log 2>&1", g_python, hf,
             path, n_prompt, g_dir, g_dir);
    if (system(cmd) != 0) {
        snprintf(g_why, sizeof g_why, "tests/kvpress_parity.py run failed: see %s/run.log", g_dir);
        return;
    }
    snprintf(path, sizeof path, "%s/kvpress.json", g_dir);
    g_ref = json_object_from_file(path);
    if (!g_ref) {
        snprintf(g_why, sizeof g_why, "%s: not JSON", path);
        return;
    }
    json_object *v;
    if (json_object_object_get_ex(g_ref, "kvpress", &v))
        fprintf(stderr, "kvsim tests: kvpress parity against kvpress %s, transformers %s, torch %s (%s)\n",
                json_object_get_string(v), json_object_get_string(json_object_object_get(g_ref, "transformers")),
                json_object_get_string(json_object_object_get(g_ref, "torch")), g_python);
    g_ready = 1;
}

static double score_of(json_object *scores, int l, int s, int j)
{
    json_object *sl = scores ? json_object_array_get_idx(scores, (size_t)l) : NULL;
    json_object *row = sl ? json_object_array_get_idx(sl, (size_t)s) : NULL;
    json_object *x = row ? json_object_array_get_idx(row, (size_t)j) : NULL;
    return x ? json_object_get_double(x) : NAN;
}

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct {
    int cells, equal, ties, fails;
} tally_t;

/* Compare one setting's layer l: kvpress's kept (Hkv lists) against kvsim's mask (S, T). */
static void compare_layer(const char *press, const char *budget, int l, json_object *kept, json_object *scores,
                          const uint8_t *mask, int S, int T, tally_t *t)
{
    int n_only[2] = {0, 0}, differing = 0;
    double *only[2];
    only[0] = kv_malloc(sizeof(double) * (size_t)S * T, "scores"); /* kvsim only */
    only[1] = kv_malloc(sizeof(double) * (size_t)S * T, "scores"); /* kvpress only */
    uint8_t *ref = kv_malloc((size_t)T, "reference set");
    int *diff_cell = kv_calloc((size_t)S, sizeof(int), "differing heads");
    double top = 0;
    for (int s = 0; s < S; s++) {
        json_object *row = json_object_array_get_idx(json_object_array_get_idx(kept, (size_t)l), (size_t)s);
        memset(ref, 0, (size_t)T);
        for (size_t x = 0; row && x < json_object_array_length(row); x++) {
            const int j = json_object_get_int(json_object_array_get_idx(row, x));
            if (j >= 0 && j < T)
                ref[j] = 1;
        }
        t->cells++;
        for (int j = 0; j < T; j++) {
            const double sc = score_of(scores, l, s, j);
            if (isfinite(sc))
                top = fmax(top, fabs(sc));
            if (!!mask[(size_t)s * T + j] != ref[j]) {
                diff_cell[s] = 1;
                const int side = ref[j] ? 1 : 0;
                only[side][n_only[side]++] = sc;
            }
        }
        differing += diff_cell[s];
    }
    t->equal += S - differing;
    int tie = differing > 0 && scores && n_only[0] == n_only[1];
    if (tie) {
        qsort(only[0], (size_t)n_only[0], sizeof(double), cmp_double);
        qsort(only[1], (size_t)n_only[1], sizeof(double), cmp_double);
        for (int x = 0; x < n_only[0] && tie; x++) {
            const double a = only[0][x], b = only[1][x];
            tie = isfinite(a) && isfinite(b) && fabs(a - b) <= 1e-5 * fmax(fabs(a), fabs(b)) + 1e-6 * top;
        }
    }
    if (tie) {
        t->ties += differing;
    } else if (differing) {
        t->fails += differing;
        for (int s = 0; s < S; s++) {
            if (!diff_cell[s])
                continue;
            json_object *row = json_object_array_get_idx(json_object_array_get_idx(kept, (size_t)l), (size_t)s);
            memset(ref, 0, (size_t)T);
            for (size_t x = 0; row && x < json_object_array_length(row); x++)
                ref[json_object_get_int(json_object_array_get_idx(row, x))] = 1;
            char sd[512];
            size_t u = 0;
            sd[0] = 0;
            for (int j = 0; j < T && u + 16 < sizeof sd; j++)
                if (!!mask[(size_t)s * T + j] != ref[j])
                    u += (size_t)snprintf(sd + u, sizeof sd - u, " %c%d", ref[j] ? '-' : '+', j);
            fprintf(stderr,
                    "kvsim tests: kvpress parity FAIL: press %s, setting %s, layer %d, KV head %d: symmetric "
                    "difference%s\n",
                    press, budget, l, s, sd);
        }
    }
    kv_free(only[0]), kv_free(only[1]), kv_free(ref), kv_free(diff_cell);
}

START_TEST(press_matches_kvpress)
{
    prepare();
    ck_assert_msg(g_ready == 1, "%s", g_why);
    ck_assert_msg(kv_trace_open(g_trace_path, &g_trace) == KV_OK, "%s", kv_last_error());
    const char *press = PRESSES[_i].press, *spec = PRESSES[_i].spec;
    json_object *all = json_object_object_get(g_ref, "presses");
    /* this press's settings, in file order */
    json_object *ent[8];
    int ne = 0;
    char budgets[256] = "";
    for (size_t x = 0; x < json_object_array_length(all) && ne < 8; x++) {
        json_object *e = json_object_array_get_idx(all, x);
        if (strcmp(json_object_get_string(json_object_object_get(e, "name")), press))
            continue;
        ent[ne++] = e;
        snprintf(budgets + strlen(budgets), sizeof budgets - strlen(budgets), "%s%s", ne > 1 ? "," : "",
                 json_object_get_string(json_object_object_get(e, "budget")));
    }
    ck_assert_msg(ne == 3, "%s: %d settings in the reference file", press, ne);
    kv_policy_t *p;
    ck_assert_msg(kv_policy_create(spec, &p) == KV_OK, "%s: %s", spec, kv_last_error());
    kv_budget_t *b;
    int nb;
    ck_assert_int_eq(kv_budget_parse_list(budgets, &b, &nb), KV_OK);
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(2, &be), KV_OK);
    kv_replay_opts_t o;
    kv_replay_defaults(&o);
    o.quiet = 1;
    kv_kept_t *kept = NULL, *back = NULL;
    o.kept = &kept;
    kv_results_t *r = NULL;
    ck_assert_msg(kv_replay(g_trace, &p, 1, b, nb, be, &o, &r) == KV_OK, "%s: %s", spec, kv_last_error());
    /* through the file replay --kept writes */
    char path[700];
    snprintf(path, sizeof path, "%s/kept-%s.h5", g_dir, press);
    ck_assert_msg(kv_kept_write(kept, path, "trace.h5", NULL) == KV_OK, "%s", kv_last_error());
    ck_assert_msg(kv_kept_read(path, &back) == KV_OK, "%s", kv_last_error());
    const kv_trace_meta_t *m = kv_trace_meta(g_trace);
    tally_t t = {0};
    char per[512] = "";
    for (int bi = 0; bi < nb; bi++) {
        const tally_t before = t;
        const kv_kept_entry_t *k = kv_kept_get(back, 0, bi), *k0 = kv_kept_get(kept, 0, bi);
        ck_assert_ptr_nonnull(k);
        ck_assert_int_eq(k->n_store, m->n_kv_heads);
        ck_assert(!memcmp(k->mask, k0->mask, (size_t)m->n_layers * k->n_store * m->n_tokens));
        ck_assert_str_eq(k->label, p->label);
        json_object *kp = json_object_object_get(ent[bi], "kept"), *sc = json_object_object_get(ent[bi], "scores");
        for (int l = 0; l < m->n_layers; l++) {
            json_object *scl = sc ? json_object_array_get_idx(sc, (size_t)l) : NULL;
            compare_layer(press, b[bi].text, l, kp, scl && !json_object_is_type(scl, json_type_null) ? sc : NULL,
                          k->mask + (size_t)l * k->n_store * m->n_tokens, k->n_store, m->n_tokens, &t);
        }
        snprintf(per + strlen(per), sizeof per - strlen(per), "%s%s: %d/%d equal, %d ties", bi ? "; " : "", b[bi].text,
                 t.equal - before.equal, t.cells - before.cells, t.ties - before.ties);
    }
    fprintf(stderr, "kvsim tests: kvpress parity %-24s vs %s: %d cells, %d equal, %d ties, %d different (%s)\n", press,
            spec, t.cells, t.equal, t.ties, t.fails, per);
    ck_assert_msg(t.fails == 0, "%s: %d cells differ beyond ties (printed above)", press, t.fails);
    ck_assert_msg(t.ties * 5 <= t.cells, "%s: %d tied cells of %d (at most a fifth)", press, t.ties, t.cells);
    kv_kept_free(kept);
    kv_kept_free(back);
    kv_results_free(r);
    kv_free(b);
    kv_policy_free(p);
    kv_backend_close(be);
    kv_trace_close(g_trace);
    g_trace = NULL;
}
END_TEST

/* The Python to run kvpress with, or NULL. */
static const char *find_python(void)
{
    /* a real import (transformers 5.2 under a newer system-wide `kernels` package, for one, is found but
     * fails to import), a few seconds: only when this suite runs */
    const char *probe = "-c 'import torch, transformers, kvpress, safetensors' >/dev/null 2>&1";
    const char *env = getenv("KVSIM_KVPRESS_PYTHON");
    const char *cand[3] = {env, "build/kvpress-venv/bin/python3", "python3"};
    for (int i = 0; i < 3; i++) {
        if (!cand[i] || !cand[i][0] || (i == 1 && access(cand[i], X_OK) != 0))
            continue;
        char cmd[1400];
        snprintf(cmd, sizeof cmd, "%s %s", cand[i], probe);
        if (system(cmd) == 0) {
            snprintf(g_python, sizeof g_python, "%s", cand[i]);
            return g_python;
        }
    }
    return NULL;
}

Suite *suite_kvpress_parity(void)
{
    Suite *s = suite_create("kvpress_parity");
    TCase *tc = tcase_create("kvpress");
    tcase_set_timeout(tc, 300);
    const int n = (int)KV_ARRAY_LEN(PRESSES);
    const char *only = getenv("CK_RUN_SUITE");
    if (only && strcmp(only, "kvpress_parity")) { /* another suite was asked for: no probe */
        suite_add_tcase(s, tc);
        return s;
    }
    char what[64];
    snprintf(what, sizeof what, "kvpress_parity (%d presses)", n);
    if (access("tests/kvpress_parity.py", R_OK) != 0) {
        kv_test_skip(what, "tests/kvpress_parity.py not found (run from the repository root)");
    } else if (!kv_test_shared("models/stories260K/stories260K.bin", g_model, sizeof g_model) ||
               !kv_test_shared("models/stories260K/tok512.bin", g_tok, sizeof g_tok)) {
        kv_test_skip(what, "models/stories260K not found");
    } else if (!find_python()) {
        kv_test_skip(what,
                     "no Python that imports torch, transformers, kvpress and safetensors ($KVSIM_KVPRESS_PYTHON, "
                     "build/kvpress-venv/bin/python3 or python3; scripts/kvpress-venv.sh makes the second)");
    } else {
        tcase_add_unchecked_fixture(tc, prepare, NULL); /* once, in the runner, not in every forked test */
        tcase_add_loop_test(tc, press_matches_kvpress, 0, n);
    }
    suite_add_tcase(s, tc);
    return s;
}
