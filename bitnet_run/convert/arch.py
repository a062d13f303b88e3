"""The architecture bitnet-run runs, described once: its hyperparameters, the metadata that carries
them, the tensors of a model file, and the checkpoint families that convert to it.

Every released ternary model is one graph, a Llama-style pre-norm decoder whose linears are
BitLinears (int8 activations per token, ternary weights with one scale per tensor):

    h   = x + o_proj([attn_sub_norm](attention(input_layernorm(x))))
    out = h + down_proj([ffn_sub_norm](act(gate_proj(n)) * up_proj(n))),  n = post_attention_layernorm(h)

What differs between the families is data (`Hyperparameters`): the activation (relu2 or SiLU), the
sub-norms (present or not), an RMSNorm inside each BitLinear on its input (`<proj>.rms_norm.weight`,
or not), head_dim, tied or untied head, and whether the weight scale multiplies or divides.

Who reads what here:
- the converter (converter.py, tensors.py): `read_config` (config.json -> family and
  hyperparameters), `add_hyperparameters`, `tensor_plan` and `Family.checkpoint_name`;
- the synthetic benchmark models (bench/synthetic.py): `tensor_plan` and `add_hyperparameters`;
- the GGUF peer writer (bench/peers.py): `tensor_plan` and `gguf_name`;
- the C loader (runtime/src/model.c) reads the same metadata keys and binds the same names; its
  layer table is the C copy of LAYER_NORMS/PROJECTIONS, and tests check the two agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .. import fileformat as ff
from .errors import ConversionError

ARCHITECTURE = "bitnet"  # general.architecture of every file
ACTIVATIONS = ("relu2", "silu")
WEIGHT_SCALES = ("multiply", "divide")


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
    hidden_act: str = "relu2"  # the FFN gate's activation, one of ACTIVATIONS
    tied_embeddings: bool = True
    sub_norms: bool = True  # an RMSNorm before o_proj ([Q]) and before down_proj ([I])
    linear_norm_eps: float | None = None  # set: every BitLinear RMSNorms its own input first
    weight_scale: str = "multiply"  # y = dot / s * scale ("multiply") or dot / (s * scale) ("divide")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


# --------------------------------------------------------------------------- metadata

REQUIRED = object()
# (key, Hyperparameters field, value type, default). Keys with a default are written only when the
# value differs from it, so the files of the 2B-4T layout are the same bytes as before these keys
# existed; the C loader applies the same defaults.
METADATA = (
    ("bitnet.vocab_size", "vocab_size", ff.TYPE_U32, REQUIRED),
    ("bitnet.hidden_size", "hidden_size", ff.TYPE_U32, REQUIRED),
    ("bitnet.intermediate_size", "intermediate_size", ff.TYPE_U32, REQUIRED),
    ("bitnet.n_layers", "n_layers", ff.TYPE_U32, REQUIRED),
    ("bitnet.n_heads", "n_heads", ff.TYPE_U32, REQUIRED),
    ("bitnet.n_kv_heads", "n_kv_heads", ff.TYPE_U32, REQUIRED),
    ("bitnet.head_dim", "head_dim", ff.TYPE_U32, REQUIRED),
    ("bitnet.context_length", "context_length", ff.TYPE_U32, REQUIRED),
    ("bitnet.rms_norm_eps", "rms_norm_eps", ff.TYPE_F32, REQUIRED),
    ("bitnet.rope_theta", "rope_theta", ff.TYPE_F32, REQUIRED),
    ("bitnet.hidden_act", "hidden_act", ff.TYPE_STRING, REQUIRED),
    ("bitnet.tied_embeddings", "tied_embeddings", ff.TYPE_U32, REQUIRED),
    ("bitnet.sub_norms", "sub_norms", ff.TYPE_U32, True),
    ("bitnet.linear_norm_eps", "linear_norm_eps", ff.TYPE_F32, None),
    ("bitnet.weight_scale", "weight_scale", ff.TYPE_STRING, "multiply"),
)
_ADDERS = {ff.TYPE_U32: "add_u32", ff.TYPE_F32: "add_f32", ff.TYPE_STRING: "add_string"}


def add_hyperparameters(writer: ff.Writer, hp: Hyperparameters) -> None:
    """The bitnet.* keys (docs/format.md); the writer adds general.architecture = ARCHITECTURE first."""
    for key, field, type_id, default in METADATA:
        value = getattr(hp, field)
        if default is not REQUIRED and value == default:
            continue
        getattr(writer, _ADDERS[type_id])(key, int(value) if isinstance(value, bool) else value)


def read_hyperparameters(metadata: dict) -> Hyperparameters:
    """The hyperparameters of a file's metadata (fileformat.read_header(...).metadata)."""
    values = {}
    for key, field, _type_id, default in METADATA:
        if key not in metadata and default is REQUIRED:
            raise ValueError(f"metadata key {key!r} is missing")
        values[field] = metadata.get(key, default)
    for f in fields(Hyperparameters):  # u32 flags back to the bools they were written from
        if isinstance(f.default, bool):
            values[f.name] = bool(values[f.name])
    return Hyperparameters(**values)


