/* A persistent pool of worker threads, created with the context: bn_pool_run wakes them instead of
 * creating threads per call. The calling thread is worker 0, so a pool of 1 has no threads at all. */
#ifndef BN_THREADPOOL_H
#define BN_THREADPOOL_H

#include <stdint.h>

#include "bitnet.h"

/* Runs as worker ith of nth; all workers of one bn_pool_run get the same arg. */
typedef void (*bn_task_fn)(void *arg, uint32_t ith, uint32_t nth);

#define BN_MAX_THREADS 1024

typedef struct bn_pool bn_pool;

bn_status bn_pool_new(bn_pool **out, uint32_t n_threads);
void bn_pool_free(bn_pool *pool);
uint32_t bn_pool_n_threads(const bn_pool *pool);
/* Runs fn on every worker and returns when all are done. */
void bn_pool_run(bn_pool *pool, bn_task_fn fn, void *arg);

/* Worker ith's contiguous share [*lo, *hi) of n items. */
static inline void bn_split(uint64_t n, uint32_t ith, uint32_t nth, uint64_t *lo, uint64_t *hi) {
    *lo = n * ith / nth;
    *hi = n * (ith + 1) / nth;
}

#endif
