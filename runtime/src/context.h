/* The run state of n_seq sequences: their KV caches, RoPE tables, work buffers and the thread pool. */
#ifndef BN_CONTEXT_H
#define BN_CONTEXT_H

#include <stdint.h>

#include "bitnet.h"
#include "kernels.h"
#include "model.h"
#include "threadpool.h"

/* Longer batches are evaluated in chunks of this many tokens, which bounds the work buffers. */
#define BN_MAX_BATCH 64
/* The default n_ctx is the model's trained length, capped here (llama.cpp's default is 4096 too). */
#define BN_DEFAULT_N_CTX 4096

struct bn_context {
    const bn_model *model;
    const bn_kernels *kern;
    bn_pool *pool;
    uint32_t n_ctx;       /* positions per sequence */
    uint32_t n_seq;       /* sequence slots */
    uint32_t n_batch;     /* tokens per forward chunk, min(n_ctx * n_seq, BN_MAX_BATCH) */
    bn_kv_type kv_type;
    size_t kv_elem;       /* bytes per cached value: 2 (f16) or 4 (f32) */
    uint32_t *n_past;     /* [n_seq] positions whose keys/values are in each sequence's cache */
    uint32_t *next_pos;   /* [n_seq] scratch of bn_decode's checks: each sequence's next position */
    uint64_t n_evaluated; /* tokens evaluated since creation, all sequences */
    float attn_scale;     /* head_dim^-0.5 */

    /* H = hidden, I = intermediate, D = head_dim, Q = n_heads * D, KV = n_kv_heads * D, B = n_batch,
     * T = threads */
    void *key_cache;    /* [n_layers][n_seq][n_ctx][KV] keys after RoPE, f16 or f32 (kv_type) */
    void *value_cache;  /* [n_layers][n_seq][n_ctx][KV] */
    float *rope_cos;    /* [n_ctx][D/2] */
    float *rope_sin;    /* [n_ctx][D/2] */
    float *x;           /* [B][H] residual stream */
    float *xb;          /* [B][max(H, Q)] normed layer input ([B][H]), attention output ([B][Q]), final norm */
    float *q;           /* [B][Q] queries after RoPE */
    float *k;           /* [B][KV] keys of the chunk (after RoPE), before they go to the cache */
    float *v;           /* [B][KV] values of the chunk */
    float *gate;        /* [B][I] gate_proj output, then the gated product */
    float *up;          /* [B][I] up_proj output */
    int8_t *xq;         /* [B][max(H, Q, I)] quantized input of a BitLinear */
    float *xs;          /* [B] its per-row scales s */
    int32_t *acc;       /* [B][max(Q + 2*KV, 2*I, H)] int32 results of one (fused q/k/v, gate/up) call */
    float *att;         /* [T][n_ctx] attention scores, a row per worker */
    uint32_t *chunk_seq; /* [B] sequence ids of a bn_eval chunk (all 0) */
    uint32_t *chunk_pos; /* [B] its positions */
    int8_t *chunk_want;  /* [B] which rows of a chunk want logits (when the caller gives no mask) */

    char error[512];
};

/* Byte offset of position `pos` of sequence `seq` in layer `layer`'s part of either cache. */
static inline uint64_t bn_kv_offset(const bn_context *ctx, uint32_t layer, uint32_t seq, uint32_t pos) {
    const uint64_t KV = (uint64_t)ctx->model->hp.n_kv_heads * ctx->model->hp.head_dim;
    return (((uint64_t)layer * ctx->n_seq + seq) * ctx->n_ctx + pos) * KV * ctx->kv_elem;
}

#endif
