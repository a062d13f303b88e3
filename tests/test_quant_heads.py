"""The 6- and 4-bit output heads (Q6_B, Q4_B; docs/format.md): the quantizer and packer against their
spec, every kernel variant against the scalar reference bit for bit (any bytes, odd shapes, the largest
dots, rows whose sum needs 64 bits), and whole models converted with --head q6 / q4."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet_run import fileformat as ff
from bitnet_run._bitnet import ffi, lib
from test_kernels import FAST, VARIANTS, _raw_eval, logits_identical_across_variants, needs_fast

QB = [ff.ENCODING_Q6B, ff.ENCODING_Q4B]
QB_IDS = ["q6", "q4"]
QMAX = {ff.ENCODING_Q6B: 31, ff.ENCODING_Q4B: 7}     # the largest |q| the quantizer writes
OFFSET = {ff.ENCODING_Q6B: 32, ff.ENCODING_Q4B: 8}   # code = q + offset; a reader takes q = -offset too
KINDS = ["bytes", "quantized", "max", "min", "alternating"]


# ---- helpers ----

def quant_matmul(variant: int, encoding: int, x: np.ndarray, xs: np.ndarray, w: np.ndarray, rows: int, cols: int,
                 n_threads: int = 1) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.int8)
    xs = np.ascontiguousarray(xs, dtype=np.float32)
    w = np.ascontiguousarray(w, dtype=np.uint8)
    assert w.size == ff.encoded_nbytes(encoding, (rows, cols))
    y = np.full((x.shape[0], rows), np.nan, dtype=np.float32)  # poison: every entry must be written
    status = lib.bn_kernels_quant_matmul(
        variant, encoding, n_threads, ffi.from_buffer("float[]", y), ffi.from_buffer("int8_t[]", x),
        ffi.from_buffer("float[]", xs), x.shape[0], ffi.from_buffer("uint8_t[]", w), rows, cols,
    )
    assert status == lib.BN_OK
    return y


def numpy_qb(encoding: int, x: np.ndarray, xs: np.ndarray, w: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The kernel contract in numpy, from the Python unpacker (independent of the C code): per block the
    exact integer dot, times the block scale, summed exactly; then (float32(dot) / xs) * scale."""
    q, block_scale, scale = ff.unpack_qb(w, rows, cols, encoding)
    padded = np.zeros((x.shape[0], q.shape[1]), dtype=np.int64)
    padded[:, :cols] = x
    per_block = np.einsum("tbk,rbk->trb", padded.reshape(x.shape[0], -1, ff.QB_BLOCK),
                          q.astype(np.int64).reshape(rows, -1, ff.QB_BLOCK))
    dot = (per_block * block_scale.astype(np.int64)[None]).sum(axis=2)
    return (dot.astype(np.float32) / xs.astype(np.float32)[:, None]) * scale[None, :]


