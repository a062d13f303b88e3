"""Text <-> token ids with the tokenizer.json and chat template stored in the model file.

Chat tokenization (`TextCodec.encode_chat`): the template is rendered once with every message's
content replaced by a placeholder, which splits the rendered text into template pieces and message
contents. Special-token text is recognised only in the template pieces; contents are tokenized with
special-token parsing off, so a user typing `<|eot_id|>` gets the characters, not the end of turn.
Text between special tokens is tokenized jointly (contents merge with the template text around them,
exactly as the tokenizer does on the whole string), with one cut: at the start of each assistant
message's content, where generation started. The tokens of a chat's earlier turns are then a prefix of
the next turn's (the generation prompt is tokenized alone in both), which is what lets a chat reuse its
cache; for a conversation without earlier assistant turns the ids equal transformers'
`apply_chat_template(..., tokenize=True)` whenever the contents hold no special-token text.
"""
from __future__ import annotations

import re
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
        # A second instance that reads special-token text as ordinary characters (message contents);
        # a separate object because the flag is per tokenizer and the codec is shared across threads.
        self._literal = Tokenizer.from_str(tokenizer_json)
        self._literal.encode_special_tokens = True
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        specials = {t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        self._special_ids = specials
        # longest first, so that a special token that is a prefix of another never wins
        self._special_re = (
            re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))) if specials else None
        )
        self._template = None
        if chat_template:
            # The same environment transformers renders chat templates in.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            self._template = env.from_string(chat_template)

    def encode(self, text: str, add_bos: bool = True, parse_special: bool = True) -> list[int]:
        """parse_special=False reads special-token text (e.g. `<|eot_id|>`) as ordinary characters."""
        tokenizer = self.tokenizer if parse_special else self._literal
        ids = tokenizer.encode(text, add_special_tokens=False).ids
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

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The ids of the rendered chat: special tokens only from the template (see the module doc)."""
        ids: list[int] = []
        run: list[str] = []  # ordinary text tokenized together, up to the next special token or cut

        def flush() -> None:
            if run:
                ids.extend(self._literal.encode("".join(run), add_special_tokens=False).ids)
                run.clear()

        for text, kind in self._chat_pieces(messages, add_generation_prompt):
            if kind == "assistant":
                flush()
            if kind == "template" and self._special_re is not None:
                last = 0
                for match in self._special_re.finditer(text):
                    run.append(text[last : match.start()])
                    flush()
                    ids.append(self._special_ids[match.group()])
                    last = match.end()
                text = text[last:]
            run.append(text)
        flush()
        return ids

    def _chat_pieces(self, messages: list[dict], add_generation_prompt: bool) -> list[tuple[str, str]]:
        """The rendered chat as (text, kind) pieces in order, kind "template", "content" (a message's
        content) or "assistant" (an assistant message's content)."""
        rendered = self.render_chat(messages, add_generation_prompt)
        marks = {}  # placeholder -> index of the message it stands for
        stand_in = []
        for i, message in enumerate(messages):
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                mark = f"\ue000{i}\ue001"  # private-use characters, absent from templates
                marks[mark] = i
                message = {**message, "content": mark}
            stand_in.append(message)
        skeleton = re.split("(" + "|".join(map(re.escape, marks)) + ")", self.render_chat(stand_in, add_generation_prompt)) \
            if marks else [rendered]
        # A template may trim the contents (Llama 3's does): try them as given, then stripped.
        for transform in (lambda s: s, str.strip):
            pieces = []
            for j, text in enumerate(skeleton):
                if j % 2 == 0:
                    pieces.append((text, "template"))
                else:
                    message = messages[marks[text]]
                    kind = "assistant" if message.get("role") == "assistant" else "content"
                    pieces.append((transform(message["content"]), kind))
            if "".join(text for text, _ in pieces) == rendered:
                return pieces
        raise ValueError("the chat template changes message contents in a way that cannot be traced back "
                         "to the messages, so their special-token text cannot be kept literal")

    def token_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return self.tokenizer.id_to_token(token_id) or ""


class IncrementalDecoder:
    """Turns generated ids into text pieces one token at a time, never splitting a UTF-8 character: a
    token that ends inside one gives "" until the character is complete. O(1) per token: each step
    decodes only the ids since the last emitted piece plus the one before it (for the decoder's
    context, e.g. a word boundary), as tokenizers' DecodeStream does; unlike DecodeStream it can
    flush() the bytes of a character that never completed, so the pieces always join up to
    decode(all ids)."""

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self._ids: list[int] = []  # the ids from the start of the previous piece on
        self._read = 0  # ids[:read] are the previous piece's, already emitted
        self._before = ""  # decode(ids[:read])

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._emit(complete_only=True)

    def flush(self) -> str:
        """The text of ids still held back (an incomplete character, decoded with replacement marks)."""
        return self._emit(complete_only=False)

    def _emit(self, complete_only: bool) -> str:
        text = self.codec.decode(self._ids)
        if len(text) <= len(self._before) or (complete_only and text.endswith("\ufffd")):
            return ""
        piece = text[len(self._before) :]
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        # on its own (a decoder may drop e.g. a leading space at the start), as the next step sees it
        self._before = self.codec.decode(self._ids)
        return piece
