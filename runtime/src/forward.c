/* bn_decode / bn_eval: the BitNet b1.58 forward pass over a batch of tokens, for every family the
 * hyperparameters describe (activation, sub-norms, per-BitLinear input norms, weight-scale convention,
 * head_dim). A prompt, a single decoded token and tokens of several sequences go through the same code:
 * every op processes each token row of the batch on its own (the BitLinears' integer dot products are
 * exact, the float ops are per row), except attention, which reads the cache of the row's sequence up
 * to the row's position. So a row's results do not depend on what else is in the batch. */
#include <inttypes.h>
#include <string.h>

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
    const uint32_t *seq; /* [n_tok] each row's sequence */
    const uint32_t *pos; /* [n_tok] and position */
} attention_task;

/* Causal GQA attention of the batch's queries (ctx->q) over each row's sequence cache, the (row, head)
 * pairs split across workers; writes the concatenated heads into ctx->xb. */
static void attention_worker(void *arg, uint32_t ith, uint32_t nth) {
    const attention_task *task = arg;
    bn_context *ctx = task->ctx;
    const bn_hparams *hp = &ctx->model->hp;
    const uint32_t D = hp->head_dim, Q = hp->n_heads * D, group = hp->n_heads / hp->n_kv_heads;
    const uint64_t KV = (uint64_t)hp->n_kv_heads * D;
    float *att = ctx->att + (uint64_t)ith * ctx->n_ctx; /* [n_ctx] this worker's scores */
    uint64_t i0, i1;
    bn_split((uint64_t)task->n_tok * hp->n_heads, ith, nth, &i0, &i1);
    for (uint64_t i = i0; i < i1; i++) {
        const uint32_t t = (uint32_t)(i / hp->n_heads), h = (uint32_t)(i % hp->n_heads);
        const uint64_t row = (uint64_t)t * Q + (uint64_t)h * D;
        /* the head's kv group in row 0 of the sequence's cache: [n_pos][KV] rows from there */
        const uint64_t kv = bn_kv_offset(ctx, task->layer, task->seq[t], 0) + (h / group) * D * ctx->kv_elem;
        const char *kc = (const char *)ctx->key_cache + kv, *vc = (const char *)ctx->value_cache + kv;
        const uint32_t n_pos = task->pos[t] + 1;
        if (ctx->kv_type == BN_KV_F16)
            ctx->kern->attention_head_f16(ctx->xb + row, ctx->q + row, (const uint16_t *)kc, (const uint16_t *)vc, KV,
                                          n_pos, D, ctx->attn_scale, att);
        else
            ctx->kern->attention_head(ctx->xb + row, ctx->q + row, (const float *)kc, (const float *)vc, KV, n_pos, D,
                                      ctx->attn_scale, att);
    }
}

/* Row t of the chunk's keys and values (ctx->k, ctx->v [n][KV]) into its sequence's cache at its
 * position, rounded to f16 or copied. */
static void store_kv(bn_context *ctx, uint32_t il, uint32_t n, const uint32_t *seq, const uint32_t *pos) {
    const uint64_t KV = (uint64_t)ctx->model->hp.n_kv_heads * ctx->model->hp.head_dim;
    for (uint32_t t = 0; t < n; t++) {
        const float *k = ctx->k + t * KV, *v = ctx->v + t * KV;
        const uint64_t off = bn_kv_offset(ctx, il, seq[t], pos[t]);
        char *kc = (char *)ctx->key_cache + off, *vc = (char *)ctx->value_cache + off;
        if (ctx->kv_type == BN_KV_F16) {
            for (uint64_t i = 0; i < KV; i++) {
                ((uint16_t *)kc)[i] = bn_f32_to_fp16(k[i]);
                ((uint16_t *)vc)[i] = bn_f32_to_fp16(v[i]);
            }
        } else {
            memcpy(kc, k, KV * sizeof *k);
            memcpy(vc, v, KV * sizeof *v);
        }
    }
}

typedef struct {
    const bn_kernels *kern;
    const bn_dense_weight *head;
    const float *x;   /* [n_tok][H] */
    const int8_t *xq; /* [n_tok][H] x quantized, for an integer (Q8_R, Q6_B, Q4_B) head */
    const float *xs;  /* [n_tok] its scales */
    uint32_t n_tok;
    float *logits;    /* [n_tok][vocab] */
} head_task;

static void head_worker(void *arg, uint32_t ith, uint32_t nth) {
    const head_task *task = arg;
    const bn_dense_weight *w = task->head;
    uint64_t r0, r1;
    bn_split(w->rows, ith, nth, &r0, &r1);
    if (BN_ENC_IS_QUANT(w->encoding))
        bn_quant_matmul(task->kern, w->encoding, task->logits, w->rows, task->xq, w->cols, task->xs, task->n_tok,
                        w->data, w->rows, w->cols, (uint32_t)r0, (uint32_t)r1);
    else
        task->kern->dense_matmul(task->logits, w->rows, task->x, w->cols, task->n_tok, w->data, w->encoding,
                                 w->cols, (uint32_t)r0, (uint32_t)r1);
}

