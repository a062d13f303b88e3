"""The .bnr writer and reader (docs/format.md), and I2 packing."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from bitnet_run import fileformat as ff


def _ternary(rng, rows, cols):
    return rng.integers(-1, 2, size=(rows, cols)).astype(np.int8)


def _write_sample(path, rng):
    """A small file with one metadata record of each type and tensors of each encoding."""
    w = ff.Writer()
    w.add_string("general.architecture", "bitnet")
    w.add_string("general.name", "ünïcode name")
    w.add_u32("bitnet.hidden_size", 96)
    w.add_i32("tokenizer.bos_id", -1)
    w.add_f32("bitnet.rms_norm_eps", 1e-5)
    w.add_u64("big", 2**40 + 3)
    w.add_i32_array("tokenizer.stop_ids", [7, -2, 2**31 - 1])
    w.add_i32_array("empty", [])
    tensors = {
        "f32": (ff.ENCODING_F32, rng.standard_normal((3, 5)).astype(np.float32), 1.0),
        "f16": (ff.ENCODING_F16, rng.standard_normal((7,)).astype(np.float16), 1.0),
        "bf16": (ff.ENCODING_BF16, rng.integers(0, 2**16, (2, 3, 4), dtype=np.uint16), 1.0),
        "i2": (ff.ENCODING_I2, ff.pack_i2(_ternary(rng, 5, 13)), 0.25),
    }
    for name, (encoding, data, scale) in tensors.items():
        dims = data.shape if encoding != ff.ENCODING_I2 else (5, 13)
        w.add_tensor(name, encoding, dims, lambda data=data, scale=scale: ff.TensorData(data, scale))
    w.write(path)
    return tensors


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "m.bnr"
    tensors = _write_sample(path, rng)
    header = ff.read_header(path)

    assert header.version == ff.VERSION and header.alignment == ff.ALIGNMENT
    assert header.data_offset % ff.ALIGNMENT == 0
    assert header.metadata == {
        "general.architecture": "bitnet",
        "general.name": "ünïcode name",
        "bitnet.hidden_size": 96,
        "tokenizer.bos_id": -1,
        "bitnet.rms_norm_eps": float(np.float32(1e-5)),
        "big": 2**40 + 3,
        "tokenizer.stop_ids": [7, -2, 2**31 - 1],
        "empty": [],
    }
    assert header.metadata_types["bitnet.rms_norm_eps"] == ff.TYPE_F32
    assert [t.name for t in header.tensors] == list(tensors)
    for info in header.tensors:
        encoding, data, scale = tensors[info.name]
        assert info.encoding == encoding and info.scale == scale
        assert info.offset % ff.ALIGNMENT == 0
        assert np.array_equal(ff.read_tensor(header, info.name), data)
    # The file ends on an alignment boundary after the last tensor.
    assert header.file_size == header.data_offset + ff.align_up(header.tensors[-1].offset + header.tensors[-1].nbytes)


def test_layout_is_byte_exact(tmp_path):
    """Header fields and the first records at the offsets the spec gives."""
    path = tmp_path / "m.bnr"
    w = ff.Writer()
    w.add_u32("k", 5)
    w.add_tensor("t", ff.ENCODING_F32, (2,), lambda: ff.TensorData(np.array([1.5, -2], dtype=np.float32)))
    w.write(path)
    raw = path.read_bytes()
    assert raw[:4] == b"BNRF"
    # 40 header + 13 metadata + 41 tensor record = 94 bytes of tables -> data at 128
    assert struct.unpack_from("<IIIQQQ", raw, 4) == (1, 64, 0, 1, 1, 128)
    assert raw[40:53] == struct.pack("<I", 1) + b"k" + struct.pack("<II", 0, 5)
    assert raw[53:94] == struct.pack("<I", 1) + b"t" + struct.pack("<IIQfQQ", 0, 1, 2, 1.0, 0, 8)
    assert raw[94:128] == bytes(34)
    assert raw[128:136] == np.array([1.5, -2], dtype=np.float32).tobytes()
    assert len(raw) == 192 and raw[136:] == bytes(56)


def test_writer_checks_producer_size(tmp_path):
    w = ff.Writer()
    w.add_tensor("t", ff.ENCODING_F32, (4,), lambda: ff.TensorData(np.zeros(3, dtype=np.float32)))
    with pytest.raises(ValueError, match="'t'"):
        w.write(tmp_path / "m.bnr")


def test_writer_refuses_duplicates_and_bad_dims():
    w = ff.Writer()
    w.add_u32("k", 1)
    with pytest.raises(ValueError, match="twice"):
        w.add_u32("k", 2)
    with pytest.raises(ValueError):
        w.add_tensor("t", ff.ENCODING_F32, (1, 1, 1, 1, 1), lambda: None)
    with pytest.raises(ValueError):
        w.add_tensor("t", ff.ENCODING_I2, (4,), lambda: None)


@pytest.mark.parametrize("cols", [1, 3, 4, 5, 8, 13, 128, 131])
def test_pack_unpack_i2(cols):
    rng = np.random.default_rng(cols)
    w = _ternary(rng, 6, cols)
    packed = ff.pack_i2(w)
    assert packed.dtype == np.uint8 and packed.shape == (6, (cols + 3) // 4)
    assert np.array_equal(ff.unpack_i2(packed, cols), w)


def test_pack_i2_layout():
    # element j of a row in byte j//4, bits 2*(j%4), stored as w+1; padding is code 1 (w = 0)
    w = np.array([[-1, 0, 1, 1, 0]], dtype=np.int8)
    assert ff.pack_i2(w).tolist() == [[0 | 1 << 2 | 2 << 4 | 2 << 6, 1 | 1 << 2 | 1 << 4 | 1 << 6]]


def test_unpack_i2_refuses_code_3():
    with pytest.raises(ValueError, match="code 3"):
        ff.unpack_i2(np.array([[0b11]], dtype=np.uint8), 4)


# --------------------------------------------------------------------------- malformed files


def _patched(tmp_path, raw: bytes, offset: int, value: bytes):
    data = bytearray(raw)
    data[offset : offset + len(value)] = value
    path = tmp_path / "bad.bnr"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "good.bnr"
    _write_sample(path, np.random.default_rng(1))
    return path.read_bytes()


@pytest.mark.parametrize(
    "offset, value, field",
    [
        (0, b"GGUF", "magic"),
        (4, struct.pack("<I", 2), "version"),
        (8, struct.pack("<I", 48), "alignment"),
        (16, struct.pack("<Q", 2**60), "n_kv"),
        (32, struct.pack("<Q", 63), "data_offset"),
        (40, struct.pack("<I", 100000), "key length"),
    ],
)
def test_malformed_header_fields(tmp_path, sample, offset, value, field):
    with pytest.raises(ValueError, match=field) as excinfo:
        ff.read_header(_patched(tmp_path, sample, offset, value))
    assert "bad.bnr" in str(excinfo.value)


def _tensor_record_offset(raw: bytes, name: bytes) -> int:
    return raw.index(struct.pack("<I", len(name)) + name)


@pytest.mark.parametrize(
    "field, delta, value, message",
    [
        ("encoding", 0, struct.pack("<I", 9), "unknown encoding"),
        ("n_dims", 4, struct.pack("<I", 5), "n_dims"),
        ("dims", 8, struct.pack("<Q", 6), "nbytes"),
        ("offset", 8 + 16 + 4, struct.pack("<Q", 1), "offset"),
        ("offset", 8 + 16 + 4, struct.pack("<Q", 2**40), "past the end"),
    ],
)
def test_malformed_tensor_records(tmp_path, sample, field, delta, value, message):
    start = _tensor_record_offset(sample, b"f32") + 4 + 3
    with pytest.raises(ValueError, match=message) as excinfo:
        ff.read_header(_patched(tmp_path, sample, start + delta, value))
    assert "'f32'" in str(excinfo.value) and "bad.bnr" in str(excinfo.value)


def test_every_truncation_is_a_clean_error(tmp_path, sample):
    header = ff.read_header(tmp_path / "good.bnr")
    path = tmp_path / "cut.bnr"
    last = header.tensors[-1]
    for n in list(range(0, header.data_offset + 1, 7)) + [header.data_offset + last.offset + last.nbytes - 1]:
        path.write_bytes(sample[:n])
        with pytest.raises(ValueError, match="cut.bnr"):
            ff.read_header(path)


def test_missing_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="nothing.bnr"):
        ff.read_header(tmp_path / "nothing.bnr")
