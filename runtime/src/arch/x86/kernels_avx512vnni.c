/* AVX-512 VNNI kernels, bit-exact with the scalar reference in runtime/src/kernels.c. The I2 matmul,
 * the dense head and the Q8_R head have kernels of their own here; the other entries are the AVX2 variant's
 * (kernels_x86.h).
 * Like kernels_avx2.c, every function carries a target attribute (BN_AVX512VNNI) and is handed out
 * by bn_kernels_select() only when the CPU and OS support avx512f/bw/vnni (and avx2/f16c/fma, for the
 * reused kernels).
 *
 * I2 matmul, a register-tiled GEMM for prompt batches. One step reads 64 weight bytes (256
 * elements) of each of I2V_ROWS rows; byte k holds elements 4k..4k+3. The activations of each token
 * are deinterleaved once per call (bn_i2_gemm, kernels_x86.h, which drives the tiles here:
 * bn_i2_planes_avx2 with interleave 2) into blocks of 4 planes of 64
 * bytes, lane k of plane i = x[4k + i], so that plane i of the weights, ((byte >> 2i) & 3) mapped
 * {0,1,2,3} -> {0,1,2,1} (code 3 counts as 0), lines up with plane i of x. The codes are w + 1 and
 * non-negative, x is signed: vpdpbusd (u8 x s8, four products summed into each int32 lane) gives
 * sum(c * x) exactly, and dot(x, w) = sum(c * x) - sum(x). No int16 stage, so nothing can saturate.
 * The code planes come from nibbles: a pshufb on the low (high) nibble of each byte gives the
 * codes of elements 4k and 4k+1 (4k+2 and 4k+3). Each unpacked row plane is used by I2V_TOKENS
 * tokens and each token plane by I2V_ROWS rows: 16 independent int32 accumulators, reduced four
 * at a time at the end of a row. Zero padding of the activations makes whatever codes sit past
 * `cols` harmless; a row's last partial 64 bytes are read with a masked load.
 * Up to 4 tokens (decoding, small batches: memory-bound) take the rows one at a time, so that the
 * weights are one sequential stream with a software prefetch ahead (4-row tiles read it at about
 * half the speed there), and a single token gives each plane its own accumulator, so that four
 * vpdpbusd chains run side by side. */
#if defined(__x86_64__)

#include <immintrin.h>

#include "arch/x86/kernels_x86.h"
#include "kernels.h"
#include "model_file.h"
#include "ops.h"

#define BN_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,f16c,fma")))
#define BN_INLINE static inline __attribute__((always_inline))

enum {
    I2V_STEP = 64,         /* weight bytes per row and step */
    I2V_BLOCK = 256,       /* elements per step (4 planes of 64 activation bytes) */
    I2V_ROWS = 4,          /* rows sharing each token plane */
    I2V_TOKENS = 4,        /* tokens sharing each unpacked row plane */
    I2V_PREFETCH = 2048,   /* bytes ahead in the weight stream when decoding (2048 measured best of 2048, 4096) */
};

