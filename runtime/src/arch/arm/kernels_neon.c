/* AArch64 NEON kernels, bit-exact with the scalar reference in runtime/src/kernels.c. Two variants:
 * "neon" (Advanced SIMD, which every AArch64 CPU has) and "neon-dotprod", the same kernels with the
 * int8 dot products of I2 and the integer heads done by SDOT (the ARMv8.2 dot-product extension, Linux
 * HWCAP_ASIMDDP). The SDOT functions carry a target attribute instead of the file being compiled
 * with +dotprod, so the default build runs on every AArch64 CPU; bn_kernels_select() hands them out
 * only when the CPU reports the extension.
 *
 * I2 matmul. A row's byte k holds elements 4k..4k+3 (bits 2i..2i+1: element 4k+i). vld4q_s8
 * deinterleaves 64 activations into 4 planes (plane i, lane k = x[4k + i]) as it loads them, so
 * lane k of the codes ((16 weight bytes >> 2i) & 3), mapped to {-1, 0, 1, 0} by one table lookup
 * (code 3 counts as 0), multiplies lane k of plane i. The last partial block is copied into
 * zero-padded buffers: codes past `cols` meet zero activations. Up to 4 tokens share each decoded
 * block; one int32 accumulator per token and plane keeps the dependency chains short.
 *
 * Integer dot products (I2, Q8_R, Q6_B, Q4_B): dot16 adds the 16 products of two byte vectors into
 * 4 int32 lanes, SDOT in one instruction, plain NEON as a widening multiply (pairs of products in
 * int16) and a pairwise widening add. Which lane gets which product differs, but only the exact sum
 * of the lanes is used, so both give the reference's integers. A pair of products fits in int16
 * because one factor is ternary (I2: |pair| <= 256), in [-127, 127] (Q8_R activations, the kernel
 * contract: |pair| <= 2 * 127 * 128) or a 6-/4-bit value (|q| <= 32).
 *
 * Q6_B / Q4_B matmul (layout in kernels.h): per block, the 16 nibble bytes give columns 0-15 (low
 * nibbles) and 16-31 (high nibbles); Q6_B's 8 high-bit bytes, duplicated into 16 lanes, are shifted
 * per lane (vshlq_u8: left 4 / 2 for columns 0-7 / 8-15, 0 / right 2 for 16-23 / 24-31) so that
 * bits 4-5 land in place; minus the code offset that is q as int8. Two dot16 give the block's sum in
 * 4 lanes, multiplied by its block scale into a group's int32 accumulator (16 blocks: <= 16 * 8 *
 * 32 * 128 * 255 per lane), widened to int64 after each group. The last, partial block meets a
 * zero-padded copy of its activations. Tokens share nothing (a row is re-read from L1 per token).
 *
 * TL1 / TL2 matmul (layouts in kernels.h). As in the AVX2 kernels, lanes are rows: 16 index
 * nibbles of a weight vector select, by one vqtbl1q_u8 each, 16 rows' entries of a pair's (triple's)
 * 16-entry table of exact int16 dot products (|T| <= 256, resp. 384; invalid indices 0), stored as
 * 16 low bytes then 16 high bytes; zipping the two lookups gives the rows' int16 entries. A TL2
 * triple's sign m (0 or -1 per row) negates as (T ^ m) - m: the xor per token, the count of -m
 * once per tile. Tables are built per block of TL_BLOCK weight vectors (on the stack), and a block's
 * int16 sums (at most 64 * 384 + 256) are widened into the int32 outputs after each tile, so
 * nothing overflows and no scratch memory is needed; the price is that a prompt batch reads the
 * weights once per 4 tokens (unlike the AVX2 kernels' token chunks, which need a table buffer per
 * thread; with no ARM machine to measure on, the simpler layout stays).
 *
 * Dense matmul (output head). The reference's order (kernels.h) puts column j in lane j % 16, so
 * four vectors loaded from 16 consecutive columns are the 16 lane sums of one row and token: acc =
 * fma(x, w, acc) (FMLA, the reference's fmaf), folded as the reference does at the end.
 * Each widened weight vector serves up to 4 tokens; a single token takes 2 rows at once (8 chains).
 *
 * Activation quantization and attention follow ops.h's references: max|x| is exact in any order
 * (FMAXNM ignores a quiet NaN like fmaxf), then x * s, round half to even (FRINTN, like rintf in the
 * default rounding mode) and the clamps (FMAXNM / FMINNM send a NaN to -128 like fminf(fmaxf(.)))
 * per element; the q.k dot products in two 4-lane halves of bn_dot8_f32's 8 partial sums, reduced
 * in its order, and the weighted sum of the values vectorized over elements, each summed over
 * positions in order; over the f16 KV cache the same, every key and value widened exactly first. */
#if defined(__aarch64__)

#include <arm_neon.h>
#include <math.h>
#include <string.h>

#include "kernels.h"
#include "model_file.h"
#include "ops.h"

#define BN_INLINE static inline __attribute__((always_inline))
#if defined(__ARM_FEATURE_DOTPROD) || defined(__clang__)
#define BN_DOTPROD /* the whole build targets SDOT, or clang, which gets it below without the attribute */
#else
#define BN_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod"))) /* GCC: for vdotq_s32 */
#endif

/* ---- int8 dot products: the one place where the two variants differ ---- */

typedef int32x4_t (*dot16_fn)(int32x4_t acc, int8x16_t a, int8x16_t b);

