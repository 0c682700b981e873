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
   (6 x 64 accumulators: the register file), so at hundreds of rows the kernel is compute bound like a GEMM; up to
   48 rows read a panel in blocks that every tile passes over while the block sits in L1 (sled_linear). */

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
#define AHEAD 32                 /* panel rows (k) a whole panel's first tile prefetches ahead: ~8 KB */
#define KB 32                    /* panel rows (k) a block: 8 KB */
#define GROUP 48                 /* rows a group (a multiple of ROWS): their running sums, 12 KB */

#if ROWS == 6
#define BY_ROWS ROWS_1_TO_6
#else
#define BY_ROWS(rows, CALL) CALL(1)
#endif


/* One block of one tile: `rows` rows of x against panel rows [k0, k0 + kb) of one panel, continuing each output's
   chain from `sums` ([rows][64]; from zero when `start`) and leaving it there. Meanwhile it prefetches `lines`
   cache lines a k from `ahead` (into L2): its share of the weight stream two blocks on. */
static inline __attribute__((always_inline)) void block(const float *x, int64_t K, int64_t k0, int64_t kb,
                                                        const float *pk, float *sums, const int rows,
                                                        const int start, const float *ahead, int lines) {
    vec acc[ROWS][VECS];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < VECS; j++) acc[i][j] = start ? VZERO() : VLOAD(sums + i * PANEL + j * LANES);
    const float *xk = x + k0;
    for (int64_t k = 0; k < kb; k++, pk += PANEL) {
        for (int i = 0; i < lines; i++) __builtin_prefetch(ahead + (k * lines + i) * 16, 0, 2);
        vec w[VECS];
        for (int j = 0; j < VECS; j++) w[j] = VLOAD(pk + j * LANES);
        for (int i = 0; i < rows; i++) {
            vec xv = VBCAST(xk[i * K + k]);
            for (int j = 0; j < VECS; j++) acc[i][j] = VFMA(xv, w[j], acc[i][j]);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < VECS; j++) VSTORE(sums + i * PANEL + j * LANES, acc[i][j]);
}

/* One tile: `rows` rows of x against one panel. Meanwhile it prefetches: the first tile of a panel streams it
   from memory and prefetches it AHEAD rows on (into L1); the later tiles read the panel from L2 and prefetch
   `lines` cache lines a k of `share`, their share of the next panel (into L2), so the next panel's first tile
   finds it there (`first`: a constant, so each kind of tile has one loop). Without that the first tile of every
   panel ran at memory speed, about half its FMA rate:
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

/* Panels [p0, p1) of y = x w^T + b a whole panel a tile (many rows: sled_linear). */
static void whole_panels(const float *x, const float *packed, const float *bias, float *y, int64_t M, int64_t K,
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
            BY_ROWS(M - m < ROWS ? M - m : ROWS, TILE);  /* the last rows: the same arithmetic, fewer a tile */
#undef TILE
        }
    }
}

/* Panels [p0, p1) of y = x w^T + b in blocks (few rows: sled_linear). Rows go in groups of up to GROUP; a group
   passes over a panel in blocks of KB panel rows (8 KB, held in L1), every tile of the group over a block before
   the next block, each output's running sum kept in `sums` between blocks. Every tile of a block prefetches its
   share of the stream two blocks on (panels are contiguous, so the stream runs on into the next panel), so memory
   streams the weights while all the rows compute. A whole panel a tile (whole_panels) has the first tile stream
   it from memory and the others read it from L2 while they prefetch the next panel: memory and arithmetic take
   turns. On one Xeon core (SmolLM2's products, all 30 layers and the head, alternated, medians of 11) blocks
   take 49.2 ms at 20 rows against 61.6, 65.6 at 32 against 75.7 and 39.9 at 5 against 42.6; with AVX2 only
   (1-row tiles, a whole panel re-read from L2 for every row) 93 against 134 ms at 20 rows. */
static void blocked_panels(const float *x, const float *packed, const float *bias, float *y, int64_t M, int64_t K,
                           int64_t N, int64_t p0, int64_t p1) {
    float sums[GROUP * PANEL] __attribute__((aligned(64)));
    for (int64_t p = p0; p < p1; p++) {
        const float *panel = packed + p * K * PANEL;
        int64_t cols = N - p * PANEL < PANEL ? N - p * PANEL : PANEL;
        for (int64_t g = 0; g < M; g += GROUP) {
            int64_t grows = M - g < GROUP ? M - g : GROUP;
            int64_t tiles = (grows + ROWS - 1) / ROWS;
            int lines = (int)((PANEL / 16 + tiles - 1) / tiles);
            for (int64_t k0 = 0; k0 < K; k0 += KB) {
                int64_t kb = K - k0 < KB ? K - k0 : KB;
                const float *pk = panel + k0 * PANEL;
                for (int64_t m = 0; m < grows; m += ROWS) {
                    const float *xm = x + (g + m) * K;
                    float *sm = sums + m * PANEL;
                    /* this tile's share of the block two blocks on: `lines` cache lines a k */
                    int64_t first = (m / ROWS) * kb * lines;
                    int n = first < kb * (PANEL / 16) ? lines : 0;
                    const float *ahead = pk + 2 * kb * PANEL + first * 16;
#define BLOCK(r) (k0 == 0 ? block(xm, K, k0, kb, pk, sm, r, 1, ahead, n) \
                          : block(xm, K, k0, kb, pk, sm, r, 0, ahead, n))
                    BY_ROWS(grows - m < ROWS ? grows - m : ROWS, BLOCK);  /* the last rows: fewer a tile */
#undef BLOCK
                }
            }
            for (int64_t i = 0; i < grows; i++) {
                float *out = sums + i * PANEL;
                if (bias)
                    for (int64_t c = 0; c < cols; c++) out[c] += bias[p * PANEL + c];
                memcpy(y + (g + i) * N + p * PANEL, out, (size_t)cols * sizeof(float));
            }
        }
    }
}

/* Panels [p0, p1) of y = x w^T + b: x [M][K], packed [P][K][64], bias [N] (or NULL), y [M][N]. Up to GROUP rows in
   blocks (blocked_panels: memory and arithmetic overlap where both are about equal), more a whole panel a tile
   (whole_panels: compute bound, the running sums in registers for all of K, 10% faster at 320 rows). Both give
   every output the same arithmetic, so the choice by row count keeps the bits. */
void sled_linear(const float *x, const float *packed, const float *bias, float *y, int64_t M, int64_t K,
                 int64_t N, int64_t p0, int64_t p1) {
    if (M <= GROUP)
        blocked_panels(x, packed, bias, y, M, K, N, p0, p1);
    else
        whole_panels(x, packed, bias, y, M, K, N, p0, p1);
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
