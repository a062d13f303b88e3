/* AVX2 (+F16C, FMA) kernels, bit-exact with the scalar reference in runtime/src/kernels.c.
 *
 * Every function here carries BN_AVX2 (a target attribute) instead of the file being compiled with
 * -mavx2: cffi builds all sources with the same flags, and the default build must run on CPUs
 * without AVX. bn_kernels_select() hands these out only when the CPU (and OS) support them.
 *
 * I2 matmul. A row's byte k holds elements 4k..4k+3 (bits 2i..2i+1 = code of element 4k+i). The
 * activations of each token are deinterleaved once per call into blocks of 128 elements made of
 * 4 planes of 32 bytes (plane i, lane k = x[4k + i]), zero-padded to whole blocks, so that lane k
 * of ((32 weight bytes >> 2i) & 3) multiplies lane k of plane i. Codes c in {0,1,2} are w + 1, so
 * dot(x, w) = sum(c * x) - sum(x): maddubs(c, x) (u8 x s8 pairs, |.| <= 2*2*128 = 512: no
 * saturation), summed in int16 over at most 8 blocks (|.| <= 16384), widened with madd(ones).
 * Code 3 counts as 0: a pshufb of the low (high) nibble of each byte through bn_i2_nibble_codes
 * (kernels_x86.h) gives the codes of planes 0 and 1 (2 and 3), mapped {0,1,2,3} -> {0,1,2,1}: one
 * shift, two masks and four lookups per 32 weight bytes, fewer than a shift and a mask per plane
 * (measured 5-10% of the prompt GEMM on a Zen 3 core). Zero padding makes
 * whatever codes sit past `cols` harmless. Several tokens (up to 4) share each unpacked weight block.
 *
 * TL1 / TL2 matmul (layouts in kernels.h). A lookup-table kernel vectorizes over rows: lane i of a
 * 32-byte weight vector is row i of a 32-row tile, and its low (high) nibbles are every lane's index
 * for one pair (triple) of columns, so one pshufb looks up 32 rows in that pair's 16-entry table.
 * Per token and pair (triple) the exact int16 table T[idx] = the dot product of the pair (triple)
 * with the weights idx stands for (|T| <= 256, resp. 384; padding entries 0) is stored split into a
 * low-byte and a high-byte table; the activations are zero-padded, so padded and absent pairs add 0.
 * Summing without re-joining the bytes: per row, sum(T) = sum(lo) + 256 * sum(hi) (mod 2^16), and
 * over at most TL_FLUSH pairs the true sum fits in int16, so it is recovered exactly mod 2^16:
 * sum(hi) is only needed mod 256 (byte adds), sum(lo) in 16-bit lanes, where A = sum of the raw
 * lanes (rows 2i + 256 * rows 2i+1) and B = sum of lanes >> 8 (rows 2i+1) give the even rows as
 * A - (B << 8). Then the int16 sums are sign-extended into int32 accumulators. TL2 applies a
 * triple's sign s (0 or -1 per row byte) as -T = (T ^ s) - s: both bytes are xor-ed with s before
 * summing, and the count of negated triples per row (shared by all tokens) is added at the flush.
 *
 * Dense matmul (output head). The reference's order (kernels.h, bn_dense_dot) puts column j in lane
 * j % 16, so two ymm vectors loaded from 16 consecutive columns are the 16 lane sums of one row and
 * token: acc = fma(x, w, acc) (vfmadd, the reference's fmaf) per vector, and the lanes are folded in the
 * reference's halves at the end. A call takes R rows x NT tokens, R * NT * 2 independent add chains
 * in registers; each converted weight vector serves NT tokens.
 *
 * Q8_R matmul (8-bit output head). maddubs multiplies an unsigned by a signed byte, so the sign
 * trick moves w's sign onto x: |w| (0..128, read as u8) times sign(x, w) = x * sign(w), which is
 * exact because x lies in [-127, 127] (the kernel contract; -128 would not negate). Each product is
 * x * w and a pair sum is at most 2 * 128 * 127 = 32512 in magnitude, so maddubs never saturates;
 * madd(ones) widens the pairs into int32 accumulators. Integer sums are exact in any order, and the
 * final ((float)dot / xs) * ws is the reference's expression, so results are bit-identical. Eight
 * rows share each 32-byte activation load, each row stream prefetched Q8_PREFETCH bytes ahead (8 rows
 * and 512 bytes measured best on the 128256 x 2560 head: ~13 GB/s at 1 thread, like the bf16 kernel).
 *
 * Q6_B / Q4_B matmul (6- and 4-bit heads; layout in kernels.h). Two blocks at a time: their 32
 * nibble bytes in one load give, masked, columns 0-15 of both blocks (one per 128-bit half) and,
 * shifted, columns 16-31; Q6_B's 16 high-bit bytes, each block's 8 copied into two quadwords
 * (vpermq), are shifted per quadword (vpsllvq / vpsrlvq) so that bits 4-5 land in place. The codes
 * c = q + offset are unsigned (0..63), so maddubs multiplies them by the signed activations
 * directly (pair sums <= 2 * 63 * 127: no saturation), and dot = sum(c * x) - offset * sum(x): per
 * block, sum(x) comes with the activations, which are rearranged once per call (and thread) so that
 * the two halves of a load meet the right columns. The two maddubs are added in int16 (<= 32004),
 * and one madd with the blocks' scales (int16, s[2p] in the low half, s[2p+1] in the high one,
 * picked by pshufb from the group's 16 scale bytes) scales and widens into int32 lanes; every 8
 * groups (lanes <= 1.6e9) they are widened to int64. Integer sums are exact in any order and the
 * final float step is the reference's, so results are bit-identical. Up to 4 tokens share each
 * unpacked pair; rows are read in order, one forward stream (~85-90% of the read bandwidth of one
 * thread at 1 token on the 128256 x 2560 head, shared machine; software prefetch measured no gain). */
#if defined(__x86_64__)

#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "arch/x86/kernels_x86.h"
#include "kernels.h"
#include "model_file.h"
#include "ops.h"

#define BN_AVX2 __attribute__((target("avx2,f16c,fma")))
#define BN_INLINE static inline __attribute__((always_inline))

enum {
    I2_BLOCK = 128,      /* weights per 32-byte vector of codes */
    I2_GROUP = 8,        /* blocks summed in int16 before widening */
    I2_TOKENS = 4,       /* tokens sharing one unpacked weight block */
    I2_ROW_BLOCK = 16,   /* rows kept hot in cache while all token groups pass over them */
    I2_TOKEN_CHUNK = 64, /* tokens deinterleaved per pass (bounds the scratch memory) */
};
#ifndef I2_MULTI_MIN
#define I2_MULTI_MIN 5 /* fewer tokens go row by row through the 1-row tiles: memory-bound, they read one
                        * sequential stream ~1.3-1.5x faster than the 4-row tiles (2-4 tokens, A/B here) */
#endif
#ifndef I2_PREFETCH
#define I2_PREFETCH 2048 /* bytes ahead in the weight stream (rows are contiguous) */
#endif
#ifndef DENSE_PREFETCH
#define DENSE_PREFETCH 256 /* bytes ahead in each row stream */
#endif

/* ---- per-thread scratch for the deinterleaved activations (freed when the thread exits) ---- */

typedef struct {
    size_t cap;
} scratch_hdr;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_ok;

static void scratch_destroy(void *p) { free(p); }
static void scratch_init(void) { scratch_ok = pthread_key_create(&scratch_key, scratch_destroy) == 0; }

void *bn_x86_scratch(size_t n) {
    pthread_once(&scratch_once, scratch_init);
    if (!scratch_ok) return NULL;
    scratch_hdr *s = pthread_getspecific(scratch_key);
    if (s && s->cap >= n) return (char *)s + 64;
    free(s);
    pthread_setspecific(scratch_key, NULL);
    size_t cap = (n + 63) / 64 * 64;
    s = aligned_alloc(64, 64 + cap);
    if (!s) return NULL;
    s->cap = cap;
    if (pthread_setspecific(scratch_key, s) != 0) {
        free(s);
        return NULL;
    }
    return (char *)s + 64;
}

/* ---- helpers ---- */

BN_AVX2 BN_INLINE int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