def qb_case(kind: str, encoding: int, n_tok: int, rows: int, cols: int, rng: np.random.Generator):
    """(x, xs, packed w). bytes: every row byte random (any code and block scale is valid, codes past
    cols included); quantized: the converter's quantization of normal weights; max / min: every q at
    +qmax / -offset, every block scale 255, x = 127 / -127 (the largest dots: 64 bits for long rows);
    alternating: q and x of alternating signs at the extremes."""
    xs = rng.uniform(0.5, 2000.0, size=n_tok).astype(np.float32)
    scale = rng.uniform(1e-4, 1.0, size=rows).astype(np.float32)
    nb = -(-cols // ff.QB_BLOCK)
    if kind == "bytes":
        x = rng.integers(-127, 128, size=(n_tok, cols), dtype=np.int8)
        body = rng.integers(0, 256, size=ff.encoded_nbytes(encoding, (rows, cols)) - 4 * rows, dtype=np.uint8)
        return x, xs, np.concatenate([scale.view(np.uint8), body])
    if kind == "quantized":
        x = rng.integers(-127, 128, size=(n_tok, cols), dtype=np.int8)
        return x, xs, ff.pack_qb(*ff.quantize_qb(rng.standard_normal((rows, cols)).astype(np.float32), encoding),
                                 encoding)
    s = np.full((rows, nb), 255, dtype=np.uint8)
    if kind == "max":
        x = np.full((n_tok, cols), 127, dtype=np.int8)
        q = np.full((rows, nb * ff.QB_BLOCK), QMAX[encoding], dtype=np.int8)
    elif kind == "min":
        x = np.full((n_tok, cols), -127, dtype=np.int8)
        q = np.full((rows, nb * ff.QB_BLOCK), -OFFSET[encoding], dtype=np.int8)
    else:
        x = np.tile(np.where(np.arange(cols) % 2 == 0, 127, -127).astype(np.int8), (n_tok, 1))
        q = np.tile(np.where(np.arange(nb * ff.QB_BLOCK) % 2 == 0, QMAX[encoding], -OFFSET[encoding]).astype(np.int8),
                    (rows, 1))
    return x, xs, ff.pack_qb(q, s, scale, encoding)


# ---- the scalar reference against numpy ----

@pytest.mark.parametrize("encoding", QB, ids=QB_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_qb_reference_matches_numpy(encoding, kind):
    rng = np.random.default_rng(31)
    for rows, cols, n_tok in [(1, 1, 1), (5, 31, 2), (33, 33, 3), (7, 2560, 1), (3, 4099, 2), (4, 512, 5),
                              (3, 544, 2), (2, 16384 + 97, 2)]:
        x, xs, w = qb_case(kind, encoding, n_tok, rows, cols, rng)
        got = quant_matmul(0, encoding, x, xs, w, rows, cols)
        np.testing.assert_array_equal(got.view(np.uint32), numpy_qb(encoding, x, xs, w, rows, cols).view(np.uint32))


# ---- every variant against the reference ----

@needs_fast
@pytest.mark.parametrize("encoding", QB, ids=QB_IDS)
@pytest.mark.parametrize("variant", FAST, ids=[VARIANTS[i] for i in FAST])
@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 70),
    cols=st.one_of(st.integers(1, 300), st.sampled_from([511, 512, 513, 1031, 2560, 4095, 4097])),
    n_tok=st.integers(1, 9),
    kind=st.sampled_from(KINDS),
    n_threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_qb_variant_matches_reference(encoding, variant, rows, cols, n_tok, kind, n_threads, seed):
    """Bit for bit: rows not a multiple of any tile, columns not a multiple of a block or a group,
    token counts past the kernels' token tiles, every code and scale byte."""
    rng = np.random.default_rng(seed)
    x, xs, w = qb_case(kind, encoding, n_tok, rows, cols, rng)
    expected = quant_matmul(0, encoding, x, xs, w, rows, cols)
    got = quant_matmul(variant, encoding, x, xs, w, rows, cols, n_threads)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


@needs_fast
@pytest.mark.parametrize("encoding", QB, ids=QB_IDS)
@pytest.mark.parametrize("variant", FAST, ids=[VARIANTS[i] for i in FAST])
def test_qb_long_rows_and_head_shapes(encoding, variant):
    """Rows of 16k+ columns at the extremes (the row's sum passes 2^31: int32 chunks widened to 64
    bits), then the 2B-4T head's row length with 1, 4 and 67 tokens."""
    rng = np.random.default_rng(5)
    for kind in ("max", "min", "alternating"):
        x, xs, w = qb_case(kind, encoding, 5, 9, 16384 + 97, rng)
        expected = quant_matmul(0, encoding, x, xs, w, 9, 16384 + 97)
        np.testing.assert_array_equal(quant_matmul(variant, encoding, x, xs, w, 9, 16384 + 97, 2).view(np.uint32),
                                      expected.view(np.uint32))
    assert np.all(np.abs(expected * xs[:, None] / np.frombuffer(w[: 4 * 9].tobytes(), "<f4")) > 2**31)
    for n_tok in (1, 4, 67):
        x, xs, w = qb_case("bytes", encoding, n_tok, 70, 2560, rng)
        np.testing.assert_array_equal(quant_matmul(variant, encoding, x, xs, w, 70, 2560, 2).view(np.uint32),
                                      quant_matmul(0, encoding, x, xs, w, 70, 2560).view(np.uint32))


def test_quant_entry_point_refuses_bad_arguments():
    x = np.zeros((1, 40), dtype=np.int8)
    x[0, 33] = -128
    y = np.zeros(2, dtype=np.float32)
    xs = np.ones(1, dtype=np.float32)
    for encoding in QB:
        w = ff.pack_qb(*ff.quantize_qb(np.ones((2, 40), dtype=np.float32), encoding), encoding)
        for variant in range(len(VARIANTS)):  # -128 is outside the activations' contract
            assert lib.bn_kernels_quant_matmul(variant, encoding, 1, ffi.from_buffer("float[]", y),
                                               ffi.from_buffer("int8_t[]", x), ffi.from_buffer("float[]", xs), 1,
                                               ffi.from_buffer("uint8_t[]", w), 2, 40) == lib.BN_ERR_ARG
        # the dense entry point does not take the integer heads
        assert lib.bn_kernels_dense_matmul(0, 1, ffi.from_buffer("float[]", y), ffi.from_buffer("float[]", xs), 1,
                                           ffi.from_buffer("uint8_t[]", w), encoding, 2, 1) == lib.BN_ERR_ARG
    x[0, 33] = 0
    big = np.zeros(4096, dtype=np.uint8)  # room for any encoding's [2, 40] tensor
    for encoding in (ff.ENCODING_BF16, ff.ENCODING_I2, lib.BN_ENC_COUNT):  # not an integer head
        assert lib.bn_kernels_quant_matmul(0, encoding, 1, ffi.from_buffer("float[]", y), ffi.from_buffer("int8_t[]", x),
                                           ffi.from_buffer("float[]", xs), 1, ffi.from_buffer("uint8_t[]", big), 2,
                                           40) == lib.BN_ERR_ARG


@pytest.mark.parametrize("encoding", QB, ids=QB_IDS)
def test_qb_kernel_timing_runs(encoding):
    seconds = np.zeros(2, dtype=np.float64)
    for variant in range(len(VARIANTS)):
        status = lib.bn_kernels_time(variant, encoding, 1, 5, 37, 1031, 2, 0, ffi.from_buffer("double[]", seconds))
        assert status == lib.BN_OK and np.all(seconds > 0)


# ---- the quantizer and the layout ----

@pytest.mark.parametrize("encoding", QB, ids=QB_IDS)
def test_quantize_follows_the_spec(encoding):
    qmax = QMAX[encoding]
    rng = np.random.default_rng(4)
    w = rng.standard_normal((6, 70)).astype(np.float32)  # 3 blocks, the last one of 6 columns
    w[1] = 0.0                                            # an all-zero row: scale 0, s 0, q 0
    w[2, 32:64] = 0.0                                     # an all-zero block: s 0
    w[3, :32] *= 1000.0                                   # a block far above the others: s 255, the rest small
    w[4] = 0.0
    w[4, 0], w[4, 1], w[4, 2] = qmax * 255.0, 0.5 * 255.0, 1.5 * 255.0  # scale 1, s 255: step 255, ties
    q, s, scale = ff.quantize_qb(w, encoding)
    assert q.shape == (6, 96) and s.shape == (6, 3) and scale.shape == (6,)
    assert q.dtype == np.int8 and s.dtype == np.uint8 and scale.dtype == np.float32
    assert scale[1] == 0 and not s[1].any() and not q[1].any()
    assert s[2, 1] == 0 and not q[2, 32:64].any() and s[2, 0] > 0
    assert s[3, 0] == 255 and np.all(s[3, 1:] >= 1)
    assert scale[4] == 1 and s[4, 0] == 255 and list(q[4, :3]) == [qmax, 0, 2]  # 0.5 -> 0, 1.5 -> 2 (half to even)
    assert not q[:, 70:].any()  # past cols: q = 0
    # the rules of docs/format.md, in float32
    blocks = np.zeros((6, 96), dtype=np.float32)
    blocks[:, :70] = w
    ideal = np.abs(blocks.reshape(6, 3, 32)).max(axis=2) / np.float32(qmax)
    assert np.array_equal(scale, ideal.max(axis=1) / np.float32(255))
    live = scale > 0
    want_s = np.where(ideal[live] > 0, np.clip(np.rint(ideal[live] / scale[live, None]), 1, 255), 0)
    assert np.array_equal(s[live], want_s)
    step = np.repeat(s.astype(np.float32) * scale[:, None], 32, axis=1)[live]
    want_q = np.where(step > 0, np.clip(np.rint(blocks[live] / np.where(step > 0, step, 1)), -qmax, qmax), 0)
    assert np.array_equal(q[live], want_q)
    assert np.all(np.abs(q) <= qmax) and np.all(s.max(axis=1)[scale > 0] == 255)
    # within half a step of the float weight, except where the rounded block scale clips the block's largest
    deq = ff.dequantize_qb(q, s, scale, 70)
    step = np.repeat(s.astype(np.float32) * scale[:, None], ff.QB_BLOCK, axis=1)[:, :70]
    clipped = np.abs(q[:, :70]) == qmax
    assert np.all((np.abs(deq - w) <= step * 0.5 * (1 + 1e-6) + 1e-30) | clipped)
    assert np.all(np.abs(deq - w) <= step + 1e-30)
    with pytest.raises(ValueError, match="non-finite"):
        ff.quantize_qb(np.array([[1.0, np.nan]], dtype=np.float32), encoding)
    with pytest.raises(ValueError, match="2-D"):
        ff.quantize_qb(np.ones(5, dtype=np.float32), encoding)


def _layout_by_hand(encoding, q, s, scale):
    """docs/format.md's description, byte by byte."""
    rows, nb = s.shape
    out = bytearray(scale.astype("<f4").tobytes())
    codes = q.astype(np.int16) + OFFSET[encoding]
    for r in range(rows):
        for g0 in range(0, nb, 16):
            blocks = range(g0, min(nb, g0 + 16))
            out += bytes(int(s[r, b]) for b in blocks)
            for b in blocks:
                c = codes[r, 32 * b: 32 * b + 32]
                out += bytes(int(c[k] & 15) | int(c[16 + k] & 15) << 4 for k in range(16))
            if encoding == ff.ENCODING_Q6B:
                for b in blocks:
                    c = codes[r, 32 * b: 32 * b + 32] >> 4
                    out += bytes(sum(int(c[8 * j + m]) << (2 * j) for j in range(4)) for m in range(8))
    return bytes(out)


@pytest.mark.parametrize("encoding", QB, ids=QB_IDS)
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 33), (2, 512), (2, 545), (1, 1025)])
def test_pack_layout_is_the_documented_one(encoding, rows, cols):
    rng = np.random.default_rng(rows * cols)
    nb = -(-cols // 32)
    q = rng.integers(-OFFSET[encoding], OFFSET[encoding], size=(rows, 32 * nb), dtype=np.int8)
    s = rng.integers(0, 256, size=(rows, nb), dtype=np.uint8)
    scale = rng.uniform(0, 1, size=rows).astype(np.float32)
    packed = ff.pack_qb(q, s, scale, encoding)
    assert packed.dtype == np.uint8 and packed.size == ff.encoded_nbytes(encoding, (rows, cols))
    assert packed.size == 4 * rows + rows * nb * (25 if encoding == ff.ENCODING_Q6B else 17)
    assert packed.tobytes() == _layout_by_hand(encoding, q, s, scale)
    q2, s2, scale2 = ff.unpack_qb(packed, rows, cols, encoding)
    assert np.array_equal(q2, q) and np.array_equal(s2, s) and np.array_equal(scale2, scale)
    with pytest.raises(ValueError, match="bytes"):
        ff.unpack_qb(packed[:-1], rows, cols, encoding)
    with pytest.raises(ValueError, match="lie in"):
        ff.pack_qb(np.full_like(q, OFFSET[encoding]), s, scale, encoding)
    with pytest.raises(ValueError, match="block scales"):
        ff.pack_qb(q, s[:, :-1] if nb > 1 else s.astype(np.int16), scale, encoding)


@pytest.mark.parametrize("encoding", QB, ids=QB_IDS)
def test_qb_tensor_survives_the_file(tmp_path, encoding):
    rng = np.random.default_rng(6)
    q, s, scale = ff.quantize_qb(rng.standard_normal((5, 45)).astype(np.float32), encoding)
    writer = ff.Writer()
    writer.add_string("general.architecture", "bitnet")
    writer.add_tensor("head", encoding, (5, 45), lambda: ff.TensorData(ff.pack_qb(q, s, scale, encoding)))
    path = tmp_path / "qb.bnr"
    writer.write(path)
    header = ff.read_header(path)
    info = header.tensor("head")
    assert info.encoding == encoding and info.encoding_name == ff.ENCODING_NAMES[encoding]
    assert info.nbytes == ff.encoded_nbytes(encoding, (5, 45))
    q2, s2, scale2 = ff.unpack_qb(ff.read_tensor(header, "head"), 5, 45, encoding)
    assert np.array_equal(q2, q) and np.array_equal(s2, s) and np.array_equal(scale2, scale)
    err = ffi.new("char[256]")
    assert lib.bn_file_validate(str(path).encode(), err, 256) == lib.BN_OK


# ---- whole models ----

# Against the same checkpoint converted with a bf16 head: the per-token max |dlogit| relative to that
# token's bf16 logit range, and the argmax agreement. Measured on packed checkpoints (hidden 128, so 4
# blocks per row; vocab 384, 2 layers, 40 tokens) of seeds 11-14, worst of the four: q6 0.054 / 0.90
# tied (the embedding lookup reads the quantized rows too) and 0.019 / 0.93 untied; q4 0.19 / 0.68 tied
# and 0.082 / 0.78 untied (q8 there: 0.027 / 0.93 and 0.008 / 0.93). The bounds are about twice the
# distance and near-tied top logits of random tiny models make argmax agreement coarse.
HEAD_BOUNDS = {  # (head, tied): (largest relative |dlogit|, smallest argmax agreement)
    ("q8", True): (0.05, 0.8), ("q8", False): (0.02, 0.9),
    ("q6", True): (0.10, 0.8), ("q6", False): (0.04, 0.85),
    ("q4", True): (0.38, 0.55), ("q4", False): (0.16, 0.65),
}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("head", ["q8", "q6", "q4"])
def test_quant_head_model_runs_and_stays_close_to_bf16(tiny_model_factory, tmp_path, monkeypatch, head, tied):
    """A tiny model converted with --head q8 / q6 / q4 loads, runs bit-identically on every kernel variant
    (head and, when tied, the embedding lookup), and its logits stay near the bf16-head ones."""
    from bitnet_run import Model
    from bitnet_run.convert import convert_checkpoint

    built = tiny_model_factory(fmt="packed", hidden=128, heads=4, kv_heads=2, tied=tied, seed=11)
    bf16 = convert_checkpoint(built.checkpoint, tmp_path / "bf16.bnr", head="bf16")
    path = convert_checkpoint(built.checkpoint, tmp_path / f"{head}.bnr", head=head)
    encoding = ff.HEAD_ENCODINGS[head]
    header = ff.read_header(path)
    head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert header.tensor(head_name).encoding == encoding
    if not tied:  # an untied embedding keeps the checkpoint's dtype
        assert header.tensor("model.embed_tokens.weight").encoding not in ff.QUANT_ENCODINGS
    tokens = [int(t) for t in np.random.default_rng(8).integers(0, 200, size=40)]
    ref = logits_identical_across_variants(monkeypatch, path, tokens)
    monkeypatch.setenv("BITNET_RUN_KERNELS", "ref")
    model = Model(bf16, n_threads=2)
    exact = _raw_eval(model, tokens)
    del model
    rel = np.abs(ref - exact).max(axis=1) / (exact.max(axis=1) - exact.min(axis=1))
    agree = np.mean(ref.argmax(axis=1) == exact.argmax(axis=1))
    largest, agreement = HEAD_BOUNDS[head, tied]
    assert rel.max() <= largest, rel.max()
    assert agree >= agreement, agree
    assert rel.max() > 0  # the head really is quantized


def test_qb_head_files_are_smaller(tiny_model, tmp_path):
    from bitnet_run.convert import convert_checkpoint

    f32 = ff.read_header(convert_checkpoint(tiny_model.checkpoint, tmp_path / "f32.bnr", head="f32"))
    w = ff.read_tensor(f32, "model.embed_tokens.weight")
    rows, cols = w.shape
    sizes = {}
    for head in ("q8", "q6", "q4"):
        header = ff.read_header(convert_checkpoint(tiny_model.checkpoint, tmp_path / f"{head}.bnr", head=head))
        t = header.tensor("model.embed_tokens.weight")
        assert t.encoding == ff.HEAD_ENCODINGS[head]
        sizes[head] = t.nbytes
        if head != "q8":  # the stored tensor is the quantization of the checkpoint's weights
            expected = ff.pack_qb(*ff.quantize_qb(w, t.encoding), t.encoding)
            assert np.array_equal(ff.read_tensor(header, t.name), expected)
    nb = -(-cols // 32)
    assert sizes == {"q8": rows * (cols + 4), "q6": rows * (4 + 25 * nb), "q4": rows * (4 + 17 * nb)}
