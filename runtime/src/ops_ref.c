/* Scalar reference operators. Each follows the float32 order of operations of transformers'
 * BitNetForCausalLM so that results match it to rounding (docs/format.md, "Numerics"). */
#include "ops.h"

#include <math.h>
#include <string.h>

#include "kernels.h"
#include "model_file.h"

static float f32_from_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

float bn_fp16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000u | (man << 13)); /* inf, nan */
    if (exp != 0) return f32_from_bits(sign | ((exp + 127 - 15) << 23) | (man << 13));
    float sub = (float)man * 0x1p-24f; /* zero or subnormal: man * 2^-24, exact in float */
    return sign ? -sub : sub;
}

float bn_bf16_to_f32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

uint16_t bn_f32_to_fp16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    const uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    const uint32_t abs = bits & 0x7fffffffu;
    if (abs > 0x7f800000u) return sign | 0x7e00u | (uint16_t)((abs >> 13) & 0x3ffu); /* NaN, made quiet */
    if (abs >= 0x477ff000u) return sign | 0x7c00u; /* >= 65520 (halfway past 65504, the largest f16): inf */
    if (abs < 0x38800000u) /* below 2^-14: an f16 subnormal, man * 2^-24; the scaling is exact */
        return sign | (uint16_t)rintf(f32_from_bits(abs) * 0x1p24f);
    /* normal: rebias the exponent (127 - 15), round the 13 dropped mantissa bits half to even (a
     * carry into the exponent is the right result) */
    return sign | (uint16_t)((abs + 0xfffu + ((abs >> 13) & 1u) - 0x38000000u) >> 13);
}

void bn_dense_row_to_f32(float *out, const void *data, uint32_t encoding, uint64_t row, uint32_t n) {
    if (encoding == BN_ENC_F32) {
        memcpy(out, (const float *)data + row * n, n * sizeof *out);
        return;
    }
    const uint16_t *src = (const uint16_t *)data + row * n;
    for (uint32_t i = 0; i < n; i++) out[i] = encoding == BN_ENC_F16 ? bn_fp16_to_f32(src[i]) : bn_bf16_to_f32(src[i]);
}

void bn_quant_row_to_f32(float *out, const void *data, uint32_t encoding, uint64_t rows, uint64_t row, uint32_t n) {
    float scale;
    memcpy(&scale, (const uint8_t *)data + 4 * row, sizeof scale);
    if (encoding == BN_ENC_Q8R) {
        const int8_t *q = (const int8_t *)data + 4 * rows + row * n;
        for (uint32_t i = 0; i < n; i++) out[i] = (float)q[i] * scale;
        return;
    }
    const uint32_t nb = bn_qb_blocks(n);
    const uint8_t *r = (const uint8_t *)data + 4 * rows + row * bn_qb_row_bytes(encoding, n);
    for (uint32_t i = 0; i < n; i++)
        out[i] = (float)(bn_qb_weight(encoding, r, nb, i / BN_QB_BLOCK, i % BN_QB_BLOCK) *
                         (int32_t)bn_qb_block_scale(encoding, r, i / BN_QB_BLOCK)) * scale;
}

void bn_rmsnorm(float *out, const float *x, const float *w, uint32_t n, float eps) {
    /* Squares rounded to float like torch's pow(2); the sum in double only removes summation error. */
    double ss = 0.0;
    for (uint32_t i = 0; i < n; i++) ss += (double)(x[i] * x[i]);
    float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (uint32_t i = 0; i < n; i++) out[i] = (x[i] * r) * w[i];
}

