/* Weight kernels behind one dispatch table, so that faster variants (TL1/TL2, AVX2...) can sit
 * beside the scalar reference and be compared to it. Each call computes output rows [r0, r1) for all
 * n_tok tokens, so that a thread pool can split the rows. */
#ifndef BN_KERNELS_H
#define BN_KERNELS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "model_file.h"
#include "ops.h"

/* ---- the TL1 / TL2 layouts (docs/format.md) ----
 * Both group the rows into tiles of BN_TL_TILE rows (the last tile padded with zero-weight rows), a
 * tile being a fixed number of bytes that depends on cols only; row r lies in tile r / 32, as
 * lane r % 32 of every 32-byte vector of that tile.
 * TL1: the pairs (w[2p], w[2p+1]) of a row (w[cols] = 0 when cols is odd) as 4-bit indices
 *   3*w0 + w1 + 4 (0..8; 9..15 count as 0). Byte 32*k + i of a tile holds lane i's pairs 2k (low
 *   nibble) and 2k+1 (high nibble), for k < ceil(cols/4) (pairs past the row: any index, ignored).
 * TL2: the triples (w[3t], w[3t+1], w[3t+2]) of the first 3*floor(cols/3) columns as v = 9*w0 + 3*w1
 *   + w2, stored as a 4-bit |v| (0..13; 14, 15 count as 0) and a sign bit (1: v < 0). Tile group g
 *   (g < ceil(floor(cols/3)/2)) is 40 bytes at 40*g: 32 index bytes (byte i: lane i's triple 2g in
 *   the low nibble, 2g+1 in the high), then the u32 sign words of triples 2g and 2g+1 (bit i: lane
 *   i). When cols % 3 != 0, 32 more bytes follow: byte i's low nibble is lane i's TL1 index of the
 *   pair (w[3n], w[3n+1] or 0), n = floor(cols/3). */
#define BN_TL_TILE 32
#define BN_TL2_GROUP_BYTES 40

static inline size_t bn_tl1_tile_bytes(uint32_t cols) { return (size_t)BN_TL_TILE * ((cols + 3) / 4); }
static inline size_t bn_tl2_tile_bytes(uint32_t cols) {
    const uint32_t groups = (cols / 3 + 1) / 2;
    return (size_t)BN_TL2_GROUP_BYTES * groups + (cols % 3 ? BN_TL_TILE : 0);
}
/* ---- the integer output-head layouts: Q8_R, Q6_B, Q4_B (docs/format.md) ----
 * A [rows][cols] matrix is rows f32 row scales scale[r] (4 * rows bytes, at the tensor's aligned
 * start), then the rows back to back, with no padding between them:
 * Q8_R: cols int8 q[r][j]; element (r, j) stands for q[r][j] * scale[r].
 * Q6_B, Q4_B: blocks of BN_QB_BLOCK columns, nb = ceil(cols / 32) per row (the last one padded), in
 *   groups of BN_QB_GROUP blocks (512 columns; the last group of a row may have fewer blocks). A
 *   group of n blocks is n u8 block scales s[b], then 16 * n bytes of low nibbles (byte 16i + k of
 *   them, k < 16: the low 4 bits of the code of column k of the group's block i in the low nibble,
 *   of column 16 + k in the high one), then, Q6_B only, 8 * n bytes of high bits (byte 8i + m: bits
 *   4-5 of the code of column 8j + m of block i at bits 2j, 2j + 1, m < 8, j < 4). A code is q + 32
 *   (Q6_B, q in -32..31) or q + 8 (Q4_B, q in -8..7), so every bit pattern is valid; codes past
 *   cols are ignored. Element (r, j) stands for (float)(q * s[j / 32]) * scale[r].
 * Sizes of every layout: bn_encodings (model_file.h). */
#define BN_QB_BLOCK 32
#define BN_QB_GROUP 16

