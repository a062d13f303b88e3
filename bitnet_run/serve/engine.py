"""Continuous batching: one scheduler thread steps every busy slot of one multi-sequence context.

Each of the `n_parallel` slots is one sequence of the context. A step builds one batch from every busy
slot (its next token when it is generating, a chunk of its prompt while its prompt is being
evaluated), runs it through one `Context.decode` (the weights are read once for all of them), then
samples each slot's next token with its own sampler. A request joins at the next step and leaves at
the step it finishes, without stopping the others.

Prompt chunk policy: at most `prompt_chunk` (default 64) prompt tokens per step over all slots, given
to the slots in the order their requests arrived; generating slots always get their token. So one
long prompt costs the other streams at most one 64-token evaluation per step, and an idle server
still evaluates a prompt 64 tokens at a time.

Prefix reuse: a slot keeps the tokens it evaluated after its request ends. A new request goes to the
free slot whose cache shares the longest prefix with its prompt; when another slot (busy or free)
holds a longer common prefix, that prefix is copied from it (`Context.copy`), so a system prompt
shared by many requests is evaluated once while some slot still holds it.
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..model import _split_stop
from ..sampling import SamplingParams

PROMPT_CHUNK = 64
RATE_WINDOW_S = 10.0  # the generation tokens/s gauge is the rate over this many seconds


class QueueFullError(Exception):
    """The queue of requests waiting for a slot is full."""


class EngineNotReady(Exception):
    """The model is still loading, or failed to load."""


@dataclass
class TokenLogprob:
    token: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]]  # (id, text, logprob), most likely first


@dataclass
class Delta:
    """Text released to the client, with the tokens generated since the previous Delta."""

    text: str
    logprobs: list[TokenLogprob]


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose cache was reused instead of evaluated


@dataclass
class Finished:
    reason: str  # "stop" (stop token or stop string) or "length" (max_tokens or a full context)
    usage: Usage


@dataclass
class Failed:
    message: str


Event = Delta | Finished | Failed


@dataclass
class Job:
    """One generation request. `sink` is called on the scheduler thread with each Event in order;
    Finished or Failed is the last."""

    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    sink: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    cancelled: bool = False
    id: int = field(default_factory=itertools.count().__next__)

    def cancel(self) -> None:
        """Frees the job's slot at the next step (no more events are sent); safe from any thread."""
        self.cancelled = True


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Slot:
    """One sequence of the context and the request it serves."""

    index: int
    cached: list[int] = field(default_factory=list)  # tokens whose K/V are in the sequence, in order
    job: Job | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to evaluate
    next_token: int = -1  # the sampled token to evaluate in the next step (generating)
    sampler: object = None
    decoder: object = None
    held: str = ""  # decoded text held back: it may be the start of a stop string
    n_generated: int = 0
    cached_prompt: int = 0  # prompt tokens reused from the cache
    unsent: list[TokenLogprob] = field(default_factory=list)
    last_used: float = 0.0


@dataclass
class Metrics:
    requests: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    recent: collections.deque = field(default_factory=collections.deque)  # (time, tokens) of recent steps

    def tokens_per_second(self, now: float) -> float:
        while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
            self.recent.popleft()
        return sum(n for _, n in self.recent) / RATE_WINDOW_S


