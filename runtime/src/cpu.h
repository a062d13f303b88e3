/* CPU feature detection (x86: cpuid + xgetbv, a feature counting only if the OS saves its register
 * state; AArch64: the kernel's HWCAP bits, getauxval(AT_HWCAP)).
 * Used by bn_kernels_select() to pick the kernel variant; nothing else should test CPU features. */
#ifndef BN_CPU_H
#define BN_CPU_H

#include <stdint.h>

typedef struct {
    int sse42;
    int avx;    /* AVX with OS support for the ymm state */
    int avx2;
    int fma;
    int f16c;
    int avx512f; /* with OS support for the zmm/opmask state */
    int avx512bw;
    int avx512vl;
    int avx512vnni;
    int avxvnni; /* AVX-VNNI: vpdpbusd on ymm, VEX-encoded (cpuid leaf 7 subleaf 1, eax bit 4) */
    int asimd;   /* AArch64 Advanced SIMD (NEON) */
    int asimddp; /* AArch64 SDOT/UDOT, the ARMv8.2 dot-product extension */
} bn_cpu_features;

/* Detected once (thread-safe); all zero on other CPUs. */
const bn_cpu_features *bn_cpu_get_features(void);

/* Space-separated names of the detected features, e.g. "sse4.2 avx avx2 fma f16c" ("" if none). */
const char *bn_cpu_features_string(void);

/* The physical cores this process may run on: the distinct (package, core) pairs of the CPUs in
 * its affinity mask (Linux sysfs topology); else those CPUs' count; else the online CPUs. Hyper-
 * threads of one core share its units and its bandwidth, so more threads than cores rarely help. */
uint32_t bn_cpu_n_cores(void);

#endif
