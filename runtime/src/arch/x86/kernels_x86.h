/* What the x86 kernel variants share: the per-thread scratch buffer, the I2 activation planes, and
 * the AVX2 kernels that wider variants reuse where they have no better one of their own. */
#ifndef BN_KERNELS_X86_H
#define BN_KERNELS_X86_H

#include <stddef.h>
#include <stdint.h>

/* A 64-byte aligned buffer of at least n bytes for the calling thread (kept, and grown, across
 * calls; freed when the thread exits), or NULL when out of memory. */
void *bn_x86_scratch(size_t n);

/* The I2 codes of a weight byte's nibble, as two 16-entry pshufb tables: [0][n] is the code of the
 * low 2 bits of n, [1][n] that of its high 2 bits, code 3 counted as 0 (codes are w + 1: 3 -> 1). A
 * pshufb of a byte's low (high) nibble gives the codes of its elements 0 and 1 (2 and 3). */
static const uint8_t bn_i2_nibble_codes[2][16] = {
    {0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1},
    {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1, 1},
};

/* Deinterleaves one token row x[cols] for the I2 kernels, which read 32 * `interleave` weight
 * bytes (128 * interleave elements) per step: block b (b < ceil(cols / (128 * interleave))) is
 * 4 planes of 32 * interleave bytes at dst + 128 * interleave * b, lane k of plane i holding
 * element 128 * interleave * b + 4k + i; past cols, zeros. Returns sum(x). Requires AVX2. */
int32_t bn_i2_planes_avx2(int8_t *dst, const int8_t *x, uint32_t cols, uint32_t interleave);

/* One register tile of an I2 GEMM: y[t*ldy + r] = dot(row r, token t) for the tile's rows (from w,
 * row_bytes apart) and tokens (planes tstride bytes apart, bn_i2_planes_avx2), sums[t] = sum(x_t). */
typedef void (*bn_i2_tile_fn)(const uint8_t *w, uint32_t row_bytes, const int8_t *planes, size_t tstride,
                              const int32_t *sums, int32_t *y, size_t ldy);

/* The tiles of one I2 GEMM (kernels_avxvnni.c, kernels_avx512vnni.c): [k] takes k (1..4) tokens. */
typedef struct {
    uint32_t interleave;      /* bn_i2_planes_avx2's interleave (128 * interleave elements per step) */
    uint32_t rows;            /* rows of a `multi` tile */
    bn_i2_tile_fn multi[5];   /* `rows` rows */
    bn_i2_tile_fn single[5];  /* 1 row: the last rows, and single tokens (decoding: one row stream) */
} bn_i2_tiling;

/* The I2 matmul (kernels.h) with those tiles: the activations deinterleaved in chunks of up to 64
 * tokens, then rows outer, tokens inner, so that a tile's rows are read from memory once and stay
 * in L1 while all tokens pass. Requires AVX2 and what the tiles need. */
void bn_i2_gemm(const bn_i2_tiling *tiling, int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok,
                const uint8_t *w, uint32_t cols, uint32_t r0, uint32_t r1);

/* The AVX2 variant's kernels (kernels.h for their contracts). */
void bn_tl1_matmul_avx2(int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok, const uint8_t *w,
                        uint32_t cols, uint32_t r0, uint32_t r1);
void bn_tl2_matmul_avx2(int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok, const uint8_t *w,
                        uint32_t cols, uint32_t r0, uint32_t r1);
void bn_dense_matmul_avx2(float *y, size_t ldy, const float *x, size_t ldx, uint32_t n_tok, const void *w,
                          uint32_t encoding, uint32_t cols, uint32_t r0, uint32_t r1);
void bn_q8_matmul_avx2(float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs, uint32_t n_tok,
                       const int8_t *w, const float *ws, uint32_t cols, uint32_t r0, uint32_t r1);
void bn_q6_matmul_avx2(float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs, uint32_t n_tok,
                       const uint8_t *w, const float *ws, uint32_t cols, uint32_t r0, uint32_t r1);
void bn_q4_matmul_avx2(float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs, uint32_t n_tok,
                       const uint8_t *w, const float *ws, uint32_t cols, uint32_t r0, uint32_t r1);
float bn_quantize_row_avx2(int8_t *q, const float *x, uint32_t n);
void bn_attention_head_avx2(float *out, const float *q, const float *k, const float *v, uint64_t stride,
                            uint32_t n_pos, uint32_t D, float scale, float *att);
void bn_attention_head_f16_avx2(float *out, const float *q, const uint16_t *k, const uint16_t *v, uint64_t stride,
                                uint32_t n_pos, uint32_t D, float scale, float *att);

/* The table of an x86 variant: its own I2, dense and Q8_R kernels, the AVX2 kernels for every other
 * entry (the VNNI variants speed up the I2 GEMM, AVX-512 also the dense and Q8_R heads). One list, so
 * an entry added to bn_kernels is set in every x86 table at once. */
#define BN_X86_KERNELS(NAME, I2_MATMUL, DENSE_MATMUL, Q8_MATMUL)                                                 \
    {                                                                                                            \
        .name = NAME, .i2_matmul = I2_MATMUL, .tl1_matmul = bn_tl1_matmul_avx2, .tl2_matmul = bn_tl2_matmul_avx2, \
        .dense_matmul = DENSE_MATMUL, .q8_matmul = Q8_MATMUL, .q6_matmul = bn_q6_matmul_avx2,                   \
        .q4_matmul = bn_q4_matmul_avx2, .quantize_row = bn_quantize_row_avx2,                                    \
        .attention_head = bn_attention_head_avx2, .attention_head_f16 = bn_attention_head_f16_avx2,              \
    }

#endif
