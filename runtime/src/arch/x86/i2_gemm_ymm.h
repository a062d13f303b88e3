/* The register-tiled I2 GEMM on 256-bit vectors, included by the AVX2 and AVX-VNNI variants (one
 * copy each, static to its file). The includer defines:
 *   I2Y_TARGET        the function attribute of its instruction set;
 *   I2Y_DPBUSD(a,c,x) when it has vpdpbusd on ymm: a + the 4-product sums of u8 c times s8 x, in
 *                     int32 lanes; without it products go through maddubs (below).
 * It gets i2y_matmul, a bn_ternary_matmul_fn for I2 weights (kernels.h).
 *
 * One step reads 32 weight bytes (128 elements) of each of R rows; byte k holds elements 4k..4k+3.
 * The activations of each token are deinterleaved once per call (bn_i2_planes_avx2, interleave 1)
 * into blocks of 4 planes of 32 bytes, lane k of plane i = x[128b + 4k + i], so that plane i of the
 * weights, ((byte >> 2i) & 3) mapped {0,1,2,3} -> {0,1,2,1} (code 3 counts as 0), lines up with
 * plane i of x. The codes c = w + 1 are non-negative, so dot(x, w) = sum(c * x) - sum(x). A pshufb
 * of the low (high) nibble of each byte gives the codes of planes 0 and 1 (2 and 3).
 * The products: vpdpbusd sums them exactly into int32 lanes. maddubs (u8 x s8 pairs into int16)
 * gives |pair| <= 2 * 2 * 128 = 512, a block's 4 planes <= 2048, so I2Y_GROUP = 8 blocks are summed
 * in int16 (<= 16384, no saturation) before madd(ones) widens them into int32.
 * A tile is R = 2 rows x NT <= 4 tokens: 8 accumulators, 2 code and 1 activation register, 3
 * constants, within the 16 ymm registers; each code plane serves 4 tokens, each activation plane 2
 * rows. Rows outer, tokens inner: a tile's rows are read from memory once, then stay in L1 while
 * all tokens pass. A single token (decoding, memory-bound) takes rows one at a time as one
 * sequential, prefetched stream, with an accumulator per plane (four independent chains). Zero
 * padding of the activations makes whatever codes sit past `cols` harmless; a row's last partial
 * 32 bytes are copied into a zeroed block, so nothing is read past the matrix. */
#ifndef BN_I2_GEMM_YMM_H
#define BN_I2_GEMM_YMM_H

#include <immintrin.h>
#include <string.h>

#include "arch/x86/kernels_x86.h"
#include "kernels.h"

enum {
    I2Y_STEP = 32,        /* weight bytes per row and step */
    I2Y_BLOCK = 128,      /* elements per step (4 planes of 32 activation bytes) */
    I2Y_ROWS = 2,         /* rows sharing each activation plane */
    I2Y_TOKENS = 4,       /* tokens sharing each code plane */
    I2Y_GROUP = 8,        /* maddubs: blocks summed in int16 before widening */
    I2Y_TOKEN_CHUNK = 64, /* tokens deinterleaved per pass (bounds the scratch memory) */
    I2Y_PREFETCH = 2048,  /* bytes ahead in the weight stream when decoding */
};

#define I2Y_INLINE static inline __attribute__((always_inline))

