/* bn_eval: the BitNet b1.58 forward pass over a batch of tokens, for every family the hyperparameters
 * describe (activation, sub-norms, per-BitLinear input norms, weight-scale convention, head_dim). A prompt and a single decoded
 * token go through the same code; every op processes each token row of the batch. */
#include <inttypes.h>

#include "context.h"
#include "error.h"
#include "ops.h"

/* One output of a fused BitLinear call: y[t*ldy + r] (+)= dot(q_t, w_r) / s_t * scale. */
typedef struct {
    const bn_ternary_weight *w;
    float *y;
    size_t ldy;
    int accumulate; /* add to y: the residual connection */
} linear_out;

/* Up to three BitLinears sharing one quantized input (q/k/v, gate/up), split by output rows. */
typedef struct {
    const bn_kernels *kern;
    const int8_t *xq; /* [n_tok][cols] */
    const float *xs;  /* [n_tok] */
    uint32_t n_tok;
    uint32_t cols;
    int32_t *acc;     /* [n_tok][total_rows] */
    uint32_t total_rows;
    uint32_t n_out;
    linear_out out[3];
} linear_task;

/* acc[t*ldy + r] = dot(xq_t, w_r) for r0 <= r < r1, with the kernel of w's encoding. */
static void ternary_matmul(const bn_kernels *kern, const bn_ternary_weight *w, int32_t *acc, size_t ldy,
                           const int8_t *xq, uint32_t n_tok, uint32_t r0, uint32_t r1) {
    bn_kernels_ternary(kern, w->encoding)(acc, ldy, xq, w->cols, n_tok, w->data, w->cols, r0, r1);
}

static void linear_worker(void *arg, uint32_t ith, uint32_t nth) {
    const linear_task *task = arg;
    uint64_t lo, hi;
    bn_split(task->total_rows, ith, nth, &lo, &hi);
    uint64_t base = 0; /* first row of out[o] among the concatenated rows */
    for (uint32_t o = 0; o < task->n_out; base += task->out[o].w->rows, o++) {
        const linear_out *out = &task->out[o];
        const bn_ternary_weight *w = out->w;
        if (hi <= base || lo >= base + w->rows) continue; /* no rows of this output in our share */
        uint64_t r0 = lo > base ? lo - base : 0;
        uint64_t r1 = hi - base < w->rows ? hi - base : w->rows;
        int32_t *acc = task->acc + base;
        ternary_matmul(task->kern, w, acc, task->total_rows, task->xq, task->n_tok, (uint32_t)r0, (uint32_t)r1);
        for (uint32_t t = 0; t < task->n_tok; t++) {
            const int32_t *at = acc + (size_t)t * task->total_rows;
            float *yt = out->y + t * out->ldy;
            for (uint64_t r = r0; r < r1; r++) {
                float v = bn_bitlinear_output(at[r], task->xs[t], w->scale, w->scale_divides);
                yt[r] = out->accumulate ? yt[r] + v : v;
            }
        }
    }
}

/* The input side of a BitLinear, per token row t < n (rows ld apart):
 *   [src_t = act(src_t) * up_t]              (the FFN's gate, when up is not NULL)
 *   dst_t = rmsnorm(src_t) * norm            (when norm is not NULL; else dst is src)
 *   [dst_t = rmsnorm(dst_t) * linear_norm]   (the BitLinear's own input norm, when not NULL)
 *   ctx->xq_t, ctx->xs[t] = the int8 quantization of dst_t. */
typedef struct {
    bn_context *ctx;
    float *src;
    const float *up; /* NULL, or [n][cols] rows ld apart */
    const float *norm;
    float *dst;      /* may be src */
    size_t ld;
    uint32_t n;
    uint32_t cols;
    const float *linear_norm; /* [cols] or NULL */
} input_task;

