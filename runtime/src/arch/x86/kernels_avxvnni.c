/* AVX-VNNI variant (Alder Lake and later client CPUs: vpdpbusd on ymm registers, VEX-encoded, without
 * AVX-512): its own I2 GEMM, and the AVX2 kernels otherwise. Handed out by bn_kernels_select() only
 * when the CPU reports AVX-VNNI (cpuid leaf 7 subleaf 1, eax bit 4) and what the AVX2 variant needs.
 *
 * BN_AVXVNNI_EVEX (a test-only build, tests/test_build_flags.py) compiles the same kernel with the
 * EVEX form of the instruction (AVX-512 VNNI + VL), so that it runs, and is checked, on CPUs that
 * have AVX-512 VNNI but not AVX-VNNI; the registry then asks for those features instead.
 *
 * I2 matmul, a register-tiled GEMM for prompt batches, driven by bn_i2_gemm (kernels_x86.h), as
 * the AVX-512 VNNI one but on 256-bit vectors. One step reads 32 weight bytes (128 elements) of
 * each of R rows; byte k holds elements 4k..4k+3. The activations of each token are deinterleaved
 * (bn_i2_planes_avx2, interleave 1) into blocks of 4 planes of 32 bytes, lane k of plane i =
 * x[128b + 4k + i], so that plane i of the weights, ((byte >> 2i) & 3) mapped {0,1,2,3} ->
 * {0,1,2,1} (code 3 counts as 0), lines up with plane i of x. The codes c = w + 1 are non-negative,
 * so dot(x, w) = sum(c * x) - sum(x), and vpdpbusd (u8 x s8, four products per int32 lane) sums
 * c * x exactly. A pshufb of the low (high) nibble of each byte gives the codes of planes 0 and 1
 * (2 and 3). A tile is R = 2 rows x NT <= 4 tokens: 8 accumulators, 2 code and 1 activation
 * register, 3 constants, within the 16 ymm registers; each code plane serves 4 tokens, each
 * activation plane 2 rows. A single token (decoding, memory-bound) takes rows one at a time as one
 * sequential, prefetched stream, with an accumulator per plane (four independent chains). Zero
 * padding of the activations makes whatever codes sit past `cols` harmless; a row's last partial
 * 32 bytes are copied into a zeroed block, so nothing is read past the matrix. */
#if defined(__x86_64__)

#include <immintrin.h>
#include <string.h>

#include "arch/x86/kernels_x86.h"
#include "kernels.h"

#ifdef BN_AVXVNNI_EVEX
#define I2Y_TARGET __attribute__((target("avx512f,avx512vl,avx512vnni,avx2,f16c")))
#define I2Y_DPBUSD(a, c, x) _mm256_dpbusd_epi32(a, c, x)
#else
#define I2Y_TARGET __attribute__((target("avxvnni,avx2,f16c")))
#define I2Y_DPBUSD(a, c, x) _mm256_dpbusd_avx_epi32(a, c, x)
#endif

enum {
    I2Y_STEP = 32,        /* weight bytes per row and step */
    I2Y_BLOCK = 128,      /* elements per step (4 planes of 32 activation bytes) */
    I2Y_ROWS = 2,         /* rows sharing each activation plane */
    I2Y_TOKENS = 4,       /* tokens sharing each code plane */
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
    const __m256i tab_lo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)bn_i2_nibble_codes[0]));
    const __m256i tab_hi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)bn_i2_nibble_codes[1]));
    __m256i acc[I2Y_ROWS][I2Y_TOKENS]; /* int32 sums; all start at 0 */
    for (int r = 0; r < I2Y_ROWS; r++)
        for (int t = 0; t < I2Y_TOKENS; t++) acc[r][t] = _mm256_setzero_si256();
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
                        acc[r][slot] = I2Y_DPBUSD(acc[r][slot], c[r], a);
                }
            }
        }
    }
    for (int r = 0; r < R; r++) {
        if (NT == 1) {
            const __m256i a = _mm256_add_epi32(_mm256_add_epi32(acc[r][0], acc[r][1]), _mm256_add_epi32(acc[r][2], acc[r][3]));
            y[r] = i2y_hsum(a) - sums[0];
            continue;
        }
        for (int t = 0; t < NT; t++) y[t * ldy + r] = i2y_hsum(acc[r][t]) - sums[t];
    }
}

/* Instances with constant row and token counts, so that the accumulators live in registers. */
#define I2Y_INSTANCE(R, NT)                                                                                        \
    I2Y_TARGET static void i2y_tile_##R##x##NT(const uint8_t *w, uint32_t rb, const int8_t *p, size_t ts,          \
                                               const int32_t *s, int32_t *y, size_t ldy) {                        \
        i2y_tile(R, NT, w, rb, p, ts, s, y, ldy);                                                                  \
    }
I2Y_INSTANCE(2, 1)
I2Y_INSTANCE(2, 2)
I2Y_INSTANCE(2, 3)
I2Y_INSTANCE(2, 4)
I2Y_INSTANCE(1, 1)
I2Y_INSTANCE(1, 2)
I2Y_INSTANCE(1, 3)
I2Y_INSTANCE(1, 4)

static const bn_i2_tiling i2y_tiling = {
    .interleave = 1,
    .rows = I2Y_ROWS,
    .multi = {NULL, i2y_tile_2x1, i2y_tile_2x2, i2y_tile_2x3, i2y_tile_2x4},
    .single = {NULL, i2y_tile_1x1, i2y_tile_1x2, i2y_tile_1x3, i2y_tile_1x4},
};

I2Y_TARGET static void i2_matmul_avxvnni(int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok,
                                         const uint8_t *w, uint32_t cols, uint32_t r0, uint32_t r1) {
    bn_i2_gemm(&i2y_tiling, y, ldy, x, ldx, n_tok, w, cols, r0, r1);
}

const bn_kernels bn_kernels_avxvnni = BN_X86_KERNELS("avxvnni", i2_matmul_avxvnni, bn_dense_matmul_avx2, bn_q8_matmul_avx2);

#else
typedef int bn_kernels_avxvnni_unused; /* not x86-64: nothing to compile (ISO C forbids an empty file) */
#endif
