"""GGUF import: files written with llama.cpp's `gguf` package (tests/gguf_checkpoints.py) from the
test checkpoints convert to models whose tensors and logits equal those of the safetensors path.

Bit-identical where the ternary values and scales are identical: the packed checkpoints store their
scales in bf16, which fp16 (the TQ block scales, F16 linears) and f32 (I2_S) hold exactly. A checkpoint
with f32 scales loses precision in TQ1_0/TQ2_0: the scale is rounded to fp16 (checked below).
"""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from typer.testing import CliRunner

from bitnet_run import Model
from bitnet_run import fileformat as ff
from bitnet_run.cli import app
from bitnet_run.convert import ConversionError, convert_checkpoint
from bitnet_run.convert.gguf_import import BITNET_2B4T_CHAT_TEMPLATE, convert_gguf

runner = CliRunner()
PROMPT = "Once upon a time there was a little cat who liked the sun."


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A packed checkpoint with rows of 256 and 512 weights (TQ1_0/TQ2_0 need multiples of 256)."""
    from checkpoints import make_config, write_packed_checkpoint

    root = tmp_path_factory.mktemp("wide")
    config = make_config(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, tied=True)
    return write_packed_checkpoint(root / "hf", config, seed=5)


def _assert_same_model(a_path, b_path):
    a, b = ff.read_header(a_path), ff.read_header(b_path)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta in a.tensors:
        tb = b.tensor(ta.name)
        assert (ta.encoding, ta.dims, ta.scale) == (tb.encoding, tb.dims, tb.scale), ta.name
        assert np.array_equal(ff.read_tensor(a, ta.name), ff.read_tensor(b, ta.name)), ta.name
    ma, mb = Model(a_path, n_threads=1), Model(b_path, n_threads=1)
    ids = ma.tokenize(PROMPT)
    assert mb.tokenize(PROMPT) == ids
    assert np.array_equal(ma.logits(ids), mb.logits(ids))


@pytest.mark.parametrize("linear_type", ["I2_S", "TQ1_0", "TQ2_0", "F16", "BF16", "F32"])
def test_ternary_linears_convert_exactly(wide, tmp_path, linear_type):
    from gguf_checkpoints import write_gguf

    gguf_path = write_gguf(wide, tmp_path / "m.gguf", linear_type=linear_type, embedding_type="BF16")
    _assert_same_model(convert_checkpoint(wide, tmp_path / "ref.bnr"), convert_gguf(gguf_path, tmp_path / "g.bnr"))


@pytest.mark.parametrize("weights", ["tl1", "tl2"])
def test_reencoding_and_f16_embedding(wide, tmp_path, weights):
    """microsoft's file has an F16 embedding: the same as the safetensors path with --head f16."""
    from gguf_checkpoints import write_gguf

    gguf_path = write_gguf(wide, tmp_path / "m.gguf", arch="bitnet-25")
    _assert_same_model(convert_checkpoint(wide, tmp_path / "ref.bnr", weights=weights, head="f16"),
                       convert_gguf(gguf_path, tmp_path / "g.bnr", weights=weights))


def test_microsoft_layout_untied_odd_width(tmp_path):
    """Rows of 128 and 344 weights (I2_S blocks are 128; 344 is no multiple of 256), an untied head."""
    from checkpoints import make_config, write_packed_checkpoint
    from gguf_checkpoints import write_gguf

    config = make_config(hidden=128, intermediate=384 - 40, layers=2, heads=4, kv_heads=1, tied=False)
    hf = write_packed_checkpoint(tmp_path / "hf", config, seed=11)
    gguf_path = write_gguf(hf, tmp_path / "m.gguf", embedding_type="BF16")
    _assert_same_model(convert_checkpoint(hf, tmp_path / "ref.bnr"), convert_gguf(gguf_path, tmp_path / "g.bnr"))


