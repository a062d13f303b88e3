/* bn_model: hyperparameters from the metadata, every tensor the architecture needs found and checked
 * (encoding, exact shape), and the metadata getters of the API. */
#include "model.h"

#include <inttypes.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"

#define ENC_BIT(e) (1u << (e))
#define ENC_DENSE (ENC_BIT(BN_ENC_F32) | ENC_BIT(BN_ENC_F16) | ENC_BIT(BN_ENC_BF16))
#define ENC_TERNARY (ENC_BIT(BN_ENC_I2) | ENC_BIT(BN_ENC_TL1) | ENC_BIT(BN_ENC_TL2))
#define ENC_QUANT (ENC_BIT(BN_ENC_Q8R) | ENC_BIT(BN_ENC_Q6B) | ENC_BIT(BN_ENC_Q4B))

const char *bn_version(void) { return "0.1.0"; }

/* The record of `key` when it has `type`; else a FORMAT error naming what is wrong. */
static bn_status require_meta(const bn_file *f, const char *path, const char *key, uint32_t type,
                              const bn_meta **out, char *err, size_t err_len) {
    const bn_meta *m = bn_file_meta(f, key);
    if (m == NULL) {
        bn_set_error(err, err_len, "%s: missing metadata key '%s' (%s)", path, key, bn_meta_type_name(type));
        return BN_ERR_FORMAT;
    }
    if (m->type != type) {
        bn_set_error(err, err_len, "%s: metadata key '%s' is %s, expected %s", path, key,
                     bn_meta_type_name(m->type), bn_meta_type_name(type));
        return BN_ERR_FORMAT;
    }
    *out = m;
    return BN_OK;
}

/* An optional key: *out = NULL when absent; a FORMAT error when present with another type. */
static bn_status optional_meta(const bn_file *f, const char *path, const char *key, uint32_t type,
                               const bn_meta **out, char *err, size_t err_len) {
    *out = bn_file_meta(f, key);
    if (*out == NULL || (*out)->type == type) return BN_OK;
    bn_set_error(err, err_len, "%s: metadata key '%s' is %s, expected %s", path, key, bn_meta_type_name((*out)->type),
                 bn_meta_type_name(type));
    return BN_ERR_FORMAT;
}

/* The index of a string value among `names` (n of them); else an UNSUPPORTED error listing them. */
static bn_status meta_choice(const bn_file *f, const char *path, const bn_meta *m, const char *key,
                             const char *const *names, uint32_t n, uint32_t *out, char *err, size_t err_len) {
    for (uint32_t i = 0; i < n; i++) {
        if (m->count == strlen(names[i]) && memcmp(m->value, names[i], m->count) == 0) {
            *out = i;
            return BN_OK;
        }
    }
    int shown = m->count > 64 ? 64 : (int)m->count;
    bn_set_error(err, err_len, "%s: unsupported %s '%.*s' (expected '%s'%s%s%s)", path, key, shown,
                 (const char *)m->value, names[0], n > 1 ? " or '" : "", n > 1 ? names[1] : "", n > 1 ? "'" : "");
    return BN_ERR_UNSUPPORTED;
}

