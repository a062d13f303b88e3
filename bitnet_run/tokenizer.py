"""Text <-> token ids with the tokenizer.json and chat template stored in the model file."""
from __future__ import annotations

from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class TextCodec:
    """The model's tokenizer (Hugging Face `tokenizers`) and its jinja chat template."""

    def __init__(self, tokenizer_json: str, chat_template: str, bos_id: int, eos_id: int, add_bos: bool):
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._template = None
        if chat_template:
            # The same environment transformers renders chat templates in.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            self._template = env.from_string(chat_template)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this model file has no chat template (tokenizer.chat_template is empty)")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.token_text(self.bos_id),
            eos_token=self.token_text(self.eos_id),
        )

    def token_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return self.tokenizer.id_to_token(token_id) or ""


class IncrementalDecoder:
    """Turns a growing list of generated ids into text pieces without splitting UTF-8 characters."""

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        piece = text[self.emitted :]
        self.emitted = len(text)
        return piece
