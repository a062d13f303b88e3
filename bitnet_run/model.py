"""The Python API: `Model` wraps one loaded model file and one evaluation context of the C runtime.

Generation keeps its cache: every call evaluates only the prompt tokens after the longest common
prefix with what the context's generation slot (sequence 0) already holds, so a chat evaluates each
token of its transcript once. `logits()` evaluates in a second, separate context, so it never touches
a generation's cache. `model.new_context()` gives another `Model` on the same loaded weights with its
own context (and lock): one per thread, or per conversation.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._bitnet import ffi, lib
from .context import KV_TYPES, Context
from .errors import BitNetError, ContextOverflowError, ModelFileError
from .sampling import Sampler, SamplingParams, top_logprobs as _top_logprobs
from .tokenizer import IncrementalDecoder, TextCodec

_ERR_LEN = 1024
_FILE_ERRORS = (lib.BN_ERR_IO, lib.BN_ERR_FORMAT, lib.BN_ERR_UNSUPPORTED)


@dataclass
class GenerationStats:
    """Counts and timings of the last generate/stream/chat call.

    prompt_tokens: prompt tokens evaluated (after the cached prefix); cached_tokens: prompt tokens
    reused from the cache. generated_tokens: tokens sampled (a final stop token included);
    eval_tokens / generation_seconds: the decoding evaluations and their time alone (no sampling, no
    detokenization); total_seconds: wall time of the whole call, prompt evaluation included.
    """

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    cached_tokens: int = 0
    eval_tokens: int = 0
    total_seconds: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        """Eval-only decoding speed: eval_tokens / generation_seconds."""
        return self.eval_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    @property
    def end_to_end_tps(self) -> float:
        """generated_tokens / the wall time after the prompt: what a user sees."""
        seconds = self.total_seconds - self.prompt_seconds
        return self.generated_tokens / seconds if seconds > 0 else 0.0


@dataclass
class Logprobs:
    """The sampled token's log-probability and the top-n alternatives, under log_softmax of the raw
    logits (before penalties, bias and sampling filters), as OpenAI's logprobs report them."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


@dataclass
class GenerationResponse:
    """One generated token, mlx-lm's `stream_generate` fields plus cached_tokens.

    text: the new text this token completes (may be "" while a multi-byte character or a possible stop
    string is pending). prompt_tokens: prompt tokens this call evaluated; cached_tokens: prompt tokens
    reused. generation_tokens: tokens generated so far, this one included; generation_tps: end-to-end
    (generation_tokens / wall time since the prompt was evaluated). finish_reason: None until the last
    response, then "stop" (a stop token or stop string), "length" (max_tokens) or "context" (full).
    """

    text: str
    token: int
    logprobs: Logprobs | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    finish_reason: str | None
    cached_tokens: int = 0


