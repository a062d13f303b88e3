#include "kernels.h"

#include <stdlib.h>
#include <string.h>

#include "cpu.h"

#include "model_file.h"
#include "ops.h"

/* I2 code -> weight; code 3 is invalid in the format and counts as 0 rather than trusting the file. */
static const int8_t i2_value[4] = {-1, 0, 1, 0};

static void i2_matmul_ref(int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok, const uint8_t *w,
                          uint32_t cols, uint32_t r0, uint32_t r1) {
    const uint32_t row_bytes = (cols + 3) / 4;
    const uint32_t full = cols / 4; /* bytes whose 4 codes are all inside the row */
    for (uint32_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + (size_t)r * row_bytes;
        for (uint32_t t = 0; t < n_tok; t++) {
            const int8_t *xt = x + t * ldx;
            int32_t acc = 0;
            for (uint32_t b = 0; b < full; b++) {
                uint8_t c = wr[b];
                const int8_t *xb = xt + 4 * b;
                acc += xb[0] * i2_value[c & 3] + xb[1] * i2_value[(c >> 2) & 3] + xb[2] * i2_value[(c >> 4) & 3] +
                       xb[3] * i2_value[c >> 6];
            }
            for (uint32_t j = 4 * full; j < cols; j++) acc += xt[j] * i2_value[(wr[j / 4] >> (2 * (j % 4))) & 3];
            y[t * ldy + r] = acc;
        }
    }
}

/* TL1 index -> (w0, w1); 9..15 are invalid and count as 0. */
static const int8_t tl1_w0[16] = {-1, -1, -1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0};
static const int8_t tl1_w1[16] = {-1, 0, 1, -1, 0, 1, -1, 0, 1, 0, 0, 0, 0, 0, 0, 0};

/* TL1 pair p of a row (its weights 2p and 2p+1, the second absent when 2p+1 == cols). */
static int32_t tl1_pair(const int8_t *xt, uint32_t cols, uint32_t p, unsigned idx) {
    int32_t v = xt[2 * p] * tl1_w0[idx];
    if (2 * p + 1 < cols) v += xt[2 * p + 1] * tl1_w1[idx];
    return v;
}

static void tl1_matmul_ref(int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok, const uint8_t *w,
                           uint32_t cols, uint32_t r0, uint32_t r1) {
    const size_t tile_bytes = bn_tl1_tile_bytes(cols);
    const uint32_t n_pairs = (cols + 1) / 2;
    for (uint32_t r = r0; r < r1; r++) {
        const uint8_t *wl = w + (size_t)(r / BN_TL_TILE) * tile_bytes + r % BN_TL_TILE; /* lane of row r */
        for (uint32_t t = 0; t < n_tok; t++) {
            const int8_t *xt = x + t * ldx;
            int32_t acc = 0;
            for (uint32_t p = 0; p < n_pairs; p++) {
                const uint8_t b = wl[(size_t)BN_TL_TILE * (p / 2)];
                acc += tl1_pair(xt, cols, p, p % 2 ? b >> 4 : b & 15);
            }
            y[t * ldy + r] = acc;
        }
    }
}

/* TL2 |v| index -> (w0, w1, w2) with 9*w0 + 3*w1 + w2 = index (balanced ternary); 14, 15 count as 0. */
static const int8_t tl2_w[16][3] = {{0, 0, 0},  {0, 0, 1},  {0, 1, -1}, {0, 1, 0},  {0, 1, 1}, {1, -1, -1},
                                    {1, -1, 0}, {1, -1, 1}, {1, 0, -1}, {1, 0, 0},  {1, 0, 1}, {1, 1, -1},
                                    {1, 1, 0},  {1, 1, 1},  {0, 0, 0},  {0, 0, 0}};

