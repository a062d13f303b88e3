/* The kernels' introspection API (bitnet.h, "kernels" section): run any available variant on given
 * inputs, so that tests can compare variants and benchmarks can time them. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bitnet_dev.h"
#include "cpu.h"
#include "kernels.h"
#include "model_file.h"
#include "ops.h"
#include "threadpool.h"

uint32_t bn_kernels_count(void) { return bn_kernels_n_available(); }

const char *bn_kernels_name(uint32_t variant) {
    const bn_kernels *k = bn_kernels_available(variant);
    return k ? k->name : NULL;
}

uint32_t bn_kernels_selected(void) {
    const bn_kernels *sel = bn_kernels_select();
    for (uint32_t i = 0; i < bn_kernels_n_available(); i++)
        if (bn_kernels_available(i) == sel) return i;
    return 0;
}

const char *bn_kernels_cpu_features(void) { return bn_cpu_features_string(); }

typedef struct {
    const bn_kernels *k;
    uint32_t encoding; /* I2, TL1, TL2: the ternary kernel; Q8_R, Q6_B, Q4_B: the integer head's; else the dense one */
    void *y;
    const void *x;
    uint32_t n_tok;
    const void *w;
    uint32_t rows, cols;
    const float *xs; /* integer heads: the activations' per-token scales */
} run_task;

static void run_worker(void *arg, uint32_t ith, uint32_t nth) {
    const run_task *t = arg;
    uint64_t r0, r1;
    bn_split(t->rows, ith, nth, &r0, &r1);
    if (BN_ENC_IS_QUANT(t->encoding))
        bn_quant_matmul(t->k, t->encoding, t->y, t->rows, t->x, t->cols, t->xs, t->n_tok, t->w, t->rows, t->cols,
                        (uint32_t)r0, (uint32_t)r1);
    else if (BN_ENC_IS_TERNARY(t->encoding))
        bn_kernels_ternary(t->k, t->encoding)(t->y, t->rows, t->x, t->cols, t->n_tok, t->w, t->cols, (uint32_t)r0,
                                              (uint32_t)r1);
    else
        t->k->dense_matmul(t->y, t->rows, t->x, t->cols, t->n_tok, t->w, t->encoding, t->cols, (uint32_t)r0,
                           (uint32_t)r1);
}

static bn_status run(uint32_t variant, uint32_t n_threads, run_task *task) {
    task->k = bn_kernels_available(variant);
    if (!task->k || !task->y || (!task->x && task->cols) || (!task->w && task->cols) ||
        task->encoding >= BN_ENC_COUNT)
        return BN_ERR_ARG;
    if (n_threads <= 1) {
        run_worker(task, 0, 1);
        return BN_OK;
    }
    bn_pool *pool;
    bn_status st = bn_pool_new(&pool, n_threads);
    if (st != BN_OK) return st;
    bn_pool_run(pool, run_worker, task);
    bn_pool_free(pool);
    return BN_OK;
}

bn_status bn_kernels_i2_matmul(uint32_t variant, uint32_t n_threads, int32_t *y, const int8_t *x, uint32_t n_tok,
                               const uint8_t *w, uint32_t rows, uint32_t cols) {
    run_task task = {NULL, BN_ENC_I2, y, x, n_tok, w, rows, cols, NULL};
    return run(variant, n_threads, &task);
}

bn_status bn_kernels_ternary_matmul(uint32_t variant, uint32_t encoding, uint32_t n_threads, int32_t *y,
                                    const int8_t *x, uint32_t n_tok, const uint8_t *w, uint32_t rows, uint32_t cols) {
    if (!BN_ENC_IS_TERNARY(encoding)) return BN_ERR_ARG;
    run_task task = {NULL, encoding, y, x, n_tok, w, rows, cols, NULL};
    return run(variant, n_threads, &task);
}

bn_status bn_kernels_dense_matmul(uint32_t variant, uint32_t n_threads, float *y, const float *x, uint32_t n_tok,
                                  const void *w, uint32_t encoding, uint32_t rows, uint32_t cols) {
    if (encoding >= BN_ENC_COUNT || bn_encodings[encoding].kind != BN_KIND_FLOAT) return BN_ERR_ARG;
    run_task task = {NULL, encoding, y, x, n_tok, w, rows, cols, NULL};
    return run(variant, n_threads, &task);
}

bn_status bn_kernels_quant_matmul(uint32_t variant, uint32_t encoding, uint32_t n_threads, float *y, const int8_t *x,
                                  const float *xs, uint32_t n_tok, const uint8_t *w, uint32_t rows, uint32_t cols) {
    if (!BN_ENC_IS_QUANT(encoding) || (!xs && n_tok)) return BN_ERR_ARG;
    if (x)
        for (size_t i = 0; i < (size_t)n_tok * cols; i++)
            if (x[i] == -128) return BN_ERR_ARG; /* outside the kernels' contract */
    run_task task = {NULL, encoding, y, x, n_tok, w, rows, cols, xs};
    return run(variant, n_threads, &task);
}

bn_status bn_kernels_q8_matmul(uint32_t variant, uint32_t n_threads, float *y, const int8_t *x, const float *xs,
                               uint32_t n_tok, const uint8_t *w, uint32_t rows, uint32_t cols) {
    return bn_kernels_quant_matmul(variant, BN_ENC_Q8R, n_threads, y, x, xs, n_tok, w, rows, cols);
}

bn_status bn_kernels_quantize_rows(uint32_t variant, int8_t *q, float *s, const float *x, uint32_t n_rows,
                                   uint32_t cols) {
    const bn_kernels *k = bn_kernels_available(variant);
    if (!k || ((!q || !s || !x) && n_rows)) return BN_ERR_ARG;
    for (uint32_t r = 0; r < n_rows; r++) s[r] = k->quantize_row(q + (size_t)r * cols, x + (size_t)r * cols, cols);
    return BN_OK;
}

