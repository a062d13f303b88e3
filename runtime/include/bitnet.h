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
#define BN_API_VERSION 2

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
    BN_ENC_Q6B = 7, /* 6-bit rows in blocks of 32 with a u8 scale per block and an f32 scale per row (head) */
    BN_ENC_Q4B = 8, /* 4-bit rows, the same blocks and scales (head) */
    BN_ENC_COUNT = 9
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

/* ---- contexts: KV caches of one or more sequences ----
 * A context holds the KV cache of n_seq sequence slots of up to n_ctx positions each, the work
 * buffers and a pool of n_threads threads. Every sequence has its own length (bn_seq_n_past): the
 * positions whose keys/values are cached. */
typedef enum { BN_KV_F16 = 0, BN_KV_F32 = 1 } bn_kv_type;

typedef struct {
    uint32_t n_ctx;      /* positions per sequence; 0: min(model context_length, 4096) */
    uint32_t n_seq;      /* sequence slots; 0: 1 */
    uint32_t n_threads;  /* 0: bn_default_n_threads() */
    bn_kv_type kv_type;  /* the cache's element type; default BN_KV_F16 (keys/values rounded to nearest even) */
} bn_context_params;

/* n_ctx 0, n_seq 1, n_threads 0, kv_type BN_KV_F16. */
bn_context_params bn_context_default_params(void);
bn_status bn_context_new_ext(const bn_model *model, const bn_context_params *params, bn_context **out,
                             char *err, size_t err_len);
/* bn_context_new_ext with n_seq 1 and an f16 cache. */
bn_status bn_context_new(const bn_model *model, uint32_t n_ctx, uint32_t n_threads, bn_context **out,
                         char *err, size_t err_len);
void bn_context_free(bn_context *ctx);
uint32_t bn_context_n_ctx(const bn_context *ctx);
uint32_t bn_context_n_seq(const bn_context *ctx);
uint32_t bn_context_n_threads(const bn_context *ctx);
bn_kv_type bn_context_kv_type(const bn_context *ctx);
/* Positions of sequence 0 whose keys/values are in the cache (bn_seq_n_past(ctx, 0)). */
uint32_t bn_context_n_past(const bn_context *ctx);
/* Tokens evaluated by this context since it was created (all sequences), for cache-reuse tests. */
uint64_t bn_context_n_evaluated(const bn_context *ctx);

/* Evaluates `n_tokens` tokens of sequence 0 at positions pos .. pos+n_tokens-1. pos must be <= n_past
 * (a smaller pos drops the cache beyond it); pos + n_tokens must be <= n_ctx, else BN_ERR_CONTEXT.
 * logits (may be NULL) receives n_tokens x vocab floats when all_logits != 0, else vocab floats for
 * the last token. On error the cache is unchanged. */
bn_status bn_eval(bn_context *ctx, const int32_t *tokens, uint32_t n_tokens, uint32_t pos, float *logits,
                  int all_logits);

/* A batch of tokens from one or more sequences. The tokens of one sequence must be at consecutive
 * positions starting at that sequence's length (bn_seq_n_past): to rewind, bn_seq_truncate first.
 * logits[i] != 0 asks for token i's logits (NULL: only the batch's last token). */
typedef struct {
    uint32_t n_tokens;
    const int32_t *token;   /* [n_tokens] */
    const uint32_t *seq_id; /* [n_tokens] < n_seq */
    const uint32_t *pos;    /* [n_tokens] */
    const int8_t *logits;   /* [n_tokens] or NULL */
} bn_batch;

/* Evaluates the batch: the BitLinears once over all its tokens (in chunks of at most 64), attention
 * per sequence over that sequence's cache. `out` (may be NULL) receives vocab floats per requested
 * token, in batch order. BN_ERR_ARG for a bad token, sequence id or position, BN_ERR_CONTEXT for a
 * position >= n_ctx; on error no sequence's cache changes. Logits of a sequence are bit-identical
 * whether it is evaluated alone or together with others, in one batch or token by token. */
bn_status bn_decode(bn_context *ctx, const bn_batch *batch, float *out);

/* Sequence operations; BN_ERR_ARG (and bn_context_error) for a slot >= n_seq or n beyond the
 * sequence's length. */
uint32_t bn_seq_n_past(const bn_context *ctx, uint32_t seq);
bn_status bn_seq_clear(bn_context *ctx, uint32_t seq);
/* Keeps the first n_keep positions (n_keep <= bn_seq_n_past). */
bn_status bn_seq_truncate(bn_context *ctx, uint32_t seq, uint32_t n_keep);
/* dst's cache becomes src's first n positions (n <= bn_seq_n_past(src)); src == dst truncates. */
bn_status bn_seq_copy(bn_context *ctx, uint32_t src, uint32_t dst, uint32_t n);