static bn_status read_hparams(bn_model *m, const char *path, char *err, size_t err_len) {
    const bn_file *f = &m->file;
    bn_hparams *hp = &m->hp;
    static const char *const activations[] = {[BN_ACT_RELU2] = "relu2", [BN_ACT_SILU] = "silu"};
    static const char *const scale_rules[] = {"multiply", "divide"};
    static const char *const architectures[] = {"bitnet"};
    const bn_meta *arch, *act;
    bn_status st = require_meta(f, path, "general.architecture", BN_META_STR, &arch, err, err_len);
    uint32_t which;
    if (st == BN_OK) st = meta_choice(f, path, arch, "architecture", architectures, 1, &which, err, err_len);
    if (st == BN_OK) st = require_meta(f, path, "bitnet.hidden_act", BN_META_STR, &act, err, err_len);
    if (st == BN_OK) st = meta_choice(f, path, act, "hidden_act", activations, 2, &hp->hidden_act, err, err_len);
    if (st != BN_OK) return st;

    /* Upper bounds far above real models; they keep every size product well inside 64 bits. */
    const struct {
        const char *key;
        uint32_t *dst;
        uint32_t min, max;
        int optional; /* absent: the value already in *dst */
    } u32s[] = {
        {"bitnet.vocab_size", &hp->vocab_size, 1, 1u << 24, 0},
        {"bitnet.hidden_size", &hp->hidden_size, 1, 1u << 16, 0},
        {"bitnet.intermediate_size", &hp->intermediate_size, 1, 1u << 18, 0},
        {"bitnet.n_layers", &hp->n_layers, 1, 1024, 0},
        {"bitnet.n_heads", &hp->n_heads, 1, 1024, 0},
        {"bitnet.n_kv_heads", &hp->n_kv_heads, 1, 1024, 0},
        {"bitnet.head_dim", &hp->head_dim, 1, 4096, 0},
        {"bitnet.context_length", &hp->context_length, 1, 1u << 24, 0},
        {"bitnet.tied_embeddings", &hp->tied_embeddings, 0, 1, 0},
        {"bitnet.sub_norms", &hp->sub_norms, 0, 1, 1},
    };
    hp->sub_norms = 1; /* the default of the optional keys: the 2B-4T layout */
    for (size_t i = 0; i < sizeof u32s / sizeof u32s[0]; i++) {
        const bn_meta *e;
        if (u32s[i].optional) st = optional_meta(f, path, u32s[i].key, BN_META_U32, &e, err, err_len);
        else st = require_meta(f, path, u32s[i].key, BN_META_U32, &e, err, err_len);
        if (st != BN_OK) return st;
        if (e == NULL) continue;
        memcpy(u32s[i].dst, e->value, sizeof(uint32_t));
        if (*u32s[i].dst < u32s[i].min || *u32s[i].dst > u32s[i].max) {
            bn_set_error(err, err_len, "%s: %s is %" PRIu32 " (expected %" PRIu32 "..%" PRIu32 ")", path,
                         u32s[i].key, *u32s[i].dst, u32s[i].min, u32s[i].max);
            return BN_ERR_FORMAT;
        }
    }
    const bn_meta *eps, *theta, *linear_eps, *scale_rule;
    if ((st = require_meta(f, path, "bitnet.rms_norm_eps", BN_META_F32, &eps, err, err_len)) != BN_OK) return st;
    if ((st = require_meta(f, path, "bitnet.rope_theta", BN_META_F32, &theta, err, err_len)) != BN_OK) return st;
    if ((st = optional_meta(f, path, "bitnet.linear_norm_eps", BN_META_F32, &linear_eps, err, err_len)) != BN_OK)
        return st;
    if ((st = optional_meta(f, path, "bitnet.weight_scale", BN_META_STR, &scale_rule, err, err_len)) != BN_OK)
        return st;
    if (scale_rule &&
        (st = meta_choice(f, path, scale_rule, "weight_scale", scale_rules, 2, &hp->weight_scale_divides, err,
                          err_len)) != BN_OK)
        return st;
    memcpy(&hp->rms_norm_eps, eps->value, sizeof(float));
    memcpy(&hp->rope_theta, theta->value, sizeof(float));
    if (linear_eps) memcpy(&hp->linear_norm_eps, linear_eps->value, sizeof(float));
    if (!(hp->rms_norm_eps > 0.0f && hp->rms_norm_eps < 1.0f)) {
        bn_set_error(err, err_len, "%s: bitnet.rms_norm_eps is %g (expected 0 < eps < 1)", path,
                     (double)hp->rms_norm_eps);
        return BN_ERR_FORMAT;
    }
    if (linear_eps && !(hp->linear_norm_eps > 0.0f && hp->linear_norm_eps < 1.0f)) {
        bn_set_error(err, err_len, "%s: bitnet.linear_norm_eps is %g (expected 0 < eps < 1)", path,
                     (double)hp->linear_norm_eps);
        return BN_ERR_FORMAT;
    }
    if (!(hp->rope_theta > 0.0f && isfinite(hp->rope_theta))) {
        bn_set_error(err, err_len, "%s: bitnet.rope_theta is %g (expected a positive number)", path,
                     (double)hp->rope_theta);
        return BN_ERR_FORMAT;
    }
    if (hp->head_dim % 2 != 0) {
        bn_set_error(err, err_len, "%s: bitnet.head_dim is %" PRIu32 " (RoPE needs it even)", path, hp->head_dim);
        return BN_ERR_FORMAT;
    }
    if (hp->n_heads % hp->n_kv_heads != 0) {
        bn_set_error(err, err_len, "%s: bitnet.n_heads %" PRIu32 " is not a multiple of bitnet.n_kv_heads %" PRIu32,
                     path, hp->n_heads, hp->n_kv_heads);
        return BN_ERR_FORMAT;
    }
    if ((uint64_t)hp->n_heads * hp->head_dim > (1u << 18)) {
        bn_set_error(err, err_len, "%s: bitnet.n_heads %" PRIu32 " x bitnet.head_dim %" PRIu32 " is above %u", path,
                     hp->n_heads, hp->head_dim, 1u << 18);
        return BN_ERR_FORMAT;
    }
    return BN_OK;
}

