"""A sentencepiece `tokenizer.model` (the Llama 1/2 style tokenizer of 1bitLLM's checkpoints) turned into
the Hugging Face `tokenizers` JSON the model file carries, without the sentencepiece package.

The model file is a protobuf ModelProto; only a few fields matter (sentencepiece_model.proto):
ModelProto.pieces = 1 (piece = 1, score = 2, type = 3), trainer_spec = 2 (model_type = 3,
byte_fallback = 35), normalizer_spec = 3 (name = 1, add_dummy_prefix = 3, remove_extra_whitespaces = 4).
A BPE model becomes a tokenizers BPE whose merges are every split of a piece into two pieces,
ranked by the merged piece's score (what sentencepiece's BPE applies), with sentencepiece's space
handling as normalizer ("▁" for spaces, one prepended) and decoder. tests/test_sentencepiece.py
checks the result against the sentencepiece package.
"""
from __future__ import annotations

import json
import struct

from .errors import ConversionError

SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_BPE = 2


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _fields(buf: bytes) -> list[tuple[int, object]]:
    """(field number, value) of one protobuf message: ints for varints, bytes for length-delimited,
    floats for 32-bit fields."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated field")
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = struct.unpack_from("<f", buf, pos)[0], pos + 4
        elif wire == 1:
            value, pos = struct.unpack_from("<d", buf, pos)[0], pos + 8
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((number, value))
    return out


def _first(fields: list[tuple[int, object]], number: int, default):
    return next((v for n, v in fields if n == number), default)


def tokenizer_json_from_model(data: bytes, add_bos: bool = True) -> str:
    """The tokenizers JSON of a sentencepiece BPE model; ConversionError for what it cannot express."""
    try:
        model = _fields(data)
        pieces = []
        for n, raw in model:
            if n == 1:
                f = _fields(raw)
                pieces.append((_first(f, 1, b"").decode("utf-8"), float(_first(f, 2, 0.0)), int(_first(f, 3, NORMAL))))
        trainer = _fields(_first(model, 2, b""))
        normalizer = _fields(_first(model, 3, b""))
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise ConversionError(f"tokenizer.model: not a sentencepiece model ({e})") from None
    model_type = _first(trainer, 3, 1)
    if model_type != MODEL_BPE:
        raise ConversionError(f"tokenizer.model: model_type {model_type} is not supported (expected {MODEL_BPE}, BPE)")
    rule = _first(normalizer, 1, b"nmt_nfkc").decode()
    if rule != "identity" or _first(normalizer, 4, 1):
        raise ConversionError(
            f"tokenizer.model: normalizer {rule!r} with remove_extra_whitespaces {bool(_first(normalizer, 4, 1))} "
            "is not supported (expected 'identity' without remove_extra_whitespaces, as Llama's)"
        )
    vocab = {piece: i for i, (piece, _score, _type) in enumerate(pieces)}
    unk = next((p for p, _s, t in pieces if t == UNKNOWN), None)
    merges = []
    for piece, score, kind in pieces:
        if kind not in (NORMAL, USER_DEFINED):
            continue
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: m[2], reverse=True)  # stable: equal scores keep the order above
    specials = [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                 "special": t == CONTROL or t == UNKNOWN} for i, (p, _s, t) in enumerate(pieces)
                if t in (CONTROL, UNKNOWN, USER_DEFINED)]
    bos = next((p for p, _s, t in pieces if t == CONTROL and p == "<s>"), None)
    normalizers = [{"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
    if _first(normalizer, 3, 1):  # add_dummy_prefix
        normalizers.insert(0, {"type": "Prepend", "prepend": SPACE})
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": specials,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": None if not (add_bos and bos) else {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": bool(_first(trainer, 35, 0)),
            "ignore_merges": False, "vocab": vocab, "merges": [[a, b] for a, b, _s in merges],
        },
    }
    return json.dumps(tokenizer, ensure_ascii=False)