# --------------------------------------------------------------------------- tensors

EMBEDDING, NORM, LINEAR = "embedding", "norm", "linear"


@dataclass(frozen=True)
class TensorSpec:
    name: str  # in the model file
    kind: str  # EMBEDDING (the embedding and an untied head), NORM (F32) or LINEAR (ternary)
    shape: tuple[int, ...]  # [out, in] for linears: the unpacked shape

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# The per-layer tensors, named after the 2B-4T checkpoint, with their llama.cpp (GGUF) names.
# Sizes: "H" hidden, "I" intermediate, "Q" n_heads * head_dim, "KV" n_kv_heads * head_dim.
# (suffix, size, gguf name, sub-norm: exists only with hp.sub_norms)
LAYER_NORMS = (
    ("input_layernorm", "H", "attn_norm", False),
    ("post_attention_layernorm", "H", "ffn_norm", False),
    ("self_attn.attn_sub_norm", "Q", "attn_sub_norm", True),
    ("mlp.ffn_sub_norm", "I", "ffn_sub_norm", True),
)
# (suffix, out size, in size, gguf name)
PROJECTIONS = (
    ("self_attn.q_proj", "Q", "H", "attn_q"),
    ("self_attn.k_proj", "KV", "H", "attn_k"),
    ("self_attn.v_proj", "KV", "H", "attn_v"),
    ("self_attn.o_proj", "H", "Q", "attn_output"),
    ("mlp.gate_proj", "I", "H", "ffn_gate"),
    ("mlp.up_proj", "I", "H", "ffn_up"),
    ("mlp.down_proj", "H", "I", "ffn_down"),
)
LINEAR_NORM = "rms_norm"  # <proj>.rms_norm.weight, a BitLinear's own input norm
EMBED, OUTPUT_NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
_GGUF_GLOBAL = {EMBED: "token_embd.weight", OUTPUT_NORM: "output_norm.weight", HEAD: "output.weight"}


def _sizes(hp: Hyperparameters) -> dict[str, int]:
    return {"H": hp.hidden_size, "I": hp.intermediate_size, "Q": hp.q_dim, "KV": hp.kv_dim}


