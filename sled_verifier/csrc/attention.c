/* Slot attention over ragged rows, width and batch invariant by construction (sled_verifier/native.py builds it
   with csrc/linear.c into one library; sled_verifier/attention.py calls it where the SDPA blocks were the
   width-invariant form).

   sled_attend: for each row (slot, start, m) and each of its m queries at positions p = start .. start + m - 1,
   for each head, over its slot's keys and values 0 .. p read in place from one layer's store:
       s_j = (q . k_j) * scale       one FMA chain over d = 0 .. D-1 in order, from zero
       w_j = exp(s_j - max_j s_j)    one vectorised exp, the same instructions for every element
       out = (sum_j w_j v_j) / (sum_j w_j)   both sums over j = 0 .. p in key order (FMA chain, add chain)
   Every output's arithmetic is a function of its own query and its slot's keys and values 0 .. p alone: not of
   m, of where the position falls in a tile, of the lane it gets, of the other rows or of the thread. So a
   position gets the same bits in a 2,048-token prefill, a prefill cut in pieces, a 5-token verification and
   one-token decoding, alone or in any batch (tests/test_attention.py checks it bitwise).

   How it stays fast: the queries that share a key/value head (a GQA group's heads at consecutive positions)
   go in tiles of one vector's lanes, so the scores of a key for a whole tile are one FMA chain per lane over
   d (the key's elements broadcast, the tile's queries transposed once), each key read once per tile; the
   scores are kept ([keys][lanes], a few hundred KB at most) so the softmax is exact in three passes (scores
   and max, exp and sum, weighted values) with no rescaling; the weighted values of a few queries at a time
   are vectors across d, each value row loaded once for them. Keys past a lane's position get -inf (weight 0)
   in the first two passes and are skipped in the third. While a task's keys are scored, the next task's keys
   and values are prefetched into L2 (a task's are a few tens of KB from memory: its slot's rows of one kv head):
   SmolLM2's attention of 16 rows x 5 tokens, 30 layers, one core, 15.1 -> 11.2 ms at context 100 and 33.5 ->
   26.0 at 240, with the same bits. */

#include <stdint.h>
#include <string.h>

#include "simd.h"

#if LANES == 16
#define QUERIES 4  /* queries per weighted-value pass: 4 x D/16 accumulators and a value row in 32 registers */
#else
#define QUERIES 1  /* 16 registers */
#endif

#define MAX_VECS 16  /* head_dim up to 16 vectors (256 with AVX-512, 128 with AVX2): native.py checks */
#define KEYS 8       /* keys scored together: one load of the tile's queries per d feeds 8 FMA chains */


/* Scores of keys j .. j + count - 1 for the tile (lanes = queries): s[j][lane], -inf past each lane's position. */
static inline __attribute__((always_inline)) void score(const float *qt, const float *keys, int64_t kt, int64_t D,
                                                        float scale, vec posv, int64_t pmin, int64_t j, float *s,
                                                        vec *mx, const float *const *next, const int count) {
    vec acc[KEYS];
    for (int i = 0; i < count; i++) acc[i] = VZERO();
    const float *k = keys + j * kt;
    if (next[0])  /* the next task's keys and values at these positions, into L2 while these are scored */
        for (int i = 0; i < count; i++)
            for (int64_t d = 0; d < D; d += 16) {
                __builtin_prefetch(next[0] + (j + i) * kt + d, 0, 2);
                __builtin_prefetch(next[1] + (j + i) * kt + d, 0, 2);
            }
    for (int64_t d = 0; d < D; d++) {
        vec qd = VLOAD(qt + d * LANES);
        for (int i = 0; i < count; i++) acc[i] = VFMA(qd, VBCAST(k[i * kt + d]), acc[i]);
    }
    for (int i = 0; i < count; i++) {
        vec sv = VMUL(acc[i], VBCAST(scale));
        if (j + i > pmin) sv = VSELECT_GT(VBCAST((float)(j + i)), posv, sv, VBCAST(-__builtin_inff()));
        VSTORE(s + (j + i) * LANES, sv);
        *mx = VMAX(*mx, sv);
    }
}