BN_AVX2 BN_INLINE int64_t hsum_epi64(__m256i v) {
    __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi64(s, _mm_unpackhi_epi64(s, s));
    return _mm_cvtsi128_si64(s);
}

/* ---- I2 ---- */

/* kernels_x86.h; this variant uses interleave 1. The planes of 128-element chunk c are made as for
 * interleave 1, then stored as part c % interleave of block c / interleave. */
BN_AVX2 int32_t bn_i2_planes_avx2(int8_t *dst, const int8_t *x, uint32_t cols, uint32_t interleave) {
    const __m256i shuf = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5,
                                          9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    const __m256i zero = _mm256_setzero_si256();
    __m256i sum = zero; /* sum(x + 128) over all (padded) bytes, in 4 u64 lanes */
    const uint32_t nblk = (cols + I2_BLOCK * interleave - 1) / (I2_BLOCK * interleave) * interleave;
    int8_t tmp[I2_BLOCK];
    for (uint32_t b = 0; b < nblk; b++) {
        const size_t start = (size_t)b * I2_BLOCK;
        const int8_t *src = tmp;
        if (start + I2_BLOCK <= cols) src = x + start;
        else { /* a partial or wholly padded chunk: zero-pad */
            memset(tmp, 0, sizeof tmp);
            if (start < cols) memcpy(tmp, x + start, cols - start);
        }
        __m256i v[4];
        for (int m = 0; m < 4; m++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(src + 32 * m));
            sum = _mm256_add_epi64(sum, _mm256_sad_epu8(_mm256_xor_si256(a, bias), zero));
            /* qword i = plane i for elements 32m .. 32m+31 of the block */
            v[m] = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(a, shuf), perm);
        }
        __m256i lo01 = _mm256_unpacklo_epi64(v[0], v[1]), hi01 = _mm256_unpackhi_epi64(v[0], v[1]);
        __m256i lo23 = _mm256_unpacklo_epi64(v[2], v[3]), hi23 = _mm256_unpackhi_epi64(v[2], v[3]);
        const size_t plane = 32 * (size_t)interleave; /* bytes between planes */
        int8_t *d = dst + (size_t)(b / interleave) * I2_BLOCK * interleave + 32 * (b % interleave);
        _mm256_store_si256((__m256i *)(d + 0 * plane), _mm256_permute2x128_si256(lo01, lo23, 0x20));
        _mm256_store_si256((__m256i *)(d + 1 * plane), _mm256_permute2x128_si256(hi01, hi23, 0x20));
        _mm256_store_si256((__m256i *)(d + 2 * plane), _mm256_permute2x128_si256(lo01, lo23, 0x31));
        _mm256_store_si256((__m256i *)(d + 3 * plane), _mm256_permute2x128_si256(hi01, hi23, 0x31));
    }
    return (int32_t)(hsum_epi64(sum) - (int64_t)128 * I2_BLOCK * nblk);
}

/* Adds the products of one block of 32 weight bytes with NT tokens' planes into acc16. */
BN_AVX2 BN_INLINE void i2_block(__m256i w, const int8_t *p, size_t tstride, int NT, __m256i *acc16) {
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    const __m256i tab_lo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)bn_i2_nibble_codes[0]));
    const __m256i tab_hi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)bn_i2_nibble_codes[1]));
    const __m256i lo = _mm256_and_si256(w, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), nibble);
    const __m256i c0 = _mm256_shuffle_epi8(tab_lo, lo), c1 = _mm256_shuffle_epi8(tab_hi, lo);
    const __m256i c2 = _mm256_shuffle_epi8(tab_lo, hi), c3 = _mm256_shuffle_epi8(tab_hi, hi);
    for (int t = 0; t < NT; t++) {
        const int8_t *pt = p + t * tstride;
        __m256i a = _mm256_add_epi16(_mm256_maddubs_epi16(c0, _mm256_load_si256((const __m256i *)(pt + 0))),
                                     _mm256_maddubs_epi16(c1, _mm256_load_si256((const __m256i *)(pt + 32))));
        __m256i b = _mm256_add_epi16(_mm256_maddubs_epi16(c2, _mm256_load_si256((const __m256i *)(pt + 64))),
                                     _mm256_maddubs_epi16(c3, _mm256_load_si256((const __m256i *)(pt + 96))));
        acc16[t] = _mm256_add_epi16(acc16[t], _mm256_add_epi16(a, b));
    }
}

/* out[t] = dot(row wr, token t) for NT tokens whose planes start tstride bytes apart. */
BN_AVX2 BN_INLINE void i2_row(const uint8_t *wr, uint32_t row_bytes, const int8_t *planes, size_t tstride,
                               const int32_t *sums, int NT, int32_t *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc32[I2_TOKENS], acc16[I2_TOKENS];
    for (int t = 0; t < NT; t++) acc32[t] = acc16[t] = _mm256_setzero_si256();
    const uint32_t nfull = row_bytes / 32, tail = row_bytes % 32;
    uint32_t b = 0;
    while (b < nfull) {
        const uint32_t end = b + I2_GROUP < nfull ? b + I2_GROUP : nfull;
        for (; b < end; b++) {
            _mm_prefetch((const char *)(wr + 32 * (size_t)b + I2_PREFETCH), _MM_HINT_T0);
            i2_block(_mm256_loadu_si256((const __m256i *)(wr + 32 * (size_t)b)), planes + (size_t)b * I2_BLOCK,
                     tstride, NT, acc16);
        }
        for (int t = 0; t < NT; t++) {
            acc32[t] = _mm256_add_epi32(acc32[t], _mm256_madd_epi16(acc16[t], ones));
            acc16[t] = _mm256_setzero_si256();
        }
    }
    if (tail) { /* copy so as not to read past the matrix; the padded codes meet zero activations */
        uint8_t tmp[32] = {0};
        memcpy(tmp, wr + 32 * (size_t)nfull, tail);
        i2_block(_mm256_loadu_si256((const __m256i *)tmp), planes + (size_t)nfull * I2_BLOCK, tstride, NT, acc16);
        for (int t = 0; t < NT; t++) acc32[t] = _mm256_add_epi32(acc32[t], _mm256_madd_epi16(acc16[t], ones));
    }
    for (int t = 0; t < NT; t++) out[t] = hsum_epi32(acc32[t]) - sums[t];
}

/* Instances with a constant token count, so that the accumulators live in registers. */
BN_AVX2 static void i2_row1(const uint8_t *wr, uint32_t rb, const int8_t *p, size_t ts, const int32_t *s, int32_t *o) {
    i2_row(wr, rb, p, ts, s, 1, o);
}
BN_AVX2 static void i2_row2(const uint8_t *wr, uint32_t rb, const int8_t *p, size_t ts, const int32_t *s, int32_t *o) {
    i2_row(wr, rb, p, ts, s, 2, o);
}
BN_AVX2 static void i2_row3(const uint8_t *wr, uint32_t rb, const int8_t *p, size_t ts, const int32_t *s, int32_t *o) {
    i2_row(wr, rb, p, ts, s, 3, o);
}
BN_AVX2 static void i2_row4(const uint8_t *wr, uint32_t rb, const int8_t *p, size_t ts, const int32_t *s, int32_t *o) {
    i2_row(wr, rb, p, ts, s, 4, o);
}

