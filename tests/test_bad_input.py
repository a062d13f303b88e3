"""Bad input gets one clear line, never a crash: corrupted files, wrong kinds, prompts that don't fit."""
from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest

from bitnet_run import ContextOverflowError, Model, ModelFileError

Q_PROJ = b"model.layers.0.self_attn.q_proj.weight"


def _record_fields(data: bytes, name: bytes) -> dict:
    """Byte positions of the fields of tensor record `name` (docs/format.md)."""
    at = data.index(struct.pack("<I", len(name)) + name) + 4 + len(name)
    n_dims = struct.unpack_from("<I", data, at + 4)[0]
    dims = at + 8
    scale = dims + 8 * n_dims
    return {"encoding": at, "n_dims": at + 4, "dims": dims, "scale": scale, "offset": scale + 4, "nbytes": scale + 12}


def _patched(tmp_path, src, position: int, fmt: str, value) -> str:
    data = bytearray(src.read_bytes())
    struct.pack_into(fmt, data, position, value)
    path = tmp_path / "bad.bnr"
    path.write_bytes(bytes(data))
    return str(path)


def _load_error(path) -> str:
    with pytest.raises(ModelFileError) as info:
        Model(path, n_threads=1)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_file(tmp_path):
    _load_error(tmp_path / "absent.bnr")


def test_wrong_magic(tmp_path, tiny_model):
    message = _load_error(_patched(tmp_path, tiny_model.path, 0, "<4s", b"GGUF"))
    assert "magic" in message


def test_unsupported_version(tmp_path, tiny_model):
    message = _load_error(_patched(tmp_path, tiny_model.path, 4, "<I", 99))
    assert "version" in message and "99" in message


@pytest.mark.parametrize("keep", [0, 10, 39, 200, 0.5, 0.999])
def test_truncated_file(tmp_path, tiny_model, keep):
    data = tiny_model.path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    path = tmp_path / "truncated.bnr"
    path.write_bytes(data[:n])
    _load_error(path)


def test_corrupted_tensor_offset(tmp_path, tiny_model):
    fields = _record_fields(tiny_model.path.read_bytes(), Q_PROJ)
    message = _load_error(_patched(tmp_path, tiny_model.path, fields["offset"], "<Q", 1 << 40))
    assert Q_PROJ.decode() in message


def test_misaligned_tensor_offset(tmp_path, tiny_model):
    data = tiny_model.path.read_bytes()
    fields = _record_fields(data, Q_PROJ)
    offset = struct.unpack_from("<Q", data, fields["offset"])[0]
    message = _load_error(_patched(tmp_path, tiny_model.path, fields["offset"], "<Q", offset + 3))
    assert Q_PROJ.decode() in message


def test_corrupted_tensor_shape(tmp_path, tiny_model):
    fields = _record_fields(tiny_model.path.read_bytes(), Q_PROJ)
    message = _load_error(_patched(tmp_path, tiny_model.path, fields["dims"], "<Q", 64))
    assert Q_PROJ.decode() in message and "shape" in message


def test_unknown_encoding(tmp_path, tiny_model):
    fields = _record_fields(tiny_model.path.read_bytes(), Q_PROJ)
    message = _load_error(_patched(tmp_path, tiny_model.path, fields["encoding"], "<I", 200))
    assert Q_PROJ.decode() in message and "encoding" in message


@pytest.mark.parametrize("head", ["q6", "q4"])
def test_quant_head_sizes_are_checked(tmp_path, tiny_model, head):
    """A Q6_B / Q4_B head whose record says one byte more, or whose encoding id says the other layout
    (same shape, other size): one line naming the tensor and the size the encoding needs, from the C
    loader and the Python reader alike."""
    from bitnet_run import fileformat as ff
    from bitnet_run.convert import convert_checkpoint

    src = convert_checkpoint(tiny_model.checkpoint, tmp_path / f"{head}.bnr", head=head)
    name = b"model.embed_tokens.weight"
    fields = _record_fields(src.read_bytes(), name)
    nbytes = ff.read_header(src).tensor(name.decode()).nbytes
    other = ff.ENCODING_Q4B if head == "q6" else ff.ENCODING_Q6B
    for position, fmt, value in ((fields["nbytes"], "<Q", nbytes + 1), (fields["encoding"], "<I", other)):
        path = _patched(tmp_path, src, position, fmt, value)
        message = _load_error(path)
        assert name.decode() in message and "nbytes" in message and "needs" in message, message
        with pytest.raises(ValueError, match="needs") as info:
            ff.read_header(path)
        assert "\n" not in str(info.value) and name.decode() in str(info.value)


