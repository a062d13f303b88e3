#include "model_file.h"

#include "bitnet_dev.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "error.h"
#include "kernels.h"

#define BN_MAX_META 65536
#define BN_MAX_TENSORS 65536
/* Smallest possible records (1-byte name, scalar value / one dimension): bound the counts by the
 * header area before allocating anything for them. */
#define BN_MIN_META_RECORD (4 + 1 + 4 + 4)
#define BN_MIN_TENSOR_RECORD (4 + 1 + 4 + 4 + 8 + 4 + 8 + 8)

/* Sequential reader over [base + pos, base + end); every take is checked against end. */
typedef struct {
    const uint8_t *base;
    uint64_t pos;
    uint64_t end;
} reader;

static const uint8_t *take(reader *r, uint64_t n) {
    if (n > r->end - r->pos) return NULL;
    const uint8_t *p = r->base + r->pos;
    r->pos += n;
    return p;
}

static int take_u32(reader *r, uint32_t *v) {
    const uint8_t *p = take(r, 4);
    if (p) memcpy(v, p, 4);
    return p != NULL;
}

static int take_u64(reader *r, uint64_t *v) {
    const uint8_t *p = take(r, 8);
    if (p) memcpy(v, p, 8);
    return p != NULL;
}

static int take_f32(reader *r, float *v) {
    const uint8_t *p = take(r, 4);
    if (p) memcpy(v, p, 4);
    return p != NULL;
}

/* Names end up in error messages: printable ASCII keeps those one clean line. */
static int printable(const char *s, uint32_t n) {
    for (uint32_t i = 0; i < n; i++)
        if (s[i] < 0x20 || s[i] > 0x7e) return 0;
    return 1;
}

/* A length-prefixed name (metadata key or tensor name), 1..BN_MAX_NAME_LEN printable bytes. */
static int take_name(reader *r, const char **name, uint32_t *len) {
    if (!take_u32(r, len) || *len == 0 || *len > BN_MAX_NAME_LEN) return 0;
    const uint8_t *p = take(r, *len);
    if (p == NULL || !printable((const char *)p, *len)) return 0;
    *name = (const char *)p;
    return 1;
}

/* Strict UTF-8 (no overlong forms, surrogates or code points past U+10FFFF), as Python decodes it:
 * string values must be text for every reader of the file. */
