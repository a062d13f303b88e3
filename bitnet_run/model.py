"""The Python API: `Model` wraps one loaded model file and one evaluation context of the C runtime."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ._bitnet import ffi, lib
from .context import KV_TYPES, Context
from .errors import BitNetError, ContextOverflowError, ModelFileError
from .sampling import Sampler, SamplingParams
from .tokenizer import IncrementalDecoder, TextCodec

_ERR_LEN = 1024
_FILE_ERRORS = (lib.BN_ERR_IO, lib.BN_ERR_FORMAT, lib.BN_ERR_UNSUPPORTED)


@dataclass
class GenerationStats:
    """Timings of the last generate/stream/chat call (tokenisation and sampling excluded from timing)."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


class Model:
    """A BitNet b1.58 model loaded from a packed .bnr file.

    n_threads: worker threads of the runtime (None: one per physical core). n_ctx: context window in tokens per
    sequence (None: min(the model's trained context length, 4096)). kv_type: the KV cache's element
    type, "f16" or "f32". n_seq: sequence slots of the default context.
    """

    def __init__(self, path: str | os.PathLike, n_threads: int | None = None, n_ctx: int | None = None,
                 kv_type: str = "f16", n_seq: int = 1):
        self.path = Path(path)
        if n_threads is not None and n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        if n_ctx is not None and n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        err = ffi.new("char[]", _ERR_LEN)
        model_p = ffi.new("bn_model **")
        status = lib.bn_model_load(os.fsencode(self.path), model_p, err, _ERR_LEN)
        if status != lib.BN_OK:
            raise _file_error(status, ffi.string(err).decode(errors="replace"))
        self._model = ffi.gc(model_p[0], lib.bn_model_free)

        hp = ffi.new("bn_hparams *")
        lib.bn_model_hparams(self._model, hp)
        self.hparams = {name: getattr(hp, name) for name, _ in ffi.typeof("bn_hparams").fields}
        self.n_vocab = hp.vocab_size

        self.context = Context(self, n_ctx=n_ctx, n_seq=n_seq, n_threads=n_threads, kv_type=kv_type)
        self.n_ctx = self.context.n_ctx
        self.n_threads = self.context.n_threads

        self.stop_ids = set(self._meta_i32_array("tokenizer.stop_ids"))
        codec_args = dict(
            tokenizer_json=self.metadata_str("tokenizer.json"),
            chat_template=self.metadata_str("tokenizer.chat_template"),
            bos_id=self._meta_i32("tokenizer.bos_id"),
            eos_id=self._meta_i32("tokenizer.eos_id"),
            add_bos=bool(self._meta_u32("tokenizer.add_bos")),
        )
        try:
            self.codec = TextCodec(**codec_args)
        except Exception as exc:  # tokenizers reports a bad tokenizer.json as a bare Exception
            detail = " ".join(str(exc).split())
            raise ModelFileError(f"{self.path}: the stored tokenizer or chat template is invalid: {detail}") from exc
        self.last_stats = GenerationStats()

    # ---- metadata -------------------------------------------------------------------------------
    def metadata_str(self, key: str) -> str:
        ptr = ffi.new("const char **")
        length = ffi.new("uint64_t *")
        self._check_meta(lib.bn_model_meta_str(self._model, key.encode(), ptr, length), key)
        try:
            return ffi.unpack(ptr[0], length[0]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelFileError(f"{self.path}: metadata key '{key}' is not valid UTF-8 ({exc.reason})") from exc

    def _meta_u32(self, key: str) -> int:
        value = ffi.new("uint32_t *")
        self._check_meta(lib.bn_model_meta_u32(self._model, key.encode(), value), key)
        return value[0]

    def _meta_i32(self, key: str) -> int:
        value = ffi.new("int32_t *")
        self._check_meta(lib.bn_model_meta_i32(self._model, key.encode(), value), key)
        return value[0]

    def _meta_i32_array(self, key: str) -> list[int]:
        count = ffi.new("uint64_t *")
        self._check_meta(lib.bn_model_meta_i32_array(self._model, key.encode(), ffi.NULL, 0, count), key)
        values = ffi.new("int32_t[]", max(count[0], 1))
        lib.bn_model_meta_i32_array(self._model, key.encode(), values, count[0], count)
        return list(values[0 : count[0]])

    def _check_meta(self, status: int, key: str) -> None:
        if status != lib.BN_OK:
            raise ModelFileError(f"{self.path}: metadata key '{key}' is missing or has the wrong type")

    @property
    def n_params(self) -> int:
        return lib.bn_model_n_params(self._model)

    @property
    def n_bytes(self) -> int:
        return lib.bn_model_n_bytes(self._model)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        n_dims = ffi.new("uint32_t *")
        dims = ffi.new("uint64_t[4]")
        if lib.bn_model_tensor_dims(self._model, name.encode(), n_dims, dims) != lib.BN_OK:
            raise KeyError(f"{self.path}: no tensor named '{name}'")
        return tuple(dims[0 : n_dims[0]])

    def bitlinear(self, name: str, x: np.ndarray) -> np.ndarray:
        """Applies the ternary weight tensor `name` as one BitLinear to float rows x [n, in] -> [n, out]."""
        rows = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
        out_features, in_features = self.tensor_shape(name)
        if rows.ndim != 2 or rows.shape[1] != in_features:
            raise ValueError(f"{name}: input rows must have {in_features} columns, got shape {rows.shape}")
        y = np.empty((rows.shape[0], out_features), dtype=np.float32)
        err = ffi.new("char[]", _ERR_LEN)
        status = lib.bn_model_bitlinear(
            self._model, name.encode(), ffi.cast("const float *", ffi.from_buffer(rows)), rows.shape[0],
            ffi.cast("float *", ffi.from_buffer(y)), err, _ERR_LEN,
        )
        if status != lib.BN_OK:
            raise ValueError(ffi.string(err).decode(errors="replace"))
        return y

    # ---- tokens ---------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.codec.encode(text, add_bos=add_bos)

    def detokenize(self, ids) -> str:
        return self.codec.decode(ids)

    # ---- evaluation -----------------------------------------------------------------------------
    def _eval(self, ids, pos: int, all_logits: bool) -> np.ndarray:
        """Evaluates ids at positions pos.. with the cache below pos; returns logits [n, vocab] or [vocab]."""
        return self.context.eval(ids, pos, seq=0, all_logits=all_logits)

    def logits(self, ids) -> np.ndarray:
        """float32 logits of shape (len(ids), n_vocab), evaluated from position 0 with a fresh cache."""
        return self._eval(ids, 0, all_logits=True)

    # ---- generation -----------------------------------------------------------------------------
    def stream_ids(self, prompt_ids: list[int], max_tokens: int = 256, params: SamplingParams | None = None):
        """Yields (token_id, text_piece) for each generated token; stops at a stop id, max_tokens or a
        full context. The prompt is evaluated in one batch from position 0."""
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        if len(prompt_ids) == 0:
            raise ValueError("the prompt is empty (no tokens); give some text or enable the BOS token")
        if len(prompt_ids) > self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {self.n_ctx} (use n_ctx / -c)"
            )
        sampler = Sampler(params or SamplingParams())
        stats = self.last_stats = GenerationStats(prompt_tokens=len(prompt_ids))
        history = list(prompt_ids)
        decoder = IncrementalDecoder(self.codec)

        start = time.perf_counter()
        logits = self._eval(prompt_ids, 0, all_logits=False)
        stats.prompt_seconds = time.perf_counter() - start
        for i in range(max_tokens):
            token = sampler(logits, history)
            if token in self.stop_ids:
                break
            history.append(token)
            yield token, decoder.push(token)
            if i == max_tokens - 1 or len(history) >= self.n_ctx:
                break
            start = time.perf_counter()
            logits = self._eval([token], len(history) - 1, all_logits=False)
            stats.generation_seconds += time.perf_counter() - start
            stats.generated_tokens += 1

    def stream(
        self,
        prompt: str,
        max_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.1,
        seed: int | None = None,
        add_bos: bool = True,
    ) -> Iterator[str]:
        """Yields the text of the continuation of `prompt` piece by piece as it is generated."""
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        prompt_ids = self.tokenize(prompt, add_bos=add_bos)
        for _, piece in self.stream_ids(prompt_ids, max_tokens, params):
            if piece:
                yield piece

    def generate(self, prompt: str, max_tokens: int = 256, **sampling) -> str:
        """The continuation of `prompt` as one string (a loop over `stream`)."""
        return "".join(self.stream(prompt, max_tokens=max_tokens, **sampling))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.codec.render_chat(messages, add_generation_prompt=add_generation_prompt)

    def stream_chat(self, messages: list[dict], max_tokens: int = 256, **sampling) -> Iterator[str]:
        """Streams the assistant's reply to `messages`, rendered with the model's own chat template
        (which writes the BOS itself); generation ends at eos/eot."""
        prompt = self.apply_chat_template(messages)
        yield from self.stream(prompt, max_tokens=max_tokens, add_bos=False, **sampling)

    def chat(self, messages: list[dict], max_tokens: int = 256, **sampling) -> str:
        """The assistant's reply to `messages` (a list of {"role", "content"} dicts)."""
        return "".join(self.stream_chat(messages, max_tokens=max_tokens, **sampling))


def load(path: str | os.PathLike, n_threads: int | None = None, n_ctx: int | None = None) -> Model:
    """mlx-lm style entry point: `model = bitnet_run.load(path)`."""
    return Model(path, n_threads=n_threads, n_ctx=n_ctx)


def _file_error(status: int, message: str) -> Exception:
    if status in _FILE_ERRORS:
        return ModelFileError(message)
    return BitNetError(message)
