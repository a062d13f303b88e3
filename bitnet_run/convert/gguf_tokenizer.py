"""A GGUF file's tokenizer.ggml.* vocabulary rebuilt as a Hugging Face `tokenizers` tokenizer.

Two kinds, by tokenizer.ggml.model:
- "gpt2": byte-level BPE (tokens, merges). The pre-tokenizer is named by tokenizer.ggml.pre; when the
  key is missing, as in microsoft's 2B-4T file, it is Llama 3's. Llama 3's pre-tokenizer goes with
  ignore_merges (a word that is itself a token is taken whole), as in its tokenizer.json and llama.cpp.
- "llama": a SentencePiece BPE vocabulary (tokens, scores, token types, byte-fallback tokens <0xNN>),
  built as a tokenizer.model is (sentencepiece.py): merges rebuilt from the scores.
In a gpt2 vocabulary, control and user-defined tokens (token types 3 and 4) become added tokens,
matched in text before the model runs; control tokens are special (skipped when decoding).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConversionError
from .gguf_file import GGUFFile
from .sentencepiece import tokenizer_json_from_pieces

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Llama 3's pre-tokenizer split (its tokenizer.json; llama.cpp's "llama-bpe").
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre values -> pre-tokenizer kind; None is a missing key. llama.cpp reads these names
# as Llama 3's pre-tokenizer (falcon_e: ik_llama.cpp and bitnet.cpp's fork) and "gpt-2" as GPT-2's.
PRE_TOKENIZERS = {None: "llama3", "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3",
                  "falcon3": "llama3", "falcon_e": "llama3", "gpt-2": "gpt2"}


@dataclass(frozen=True)
class GGUFTokenizer:
    tokenizer_json: str
    bos: int | None
    stop_ids: list[int]  # eos first, then eot / eom when the file names them
    add_bos: bool


def _pre_tokenizer(kind: str):
    from tokenizers import Regex, pre_tokenizers

    if kind == "llama3":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def _gpt2(gf: GGUFFile, tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models

    pre = gf.get("tokenizer.ggml.pre", str)
    if pre not in PRE_TOKENIZERS:
        known = ", ".join(repr(k) for k in PRE_TOKENIZERS if k)
        raise ConversionError(f"{gf.path}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer bitnet-run does not know "
                              f"(known: {known}, or none for Llama 3's)")
    merges = []
    for i, merge in enumerate(gf.get("tokenizer.ggml.merges", list, required=True)):
        parts = merge.split(" ") if isinstance(merge, str) else []
        if len(parts) != 2:
            raise ConversionError(f"{gf.path}: tokenizer.ggml.merges[{i}] is {merge!r:.60} (expected 'left right')")
        merges.append((parts[0], parts[1]))
    kind = PRE_TOKENIZERS[pre]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=kind == "llama3"))
    tokenizer.pre_tokenizer = _pre_tokenizer(kind)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(gf: GGUFFile, tokens: list[str], types: list[int], add_bos: bool) -> str:
    scores = gf.get("tokenizer.ggml.scores", list, required=True)
    if len(scores) != len(tokens):
        raise ConversionError(f"{gf.path}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    add_space_prefix = gf.get("tokenizer.ggml.add_space_prefix", bool, default=True)  # llama.cpp's default
    return tokenizer_json_from_pieces(list(zip(tokens, map(float, scores), types)), TOKEN_BYTE in types,
                                      add_space_prefix, add_bos)


def _token_id(gf: GGUFFile, key: str, n_tokens: int) -> int | None:
    value = gf.get(key, int)
    if value is None:
        return None
    if not 0 <= value < n_tokens:
        raise ConversionError(f"{gf.path}: {key} is {value} (expected a token id below {n_tokens})")
    return value


def read_tokenizer(gf: GGUFFile) -> GGUFTokenizer:
    from tokenizers import AddedToken

    model = gf.get("tokenizer.ggml.model", str, required=True)
    tokens = gf.get("tokenizer.ggml.tokens", list, required=True)
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise ConversionError(f"{gf.path}: tokenizer.ggml.tokens is empty or not a list of strings")
    if len(set(tokens)) != len(tokens):
        raise ConversionError(f"{gf.path}: tokenizer.ggml.tokens lists a token twice")
    types = gf.get("tokenizer.ggml.token_type", list, default=[TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ConversionError(f"{gf.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    n = len(tokens)
    bos = _token_id(gf, "tokenizer.ggml.bos_token_id", n)
    eos = _token_id(gf, "tokenizer.ggml.eos_token_id", n)
    if eos is None:
        raise ConversionError(f"{gf.path}: metadata tokenizer.ggml.eos_token_id is missing")
    ends = [_token_id(gf, f"tokenizer.ggml.{k}_token_id", n) for k in ("eot", "eom")]
    add_bos = gf.get("tokenizer.ggml.add_bos_token", bool, default=bos is not None)
    if add_bos and bos is None:
        raise ConversionError(f"{gf.path}: tokenizer.ggml.add_bos_token is true but there is no bos_token_id")
    if model == "gpt2":
        tokenizer = _gpt2(gf, tokens)
        for kind, add in ((TOKEN_CONTROL, tokenizer.add_special_tokens), (TOKEN_USER_DEFINED, tokenizer.add_tokens)):
            add([AddedToken(tokens[i], special=kind == TOKEN_CONTROL, normalized=False)
                 for i, t in enumerate(types) if t == kind])
        text = tokenizer.to_str()
    elif model == "llama":
        text = _sentencepiece(gf, tokens, types, add_bos)
    else:
        raise ConversionError(f"{gf.path}: tokenizer.ggml.model is {model!r} (bitnet-run reads 'gpt2' and 'llama')")
    return GGUFTokenizer(text, bos, [eos] + [e for e in ends if e is not None], add_bos)
