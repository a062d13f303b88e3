/* Single-layer access to a loaded model, so that tools and tests can check one layer in isolation
 * against a reference (the whole forward pass lives in forward.c). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "kernels.h"
#include "model.h"
#include "ops.h"

bn_status bn_model_tensor_dims(const bn_model *model, const char *name, uint32_t *n_dims, uint64_t dims[4]) {
    if (!model || !name || !n_dims || !dims) return BN_ERR_ARG;
    const bn_tensor_rec *t = bn_file_tensor(&model->file, name);
    if (!t) return BN_ERR_NOT_FOUND;
    *n_dims = t->n_dims;
    memcpy(dims, t->dims, sizeof(uint64_t) * t->n_dims);
    return BN_OK;
}

bn_status bn_model_bitlinear(const bn_model *model, const char *name, const float *x, uint32_t n_rows, float *y,
                             char *err, size_t err_len) {
    if (!model || !name || (n_rows && (!x || !y))) {
        bn_set_error(err, err_len, "bn_model_bitlinear: NULL argument");
        return BN_ERR_ARG;
    }
    const bn_tensor_rec *t = bn_file_tensor(&model->file, name);
    if (!t || !BN_ENC_IS_TERNARY(t->encoding) || t->n_dims != 2) {
        bn_set_error(err, err_len, "bn_model_bitlinear: no ternary (I2, TL1, TL2) tensor named '%s'", name);
        return BN_ERR_NOT_FOUND;
    }
    const uint32_t rows = (uint32_t)t->dims[0], cols = (uint32_t)t->dims[1];
    int8_t *q = malloc(cols);                      /* [cols] one quantized input row */
    int32_t *acc = malloc(sizeof(int32_t) * rows); /* [rows] its integer dot products */
    if (!q || !acc) {
        free(q);
        free(acc);
        bn_set_error(err, err_len, "bn_model_bitlinear: out of memory");
        return BN_ERR_NOMEM;
    }
    /* the BitLinear's own input norm, <prefix>.rms_norm.weight, when the model has them */
    const bn_tensor_rec *norm = NULL;
    if (model->hp.linear_norm_eps > 0.0f) {
        char norm_name[BN_MAX_NAME_LEN + 32];
        snprintf(norm_name, sizeof norm_name, "%.*s.rms_norm.weight", (int)(strlen(name) - strlen(".weight")), name);
        norm = bn_file_tensor(&model->file, norm_name);
    }
    float *xn = norm ? malloc(sizeof(float) * cols) : NULL; /* [cols] one normed input row */
    const bn_kernels *kern = bn_kernels_select();
    for (uint32_t i = 0; i < n_rows && (xn || !norm); i++) {
        const float *xi = x + (size_t)i * cols;
        if (norm) bn_rmsnorm(xn, xi, (const float *)norm->data, cols, model->hp.linear_norm_eps);
        float s = bn_quantize_row_i8(q, norm ? xn : xi, cols);
        bn_kernels_ternary(kern, t->encoding)(acc, rows, q, cols, 1, t->data, cols, 0, rows);
        for (uint32_t r = 0; r < rows; r++)
            y[(size_t)i * rows + r] = bn_bitlinear_output(acc[r], s, t->scale, model->hp.weight_scale_divides);
    }
    const int oom = norm && !xn;
    free(xn);
    free(q);
    free(acc);
    if (oom) {
        bn_set_error(err, err_len, "bn_model_bitlinear: out of memory");
        return BN_ERR_NOMEM;
    }
    return BN_OK;
}
