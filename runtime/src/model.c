/* bn_model: hyperparameters from the metadata, every tensor the architecture needs found and checked
 * (encoding, exact shape), and the metadata getters of the API. */
#include "model.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"

#define ENC_BIT(e) (1u << (e))
#define ENC_DENSE (ENC_BIT(BN_ENC_F32) | ENC_BIT(BN_ENC_F16) | ENC_BIT(BN_ENC_BF16))
#define ENC_TERNARY (ENC_BIT(BN_ENC_I2) | ENC_BIT(BN_ENC_TL1) | ENC_BIT(BN_ENC_TL2))

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

/* A required string that must equal `want`; any other value is a valid file this runtime lacks. */
static bn_status require_str(const bn_file *f, const char *path, const char *key, const char *want,
                             const char *what, char *err, size_t err_len) {
    const bn_meta *m;
    bn_status st = require_meta(f, path, key, BN_META_STR, &m, err, err_len);
    if (st != BN_OK) return st;
    if (m->count != strlen(want) || memcmp(m->value, want, m->count) != 0) {
        int shown = m->count > 64 ? 64 : (int)m->count;
        bn_set_error(err, err_len, "%s: unsupported %s '%.*s' (expected '%s')", path, what, shown,
                     (const char *)m->value, want);
        return BN_ERR_UNSUPPORTED;
    }
    return BN_OK;
}

