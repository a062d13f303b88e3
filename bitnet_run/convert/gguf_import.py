"""GGUF files in: convert_gguf turns a GGUF model into a .bnr file, tensor by tensor.

The GGUF architectures read (GGUF_ARCHITECTURES), each the GGUF form of a checkpoint family of arch.py:
- `bitnet-b1.58` (and `bitnet-25`, an older upload's name): microsoft's 2B-4T file, written by
  bitnet.cpp: I2_S linears, F16/F32 embedding and norms, tied head, relu2 implied by the architecture,
  Q/K rows left in Hugging Face order (bitnet.cpp's converter has the permutation commented out);
- `llama` with ternary linears: tiiuae's Falcon3 / Falcon-E 1.58-bit GGUFs (bitnet.cpp's
  convert-hf-to-gguf-bitnet.py): SiLU, no sub-norms, Q/K rows permuted for llama.cpp's interleaved RoPE
  (undone here), the divide-convention weight_scale already folded into the values (scale = 1/ws);
- `bitnet`: llama.cpp's own architecture, the 1bitLLM family: SiLU, sub-norms, NEOX RoPE (no
  permutation), an optional one-value `<tensor>.scale` multiplying a linear's output.
Linears may be I2_S, TQ1_0, TQ2_0, F16, BF16 or F32. Whatever the type, a linear must hold ternary
values times one scale per tensor (TQ blocks all with the same scale); anything else is refused with
one line naming the tensor.

The file is presented to the safetensors converter (tensors.add_tensors) as a packed checkpoint of its
family would be: each linear as transformers' packed uint8 codes plus a weight_scale that multiplies,
the norms and embedding as stored. So the checks, the tensor plan and the re-encoding (--weights,
--head) are the converter's, the ternary values and scales are kept exactly, and memory holds one
tensor at a time.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitnet_run import __version__
from bitnet_run import fileformat as ff
from . import arch
from .arch import gguf_name
from .checkpoint import TensorEntry, bf16_bits_to_float32
from .converter import check_encodings, write_model
from .errors import ConversionError
from .gguf_file import MAGIC, GGUFFile, GGUFTensor
from .gguf_tokenizer import read_tokenizer
from .quantize import pack_transformers_ternary
from .tensors import add_tensors
from .tokenizer import END_OF_TURN, add_tokenizer_keys


@dataclass(frozen=True)
class GGUFArchitecture:
    """How a GGUF architecture maps onto a checkpoint family of arch.py."""

    family: str  # arch.FAMILIES name
    hidden_act: str  # implied by the architecture (the files carry no activation key)
    permuted_qk: bool  # Q/K rows permuted for llama.cpp's interleaved-pair RoPE


GGUF_ARCHITECTURES = {
    "bitnet-b1.58": GGUFArchitecture("bitnet", "relu2", permuted_qk=False),
    "bitnet-25": GGUFArchitecture("bitnet", "relu2", permuted_qk=False),
    "llama": GGUFArchitecture("llama", "silu", permuted_qk=True),
    "bitnet": GGUFArchitecture("1bitllm", "silu", permuted_qk=False),
}
_FAMILIES = {f.name: f for f in arch.FAMILIES}
FLOAT_TYPES = ("F32", "F16", "BF16")  # also the safetensors dtype names the converter expects
# microsoft's GGUF carries a "Human: ...\n\nBITNETAssistant: " chat template that the model was not
# trained with; such a file gets the template of the model's own tokenizer_config.json instead.
KNOWN_WRONG_TEMPLATE = "BITNETAssistant"
BITNET_2B4T_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '<|eot_id|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + '<|eot_id|>' }}"
    "{% elif message['role'] == 'system' %}{{ 'System: ' + message['content'] + '<|eot_id|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def is_gguf_file(src: str | Path) -> bool:
    """A .gguf path, or any file that starts with the GGUF magic."""
    path = Path(src)
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


# --------------------------------------------------------------------------- ternary tensors


def _i2s_codes(data: np.ndarray, n: int) -> np.ndarray:
    """I2_S: blocks of 128 weights in 32 bytes, byte j holding weights j, j+32, j+64, j+96 in bits
    7:6, 5:4, 3:2, 1:0; codes 0/1/2 are -1/0/+1."""
    blocks = data[: n // 4].reshape(-1, 32)
    return np.stack([(blocks >> s) & 3 for s in (6, 4, 2, 0)], axis=1).reshape(-1).astype(np.int8) - 1


def _tq2_codes(data: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """TQ2_0 (ggml): 256-weight blocks of 64 code bytes + an f16 scale; weight 128*h + 32*l + m is in
    byte 32*h + m, bits 2l..2l+1, as code + 1."""
    blocks = data.reshape(-1, 66)
    qs = blocks[:, :64].reshape(-1, 2, 1, 32)
    codes = (qs >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
    return codes.reshape(-1).astype(np.int8) - 1, blocks[:, 64:66].copy().view("<f2").reshape(-1)


_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def _base3_digits(q: np.ndarray, n_digits: int) -> np.ndarray:
    """TQ1_0's digit extraction: digit k of byte q is ((q * 3**k mod 256) * 3) >> 8, for each k."""
    shifted = (q[..., None, :] * _POW3[:n_digits, None]).astype(np.uint8)  # wraps mod 256 as in ggml
    return ((shifted.astype(np.uint16) * 3) >> 8).astype(np.int8)