/* out[i] = sum_j w[j][lane0 + i] v_j / sums[lane0 + i] for ``nq`` queries at positions pos[0..nq-1] (rising):
   each output one FMA chain over j = 0 .. its position, whatever the other queries of the pass. */
static inline __attribute__((always_inline)) void weigh(const float *s, int lane0, const int64_t *pos, int nq,
                                                        const float *values, int64_t kt, const float *sums,
                                                        float *const *out, const int vecs) {
    vec acc[QUERIES][MAX_VECS];
    for (int i = 0; i < nq; i++)
        for (int v = 0; v < vecs; v++) acc[i][v] = VZERO();
    int64_t j = 0;
    for (; j <= pos[0]; j++) {  /* keys every query of the pass sees */
        const float *row = values + j * kt;
        vec vv[MAX_VECS];
        for (int v = 0; v < vecs; v++) vv[v] = VLOAD(row + v * LANES);
        for (int i = 0; i < nq; i++) {
            vec w = VBCAST(s[j * LANES + lane0 + i]);
            for (int v = 0; v < vecs; v++) acc[i][v] = VFMA(w, vv[v], acc[i][v]);
        }
    }
    for (; j <= pos[nq - 1]; j++) {  /* the causal triangle: only the queries at or past key j */
        const float *row = values + j * kt;
        for (int i = 0; i < nq; i++) {
            if (pos[i] < j) continue;
            vec w = VBCAST(s[j * LANES + lane0 + i]);
            for (int v = 0; v < vecs; v++) acc[i][v] = VFMA(w, VLOAD(row + v * LANES), acc[i][v]);
        }
    }
    for (int i = 0; i < nq; i++) {
        vec total = VBCAST(sums[lane0 + i]);
        for (int v = 0; v < vecs; v++) VSTORE(out[i] + v * LANES, VDIV(acc[i][v], total));
    }
}

static void weigh_any(const float *s, int lane0, const int64_t *pos, int nq, const float *values, int64_t kt,
                      const float *sums, float *const *out, int vecs) {
    switch (vecs) {  /* constant trip counts for the common head sizes, so the accumulators stay in registers */
        case 1: weigh(s, lane0, pos, nq, values, kt, sums, out, 1); break;
        case 2: weigh(s, lane0, pos, nq, values, kt, sums, out, 2); break;
        case 4: weigh(s, lane0, pos, nq, values, kt, sums, out, 4); break;
        case 8: weigh(s, lane0, pos, nq, values, kt, sums, out, 8); break;
        default: weigh(s, lane0, pos, nq, values, kt, sums, out, vecs); break;
    }
}

/* One tile: ``used`` queries of kv head ``kvh`` (pairs first .. first + used - 1 of (position, head in group),
   position-major), of a row whose queries start at position ``start``. */
static void tile(const float *q, int64_t qh, int64_t qt_stride, const float *keys, const float *values, int64_t kt,
                 float *out, int64_t H, int64_t D, int64_t start, int64_t first, int used, int64_t group, int64_t kvh,
                 float scale, float *qt, float *s, const float *const *next) {
    int64_t pos[LANES];
    float *dst[LANES];
    float posf[LANES];
    memset(qt, 0, (size_t)(D * LANES) * sizeof(float));
    for (int l = 0; l < LANES; l++) {
        int64_t pair = first + (l < used ? l : used - 1);
        int64_t t = pair / group, head = kvh * group + pair % group;
        pos[l] = start + t;
        posf[l] = (float)pos[l];
        dst[l] = out + (t * H + head) * D;
        if (l < used)
            for (int64_t d = 0; d < D; d++) qt[d * LANES + l] = q[head * qh + t * qt_stride + d];
    }
    const vec posv = VLOAD(posf);
    const int64_t pmin = pos[0], n = pos[used - 1] + 1;
    /* 1. scores and their max per lane */
    vec mx = VBCAST(-__builtin_inff());
    int64_t j = 0;
    for (; j + KEYS <= n; j += KEYS) score(qt, keys, kt, D, scale, posv, pmin, j, s, &mx, next, KEYS);
    for (; j < n; j++) score(qt, keys, kt, D, scale, posv, pmin, j, s, &mx, next, 1);
    /* 2. weights and their sum per lane, in key order */
    vec sum = VZERO();
    for (j = 0; j < n; j++) {
        vec w = vexp(VSUB(VLOAD(s + j * LANES), mx));
        VSTORE(s + j * LANES, w);
        sum = VADD(sum, w);
    }
    float sums[LANES];
    VSTORE(sums, sum);
    /* 3. weighted values, a few queries at a time */
    for (int l = 0; l < used; l += QUERIES) {
        int nq = used - l < QUERIES ? used - l : QUERIES;
        weigh_any(s, l, pos + l, nq, values, kt, sums, dst + l, (int)(D / LANES));
    }
}