I2Y_TARGET I2Y_INLINE int32_t i2y_hsum(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* y[t*ldy + r] = dot(row r, token t) for R rows from w (row_bytes apart) and NT tokens whose planes
 * start tstride bytes apart; sums[t] = sum(x_t). With NT == 1, slot i of a row accumulates plane i. */
I2Y_TARGET I2Y_INLINE void i2y_tile(int R, int NT, const uint8_t *w, uint32_t row_bytes, const int8_t *planes,
                                    size_t tstride, const int32_t *sums, int32_t *y, size_t ldy) {
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    /* code of the nibble's low (tab_lo) or high (tab_hi) 2 bits, 3 -> 1 */
    const __m256i tab_lo = _mm256_setr_epi8(0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 0,
                                            1, 2, 1, 0, 1, 2, 1);
    const __m256i tab_hi = _mm256_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 2,
                                            2, 2, 2, 1, 1, 1, 1);
    __m256i acc[I2Y_ROWS][I2Y_TOKENS]; /* int32 (vpdpbusd) or int16 (maddubs) sums; all start at 0 */
    for (int r = 0; r < I2Y_ROWS; r++)
        for (int t = 0; t < I2Y_TOKENS; t++) acc[r][t] = _mm256_setzero_si256();
#ifndef I2Y_DPBUSD
    __m256i acc32[I2Y_ROWS][I2Y_TOKENS]; /* the int16 sums widened every I2Y_GROUP blocks */
    for (int r = 0; r < I2Y_ROWS; r++)
        for (int t = 0; t < I2Y_TOKENS; t++) acc32[r][t] = _mm256_setzero_si256();
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    const uint32_t steps = (row_bytes + I2Y_STEP - 1) / I2Y_STEP, full = row_bytes / I2Y_STEP;
    for (uint32_t s = 0; s < steps; s++) {
        const int8_t *p = planes + (size_t)s * I2Y_BLOCK;
        uint8_t last[I2Y_ROWS][I2Y_STEP]; /* the rows' partial last step, zero-padded */
        const uint8_t *wr[I2Y_ROWS];
        for (int r = 0; r < R; r++) {
            wr[r] = w + (size_t)r * row_bytes + (size_t)s * I2Y_STEP;
            if (s == full) {
                memset(last[r], 0, I2Y_STEP);
                memcpy(last[r], wr[r], row_bytes - full * I2Y_STEP);
                wr[r] = last[r];
            }
        }
        if (NT == 1) _mm_prefetch((const char *)(wr[0] + I2Y_PREFETCH), _MM_HINT_T0);
        /* the low nibbles (planes 0, 1), then the high ones (planes 2, 3): fewer live registers */
        for (int half = 0; half < 2; half++) {
            __m256i nib[I2Y_ROWS];
            for (int r = 0; r < R; r++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)wr[r]);
                nib[r] = _mm256_and_si256(half ? _mm256_srli_epi16(v, 4) : v, nibble);
            }
            for (int odd = 0; odd < 2; odd++) {
                const int8_t *pi = p + (size_t)(2 * half + odd) * I2Y_STEP;
                __m256i c[I2Y_ROWS];
                for (int r = 0; r < R; r++) c[r] = _mm256_shuffle_epi8(odd ? tab_hi : tab_lo, nib[r]);
                for (int t = 0; t < NT; t++) {
                    const __m256i a = _mm256_load_si256((const __m256i *)(pi + t * tstride));
                    const int slot = NT == 1 ? 2 * half + odd : t;
                    for (int r = 0; r < R; r++)
#ifdef I2Y_DPBUSD
                        acc[r][slot] = I2Y_DPBUSD(acc[r][slot], c[r], a);
#else
                        acc[r][slot] = _mm256_add_epi16(acc[r][slot], _mm256_maddubs_epi16(c[r], a));
#endif
                }
            }
        }
#ifndef I2Y_DPBUSD
        if (s % I2Y_GROUP == I2Y_GROUP - 1 || s + 1 == steps)
            for (int r = 0; r < R; r++)
                for (int t = 0; t < (NT == 1 ? 4 : NT); t++) {
                    acc32[r][t] = _mm256_add_epi32(acc32[r][t], _mm256_madd_epi16(acc[r][t], ones));
                    acc[r][t] = _mm256_setzero_si256();
                }
#endif
    }
#ifndef I2Y_DPBUSD
    for (int r = 0; r < R; r++)
        for (int t = 0; t < I2Y_TOKENS; t++) acc[r][t] = acc32[r][t];
#endif
    for (int r = 0; r < R; r++) {
        if (NT == 1) {
            const __m256i a = _mm256_add_epi32(_mm256_add_epi32(acc[r][0], acc[r][1]), _mm256_add_epi32(acc[r][2], acc[r][3]));
            y[r] = i2y_hsum(a) - sums[0];
            continue;
        }
        for (int t = 0; t < NT; t++) y[t * ldy + r] = i2y_hsum(acc[r][t]) - sums[t];
    }
}