/* Lane t (t < 4) = the sum of the 16 int32 lanes of v[t]. */
_Static_assert(I2V_TOKENS == 4, "hsum4_epi32 reduces four accumulators");
BN_AVX512VNNI BN_INLINE __m128i hsum4_epi32(const __m512i v[4]) {
    __m256i h[4];
    for (int t = 0; t < 4; t++)
        h[t] = _mm256_add_epi32(_mm512_castsi512_si256(v[t]), _mm512_extracti64x4_epi64(v[t], 1));
    /* per 128-bit lane: [v0 0+2, v1 0+2, v0 1+3, v1 1+3], then [v0, v1, v2, v3] */
    const __m256i h01 = _mm256_add_epi32(_mm256_unpacklo_epi32(h[0], h[1]), _mm256_unpackhi_epi32(h[0], h[1]));
    const __m256i h23 = _mm256_add_epi32(_mm256_unpacklo_epi32(h[2], h[3]), _mm256_unpackhi_epi32(h[2], h[3]));
    const __m256i s = _mm256_add_epi32(_mm256_unpacklo_epi64(h01, h23), _mm256_unpackhi_epi64(h01, h23));
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

/* y[t*ldy + r] = dot(row r, token t) for R rows from w (row_bytes apart) and NT tokens whose planes
 * start tstride bytes apart; sums[t] = sum(x_t). */
BN_AVX512VNNI BN_INLINE void i2v_tile(int R, int NT, const uint8_t *w, uint32_t row_bytes, const int8_t *planes,
                                      size_t tstride, const int32_t *sums, int32_t *y, size_t ldy) {
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    const __m512i tab_lo = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)bn_i2_nibble_codes[0]));
    const __m512i tab_hi = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)bn_i2_nibble_codes[1]));
    __m512i acc[I2V_ROWS][I2V_TOKENS]; /* all zeroed: the unused ones add nothing to the reduction */
    for (int r = 0; r < I2V_ROWS; r++)
        for (int t = 0; t < I2V_TOKENS; t++) acc[r][t] = _mm512_setzero_si512();
    const uint32_t steps = (row_bytes + I2V_STEP - 1) / I2V_STEP, tail = row_bytes % I2V_STEP;
    for (uint32_t s = 0; s < steps; s++) {
        const __mmask64 mask = s + 1 == steps && tail ? (((__mmask64)1 << tail) - 1) : ~(__mmask64)0;
        const int8_t *p = planes + (size_t)s * I2V_BLOCK;
        /* the low nibbles (planes 0, 1), then the high ones (planes 2, 3): fewer live registers */
        for (int half = 0; half < 2; half++) {
            __m512i nib[I2V_ROWS];
            if (half == 0) /* each row stream a fixed distance ahead (small batches are memory-bound too) */
                for (int r = 0; r < R; r++)
                    _mm_prefetch((const char *)(w + (size_t)r * row_bytes + (size_t)s * I2V_STEP + I2V_PREFETCH),
                                 _MM_HINT_T0);
            for (int r = 0; r < R; r++) {
                const __m512i v = _mm512_maskz_loadu_epi8(mask, w + (size_t)r * row_bytes + (size_t)s * I2V_STEP);
                nib[r] = _mm512_and_si512(half ? _mm512_srli_epi16(v, 4) : v, nibble);
            }
            for (int odd = 0; odd < 2; odd++) {
                const int8_t *pi = p + (size_t)(2 * half + odd) * I2V_STEP;
                __m512i c[I2V_ROWS];
                for (int r = 0; r < R; r++) c[r] = _mm512_shuffle_epi8(odd ? tab_hi : tab_lo, nib[r]);
                for (int t = 0; t < NT; t++) {
                    const __m512i a = _mm512_load_si512((const void *)(pi + t * tstride));
                    const int slot = NT == 1 ? 2 * half + odd : t; /* one token: a chain per plane */
                    for (int r = 0; r < R; r++) acc[r][slot] = _mm512_dpbusd_epi32(acc[r][slot], c[r], a);
                }
            }
        }
    }
    for (int r = 0; r < R; r++) {
        int32_t dot[I2V_TOKENS];
        _mm_storeu_si128((__m128i *)dot, hsum4_epi32(acc[r]));
        if (NT == 1) dot[0] += dot[1] + dot[2] + dot[3];
        for (int t = 0; t < NT; t++) y[t * ldy + r] = dot[t] - sums[t];
    }
}

/* Instances with constant row and token counts, so that the accumulators live in registers. */
#define I2V_INSTANCE(R, NT)                                                                                        \
    BN_AVX512VNNI static void i2v_tile_##R##x##NT(const uint8_t *w, uint32_t rb, const int8_t *p, size_t ts,       \
                                                  const int32_t *s, int32_t *y, size_t ldy) {                     \
        i2v_tile(R, NT, w, rb, p, ts, s, y, ldy);                                                                  \
    }
I2V_INSTANCE(4, 1)
I2V_INSTANCE(4, 2)
I2V_INSTANCE(4, 3)
I2V_INSTANCE(4, 4)
I2V_INSTANCE(1, 1)
I2V_INSTANCE(1, 2)
I2V_INSTANCE(1, 3)
I2V_INSTANCE(1, 4)

static const bn_i2_tiling i2v_tiling = {
    .interleave = I2V_BLOCK / 128,
    .rows = I2V_ROWS,
    .multi = {NULL, i2v_tile_4x1, i2v_tile_4x2, i2v_tile_4x3, i2v_tile_4x4},
    .single = {NULL, i2v_tile_1x1, i2v_tile_1x2, i2v_tile_1x3, i2v_tile_1x4},
};

BN_AVX512VNNI static void i2_matmul_avx512vnni(int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok,
                                               const uint8_t *w, uint32_t cols, uint32_t r0, uint32_t r1) {
    bn_i2_gemm(&i2v_tiling, y, ldy, x, ldx, n_tok, w, cols, r0, r1);
}

