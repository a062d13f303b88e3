"""Tiny random checkpoints in both released BitNet b1.58 formats, and the transformers reference.

- master (like microsoft/bitnet-b1.58-2B-4T-bf16): bf16 weights, quantization_mode "online";
- packed (like microsoft/bitnet-b1.58-2B-4T): linears quantized the transformers way and packed with
  transformers' pack_weights into uint8 [out/4, in] plus a `weight_scale` of shape [1], "offline".

Both come with a real byte-level BPE tokenizer (Llama 3 style specials, trained once per process)
and a chat template in the 2B-4T "User: ...<|eot_id|>Assistant: " style.
"""
from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '<|eot_id|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + '<|eot_id|>' }}"
    "{% elif message['role'] == 'system' %}{{ 'System: ' + message['content'] + '<|eot_id|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
TOKENIZER_MERGES_VOCAB = 360  # 256 byte tokens + merges; the 3 specials come after
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_WORDS = (
    "the a one two small large model token user assistant system hello world how are you today "
    "what is this that ternary weight bit net runs fast on a cpu with only a few cores and little "
    "memory it reads the file once maps every tensor and writes text back to the screen quickly "
    "once upon a time there was a little cat who liked to sleep in the sun by the river every day "
    "she walked to the market bought bread and milk then came home to read a good book"
).split()


# --------------------------------------------------------------------------- tokenizer


def _training_text() -> list[str]:
    """A few KB of deterministic pseudo-English, chat markers included, for BPE training."""
    rng = random.Random(0)
    lines = []
    for i in range(120):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12)))
        lines.append(f"{'User' if i % 2 else 'Assistant'}: {words.capitalize()}{rng.choice('.?!,')}")
    return lines


@functools.lru_cache(maxsize=None)
def tokenizer_json() -> str:
    """The tokenizer.json text: byte-level BPE with the Llama 3 pre-tokenizer and BOS post-processor."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    llama3_split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(llama3_split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_MERGES_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(_training_text(), trainer)
    tokenizer.add_special_tokens([BOS, EOS, EOT])
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]),
    ])
    return tokenizer.to_str()


def special_ids() -> dict[str, int]:
    added = json.loads(tokenizer_json())["added_tokens"]
    return {t["content"]: t["id"] for t in added}


def write_tokenizer_files(directory: Path, max_pos: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    tokenizer_config = {
        "bos_token": BOS,
        "eos_token": EOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "model_max_length": max_pos,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


# --------------------------------------------------------------------------- configs and weights


def make_config(
    vocab: int = 384,
    hidden: int = 128,
    intermediate: int = 344,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tied: bool = True,
    max_pos: int = 256,
    rope_theta: float = 500000.0,
    arch: str = "bitnet",
    head_dim: int | None = None,
) -> dict:
    """config.json of a tiny BitNetForCausalLM, or with arch="llama" of a LlamaForCausalLM (Falcon3 /
    Llama3-8B-1.58 style: SiLU, no sub-norms, head_dim from the config); the writers add
    quantization_config."""
    ids = special_ids()
    if vocab <= max(ids.values()):
        raise ValueError(f"vocab {vocab} is smaller than the tokenizer's {max(ids.values()) + 1} tokens")
    return {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "relu2",
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "dtype": "bfloat16",
    } | ({"head_dim": head_dim} if head_dim else {}) | ({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "mlp_bias": False,
    } if arch == "llama" else {})


def _quantization_config(mode: str) -> dict:
    return {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": mode}


SUB_NORMS = ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm")


def master_weights(config: dict, seed: int, sub_norms: tuple[str, str] | None = SUB_NORMS,
                   linear_norms: bool = False) -> dict[str, torch.Tensor]:
    """Random bf16 master weights that make a non-degenerate model: linear weights N(0, 1/in) keep
    BitLinear outputs O(1), norms are 1 + noise, embeddings give logits of a few units. sub_norms: the
    checkpoint's names of the attention and FFN sub-norms (None: a layout without them); linear_norms:
    a `<proj>.rms_norm.weight` per BitLinear (quantization_config use_rms_norm)."""
    rng = np.random.default_rng(seed)
    H, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    D = config.get("head_dim") or H // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * D, config["num_key_value_heads"] * D

    def normal(shape, std):
        return torch.from_numpy(rng.normal(0.0, std, shape).astype(np.float32)).bfloat16()

    def norm(size):
        return torch.from_numpy((1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32)).bfloat16()

    shapes = {"self_attn.q_proj": (q, H), "self_attn.k_proj": (kv, H), "self_attn.v_proj": (kv, H),
              "self_attn.o_proj": (H, q), "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}
    tensors = {"model.embed_tokens.weight": normal((V, H), 2.0 / np.sqrt(H)), "model.norm.weight": norm(H)}
    if not config["tie_word_embeddings"]:
        tensors["lm_head.weight"] = normal((V, H), 2.0 / np.sqrt(H))
    for i in range(config["num_hidden_layers"]):
        L = f"model.layers.{i}"
        tensors[f"{L}.input_layernorm.weight"] = norm(H)
        tensors[f"{L}.post_attention_layernorm.weight"] = norm(H)
        if sub_norms is not None:
            tensors[f"{L}.{sub_norms[0]}.weight"] = norm(q)
            tensors[f"{L}.{sub_norms[1]}.weight"] = norm(I)
        for proj in PROJECTIONS:
            out_features, in_features = shapes[proj]
            tensors[f"{L}.{proj}.weight"] = normal((out_features, in_features), 1.0 / np.sqrt(in_features))
            if linear_norms:
                tensors[f"{L}.{proj}.rms_norm.weight"] = norm(in_features)
    return tensors


def _write(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    write_tokenizer_files(directory, config["max_position_embeddings"])
    return directory


def write_master_checkpoint(directory: Path, config: dict, seed: int) -> Path:
    """A -bf16 style checkpoint: bf16 master weights, quantized by transformers at each forward."""
    config = {**config, "quantization_config": _quantization_config("online")}
    return _write(directory, config, master_weights(config, seed))


def quantize_like_transformers(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ternary int8 [out, in], float32 scale [1]) from transformers' own WeightQuant, run eagerly.

    WeightQuant returns w / g in float32; w is its sign and, for w = +-1, its magnitude is the scale
    1/g exactly, which is what the packed format stores as weight_scale."""
    from transformers.integrations.bitnet import WeightQuant

    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        dequantized = WeightQuant.apply(weight.float())
    return torch.sign(dequantized).to(torch.int8), dequantized.abs().max().reshape(1)


