/* bn_context: allocation of the caches and work buffers, RoPE tables, thread pool; sequence operations. */
#include "context.h"

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"


/* calloc of a count of elements given as uint64; NULL when it does not fit size_t or fails. */
static void *alloc_array(uint64_t count, size_t elem) {
    if (count > SIZE_MAX / elem) return NULL;
    return calloc(count ? (size_t)count : 1, elem);
}

/* cos/sin of pos * inv_freq[i] for every position, in the float32 steps of transformers' default
 * RoPE: inv_freq = 1 / theta^(2i/D) in float, angle = (float)pos * inv_freq. */
static void build_rope_tables(bn_context *ctx) {
    const bn_hparams *hp = &ctx->model->hp;
    const uint32_t D = hp->head_dim, half = D / 2;
    for (uint32_t i = 0; i < half; i++) {
        float inv_freq = 1.0f / powf(hp->rope_theta, (float)(2 * i) / (float)D);
        for (uint32_t p = 0; p < ctx->n_ctx; p++) {
            float angle = (float)p * inv_freq;
            ctx->rope_cos[(uint64_t)p * half + i] = (float)cos((double)angle);
            ctx->rope_sin[(uint64_t)p * half + i] = (float)sin((double)angle);
        }
    }
}

static int build_buffers(bn_context *ctx, uint32_t n_threads) {
    const bn_hparams *hp = &ctx->model->hp;
    const uint64_t H = hp->hidden_size, I = hp->intermediate_size, B = ctx->n_batch;
    const uint64_t KV = (uint64_t)hp->n_kv_heads * hp->head_dim, Q = (uint64_t)hp->n_heads * hp->head_dim;
    const uint64_t cache = (uint64_t)hp->n_layers * ctx->n_seq * ctx->n_ctx * KV; /* < 2^58 by the bounds */
    const uint64_t rope = (uint64_t)ctx->n_ctx * (hp->head_dim / 2);
    const uint64_t HQ = H > Q ? H : Q, in_max = HQ > I ? HQ : I;
    const uint64_t fused = Q + 2 * KV > 2 * I ? Q + 2 * KV : 2 * I, acc_cols = fused > H ? fused : H;
    ctx->n_past = alloc_array(ctx->n_seq, sizeof(uint32_t));
    ctx->next_pos = alloc_array(ctx->n_seq, sizeof(uint32_t));
    ctx->key_cache = alloc_array(cache, ctx->kv_elem);
    ctx->value_cache = alloc_array(cache, ctx->kv_elem);
    ctx->rope_cos = alloc_array(rope, sizeof(float));
    ctx->rope_sin = alloc_array(rope, sizeof(float));
    ctx->x = alloc_array(B * H, sizeof(float));
    ctx->xb = alloc_array(B * HQ, sizeof(float));
    ctx->q = alloc_array(B * Q, sizeof(float));
    ctx->k = alloc_array(B * KV, sizeof(float));
    ctx->v = alloc_array(B * KV, sizeof(float));
    ctx->gate = alloc_array(B * I, sizeof(float));
    ctx->up = alloc_array(B * I, sizeof(float));
    ctx->xq = alloc_array(B * in_max, sizeof(int8_t));
    ctx->xs = alloc_array(B, sizeof(float));
    ctx->acc = alloc_array(B * acc_cols, sizeof(int32_t));
    ctx->att = alloc_array((uint64_t)n_threads * ctx->n_ctx, sizeof(float));
    ctx->chunk_seq = alloc_array(B, sizeof(uint32_t));
    ctx->chunk_pos = alloc_array(B, sizeof(uint32_t));
    ctx->chunk_want = alloc_array(B, sizeof(int8_t));
    return ctx->n_past && ctx->next_pos && ctx->key_cache && ctx->value_cache && ctx->rope_cos && ctx->rope_sin &&
           ctx->x && ctx->xb && ctx->q && ctx->k && ctx->v && ctx->gate && ctx->up && ctx->xq && ctx->xs && ctx->acc &&
           ctx->att && ctx->chunk_seq && ctx->chunk_pos && ctx->chunk_want;
}

