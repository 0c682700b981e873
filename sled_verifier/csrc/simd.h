/* The vector operations the native kernels are written in: AVX-512 (16 floats) or AVX2 with FMA (8); without
   either the library does not build and the verifier keeps torch's kernels. Explicit intrinsics, and the files
   are compiled as ISO C (-std=c11: no contraction), so every multiply-add is fused exactly where written. */

#ifndef SLED_SIMD_H
#define SLED_SIMD_H

#include <immintrin.h>

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec;
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VBCAST(s) _mm512_set1_ps(s)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VFNMA(a, b, c) _mm512_fnmadd_ps(a, b, c)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VSUB(a, b) _mm512_sub_ps(a, b)
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define VDIV(a, b) _mm512_div_ps(a, b)
#define VMIN(a, b) _mm512_min_ps(a, b)
#define VMAX(a, b) _mm512_max_ps(a, b)
#define VROUND(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define VSCALE2(y, n) _mm512_scalef_ps(y, n)                                            /* y * 2^n */
#define VSELECT_GT(a, b, x, y) _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), x, y) /* a > b ? y : x */
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
typedef __m256 vec;
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VBCAST(s) _mm256_set1_ps(s)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VFNMA(a, b, c) _mm256_fnmadd_ps(a, b, c)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VSUB(a, b) _mm256_sub_ps(a, b)
#define VMUL(a, b) _mm256_mul_ps(a, b)
#define VDIV(a, b) _mm256_div_ps(a, b)
#define VMIN(a, b) _mm256_min_ps(a, b)
#define VMAX(a, b) _mm256_max_ps(a, b)
#define VROUND(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define VSCALE2(y, n) _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32( \
    _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)))       /* -126 <= n <= 127: 2^n normal */
#define VSELECT_GT(a, b, x, y) _mm256_blendv_ps(x, y, _mm256_cmp_ps(a, b, _CMP_GT_OQ))
#else
#error "sled kernels need AVX2 with FMA, or AVX-512"
#endif

/* CALL(r) with the row count `rows` (1 to 6) as a constant, so each tile size of a kernel has its own loop with its
   accumulators in registers (csrc/linear.c, csrc/linear_bf16.c) */
#define ROWS_1_TO_6(rows, CALL)          \
    switch (rows) {                      \
        case 6: CALL(6); break;          \
        case 5: CALL(5); break;          \
        case 4: CALL(4); break;          \
        case 3: CALL(3); break;          \
        case 2: CALL(2); break;          \
        default: CALL(1); break;         \
    }

/* e^x, the same instructions for every element: exactly 0 below -87 (a masked score's -inf included), at most
   e^88 (finite) above; between, the Cephes expf reduction and polynomial (~1 ulp). */
static inline __attribute__((always_inline)) vec vexp(vec x) {
    const vec low = VBCAST(-87.0f);
    vec xc = VMIN(VMAX(x, low), VBCAST(88.0f));
    vec n = VROUND(VMUL(xc, VBCAST(1.44269504088896341f)));
    vec r = VFNMA(n, VBCAST(0.693359375f), xc);
    r = VFNMA(n, VBCAST(-2.12194440e-4f), r);
    vec p = VBCAST(1.9875691500e-4f);
    p = VFMA(p, r, VBCAST(1.3981999507e-3f));
    p = VFMA(p, r, VBCAST(8.3334519073e-3f));
    p = VFMA(p, r, VBCAST(4.1665795894e-2f));
    p = VFMA(p, r, VBCAST(1.6666665459e-1f));
    p = VFMA(p, r, VBCAST(5.0000001201e-1f));
    vec y = VADD(VFMA(p, VMUL(r, r), r), VBCAST(1.0f));
    return VSELECT_GT(low, x, VSCALE2(y, n), VZERO());
}

#endif
