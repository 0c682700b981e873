/* The per-token work between a layer's products, float32, for the compiled runtime's forward on a CPU
   (sled_verifier/tokenwise.py): an RMS norm, SiLU(gate) * up, and the rotary embedding with the KV write. One C
   call each per layer, where torch spends 8-20 operators (and their Python) on each: at the few rows of a
   verification step those operators, not their arithmetic, were a quarter of the step.

   Every output is a function of its own token's inputs alone, by one fixed arithmetic (the vector path for
   every element, tails through a zero-padded vector): batch and width invariant by construction. Built with
   -std=c11, so the compiler contracts nothing into fused multiply-adds that is not written as one. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

/* out[t][i] = silu(gate[t][i]) * up[t][i], rows of gate and up ld floats apart (a fused gate/up product's
   output: up = gate + inter, ld = 2 inter; two products' outputs: ld = inter) */
void sled_silu_mul(const float *gate, const float *up, int64_t ld, float *out, int64_t T, int64_t inter) {
    for (int64_t t = 0; t < T; t++) {
        const float *g = gate + t * ld, *u = up + t * ld;
        float *o = out + t * inter;
        for (int64_t i = 0; i < inter; i += LANES) {
            float gb[LANES] = {0}, ub[LANES] = {0}, ob[LANES];
            int64_t n = inter - i < LANES ? inter - i : LANES;
            const float *gp = g + i, *up_ = u + i;
            float *op = o + i;
            if (n < LANES) {
                memcpy(gb, gp, n * sizeof(float)), memcpy(ub, up_, n * sizeof(float));
                gp = gb, up_ = ub, op = ob;
            }
            vec gv = VLOAD(gp);
            vec silu = VDIV(gv, VADD(VBCAST(1.0f), vexp(VSUB(VZERO(), gv))));
            VSTORE(op, VMUL(silu, VLOAD(up_)));
            if (n < LANES) memcpy(o + i, ob, n * sizeof(float));
        }
    }
}

/* out[t] = weight * (x[t] / sqrt(mean(x[t]^2) + eps)), as transformers' LlamaRMSNorm computes it in float32 */
void sled_rmsnorm(const float *x, const float *weight, float *out, int64_t T, int64_t dim, float eps) {
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * dim;
        vec acc = VZERO();
        for (int64_t i = 0; i < dim; i += LANES) {
            float b[LANES] = {0};
            int64_t n = dim - i < LANES ? dim - i : LANES;
            const float *p = xt + i;
            if (n < LANES) memcpy(b, p, n * sizeof(float)), p = b;
            vec v = VLOAD(p);
            acc = VFMA(v, v, acc);
        }
        float lanes[LANES], sum = 0.0f;
        VSTORE(lanes, acc);
        for (int l = 0; l < LANES; l++) sum += lanes[l];
        float inv = 1.0f / sqrtf(sum / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) out[t * dim + i] = weight[i] * (xt[i] * inv);
    }
}

/* The rotary embedding of each token's q (in place) and k heads, as transformers' apply_rotary_pos_emb
   computes it (x * cos + rotate_half(x) * sin, no fused multiply-add), then k and v written into the layer's
   KV store: token t's q, k and v at q + t ldq, k + t ldk, v + t ldv ([H][D], [Hkv][D], [Hkv][D]: one fused
   product's output, or three products'), cos/sin [T][D], keys/values [S+1][Hkv][L][D], token t's key into slot
   slots[t] at position positions[t]. */
void sled_rope_write(float *q, int64_t ldq, const float *k, int64_t ldk, const float *v, int64_t ldv,
                     const float *cos, const float *sin, float *keys, float *values, const int64_t *slots,
                     const int64_t *positions, int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t L) {
    int64_t half = D / 2;
    float rotated[1024];
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + t * D, *s = sin + t * D;
        for (int64_t h = 0; h < H + Hkv; h++) {
            const float *x = h < H ? q + t * ldq + h * D : k + t * ldk + (h - H) * D;
            for (int64_t d = 0; d < half; d++) {
                rotated[d] = x[d] * c[d] + (-x[d + half]) * s[d];
                rotated[d + half] = x[d + half] * c[d + half] + x[d] * s[d + half];
            }
            float *to = h < H ? q + t * ldq + h * D : keys + ((slots[t] * Hkv + (h - H)) * L + positions[t]) * D;
            memcpy(to, rotated, D * sizeof(float));
        }
        for (int64_t h = 0; h < Hkv; h++)
            memcpy(values + ((slots[t] * Hkv + h) * L + positions[t]) * D, v + t * ldv + h * D, D * sizeof(float));
    }
}
