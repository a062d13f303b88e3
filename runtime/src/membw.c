/* Memory read bandwidth probe: the ceiling that decoding (which reads every weight once per token)
 * cannot beat. A buffer much larger than the caches is read by n_threads workers of the runtime's
 * thread pool, each summing its contiguous share so that the loads cannot be dropped. The loop is
 * plain C that -O3 vectorizes (several independent accumulators, no intrinsics). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bitnet_dev.h"
#include "threadpool.h"

#define MEMBW_ALIGN 4096
#define MEMBW_LANES 8 /* independent accumulators: 64 bytes per step, one cache line */

typedef struct {
    uint64_t *words;
    uint64_t n_words; /* a multiple of MEMBW_LANES */
    uint64_t sums[1024]; /* one slot per worker (n_threads <= 1024) */
} membw_job;

static void membw_fill(void *arg, uint32_t ith, uint32_t nth) {
    membw_job *job = arg;
    uint64_t lo, hi;
    bn_split(job->n_words / MEMBW_LANES, ith, nth, &lo, &hi);
    /* written by the worker that reads it later: first touch places the pages near it */
    for (uint64_t i = lo * MEMBW_LANES; i < hi * MEMBW_LANES; i++) job->words[i] = i * 0x9E3779B97F4A7C15ull;
}

static void membw_read(void *arg, uint32_t ith, uint32_t nth) {
    membw_job *job = arg;
    uint64_t lo, hi;
    bn_split(job->n_words / MEMBW_LANES, ith, nth, &lo, &hi);
    const uint64_t *p = job->words + lo * MEMBW_LANES;
    const uint64_t n = (hi - lo) * MEMBW_LANES;
    uint64_t acc[MEMBW_LANES] = {0};
    for (uint64_t i = 0; i < n; i += MEMBW_LANES)
        for (int k = 0; k < MEMBW_LANES; k++) acc[k] += p[i + k];
    uint64_t s = 0;
    for (int k = 0; k < MEMBW_LANES; k++) s += acc[k];
    job->sums[ith] = s;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Read by the caller-visible checksum so the compiler keeps every load. */
static volatile uint64_t membw_sink;

double bn_membw_read_gbps(uint64_t bytes, uint32_t n_threads, uint32_t repeats) {
    if (n_threads == 0) n_threads = bn_default_n_threads();
    if (n_threads > 1024) return -2.0;
    if (repeats == 0) repeats = 1;
    uint64_t n_words = bytes / sizeof(uint64_t) / MEMBW_LANES * MEMBW_LANES;
    if (n_words < (uint64_t)MEMBW_LANES * n_threads) return -2.0;
    uint64_t alloc_bytes = (n_words * sizeof(uint64_t) + MEMBW_ALIGN - 1) / MEMBW_ALIGN * MEMBW_ALIGN;
    if (alloc_bytes / sizeof(uint64_t) < n_words) return -2.0; /* overflow */

    membw_job *job = calloc(1, sizeof *job);
    if (job == NULL) return -1.0;
    job->words = aligned_alloc(MEMBW_ALIGN, alloc_bytes);
    if (job->words == NULL) {
        free(job);
        return -1.0;
    }
    job->n_words = n_words;
    bn_pool *pool = NULL;
    if (bn_pool_new(&pool, n_threads) != BN_OK) {
        free(job->words);
        free(job);
        return -1.0;
    }

    bn_pool_run(pool, membw_fill, job);
    bn_pool_run(pool, membw_read, job); /* untimed: wakes the workers and settles the page tables */
    double best = 0.0;
    uint64_t check = 0;
    for (uint32_t r = 0; r < repeats; r++) {
        double t0 = now_seconds();
        bn_pool_run(pool, membw_read, job);
        double dt = now_seconds() - t0;
        for (uint32_t i = 0; i < n_threads; i++) check += job->sums[i];
        double gbps = dt > 0 ? (double)(n_words * sizeof(uint64_t)) / dt * 1e-9 : 0.0;
        if (gbps > best) best = gbps;
    }
    membw_sink = check;

    bn_pool_free(pool);
    free(job->words);
    free(job);
    return best;
}