static bn_status read_hparams(bn_model *m, const char *path, char *err, size_t err_len) {
    const bn_file *f = &m->file;
    bn_hparams *hp = &m->hp;
    bn_status st = require_str(f, path, "general.architecture", "bitnet", "architecture", err, err_len);
    if (st == BN_OK) st = require_str(f, path, "bitnet.hidden_act", "relu2", "hidden_act", err, err_len);
    if (st != BN_OK) return st;

    /* Upper bounds far above real models; they keep every size product well inside 64 bits. */
    const struct {
        const char *key;
        uint32_t *dst;
        uint32_t min, max;
    } u32s[] = {
        {"bitnet.vocab_size", &hp->vocab_size, 1, 1u << 24},
        {"bitnet.hidden_size", &hp->hidden_size, 1, 1u << 16},
        {"bitnet.intermediate_size", &hp->intermediate_size, 1, 1u << 18},
        {"bitnet.n_layers", &hp->n_layers, 1, 1024},
        {"bitnet.n_heads", &hp->n_heads, 1, 1024},
        {"bitnet.n_kv_heads", &hp->n_kv_heads, 1, 1024},
        {"bitnet.head_dim", &hp->head_dim, 1, 4096},
        {"bitnet.context_length", &hp->context_length, 1, 1u << 24},
        {"bitnet.tied_embeddings", &hp->tied_embeddings, 0, 1},
    };
    for (size_t i = 0; i < sizeof u32s / sizeof u32s[0]; i++) {
        const bn_meta *e;
        if ((st = require_meta(f, path, u32s[i].key, BN_META_U32, &e, err, err_len)) != BN_OK) return st;
        memcpy(u32s[i].dst, e->value, sizeof(uint32_t));
        if (*u32s[i].dst < u32s[i].min || *u32s[i].dst > u32s[i].max) {
            bn_set_error(err, err_len, "%s: %s is %" PRIu32 " (expected %" PRIu32 "..%" PRIu32 ")", path,
                         u32s[i].key, *u32s[i].dst, u32s[i].min, u32s[i].max);
            return BN_ERR_FORMAT;
        }
    }
    const bn_meta *eps, *theta;
    if ((st = require_meta(f, path, "bitnet.rms_norm_eps", BN_META_F32, &eps, err, err_len)) != BN_OK) return st;
    if ((st = require_meta(f, path, "bitnet.rope_theta", BN_META_F32, &theta, err, err_len)) != BN_OK) return st;
    memcpy(&hp->rms_norm_eps, eps->value, sizeof(float));
    memcpy(&hp->rope_theta, theta->value, sizeof(float));
    if (!(hp->rms_norm_eps > 0.0f && hp->rms_norm_eps < 1.0f)) {
        bn_set_error(err, err_len, "%s: bitnet.rms_norm_eps is %g (expected 0 < eps < 1)", path,
                     (double)hp->rms_norm_eps);
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
    if ((uint64_t)hp->n_heads * hp->head_dim != hp->hidden_size) {
        bn_set_error(err, err_len,
                     "%s: bitnet.n_heads %" PRIu32 " x bitnet.head_dim %" PRIu32 " != bitnet.hidden_size %" PRIu32,
                     path, hp->n_heads, hp->head_dim, hp->hidden_size);
        return BN_ERR_FORMAT;
    }
    return BN_OK;
}

/* Finds `name` and checks its encoding against `allowed` (a mask of ENC_BIT) and its shape against
 * [d0] (d1 == 0) or [d0, d1]. */
static bn_status require_tensor(const bn_model *m, const char *path, const char *name, uint32_t allowed,
                                const char *allowed_names, uint64_t d0, uint64_t d1, const bn_tensor_rec **out,
                                char *err, size_t err_len) {
    const bn_tensor_rec *t = bn_file_tensor(&m->file, name);
    if (t == NULL) {
        bn_set_error(err, err_len, "%s: missing tensor '%s'", path, name);
        return BN_ERR_FORMAT;
    }
    if ((ENC_BIT(t->encoding) & allowed) == 0) {
        bn_set_error(err, err_len, "%s: tensor '%s': encoding %s is not supported here (expected %s)", path, name,
                     bn_encoding_name(t->encoding), allowed_names);
        return BN_ERR_UNSUPPORTED;
    }
    uint64_t want[2] = {d0, d1};
    uint32_t want_dims = d1 ? 2 : 1;
    if (t->n_dims != want_dims || t->dims[0] != d0 || (want_dims == 2 && t->dims[1] != d1)) {
        char have_s[128], want_s[64];
        bn_format_shape(have_s, sizeof have_s, t->dims, t->n_dims);
        bn_format_shape(want_s, sizeof want_s, want, want_dims);
        bn_set_error(err, err_len, "%s: tensor '%s': shape %s expected %s", path, name, have_s, want_s);
        return BN_ERR_FORMAT;
    }
    *out = t;
    return BN_OK;
}

static bn_status bind_norm(const bn_model *m, const char *path, const char *name, uint32_t n, const float **out,
                           char *err, size_t err_len) {
    const bn_tensor_rec *t;
    bn_status st = require_tensor(m, path, name, ENC_BIT(BN_ENC_F32), "F32", n, 0, &t, err, err_len);
    if (st == BN_OK) *out = (const float *)t->data; /* 4-byte aligned: alignment >= 4 */
    return st;
}

static bn_status bind_ternary(const bn_model *m, const char *path, const char *name, uint32_t rows, uint32_t cols,
                              bn_ternary_weight *out, char *err, size_t err_len) {
    const bn_tensor_rec *t;
    bn_status st = require_tensor(m, path, name, ENC_TERNARY, "I2, TL1 or TL2", rows, cols, &t, err, err_len);
    if (st == BN_OK) *out = (bn_ternary_weight){t->data, t->encoding, rows, cols, t->scale};
    return st;
}

static bn_status bind_dense(const bn_model *m, const char *path, const char *name, uint32_t rows, uint32_t cols,
                            bn_dense_weight *out, char *err, size_t err_len) {
    const bn_tensor_rec *t;
    bn_status st = require_tensor(m, path, name, ENC_DENSE | ENC_BIT(BN_ENC_Q8R), "F32, F16, BF16 or Q8_R", rows, cols,
                                  &t, err, err_len);
    if (st == BN_OK) *out = (bn_dense_weight){t->data, t->encoding, rows, cols};
    return st;
}

static bn_status bind_layer(const bn_model *m, uint32_t il, const char *path, bn_layer_weights *l, char *err,
                            size_t err_len) {
    const bn_hparams *hp = &m->hp;
    const uint32_t H = hp->hidden_size, I = hp->intermediate_size;
    const uint32_t q_dim = hp->n_heads * hp->head_dim, kv_dim = hp->n_kv_heads * hp->head_dim;
    char name[BN_MAX_NAME_LEN];
#define NAME(suffix) (snprintf(name, sizeof name, "model.layers.%" PRIu32 ".%s", il, suffix), name)
    bn_status st = bind_norm(m, path, NAME("input_layernorm.weight"), H, &l->attn_norm, err, err_len);
    if (st == BN_OK) st = bind_ternary(m, path, NAME("self_attn.q_proj.weight"), q_dim, H, &l->q, err, err_len);
    if (st == BN_OK) st = bind_ternary(m, path, NAME("self_attn.k_proj.weight"), kv_dim, H, &l->k, err, err_len);
    if (st == BN_OK) st = bind_ternary(m, path, NAME("self_attn.v_proj.weight"), kv_dim, H, &l->v, err, err_len);
    if (st == BN_OK) st = bind_norm(m, path, NAME("self_attn.attn_sub_norm.weight"), H, &l->attn_sub_norm, err, err_len);
    if (st == BN_OK) st = bind_ternary(m, path, NAME("self_attn.o_proj.weight"), H, q_dim, &l->o, err, err_len);
    if (st == BN_OK) st = bind_norm(m, path, NAME("post_attention_layernorm.weight"), H, &l->ffn_norm, err, err_len);
    if (st == BN_OK) st = bind_ternary(m, path, NAME("mlp.gate_proj.weight"), I, H, &l->gate, err, err_len);
    if (st == BN_OK) st = bind_ternary(m, path, NAME("mlp.up_proj.weight"), I, H, &l->up, err, err_len);
    if (st == BN_OK) st = bind_norm(m, path, NAME("mlp.ffn_sub_norm.weight"), I, &l->ffn_sub_norm, err, err_len);
    if (st == BN_OK) st = bind_ternary(m, path, NAME("mlp.down_proj.weight"), H, I, &l->down, err, err_len);
#undef NAME
    return st;
}

static bn_status bind_weights(bn_model *m, const char *path, char *err, size_t err_len) {
    const bn_hparams *hp = &m->hp;
    bn_weights *w = &m->w;
    bn_status st = bind_dense(m, path, "model.embed_tokens.weight", hp->vocab_size, hp->hidden_size, &w->embed,
                              err, err_len);
    if (st == BN_OK) st = bind_norm(m, path, "model.norm.weight", hp->hidden_size, &w->norm, err, err_len);
    if (st != BN_OK) return st;
    if (hp->tied_embeddings) {
        w->head = w->embed;
    } else {
        st = bind_dense(m, path, "lm_head.weight", hp->vocab_size, hp->hidden_size, &w->head, err, err_len);
        if (st != BN_OK) return st;
    }
    w->layers = calloc(hp->n_layers, sizeof *w->layers);
    if (w->layers == NULL) {
        bn_set_error(err, err_len, "%s: out of memory", path);
        return BN_ERR_NOMEM;
    }
    for (uint32_t il = 0; il < hp->n_layers && st == BN_OK; il++)
        st = bind_layer(m, il, path, &w->layers[il], err, err_len);
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
    if (st == BN_OK) st = bind_weights(m, path, err, err_len);
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