/* h = x + o_proj([attn_sub_norm](attention(input_layernorm(x)))), the rows' keys/values cached
 * (each BitLinear first RMSNorms its input with its own weight when the model has such norms). */
static void attention_block(bn_context *ctx, uint32_t il, uint32_t n, const uint32_t *seq, const uint32_t *pos) {
    const bn_hparams *hp = &ctx->model->hp;
    const bn_layer_weights *L = &ctx->model->w.layers[il];
    const uint32_t H = hp->hidden_size, D = hp->head_dim, Q = hp->n_heads * D, half = D / 2;
    const uint64_t KV = (uint64_t)hp->n_kv_heads * D;

    const input_task qkv_in = {ctx, ctx->x, NULL, L->attn_norm, ctx->xb, H, n, H, NULL};
    const linear_out qkv[3] = {{&L->q, ctx->q, Q, 0}, {&L->k, ctx->k, KV, 0}, {&L->v, ctx->v, KV, 0}};
    bitlinear(ctx, &qkv_in, qkv, 3);
    for (uint32_t t = 0; t < n; t++) {
        const float *c = ctx->rope_cos + (uint64_t)pos[t] * half, *s = ctx->rope_sin + (uint64_t)pos[t] * half;
        bn_rope(ctx->q + t * Q, hp->n_heads, D, c, s);
        bn_rope(ctx->k + t * KV, hp->n_kv_heads, D, c, s);
    }
    store_kv(ctx, il, n, seq, pos);
    attention_task task = {ctx, il, n, seq, pos};
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

/* Rows t < n (n <= n_batch), token[t] of sequence seq[t] at position pos[t], through every layer;
 * the logits of the rows with want[t] != 0 into `logits`, one vocab row each, in order. Returns the
 * number of logit rows written. */
static uint32_t forward_chunk(bn_context *ctx, const int32_t *tokens, const uint32_t *seq, const uint32_t *pos,
                              const int8_t *want, uint32_t n, float *logits) {
    const bn_model *m = ctx->model;
    const uint32_t H = m->hp.hidden_size;
    for (uint32_t t = 0; t < n; t++) {
        if (BN_ENC_IS_QUANT(m->w.embed.encoding))
            bn_quant_row_to_f32(ctx->x + t * H, m->w.embed.data, m->w.embed.encoding, m->w.embed.rows,
                                (uint64_t)tokens[t], H);
        else
            bn_dense_row_to_f32(ctx->x + t * H, m->w.embed.data, m->w.embed.encoding, (uint64_t)tokens[t], H);
    }
    for (uint32_t il = 0; il < m->hp.n_layers; il++) {
        attention_block(ctx, il, n, seq, pos);
        ffn_block(ctx, il, n);
    }
    uint32_t n_out = 0; /* the wanted rows, normed into xb [n_out][H] */
    for (uint32_t t = 0; t < n; t++)
        if (want[t]) bn_rmsnorm(ctx->xb + (size_t)n_out++ * H, ctx->x + t * H, m->w.norm, H, m->hp.rms_norm_eps);
    if (n_out == 0) return 0;
    if (BN_ENC_IS_QUANT(m->w.head.encoding)) /* per-token absmax int8, like the BitLinear inputs */
        for (uint32_t t = 0; t < n_out; t++)
            ctx->xs[t] = bn_quantize_row_i8_sym(ctx->xq + (size_t)t * H, ctx->xb + (size_t)t * H, H);
    head_task task = {ctx->kern, &m->w.head, ctx->xb, ctx->xq, ctx->xs, n_out, logits};
    bn_pool_run(ctx->pool, head_worker, &task);
    return n_out;
}

/* BN_OK when every token id is in the vocabulary, else a message naming the first bad one. */
static bn_status check_tokens(bn_context *ctx, const int32_t *tokens, uint32_t n) {
    const uint32_t vocab = ctx->model->hp.vocab_size;
    for (uint32_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || (uint32_t)tokens[i] >= vocab) {
            bn_set_error(ctx->error, sizeof ctx->error, "token id %" PRId32 " at index %" PRIu32 " is out of range [0, %" PRIu32 ")",
                         tokens[i], i, vocab);
            return BN_ERR_ARG;
        }
    }
    return BN_OK;
}

