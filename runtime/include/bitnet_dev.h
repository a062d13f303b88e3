/* bitnet-run development API: kernel introspection and timing, and the memory bandwidth probe, for
 * tests and benchmarks. Not needed to run a model (that is bitnet.h); may change between versions. */
#ifndef BITNET_DEV_H
#define BITNET_DEV_H

#include "bitnet.h"

#ifdef __cplusplus
extern "C" {
#endif

/* cffi reads the declarations between the two CDEF markers (no preprocessor lines inside). */
/* CDEF-BEGIN */
/* ---- the file format ---- */
/* Parses and validates the file at `path` as bn_model_load does before it looks at the architecture
 * (header, metadata, tensor table, sizes and bounds; docs/format.md). The same files pass as pass
 * bitnet_run.fileformat.read_header. On failure a one-line message goes into err. */
bn_status bn_file_validate(const char *path, char *err, size_t err_len);
/* Bytes a tensor of encoding `encoding` (bn_encoding) and shape dims[n_dims] takes; 0 for an unknown
 * encoding, a shape the encoding does not allow, or a size past 64 bits. */
uint64_t bn_encoding_nbytes(uint32_t encoding, uint32_t n_dims, const uint64_t *dims);
/* The encoding's name as docs/format.md writes it ("I2"), "unknown" for an unknown id. */
const char *bn_encoding_label(uint32_t encoding);
/* ---- the thread pool ---- */
/* Its self-check: n_runs runs of a pool of n_threads workers, in which worker ith adds 1 to
 * counts[run * n_threads + ith] after a pseudo-random delay (seeded by seed; now and then the caller
 * idles between runs, so that the workers go to sleep). counts must hold n_runs * n_threads zeros;
 * afterwards each entry should be 1. *n_early = how many entries were not yet 1 when the run
 * returned. BN_ERR_ARG for n_threads 0 or over 1024, BN_ERR_NOMEM when the threads cannot start. */
bn_status bn_pool_stress(uint32_t n_threads, uint32_t n_runs, uint64_t seed, uint32_t *counts, uint32_t *n_early);
/* ---- memory bandwidth probe ---- */
/* Best read bandwidth in GB/s (1e9 bytes/s) over `repeats` timed passes (0 counts as 1) of n_threads
 * threads (0: bn_default_n_threads()) summing a freshly allocated buffer of `bytes` bytes, each thread its
 * contiguous share. Make `bytes` much larger than the last-level cache (e.g. 512 MiB). Returns -1 when
 * the buffer or the threads cannot be allocated and -2 for bad arguments (too few bytes for the
 * threads, more than 1024 threads); never prints. */
double bn_membw_read_gbps(uint64_t bytes, uint32_t n_threads, uint32_t repeats);
/* ---- kernels (introspection, for tests and benchmarks) ---- */
/* The weight-kernel variants usable on this CPU: index 0 is the scalar reference ("ref"), then from
 * slowest to fastest (e.g. "avx2"). Every variant gives bit-identical results to the reference. */
uint32_t bn_kernels_count(void);
/* A variant's name, NULL if variant >= bn_kernels_count(). */
const char *bn_kernels_name(uint32_t variant);
/* The index of the variant a new context would use now (honours BITNET_RUN_KERNELS=ref|avx2|avxvnni|avx512vnni
 * on x86-64, ref|neon|neon-dotprod on AArch64). */
uint32_t bn_kernels_selected(void);
/* The CPU features detected, space-separated (e.g. "sse4.2 avx avx2 fma f16c"). */
const char *bn_kernels_cpu_features(void);

/* y[t][r] = sum_j x[t][j] * w[r][j] exactly, for t < n_tok, r < rows: x int8 [n_tok][cols], w I2
 * rows of ceil(cols/4) bytes (docs/format.md; code 3 counts as 0), y int32 [n_tok][rows]. Rows are
 * split over n_threads threads (0 or 1: the calling thread). BN_ERR_ARG for a bad variant. */
bn_status bn_kernels_i2_matmul(uint32_t variant, uint32_t n_threads, int32_t *y, const int8_t *x, uint32_t n_tok,
                               const uint8_t *w, uint32_t rows, uint32_t cols);
/* The same for any ternary encoding: 3 (I2, as above), 4 (TL1) or 5 (TL2), w holding the whole
 * [rows][cols] matrix in that encoding's layout (docs/format.md; invalid indices count as 0).
 * BN_ERR_ARG for a bad variant or encoding. */
bn_status bn_kernels_ternary_matmul(uint32_t variant, uint32_t encoding, uint32_t n_threads, int32_t *y,
                                    const int8_t *x, uint32_t n_tok, const uint8_t *w, uint32_t rows, uint32_t cols);
/* The same in float for a dense [rows][cols] matrix w of encoding 0 (F32), 1 (F16) or 2 (BF16). */
bn_status bn_kernels_dense_matmul(uint32_t variant, uint32_t n_threads, float *y, const float *x, uint32_t n_tok,
                                  const void *w, uint32_t encoding, uint32_t rows, uint32_t cols);
/* The 8-bit output head: y[t][r] = ((float)dot / xs[t]) * scale[r], dot = sum_j x[t][j] * q[r][j]
 * exactly in int32, for t < n_tok, r < rows: x int8 [n_tok][cols] in [-127, 127] (-128 gives
 * BN_ERR_ARG), xs float [n_tok] the activations' scales, w the whole [rows][cols] Q8_R tensor
 * (encoding 6, docs/format.md: rows f32 scales, then rows x cols int8), y float [n_tok][rows].
 * BN_ERR_ARG for a bad variant. */
bn_status bn_kernels_q8_matmul(uint32_t variant, uint32_t n_threads, float *y, const int8_t *x, const float *xs,
                               uint32_t n_tok, const uint8_t *w, uint32_t rows, uint32_t cols);
/* The same for any integer head encoding: 6 (Q8_R, as above), 7 (Q6_B) or 8 (Q4_B), w the whole
 * [rows][cols] tensor in that encoding (docs/format.md: rows f32 row scales, then the rows), where
 * dot = sum over the row's blocks of (block scale) * (the block's exact integer dot). BN_ERR_ARG for
 * a bad variant or encoding, or an activation -128. */
bn_status bn_kernels_quant_matmul(uint32_t variant, uint32_t encoding, uint32_t n_threads, float *y, const int8_t *x,
                                  const float *xs, uint32_t n_tok, const uint8_t *w, uint32_t rows, uint32_t cols);
/* BitLinear activation quantization of n_rows rows x [n_rows][cols] into q int8 [n_rows][cols] and
 * the scales s [n_rows] (s = 127 / max(max|x|, 1e-5), q = clamp(round_half_even(x * s), -128, 127)).
 * BN_ERR_ARG for a bad variant. */
bn_status bn_kernels_quantize_rows(uint32_t variant, int8_t *q, float *s, const float *x, uint32_t n_rows,
                                   uint32_t cols);
/* One attention head: out[D] = softmax(q . k_j * scale) . v_j over j < n_pos, with k and v
 * [n_pos][stride] floats (the head's D values first in each row, stride >= D). BN_ERR_ARG for a bad
 * variant or stride < D; BN_ERR_NOMEM when no scratch can be allocated. */
bn_status bn_kernels_attention_head(uint32_t variant, float *out, const float *q, const float *k, const float *v,
                                    uint64_t stride, uint32_t n_pos, uint32_t D, float scale);
/* The same with k and v rounded to f16 (to nearest even, as the f16 KV cache stores them), then the
 * variant's f16 attention kernel: bit-identical to bn_kernels_attention_head on the rounded values. */
bn_status bn_kernels_attention_head_f16(uint32_t variant, float *out, const float *q, const float *k, const float *v,
                                        uint64_t stride, uint32_t n_pos, uint32_t D, float scale);
/* Times `repeats` calls (after one warm-up) of a variant's kernel on random data of that shape:
 * encoding 3/4/5 (I2/TL1/TL2) for the ternary kernels, 0/1/2 for the dense one, 6/7/8 (Q8_R/Q6_B/Q4_B)
 * for the integer heads'; n_threads threads split the rows.
 * Cycles through enough weight copies to read at least min_weight_bytes (0: one copy, cache-warm).
 * seconds[repeats] receives each call's wall time. */
bn_status bn_kernels_time(uint32_t variant, uint32_t encoding, uint32_t n_threads, uint32_t n_tok, uint32_t rows,
                          uint32_t cols, uint32_t repeats, uint64_t min_weight_bytes, double *seconds);
/* CDEF-END */

#ifdef __cplusplus
}
#endif

#endif /* BITNET_DEV_H */