BN_INLINE int32x4_t dot16_neon(int32x4_t acc, int8x16_t a, int8x16_t b) {
    return vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(a), vget_low_s8(b)), a, b));
}

#if defined(__ARM_FEATURE_DOTPROD) || !defined(__clang__)
BN_DOTPROD BN_INLINE int32x4_t dot16_sdot(int32x4_t acc, int8x16_t a, int8x16_t b) { return vdotq_s32(acc, a, b); }
#else
/* clang (before 16) declares vdotq_s32 only when the whole build targets the extension: the
 * instruction's encoding on fixed registers, sdot v0.4s, v1.16b, v2.16b. */
BN_INLINE int32x4_t dot16_sdot(int32x4_t acc, int8x16_t a, int8x16_t b) {
    register int32x4_t r0 __asm__("v0") = acc;
    register int8x16_t r1 __asm__("v1") = a, r2 __asm__("v2") = b;
    __asm__(".inst 0x4e829420" : "+w"(r0) : "w"(r1), "w"(r2));
    return r0;
}
#endif

/* ---- I2 ---- */

enum {
    I2_BLOCK = 64, /* weights per 16-byte vector of codes */
    I2_TOKENS = 4, /* tokens sharing one decoded block */
};

/* The 64 weights of 16 I2 bytes as 4 planes of -1 / 0 / 1 (plane i, lane k: element 4k + i). */
BN_INLINE void i2_decode(uint8x16_t wv, int8x16_t c[4]) {
    static const int8_t value[16] = {-1, 0, 1, 0}; /* code -> weight; code 3 counts as 0 */
    const int8x16_t lut = vld1q_s8(value);
    const uint8x16_t m3 = vdupq_n_u8(3);
    c[0] = vqtbl1q_s8(lut, vandq_u8(wv, m3));
    c[1] = vqtbl1q_s8(lut, vandq_u8(vshrq_n_u8(wv, 2), m3));
    c[2] = vqtbl1q_s8(lut, vandq_u8(vshrq_n_u8(wv, 4), m3));
    c[3] = vqtbl1q_s8(lut, vshrq_n_u8(wv, 6));
}

BN_INLINE void i2_block(dot16_fn dot, int NT, uint8x16_t wv, const int8_t *x, size_t ldx,
                        int32x4_t acc[I2_TOKENS][4]) {
    int8x16_t c[4];
    i2_decode(wv, c);
    for (int t = 0; t < NT; t++) {
        const int8x16x4_t p = vld4q_s8(x + t * ldx);
        for (int i = 0; i < 4; i++) acc[t][i] = dot(acc[t][i], c[i], p.val[i]);
    }
}

/* out[t] = dot(row wr, token t) for the NT tokens x, x + ldx, ... */
BN_INLINE void i2_row(dot16_fn dot, int NT, const uint8_t *wr, uint32_t cols, const int8_t *x, size_t ldx,
                      int32_t *out) {
    int32x4_t acc[I2_TOKENS][4];
    for (int t = 0; t < NT; t++)
        for (int i = 0; i < 4; i++) acc[t][i] = vdupq_n_s32(0);
    const uint32_t nfull = cols / I2_BLOCK, rest = cols % I2_BLOCK;
    for (uint32_t b = 0; b < nfull; b++)
        i2_block(dot, NT, vld1q_u8(wr + 16 * (size_t)b), x + (size_t)I2_BLOCK * b, ldx, acc);
    if (rest) { /* copies, so as not to read past the row or the matrix */
        uint8_t wtail[16] = {0};
        int8_t xtail[I2_TOKENS][I2_BLOCK] = {{0}};
        memcpy(wtail, wr + 16 * (size_t)nfull, (rest + 3) / 4);
        for (int t = 0; t < NT; t++) memcpy(xtail[t], x + t * ldx + (size_t)I2_BLOCK * nfull, rest);
        i2_block(dot, NT, vld1q_u8(wtail), xtail[0], I2_BLOCK, acc);
    }
    for (int t = 0; t < NT; t++)
        out[t] = vaddvq_s32(vaddq_s32(vaddq_s32(acc[t][0], acc[t][1]), vaddq_s32(acc[t][2], acc[t][3])));
}

BN_INLINE void i2_matmul(dot16_fn dot, int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok,
                         const uint8_t *w, uint32_t cols, uint32_t r0, uint32_t r1) {
    const size_t row_bytes = (cols + 3) / 4;
    for (uint32_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + r * row_bytes;
        for (uint32_t t0 = 0; t0 < n_tok; t0 += I2_TOKENS) {
            const int8_t *xt = x + t0 * ldx;
            int32_t out[I2_TOKENS];
            const uint32_t k = n_tok - t0 < I2_TOKENS ? n_tok - t0 : I2_TOKENS;
            switch (k) { /* constant token counts, so that the accumulators live in registers */
            case 1: i2_row(dot, 1, wr, cols, xt, ldx, out); break;
            case 2: i2_row(dot, 2, wr, cols, xt, ldx, out); break;
            case 3: i2_row(dot, 3, wr, cols, xt, ldx, out); break;
            default: i2_row(dot, 4, wr, cols, xt, ldx, out); break;
            }
            for (uint32_t i = 0; i < k; i++) y[(t0 + i) * ldy + r] = out[i];
        }
    }
}

static void i2_matmul_neon(int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok, const uint8_t *w,
                           uint32_t cols, uint32_t r0, uint32_t r1) {
    i2_matmul(dot16_neon, y, ldy, x, ldx, n_tok, w, cols, r0, r1);
}

