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

/* The scalar reference; every other variant must agree with it (bit for bit: the float kernels too,
 * as they sum each row in the same order, with separate multiplies and adds). */
extern const bn_kernels bn_kernels_ref;

#if defined(__x86_64__)
/* AVX2 (+F16C) variant, runtime/src/arch/x86/kernels_avx2.c; compiled with target attributes, so the
 * default build stays portable. Call only when bn_cpu_get_features() reports avx2 and f16c. */
extern const bn_kernels bn_kernels_avx2;
#endif

/* The variants usable on this CPU, index 0 the reference, then from slowest to fastest. */
uint32_t bn_kernels_n_available(void);
const bn_kernels *bn_kernels_available(uint32_t i); /* NULL if i is out of range */

/* The kernels the runtime uses on this CPU (the only place where a variant is chosen): the fastest
 * available one, unless the environment variable BITNET_RUN_KERNELS names one (ref, avx2); a name
 * that is unknown or not usable on this CPU gives the reference. */
const bn_kernels *bn_kernels_select(void);

#endif
