"""GGUF files of the test checkpoints, written with llama.cpp's own `gguf` package.

`write_gguf` lays a packed checkpoint (tests/checkpoints.py) out as microsoft's 2B-4T GGUF is laid out:
llama.cpp tensor names, hyperparameters under `<arch>.*`, the gpt2-style vocabulary from tokenizer.json
(no tokenizer.ggml.pre, as in microsoft's file), the chat template microsoft's converter writes. The
linears are written in the GGUF type asked for:
- I2_S by hand, as bitnet.cpp lays it out (the `gguf` package has no such type): codes 0/1/2 for
  -1/0/+1 in 128-weight blocks of 32 bytes (byte j: weight j in bits 7:6, j+32 in 5:4, j+64 in 3:2,
  j+96 in 1:0), then the f32 scale, the tensor taking n/4 + 32 bytes;
- TQ1_0 / TQ2_0 with gguf.quants.quantize of ternary * scale (one fp16 scale per 256-weight block);
- F16 / BF16 / F32 as the values ternary * scale.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bitnet_run.convert.checkpoint import Checkpoint
from bitnet_run.convert.quantize import absmean_ternary, unpack_transformers_ternary

I2_S = 36
MICROSOFT_TEMPLATE = (  # what bitnet.cpp's convert-ms-to-gguf-bitnet.py writes into its files
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ 'Human: ' + message['content'] + '\\n\\nBITNETAssistant: ' + eos_token }}{% elif message['role'] == "
    "'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.attn_sub_norm": "attn_sub_norm", "mlp.ffn_sub_norm": "ffn_sub_norm",
          "self_attn.inner_attn_ln": "attn_sub_norm", "mlp.ffn_layernorm": "ffn_sub_norm",  # 1bitLLM's names
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}


def llama_cpp_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    return f"blk.{parts[2]}.{_LAYER['.'.join(parts[3:-1])]}.weight"


def i2s_bytes(ternary: np.ndarray, scale: float) -> np.ndarray:
    codes = (ternary.reshape(-1, 4, 32) + 1).astype(np.uint8)  # [block, group of 32, j]
    packed = (codes[:, 0] << 6) | (codes[:, 1] << 4) | (codes[:, 2] << 2) | codes[:, 3]
    tail = np.zeros(32, dtype=np.uint8)
    tail[:4] = np.array([scale], dtype="<f4").view(np.uint8)
    return np.concatenate([packed.reshape(-1), tail])


def vocabulary(tokenizer_json: str) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges 'a b') of a byte-level BPE tokenizer.json, as llama.cpp's
    converter writes them: added special tokens are CONTROL (3), the rest NORMAL (1)."""
    tok = json.loads(tokenizer_json)
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    types = {i: 1 for i in by_id}
    for added in tok["added_tokens"]:
        by_id[added["id"]] = added["content"]
        types[added["id"]] = 3 if added["special"] else 4
    n = max(by_id) + 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return [by_id[i] for i in range(n)], [types[i] for i in range(n)], merges


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows for its interleaved RoPE (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_vocabulary(w, tokenizer_json: str, pre: str | None) -> None:
    """The gpt2-style tokenizer.ggml.* keys of a tokenizer.json (no tokenizer.ggml.pre when pre is None)."""
    tokens, types, merges = vocabulary(tokenizer_json)
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)


def write_gguf(checkpoint_dir: Path, path: Path, linear_type: str = "I2_S", embedding_type: str = "F16",
               arch: str = "bitnet-b1.58", pre: str | None = None, chat_template: str = MICROSOFT_TEMPLATE,
               edit=None, separate_scales: bool = False) -> Path:
    """A checkpoint at checkpoint_dir as a GGUF file. Packed linears keep their codes and scale; float
    (latent) ones are ternarized with absmean as llama.cpp's converter does for 1bitLLM. For
    arch="llama" the Q/K rows are permuted as llama.cpp's converter does. `edit(name, values)` may
    change a linear's float values (ternary * scale) before they are encoded, to make bad files.
    separate_scales: linears hold +-1/0 and a one-value `<name>.scale` tensor the scale (llama.cpp's
    optional bitnet scales)."""
    import gguf
    from gguf.quants import quantize

    ckpt = Checkpoint(checkpoint_dir)
    config = ckpt.config
    Q = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(path, arch)
    H, heads = config["hidden_size"], config["num_attention_heads"]
    w.add_name("tiny")
    w.add_vocab_size(config["vocab_size"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(H)
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_rope_dimension_count(H // heads)
    w.add_head_count(heads)
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    add_vocabulary(w, (checkpoint_dir / "tokenizer.json").read_text(), pre)
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    w.add_add_bos_token(True)
    w.add_chat_template(chat_template)

    planned = []  # (gguf name, data)
    for name in ckpt.tensors:
        if name.endswith(".weight_scale"):
            continue
        gname = llama_cpp_name(name)
        if name.removesuffix(".weight").endswith(("proj",)):
            if ckpt.tensors[name].dtype == "U8":
                ternary = unpack_transformers_ternary(ckpt.load(name))
                scale = float(ckpt.load_float32(name.removesuffix(".weight") + ".weight_scale")[0])
            else:
                ternary, scale = absmean_ternary(ckpt.load_float32(name))
            if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
                ternary = permute(ternary, heads)
            if separate_scales:
                scale_data = np.array([scale], dtype="<f4")
                w.add_tensor_info(gname.removesuffix(".weight") + ".scale", (1,), np.dtype(np.float32), 4)
                planned.append(scale_data)
                scale = 1.0
            values = ternary.astype(np.float32) * np.float32(scale)
            if edit is not None:
                values = edit(gname, values)
            if linear_type == "I2_S":
                data = i2s_bytes(np.sign(values).astype(np.int8), float(np.abs(values).max()))
                w.add_tensor_info(gname, values.shape, np.dtype(np.float32), data.nbytes, raw_dtype=I2_S)
            elif linear_type in ("TQ1_0", "TQ2_0"):
                data = quantize(values, Q[linear_type])
                w.add_tensor_info(gname, data.shape, np.dtype(np.uint8), data.nbytes, raw_dtype=Q[linear_type])
            else:
                data = _float(values, linear_type)
                w.add_tensor_info(gname, values.shape, np.dtype(np.float32), data.nbytes, raw_dtype=Q[linear_type])
        else:
            values = ckpt.load_float32(name)
            data = _float(values, embedding_type if "embed" in name or "lm_head" in name else "F32")
            kind = embedding_type if "embed" in name or "lm_head" in name else "F32"
            w.add_tensor_info(gname, values.shape, np.dtype(np.float32), data.nbytes, raw_dtype=Q[kind])
        planned.append(data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for data in planned:
        w.write_tensor_data(data)
    w.close()
    return path


def _float(values: np.ndarray, type_name: str) -> np.ndarray:
    if type_name == "F32":
        return values.astype("<f4")
    if type_name == "F16":
        return values.astype("<f2")
    bits = values.astype("<f4").view(np.uint32)  # BF16: values here are bf16-exact, so truncation is exact
    return (bits >> 16).astype("<u2")