/* Binding the file's tensors to the weights; every tensor of the file must be bound exactly once. */
typedef struct {
    bn_model *m;
    const char *path;
    char *err;
    size_t err_len;
    uint8_t *bound; /* [n_tensors] 1 when the tensor at that index of the (sorted) table is bound */
} binder;

/* Finds `name` and checks its encoding against `allowed` (a mask of ENC_BIT) and its shape against
 * [d0] (d1 == 0) or [d0, d1]. */
static bn_status require_tensor(binder *b, const char *name, uint32_t allowed, const char *allowed_names,
                                uint64_t d0, uint64_t d1, const bn_tensor_rec **out) {
    const bn_tensor_rec *t = bn_file_tensor(&b->m->file, name);
    if (t == NULL) {
        bn_set_error(b->err, b->err_len, "%s: missing tensor '%s'", b->path, name);
        return BN_ERR_FORMAT;
    }
    if ((ENC_BIT(t->encoding) & allowed) == 0) {
        bn_set_error(b->err, b->err_len, "%s: tensor '%s': encoding %s is not supported here (expected %s)", b->path,
                     name, bn_encoding_name(t->encoding), allowed_names);
        return BN_ERR_UNSUPPORTED;
    }
    uint64_t want[2] = {d0, d1};
    uint32_t want_dims = d1 ? 2 : 1;
    if (t->n_dims != want_dims || t->dims[0] != d0 || (want_dims == 2 && t->dims[1] != d1)) {
        char have_s[128], want_s[64];
        bn_format_shape(have_s, sizeof have_s, t->dims, t->n_dims);
        bn_format_shape(want_s, sizeof want_s, want, want_dims);
        bn_set_error(b->err, b->err_len, "%s: tensor '%s': shape %s expected %s", b->path, name, have_s, want_s);
        return BN_ERR_FORMAT;
    }
    b->bound[t - b->m->file.tensors] = 1;
    *out = t;
    return BN_OK;
}

static bn_status bind_norm(binder *b, const char *name, uint32_t n, const float **out) {
    const bn_tensor_rec *t;
    bn_status st = require_tensor(b, name, ENC_BIT(BN_ENC_F32), "F32", n, 0, &t);
    if (st == BN_OK) *out = (const float *)t->data; /* 4-byte aligned: alignment >= 4 */
    return st;
}

/* A BitLinear `<prefix>.weight`, and its input norm `<prefix>.rms_norm.weight` when the model has them. */
static bn_status bind_ternary(binder *b, const char *prefix, uint32_t rows, uint32_t cols, bn_ternary_weight *out) {
    const bn_hparams *hp = &b->m->hp;
    char name[BN_MAX_NAME_LEN + 32];
    const bn_tensor_rec *t;
    snprintf(name, sizeof name, "%s.weight", prefix);
    bn_status st = require_tensor(b, name, ENC_TERNARY, "I2, TL1 or TL2", rows, cols, &t);
    if (st != BN_OK) return st;
    *out = (bn_ternary_weight){t->data, t->encoding, rows, cols, t->scale, hp->weight_scale_divides, NULL};
    if (hp->linear_norm_eps > 0.0f) {
        snprintf(name, sizeof name, "%s.rms_norm.weight", prefix);
        st = bind_norm(b, name, cols, &out->input_norm);
    }
    return st;
}

static bn_status bind_dense(binder *b, const char *name, uint32_t rows, uint32_t cols, bn_dense_weight *out) {
    const bn_tensor_rec *t;
    bn_status st = require_tensor(b, name, ENC_DENSE | ENC_QUANT, "F32, F16, BF16, Q8_R, Q6_B or Q4_B", rows, cols, &t);
    if (st == BN_OK) *out = (bn_dense_weight){t->data, t->encoding, rows, cols};
    return st;
}

/* The tensors of one layer (docs/format.md, "Architecture bitnet"), named after the Hugging Face
 * checkpoint of the 2B-4T. Which exist follows the hyperparameters: the sub-norms when sub_norms,
 * each BitLinear's input norm when linear_norm_eps > 0. */
