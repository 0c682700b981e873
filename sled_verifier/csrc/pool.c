/* A small pool of worker threads for the native kernels (csrc/linear.c, csrc/attention.c): sled_parallel runs
   fn(context, i, n) for i = 0 .. n-1, i = 0 on the calling thread, and returns when all are done. Workers spin
   briefly for the next job (a forward's kernels are microseconds apart), then sleep on a condition variable
   (between steps the verifier idles by design); the caller yields to a worker preempted on a shared core.
   A kernel splits its outputs between the n calls so that no output's arithmetic depends on n. */

#define _POSIX_C_SOURCE 200809L
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>

#define MAX_WORKERS 63
#define SPIN 2000  /* pause-loops a worker waits for the next job before it sleeps (~10-50 microseconds) */

static struct {
    void (*fn)(void *, int, int);
    void *context;
    int threads;
} job;
static atomic_long generation;
static atomic_int remaining;
static int workers;
static pthread_t pool[MAX_WORKERS];
static long born[MAX_WORKERS];
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER, call_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;

static void *worker(void *arg) {
    int index = (int)(intptr_t)arg;
    long seen = born[index - 1];  /* the generation before the first job it must answer */
    for (;;) {
        long now;
        int spins = 0;
        while ((now = atomic_load(&generation)) == seen && spins++ < SPIN) _mm_pause();
        if (now == seen) {
            pthread_mutex_lock(&sleep_lock);
            while ((now = atomic_load(&generation)) == seen) pthread_cond_wait(&wake, &sleep_lock);
            pthread_mutex_unlock(&sleep_lock);
        }
        seen = now;
        if (index < job.threads) job.fn(job.context, index, job.threads);
        atomic_fetch_sub(&remaining, 1);  /* every worker answers every job, so none reads the next one early */
    }
    return 0;
}

static void forget_pool(void);
static void register_fork_handler(void) { pthread_atfork(0, 0, forget_pool); }

/* A forked child has none of the parent's workers: it starts its own pool (fork is called with no job in
   flight, since a job holds the caller until it is done). */
static void forget_pool(void) {
    workers = 0;
    pthread_mutex_init(&sleep_lock, 0);
    pthread_mutex_init(&call_lock, 0);
    pthread_cond_init(&wake, 0);
}

void sled_parallel(int threads, void (*fn)(void *, int, int), void *context) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_fork_handler);
    if (threads > MAX_WORKERS + 1) threads = MAX_WORKERS + 1;
    if (threads <= 1) {
        fn(context, 0, 1);
        return;
    }
    pthread_mutex_lock(&call_lock);
    while (workers < threads - 1) {
        born[workers] = atomic_load(&generation);
        if (pthread_create(&pool[workers], 0, worker, (void *)(intptr_t)(workers + 1)) != 0) break;
        workers++;
    }
    if (threads > workers + 1) threads = workers + 1;
    job.fn = fn, job.context = context, job.threads = threads;
    atomic_store(&remaining, workers);
    pthread_mutex_lock(&sleep_lock);
    atomic_fetch_add(&generation, 1);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&sleep_lock);
    fn(context, 0, threads);
    for (int spins = 0; atomic_load(&remaining) > 0;)
        if (++spins < SPIN) _mm_pause(); else sched_yield();
    pthread_mutex_unlock(&call_lock);
}
