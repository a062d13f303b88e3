"""The float operators in the kernel table (activation quantization, one attention head over a float or
an f16 KV cache): the reference against numpy, every variant usable on this CPU against the reference,
bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet_run._bitnet import ffi, lib

VARIANTS = [ffi.string(lib.bn_kernels_name(i)).decode() for i in range(lib.bn_kernels_count())]
FAST = list(range(1, len(VARIANTS)))
needs_fast = pytest.mark.skipif(not FAST, reason="only the reference kernels are usable on this CPU")


def quantize_rows(variant: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(x, dtype=np.float32)
    q = np.empty(x.shape, dtype=np.int8)
    s = np.empty(x.shape[0], dtype=np.float32)
    status = lib.bn_kernels_quantize_rows(variant, ffi.from_buffer("int8_t[]", q), ffi.from_buffer("float[]", s),
                                          ffi.from_buffer("float[]", x), x.shape[0], x.shape[1])
    assert status == lib.BN_OK
    return q, s


def attention_head(variant: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, D: int, scale: float,
                   kv: str = "f32") -> np.ndarray:
    """One head by a variant's attention kernel for a float (kv "f32") or an f16 cache (kv "f16": k
    and v rounded to f16 first)."""
    q, k, v = (np.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v))
    out = np.empty(D, dtype=np.float32)
    head = {"f32": lib.bn_kernels_attention_head, "f16": lib.bn_kernels_attention_head_f16}[kv]
    status = head(variant, ffi.from_buffer("float[]", out), ffi.from_buffer("float[]", q),
                  ffi.from_buffer("float[]", k), ffi.from_buffer("float[]", v), k.shape[1], k.shape[0], D, scale)
    assert status == lib.BN_OK
    return out


def rows_of(kind: str, n_rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n_rows, cols)).astype(np.float32) * np.float32(rng.uniform(1e-3, 1e3))
    if kind == "outliers":
        x.flat[rng.integers(0, x.size, max(1, x.size // 50))] *= 1e4
    elif kind == "ties":  # values that land exactly on .5 after scaling: round half to even decides
        x = (rng.integers(-254, 255, (n_rows, cols)) / 2).astype(np.float32)
        x[:, 0] = 127.0  # the scale is 1
    elif kind == "zero":
        x[:] = 0.0
    elif kind == "tiny":
        x *= np.float32(1e-9)
    elif kind == "nonfinite":
        x.flat[rng.integers(0, x.size, max(1, x.size // 7))] = rng.choice([np.nan, np.inf, -np.inf])
    return x


def numpy_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.float32(127.0) / np.maximum(np.abs(x).max(axis=1), np.float32(1e-5))
    q = np.clip(np.round(x * s[:, None]), -128, 127).astype(np.int8)
    return q, s.astype(np.float32)


@pytest.mark.parametrize("kind", ["random", "outliers", "ties", "zero", "tiny"])
def test_quantize_reference_matches_numpy(kind):
    rng = np.random.default_rng(3)
    for cols in (1, 7, 33, 2560):
        x = rows_of(kind, 3, cols, rng)
        q, s = quantize_rows(0, x)
        want_q, want_s = numpy_quantize(x)
        np.testing.assert_array_equal(s, want_s)
        np.testing.assert_array_equal(q, want_q)


@needs_fast
@pytest.mark.parametrize("variant", FAST, ids=[VARIANTS[i] for i in FAST])
@settings(max_examples=120, deadline=None)
@given(
    cols=st.one_of(st.integers(1, 100), st.sampled_from([31, 32, 33, 255, 256, 257, 2560, 6912])),
    n_rows=st.integers(1, 4),
    kind=st.sampled_from(["random", "outliers", "ties", "zero", "tiny", "nonfinite"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantize_variant_matches_reference(variant, cols, n_rows, kind, seed):
    x = rows_of(kind, n_rows, cols, np.random.default_rng(seed))
    q_ref, s_ref = quantize_rows(0, x)
    q, s = quantize_rows(variant, x)
    np.testing.assert_array_equal(s.view(np.uint32), s_ref.view(np.uint32))
    np.testing.assert_array_equal(q, q_ref)


def attention_inputs(n_pos: int, D: int, stride: int, rng: np.random.Generator, spread: float,
                     kv_scale: float = 1.0):
    """q scaled by spread, k and v by kv_scale (1e-6: mostly f16 subnormals once rounded to f16)."""
    q = rng.standard_normal(D).astype(np.float32) * np.float32(spread)
    k = rng.standard_normal((n_pos, stride)).astype(np.float32) * np.float32(kv_scale)
    v = rng.standard_normal((n_pos, stride)).astype(np.float32) * np.float32(kv_scale)
    return q, k, v


def test_attention_reference_matches_numpy():
    rng = np.random.default_rng(4)
    for n_pos, D, stride in [(1, 8, 8), (5, 12, 20), (77, 64, 128), (130, 128, 256)]:
        q, k, v = attention_inputs(n_pos, D, stride, rng, 1.0)
        scale = 1.0 / np.sqrt(D)
        logits = (k[:, :D].astype(np.float64) @ q.astype(np.float64)) * scale
        p = np.exp(logits - logits.max())
        want = (p / p.sum()) @ v[:, :D].astype(np.float64)
        np.testing.assert_allclose(attention_head(0, q, k, v, D, scale), want, rtol=1e-4, atol=1e-5)


def test_attention_f16_reference_is_the_float_one_on_rounded_values():
    """The f16 reference widens exactly, then computes as the float one: on k, v rounded to f16 by
    numpy (to nearest even, subnormals included) the two agree bit for bit."""
    rng = np.random.default_rng(5)
    for n_pos, D, stride, kv_scale in [(1, 8, 8, 1.0), (5, 12, 20, 1e-6), (77, 64, 128, 300.0), (130, 37, 40, 1.0)]:
        q, k, v = attention_inputs(n_pos, D, stride, rng, 1.0, kv_scale)
        scale = float(np.float32(1.0 / np.sqrt(D)))
        k16, v16 = (a.astype(np.float16).astype(np.float32) for a in (k, v))
        want = attention_head(0, q, k16, v16, D, scale)
        assert np.all(np.isfinite(want))
        np.testing.assert_array_equal(attention_head(0, q, k, v, D, scale, "f16").view(np.uint32), want.view(np.uint32))


@needs_fast
@pytest.mark.parametrize("variant", FAST, ids=[VARIANTS[i] for i in FAST])
@pytest.mark.parametrize("kv", ["f32", "f16"])
@settings(max_examples=120, deadline=None)
@given(
    n_pos=st.integers(1, 200),
    D=st.one_of(st.sampled_from([8, 16, 32, 64, 128, 256]), st.integers(1, 40)),
    extra=st.sampled_from([0, 0, 8, 37]),
    spread=st.sampled_from([1e-3, 1.0, 30.0]),
    kv_scale=st.sampled_from([1.0, 1e-6, 300.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_attention_variant_matches_reference(variant, kv, n_pos, D, extra, spread, kv_scale, seed):
    """Over a float and over an f16 cache (kv_scale 1e-6: mostly f16 subnormals)."""
    q, k, v = attention_inputs(n_pos, D, D + extra, np.random.default_rng(seed), spread, kv_scale)
    scale = float(np.float32(1.0 / np.sqrt(D)))
    want = attention_head(0, q, k, v, D, scale, kv)
    assert np.all(np.isfinite(want))
    got = attention_head(variant, q, k, v, D, scale, kv)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_bad_arguments_are_errors():
    out = np.empty(8, dtype=np.float32)
    buf = ffi.from_buffer("float[]", out)
    assert lib.bn_kernels_attention_head(len(VARIANTS), buf, buf, buf, buf, 8, 1, 8, 1.0) == lib.BN_ERR_ARG
    assert lib.bn_kernels_attention_head(0, buf, buf, buf, buf, 4, 1, 8, 1.0) == lib.BN_ERR_ARG  # stride < D
    assert lib.bn_kernels_attention_head_f16(len(VARIANTS), buf, buf, buf, buf, 8, 1, 8, 1.0) == lib.BN_ERR_ARG
    assert lib.bn_kernels_attention_head_f16(0, buf, buf, buf, buf, 4, 1, 8, 1.0) == lib.BN_ERR_ARG
    q = np.empty(8, dtype=np.int8)
    assert lib.bn_kernels_quantize_rows(len(VARIANTS), ffi.from_buffer("int8_t[]", q), buf, buf, 1, 8) == lib.BN_ERR_ARG
