"""A GGUF (v2/v3) reader that checks every offset and size before any tensor data is touched.

Written here rather than taken from the `gguf` package because its GGUFReader refuses tensor types it
does not know, such as bitnet.cpp's I2_S (36), and because a model file from the internet must give one
clear line when it is truncated or corrupted, not an exception from deep inside numpy.

Layout (little-endian; the spec is ggml's docs/gguf.md): magic "GGUF", u32 version, u64 tensor count,
u64 key/value count; the key/values (string key, u32 value type, value); the tensor infos (string name,
u32 n_dims, u64 ne[n_dims] innermost first, u32 ggml type, u64 offset into the data); then, aligned to
general.alignment (default 32), the tensor data. A string is a u64 length and UTF-8 bytes; an array
is a u32 item type, a u64 count and the items.
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitnet_run.fileformat import _Cursor

from .errors import ConversionError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# Value types: struct format of the scalars; strings (8) and arrays (9) are read apart.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
TYPE_STRING, TYPE_ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True)
class GGMLType:
    """A ggml tensor type bitnet-run reads: name, id, and the bytes of a block of `block` values."""

    name: str
    id: int
    block: int
    block_bytes: int


# The ggml types bitnet-run reads. I2_S is bitnet.cpp's (its fork's id 36): the whole tensor's 2-bit
# codes, then one f32 scale in a 32-byte tail, so its size is not a multiple of a block size.
GGML_TYPES = {t.id: t for t in (
    GGMLType("F32", 0, 1, 4),
    GGMLType("F16", 1, 1, 2),
    GGMLType("BF16", 30, 1, 2),
    GGMLType("TQ1_0", 34, 256, 54),
    GGMLType("TQ2_0", 35, 256, 66),
    GGMLType("I2_S", 36, 128, 32),
)}
I2_S_TAIL = 32
# ggml type names of ids bitnet-run does not read, for the error message.
_OTHER_TYPE_NAMES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K",
                     12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
                     19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
                     26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 39: "MXFP4"}


def ggml_type_name(type_id: int) -> str:
    known = GGML_TYPES.get(type_id)
    return known.name if known else _OTHER_TYPE_NAMES.get(type_id, f"type {type_id}")


def tensor_nbytes(ggml_type: GGMLType, n: int) -> int:
    if ggml_type.name == "I2_S":
        return n // 4 + I2_S_TAIL
    return n // ggml_type.block * ggml_type.block_bytes


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's entry: name, shape as ggml writes it (innermost first), type and absolute bytes."""

    name: str
    ne: tuple[int, ...]
    type: GGMLType
    start: int
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The row-major shape (outermost first), as numpy and safetensors write it."""
        return tuple(reversed(self.ne))

    @property
    def count(self) -> int:
        return math.prod(self.ne)


class GGUFFile:
    """The key/values and tensor table of a GGUF file, validated; tensor bytes are read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, 2)
                if size == 0:
                    raise ConversionError(f"{self.path}: empty file (expected a GGUF model)")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ConversionError(f"{self.path}: cannot read ({e.strerror or e})") from None
        try:
            self.metadata, self.tensors = self._parse(memoryview(self._map), size)
        except ValueError as e:  # the cursor's bounds errors
            raise ConversionError(str(e)) from None

    def _parse(self, buf: memoryview, size: int) -> tuple[dict, dict[str, GGUFTensor]]:
        cur = _Cursor(self.path, buf)
        magic = bytes(cur.take(4, "the magic"))
        if magic != MAGIC:
            raise ConversionError(f"{self.path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        version = cur.unpack(_U32, "the version")
        if version not in VERSIONS:
            hint = " (big-endian files are not supported)" if version >= 1 << 16 else ""
            raise ConversionError(f"{self.path}: GGUF version {version}{hint}; expected 2 or 3")
        n_tensors = cur.unpack(_U64, "the tensor count")
        n_kv = cur.unpack(_U64, "the key/value count")
        # every key/value takes at least 12 bytes and every tensor info 24: a larger count is a lie
        if n_kv > size // 12 or n_tensors > size // 24:
            raise ConversionError(f"{self.path}: header counts {n_kv} key/values and {n_tensors} tensors, "
                                  f"more than a {size}-byte file can hold")
        metadata = {}
        for _ in range(n_kv):
            key = self._string(cur, "a metadata key")
            metadata[key] = self._value(cur, key, cur.unpack(_U32, f"the type of {key!r}"))
        infos = []
        for i in range(n_tensors):
            name = self._string(cur, f"the name of tensor {i}")
            n_dims = cur.unpack(_U32, f"tensor {name!r} n_dims")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ConversionError(f"{self.path}: tensor {name!r} has {n_dims} dimensions (expected 1..{MAX_DIMS})")
            ne = tuple(cur.unpack(_U64, f"tensor {name!r} dimensions") for _ in range(n_dims))
            type_id = cur.unpack(_U32, f"tensor {name!r} type")
            offset = cur.unpack(_U64, f"tensor {name!r} offset")
            infos.append((name, ne, type_id, offset))
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ConversionError(f"{self.path}: general.alignment is {alignment!r} (expected a power of two)")
        data_start = -(-cur.pos // alignment) * alignment
        tensors: dict[str, GGUFTensor] = {}
        for name, ne, type_id, offset in infos:
            if name in tensors:
                raise ConversionError(f"{self.path}: tensor {name!r} is listed twice")
            tensors[name] = self._tensor(name, ne, type_id, offset, alignment, data_start, size)
        return metadata, tensors

    def _tensor(self, name, ne, type_id, offset, alignment, data_start, size) -> GGUFTensor:
        where = f"{self.path}: tensor {name!r}"
        if any(d <= 0 for d in ne):
            raise ConversionError(f"{where} has dimensions {list(ne)} (expected positive sizes)")
        ggml_type = GGML_TYPES.get(type_id)
        if ggml_type is None:
            readable = ", ".join(t.name for t in GGML_TYPES.values())
            raise ConversionError(f"{where} has ggml type {ggml_type_name(type_id)} ({type_id}), which bitnet-run "
                                  f"does not read (expected one of {readable})")
        count = math.prod(ne)
        if count % ggml_type.block:
            raise ConversionError(f"{where}: {ggml_type.name} {list(ne)} is not a whole number of "
                                  f"{ggml_type.block}-value blocks")
        nbytes = tensor_nbytes(ggml_type, count)
        if offset % alignment:
            raise ConversionError(f"{where}: data offset {offset} is not a multiple of the alignment {alignment}")
        if data_start + offset + nbytes > size:
            raise ConversionError(f"{where}: its {nbytes} bytes at offset {data_start + offset} run past the end "
                                  f"of the {size}-byte file (truncated?)")
        return GGUFTensor(name, ne, ggml_type, data_start + offset, nbytes)

    def _string(self, cur: _Cursor, what: str) -> str:
        length = cur.unpack(_U64, f"the length of {what}")
        raw = bytes(cur.take(length, what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConversionError(f"{self.path}: {what} is not valid UTF-8") from None

    def _value(self, cur: _Cursor, key: str, type_id: int):
        if type_id in _SCALARS:
            return struct.unpack(_SCALARS[type_id], cur.take(struct.calcsize(_SCALARS[type_id]), repr(key)))[0]
        if type_id == TYPE_STRING:
            return self._string(cur, f"the value of {key!r}")
        if type_id != TYPE_ARRAY:
            raise ConversionError(f"{self.path}: metadata {key!r} has unknown value type {type_id}")
        item_type = cur.unpack(_U32, f"the item type of {key!r}")
        count = cur.unpack(_U64, f"the item count of {key!r}")
        if item_type in _SCALARS:
            fmt = _SCALARS[item_type]
            item_size = struct.calcsize(fmt)
            if count > (len(cur.buf) - cur.pos) // item_size:
                raise ConversionError(f"{self.path}: metadata {key!r}: {count} items run past the end of the file")
            return np.frombuffer(cur.take(count * item_size, repr(key)), dtype=np.dtype(fmt)).tolist()
        if item_type == TYPE_STRING:
            if count > (len(cur.buf) - cur.pos) // 8:
                raise ConversionError(f"{self.path}: metadata {key!r}: {count} strings run past the end of the file")
            return [self._string(cur, f"item {i} of {key!r}") for i in range(count)]
        raise ConversionError(f"{self.path}: metadata {key!r} is an array of value type {item_type} "
                              "(expected numbers or strings)")

    def data(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's raw bytes (a read-only view of the mapped file)."""
        return np.frombuffer(self._map, dtype=np.uint8, count=tensor.nbytes, offset=tensor.start)

    def get(self, key: str, kind: type | tuple, default=None, required: bool = False):
        """A metadata value checked to be of `kind`; one line naming the key otherwise."""
        if key not in self.metadata:
            if required:
                raise ConversionError(f"{self.path}: metadata {key} is missing")
            return default
        value = self.metadata[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            raise ConversionError(f"{self.path}: metadata {key} is {value!r:.80} (expected {' or '.join(k.__name__ for k in kinds)})")
        return value