BN_DOTPROD static void i2_matmul_dotprod(int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok,
                                         const uint8_t *w, uint32_t cols, uint32_t r0, uint32_t r1) {
    i2_matmul(dot16_sdot, y, ldy, x, ldx, n_tok, w, cols, r0, r1);
}

/* ---- TL1 / TL2 ---- */

enum {
    TL_TOKENS = 4,  /* tokens sharing one weight vector */
    TL_BLOCK = 32,  /* weight vectors (64 pairs or triples) per block of tables */
    TL_TABLE = 32,  /* bytes of one table: 16 low bytes, then 16 high bytes */
    TL_BLOCK_TABLES = 2 * TL_BLOCK + 1, /* a block's tables per token, with room for TL2's tail pair */
};

/* Table entries 0..7 (lo) and 8..15 (hi) of x0 * w0[k] + x1 * w1[k] + x2 * w2[k]. */
typedef struct {
    int16x8_t lo, hi;
} tl_entries;

static const int16_t tl1_w0[16] = {-1, -1, -1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0};
static const int16_t tl1_w1[16] = {-1, 0, 1, -1, 0, 1, -1, 0, 1, 0, 0, 0, 0, 0, 0, 0};
static const int16_t tl2_w0[16] = {0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0};
static const int16_t tl2_w1[16] = {0, 0, 1, 1, 1, -1, -1, -1, 0, 0, 0, 1, 1, 1, 0, 0};
static const int16_t tl2_w2[16] = {0, 1, -1, 0, 1, -1, 0, 1, -1, 0, 1, -1, 0, 1, 0, 0};

BN_INLINE void tl_store_table(int8_t *dst, const int16_t *w0, const int16_t *w1, const int16_t *w2, int16_t x0,
                              int16_t x1, int16_t x2) {
    tl_entries e;
    e.lo = vmlaq_n_s16(vmlaq_n_s16(vmulq_n_s16(vld1q_s16(w0), x0), vld1q_s16(w1), x1), vld1q_s16(w2), x2);
    e.hi = vmlaq_n_s16(vmlaq_n_s16(vmulq_n_s16(vld1q_s16(w0 + 8), x0), vld1q_s16(w1 + 8), x1), vld1q_s16(w2 + 8), x2);
    vst1q_s8(dst, vcombine_s8(vmovn_s16(e.lo), vmovn_s16(e.hi)));
    vst1q_s8(dst + 16, vcombine_s8(vshrn_n_s16(e.lo, 8), vshrn_n_s16(e.hi, 8)));
}

BN_INLINE int16_t tl_x(const int8_t *x, uint32_t cols, uint32_t j) { return j < cols ? x[j] : 0; }

/* The tables of one token for the weight vectors [v0, v1) of a tile: entry e (2 per vector) at
 * dst + TL_TABLE * (e - 2 * v0), then, for TL2 when `tail`, the tail pair's TL1 table. */
static void tl_prep_block(int tl2, int8_t *dst, const int8_t *x, uint32_t cols, uint32_t v0, uint32_t v1, int tail) {
    static const int16_t zero[16] = {0};
    const uint32_t n_triples = cols / 3;
    for (uint32_t e = 2 * v0; e < 2 * v1; e++, dst += TL_TABLE) {
        if (!tl2) tl_store_table(dst, tl1_w0, tl1_w1, zero, tl_x(x, cols, 2 * e), tl_x(x, cols, 2 * e + 1), 0);
        else if (e < n_triples) tl_store_table(dst, tl2_w0, tl2_w1, tl2_w2, x[3 * e], x[3 * e + 1], x[3 * e + 2]);
        else tl_store_table(dst, zero, zero, zero, 0, 0, 0); /* the padding triple of the last group */
    }
    if (tail) tl_store_table(dst, tl1_w0, tl1_w1, zero, x[3 * n_triples], tl_x(x, cols, 3 * n_triples + 1), 0);
}

/* The int16 entries of 32 rows (indices in the low nibbles of ia, ib: rows 0-15, 16-31) from the
 * table at tab: out[q] holds rows 8q .. 8q+7. */
BN_INLINE void tl_lookup(const int8_t *tab, uint8x16_t ia, uint8x16_t ib, int16x8_t out[4]) {
    const uint8x16_t lo_t = vld1q_u8((const uint8_t *)tab), hi_t = vld1q_u8((const uint8_t *)tab + 16);
    const uint8x16_t la = vqtbl1q_u8(lo_t, ia), ha = vqtbl1q_u8(hi_t, ia);
    const uint8x16_t lb = vqtbl1q_u8(lo_t, ib), hb = vqtbl1q_u8(hi_t, ib);
    out[0] = vreinterpretq_s16_u8(vzip1q_u8(la, ha));
    out[1] = vreinterpretq_s16_u8(vzip2q_u8(la, ha));
    out[2] = vreinterpretq_s16_u8(vzip1q_u8(lb, hb));
    out[3] = vreinterpretq_s16_u8(vzip2q_u8(lb, hb));
}

/* A TL2 sign word (bit i: row i) as int16 masks, 0 or -1: m[q] for rows 8q .. 8q+7. */
BN_INLINE void tl2_signs(const uint8_t *word, int16x8_t m[4]) {
    static const uint16_t bit[8] = {1, 2, 4, 8, 16, 32, 64, 128};
    const uint16x8_t bits = vld1q_u16(bit);
    for (int q = 0; q < 4; q++) m[q] = vreinterpretq_s16_u16(vtstq_u16(vdupq_n_u16(word[q]), bits));
}