static void tl2_matmul_ref(int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok, const uint8_t *w,
                           uint32_t cols, uint32_t r0, uint32_t r1) {
    const size_t tile_bytes = bn_tl2_tile_bytes(cols);
    const uint32_t n_triples = cols / 3, groups = (n_triples + 1) / 2;
    for (uint32_t r = r0; r < r1; r++) {
        const uint32_t lane = r % BN_TL_TILE;
        const uint8_t *wt = w + (size_t)(r / BN_TL_TILE) * tile_bytes;
        for (uint32_t t = 0; t < n_tok; t++) {
            const int8_t *xt = x + t * ldx;
            int32_t acc = 0;
            for (uint32_t k = 0; k < n_triples; k++) {
                const uint8_t *g = wt + (size_t)BN_TL2_GROUP_BYTES * (k / 2);
                const unsigned idx = k % 2 ? g[lane] >> 4 : g[lane] & 15;
                const uint8_t *sw = g + BN_TL_TILE + 4 * (k % 2); /* u32 little-endian sign word */
                const int negative = (sw[lane / 8] >> (lane % 8)) & 1;
                const int8_t *xk = xt + 3 * k;
                const int32_t v = xk[0] * tl2_w[idx][0] + xk[1] * tl2_w[idx][1] + xk[2] * tl2_w[idx][2];
                acc += negative ? -v : v;
            }
            if (cols % 3) { /* the tail: one TL1 pair over the last 1 or 2 columns */
                const unsigned idx = wt[(size_t)BN_TL2_GROUP_BYTES * groups + lane] & 15;
                acc += xt[3 * n_triples] * tl1_w0[idx];
                if (cols % 3 == 2) acc += xt[3 * n_triples + 1] * tl1_w1[idx];
            }
            y[t * ldy + r] = acc;
        }
    }
}

/* dot(x, w) in the order of kernels.h (BN_DENSE_LANES lane sums, then folded). */
static float dense_dot_ref(uint32_t encoding, const float *x, const void *w, uint32_t n) {
    float s[BN_DENSE_LANES] = {0};
    return bn_dense_finish(s, x, w, encoding, 0, n);
}

static void dense_matmul_ref(float *y, size_t ldy, const float *x, size_t ldx, uint32_t n_tok, const void *w,
                             uint32_t encoding, uint32_t cols, uint32_t r0, uint32_t r1) {
    const size_t esize = encoding == BN_ENC_F32 ? 4 : 2;
    for (uint32_t r = r0; r < r1; r++)
        for (uint32_t t = 0; t < n_tok; t++)
            y[t * ldy + r] = dense_dot_ref(encoding, x + t * ldx, (const char *)w + (size_t)r * cols * esize, cols);
}

static void q8_matmul_ref(float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs, uint32_t n_tok,
                          const int8_t *w, const float *ws, uint32_t cols, uint32_t r0, uint32_t r1) {
    for (uint32_t r = r0; r < r1; r++) {
        const int8_t *wr = w + (size_t)r * cols;
        for (uint32_t t = 0; t < n_tok; t++) {
            const int8_t *xt = x + t * ldx;
            int32_t acc = 0;
            for (uint32_t j = 0; j < cols; j++) acc += xt[j] * wr[j];
            y[t * ldy + r] = ((float)acc / xs[t]) * ws[r];
        }
    }
}

/* Q6_B / Q4_B: each block's dot exactly in int32 (|dot| <= 32 * 127 * 32), scaled by its block scale
 * and summed in int64 (the row's sum may pass 2^31 for long rows). */
static void qb_matmul_ref(uint32_t encoding, float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs,
                          uint32_t n_tok, const uint8_t *w, const float *ws, uint32_t cols, uint32_t r0, uint32_t r1) {
    const uint32_t nb = bn_qb_blocks(cols);
    const size_t row_bytes = bn_qb_row_bytes(encoding, cols);
    for (uint32_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + (size_t)r * row_bytes;
        for (uint32_t t = 0; t < n_tok; t++) {
            const int8_t *xt = x + t * ldx;
            int64_t acc = 0;
            for (uint32_t b = 0; b < nb; b++) {
                const uint32_t n = cols - BN_QB_BLOCK * b < BN_QB_BLOCK ? cols - BN_QB_BLOCK * b : BN_QB_BLOCK;
                int32_t dot = 0;
                for (uint32_t k = 0; k < n; k++) dot += xt[BN_QB_BLOCK * b + k] * bn_qb_weight(encoding, wr, nb, b, k);
                acc += (int64_t)bn_qb_block_scale(encoding, wr, b) * dot;
            }
            y[t * ldy + r] = ((float)acc / xs[t]) * ws[r];
        }
    }
}

static void q6_matmul_ref(float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs, uint32_t n_tok,
                          const uint8_t *w, const float *ws, uint32_t cols, uint32_t r0, uint32_t r1) {
    qb_matmul_ref(BN_ENC_Q6B, y, ldy, x, ldx, xs, n_tok, w, ws, cols, r0, r1);
}

static void q4_matmul_ref(float *y, size_t ldy, const int8_t *x, size_t ldx, const float *xs, uint32_t n_tok,
                          const uint8_t *w, const float *ws, uint32_t cols, uint32_t r0, uint32_t r1) {
    qb_matmul_ref(BN_ENC_Q4B, y, ldy, x, ldx, xs, n_tok, w, ws, cols, r0, r1);
}

