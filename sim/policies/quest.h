/*
 * quest.h: the page metadata and page score of Quest (sim/policies/quest.c), exposed for tests.
 */
#ifndef KV_POLICIES_QUEST_H
#define KV_POLICIES_QUEST_H

#ifdef __cplusplus
extern "C" {
#endif

/* Per-channel minimum and maximum of the n keys k (n, d) of one page: kmin, kmax (d). n >= 1. */
void kv_quest_page_minmax(const float *k, int n, int d, float *kmin, float *kmax);

/* Quest's page score U = sum_d max(q_d kmax_d, q_d kmin_d): an upper bound of q.k for every key of
 * the page (each term bounds q_d k_d). No 1/sqrt(d) scale (the ranking does not change). */
float kv_quest_page_bound(const float *q, const float *kmin, const float *kmax, int d);

#ifdef __cplusplus
}
#endif
#endif