def tensor_plan(hp: Hyperparameters) -> list[TensorSpec]:
    """Every tensor of a model file (docs/format.md), in file order: the only place a tensor list is
    written down."""
    size = _sizes(hp)
    plan = [TensorSpec(EMBED, EMBEDDING, (hp.vocab_size, hp.hidden_size)), TensorSpec(OUTPUT_NORM, NORM, (hp.hidden_size,))]
    if not hp.tied_embeddings:
        plan.append(TensorSpec(HEAD, EMBEDDING, (hp.vocab_size, hp.hidden_size)))
    for i in range(hp.n_layers):
        L = f"model.layers.{i}"
        plan += [TensorSpec(f"{L}.{suffix}.weight", NORM, (size[n],))
                 for suffix, n, _gguf, sub_norm in LAYER_NORMS if hp.sub_norms or not sub_norm]
        if hp.linear_norm_eps is not None:
            plan += [TensorSpec(f"{L}.{suffix}.{LINEAR_NORM}.weight", NORM, (size[n_in],))
                     for suffix, _out, n_in, _gguf in PROJECTIONS]
        plan += [TensorSpec(f"{L}.{suffix}.weight", LINEAR, (size[n_out], size[n_in]))
                 for suffix, n_out, n_in, _gguf in PROJECTIONS]
    return plan


def head_name(hp: Hyperparameters) -> str:
    """The tensor that is the output head: the embedding when tied."""
    return EMBED if hp.tied_embeddings else HEAD


_GGUF_LAYER = {suffix: gguf for suffix, _n, gguf, _sub in LAYER_NORMS} | {suffix: gguf for suffix, _o, _i, gguf in PROJECTIONS}


def gguf_name(name: str) -> str:
    """The llama.cpp (GGUF) name of a tensor of the plan; ValueError for one llama.cpp has no name for."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    parts = name.split(".")  # model.layers.N.<suffix>.weight
    suffix = ".".join(parts[3:-1])
    if suffix not in _GGUF_LAYER:
        raise ValueError(f"tensor {name!r} has no llama.cpp name")
    return f"blk.{parts[2]}.{_GGUF_LAYER[suffix]}.weight"


# --------------------------------------------------------------------------- checkpoint families


@dataclass(frozen=True)
class Family:
    """A kind of Hugging Face checkpoint that converts to this architecture."""

    name: str
    architecture: str  # config.json "architectures" (one entry)
    model_type: str  # config.json "model_type"
    description: str
    sub_norms: tuple[str, str] | None  # the checkpoint's names of (attn_sub_norm, ffn_sub_norm), or None
    hidden_act: str  # when config.json has none (the transformers config class default)
    rope_theta: float  # defaults of the config class where config.json leaves a field out
    rms_norm_eps: float
    context_length: int
    # None: config.json must carry a BitNet quantization_config; else the linears' storage without one
    # ("master": float latent weights, ternarized with absmean here).
    implicit_linears: str | None = None

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint tensor that holds the file tensor `name`."""
        if self.sub_norms is not None:
            for ours, theirs in zip(("self_attn.attn_sub_norm", "mlp.ffn_sub_norm"), self.sub_norms):
                name = name.replace(f".{ours}.", f".{theirs}.")
        return name


FAMILIES = (
    Family("bitnet", "BitNetForCausalLM", "bitnet",
           "BitNet b1.58 2B-4T (transformers BitNetForCausalLM): relu2, sub-norms",
           ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm"), "relu2", 500000.0, 1e-5, 2048),
    Family("llama", "LlamaForCausalLM", "llama",
           "Llama-architecture BitLinear checkpoints (Llama3-8B-1.58, Falcon3-1.58bit, Falcon-E): SiLU, no sub-norms",
           None, "silu", 10000.0, 1e-6, 2048),
    Family("1bitllm", "BitnetForCausalLM", "llama",
           "1bitLLM bitnet_b1_58 (custom BitnetForCausalLM): SiLU, sub-norms, fp16 latent weights",
           ("self_attn.inner_attn_ln", "mlp.ffn_layernorm"), "silu", 10000.0, 1e-6, 2048, implicit_linears="master"),
)
_BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES}
# transformers' names of the two activations (ACT2FN: "swish" is SiLU too)
_HF_ACTIVATIONS = {"relu2": "relu2", "silu": "silu", "swish": "silu"}