def test_tq_rounds_an_f32_scale_to_fp16(tmp_path):
    import torch
    from checkpoints import make_config, write_packed_checkpoint
    from gguf_checkpoints import write_gguf

    config = make_config(hidden=256, intermediate=512, layers=1, heads=4, kv_heads=2)
    hf = write_packed_checkpoint(tmp_path / "hf", config, seed=2, scale_dtype=torch.float32)
    ref = ff.read_header(convert_checkpoint(hf, tmp_path / "ref.bnr"))
    got = ff.read_header(convert_gguf(write_gguf(hf, tmp_path / "m.gguf", linear_type="TQ2_0"), tmp_path / "g.bnr"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert got.tensor(name).scale == float(np.float16(ref.tensor(name).scale)) != ref.tensor(name).scale
    assert np.array_equal(ff.read_tensor(ref, name), ff.read_tensor(got, name))  # the ternary values are kept


def test_chat_template(wide, tmp_path):
    from gguf_checkpoints import write_gguf

    def template_of(path):
        return Model(path, n_threads=1).metadata_str("tokenizer.chat_template")

    # microsoft's known-wrong template is replaced by the model's own
    microsoft = convert_gguf(write_gguf(wide, tmp_path / "a.gguf"), tmp_path / "a.bnr")
    assert template_of(microsoft) == BITNET_2B4T_CHAT_TEMPLATE
    # any other template is kept; --chat-template overrides
    own = convert_gguf(write_gguf(wide, tmp_path / "b.gguf", chat_template="{{ 'x' }}"),
                       tmp_path / "b.bnr")
    assert template_of(own) == "{{ 'x' }}"
    (tmp_path / "t.jinja").write_text("{{ 'y' }}")
    result = runner.invoke(app, ["convert", str(tmp_path / "b.gguf"), "-o", str(tmp_path / "c.bnr"),
                                 "--chat-template", str(tmp_path / "t.jinja")])
    assert result.exit_code == 0, result.output
    assert template_of(tmp_path / "c.bnr") == "{{ 'y' }}"


# --------------------------------------------------------------------------- tokenizer

CORPUS = [
    "Once upon a time, there was a little cat.",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\tif x != 0: pass\n",
    "Ünïcödé: 日本語のテキスト, emoji 🐈‍⬛🎉, Ελληνικά, русский, العربية",
    "numbers 1 12 123 1234 12345 3.14159 -42 1e-5 0x1F 1,000,000",
    "whitespace   runs \t\t tabs\n\n\nnewlines\r\n crlf      end   ",
    "<|begin_of_text|>User: hi<|eot_id|>Assistant: hello<|end_of_text|>",
    "don't you'll I'm we've they're it's HELLO'S",
    "",
    " leading space",
    "trailing space ",
]


def _vocabulary_gguf(path, tokenizer_json: str, pre: str | None):
    """A GGUF holding only the gpt2-style vocabulary of tokenizer_json (as llama.cpp's converter writes it)."""
    import gguf
    from gguf_checkpoints import add_vocabulary

    w = gguf.GGUFWriter(path, "bitnet-b1.58")
    add_vocabulary(w, tokenizer_json, pre)
    w.add_eos_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


def _unreachable_token_tokenizer() -> str:
    """Llama 3 style (ignore_merges) with a token no merge order reaches: merges 'b c' before 'a b'
    turn "abc" into a + bc, but "abc" is itself a token, so it is taken whole."""
    from tokenizers import Tokenizer, models

    vocab = {"a": 0, "b": 1, "c": 2, "bc": 3, "ab": 4, "abc": 5}
    return Tokenizer(models.BPE(vocab=vocab, merges=[("b", "c"), ("a", "b")], ignore_merges=True)).to_str()


def test_rebuilt_tokenizer_encodes_like_tokenizer_json(tmp_path, wide):
    """The vocabulary of a tokenizer.json in GGUF form, rebuilt, splits, encodes and decodes every text
    alike. The test checkpoints' tokenizer is taken with ignore_merges on, as Llama 3's tokenizer.json
    (the form a missing tokenizer.ggml.pre stands for) has it."""
    from tokenizers import Tokenizer

    from bitnet_run.convert.gguf_file import GGUFFile
    from bitnet_run.convert.gguf_tokenizer import read_tokenizer

    llama3 = json.loads((wide / "tokenizer.json").read_text())
    llama3["model"]["ignore_merges"] = True
    unreachable = json.loads(_unreachable_token_tokenizer())
    unreachable["pre_tokenizer"], unreachable["decoder"] = llama3["pre_tokenizer"], llama3["decoder"]
    cases = [(json.dumps(llama3), pre, CORPUS) for pre in (None, "llama-bpe")] + [(json.dumps(unreachable), None, ["abc"])]
    for i, (text_json, pre, corpus) in enumerate(cases):
        original = Tokenizer.from_str(text_json)
        path = _vocabulary_gguf(tmp_path / f"{i}.gguf", text_json, pre)
        rebuilt = Tokenizer.from_str(read_tokenizer(GGUFFile(path)).tokenizer_json)
        for text in corpus:
            assert (rebuilt.pre_tokenizer.pre_tokenize_str(text) == original.pre_tokenizer.pre_tokenize_str(text)), text
            ids = original.encode(text, add_special_tokens=False).ids
            assert rebuilt.encode(text, add_special_tokens=False).ids == ids, text
            assert rebuilt.decode(ids, skip_special_tokens=False) == original.decode(ids, skip_special_tokens=False)
            assert rebuilt.decode(ids, skip_special_tokens=True) == original.decode(ids, skip_special_tokens=True)
    assert original.encode("abc", add_special_tokens=False).tokens == ["abc"]


def test_sentencepiece_vocabulary(tmp_path):
    """A llama (SentencePiece BPE) vocabulary: merges come from the scores, bytes fall back to <0xNN>."""
    import gguf

    from bitnet_run.convert.gguf_file import GGUFFile
    from bitnet_run.convert.gguf_tokenizer import read_tokenizer

    pieces = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "\u2581he", "llo", "\u2581hello", "\u2581w",
              "or", "\u2581wor", "ld", "\u2581world", "a", "b", "c", "ab", "bc"]  # "ab" scores above "bc"
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    w = gguf.GGUFWriter(tmp_path / "spm.gguf", "bitnet")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(read_tokenizer(GGUFFile(tmp_path / "spm.gguf")).tokenizer_json)
    assert tok.encode("hello world", add_special_tokens=False).tokens == ["\u2581hello", "\u2581world"]
    assert tok.encode("abc", add_special_tokens=False).tokens == ["\u2581", "ab", "c"]  # the higher score merges first
    ids = tok.encode("hello wé", add_special_tokens=False).ids
    assert tok.id_to_token(ids[-1]) == "<0xA9>" and tok.decode(ids) == "hello wé"  # é = C3 A9: byte fallback


# --------------------------------------------------------------------------- bad files


def _convert_fails(path, tmp_path, *expected):
    """convert_gguf and the CLI both refuse `path` with one line holding `expected`, leaving no file."""
    out = tmp_path / "bad.bnr"
    with pytest.raises(ConversionError) as info:
        convert_gguf(path, out)
    message = str(info.value)
    assert "\n" not in message and all(e in message for e in expected), message
    result = runner.invoke(app, ["convert", str(path), "-o", str(out)])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert not out.exists()
    return message


@pytest.fixture(scope="module")
def good_gguf(wide, tmp_path_factory):
    from gguf_checkpoints import write_gguf

    return write_gguf(wide, tmp_path_factory.mktemp("good") / "m.gguf").read_bytes()


def test_truncated_and_corrupted(good_gguf, tmp_path):
    path = tmp_path / "m.gguf"
    for cut in (3, 20, 1000, len(good_gguf) // 2, len(good_gguf) - 1):
        path.write_bytes(good_gguf[:cut])
        _convert_fails(path, tmp_path, str(path))
    path.write_bytes(b"GGML" + good_gguf[4:])
    _convert_fails(path, tmp_path, "not a GGUF file")
    path.write_bytes(good_gguf[:4] + struct.pack("<I", 1) + good_gguf[8:])
    _convert_fails(path, tmp_path, "version 1")
    # a string length far past the end of the file: the first key's length
    path.write_bytes(good_gguf[:24] + struct.pack("<Q", 1 << 40) + good_gguf[32:])
    _convert_fails(path, tmp_path, "file ends inside")
    # a tensor offset past the end: the last 8 bytes of the tensor infos are the last tensor's offset
    data = bytearray(good_gguf)
    end = _tensor_infos_end(good_gguf)
    data[end - 8:end] = struct.pack("<Q", 1 << 40)
    path.write_bytes(bytes(data))
    _convert_fails(path, tmp_path, "run past the end")


def _tensor_infos_end(raw: bytes) -> int:
    from bitnet_run.convert.gguf_file import GGUFFile

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.gguf"
        p.write_bytes(raw)
        gf = GGUFFile(p)
        first_data = min(t.start for t in gf.tensors.values())
    # the infos end before the aligned data start; find the last one by its name
    last = list(gf.tensors)[-1].encode()
    pos = raw.rindex(struct.pack("<Q", len(last)) + last, 0, first_data)
    n_dims = struct.unpack_from("<I", raw, pos + 8 + len(last))[0]
    return pos + 8 + len(last) + 4 + 8 * n_dims + 4 + 8


def test_unknown_tensor_type(good_gguf, tmp_path):
    data = bytearray(good_gguf)
    end = _tensor_infos_end(good_gguf)
    data[end - 12:end - 8] = struct.pack("<I", 12)  # the last tensor's type -> Q4_K
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(data))
    _convert_fails(path, tmp_path, "Q4_K", "does not read")


def test_non_ternary_tensors(wide, tmp_path):
    from gguf_checkpoints import write_gguf

    def bump(name, values):
        if name == "blk.1.ffn_up.weight":
            values = values.copy()
            values[3, 5] = 1.5 * np.abs(values).max()
        return values

    for linear_type in ("F16", "TQ2_0"):
        path = write_gguf(wide, tmp_path / f"{linear_type}.gguf", linear_type=linear_type, edit=bump)
        message = _convert_fails(path, tmp_path, "blk.1.ffn_up.weight", linear_type)
        assert ("not ternary" in message) if linear_type == "F16" else ("block scales" in message)


def test_unknown_architecture(wide, tmp_path):
    from gguf_checkpoints import write_gguf

    path = write_gguf(wide, tmp_path / "m.gguf", arch="mamba")
    _convert_fails(path, tmp_path, "general.architecture", "'mamba'")


# --------------------------------------------------------------------------- the other families


def _family_checkpoint(directory, family: str, seed: int):
    """A tiny checkpoint of another family, from the 2B-4T-style test weights:
    - "llama": LlamaForCausalLM with packed autobitlinear linears (the multiplying scale a GGUF
      carries), SiLU, no sub-norms, untied head, GQA 2:1 (Falcon3 / Falcon-E's GGUF form);
    - "1bitllm": BitnetForCausalLM (model_type llama) with fp16 latent weights, SiLU and the sub-norms
      under 1bitLLM's names inner_attn_ln / ffn_layernorm."""
    import torch
    from checkpoints import _write, make_config, master_weights, packed_tensors

    config = make_config(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, tied=family != "llama")
    config.update(hidden_act="silu", model_type="llama")
    tensors = master_weights(config, seed)
    if family == "llama":
        config.update(architectures=["LlamaForCausalLM"],
                      quantization_config={"quant_method": "bitnet", "linear_class": "autobitlinear",
                                           "quantization_mode": "offline"})
        tensors = {n: t for n, t in packed_tensors(tensors, torch.bfloat16).items() if "sub_norm" not in n}
    else:
        config.update(architectures=["BitnetForCausalLM"])
        renamed = {"attn_sub_norm": "inner_attn_ln", "ffn_sub_norm": "ffn_layernorm"}
        tensors = {next((n.replace(a, b) for a, b in renamed.items() if a in n), n): t.half() for n, t in tensors.items()}
    return _write(directory, config, tensors)


@pytest.mark.parametrize("linear_type", ["I2_S", "TQ2_0"])
def test_llama_architecture_falcon_form(tmp_path, linear_type):
    """Falcon3 / Falcon-E GGUFs: general.architecture llama, Q/K rows permuted by the converter."""
    from gguf_checkpoints import write_gguf

    hf = _family_checkpoint(tmp_path / "hf", "llama", seed=4)
    gguf_path = write_gguf(hf, tmp_path / "m.gguf", linear_type=linear_type, arch="llama", embedding_type="BF16",
                           pre="falcon3")
    _assert_same_model(convert_checkpoint(hf, tmp_path / "ref.bnr"), convert_gguf(gguf_path, tmp_path / "g.bnr"))


@pytest.mark.parametrize("separate_scales", [False, True])
def test_llama_cpp_bitnet_architecture(tmp_path, separate_scales):
    """llama.cpp's `bitnet` (1bitLLM): latent weights ternarized with absmean, written as F32 values or
    as +-1 with a `.scale` tensor; the same model as the safetensors path (the scale stays f32)."""
    from gguf_checkpoints import write_gguf

    hf = _family_checkpoint(tmp_path / "hf", "1bitllm", seed=6)
    gguf_path = write_gguf(hf, tmp_path / "m.gguf", linear_type="F32", arch="bitnet", embedding_type="F16",
                           separate_scales=separate_scales)
    _assert_same_model(convert_checkpoint(hf, tmp_path / "ref.bnr"), convert_gguf(gguf_path, tmp_path / "g.bnr"))


def test_llama_cpp_bitnet_tq_rounds_the_scale(tmp_path):
    """Its TQ1_0 files round each latent-weight scale (f32) to fp16: the same ternary values, the scale
    within fp16's half-ulp, logits close but not identical."""
    from gguf_checkpoints import write_gguf

    hf = _family_checkpoint(tmp_path / "hf", "1bitllm", seed=6)
    ref = convert_checkpoint(hf, tmp_path / "ref.bnr")
    got = convert_gguf(write_gguf(hf, tmp_path / "m.gguf", linear_type="TQ1_0", arch="bitnet"), tmp_path / "g.bnr")
    a, b = ff.read_header(ref), ff.read_header(got)
    for t in a.tensors:
        if t.encoding in ff.TERNARY_ENCODINGS:
            assert np.array_equal(ff.read_tensor(a, t.name), ff.read_tensor(b, t.name)), t.name
            assert b.tensor(t.name).scale == float(np.float16(t.scale)), t.name
    ma, mb = Model(ref, n_threads=1), Model(got, n_threads=1)
    ids = ma.tokenize(PROMPT)
    la, lb = ma.logits(ids), mb.logits(ids)
    assert not np.array_equal(la, lb) and np.max(np.abs(la - lb)) < 0.05 * np.max(np.abs(la))


def test_sentencepiece_vocabulary_matches_sentencepiece(tmp_path):
    """A 1bitLLM-style tokenizer.model written as llama.cpp writes a `llama` vocabulary (pieces,
    scores, types) encodes the corpus exactly as the sentencepiece package does."""
    import gguf
    import sentencepiece as spm
    from checkpoints import sentencepiece_model
    from tokenizers import Tokenizer

    from bitnet_run.convert.gguf_file import GGUFFile
    from bitnet_run.convert.gguf_tokenizer import read_tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_model(tmp_path / "spm")))
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    w = gguf.GGUFWriter(tmp_path / "spm.gguf", "bitnet")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    tok = Tokenizer.from_str(read_tokenizer(GGUFFile(tmp_path / "spm.gguf")).tokenizer_json)
    for text in CORPUS:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text