/* ---- dense (output head) ----
 * As the AVX2 kernel (kernels_avx2.c), with one zmm vector holding the 16 lane sums of a row and
 * token, and 32 registers: a call takes 4 rows x 4 tokens (16 chains), so each activation vector
 * loaded serves 4 rows and each widened weight vector 4 tokens (a single token: 8 rows at once). */
enum {
    D512_ROWS = 4,   /* rows per call for several tokens; a block's rows stay in L1 for all tokens */
    D512_TOKENS = 4, /* tokens per call, at most */
};
#ifndef D512_ROWS_1
#define D512_ROWS_1 8 /* rows per call for a single token */
#endif
#ifndef D512_PREFETCH
#define D512_PREFETCH 512 /* bytes ahead in each row stream */
#endif

/* With several passes over a block of R rows (more tokens than a tile takes), pass `pass` of n_pass
 * prefetches its share of the next block: at byte `at` of its progress along the current rows, byte
 * (pass * row_bytes + at) / n_pass of each of the R rows starting at `next` (row_bytes apart), so that
 * the weight stream keeps flowing while the later passes compute from cache. */
BN_AVX512VNNI BN_INLINE void prefetch_next_share(const char *next, size_t row_bytes, int R, uint32_t pass,
                                                 uint32_t n_pass, size_t at) {
    for (int i = 0; i < R; i++) _mm_prefetch(next + (size_t)i * row_bytes + ((size_t)pass * row_bytes + at) / n_pass, _MM_HINT_T0);
}

