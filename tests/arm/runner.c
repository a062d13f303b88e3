/* A pipe front end of bitnet.h's kernel and evaluation API, so that a test on one machine can run the
 * runtime built for another CPU (tests/test_arm.py: cross-compiled for AArch64, run under qemu).
 *
 * Requests on stdin, one text line each, raw little-endian inputs after it; replies on stdout, a line
 * "ok N BYTES" then N outputs of BYTES bytes (kernels: one per variant usable here, in bitnet.h's
 * order, each computed into a poisoned buffer so that an entry left unwritten shows), or one line
 * "error MESSAGE". Requests (x, w as the bitnet.h kernel functions take them):
 *   variants                                  -> a line: the variant names, then the CPU features
 *   ternary ENC THREADS N_TOK ROWS COLS       + x int8 [n_tok][cols], w [bytes of ENC]  -> y int32 [n_tok][rows]
 *   dense ENC THREADS N_TOK ROWS COLS         + x f32 [n_tok][cols], w [rows][cols]     -> y f32 [n_tok][rows]
 *   q8 THREADS N_TOK ROWS COLS                + x int8, xs f32 [n_tok], w Q8_R          -> y f32 [n_tok][rows]
 *   quant ENC THREADS N_TOK ROWS COLS         + x int8, xs f32 [n_tok], w [bytes of ENC] -> y f32 [n_tok][rows]
 *       ENC an integer head encoding: Q8_R, Q6_B or Q4_B.
 *   quantize N_ROWS COLS                      + x f32 [n_rows][cols]       -> q int8 [n_rows][cols], s f32 [n_rows]
 *   attention KV N_POS D STRIDE SCALE_BITS    + q f32 [D], k, v f32 [n_pos][stride]     -> out f32 [D]
 *       KV f32: the float attention kernel; f16: k and v rounded to f16, then the f16 one.
 *   logits VARIANT THREADS KV N_TOK PATH      + tokens int32 [n_tok]
 *       -> one output: logits f32 [n_tok + 1][vocab], of the prompt evaluated at once from position 0,
 *          then of one decoding step (the first token again at position n_tok), with BITNET_RUN_KERNELS
 *          set to the variant's name and a KV cache of type KV (f16 or f32).
 * Exits at end of input (0) or on a malformed request (2). */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitnet_dev.h"

static void fail(const char *what) {
    printf("error %s\n", what);
    fflush(stdout);
    exit(2);
}

static void *read_input(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) fail("out of memory");
    if (n && fread(p, 1, n, stdin) != n) fail("input shorter than the request says");
    return p;
}

/* The outputs of every variant, [n_variants][bytes], each buffer filled with 0x5a first. */
static unsigned char *outputs(uint32_t n_variants, size_t bytes) {
    unsigned char *out = malloc(n_variants * bytes + 1);
    if (!out) fail("out of memory");
    memset(out, 0x5a, n_variants * bytes);
    return out;
}

static void reply(const void *data, uint32_t n, size_t bytes) {
    printf("ok %" PRIu32 " %zu\n", n, bytes);
    fwrite(data, 1, n * bytes, stdout);
    fflush(stdout);
}

static void check(bn_status st) {
    if (st != BN_OK) fail("a kernel returned an error status");
}

static int is_ternary(uint32_t enc) { return enc == BN_ENC_I2 || enc == BN_ENC_TL1 || enc == BN_ENC_TL2; }
static int is_quant(uint32_t enc) { return enc == BN_ENC_Q8R || enc == BN_ENC_Q6B || enc == BN_ENC_Q4B; }

static void matmul(const char *kind, const char *args) {
    const uint32_t nv = bn_kernels_count();
    uint32_t enc = BN_ENC_Q8R, nth, n_tok, rows, cols;
    const int q8 = strcmp(kind, "q8") == 0, quant = q8 || strcmp(kind, "quant") == 0;
    const int ternary = strcmp(kind, "ternary") == 0;
    if (q8 ? sscanf(args, "%" SCNu32 " %" SCNu32 " %" SCNu32 " %" SCNu32, &nth, &n_tok, &rows, &cols) != 4
           : sscanf(args, "%" SCNu32 " %" SCNu32 " %" SCNu32 " %" SCNu32 " %" SCNu32, &enc, &nth, &n_tok, &rows,
                    &cols) != 5)
        fail("bad matmul arguments");
    if (enc >= BN_ENC_COUNT || ternary != is_ternary(enc) || quant != is_quant(enc))
        fail("bad encoding for this request");
    const uint64_t dims[2] = {rows, cols};
    const uint64_t w_bytes = bn_encoding_nbytes(enc, 2, dims);
    if (w_bytes == 0) fail("bad shape for the encoding");
    const size_t x_bytes = (size_t)n_tok * cols * (ternary || quant ? 1 : 4), y_bytes = (size_t)n_tok * rows * 4;
    void *x = read_input(x_bytes);
    float *xs = quant ? read_input((size_t)n_tok * 4) : NULL;
    void *w = read_input((size_t)w_bytes);
    unsigned char *y = outputs(nv, y_bytes);
    for (uint32_t v = 0; v < nv; v++) {
        void *yv = y + v * y_bytes;
        if (ternary) check(bn_kernels_ternary_matmul(v, enc, nth, yv, x, n_tok, w, rows, cols));
        else if (q8) check(bn_kernels_q8_matmul(v, nth, yv, x, xs, n_tok, w, rows, cols));
        else if (quant) check(bn_kernels_quant_matmul(v, enc, nth, yv, x, xs, n_tok, w, rows, cols));
        else check(bn_kernels_dense_matmul(v, nth, yv, x, n_tok, w, enc, rows, cols));
    }
    reply(y, nv, y_bytes);
    free(x);
    free(xs);
    free(w);
    free(y);
}