BN_AVX2 static void i2_matmul_avx2(int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok,
                                   const uint8_t *w, uint32_t cols, uint32_t r0, uint32_t r1) {
    if (r0 >= r1 || n_tok == 0) return;
    const uint32_t row_bytes = (cols + 3) / 4;
    const size_t tstride = (size_t)(cols + I2_BLOCK - 1) / I2_BLOCK * I2_BLOCK; /* bytes of planes per token */
    const uint32_t chunk = n_tok < I2_TOKEN_CHUNK ? n_tok : I2_TOKEN_CHUNK;
    int8_t *planes = bn_x86_scratch(chunk * tstride + chunk * sizeof(int32_t));
    if (!planes) { /* out of memory: the reference gives the same result */
        bn_kernels_ref.i2_matmul(y, ldy, x, ldx, n_tok, w, cols, r0, r1);
        return;
    }
    int32_t *sums = (int32_t *)(planes + chunk * tstride);
    void (*const row_fn[I2_TOKENS + 1])(const uint8_t *, uint32_t, const int8_t *, size_t, const int32_t *,
                                        int32_t *) = {NULL, i2_row1, i2_row2, i2_row3, i2_row4};

    for (uint32_t t0 = 0; t0 < n_tok; t0 += chunk) {
        const uint32_t nt = n_tok - t0 < chunk ? n_tok - t0 : chunk;
        for (uint32_t t = 0; t < nt; t++) sums[t] = bn_i2_planes_avx2(planes + t * tstride, x + (t0 + t) * ldx, cols, 1);
        for (uint32_t rb = r0; rb < r1; rb += I2_ROW_BLOCK) {
            const uint32_t re = r1 - rb < I2_ROW_BLOCK ? r1 : rb + I2_ROW_BLOCK;
            for (uint32_t tb = 0; tb < nt; tb += I2_TOKENS) {
                const uint32_t k = nt - tb < I2_TOKENS ? nt - tb : I2_TOKENS;
                for (uint32_t r = rb; r < re; r++) {
                    int32_t out[I2_TOKENS];
                    row_fn[k](w + (size_t)r * row_bytes, row_bytes, planes + tb * tstride, tstride, sums + tb, out);
                    for (uint32_t i = 0; i < k; i++) y[(t0 + tb + i) * ldy + r] = out[i];
                }
            }
        }
    }
}

/* kernels_x86.h. Each tile function is called through a pointer, once per tile (not per step). */
void bn_i2_gemm(const bn_i2_tiling *tiling, int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok,
                const uint8_t *w, uint32_t cols, uint32_t r0, uint32_t r1) {
    if (r0 >= r1 || n_tok == 0) return;
    const uint32_t row_bytes = (cols + 3) / 4, block = I2_BLOCK * tiling->interleave;
    const size_t tstride = (size_t)(cols + block - 1) / block * block; /* plane bytes per token */
    const uint32_t chunk = n_tok < I2_TOKEN_CHUNK ? n_tok : I2_TOKEN_CHUNK;
    int8_t *planes = bn_x86_scratch(chunk * tstride + chunk * sizeof(int32_t));
    if (!planes) { /* out of memory: the reference gives the same result */
        bn_kernels_ref.i2_matmul(y, ldy, x, ldx, n_tok, w, cols, r0, r1);
        return;
    }
    int32_t *sums = (int32_t *)(planes + chunk * tstride);
    for (uint32_t t0 = 0; t0 < n_tok; t0 += chunk) {
        const uint32_t nt = n_tok - t0 < chunk ? n_tok - t0 : chunk;
        for (uint32_t t = 0; t < nt; t++)
            sums[t] = bn_i2_planes_avx2(planes + t * tstride, x + (t0 + t) * ldx, cols, tiling->interleave);
        for (uint32_t r = r0; r < r1;) {
            const uint32_t R = r1 - r >= tiling->rows && nt >= I2_MULTI_MIN ? tiling->rows : 1;
            const bn_i2_tile_fn *fn = R == tiling->rows ? tiling->multi : tiling->single;
            for (uint32_t tb = 0; tb < nt; tb += 4) {
                const uint32_t k = nt - tb < 4 ? nt - tb : 4;
                fn[k](w + (size_t)r * row_bytes, row_bytes, planes + tb * tstride, tstride, sums + tb,
                      y + (size_t)(t0 + tb) * ldy + r, ldy);
            }
            r += R;
        }
    }
}

/* ---- TL1 / TL2 ---- */

enum {
    TL_FLUSH = 64,        /* pairs or triples summed in int16 (|sum| <= 64*384 + 256) before widening */
    TL_TOKENS = 4,        /* tokens sharing one weight vector */
    TL_TABLE = 32,        /* bytes of one pair's or triple's table: 16 low bytes, then 16 high bytes */
    TL_TAB_BUDGET = 1 << 20, /* bytes of tables per token chunk */
};
#ifndef TL_PREFETCH
#define TL_PREFETCH 1024 /* bytes ahead in the weight stream */
#endif

/* Stores the 16 int16 entries of e as a table: the 16 low bytes, then the 16 high bytes. */
BN_AVX2 BN_INLINE void tl_store_table(int8_t *dst, __m256i e) {
    const __m256i lo = _mm256_and_si256(e, _mm256_set1_epi16(0xff)), hi = _mm256_srli_epi16(e, 8);
    /* packus: lo 0-7, hi 0-7 | lo 8-15, hi 8-15; the qword permute puts the low bytes first */
    _mm256_store_si256((__m256i *)dst, _mm256_permute4x64_epi64(_mm256_packus_epi16(lo, hi), 0xd8));
}

BN_AVX2 BN_INLINE int16_t tl_x(const int8_t *x, uint32_t cols, uint32_t j) { return j < cols ? x[j] : 0; }

/* TL1 tables of one token: pair p (p < 2*ceil(cols/4)) at dst + 32p, entry k = x0*w0(k) + x1*w1(k). */
BN_AVX2 static void tl1_prep_row(int8_t *dst, const int8_t *x, uint32_t cols) {
    const __m256i w0 = _mm256_setr_epi16(-1, -1, -1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0);
    const __m256i w1 = _mm256_setr_epi16(-1, 0, 1, -1, 0, 1, -1, 0, 1, 0, 0, 0, 0, 0, 0, 0);
    const uint32_t n_pairs = 2 * ((cols + 3) / 4);
    for (uint32_t p = 0; p < n_pairs; p++) {
        const __m256i b0 = _mm256_set1_epi16(tl_x(x, cols, 2 * p)), b1 = _mm256_set1_epi16(tl_x(x, cols, 2 * p + 1));
        tl_store_table(dst + (size_t)TL_TABLE * p, _mm256_add_epi16(_mm256_sign_epi16(b0, w0), _mm256_sign_epi16(b1, w1)));
    }
}

/* TL2 tables of one token: triple k (k < 2*groups) at dst + 32k, then the tail pair's TL1 table. */
BN_AVX2 static void tl2_prep_row(int8_t *dst, const int8_t *x, uint32_t cols) {
    const __m256i w0 = _mm256_setr_epi16(0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0);
    const __m256i w1 = _mm256_setr_epi16(0, 0, 1, 1, 1, -1, -1, -1, 0, 0, 0, 1, 1, 1, 0, 0);
    const __m256i w2 = _mm256_setr_epi16(0, 1, -1, 0, 1, -1, 0, 1, -1, 0, 1, -1, 0, 1, 0, 0);
    const uint32_t n_triples = cols / 3, padded = (n_triples + 1) / 2 * 2;
    for (uint32_t k = 0; k < padded; k++) {
        const uint32_t j = 3 * k;
        const int16_t v0 = k < n_triples ? x[j] : 0, v1 = k < n_triples ? x[j + 1] : 0,
                      v2 = k < n_triples ? x[j + 2] : 0;
        const __m256i e = _mm256_add_epi16(
            _mm256_add_epi16(_mm256_sign_epi16(_mm256_set1_epi16(v0), w0), _mm256_sign_epi16(_mm256_set1_epi16(v1), w1)),
            _mm256_sign_epi16(_mm256_set1_epi16(v2), w2));
        tl_store_table(dst + (size_t)TL_TABLE * k, e);
    }
    if (cols % 3) {
        const __m256i t0 = _mm256_setr_epi16(-1, -1, -1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0);
        const __m256i t1 = _mm256_setr_epi16(-1, 0, 1, -1, 0, 1, -1, 0, 1, 0, 0, 0, 0, 0, 0, 0);
        const __m256i b0 = _mm256_set1_epi16(x[3 * n_triples]), b1 = _mm256_set1_epi16(tl_x(x, cols, 3 * n_triples + 1));
        tl_store_table(dst + (size_t)TL_TABLE * padded,
                       _mm256_add_epi16(_mm256_sign_epi16(b0, t0), _mm256_sign_epi16(b1, t1)));
    }
}

/* Per-token sums of one tile since the last flush (see the top). */
typedef struct {
    __m256i a, b, h;
} tl_acc;

/* Looks up one pair's (triple's) table for the 32 row indices idx, negates where sign (0 / -1 bytes)
 * is set, and adds into acc. */
