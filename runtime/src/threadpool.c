/* The pool hands work off through two counters instead of a mutex and condition variable per run
 * (a decoded token is ~150 runs): the caller publishes (fn, arg) and bumps `generation`; each worker
 * waits for the bump, runs, and bumps `n_done`; the caller waits until n_done reaches the run's
 * target. Every wait first spins (with the CPU's pause hint), as ggml's pool does, since during
 * a forward pass the next run comes within microseconds (the caller's serial work between runs is
 * a norm or a rope of one token), and only then sleeps on a condition variable, so that idle
 * threads (between tokens, or a context nobody uses) cost nothing. The spin is bounded by time,
 * POOL_SPIN_US, not by a count of polls, as a pause lasts very different times on different CPUs:
 * the earlier 512-poll spin (tuned on an AMD Zen 4 VM) ended after ~9 us on an Intel Xeon VM (a pause
 * there: 17 ns), where the waits of batched decoding (one thread finishing its rows after the other)
 * then went to sleep and paid a futex wake-up through the hypervisor each time; spinning longer made
 * 2-thread decoding 1.3-1.4x faster there (8192 polls, ~140 us, and 100 us measured alike). The
 * bound stays short because on a machine with more runnable threads than cores (other jobs), a
 * spinner holds a core the thread it waits for may need; spins of ~1 ms that called sched_yield made
 * the hand-off 3-40x slower than a mutex pool's on a shared 2-core VM.
 *
 * Sleeping without lost wake-ups: a sleeper increments n_sleeping under `mu`, then re-checks its
 * counter before waiting; a waker changes the counter, then reads n_sleeping and, if it is not
 * zero, broadcasts under `mu`. Both sides use sequentially consistent atomics, so either the
 * sleeper sees the new value or the waker sees the sleeper (and the mutex orders its broadcast
 * after the sleeper's wait). The counters only grow (64-bit: no wrap-around in practice). */
#include "threadpool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bitnet_dev.h"
#include "cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define POOL_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define POOL_PAUSE() __asm__ __volatile__("yield")
#else
#define POOL_PAUSE() ((void)0)
#endif

#ifndef POOL_SPIN_US
#define POOL_SPIN_US 100 /* microseconds of spinning before sleeping */
#endif

typedef struct {
    bn_pool *pool;
    uint32_t ith;
} bn_worker;

struct bn_pool {
    uint32_t n_threads;          /* workers including the caller */
    pthread_t *threads;          /* [n_threads - 1] */
    bn_worker *workers;          /* [n_threads - 1], ith 1.. */
    uint32_t n_started;          /* threads created (all of them unless creation failed) */
    /* on lines of their own: the workers' bumps of n_done do not disturb the spinners' reads */
    _Alignas(64) _Atomic uint64_t generation; /* bumped per run (after fn, arg); workers run once per bump */
    _Alignas(64) _Atomic uint64_t n_done;     /* workers' finished runs, all runs together */
    _Alignas(64) _Atomic int quit;
    bn_task_fn fn;               /* the current run's task, written before its generation bump */
    void *arg;
    _Atomic uint32_t n_sleeping; /* threads asleep in wait_for (changed under mu) */
    pthread_mutex_t mu;
    pthread_cond_t wake;         /* any counter changed while someone slept */
};

static uint64_t monotonic_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* Returns once *counter >= target (or the pool quits): spins, then sleeps. */
static void wait_for(bn_pool *pool, _Atomic uint64_t *counter, uint64_t target) {
    uint64_t deadline = 0;
    for (uint32_t i = 1;; i++) {
        if (atomic_load_explicit(counter, memory_order_acquire) >= target) return;
        POOL_PAUSE();
        if (i % 64 == 0) { /* the clock now and then (the first reading starts the spin's time) */
            const uint64_t now = monotonic_us();
            if (deadline == 0) deadline = now + POOL_SPIN_US;
            else if (now >= deadline) break;
        }
    }
    pthread_mutex_lock(&pool->mu);
    atomic_fetch_add(&pool->n_sleeping, 1);
    while (atomic_load(counter) < target && !atomic_load(&pool->quit)) pthread_cond_wait(&pool->wake, &pool->mu);
    atomic_fetch_sub(&pool->n_sleeping, 1);
    pthread_mutex_unlock(&pool->mu);
}

