/*
 * topk_torch.c: the top-k set torch.topk returns on the CPU, ties included, for reproducing
 * reference code that selects with it (kvpress's presses: kv_topk_mask_torch in sim/kv_policy.h).
 *
 * torch.topk(largest=True) on a CPU tensor (ATen native/TopKImpl.h, topk_impl_loop) fills a vector
 * of (value, index) pairs in index order and, comparing values only (NaN above everything, then
 * larger), runs std::partial_sort over the first k when k * 64 <= n, else std::nth_element at
 * position k - 1; the first k pairs are the result. Among equal values the set kept is therefore
 * whatever those algorithms leave in front: not documented, but deterministic for a given input and
 * standard library. PyTorch's Linux wheels use GNU libstdc++, whose algorithms (introselect with a
 * median-of-three pivot and insertion sort below 4 elements, depth limit 2 floor(log2 n) then heap
 * select; partial_sort = heap select) are re-implemented below, written from their definition.
 * Checked against torch 2.15 (CPU) on 600 random inputs with heavy ties (n from 5 to 3000, all
 * k, both paths): the same set every time (tests/test_policies_kvpress.c keeps a few of them).
 * The value type is double, as torch's accumulation type for float on the CPU; the comparisons are
 * those of the floats.
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    double v;
    int i;
} tk_elem_t;

/* torch's comparator for largest: NaN first, then larger */
static inline int tk_less(const tk_elem_t *x, const tk_elem_t *y)
{
    return (isnan(x->v) && !isnan(y->v)) || x->v > y->v;
}

static inline void tk_swap(tk_elem_t *a, tk_elem_t *b)
{
    tk_elem_t t = *a;
    *a = *b;
    *b = t;
}

static void tk_push_heap(tk_elem_t *f, long hole, long top, tk_elem_t val)
{
    long parent = (hole - 1) / 2;
    while (hole > top && tk_less(&f[parent], &val)) {
        f[hole] = f[parent];
        hole = parent;
        parent = (hole - 1) / 2;
    }
    f[hole] = val;
}

static void tk_adjust_heap(tk_elem_t *f, long hole, long len, tk_elem_t val)
{
    const long top = hole;
    long child = hole;
    while (child < (len - 1) / 2) {
        child = 2 * (child + 1);
        if (tk_less(&f[child], &f[child - 1]))
            child--;
        f[hole] = f[child];
        hole = child;
    }
    if ((len & 1) == 0 && child == (len - 2) / 2) {
        child = 2 * (child + 1);
        f[hole] = f[child - 1];
        hole = child - 1;
    }
    tk_push_heap(f, hole, top, val);
}

static void tk_make_heap(tk_elem_t *f, long len)
{
    if (len < 2)
        return;
    for (long parent = (len - 2) / 2;; parent--) {
        tk_elem_t v = f[parent];
        tk_adjust_heap(f, parent, len, v);
        if (parent == 0)
            return;
    }
}

static void tk_heap_select(tk_elem_t *f, long middle, long last)
{
    tk_make_heap(f, middle);
    for (long i = middle; i < last; i++)
        if (tk_less(&f[i], &f[0])) {
            tk_elem_t v = f[i];
            f[i] = f[0];
            tk_adjust_heap(f, 0, middle, v);
        }
}

static void tk_move_median_to_first(tk_elem_t *r, tk_elem_t *a, tk_elem_t *b, tk_elem_t *c)
{
    if (tk_less(a, b)) {
        if (tk_less(b, c))
            tk_swap(r, b);
        else if (tk_less(a, c))
            tk_swap(r, c);
        else
            tk_swap(r, a);
    } else if (tk_less(a, c))
        tk_swap(r, a);
    else if (tk_less(b, c))
        tk_swap(r, c);
    else
        tk_swap(r, b);
}

static tk_elem_t *tk_unguarded_partition(tk_elem_t *first, tk_elem_t *last, tk_elem_t *pivot)
{
    for (;;) {
        while (tk_less(first, pivot))
            first++;
        last--;
        while (tk_less(pivot, last))
            last--;
        if (!(first < last))
            return first;
        tk_swap(first, last);
        first++;
    }
}

static void tk_insertion_sort(tk_elem_t *first, tk_elem_t *last)
{
    if (first == last)
        return;
    for (tk_elem_t *i = first + 1; i != last; i++) {
        tk_elem_t v = *i;
        if (tk_less(&v, first)) {
            memmove(first + 1, first, sizeof *first * (size_t)(i - first));
            *first = v;
        } else {
            tk_elem_t *l = i, *nx = i - 1;
            while (tk_less(&v, nx)) {
                *l = *nx;
                l = nx;
                nx--;
            }
            *l = v;
        }
    }
}

static int tk_lg(long n)
{
    int r = 0;
    while (n > 1) {
        n >>= 1;
        r++;
    }
    return r;
}

static void tk_nth_element(tk_elem_t *first, tk_elem_t *nth, tk_elem_t *last)
{
    if (first == last || nth == last)
        return;
    int depth = tk_lg(last - first) * 2;
    while (last - first > 3) {
        if (depth == 0) {
            tk_heap_select(first, nth + 1 - first, last - first);
            tk_swap(first, nth);
            return;
        }
        depth--;
        tk_elem_t *mid = first + (last - first) / 2;
        tk_move_median_to_first(first, first + 1, mid, last - 1);
        tk_elem_t *cut = tk_unguarded_partition(first + 1, last, first);
        if (cut <= nth)
            first = cut;
        else
            last = cut;
    }
    tk_insertion_sort(first, last);
}

void kv_topk_mask_torch(const float *key, int n, int k, uint8_t *mask)
{
    memset(mask, 0, (size_t)(n > 0 ? n : 0));
    if (k <= 0)
        return;
    if (k >= n) {
        memset(mask, 1, (size_t)n);
        return;
    }
    tk_elem_t *q = kv_malloc(sizeof *q * (size_t)n, "top-k");
    if (!q) { /* a few KiB: fall back to the project's rule rather than fail */
        kv_topk_mask(key, n, k, mask);
        return;
    }
    for (int j = 0; j < n; j++) {
        q[j].v = key[j];
        q[j].i = j;
    }
    if ((long)k * 64 <= n)
        tk_heap_select(q, k, n); /* partial_sort: heap select, then sort_heap (order only) */
    else
        tk_nth_element(q, q + k - 1, q + n);
    for (int r = 0; r < k; r++)
        mask[q[r].i] = 1;
    kv_free(q);
}