/* Columns i .. i+15 of a dense row w as floats. */
BN_AVX512VNNI BN_INLINE __m512 dense_load16(int enc, const void *w, size_t i) {
    if (enc == BN_ENC_F32) return _mm512_loadu_ps((const float *)w + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
    if (enc == BN_ENC_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); /* BF16 */
}

/* Rows r .. r+R-1 for tokens 0 .. NT-1 of x (rows ldx apart) into y (rows ldy apart). */
BN_AVX512VNNI BN_INLINE void dense_rows(int enc, int R, int NT, float *y, size_t ldy, const float *x, size_t ldx,
                                        const void *w, uint32_t cols, uint32_t r, uint32_t pass, uint32_t n_pass,
                                        uint32_t r_end) {
    __m512 acc[D512_ROWS_1][D512_TOKENS];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < NT; t++) acc[i][t] = _mm512_setzero_ps();
    const uint32_t cols16 = cols / BN_DENSE_LANES * BN_DENSE_LANES;
    const size_t esize = enc == BN_ENC_F32 ? 4 : 2;
    for (uint32_t j = 0; j < cols16; j += BN_DENSE_LANES) {
        if ((j * esize) % 64 == 0) { /* a line ahead in each row, once per line */
            if (pass == 0)
                for (int i = 0; i < R; i++)
                    _mm_prefetch((const char *)w + ((size_t)(r + i) * cols + j) * esize + D512_PREFETCH, _MM_HINT_T0);
            if (n_pass > 1 && r + 2 * R <= r_end)
                prefetch_next_share((const char *)w + (size_t)(r + R) * cols * esize, (size_t)cols * esize, R, pass,
                                    n_pass, j * esize);
        }
        __m512 xv[D512_TOKENS];
        for (int t = 0; t < NT; t++) xv[t] = _mm512_loadu_ps(x + t * ldx + j);
        for (int i = 0; i < R; i++) {
            const __m512 wv = dense_load16(enc, w, (size_t)(r + i) * cols + j);
            for (int t = 0; t < NT; t++) acc[i][t] = _mm512_fmadd_ps(xv[t], wv, acc[i][t]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < NT; t++) {
            float s[BN_DENSE_LANES];
            _mm512_storeu_ps(s, acc[i][t]);
            y[t * ldy + r + i] = bn_dense_finish(s, x + t * ldx, (const char *)w + (size_t)(r + i) * cols * esize, enc, cols16, cols);
        }
}

/* dense_rows with R rows and a constant token count nt (1 .. 4), pass t0 / D512_TOKENS of n_pass. */
#define DENSE_ROWS_NT(R, nt)                                                                                       \
    switch (nt) {                                                                                                  \
    case 1: dense_rows(enc, R, 1, yt, ldy, xt, ldx, w, cols, r, t0 / D512_TOKENS, n_pass, r1); break;             \
    case 2: dense_rows(enc, R, 2, yt, ldy, xt, ldx, w, cols, r, t0 / D512_TOKENS, n_pass, r1); break;             \
    case 3: dense_rows(enc, R, 3, yt, ldy, xt, ldx, w, cols, r, t0 / D512_TOKENS, n_pass, r1); break;             \
    default: dense_rows(enc, R, 4, yt, ldy, xt, ldx, w, cols, r, t0 / D512_TOKENS, n_pass, r1); break;            \
    }

/* Rows [r0, r1): a single token D512_ROWS_1 rows at a time; otherwise blocks of D512_ROWS rows, each
 * block once for every group of up to D512_TOKENS tokens; the last rows one at a time. Constant
 * counts in every call, so that the accumulators live in registers. */
BN_AVX512VNNI BN_INLINE void dense_enc(int enc, float *y, size_t ldy, const float *x, size_t ldx, uint32_t n_tok,
                                       const void *w, uint32_t cols, uint32_t r0, uint32_t r1) {
    uint32_t r = r0;
    if (n_tok == 1)
        for (; r + D512_ROWS_1 <= r1; r += D512_ROWS_1) dense_rows(enc, D512_ROWS_1, 1, y, ldy, x, ldx, w, cols, r, 0, 1, r1);
    const uint32_t n_pass = (n_tok + D512_TOKENS - 1) / D512_TOKENS;
    for (; r < r1;) {
        const int R = r1 - r >= D512_ROWS ? D512_ROWS : 1;
        for (uint32_t t0 = 0; t0 < n_tok; t0 += D512_TOKENS) {
            float *yt = y + t0 * ldy;
            const float *xt = x + t0 * ldx;
            const uint32_t nt = n_tok - t0 < D512_TOKENS ? n_tok - t0 : D512_TOKENS;
            if (R == D512_ROWS) DENSE_ROWS_NT(D512_ROWS, nt)
            else DENSE_ROWS_NT(1, nt)
        }
        r += R;
    }
}
#undef DENSE_ROWS_NT

BN_AVX512VNNI static void dense_matmul_avx512(float *y, size_t ldy, const float *x, size_t ldx, uint32_t n_tok,
                                              const void *w, uint32_t encoding, uint32_t cols, uint32_t r0, uint32_t r1) {
    if (r0 >= r1 || n_tok == 0) return;
    if (encoding == BN_ENC_F32) dense_enc(BN_ENC_F32, y, ldy, x, ldx, n_tok, w, cols, r0, r1);
    else if (encoding == BN_ENC_F16) dense_enc(BN_ENC_F16, y, ldy, x, ldx, n_tok, w, cols, r0, r1);
    else dense_enc(BN_ENC_BF16, y, ldy, x, ldx, n_tok, w, cols, r0, r1);
}

/* ---- Q8_R (8-bit output head) ----
 * vpdpbusd multiplies unsigned by signed bytes; AVX-512 has no vpsignb to move w's sign onto x as
 * the AVX2 kernel does, so the activations are offset instead: u = x + 128 (x ^ 0x80, 1..255 for x
 * in [-127, 127]) is unsigned, and sum(u * w) = dot(x, w) + 128 * sum(w), the row sum counted by
 * one more vpdpbusd of the row with a vector of ones (shared by all the tokens of a pass). Each lane
 * adds at most 4 * 255 * 128 per step, so int32 holds rows of up to a million columns, and the
 * result is the exact dot; the float step is the reference's expression. Tiles as the dense head's:
 * R rows x NT tokens per call (a single token 8 rows, more tokens 4 x 4), each activation vector
 * serving R rows and each weight vector NT tokens; with more than 4 tokens, a row block is read once
 * per group of 4 from cache, and each such pass prefetches its share of the next block. */
enum {
    Q8V_STEP = 64,     /* columns per step */
    Q8V_ROWS = 4,      /* rows per call for several tokens */
    Q8V_TOKENS = 4,    /* tokens per call, at most */
    Q8V_ROWS_1 = 8,    /* rows per call for a single token */
    Q8V_PREFETCH = 512 /* bytes ahead in each row stream */
};

BN_AVX512VNNI BN_INLINE void q8v_rows(int R, int NT, float *y, size_t ldy, const int8_t *x, size_t ldx,
                                      const float *xs, const int8_t *w, const float *ws, uint32_t cols, uint32_t r,
                                      uint32_t pass, uint32_t n_pass, uint32_t r_end) {
    const __m512i offset = _mm512_set1_epi8((char)0x80), ones = _mm512_set1_epi8(1);
    __m512i acc[Q8V_ROWS_1][Q8V_TOKENS], rowsum[Q8V_ROWS_1];
    for (int i = 0; i < R; i++) {
        rowsum[i] = _mm512_setzero_si512();
        for (int t = 0; t < NT; t++) acc[i][t] = _mm512_setzero_si512();
    }
    for (uint32_t j = 0; j < cols; j += Q8V_STEP) {
        const __mmask64 mask = cols - j >= Q8V_STEP ? ~(__mmask64)0 : (((__mmask64)1 << (cols - j)) - 1);
        if (pass == 0)
            for (int i = 0; i < R; i++)
                _mm_prefetch((const char *)(w + (size_t)(r + i) * cols + j) + Q8V_PREFETCH, _MM_HINT_T0);
        if (n_pass > 1 && r + 2 * R <= r_end)
            prefetch_next_share((const char *)(w + (size_t)(r + R) * cols), cols, R, pass, n_pass, j);
        __m512i wv[Q8V_ROWS_1];
        for (int i = 0; i < R; i++) {
            wv[i] = _mm512_maskz_loadu_epi8(mask, w + (size_t)(r + i) * cols + j);
            rowsum[i] = _mm512_dpbusd_epi32(rowsum[i], ones, wv[i]);
        }
        for (int t = 0; t < NT; t++) {
            const __m512i u = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, x + t * ldx + j), offset);
            for (int i = 0; i < R; i++) acc[i][t] = _mm512_dpbusd_epi32(acc[i][t], u, wv[i]);
        }
    }
    for (int i = 0; i < R; i++) {
        const int32_t bias = 128 * _mm512_reduce_add_epi32(rowsum[i]);
        for (int t = 0; t < NT; t++) {
            const int32_t d = _mm512_reduce_add_epi32(acc[i][t]) - bias;
            y[t * ldy + r + i] = ((float)d / xs[t]) * ws[r + i];
        }
    }
}