bn_status bn_kernels_attention_head(uint32_t variant, float *out, const float *q, const float *k, const float *v,
                                    uint64_t stride, uint32_t n_pos, uint32_t D, float scale) {
    const bn_kernels *kern = bn_kernels_available(variant);
    if (!kern || !out || !q || !k || !v || n_pos == 0 || stride < D) return BN_ERR_ARG;
    float *att = malloc((size_t)n_pos * sizeof *att);
    if (!att) return BN_ERR_NOMEM;
    kern->attention_head(out, q, k, v, stride, n_pos, D, scale, att);
    free(att);
    return BN_OK;
}

bn_status bn_kernels_attention_head_f16(uint32_t variant, float *out, const float *q, const float *k, const float *v,
                                        uint64_t stride, uint32_t n_pos, uint32_t D, float scale) {
    const bn_kernels *kern = bn_kernels_available(variant);
    if (!kern || !out || !q || !k || !v || n_pos == 0 || stride < D) return BN_ERR_ARG;
    const uint64_t n = (uint64_t)(n_pos - 1) * stride + D; /* the elements the head reads */
    float *att = malloc((size_t)n_pos * sizeof *att);
    uint16_t *k16 = malloc((size_t)n * sizeof *k16), *v16 = malloc((size_t)n * sizeof *v16);
    if (att && k16 && v16) {
        for (uint64_t i = 0; i < n; i++) k16[i] = bn_f32_to_fp16(k[i]), v16[i] = bn_f32_to_fp16(v[i]);
        kern->attention_head_f16(out, q, k16, v16, stride, n_pos, D, scale, att);
    }
    free(att);
    free(k16);
    free(v16);
    return att && k16 && v16 ? BN_OK : BN_ERR_NOMEM;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t next_rand(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

bn_status bn_kernels_time(uint32_t variant, uint32_t encoding, uint32_t n_threads, uint32_t n_tok, uint32_t rows,
                          uint32_t cols, uint32_t repeats, uint64_t min_weight_bytes, double *seconds) {
    const bn_kernels *k = bn_kernels_available(variant);
    if (!k || encoding >= BN_ENC_COUNT || !seconds || rows == 0 || cols == 0 || n_tok == 0) return BN_ERR_ARG;
    const int quant = BN_ENC_IS_QUANT(encoding), ternary = BN_ENC_IS_TERNARY(encoding);
    const uint64_t dims[2] = {rows, cols};
    const size_t w_bytes = (size_t)bn_encodings[encoding].nbytes(dims, (uint64_t)rows * cols);
    size_t copies = min_weight_bytes > w_bytes ? (size_t)((min_weight_bytes + w_bytes - 1) / w_bytes) : 1;
    const size_t x_size = ternary || quant ? 1 : sizeof(float), y_size = 4;
    unsigned char *w = malloc(w_bytes * copies);
    unsigned char *x = malloc((size_t)n_tok * cols * x_size);
    unsigned char *y = malloc((size_t)n_tok * rows * y_size);
    float *xs = malloc((size_t)n_tok * sizeof(float));
    bn_pool *pool = NULL;
    bn_status st = (!w || !x || !y || !xs) ? BN_ERR_NOMEM : bn_pool_new(&pool, n_threads ? n_threads : 1);
    if (st != BN_OK) goto done;
    uint64_t s = 0x9e3779b97f4a7c15u;
    if (ternary) { /* any bytes: every kernel reads invalid codes as 0, and all bytes cost the same */
        for (size_t i = 0; i < w_bytes * copies; i++) w[i] = (unsigned char)next_rand(&s);
        for (size_t i = 0; i < (size_t)n_tok * cols; i++) x[i] = (unsigned char)next_rand(&s);
    } else if (quant) { /* random integer rows (any bytes are valid) with unit row scales, activations in [-127, 127] */
        for (size_t c = 0; c < copies; c++) {
            unsigned char *wc = w + c * w_bytes;
            for (uint32_t r = 0; r < rows; r++) memcpy(wc + 4 * (size_t)r, &(float){1.0f}, 4);
            for (size_t i = 4 * (size_t)rows; i < w_bytes; i++) wc[i] = (unsigned char)next_rand(&s);
        }
        for (size_t i = 0; i < (size_t)n_tok * cols; i++) x[i] = (unsigned char)(next_rand(&s) % 255 + 129);
        for (uint32_t t = 0; t < n_tok; t++) xs[t] = 1.0f;
    } else {
        for (size_t i = 0; i < w_bytes * copies; i += 2) { /* small finite values in every 16-bit encoding */
            uint16_t h = (uint16_t)(0x3000 + (next_rand(&s) & 0x0fff));
            memcpy(w + i, &h, 2);
        }
        float *xf = (float *)x;
        for (size_t i = 0; i < (size_t)n_tok * cols; i++) xf[i] = (float)(next_rand(&s) % 2001) / 1000.0f - 1.0f;
    }
    run_task task = {k, encoding, y, x, n_tok, NULL, rows, cols, xs};
    for (uint32_t i = 0; i <= repeats; i++) { /* one untimed warm-up call */
        task.w = w + (i % copies) * w_bytes;
        double t0 = now_s();
        bn_pool_run(pool, run_worker, &task);
        double t1 = now_s();
        if (i > 0) seconds[i - 1] = t1 - t0;
    }
done:
    bn_pool_free(pool);
    free(w);
    free(x);
    free(y);
    free(xs);
    return st;
}