BN_AVX2 BN_INLINE void tl_lookup(tl_acc *acc, __m256i idx, __m256i sign, int signed_, const int8_t *tab) {
    const __m256i lo_t = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)tab));
    const __m256i hi_t = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(tab + 16)));
    __m256i lo = _mm256_shuffle_epi8(lo_t, idx), hi = _mm256_shuffle_epi8(hi_t, idx);
    if (signed_) {
        lo = _mm256_xor_si256(lo, sign);
        hi = _mm256_xor_si256(hi, sign);
    }
    acc->h = _mm256_add_epi8(acc->h, hi);
    acc->a = _mm256_add_epi16(acc->a, lo);
    acc->b = _mm256_add_epi16(acc->b, _mm256_srli_epi16(lo, 8));
}

/* Adds the int16 sums of acc (+ cnt, the per-row byte counts of negated triples) into the int32
 * accumulators: acc32[0] lane k = row 4k, [1] = 4k+2, [2] = 4k+1, [3] = 4k+3; clears acc. */
BN_AVX2 BN_INLINE void tl_flush(tl_acc *acc, __m256i cnt, __m256i acc32[4]) {
    const __m256i m_hi = _mm256_set1_epi16((short)0xff00), m_lo = _mm256_set1_epi16(0xff);
    __m256i odd = _mm256_add_epi16(acc->b, _mm256_and_si256(acc->h, m_hi));
    __m256i even = _mm256_add_epi16(_mm256_sub_epi16(acc->a, _mm256_slli_epi16(acc->b, 8)), _mm256_slli_epi16(acc->h, 8));
    even = _mm256_add_epi16(even, _mm256_and_si256(cnt, m_lo));
    odd = _mm256_add_epi16(odd, _mm256_srli_epi16(cnt, 8));
    acc32[0] = _mm256_add_epi32(acc32[0], _mm256_srai_epi32(_mm256_slli_epi32(even, 16), 16));
    acc32[1] = _mm256_add_epi32(acc32[1], _mm256_srai_epi32(even, 16));
    acc32[2] = _mm256_add_epi32(acc32[2], _mm256_srai_epi32(_mm256_slli_epi32(odd, 16), 16));
    acc32[3] = _mm256_add_epi32(acc32[3], _mm256_srai_epi32(odd, 16));
    acc->a = acc->b = acc->h = _mm256_setzero_si256();
}

/* out[t*32 + i] = row i of the tile for token t, from the int32 accumulators. */
BN_AVX2 BN_INLINE void tl_store(__m256i acc32[4], int32_t *out) {
    int32_t v[4][8];
    for (int k = 0; k < 4; k++) _mm256_storeu_si256((__m256i *)v[k], acc32[k]);
    for (int k = 0; k < 8; k++) {
        out[4 * k + 0] = v[0][k];
        out[4 * k + 1] = v[2][k];
        out[4 * k + 2] = v[1][k];
        out[4 * k + 3] = v[3][k];
    }
}

/* One TL1 tile (32 rows, `quads` weight vectors) for NT tokens whose tables are tstride bytes apart. */
BN_AVX2 BN_INLINE void tl1_tile(const uint8_t *wt, uint32_t quads, const int8_t *tabs, size_t tstride, int NT,
                                 int32_t *out) {
    const __m256i m0f = _mm256_set1_epi8(15), zero = _mm256_setzero_si256();
    tl_acc acc[TL_TOKENS];
    __m256i acc32[TL_TOKENS][4];
    for (int t = 0; t < NT; t++) {
        acc[t].a = acc[t].b = acc[t].h = zero;
        for (int k = 0; k < 4; k++) acc32[t][k] = zero;
    }
    for (uint32_t q = 0; q < quads;) {
        const uint32_t end = q + TL_FLUSH / 2 < quads ? q + TL_FLUSH / 2 : quads;
        for (; q < end; q++) {
            _mm_prefetch((const char *)(wt + 32 * (size_t)q + TL_PREFETCH), _MM_HINT_T0);
            const __m256i w = _mm256_loadu_si256((const __m256i *)(wt + 32 * (size_t)q));
            const __m256i i0 = _mm256_and_si256(w, m0f), i1 = _mm256_and_si256(_mm256_srli_epi16(w, 4), m0f);
            for (int t = 0; t < NT; t++) {
                const int8_t *tab = tabs + t * tstride + (size_t)2 * TL_TABLE * q;
                tl_lookup(&acc[t], i0, zero, 0, tab);
                tl_lookup(&acc[t], i1, zero, 0, tab + TL_TABLE);
            }
        }
        for (int t = 0; t < NT; t++) tl_flush(&acc[t], zero, acc32[t]);
    }
    for (int t = 0; t < NT; t++) tl_store(acc32[t], out + 32 * t);
}

/* 32 sign bits (bit i: lane i) -> bytes 0 / -1. */
BN_AVX2 BN_INLINE __m256i tl2_signs(const uint8_t *p) {
    const __m256i sel = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3,
                                         3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16,
                                         32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
    int32_t word;
    memcpy(&word, p, 4);
    const __m256i s = _mm256_shuffle_epi8(_mm256_set1_epi32(word), sel);
    return _mm256_cmpeq_epi8(_mm256_and_si256(s, bit), bit);
}

/* One TL2 tile (32 rows, `groups` 40-byte groups, then the tail vector if `tail`). */
BN_AVX2 BN_INLINE void tl2_tile(const uint8_t *wt, uint32_t groups, int tail, const int8_t *tabs, size_t tstride,
                                 int NT, int32_t *out) {
    const __m256i m0f = _mm256_set1_epi8(15), zero = _mm256_setzero_si256();
    tl_acc acc[TL_TOKENS];
    __m256i acc32[TL_TOKENS][4], cnt = zero;
    for (int t = 0; t < NT; t++) {
        acc[t].a = acc[t].b = acc[t].h = zero;
        for (int k = 0; k < 4; k++) acc32[t][k] = zero;
    }
    for (uint32_t g = 0; g < groups;) {
        const uint32_t end = g + TL_FLUSH / 2 < groups ? g + TL_FLUSH / 2 : groups;
        for (; g < end; g++) {
            const uint8_t *p = wt + (size_t)BN_TL2_GROUP_BYTES * g;
            _mm_prefetch((const char *)(p + TL_PREFETCH), _MM_HINT_T0);
            const __m256i w = _mm256_loadu_si256((const __m256i *)p);
            const __m256i i0 = _mm256_and_si256(w, m0f), i1 = _mm256_and_si256(_mm256_srli_epi16(w, 4), m0f);
            const __m256i s0 = tl2_signs(p + 32), s1 = tl2_signs(p + 36);
            cnt = _mm256_sub_epi8(_mm256_sub_epi8(cnt, s0), s1);
            for (int t = 0; t < NT; t++) {
                const int8_t *tab = tabs + t * tstride + (size_t)2 * TL_TABLE * g;
                tl_lookup(&acc[t], i0, s0, 1, tab);
                tl_lookup(&acc[t], i1, s1, 1, tab + TL_TABLE);
            }
        }
        if (g < groups) { /* more to come: widen now (the last flush is after the tail) */
            for (int t = 0; t < NT; t++) tl_flush(&acc[t], cnt, acc32[t]);
            cnt = zero;
        }
    }
    if (tail) {
        const __m256i idx = _mm256_and_si256(
            _mm256_loadu_si256((const __m256i *)(wt + (size_t)BN_TL2_GROUP_BYTES * groups)), m0f);
        for (int t = 0; t < NT; t++)
            tl_lookup(&acc[t], idx, zero, 0, tabs + t * tstride + (size_t)2 * TL_TABLE * groups);
    }
    for (int t = 0; t < NT; t++) {
        tl_flush(&acc[t], cnt, acc32[t]);
        tl_store(acc32[t], out + 32 * t);
    }
}