static int utf8_valid(const uint8_t *s, uint64_t n) {
    for (uint64_t i = 0; i < n;) {
        const uint8_t c = s[i];
        uint32_t len, cp, min;
        if (c < 0x80) { i++; continue; }
        if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F, min = 0x80;
        else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F, min = 0x800;
        else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07, min = 0x10000;
        else return 0;
        if (len > n - i) return 0;
        for (uint32_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
        i += len;
    }
    return 1;
}

static int name_cmp(const char *a, uint32_t alen, const char *b, uint32_t blen) {
    int c = memcmp(a, b, alen < blen ? alen : blen);
    if (c != 0) return c;
    return (alen > blen) - (alen < blen);
}

static int meta_cmp(const void *a, const void *b) {
    const bn_meta *x = a, *y = b;
    return name_cmp(x->key, x->key_len, y->key, y->key_len);
}

static int tensor_cmp(const void *a, const void *b) {
    const bn_tensor_rec *x = a, *y = b;
    return name_cmp(x->name, x->name_len, y->name, y->name_len);
}

const char *bn_meta_type_name(uint32_t type) {
    static const char *names[BN_META_N_TYPES] = {"u32", "i32", "f32", "u64", "string", "i32 array"};
    return type < BN_META_N_TYPES ? names[type] : "unknown";
}

/* ---- the encodings table ---- */

static uint64_t nbytes_f32(const uint64_t *dims, uint64_t numel) { return numel <= UINT64_MAX / 4 ? 4 * numel : 0; }
static uint64_t nbytes_16bit(const uint64_t *dims, uint64_t numel) { return numel <= UINT64_MAX / 2 ? 2 * numel : 0; }
static uint64_t nbytes_i2(const uint64_t *dims, uint64_t numel) { return dims[0] * ((dims[1] + 3) / 4); } /* <= numel */
/* < 2 * numel + 32 * 40 for the dims the kernels take (32-bit rows and columns) */
static uint64_t nbytes_tl1(const uint64_t *dims, uint64_t numel) {
    if (dims[0] > UINT32_MAX || dims[1] > UINT32_MAX) return 0;
    return (dims[0] + BN_TL_TILE - 1) / BN_TL_TILE * bn_tl1_tile_bytes((uint32_t)dims[1]);
}
static uint64_t nbytes_tl2(const uint64_t *dims, uint64_t numel) {
    if (dims[0] > UINT32_MAX || dims[1] > UINT32_MAX) return 0;
    return (dims[0] + BN_TL_TILE - 1) / BN_TL_TILE * bn_tl2_tile_bytes((uint32_t)dims[1]);
}
static uint64_t nbytes_q8r(const uint64_t *dims, uint64_t numel) { /* 4 * rows + numel <= 5 * numel */
    return numel <= UINT64_MAX / 5 ? 4 * dims[0] + numel : 0;
}
/* 4 * rows + rows * row bytes, row bytes <= 25 * cols: <= 29 * numel */
static uint64_t nbytes_qb(uint32_t encoding, const uint64_t *dims, uint64_t numel) {
    if (dims[1] > UINT32_MAX || numel > UINT64_MAX / 29) return 0;
    return 4 * dims[0] + dims[0] * bn_qb_row_bytes(encoding, (uint32_t)dims[1]);
}
static uint64_t nbytes_q6b(const uint64_t *dims, uint64_t numel) { return nbytes_qb(BN_ENC_Q6B, dims, numel); }
static uint64_t nbytes_q4b(const uint64_t *dims, uint64_t numel) { return nbytes_qb(BN_ENC_Q4B, dims, numel); }

const bn_encoding_traits bn_encodings[BN_ENC_COUNT] = {
    [BN_ENC_F32] = {"F32", BN_KIND_FLOAT, 0, 1, nbytes_f32},
    [BN_ENC_F16] = {"F16", BN_KIND_FLOAT, 0, 1, nbytes_16bit},
    [BN_ENC_BF16] = {"BF16", BN_KIND_FLOAT, 0, 1, nbytes_16bit},
    [BN_ENC_I2] = {"I2", BN_KIND_TERNARY, 2, 1, nbytes_i2},
    [BN_ENC_TL1] = {"TL1", BN_KIND_TERNARY, 2, BN_TL_TILE, nbytes_tl1},
    [BN_ENC_TL2] = {"TL2", BN_KIND_TERNARY, 2, BN_TL_TILE, nbytes_tl2},
    [BN_ENC_Q8R] = {"Q8_R", BN_KIND_QUANT, 2, 1, nbytes_q8r},
    [BN_ENC_Q6B] = {"Q6_B", BN_KIND_QUANT, 2, 1, nbytes_q6b},
    [BN_ENC_Q4B] = {"Q4_B", BN_KIND_QUANT, 2, 1, nbytes_q4b},
};

const char *bn_encoding_name(uint32_t encoding) {
    return encoding < BN_ENC_COUNT ? bn_encodings[encoding].name : "unknown";
}

void bn_format_shape(char *buf, size_t len, const uint64_t *dims, uint32_t n_dims) {
    size_t used = 0;
    int n = snprintf(buf, len, "[");
    for (uint32_t i = 0; i < n_dims && n >= 0 && (used += (size_t)n) < len; i++)
        n = snprintf(buf + used, len - used, i ? ", %" PRIu64 : "%" PRIu64, dims[i]);
    if (n >= 0 && (used += (size_t)n) < len) snprintf(buf + used, len - used, "]");
}

/* Metadata records: key, type, value. Values stay in the map. */
static bn_status parse_meta(bn_file *f, reader *r, const char *path, char *err, size_t err_len) {
    for (uint64_t i = 0; i < f->n_meta; i++) {
        bn_meta *m = &f->meta[i];
        uint64_t at = r->pos;
        if (!take_name(r, &m->key, &m->key_len)) {
            bn_set_error(err, err_len,
                         "%s: metadata record %" PRIu64 " at byte %" PRIu64
                         ": bad key (length 1..%d printable ASCII bytes, before data_offset %" PRIu64 ")",
                         path, i, at, BN_MAX_NAME_LEN, f->data_offset);
            return BN_ERR_FORMAT;
        }
        if (!take_u32(r, &m->type)) goto truncated;
        uint64_t elem = 0; /* element size of the value, 0: length-prefixed */
        switch (m->type) {
        case BN_META_U32: case BN_META_I32: case BN_META_F32: elem = 4; break;
        case BN_META_U64: elem = 8; break;
        case BN_META_STR: case BN_META_I32_ARRAY: break;
        default:
            bn_set_error(err, err_len, "%s: metadata key '%.*s': unknown value type %" PRIu32, path,
                         (int)m->key_len, m->key, m->type);
            return BN_ERR_FORMAT;
        }
        if (elem) {
            m->count = 1;
        } else {
            if (!take_u64(r, &m->count)) goto truncated;
            elem = m->type == BN_META_STR ? 1 : 4;
            if (m->count > (r->end - r->pos) / elem) goto truncated;
        }
        if ((m->value = take(r, m->count * elem)) == NULL) goto truncated;
        if (m->type == BN_META_STR && !utf8_valid(m->value, m->count)) {
            bn_set_error(err, err_len, "%s: metadata key '%.*s': string is not valid UTF-8", path, (int)m->key_len,
                         m->key);
            return BN_ERR_FORMAT;
        }
        continue;
    truncated:
        bn_set_error(err, err_len,
                     "%s: metadata key '%.*s' (%s) runs past data_offset %" PRIu64 " (file has %" PRIu64
                     " bytes)",
                     path, (int)m->key_len, m->key, bn_meta_type_name(m->type), f->data_offset, f->size);
        return BN_ERR_FORMAT;
    }
    if (f->n_meta > 1) qsort(f->meta, f->n_meta, sizeof *f->meta, meta_cmp);
    for (uint64_t i = 1; i < f->n_meta; i++) {
        if (meta_cmp(&f->meta[i - 1], &f->meta[i]) == 0) {
            bn_set_error(err, err_len, "%s: duplicate metadata key '%.*s'", path, (int)f->meta[i].key_len,
                         f->meta[i].key);
            return BN_ERR_FORMAT;
        }
    }
    return BN_OK;
}

/* Everything about one tensor record that does not depend on the architecture. */
static bn_status check_tensor(bn_file *f, bn_tensor_rec *t, const char *path, char *err, size_t err_len) {
    char shape[128];
    bn_format_shape(shape, sizeof shape, t->dims, t->n_dims);
    const int nl = (int)t->name_len;
    if (t->encoding >= BN_ENC_COUNT) {
        bn_set_error(err, err_len, "%s: tensor '%.*s': unsupported encoding %" PRIu32, path, nl, t->name,
                     t->encoding);
        return BN_ERR_UNSUPPORTED;
    }
    t->numel = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        if (t->dims[d] == 0 || t->dims[d] > UINT64_MAX / t->numel) {
            bn_set_error(err, err_len, "%s: tensor '%.*s': bad shape %s", path, nl, t->name, shape);
            return BN_ERR_FORMAT;
        }
        t->numel *= t->dims[d];
    }
    const bn_encoding_traits *enc = &bn_encodings[t->encoding];
    if (enc->n_dims && t->n_dims != enc->n_dims) {
        bn_set_error(err, err_len, "%s: tensor '%.*s': encoding %s needs %" PRIu32 " dimensions, shape is %s", path,
                     nl, t->name, enc->name, enc->n_dims, shape);
        return BN_ERR_FORMAT;
    }
    uint64_t need = enc->nbytes(t->dims, t->numel);
    if (need == 0 || t->nbytes != need) {
        bn_set_error(err, err_len,
                     "%s: tensor '%.*s': nbytes %" PRIu64 " but encoding %s with shape %s needs %" PRIu64, path,
                     nl, t->name, t->nbytes, bn_encoding_name(t->encoding), shape, need);
        return BN_ERR_FORMAT;
    }
    if (!isfinite(t->scale)) {
        bn_set_error(err, err_len, "%s: tensor '%.*s': scale is not finite", path, nl, t->name);
        return BN_ERR_FORMAT;
    }
    if (t->offset % f->alignment != 0) {
        bn_set_error(err, err_len,
                     "%s: tensor '%.*s': offset %" PRIu64 " is not a multiple of the alignment %" PRIu32, path,
                     nl, t->name, t->offset, f->alignment);
        return BN_ERR_FORMAT;
    }
    uint64_t room = f->size - f->data_offset; /* data_offset <= size was checked */
    if (t->offset > room || t->nbytes > room - t->offset) {
        uint64_t end = f->data_offset + t->offset + t->nbytes;
        int wrapped = t->offset > UINT64_MAX - f->data_offset || t->nbytes > UINT64_MAX - f->data_offset - t->offset;
        if (wrapped)
            bn_set_error(err, err_len, "%s: tensor '%.*s': offset %" PRIu64 " + nbytes %" PRIu64
                         " is past the end of the file (%" PRIu64 " bytes)", path, nl, t->name, t->offset,
                         t->nbytes, f->size);
        else
            bn_set_error(err, err_len,
                         "%s: truncated: tensor '%.*s' ends at byte %" PRIu64 " but the file has %" PRIu64
                         " bytes", path, nl, t->name, end, f->size);
        return BN_ERR_FORMAT;
    }
    t->data = f->map + f->data_offset + t->offset;
    return BN_OK;
}