/* The message of the last failed call on this context ("" if none). */
const char *bn_context_error(const bn_context *ctx);

/* ---- sampling (runtime/src/sampler.c) ----
 * Order (llama.cpp's): repeat / frequency / presence penalties over the last penalty_last_n accepted
 * tokens -> logit bias -> top-k -> top-p -> min-p -> temperature -> a seeded draw. top-k keeps the k
 * largest values (ties: the lower token id first), by threshold selection, never a full sort; top-p
 * keeps the smallest prefix of the candidates in that order whose softmax mass (temperature 1)
 * reaches top_p; min-p keeps tokens whose probability is >= min_p times the largest; the draw is from
 * softmax(value / temperature) over what is left. A value (after penalties and bias) that is NaN or
 * -inf is never drawn (a bias of -INFINITY bans a token) and +inf counts as the largest float; when
 * every value is NaN or -inf, token 0 is returned.
 * RNG: xoshiro256** (Blackman and Vigna) seeded by four outputs of splitmix64 from `seed`; a uniform
 * draw is u = (next() >> 11) * 2^-53 in [0, 1), and the token drawn is the first candidate (in the
 * sampler's order: by token id when top-k and top-p are off) whose running weight sum exceeds
 * u * total. One uniform per sampled token; greedy sampling draws none. */
typedef struct bn_sampler bn_sampler;
typedef struct {
    float temperature;       /* >= 0; 0: greedy (argmax after penalties and bias, no draw) */
    int32_t top_k;           /* >= 0; 0: off */
    float top_p;             /* (0, 1]; 1: off */
    float min_p;             /* [0, 1]; 0: off */
    float repeat_penalty;    /* > 0; 1: off (llama.cpp: divide positive logits, multiply negative) */
    float frequency_penalty; /* 0: off (subtract count * f) */
    float presence_penalty;  /* 0: off (subtract p if seen) */
    int32_t penalty_last_n;  /* >= 0: tokens of history the penalties look at; default 64 */
    uint64_t seed;
} bn_sampler_params;

/* temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, repeat 1.1, frequency 0, presence 0, last_n 64,
 * seed 0. */
bn_sampler_params bn_sampler_default_params(void);
/* BN_ERR_ARG with a one-line message naming the parameter when one is out of range. */
bn_status bn_sampler_new(const bn_sampler_params *params, uint32_t n_vocab, bn_sampler **out, char *err,
                         size_t err_len);
void bn_sampler_free(bn_sampler *s);
/* Replaces the logit bias by bias[i] added to token tokens[i] (n = 0 clears it). BN_ERR_ARG for a token
 * out of range or a NaN bias (nothing changes then). */
bn_status bn_sampler_set_logit_bias(bn_sampler *s, const int32_t *tokens, const float *bias, uint32_t n);
/* Appends a token to the penalty history (ids out of range are ignored). */
void bn_sampler_accept(bn_sampler *s, int32_t token);
/* Clears the penalty history (the RNG continues). */
void bn_sampler_reset(bn_sampler *s);
/* The next token for a row of n_vocab logits (which are not modified). */
int32_t bn_sampler_sample(bn_sampler *s, const float *logits);
/* The filtered, renormalized distribution sample() would draw from (for tests): *n receives the number
 * of tokens with a nonzero probability, ids/probs the first min(*n, cap) of them by descending
 * probability (ties: lower id first). Greedy gives the argmax with probability 1. Does not advance
 * the RNG. BN_ERR_NOMEM when no scratch can be allocated. */
bn_status bn_sampler_probs(bn_sampler *s, const float *logits, int32_t *ids, float *probs, uint32_t cap,
                           uint32_t *n);
/* The n most likely tokens under log_softmax(logits) (raw logits, no sampling filters), by descending
 * logit (ties: lower id first); NaN logits are never listed. BN_ERR_ARG for n > n_vocab or NULLs. */
bn_status bn_top_logprobs(const float *logits, uint32_t n_vocab, uint32_t n, int32_t *ids, float *logprobs);
/* ---- threads ---- */
/* The thread count that n_threads = 0 stands for: the physical cores this process may run on (its
 * affinity mask, counted by core in the sysfs CPU topology; else the CPUs in the mask; else the
 * online CPUs), at most 1024. */
uint32_t bn_default_n_threads(void);
/* CDEF-END */

#ifdef __cplusplus
}
#endif

#endif /* BITNET_H */