/* Instances with a constant token count, so that the accumulators live in registers. */
typedef void (*tl_tile_fn)(const uint8_t *wt, uint32_t n, int tail, const int8_t *tabs, size_t tstride, int32_t *out);
#define TL_INSTANCES(NT)                                                                                           \
    BN_AVX2 static void tl1_tile##NT(const uint8_t *wt, uint32_t n, int tail, const int8_t *tabs, size_t ts,      \
                                     int32_t *out) {                                                               \
        (void)tail;                                                                                                \
        tl1_tile(wt, n, tabs, ts, NT, out);                                                                        \
    }                                                                                                              \
    BN_AVX2 static void tl2_tile##NT(const uint8_t *wt, uint32_t n, int tail, const int8_t *tabs, size_t ts,      \
                                     int32_t *out) {                                                               \
        tl2_tile(wt, n, tail, tabs, ts, NT, out);                                                                  \
    }
TL_INSTANCES(1)
TL_INSTANCES(2)
TL_INSTANCES(3)
TL_INSTANCES(4)

BN_AVX2 static void tl_matmul(int enc, int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok,
                              const uint8_t *w, uint32_t cols, uint32_t r0, uint32_t r1) {
    if (r0 >= r1 || n_tok == 0) return;
    const int tl2 = enc == BN_ENC_TL2;
    const size_t tile_bytes = tl2 ? bn_tl2_tile_bytes(cols) : bn_tl1_tile_bytes(cols);
    const uint32_t n = tl2 ? (cols / 3 + 1) / 2 : (cols + 3) / 4; /* weight vectors (groups) per tile */
    const int tail = tl2 && cols % 3;
    const size_t tstride = (size_t)TL_TABLE * (2 * n + (size_t)tail); /* table bytes per token */
    uint32_t chunk = (uint32_t)(TL_TAB_BUDGET / tstride);
    chunk = chunk < TL_TOKENS ? TL_TOKENS : chunk;
    chunk = n_tok < chunk ? n_tok : chunk;
    int8_t *tabs = bn_x86_scratch(chunk * tstride);
    if (!tabs) { /* out of memory: the reference gives the same result */
        bn_kernels_ternary(&bn_kernels_ref, (uint32_t)enc)(y, ldy, x, ldx, n_tok, w, cols, r0, r1);
        return;
    }
    static const tl_tile_fn tl1_fn[TL_TOKENS + 1] = {NULL, tl1_tile1, tl1_tile2, tl1_tile3, tl1_tile4};
    static const tl_tile_fn tl2_fn[TL_TOKENS + 1] = {NULL, tl2_tile1, tl2_tile2, tl2_tile3, tl2_tile4};
    const tl_tile_fn *fn = tl2 ? tl2_fn : tl1_fn;

    for (uint32_t t0 = 0; t0 < n_tok; t0 += chunk) {
        const uint32_t nt = n_tok - t0 < chunk ? n_tok - t0 : chunk;
        for (uint32_t t = 0; t < nt; t++) {
            if (tl2) tl2_prep_row(tabs + t * tstride, x + (t0 + t) * ldx, cols);
            else tl1_prep_row(tabs + t * tstride, x + (t0 + t) * ldx, cols);
        }
        for (uint32_t tile = r0 / BN_TL_TILE; tile <= (r1 - 1) / BN_TL_TILE; tile++) {
            const uint32_t base = tile * BN_TL_TILE;
            const uint32_t lo = r0 > base ? r0 - base : 0, hi = r1 - base < BN_TL_TILE ? r1 - base : BN_TL_TILE;
            const uint8_t *wt = w + (size_t)tile * tile_bytes;
            for (uint32_t tb = 0; tb < nt; tb += TL_TOKENS) {
                const uint32_t k = nt - tb < TL_TOKENS ? nt - tb : TL_TOKENS;
                int32_t out[TL_TOKENS * BN_TL_TILE];
                fn[k](wt, n, tail, tabs + tb * tstride, tstride, out);
                for (uint32_t i = 0; i < k; i++)
                    for (uint32_t l = lo; l < hi; l++) y[(t0 + tb + i) * ldy + base + l] = out[i * BN_TL_TILE + l];
            }
        }
    }
}

BN_AVX2 void bn_tl1_matmul_avx2(int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok,
                                    const uint8_t *w, uint32_t cols, uint32_t r0, uint32_t r1) {
    tl_matmul(BN_ENC_TL1, y, ldy, x, ldx, n_tok, w, cols, r0, r1);
}

BN_AVX2 void bn_tl2_matmul_avx2(int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok,
                                    const uint8_t *w, uint32_t cols, uint32_t r0, uint32_t r1) {
    tl_matmul(BN_ENC_TL2, y, ldy, x, ldx, n_tok, w, cols, r0, r1);
}

/* ---- dense (output head) ---- */

enum {
    DENSE_ROW_BLOCK = 4, /* rows per block; a block's rows are read once for all tokens (they stay in L1) */
    DENSE_TOKENS = 4,    /* tokens per call of dense_rows, at most */
};

/* Columns j .. j+15 of a dense row w (element offset i) as floats: lanes 0-7 in *lo, 8-15 in *hi
 * (BF16: in the order of dense_permute16). */
BN_AVX2 BN_INLINE void dense_load16(int enc, const void *w, size_t i, __m256 *lo, __m256 *hi) {
    if (enc == BN_ENC_F32) {
        *lo = _mm256_loadu_ps((const float *)w + i);
        *hi = _mm256_loadu_ps((const float *)w + i + 8);
        return;
    }
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
    if (enc == BN_ENC_F16) {
        *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
        *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
        return;
    }
    /* BF16: each word into the high half of a dword, zeros below, one unpack per 8 columns (where a
     * widening and a shift take two): *lo gets columns 0-3 and 8-11, *hi 4-7 and 12-15, the
     * order bn_dense_matmul_avx2 puts the activations in (dense_permute16) */
    *lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), h));
    *hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), h));
}

/* The 16 columns of a block in the lane order of a BF16 dense_load16: 0-3, 8-11, 4-7, 12-15. */
static const uint8_t dense_permute16[BN_DENSE_LANES] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};

/* Rows r .. r+R-1 for tokens 0 .. NT-1 of x (rows ldx apart) into y (rows ldy apart); xv: the same
 * activations as the vector loop reads them (BF16: each block of 16 in dense_permute16's order,
 * rows ldxv apart; otherwise x itself). */
