"""Every weight-kernel variant usable on this CPU (ref, avx2, ...) against the scalar reference, bit for
bit: the ternary matmuls (I2, TL1, TL2) on awkward shapes and extreme activations, the float
output-head matmul, and whole-model logits with each variant forced through BITNET_RUN_KERNELS."""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitnet_run import fileformat as ff
from bitnet_run._bitnet import ffi, lib

VARIANTS = [ffi.string(lib.bn_kernels_name(i)).decode() for i in range(lib.bn_kernels_count())]
FAST = list(range(1, len(VARIANTS)))  # indices of the non-reference variants
ENC_F32, ENC_F16, ENC_BF16 = 0, 1, 2

needs_fast = pytest.mark.skipif(not FAST, reason="only the reference kernels are usable on this CPU")


# ---- helpers ----

def i2_matmul(variant: int, x: np.ndarray, w: np.ndarray, rows: int, cols: int, n_threads: int = 1) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.int8)
    w = np.ascontiguousarray(w, dtype=np.uint8)
    assert x.shape[1] == cols and w.shape == (rows, (cols + 3) // 4)
    y = np.full((x.shape[0], rows), 0x5A5A5A5A, dtype=np.int32)  # poison: every entry must be written
    status = lib.bn_kernels_i2_matmul(
        variant, n_threads, ffi.from_buffer("int32_t[]", y), ffi.from_buffer("int8_t[]", x), x.shape[0],
        ffi.from_buffer("uint8_t[]", w), rows, cols,
    )
    assert status == lib.BN_OK
    return y


def dense_matmul(variant: int, x: np.ndarray, w: np.ndarray, encoding: int, n_threads: int = 1) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.ascontiguousarray(w)
    rows, cols = w.shape
    y = np.full((x.shape[0], rows), np.nan, dtype=np.float32)
    status = lib.bn_kernels_dense_matmul(
        variant, n_threads, ffi.from_buffer("float[]", y), ffi.from_buffer("float[]", x), x.shape[0],
        ffi.from_buffer(w), encoding, rows, cols,
    )
    assert status == lib.BN_OK
    return y


def pack_i2(codes: np.ndarray) -> np.ndarray:
    """codes [rows][cols] in 0..3 -> I2 rows of ceil(cols/4) bytes, element j in byte j/4 bits 2*(j%4)."""
    rows, cols = codes.shape
    padded = np.zeros((rows, (cols + 3) // 4 * 4), dtype=np.uint8)
    padded[:, :cols] = codes
    q = padded.reshape(rows, -1, 4)
    return (q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)).astype(np.uint8)


def numpy_i2(x: np.ndarray, w: np.ndarray, cols: int) -> np.ndarray:
    """The exact product in numpy (independent of all C kernels); code 3 counts as 0."""
    codes = np.stack([(w >> (2 * i)) & 3 for i in range(4)], axis=-1).reshape(w.shape[0], -1)[:, :cols]
    weights = np.array([-1, 0, 1, 0], dtype=np.int64)[codes]
    return (x.astype(np.int64) @ weights.T).astype(np.int32)


def activations(kind: str, n_tok: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "random":
        return rng.integers(-128, 128, size=(n_tok, cols), dtype=np.int8)
    if kind == "min":
        return np.full((n_tok, cols), -128, dtype=np.int8)
    if kind == "max":
        return np.full((n_tok, cols), 127, dtype=np.int8)
    if kind == "zero":
        return np.zeros((n_tok, cols), dtype=np.int8)
    if kind == "alternating":
        row = np.where(np.arange(cols) % 2 == 0, 127, -128).astype(np.int8)
        return np.tile(row, (n_tok, 1))
    raise ValueError(kind)


def weights(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Packed I2 rows; 'bytes' is any byte (so code 3 too, and garbage in the padding bits)."""
    if kind == "bytes":
        return rng.integers(0, 256, size=(rows, (cols + 3) // 4), dtype=np.uint8)
    if kind == "valid":
        return pack_i2(rng.integers(0, 3, size=(rows, cols)).astype(np.uint8))
    if kind == "plus":  # all +1: with all -128 activations the most negative sums
        return pack_i2(np.full((rows, cols), 2, dtype=np.uint8))
    if kind == "minus":
        return pack_i2(np.zeros((rows, cols), dtype=np.uint8))
    if kind == "code3":
        return pack_i2(np.full((rows, cols), 3, dtype=np.uint8))
    raise ValueError(kind)


ACT_KINDS = ["random", "min", "max", "zero", "alternating"]
W_KINDS = ["bytes", "valid", "plus", "minus", "code3"]


# ---- introspection and selection ----

def test_reference_is_first_and_names_are_unique():
    assert VARIANTS[0] == "ref"
    assert len(set(VARIANTS)) == len(VARIANTS)
    assert lib.bn_kernels_name(len(VARIANTS)) == ffi.NULL
    assert isinstance(ffi.string(lib.bn_kernels_cpu_features()).decode(), str)


def test_variants_follow_the_cpu():
    """Every variant whose CPU features are present is offered (a table with an entry left unset is
    not: kernels.c checks them, so such a variant is missing here). tests/test_arm.py: the same on AArch64."""
    if os.uname().machine != "x86_64":
        pytest.skip("the x86-64 variants")
    features = set(ffi.string(lib.bn_kernels_cpu_features()).decode().split())
    want = ["ref"]
    if {"avx2", "f16c"} <= features:
        want.append("avx2")
        if "avxvnni" in features:
            want.append("avxvnni")
        if {"avx512bw", "avx512vnni"} <= features:
            want.append("avx512vnni")
    assert VARIANTS == want


def test_bad_variant_is_an_error():
    y = np.zeros(1, dtype=np.int32)
    x = np.zeros(4, dtype=np.int8)
    w = np.zeros(1, dtype=np.uint8)
    status = lib.bn_kernels_i2_matmul(
        len(VARIANTS), 1, ffi.from_buffer("int32_t[]", y), ffi.from_buffer("int8_t[]", x), 1,
        ffi.from_buffer("uint8_t[]", w), 1, 4,
    )
    assert status == lib.BN_ERR_ARG


def test_env_var_selects_variant(monkeypatch):
    monkeypatch.delenv("BITNET_RUN_KERNELS", raising=False)
    assert lib.bn_kernels_selected() == len(VARIANTS) - 1  # the fastest by default
    for i, name in enumerate(VARIANTS):
        monkeypatch.setenv("BITNET_RUN_KERNELS", name)
        assert lib.bn_kernels_selected() == i
    for bogus in ("nonsense", "avx512-from-the-future"):
        monkeypatch.setenv("BITNET_RUN_KERNELS", bogus)
        assert lib.bn_kernels_selected() == 0  # unknown or unusable: the reference


# ---- I2: the reference against numpy, every variant against the reference ----

@pytest.mark.parametrize("w_kind", W_KINDS)
@pytest.mark.parametrize("act_kind", ACT_KINDS)
def test_reference_matches_numpy(act_kind, w_kind):
    rng = np.random.default_rng(1)
    for rows, cols, n_tok in [(5, 1, 1), (7, 130, 3), (3, 257, 2), (2, 2560, 1)]:
        x, w = activations(act_kind, n_tok, cols, rng), weights(w_kind, rows, cols, rng)
        assert np.array_equal(i2_matmul(0, x, w, rows, cols), numpy_i2(x, w, cols))


@needs_fast
@pytest.mark.parametrize("variant", FAST, ids=[VARIANTS[i] for i in FAST])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 70),
    cols=st.one_of(st.integers(1, 300), st.sampled_from([127, 128, 129, 383, 384, 385, 1023, 1024, 1025, 8191,
                                                         8193, 2560, 6912])),
    n_tok=st.integers(1, 9),
    act_kind=st.sampled_from(ACT_KINDS),
    w_kind=st.sampled_from(W_KINDS),
    n_threads=st.sampled_from([1, 1, 2, 3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_i2_variant_matches_reference(variant, rows, cols, n_tok, act_kind, w_kind, n_threads, seed):
    rng = np.random.default_rng(seed)
    x, w = activations(act_kind, n_tok, cols, rng), weights(w_kind, rows, cols, rng)
    expected = i2_matmul(0, x, w, rows, cols)
    got = i2_matmul(variant, x, w, rows, cols, n_threads)
    np.testing.assert_array_equal(got, expected)


@needs_fast
@pytest.mark.parametrize("variant", FAST, ids=[VARIANTS[i] for i in FAST])
@pytest.mark.parametrize("rows,cols", [(2560, 2560), (640, 2560), (96, 6912)])
@pytest.mark.parametrize("n_tok", [1, 4, 67])
def test_i2_variant_layer_shapes(variant, rows, cols, n_tok):
    """The 2B-4T layer shapes (down_proj cut to 96 rows), with a token count over one scratch chunk (64)."""
    rng = np.random.default_rng(rows + cols + n_tok)
    x, w = activations("random", n_tok, cols, rng), weights("bytes", rows, cols, rng)
    np.testing.assert_array_equal(i2_matmul(variant, x, w, rows, cols, 2), numpy_i2(x, w, cols))


@needs_fast
@pytest.mark.parametrize("variant", FAST, ids=[VARIANTS[i] for i in FAST])
def test_i2_extremes_saturate_nothing(variant):
    """The largest |dot| possible: all -128 against all +1 (or -1) over a long row."""
    rows, cols = 9, 8192 + 13
    for act_kind in ("min", "max"):
        for w_kind in ("plus", "minus"):
            x = activations(act_kind, 5, cols, np.random.default_rng(0))
            w = weights(w_kind, rows, cols, np.random.default_rng(0))
            got = i2_matmul(variant, x, w, rows, cols)
            assert np.array_equal(got, numpy_i2(x, w, cols))
            assert abs(int(got[0, 0])) >= 127 * cols


# ---- TL1 / TL2: the reference against numpy, every variant (and encoding) against the reference ----

ENC_I2, ENC_TL1, ENC_TL2 = ff.ENCODING_I2, ff.ENCODING_TL1, ff.ENCODING_TL2
TL_ENCODINGS = [ENC_TL1, ENC_TL2]
TL_IDS = ["tl1", "tl2"]
PACKERS = {ENC_I2: ff.pack_i2, ENC_TL1: ff.pack_tl1, ENC_TL2: ff.pack_tl2}


def ternary_matmul(variant: int, encoding: int, x: np.ndarray, w: np.ndarray, rows: int, cols: int,
                   n_threads: int = 1) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.int8)
    w = np.ascontiguousarray(w, dtype=np.uint8).reshape(-1)
    assert x.shape[1] == cols and w.size == ff.encoded_nbytes(encoding, (rows, cols))
    y = np.full((x.shape[0], rows), 0x5A5A5A5A, dtype=np.int32)  # poison: every entry must be written
    status = lib.bn_kernels_ternary_matmul(
        variant, encoding, n_threads, ffi.from_buffer("int32_t[]", y), ffi.from_buffer("int8_t[]", x), x.shape[0],
        ffi.from_buffer("uint8_t[]", w), rows, cols,
    )
    assert status == lib.BN_OK
    return y


_TL1_W = np.array([[i // 3 - 1, i % 3 - 1] if i <= 8 else [0, 0] for i in range(16)], dtype=np.int64)
_TL2_W = np.zeros((16, 3), dtype=np.int64)
_TL2_W[:14] = ff._TL2_PATTERNS


def decode_tl(encoding: int, w: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Any TL1/TL2 bytes -> the int64 weights [rows][cols] they stand for, invalid indices as 0; written
    from docs/format.md independently of both the C kernels and fileformat's unpackers."""
    tiles = -(-rows // 32)
    tile = w.reshape(tiles, -1)
    if encoding == ENC_TL1:
        quads = (cols + 3) // 4
        b = tile.reshape(tiles, quads, 32).transpose(0, 2, 1).reshape(tiles * 32, quads)  # [row][quad]
        idx = np.stack([b & 15, b >> 4], axis=-1).reshape(tiles * 32, -1)  # [row][pair]
        return _TL1_W[idx].reshape(tiles * 32, -1)[:rows, :cols]
    n3 = cols // 3
    groups = (n3 + 1) // 2
    g = tile[:, : 40 * groups].reshape(tiles, groups, 40)
    b = g[..., :32].transpose(0, 2, 1).reshape(tiles * 32, groups)
    idx = np.stack([b & 15, b >> 4], axis=-1).reshape(tiles * 32, -1)[:, :n3]
    words = g[..., 32:].reshape(tiles, groups * 2, 4).astype(np.uint32)
    words = words[..., 0] | (words[..., 1] << 8) | (words[..., 2] << 16) | (words[..., 3] << 24)  # [tile][triple]
    lanes = np.arange(32, dtype=np.uint32)
    neg = ((words[:, None, :] >> lanes[None, :, None]) & 1).reshape(tiles * 32, -1)[:, :n3]  # [row][triple]
    out = np.zeros((tiles * 32, cols), dtype=np.int64)
    out[:, : 3 * n3] = (_TL2_W[idx] * np.where(neg == 1, -1, 1)[..., None]).reshape(tiles * 32, -1)
    if cols % 3:
        t = tile[:, 40 * groups:].reshape(-1) & 15
        out[:, 3 * n3: cols] = _TL1_W[t][:, : cols % 3]
    return out[:rows]


def numpy_ternary(encoding: int, x: np.ndarray, w: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The exact product (float64 is exact here: |sum| < 2^53)."""
    return (x.astype(np.float64) @ decode_tl(encoding, w, rows, cols).T.astype(np.float64)).astype(np.int32)


def tl_weights(kind: str, encoding: int, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Packed TL rows; 'bytes' is any byte (so invalid indices too, and garbage in every padding)."""
    if kind == "bytes":
        return rng.integers(0, 256, size=ff.encoded_nbytes(encoding, (rows, cols)), dtype=np.uint8)
    pack = PACKERS[encoding]
    if kind == "valid":
        return pack(rng.integers(-1, 2, size=(rows, cols)).astype(np.int8))
    if kind == "plus":
        return pack(np.ones((rows, cols), dtype=np.int8))
    if kind == "minus":
        return pack(-np.ones((rows, cols), dtype=np.int8))
    if kind == "sparse":  # mostly zeros: the TL2 sign of v = 0 patterns
        return pack((rng.integers(-1, 2, size=(rows, cols)) * (rng.random((rows, cols)) < 0.1)).astype(np.int8))
    raise ValueError(kind)


TL_W_KINDS = ["bytes", "valid", "plus", "minus", "sparse"]


def test_bad_encoding_is_an_error():
    y = np.zeros(1, dtype=np.int32)
    x = np.zeros(4, dtype=np.int8)
    w = np.zeros(64, dtype=np.uint8)
    for encoding in (ENC_F32, ENC_BF16, 6, 99):
        status = lib.bn_kernels_ternary_matmul(
            0, encoding, 1, ffi.from_buffer("int32_t[]", y), ffi.from_buffer("int8_t[]", x), 1,
            ffi.from_buffer("uint8_t[]", w), 1, 4,
        )
        assert status == lib.BN_ERR_ARG


@pytest.mark.parametrize("encoding", TL_ENCODINGS, ids=TL_IDS)
@pytest.mark.parametrize("w_kind", TL_W_KINDS)
@pytest.mark.parametrize("act_kind", ACT_KINDS)
def test_tl_reference_matches_numpy(encoding, act_kind, w_kind):
    rng = np.random.default_rng(2)
    for rows, cols, n_tok in [(5, 1, 1), (7, 2, 2), (33, 3, 1), (40, 130, 3), (3, 257, 2), (65, 385, 2), (2, 2560, 1)]:
        x, w = activations(act_kind, n_tok, cols, rng), tl_weights(w_kind, encoding, rows, cols, rng)
        assert np.array_equal(ternary_matmul(0, encoding, x, w, rows, cols), numpy_ternary(encoding, x, w, rows, cols))


def test_every_encoding_gives_the_same_product():
    """One ternary matrix packed as I2, TL1 and TL2: every variant, every encoding, the same result."""
    rng = np.random.default_rng(3)
    rows, cols = 77, 1001
    tern = rng.integers(-1, 2, size=(rows, cols)).astype(np.int8)
    x = activations("random", 5, cols, rng)
    exact = (x.astype(np.int64) @ tern.T.astype(np.int64)).astype(np.int32)
    for encoding, pack in PACKERS.items():
        for variant in range(len(VARIANTS)):
            got = ternary_matmul(variant, encoding, x, pack(tern), rows, cols, n_threads=2)
            np.testing.assert_array_equal(got, exact, err_msg=f"{VARIANTS[variant]} encoding {encoding}")


@needs_fast
@pytest.mark.parametrize("encoding", TL_ENCODINGS, ids=TL_IDS)
@pytest.mark.parametrize("variant", FAST, ids=[VARIANTS[i] for i in FAST])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.one_of(st.integers(1, 100), st.sampled_from([31, 32, 33, 63, 64, 65, 96])),
    cols=st.one_of(st.integers(1, 300), st.sampled_from([127, 128, 129, 383, 384, 385, 386, 1023, 1025, 8191,
                                                         8193, 2560, 6912])),
    n_tok=st.integers(1, 9),
    act_kind=st.sampled_from(ACT_KINDS),
    w_kind=st.sampled_from(TL_W_KINDS),
    n_threads=st.sampled_from([1, 1, 2, 3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_tl_variant_matches_reference(encoding, variant, rows, cols, n_tok, act_kind, w_kind, n_threads, seed):
    rng = np.random.default_rng(seed)
    x, w = activations(act_kind, n_tok, cols, rng), tl_weights(w_kind, encoding, rows, cols, rng)
    expected = ternary_matmul(0, encoding, x, w, rows, cols)
    got = ternary_matmul(variant, encoding, x, w, rows, cols, n_threads)
    np.testing.assert_array_equal(got, expected)


@needs_fast
@pytest.mark.parametrize("encoding", TL_ENCODINGS, ids=TL_IDS)
@pytest.mark.parametrize("variant", FAST, ids=[VARIANTS[i] for i in FAST])
@pytest.mark.parametrize("rows,cols", [(2560, 2560), (640, 2560), (96, 6912)])
@pytest.mark.parametrize("n_tok", [1, 4, 67])
def test_tl_variant_layer_shapes(encoding, variant, rows, cols, n_tok):
    """The 2B-4T layer shapes (down_proj cut to 96 rows), with several token chunks for 6912 columns."""
    rng = np.random.default_rng(rows + cols + n_tok)
    x, w = activations("random", n_tok, cols, rng), tl_weights("bytes", encoding, rows, cols, rng)
    got = ternary_matmul(variant, encoding, x, w, rows, cols, 2)
    np.testing.assert_array_equal(got, numpy_ternary(encoding, x, w, rows, cols))


@pytest.mark.parametrize("encoding", TL_ENCODINGS, ids=TL_IDS)
def test_tl_extremes_saturate_nothing(encoding):
    """The largest |dot| possible: all -128 / 127 against all +1 / -1 over a long row, every variant."""
    rows, cols = 45, 8192 + 13
    for act_kind in ("min", "max"):
        for w_kind in ("plus", "minus"):
            x = activations(act_kind, 5, cols, np.random.default_rng(0))
            w = tl_weights(w_kind, encoding, rows, cols, np.random.default_rng(0))
            expected = numpy_ternary(encoding, x, w, rows, cols)
            assert abs(int(expected[0, 0])) >= 127 * cols
            for variant in range(len(VARIANTS)):
                np.testing.assert_array_equal(ternary_matmul(variant, encoding, x, w, rows, cols), expected)


# ---- packing round trips ----

@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 70), cols=st.integers(1, 70), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(rows, cols, seed):
    tern = np.random.default_rng(seed).integers(-1, 2, size=(rows, cols)).astype(np.int8)
    assert np.array_equal(ff.unpack_i2(ff.pack_i2(tern), cols), tern)
    for encoding, pack, unpack in [(ENC_TL1, ff.pack_tl1, ff.unpack_tl1), (ENC_TL2, ff.pack_tl2, ff.unpack_tl2)]:
        packed = pack(tern)
        assert packed.dtype == np.uint8 and packed.size == ff.encoded_nbytes(encoding, (rows, cols))
        assert np.array_equal(unpack(packed, rows, cols), tern)
        assert np.array_equal(decode_tl(encoding, packed, rows, cols), tern)


def test_tl_sizes():
    """Bits per weight: TL1 2.0, TL2 1.67 (+ a 32-byte tail per tile when cols % 3 != 0)."""
    assert ff.encoded_nbytes(ENC_TL1, (2560, 2560)) == 2560 * 2560 // 4
    assert ff.encoded_nbytes(ENC_TL2, (2560, 2560)) == 80 * (40 * 427 + 32)
    assert ff.encoded_nbytes(ENC_TL2, (6912, 2560)) * 8 / (6912 * 2560) < 1.68
    assert ff.encoded_nbytes(ENC_TL1, (1, 1)) == 32 and ff.encoded_nbytes(ENC_TL2, (1, 1)) == 32
    assert ff.encoded_nbytes(ENC_TL2, (33, 6)) == 2 * 40


def test_unpack_refuses_invalid_indices():
    w = ff.pack_tl1(np.zeros((3, 5), dtype=np.int8))
    w[0] = 0x49  # index 9 in the high nibble
    with pytest.raises(ValueError, match="invalid"):
        ff.unpack_tl1(w, 3, 5)
    w = ff.pack_tl2(np.zeros((3, 6), dtype=np.int8))
    w[1] = 0xE0  # |v| 14
    with pytest.raises(ValueError, match="invalid"):
        ff.unpack_tl2(w, 3, 6)
    with pytest.raises(ValueError, match="ternary"):
        ff.pack_tl2(np.full((2, 3), 2, dtype=np.int8))


# ---- dense (output head) ----

def dense_weights(encoding: int, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[rng.random((rows, cols)) < 0.05] *= 1e-6  # some tiny values (subnormal in f16)
    if encoding == ENC_F32:
        return w
    if encoding == ENC_F16:
        return w.astype(np.float16).view(np.uint16)
    return (w.view(np.uint32) >> 16).astype(np.uint16)  # bf16 by truncation


def dense_as_f32(w: np.ndarray, encoding: int) -> np.ndarray:
    if encoding == ENC_F32:
        return w.astype(np.float64)
    if encoding == ENC_F16:
        return w.view(np.float16).astype(np.float64)
    return (w.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("encoding", [ENC_F32, ENC_F16, ENC_BF16], ids=["f32", "f16", "bf16"])
def test_dense_reference_close_to_numpy(encoding):
    rng = np.random.default_rng(encoding)
    w = dense_weights(encoding, 37, 333, rng)
    x = rng.standard_normal((3, 333)).astype(np.float32)
    exact = x.astype(np.float64) @ dense_as_f32(w, encoding).T
    scale = np.abs(x).astype(np.float64) @ np.abs(dense_as_f32(w, encoding)).T
    assert np.all(np.abs(dense_matmul(0, x, w, encoding) - exact) <= 1e-5 * scale)


def fma_f32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """C's fmaf elementwise on float32 arrays: a * b + c rounded once to float32 (to nearest, ties
    to even). a * b is exact in float64 (24 + 24 significant bits < 53); a + c in float64 rounds,
    but TwoSum gives its exact error, and rounding that float64 sum to float32 can only differ from
    rounding the exact value when the sum lands exactly halfway between two float32s: then the
    error's sign picks the side."""
    p = a.astype(np.float64) * b.astype(np.float64)
    c64 = c.astype(np.float64)
    s = p + c64
    v = s - p
    err = (p - (s - v)) + (c64 - v)
    r = s.astype(np.float32)
    r64 = r.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        other = np.nextafter(r, np.where(s > r64, np.float32(np.inf), np.float32(-np.inf)))
        halfway = (s != r64) & (np.abs(s - r64) == np.abs(other.astype(np.float64) - s))
    toward_err = np.where(err > 0, np.maximum(r, other), np.minimum(r, other))
    return np.where(halfway & (err != 0), toward_err, r)


def dense_in_documented_order(x: np.ndarray, w: np.ndarray, encoding: int) -> np.ndarray:
    """The reference's order (runtime/src/kernels.h, BN_DENSE_LANES) in numpy: lane l accumulates
    fmaf(x[j], w[j], s[l]) for j = l (mod 16) in increasing j, then the lanes are folded in halves
    (s[l] += s[l + 8], + 4, + 2, + 1) in float32, whose elementwise add rounds like C's."""
    wf = dense_as_f32(w, encoding).astype(np.float32)  # exact: every encoding widens into float32
    lanes = np.zeros((x.shape[0], w.shape[0], 16), dtype=np.float32)
    for j0 in range(0, x.shape[1], 16):
        n = min(16, x.shape[1] - j0)
        lanes[:, :, :n] = fma_f32(x[:, None, j0:j0 + n], wf[None, :, j0:j0 + n], lanes[:, :, :n])
    for h in (8, 4, 2, 1):
        lanes[:, :, :h] += lanes[:, :, h:2 * h]
    return lanes[:, :, 0]


def test_fma_model_rounds_once():
    """The numpy fmaf model on cases whose exact answers are worked out by hand (u = 2^-23, the
    float32 ulp at 1): 2^-24 + 1 is exactly halfway between 1 and 1 + u, so ties to even give 1;
    (1 + u) * 2^-24 * (1 - u) + (1 + u) = 1 + 1.5u - 2^-70 lies just below the midpoint 1 + 1.5u,
    so 1 + u, where the float64 sum (exactly that midpoint) rounded to even would give 1 + 2u; and
    (1 + 2^-12)^2 - 1 = 2^-11 + 2^-24 exactly, where a separate multiply would round the square to
    1 + 2^-11 first."""
    u = 2.0 ** -23
    a = np.array([2.0 ** -24, 1 + u, 1 + 2.0 ** -12], dtype=np.float32)
    b = np.array([1, 2.0 ** -24 * (1 - u), 1 + 2.0 ** -12], dtype=np.float32)
    c = np.array([1, 1 + u, -1], dtype=np.float32)
    expected = np.array([1, 1 + u, 2.0 ** -11 + 2.0 ** -24], dtype=np.float32)
    np.testing.assert_array_equal(fma_f32(a, b, c), expected)
    assert np.float32(a[1].astype(np.float64) * b[1] + c[1]) == np.float32(1 + 2 * u)  # the naive rounding
    assert a[2] * b[2] + c[2] == np.float32(2.0 ** -11)  # separate multiply and add


@pytest.mark.parametrize("encoding", [ENC_F32, ENC_F16, ENC_BF16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("cols", [1, 15, 16, 17, 333, 2560])
def test_dense_reference_sums_in_the_documented_order(encoding, cols):
    """Bit for bit against a numpy model of the order every variant must follow."""
    rng = np.random.default_rng(cols)
    w = dense_weights(encoding, 11, cols, rng)
    x = (rng.standard_normal((3, cols)) * np.exp(rng.uniform(-8, 8, (3, cols)))).astype(np.float32)
    expected = dense_in_documented_order(x, w, encoding)
    np.testing.assert_array_equal(dense_matmul(0, x, w, encoding).view(np.uint32), expected.view(np.uint32))


@needs_fast
@pytest.mark.parametrize("variant", FAST, ids=[VARIANTS[i] for i in FAST])
@settings(max_examples=120, deadline=None)
@given(
    rows=st.integers(1, 70),
    cols=st.one_of(st.integers(1, 300), st.sampled_from([2560, 1031])),
    n_tok=st.integers(1, 9),
    encoding=st.sampled_from([ENC_F32, ENC_F16, ENC_BF16]),
    n_threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_dense_variant_matches_reference(variant, rows, cols, n_tok, encoding, n_threads, seed):
    """Bit for bit: the fast kernels sum in the reference's order."""
    rng = np.random.default_rng(seed)
    w = dense_weights(encoding, rows, cols, rng)
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    expected = dense_matmul(0, x, w, encoding)
    got = dense_matmul(variant, x, w, encoding, n_threads)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


# ---- the whole model ----

def _raw_eval(model, tokens) -> np.ndarray:
    n = len(tokens)
    logits = np.zeros((n, model.n_vocab), dtype=np.float32)
    toks = np.asarray(tokens, dtype=np.int32)
    ctx = model.context._ctx
    status = lib.bn_eval(ctx, ffi.from_buffer("int32_t[]", toks), n, 0, ffi.from_buffer("float[]", logits), 1)
    assert status == lib.BN_OK, ffi.string(lib.bn_context_error(ctx)).decode()
    # then one decoding step (n_tok == 1 kernels) after the prompt
    step = np.zeros(model.n_vocab, dtype=np.float32)
    nxt = np.asarray([tokens[0]], dtype=np.int32)
    status = lib.bn_eval(ctx, ffi.from_buffer("int32_t[]", nxt), 1, n, ffi.from_buffer("float[]", step), 0)
    assert status == lib.BN_OK
    return np.concatenate([logits, step[None]], axis=0)


def logits_identical_across_variants(monkeypatch, path, tokens) -> np.ndarray:
    """The model's _raw_eval logits under every kernel variant, asserted finite and bit-identical to
    the reference's; returns the reference's."""
    from bitnet_run import Model

    results = {}
    for name in VARIANTS:
        monkeypatch.setenv("BITNET_RUN_KERNELS", name)
        model = Model(path, n_threads=2)
        results[name] = _raw_eval(model, tokens)
        del model
    ref = results["ref"]
    assert np.all(np.isfinite(ref))
    for name, got in results.items():
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32), err_msg=name)
    return ref


@pytest.mark.parametrize("weights", ["i2", "tl1", "tl2"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_model_logits_identical_across_variants(tiny_model_factory, monkeypatch, tied, weights):
    from bitnet_run import Model

    built = tiny_model_factory(fmt="packed", hidden=128, heads=4, kv_heads=2, tied=tied, seed=11, weights=weights)
    tokens = [int(t) for t in np.random.default_rng(5).integers(0, 200, size=13)]
    ref = logits_identical_across_variants(monkeypatch, built.path, tokens)
    if weights != "i2":  # the same checkpoint as I2 weights: the same integer products, so the same logits
        i2 = tiny_model_factory(fmt="packed", hidden=128, heads=4, kv_heads=2, tied=tied, seed=11)
        monkeypatch.setenv("BITNET_RUN_KERNELS", "ref")
        model = Model(i2.path, n_threads=2)
        np.testing.assert_array_equal(_raw_eval(model, tokens).view(np.uint32), ref.view(np.uint32))
        del model


# ---- Q8_R (8-bit output head) ----

def q8_matmul(variant: int, x: np.ndarray, xs: np.ndarray, w: np.ndarray, rows: int, cols: int,
              n_threads: int = 1) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.int8)
    xs = np.ascontiguousarray(xs, dtype=np.float32)
    w = np.ascontiguousarray(w, dtype=np.uint8)
    y = np.full((x.shape[0], rows), np.nan, dtype=np.float32)
    status = lib.bn_kernels_q8_matmul(
        variant, n_threads, ffi.from_buffer("float[]", y), ffi.from_buffer("int8_t[]", x),
        ffi.from_buffer("float[]", xs), x.shape[0], ffi.from_buffer("uint8_t[]", w), rows, cols,
    )
    assert status == lib.BN_OK
    return y


def numpy_q8(x: np.ndarray, xs: np.ndarray, w: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The kernel contract in numpy: exact integer dot, then (float32(dot) / xs) * scale in float32."""
    q, scale = ff.unpack_q8r(w, rows, cols)
    dot = (x.astype(np.int64) @ q.T.astype(np.int64)).astype(np.float32)
    return (dot / xs.astype(np.float32)[:, None]) * scale[None, :]


def q8_case(kind: str, n_tok: int, rows: int, cols: int, rng: np.random.Generator):
    """(x, xs, packed w): random, or the extremes (x = +-127, q = -128 / +127: the largest |products|)."""
    if kind == "random":
        x = rng.integers(-127, 128, size=(n_tok, cols), dtype=np.int8)
        q = rng.integers(-128, 128, size=(rows, cols), dtype=np.int8)
    elif kind == "extreme":
        x = np.where(rng.random((n_tok, cols)) < 0.5, -127, 127).astype(np.int8)
        q = np.where(rng.random((rows, cols)) < 0.5, -128, 127).astype(np.int8)
    else:  # "max": every product +128*127 or -128*127 in one row direction (largest |dot|)
        x = np.full((n_tok, cols), -127, dtype=np.int8)
        q = np.full((rows, cols), -128, dtype=np.int8)
        q[1::2] = 127
    xs = rng.uniform(0.5, 2000.0, size=n_tok).astype(np.float32)
    scale = rng.uniform(1e-4, 1.0, size=rows).astype(np.float32)
    return x, xs, ff.pack_q8r(q, scale)


@pytest.mark.parametrize("kind", ["random", "extreme", "max"])
def test_q8_reference_matches_numpy(kind):
    rng = np.random.default_rng(21)
    for rows, cols, n_tok in [(1, 1, 1), (5, 31, 2), (33, 33, 3), (7, 2560, 1), (3, 4099, 2)]:
        x, xs, w = q8_case(kind, n_tok, rows, cols, rng)
        got = q8_matmul(0, x, xs, w, rows, cols)
        np.testing.assert_array_equal(got.view(np.uint32), numpy_q8(x, xs, w, rows, cols).view(np.uint32))


@needs_fast
@pytest.mark.parametrize("variant", FAST, ids=[VARIANTS[i] for i in FAST])
@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 70),
    cols=st.one_of(st.integers(1, 300), st.sampled_from([2560, 1031, 4099])),
    n_tok=st.integers(1, 9),
    kind=st.sampled_from(["random", "extreme", "max"]),
    n_threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_q8_variant_matches_reference(variant, rows, cols, n_tok, kind, n_threads, seed):
    """Bit for bit: exact integer dots (no maddubs saturation at the extremes), the same float step."""
    rng = np.random.default_rng(seed)
    x, xs, w = q8_case(kind, n_tok, rows, cols, rng)
    expected = q8_matmul(0, x, xs, w, rows, cols)
    got = q8_matmul(variant, x, xs, w, rows, cols, n_threads)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_q8_refuses_activation_minus_128():
    x = np.zeros((1, 40), dtype=np.int8)
    x[0, 33] = -128
    y = np.zeros(2, dtype=np.float32)
    xs = np.ones(1, dtype=np.float32)
    w = ff.pack_q8r(np.ones((2, 40), dtype=np.int8), np.ones(2, dtype=np.float32))
    for variant in range(len(VARIANTS)):
        status = lib.bn_kernels_q8_matmul(
            variant, 1, ffi.from_buffer("float[]", y), ffi.from_buffer("int8_t[]", x), ffi.from_buffer("float[]", xs),
            1, ffi.from_buffer("uint8_t[]", w), 2, 40,
        )
        assert status == lib.BN_ERR_ARG
    assert lib.bn_kernels_q8_matmul(len(VARIANTS), 1, ffi.from_buffer("float[]", y), ffi.NULL, ffi.NULL, 0,
                                    ffi.from_buffer("uint8_t[]", w), 2, 40) == lib.BN_ERR_ARG
    # the dense entry point does not take Q8_R
    assert lib.bn_kernels_dense_matmul(0, 1, ffi.from_buffer("float[]", y), ffi.from_buffer("float[]", xs), 1,
                                       ffi.from_buffer("uint8_t[]", w), ff.ENCODING_Q8R, 2, 1) == lib.BN_ERR_ARG


def test_q8_kernel_timing_runs():
    seconds = np.zeros(2, dtype=np.float64)
    for variant in range(len(VARIANTS)):
        status = lib.bn_kernels_time(variant, ff.ENCODING_Q8R, 1, 2, 37, 100, 2, 0, ffi.from_buffer("double[]", seconds))
        assert status == lib.BN_OK and np.all(seconds > 0)


def test_q8r_quantize_pack_round_trip():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((9, 37)).astype(np.float32)
    w[3] = 0.0                                     # an all-zero row: scale 0, q 0
    w[4] = np.float32(0.5) * np.arange(37, dtype=np.float32) / 36 * 127 / 127  # ties at x.5 steps
    w[5, :] = 0.0
    w[5, 0], w[5, 1], w[5, 2] = 127.0, 0.5, 1.5    # scale 1: 0.5 -> 0, 1.5 -> 2 (half to even)
    q, scale = ff.quantize_q8r(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and q.shape == w.shape
    assert scale[3] == 0 and not q[3].any()
    assert scale[5] == 1 and list(q[5, :3]) == [127, 0, 2]
    assert np.all(np.abs(q) <= 127) and np.all(np.max(np.abs(q), axis=1)[scale > 0] == 127)
    # within half a step of the float weight
    deq = ff.dequantize_q8r(q, scale)
    assert np.all(np.abs(deq - w) <= scale[:, None] * 0.5 + 1e-7)
    packed = ff.pack_q8r(q, scale)
    assert packed.dtype == np.uint8 and packed.size == ff.encoded_nbytes(ff.ENCODING_Q8R, (9, 37)) == 9 * 4 + 9 * 37
    assert np.array_equal(packed[:36].view("<f4"), scale)            # scales first
    assert np.array_equal(packed[36:].view(np.int8).reshape(9, 37), q)  # then the rows
    q2, scale2 = ff.unpack_q8r(packed, 9, 37)
    assert np.array_equal(q2, q) and np.array_equal(scale2, scale)
    with pytest.raises(ValueError, match="2-D"):
        ff.encoded_nbytes(ff.ENCODING_Q8R, (4,))
    with pytest.raises(ValueError, match="bytes"):
        ff.unpack_q8r(packed[:-1], 9, 37)
    with pytest.raises(ValueError, match="non-finite"):
        ff.quantize_q8r(np.array([[1.0, np.inf]], dtype=np.float32))


def test_q8r_tensor_survives_the_file(tmp_path):
    rng = np.random.default_rng(6)
    q, scale = ff.quantize_q8r(rng.standard_normal((5, 11)).astype(np.float32))
    writer = ff.Writer()
    writer.add_string("general.architecture", "bitnet")
    writer.add_tensor("head", ff.ENCODING_Q8R, (5, 11), lambda: ff.TensorData(ff.pack_q8r(q, scale)))
    path = tmp_path / "q8.bnr"
    writer.write(path)
    header = ff.read_header(path)
    info = header.tensor("head")
    assert info.encoding == ff.ENCODING_Q8R and info.encoding_name == "Q8_R" and info.nbytes == 5 * 4 + 5 * 11
    q2, scale2 = ff.unpack_q8r(ff.read_tensor(header, "head"), 5, 11)
    assert np.array_equal(q2, q) and np.array_equal(scale2, scale)


def test_q8_head_file_is_smaller_and_converter_rejects_unknown_head(tiny_model, tmp_path):
    from bitnet_run.convert import convert_checkpoint

    with pytest.raises(ValueError, match="head"):
        convert_checkpoint(tiny_model.checkpoint, tmp_path / "x.bnr", head="q3")
    f32 = ff.read_header(convert_checkpoint(tiny_model.checkpoint, tmp_path / "f32.bnr", head="f32"))
    q8 = ff.read_header(convert_checkpoint(tiny_model.checkpoint, tmp_path / "q8.bnr", head="q8"))
    a, b = f32.tensor("model.embed_tokens.weight"), q8.tensor("model.embed_tokens.weight")
    assert a.encoding == ff.ENCODING_F32 and b.encoding == ff.ENCODING_Q8R
    rows, cols = b.dims
    assert b.nbytes == rows * (cols + 4)
    # the stored rows are the per-row absmax quantization of the checkpoint's weights
    q, scale = ff.unpack_q8r(ff.read_tensor(q8, "model.embed_tokens.weight"), rows, cols)
    q_exp, scale_exp = ff.quantize_q8r(ff.read_tensor(f32, "model.embed_tokens.weight"))
    assert np.array_equal(q, q_exp) and np.array_equal(scale, scale_exp)