bn_status bn_eval(bn_context *ctx, const int32_t *tokens, uint32_t n_tokens, uint32_t pos, float *logits,
                  int all_logits) {
    if (ctx == NULL) return BN_ERR_ARG;
    const uint32_t vocab = ctx->model->hp.vocab_size;
    if (tokens == NULL || n_tokens == 0) {
        bn_set_error(ctx->error, sizeof ctx->error, "no tokens given");
        return BN_ERR_ARG;
    }
    if (pos > ctx->n_past[0]) {
        bn_set_error(ctx->error, sizeof ctx->error,
                     "position %" PRIu32 " is beyond the %" PRIu32 " cached positions", pos, ctx->n_past[0]);
        return BN_ERR_ARG;
    }
    if ((uint64_t)pos + n_tokens > ctx->n_ctx) {
        bn_set_error(ctx->error, sizeof ctx->error,
                     "prompt of %" PRIu32 " tokens at position %" PRIu32 " does not fit in the context of %" PRIu32,
                     n_tokens, pos, ctx->n_ctx);
        return BN_ERR_CONTEXT;
    }
    if (check_tokens(ctx, tokens, n_tokens) != BN_OK) return BN_ERR_ARG;
    for (uint32_t start = 0; start < n_tokens; start += ctx->n_batch) {
        const uint32_t n = n_tokens - start < ctx->n_batch ? n_tokens - start : ctx->n_batch;
        for (uint32_t t = 0; t < n; t++) {
            ctx->chunk_seq[t] = 0;
            ctx->chunk_pos[t] = pos + start + t;
            ctx->chunk_want[t] = logits && (all_logits || start + t == n_tokens - 1);
        }
        float *out = logits && all_logits ? logits + (size_t)start * vocab : logits;
        forward_chunk(ctx, tokens + start, ctx->chunk_seq, ctx->chunk_pos, ctx->chunk_want, n, out);
    }
    ctx->n_past[0] = pos + n_tokens;
    ctx->n_evaluated += n_tokens;
    return BN_OK;
}

/* BN_OK when every row's sequence exists and the rows of each sequence continue it at consecutive
 * positions inside the context; ctx->next_pos then holds every sequence's length after the batch. */
static bn_status check_batch(bn_context *ctx, const bn_batch *b) {
    if (b == NULL || b->n_tokens == 0 || b->token == NULL || b->seq_id == NULL || b->pos == NULL) {
        bn_set_error(ctx->error, sizeof ctx->error,
                     "bn_decode: the batch must have n_tokens > 0 and non-NULL token, seq_id and pos arrays");
        return BN_ERR_ARG;
    }
    if (check_tokens(ctx, b->token, b->n_tokens) != BN_OK) return BN_ERR_ARG;
    memcpy(ctx->next_pos, ctx->n_past, ctx->n_seq * sizeof *ctx->next_pos);
    for (uint32_t i = 0; i < b->n_tokens; i++) {
        const uint32_t s = b->seq_id[i];
        if (s >= ctx->n_seq) {
            bn_set_error(ctx->error, sizeof ctx->error,
                         "sequence id %" PRIu32 " at index %" PRIu32 " is out of range [0, %" PRIu32 ")", s, i,
                         ctx->n_seq);
            return BN_ERR_ARG;
        }
        if (b->pos[i] != ctx->next_pos[s]) {
            bn_set_error(ctx->error, sizeof ctx->error,
                         "token at index %" PRIu32 " of sequence %" PRIu32 " is at position %" PRIu32
                         ", expected %" PRIu32 " (the sequence's next position; truncate it to rewind)",
                         i, s, b->pos[i], ctx->next_pos[s]);
            return BN_ERR_ARG;
        }
        if (b->pos[i] >= ctx->n_ctx) {
            bn_set_error(ctx->error, sizeof ctx->error,
                         "token at index %" PRIu32 " of sequence %" PRIu32 " at position %" PRIu32
                         " does not fit in the context of %" PRIu32,
                         i, s, b->pos[i], ctx->n_ctx);
            return BN_ERR_CONTEXT;
        }
        ctx->next_pos[s]++;
    }
    return BN_OK;
}

bn_status bn_decode(bn_context *ctx, const bn_batch *batch, float *out) {
    if (ctx == NULL) return BN_ERR_ARG;
    const bn_status status = check_batch(ctx, batch);
    if (status != BN_OK) return status;
    const uint32_t n_tokens = batch->n_tokens, vocab = ctx->model->hp.vocab_size;
    for (uint32_t start = 0; start < n_tokens; start += ctx->n_batch) {
        const uint32_t n = n_tokens - start < ctx->n_batch ? n_tokens - start : ctx->n_batch;
        const int8_t *want = ctx->chunk_want;
        if (out && batch->logits) want = batch->logits + start;
        else
            for (uint32_t t = 0; t < n; t++) ctx->chunk_want[t] = out && !batch->logits && start + t == n_tokens - 1;
        const uint32_t rows = forward_chunk(ctx, batch->token + start, batch->seq_id + start, batch->pos + start, want,
                                            n, out);
        if (out) out += (size_t)rows * vocab;
    }
    memcpy(ctx->n_past, ctx->next_pos, ctx->n_seq * sizeof *ctx->n_past);
    ctx->n_evaluated += n_tokens;
    return BN_OK;
}