BN_AVX2 BN_INLINE void dense_rows(int enc, int R, int NT, float *y, size_t ldy, const float *x, size_t ldx,
                                  const float *xv, size_t ldxv, const void *w, uint32_t cols, uint32_t r) {
    __m256 lo[DENSE_ROW_BLOCK][DENSE_TOKENS], hi[DENSE_ROW_BLOCK][DENSE_TOKENS];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < NT; t++) lo[i][t] = hi[i][t] = _mm256_setzero_ps();
    const uint32_t cols16 = cols / BN_DENSE_LANES * BN_DENSE_LANES;
    const size_t esize = enc == BN_ENC_F32 ? 4 : 2;
    for (uint32_t j = 0; j < cols16; j += BN_DENSE_LANES) {
        if ((j * esize) % 64 == 0) /* a line ahead in each row, once per line */
            for (int i = 0; i < R; i++)
                _mm_prefetch((const char *)w + ((size_t)(r + i) * cols + j) * esize + DENSE_PREFETCH, _MM_HINT_T0);
        for (int i = 0; i < R; i++) {
            __m256 wl, wh;
            dense_load16(enc, w, (size_t)(r + i) * cols + j, &wl, &wh);
            for (int t = 0; t < NT; t++) {
                const float *xt = xv + t * ldxv + j;
                lo[i][t] = _mm256_fmadd_ps(_mm256_loadu_ps(xt), wl, lo[i][t]);
                hi[i][t] = _mm256_fmadd_ps(_mm256_loadu_ps(xt + 8), wh, hi[i][t]);
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < NT; t++) {
            float s[BN_DENSE_LANES], v[BN_DENSE_LANES];
            _mm256_storeu_ps(v, lo[i][t]);
            _mm256_storeu_ps(v + 8, hi[i][t]);
            for (int l = 0; l < BN_DENSE_LANES; l++) s[enc == BN_ENC_BF16 ? dense_permute16[l] : l] = v[l];
            y[t * ldy + r + i] = bn_dense_finish(s, x + t * ldx, (const char *)w + (size_t)(r + i) * cols * esize, enc, cols16, cols);
        }
}

/* dense_rows with constant row and token counts (the accumulators in registers): R * NT * 2 <= 12 of
 * the 16 ymm registers. */
#define DENSE_ROWS_CASE(R, NT) dense_rows(enc, R, NT, y, ldy, x, ldx, xv, ldxv, w, cols, r)

/* Rows [r0, r1) for n_tok tokens: blocks of DENSE_ROW_BLOCK rows, then the last rows one at a time;
 * inside a block, groups of up to DENSE_TOKENS tokens, each with as many rows at once as fit. */
BN_AVX2 BN_INLINE void dense_enc(int enc, float *y0, size_t ldy, const float *x0, size_t ldx, const float *xv0,
                                 size_t ldxv, uint32_t n_tok, const void *w, uint32_t cols, uint32_t r0, uint32_t r1) {
    for (uint32_t rb = r0; rb < r1; rb += DENSE_ROW_BLOCK) {
        const uint32_t n_rows = r1 - rb < DENSE_ROW_BLOCK ? r1 - rb : DENSE_ROW_BLOCK;
        for (uint32_t t0 = 0; t0 < n_tok; t0 += DENSE_TOKENS) {
            const uint32_t nt = n_tok - t0 < DENSE_TOKENS ? n_tok - t0 : DENSE_TOKENS;
            float *y = y0 + t0 * ldy;
            const float *x = x0 + t0 * ldx, *xv = xv0 + t0 * ldxv;
            if (n_rows == DENSE_ROW_BLOCK && nt == 1) {
                const uint32_t r = rb;
                DENSE_ROWS_CASE(4, 1);
                continue;
            }
            const uint32_t step = n_rows % 2 == 0 && nt <= 3 ? 2 : 1;
            for (uint32_t r = rb; r < rb + n_rows; r += step) {
                if (step == 2) {
                    if (nt == 1) DENSE_ROWS_CASE(2, 1);
                    else if (nt == 2) DENSE_ROWS_CASE(2, 2);
                    else DENSE_ROWS_CASE(2, 3);
                } else if (nt == 1) DENSE_ROWS_CASE(1, 1);
                else if (nt == 2) DENSE_ROWS_CASE(1, 2);
                else if (nt == 3) DENSE_ROWS_CASE(1, 3);
                else DENSE_ROWS_CASE(1, 4);
            }
        }
    }
}
#undef DENSE_ROWS_CASE

BN_AVX2 static void dense_f32(float *y, size_t ldy, const float *x, size_t ldx, uint32_t n_tok, const void *w,
                              uint32_t cols, uint32_t r0, uint32_t r1) {
    dense_enc(BN_ENC_F32, y, ldy, x, ldx, x, ldx, n_tok, w, cols, r0, r1);
}
BN_AVX2 static void dense_f16(float *y, size_t ldy, const float *x, size_t ldx, uint32_t n_tok, const void *w,
                              uint32_t cols, uint32_t r0, uint32_t r1) {
    dense_enc(BN_ENC_F16, y, ldy, x, ldx, x, ldx, n_tok, w, cols, r0, r1);
}
/* BF16: the activations' blocks of 16 permuted once per call (dense_permute16), into the thread's
 * scratch, so that each weight vector is widened by unpacking alone. */
BN_AVX2 static void dense_bf16(float *y, size_t ldy, const float *x, size_t ldx, uint32_t n_tok, const void *w,
                               uint32_t cols, uint32_t r0, uint32_t r1) {
    const uint32_t cols16 = cols / BN_DENSE_LANES * BN_DENSE_LANES;
    float *xv = bn_x86_scratch((size_t)n_tok * (cols16 + BN_DENSE_LANES) * sizeof(float));
    if (xv == NULL) { /* out of memory: the reference gives the same result */
        bn_kernels_ref.dense_matmul(y, ldy, x, ldx, n_tok, w, BN_ENC_BF16, cols, r0, r1);
        return;
    }
    for (uint32_t t = 0; t < n_tok; t++)
        for (uint32_t j = 0; j < cols16; j += BN_DENSE_LANES)
            for (int l = 0; l < BN_DENSE_LANES; l++) xv[(size_t)t * cols16 + j + l] = x[t * ldx + j + dense_permute16[l]];
    dense_enc(BN_ENC_BF16, y, ldy, x, ldx, xv, cols16, n_tok, w, cols, r0, r1);
}

BN_AVX2 void bn_dense_matmul_avx2(float *y, size_t ldy, const float *x, size_t ldx, uint32_t n_tok,
                                      const void *w, uint32_t encoding, uint32_t cols, uint32_t r0, uint32_t r1) {
    if (r0 >= r1 || n_tok == 0) return;
    if (encoding == BN_ENC_F32) dense_f32(y, ldy, x, ldx, n_tok, w, cols, r0, r1);
    else if (encoding == BN_ENC_F16) dense_f16(y, ldy, x, ldx, n_tok, w, cols, r0, r1);
    else dense_bf16(y, ldy, x, ldx, n_tok, w, cols, r0, r1);
}

/* ---- Q8_R (8-bit output head) ---- */

#ifndef Q8_ROWS
#define Q8_ROWS 8 /* rows sharing one activation load */
#endif
#ifndef Q8_PREFETCH
#define Q8_PREFETCH 512 /* bytes ahead in each row stream */
#endif

BN_AVX2 BN_INLINE __m256i q8_dot32(__m256i w, __m256i x) {
    const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

BN_AVX2 void bn_q8_matmul_avx2(float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs,
                                   uint32_t n_tok, const int8_t *w, const float *ws, uint32_t cols, uint32_t r0,
                                   uint32_t r1) {
    const uint32_t c32 = cols / 32 * 32;
    uint32_t r = r0;
    for (; r + Q8_ROWS <= r1; r += Q8_ROWS) {
        const int8_t *wr = w + (size_t)r * cols;
        for (uint32_t t = 0; t < n_tok; t++) {
            const int8_t *xt = x + t * ldx;
            __m256i acc[Q8_ROWS];
            for (int i = 0; i < Q8_ROWS; i++) acc[i] = _mm256_setzero_si256();
            for (uint32_t j = 0; j < c32; j += 32) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xt + j));
                if (t == 0 && j % 64 == 0) /* a line ahead in each row stream, once per line */
                    for (int i = 0; i < Q8_ROWS; i++) _mm_prefetch((const char *)(wr + (size_t)i * cols + j) + Q8_PREFETCH, _MM_HINT_T0);
                for (int i = 0; i < Q8_ROWS; i++)
                    acc[i] = _mm256_add_epi32(
                        acc[i], q8_dot32(_mm256_loadu_si256((const __m256i *)(wr + (size_t)i * cols + j)), xv));
            }
            for (int i = 0; i < Q8_ROWS; i++) {
                const int8_t *wi = wr + (size_t)i * cols;
                int32_t d = hsum_epi32(acc[i]);
                for (uint32_t j = c32; j < cols; j++) d += xt[j] * wi[j];
                y[t * ldy + r + i] = ((float)d / xs[t]) * ws[r + i];
            }
        }
    }
    if (r < r1) bn_kernels_ref.q8_matmul(y, ldy, x, ldx, xs, n_tok, w, ws, cols, r, r1);
}

/* ---- Q6_B / Q4_B (6- and 4-bit output heads) ---- */

enum {
    QB_TOKENS = 4,       /* tokens sharing each unpacked pair of blocks */
    QB_CHUNK = 8,        /* groups summed in int32 before widening to int64 */
    QB_TOKEN_CHUNK = 64, /* tokens rearranged per pass (bounds the scratch memory) */
};

/* One token's activations for the pair kernel: per pair p of blocks (64 columns, p < 8 * groups),
 * 64 bytes at 64p: the columns the pair's low nibbles meet (block 2p columns 0-15, block 2p+1 columns
 * 0-15), then those its high nibbles meet (columns 16-31 of each); then the blocks' sums of x, int16
 * [16 * groups]. Zero past cols, so padding columns and blocks add nothing. */
static size_t qb_token_bytes(uint32_t groups) { return (size_t)groups * BN_QB_GROUP * (BN_QB_BLOCK + 2); }