def test_quant_head_encoding_is_refused_for_a_linear(tmp_path, tiny_model):
    """An output-head encoding where a ternary weight belongs: the tensor and the encodings allowed."""
    from bitnet_run import fileformat as ff
    from bitnet_run.convert import convert_checkpoint

    src = convert_checkpoint(tiny_model.checkpoint, tmp_path / "q4.bnr", head="q4")
    writer, header = ff.Writer(), ff.read_header(src)
    adders = {ff.TYPE_U32: writer.add_u32, ff.TYPE_I32: writer.add_i32, ff.TYPE_F32: writer.add_f32,
              ff.TYPE_U64: writer.add_u64, ff.TYPE_STRING: writer.add_string, ff.TYPE_I32_ARRAY: writer.add_i32_array}
    for key, value in header.metadata.items():
        adders[header.metadata_types[key]](key, value)
    for t in header.tensors:
        if t.name == Q_PROJ.decode():
            data = ff.ENCODINGS[ff.ENCODING_Q4B].quantize(np.ones(t.dims, dtype=np.float32))
            writer.add_tensor(t.name, ff.ENCODING_Q4B, t.dims, lambda d=data: ff.TensorData(d))
        else:
            writer.add_tensor(t.name, t.encoding, t.dims, lambda t=t: ff.TensorData(ff.read_tensor(header, t.name), t.scale))
    path = tmp_path / "bad.bnr"
    writer.write(path)
    message = _load_error(path)
    assert Q_PROJ.decode() in message and "Q4_B" in message and "I2, TL1 or TL2" in message, message


def test_unsupported_architecture(tmp_path, tiny_model):
    data = tiny_model.path.read_bytes()
    key = b"general.architecture"
    at = data.index(struct.pack("<I", len(key)) + key) + 4 + len(key) + 4 + 8  # type, length
    assert data[at : at + 6] == b"bitnet"
    path = _patched(tmp_path, tiny_model.path, at, "<6s", b"llama3")
    message = _load_error(path)
    assert "architecture" in message and "llama3" in message


def test_random_corruption_never_crashes(tmp_path, tiny_model):
    """Flip bytes all over the header and tables; every load fails cleanly or succeeds, in a child
    process so that a crash would show as a signal instead of killing the test run."""
    data = tiny_model.path.read_bytes()
    header_end = struct.unpack_from("<Q", data, 32)[0]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(40):
        corrupt = bytearray(data)
        for pos in rng.integers(0, header_end, size=int(rng.integers(1, 8))):
            corrupt[pos] = int(rng.integers(0, 256))
        path = tmp_path / f"corrupt{i}.bnr"
        path.write_bytes(bytes(corrupt))
        paths.append(str(path))
    script = (
        "import sys\nfrom bitnet_run import Model, BitNetError\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n        m = Model(p, n_threads=1, n_ctx=16); m.logits([0, 1, 2])\n"
        "    except (BitNetError, ValueError, KeyError, UnicodeDecodeError) as e:\n        assert '\\n' not in str(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_prompt_longer_than_context(tiny_model):
    model = Model(tiny_model.path, n_threads=1, n_ctx=16)
    ids = list(range(1, 21))
    with pytest.raises(ContextOverflowError, match="context"):
        model.logits(ids)
    with pytest.raises(ContextOverflowError, match="context"):
        model.generate("hello " * 40, max_tokens=4)
    # the context is still usable afterwards
    assert model.logits(ids[:16]).shape == (16, model.n_vocab)


def test_token_id_out_of_range(tiny_model):
    with pytest.raises(ValueError, match=str(tiny_model.model.n_vocab + 5)):
        tiny_model.model.logits([1, tiny_model.model.n_vocab + 5])


@pytest.mark.parametrize(
    "bad",
    [dict(temperature=-1), dict(top_k=-3), dict(top_p=0), dict(top_p=1.5), dict(min_p=2), dict(repeat_penalty=0),
     dict(max_tokens=-1)],
)
def test_bad_sampling_parameters(tiny_model, bad):
    with pytest.raises(ValueError) as info:
        tiny_model.model.generate("hello", **{"max_tokens": 4, **bad})
    name = next(iter(bad))
    assert name in str(info.value)
