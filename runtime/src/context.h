/* The run state of one sequence: KV cache, RoPE tables, work buffers and the thread pool. */
#ifndef BN_CONTEXT_H
#define BN_CONTEXT_H

#include <stdint.h>

#include "bitnet.h"
#include "kernels.h"
#include "model.h"
#include "threadpool.h"

/* Longer batches are evaluated in chunks of this many tokens, which bounds the work buffers. */
#define BN_MAX_BATCH 64

struct bn_context {
    const bn_model *model;
    const bn_kernels *kern;
    bn_pool *pool;
    uint32_t n_ctx;
    uint32_t n_batch; /* tokens per forward chunk, min(n_ctx, BN_MAX_BATCH) */
    uint32_t n_past;  /* positions whose keys/values are in the cache */
    float attn_scale; /* head_dim^-0.5 */

    /* H = hidden, I = intermediate, D = head_dim, Q = n_heads * D, KV = n_kv_heads * D, B = n_batch */
    float *key_cache;   /* [n_layers][n_ctx][KV] keys after RoPE */
    float *value_cache; /* [n_layers][n_ctx][KV] */
    float *rope_cos;    /* [n_ctx][D/2] */
    float *rope_sin;    /* [n_ctx][D/2] */
    float *x;           /* [B][H] residual stream */
    float *xb;          /* [B][max(H, Q)] normed layer input ([B][H]), attention output ([B][Q]), final norm */
    float *q;           /* [B][Q] queries after RoPE */
    float *gate;        /* [B][I] gate_proj output, then the gated product */
    float *up;          /* [B][I] up_proj output */
    int8_t *xq;         /* [B][max(H, Q, I)] quantized input of a BitLinear */
    float *xs;          /* [B] its per-row scales s */
    int32_t *acc;       /* [B][max(Q + 2*KV, 2*I, H)] int32 results of one (fused q/k/v, gate/up) call */
    float *att;         /* [n_heads][n_ctx] attention scores, a row per head so heads run in parallel */

    char error[512];
};

#endif