@dataclass(frozen=True)
class Linears:
    """How a checkpoint stores its BitLinear weights."""

    packed: bool  # uint8 [out/4, in] + <proj>.weight_scale [1]; else float master weights [out, in]
    weight_scale: str  # "multiply" (autobitlinear, master) or "divide" (bitlinear)
    linear_norm_eps: float | None  # quantization_config use_rms_norm: its rms_norm_eps


def _positive_int(config: dict, key: str, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:  # absent and null both mean transformers' default
        value = default
    if value is None:
        raise ConversionError(f"config.json: {key} is missing (expected a positive integer)")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConversionError(f"config.json: {key} is {value!r} (expected a positive integer)")
    return value


def _positive_float(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConversionError(f"config.json: {key} is {value!r} (expected a positive number)")
    return float(value)


def _false(config: dict, key: str, why: str) -> None:
    if config.get(key, False):
        raise ConversionError(f"config.json: {key} is {config[key]!r} (expected false: {why})")


def family_of(config: dict) -> Family:
    architectures = config.get("architectures")
    model_type = config.get("model_type")
    if architectures is None:  # older configs: the model_type alone
        candidates = [f for f in FAMILIES if f.model_type == model_type and f.implicit_linears is None]
        if not candidates:
            known = sorted({f.model_type for f in FAMILIES})
            raise ConversionError(f"config.json: model_type {model_type!r} is not supported (expected one of {known})")
        return candidates[0]
    if not isinstance(architectures, list) or len(architectures) != 1 or architectures[0] not in _BY_ARCHITECTURE:
        raise ConversionError(
            f"config.json: architectures {architectures!r} is not supported (expected one of {[[f.architecture] for f in FAMILIES]})"
        )
    family = _BY_ARCHITECTURE[architectures[0]]
    if model_type != family.model_type:
        raise ConversionError(
            f"config.json: model_type {model_type!r} is not supported (expected {family.model_type!r}) for architectures {architectures!r}"
        )
    return family


def _linears(config: dict, family: Family) -> Linears:
    """Validate quantization_config against what transformers' BitNet quantizer would do with it."""
    qc = config.get("quantization_config")
    if qc is None and family.implicit_linears == "master":
        for key, want in (("weight_bits", 1), ("input_bits", 8)):
            if config.get(key, want) != want:
                raise ConversionError(f"config.json: {key} is {config[key]!r} (expected {want})")
        return Linears(packed=False, weight_scale="multiply", linear_norm_eps=None)
    if not isinstance(qc, dict):
        # Without it transformers runs plain float linears: not a ternary model.
        raise ConversionError(
            f"config.json: quantization_config is {qc!r} (expected quant_method 'bitnet' with linear_class 'bitlinear' or 'autobitlinear')"
        )
    if qc.get("quant_method") != "bitnet":
        raise ConversionError(f"config.json: quantization_config.quant_method is {qc.get('quant_method')!r} (expected 'bitnet')")
    linear_class = qc.get("linear_class", "bitlinear")  # transformers' default
    mode = qc.get("quantization_mode", "offline")
    if linear_class not in ("bitlinear", "autobitlinear"):
        raise ConversionError(
            f"config.json: quantization_config.linear_class is {linear_class!r} (expected 'bitlinear' or 'autobitlinear')"
        )
    if mode not in ("offline", "online"):
        raise ConversionError(f"config.json: quantization_config.quantization_mode is {mode!r} (expected 'offline' or 'online')")
    if linear_class == "bitlinear" and mode != "offline":
        raise ConversionError(
            "config.json: quantization_config.quantization_mode is 'online' with linear_class 'bitlinear' "
            "(expected 'offline': transformers' BitLinear holds packed weights only)"
        )
    use_rms_norm = qc.get("use_rms_norm", False)
    if not isinstance(use_rms_norm, bool):
        raise ConversionError(f"config.json: quantization_config.use_rms_norm is {use_rms_norm!r} (expected true or false)")
    linear_norm_eps = None
    if use_rms_norm:
        eps = qc.get("rms_norm_eps")
        linear_norm_eps = _positive_float("quantization_config.rms_norm_eps", 1e-6 if eps is None else eps)
    # The output head is never quantized, so naming it changes nothing; anything else would.
    skipped = qc.get("modules_to_not_convert") or []
    if not isinstance(skipped, list) or any(not isinstance(m, str) or m.split(".")[-1] != "lm_head" for m in skipped):
        raise ConversionError(
            f"config.json: quantization_config.modules_to_not_convert is {skipped!r} (expected none besides 'lm_head')"
        )
    return Linears(packed=mode == "offline", weight_scale="divide" if linear_class == "bitlinear" else "multiply",
                   linear_norm_eps=linear_norm_eps)


def _rope_theta(config: dict, default: float) -> float:
    scaling = config.get("rope_scaling")
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if rope_type != "default":
            raise ConversionError(f"config.json: rope_scaling.rope_type is {rope_type!r} (expected 'default' or no rope_scaling)")
    params = config.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ConversionError(f"config.json: rope_parameters is {params!r} (expected an object)")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ConversionError(f"config.json: rope_parameters.rope_type is {rope_type!r} (expected 'default')")
        if "rope_theta" in params:
            return _positive_float("rope_parameters.rope_theta", params["rope_theta"])
    return _positive_float("rope_theta", config.get("rope_theta", default))


def read_config(config: dict) -> tuple[Family, Hyperparameters, Linears]:
    """Check config.json and collect what the runtime needs; refuse anything it cannot run."""
    family = family_of(config)
    linears = _linears(config, family)
    act = config.get("hidden_act", family.hidden_act)
    if act not in _HF_ACTIVATIONS:
        raise ConversionError(f"config.json: hidden_act {act!r} is not supported (expected one of {sorted(_HF_ACTIVATIONS)})")
    _false(config, "attention_bias", "the format has no biases")
    _false(config, "mlp_bias", "the format has no biases")
    hidden = _positive_int(config, "hidden_size")
    n_heads = _positive_int(config, "num_attention_heads")
    n_kv_heads = _positive_int(config, "num_key_value_heads", n_heads)
    head_dim = _positive_int(config, "head_dim", hidden // n_heads if hidden % n_heads == 0 else None)
    if head_dim % 2:
        raise ConversionError(f"config.json: head_dim {head_dim} is odd (expected an even head_dim: RoPE rotates pairs)")
    if family.sub_norms is not None and n_heads * head_dim != hidden:
        # the attention sub-norm has hidden_size weights and normalizes the n_heads * head_dim outputs
        raise ConversionError(
            f"config.json: head_dim {head_dim} with {n_heads} heads does not fit hidden_size {hidden} "
            "(expected num_attention_heads * head_dim == hidden_size, as the attention sub-norm needs)"
        )
    if n_heads % n_kv_heads:
        raise ConversionError(f"config.json: num_key_value_heads {n_kv_heads} does not divide num_attention_heads {n_heads}")
    tied = config.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ConversionError(f"config.json: tie_word_embeddings is {tied!r} (expected true or false)")
    hp = Hyperparameters(
        vocab_size=_positive_int(config, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_positive_int(config, "intermediate_size"),
        n_layers=_positive_int(config, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        context_length=_positive_int(config, "max_position_embeddings", family.context_length),
        rms_norm_eps=_positive_float("rms_norm_eps", config.get("rms_norm_eps", family.rms_norm_eps)),
        rope_theta=_rope_theta(config, family.rope_theta),
        hidden_act=_HF_ACTIVATIONS[act],
        tied_embeddings=tied,
        sub_norms=family.sub_norms is not None,
        linear_norm_eps=linears.linear_norm_eps,
        weight_scale=linears.weight_scale,
    )
    return family, hp, linears
