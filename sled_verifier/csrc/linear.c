/* The verifier's own float32 product (sled_verifier/native.py builds every file of csrc/ into one library with the
   machine's C compiler at load and calls it through ctypes). Batch invariant by construction: an output's
   arithmetic is a function of its own inputs alone, in one fixed order, whatever the row count, the tile it falls
   in or the thread that computes it. The load-time probe (sled_verifier/invariant.py) still checks it, bitwise.

   sled_linear: y[m][n] = x[m][:] . w[n][:] + b[n], float32. The weight is packed once into panels of 64
   outputs, [N/64][K][64] (the last panel zero-padded), so a product reads the weight as one contiguous stream,
   which the memory system prefetches at full speed: a one-core small-row product reads it at the machine's read
   bandwidth, where MKL's small-M GEMM re-packs it on every call and oneDNN's reaches ~2/3 of it (SmolLM2's
   products at 1-5 rows, one Zen 4 core: ~28 GB/s against ~18 and ~12). Each output is one fused multiply-add
   chain over k = 0..K-1 in order from zero, then + b[n]: the same for every (m, n). Rows go in tiles of up to 6
   (6 x 64 accumulators: the register file), so at hundreds of rows the kernel is compute bound like a GEMM. */

#include <stdint.h>
#include <string.h>

#include "simd.h"

#if LANES == 16
#define ROWS 6  /* 6 rows x 4 accumulators, the weights and a broadcast in 32 registers */
#else
#define ROWS 1  /* 16 registers: a row's 8 accumulators, its weights and its broadcast */
#endif

#define PANEL 64                 /* outputs per panel */
#define VECS (PANEL / LANES)     /* vectors per panel row */
#define AHEAD 32                 /* panel rows (k) prefetched ahead: ~8 KB, enough in flight for DRAM's latency */


static inline __attribute__((always_inline)) void tile(const float *x, int64_t K, const float *panel,
                                                       const float *bias, float *y, int64_t ldy, int64_t cols,
                                                       const int rows) {
    vec acc[ROWS][VECS];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < VECS; j++) acc[i][j] = VZERO();
    for (int64_t k = 0; k < K; k++) {
        const float *pk = panel + k * PANEL;
        for (int line = 0; line < PANEL; line += 16) __builtin_prefetch(pk + AHEAD * PANEL + line, 0, 3);
        vec w[VECS];
        for (int j = 0; j < VECS; j++) w[j] = VLOAD(pk + j * LANES);
        for (int i = 0; i < rows; i++) {
            vec xv = VBCAST(x[i * K + k]);
            for (int j = 0; j < VECS; j++) acc[i][j] = VFMA(xv, w[j], acc[i][j]);
        }
    }
    for (int i = 0; i < rows; i++) {
        float out[PANEL];
        for (int j = 0; j < VECS; j++) VSTORE(out + j * LANES, acc[i][j]);
        if (bias)
            for (int64_t c = 0; c < cols; c++) out[c] += bias[c];
        memcpy(y + i * ldy, out, (size_t)cols * sizeof(float));
    }
}

/* Panels [p0, p1) of y = x w^T + b: x [M][K], packed [P][K][64], bias [N] (or NULL), y [M][N]. */
void sled_linear(const float *x, const float *packed, const float *bias, float *y, int64_t M, int64_t K,
                 int64_t N, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
        const float *panel = packed + p * K * PANEL;
        const float *b = bias ? bias + p * PANEL : 0;
        int64_t cols = N - p * PANEL < PANEL ? N - p * PANEL : PANEL;
        float *yp = y + p * PANEL;
        int64_t m = 0;
        for (; m + ROWS <= M; m += ROWS) tile(x + m * K, K, panel, b, yp + m * N, N, cols, ROWS);
        switch (M - m) {  /* the last rows: the same arithmetic per output, fewer rows per tile */
#if ROWS > 5
            case 5: tile(x + m * K, K, panel, b, yp + m * N, N, cols, 5); break;
            case 4: tile(x + m * K, K, panel, b, yp + m * N, N, cols, 4); break;
            case 3: tile(x + m * K, K, panel, b, yp + m * N, N, cols, 3); break;
            case 2: tile(x + m * K, K, panel, b, yp + m * N, N, cols, 2); break;
            case 1: tile(x + m * K, K, panel, b, yp + m * N, N, cols, 1); break;
#endif
            default: break;
        }
    }
}

/* ---- the same product on several threads (pool.c): panels in chunks that threads claim. An output's arithmetic
   does not depend on which thread computes it, so the bits are the same at any thread count. */

void sled_parallel(int threads, int64_t chunks, void (*fn)(void *, int64_t, int64_t, int), void *context);

struct linear_job {
    const float *x, *packed, *bias;
    float *y;
    int64_t M, K, N, P;
};

static void linear_chunk(void *context, int64_t chunk, int64_t chunks, int thread) {
    struct linear_job *job = context;
    (void)thread;
    sled_linear(job->x, job->packed, job->bias, job->y, job->M, job->K, job->N, job->P * chunk / chunks,
                job->P * (chunk + 1) / chunks);
}

/* sled_linear over all P panels on up to `threads` threads (the caller's included), in up to 4 chunks a thread
   (fewer when panels are fewer), so a thread the OS did not schedule leaves its chunks to the others. */
void sled_linear_threads(const float *x, const float *packed, const float *bias, float *y, int64_t M, int64_t K,
                         int64_t N, int64_t P, int threads) {
    struct linear_job job = {x, packed, bias, y, M, K, N, P};
    int64_t chunks = threads > 1 ? 4 * (int64_t)threads : 1;
    sled_parallel(threads, chunks < P ? chunks : P, linear_chunk, &job);
}
