"""`Context`: one evaluation context of the C runtime (bn_context): the KV caches of n_seq sequence
slots over a loaded model, evaluated by batches of tokens from any of them."""
from __future__ import annotations

import numpy as np

from ._bitnet import ffi, lib
from .errors import BitNetError, ContextOverflowError

_ERR_LEN = 1024
KV_TYPES = {"f16": lib.BN_KV_F16, "f32": lib.BN_KV_F32}


class Context:
    """KV caches for n_seq sequences of up to n_ctx positions each over one loaded model.

    model_handle_owner: anything with a `_model` attribute holding the bn_model handle (a `Model`);
    the context keeps it alive. n_ctx: positions per sequence (None: min(trained length, 4096)).
    n_threads: worker threads (None: one per CPU). kv_type: "f16" (default) or "f32".
    One context must be used by one thread at a time.
    """

    def __init__(self, model_handle_owner, n_ctx: int | None = None, n_seq: int = 1, n_threads: int | None = None,
                 kv_type: str = "f16"):
        if n_ctx is not None and n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        if n_seq < 1:
            raise ValueError(f"n_seq must be >= 1, got {n_seq}")
        if n_threads is not None and n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        self._owner = model_handle_owner  # the context points into the model: keep it alive
        params = ffi.new("bn_context_params *", lib.bn_context_default_params())
        params.n_ctx, params.n_seq, params.n_threads = n_ctx or 0, n_seq, n_threads or 0
        params.kv_type = KV_TYPES[kv_type]
        err = ffi.new("char[]", _ERR_LEN)
        ctx_p = ffi.new("bn_context **")
        status = lib.bn_context_new_ext(model_handle_owner._model, params, ctx_p, err, _ERR_LEN)
        if status != lib.BN_OK:
            message = ffi.string(err).decode(errors="replace")
            raise ValueError(message) if status == lib.BN_ERR_ARG else BitNetError(message)
        self._ctx = ffi.gc(ctx_p[0], lib.bn_context_free)
        self.kv_type = kv_type
        self.n_ctx = lib.bn_context_n_ctx(self._ctx)
        self.n_seq = lib.bn_context_n_seq(self._ctx)
        self.n_threads = lib.bn_context_n_threads(self._ctx)
        hp = ffi.new("bn_hparams *")
        lib.bn_model_hparams(model_handle_owner._model, hp)
        self.n_vocab = hp.vocab_size

    # ---- evaluation -----------------------------------------------------------------------------
    def decode(self, tokens, seq_ids, positions, want_logits=None) -> np.ndarray:
        """Evaluates a batch of tokens of any sequences (bn_decode): token i of sequence seq_ids[i] at
        positions[i], each sequence's tokens at consecutive positions from its n_past. want_logits:
        per-token flags (None: only the last token). Returns the logits [n_wanted, vocab]."""
        token = np.ascontiguousarray(tokens, dtype=np.int32)
        seq = np.ascontiguousarray(seq_ids, dtype=np.uint32)
        pos = np.ascontiguousarray(positions, dtype=np.uint32)
        if token.ndim != 1 or token.size == 0:
            raise ValueError("expected a non-empty 1-D sequence of token ids")
        if seq.shape != token.shape or pos.shape != token.shape:
            raise ValueError(f"seq_ids and positions must have one entry per token ({token.size}), "
                             f"got {seq.size} and {pos.size}")
        batch = ffi.new("bn_batch *")
        batch.n_tokens = token.size
        batch.token = ffi.cast("const int32_t *", ffi.from_buffer(token))
        batch.seq_id = ffi.cast("const uint32_t *", ffi.from_buffer(seq))
        batch.pos = ffi.cast("const uint32_t *", ffi.from_buffer(pos))
        if want_logits is None:
            n_wanted = 1
        else:
            want = np.ascontiguousarray(want_logits, dtype=bool).astype(np.int8)
            if want.shape != token.shape:
                raise ValueError(f"want_logits must have one entry per token ({token.size}), got {want.size}")
            batch.logits = ffi.cast("const int8_t *", ffi.from_buffer(want))
            n_wanted = int(want.sum())
        out = np.empty((n_wanted, self.n_vocab), dtype=np.float32)
        self._check(lib.bn_decode(self._ctx, batch, ffi.cast("float *", ffi.from_buffer(out))))
        return out

    def eval(self, ids, pos: int, seq: int = 0, all_logits: bool = False) -> np.ndarray:
        """Evaluates ids at positions pos.. of sequence `seq`, with its cache below pos (truncated to pos
        first); returns logits [n, vocab] (all_logits) or [vocab] (the last token's)."""
        tokens = np.ascontiguousarray(ids, dtype=np.int32)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError("expected a non-empty 1-D sequence of token ids")
        if pos < 0:
            raise ValueError(f"position must be >= 0, got {pos}")
        if pos + tokens.size > self.n_ctx:
            raise ContextOverflowError(
                f"{tokens.size} tokens at position {pos} do not fit in the context of {self.n_ctx} tokens"
            )
        if seq == 0:  # bn_eval: sequence 0, truncated to pos inside the checked call
            out = np.empty((tokens.size, self.n_vocab) if all_logits else (self.n_vocab,), dtype=np.float32)
            self._check(lib.bn_eval(self._ctx, ffi.cast("const int32_t *", ffi.from_buffer(tokens)), tokens.size,
                                    pos, ffi.cast("float *", ffi.from_buffer(out)), int(all_logits)))
            return out
        self.truncate(seq, pos)
        n = tokens.size
        logits = self.decode(tokens, np.full(n, seq), np.arange(pos, pos + n), np.ones(n, bool) if all_logits else None)
        return logits if all_logits else logits[0]

    # ---- sequences ------------------------------------------------------------------------------
    def n_past(self, seq: int = 0) -> int:
        self._check_seq(seq)
        return lib.bn_seq_n_past(self._ctx, seq)

    def clear(self, seq: int) -> None:
        self._check_seq(seq)
        self._check(lib.bn_seq_clear(self._ctx, seq))

    def truncate(self, seq: int, n_keep: int) -> None:
        self._check_seq(seq)
        if n_keep < 0:
            raise ValueError(f"n_keep must be >= 0, got {n_keep}")
        self._check(lib.bn_seq_truncate(self._ctx, seq, n_keep))

    def copy(self, src: int, dst: int, n: int) -> None:
        """dst's cache becomes the first n positions of src's (a shared prefix)."""
        self._check_seq(src)
        self._check_seq(dst)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self._check(lib.bn_seq_copy(self._ctx, src, dst, n))

    @property
    def n_evaluated(self) -> int:
        """Tokens evaluated since the context was created, all sequences."""
        return lib.bn_context_n_evaluated(self._ctx)

    def close(self) -> None:
        """Frees the caches now (the context is unusable afterwards)."""
        if self._ctx is not None:
            ffi.release(self._ctx)
            self._ctx = None

    def _check_seq(self, seq: int) -> None:
        if not 0 <= seq < self.n_seq:
            raise ValueError(f"sequence {seq} is out of range [0, {self.n_seq})")

    def _check(self, status: int) -> None:
        if status == lib.BN_OK:
            return
        message = ffi.string(lib.bn_context_error(self._ctx)).decode(errors="replace")
        if status == lib.BN_ERR_CONTEXT:
            raise ContextOverflowError(message)
        if status == lib.BN_ERR_ARG:
            raise ValueError(message)
        raise BitNetError(message)