static bn_status parse_tensors(bn_file *f, reader *r, const char *path, char *err, size_t err_len) {
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        bn_tensor_rec *t = &f->tensors[i];
        uint64_t at = r->pos;
        if (!take_name(r, &t->name, &t->name_len)) {
            bn_set_error(err, err_len,
                         "%s: tensor record %" PRIu64 " at byte %" PRIu64
                         ": bad name (length 1..%d printable ASCII bytes, before data_offset %" PRIu64 ")",
                         path, i, at, BN_MAX_NAME_LEN, f->data_offset);
            return BN_ERR_FORMAT;
        }
        if (!take_u32(r, &t->encoding) || !take_u32(r, &t->n_dims)) goto truncated;
        if (t->n_dims < 1 || t->n_dims > BN_MAX_DIMS) {
            bn_set_error(err, err_len, "%s: tensor '%.*s': n_dims %" PRIu32 " (expected 1..%d)", path,
                         (int)t->name_len, t->name, t->n_dims, BN_MAX_DIMS);
            return BN_ERR_FORMAT;
        }
        for (uint32_t d = 0; d < t->n_dims; d++)
            if (!take_u64(r, &t->dims[d])) goto truncated;
        if (!take_f32(r, &t->scale) || !take_u64(r, &t->offset) || !take_u64(r, &t->nbytes)) goto truncated;
        bn_status st = check_tensor(f, t, path, err, err_len);
        if (st != BN_OK) return st;
        continue;
    truncated:
        bn_set_error(err, err_len,
                     "%s: tensor record '%.*s' runs past data_offset %" PRIu64 " (file has %" PRIu64 " bytes)",
                     path, (int)t->name_len, t->name, f->data_offset, f->size);
        return BN_ERR_FORMAT;
    }
    if (f->n_tensors > 1) qsort(f->tensors, f->n_tensors, sizeof *f->tensors, tensor_cmp);
    for (uint64_t i = 1; i < f->n_tensors; i++) {
        if (tensor_cmp(&f->tensors[i - 1], &f->tensors[i]) == 0) {
            bn_set_error(err, err_len, "%s: duplicate tensor '%.*s'", path, (int)f->tensors[i].name_len,
                         f->tensors[i].name);
            return BN_ERR_FORMAT;
        }
    }
    return BN_OK;
}