static void input_worker(void *arg, uint32_t ith, uint32_t nth) {
    const input_task *task = arg;
    bn_context *ctx = task->ctx;
    const bn_hparams *hp = &ctx->model->hp;
    uint64_t t0, t1;
    bn_split(task->n, ith, nth, &t0, &t1);
    for (uint64_t t = t0; t < t1; t++) {
        float *src = task->src + t * task->ld, *dst = task->dst + t * task->ld;
        if (task->up && hp->hidden_act == BN_ACT_SILU) bn_silu_gate(src, task->up + t * task->ld, task->cols);
        else if (task->up) bn_relu2_gate(src, task->up + t * task->ld, task->cols);
        if (task->norm) bn_rmsnorm(dst, src, task->norm, task->cols, hp->rms_norm_eps);
        if (task->linear_norm) bn_rmsnorm(dst, dst, task->linear_norm, task->cols, hp->linear_norm_eps);
        ctx->xs[t] = ctx->kern->quantize_row(ctx->xq + t * task->cols, dst, task->cols);
    }
}

/* Prepares the input (above), split by tokens, then runs the BitLinears `outs` on it, split by rows.
 * BitLinears with their own input norms each quantize their own input, so they run one at a time
 * (the input recomputed from src each time: src must not be dst then). */
static void bitlinear(bn_context *ctx, const input_task *input, const linear_out *outs, uint32_t n_out) {
    if (outs[0].w->input_norm) {
        for (uint32_t o = 0; o < n_out; o++) {
            input_task own = *input;
            own.linear_norm = outs[o].w->input_norm;
            if (own.n > 1) bn_pool_run(ctx->pool, input_worker, &own);
            else input_worker(&own, 0, 1);
            linear_task task = {ctx->kern, ctx->xq, ctx->xs, own.n, own.cols, ctx->acc, outs[o].w->rows, 1, {outs[o]}};
            bn_pool_run(ctx->pool, linear_worker, &task);
        }
        return;
    }
    if (input->n > 1) bn_pool_run(ctx->pool, input_worker, (void *)input);
    else input_worker((void *)input, 0, 1);
    linear_task task = {ctx->kern, ctx->xq, ctx->xs, input->n, input->cols, ctx->acc, 0, n_out, {{0}}};
    for (uint32_t o = 0; o < n_out; o++) {
        task.out[o] = outs[o];
        task.total_rows += outs[o].w->rows;
    }
    bn_pool_run(ctx->pool, linear_worker, &task);
}

typedef struct {
    bn_context *ctx;
    uint32_t layer;
    uint32_t n_tok;
    uint32_t pos;
} attention_task;

/* Causal GQA attention of the batch's queries (ctx->q) over the cache, heads split across workers;
 * writes the concatenated heads into ctx->xb. */
static void attention_worker(void *arg, uint32_t ith, uint32_t nth) {
    const attention_task *task = arg;
    bn_context *ctx = task->ctx;
    const bn_hparams *hp = &ctx->model->hp;
    const uint32_t D = hp->head_dim, Q = hp->n_heads * D, group = hp->n_heads / hp->n_kv_heads;
    const uint64_t KV = (uint64_t)hp->n_kv_heads * D;
    const float *kc = ctx->key_cache + (uint64_t)task->layer * ctx->n_ctx * KV;
    const float *vc = ctx->value_cache + (uint64_t)task->layer * ctx->n_ctx * KV;
    uint64_t h0, h1;
    bn_split(hp->n_heads, ith, nth, &h0, &h1);
    for (uint64_t h = h0; h < h1; h++) {
        const uint64_t kv_off = (h / group) * D;
        float *att = ctx->att + h * ctx->n_ctx;
        for (uint32_t t = 0; t < task->n_tok; t++) {
            const uint64_t row = (uint64_t)t * Q + h * D;
            ctx->kern->attention_head(ctx->xb + row, ctx->q + row, kc + kv_off, vc + kv_off, KV, task->pos + t + 1, D,
                              ctx->attn_scale, att);
        }
    }
}

typedef struct {
    const bn_kernels *kern;
    const bn_dense_weight *head;
    const float *x;   /* [n_tok][H] */
    const int8_t *xq; /* [n_tok][H] x quantized, for a Q8_R head */
    const float *xs;  /* [n_tok] its scales */
    uint32_t n_tok;
    float *logits;    /* [n_tok][vocab] */
} head_task;

