/* AVX-VNNI variant (Alder Lake and later client CPUs: vpdpbusd on ymm registers, VEX-encoded, without
 * AVX-512): its own I2 GEMM, arch/x86/i2_gemm_ymm.h with vpdpbusd in place of maddubs, and the AVX2
 * kernels otherwise. Handed out by bn_kernels_select() only when the CPU reports AVX-VNNI (cpuid
 * leaf 7 subleaf 1, eax bit 4) and what the AVX2 variant needs.
 *
 * BN_AVXVNNI_EVEX (a test-only build, tests/test_build_flags.py) compiles the same kernel with the
 * EVEX form of the instruction (AVX-512 VNNI + VL), so that it runs, and is checked, on CPUs that
 * have AVX-512 VNNI but not AVX-VNNI; the registry then asks for those features instead. */
#if defined(__x86_64__)

#include <immintrin.h>

#include "arch/x86/kernels_x86.h"
#include "kernels.h"

#ifdef BN_AVXVNNI_EVEX
#define I2Y_TARGET __attribute__((target("avx512f,avx512vl,avx512vnni,avx2,f16c")))
#define I2Y_DPBUSD(a, c, x) _mm256_dpbusd_epi32(a, c, x)
#else
#define I2Y_TARGET __attribute__((target("avxvnni,avx2,f16c")))
#define I2Y_DPBUSD(a, c, x) _mm256_dpbusd_avx_epi32(a, c, x)
#endif
#include "arch/x86/i2_gemm_ymm.h"

const bn_kernels bn_kernels_avxvnni = {
    .name = "avxvnni",
    .i2_matmul = i2y_matmul,
    .tl1_matmul = bn_tl1_matmul_avx2,
    .tl2_matmul = bn_tl2_matmul_avx2,
    .dense_matmul = bn_dense_matmul_avx2,
    .q8_matmul = bn_q8_matmul_avx2,
    .quantize_row = bn_quantize_row_avx2,
    .attention_head = bn_attention_head_avx2,
};

#else
typedef int bn_kernels_avxvnni_unused; /* not x86-64: nothing to compile (ISO C forbids an empty file) */
#endif
