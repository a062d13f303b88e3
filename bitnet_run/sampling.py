"""Token sampling: thin wrappers over the C sampler (bn_sampler, runtime/src/sampler.c), with llama.cpp's
parameters and order: repeat / frequency / presence penalties over the last penalty_last_n tokens, logit
bias, top-k, top-p, min-p, temperature, then a seeded draw (xoshiro256**; bitnet.h states the algorithm)."""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from ._bitnet import ffi, lib

_ERR_LEN = 512
# How many of the most recent tokens the penalties look at by default (llama.cpp's --repeat-last-n).
REPEAT_LAST_N = 64


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: int | None = None  # None: a fresh random seed per Sampler
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = REPEAT_LAST_N
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (-inf bans it)

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repeat_penalty > 0, f"repeat_penalty must be > 0 (1 = off), got {self.repeat_penalty}"),
            (self.seed is None or 0 <= self.seed < 2**64, f"seed must be in [0, 2**64) or None, got {self.seed}"),
            (math.isfinite(self.frequency_penalty),
             f"frequency_penalty must be finite (0 = off), got {self.frequency_penalty}"),
            (math.isfinite(self.presence_penalty),
             f"presence_penalty must be finite (0 = off), got {self.presence_penalty}"),
            (0 <= self.penalty_last_n < 2**31, f"penalty_last_n must be >= 0 (0 = off), got {self.penalty_last_n}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for token, bias in (self.logit_bias or {}).items():
            if not isinstance(token, (int, np.integer)) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {token!r}")
            if math.isnan(bias):
                raise ValueError(f"logit_bias for token {token} must not be NaN")


class Sampler:
    """Picks the next token from a row of logits; seeded for reproducible runs.

    n_vocab: the logits' length (None: taken from the first row given). Keeps the penalty history
    (`accept`, `reset`) and the RNG state between calls.
    """

    def __init__(self, params: SamplingParams, n_vocab: int | None = None):
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(64)
        self._sampler = None
        self.n_vocab = None
        if n_vocab is not None:
            self._create(n_vocab)

    def _create(self, n_vocab: int) -> None:
        p = self.params
        if n_vocab < 1:
            raise ValueError(f"n_vocab must be >= 1, got {n_vocab}")
        c = ffi.new("bn_sampler_params *")
        c.temperature, c.top_k, c.top_p, c.min_p = p.temperature, p.top_k, p.top_p, p.min_p
        c.repeat_penalty, c.frequency_penalty, c.presence_penalty = p.repeat_penalty, p.frequency_penalty, p.presence_penalty
        c.penalty_last_n, c.seed = p.penalty_last_n, self.seed
        out = ffi.new("bn_sampler **")
        err = ffi.new("char[]", _ERR_LEN)
        status = lib.bn_sampler_new(c, n_vocab, out, err, _ERR_LEN)
        if status != lib.BN_OK:
            raise ValueError(ffi.string(err).decode(errors="replace"))
        self._sampler = ffi.gc(out[0], lib.bn_sampler_free)
        self.n_vocab = n_vocab
        if p.logit_bias:
            for token in p.logit_bias:
                if token >= n_vocab:
                    raise ValueError(f"logit_bias token {token} is out of range [0, {n_vocab})")
            tokens = np.array(list(p.logit_bias), dtype=np.int32)
            bias = np.array(list(p.logit_bias.values()), dtype=np.float32)
            status = lib.bn_sampler_set_logit_bias(self._sampler, ffi.cast("const int32_t *", ffi.from_buffer(tokens)),
                                                   ffi.cast("const float *", ffi.from_buffer(bias)), tokens.size)
            assert status == lib.BN_OK  # checked above

    def _row(self, logits) -> np.ndarray:
        row = np.ascontiguousarray(logits, dtype=np.float32)
        if row.ndim != 1 or row.size == 0:
            raise ValueError(f"expected a 1-D row of logits, got shape {row.shape}")
        if self._sampler is None:
            self._create(row.size)
        elif row.size != self.n_vocab:
            raise ValueError(f"expected {self.n_vocab} logits, got {row.size}")
        return row

    def sample(self, logits) -> int:
        """The next token, with the current penalty history (the logits are not modified)."""
        row = self._row(logits)
        return int(lib.bn_sampler_sample(self._sampler, ffi.cast("const float *", ffi.from_buffer(row))))

    def accept(self, token: int) -> None:
        """Appends a token to the penalty history."""
        if self._sampler is None:
            raise ValueError("the sampler has not seen a row of logits yet (give n_vocab to Sampler)")
        lib.bn_sampler_accept(self._sampler, int(token))

    def reset(self) -> None:
        """Clears the penalty history (the RNG continues)."""
        if self._sampler is not None:
            lib.bn_sampler_reset(self._sampler)

    def probs(self, logits) -> tuple[np.ndarray, np.ndarray]:
        """The filtered, renormalized distribution `sample` draws from: (ids, probs), most likely first."""
        row = self._row(logits)
        ids = np.empty(self.n_vocab, dtype=np.int32)
        probs = np.empty(self.n_vocab, dtype=np.float32)
        n = ffi.new("uint32_t *")
        status = lib.bn_sampler_probs(self._sampler, ffi.cast("const float *", ffi.from_buffer(row)),
                                      ffi.cast("int32_t *", ffi.from_buffer(ids)),
                                      ffi.cast("float *", ffi.from_buffer(probs)), self.n_vocab, n)
        if status != lib.BN_OK:
            raise MemoryError("bn_sampler_probs: out of memory")
        return ids[: n[0]], probs[: n[0]]

    def __call__(self, logits, history: list[int]) -> int:
        """The next token given the recent token ids `history` (the penalty history becomes its tail)."""
        row = self._row(logits)
        self.reset()
        if self.params.penalty_last_n:
            for token in history[-self.params.penalty_last_n:]:
                lib.bn_sampler_accept(self._sampler, int(token))
        return self.sample(row)


def top_logprobs(logits, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n most likely tokens under log_softmax(logits): (ids, logprobs), most likely first."""
    row = np.ascontiguousarray(logits, dtype=np.float32)
    if row.ndim != 1 or row.size == 0:
        raise ValueError(f"expected a 1-D row of logits, got shape {row.shape}")
    if not 0 <= n <= row.size:
        raise ValueError(f"n must be in [0, {row.size}], got {n}")
    ids = np.empty(n, dtype=np.int32)
    logprobs = np.empty(n, dtype=np.float32)
    status = lib.bn_top_logprobs(ffi.cast("const float *", ffi.from_buffer(row)), row.size, n,
                                 ffi.cast("int32_t *", ffi.from_buffer(ids)),
                                 ffi.cast("float *", ffi.from_buffer(logprobs)))
    assert status == lib.BN_OK  # arguments checked above
    return ids, logprobs