/* Header fields; the counts are bounded by the header area before anything is allocated. */
static bn_status parse_header(bn_file *f, reader *r, const char *path, char *err, size_t err_len) {
    /* The map holds at least BN_HEADER_SIZE bytes; the magic was checked and `reserved` is ignored. */
    uint32_t version;
    memcpy(&version, f->map + 4, 4);
    memcpy(&f->alignment, f->map + 8, 4);
    memcpy(&f->n_meta, f->map + 16, 8);
    memcpy(&f->n_tensors, f->map + 24, 8);
    memcpy(&f->data_offset, f->map + 32, 8);
    r->pos = BN_HEADER_SIZE;
    if (version != BN_FILE_VERSION) {
        bn_set_error(err, err_len, "%s: unsupported format version %" PRIu32 " (this runtime reads version %d)",
                     path, version, BN_FILE_VERSION);
        return BN_ERR_UNSUPPORTED;
    }
    /* >= 4 keeps every F32 tensor 4-byte aligned in the page-aligned map. */
    if (f->alignment < 4 || f->alignment > 65536 || (f->alignment & (f->alignment - 1)) != 0) {
        bn_set_error(err, err_len, "%s: bad alignment %" PRIu32 " (expected a power of two such as 64)", path,
                     f->alignment);
        return BN_ERR_FORMAT;
    }
    if (f->data_offset < BN_HEADER_SIZE || f->data_offset % f->alignment != 0) {
        bn_set_error(err, err_len,
                     "%s: bad data_offset %" PRIu64 " (expected a multiple of %" PRIu32 " after the header)",
                     path, f->data_offset, f->alignment);
        return BN_ERR_FORMAT;
    }
    if (f->data_offset > f->size) {
        bn_set_error(err, err_len, "%s: truncated: data_offset is %" PRIu64 " but the file has %" PRIu64 " bytes",
                     path, f->data_offset, f->size);
        return BN_ERR_FORMAT;
    }
    uint64_t area = f->data_offset - BN_HEADER_SIZE;
    if (f->n_meta > BN_MAX_META || f->n_meta > area / BN_MIN_META_RECORD) {
        bn_set_error(err, err_len, "%s: metadata count %" PRIu64 " does not fit before data_offset %" PRIu64,
                     path, f->n_meta, f->data_offset);
        return BN_ERR_FORMAT;
    }
    if (f->n_tensors > BN_MAX_TENSORS || f->n_tensors > area / BN_MIN_TENSOR_RECORD) {
        bn_set_error(err, err_len, "%s: tensor count %" PRIu64 " does not fit before data_offset %" PRIu64, path,
                     f->n_tensors, f->data_offset);
        return BN_ERR_FORMAT;
    }
    r->end = f->data_offset; /* records live in the header area */
    return BN_OK;
}

