/* Scalar reference operators of the forward pass (float32 numerics of transformers' BitNet). */
#ifndef BN_OPS_H
#define BN_OPS_H

#include <stdint.h>

float bn_fp16_to_f32(uint16_t h);
float bn_bf16_to_f32(uint16_t h);
/* f32 -> f16 rounded to nearest even (overflow to inf, NaN stays a quiet NaN), as the f16 KV cache
 * stores keys and values; F16C's vcvtps2ph with round-to-nearest gives the same bits. */
uint16_t bn_f32_to_fp16(float f);
/* out[n] = row `row` of a [rows][n] F32/F16/BF16 matrix, as float. */
void bn_dense_row_to_f32(float *out, const void *data, uint32_t encoding, uint64_t row, uint32_t n);
/* out[n] = row `row` of a [rows][n] Q8_R, Q6_B or Q4_B matrix (docs/format.md), dequantized:
 * q[row][i] * scale[row] (Q8_R), (float)(q[row][i] * s[row][i / 32]) * scale[row] (Q6_B, Q4_B). */
void bn_quant_row_to_f32(float *out, const void *data, uint32_t encoding, uint64_t rows, uint64_t row, uint32_t n);

/* out[n] = x * (1 / sqrt(mean(x^2) + eps)) * w; out may alias x. */
void bn_rmsnorm(float *out, const float *x, const float *w, uint32_t n, float eps);

/* BitLinear activation quantization of one row: q[n] = clamp(round_half_even(x * s), -128, 127) with
 * s = 127 / max(max|x|, 1e-5) (NaNs ignored by the max); returns s. The reference of the kernels'
 * quantize_row (kernels.h). */
float bn_quantize_row_i8(int8_t *q, const float *x, uint32_t n);

/* A BitLinear output from its exact integer dot product, with s the activation scale of the row and
 * scale the tensor's weight scale, in float32 in transformers' order: dot / s * scale (autobitlinear,
 * and master weights), or dot / (s * scale) when `divides` (bitlinear, whose weight_scale is inverted). */
static inline float bn_bitlinear_output(int32_t dot, float s, float scale, uint32_t divides) {
    return divides ? (float)dot / (s * scale) : ((float)dot / s) * scale;
}
/* The same, clamped to [-127, 127] (the Q8_R head's activations; identical for finite x, where
 * |x * s| <= 127 already, and keeps a NaN row inside the kernel contract). */
float bn_quantize_row_i8_sym(int8_t *q, const float *x, uint32_t n);

/* Rotates each of the n_heads vectors v[h*D .. h*D+D) in place by one position's angles (HF
 * rotate_half: element i pairs with i + D/2); cos_t, sin_t are [D/2]. */
void bn_rope(float *v, uint32_t n_heads, uint32_t D, const float *cos_t, const float *sin_t);

/* sum(a[i] * b[i]) in float, in the order of an 8-lane vector unit, so that vectorized variants
 * agree bit for bit: element i goes to partial sum i % 8 (a multiply, then an add), and the partial
 * sums are combined as ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7)). */
float bn_dot8_f32(const float *a, const float *b, uint32_t n);

/* att[j] = exp(att[j] - max(att)) in place, in order; returns their sum (summed in order): the
 * softmax's numerators and denominator. */
float bn_softmax_numerators(float *att, uint32_t n);

/* One query head attending over n_pos cached positions: out[D] = softmax(q . k_j * scale) . v_j, the
 * dot products by bn_dot8_f32, out accumulated over j in order (per element: a multiply, an add).
 * k, v are [n_pos][stride] (the head's slice starts at k, v); att is [n_pos] scratch. This is the
 * reference of the kernels' attention_head (kernels.h). */
void bn_attention_head(float *out, const float *q, const float *k, const float *v, uint64_t stride,
                       uint32_t n_pos, uint32_t D, float scale, float *att);
/* The same over an f16 cache: every k, v element widened to float (exactly), then the same
 * operations in the same order; the reference of the kernels' attention_head_f16. */
void bn_attention_head_f16(float *out, const float *q, const uint16_t *k, const uint16_t *v, uint64_t stride,
                           uint32_t n_pos, uint32_t D, float scale, float *att);

/* g[n] = relu(g)^2 * u (squared-ReLU gate). */
void bn_relu2_gate(float *restrict g, const float *restrict u, uint32_t n);
/* g[n] = silu(g) * u = g / (1 + exp(-g)) * u (SiLU gate, as torch computes silu in float32). */
void bn_silu_gate(float *restrict g, const float *restrict u, uint32_t n);

#endif