static inline const float *bn_quant_scales(const void *data) { return (const float *)data; }
static inline const uint8_t *bn_quant_rows(const void *data, uint32_t rows) {
    return (const uint8_t *)data + 4 * (size_t)rows;
}
static inline uint32_t bn_qb_blocks(uint32_t cols) { return (cols + BN_QB_BLOCK - 1) / BN_QB_BLOCK; }
/* Bytes per block: 25 (Q6_B: scale, 16 nibble bytes, 8 high-bit bytes) or 17 (Q4_B). */
static inline uint32_t bn_qb_block_bytes(uint32_t encoding) { return encoding == BN_ENC_Q6B ? 25 : 17; }
static inline size_t bn_qb_row_bytes(uint32_t encoding, uint32_t cols) {
    return (size_t)bn_qb_blocks(cols) * bn_qb_block_bytes(encoding);
}
/* What is added to q to make a code: 32 (Q6_B) or 8 (Q4_B). */
static inline int32_t bn_qb_code_offset(uint32_t encoding) { return encoding == BN_ENC_Q6B ? 32 : 8; }
/* q of column k (< 32) of block b of a Q6_B or Q4_B row of nb blocks. */
static inline int32_t bn_qb_weight(uint32_t encoding, const uint8_t *row, uint32_t nb, uint32_t b, uint32_t k) {
    const uint32_t g = b / BN_QB_GROUP, i = b % BN_QB_GROUP;
    const uint32_t n = nb - BN_QB_GROUP * g < BN_QB_GROUP ? nb - BN_QB_GROUP * g : BN_QB_GROUP; /* blocks of group g */
    const uint8_t *group = row + (size_t)BN_QB_GROUP * bn_qb_block_bytes(encoding) * g;
    const uint8_t nibbles = group[n + 16 * i + k % 16];
    int32_t code = k < 16 ? nibbles & 15 : nibbles >> 4;
    if (encoding == BN_ENC_Q6B) code |= ((group[17 * n + 8 * i + k % 8] >> (2 * (k / 8))) & 3) << 4;
    return code - bn_qb_code_offset(encoding);
}
/* The block scale of block b of a Q6_B or Q4_B row. */
static inline uint32_t bn_qb_block_scale(uint32_t encoding, const uint8_t *row, uint32_t b) {
    return row[(size_t)BN_QB_GROUP * bn_qb_block_bytes(encoding) * (b / BN_QB_GROUP) + b % BN_QB_GROUP];
}

/* A Q8_R matmul (the 8-bit output head): y[t*ldy + r] = ((float)dot / xs[t]) * ws[r] for t < n_tok,
 * r0 <= r < r1, where dot = sum_j x[t*ldx + j] * w[r*cols + j] exactly in int32. x: int8 activations
 * in [-127, 127] (the symmetric quantizer's range; -128 is outside the contract), xs their per-token
 * scales s (x ~ q / s); w: the int8 rows, ws: the row scales. */
typedef void (*bn_q8_matmul_fn)(float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs, uint32_t n_tok,
                                const int8_t *w, const float *ws, uint32_t cols, uint32_t r0, uint32_t r1);

/* A Q6_B or Q4_B matmul (the 6- and 4-bit output heads), the same contract with
 * dot = sum_b s[r][b] * (sum_k x[t*ldx + 32b + k] * q[r][32b + k]) over the row's blocks b and their
 * columns 32b + k < cols, exactly (int64: one block's dot is exact in int32, the row's sum of scaled
 * blocks need not be); w: the rows (layout above), ws: the row scales. */
typedef void (*bn_qb_matmul_fn)(float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs, uint32_t n_tok,
                                const uint8_t *w, const float *ws, uint32_t cols, uint32_t r0, uint32_t r1);

/* A ternary matmul: y[t*ldy + r] = sum_j x[t*ldx + j] * w[r][j] exactly in int32, for t < n_tok,
 * r0 <= r < r1. x: int8 activations [n_tok][cols]; w: the whole matrix in the kernel's encoding. */
typedef void (*bn_ternary_matmul_fn)(int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok,
                                     const uint8_t *w, uint32_t cols, uint32_t r0, uint32_t r1);