/* Adds one entry's lookups of NT tokens into acc (xor-ed with the signs m when tl2). */
BN_INLINE void tl_entry(int tl2, int NT, const int8_t *tab, size_t tstride, uint8x16_t ia, uint8x16_t ib,
                        const int16x8_t m[4], int16x8_t acc[TL_TOKENS][4]) {
    for (int t = 0; t < NT; t++) {
        int16x8_t e[4];
        tl_lookup(tab + t * tstride, ia, ib, e);
        for (int q = 0; q < 4; q++) acc[t][q] = vaddq_s16(acc[t][q], tl2 ? veorq_s16(e[q], m[q]) : e[q]);
    }
}

/* out[t][i] = row i of a tile for token t over its weight vectors [v0, v1) (and the tail vector if
 * `tail`). tabs: the block's tables, tstride bytes per token. */
BN_INLINE void tl_tile_block(int tl2, int NT, const uint8_t *wt, uint32_t v0, uint32_t v1, int tail,
                             const int8_t *tabs, size_t tstride, int32_t out[TL_TOKENS][BN_TL_TILE]) {
    const uint8x16_t m0f = vdupq_n_u8(15);
    const size_t vbytes = tl2 ? BN_TL2_GROUP_BYTES : BN_TL_TILE;
    int16x8_t acc[TL_TOKENS][4], cnt[4], m0[4], m1[4];
    for (int q = 0; q < 4; q++) {
        cnt[q] = m0[q] = m1[q] = vdupq_n_s16(0);
        for (int t = 0; t < NT; t++) acc[t][q] = vdupq_n_s16(0);
    }
    for (uint32_t v = v0; v < v1; v++) {
        const uint8_t *p = wt + vbytes * v;
        const uint8x16_t wa = vld1q_u8(p), wb = vld1q_u8(p + 16);
        const int8_t *tab = tabs + (size_t)2 * TL_TABLE * (v - v0);
        if (tl2) {
            tl2_signs(p + BN_TL_TILE, m0);
            tl2_signs(p + BN_TL_TILE + 4, m1);
            for (int q = 0; q < 4; q++) cnt[q] = vsubq_s16(vsubq_s16(cnt[q], m0[q]), m1[q]);
        }
        tl_entry(tl2, NT, tab, tstride, vandq_u8(wa, m0f), vandq_u8(wb, m0f), m0, acc);
        tl_entry(tl2, NT, tab + TL_TABLE, tstride, vshrq_n_u8(wa, 4), vshrq_n_u8(wb, 4), m1, acc);
    }
    if (tail) {
        const uint8_t *p = wt + vbytes * v1;
        tl_entry(0, NT, tabs + (size_t)2 * TL_TABLE * (v1 - v0), tstride, vandq_u8(vld1q_u8(p), m0f),
                 vandq_u8(vld1q_u8(p + 16), m0f), m0, acc);
    }
    for (int t = 0; t < NT; t++)
        for (int q = 0; q < 4; q++) {
            const int16x8_t s = tl2 ? vaddq_s16(acc[t][q], cnt[q]) : acc[t][q];
            vst1q_s32(out[t] + 8 * q, vmovl_s16(vget_low_s16(s)));
            vst1q_s32(out[t] + 8 * q + 4, vmovl_high_s16(s));
        }
}

BN_INLINE void tl_tokens(int tl2, int NT, int32_t *y, size_t ldy, const int8_t *x, size_t ldx, const uint8_t *w,
                         uint32_t cols, uint32_t r0, uint32_t r1) {
    const size_t tile_bytes = tl2 ? bn_tl2_tile_bytes(cols) : bn_tl1_tile_bytes(cols);
    const uint32_t n = tl2 ? (cols / 3 + 1) / 2 : (cols + 3) / 4; /* weight vectors per tile */
    const int has_tail = tl2 && cols % 3;
    const size_t tstride = (size_t)TL_TABLE * TL_BLOCK_TABLES;
    int8_t tabs[TL_TOKENS * TL_TABLE * TL_BLOCK_TABLES] __attribute__((aligned(16)));
    int32_t out[TL_TOKENS][BN_TL_TILE];
    uint32_t v0 = 0;
    do { /* at least once: a TL2 tile of 1 or 2 columns is only the tail */
        const uint32_t v1 = n - v0 < TL_BLOCK ? n : v0 + TL_BLOCK;
        const int tail = has_tail && v1 == n, first = v0 == 0;
        for (int t = 0; t < NT; t++) tl_prep_block(tl2, tabs + t * tstride, x + t * ldx, cols, v0, v1, tail);
        for (uint32_t tile = r0 / BN_TL_TILE; tile <= (r1 - 1) / BN_TL_TILE; tile++) {
            const uint32_t base = tile * BN_TL_TILE;
            const uint32_t lo = r0 > base ? r0 - base : 0, hi = r1 - base < BN_TL_TILE ? r1 - base : BN_TL_TILE;
            tl_tile_block(tl2, NT, w + tile * tile_bytes, v0, v1, tail, tabs, tstride, out);
            for (int t = 0; t < NT; t++) {
                int32_t *yt = y + t * ldy + base;
                for (uint32_t l = lo; l < hi; l++) yt[l] = first ? out[t][l] : yt[l] + out[t][l];
            }
        }
        v0 = v1;
    } while (v0 < n);
}

