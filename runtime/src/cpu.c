#include "cpu.h"

#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <unistd.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static void detect(bn_cpu_features *f) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return;
    f->sse42 = (c >> 20) & 1;
    const int osxsave = (c >> 27) & 1, has_avx = (c >> 28) & 1;
    const int has_fma = (c >> 12) & 1, has_f16c = (c >> 29) & 1;
    uint64_t xcr0 = osxsave ? xgetbv0() : 0;
    const int ymm_ok = (xcr0 & 0x6) == 0x6;     /* xmm + ymm state */
    const int zmm_ok = (xcr0 & 0xe6) == 0xe6;   /* + opmask, zmm hi256, hi16 zmm */
    f->avx = has_avx && ymm_ok;
    f->fma = f->avx && has_fma;
    f->f16c = f->avx && has_f16c;
    unsigned max_leaf = __get_cpuid_max(0, 0);
    if (max_leaf >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        f->avx2 = f->avx && ((b >> 5) & 1);
        f->avx512f = zmm_ok && ((b >> 16) & 1);
        f->avx512bw = f->avx512f && ((b >> 30) & 1);
        f->avx512vl = f->avx512f && ((b >> 31) & 1);
        f->avx512vnni = f->avx512f && ((c >> 11) & 1);
        unsigned sub_max = a;
        if (sub_max >= 1) {
            __cpuid_count(7, 1, a, b, c, d);
            f->avxvnni = f->avx2 && ((a >> 4) & 1);
        }
    }
}
#elif defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1 << 1) /* Linux arch/arm64 uapi hwcap.h, for C libraries that lack the names */
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif

static void detect(bn_cpu_features *f) {
    const unsigned long hwcap = getauxval(AT_HWCAP);
    f->asimd = (hwcap & HWCAP_ASIMD) != 0;
    f->asimddp = f->asimd && (hwcap & HWCAP_ASIMDDP) != 0;
}
#elif defined(__aarch64__)
/* Advanced SIMD is part of every AArch64 ABI; without Linux's HWCAP the dot-product extension
 * counts as absent. */
static void detect(bn_cpu_features *f) { f->asimd = 1; }
#else
static void detect(bn_cpu_features *f) { (void)f; }
#endif

static bn_cpu_features features;
static char features_str[128];
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void init(void) {
    detect(&features);
    static const struct {
        const char *name;
        size_t off;
    } names[] = {
        {"sse4.2", offsetof(bn_cpu_features, sse42)},   {"avx", offsetof(bn_cpu_features, avx)},
        {"avx2", offsetof(bn_cpu_features, avx2)},      {"fma", offsetof(bn_cpu_features, fma)},
        {"f16c", offsetof(bn_cpu_features, f16c)},      {"avx512f", offsetof(bn_cpu_features, avx512f)},
        {"avx512bw", offsetof(bn_cpu_features, avx512bw)},
        {"avx512vl", offsetof(bn_cpu_features, avx512vl)}, {"avx512vnni", offsetof(bn_cpu_features, avx512vnni)},
        {"avxvnni", offsetof(bn_cpu_features, avxvnni)},
        {"asimd", offsetof(bn_cpu_features, asimd)},     {"asimddp", offsetof(bn_cpu_features, asimddp)},
    };
    features_str[0] = '\0';
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        int on;
        memcpy(&on, (const char *)&features + names[i].off, sizeof on);
        if (!on) continue;
        if (features_str[0]) strcat(features_str, " ");
        strcat(features_str, names[i].name);
    }
}

const bn_cpu_features *bn_cpu_get_features(void) {
    pthread_once(&once, init);
    return &features;
}

const char *bn_cpu_features_string(void) {
    pthread_once(&once, init);
    return features_str;
}

/* ---- physical cores ---- */

/* One integer from a sysfs file of CPU `cpu`'s topology, or -1. */
static long topology_value(int cpu, const char *name) {
    char path[96];
    snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/%s", cpu, name);
    FILE *f = fopen(path, "r");
    if (f == NULL) return -1;
    long v = -1;
    if (fscanf(f, "%ld", &v) != 1) v = -1;
    fclose(f);
    return v;
}

static uint32_t n_cores;

static void count_cores(void) {
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    n_cores = online > 0 ? (uint32_t)online : 1;
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return;
    n_cores = (uint32_t)CPU_COUNT(&set); /* the CPUs we may run on, if the topology is unreadable */
    long seen[CPU_SETSIZE][2];             /* (package, core) of each distinct core found */
    uint32_t n = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
        if (!CPU_ISSET(cpu, &set)) continue;
        const long pkg = topology_value(cpu, "physical_package_id"), core = topology_value(cpu, "core_id");
        if (pkg < 0 || core < 0) return;
        uint32_t i = 0;
        while (i < n && !(seen[i][0] == pkg && seen[i][1] == core)) i++;
        if (i == n) seen[n][0] = pkg, seen[n][1] = core, n++;
    }
    if (n > 0) n_cores = n;
#endif
}

uint32_t bn_cpu_n_cores(void) {
    static pthread_once_t cores_once = PTHREAD_ONCE_INIT;
    pthread_once(&cores_once, count_cores);
    return n_cores;
}