/* Adds 1 to *counter and wakes the sleepers, if any. */
static void bump(bn_pool *pool, _Atomic uint64_t *counter) {
    atomic_fetch_add(counter, 1); /* seq_cst: ordered before the read of n_sleeping */
    if (atomic_load(&pool->n_sleeping) == 0) return;
    pthread_mutex_lock(&pool->mu);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
}

static void *worker_main(void *p) {
    bn_worker *w = p;
    bn_pool *pool = w->pool;
    for (uint64_t seen = 0;; seen++) {
        wait_for(pool, &pool->generation, seen + 1);
        if (atomic_load(&pool->quit)) break;
        pool->fn(pool->arg, w->ith, pool->n_threads);
        bump(pool, &pool->n_done);
    }
    return NULL;
}

bn_status bn_pool_new(bn_pool **out, uint32_t n_threads) {
    *out = NULL;
    bn_pool *pool = aligned_alloc(64, (sizeof *pool + 63) / 64 * 64);
    if (pool == NULL) return BN_ERR_NOMEM;
    memset(pool, 0, sizeof *pool);
    pool->n_threads = n_threads;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->wake, NULL);
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
    atomic_store(&pool->quit, 1);
    bump(pool, &pool->generation); /* wakes spinning and sleeping workers alike */
    for (uint32_t i = 0; i < pool->n_started; i++) pthread_join(pool->threads[i], NULL);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->wake);
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
    /* No worker reads fn/arg now: all finished the previous run before it returned. */
    pool->fn = fn;
    pool->arg = arg;
    const uint64_t target = atomic_load_explicit(&pool->n_done, memory_order_relaxed) + (pool->n_threads - 1);
    bump(pool, &pool->generation); /* releases fn, arg and everything the caller wrote before */
    fn(arg, 0, pool->n_threads);
    wait_for(pool, &pool->n_done, target); /* acquires everything the workers wrote */
}

uint32_t bn_default_n_threads(void) {
    const uint32_t n = bn_cpu_n_cores();
    return n < BN_MAX_THREADS ? n : BN_MAX_THREADS;
}

/* ---- bn_pool_stress (bitnet.h): the pool's self-check for tests ---- */

typedef struct {
    uint32_t n_threads;
    uint32_t run;
    uint64_t seed;
    uint32_t *counts; /* [n_runs][n_threads] */
} stress_task;

/* A few random steps of a 64-bit LCG: how long worker ith lingers in this run. */
static uint32_t stress_delay(uint64_t seed, uint32_t run, uint32_t ith) {
    uint64_t s = seed ^ ((uint64_t)run << 20) ^ ith;
    for (int i = 0; i < 3; i++) s = s * 6364136223846793005u + 1442695040888963407u;
    return (uint32_t)(s >> 33) % 4 == 0 ? (uint32_t)(s >> 40) % 2000 : 0; /* a quarter of them: up to 2000 pauses */
}

static void stress_worker(void *arg, uint32_t ith, uint32_t nth) {
    const stress_task *t = arg;
    for (uint32_t i = stress_delay(t->seed, t->run, ith); i > 0; i--) POOL_PAUSE();
    if (nth == t->n_threads && ith < nth) t->counts[(size_t)t->run * nth + ith]++; /* each worker its own slot */
}

bn_status bn_pool_stress(uint32_t n_threads, uint32_t n_runs, uint64_t seed, uint32_t *counts, uint32_t *n_early) {
    if (n_threads == 0 || n_threads > BN_MAX_THREADS || counts == NULL || n_early == NULL) return BN_ERR_ARG;
    bn_pool *pool;
    if (bn_pool_new(&pool, n_threads) != BN_OK) return BN_ERR_NOMEM;
    *n_early = 0;
    stress_task task = {n_threads, 0, seed, counts};
    for (uint32_t run = 0; run < n_runs; run++) {
        task.run = run;
        if (stress_delay(seed, run, n_threads) > 1900) { /* now and then idle long enough for the workers to sleep */
            struct timespec ts = {0, 3000000};
            nanosleep(&ts, NULL);
        }
        bn_pool_run(pool, stress_worker, &task);
        for (uint32_t i = 0; i < n_threads; i++) /* every worker done, and its write visible, on return */
            if (counts[(size_t)run * n_threads + i] != 1) ++*n_early;
    }
    bn_pool_free(pool);
    return BN_OK;
}