class Engine:
    """Loads the model (on the scheduler thread, so a server can answer /health while it loads) and
    runs continuous batching over `n_parallel` slots of one context."""

    def __init__(self, model_path: str | Path, n_parallel: int = 4, n_ctx: int | None = None,
                 n_threads: int | None = None, kv_type: str = "f16", max_queue: int = 64,
                 prompt_chunk: int = PROMPT_CHUNK):
        if n_parallel < 1:
            raise ValueError(f"--parallel must be >= 1, got {n_parallel}")
        if max_queue < 0:
            raise ValueError(f"--max-queue must be >= 0, got {max_queue}")
        if prompt_chunk < 1:
            raise ValueError(f"the prompt chunk must be >= 1 token, got {prompt_chunk}")
        self.model_path = Path(model_path)
        self.n_parallel, self.n_ctx_wanted, self.n_threads_wanted = n_parallel, n_ctx, n_threads
        self.kv_type, self.max_queue, self.prompt_chunk = kv_type, max_queue, prompt_chunk
        self.state = "loading"  # then "ok" or "error"
        self.error = ""
        self.model = None
        self.context = None
        self.slots: list[Slot] = []
        self.metrics = Metrics()
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="bitnet-run scheduler", daemon=True)
        self._loaded = threading.Event()

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """True once the model is loaded (state ok), False on a load error or timeout."""
        self._loaded.wait(timeout)
        return self.state == "ok"

    def stop(self, timeout: float = 10.0) -> None:
        """Fails the jobs still queued or running, ends the scheduler thread and frees the context."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _load(self) -> None:
        from ..model import Model

        try:
            # the model's own context, with one sequence per slot
            self.model = Model(self.model_path, n_threads=self.n_threads_wanted, n_ctx=self.n_ctx_wanted,
                               kv_type=self.kv_type, n_seq=self.n_parallel)
            self.context = self.model.context
        except Exception as exc:  # any load failure becomes the server's error state, never a crash
            self.state, self.error = "error", str(exc)
            return
        finally:
            self._loaded.set()
        self.slots = [Slot(i) for i in range(self.n_parallel)]
        self.state = "ok"

    @property
    def n_ctx(self) -> int:
        return self.context.n_ctx

    # ---- requests (any thread) --------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queues a job for the next free slot. Raises EngineNotReady, QueueFullError, or ValueError
        for a prompt that does not fit."""
        if self.state != "ok":
            raise EngineNotReady(self.error or "the model is loading")
        if not job.prompt_ids:
            raise ValueError("the prompt is empty (no tokens)")
        if len(job.prompt_ids) > self.n_ctx:
            raise ValueError(f"the prompt has {len(job.prompt_ids)} tokens but a slot's context holds "
                             f"{self.n_ctx} (-c)")
        with self._cond:
            if self._stopping:
                raise EngineNotReady("the server is shutting down")
            free = sum(s.job is None for s in self.slots) - len(self._queue)
            if free <= 0 and len(self._queue) >= self.max_queue:
                raise QueueFullError(f"all {self.n_parallel} slots are busy and {len(self._queue)} requests "
                                     f"are queued (--max-queue {self.max_queue})")
            self.metrics.requests += 1
            self.metrics.prompt_tokens += len(job.prompt_ids)
            self._queue.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        job.cancel()
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self.metrics.requests_cancelled += 1
            self._cond.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def busy_slots(self) -> int:
        return sum(s.job is not None for s in self.slots)

    # ---- the scheduler thread -------------------------------------------------------------------------
    def _run(self) -> None:
        self._load()
        if self.state != "ok":
            return
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._queue and self.busy_slots == 0:
                        self._cond.wait()
                    if self._stopping:
                        break
                    self._admit()
                try:
                    self._step()
                except Exception as exc:  # a bug must cost the requests in flight, not the server
                    self._fail_busy(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._shutdown()

    def _fail_busy(self, message: str) -> None:
        """Fails every busy slot's job and forgets its cache (its state is unknown after an error)."""
        for slot in self.slots:
            if slot.job is not None:
                self._send(slot.job, Failed(message))
                self.metrics.requests_failed += 1
                self._release(slot)
                slot.cached = []
                self.context.clear(slot.index)

    def _shutdown(self) -> None:
        with self._cond:
            jobs = list(self._queue) + [s.job for s in self.slots if s.job is not None]
            self._queue.clear()
        for job in jobs:
            self._send(job, Failed("the server is shutting down"))
        for slot in self.slots:
            slot.job = None
        self.context.close()

    def _admit(self) -> None:
        """Moves queued jobs into free slots (with the lock held), reusing cached prefixes."""
        while self._queue:
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            job = self._queue.popleft()
            prompt = job.prompt_ids
            # the free slot sharing the longest prefix; among equals the least recently used one
            slot = max(free, key=lambda s: (_common_prefix(s.cached, prompt), -s.last_used))
            keep = _common_prefix(slot.cached, prompt)
            donor = max(self.slots, key=lambda s: _common_prefix(s.cached, prompt))
            shared = _common_prefix(donor.cached, prompt)
            # at least the last prompt token is evaluated: its logits give the first generated token
            limit = len(prompt) - 1
            if shared > keep and donor is not slot:
                keep = min(shared, limit)
                self.context.copy(donor.index, slot.index, keep)
            else:
                keep = min(keep, limit)
                self.context.truncate(slot.index, keep)
            slot.cached = prompt[:keep]
            self._assign(slot, job, keep)

    def _assign(self, slot: Slot, job: Job, keep: int) -> None:
        from ..sampling import Sampler
        from ..tokenizer import IncrementalDecoder

        slot.job = job
        slot.pending = job.prompt_ids[keep:]
        slot.cached_prompt = keep
        slot.n_generated = 0
        slot.unsent = []
        slot.sampler = Sampler(job.params, n_vocab=self.model.n_vocab)
        for token in job.prompt_ids[-job.params.penalty_last_n:] if job.params.penalty_last_n > 0 else ():
            slot.sampler.accept(token)
        slot.decoder = IncrementalDecoder(self.model.codec)
        slot.held = ""
        self.metrics.prompt_tokens_cached += keep

    def _step(self) -> None:
        """One batch: every generating slot's next token, then prompt chunks up to the budget."""
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled:
                self.metrics.requests_cancelled += 1
                self._release(slot)
        tokens, seq_ids, positions, want, takes = [], [], [], [], []
        owners: list[Slot] = []  # the slot of each logits row, in batch order
        for slot in self.slots:
            if slot.job is not None and not slot.pending:
                tokens.append(slot.next_token)
                seq_ids.append(slot.index)
                positions.append(len(slot.cached))
                want.append(True)
                owners.append(slot)
                takes.append((slot, [slot.next_token]))
        budget = self.prompt_chunk
        for slot in sorted((s for s in self.slots if s.job is not None and s.pending), key=lambda s: s.job.id):
            if budget == 0:
                break
            chunk = slot.pending[:budget]
            budget -= len(chunk)
            start = len(slot.cached)
            tokens += chunk
            seq_ids += [slot.index] * len(chunk)
            positions += range(start, start + len(chunk))
            last = len(chunk) == len(slot.pending)
            want += [False] * (len(chunk) - 1) + [last]
            if last:
                owners.append(slot)
            takes.append((slot, chunk))
        if not tokens:
            return
        try:
            logits = self.context.decode(tokens, seq_ids, positions, want_logits=want)
        except Exception as exc:  # a failed batch changes no cache: fail its jobs, keep serving
            for slot, _ in takes:
                self._send(slot.job, Failed(f"evaluation failed: {exc}"))
                self.metrics.requests_failed += 1
                self._release(slot)
            return
        for slot, chunk in takes:
            slot.cached += chunk
            if slot.pending:
                slot.pending = slot.pending[len(chunk):]
        self.metrics.decode_steps += 1
        now = time.monotonic()
        generated = 0
        for slot, row in zip(owners, logits):
            generated += self._sample(slot, row)
        self.metrics.generated_tokens += generated
        if generated:
            self.metrics.recent.append((now, generated))

    def _sample(self, slot: Slot, logits: np.ndarray) -> int:
        """Samples the slot's next token and sends what it releases; returns 1 if a token was generated
        (not a stop token). The same decisions as Model.stream_generate, one slot at a time."""
        job = slot.job
        token = slot.sampler.sample(logits)
        slot.sampler.accept(token)
        generated = token not in self.model.stop_ids
        finish = None if generated else "stop"
        if generated:
            slot.n_generated += 1
            if job.logprobs is not None:
                slot.unsent.append(self._logprob(logits, token, job.logprobs))
            slot.held += slot.decoder.push(token)
            # the token is evaluated next step at position len(cached): it needs a free position
            if slot.n_generated >= job.max_tokens or len(slot.cached) >= self.n_ctx:
                finish = "length"
        if finish is not None:
            slot.held += slot.decoder.flush()
        text, slot.held, matched = _split_stop(slot.held, list(job.stop))
        if matched:
            finish = "stop"
        elif finish is not None:
            text, slot.held = text + slot.held, ""  # the end: held text can no longer become a stop string
        if finish is not None:
            self._finish(slot, finish, text, new_token=generated)
        else:
            # one Delta per token, even with no text yet (a partial character, a possible stop string):
            # streams then have one chunk per token, as OpenAI's do
            self._send(job, Delta(text, slot.unsent))
            slot.unsent = []
            slot.next_token = token
        return int(generated)

    def _logprob(self, logits: np.ndarray, token: int, n_top: int) -> TokenLogprob:
        lp = self.model._logprobs(logits, token, n_top)
        top = [(i, self._token_text(i), value) for i, value in lp.top]
        return TokenLogprob(token, self._token_text(token), lp.logprob, top)

    def _token_text(self, token: int) -> str:
        return self.model.codec.decode([token])

    def _finish(self, slot: Slot, reason: str, text: str, new_token: bool) -> None:
        job = slot.job
        if new_token or text:
            self._send(job, Delta(text, slot.unsent))
        usage = Usage(len(job.prompt_ids), slot.n_generated, slot.cached_prompt)
        self._send(job, Finished(reason, usage))
        self._release(slot)

    def _release(self, slot: Slot) -> None:
        slot.job = None
        slot.pending = []
        slot.unsent = []
        slot.sampler = None
        slot.last_used = time.monotonic()

    def _send(self, job: Job, event: Event) -> None:
        if job.cancelled:
            return
        try:
            job.sink(event)
        except Exception:  # a sink whose client is gone must not stop the scheduler
            job.cancel()
