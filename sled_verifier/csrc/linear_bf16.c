/* The verifier's product over bfloat16 weights (`--dtype bfloat16` on a CPU: sled_verifier/native.py), float32
   in and out: y[m][n] = bf16(x[m][:]) . w[n][:] + b[n], every product of two bfloat16 values exact in float32
   and summed in float32. Only the products' weights are bfloat16: the residual stream, norms, rotary embedding,
   attention and the KV cache stay float32 (as llama.cpp computes a BF16 model). A step at a few rows streams
   half the bytes of float32, and on a CPU with AMX (Intel Sapphire Rapids and later) the tile unit's bfloat16
   products (~1.6 TFLOP/s on one core, against ~0.2 for float32 FMAs) leave a step of hundreds of rows
   memory-bound too. Without AMX, AVX512-BF16's dot products (AMD Zen 4) read the same packed weight.

   The weight is packed once, [N/64][K2/2][64][2] (K2: K rounded up to 32; zeros fill the last panel and the
   padded inputs): per panel of 64 outputs, for each pair of inputs, each output's two weights side by side,
   which is both the layout AMX's B tiles read (16 outputs x 16 pairs a tile, rows 256 bytes apart) and the one
   AVX512-BF16's VDPBF16PS takes (16 outputs' pairs a vector). x is rounded to bfloat16 (to nearest even) once a
   product, into rows of K2 (zero rows up to a multiple of 16 for AMX).

   Batch invariant by construction, as csrc/linear.c: an output is one chain over its input pairs in order, 32
   inputs a tile step (AMX) or 2 a dot product (AVX512-BF16), from zero, then + b[n]; it depends on its own row
   and its own weights alone, whatever the row count, the tile its row falls in or the thread. AMX rows always go
   16 to a tile (zero rows pad the last), so no row ever meets another tile shape. The two instruction sets round
   differently, so their bits differ: which one a machine uses follows from its CPU alone (sled_bf16_kind). */

#define _GNU_SOURCE
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "simd.h"

#define PANEL 64  /* outputs per panel */
#define KSTEP 32  /* inputs per AMX tile step: 16 pairs */
#define TROWS 16  /* rows per AMX tile */

void sled_parallel(int threads, int64_t chunks, void (*fn)(void *, int64_t, int64_t, int), void *context);

/* Which bfloat16 product this library runs here: 1 AMX, 2 AVX512-BF16, 0 none (built for a CPU without either).
   Linux lends a process AMX's tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM): asked once here;
   refused (an old kernel), the AVX512-BF16 path serves. */
int sled_bf16_kind(void) {
    static int kind = -1;
    if (kind >= 0) return kind;
    kind = 0;
#if defined(__AVX512BF16__)
    kind = 2;
#endif
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(SYS_arch_prctl)
    if (getenv("SLED_AMX") == 0 || strcmp(getenv("SLED_AMX"), "0") != 0)
        if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0) kind = 1;
#endif
    return kind;
}

#if defined(__AVX512BF16__)

/* x [M][K] float32 -> xb [rows][K2] bfloat16, to nearest even; zeros past K and below M */
static void to_bf16(const float *x, int64_t M, int64_t K, uint16_t *xb, int64_t rows, int64_t K2) {
    for (int64_t m = 0; m < rows; m++) {
        uint16_t *to = xb + m * K2;
        for (int64_t k = 0; k < K2; k += 16) {
            __mmask16 mask = m >= M || k >= K ? 0 : K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
            __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, x + m * K + k));
            memcpy(to + k, &v, sizeof v);
        }
    }
}

static void store_row(const float *acc, const float *bias, float *y, int64_t cols) {
    if (bias)
        for (int64_t c = 0; c < cols; c++) y[c] = acc[c] + bias[c];
    else
        memcpy(y, acc, (size_t)cols * sizeof(float));
}

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes[16];
    uint8_t rows[16];
};

/* tiles 0-3: one row tile's 16 x 64 float32 outputs; 4: 16 rows x 32 inputs of x; 5, 6: a weight's 16 pairs x
   16 outputs, alternating */
