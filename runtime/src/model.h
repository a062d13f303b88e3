/* The loaded model: hyperparameters and typed views of every weight, pointing into the map. */
#ifndef BN_MODEL_H
#define BN_MODEL_H

#include <stdint.h>

#include "bitnet.h"
#include "model_file.h"

/* Ternary BitLinear weight [rows][cols] in encoding I2, TL1 or TL2 (kernels.h, docs/format.md);
 * y = dot(q, w) / s * scale, or dot(q, w) / (s * scale) when scale_divides. */
typedef struct {
    const uint8_t *data;
    uint32_t encoding; /* BN_ENC_I2, BN_ENC_TL1 or BN_ENC_TL2 */
    uint32_t rows;     /* out_features */
    uint32_t cols;     /* in_features */
    float scale;
    uint32_t scale_divides;   /* hparams.weight_scale_divides */
    const float *input_norm;  /* [cols] the RMSNorm this BitLinear applies to its input first, or NULL */
} bn_ternary_weight;

/* Embedding or output head [rows][cols]: a float matrix (F32, F16, BF16) or an integer one with float
 * scales (Q8_R, Q6_B, Q4_B). */
typedef struct {
    const void *data;
    uint32_t encoding;
    uint32_t rows;
    uint32_t cols;
} bn_dense_weight;

/* Q = n_heads * D (the queries and the attention output), KV = n_kv_heads * D. */
typedef struct {
    const float *attn_norm;     /* [H] input_layernorm */
    bn_ternary_weight q;        /* [Q, H] */
    bn_ternary_weight k;        /* [KV, H] */
    bn_ternary_weight v;        /* [KV, H] */
    const float *attn_sub_norm; /* [Q], NULL without sub-norms */
    bn_ternary_weight o;        /* [H, Q] */
    const float *ffn_norm;      /* [H] post_attention_layernorm */
    bn_ternary_weight gate;     /* [I, H] */
    bn_ternary_weight up;       /* [I, H] */
    const float *ffn_sub_norm;  /* [I], NULL without sub-norms */
    bn_ternary_weight down;     /* [H, I] */
} bn_layer_weights;

typedef struct {
    bn_dense_weight embed;    /* [vocab, H] model.embed_tokens.weight */
    const float *norm;        /* [H] model.norm */
    bn_dense_weight head;     /* [vocab, H] lm_head.weight, or embed when tied */
    bn_layer_weights *layers; /* [n_layers] */
} bn_weights;

struct bn_model {
    bn_file file;
    bn_hparams hp;
    bn_weights w;
    uint64_t n_bytes;  /* tensor data bytes in the file */
    uint64_t n_params; /* elements of all tensors in the file */
};

#endif