static void head_worker(void *arg, uint32_t ith, uint32_t nth) {
    const head_task *task = arg;
    const bn_dense_weight *w = task->head;
    uint64_t r0, r1;
    bn_split(w->rows, ith, nth, &r0, &r1);
    if (w->encoding == BN_ENC_Q8R)
        task->kern->q8_matmul(task->logits, w->rows, task->xq, w->cols, task->xs, task->n_tok,
                              bn_q8r_rows(w->data, w->rows), bn_q8r_scales(w->data), w->cols, (uint32_t)r0,
                              (uint32_t)r1);
    else
        task->kern->dense_matmul(task->logits, w->rows, task->x, w->cols, task->n_tok, w->data, w->encoding,
                                 w->cols, (uint32_t)r0, (uint32_t)r1);
}

/* h = x + o_proj([attn_sub_norm](attention(input_layernorm(x)))), keys/values of the batch cached
 * (each BitLinear first RMSNorms its input with its own weight when the model has such norms). */
static void attention_block(bn_context *ctx, uint32_t il, uint32_t n, uint32_t pos) {
    const bn_hparams *hp = &ctx->model->hp;
    const bn_layer_weights *L = &ctx->model->w.layers[il];
    const uint32_t H = hp->hidden_size, D = hp->head_dim, Q = hp->n_heads * D, half = D / 2;
    const uint64_t KV = (uint64_t)hp->n_kv_heads * D;
    float *k = ctx->key_cache + ((uint64_t)il * ctx->n_ctx + pos) * KV;   /* [n][KV] rows pos.. */
    float *v = ctx->value_cache + ((uint64_t)il * ctx->n_ctx + pos) * KV; /* [n][KV] */

    const input_task qkv_in = {ctx, ctx->x, NULL, L->attn_norm, ctx->xb, H, n, H, NULL};
    const linear_out qkv[3] = {{&L->q, ctx->q, Q, 0}, {&L->k, k, KV, 0}, {&L->v, v, KV, 0}};
    bitlinear(ctx, &qkv_in, qkv, 3);
    for (uint32_t t = 0; t < n; t++) {
        const float *c = ctx->rope_cos + (uint64_t)(pos + t) * half, *s = ctx->rope_sin + (uint64_t)(pos + t) * half;
        bn_rope(ctx->q + t * Q, hp->n_heads, D, c, s);
        bn_rope(k + t * KV, hp->n_kv_heads, D, c, s);
    }
    attention_task task = {ctx, il, n, pos};
    bn_pool_run(ctx->pool, attention_worker, &task);
    const input_task o_in = {ctx, ctx->xb, NULL, L->attn_sub_norm, ctx->xb, Q, n, Q, NULL};
    const linear_out o = {&L->o, ctx->x, H, 1};
    bitlinear(ctx, &o_in, &o, 1);
}

/* x = h + down_proj([ffn_sub_norm](act(gate_proj(n)) * up_proj(n))), n = post_attention_layernorm(h),
 * act = relu^2 or SiLU. */
static void ffn_block(bn_context *ctx, uint32_t il, uint32_t n) {
    const bn_hparams *hp = &ctx->model->hp;
    const bn_layer_weights *L = &ctx->model->w.layers[il];
    const uint32_t H = hp->hidden_size, I = hp->intermediate_size;

    const input_task gate_up_in = {ctx, ctx->x, NULL, L->ffn_norm, ctx->xb, H, n, H, NULL};
    const linear_out gate_up[2] = {{&L->gate, ctx->gate, I, 0}, {&L->up, ctx->up, I, 0}};
    bitlinear(ctx, &gate_up_in, gate_up, 2);
    const input_task down_in = {ctx, ctx->gate, ctx->up, L->ffn_sub_norm, ctx->gate, I, n, I, NULL};
    const linear_out down = {&L->down, ctx->x, H, 1};
    bitlinear(ctx, &down_in, &down, 1);
}