BN_INLINE void tl_matmul(int tl2, int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok,
                         const uint8_t *w, uint32_t cols, uint32_t r0, uint32_t r1) {
    if (r0 >= r1) return;
    for (uint32_t t0 = 0; t0 < n_tok; t0 += TL_TOKENS) {
        int32_t *yt = y + t0 * ldy;
        const int8_t *xt = x + t0 * ldx;
        switch (n_tok - t0 < TL_TOKENS ? n_tok - t0 : TL_TOKENS) {
        case 1: tl_tokens(tl2, 1, yt, ldy, xt, ldx, w, cols, r0, r1); break;
        case 2: tl_tokens(tl2, 2, yt, ldy, xt, ldx, w, cols, r0, r1); break;
        case 3: tl_tokens(tl2, 3, yt, ldy, xt, ldx, w, cols, r0, r1); break;
        default: tl_tokens(tl2, 4, yt, ldy, xt, ldx, w, cols, r0, r1); break;
        }
    }
}

static void tl1_matmul_neon(int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok, const uint8_t *w,
                            uint32_t cols, uint32_t r0, uint32_t r1) {
    tl_matmul(0, y, ldy, x, ldx, n_tok, w, cols, r0, r1);
}

static void tl2_matmul_neon(int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok, const uint8_t *w,
                            uint32_t cols, uint32_t r0, uint32_t r1) {
    tl_matmul(1, y, ldy, x, ldx, n_tok, w, cols, r0, r1);
}

/* ---- dense (output head) ---- */

enum {
    DENSE_TOKENS = 4, /* tokens sharing one widened weight vector, at most */
    DENSE_ROWS = 2,   /* rows at once for a single token */
};

/* w[i .. i+3] of an F32 / F16 / BF16 array as floats (exact widening): the output head's weights,
 * and the keys and values of attention over either KV cache type. */
BN_INLINE float32x4_t dense_load4(int enc, const void *w, size_t i) {
    if (enc == BN_ENC_F32) return vld1q_f32((const float *)w + i);
    const uint16x4_t h = vld1_u16((const uint16_t *)w + i);
    if (enc == BN_ENC_F16) return vcvt_f32_f16(vreinterpret_f16_u16(h));
    return vreinterpretq_f32_u32(vshll_n_u16(h, 16)); /* BF16 */
}

BN_INLINE float dense_at(int enc, const void *w, size_t i) {
    if (enc == BN_ENC_F32) return ((const float *)w)[i];
    if (enc == BN_ENC_F16) return bn_fp16_to_f32(((const uint16_t *)w)[i]);
    return bn_bf16_to_f32(((const uint16_t *)w)[i]);
}

/* Rows r .. r+R-1 for tokens 0 .. NT-1 of x (rows ldx apart) into y (rows ldy apart). */
BN_INLINE void dense_rows(int enc, int R, int NT, float *y, size_t ldy, const float *x, size_t ldx, const void *w,
                          uint32_t cols, uint32_t r) {
    float32x4_t acc[DENSE_ROWS][DENSE_TOKENS][4];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < NT; t++)
            for (int q = 0; q < 4; q++) acc[i][t][q] = vdupq_n_f32(0.0f);
    const uint32_t cols16 = cols / BN_DENSE_LANES * BN_DENSE_LANES;
    for (uint32_t j = 0; j < cols16; j += BN_DENSE_LANES)
        for (int i = 0; i < R; i++) {
            float32x4_t wv[4];
            for (int q = 0; q < 4; q++) wv[q] = dense_load4(enc, w, (size_t)(r + i) * cols + j + 4 * q);
            for (int t = 0; t < NT; t++)
                for (int q = 0; q < 4; q++)
                    acc[i][t][q] = vfmaq_f32(acc[i][t][q], vld1q_f32(x + t * ldx + j + 4 * q), wv[q]);
        }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < NT; t++) {
            float s[BN_DENSE_LANES];
            for (int q = 0; q < 4; q++) vst1q_f32(s + 4 * q, acc[i][t][q]);
            const size_t esize = enc == BN_ENC_F32 ? 4 : 2;
            y[t * ldy + r + i] = bn_dense_finish(s, x + t * ldx, (const char *)w + (size_t)(r + i) * cols * esize, enc, cols16, cols);
        }
}

/* Rows [r0, r1): a single token two rows at a time; otherwise each row once for each group of up to
 * DENSE_TOKENS tokens (constant counts, so that the accumulators live in registers). */
BN_INLINE void dense_enc(int enc, float *y, size_t ldy, const float *x, size_t ldx, uint32_t n_tok, const void *w,
                         uint32_t cols, uint32_t r0, uint32_t r1) {
    for (uint32_t r = r0; r < r1;) {
        if (n_tok == 1 && r1 - r >= DENSE_ROWS) {
            dense_rows(enc, DENSE_ROWS, 1, y, ldy, x, ldx, w, cols, r);
            r += DENSE_ROWS;
            continue;
        }
        for (uint32_t t0 = 0; t0 < n_tok; t0 += DENSE_TOKENS) {
            float *yt = y + t0 * ldy;
            const float *xt = x + t0 * ldx;
            switch (n_tok - t0 < DENSE_TOKENS ? n_tok - t0 : DENSE_TOKENS) {
            case 1: dense_rows(enc, 1, 1, yt, ldy, xt, ldx, w, cols, r); break;
            case 2: dense_rows(enc, 1, 2, yt, ldy, xt, ldx, w, cols, r); break;
            case 3: dense_rows(enc, 1, 3, yt, ldy, xt, ldx, w, cols, r); break;
            default: dense_rows(enc, 1, 4, yt, ldy, xt, ldx, w, cols, r); break;
            }
        }
        r++;
    }
}