/* rows [R][3] = (slot, start, m); q [B][H][M][D] with strides (qb, qh, qt) and unit d; keys and values one
   layer's store [S+1][Hkv][L][D] with strides (ks, kh, kt) and unit d; out [B][M][H][D] contiguous (positions
   past a row's m untouched). D a multiple of LANES, at most MAX_VECS vectors. scratch: (D + the longest row's
   start + m) x 16 floats per thread. Work goes in (row, key/value head) tasks, in chunks the threads claim
   (csrc/pool.c); an output's arithmetic does not depend on its thread. */
struct attend_job {
    const float *q;
    int64_t qb, qh, qt_stride;
    const float *keys, *values;
    int64_t ks, kh, kt;
    float *out;
    const int64_t *rows;
    int64_t R, H, Hkv, M, D;
    float scale;
    float *scratch;
    int64_t scratch_floats;
};

static void attend_chunk(void *context, int64_t chunk, int64_t chunks, int thread) {
    const struct attend_job *j = context;
    float *qt = j->scratch + thread * j->scratch_floats, *s = qt + j->D * LANES;
    const int64_t group = j->H / j->Hkv, tasks = j->R * j->Hkv;
    for (int64_t task = tasks * chunk / chunks; task < tasks * (chunk + 1) / chunks; task++) {
        const int64_t r = task / j->Hkv, kvh = task % j->Hkv;
        const int64_t slot = j->rows[3 * r], start = j->rows[3 * r + 1], m = j->rows[3 * r + 2];
        const float *k = j->keys + slot * j->ks + kvh * j->kh, *v = j->values + slot * j->ks + kvh * j->kh;
        /* the task after this one in the chunk: its keys and values are prefetched while this one's are scored */
        const float *next[2] = {0, 0};
        if (task + 1 < tasks * (chunk + 1) / chunks) {
            const int64_t r2 = (task + 1) / j->Hkv, kvh2 = (task + 1) % j->Hkv, slot2 = j->rows[3 * r2];
            next[0] = j->keys + slot2 * j->ks + kvh2 * j->kh;
            next[1] = j->values + slot2 * j->ks + kvh2 * j->kh;
        }
        for (int64_t first = 0; first < m * group; first += LANES) {
            int used = m * group - first < LANES ? (int)(m * group - first) : LANES;
            const float *const none[2] = {0, 0};
            tile(j->q + r * j->qb, j->qh, j->qt_stride, k, v, j->kt, j->out + r * j->M * j->H * j->D, j->H, j->D,
                 start, first, used, group, kvh, j->scale, qt, s, first == 0 ? next : none);
        }
    }
}

void sled_parallel(int threads, int64_t chunks, void (*fn)(void *, int64_t, int64_t, int), void *context);

void sled_attend(const float *q, int64_t qb, int64_t qh, int64_t qt_stride, const float *keys, const float *values,
                 int64_t ks, int64_t kh, int64_t kt, float *out, const int64_t *rows, int64_t R, int64_t H,
                 int64_t Hkv, int64_t M, int64_t D, float scale, float *scratch, int64_t scratch_floats,
                 int threads) {
    struct attend_job job = {q, qb, qh, qt_stride, keys, values, ks, kh, kt, out, rows, R, H, Hkv, M, D, scale,
                             scratch, scratch_floats};
    int64_t tasks = R * Hkv, chunks = threads > 1 ? 4 * (int64_t)threads : 1;  /* claimed: see pool.c */
    sled_parallel(threads, chunks < tasks ? chunks : tasks, attend_chunk, &job);
}