/* Tokens at positions pos..pos+n-1 (n <= n_batch) through every layer; logits of rows
 * [first_logit, n) into `logits` when it is not NULL. */
static void forward_chunk(bn_context *ctx, const int32_t *tokens, uint32_t n, uint32_t pos, float *logits,
                          uint32_t first_logit) {
    const bn_model *m = ctx->model;
    const uint32_t H = m->hp.hidden_size;
    for (uint32_t t = 0; t < n; t++) {
        if (m->w.embed.encoding == BN_ENC_Q8R)
            bn_q8r_row_to_f32(ctx->x + t * H, m->w.embed.data, m->w.embed.rows, (uint64_t)tokens[t], H);
        else
            bn_dense_row_to_f32(ctx->x + t * H, m->w.embed.data, m->w.embed.encoding, (uint64_t)tokens[t], H);
    }
    for (uint32_t il = 0; il < m->hp.n_layers; il++) {
        attention_block(ctx, il, n, pos);
        ffn_block(ctx, il, n);
    }
    if (logits == NULL) return;
    for (uint32_t t = first_logit; t < n; t++) bn_rmsnorm(ctx->xb + t * H, ctx->x + t * H, m->w.norm, H, m->hp.rms_norm_eps);
    const float *xh = ctx->xb + (size_t)first_logit * H;
    if (m->w.head.encoding == BN_ENC_Q8R) /* per-token absmax int8, like the BitLinear inputs */
        for (uint32_t t = 0; t < n - first_logit; t++)
            ctx->xs[t] = bn_quantize_row_i8_sym(ctx->xq + (size_t)t * H, xh + (size_t)t * H, H);
    head_task task = {ctx->kern, &m->w.head, xh, ctx->xq, ctx->xs, n - first_logit, logits};
    bn_pool_run(ctx->pool, head_worker, &task);
}

bn_status bn_eval(bn_context *ctx, const int32_t *tokens, uint32_t n_tokens, uint32_t pos, float *logits,
                  int all_logits) {
    if (ctx == NULL) return BN_ERR_ARG;
    const uint32_t vocab = ctx->model->hp.vocab_size;
    if (tokens == NULL || n_tokens == 0) {
        bn_set_error(ctx->error, sizeof ctx->error, "no tokens given");
        return BN_ERR_ARG;
    }
    if (pos > ctx->n_past) {
        bn_set_error(ctx->error, sizeof ctx->error,
                     "position %" PRIu32 " is beyond the %" PRIu32 " cached positions", pos, ctx->n_past);
        return BN_ERR_ARG;
    }
    if ((uint64_t)pos + n_tokens > ctx->n_ctx) {
        bn_set_error(ctx->error, sizeof ctx->error,
                     "prompt of %" PRIu32 " tokens at position %" PRIu32 " does not fit in the context of %" PRIu32,
                     n_tokens, pos, ctx->n_ctx);
        return BN_ERR_CONTEXT;
    }
    for (uint32_t i = 0; i < n_tokens; i++) {
        if (tokens[i] < 0 || (uint32_t)tokens[i] >= vocab) {
            bn_set_error(ctx->error, sizeof ctx->error,
                         "token id %" PRId32 " at index %" PRIu32 " (position %" PRIu32
                         ") is out of range [0, %" PRIu32 ")",
                         tokens[i], i, pos + i, vocab);
            return BN_ERR_ARG;
        }
    }
    for (uint32_t start = 0; start < n_tokens; start += ctx->n_batch) {
        uint32_t n = n_tokens - start < ctx->n_batch ? n_tokens - start : ctx->n_batch;
        int last = start + n == n_tokens;
        float *out = NULL;
        uint32_t first_logit = 0;
        if (logits && all_logits) out = logits + (size_t)start * vocab;
        else if (logits && last) out = logits, first_logit = n - 1;
        forward_chunk(ctx, tokens + start, n, pos + start, out, first_logit);
    }
    ctx->n_past = pos + n_tokens;
    return BN_OK;
}
