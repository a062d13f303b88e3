"""Checkpoint tensors -> model-file tensors: every tensor of the plan (arch.tensor_plan) checked in the
checkpoint up front, then produced one at a time while the file is written.

The linears come in the two forms arch.Linears describes: uint8 packed [out/4, in] with a
`<proj>.weight_scale` of shape [1] (2B-4T, Llama3-8B-1.58, Falcon3/Falcon-E), repacked as they are;
or float master weights [out, in] (the -bf16 checkpoints, 1bitLLM's fp16 latents), quantized here
exactly as transformers quantizes them at every forward pass.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bitnet_run import fileformat as ff

from .arch import EMBEDDING, LINEAR, NORM, Family, Hyperparameters, Linears, head_name, tensor_plan
from .checkpoint import FLOAT_DTYPES, Checkpoint
from .errors import ConversionError
from .quantize import VALUES_PER_BYTE, absmean_ternary, unpack_transformers_ternary

FLOAT_ENCODINGS = {"F32": ff.ENCODING_F32, "F16": ff.ENCODING_F16, "BF16": ff.ENCODING_BF16}


def _scale_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight") + ".weight_scale"


def _check_tensor(checkpoint: Checkpoint, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> None:
    entry = checkpoint.tensors.get(name)
    if entry is None:
        raise ConversionError(f"checkpoint: tensor {name!r} is missing")
    if entry.shape != shape:
        raise ConversionError(f"{entry.file.name}: tensor {name!r} has shape {list(entry.shape)} (expected {list(shape)})")
    if entry.dtype not in dtypes:
        raise ConversionError(f"{entry.file.name}: tensor {name!r} has dtype {entry.dtype} (expected {' or '.join(dtypes)})")


def _check_checkpoint_tensors(checkpoint: Checkpoint, family: Family, hp: Hyperparameters, linears: Linears) -> None:
    """Every planned tensor present with the right shape and dtype, and nothing unexplained."""
    known = set()
    for spec in tensor_plan(hp):
        name = family.checkpoint_name(spec.name)
        known.add(name)
        if spec.kind == LINEAR and linears.packed:
            out_features, in_features = spec.shape
            if out_features % VALUES_PER_BYTE:
                raise ConversionError(f"config.json: {name} has {out_features} output rows, not a multiple of 4 as packing needs")
            _check_tensor(checkpoint, name, (out_features // VALUES_PER_BYTE, in_features), ("U8",))
            _check_tensor(checkpoint, _scale_name(name), (1,), FLOAT_DTYPES)
            known.add(_scale_name(name))
        else:
            _check_tensor(checkpoint, name, spec.shape, FLOAT_DTYPES)
    # A tied head is the embedding whatever else is stored; inv_freq buffers are derived from the config.
    ignorable = {"lm_head.weight"} if hp.tied_embeddings else set()
    unexpected = sorted(
        n for n in checkpoint.tensors if n not in known and n not in ignorable and not n.endswith("rotary_emb.inv_freq")
    )
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        why = "biases are not supported" if unexpected[0].endswith(".bias") else f"not part of a {family.architecture} with this config"
        raise ConversionError(f"checkpoint: unexpected tensor {unexpected[0]!r}{more} ({why})")


def _float32_to_bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round half to even (finite input)."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def _float_producer(checkpoint: Checkpoint, name: str, encoding: int) -> Callable[[], ff.TensorData]:
    """An embedding / output head in `encoding`: the stored bytes when it is the checkpoint's own dtype,
    else converted from float32 (Q8_R, Q6_B, Q4_B: the integer quantizations of docs/format.md)."""
    entry = checkpoint.tensors[name]
    if FLOAT_ENCODINGS[entry.dtype] == encoding:
        return lambda: ff.TensorData(checkpoint.load(name))

    def convert() -> ff.TensorData:
        w = checkpoint.load_float32(name)
        if not np.all(np.isfinite(w)):
            raise ConversionError(f"{entry.file.name}: tensor {name!r} holds non-finite values")
        quantize = ff.ENCODINGS[encoding].quantize
        if quantize is not None:
            return ff.TensorData(quantize(w))
        if encoding == ff.ENCODING_BF16:
            return ff.TensorData(_float32_to_bf16_bits(w))
        if encoding == ff.ENCODING_F16:
            if np.any(np.abs(w) > np.float32(65504)):
                raise ConversionError(f"{entry.file.name}: tensor {name!r} does not fit in float16")
            return ff.TensorData(w.astype("<f2"))
        return ff.TensorData(w.astype("<f4"))

    return convert


def _producer(checkpoint: Checkpoint, name: str, kind: str, linears: Linears, encoding: int) -> Callable[[], ff.TensorData]:
    if kind == EMBEDDING:
        return _float_producer(checkpoint, name, encoding)
    if kind == NORM:
        return lambda: ff.TensorData(checkpoint.load_float32(name))
    pack = ff.TERNARY_PACKERS[encoding]
    if not linears.packed:

        def quantize_master() -> ff.TensorData:
            ternary, scale = absmean_ternary(checkpoint.load_float32(name))
            return ff.TensorData(pack(ternary), scale)

        return quantize_master

    def repack() -> ff.TensorData:
        try:
            ternary = unpack_transformers_ternary(checkpoint.load(name))
        except ValueError as e:
            raise ConversionError(f"{checkpoint.tensors[name].file.name}: tensor {name!r}: {e} (expected codes 0..2)") from None
        scale = np.float32(checkpoint.load_float32(_scale_name(name))[0])
        if not np.isfinite(scale) or scale <= 0:
            raise ConversionError(f"{checkpoint.tensors[name].file.name}: {_scale_name(name)!r} is {scale} (expected a positive number)")
        return ff.TensorData(pack(ternary), float(scale))

    return repack


def add_tensors(writer: ff.Writer, checkpoint: Checkpoint, family: Family, hp: Hyperparameters, linears: Linears,
                weights: str = "i2", head: str | None = None) -> None:
    """Check every tensor up front, then plan each one with a producer that reads it when written.
    `weights` names the encoding of the ternary linears: "i2", "tl1" or "tl2". `head` the encoding of
    the output head ("bf16", "f16", "f32", "q8", "q6" or "q4"; None keeps the checkpoint's dtype): the tied
    embedding, or lm_head when untied (an untied embedding keeps its dtype: only one row is read)."""
    if weights not in ff.WEIGHT_ENCODINGS:
        raise ValueError(f"weights must be one of {sorted(ff.WEIGHT_ENCODINGS)}, got {weights!r}")
    if head is not None and head not in ff.HEAD_ENCODINGS:
        raise ValueError(f"head must be one of {sorted(ff.HEAD_ENCODINGS)} or None, got {head!r}")
    _check_checkpoint_tensors(checkpoint, family, hp, linears)
    for spec in tensor_plan(hp):
        source = family.checkpoint_name(spec.name)
        if spec.kind == EMBEDDING and spec.name == head_name(hp) and head is not None:
            encoding = ff.HEAD_ENCODINGS[head]
        elif spec.kind == EMBEDDING:
            encoding = FLOAT_ENCODINGS[checkpoint.tensors[source].dtype]
        elif spec.kind == NORM:
            encoding = ff.ENCODING_F32
        else:
            encoding = ff.WEIGHT_ENCODINGS[weights]
        writer.add_tensor(spec.name, encoding, spec.shape, _producer(checkpoint, source, spec.kind, linears, encoding))
