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
    uint32_t n_threads;  /* 0: one per online CPU */
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
 * softmax(value / temperature) over what is left. Tokens whose value after penalties and bias is NaN
 * or infinite are never candidates (a bias of -INFINITY bans a token); with no finite value at all,
 * the token with the largest value is returned (0 if all are NaN).
 * RNG: xoshiro256** (Blackman and Vigna) seeded by four outputs of splitmix64 from `seed`; a uniform
 * draw is u = (next() >> 11) * 2^-53 in [0, 1), and the token drawn is the first candidate (in the
 * sampler's internal order) whose running weight sum exceeds u * total. One uniform per sample. */
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
/* The filtered, renormalized distribution sample() would draw from (for tests): *n receives its size,
 * ids/probs its first min(*n, cap) entries by descending probability (ties: lower id first). Greedy
 * gives the argmax with probability 1. Does not advance the RNG. */
bn_status bn_sampler_probs(bn_sampler *s, const float *logits, int32_t *ids, float *probs, uint32_t cap,
                           uint32_t *n);
/* The n most likely tokens under log_softmax(logits) (raw logits, no sampling filters), by descending
 * logit (ties: lower id first); NaN logits are never listed. BN_ERR_ARG for n > n_vocab or NULLs. */
bn_status bn_top_logprobs(const float *logits, uint32_t n_vocab, uint32_t n, int32_t *ids, float *logprobs);

/* ---- memory bandwidth probe ---- */
/* Best read bandwidth in GB/s (1e9 bytes/s) over `repeats` timed passes (0 counts as 1) of n_threads
 * threads (0: one per online CPU) summing a freshly allocated buffer of `bytes` bytes, each thread its
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
/* The index of the variant a new context would use now (honours BITNET_RUN_KERNELS=ref|avx2|avx512vnni). */
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
 * encoding 3/4/5 (I2/TL1/TL2) for the ternary kernels, 0/1/2 for the dense one, 6 (Q8_R) for the q8 head
 * one; n_threads threads split the rows.
 * Cycles through enough weight copies to read at least min_weight_bytes (0: one copy, cache-warm).
 * seconds[repeats] receives each call's wall time. */
bn_status bn_kernels_time(uint32_t variant, uint32_t encoding, uint32_t n_threads, uint32_t n_tok, uint32_t rows,
                          uint32_t cols, uint32_t repeats, uint64_t min_weight_bytes, double *seconds);
/* CDEF-END */

#ifdef __cplusplus
}
#endif

#endif /* BITNET_H */