static void free_buffers(bn_context *ctx) {
    free(ctx->n_past);
    free(ctx->next_pos);
    free(ctx->key_cache);
    free(ctx->value_cache);
    free(ctx->rope_cos);
    free(ctx->rope_sin);
    free(ctx->x);
    free(ctx->xb);
    free(ctx->q);
    free(ctx->k);
    free(ctx->v);
    free(ctx->gate);
    free(ctx->up);
    free(ctx->xq);
    free(ctx->xs);
    free(ctx->acc);
    free(ctx->att);
    free(ctx->chunk_seq);
    free(ctx->chunk_pos);
    free(ctx->chunk_want);
}

bn_context_params bn_context_default_params(void) {
    bn_context_params p = {0, 1, 0, BN_KV_F16};
    return p;
}

bn_status bn_context_new_ext(const bn_model *model, const bn_context_params *params, bn_context **out, char *err,
                             size_t err_len) {
    bn_set_error(err, err_len, "%s", "");
    if (out == NULL || model == NULL || params == NULL) {
        bn_set_error(err, err_len, "bn_context_new: model, params and out must not be NULL");
        return BN_ERR_ARG;
    }
    *out = NULL;
    uint32_t n_threads = params->n_threads;
    if (n_threads == 0) n_threads = bn_default_n_threads();
    if (n_threads > BN_MAX_THREADS) {
        bn_set_error(err, err_len, "bn_context_new: n_threads %" PRIu32 " is more than %d", n_threads,
                     BN_MAX_THREADS);
        return BN_ERR_ARG;
    }
    if (params->kv_type != BN_KV_F16 && params->kv_type != BN_KV_F32) {
        bn_set_error(err, err_len, "bn_context_new: kv_type %d is not BN_KV_F16 (0) or BN_KV_F32 (1)",
                     (int)params->kv_type);
        return BN_ERR_ARG;
    }
    const uint32_t trained = model->hp.context_length;
    bn_context *ctx = calloc(1, sizeof *ctx);
    if (ctx == NULL) {
        bn_set_error(err, err_len, "bn_context_new: out of memory");
        return BN_ERR_NOMEM;
    }
    ctx->model = model;
    ctx->kern = bn_kernels_select();
    ctx->n_ctx = params->n_ctx ? params->n_ctx : trained < BN_DEFAULT_N_CTX ? trained : BN_DEFAULT_N_CTX;
    ctx->n_seq = params->n_seq ? params->n_seq : 1;
    const uint64_t positions = (uint64_t)ctx->n_ctx * ctx->n_seq;
    ctx->n_batch = positions < BN_MAX_BATCH ? (uint32_t)positions : BN_MAX_BATCH;
    ctx->kv_type = params->kv_type;
    ctx->kv_elem = params->kv_type == BN_KV_F16 ? sizeof(uint16_t) : sizeof(float);
    /* head_dim ** -0.5 as transformers computes it (in double, then used as a float32 factor). */
    ctx->attn_scale = (float)pow((double)model->hp.head_dim, -0.5);
    if (!build_buffers(ctx, n_threads)) {
        bn_set_error(err, err_len,
                     "bn_context_new: out of memory for %" PRIu32 " sequences of %" PRIu32 " positions",
                     ctx->n_seq, ctx->n_ctx);
        bn_context_free(ctx);
        return BN_ERR_NOMEM;
    }
    build_rope_tables(ctx);
    if (bn_pool_new(&ctx->pool, n_threads) != BN_OK) {
        bn_set_error(err, err_len, "bn_context_new: cannot start %" PRIu32 " threads", n_threads);
        bn_context_free(ctx);
        return BN_ERR_NOMEM;
    }
    *out = ctx;
    return BN_OK;
}

bn_status bn_context_new(const bn_model *model, uint32_t n_ctx, uint32_t n_threads, bn_context **out, char *err,
                         size_t err_len) {
    bn_context_params params = bn_context_default_params();
    params.n_ctx = n_ctx;
    params.n_threads = n_threads;
    return bn_context_new_ext(model, &params, out, err, err_len);
}