enum { DIM_H, DIM_I, DIM_Q, DIM_KV };
static const struct {
    const char *name;
    size_t field; /* offset of its bn_ternary_weight in bn_layer_weights */
    uint8_t rows, cols;
} layer_linears[] = {
    {"self_attn.q_proj", offsetof(bn_layer_weights, q), DIM_Q, DIM_H},
    {"self_attn.k_proj", offsetof(bn_layer_weights, k), DIM_KV, DIM_H},
    {"self_attn.v_proj", offsetof(bn_layer_weights, v), DIM_KV, DIM_H},
    {"self_attn.o_proj", offsetof(bn_layer_weights, o), DIM_H, DIM_Q},
    {"mlp.gate_proj", offsetof(bn_layer_weights, gate), DIM_I, DIM_H},
    {"mlp.up_proj", offsetof(bn_layer_weights, up), DIM_I, DIM_H},
    {"mlp.down_proj", offsetof(bn_layer_weights, down), DIM_H, DIM_I},
};
static const struct {
    const char *name;
    size_t field; /* offset of its `const float *` in bn_layer_weights */
    uint8_t size;
    uint8_t sub_norm; /* exists only when hparams.sub_norms */
} layer_norms[] = {
    {"input_layernorm.weight", offsetof(bn_layer_weights, attn_norm), DIM_H, 0},
    {"post_attention_layernorm.weight", offsetof(bn_layer_weights, ffn_norm), DIM_H, 0},
    {"self_attn.attn_sub_norm.weight", offsetof(bn_layer_weights, attn_sub_norm), DIM_Q, 1},
    {"mlp.ffn_sub_norm.weight", offsetof(bn_layer_weights, ffn_sub_norm), DIM_I, 1},
};

static bn_status bind_layer(binder *b, uint32_t il, bn_layer_weights *l) {
    const bn_hparams *hp = &b->m->hp;
    const uint32_t dim[] = {[DIM_H] = hp->hidden_size, [DIM_I] = hp->intermediate_size,
                            [DIM_Q] = hp->n_heads * hp->head_dim, [DIM_KV] = hp->n_kv_heads * hp->head_dim};
    char name[BN_MAX_NAME_LEN];
    bn_status st = BN_OK;
    for (size_t i = 0; i < sizeof layer_norms / sizeof layer_norms[0] && st == BN_OK; i++) {
        if (layer_norms[i].sub_norm && !hp->sub_norms) continue;
        snprintf(name, sizeof name, "model.layers.%" PRIu32 ".%s", il, layer_norms[i].name);
        st = bind_norm(b, name, dim[layer_norms[i].size], (const float **)((char *)l + layer_norms[i].field));
    }
    for (size_t i = 0; i < sizeof layer_linears / sizeof layer_linears[0] && st == BN_OK; i++) {
        snprintf(name, sizeof name, "model.layers.%" PRIu32 ".%s", il, layer_linears[i].name);
        st = bind_ternary(b, name, dim[layer_linears[i].rows], dim[layer_linears[i].cols],
                          (bn_ternary_weight *)((char *)l + layer_linears[i].field));
    }
    return st;
}

static bn_status bind_weights(binder *b) {
    bn_model *m = b->m;
    const bn_hparams *hp = &m->hp;
    bn_weights *w = &m->w;
    bn_status st = bind_dense(b, "model.embed_tokens.weight", hp->vocab_size, hp->hidden_size, &w->embed);
    if (st == BN_OK) st = bind_norm(b, "model.norm.weight", hp->hidden_size, &w->norm);
    if (st != BN_OK) return st;
    if (hp->tied_embeddings) {
        w->head = w->embed;
    } else {
        st = bind_dense(b, "lm_head.weight", hp->vocab_size, hp->hidden_size, &w->head);
        if (st != BN_OK) return st;
    }
    w->layers = calloc(hp->n_layers, sizeof *w->layers);
    if (w->layers == NULL) {
        bn_set_error(b->err, b->err_len, "%s: out of memory", b->path);
        return BN_ERR_NOMEM;
    }
    for (uint32_t il = 0; il < hp->n_layers && st == BN_OK; il++) st = bind_layer(b, il, &w->layers[il]);
    /* A tensor the architecture does not use (a bias, a norm of another layout) would be ignored
     * silently, so the file is refused instead. */
    for (uint64_t i = 0; i < m->file.n_tensors && st == BN_OK; i++) {
        if (b->bound[i]) continue;
        const bn_tensor_rec *t = &m->file.tensors[i];
        bn_set_error(b->err, b->err_len,
                     "%s: tensor '%.*s' is not part of architecture bitnet with these hyperparameters (no biases, "
                     "sub-norms only with bitnet.sub_norms, input norms only with bitnet.linear_norm_eps)",
                     b->path, (int)t->name_len, t->name);
        st = BN_ERR_UNSUPPORTED;
    }
    return st;
}