def packed_tensors(master: dict[str, torch.Tensor], scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from transformers.integrations.bitnet import pack_weights

    packed = {}
    for name, tensor in master.items():
        if name.removesuffix(".weight").endswith(PROJECTIONS):
            ternary, scale = quantize_like_transformers(tensor)
            packed[name] = pack_weights(ternary.clone())  # pack_weights adds 1 in place
            packed[name.removesuffix(".weight") + ".weight_scale"] = scale.to(scale_dtype)
        else:
            packed[name] = tensor
    return packed


def write_packed_checkpoint(directory: Path, config: dict, seed: int, scale_dtype: torch.dtype = torch.bfloat16) -> Path:
    """A 2B-4T style checkpoint: uint8 packed linears + weight_scale (bf16 like the release)."""
    config = {**config, "quantization_config": _quantization_config("offline")}
    return _write(directory, config, packed_tensors(master_weights(config, seed), scale_dtype))


def packed_from_master(master_dir: Path, out_dir: Path, scale_dtype: torch.dtype = torch.bfloat16) -> Path:
    """The packed checkpoint of the same weights as a master checkpoint."""
    master_dir = Path(master_dir)
    config = json.loads((master_dir / "config.json").read_text())
    config["quantization_config"] = _quantization_config("offline")
    return _write(out_dir, config, packed_tensors(load_file(master_dir / "model.safetensors"), scale_dtype))


def shard_checkpoint(src_dir: Path, out_dir: Path, shards: int = 3) -> Path:
    """The same checkpoint split into `shards` safetensors files with a model.safetensors.index.json."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for side_file in src_dir.iterdir():
        if side_file.suffix == ".json":
            (out_dir / side_file.name).write_bytes(side_file.read_bytes())
    tensors = load_file(src_dir / "model.safetensors")
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, out_dir / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out_dir


# --------------------------------------------------------------------------- reference


def load_reference(directory: Path):
    """transformers' BitNetForCausalLM on the checkpoint, every float parameter/buffer in float32.

    Quantized models refuse model.float(), and norms/embeddings keep their stored dtype otherwise."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
        raise AssertionError(f"{directory}: checkpoint does not match {model.config.architectures}: {info}")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.float()
    return model.eval()


# --------------------------------------------------------------------------- Llama-architecture BitLinear checkpoints


def _llama_quantization_config(packed: bool, use_rms_norm: bool) -> dict:
    # packed: transformers' BitLinear (weight_scale divides); master: AutoBitLinear online (absmean)
    qc = {"quant_method": "bitnet", "linear_class": "bitlinear" if packed else "autobitlinear",
          "quantization_mode": "offline" if packed else "online", "modules_to_not_convert": ["lm_head"]}
    if use_rms_norm:
        qc.update(use_rms_norm=True, rms_norm_eps=1e-5)
    return qc


def write_llama_checkpoint(directory: Path, config: dict, seed: int, packed: bool, use_rms_norm: bool) -> Path:
    """A Llama-architecture BitLinear checkpoint: packed uint8 linears with an inverted weight_scale
    (Falcon3-1.58bit / Llama3-8B-1.58 style), or bf16 master weights quantized online."""
    config = {**config, "quantization_config": _llama_quantization_config(packed, use_rms_norm)}
    tensors = master_weights(config, seed, sub_norms=None, linear_norms=use_rms_norm)
    if packed:
        tensors = packed_tensors(tensors, torch.bfloat16)
        for name in [n for n in tensors if n.endswith(".weight_scale")]:
            tensors[name] = (1.0 / tensors[name].float()).bfloat16()  # bitlinear divides by it
    return _write(directory, config, tensors)


def _quantized_head(weight: np.ndarray, encoding: int) -> tuple[np.ndarray, np.ndarray]:
    """(integer weights q * block scale [rows, cols], row scale [rows]) of an integer head encoding of
    docs/format.md: Q8_R (no block scales), Q6_B or Q4_B."""
    from bitnet_run import fileformat as ff

    if encoding == ff.ENCODING_Q8R:
        q, scale = ff.quantize_q8r(weight)
        return q.astype(np.int32), scale
    q, block_scale, scale = ff.quantize_qb(weight, encoding)
    per_column = np.repeat(block_scale.astype(np.int32), ff.QB_BLOCK, axis=1)
    return (q.astype(np.int32) * per_column)[:, : weight.shape[1]], scale


class QuantHead(torch.nn.Module):
    """The integer output heads of docs/format.md in torch (Q8_R, Q6_B, Q4_B), for a reference model
    converted with --head q8|q6|q4: the weights quantized as the converter does, the input absmax int8
    per token ([-127, 127]), exact integer dot products (the block scales folded into the integer
    weights: the same integer as the sum of scaled block dots), then (dot / s) * scale in float32."""

    def __init__(self, weight: torch.Tensor, encoding: int):
        super().__init__()
        q, scale = _quantized_head(weight.detach().float().numpy(), encoding)
        self.q = torch.from_numpy(q.astype(np.float64))
        self.scale = torch.from_numpy(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        xq = (x * s).round().clamp(-127, 127)
        dot = (xq.double() @ self.q.T).float()  # exact: |dot| < 2^53
        return (dot / s) * self.scale


def use_quant_head(model, encoding: int) -> None:
    """Gives a transformers model the integer head (encoding Q8_R, Q6_B or Q4_B) of its output weights;
    a tied embedding becomes the dequantized rows too, (float)(q * block scale) * scale (what the
    runtime's embedding lookup reads)."""
    weight = model.lm_head.weight
    head = QuantHead(weight, encoding)
    if model.config.tie_word_embeddings:
        q, scale = _quantized_head(weight.detach().float().numpy(), encoding)
        model.model.embed_tokens.weight = torch.nn.Parameter(torch.from_numpy(q.astype(np.float32) * scale[:, None]))
    model.lm_head = head


# --------------------------------------------------------------------------- 1bitLLM bitnet_b1_58 checkpoints

ONEBIT_SUB_NORMS = ("self_attn.inner_attn_ln", "mlp.ffn_layernorm")


def sentencepiece_model(directory: Path, vocab_size: int = 400) -> Path:
    """A small sentencepiece BPE model like Llama's (byte fallback, identity normalization, <unk> <s> </s>
    = 0 1 2), trained on the same text as the BPE tokenizer above."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    text = directory / "spm-train.txt"
    text.write_text("\n".join(_training_text()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(directory / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, minloglevel=2,
    )
    text.unlink()
    (directory / "tokenizer.vocab").unlink()
    return directory / "tokenizer.model"


def write_1bitllm_checkpoint(directory: Path, hidden: int, intermediate: int, heads: int, kv_heads: int, tied: bool,
                             seed: int, layers: int = 2, vocab: int = 402) -> Path:
    """A tiny 1bitLLM/bitnet_b1_58-style checkpoint: BitnetForCausalLM (model_type llama), fp16 latent
    weights, sub-norms self_attn.inner_attn_ln [H] and mlp.ffn_layernorm [I], SiLU, a sentencepiece
    tokenizer.model (no tokenizer.json), vocab 2 larger than the tokenizer as 32002 is."""
    directory = Path(directory)
    config = {
        "architectures": ["BitnetForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "hidden_act": "silu", "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": tied,
        "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32000 % vocab,
        "torch_dtype": "float16", "weight_bits": 1, "input_bits": 8,
    }
    tensors = {n: t.half() for n, t in master_weights(config, seed, ONEBIT_SUB_NORMS).items()}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    sentencepiece_model(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>",
                                                                 "eos_token": "</s>", "unk_token": "<unk>"}))
    return directory


class OneBitReference:
    """An independent float32 forward pass of 1bitLLM's BitnetForCausalLM, written from its published
    description (transformers has no class for it): Llama decoder, RMSNorm x / sqrt(mean(x^2) + eps) * w,
    RoPE rotate_half with theta, GQA; BitLinear = weights ternarized per tensor with absmean
    (w = clamp(round(W / mean|W|), -1, 1) * mean|W|) and inputs per token with absmax to int8
    (x_q = clamp(round(x * 127 / max|x|), -128, 127) * max|x| / 127); the attention output normed by
    self_attn.inner_attn_ln before o_proj; FFN down_proj(ffn_layernorm(silu(gate(n)) * up(n)))."""

    def __init__(self, directory: Path):
        self.config = json.loads((Path(directory) / "config.json").read_text())
        self.w = {n: t.float().numpy() for n, t in load_file(Path(directory) / "model.safetensors").items()}

    def rmsnorm(self, x, weight):
        x = x.astype(np.float32)
        return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(self.config["rms_norm_eps"]))) * weight

    def bitlinear(self, name: str, x: np.ndarray) -> np.ndarray:
        W = self.w[name]
        scale = np.float32(1.0) / np.maximum(np.mean(np.abs(W), dtype=np.float32), np.float32(1e-5))
        wq = np.clip(np.rint(W * scale), -1, 1)
        s = np.float32(127.0) / np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(1e-5))
        xq = np.clip(np.rint(x * s), -128, 127)
        return ((xq.astype(np.float64) @ wq.T.astype(np.float64)) / s.astype(np.float64) / scale).astype(np.float32)

    def logits(self, ids: list[int]) -> np.ndarray:
        c = self.config
        H, nh, nkv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        D, T = H // nh, len(ids)
        inv = (np.float32(1.0) / np.float32(c["rope_theta"]) ** (np.arange(0, D, 2, dtype=np.float32) / np.float32(D)))
        ang = np.arange(T, dtype=np.float32)[:, None] * inv[None, :]
        cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

        def rope(v):  # [T, heads, D]
            rot = np.concatenate([-v[..., D // 2:], v[..., : D // 2]], -1)
            return v * cos[:, None, :] + rot * sin[:, None, :]

        x = self.w["model.embed_tokens.weight"][ids]
        mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
        for i in range(c["num_hidden_layers"]):
            L = f"model.layers.{i}"
            n = self.rmsnorm(x, self.w[f"{L}.input_layernorm.weight"])
            q = rope(self.bitlinear(f"{L}.self_attn.q_proj.weight", n).reshape(T, nh, D))
            k = rope(self.bitlinear(f"{L}.self_attn.k_proj.weight", n).reshape(T, nkv, D))
            v = self.bitlinear(f"{L}.self_attn.v_proj.weight", n).reshape(T, nkv, D)
            k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
            att = np.einsum("thd,shd->hts", q, k) / np.float32(np.sqrt(D)) + mask
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            a = np.einsum("hts,shd->thd", att, v).reshape(T, H)
            a = self.rmsnorm(a, self.w[f"{L}.self_attn.inner_attn_ln.weight"])
            x = x + self.bitlinear(f"{L}.self_attn.o_proj.weight", a)
            n = self.rmsnorm(x, self.w[f"{L}.post_attention_layernorm.weight"])
            g = self.bitlinear(f"{L}.mlp.gate_proj.weight", n)
            g = g / (1 + np.exp(-g)) * self.bitlinear(f"{L}.mlp.up_proj.weight", n)
            x = x + self.bitlinear(f"{L}.mlp.down_proj.weight", self.rmsnorm(g, self.w[f"{L}.mlp.ffn_layernorm.weight"]))
        head = self.w["model.embed_tokens.weight" if c["tie_word_embeddings"] else "lm_head.weight"]
        return self.rmsnorm(x, self.w["model.norm.weight"]) @ head.T
