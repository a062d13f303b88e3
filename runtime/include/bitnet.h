/* bitnet-run C API: load a packed BitNet b1.58 model file (docs/format.md) and evaluate it on the CPU.
 *
 * Handles are opaque. No function prints, exits or aborts: every failure returns a status code and a
 * one-line message (into the caller's buffer for constructors, bn_context_error() afterwards).
 * A bn_model is read-only after loading and may be shared by several contexts; one context must be
 * used by one thread at a time. */
#ifndef BITNET_H
#define BITNET_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cffi reads the declarations between the two CDEF markers (no preprocessor lines inside). */
/* CDEF-BEGIN */
#define BN_API_VERSION 1

typedef enum {
    BN_OK = 0,
    BN_ERR_IO = 1,          /* the file cannot be opened, read or mapped */
    BN_ERR_FORMAT = 2,      /* the file is not a valid model file (bad magic, offset, size, shape...) */
    BN_ERR_UNSUPPORTED = 3, /* valid file, but a version/architecture/encoding this runtime lacks */
    BN_ERR_ARG = 4,         /* a bad argument (token id out of range, bad position, NULL...) */
    BN_ERR_CONTEXT = 5,     /* the tokens do not fit in the context window */
    BN_ERR_NOMEM = 6,       /* an allocation failed */
    BN_ERR_NOT_FOUND = 7    /* a metadata key is absent or has another type */
} bn_status;

/* Tensor encodings of the model file (docs/format.md); ids are never reused. */
typedef enum {
    BN_ENC_F32 = 0,
    BN_ENC_F16 = 1,
    BN_ENC_BF16 = 2,
    BN_ENC_I2 = 3,  /* ternary, 4 codes (w+1) per byte along a row */
    BN_ENC_TL1 = 4, /* ternary, weight pairs as 4-bit indices in tiles of 32 rows */
    BN_ENC_TL2 = 5, /* ternary, weight triples as 4-bit index + sign bit in tiles of 32 rows */
    BN_ENC_Q8R = 6, /* int8 rows with an f32 scale per row (the output head) */
    BN_ENC_COUNT = 7
} bn_encoding;

/* The FFN gate's activation (metadata bitnet.hidden_act). */
typedef enum { BN_ACT_RELU2 = 0, BN_ACT_SILU = 1 } bn_activation;

typedef struct bn_model bn_model;
typedef struct bn_context bn_context;

typedef struct {
    uint32_t vocab_size;
    uint32_t hidden_size;
    uint32_t intermediate_size;
    uint32_t n_layers;
    uint32_t n_heads;
    uint32_t n_kv_heads;
    uint32_t head_dim;
    uint32_t context_length;
    float rms_norm_eps;
    float rope_theta;
    uint32_t tied_embeddings;
    /* What differs between the families (docs/format.md, "Architecture bitnet"): */
    uint32_t hidden_act;           /* bn_activation of the gated FFN */
    uint32_t sub_norms;            /* 1: an RMSNorm before o_proj and before down_proj */
    float linear_norm_eps;         /* > 0: each BitLinear RMSNorms its own input first; 0: none */
    uint32_t weight_scale_divides; /* 1: y = dot / (s * scale); 0: y = dot / s * scale */
} bn_hparams;

/* Library version string, e.g. "0.1.0". */
const char *bn_version(void);

/* Maps and validates the file at `path`. On failure returns a status, sets *out to NULL and writes a
 * one-line message naming the file and the field into err (err may be NULL). */
bn_status bn_model_load(const char *path, bn_model **out, char *err, size_t err_len);
void bn_model_free(bn_model *model);

void bn_model_hparams(const bn_model *model, bn_hparams *out);
/* Total bytes of tensor data and number of parameters (for reports). */
uint64_t bn_model_n_bytes(const bn_model *model);
uint64_t bn_model_n_params(const bn_model *model);

/* Metadata lookups. Strings point into the mapped file (not NUL-terminated; *len is their length)
 * and live as long as the model. BN_ERR_NOT_FOUND when the key is absent or of another type. */
bn_status bn_model_meta_str(const bn_model *model, const char *key, const char **str, uint64_t *len);
bn_status bn_model_meta_u32(const bn_model *model, const char *key, uint32_t *value);
bn_status bn_model_meta_i32(const bn_model *model, const char *key, int32_t *value);
bn_status bn_model_meta_f32(const bn_model *model, const char *key, float *value);
/* Copies up to `cap` values into `values` and the array's full length into *count. */
bn_status bn_model_meta_i32_array(const bn_model *model, const char *key, int32_t *values, uint64_t cap,
                                  uint64_t *count);

/* The shape of tensor `name` (PyTorch order, outermost first): BN_ERR_NOT_FOUND if absent. */
bn_status bn_model_tensor_dims(const bn_model *model, const char *name, uint32_t *n_dims, uint64_t dims[4]);

/* Applies the ternary weight tensor `name` (e.g. "model.layers.0.self_attn.q_proj.weight") as one
 * BitLinear to n_rows rows of float input x [n_rows][in], writing y [n_rows][out]: per-row int8
 * activation quantization, exact integer dot products, rescaling. For checking single layers. */
bn_status bn_model_bitlinear(const bn_model *model, const char *name, const float *x, uint32_t n_rows, float *y,
                             char *err, size_t err_len);

/* A context holds the KV cache and work buffers for up to n_ctx positions (0: the model's
 * context_length) and a pool of n_threads threads (0: one per online CPU). */
bn_status bn_context_new(const bn_model *model, uint32_t n_ctx, uint32_t n_threads, bn_context **out,
                         char *err, size_t err_len);
void bn_context_free(bn_context *ctx);
uint32_t bn_context_n_ctx(const bn_context *ctx);
uint32_t bn_context_n_threads(const bn_context *ctx);
/* Positions whose keys/values are in the cache. */
uint32_t bn_context_n_past(const bn_context *ctx);

/* Evaluates `n_tokens` tokens at positions pos .. pos+n_tokens-1 in one batch. pos must be <= n_past
 * (a smaller pos drops the cache beyond it); pos + n_tokens must be <= n_ctx, else BN_ERR_CONTEXT.
 * logits (may be NULL) receives n_tokens x vocab floats when all_logits != 0, else vocab floats for
 * the last token. On error nothing in the cache below pos is changed. */
bn_status bn_eval(bn_context *ctx, const int32_t *tokens, uint32_t n_tokens, uint32_t pos, float *logits,
                  int all_logits);

/* The message of the last failed call on this context ("" if none). */
const char *bn_context_error(const bn_context *ctx);

/* CDEF-END */

#ifdef __cplusplus
}
#endif

#endif /* BITNET_H */