/* Opens and maps; the magic is checked before anything else so that a foreign file says so. */
static bn_status map_file(bn_file *f, const char *path, char *err, size_t err_len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        bn_set_error(err, err_len, "%s: cannot open: %s", path, strerror(errno));
        return BN_ERR_IO;
    }
    struct stat st;
    bn_status status = BN_OK;
    uint8_t head[4];
    if (fstat(fd, &st) != 0) {
        bn_set_error(err, err_len, "%s: cannot stat: %s", path, strerror(errno));
        status = BN_ERR_IO;
    } else if (!S_ISREG(st.st_mode)) {
        bn_set_error(err, err_len, "%s: not a regular file", path);
        status = BN_ERR_IO;
    } else if (st.st_size >= 4 && pread(fd, head, 4, 0) != 4) {
        bn_set_error(err, err_len, "%s: cannot read: %s", path, strerror(errno));
        status = BN_ERR_IO;
    } else if (st.st_size >= 4 && memcmp(head, "BNRF", 4) != 0) {
        bn_set_error(err, err_len, "%s: bad magic (expected BNRF)", path);
        status = BN_ERR_FORMAT;
    } else if ((uint64_t)st.st_size < BN_HEADER_SIZE) {
        bn_set_error(err, err_len, "%s: truncated: the header needs %d bytes but the file has %" PRIu64 " bytes",
                     path, BN_HEADER_SIZE, (uint64_t)st.st_size);
        status = BN_ERR_FORMAT;
    } else if ((uint64_t)st.st_size > SIZE_MAX) {
        bn_set_error(err, err_len, "%s: too large to map", path);
        status = BN_ERR_IO;
    } else {
        void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            bn_set_error(err, err_len, "%s: cannot map: %s", path, strerror(errno));
            status = BN_ERR_IO;
        } else {
            f->map = map;
            f->size = (uint64_t)st.st_size;
        }
    }
    close(fd); /* the mapping stays valid */
    return status;
}