static void quantize(const char *args) {
    const uint32_t nv = bn_kernels_count();
    uint32_t n_rows, cols;
    if (sscanf(args, "%" SCNu32 " %" SCNu32, &n_rows, &cols) != 2) fail("bad quantize arguments");
    float *x = read_input((size_t)n_rows * cols * 4);
    const size_t q_bytes = (size_t)n_rows * cols, bytes = q_bytes + (size_t)n_rows * 4;
    unsigned char *out = outputs(nv, bytes);
    float *s = malloc((size_t)n_rows * 4 + 4); /* copied after q, which need not leave them aligned */
    if (!s) fail("out of memory");
    for (uint32_t v = 0; v < nv; v++) {
        check(bn_kernels_quantize_rows(v, (int8_t *)(out + v * bytes), s, x, n_rows, cols));
        memcpy(out + v * bytes + q_bytes, s, (size_t)n_rows * 4);
    }
    reply(out, nv, bytes);
    free(x);
    free(s);
    free(out);
}

/* The KV cache type named by a request ("f16" or "f32"); fails on anything else. */
static bn_kv_type kv_type(const char *name) {
    if (strcmp(name, "f16") == 0) return BN_KV_F16;
    if (strcmp(name, "f32") == 0) return BN_KV_F32;
    fail("bad KV type (expected f16 or f32)");
    return BN_KV_F16;
}

static void attention(const char *args) {
    const uint32_t nv = bn_kernels_count();
    uint32_t n_pos, D, scale_bits;
    uint64_t stride;
    char kv[8];
    if (sscanf(args, "%7s %" SCNu32 " %" SCNu32 " %" SCNu64 " %" SCNu32, kv, &n_pos, &D, &stride, &scale_bits) != 5)
        fail("bad attention arguments");
    bn_status (*head)(uint32_t, float *, const float *, const float *, const float *, uint64_t, uint32_t, uint32_t,
                      float) = kv_type(kv) == BN_KV_F16 ? bn_kernels_attention_head_f16 : bn_kernels_attention_head;
    float scale;
    memcpy(&scale, &scale_bits, 4);
    float *q = read_input((size_t)D * 4), *k = read_input((size_t)n_pos * stride * 4),
          *v = read_input((size_t)n_pos * stride * 4);
    unsigned char *out = outputs(nv, (size_t)D * 4);
    for (uint32_t i = 0; i < nv; i++)
        check(head(i, (float *)(out + (size_t)i * D * 4), q, k, v, stride, n_pos, D, scale));
    reply(out, nv, (size_t)D * 4);
    free(q);
    free(k);
    free(v);
    free(out);
}

static void logits(const char *args) {
    uint32_t variant, nth, n_tok;
    char kv[8];
    int used = 0;
    if (sscanf(args, "%" SCNu32 " %" SCNu32 " %7s %" SCNu32 " %n", &variant, &nth, kv, &n_tok, &used) != 4 ||
        !used || n_tok == 0 || variant >= bn_kernels_count())
        fail("bad logits arguments");
    bn_context_params params = bn_context_default_params();
    params.n_threads = nth;
    params.kv_type = kv_type(kv);
    const char *path = args + used;
    int32_t *tokens = read_input((size_t)n_tok * 4);
    setenv("BITNET_RUN_KERNELS", bn_kernels_name(variant), 1);
    if (bn_kernels_selected() != variant) fail("BITNET_RUN_KERNELS did not select the variant");
    char err[256];
    bn_model *model;
    bn_context *ctx;
    if (bn_model_load(path, &model, err, sizeof err) != BN_OK) fail(err);
    if (bn_context_new_ext(model, &params, &ctx, err, sizeof err) != BN_OK) fail(err);
    if (bn_context_kv_type(ctx) != params.kv_type) fail("the context has another KV type than asked for");
    bn_hparams hp;
    bn_model_hparams(model, &hp);
    const size_t bytes = (size_t)(n_tok + 1) * hp.vocab_size * 4;
    float *out = (float *)outputs(1, bytes);
    if (bn_eval(ctx, tokens, n_tok, 0, out, 1) != BN_OK ||
        bn_eval(ctx, tokens, 1, n_tok, out + (size_t)n_tok * hp.vocab_size, 0) != BN_OK)
        fail(bn_context_error(ctx));
    reply(out, 1, bytes);
    bn_context_free(ctx);
    bn_model_free(model);
    free(tokens);
    free(out);
}

int main(void) {
    char line[4096];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = '\0';
        char *args = strchr(line, ' ');
        if (args) *args++ = '\0';
        else args = line + strlen(line);
        if (strcmp(line, "variants") == 0) {
            for (uint32_t v = 0; v < bn_kernels_count(); v++) printf("%s ", bn_kernels_name(v));
            printf("| %s\n", bn_kernels_cpu_features());
            fflush(stdout);
        } else if (strcmp(line, "ternary") == 0 || strcmp(line, "dense") == 0 || strcmp(line, "q8") == 0 ||
                   strcmp(line, "quant") == 0) {
            matmul(line, args);
        } else if (strcmp(line, "quantize") == 0) {
            quantize(args);
        } else if (strcmp(line, "attention") == 0) {
            attention(args);
        } else if (strcmp(line, "logits") == 0) {
            logits(args);
        } else {
            fail("unknown request");
        }
    }
    return 0;
}