typedef struct {
    const char *name;
    /* Ternary matmul: y[t*ldy + r] = sum_j x[t*ldx + j] * w[r][j] exactly in int32, for t < n_tok,
     * r0 <= r < r1. x: int8 activations [n_tok][cols]; w: I2 weights, [rows][ceil(cols/4)] bytes
     * (code 3 counts as 0). */
    bn_ternary_matmul_fn i2_matmul;
    /* The same for TL1 and TL2 weights (layouts above; invalid indices count as 0). */
    bn_ternary_matmul_fn tl1_matmul;
    bn_ternary_matmul_fn tl2_matmul;
    /* Float matmul: y[t*ldy + r] = sum_j x[t*ldx + j] * w[r][j] in float, w a [rows][cols] F32/F16/BF16
     * matrix (the output head), each sum in the order of BN_DENSE_LANES (below). */
    void (*dense_matmul)(float *y, size_t ldy, const float *x, size_t ldx, uint32_t n_tok, const void *w,
                         uint32_t encoding, uint32_t cols, uint32_t r0, uint32_t r1);
    /* The Q8_R output head (above): exact int32 dots, then one divide and one multiply in float. */
    bn_q8_matmul_fn q8_matmul;
    /* The Q6_B and Q4_B output heads (above): exact integer dots, then the same float step. */
    bn_qb_matmul_fn q6_matmul;
    bn_qb_matmul_fn q4_matmul;
    /* The float operators that profiles of prompt processing showed to matter; bit-identical to
     * their references in ops.h (bn_quantize_row_i8, bn_attention_head), whose float order of
     * operations they follow. */
    float (*quantize_row)(int8_t *q, const float *x, uint32_t n);
    void (*attention_head)(float *out, const float *q, const float *k, const float *v, uint64_t stride,
                           uint32_t n_pos, uint32_t D, float scale, float *att);
    /* The same over the f16 KV cache (reference bn_attention_head_f16); every variant sets it (to the
     * reference where it has no faster one). */
    void (*attention_head_f16)(float *out, const float *q, const uint16_t *k, const uint16_t *v, uint64_t stride,
                               uint32_t n_pos, uint32_t D, float scale, float *att);
} bn_kernels;

/* ---- the dense dot product's order ----
 * Every dense_matmul variant sums in this order, so that they agree bit for bit: BN_DENSE_LANES
 * partial sums, lane l taking the products x[j] * w[j] of the columns j = l (mod 16) in increasing j
 * as fused multiply-adds, s[l] = fmaf(x[j], w[j], s[l]) (one rounding per column), then the lanes
 * folded in halves, s[l] += s[l + 8], s[l] += s[l + 4], s[l] += s[l + 2], s[0] + s[1]. The lanes are
 * what two AVX2 (one AVX-512, four NEON) vectors hold when they load 16 consecutive columns, so a
 * SIMD kernel needs no transpose and each row and token is 16 independent chains of one FMA
 * instruction per vector (vfmadd, FMLA): half the float instructions of a multiply then an add,
 * which is what bounds the head when several tokens share each weight vector (batched decoding).
 * The reference's fmaf is correctly rounded on every CPU (libm emulates it where there is no FMA
 * unit). A NaN anywhere in a row or token gives a NaN logit; which NaN (its payload) may differ
 * between variants. */
#define BN_DENSE_LANES 16

/* Element i of a dense F32 / F16 / BF16 array as a float (exact widening). */
static inline float bn_dense_elem(uint32_t encoding, const void *w, size_t i) {
    if (encoding == BN_ENC_F32) return ((const float *)w)[i];
    if (encoding == BN_ENC_F16) return bn_fp16_to_f32(((const uint16_t *)w)[i]);
    return bn_bf16_to_f32(((const uint16_t *)w)[i]);
}

/* The end of one dot product in the order above: adds the products of columns j0 <= j < cols (x the
 * token's activations, w the row) to the lane sums s[BN_DENSE_LANES], then folds the lanes (s is
 * overwritten). The reference starts at j0 = 0 with zero lanes; a SIMD kernel stores its vectors'
 * lanes and passes the first column it did not cover. */