bn_status bn_model_load(const char *path, bn_model **out, char *err, size_t err_len) {
    bn_set_error(err, err_len, "%s", "");
    if (out == NULL || path == NULL) {
        bn_set_error(err, err_len, "bn_model_load: path and out must not be NULL");
        return BN_ERR_ARG;
    }
    *out = NULL;
    bn_model *m = calloc(1, sizeof *m);
    if (m == NULL) {
        bn_set_error(err, err_len, "%s: out of memory", path);
        return BN_ERR_NOMEM;
    }
    bn_status st = bn_file_open(&m->file, path, err, err_len);
    if (st == BN_OK) st = read_hparams(m, path, err, err_len);
    if (st == BN_OK) {
        binder b = {m, path, err, err_len, calloc(m->file.n_tensors ? m->file.n_tensors : 1, 1)};
        if (b.bound == NULL) {
            bn_set_error(err, err_len, "%s: out of memory", path);
            st = BN_ERR_NOMEM;
        } else {
            st = bind_weights(&b);
        }
        free(b.bound);
    }
    if (st != BN_OK) {
        bn_model_free(m);
        return st;
    }
    for (uint64_t i = 0; i < m->file.n_tensors; i++) {
        m->n_bytes += m->file.tensors[i].nbytes;
        m->n_params += m->file.tensors[i].numel;
    }
    *out = m;
    return BN_OK;
}

void bn_model_free(bn_model *model) {
    if (model == NULL) return;
    free(model->w.layers);
    bn_file_close(&model->file);
    free(model);
}

void bn_model_hparams(const bn_model *model, bn_hparams *out) {
    if (model && out) *out = model->hp;
}

uint64_t bn_model_n_bytes(const bn_model *model) { return model ? model->n_bytes : 0; }
uint64_t bn_model_n_params(const bn_model *model) { return model ? model->n_params : 0; }

/* The record of `key` if it has `type`. */
static const bn_meta *meta_typed(const bn_model *model, const char *key, uint32_t type) {
    const bn_meta *m = bn_file_meta(&model->file, key);
    return m && m->type == type ? m : NULL;
}

bn_status bn_model_meta_str(const bn_model *model, const char *key, const char **str, uint64_t *len) {
    if (model == NULL || key == NULL || str == NULL || len == NULL) return BN_ERR_ARG;
    const bn_meta *m = meta_typed(model, key, BN_META_STR);
    if (m == NULL) return BN_ERR_NOT_FOUND;
    *str = (const char *)m->value;
    *len = m->count;
    return BN_OK;
}

/* The 4-byte scalars share one lookup; the value bytes are copied into the caller's variable. */
static bn_status meta_scalar32(const bn_model *model, const char *key, uint32_t type, void *value) {
    if (model == NULL || key == NULL || value == NULL) return BN_ERR_ARG;
    const bn_meta *m = meta_typed(model, key, type);
    if (m == NULL) return BN_ERR_NOT_FOUND;
    memcpy(value, m->value, 4);
    return BN_OK;
}

bn_status bn_model_meta_u32(const bn_model *model, const char *key, uint32_t *value) {
    return meta_scalar32(model, key, BN_META_U32, value);
}

bn_status bn_model_meta_i32(const bn_model *model, const char *key, int32_t *value) {
    return meta_scalar32(model, key, BN_META_I32, value);
}

bn_status bn_model_meta_f32(const bn_model *model, const char *key, float *value) {
    return meta_scalar32(model, key, BN_META_F32, value);
}

bn_status bn_model_meta_i32_array(const bn_model *model, const char *key, int32_t *values, uint64_t cap,
                                  uint64_t *count) {
    if (model == NULL || key == NULL || (values == NULL && cap > 0)) return BN_ERR_ARG;
    const bn_meta *m = meta_typed(model, key, BN_META_I32_ARRAY);
    if (m == NULL) return BN_ERR_NOT_FOUND;
    uint64_t n = m->count < cap ? m->count : cap;
    if (n > 0) memcpy(values, m->value, n * sizeof(int32_t));
    if (count) *count = m->count;
    return BN_OK;
}
