"""The Python file reader and the C loader agree: the same encodings table, and the same files accepted
and refused (bitnet_run.fileformat.read_header against bn_file_validate, the loader's format pass)."""
from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest

from bitnet_run import fileformat as ff
from bitnet_run._bitnet import ffi, lib


def test_encoding_ids_and_names_match_the_c_table():
    assert lib.BN_ENC_COUNT == len(ff.ENCODINGS) == max(ff.ENCODINGS) + 1
    for e in ff.ENCODINGS.values():
        assert getattr(lib, "BN_ENC_" + e.name.replace("_", "")) == e.id
        assert ffi.string(lib.bn_encoding_label(e.id)).decode() == e.name
    assert ffi.string(lib.bn_encoding_label(len(ff.ENCODINGS))).decode() == "unknown"


DIMS = [(1,), (7,), (1, 1), (1, 5), (31, 3), (32, 4), (33, 6), (64, 7), (100, 3200), (8640, 3200), (3, 2, 5),
        (2, 3, 4, 5), (129, 1023), (256, 8640)]


@pytest.mark.parametrize("encoding", sorted(ff.ENCODINGS))
def test_bytes_for_a_shape_match_the_c_table(encoding):
    for dims in DIMS:
        c = lib.bn_encoding_nbytes(encoding, len(dims), ffi.new("uint64_t[]", list(dims)))
        try:
            expected = ff.encoded_nbytes(encoding, dims)
        except ValueError:
            expected = 0  # a shape the encoding does not allow
        assert c == expected, (ff.ENCODING_NAMES[encoding], dims)


# --------------------------------------------------------------------------- the same files


def _sample(path) -> bytes:
    """A small valid file: every encoding, a string and an array, two names of each length class."""
    w = ff.Writer()
    w.add_string("general.architecture", "bitnet")
    w.add_string("note", "h\u00e9llo")
    w.add_i32_array("ids", [1, 2, 3])
    w.add_f32("eps", 1e-5)
    rng = np.random.default_rng(0)
    ternary = rng.integers(-1, 2, size=(33, 7), dtype=np.int8)
    for e in ff.ENCODINGS.values():
        dims = (33, 7) if e.two_d else (5, 3)
        if e.kind == "ternary":
            data = e.pack(ternary)
        elif e.kind == "quant":
            data = e.quantize(rng.standard_normal(dims).astype(np.float32))
        else:
            data = np.zeros(dims, dtype=e.dtype)
        w.add_tensor(f"t.{e.name}", e.id, dims, lambda d=data: ff.TensorData(d, 0.5))
    w.write(path)
    return path.read_bytes()


def _accepts(path) -> tuple[bool, bool, str]:
    try:
        ff.read_header(path)
        py, py_msg = True, ""
    except ValueError as e:
        py, py_msg = False, str(e)
    err = ffi.new("char[512]")
    c = lib.bn_file_validate(str(path).encode(), err, 512) == lib.BN_OK
    return py, c, f"python: {py_msg or 'ok'} | C: {ffi.string(err).decode() or 'ok'}"


def _field(data: bytes, text: bytes) -> int:
    return data.index(text)


def _edits(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Named (position, new bytes) edits, each the kind of case where the two readers used to differ."""
    name = _field(data, b"t.I2")
    scale = name + 4 + 4 + 4 + 16  # encoding, n_dims, 2 dims
    note = _field(data, "h\u00e9llo".encode())
    edits = {
        "alignment 2": (8, struct.pack("<I", 2)),
        "alignment 4": (8, struct.pack("<I", 4)),
        "alignment 3": (8, struct.pack("<I", 3)),
        "alignment 2^17": (8, struct.pack("<I", 1 << 17)),
        "data_offset 0": (32, struct.pack("<Q", 0)),
        "n_tensors 70000": (24, struct.pack("<Q", 70000)),
        "n_kv 0": (16, struct.pack("<Q", 0)),
        "tensor name with a control byte": (name + 1, b"\x01"),
        "tensor name with a non-ASCII byte": (name + 1, b"\xc3"),
        "tensor name length 0": (name - 4, struct.pack("<I", 0)),
        "tensor name length 300": (name - 4, struct.pack("<I", 300)),
        "key with a control byte": (_field(data, b"eps"), b"\x7f"),
        "NaN scale": (scale, struct.pack("<f", float("nan"))),
        "infinite scale": (scale, struct.pack("<f", float("inf"))),
        "string not UTF-8": (note + 1, b"\xff"),
        "string overlong UTF-8": (note + 1, b"\xc0\x80"),
        "string surrogate": (note, b"\xed\xa0\x80"),
    }
    assert sorted(edits) == sorted(EDIT_CASES)
    return edits


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    path = tmp_path_factory.mktemp("agree") / "sample.bnr"
    return _sample(path)


def test_the_sample_is_accepted_by_both(tmp_path, sample):
    path = tmp_path / "ok.bnr"
    path.write_bytes(sample)
    assert _accepts(path)[:2] == (True, True)


EDIT_CASES = [
    "alignment 2", "alignment 4", "alignment 3", "alignment 2^17", "data_offset 0", "n_tensors 70000", "n_kv 0",
    "tensor name with a control byte", "tensor name with a non-ASCII byte", "tensor name length 0",
    "tensor name length 300", "key with a control byte", "NaN scale", "infinite scale", "string not UTF-8",
    "string overlong UTF-8", "string surrogate",
]


@pytest.mark.parametrize("case", EDIT_CASES)
def test_edited_files_get_the_same_verdict(tmp_path, sample, case):
    position, value = _edits(sample)[case]
    data = bytearray(sample)
    data[position : position + len(value)] = value
    path = tmp_path / "edited.bnr"
    path.write_bytes(bytes(data))
    py, c, messages = _accepts(path)
    assert py == c, f"{case}: {messages}"


def test_random_corruptions_get_the_same_verdict(tmp_path, sample):
    """Single bytes of the header and tables set to random values, and truncations."""
    rng = np.random.default_rng(1)
    data_offset = struct.unpack_from("<Q", sample, 32)[0]
    path = tmp_path / "corrupt.bnr"
    cases = [(int(rng.integers(0, data_offset)), int(rng.integers(0, 256))) for _ in range(400)]
    for position, value in itertools.chain(cases, [(n, None) for n in (0, 39, 40, 100, data_offset, len(sample) - 1)]):
        data = bytearray(sample[:position] if value is None else sample)
        if value is not None:
            data[position] = value
        path.write_bytes(bytes(data))
        py, c, messages = _accepts(path)
        assert py == c, f"byte {position} = {value}: {messages}"