float bn_quantize_row_i8(int8_t *q, const float *x, uint32_t n) {
    float amax = 0.0f;
    for (uint32_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
    float s = 127.0f / fmaxf(amax, 1e-5f);
    for (uint32_t i = 0; i < n; i++) {
        float v = rintf(x[i] * s); /* half to even in the default rounding mode, like torch.round */
        q[i] = (int8_t)fminf(fmaxf(v, -128.0f), 127.0f);
    }
    return s;
}

float bn_quantize_row_i8_sym(int8_t *q, const float *x, uint32_t n) {
    float amax = 0.0f;
    for (uint32_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
    float s = 127.0f / fmaxf(amax, 1e-5f);
    for (uint32_t i = 0; i < n; i++) q[i] = (int8_t)fminf(fmaxf(rintf(x[i] * s), -127.0f), 127.0f);
    return s;
}

void bn_rope(float *v, uint32_t n_heads, uint32_t D, const float *cos_t, const float *sin_t) {
    uint32_t half = D / 2;
    for (uint32_t h = 0; h < n_heads; h++) {
        float *x = v + (uint64_t)h * D;
        for (uint32_t i = 0; i < half; i++) {
            float a = x[i], b = x[i + half];
            x[i] = a * cos_t[i] - b * sin_t[i];
            x[i + half] = b * cos_t[i] + a * sin_t[i];
        }
    }
}

/* bn_dot8_f32's combination of its 8 partial sums. */
static inline float sum8_partials(const float s[8]) {
    return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}

float bn_dot8_f32(const float *a, const float *b, uint32_t n) {
    float s[8] = {0};
    for (uint32_t i = 0; i < n; i++) s[i % 8] += a[i] * b[i];
    return sum8_partials(s);
}

float bn_softmax_numerators(float *att, uint32_t n) {
    float max = -INFINITY;
    for (uint32_t j = 0; j < n; j++) max = fmaxf(max, att[j]);
    float sum = 0.0f;
    for (uint32_t j = 0; j < n; j++) {
        att[j] = expf(att[j] - max);
        sum += att[j];
    }
    return sum;
}

/* Element i of a cache row, widened to float: f16 (kv_f16) or float. */
static inline float kv_at(const void *row, uint64_t i, int kv_f16) {
    return kv_f16 ? bn_fp16_to_f32(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

/* bn_attention_head over either cache type (kv_f16 is a constant at each call, folded away). */
static inline void attention_head(float *out, const float *q, const void *k, const void *v, uint64_t stride,
                                  uint32_t n_pos, uint32_t D, float scale, float *att, int kv_f16) {
    for (uint32_t j = 0; j < n_pos; j++) {
        float s[8] = {0}; /* bn_dot8_f32 of q and the widened key */
        for (uint32_t i = 0; i < D; i++) s[i % 8] += q[i] * kv_at(k, j * stride + i, kv_f16);
        att[j] = sum8_partials(s) * scale;
    }
    const float sum = bn_softmax_numerators(att, n_pos);
    memset(out, 0, D * sizeof *out);
    for (uint32_t j = 0; j < n_pos; j++) {
        float p = att[j] / sum;
        for (uint32_t i = 0; i < D; i++) out[i] += p * kv_at(v, j * stride + i, kv_f16);
    }
}

void bn_attention_head(float *out, const float *q, const float *k, const float *v, uint64_t stride,
                       uint32_t n_pos, uint32_t D, float scale, float *att) {
    attention_head(out, q, k, v, stride, n_pos, D, scale, att, 0);
}

void bn_attention_head_f16(float *out, const float *q, const uint16_t *k, const uint16_t *v, uint64_t stride,
                           uint32_t n_pos, uint32_t D, float scale, float *att) {
    attention_head(out, q, k, v, stride, n_pos, D, scale, att, 1);
}

void bn_relu2_gate(float *restrict g, const float *restrict u, uint32_t n) {
    /* relu(g) = g > 0 ? g : 0 decided on the bits, which the compiler vectorizes (it does not
     * if-convert a float compare under the default -ftrapping-math): g > 0 exactly when its bits,
     * read as int32, lie in (0, +inf]; NaNs and negatives become +0. */
    for (uint32_t i = 0; i < n; i++) {
        int32_t bits;
        memcpy(&bits, &g[i], sizeof bits);
        bits &= -(int32_t)((bits > 0) & (bits <= 0x7f800000));
        float r;
        memcpy(&r, &bits, sizeof r);
        g[i] = (r * r) * u[i];
    }
}

void bn_silu_gate(float *restrict g, const float *restrict u, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) g[i] = (g[i] / (1.0f + expf(-g[i]))) * u[i];
}
