"""The `bitnet` architecture (BitNetForCausalLM): config checks, metadata and the tensor mapping.

Two released forms are understood, both with quantization_config quant_method "bitnet" and
linear_class "autobitlinear":
- quantization_mode "offline" (microsoft/bitnet-b1.58-2B-4T): linears are uint8 packed [out/4, in]
  with a `<proj>.weight_scale` of shape [1] that multiplies the output;
- quantization_mode "online" (microsoft/bitnet-b1.58-2B-4T-bf16): linears are float master weights
  [out, in], quantized here exactly as transformers quantizes them at every forward pass.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bitnet_run import fileformat as ff

from .checkpoint import FLOAT_DTYPES, Checkpoint
from .errors import ConversionError
from .quantize import VALUES_PER_BYTE, absmean_ternary, unpack_transformers_ternary

ARCHITECTURE = "bitnet"
HF_ARCHITECTURE = "BitNetForCausalLM"
# transformers' BitNetConfig defaults, used where config.json leaves a field out.
DEFAULT_ROPE_THETA = 500000.0
DEFAULT_RMS_NORM_EPS = 1e-5
DEFAULT_MAX_POSITION_EMBEDDINGS = 2048
FLOAT_ENCODINGS = {"F32": ff.ENCODING_F32, "F16": ff.ENCODING_F16, "BF16": ff.ENCODING_BF16}


@dataclass(frozen=True)
class Hyperparameters:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    context_length: int
    rms_norm_eps: float
    rope_theta: float
    hidden_act: str
    tied_embeddings: bool
    quantization_mode: str  # "offline" (packed) or "online" (master weights)


def _positive_int(config: dict, key: str, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:  # absent and null both mean transformers' default
        value = default
    if value is None:
        raise ConversionError(f"config.json: {key} is missing (expected a positive integer)")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConversionError(f"config.json: {key} is {value!r} (expected a positive integer)")
    return value


def _positive_float(config: dict, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConversionError(f"config.json: {key} is {value!r} (expected a positive number)")
    return float(value)


def _check_architecture(config: dict) -> None:
    model_type = config.get("model_type")
    if model_type != ARCHITECTURE:
        raise ConversionError(f"config.json: model_type {model_type!r} is not supported (expected {ARCHITECTURE!r})")
    architectures = config.get("architectures")
    if architectures is not None and architectures != [HF_ARCHITECTURE]:
        raise ConversionError(f"config.json: architectures {architectures!r} is not supported (expected [{HF_ARCHITECTURE!r}])")


def _quantization_mode(config: dict) -> str:
    """Validate quantization_config against what transformers' BitNet quantizer would do with it."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        # Without it transformers runs plain float linears: not a ternary model.
        raise ConversionError(
            f"config.json: quantization_config is {qc!r} (expected quant_method 'bitnet', linear_class 'autobitlinear')"
        )
    expected = {"quant_method": "bitnet", "linear_class": "autobitlinear"}
    for key, want in expected.items():
        # transformers defaults linear_class to 'bitlinear', which divides by the scale: another format.
        found = qc.get(key, "bitlinear" if key == "linear_class" else None)
        if found != want:
            raise ConversionError(f"config.json: quantization_config.{key} is {found!r} (expected {want!r})")
    mode = qc.get("quantization_mode", "offline")
    if mode not in ("offline", "online"):
        raise ConversionError(f"config.json: quantization_config.quantization_mode is {mode!r} (expected 'offline' or 'online')")
    if qc.get("use_rms_norm", False):
        raise ConversionError("config.json: quantization_config.use_rms_norm is true (per-linear input RMSNorm is not supported yet; expected false)")
    # The output head is never quantized, so naming it changes nothing; anything else would.
    skipped = qc.get("modules_to_not_convert") or []
    if not isinstance(skipped, list) or any(not isinstance(m, str) or m.split(".")[-1] != "lm_head" for m in skipped):
        raise ConversionError(
            f"config.json: quantization_config.modules_to_not_convert is {skipped!r} (expected none besides 'lm_head')"
        )
    return mode


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ConversionError(f"config.json: rope_parameters is {params!r} (expected an object)")
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            raise ConversionError(f"config.json: rope_parameters.rope_type is {rope_type!r} (expected 'default')")
        if "rope_theta" in params:
            return _positive_float(config, "rope_parameters.rope_theta", params["rope_theta"])
    if config.get("rope_scaling") is not None:
        raise ConversionError(f"config.json: rope_scaling is {config['rope_scaling']!r} (expected none)")
    return _positive_float(config, "rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))


def read_hyperparameters(config: dict) -> Hyperparameters:
    """Check config.json and collect what the runtime needs; refuse anything it cannot run."""
    _check_architecture(config)
    mode = _quantization_mode(config)
    hidden_act = config.get("hidden_act", "relu2")
    if hidden_act != "relu2":
        raise ConversionError(f"config.json: hidden_act {hidden_act!r} is not supported (expected 'relu2')")
    if config.get("attention_bias", False):
        raise ConversionError("config.json: attention_bias is true (expected false: the format has no biases)")
    hidden = _positive_int(config, "hidden_size")
    n_heads = _positive_int(config, "num_attention_heads")
    n_kv_heads = _positive_int(config, "num_key_value_heads", n_heads)
    head_dim = _positive_int(config, "head_dim", hidden // n_heads if hidden % n_heads == 0 else None)
    if n_heads * head_dim != hidden or head_dim % 2:
        raise ConversionError(
            f"config.json: head_dim {head_dim} with {n_heads} heads does not fit hidden_size {hidden} "
            "(expected an even head_dim with num_attention_heads * head_dim == hidden_size)"
        )
    if n_heads % n_kv_heads:
        raise ConversionError(f"config.json: num_key_value_heads {n_kv_heads} does not divide num_attention_heads {n_heads}")
    tied = config.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ConversionError(f"config.json: tie_word_embeddings is {tied!r} (expected true or false)")
    return Hyperparameters(
        vocab_size=_positive_int(config, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_positive_int(config, "intermediate_size"),
        n_layers=_positive_int(config, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        context_length=_positive_int(config, "max_position_embeddings", DEFAULT_MAX_POSITION_EMBEDDINGS),
        rms_norm_eps=_positive_float(config, "rms_norm_eps", config.get("rms_norm_eps", DEFAULT_RMS_NORM_EPS)),
        rope_theta=_rope_theta(config),
        hidden_act=hidden_act,
        tied_embeddings=tied,
        quantization_mode=mode,
    )


def add_model_metadata(writer: ff.Writer, hp: Hyperparameters) -> None:
    writer.add_u32("bitnet.vocab_size", hp.vocab_size)
    writer.add_u32("bitnet.hidden_size", hp.hidden_size)
    writer.add_u32("bitnet.intermediate_size", hp.intermediate_size)
    writer.add_u32("bitnet.n_layers", hp.n_layers)
    writer.add_u32("bitnet.n_heads", hp.n_heads)
    writer.add_u32("bitnet.n_kv_heads", hp.n_kv_heads)
    writer.add_u32("bitnet.head_dim", hp.head_dim)
    writer.add_u32("bitnet.context_length", hp.context_length)
    writer.add_f32("bitnet.rms_norm_eps", hp.rms_norm_eps)
    writer.add_f32("bitnet.rope_theta", hp.rope_theta)
    writer.add_string("bitnet.hidden_act", hp.hidden_act)
    writer.add_u32("bitnet.tied_embeddings", int(hp.tied_embeddings))


# --------------------------------------------------------------------------- tensors

EMBEDDING, NORM, LINEAR = "embedding", "norm", "linear"


def expected_tensors(hp: Hyperparameters) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, kind, unpacked shape) of every tensor of docs/format.md, in file order."""
    H, I, D = hp.hidden_size, hp.intermediate_size, hp.head_dim
    q, kv = hp.n_heads * D, hp.n_kv_heads * D
    tensors = [("model.embed_tokens.weight", EMBEDDING, (hp.vocab_size, H)), ("model.norm.weight", NORM, (H,))]
    if not hp.tied_embeddings:
        tensors.append(("lm_head.weight", EMBEDDING, (hp.vocab_size, H)))
    for i in range(hp.n_layers):
        L = f"model.layers.{i}"
        tensors += [
            (f"{L}.input_layernorm.weight", NORM, (H,)),
            (f"{L}.post_attention_layernorm.weight", NORM, (H,)),
            (f"{L}.self_attn.attn_sub_norm.weight", NORM, (H,)),
            (f"{L}.mlp.ffn_sub_norm.weight", NORM, (I,)),
            (f"{L}.self_attn.q_proj.weight", LINEAR, (q, H)),
            (f"{L}.self_attn.k_proj.weight", LINEAR, (kv, H)),
            (f"{L}.self_attn.v_proj.weight", LINEAR, (kv, H)),
            (f"{L}.self_attn.o_proj.weight", LINEAR, (H, q)),
            (f"{L}.mlp.gate_proj.weight", LINEAR, (I, H)),
            (f"{L}.mlp.up_proj.weight", LINEAR, (I, H)),
            (f"{L}.mlp.down_proj.weight", LINEAR, (H, I)),
        ]
    return tensors


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


def _check_checkpoint_tensors(checkpoint: Checkpoint, hp: Hyperparameters) -> None:
    """Every expected tensor present with the right shape and dtype, and nothing unexplained."""
    known = set()
    for name, kind, shape in expected_tensors(hp):
        known.add(name)
        if kind == LINEAR and hp.quantization_mode == "offline":
            out_features, in_features = shape
            if out_features % VALUES_PER_BYTE:
                raise ConversionError(f"config.json: {name} has {out_features} output rows, not a multiple of 4 as packing needs")
            _check_tensor(checkpoint, name, (out_features // VALUES_PER_BYTE, in_features), ("U8",))
            _check_tensor(checkpoint, _scale_name(name), (1,), FLOAT_DTYPES)
            known.add(_scale_name(name))
        else:
            _check_tensor(checkpoint, name, shape, FLOAT_DTYPES)
    # A tied head is the embedding whatever else is stored; inv_freq buffers are derived from the config.
    ignorable = {"lm_head.weight"} if hp.tied_embeddings else set()
    unexpected = sorted(
        n for n in checkpoint.tensors if n not in known and n not in ignorable and not n.endswith("rotary_emb.inv_freq")
    )
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise ConversionError(f"checkpoint: unexpected tensor {unexpected[0]!r}{more} (not part of a {HF_ARCHITECTURE})")


def _float32_to_bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round half to even (finite input)."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def _float_producer(checkpoint: Checkpoint, name: str, encoding: int) -> Callable[[], ff.TensorData]:
    """An embedding / output head in `encoding`: the stored bytes when it is the checkpoint's own dtype,
    else converted from float32 (Q8_R: per-row absmax int8, docs/format.md)."""
    entry = checkpoint.tensors[name]
    if FLOAT_ENCODINGS[entry.dtype] == encoding:
        return lambda: ff.TensorData(checkpoint.load(name))

    def convert() -> ff.TensorData:
        w = checkpoint.load_float32(name)
        if not np.all(np.isfinite(w)):
            raise ConversionError(f"{entry.file.name}: tensor {name!r} holds non-finite values")
        if encoding == ff.ENCODING_Q8R:
            return ff.TensorData(ff.pack_q8r(*ff.quantize_q8r(w)))
        if encoding == ff.ENCODING_BF16:
            return ff.TensorData(_float32_to_bf16_bits(w))
        if encoding == ff.ENCODING_F16:
            if np.any(np.abs(w) > np.float32(65504)):
                raise ConversionError(f"{entry.file.name}: tensor {name!r} does not fit in float16")
            return ff.TensorData(w.astype("<f2"))
        return ff.TensorData(w.astype("<f4"))

    return convert


def _producer(
    checkpoint: Checkpoint, name: str, kind: str, hp: Hyperparameters, encoding: int = ff.ENCODING_I2
) -> Callable[[], ff.TensorData]:
    if kind == EMBEDDING:
        return _float_producer(checkpoint, name, encoding)
    if kind == NORM:
        return lambda: ff.TensorData(checkpoint.load_float32(name))
    pack = ff.TERNARY_PACKERS[encoding]
    if hp.quantization_mode == "online":

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


def add_tensors(writer: ff.Writer, checkpoint: Checkpoint, hp: Hyperparameters, weights: str = "i2",
                head: str | None = None) -> None:
    """Check every tensor up front, then plan each one with a producer that reads it when written.
    `weights` names the encoding of the ternary linears: "i2", "tl1" or "tl2". `head` the encoding of
    the output head ("bf16", "f16", "f32" or "q8"; None keeps the checkpoint's dtype): the tied
    embedding, or lm_head when untied (an untied embedding keeps its dtype: only one row is read)."""
    if weights not in ff.WEIGHT_ENCODINGS:
        raise ValueError(f"weights must be one of {sorted(ff.WEIGHT_ENCODINGS)}, got {weights!r}")
    if head is not None and head not in ff.HEAD_ENCODINGS:
        raise ValueError(f"head must be one of {sorted(ff.HEAD_ENCODINGS)} or None, got {head!r}")
    ternary = ff.WEIGHT_ENCODINGS[weights]
    head_name = "model.embed_tokens.weight" if hp.tied_embeddings else "lm_head.weight"
    _check_checkpoint_tensors(checkpoint, hp)
    for name, kind, shape in expected_tensors(hp):
        if kind == EMBEDDING and name == head_name and head is not None:
            encoding = ff.HEAD_ENCODINGS[head]
        elif kind == EMBEDDING:
            encoding = FLOAT_ENCODINGS[checkpoint.tensors[name].dtype]
        elif kind == NORM:
            encoding = ff.ENCODING_F32
        else:
            encoding = ternary
        writer.add_tensor(name, encoding, shape, _producer(checkpoint, name, kind, hp, encoding))