const bn_kernels bn_kernels_ref = {
    .name = "ref",
    .i2_matmul = i2_matmul_ref,
    .tl1_matmul = tl1_matmul_ref,
    .tl2_matmul = tl2_matmul_ref,
    .dense_matmul = dense_matmul_ref,
    .q8_matmul = q8_matmul_ref,
    .q6_matmul = q6_matmul_ref,
    .q4_matmul = q4_matmul_ref,
    .quantize_row = bn_quantize_row_i8,
    .attention_head = bn_attention_head,
    .attention_head_f16 = bn_attention_head_f16,
};

/* ---- selection: the one place where CPU features pick a variant ---- */

static int usable_always(const bn_cpu_features *f) {
    (void)f;
    return 1;
}

#if defined(__x86_64__)
static int usable_avx2(const bn_cpu_features *f) { return f->avx2 && f->f16c && f->fma; }
static int usable_avx512vnni(const bn_cpu_features *f) { return usable_avx2(f) && f->avx512bw && f->avx512vnni; }
#ifdef BN_AVXVNNI_EVEX /* the test-only build of kernels_avxvnni.c */
static int usable_avxvnni(const bn_cpu_features *f) { return usable_avx2(f) && f->avx512vnni && f->avx512vl; }
#else
static int usable_avxvnni(const bn_cpu_features *f) { return usable_avx2(f) && f->avxvnni; }
#endif
#endif
#if defined(__aarch64__)
static int usable_neon(const bn_cpu_features *f) { return f->asimd; }
static int usable_neon_dotprod(const bn_cpu_features *f) { return f->asimd && f->asimddp; }
#endif

static const struct {
    const bn_kernels *kernels;
    int (*usable)(const bn_cpu_features *);
} registry[] = {
    {&bn_kernels_ref, usable_always},
#if defined(__x86_64__)
    {&bn_kernels_avx2, usable_avx2},
    {&bn_kernels_avxvnni, usable_avxvnni},
    {&bn_kernels_avx512vnni, usable_avx512vnni},
#endif
#if defined(__aarch64__)
    {&bn_kernels_neon, usable_neon},
    {&bn_kernels_neon_dotprod, usable_neon_dotprod},
#endif
};

#define N_REGISTRY (sizeof registry / sizeof registry[0])

/* Whether a variant sets every entry of the table. One left NULL (an entry added to bn_kernels that
 * an ISA file does not set yet) would crash the first call, so such a variant is never handed out;
 * the tests that compare the variants offered with the CPU's features then fail. The assertion
 * fails the build when bn_kernels gains an entry that is not checked here. */
_Static_assert(sizeof(bn_kernels) == sizeof(const char *) + 10 * sizeof(void (*)(void)),
               "kernels_complete() must check every entry of bn_kernels");
static int kernels_complete(const bn_kernels *k) {
    return k->name && k->i2_matmul && k->tl1_matmul && k->tl2_matmul && k->dense_matmul && k->q8_matmul &&
           k->q6_matmul && k->q4_matmul && k->quantize_row && k->attention_head && k->attention_head_f16;
}

static int offered(size_t i, const bn_cpu_features *f) {
    return registry[i].usable(f) && kernels_complete(registry[i].kernels);
}

uint32_t bn_kernels_n_available(void) {
    const bn_cpu_features *f = bn_cpu_get_features();
    uint32_t n = 0;
    for (size_t i = 0; i < N_REGISTRY; i++) n += offered(i, f) ? 1 : 0;
    return n;
}

const bn_kernels *bn_kernels_available(uint32_t i) {
    const bn_cpu_features *f = bn_cpu_get_features();
    for (size_t k = 0; k < N_REGISTRY; k++) {
        if (!offered(k, f)) continue;
        if (i-- == 0) return registry[k].kernels;
    }
    return NULL;
}

const bn_kernels *bn_kernels_select(void) {
    const uint32_t n = bn_kernels_n_available();
    const char *want = getenv("BITNET_RUN_KERNELS");
    if (want && want[0]) {
        for (uint32_t i = 0; i < n; i++) {
            const bn_kernels *k = bn_kernels_available(i);
            if (strcmp(k->name, want) == 0) return k;
        }
        return &bn_kernels_ref; /* unknown, or not usable on this CPU */
    }
    return bn_kernels_available(n - 1);
}