static void dense_matmul_neon(float *y, size_t ldy, const float *x, size_t ldx, uint32_t n_tok, const void *w,
                              uint32_t encoding, uint32_t cols, uint32_t r0, uint32_t r1) {
    if (r0 >= r1 || n_tok == 0) return;
    if (encoding == BN_ENC_F32) dense_enc(BN_ENC_F32, y, ldy, x, ldx, n_tok, w, cols, r0, r1);
    else if (encoding == BN_ENC_F16) dense_enc(BN_ENC_F16, y, ldy, x, ldx, n_tok, w, cols, r0, r1);
    else dense_enc(BN_ENC_BF16, y, ldy, x, ldx, n_tok, w, cols, r0, r1);
}

/* ---- Q8_R (8-bit output head) ---- */

enum { Q8_ROWS = 4 /* rows sharing one activation load */ };

/* Rows r .. r+NR-1 for one token xt (scale xs). */
BN_INLINE void q8_rows(dot16_fn dot, int NR, float *y, const int8_t *xt, float xs, const int8_t *w, const float *ws,
                       uint32_t cols, uint32_t r) {
    int32x4_t acc[Q8_ROWS];
    for (int i = 0; i < NR; i++) acc[i] = vdupq_n_s32(0);
    const int8_t *wr = w + (size_t)r * cols;
    const uint32_t c16 = cols / 16 * 16;
    for (uint32_t j = 0; j < c16; j += 16) {
        const int8x16_t xv = vld1q_s8(xt + j);
        for (int i = 0; i < NR; i++) acc[i] = dot(acc[i], vld1q_s8(wr + (size_t)i * cols + j), xv);
    }
    for (int i = 0; i < NR; i++) {
        const int8_t *wi = wr + (size_t)i * cols;
        int32_t d = vaddvq_s32(acc[i]);
        for (uint32_t j = c16; j < cols; j++) d += xt[j] * wi[j];
        y[r + i] = ((float)d / xs) * ws[r + i];
    }
}

BN_INLINE void q8_matmul(dot16_fn dot, float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs,
                         uint32_t n_tok, const int8_t *w, const float *ws, uint32_t cols, uint32_t r0, uint32_t r1) {
    uint32_t r = r0;
    for (; r + Q8_ROWS <= r1; r += Q8_ROWS)
        for (uint32_t t = 0; t < n_tok; t++) q8_rows(dot, Q8_ROWS, y + t * ldy, x + t * ldx, xs[t], w, ws, cols, r);
    for (; r < r1; r++)
        for (uint32_t t = 0; t < n_tok; t++) q8_rows(dot, 1, y + t * ldy, x + t * ldx, xs[t], w, ws, cols, r);
}

static void q8_matmul_neon(float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs, uint32_t n_tok,
                           const int8_t *w, const float *ws, uint32_t cols, uint32_t r0, uint32_t r1) {
    q8_matmul(dot16_neon, y, ldy, x, ldx, xs, n_tok, w, ws, cols, r0, r1);
}

BN_DOTPROD static void q8_matmul_dotprod(float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs,
                                         uint32_t n_tok, const int8_t *w, const float *ws, uint32_t cols, uint32_t r0,
                                         uint32_t r1) {
    q8_matmul(dot16_sdot, y, ldy, x, ldx, xs, n_tok, w, ws, cols, r0, r1);
}

/* ---- Q6_B / Q4_B (6- and 4-bit output heads) ---- */

/* The q of block b's columns 0-15 and 16-31 (layout in kernels.h): nibbles, Q6_B's bits 4-5 shifted
 * into place per byte (columns 8m + i take bits 2m of high byte i), minus the code offset. */
BN_INLINE void qb_block(uint32_t enc, const uint8_t *nibbles, const uint8_t *high, int8x16_t *q0, int8x16_t *q1) {
    static const int8_t shift_lo[16] = {4, 4, 4, 4, 4, 4, 4, 4, 2, 2, 2, 2, 2, 2, 2, 2};
    static const int8_t shift_hi[16] = {0, 0, 0, 0, 0, 0, 0, 0, -2, -2, -2, -2, -2, -2, -2, -2};
    const uint8x16_t w = vld1q_u8(nibbles);
    uint8x16_t lo = vandq_u8(w, vdupq_n_u8(15)), hi = vshrq_n_u8(w, 4);
    if (enc == BN_ENC_Q6B) {
        const uint8x8_t h = vld1_u8(high);
        const uint8x16_t hh = vcombine_u8(h, h), m = vdupq_n_u8(0x30);
        lo = vorrq_u8(lo, vandq_u8(vshlq_u8(hh, vld1q_s8(shift_lo)), m));
        hi = vorrq_u8(hi, vandq_u8(vshlq_u8(hh, vld1q_s8(shift_hi)), m));
    }
    const int8x16_t offset = vdupq_n_s8((int8_t)bn_qb_code_offset(enc));
    *q0 = vsubq_s8(vreinterpretq_s8_u8(lo), offset);
    *q1 = vsubq_s8(vreinterpretq_s8_u8(hi), offset);
}

