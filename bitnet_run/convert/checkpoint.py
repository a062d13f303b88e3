"""Reading a local Hugging Face checkpoint directory: JSON/text side files and safetensors tensors.

Tensors are read one at a time straight from their shard. The safetensors header is parsed here
rather than through `safetensors.safe_open(framework="numpy")` because numpy has no bfloat16 and
safe_open refuses to return BF16 tensors; reading the raw bytes handles every dtype the same way.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConversionError

# safetensors dtype -> how its bytes are held in numpy (BF16 as its raw uint16 bits).
SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
}
FLOAT_DTYPES = ("BF16", "F16", "F32")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32, so widening is exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: file, dtype, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    try:
        with open(path, "rb") as f:
            file_size = f.seek(0, 2)
            f.seek(0)
            prefix = f.read(8)
            header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
            if header_len is None or header_len > file_size - 8:
                raise ConversionError(f"{path.name}: not a safetensors file (header length {header_len}, file size {file_size})")
            header = json.loads(f.read(header_len))
    except OSError as e:
        raise ConversionError(f"{path.name}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path.name}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path.name}: safetensors header is {type(header).__name__}, expected an object")
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path.name}: tensor {name!r} has a malformed header entry {info!r}") from None
        if not 0 <= begin <= end <= file_size - data_start:
            raise ConversionError(f"{path.name}: tensor {name!r} data_offsets {[begin, end]} run past the end of the file")
        entries[name] = TensorEntry(path, dtype, shape, data_start + begin, data_start + end)
    return entries


class Checkpoint:
    """A local HF checkpoint: config.json, side files, and the tensors of one or many shards."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConversionError(f"{self.directory}: not a directory")
        config = self.read_json("config.json")
        if config is None:
            raise ConversionError(f"config.json: not found in {self.directory}")
        self.config: dict = config
        self.tensors = self._index_tensors()

    def path(self, name: str) -> Path:
        return self.directory / name

    def read_text(self, name: str) -> str | None:
        """A side file's text, or None when the checkpoint does not have it."""
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConversionError(f"{name}: not valid UTF-8 ({e})") from None

    def read_json(self, name: str) -> dict | None:
        text = self.read_text(name)
        if text is None:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConversionError(f"{name}: not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise ConversionError(f"{name}: holds a {type(value).__name__}, expected a JSON object")
        return value

    def _index_tensors(self) -> dict[str, TensorEntry]:
        index = self.read_json(INDEX_FILE)
        if index is None:
            if not self.path(SINGLE_FILE).is_file():
                raise ConversionError(
                    f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE} found (only safetensors checkpoints are supported)"
                )
            return read_safetensors_header(self.path(SINGLE_FILE))
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{INDEX_FILE}: weight_map is {weight_map!r}, expected an object of tensor -> shard")
        shards: dict[str, dict[str, TensorEntry]] = {}
        tensors = {}
        for name, shard in sorted(weight_map.items()):
            if shard not in shards:
                if not self.path(shard).is_file():
                    raise ConversionError(f"{INDEX_FILE}: shard {shard!r} of tensor {name!r} is missing")
                shards[shard] = read_safetensors_header(self.path(shard))
            if name not in shards[shard]:
                raise ConversionError(f"{shard}: tensor {name!r} listed in {INDEX_FILE} is not in the shard")
            tensors[name] = shards[shard][name]
        return tensors

    def load(self, name: str) -> np.ndarray:
        """A tensor's stored values, shaped; BF16 comes back as uint16 bits."""
        entry = self.tensors[name]
        dtype = SAFETENSORS_DTYPES.get(entry.dtype)
        if dtype is None:
            raise ConversionError(f"{entry.file.name}: tensor {name!r} has unsupported dtype {entry.dtype}")
        count = math.prod(entry.shape)
        if entry.end - entry.start != count * dtype.itemsize:
            raise ConversionError(
                f"{entry.file.name}: tensor {name!r} holds {entry.end - entry.start} bytes, "
                f"{entry.dtype} {list(entry.shape)} needs {count * dtype.itemsize}"
            )
        return np.fromfile(entry.file, dtype=dtype, count=count, offset=entry.start).reshape(entry.shape)

    def load_float32(self, name: str) -> np.ndarray:
        """A BF16/F16/F32 tensor widened exactly to float32."""
        entry = self.tensors[name]
        values = self.load(name)
        if entry.dtype == "BF16":
            return bf16_bits_to_float32(values)
        return values.astype(np.float32, copy=False)