static void amx_panels(const uint16_t *xb, int64_t K2, const uint16_t *packed, const float *bias, float *y,
                       int64_t M, int64_t N, int64_t p0, int64_t p1) {
    struct tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 7; t++) config.rows[t] = 16, config.bytes[t] = 64;
    _tile_loadconfig(&config);
    float out[TROWS * PANEL] __attribute__((aligned(64)));
    for (int64_t p = p0; p < p1; p++) {
        const uint16_t *panel = packed + p * K2 * PANEL;
        int64_t cols = N - p * PANEL < PANEL ? N - p * PANEL : PANEL;
        for (int64_t m0 = 0; m0 < M; m0 += TROWS) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t k = 0; k < K2; k += KSTEP) {
                const uint16_t *w = panel + k * PANEL;  /* pair row k / 2: 64 outputs x 2 */
                _tile_loadd(4, xb + m0 * K2 + k, K2 * 2);
                _tile_loadd(5, w, 4 * PANEL);
                _tile_dpbf16ps(0, 4, 5);
                _tile_loadd(6, w + 32, 4 * PANEL);
                _tile_dpbf16ps(1, 4, 6);
                _tile_loadd(5, w + 64, 4 * PANEL);
                _tile_dpbf16ps(2, 4, 5);
                _tile_loadd(6, w + 96, 4 * PANEL);
                _tile_dpbf16ps(3, 4, 6);
            }
            _tile_stored(0, out, 4 * PANEL);
            _tile_stored(1, out + 16, 4 * PANEL);
            _tile_stored(2, out + 32, 4 * PANEL);
            _tile_stored(3, out + 48, 4 * PANEL);
            for (int64_t i = 0; i < TROWS && m0 + i < M; i++)
                store_row(out + i * PANEL, bias ? bias + p * PANEL : 0, y + (m0 + i) * N + p * PANEL, cols);
        }
    }
    _tile_release();  /* a thread that holds no tile data saves none at a context switch */
}
#endif

#define DROWS 6  /* AVX512-BF16: 6 rows x 4 accumulators of 16 outputs, as csrc/linear.c */

