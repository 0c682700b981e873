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


/* One tile: `rows` rows of x against one panel. Meanwhile it prefetches: the first tile of a panel streams it
   from memory and prefetches it AHEAD rows on (into L1); the later tiles read the panel from L2 and prefetch
   `lines` cache lines a k of `share`, their share of the next panel (into L2), so the next panel's first tile
   finds it there (`first`: a constant, so each kind of tile has one loop). Without that the first tile of every panel ran at memory speed, about half its FMA rate:
   SmolLM2's products at 12-32 rows, one core, ran at 78-99 GFLOP/s against 91-107 with it. */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t K, const float *panel,
                                                       const float *bias, float *y, int64_t ldy, int64_t cols,
                                                       const float *share, int lines, const int rows,
                                                       const int first) {
    vec acc[ROWS][VECS];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < VECS; j++) acc[i][j] = VZERO();
    for (int64_t k = 0; k < K; k++) {
        const float *pk = panel + k * PANEL;
        if (first)
            for (int line = 0; line < PANEL; line += 16) __builtin_prefetch(pk + AHEAD * PANEL + line, 0, 3);
        else
            for (int i = 0; i < lines; i++) __builtin_prefetch(share + (k * lines + i) * 16, 0, 2);
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
        /* the later tiles' shares of this chunk's next panel: `lines` cache lines a k each, enough to cover it */
        int64_t tiles = (M + ROWS - 1) / ROWS, panel_lines = K * (PANEL / 16);
        int lines = tiles > 1 && p + 1 < p1 ? (int)((panel_lines + (tiles - 1) * K - 1) / ((tiles - 1) * K)) : 0;
        for (int64_t m = 0, t = 0; m < M; m += ROWS, t++) {
            const float *share = t == 0 ? 0 : panel + K * PANEL + (t - 1) * K * lines * 16;
            int n = t > 0 && (t - 1) * K * lines < panel_lines ? lines : 0;
            const float *xm = x + m * K;
            float *ym = yp + m * N;
#define TILE(r) (t == 0 ? tile(xm, K, panel, b, ym, N, cols, 0, 0, r, 1) \
                        : tile(xm, K, panel, b, ym, N, cols, share, n, r, 0))
            switch (M - m < ROWS ? M - m : ROWS) {  /* the last rows: the same arithmetic per output, fewer a tile */
                case ROWS: TILE(ROWS); break;
#if ROWS > 5
                case 5: TILE(5); break;
                case 4: TILE(4); break;
                case 3: TILE(3); break;
                case 2: TILE(2); break;
                case 1: TILE(1); break;
#endif
                default: break;
            }
#undef TILE
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