bn_status bn_file_open(bn_file *f, const char *path, char *err, size_t err_len) {
    memset(f, 0, sizeof *f);
    bn_status st = map_file(f, path, err, err_len);
    if (st != BN_OK) return st;
    reader r = {f->map, 0, f->size};
    st = parse_header(f, &r, path, err, err_len);
    if (st == BN_OK && f->n_meta > 0 && (f->meta = calloc(f->n_meta, sizeof *f->meta)) == NULL) st = BN_ERR_NOMEM;
    if (st == BN_OK && f->n_tensors > 0 && (f->tensors = calloc(f->n_tensors, sizeof *f->tensors)) == NULL)
        st = BN_ERR_NOMEM;
    if (st == BN_ERR_NOMEM) bn_set_error(err, err_len, "%s: out of memory for the tensor table", path);
    if (st == BN_OK) st = parse_meta(f, &r, path, err, err_len);
    if (st == BN_OK) st = parse_tensors(f, &r, path, err, err_len);
    if (st != BN_OK) bn_file_close(f);
    return st;
}

void bn_file_close(bn_file *f) {
    if (f->map) munmap((void *)f->map, (size_t)f->size);
    free(f->meta);
    free(f->tensors);
    memset(f, 0, sizeof *f);
}

const bn_meta *bn_file_meta(const bn_file *f, const char *key) {
    size_t n = strlen(key);
    if (f->n_meta == 0 || n == 0 || n > BN_MAX_NAME_LEN) return NULL;
    bn_meta probe = {.key = key, .key_len = (uint32_t)n};
    return bsearch(&probe, f->meta, f->n_meta, sizeof *f->meta, meta_cmp);
}

const bn_tensor_rec *bn_file_tensor(const bn_file *f, const char *name) {
    size_t n = strlen(name);
    if (f->n_tensors == 0 || n == 0 || n > BN_MAX_NAME_LEN) return NULL;
    bn_tensor_rec probe = {.name = name, .name_len = (uint32_t)n};
    return bsearch(&probe, f->tensors, f->n_tensors, sizeof *f->tensors, tensor_cmp);
}

/* ---- the development API's view of the format (bitnet_dev.h) ---- */

bn_status bn_file_validate(const char *path, char *err, size_t err_len) {
    bn_file f;
    if (path == NULL) return BN_ERR_ARG;
    bn_status st = bn_file_open(&f, path, err, err_len);
    if (st == BN_OK) bn_file_close(&f);
    return st;
}

uint64_t bn_encoding_nbytes(uint32_t encoding, uint32_t n_dims, const uint64_t *dims) {
    if (encoding >= BN_ENC_COUNT || dims == NULL || n_dims < 1 || n_dims > BN_MAX_DIMS) return 0;
    if (bn_encodings[encoding].n_dims && n_dims != bn_encodings[encoding].n_dims) return 0;
    uint64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
        if (dims[d] == 0 || dims[d] > UINT64_MAX / numel) return 0;
        numel *= dims[d];
    }
    return bn_encodings[encoding].nbytes(dims, numel);
}

const char *bn_encoding_label(uint32_t encoding) { return bn_encoding_name(encoding); }
