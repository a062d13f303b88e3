"""Tokenizer metadata: tokenizer.json text, chat template, bos/eos/stop ids, add_bos."""
from __future__ import annotations

import json

from bitnet_run import fileformat as ff

from .checkpoint import Checkpoint
from .errors import ConversionError
from .sentencepiece import tokenizer_json_from_model

# Llama 3 ends a chat turn with this token rather than the config's eos; generation stops on both.
END_OF_TURN = "<|eot_id|>"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SENTENCEPIECE_FILE = "tokenizer.model"


def _token_ids(tokenizer: dict) -> dict[str, int]:
    """Token text -> id over the model vocabulary and the added (special) tokens."""
    vocab = (tokenizer.get("model") or {}).get("vocab")
    ids = dict(vocab) if isinstance(vocab, dict) else {}
    for token in tokenizer.get("added_tokens") or []:
        if isinstance(token, dict) and isinstance(token.get("content"), str) and isinstance(token.get("id"), int):
            ids[token["content"]] = token["id"]
    return ids


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(source: str, key: str, value) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ConversionError(f"{source}: {key} is {value!r} (expected a token id or a list of token ids)")
    return values


def _chat_template(checkpoint: Checkpoint, tokenizer_config: dict) -> str:
    # transformers saves the template as its own file nowadays and prefers it when both exist.
    template = checkpoint.read_text(CHAT_TEMPLATE_FILE)
    if template is not None:
        return template
    template = tokenizer_config.get("chat_template")
    if template is None:
        return ""
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        raise ConversionError(
            f"tokenizer_config.json: chat_template is {type(template).__name__} (expected a string or a 'default' named template)"
        )
    return template


def _special_id(config: dict, tokenizer_config: dict, ids: dict[str, int], kind: str) -> list[int]:
    """bos/eos ids from config.json, else from the token tokenizer_config.json names."""
    from_config = _id_list("config.json", f"{kind}_token_id", config.get(f"{kind}_token_id"))
    if from_config:
        return from_config
    text = _token_text(tokenizer_config.get(f"{kind}_token"))
    if text is None:
        return []
    if text not in ids:
        raise ConversionError(f"tokenizer_config.json: {kind}_token {text!r} is not a token of tokenizer.json")
    return [ids[text]]


def add_tokenizer_metadata(writer: ff.Writer, checkpoint: Checkpoint, vocab_size: int) -> None:
    tokenizer_config = checkpoint.read_json("tokenizer_config.json") or {}
    text = checkpoint.read_text("tokenizer.json")
    if text is None and checkpoint.path(SENTENCEPIECE_FILE).is_file():
        # Llama 1/2 style checkpoints (1bitLLM) ship only the sentencepiece model
        text = tokenizer_json_from_model(checkpoint.path(SENTENCEPIECE_FILE).read_bytes(),
                                         add_bos=tokenizer_config.get("add_bos_token", True) is True)
    if text is None:
        raise ConversionError(
            f"tokenizer.json: not found in {checkpoint.directory} (expected a Hugging Face fast tokenizer or a "
            f"sentencepiece {SENTENCEPIECE_FILE})"
        )
    try:
        tokenizer = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConversionError(f"tokenizer.json: not valid JSON ({e})") from None
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("model"), dict):
        raise ConversionError("tokenizer.json: no 'model' object (expected a Hugging Face tokenizers file)")
    ids = _token_ids(tokenizer)
    generation_config = checkpoint.read_json("generation_config.json") or {}

    bos = _special_id(checkpoint.config, tokenizer_config, ids, "bos")
    eos = _special_id(checkpoint.config, tokenizer_config, ids, "eos")
    if not eos:
        raise ConversionError("config.json: eos_token_id is missing and tokenizer_config.json names no eos_token")
    stop_ids = eos + _id_list("generation_config.json", "eos_token_id", generation_config.get("eos_token_id"))
    if END_OF_TURN in ids:
        stop_ids.append(ids[END_OF_TURN])
    stop_ids = list(dict.fromkeys(stop_ids))  # unique, first occurrence order
    for token_id in bos[:1] + stop_ids:
        if token_id >= vocab_size:
            raise ConversionError(f"config.json: special token id {token_id} is outside the vocabulary of {vocab_size}")

    add_bos = tokenizer_config.get("add_bos_token", bool(bos))
    if not isinstance(add_bos, bool):
        raise ConversionError(f"tokenizer_config.json: add_bos_token is {add_bos!r} (expected true or false)")
    if add_bos and not bos:
        raise ConversionError("tokenizer_config.json: add_bos_token is true but no bos token is defined")

    writer.add_string("tokenizer.json", text)
    writer.add_string("tokenizer.chat_template", _chat_template(checkpoint, tokenizer_config))
    # -1: the checkpoint has no bos token (add_bos is then 0).
    writer.add_i32("tokenizer.bos_id", bos[0] if bos else -1)
    writer.add_i32("tokenizer.eos_id", eos[0])
    writer.add_i32_array("tokenizer.stop_ids", stop_ids)
    writer.add_u32("tokenizer.add_bos", int(add_bos))
