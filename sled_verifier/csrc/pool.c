/* A small pool of worker threads for the native kernels (csrc/linear.c, csrc/attention.c).

   sled_parallel(threads, chunks, fn, context) runs fn(context, c, chunks, thread) once for every chunk c in
   0 .. chunks-1 on up to `threads` threads (the caller's is thread 0) and returns when all are done. Chunks are
   claimed, not assigned: the caller and the workers take the next unclaimed chunk until none is left, so a
   worker the OS has not scheduled (a core shared with other processes) costs nothing but its own claims: the
   caller does the rest, where a fixed split waited a time slice for the missing share. A kernel makes an
   output's arithmetic independent of its chunk and thread, so the bits do not depend on either.

   A claim is a compare-and-swap on one word holding (job generation, next chunk): it succeeds only while that
   job is current, and a job stays current (its fields unchanged) until every chunk is done, so a worker late
   for one job can never run a chunk of the next with the old one's fields. Workers spin briefly for the next
   job (a forward's kernels are microseconds apart), then sleep on a condition variable. */

#define _POSIX_C_SOURCE 200809L
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>

#define MAX_WORKERS 63
#define SPIN 2000  /* pause-loops a worker waits for the next job before it sleeps (~10-50 microseconds) */

typedef void (*chunk_fn)(void *, int64_t, int64_t, int);

static struct {
    chunk_fn fn;
    void *context;
    int64_t chunks;
    int threads;
} job;
static atomic_uint_fast64_t state;  /* generation << 32 | next chunk */
static atomic_long done;            /* chunks of the current job finished */
static int workers;
static pthread_t pool[MAX_WORKERS];
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER, call_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;

/* Claim and run chunks of the current job while `generation` is current and chunks are left. */
static void work(uint64_t generation, int thread) {
    for (;;) {
        uint64_t s = atomic_load(&state);
        if (s >> 32 != generation || (int64_t)(s & 0xffffffffu) >= job.chunks) return;
        if (!atomic_compare_exchange_weak(&state, &s, s + 1)) continue;
        job.fn(job.context, (int64_t)(s & 0xffffffffu), job.chunks, thread);  /* the job stays until done */
        atomic_fetch_add(&done, 1);
    }
}

static void *worker(void *arg) {
    int thread = (int)(intptr_t)arg;
    uint64_t seen = 0;
    for (;;) {
        uint64_t generation;
        int spins = 0;
        while ((generation = atomic_load(&state) >> 32) == seen && spins++ < SPIN) _mm_pause();
        if (generation == seen) {
            pthread_mutex_lock(&sleep_lock);
            while ((generation = atomic_load(&state) >> 32) == seen) pthread_cond_wait(&wake, &sleep_lock);
            pthread_mutex_unlock(&sleep_lock);
        }
        seen = generation;
        if (thread < job.threads) work(generation, thread);  /* a larger pool than this job asked for: rest */
    }
    return 0;
}

/* A forked child has none of the parent's workers: it starts its own pool (fork is called with no job in
   flight, since a job holds the caller until it is done). */
static void forget_pool(void) {
    workers = 0;
    pthread_mutex_init(&sleep_lock, 0);
    pthread_mutex_init(&call_lock, 0);
    pthread_cond_init(&wake, 0);
}

static void register_fork_handler(void) { pthread_atfork(0, 0, forget_pool); }

void sled_parallel(int threads, int64_t chunks, chunk_fn fn, void *context) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_fork_handler);
    if (threads > MAX_WORKERS + 1) threads = MAX_WORKERS + 1;
    if (threads <= 1 || chunks <= 1) {
        for (int64_t c = 0; c < chunks; c++) fn(context, c, chunks, 0);
        return;
    }
    pthread_mutex_lock(&call_lock);
    while (workers < threads - 1) {
        if (pthread_create(&pool[workers], 0, worker, (void *)(intptr_t)(workers + 1)) != 0) break;
        workers++;
    }
    job.fn = fn, job.context = context, job.chunks = chunks, job.threads = threads;
    atomic_store(&done, 0);
    uint64_t generation = (atomic_load(&state) >> 32) + 1;
    pthread_mutex_lock(&sleep_lock);
    atomic_store(&state, generation << 32);  /* the job is current: its chunks can be claimed */
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&sleep_lock);
    work(generation, 0);
    for (int spins = 0; atomic_load(&done) < chunks;)  /* chunks a worker claimed and still runs */
        if (++spins < SPIN) _mm_pause(); else sched_yield();
    pthread_mutex_unlock(&call_lock);
}
