"""Every weight-kernel variant usable on this CPU (ref, avx2, ...) against the scalar reference, bit for
bit: the ternary I2 matmul on awkward shapes and extreme activations, the float output-head matmul, and
whole-model logits with each variant forced through BITNET_RUN_KERNELS."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    """Bit for bit: the fast kernels sum each row in the reference's order."""
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
    status = lib.bn_eval(model._ctx, ffi.from_buffer("int32_t[]", toks), n, 0, ffi.from_buffer("float[]", logits), 1)
    assert status == lib.BN_OK, ffi.string(lib.bn_context_error(model._ctx)).decode()
    # then one decoding step (n_tok == 1 kernels) after the prompt
    step = np.zeros(model.n_vocab, dtype=np.float32)
    nxt = np.asarray([tokens[0]], dtype=np.int32)
    status = lib.bn_eval(model._ctx, ffi.from_buffer("int32_t[]", nxt), 1, n, ffi.from_buffer("float[]", step), 0)
    assert status == lib.BN_OK
    return np.concatenate([logits, step[None]], axis=0)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_model_logits_identical_across_variants(tiny_model_factory, monkeypatch, tied):
    from bitnet_run import Model

    built = tiny_model_factory(fmt="packed", hidden=128, heads=4, kv_heads=2, tied=tied, seed=11)
    tokens = [int(t) for t in np.random.default_rng(5).integers(0, 200, size=13)]
    results = {}
    for name in VARIANTS:
        monkeypatch.setenv("BITNET_RUN_KERNELS", name)
        model = Model(built.path, n_threads=2)
        results[name] = _raw_eval(model, tokens)
        del model
    ref = results["ref"]
    assert np.all(np.isfinite(ref))
    for name, got in results.items():
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32), err_msg=name)