void bn_context_free(bn_context *ctx) {
    if (ctx == NULL) return;
    bn_pool_free(ctx->pool);
    free_buffers(ctx);
    free(ctx);
}

uint32_t bn_context_n_ctx(const bn_context *ctx) { return ctx ? ctx->n_ctx : 0; }
uint32_t bn_context_n_seq(const bn_context *ctx) { return ctx ? ctx->n_seq : 0; }
uint32_t bn_context_n_threads(const bn_context *ctx) { return ctx ? bn_pool_n_threads(ctx->pool) : 0; }
bn_kv_type bn_context_kv_type(const bn_context *ctx) { return ctx ? ctx->kv_type : BN_KV_F16; }
uint32_t bn_context_n_past(const bn_context *ctx) { return bn_seq_n_past(ctx, 0); }
uint64_t bn_context_n_evaluated(const bn_context *ctx) { return ctx ? ctx->n_evaluated : 0; }
const char *bn_context_error(const bn_context *ctx) { return ctx ? ctx->error : ""; }

/* ---- sequence operations ---- */

uint32_t bn_seq_n_past(const bn_context *ctx, uint32_t seq) {
    return ctx && seq < ctx->n_seq ? ctx->n_past[seq] : 0;
}

/* BN_OK when seq names a slot, else a message naming the operation and the slot. */
static bn_status check_seq(bn_context *ctx, const char *op, const char *what, uint32_t seq) {
    if (seq < ctx->n_seq) return BN_OK;
    bn_set_error(ctx->error, sizeof ctx->error, "%s: %s %" PRIu32 " is out of range [0, %" PRIu32 ")", op, what, seq,
                 ctx->n_seq);
    return BN_ERR_ARG;
}

bn_status bn_seq_clear(bn_context *ctx, uint32_t seq) { return bn_seq_truncate(ctx, seq, 0); }

bn_status bn_seq_truncate(bn_context *ctx, uint32_t seq, uint32_t n_keep) {
    if (ctx == NULL) return BN_ERR_ARG;
    if (check_seq(ctx, "bn_seq_truncate", "sequence", seq) != BN_OK) return BN_ERR_ARG;
    if (n_keep > ctx->n_past[seq]) {
        bn_set_error(ctx->error, sizeof ctx->error,
                     "bn_seq_truncate: n_keep %" PRIu32 " is beyond the %" PRIu32 " positions of sequence %" PRIu32,
                     n_keep, ctx->n_past[seq], seq);
        return BN_ERR_ARG;
    }
    ctx->n_past[seq] = n_keep;
    return BN_OK;
}

bn_status bn_seq_copy(bn_context *ctx, uint32_t src, uint32_t dst, uint32_t n) {
    if (ctx == NULL) return BN_ERR_ARG;
    if (check_seq(ctx, "bn_seq_copy", "source sequence", src) != BN_OK ||
        check_seq(ctx, "bn_seq_copy", "destination sequence", dst) != BN_OK)
        return BN_ERR_ARG;
    if (n > ctx->n_past[src]) {
        bn_set_error(ctx->error, sizeof ctx->error,
                     "bn_seq_copy: n %" PRIu32 " is beyond the %" PRIu32 " positions of sequence %" PRIu32, n,
                     ctx->n_past[src], src);
        return BN_ERR_ARG;
    }
    if (src != dst) {
        const size_t bytes = (size_t)(bn_kv_offset(ctx, 0, 0, n) - bn_kv_offset(ctx, 0, 0, 0));
        for (uint32_t il = 0; il < ctx->model->hp.n_layers; il++) {
            memcpy((char *)ctx->key_cache + bn_kv_offset(ctx, il, dst, 0),
                   (const char *)ctx->key_cache + bn_kv_offset(ctx, il, src, 0), bytes);
            memcpy((char *)ctx->value_cache + bn_kv_offset(ctx, il, dst, 0),
                   (const char *)ctx->value_cache + bn_kv_offset(ctx, il, src, 0), bytes);
        }
    }
    ctx->n_past[dst] = n;
    return BN_OK;
}