static inline __attribute__((always_inline)) void dp_tile(const uint16_t *xb, int64_t K2, const uint16_t *panel,
                                                          float *out, const int rows) {
    __m512 acc[DROWS][4];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t r = 0; r < K2 / 2; r++) {
        const uint16_t *w = panel + r * 2 * PANEL;
        __builtin_prefetch(w + 32 * 2 * PANEL, 0, 3);
        __builtin_prefetch(w + 32 * 2 * PANEL + 32, 0, 3);
        __builtin_prefetch(w + 32 * 2 * PANEL + 64, 0, 3);
        __builtin_prefetch(w + 32 * 2 * PANEL + 96, 0, 3);
        __m512bh wv[4];
        for (int j = 0; j < 4; j++) wv[j] = (__m512bh)_mm512_loadu_si512(w + 32 * j);
        for (int i = 0; i < rows; i++) {
            int32_t pair;
            memcpy(&pair, xb + i * K2 + 2 * r, sizeof pair);
            __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            for (int j = 0; j < 4; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(out + i * PANEL + 16 * j, acc[i][j]);
}

static void dp_panels(const uint16_t *xb, int64_t K2, const uint16_t *packed, const float *bias, float *y,
                      int64_t M, int64_t N, int64_t p0, int64_t p1) {
    float out[DROWS * PANEL];
    for (int64_t p = p0; p < p1; p++) {
        const uint16_t *panel = packed + p * K2 * PANEL;
        int64_t cols = N - p * PANEL < PANEL ? N - p * PANEL : PANEL;
        for (int64_t m0 = 0; m0 < M; m0 += DROWS) {
            const uint16_t *xm = xb + m0 * K2;
#define DTILE(k) dp_tile(xm, K2, panel, out, k)
            ROWS_1_TO_6(M - m0 < DROWS ? M - m0 : DROWS, DTILE);  /* the same arithmetic, fewer rows a tile */
#undef DTILE
            for (int64_t i = 0; i < DROWS && m0 + i < M; i++)
                store_row(out + i * PANEL, bias ? bias + p * PANEL : 0, y + (m0 + i) * N + p * PANEL, cols);
        }
    }
}

/* Up to DGROUP rows in blocks of DKB pair rows (8 KB, held in L1), every tile over a block before the next, each
   output's running sum kept in `sums` between blocks and each tile prefetching its share of the stream two blocks
   on: memory streams the weights while all the rows compute, as csrc/linear.c's blocked_panels (a whole panel a
   tile re-reads it from L2 for every tile while memory waits). A float stored and reloaded is the same float, so
   the bits are dp_panels'. */
#define DKB 32
#define DGROUP 48

static inline __attribute__((always_inline)) void dp_block(const uint16_t *xb, int64_t K2, int64_t r0, int64_t rb,
                                                           const uint16_t *w, float *sums, const int rows,
                                                           const int start, const uint16_t *ahead, int lines) {
    __m512 acc[DROWS][4];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < 4; j++)
            acc[i][j] = start ? _mm512_setzero_ps() : _mm512_loadu_ps(sums + i * PANEL + 16 * j);
    for (int64_t r = 0; r < rb; r++, w += 2 * PANEL) {
        for (int i = 0; i < lines; i++) __builtin_prefetch(ahead + (r * lines + i) * 32, 0, 2);
        __m512bh wv[4];
        for (int j = 0; j < 4; j++) wv[j] = (__m512bh)_mm512_loadu_si512(w + 32 * j);
        for (int i = 0; i < rows; i++) {
            int32_t pair;
            memcpy(&pair, xb + i * K2 + 2 * (r0 + r), sizeof pair);
            __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            for (int j = 0; j < 4; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(sums + i * PANEL + 16 * j, acc[i][j]);
}

static void dp_blocked_panels(const uint16_t *xb, int64_t K2, const uint16_t *packed, const float *bias, float *y,
                              int64_t M, int64_t N, int64_t p0, int64_t p1) {
    float sums[DGROUP * PANEL] __attribute__((aligned(64)));
    for (int64_t p = p0; p < p1; p++) {
        const uint16_t *panel = packed + p * K2 * PANEL;
        int64_t cols = N - p * PANEL < PANEL ? N - p * PANEL : PANEL;
        for (int64_t g = 0; g < M; g += DGROUP) {
            int64_t grows = M - g < DGROUP ? M - g : DGROUP, tiles = (grows + DROWS - 1) / DROWS;
            int lines = (int)((PANEL / 16 + tiles - 1) / tiles);  /* cache lines a pair row, shared by the tiles */
            for (int64_t r0 = 0; r0 < K2 / 2; r0 += DKB) {
                int64_t rb = K2 / 2 - r0 < DKB ? K2 / 2 - r0 : DKB;
                const uint16_t *w = panel + r0 * 2 * PANEL;
                for (int64_t m = 0; m < grows; m += DROWS) {
                    const uint16_t *xm = xb + (g + m) * K2;
                    float *sm = sums + m * PANEL;
                    int64_t first = (m / DROWS) * rb * lines;
                    int n = first < rb * (PANEL / 16) ? lines : 0;
                    const uint16_t *ahead = w + 2 * rb * 2 * PANEL + first * 32;
#define DBLOCK(k) (r0 == 0 ? dp_block(xm, K2, r0, rb, w, sm, k, 1, ahead, n) \
                           : dp_block(xm, K2, r0, rb, w, sm, k, 0, ahead, n))
                    ROWS_1_TO_6(grows - m < DROWS ? grows - m : DROWS, DBLOCK);  /* the last rows: fewer a tile */
#undef DBLOCK
                }
            }
            for (int64_t i = 0; i < grows; i++)
                store_row(sums + i * PANEL, bias ? bias + p * PANEL : 0, y + (g + i) * N + p * PANEL, cols);
        }
    }
}

struct bf16_job {
    const uint16_t *xb, *packed;
    const float *bias;
    float *y;
    int64_t M, K2, N, P;
    int kind;
};

static void bf16_chunk(void *context, int64_t chunk, int64_t chunks, int thread) {
    struct bf16_job *job = context;
    int64_t p0 = job->P * chunk / chunks, p1 = job->P * (chunk + 1) / chunks;
    (void)thread;
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
    if (job->kind == 1) {
        amx_panels(job->xb, job->K2, job->packed, job->bias, job->y, job->M, job->N, p0, p1);
        return;
    }
#endif
    if (job->M <= DGROUP)
        dp_blocked_panels(job->xb, job->K2, job->packed, job->bias, job->y, job->M, job->N, p0, p1);
    else
        dp_panels(job->xb, job->K2, job->packed, job->bias, job->y, job->M, job->N, p0, p1);
}
#endif

/* y [M][N] = x [M][K] times the packed weight [P][K2/2][64][2] (+ bias [N] or NULL), on up to `threads` threads
   (pool.c, as sled_linear_threads). Returns 0, or -1 without a bfloat16 product here (or out of memory). */
int sled_linear_bf16_threads(const float *x, const uint16_t *packed, const float *bias, float *y, int64_t M,
                             int64_t K, int64_t N, int64_t P, int threads) {
#if defined(__AVX512BF16__)
    int kind = sled_bf16_kind();
    int64_t K2 = (K + KSTEP - 1) / KSTEP * KSTEP, rows = kind == 1 ? (M + TROWS - 1) / TROWS * TROWS : M;
    uint16_t *xb = aligned_alloc(64, (size_t)((rows * K2 * 2 + 63) / 64 * 64));
    if (xb == 0 || kind == 0) {
        free(xb);
        return -1;
    }
    to_bf16(x, M, K, xb, rows, K2);
    struct bf16_job job = {xb, packed, bias, y, M, K2, N, P, kind};
    int64_t chunks = threads > 1 ? 4 * (int64_t)threads : 1;
    sled_parallel(threads, chunks < P ? chunks : P, bf16_chunk, &job);
    free(xb);
    return 0;
#else
    (void)x, (void)packed, (void)bias, (void)y, (void)M, (void)K, (void)N, (void)P, (void)threads;
    return -1;
#endif
}