/* q8v_rows with R rows and a constant token count nt (1 .. 4). */
#define Q8V_ROWS_NT(R, nt)                                                                                        \
    switch (nt) {                                                                                                  \
    case 1: q8v_rows(R, 1, yt, ldy, xt, ldx, xst, w, ws, cols, r, pass, n_pass, r1); break;                       \
    case 2: q8v_rows(R, 2, yt, ldy, xt, ldx, xst, w, ws, cols, r, pass, n_pass, r1); break;                       \
    case 3: q8v_rows(R, 3, yt, ldy, xt, ldx, xst, w, ws, cols, r, pass, n_pass, r1); break;                       \
    default: q8v_rows(R, 4, yt, ldy, xt, ldx, xst, w, ws, cols, r, pass, n_pass, r1); break;                      \
    }

BN_AVX512VNNI static void q8_matmul_avx512vnni(float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs,
                                               uint32_t n_tok, const int8_t *w, const float *ws, uint32_t cols,
                                               uint32_t r0, uint32_t r1) {
    if (r0 >= r1 || n_tok == 0) return;
    uint32_t r = r0;
    if (n_tok == 1)
        for (; r + Q8V_ROWS_1 <= r1; r += Q8V_ROWS_1) q8v_rows(Q8V_ROWS_1, 1, y, ldy, x, ldx, xs, w, ws, cols, r, 0, 1, r1);
    const uint32_t n_pass = (n_tok + Q8V_TOKENS - 1) / Q8V_TOKENS;
    while (r < r1) {
        const uint32_t R = r1 - r >= Q8V_ROWS ? Q8V_ROWS : 1;
        for (uint32_t pass = 0; pass < n_pass; pass++) {
            const uint32_t t0 = pass * Q8V_TOKENS, nt = n_tok - t0 < Q8V_TOKENS ? n_tok - t0 : Q8V_TOKENS;
            float *yt = y + t0 * ldy;
            const int8_t *xt = x + t0 * ldx;
            const float *xst = xs + t0;
            if (R == Q8V_ROWS) Q8V_ROWS_NT(Q8V_ROWS, nt)
            else Q8V_ROWS_NT(1, nt)
        }
        r += R;
    }
}
#undef Q8V_ROWS_NT

const bn_kernels bn_kernels_avx512vnni =
    BN_X86_KERNELS("avx512vnni", i2_matmul_avx512vnni, dense_matmul_avx512, q8_matmul_avx512vnni);

#else
typedef int bn_kernels_avx512vnni_unused; /* not x86-64: nothing to compile (ISO C forbids an empty file) */
#endif
