/* The .bnr file (docs/format.md): mapped read-only, header, metadata and tensor table parsed and
 * bounds-checked. Nothing here knows the architecture; model.c checks names and shapes. */
#ifndef BN_MODEL_FILE_H
#define BN_MODEL_FILE_H

#include <stddef.h>
#include <stdint.h>

#include "bitnet.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "bitnet-run uses the little-endian tensor data in place; big-endian hosts are not supported"
#endif

#define BN_FILE_VERSION 1
#define BN_HEADER_SIZE 40
#define BN_MAX_NAME_LEN 256 /* metadata keys and tensor names */
#define BN_MAX_DIMS 4

typedef enum {
    BN_META_U32 = 0,
    BN_META_I32 = 1,
    BN_META_F32 = 2,
    BN_META_U64 = 3,
    BN_META_STR = 4,
    BN_META_I32_ARRAY = 5,
    BN_META_N_TYPES
} bn_meta_type;

/* What the loader, the kernels and the tools know about an encoding (bn_encoding, bitnet.h): one
 * entry per id in bn_encodings (model_file.c); fileformat.ENCODINGS is the same table in Python. */
typedef enum { BN_KIND_FLOAT, BN_KIND_TERNARY, BN_KIND_QUANT } bn_encoding_kind;

typedef struct {
    const char *name;      /* as docs/format.md writes it */
    bn_encoding_kind kind; /* dense float, ternary BitLinear weight, or integer rows with float scales (the head) */
    uint32_t n_dims;       /* 2: 2-D tensors only; 0: any */
    uint32_t tile_rows;    /* rows its layout groups together (the last group padded) */
    /* Bytes of a tensor of this shape (numel >= 1 elements); 0 when they do not fit 64 bits. */
    uint64_t (*nbytes)(const uint64_t *dims, uint64_t numel);
} bn_encoding_traits;

extern const bn_encoding_traits bn_encodings[BN_ENC_COUNT];

#define BN_ENC_IS_TERNARY(e) ((e) < BN_ENC_COUNT && bn_encodings[(e)].kind == BN_KIND_TERNARY)
/* Q8_R, Q6_B, Q4_B: the output head's integer encodings, whose activations are quantized to int8 */
#define BN_ENC_IS_QUANT(e) ((e) < BN_ENC_COUNT && bn_encodings[(e)].kind == BN_KIND_QUANT)

typedef struct {
    const char *key; /* into the map, key_len bytes, not NUL-terminated */
    uint32_t key_len;
    uint32_t type;        /* bn_meta_type */
    const uint8_t *value; /* into the map: the scalar, the string bytes or the first array element */
    uint64_t count;       /* string length in bytes / array length / 1 for scalars */
} bn_meta;

typedef struct {
    const char *name; /* into the map, name_len bytes, not NUL-terminated */
    uint32_t name_len;
    uint32_t encoding; /* bn_encoding, always < BN_ENC_COUNT after bn_file_open */
    uint32_t n_dims;
    uint64_t dims[BN_MAX_DIMS]; /* PyTorch order, outermost first */
    float scale;
    uint64_t offset; /* relative to data_offset */
    uint64_t nbytes;
    uint64_t numel;
    const uint8_t *data; /* map + data_offset + offset */
} bn_tensor_rec;

typedef struct {
    const uint8_t *map; /* [size] read-only mapping of the whole file */
    uint64_t size;
    uint32_t alignment;
    uint64_t data_offset;
    bn_meta *meta; /* [n_meta], sorted by key */
    uint64_t n_meta;
    bn_tensor_rec *tensors; /* [n_tensors], sorted by name */
    uint64_t n_tensors;
} bn_file;

/* Maps and validates `path`; on failure f is left closed and err holds "<path>: ...". */
bn_status bn_file_open(bn_file *f, const char *path, char *err, size_t err_len);
void bn_file_close(bn_file *f);

/* NULL when absent. */
const bn_meta *bn_file_meta(const bn_file *f, const char *key);
const bn_tensor_rec *bn_file_tensor(const bn_file *f, const char *name);

const char *bn_meta_type_name(uint32_t type);
const char *bn_encoding_name(uint32_t encoding); /* "unknown" for an unknown id */
/* "[d0, d1, ...]" into buf. */
void bn_format_shape(char *buf, size_t len, const uint64_t *dims, uint32_t n_dims);

#endif