static inline float bn_dense_finish(float s[BN_DENSE_LANES], const float *x, const void *w, uint32_t encoding,
                                    uint32_t j0, uint32_t cols) {
    for (uint32_t j = j0; j < cols; j++) s[j % BN_DENSE_LANES] = fmaf(x[j], bn_dense_elem(encoding, w, j), s[j % BN_DENSE_LANES]);
    for (int h = BN_DENSE_LANES / 2; h > 0; h /= 2)
        for (int l = 0; l < h; l++) s[l] += s[l + h];
    return s[0];
}

/* The ternary kernel of a variant for encoding I2, TL1 or TL2; NULL for any other encoding. */
static inline bn_ternary_matmul_fn bn_kernels_ternary(const bn_kernels *k, uint32_t encoding) {
    switch (encoding) {
    case BN_ENC_I2: return k->i2_matmul;
    case BN_ENC_TL1: return k->tl1_matmul;
    case BN_ENC_TL2: return k->tl2_matmul;
    default: return NULL;
    }
}

/* The integer head kernel of a variant for encoding Q8_R, Q6_B or Q4_B (BN_ENC_IS_QUANT) on `data`,
 * a whole [rows][cols] tensor of that encoding: rows r0 <= r < r1 of y. */
static inline void bn_quant_matmul(const bn_kernels *k, uint32_t encoding, float *y, size_t ldy, const int8_t *x,
                                   size_t ldx, const float *xs, uint32_t n_tok, const void *data, uint32_t rows,
                                   uint32_t cols, uint32_t r0, uint32_t r1) {
    const uint8_t *w = bn_quant_rows(data, rows);
    const float *ws = bn_quant_scales(data);
    if (encoding == BN_ENC_Q8R) k->q8_matmul(y, ldy, x, ldx, xs, n_tok, (const int8_t *)w, ws, cols, r0, r1);
    else (encoding == BN_ENC_Q6B ? k->q6_matmul : k->q4_matmul)(y, ldy, x, ldx, xs, n_tok, w, ws, cols, r0, r1);
}

/* The scalar reference; every other variant must agree with it (bit for bit: the float kernels too,
 * as they sum in the same order, with separate multiplies and adds). */
extern const bn_kernels bn_kernels_ref;

#if defined(__x86_64__)
/* AVX2 (+F16C, FMA) variant, runtime/src/arch/x86/kernels_avx2.c; compiled with target attributes, so the
 * default build stays portable. Call only when bn_cpu_get_features() reports avx2, f16c and fma. */
extern const bn_kernels bn_kernels_avx2;
/* AVX-VNNI variant (its own I2 GEMM with ymm vpdpbusd, the AVX2 kernels otherwise),
 * kernels_avxvnni.c. Call only when bn_cpu_get_features() reports avxvnni and what AVX2 needs. */
extern const bn_kernels bn_kernels_avxvnni;
/* AVX-512 VNNI variant (its own I2 GEMM, the AVX2 kernels otherwise), kernels_avx512vnni.c. Call
 * only when bn_cpu_get_features() reports avx512bw and avx512vnni, and what the AVX2 variant needs. */
extern const bn_kernels bn_kernels_avx512vnni;
#endif

#if defined(__aarch64__)
/* NEON variant, runtime/src/arch/arm/kernels_neon.c: usable on every AArch64 CPU (asimd). */
extern const bn_kernels bn_kernels_neon;
/* The same with SDOT for the int8 dot products (I2 and the integer heads); only when the CPU reports asimddp. */
extern const bn_kernels bn_kernels_neon_dotprod;
#endif

/* The variants usable on this CPU whose tables are complete (every entry set), index 0 the reference,
 * then from slowest to fastest. */
uint32_t bn_kernels_n_available(void);
const bn_kernels *bn_kernels_available(uint32_t i); /* NULL if i is out of range */

/* The kernels the runtime uses on this CPU (the only place where a variant is chosen): the fastest
 * available one, unless the environment variable BITNET_RUN_KERNELS names one (ref, avx2, avxvnni,
 * avx512vnni, neon, neon-dotprod); a name that is unknown or not usable on this CPU gives the reference. */
const bn_kernels *bn_kernels_select(void);

#endif
