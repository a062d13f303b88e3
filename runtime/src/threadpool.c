#include "threadpool.h"

#include <pthread.h>
#include <stdlib.h>

typedef struct {
    bn_pool *pool;
    uint32_t ith;
} bn_worker;

struct bn_pool {
    uint32_t n_threads;  /* workers including the caller */
    pthread_t *threads;  /* [n_threads - 1] */
    bn_worker *workers;  /* [n_threads - 1], ith 1.. */
    uint32_t n_started;  /* threads created (all of them unless creation failed) */
    pthread_mutex_t mu;
    pthread_cond_t wake; /* a new run (or quit) for the workers */
    pthread_cond_t done; /* the last worker finished the run */
    uint64_t generation; /* bumped per run; a worker runs once per change */
    uint32_t n_busy;     /* workers still inside the current run */
    int quit;
    bn_task_fn fn;
    void *arg;
};

static void *worker_main(void *p) {
    bn_worker *w = p;
    bn_pool *pool = w->pool;
    uint64_t seen = 0;
    pthread_mutex_lock(&pool->mu);
    for (;;) {
        while (!pool->quit && pool->generation == seen) pthread_cond_wait(&pool->wake, &pool->mu);
        if (pool->quit) break;
        seen = pool->generation;
        bn_task_fn fn = pool->fn;
        void *arg = pool->arg;
        pthread_mutex_unlock(&pool->mu);
        fn(arg, w->ith, pool->n_threads);
        pthread_mutex_lock(&pool->mu);
        if (--pool->n_busy == 0) pthread_cond_signal(&pool->done);
    }
    pthread_mutex_unlock(&pool->mu);
    return NULL;
}

bn_status bn_pool_new(bn_pool **out, uint32_t n_threads) {
    *out = NULL;
    bn_pool *pool = calloc(1, sizeof *pool);
    if (pool == NULL) return BN_ERR_NOMEM;
    pool->n_threads = n_threads;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pthread_cond_init(&pool->done, NULL);
    if (n_threads > 1) {
        pool->threads = calloc(n_threads - 1, sizeof *pool->threads);
        pool->workers = calloc(n_threads - 1, sizeof *pool->workers);
        if (pool->threads == NULL || pool->workers == NULL) {
            bn_pool_free(pool);
            return BN_ERR_NOMEM;
        }
    }
    for (uint32_t i = 0; i + 1 < n_threads; i++) {
        pool->workers[i] = (bn_worker){pool, i + 1};
        if (pthread_create(&pool->threads[i], NULL, worker_main, &pool->workers[i]) != 0) {
            bn_pool_free(pool);
            return BN_ERR_NOMEM;
        }
        pool->n_started++;
    }
    *out = pool;
    return BN_OK;
}

void bn_pool_free(bn_pool *pool) {
    if (pool == NULL) return;
    pthread_mutex_lock(&pool->mu);
    pool->quit = 1;
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    for (uint32_t i = 0; i < pool->n_started; i++) pthread_join(pool->threads[i], NULL);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->wake);
    pthread_cond_destroy(&pool->done);
    free(pool->threads);
    free(pool->workers);
    free(pool);
}

uint32_t bn_pool_n_threads(const bn_pool *pool) { return pool->n_threads; }

void bn_pool_run(bn_pool *pool, bn_task_fn fn, void *arg) {
    if (pool->n_threads == 1) {
        fn(arg, 0, 1);
        return;
    }
    pthread_mutex_lock(&pool->mu);
    pool->fn = fn;
    pool->arg = arg;
    pool->n_busy = pool->n_threads - 1;
    pool->generation++;
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    fn(arg, 0, pool->n_threads);
    pthread_mutex_lock(&pool->mu);
    while (pool->n_busy > 0) pthread_cond_wait(&pool->done, &pool->mu);
    pthread_mutex_unlock(&pool->mu);
}