typedef void (*i2y_tile_fn)(const uint8_t *, uint32_t, const int8_t *, size_t, const int32_t *, int32_t *, size_t);

/* Instances with constant row and token counts, so that the accumulators live in registers. */
#define I2Y_INSTANCE(R, NT)                                                                                        \
    I2Y_TARGET static void i2y_tile_##R##x##NT(const uint8_t *w, uint32_t rb, const int8_t *p, size_t ts,          \
                                               const int32_t *s, int32_t *y, size_t ldy) {                        \
        i2y_tile(R, NT, w, rb, p, ts, s, y, ldy);                                                                  \
    }
I2Y_INSTANCE(2, 2)
I2Y_INSTANCE(2, 3)
I2Y_INSTANCE(2, 4)
I2Y_INSTANCE(1, 1)
I2Y_INSTANCE(1, 2)
I2Y_INSTANCE(1, 3)
I2Y_INSTANCE(1, 4)

I2Y_TARGET static void i2y_matmul(int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok,
                                  const uint8_t *w, uint32_t cols, uint32_t r0, uint32_t r1) {
    if (r0 >= r1 || n_tok == 0) return;
    const uint32_t row_bytes = (cols + 3) / 4;
    const size_t tstride = (size_t)(cols + I2Y_BLOCK - 1) / I2Y_BLOCK * I2Y_BLOCK; /* plane bytes per token */
    const uint32_t chunk = n_tok < I2Y_TOKEN_CHUNK ? n_tok : I2Y_TOKEN_CHUNK;
    int8_t *planes = bn_x86_scratch(chunk * tstride + chunk * sizeof(int32_t));
    if (!planes) { /* out of memory: the reference gives the same result */
        bn_kernels_ref.i2_matmul(y, ldy, x, ldx, n_tok, w, cols, r0, r1);
        return;
    }
    int32_t *sums = (int32_t *)(planes + chunk * tstride);
    /* [k] for k tokens; a single token goes row by row (tile1[1]) */
    static const i2y_tile_fn tile2[I2Y_TOKENS + 1] = {NULL, i2y_tile_1x1, i2y_tile_2x2, i2y_tile_2x3, i2y_tile_2x4};
    static const i2y_tile_fn tile1[I2Y_TOKENS + 1] = {NULL, i2y_tile_1x1, i2y_tile_1x2, i2y_tile_1x3, i2y_tile_1x4};

    for (uint32_t t0 = 0; t0 < n_tok; t0 += chunk) {
        const uint32_t nt = n_tok - t0 < chunk ? n_tok - t0 : chunk;
        for (uint32_t t = 0; t < nt; t++) sums[t] = bn_i2_planes_avx2(planes + t * tstride, x + (t0 + t) * ldx, cols, 1);
        for (uint32_t r = r0; r < r1;) {
            const uint32_t R = r1 - r >= I2Y_ROWS && nt > 1 ? I2Y_ROWS : 1;
            for (uint32_t tb = 0; tb < nt; tb += I2Y_TOKENS) {
                const uint32_t k = nt - tb < I2Y_TOKENS ? nt - tb : I2Y_TOKENS;
                if (R == I2Y_ROWS && k == 1) /* a lone last token of a 2-row tile: row by row */
                    for (uint32_t i = 0; i < R; i++)
                        i2y_tile_1x1(w + (size_t)(r + i) * row_bytes, row_bytes, planes + tb * tstride, tstride,
                                     sums + tb, y + (size_t)(t0 + tb) * ldy + r + i, ldy);
                else
                    (R == I2Y_ROWS ? tile2 : tile1)[k](w + (size_t)r * row_bytes, row_bytes, planes + tb * tstride,
                                                       tstride, sums + tb, y + (size_t)(t0 + tb) * ldy + r, ldy);
            }
            r += R;
        }
    }
}

#endif
