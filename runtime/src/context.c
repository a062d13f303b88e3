/* bn_context: allocation of the cache and work buffers, RoPE tables, thread pool. */
#include "context.h"

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <unistd.h>

#include "error.h"

#define BN_MAX_THREADS 1024

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

static int build_buffers(bn_context *ctx) {
    const bn_hparams *hp = &ctx->model->hp;
    const uint64_t H = hp->hidden_size, I = hp->intermediate_size, B = ctx->n_batch;
    const uint64_t KV = (uint64_t)hp->n_kv_heads * hp->head_dim, Q = (uint64_t)hp->n_heads * hp->head_dim;
    const uint64_t cache = (uint64_t)hp->n_layers * ctx->n_ctx * KV; /* < 2^58 by the hparam bounds */
    const uint64_t rope = (uint64_t)ctx->n_ctx * (hp->head_dim / 2);
    const uint64_t HQ = H > Q ? H : Q, in_max = HQ > I ? HQ : I;
    const uint64_t fused = Q + 2 * KV > 2 * I ? Q + 2 * KV : 2 * I, acc_cols = fused > H ? fused : H;
    ctx->key_cache = alloc_array(cache, sizeof(float));
    ctx->value_cache = alloc_array(cache, sizeof(float));
    ctx->rope_cos = alloc_array(rope, sizeof(float));
    ctx->rope_sin = alloc_array(rope, sizeof(float));
    ctx->x = alloc_array(B * H, sizeof(float));
    ctx->xb = alloc_array(B * HQ, sizeof(float));
    ctx->q = alloc_array(B * Q, sizeof(float));
    ctx->gate = alloc_array(B * I, sizeof(float));
    ctx->up = alloc_array(B * I, sizeof(float));
    ctx->xq = alloc_array(B * in_max, sizeof(int8_t));
    ctx->xs = alloc_array(B, sizeof(float));
    ctx->acc = alloc_array(B * acc_cols, sizeof(int32_t));
    ctx->att = alloc_array((uint64_t)hp->n_heads * ctx->n_ctx, sizeof(float));
    return ctx->key_cache && ctx->value_cache && ctx->rope_cos && ctx->rope_sin && ctx->x && ctx->xb && ctx->q &&
           ctx->gate && ctx->up && ctx->xq && ctx->xs && ctx->acc && ctx->att;
}

static void free_buffers(bn_context *ctx) {
    free(ctx->key_cache);
    free(ctx->value_cache);
    free(ctx->rope_cos);
    free(ctx->rope_sin);
    free(ctx->x);
    free(ctx->xb);
    free(ctx->q);
    free(ctx->gate);
    free(ctx->up);
    free(ctx->xq);
    free(ctx->xs);
    free(ctx->acc);
    free(ctx->att);
}

bn_status bn_context_new(const bn_model *model, uint32_t n_ctx, uint32_t n_threads, bn_context **out, char *err,
                         size_t err_len) {
    bn_set_error(err, err_len, "%s", "");
    if (out == NULL || model == NULL) {
        bn_set_error(err, err_len, "bn_context_new: model and out must not be NULL");
        return BN_ERR_ARG;
    }
    *out = NULL;
    if (n_threads == 0) {
        long online = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = online < 1 ? 1 : online > BN_MAX_THREADS ? BN_MAX_THREADS : (uint32_t)online;
    }
    if (n_threads > BN_MAX_THREADS) {
        bn_set_error(err, err_len, "bn_context_new: n_threads %" PRIu32 " is more than %d", n_threads,
                     BN_MAX_THREADS);
        return BN_ERR_ARG;
    }
    bn_context *ctx = calloc(1, sizeof *ctx);
    if (ctx == NULL) {
        bn_set_error(err, err_len, "bn_context_new: out of memory");
        return BN_ERR_NOMEM;
    }
    ctx->model = model;
    ctx->kern = bn_kernels_select();
    ctx->n_ctx = n_ctx ? n_ctx : model->hp.context_length;
    ctx->n_batch = ctx->n_ctx < BN_MAX_BATCH ? ctx->n_ctx : BN_MAX_BATCH;
    /* head_dim ** -0.5 as transformers computes it (in double, then used as a float32 factor). */
    ctx->attn_scale = (float)pow((double)model->hp.head_dim, -0.5);
    if (!build_buffers(ctx)) {
        bn_set_error(err, err_len, "bn_context_new: out of memory for a context of %" PRIu32 " positions",
                     ctx->n_ctx);
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

void bn_context_free(bn_context *ctx) {
    if (ctx == NULL) return;
    bn_pool_free(ctx->pool);
    free_buffers(ctx);
    free(ctx);
}

uint32_t bn_context_n_ctx(const bn_context *ctx) { return ctx ? ctx->n_ctx : 0; }
uint32_t bn_context_n_threads(const bn_context *ctx) { return ctx ? bn_pool_n_threads(ctx->pool) : 0; }
uint32_t bn_context_n_past(const bn_context *ctx) { return ctx ? ctx->n_past : 0; }
const char *bn_context_error(const bn_context *ctx) { return ctx ? ctx->error : ""; }