/* sum_k q_k * x_k of one block into 4 lanes (|q| <= 32: pairs of products fit dot16_neon's int16). */
BN_INLINE int32x4_t qb_block_dot(dot16_fn dot, uint32_t enc, const uint8_t *nibbles, const uint8_t *high,
                                 const int8_t *x) {
    int8x16_t q0, q1;
    qb_block(enc, nibbles, high, &q0, &q1);
    return dot(dot(vdupq_n_s32(0), q0, vld1q_s8(x)), q1, vld1q_s8(x + 16));
}

/* dot(row, xt) of a Q6_B / Q4_B row of nb blocks (kernels.h), exact in int64, a group at a time (16
 * blocks: int32 lanes <= 16 * 8 * 32 * 128 * 255 < 2^31); the last, partial block against a
 * zero-padded copy of its activations. */
BN_INLINE int64_t qb_row(dot16_fn dot, uint32_t enc, const uint8_t *row, uint32_t nb, const int8_t *xt, uint32_t cols) {
    const size_t group_bytes = (size_t)BN_QB_GROUP * bn_qb_block_bytes(enc);
    int64_t total = 0;
    for (uint32_t b0 = 0; b0 < nb; b0 += BN_QB_GROUP) {
        const uint8_t *group = row + group_bytes * (b0 / BN_QB_GROUP);
        const uint32_t n = nb - b0 < BN_QB_GROUP ? nb - b0 : BN_QB_GROUP;
        const uint8_t *nibbles = group + n, *high = group + 17 * n;
        int32x4_t acc = vdupq_n_s32(0);
        for (uint32_t i = 0; i < n; i++) {
            const int8_t *xb = xt + BN_QB_BLOCK * (size_t)(b0 + i);
            int8_t pad[BN_QB_BLOCK];
            if (BN_QB_BLOCK * (b0 + i + 1) > cols) { /* the last block, partial */
                memset(pad, 0, sizeof pad);
                memcpy(pad, xb, cols - BN_QB_BLOCK * (b0 + i));
                xb = pad;
            }
            acc = vmlaq_n_s32(acc, qb_block_dot(dot, enc, nibbles + 16 * (size_t)i, high + 8 * (size_t)i, xb),
                              (int32_t)group[i]);
        }
        total += vaddlvq_s32(acc);
    }
    return total;
}

BN_INLINE void qb_matmul(dot16_fn dot, uint32_t enc, float *y, size_t ldy, const int8_t *x, size_t ldx,
                         const float *xs, uint32_t n_tok, const uint8_t *w, const float *ws, uint32_t cols, uint32_t r0,
                         uint32_t r1) {
    const uint32_t nb = bn_qb_blocks(cols);
    const size_t row_bytes = bn_qb_row_bytes(enc, cols);
    for (uint32_t r = r0; r < r1; r++) {
        const uint8_t *row = w + (size_t)r * row_bytes;
        for (uint32_t t = 0; t < n_tok; t++)
            y[t * ldy + r] = ((float)qb_row(dot, enc, row, nb, x + t * ldx, cols) / xs[t]) * ws[r];
    }
}

static void q6_matmul_neon(float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs, uint32_t n_tok,
                           const uint8_t *w, const float *ws, uint32_t cols, uint32_t r0, uint32_t r1) {
    qb_matmul(dot16_neon, BN_ENC_Q6B, y, ldy, x, ldx, xs, n_tok, w, ws, cols, r0, r1);
}

static void q4_matmul_neon(float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs, uint32_t n_tok,
                           const uint8_t *w, const float *ws, uint32_t cols, uint32_t r0, uint32_t r1) {
    qb_matmul(dot16_neon, BN_ENC_Q4B, y, ldy, x, ldx, xs, n_tok, w, ws, cols, r0, r1);
}

BN_DOTPROD static void q6_matmul_dotprod(float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs,
                                         uint32_t n_tok, const uint8_t *w, const float *ws, uint32_t cols, uint32_t r0,
                                         uint32_t r1) {
    qb_matmul(dot16_sdot, BN_ENC_Q6B, y, ldy, x, ldx, xs, n_tok, w, ws, cols, r0, r1);
}

BN_DOTPROD static void q4_matmul_dotprod(float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs,
                                         uint32_t n_tok, const uint8_t *w, const float *ws, uint32_t cols, uint32_t r0,
                                         uint32_t r1) {
    qb_matmul(dot16_sdot, BN_ENC_Q4B, y, ldy, x, ldx, xs, n_tok, w, ws, cols, r0, r1);
}

/* ---- activation quantization and attention (references in ops.h) ---- */