BN_AVX2 static void qb_arrange(int8_t *dst, const int8_t *x, uint32_t cols, uint32_t groups) {
    const uint32_t n_pairs = groups * (BN_QB_GROUP / 2);
    int16_t *sums = (int16_t *)(dst + (size_t)n_pairs * 64);
    for (uint32_t p = 0; p < n_pairs; p++) {
        int8_t pad[64];
        const int8_t *src = pad;
        if (64 * (p + 1) <= cols) {
            src = x + 64 * (size_t)p;
        } else { /* the last columns: a zero-padded copy */
            memset(pad, 0, sizeof pad);
            if (64 * p < cols) memcpy(pad, x + 64 * (size_t)p, cols - 64 * p);
        }
        const __m256i a = _mm256_loadu_si256((const __m256i *)src), b = _mm256_loadu_si256((const __m256i *)(src + 32));
        _mm256_storeu_si256((__m256i *)(dst + 64 * (size_t)p), _mm256_permute2x128_si256(a, b, 0x20));
        _mm256_storeu_si256((__m256i *)(dst + 64 * (size_t)p + 32), _mm256_permute2x128_si256(a, b, 0x31));
        int32_t s0 = 0, s1 = 0;
        for (int k = 0; k < 32; k++) s0 += src[k], s1 += src[32 + k];
        sums[2 * p] = (int16_t)s0, sums[2 * p + 1] = (int16_t)s1;
    }
}

/* The codes of two blocks of a group (nibbles: their 32 nibble bytes, high: their 16 high-bit
 * bytes) as bytes: *lo the columns 0-15 of block 2p (low 128 bits) and of 2p+1 (high 128 bits), *hi
 * their columns 16-31. */
BN_AVX2 BN_INLINE void qb_pair_codes(uint32_t enc, const uint8_t *nibbles, const uint8_t *high, __m256i *lo,
                                     __m256i *hi) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m256i w = _mm256_loadu_si256((const __m256i *)nibbles);
    *lo = _mm256_and_si256(w, m4), *hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
    if (enc == BN_ENC_Q6B) { /* bits 4-5: each block's 8 high-bit bytes in two quadwords, shifted into place */
        const __m256i h = _mm256_permute4x64_epi64(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)high)), 0x50);
        const __m256i m2 = _mm256_set1_epi8(0x30);
        *lo = _mm256_or_si256(*lo, _mm256_and_si256(_mm256_sllv_epi64(h, _mm256_setr_epi64x(4, 2, 4, 2)), m2));
        *hi = _mm256_or_si256(*hi, _mm256_and_si256(_mm256_srlv_epi64(h, _mm256_setr_epi64x(0, 2, 0, 2)), m2));
    }
}

/* sum_k code_k * x_k of the two blocks against one token's arranged pair xp, as 8 int32 lanes per
 * block scaled by `scales` (int16: s[2p] in the low half, s[2p+1] in the high one). Pair sums of
 * maddubs are at most 2 * 63 * 127 (no saturation), the two halves' sum at most 32004 in int16, and
 * madd with scales <= 255 gives lanes <= 2 * 32004 * 255. */
BN_AVX2 BN_INLINE __m256i qb_pair_dot(__m256i lo, __m256i hi, const int8_t *xp, __m256i scales) {
    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xp)),
                                       _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xp + 32))));
    return _mm256_madd_epi16(p, scales);
}

/* The same for a group's last block when it has an odd number, with the 128-bit halves of the steps;
 * returns the unscaled sum. */
BN_AVX2 BN_INLINE int32_t qb_single(uint32_t enc, const uint8_t *nibbles, const uint8_t *high, const int8_t *xp) {
    const __m128i m4 = _mm_set1_epi8(0x0f);
    const __m128i w = _mm_loadu_si128((const __m128i *)nibbles);
    __m128i lo = _mm_and_si128(w, m4), hi = _mm_and_si128(_mm_srli_epi16(w, 4), m4);
    if (enc == BN_ENC_Q6B) {
        const __m128i h8 = _mm_loadl_epi64((const __m128i *)high), h = _mm_unpacklo_epi64(h8, h8);
        const __m128i m2 = _mm_set1_epi8(0x30);
        lo = _mm_or_si128(lo, _mm_and_si128(_mm_sllv_epi64(h, _mm_set_epi64x(2, 4)), m2));
        hi = _mm_or_si128(hi, _mm_and_si128(_mm_srlv_epi64(h, _mm_set_epi64x(2, 0)), m2));
    }
    const __m128i p = _mm_add_epi16(_mm_maddubs_epi16(lo, _mm_loadu_si128((const __m128i *)xp)),
                                    _mm_maddubs_epi16(hi, _mm_loadu_si128((const __m128i *)(xp + 32))));
    __m128i s = _mm_madd_epi16(p, _mm_set1_epi16(1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* dot[t] = dot(row, token t) for NT (1..QB_TOKENS) tokens of a Q6_B / Q4_B row (kernels.h), from the
 * tokens' arranged activations (xp, tstride bytes apart), each pair of blocks unpacked once for all
 * of them: the codes' dot minus the code offset times sum_b s[b] * sum(x of block b), exact in int64. */
BN_AVX2 BN_INLINE void qb_row(uint32_t enc, int NT, const uint8_t *row, uint32_t nb, const int8_t *xp, size_t tstride,
                              uint32_t groups, int64_t *dot) {
    const size_t sums_at = (size_t)groups * BN_QB_GROUP * BN_QB_BLOCK, group_bytes = (size_t)BN_QB_GROUP * bn_qb_block_bytes(enc);
    const int shift = enc == BN_ENC_Q6B ? 5 : 3; /* log2 of the code offset */
    /* pshufb masks: the int16 scale of block 2j (low half) and 2j+1 (high half) of 8 in every lane */
    const __m256i pick[4] = {
        _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3),
        _mm256_setr_epi8(4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7),
        _mm256_setr_epi8(8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10,
                         11, 10, 11, 10, 11),
        _mm256_setr_epi8(12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 14, 15, 14, 15, 14, 15, 14,
                         15, 14, 15, 14, 15, 14, 15, 14, 15),
    };
    __m256i acc64[QB_TOKENS];
    for (int t = 0; t < NT; t++) acc64[t] = _mm256_setzero_si256(), dot[t] = 0;
    for (uint32_t g0 = 0; g0 < groups; g0 += QB_CHUNK) {
        __m256i acc[QB_TOKENS], corr[QB_TOKENS];
        for (int t = 0; t < NT; t++) acc[t] = corr[t] = _mm256_setzero_si256();
        const uint32_t g1 = groups - g0 < QB_CHUNK ? groups : g0 + QB_CHUNK;
        for (uint32_t g = g0; g < g1; g++) {
            const uint8_t *group = row + group_bytes * g;
            const uint32_t n = nb - BN_QB_GROUP * g < BN_QB_GROUP ? nb - BN_QB_GROUP * g : BN_QB_GROUP;
            const uint8_t *nibbles = group + n, *high = group + 17 * n;
            const size_t xg = (size_t)BN_QB_GROUP * BN_QB_BLOCK * g; /* the group's pairs in each token's xp */
            /* the 16 block scales (past n: the group's next bytes, which meet the zero sums of padding blocks) */
            const __m256i sc = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)group));
            for (int t = 0; t < NT; t++) {
                const __m256i sums = _mm256_loadu_si256((const __m256i *)(xp + t * tstride + sums_at) + g);
                corr[t] = _mm256_add_epi32(corr[t], _mm256_madd_epi16(sc, sums));
            }
            const __m256i half[2] = {_mm256_permute2x128_si256(sc, sc, 0x00), _mm256_permute2x128_si256(sc, sc, 0x11)};
            for (uint32_t j = 0; j < n / 2; j++) {
                __m256i lo, hi;
                qb_pair_codes(enc, nibbles + 32 * (size_t)j, high + 16 * (size_t)j, &lo, &hi);
                const __m256i scales = _mm256_shuffle_epi8(half[j / 4], pick[j % 4]);
                for (int t = 0; t < NT; t++)
                    acc[t] = _mm256_add_epi32(acc[t], qb_pair_dot(lo, hi, xp + t * tstride + xg + 64 * (size_t)j, scales));
            }
            if (n % 2)
                for (int t = 0; t < NT; t++)
                    dot[t] += (int64_t)group[n - 1] * qb_single(enc, nibbles + 16 * (size_t)(n - 1),
                                                                high + 8 * (size_t)(n - 1),
                                                                xp + t * tstride + xg + 32 * (size_t)(n - 1));
        }
        /* lanes <= 64 pairs * 2 * 32004 * 255 (codes) + 2^5 * 8 groups * 2 * 255 * 4064 (offset) < 2^31 */
        for (int t = 0; t < NT; t++) {
            const __m256i a = _mm256_sub_epi32(acc[t], _mm256_slli_epi32(corr[t], shift));
            acc64[t] = _mm256_add_epi64(acc64[t], _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(a)),
                                                                   _mm256_cvtepi32_epi64(_mm256_extracti128_si256(a, 1))));
        }
    }
    for (int t = 0; t < NT; t++) dot[t] += hsum_epi64(acc64[t]);
}

