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

typedef enum {
    BN_ENC_F32 = 0,
    BN_ENC_F16 = 1,
    BN_ENC_BF16 = 2,
    BN_ENC_I2 = 3,  /* 2-D ternary, rows of ceil(cols/4) bytes, 4 codes (w+1) per byte, lowest bits first */
    BN_ENC_TL1 = 4, /* 2-D ternary, weight pairs as 4-bit indices in tiles of 32 rows (kernels.h) */
    BN_ENC_TL2 = 5, /* 2-D ternary, weight triples as 4-bit index + sign bit in tiles of 32 rows (kernels.h) */
    BN_ENC_Q8R = 6, /* 2-D int8 per row: rows f32 row scales, then rows x cols int8 (kernels.h) */
    BN_ENC_COUNT
} bn_encoding;

/* The ternary (BitLinear) weight encodings. */
#define BN_ENC_IS_TERNARY(e) ((e) == BN_ENC_I2 || (e) == BN_ENC_TL1 || (e) == BN_ENC_TL2)

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
const char *bn_encoding_name(uint32_t encoding);
/* "[d0, d1, ...]" into buf. */
void bn_format_shape(char *buf, size_t len, const uint64_t *dims, uint32_t n_dims);

#endif