class _Weights:
    """One loaded model file: the C model, its hyperparameters and tokenizer, shared by every context."""

    def __init__(self, path: Path):
        err = ffi.new("char[]", _ERR_LEN)
        model_p = ffi.new("bn_model **")
        status = lib.bn_model_load(os.fsencode(path), model_p, err, _ERR_LEN)
        if status != lib.BN_OK:
            message = ffi.string(err).decode(errors="replace")
            raise ModelFileError(message) if status in _FILE_ERRORS else BitNetError(message)
        self.path = path
        self._model = ffi.gc(model_p[0], lib.bn_model_free)
        hp = ffi.new("bn_hparams *")
        lib.bn_model_hparams(self._model, hp)
        self.hparams = {name: getattr(hp, name) for name, _ in ffi.typeof("bn_hparams").fields}
        self.stop_ids = frozenset(self.meta_i32_array("tokenizer.stop_ids"))
        codec_args = dict(
            tokenizer_json=self.meta_str("tokenizer.json"),
            chat_template=self.meta_str("tokenizer.chat_template"),
            bos_id=self.meta_i32("tokenizer.bos_id"),
            eos_id=self.meta_i32("tokenizer.eos_id"),
            add_bos=bool(self.meta_u32("tokenizer.add_bos")),
        )
        try:
            self.codec = TextCodec(**codec_args)
        except Exception as exc:  # tokenizers reports a bad tokenizer.json as a bare Exception
            detail = " ".join(str(exc).split())
            raise ModelFileError(f"{path}: the stored tokenizer or chat template is invalid: {detail}") from exc

    def meta_str(self, key: str) -> str:
        ptr = ffi.new("const char **")
        length = ffi.new("uint64_t *")
        self._check_meta(lib.bn_model_meta_str(self._model, key.encode(), ptr, length), key)
        try:
            return ffi.unpack(ptr[0], length[0]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelFileError(f"{self.path}: metadata key '{key}' is not valid UTF-8 ({exc.reason})") from exc

    def meta_u32(self, key: str) -> int:
        value = ffi.new("uint32_t *")
        self._check_meta(lib.bn_model_meta_u32(self._model, key.encode(), value), key)
        return value[0]

    def meta_i32(self, key: str) -> int:
        value = ffi.new("int32_t *")
        self._check_meta(lib.bn_model_meta_i32(self._model, key.encode(), value), key)
        return value[0]

    def meta_i32_array(self, key: str) -> list[int]:
        count = ffi.new("uint64_t *")
        self._check_meta(lib.bn_model_meta_i32_array(self._model, key.encode(), ffi.NULL, 0, count), key)
        values = ffi.new("int32_t[]", max(count[0], 1))
        lib.bn_model_meta_i32_array(self._model, key.encode(), values, count[0], count)
        return list(values[0 : count[0]])

    def _check_meta(self, status: int, key: str) -> None:
        if status != lib.BN_OK:
            raise ModelFileError(f"{self.path}: metadata key '{key}' is missing or has the wrong type")


class _Slot:
    """A context's generation sequence (slot 0) and the token ids its cache holds, behind a lock that
    one generation holds from its first token to its last. A second generation on the same context from
    the same thread (two interleaved generators) would corrupt the cache, so it is refused."""

    def __init__(self):
        self.tokens: list[int] = []  # ids at positions 0.. of sequence 0's cache
        self._lock = threading.Lock()
        self._owner: int | None = None

    def __enter__(self):
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError("another generation on this context is still running in this thread: finish or "
                               "close it first, or generate on model.new_context()")
        self._lock.acquire()
        self._owner = me
        return self

    def __exit__(self, *exc):
        self._owner = None
        self._lock.release()


class Model:
    """A BitNet b1.58 model loaded from a packed .bnr file, with one evaluation context.

    n_threads: worker threads of the runtime (None: one per physical core). n_ctx: context window in
    tokens (None: min(the model's trained context length, 4096)). kv_type: "f16" (default) or "f32" KV cache.
    n_seq: sequence slots of the context (`model.context`); generation uses slot 0, the others are
    free for callers of model.context.decode.
    Thread-safe: calls on one Model take turns (a lock per context); for parallel work make one
    context per thread with `new_context()`, which shares the loaded weights.
    """

    def __init__(self, path: str | os.PathLike, n_threads: int | None = None, n_ctx: int | None = None,
                 kv_type: str = "f16", n_seq: int = 1, *, _weights: _Weights | None = None):
        self.path = Path(path)
        if n_threads is not None and n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        if n_ctx is not None and n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        self._weights = _weights or _Weights(self.path)
        self._model = self._weights._model
        self.hparams = self._weights.hparams
        self.n_vocab = self.hparams["vocab_size"]
        self.stop_ids = set(self._weights.stop_ids)
        self.codec = self._weights.codec
        self.kv_type = kv_type
        self.context = Context(self, n_ctx=n_ctx, n_seq=n_seq, n_threads=n_threads, kv_type=kv_type)
        self._ctx = self.context._ctx  # the raw bn_context (tests drive bn_eval on it directly)
        self.n_ctx = self.context.n_ctx
        self.n_threads = self.context.n_threads
        self._slot = _Slot()
        # logits() runs in its own context (made on first use, grown to the longest request) so that
        # it never disturbs the generation cache of sequence 0
        self._logits_context: Context | None = None
        self._logits_lock = threading.Lock()
        self._closed = False
        self.last_stats = GenerationStats()

    def new_context(self, n_ctx: int | None = None, n_threads: int | None = None, kv_type: str | None = None) -> Model:
        """Another Model on the same loaded weights (no second copy, no reload) with its own context,
        cache and lock; parameters left None are this one's."""
        return Model(self.path, n_threads=n_threads or self.n_threads, n_ctx=n_ctx or self.n_ctx,
                     kv_type=kv_type or self.kv_type, _weights=self._weights)

    def reset(self) -> None:
        """Empties the generation cache: the next call evaluates its whole prompt."""
        with self._slot as slot:
            self._check_open()
            self.context.clear(0)
            slot.tokens = []

    def close(self) -> None:
        """Frees the contexts now (the weights go when the last Model sharing them is gone); later
        calls raise ValueError. Idempotent."""
        with self._slot as slot, self._logits_lock:
            if self._closed:
                return
            self._closed = True
            self.context.close()
            if self._logits_context is not None:
                self._logits_context.close()
                self._logits_context = None
            slot.tokens = []

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: this Model was closed")

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- metadata -------------------------------------------------------------------------------
    def metadata_str(self, key: str) -> str:
        return self._weights.meta_str(key)

    @property
    def n_params(self) -> int:
        return lib.bn_model_n_params(self._model)

    @property
    def n_bytes(self) -> int:
        return lib.bn_model_n_bytes(self._model)

    @property
    def n_evaluated(self) -> int:
        """Tokens this Model's generation context has evaluated since it was created."""
        return self.context.n_evaluated

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
    def tokenize(self, text: str, add_bos: bool = True, parse_special: bool = True) -> list[int]:
        """parse_special=False reads special-token text such as `<|eot_id|>` as ordinary characters."""
        return self.codec.encode(text, add_bos=add_bos, parse_special=parse_special)

    def detokenize(self, ids) -> str:
        return self.codec.decode(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.codec.render_chat(messages, add_generation_prompt=add_generation_prompt)

    def tokenize_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Exactly the ids chat evaluates for `messages`: the template's special tokens are special,
        special-token text inside the messages is not (see bitnet_run.tokenizer)."""
        return self.codec.encode_chat(messages, add_generation_prompt=add_generation_prompt)

    # ---- evaluation -----------------------------------------------------------------------------
    def _eval(self, ids, pos: int, all_logits: bool) -> np.ndarray:
        """Evaluates ids at positions pos.. of the generation slot with the cache below pos; returns
        logits [n, vocab] or [vocab]. A raw step for the benchmark: it leaves the slot's record of its
        tokens unknown, so the next generation starts from an empty cache."""
        with self._slot as slot:
            self._check_open()
            slot.tokens = []
            return self.context.eval(ids, pos, seq=0, all_logits=all_logits)

    def logits(self, ids) -> np.ndarray:
        """float32 logits of shape (len(ids), n_vocab), evaluated from position 0 with a fresh cache
        (in a context of its own: a generation's cache is left as it is)."""
        n = len(ids)
        if n > self.n_ctx:
            raise ContextOverflowError(f"{n} tokens at position 0 do not fit in the context of {self.n_ctx} tokens")
        with self._logits_lock:
            self._check_open()
            if self._logits_context is None or self._logits_context.n_ctx < n:
                if self._logits_context is not None:
                    self._logits_context.close()
                    self._logits_context = None
                size = min(self.n_ctx, max(64, 1 << max(n - 1, 0).bit_length()))
                self._logits_context = Context(self, n_ctx=size, n_seq=1, n_threads=self.n_threads,
                                               kv_type=self.kv_type)
            return self._logits_context.eval(ids, 0, seq=0, all_logits=True)

    # ---- generation -----------------------------------------------------------------------------
    def stream_generate(
        self,
        prompt_or_ids: str | Iterable[int],
        max_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.1,
        seed: int | None = None,
        stop: str | Iterable[str] | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        logit_bias: dict[int, float] | None = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        penalty_last_n: int = 64,
        add_bos: bool = True,
        stop_ids: Iterable[int] | None = None,
        params: SamplingParams | None = None,
    ) -> Iterator[GenerationResponse]:
        """Generates from a prompt (text, tokenized with BOS if add_bos, or token ids), yielding one
        GenerationResponse per token (mlx-lm's stream_generate).

        Stops at a stop token (stop_ids; None: the model's end-of-turn/end-of-text ids), at a stop string
        (`stop`: text that is held back until it can no longer start a stop string and never emitted),
        after max_tokens, or when the context is full. logprobs / top_logprobs: fill response.logprobs.
        params: a whole SamplingParams instead of the separate sampling arguments.
        """
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        if top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {top_logprobs}")
        if params is None:
            params = SamplingParams(
                temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                seed=seed, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                penalty_last_n=penalty_last_n, logit_bias=dict(logit_bias) if logit_bias else None,
            )
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        ids = self.tokenize(prompt_or_ids, add_bos=add_bos) if isinstance(prompt_or_ids, str) else [
            int(t) for t in prompt_or_ids]
        if not ids:
            raise ValueError("the prompt is empty (no tokens); give some text or enable the BOS token")
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(ids)} tokens but the context holds {self.n_ctx} (use n_ctx / -c)")
        bad = [t for t in ids if not 0 <= t < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for the vocabulary of {self.n_vocab}")
        sampler = Sampler(params, n_vocab=self.n_vocab)
        end_ids = self.stop_ids if stop_ids is None else set(stop_ids)
        return self._generate(ids, max_tokens, sampler, params, stops, logprobs or top_logprobs > 0, top_logprobs,
                              end_ids)

    def _generate(self, ids: list[int], max_tokens: int, sampler: Sampler, params: SamplingParams,
                  stops: list[str], want_logprobs: bool, n_top: int, end_ids: set[int]) -> Iterator[GenerationResponse]:
        with self._slot as slot:
            self._check_open()
            start = time.perf_counter()
            # reuse the longest common prefix; at least the last prompt token is evaluated (its logits)
            keep = 0
            limit = min(len(slot.tokens), len(ids) - 1)
            while keep < limit and slot.tokens[keep] == ids[keep]:
                keep += 1
            self.context.truncate(0, keep)
            slot.tokens = slot.tokens[:keep]
            stats = self.last_stats = GenerationStats(prompt_tokens=len(ids) - keep, cached_tokens=keep)
            logits = self.context.eval(ids[keep:], keep, seq=0)
            slot.tokens.extend(ids[keep:])
            prompt_done = time.perf_counter()
            stats.prompt_seconds = stats.total_seconds = prompt_done - start

            sampler.reset()
            for t in ids[-params.penalty_last_n :] if params.penalty_last_n > 0 else []:
                sampler.accept(t)
            decoder = IncrementalDecoder(self.codec)
            held = ""  # decoded text not yet emitted: it may be the start of a stop string
            for n in range(1, max_tokens + 1):
                token = sampler.sample(logits)
                sampler.accept(token)
                lp = self._logprobs(logits, token, n_top) if want_logprobs else None
                finish = None
                if token in end_ids:
                    finish = "stop"
                else:
                    held += decoder.push(token)
                    if n == max_tokens:
                        finish = "length"
                    elif len(slot.tokens) >= self.n_ctx:
                        finish = "context"
                if finish is not None:
                    held += decoder.flush()
                text, held, matched = _split_stop(held, stops)
                if matched:
                    finish = "stop"
                elif finish is not None:
                    text += held  # the end: what was held back can no longer become a stop string
                now = time.perf_counter()
                stats.generated_tokens = n
                stats.total_seconds = now - start
                yield GenerationResponse(
                    text=text, token=token, logprobs=lp, prompt_tokens=stats.prompt_tokens,
                    prompt_tps=stats.prompt_tps, generation_tokens=n,
                    generation_tps=n / (now - prompt_done) if now > prompt_done else 0.0,
                    finish_reason=finish, cached_tokens=keep,
                )
                if finish is not None:
                    return
                step = time.perf_counter()
                logits = self.context.eval([token], len(slot.tokens), seq=0)
                slot.tokens.append(token)
                stats.generation_seconds += time.perf_counter() - step
                stats.eval_tokens += 1

    def _logprobs(self, logits: np.ndarray, token: int, n_top: int) -> Logprobs:
        ids, logprobs = _top_logprobs(logits, max(n_top, 1))
        log_z = float(logits[ids[0]]) - float(logprobs[0])  # log-sum-exp of the row, from the top token
        top = list(zip(ids[:n_top].tolist(), logprobs[:n_top].tolist()))
        return Logprobs(token=token, logprob=float(logits[token]) - log_z, top=top)

    def stream_chat_generate(self, messages: list[dict], max_tokens: int = 256, **kwargs) -> Iterator[GenerationResponse]:
        """stream_generate on the chat-template tokens of `messages` (tokenize_chat) with the generation
        prompt; the template writes the BOS itself."""
        return self.stream_generate(self.tokenize_chat(messages), max_tokens=max_tokens, **kwargs)

    def stream_ids(self, prompt_ids: list[int], max_tokens: int = 256, params: SamplingParams | None = None):
        """Yields (token_id, text_piece) for each generated token; stops at a stop id (not yielded),
        max_tokens or a full context."""
        for r in self.stream_generate(prompt_ids, max_tokens=max_tokens, params=params or SamplingParams()):
            if r.token in self.stop_ids and r.finish_reason == "stop":
                return
            yield r.token, r.text

    def stream(self, prompt: str, max_tokens: int = 256, temperature: float = 0.8, top_k: int = 40,
               top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.1, seed: int | None = None,
               add_bos: bool = True, **kwargs) -> Iterator[str]:
        """Yields the text of the continuation of `prompt` piece by piece as it is generated (the
        stream_generate arguments, e.g. stop=, apply)."""
        for r in self.stream_generate(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                      top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed,
                                      add_bos=add_bos, **kwargs):
            if r.text:
                yield r.text

    def generate(self, prompt: str, max_tokens: int = 256, **kwargs) -> str:
        """The continuation of `prompt` as one string (a loop over `stream`)."""
        return "".join(self.stream(prompt, max_tokens=max_tokens, **kwargs))

    def stream_chat(self, messages: list[dict], max_tokens: int = 256, **kwargs) -> Iterator[str]:
        """Streams the text of the assistant's reply to `messages` (rendered with the model's own chat
        template); generation ends at end-of-turn. The cache of earlier turns is reused."""
        for r in self.stream_chat_generate(messages, max_tokens=max_tokens, **kwargs):
            if r.text:
                yield r.text

    def chat(self, messages: list[dict], max_tokens: int = 256, **kwargs) -> str:
        """The assistant's reply to `messages` (a list of {"role", "content"} dicts)."""
        return "".join(self.stream_chat(messages, max_tokens=max_tokens, **kwargs))


def _split_stop(held: str, stops: list[str]) -> tuple[str, str, bool]:
    """(text safe to emit, text to hold back, whether a stop string matched). On a match the text before
    the earliest stop string is emitted and the rest dropped; otherwise the longest tail of `held` that
    could still begin a stop string is held back."""
    if not stops:
        return held, "", False
    found = [i for i in (held.find(s) for s in stops) if i >= 0]
    if found:
        return held[: min(found)], "", True
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(held)), keep, -1):
            if held.endswith(s[:k]):
                keep = k
                break
    return held[: len(held) - keep], held[len(held) - keep :], False


def load(path: str | os.PathLike, n_threads: int | None = None, n_ctx: int | None = None, kv_type: str = "f16") -> Model:
    """mlx-lm style entry point: `model = bitnet_run.load(path)`."""
    return Model(path, n_threads=n_threads, n_ctx=n_ctx, kv_type=kv_type)
