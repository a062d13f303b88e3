"""The packed model file (`.bnr`, docs/format.md): constants, a streaming writer and a header reader.

The writer never holds more than one tensor: it lays out the file from the tensor shapes alone,
streams each tensor's bytes to its final offset as its producer returns them, and writes the
header and tables last, because ternary scales are only known once a tensor has been quantized.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

MAGIC = b"BNRF"
VERSION = 1
ALIGNMENT = 64
HEADER_SIZE = 40
MAX_DIMS = 4

# Metadata value types.
TYPE_U32 = 0
TYPE_I32 = 1
TYPE_F32 = 2
TYPE_U64 = 3
TYPE_STRING = 4
TYPE_I32_ARRAY = 5
TYPE_NAMES = {
    TYPE_U32: "u32",
    TYPE_I32: "i32",
    TYPE_F32: "f32",
    TYPE_U64: "u64",
    TYPE_STRING: "string",
    TYPE_I32_ARRAY: "i32 array",
}

# Tensor encodings (docs/format.md); ids are never reused. Their traits are the ENCODINGS table below.
ENCODING_F32 = 0
ENCODING_F16 = 1
ENCODING_BF16 = 2
ENCODING_I2 = 3
ENCODING_TL1 = 4
ENCODING_TL2 = 5
ENCODING_Q8R = 6
ENCODING_Q6B = 7
ENCODING_Q4B = 8
# TL1/TL2 group the rows into tiles of this many rows (docs/format.md).
TL_TILE = 32
TL2_GROUP_BYTES = 40
# Q6_B/Q4_B quantize rows in blocks of this many columns, each with a u8 scale (docs/format.md).
QB_BLOCK = 32
QB_GROUP = 16  # blocks per group, the unit of a row's layout
QB_SCALE_MAX = 255
# Tensor names and metadata keys: 1..256 printable ASCII bytes (they end up in one-line errors).
MAX_NAME_LEN = 256
# Alignments a reader accepts: powers of two in this range (>= 4 keeps F32 data 4-byte aligned).
MIN_ALIGNMENT, MAX_ALIGNMENT = 4, 65536
# Most metadata records and tensor records a reader accepts.
MAX_RECORDS = 65536

_HEADER = struct.Struct("<4sIIIQQQ")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_F32 = struct.Struct("<f")
_U64 = struct.Struct("<Q")

MetadataValue = Union[int, float, str, list]


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


# --------------------------------------------------------------------------- I2 packing


def pack_i2(w: np.ndarray) -> np.ndarray:
    """Pack a ternary int8 matrix [out, in] into I2 bytes [out, ceil(in/4)].

    Element j of a row goes to byte j//4, bits 2*(j%4).. (lowest first), stored as w+1.
    """
    if w.ndim != 2:
        raise ValueError(f"pack_i2 expects a 2-D matrix, got shape {w.shape}")
    if w.size and (w.min() < -1 or w.max() > 1):
        raise ValueError("pack_i2 expects ternary values in {-1, 0, 1}")
    rows, cols = w.shape
    padded_cols = (cols + 3) // 4 * 4
    # Padding columns hold w = 0 (code 1), a valid ternary value that adds nothing to a dot product.
    codes = np.ones((rows, padded_cols), dtype=np.uint8)
    codes[:, :cols] = (w + 1).astype(np.uint8)
    codes = codes.reshape(rows, padded_cols // 4, 4)
    return codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)


def unpack_i2(packed: np.ndarray, in_features: int) -> np.ndarray:
    """Inverse of pack_i2: I2 bytes [out, ceil(in/4)] -> int8 [out, in_features]."""
    if packed.ndim != 2 or packed.shape[1] != (in_features + 3) // 4:
        raise ValueError(f"I2 data of shape {packed.shape} does not hold rows of {in_features} values")
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
    codes = (packed[..., None] >> shifts) & 3
    if np.any(codes == 3):
        raise ValueError("I2 data holds the invalid code 3")
    return codes.reshape(packed.shape[0], -1)[:, :in_features].astype(np.int8) - 1


# --------------------------------------------------------------------------- TL1 / TL2 packing


def _check_ternary(w: np.ndarray, what: str) -> None:
    if w.ndim != 2:
        raise ValueError(f"{what} expects a 2-D matrix, got shape {w.shape}")
    if w.size and (w.min() < -1 or w.max() > 1):
        raise ValueError(f"{what} expects ternary values in {{-1, 0, 1}}")


def _tile_rows(rows: int) -> int:
    return -(-rows // TL_TILE) * TL_TILE


def _to_tiles(per_row: np.ndarray) -> np.ndarray:
    """[tiles*32, n] per-row bytes -> [tiles, n, 32]: vector k of a tile holds lane i's byte k at i."""
    return per_row.reshape(per_row.shape[0] // TL_TILE, TL_TILE, per_row.shape[1]).transpose(0, 2, 1)


def _from_tiles(tiled: np.ndarray) -> np.ndarray:
    """Inverse of _to_tiles: [tiles, n, 32] -> [tiles*32, n]."""
    return tiled.transpose(0, 2, 1).reshape(tiled.shape[0] * TL_TILE, tiled.shape[1])


def pack_tl1(w: np.ndarray) -> np.ndarray:
    """Pack a ternary int8 matrix [out, in] into TL1 bytes (1-D, encoded_nbytes(TL1, w.shape) long).

    Pairs (w[2p], w[2p+1]) become 4-bit indices 3*w0 + w1 + 4; in tiles of 32 rows, byte 32*k + i of a
    tile holds row i's pairs 2k (low nibble) and 2k+1 (high nibble). Padding (columns up to a multiple
    of 4, rows up to a multiple of 32) is w = 0, index 4.
    """
    _check_ternary(w, "pack_tl1")
    rows, cols = w.shape
    quads = (cols + 3) // 4
    padded = np.zeros((_tile_rows(rows), 4 * quads), dtype=np.int16)
    padded[:rows, :cols] = w
    idx = (3 * padded[:, 0::2] + padded[:, 1::2] + 4).astype(np.uint8)  # [R, 2*quads]
    per_row = idx[:, 0::2] | (idx[:, 1::2] << 4)  # [R, quads]
    return np.ascontiguousarray(_to_tiles(per_row)).reshape(-1)


def _tl1_weights(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if np.any(idx > 8):
        raise ValueError("TL1 data holds an invalid index (9..15)")
    return (idx // 3).astype(np.int8) - 1, (idx % 3).astype(np.int8) - 1


def unpack_tl1(packed: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Inverse of pack_tl1: TL1 bytes -> int8 [rows, cols]."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != encoded_nbytes(ENCODING_TL1, (rows, cols)):
        raise ValueError(f"TL1 data of {packed.size} bytes does not hold a [{rows}, {cols}] matrix")
    per_row = _from_tiles(packed.reshape(-(-rows // TL_TILE), (cols + 3) // 4, TL_TILE))[:rows]
    idx = np.stack([per_row & 15, per_row >> 4], axis=-1).reshape(rows, -1)[:, : (cols + 1) // 2]
    w0, w1 = _tl1_weights(idx)
    return np.stack([w0, w1], axis=-1).reshape(rows, -1)[:, :cols]


# |v| -> (w0, w1, w2) with 9*w0 + 3*w1 + w2 = |v| (balanced ternary), for |v| in 0..13.
_TL2_PATTERNS = np.array(
    [[0, 0, 0], [0, 0, 1], [0, 1, -1], [0, 1, 0], [0, 1, 1], [1, -1, -1], [1, -1, 0], [1, -1, 1], [1, 0, -1],
     [1, 0, 0], [1, 0, 1], [1, 1, -1], [1, 1, 0], [1, 1, 1]],
    dtype=np.int8,
)


def pack_tl2(w: np.ndarray) -> np.ndarray:
    """Pack a ternary int8 matrix [out, in] into TL2 bytes (1-D, encoded_nbytes(TL2, w.shape) long).

    Triples of the first 3*floor(in/3) columns become v = 9*w0 + 3*w1 + w2, stored as a 4-bit |v| and a
    sign bit; in tiles of 32 rows, group g (triples 2g, 2g+1) is 40 bytes: 32 index bytes (byte i: row
    i's triple 2g low nibble, 2g+1 high nibble), then the two u32 sign words (bit i: row i). When in % 3
    != 0, 32 tail bytes follow: byte i = row i's TL1 index of the last 1 or 2 columns (padded with 0).
    """
    _check_ternary(w, "pack_tl2")
    rows, cols = w.shape
    n3 = cols // 3
    groups = (n3 + 1) // 2
    R = _tile_rows(rows)
    tiles = R // TL_TILE
    padded = np.zeros((R, 6 * groups), dtype=np.int16)
    padded[:rows, : 3 * n3] = w[:, : 3 * n3]
    v = 9 * padded[:, 0::3] + 3 * padded[:, 1::3] + padded[:, 2::3]  # [R, 2*groups]
    mag = np.abs(v).astype(np.uint8)
    nibbles = _to_tiles(mag[:, 0::2] | (mag[:, 1::2] << 4))  # [tiles, groups, 32]
    signs = np.packbits(_to_tiles((v < 0).astype(np.uint8)), axis=-1, bitorder="little")  # [tiles, 2*groups, 4]
    group_bytes = np.concatenate([nibbles, signs.reshape(tiles, groups, 8)], axis=-1)  # [tiles, groups, 40]
    parts = [group_bytes.reshape(tiles, -1)]
    if cols % 3:
        tail = np.zeros((R, 2), dtype=np.int16)
        tail[:rows, : cols % 3] = w[:, 3 * n3 :]
        parts.append((3 * tail[:, 0] + tail[:, 1] + 4).astype(np.uint8).reshape(tiles, TL_TILE))
    return np.ascontiguousarray(np.concatenate(parts, axis=1)).reshape(-1)


def unpack_tl2(packed: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Inverse of pack_tl2: TL2 bytes -> int8 [rows, cols]."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != encoded_nbytes(ENCODING_TL2, (rows, cols)):
        raise ValueError(f"TL2 data of {packed.size} bytes does not hold a [{rows}, {cols}] matrix")
    n3 = cols // 3
    groups = (n3 + 1) // 2
    tiles = -(-rows // TL_TILE)
    tile = packed.reshape(tiles, -1)
    group_bytes = tile[:, : TL2_GROUP_BYTES * groups].reshape(tiles, groups, TL2_GROUP_BYTES)
    per_row = _from_tiles(group_bytes[..., :TL_TILE])[:rows]  # [rows, groups]
    mag = np.stack([per_row & 15, per_row >> 4], axis=-1).reshape(rows, -1)[:, :n3]
    if np.any(mag > 13):
        raise ValueError("TL2 data holds an invalid index (14, 15)")
    sign_bits = np.unpackbits(group_bytes[..., TL_TILE:].reshape(tiles, 2 * groups, 4), axis=-1, bitorder="little")
    negative = _from_tiles(sign_bits)[:rows, :n3].astype(bool)  # [rows, n3]
    triples = _TL2_PATTERNS[mag] * np.where(negative, -1, 1).astype(np.int8)[..., None]
    out = np.zeros((rows, cols), dtype=np.int8)
    out[:, : 3 * n3] = triples.reshape(rows, -1)
    if cols % 3:
        w0, w1 = _tl1_weights(tile[:, TL2_GROUP_BYTES * groups :].reshape(-1)[:rows] & 15)
        out[:, 3 * n3] = w0
        if cols % 3 == 2:
            out[:, 3 * n3 + 1] = w1
    return out


# --------------------------------------------------------------------------- Q8_R (8-bit head)


def quantize_q8r(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row absmax symmetric int8 of a float [rows, cols] matrix, in float32:
    scale = max|W_r| / 127, q = clamp(round_half_even(W / scale), -127, 127) (q = 0, scale = 0 for an
    all-zero row). Returns (q int8 [rows, cols], scale float32 [rows]). Non-finite weights are an error."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"Q8_R tensors are 2-D, got shape {list(w.shape)}")
    if not np.all(np.isfinite(w)):
        raise ValueError("Q8_R: the matrix holds non-finite values")
    scale = (np.max(np.abs(w), axis=1) / np.float32(127)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))[:, None]
    q = np.clip(np.rint(w / safe), -127, 127).astype(np.int8)
    return q, scale


def pack_q8r(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(q int8 [rows, cols], scale float32 [rows]) -> the Q8_R bytes: rows f32 scales, then the int8 rows."""
    q = np.asarray(q)
    if q.ndim != 2 or q.dtype != np.int8:
        raise ValueError(f"Q8_R rows must be a 2-D int8 array, got {q.dtype} {list(q.shape)}")
    scale = np.ascontiguousarray(scale, dtype="<f4")
    if scale.shape != (q.shape[0],):
        raise ValueError(f"Q8_R needs one scale per row: {scale.shape} for {q.shape[0]} rows")
    return np.concatenate([scale.view(np.uint8), np.ascontiguousarray(q).view(np.uint8).reshape(-1)])


def unpack_q8r(packed: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """The Q8_R bytes of a [rows, cols] matrix -> (q int8 [rows, cols], scale float32 [rows])."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != encoded_nbytes(ENCODING_Q8R, (rows, cols)):
        raise ValueError(f"Q8_R [{rows}, {cols}] needs {encoded_nbytes(ENCODING_Q8R, (rows, cols))} bytes, got {packed.size}")
    scale = packed[: 4 * rows].view("<f4").astype(np.float32)
    q = packed[4 * rows:].view(np.int8).reshape(rows, cols)
    return q, scale


def dequantize_q8r(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 matrix a Q8_R tensor stands for: q * scale per row (what the embedding lookup reads)."""
    return q.astype(np.float32) * np.asarray(scale, dtype=np.float32)[:, None]


# --------------------------------------------------------------------------- Q6_B / Q4_B (6- and 4-bit heads)

# Per encoding: the largest |q| the quantizer writes and the offset that makes q a code (q + offset);
# a reader accepts every code, so q = -offset too.
_QB_LEVELS = {ENCODING_Q6B: (31, 32), ENCODING_Q4B: (7, 8)}
_QB_CHUNK_ROWS = 4096  # rows quantized at a time (bounds the float32 temporaries)


def _qb_levels(encoding: int) -> tuple[int, int]:
    if encoding not in _QB_LEVELS:
        raise ValueError(f"not a Q6_B/Q4_B encoding: {encoding}")
    return _QB_LEVELS[encoding]


def _qb_row_bytes(encoding: int, cols: int) -> int:
    return -(-cols // QB_BLOCK) * (25 if encoding == ENCODING_Q6B else 17)


def quantize_qb(w: np.ndarray, encoding: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q6_B or Q4_B quantization of a float [rows, cols] matrix, in float32 (docs/format.md): per block
    of 32 columns the ideal scale a = max|W_block| / qmax (qmax 31 or 7), per row
    scale = max(a) / 255, block scale s = clamp(round_half_even(a / scale), 1, 255) (0 for an
    all-zero block), q = clamp(round_half_even(W / (s * scale)), -qmax, qmax) (0 past cols).
    Returns (q int8 [rows, 32 * nb], s uint8 [rows, nb], scale float32 [rows]), nb = ceil(cols / 32).
    Non-finite weights are an error."""
    qmax, _ = _qb_levels(encoding)
    name = ENCODINGS[encoding].name
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"{name} tensors are 2-D, got shape {list(w.shape)}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name}: the matrix holds non-finite values")
    rows, cols = w.shape
    nb = -(-cols // QB_BLOCK)
    q = np.zeros((rows, nb * QB_BLOCK), dtype=np.int8)
    block_scale = np.zeros((rows, nb), dtype=np.uint8)
    scale = np.zeros(rows, dtype=np.float32)
    for start in range(0, rows, _QB_CHUNK_ROWS):
        stop = min(rows, start + _QB_CHUNK_ROWS)
        blocks = np.zeros((stop - start, nb * QB_BLOCK), dtype=np.float32)
        blocks[:, :cols] = w[start:stop]
        blocks = blocks.reshape(stop - start, nb, QB_BLOCK)
        ideal = np.max(np.abs(blocks), axis=2) / np.float32(qmax)  # [n, nb]
        d = (np.max(ideal, axis=1) / np.float32(QB_SCALE_MAX)).astype(np.float32)
        safe_d = np.where(d > 0, d, np.float32(1))[:, None]
        s = np.where(ideal > 0, np.clip(np.rint(ideal / safe_d), 1, QB_SCALE_MAX), 0).astype(np.uint8)
        step = s.astype(np.float32) * d[:, None]
        safe_step = np.where(step > 0, step, np.float32(1))[:, :, None]
        qb = np.clip(np.rint(blocks / safe_step), -qmax, qmax)
        q[start:stop] = qb.reshape(stop - start, -1).astype(np.int8)
        block_scale[start:stop], scale[start:stop] = s, d
    return q, block_scale, scale


def pack_qb(q: np.ndarray, block_scale: np.ndarray, scale: np.ndarray, encoding: int) -> np.ndarray:
    """(q int8 [rows, 32 * nb] in -offset..offset-1, s uint8 [rows, nb], scale float32 [rows]) -> the
    Q6_B/Q4_B bytes: rows f32 scales, then each row as groups of up to 16 blocks, a group of n blocks
    being their n block scales, the low nibbles of their codes q + offset (byte 16i + k: block i's
    column k low, column 16 + k high) and, Q6_B only, the codes' bits 4-5 (byte 8i + m: block i's
    column 8j + m at bits 2j)."""
    _, offset = _qb_levels(encoding)
    name = ENCODINGS[encoding].name
    q = np.asarray(q)
    if q.ndim != 2 or q.dtype != np.int8 or q.shape[1] % QB_BLOCK:
        raise ValueError(f"{name} values must be a 2-D int8 array of whole 32-column blocks, got {q.dtype} {list(q.shape)}")
    rows, nb = q.shape[0], q.shape[1] // QB_BLOCK
    block_scale = np.asarray(block_scale)
    if block_scale.shape != (rows, nb) or block_scale.dtype != np.uint8:
        raise ValueError(f"{name} needs uint8 block scales [{rows}, {nb}], got {block_scale.dtype} {list(block_scale.shape)}")
    scale = np.ascontiguousarray(scale, dtype="<f4")
    if scale.shape != (rows,):
        raise ValueError(f"{name} needs one scale per row: {scale.shape} for {rows} rows")
    if q.size and (q.min() < -offset or q.max() >= offset):
        raise ValueError(f"{name} values lie in {-offset}..{offset - 1}")
    codes = (q.astype(np.int16) + offset).astype(np.uint8).reshape(rows, nb, QB_BLOCK)
    nibbles = (codes[..., :16] & 15) | ((codes[..., 16:] & 15) << 4)  # [rows, nb, 16]
    high = (codes >> 4).reshape(rows, nb, 4, 8)
    high = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)  # [rows, nb, 8]
    parts = []
    for b0 in range(0, nb, QB_GROUP):
        group = slice(b0, min(nb, b0 + QB_GROUP))
        parts += [block_scale[:, group], nibbles[:, group].reshape(rows, -1)]
        if encoding == ENCODING_Q6B:
            parts.append(high[:, group].reshape(rows, -1))
    return np.concatenate([scale.view(np.uint8), np.concatenate(parts, axis=1).reshape(-1)])


def unpack_qb(packed: np.ndarray, rows: int, cols: int, encoding: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Q6_B/Q4_B bytes of a [rows, cols] matrix -> (q int8 [rows, 32 * nb], s uint8 [rows, nb],
    scale float32 [rows]); q past cols is what the file holds there (a reader ignores it)."""
    _, offset = _qb_levels(encoding)
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    expected = encoded_nbytes(encoding, (rows, cols))
    if packed.size != expected:
        raise ValueError(f"{ENCODINGS[encoding].name} [{rows}, {cols}] needs {expected} bytes, got {packed.size}")
    nb = -(-cols // QB_BLOCK)
    scale = packed[: 4 * rows].view("<f4").astype(np.float32)
    body = packed[4 * rows:].reshape(rows, -1)
    block_scale, codes, at = [], [], 0
    for b0 in range(0, nb, QB_GROUP):
        n = min(QB_GROUP, nb - b0)
        block_scale.append(body[:, at: at + n])
        nibbles = body[:, at + n: at + 17 * n].reshape(rows, n, 16)
        c = np.concatenate([nibbles & 15, nibbles >> 4], axis=2)
        if encoding == ENCODING_Q6B:
            high = body[:, at + 17 * n: at + 25 * n].reshape(rows, n, 1, 8)
            c |= (((high >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3) << 4).reshape(rows, n, QB_BLOCK)
        codes.append(c)
        at += n * (25 if encoding == ENCODING_Q6B else 17)
    q = (np.concatenate(codes, axis=1).astype(np.int16) - offset).astype(np.int8).reshape(rows, -1)
    return q, np.concatenate(block_scale, axis=1), scale


def dequantize_qb(q: np.ndarray, block_scale: np.ndarray, scale: np.ndarray, cols: int) -> np.ndarray:
    """The float32 [rows, cols] matrix a Q6_B/Q4_B tensor stands for: (float)(q * s) * scale, as the
    runtime's embedding lookup reads it."""
    per_column = np.repeat(np.asarray(block_scale, dtype=np.int32), QB_BLOCK, axis=1)
    return (q.astype(np.int32) * per_column)[:, :cols].astype(np.float32) * np.asarray(scale, dtype=np.float32)[:, None]


# --------------------------------------------------------------------------- the encodings table


def _float_nbytes(itemsize: int) -> Callable[[Sequence[int]], int]:
    return lambda dims: itemsize * math.prod(dims)


def _tl1_tile_bytes(cols: int) -> int:
    return TL_TILE * ((cols + 3) // 4)


def _tl2_tile_bytes(cols: int) -> int:
    return TL2_GROUP_BYTES * ((cols // 3 + 1) // 2) + (TL_TILE if cols % 3 else 0)


def _tiled(tile_bytes: Callable[[int], int]) -> Callable[[Sequence[int]], int]:
    return lambda dims: -(-dims[0] // TL_TILE) * tile_bytes(dims[1])


@dataclass(frozen=True)
class Encoding:
    """One tensor encoding: its id in the file, its names, what it holds and how many bytes a shape takes.
    The C runtime has the same table (bn_encoding_traits, runtime/src/model_file.c); a test compares them."""

    id: int
    name: str  # as docs/format.md and error messages write it
    option: str  # the name the converter, bench and kernel tools take (--weights, --head)
    kind: str  # "float" (dense), "ternary" (a BitLinear weight) or "quant" (integer rows with float scales, the head)
    nbytes_of: Callable[[Sequence[int]], int]
    tile_rows: int = 1  # rows a layout groups together (the last group padded)
    dtype: np.dtype | None = None  # float encodings: how numpy holds the stored values (bf16 as its bits)
    pack: Callable[[np.ndarray], np.ndarray] | None = None  # ternary: int8 [out, in] -> the stored bytes
    quantize: Callable[[np.ndarray], np.ndarray] | None = None  # quant: float32 [rows, cols] -> the stored bytes

    @property
    def two_d(self) -> bool:
        return self.kind != "float"

    def nbytes(self, dims: Sequence[int]) -> int:
        if self.two_d and len(dims) != 2:
            raise ValueError(f"{self.name} tensors are 2-D, got dims {list(dims)}")
        return self.nbytes_of(dims)


ENCODINGS: dict[int, Encoding] = {
    e.id: e
    for e in (
        Encoding(ENCODING_F32, "F32", "f32", "float", _float_nbytes(4), dtype=np.dtype("<f4")),
        Encoding(ENCODING_F16, "F16", "f16", "float", _float_nbytes(2), dtype=np.dtype("<f2")),
        Encoding(ENCODING_BF16, "BF16", "bf16", "float", _float_nbytes(2), dtype=np.dtype("<u2")),
        Encoding(ENCODING_I2, "I2", "i2", "ternary", lambda d: d[0] * ((d[1] + 3) // 4), pack=pack_i2),
        Encoding(ENCODING_TL1, "TL1", "tl1", "ternary", _tiled(_tl1_tile_bytes), TL_TILE, pack=pack_tl1),
        Encoding(ENCODING_TL2, "TL2", "tl2", "ternary", _tiled(_tl2_tile_bytes), TL_TILE, pack=pack_tl2),
        Encoding(ENCODING_Q8R, "Q8_R", "q8", "quant", lambda d: 4 * d[0] + d[0] * d[1],
                 quantize=lambda w: pack_q8r(*quantize_q8r(w))),
        Encoding(ENCODING_Q6B, "Q6_B", "q6", "quant", lambda d: 4 * d[0] + d[0] * _qb_row_bytes(ENCODING_Q6B, d[1]),
                 quantize=lambda w: pack_qb(*quantize_qb(w, ENCODING_Q6B), ENCODING_Q6B)),
        Encoding(ENCODING_Q4B, "Q4_B", "q4", "quant", lambda d: 4 * d[0] + d[0] * _qb_row_bytes(ENCODING_Q4B, d[1]),
                 quantize=lambda w: pack_qb(*quantize_qb(w, ENCODING_Q4B), ENCODING_Q4B)),
    )
}
ENCODING_NAMES = {e.id: e.name for e in ENCODINGS.values()}
# The ternary (BitLinear) weight encodings, and each one's packer.
TERNARY_ENCODINGS = tuple(e.id for e in ENCODINGS.values() if e.kind == "ternary")
TERNARY_PACKERS = {e.id: e.pack for e in ENCODINGS.values() if e.kind == "ternary"}
# The numpy dtype each float encoding is stored as (bf16 as its raw bits).
FLOAT_ENCODING_DTYPES = {e.id: e.dtype for e in ENCODINGS.values() if e.kind == "float"}
# Encoding per converter `weights` name (the ternary linears) and `head` name (the output head).
WEIGHT_ENCODINGS = {e.option: e.id for e in ENCODINGS.values() if e.kind == "ternary"}
# The integer head encodings (Q8_R, Q6_B, Q4_B): their activations are quantized to int8 per token.
QUANT_ENCODINGS = tuple(e.id for e in ENCODINGS.values() if e.kind == "quant")
HEAD_ENCODINGS = {"bf16": ENCODING_BF16, "f16": ENCODING_F16, "f32": ENCODING_F32,
                  **{ENCODINGS[e].option: e for e in QUANT_ENCODINGS}}


def encoded_nbytes(encoding: int, dims: Sequence[int]) -> int:
    """The exact data size the spec requires for a tensor of this encoding and shape."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding id {encoding}")
    return ENCODINGS[encoding].nbytes(dims)


# --------------------------------------------------------------------------- writer


@dataclass
class TensorData:
    """What a tensor producer returns: the encoded bytes (any C-contiguous array) and its scale."""

    data: np.ndarray
    scale: float = 1.0


@dataclass
class _PlannedTensor:
    name: str
    encoding: int
    dims: tuple[int, ...]
    nbytes: int
    produce: Callable[[], TensorData]
    offset: int = 0
    scale: float = 1.0


def _is_name(raw: bytes) -> bool:
    """The rule for tensor names and metadata keys, the same in the C loader (model_file.c)."""
    return 0 < len(raw) <= MAX_NAME_LEN and all(0x20 <= b <= 0x7E for b in raw)


def _encode_name(name: str, what: str) -> bytes:
    raw = name.encode("utf-8")
    if not _is_name(raw):
        raise ValueError(f"{what} {name!r} must be 1..{MAX_NAME_LEN} printable ASCII characters")
    return raw


def _encode_key(key: str) -> bytes:
    return _encode_name(key, "metadata key")


class Writer:
    """Builds a .bnr file: add metadata and tensor producers, then `write(path)`.

    A producer is called once, in the order tensors were added, and its bytes go straight to disk,
    so memory stays near the largest tensor.
    """

    def __init__(self) -> None:
        self._metadata: dict[str, tuple[int, MetadataValue]] = {}
        self._tensors: list[_PlannedTensor] = []

    # metadata ------------------------------------------------------------------------------

    def _add(self, key: str, type_id: int, value: MetadataValue) -> None:
        _encode_key(key)
        if key in self._metadata:
            raise ValueError(f"metadata key {key!r} added twice")
        self._metadata[key] = (type_id, value)

    def add_u32(self, key: str, value: int) -> None:
        self._add(key, TYPE_U32, int(value))

    def add_i32(self, key: str, value: int) -> None:
        self._add(key, TYPE_I32, int(value))

    def add_f32(self, key: str, value: float) -> None:
        self._add(key, TYPE_F32, float(value))

    def add_u64(self, key: str, value: int) -> None:
        self._add(key, TYPE_U64, int(value))

    def add_string(self, key: str, value: str) -> None:
        if "\0" in value:
            raise ValueError(f"metadata string {key!r} contains a NUL character")
        self._add(key, TYPE_STRING, value)

    def add_i32_array(self, key: str, values: Sequence[int]) -> None:
        self._add(key, TYPE_I32_ARRAY, [int(v) for v in values])

    # tensors -------------------------------------------------------------------------------

    def add_tensor(
        self, name: str, encoding: int, dims: Sequence[int], produce: Callable[[], TensorData]
    ) -> None:
        """Plan a tensor; `produce()` is called during `write` and must return exactly its bytes."""
        _encode_name(name, "tensor name")
        dims = tuple(int(d) for d in dims)
        if not 1 <= len(dims) <= MAX_DIMS or any(d <= 0 for d in dims):
            raise ValueError(f"tensor {name!r}: dims {list(dims)} must be 1..{MAX_DIMS} positive sizes")
        if any(t.name == name for t in self._tensors):
            raise ValueError(f"tensor {name!r} added twice")
        nbytes = encoded_nbytes(encoding, dims)
        self._tensors.append(_PlannedTensor(name, encoding, dims, nbytes, produce))

    @property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self._tensors]

    # output --------------------------------------------------------------------------------

    def _metadata_bytes(self) -> bytes:
        out = bytearray()
        for key, (type_id, value) in self._metadata.items():
            raw_key = _encode_key(key)
            out += _U32.pack(len(raw_key)) + raw_key + _U32.pack(type_id)
            if type_id == TYPE_U32:
                out += _U32.pack(value)
            elif type_id == TYPE_I32:
                out += _I32.pack(value)
            elif type_id == TYPE_F32:
                out += _F32.pack(value)
            elif type_id == TYPE_U64:
                out += _U64.pack(value)
            elif type_id == TYPE_STRING:
                raw = value.encode("utf-8")
                out += _U64.pack(len(raw)) + raw
            else:
                out += _U64.pack(len(value)) + struct.pack(f"<{len(value)}i", *value)
        return bytes(out)

    def _tensor_table_bytes(self) -> bytes:
        out = bytearray()
        for t in self._tensors:
            raw_name = t.name.encode("utf-8")
            out += _U32.pack(len(raw_name)) + raw_name
            out += struct.pack(f"<II{len(t.dims)}Q", t.encoding, len(t.dims), *t.dims)
            out += _F32.pack(t.scale) + _U64.pack(t.offset) + _U64.pack(t.nbytes)
        return bytes(out)

    def write(self, path: str | os.PathLike, progress: Callable[[int, int, str], None] | None = None) -> None:
        """Write the file; `progress(done, total, name)` is called after each tensor."""
        offset = 0
        for t in self._tensors:
            t.offset = offset
            offset = align_up(offset + t.nbytes)
        # The table's size does not depend on the scales, so the layout is final before any data.
        tables_size = HEADER_SIZE + len(self._metadata_bytes()) + len(self._tensor_table_bytes())
        data_offset = align_up(tables_size)

        with open(path, "wb") as f:
            for done, t in enumerate(self._tensors, 1):
                produced = t.produce()
                data = np.ascontiguousarray(produced.data)
                if data.nbytes != t.nbytes:
                    raise ValueError(
                        f"tensor {t.name!r}: producer returned {data.nbytes} bytes, "
                        f"{ENCODING_NAMES[t.encoding]} {list(t.dims)} needs {t.nbytes}"
                    )
                t.scale = float(produced.scale)
                if not math.isfinite(t.scale):
                    raise ValueError(f"tensor {t.name!r}: scale {t.scale} is not finite")
                f.seek(data_offset + t.offset)
                f.write(memoryview(data).cast("B"))
                del produced, data
                if progress is not None:
                    progress(done, len(self._tensors), t.name)
            # Gaps and the trailing pad are zero: seeking past the end leaves zeros, and the file
            # ends on an alignment boundary so every tensor's padding is physically there.
            f.truncate(data_offset + offset)
            f.seek(0)
            f.write(_HEADER.pack(MAGIC, VERSION, ALIGNMENT, 0, len(self._metadata), len(self._tensors), data_offset))
            f.write(self._metadata_bytes())
            f.write(self._tensor_table_bytes())


# --------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class TensorInfo:
    name: str
    encoding: int
    dims: tuple[int, ...]
    scale: float
    offset: int  # relative to data_offset
    nbytes: int

    @property
    def encoding_name(self) -> str:
        return ENCODING_NAMES[self.encoding]


@dataclass
class FileHeader:
    path: Path
    version: int
    alignment: int
    data_offset: int
    file_size: int
    metadata: dict[str, MetadataValue] = field(default_factory=dict)
    metadata_types: dict[str, int] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)  # in file order

    def tensor(self, name: str) -> TensorInfo:
        for info in self.tensors:
            if info.name == name:
                return info
        raise KeyError(f"{self.path}: no tensor {name!r}")


class _Cursor:
    """Bounds-checked little-endian reads; every failure names the file and the field."""

    def __init__(self, path: Path, buf: memoryview) -> None:
        self.path = path
        self.buf = buf
        self.pos = 0
        self.end = len(buf)  # reads stop here (data_offset once the header is read)

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.end:
            raise self.fail(f"file ends inside {what} (needs {n} bytes at offset {self.pos}, before data_offset {self.end})")
        chunk = self.buf[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, st: struct.Struct, what: str):
        return st.unpack(self.take(st.size, what))[0]


def _read_metadata_value(cur: _Cursor, key: str, type_id: int) -> MetadataValue:
    what = f"metadata {key!r}"
    if type_id == TYPE_U32:
        return cur.unpack(_U32, what)
    if type_id == TYPE_I32:
        return cur.unpack(_I32, what)
    if type_id == TYPE_F32:
        return cur.unpack(_F32, what)
    if type_id == TYPE_U64:
        return cur.unpack(_U64, what)
    if type_id == TYPE_STRING:
        length = cur.unpack(_U64, f"{what} length")
        raw = bytes(cur.take(length, what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise cur.fail(f"{what} is not valid UTF-8 ({e})") from None
    if type_id == TYPE_I32_ARRAY:
        count = cur.unpack(_U64, f"{what} count")
        if count > (cur.end - cur.pos) // 4:
            raise cur.fail(f"{what}: i32 array count {count} runs past the end of the file")
        return list(struct.unpack(f"<{count}i", cur.take(4 * count, what)))
    raise cur.fail(f"{what} has unknown value type {type_id}")


def _read_name(cur: _Cursor, what: str) -> str:
    length = cur.unpack(_U32, f"{what} length")
    if not 0 < length <= MAX_NAME_LEN:
        raise cur.fail(f"{what} length {length}, expected 1..{MAX_NAME_LEN}")
    raw = bytes(cur.take(length, what))
    if not _is_name(raw):
        raise cur.fail(f"{what}: not printable ASCII")
    return raw.decode("ascii")


def _read_tensor_record(cur: _Cursor, index: int) -> TensorInfo:
    name = _read_name(cur, f"tensor record {index} name")
    what = f"tensor {name!r}"
    encoding = cur.unpack(_U32, f"{what} encoding")
    n_dims = cur.unpack(_U32, f"{what} n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"{what}: n_dims is {n_dims}, expected 1..{MAX_DIMS}")
    dims = tuple(struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims, f"{what} dims")))
    scale = cur.unpack(_F32, f"{what} scale")
    offset = cur.unpack(_U64, f"{what} offset")
    nbytes = cur.unpack(_U64, f"{what} nbytes")
    if encoding not in ENCODING_NAMES:
        raise cur.fail(f"{what}: unknown encoding id {encoding} (this reader knows {sorted(ENCODING_NAMES)})")
    if ENCODINGS[encoding].two_d and n_dims != 2:
        raise cur.fail(f"{what}: {ENCODING_NAMES[encoding]} tensors are 2-D, dims are {list(dims)}")
    if any(d == 0 for d in dims):
        raise cur.fail(f"{what}: dims {list(dims)} contain a zero")
    if not math.isfinite(scale):
        raise cur.fail(f"{what}: scale {scale} is not finite")
    expected = encoded_nbytes(encoding, dims)
    if nbytes != expected:
        raise cur.fail(f"{what}: nbytes is {nbytes}, {ENCODING_NAMES[encoding]} {list(dims)} needs {expected}")
    return TensorInfo(name, encoding, dims, scale, offset, nbytes)


def read_header(path: str | os.PathLike) -> FileHeader:
    """Parse and validate the header, metadata and tensor table of a .bnr file.

    Raises ValueError naming the file and the offending field on any malformed input.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < HEADER_SIZE:
                raise ValueError(f"{path}: {size} bytes is too short for a bitnet-run model file header")
            # A mapping reads only the pages the tables touch, however large the weights are.
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                buf = memoryview(mm)
                try:
                    return _parse(path, buf, size)
                finally:
                    buf.release()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the file ({e.strerror or e})") from None


def _parse(path: Path, buf: memoryview, size: int) -> FileHeader:
    cur = _Cursor(path, buf)
    magic, version, alignment, _reserved, n_kv, n_tensors, data_offset = _HEADER.unpack(cur.take(HEADER_SIZE, "header"))
    if magic != MAGIC:
        raise cur.fail(f"magic is {magic!r}, expected {MAGIC!r}: not a bitnet-run model file")
    if version != VERSION:
        raise cur.fail(f"version is {version}, this reader supports version {VERSION}")
    if not MIN_ALIGNMENT <= alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
        raise cur.fail(f"alignment is {alignment}, expected a power of two in {MIN_ALIGNMENT}..{MAX_ALIGNMENT} ({ALIGNMENT})")
    if data_offset < HEADER_SIZE or data_offset % alignment or data_offset > size:
        raise cur.fail(f"data_offset {data_offset} is not an aligned offset after the header inside the {size}-byte file")
    # Each metadata record takes at least 13 bytes and each tensor record at least 41, before data_offset.
    area = data_offset - HEADER_SIZE
    if n_kv > min(MAX_RECORDS, area // 13) or n_tensors > min(MAX_RECORDS, area // 41):
        raise cur.fail(f"n_kv {n_kv} / n_tensors {n_tensors} cannot fit before data_offset {data_offset}")
    cur.end = data_offset  # the records live before the data

    header = FileHeader(path, version, alignment, data_offset, size)
    for index in range(n_kv):
        key = _read_name(cur, f"metadata record {index} key")
        if key in header.metadata:
            raise cur.fail(f"metadata key {key!r} appears twice")
        type_id = cur.unpack(_U32, f"metadata {key!r} type")
        header.metadata[key] = _read_metadata_value(cur, key, type_id)
        header.metadata_types[key] = type_id

    names = set()
    for index in range(n_tensors):
        info = _read_tensor_record(cur, index)
        if info.name in names:
            raise cur.fail(f"tensor {info.name!r} appears twice")
        if info.offset % alignment:
            raise cur.fail(f"tensor {info.name!r}: offset {info.offset} is not a multiple of {alignment}")
        if data_offset + info.offset + info.nbytes > size:
            raise cur.fail(
                f"tensor {info.name!r}: data [{info.offset}, {info.offset + info.nbytes}) after data_offset "
                f"{data_offset} runs past the end of the {size}-byte file"
            )
        names.add(info.name)
        header.tensors.append(info)
    return header


def read_tensor(header: FileHeader, name: str) -> np.ndarray:
    """A tensor's stored bytes as an array: float encodings shaped `dims` (BF16 as uint16 bits),
    I2 as uint8 [rows, ceil(in/4)] (decode with unpack_i2), TL1/TL2/Q8_R/Q6_B/Q4_B as uint8 [nbytes]
    (unpack_tl1/2, unpack_q8r, unpack_qb)."""
    info = header.tensor(name)
    if info.encoding == ENCODING_I2:
        dtype, shape = np.dtype(np.uint8), (info.dims[0], (info.dims[1] + 3) // 4)
    elif ENCODINGS[info.encoding].two_d:
        dtype, shape = np.dtype(np.uint8), (info.nbytes,)
    else:
        dtype, shape = FLOAT_ENCODING_DTYPES[info.encoding], info.dims
    return np.fromfile(header.path, dtype=dtype, count=math.prod(shape), offset=header.data_offset + info.offset).reshape(shape)