BN_AVX2 BN_INLINE void qb_matmul_avx2(uint32_t enc, float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs,
                                      uint32_t n_tok, const uint8_t *w, const float *ws, uint32_t cols, uint32_t r0,
                                      uint32_t r1) {
    if (r0 >= r1 || n_tok == 0) return;
    const uint32_t nb = bn_qb_blocks(cols), groups = (nb + BN_QB_GROUP - 1) / BN_QB_GROUP;
    const size_t row_bytes = bn_qb_row_bytes(enc, cols), tstride = qb_token_bytes(groups);
    const uint32_t chunk = n_tok < QB_TOKEN_CHUNK ? n_tok : QB_TOKEN_CHUNK;
    int8_t *xp = bn_x86_scratch(chunk * tstride);
    if (!xp) { /* out of memory: the reference gives the same result */
        (enc == BN_ENC_Q6B ? bn_kernels_ref.q6_matmul : bn_kernels_ref.q4_matmul)(y, ldy, x, ldx, xs, n_tok, w, ws,
                                                                                  cols, r0, r1);
        return;
    }
    for (uint32_t t0 = 0; t0 < n_tok; t0 += chunk) {
        const uint32_t nt = n_tok - t0 < chunk ? n_tok - t0 : chunk;
        for (uint32_t t = 0; t < nt; t++) qb_arrange(xp + t * tstride, x + (t0 + t) * ldx, cols, groups);
        for (uint32_t r = r0; r < r1; r++) {
            const uint8_t *row = w + (size_t)r * row_bytes;
            for (uint32_t t = 0; t < nt; t += QB_TOKENS) {
                int64_t dot[QB_TOKENS] = {0}; /* qb_row sets the first NT */
                const int8_t *xt = xp + t * tstride;
                switch (nt - t < QB_TOKENS ? nt - t : QB_TOKENS) {
                case 1: qb_row(enc, 1, row, nb, xt, tstride, groups, dot); break;
                case 2: qb_row(enc, 2, row, nb, xt, tstride, groups, dot); break;
                case 3: qb_row(enc, 3, row, nb, xt, tstride, groups, dot); break;
                default: qb_row(enc, 4, row, nb, xt, tstride, groups, dot); break;
                }
                for (uint32_t i = 0; i < QB_TOKENS && t + i < nt; i++)
                    y[(t0 + t + i) * ldy + r] = ((float)dot[i] / xs[t0 + t + i]) * ws[r];
            }
        }
    }
}

BN_AVX2 void bn_q6_matmul_avx2(float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs, uint32_t n_tok,
                               const uint8_t *w, const float *ws, uint32_t cols, uint32_t r0, uint32_t r1) {
    qb_matmul_avx2(BN_ENC_Q6B, y, ldy, x, ldx, xs, n_tok, w, ws, cols, r0, r1);
}

BN_AVX2 void bn_q4_matmul_avx2(float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs, uint32_t n_tok,
                               const uint8_t *w, const float *ws, uint32_t cols, uint32_t r0, uint32_t r1) {
    qb_matmul_avx2(BN_ENC_Q4B, y, ldy, x, ldx, xs, n_tok, w, ws, cols, r0, r1);
}

/* ---- activation quantization and attention (references in ops.h) ----
 * Quantization: max|x| is exact in any order; x * s, round half to even (vroundps, like rintf) and
 * the clamps are per element, so the result is the reference's bit for bit. NaNs: vmaxps returns
 * its second operand when either is NaN, so max(|x|, m) ignores a NaN like fmaxf, and max(v, -128)
 * sends a NaN to -128 like fmaxf(NaN, -128).
 * Attention: the q.k dot products in 8 lanes, reduced in bn_dot8_f32's order; the weighted sum of
 * the values vectorizes over elements, each summed over positions in order, as in the reference. */

BN_AVX2 float bn_quantize_row_avx2(int8_t *q, const float *x, uint32_t n) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmax = _mm256_setzero_ps();
    uint32_t i = 0;
    for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask), vmax);
    float lanes[8], amax = 0.0f;
    _mm256_storeu_ps(lanes, vmax);
    for (int l = 0; l < 8; l++) amax = fmaxf(amax, lanes[l]);
    for (; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
    const float s = 127.0f / fmaxf(amax, 1e-5f);
    const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
    for (i = 0; i + 32 <= n; i += 32) {
        __m256i v[4];
        for (int k = 0; k < 4; k++) {
            __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * k), vs),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            v[k] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
        }
        /* the packs interleave 128-bit lanes: dword k of the result holds v[k % 4][4*(k/4) ..] */
        const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    }
    for (; i < n; i++) q[i] = (int8_t)fminf(fmaxf(rintf(x[i] * s), -128.0f), 127.0f);
    return s;
}

/* ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)), bn_dot8_f32's order. */
BN_AVX2 BN_INLINE float hsum8_ps(__m256 v) {
    const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

/* 8 cache elements from element i of a row, widened to float: f16 (kv_f16, exact) or float. */
BN_AVX2 BN_INLINE __m256 load8_kv(const void *row, uint64_t i, int kv_f16) {
    return kv_f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)))
                  : _mm256_loadu_ps((const float *)row + i);
}

/* One attention head over either cache type, D % 8 == 0 (kv_f16 is a constant at each call). */
BN_AVX2 BN_INLINE void attention_head_avx2(float *out, const float *q, const void *k, const void *v, uint64_t stride,
                                           uint32_t n_pos, uint32_t D, float scale, float *att, int kv_f16) {
    for (uint32_t j = 0; j < n_pos; j++) {
        __m256 acc = _mm256_setzero_ps();
        for (uint32_t i = 0; i < D; i += 8)
            acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(q + i), load8_kv(k, j * stride + i, kv_f16)));
        att[j] = hsum8_ps(acc) * scale;
    }
    const float sum = bn_softmax_numerators(att, n_pos);
    memset(out, 0, D * sizeof *out);
    for (uint32_t j = 0; j < n_pos; j++) {
        const __m256 p = _mm256_set1_ps(att[j] / sum);
        for (uint32_t i = 0; i < D; i += 8)
            _mm256_storeu_ps(out + i,
                             _mm256_add_ps(_mm256_loadu_ps(out + i), _mm256_mul_ps(p, load8_kv(v, j * stride + i, kv_f16))));
    }
}

BN_AVX2 void bn_attention_head_avx2(float *out, const float *q, const float *k, const float *v, uint64_t stride,
                                    uint32_t n_pos, uint32_t D, float scale, float *att) {
    if (D % 8) bn_attention_head(out, q, k, v, stride, n_pos, D, scale, att);
    else attention_head_avx2(out, q, k, v, stride, n_pos, D, scale, att, 0);
}

BN_AVX2 void bn_attention_head_f16_avx2(float *out, const float *q, const uint16_t *k, const uint16_t *v,
                                        uint64_t stride, uint32_t n_pos, uint32_t D, float scale, float *att) {
    if (D % 8) bn_attention_head_f16(out, q, k, v, stride, n_pos, D, scale, att);
    else attention_head_avx2(out, q, k, v, stride, n_pos, D, scale, att, 1);
}

const bn_kernels bn_kernels_avx2 = BN_X86_KERNELS("avx2", i2_matmul_avx2, bn_dense_matmul_avx2, bn_q8_matmul_avx2);

#else
typedef int bn_kernels_avx2_unused; /* not x86-64: nothing to compile (ISO C forbids an empty file) */
#endif