def _tq1_codes(data: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """TQ1_0 (ggml): 256-weight blocks of 48 + 4 bytes of base-3 digits (5 and 4 per byte) + an f16
    scale: weights 0..159 from bytes 0..31, 160..239 from bytes 32..47, 240..255 from the 4 qh bytes."""
    blocks = data.reshape(-1, 54)
    parts = [_base3_digits(blocks[:, :32], 5), _base3_digits(blocks[:, 32:48], 5), _base3_digits(blocks[:, 48:52], 4)]
    codes = np.concatenate([p.reshape(p.shape[0], -1) for p in parts], axis=1)
    return codes.reshape(-1) - 1, blocks[:, 52:54].copy().view("<f2").reshape(-1)


def _float_values(data: np.ndarray, type_name: str) -> np.ndarray:
    if type_name == "BF16":
        return bf16_bits_to_float32(data.view("<u2"))
    return data.view("<f4" if type_name == "F32" else "<f2").astype(np.float32)


def ternary_tensor(gf: GGUFFile, t: GGUFTensor) -> tuple[np.ndarray, float]:
    """(int8 [rows, cols] in -1..1, scale) of a ternary linear, whatever its GGUF type; one line naming
    the tensor when it is not ternary times one scale."""
    where = f"{gf.path}: tensor {t.name!r} ({t.type.name})"
    data, n = gf.data(t), t.count
    if t.type.name == "I2_S":
        codes = _i2s_codes(data, n)
        if np.any(codes == 2):
            raise ConversionError(f"{where} holds the invalid I2_S code 3 (expected codes 0..2)")
        scale = float(data[n // 4: n // 4 + 4].copy().view("<f4")[0])
    elif t.type.name in ("TQ1_0", "TQ2_0"):
        codes, block_scales = (_tq1_codes if t.type.name == "TQ1_0" else _tq2_codes)(data, n)
        if np.any(codes > 1):
            raise ConversionError(f"{where} holds a code above 2 (expected ternary codes 0..2)")
        blocks = codes.reshape(len(block_scales), -1)
        blocks[block_scales == 0] = 0  # a zero scale makes the whole block zero
        used = np.unique(block_scales[np.any(blocks != 0, axis=1)])
        if len(used) > 1:
            raise ConversionError(f"{where} has {len(used)} different block scales (e.g. {used[0]} and {used[-1]}); "
                                  "expected one scale for the whole tensor")
        scale = float(used[0]) if len(used) else 1.0
    else:
        values = _float_values(data, t.type.name)
        magnitude = np.abs(values)
        scale = float(magnitude.max()) if n else 0.0
        if not np.all((magnitude == 0) | (magnitude == scale)):
            odd = values[(magnitude != 0) & (magnitude != scale)][0]
            raise ConversionError(f"{where} is not ternary: it holds {odd} besides 0 and +-{scale} "
                                  "(expected ternary values times one scale)")
        codes = np.sign(values).astype(np.int8)
        scale = scale or 1.0
    if not np.isfinite(scale) or scale <= 0:
        raise ConversionError(f"{where} has the scale {scale} (expected a positive number)")
    return codes.reshape(t.shape), scale


# --------------------------------------------------------------------------- the file as a checkpoint


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (rows of each head reordered so that RoPE rotates adjacent
    pairs): GGUF row 2*i + j of a head is Hugging Face row j * head_dim/2 + i."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_config(gf: GGUFFile, name: str, vocab_tokens: int) -> dict:
    """The config.json of the Hugging Face checkpoint the GGUF's hyperparameters describe."""
    family = _FAMILIES[GGUF_ARCHITECTURES[name].family]

    def count(key: str, default: int | None = None) -> int | None:
        return gf.get(f"{name}.{key}", int, default=default, required=default is None)

    def number(key: str, default: float) -> float:
        return float(gf.get(f"{name}.{key}", (float, int), default=default))

    scaling = gf.get(f"{name}.rope.scaling.type", str, default="none")
    if scaling != "none":
        raise ConversionError(f"{gf.path}: {name}.rope.scaling.type is {scaling!r} (expected none)")
    hidden, heads = count("embedding_length"), count("attention.head_count")
    head_dim = count("attention.key_length", count("rope.dimension_count", hidden // heads))
    rotary = count("rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise ConversionError(f"{gf.path}: {name}.rope.dimension_count is {rotary}, not the head size {head_dim} "
                              "(partial rotary embeddings are not supported)")
    return {
        "model_type": family.model_type,
        "architectures": [family.architecture],
        # the GGUF scales multiply, whatever the checkpoint's convention was
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "offline"},
        "hidden_act": GGUF_ARCHITECTURES[name].hidden_act,
        "vocab_size": count("vocab_size", vocab_tokens),
        "hidden_size": hidden,
        "intermediate_size": count("feed_forward_length"),
        "num_hidden_layers": count("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": count("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": count("context_length"),
        "rms_norm_eps": number("attention.layer_norm_rms_epsilon", family.rms_norm_eps),
        "rope_theta": number("rope.freq_base", 10000.0),  # llama.cpp's default
        "tie_word_embeddings": "output.weight" not in gf.tensors,
    }


class GGUFCheckpoint:
    """A GGUF file with Checkpoint's interface (config, tensors, load, load_float32), in the packed
    form of its family: linears as transformers' packed uint8 [out/4, in] plus a multiplying
    `<proj>.weight_scale` of shape [1]; norms and embeddings as stored."""

    def __init__(self, gf: GGUFFile, name: str, vocab_tokens: int):
        self.gf = gf
        self.gguf_arch = GGUF_ARCHITECTURES[name]
        self.config = _hf_config(gf, name, vocab_tokens)
        try:
            self.family, self.hp, self.linears = arch.read_config(self.config)
        except ConversionError as e:
            raise ConversionError(f"{gf.path}: its {name}.* keys describe a model bitnet-run refuses: "
                                  f"{str(e).removeprefix('config.json: ')}") from None
        planned = {gguf_name(spec.name): spec for spec in arch.tensor_plan(self.hp)}
        # llama.cpp's `bitnet` may carry a one-value <tensor>.scale beside a linear
        scales = {n.removesuffix(".scale") + ".weight": t for n, t in gf.tensors.items() if n.endswith(".scale")}
        unexpected = sorted(set(gf.tensors) - set(planned) - {t.name for t in scales.values()})
        if unexpected:
            raise ConversionError(f"{gf.path}: unexpected tensor {unexpected[0]!r} (not part of the {name} architecture)")
        self.tensors: dict[str, TensorEntry] = {}
        self._linears: dict[str, tuple[GGUFTensor, str]] = {}  # weight / weight_scale name -> (GGUF tensor, role)
        self._names: dict[str, GGUFTensor] = {}
        for gname, t in gf.tensors.items():
            if gname not in planned:
                continue
            spec = planned[gname]
            source = self.family.checkpoint_name(spec.name)
            self._names[source] = t
            entry = TensorEntry(gf.path, t.type.name, t.shape, t.start, t.start + t.nbytes)
            if spec.kind == arch.LINEAR:
                rows, cols = t.shape
                scale_name = source.removesuffix(".weight") + ".weight_scale"
                self.tensors[source] = TensorEntry(gf.path, "U8", (rows // 4 if rows % 4 == 0 else rows, cols),
                                                   entry.start, entry.end)
                self.tensors[scale_name] = TensorEntry(gf.path, "F32", (1,), entry.start, entry.start)
                self._linears[source] = (t, "codes")
                self._linears[scale_name] = (t, "scale")
            elif t.type.name in FLOAT_TYPES:
                self.tensors[source] = entry
            else:
                raise ConversionError(f"{gf.path}: tensor {gname!r} is {t.type.name} (expected F32, F16 or BF16 "
                                      f"for a {spec.kind})")
        self._scales = scales
        self._last: tuple[str, tuple[np.ndarray, float]] | None = None

    def _ternary(self, name: str) -> tuple[np.ndarray, float]:
        t, _role = self._linears[name]
        if self._last is None or self._last[0] != t.name:  # weight then scale: decoded once
            codes, scale = ternary_tensor(self.gf, t)
            extra = self._scales.get(t.name)
            if extra is not None:
                if extra.count != 1 or extra.type.name not in FLOAT_TYPES:
                    raise ConversionError(f"{self.gf.path}: tensor {extra.name!r} is {extra.type.name} {list(extra.shape)} "
                                          "(expected one F32 value)")
                scale = float(np.float32(scale) * _float_values(self.gf.data(extra), extra.type.name)[0])
            if self.gguf_arch.permuted_qk and t.name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = self.hp.n_heads if t.name.endswith("attn_q.weight") else self.hp.n_kv_heads
                codes = _unpermute(codes, heads)
            self._last = (t.name, (codes, scale))
        return self._last[1]

    def load(self, name: str) -> np.ndarray:
        if name in self._linears:
            return pack_transformers_ternary(self._ternary(name)[0])
        t = self._names[name]
        return self.gf.data(t).view({"F32": "<f4", "F16": "<f2", "BF16": "<u2"}[t.type.name]).reshape(t.shape)

    def load_float32(self, name: str) -> np.ndarray:
        if name in self._linears:
            return np.array([self._ternary(name)[1]], dtype=np.float32)
        t = self._names[name]
        return _float_values(self.gf.data(t), t.type.name).reshape(t.shape)


# --------------------------------------------------------------------------- conversion


def convert_gguf(
    src: str | Path,
    out: str | Path,
    progress: Callable[[int, int, str], None] | None = None,
    weights: str = "i2",
    head: str | None = None,
    chat_template: str | None = None,
) -> Path:
    """Convert the GGUF file `src` into the model file `out` (as convert_checkpoint does a checkpoint:
    `weights` and `head` choose the encodings, `progress(done, total, name)` follows the tensors,
    nothing is left at `out` on failure). `chat_template` replaces the file's template. Raises
    ConversionError, one line, for a file it does not read."""
    check_encodings(weights, head)
    gf = GGUFFile(src)
    architecture = gf.get("general.architecture", str, required=True)
    if architecture not in GGUF_ARCHITECTURES:
        raise ConversionError(f"{gf.path}: general.architecture is {architecture!r}, which bitnet-run does not read "
                              f"(expected one of {', '.join(GGUF_ARCHITECTURES)})")
    tokenizer = read_tokenizer(gf)
    checkpoint = GGUFCheckpoint(gf, architecture, len(gf.metadata["tokenizer.ggml.tokens"]))
    if chat_template is None:
        chat_template = gf.get("tokenizer.chat_template", str, default="")
        if KNOWN_WRONG_TEMPLATE in chat_template:
            chat_template = BITNET_2B4T_CHAT_TEMPLATE
    name = gf.get("general.name", str, default=gf.path.stem)

    writer = ff.Writer()
    writer.add_string("general.architecture", arch.ARCHITECTURE)
    writer.add_string("general.name", name)
    writer.add_string("general.source", gf.path.name)
    writer.add_string("general.converter", f"bitnet-run {__version__}")
    arch.add_hyperparameters(writer, checkpoint.hp)
    end_of_turn = gf.metadata["tokenizer.ggml.tokens"].index(END_OF_TURN) \
        if END_OF_TURN in gf.metadata["tokenizer.ggml.tokens"] else None
    add_tokenizer_keys(writer, str(gf.path), checkpoint.hp.vocab_size, tokenizer.tokenizer_json, chat_template,
                       tokenizer.bos, tokenizer.stop_ids, tokenizer.add_bos, end_of_turn)
    add_tensors(writer, checkpoint, checkpoint.family, checkpoint.hp, checkpoint.linears, weights, head)
    return write_model(writer, out, name, progress)
