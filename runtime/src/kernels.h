/* Weight kernels behind one dispatch table, so that faster variants (TL1/TL2, AVX2...) can sit
 * beside the scalar reference and be compared to it. Each call computes output rows [r0, r1) for all
 * n_tok tokens, so that a thread pool can split the rows. */
#ifndef BN_KERNELS_H
#define BN_KERNELS_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const char *name;
    /* Ternary matmul: y[t*ldy + r] = sum_j x[t*ldx + j] * w[r][j] exactly in int32, for t < n_tok,
     * r0 <= r < r1. x: int8 activations [n_tok][cols]; w: I2 weights, [rows][ceil(cols/4)] bytes
     * (code 3 counts as 0). */
    void (*i2_matmul)(int32_t *y, size_t ldy, const int8_t *x, size_t ldx, uint32_t n_tok, const uint8_t *w,
                      uint32_t cols, uint32_t r0, uint32_t r1);
    /* Float matmul: y[t*ldy + r] = sum_j x[t*ldx + j] * w[r][j] in float, w a [rows][cols] F32/F16/BF16
     * matrix (the output head). */
    void (*dense_matmul)(float *y, size_t ldy, const float *x, size_t ldx, uint32_t n_tok, const void *w,
                         uint32_t encoding, uint32_t cols, uint32_t r0, uint32_t r1);
} bn_kernels;

/* The scalar reference; every other variant must agree with it. */
extern const bn_kernels bn_kernels_ref;

/* The kernels the runtime uses on this CPU (the only place where a variant is chosen). */
const bn_kernels *bn_kernels_select(void);

#endif