static float quantize_row_neon(int8_t *q, const float *x, uint32_t n) {
    float32x4_t vmax = vdupq_n_f32(0.0f);
    uint32_t i = 0;
    for (; i + 4 <= n; i += 4) vmax = vmaxnmq_f32(vmax, vabsq_f32(vld1q_f32(x + i)));
    float amax = vmaxnmvq_f32(vmax);
    for (; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
    const float s = 127.0f / fmaxf(amax, 1e-5f);
    const float32x4_t lo = vdupq_n_f32(-128.0f), hi = vdupq_n_f32(127.0f);
    for (i = 0; i + 16 <= n; i += 16) {
        int16x8_t h[2];
        for (int k = 0; k < 2; k++) {
            int32x4_t v[2];
            for (int m = 0; m < 2; m++) {
                const float32x4_t r = vrndnq_f32(vmulq_n_f32(vld1q_f32(x + i + 8 * k + 4 * m), s));
                v[m] = vcvtq_s32_f32(vminnmq_f32(vmaxnmq_f32(r, lo), hi));
            }
            h[k] = vcombine_s16(vmovn_s32(v[0]), vmovn_s32(v[1]));
        }
        vst1q_s8(q + i, vcombine_s8(vmovn_s16(h[0]), vmovn_s16(h[1])));
    }
    for (; i < n; i++) q[i] = (int8_t)fminf(fmaxf(rintf(x[i] * s), -128.0f), 127.0f);
    return s;
}

/* bn_dot8_f32(a, b, n) with b[i] element b0 + i of an F32 or F16 row (enc: dense_load4's widening,
 * exact): partial sums 0-3 in s03, 4-7 in s47, the rest element by element. */
BN_INLINE float dot8_neon(const float *a, int enc, const void *b, uint64_t b0, uint32_t n) {
    float32x4_t s03 = vdupq_n_f32(0.0f), s47 = vdupq_n_f32(0.0f);
    uint32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        s03 = vaddq_f32(s03, vmulq_f32(vld1q_f32(a + i), dense_load4(enc, b, b0 + i)));
        s47 = vaddq_f32(s47, vmulq_f32(vld1q_f32(a + i + 4), dense_load4(enc, b, b0 + i + 4)));
    }
    if (i < n) {
        float s[8];
        vst1q_f32(s, s03);
        vst1q_f32(s + 4, s47);
        for (; i < n; i++) s[i % 8] += a[i] * dense_at(enc, b, b0 + i);
        s03 = vld1q_f32(s);
        s47 = vld1q_f32(s + 4);
    }
    const float32x4_t t = vaddq_f32(s03, s47);                       /* s0+s4, s1+s5, s2+s6, s3+s7 */
    const float32x2_t u = vadd_f32(vget_low_f32(t), vget_high_f32(t)); /* (s0+s4)+(s2+s6), (s1+s5)+(s3+s7) */
    return vget_lane_f32(u, 0) + vget_lane_f32(u, 1);
}

/* One attention head over a float (enc BN_ENC_F32) or f16 (BN_ENC_F16) cache; enc is a constant at
 * each call. An f16 key or value is widened exactly (FCVTL) before the reference's float operations;
 * the cache holds no signalling NaN (bn_f32_to_fp16 makes NaNs quiet), the one input where FCVTL's
 * bits and bn_fp16_to_f32's would differ. */
BN_INLINE void attention_head(int enc, float *out, const float *q, const void *k, const void *v, uint64_t stride,
                              uint32_t n_pos, uint32_t D, float scale, float *att) {
    for (uint32_t j = 0; j < n_pos; j++) att[j] = dot8_neon(q, enc, k, j * stride, D) * scale;
    const float sum = bn_softmax_numerators(att, n_pos);
    memset(out, 0, D * sizeof *out);
    const uint32_t D4 = D / 4 * 4;
    for (uint32_t j = 0; j < n_pos; j++) {
        const uint64_t vj = j * stride;
        const float p = att[j] / sum;
        const float32x4_t pv = vdupq_n_f32(p);
        for (uint32_t i = 0; i < D4; i += 4)
            vst1q_f32(out + i, vaddq_f32(vld1q_f32(out + i), vmulq_f32(pv, dense_load4(enc, v, vj + i))));
        for (uint32_t i = D4; i < D; i++) out[i] += p * dense_at(enc, v, vj + i);
    }
}

static void attention_head_neon(float *out, const float *q, const float *k, const float *v, uint64_t stride,
                                uint32_t n_pos, uint32_t D, float scale, float *att) {
    attention_head(BN_ENC_F32, out, q, k, v, stride, n_pos, D, scale, att);
}

static void attention_head_f16_neon(float *out, const float *q, const uint16_t *k, const uint16_t *v,
                                    uint64_t stride, uint32_t n_pos, uint32_t D, float scale, float *att) {
    attention_head(BN_ENC_F16, out, q, k, v, stride, n_pos, D, scale, att);
}

const bn_kernels bn_kernels_neon = {
    .name = "neon",
    .i2_matmul = i2_matmul_neon,
    .tl1_matmul = tl1_matmul_neon,
    .tl2_matmul = tl2_matmul_neon,
    .dense_matmul = dense_matmul_neon,
    .q8_matmul = q8_matmul_neon,
    .q6_matmul = q6_matmul_neon,
    .q4_matmul = q4_matmul_neon,
    .quantize_row = quantize_row_neon,
    .attention_head = attention_head_neon,
    .attention_head_f16 = attention_head_f16_neon,
};

const bn_kernels bn_kernels_neon_dotprod = {
    .name = "neon-dotprod",
    .i2_matmul = i2_matmul_dotprod,
    .tl1_matmul = tl1_matmul_neon,
    .tl2_matmul = tl2_matmul_neon,
    .dense_matmul = dense_matmul_neon,
    .q8_matmul = q8_matmul_dotprod,
    .q6_matmul = q6_matmul_dotprod,
    .q4_matmul = q4_matmul_dotprod,
    .quantize_row = quantize_row_neon,
    .attention_head = attention_head_neon,
    .attention_head_f16 = attention_head_f16_neon,
};

#else
typedef int bn_kernels_neon_unused; /* not AArch64: nothing to compile (ISO C forbids an empty file) */
#endif
