"""The OpenAI-compatible HTTP API (FastAPI) over one continuous-batching Engine."""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import jinja2
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..sampling import SamplingParams
from . import protocol as pr
from .engine import PROMPT_CHUNK, Delta, Engine, EngineNotReady, Failed, Finished, Job, QueueFullError, Usage
from .metrics import render_metrics

RETRY_AFTER_S = 1
# llama.cpp's server defaults for sampling fields a request leaves unset
DEFAULTS = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0)


@dataclass
class ServeConfig:
    model_path: Path
    model_name: str | None = None  # the id in /v1/models and responses; default: the file's stem
    n_parallel: int = 4
    n_ctx: int | None = None  # positions per slot
    n_threads: int | None = None
    kv_type: str = "f16"
    api_key: str | None = None
    max_queue: int = 64
    prompt_chunk: int = PROMPT_CHUNK

    @property
    def name(self) -> str:
        return self.model_name or Path(self.model_path).stem

    def engine(self) -> Engine:
        return Engine(self.model_path, n_parallel=self.n_parallel, n_ctx=self.n_ctx, n_threads=self.n_threads,
                      kv_type=self.kv_type, max_queue=self.max_queue, prompt_chunk=self.prompt_chunk)


def create_app(config: ServeConfig) -> FastAPI:
    """The app; its lifespan starts the engine (the model loads in the background: /health says
    "loading" until it is ready) and stops it at shutdown."""
    engine = config.engine()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="bitnet-run", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.config = config

    @app.exception_handler(pr.APIError)
    async def api_error(_request, exc: pr.APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(pr.APIError(exc.status_code, str(exc.detail), kind=kind).body(),
                            status_code=exc.status_code)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise pr.APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                              kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorize)]

    @app.get("/health")
    async def health():
        if engine.state == "ok":
            return {"status": "ok", "slots_idle": config.n_parallel - engine.busy_slots,
                    "slots_processing": engine.busy_slots}
        if engine.state == "loading":
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"status": "error", "error": engine.error}, status_code=500)

    @app.get("/metrics", dependencies=auth)
    async def metrics():
        return PlainTextResponse(render_metrics(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=auth)
    async def models():
        meta = {"n_parallel": config.n_parallel}
        if engine.state == "ok":
            meta.update(n_ctx=engine.n_ctx, n_vocab=engine.model.n_vocab, n_params=engine.model.n_params)
        return {"object": "list", "data": [{"id": config.name, "object": "model", "created": 0,
                                            "owned_by": "bitnet-run", "meta": meta}]}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request):
        req = pr.parse(pr.ChatRequest, await request.body())
        model = _ready(engine)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            # special-token text typed into a message stays text (Model.tokenize_chat)
            prompt_ids = model.tokenize_chat(messages)
        except (jinja2.TemplateError, ValueError) as exc:
            raise pr.APIError(400, f"messages: the chat template cannot render them: {exc}", "messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        n_logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise pr.APIError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        fmt = _ChatFormat(config.name, model)
        return await _complete(request, engine, req, prompt_ids, max_tokens, n_logprobs, fmt, "messages")

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        req = pr.parse(pr.CompletionRequest, await request.body())
        model = _ready(engine)
        if req.echo:
            raise pr.APIError(400, "echo: echoing the prompt is not supported", "echo")
        prompt_ids = _completion_prompt(req.prompt, model)
        max_tokens = req.max_tokens if req.max_tokens is not None else 16  # OpenAI's default
        fmt = _CompletionFormat(config.name, model)
        return await _complete(request, engine, req, prompt_ids, max_tokens, req.logprobs, fmt, "prompt")

    return app


def _ready(engine: Engine):
    if engine.state == "loading":
        raise pr.APIError(503, "the model is loading", kind="unavailable_error",
                          headers={"Retry-After": str(RETRY_AFTER_S)})
    if engine.state == "error":
        raise pr.APIError(500, f"the model failed to load: {engine.error}", kind="server_error")
    return engine.model


def _completion_prompt(prompt, model) -> list[int]:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise pr.APIError(400, f"prompt: one prompt per request (n = 1), got {len(prompt)}", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return model.tokenize(prompt)
    bad = [t for t in prompt if not 0 <= t < model.n_vocab]
    if bad:
        raise pr.APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {model.n_vocab})", "prompt")
    return list(prompt)


def _sampling_params(req: pr._Sampling, n_vocab: int) -> SamplingParams:
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise pr.APIError(400, f"logit_bias: key {key!r} is not a token id", "logit_bias") from None
        if not 0 <= token < n_vocab:
            raise pr.APIError(400, f"logit_bias: token id {token} is outside the vocabulary [0, {n_vocab})",
                              "logit_bias")
        bias[token] = value
    fields = {name: getattr(req, name) for name in DEFAULTS}
    try:
        return SamplingParams(
            **{name: DEFAULTS[name] if value is None else value for name, value in fields.items()},
            seed=req.seed if req.seed is not None and req.seed >= 0 else None,
            frequency_penalty=req.frequency_penalty or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            logit_bias=bias or None,
        )
    except ValueError as exc:
        raise pr.APIError(400, str(exc), str(exc).split(" ", 1)[0]) from None


async def _complete(request: Request, engine: Engine, req, prompt_ids, max_tokens, n_logprobs, fmt, prompt_param):
    if req.n not in (None, 1):
        raise pr.APIError(400, f"n: only n = 1 is supported, got {req.n}", "n")
    if max_tokens is None:
        max_tokens = engine.n_ctx
    params = _sampling_params(req, engine.model.n_vocab)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = Job(prompt_ids, max_tokens, params, sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
              stop=req.stop_list(), logprobs=n_logprobs)
    try:
        engine.submit(job)
    except QueueFullError as exc:
        raise pr.APIError(503, str(exc), kind="unavailable_error", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except EngineNotReady as exc:
        raise pr.APIError(503, str(exc), kind="unavailable_error", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except ValueError as exc:
        raise pr.APIError(400, f"{prompt_param}: {exc}", prompt_param) from None
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _EventStream(_sse(events, fmt, include_usage), engine, job)
    return await _collect(request, engine, job, events, fmt)


def _sse_line(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(events: asyncio.Queue, fmt, include_usage: bool):
    first = fmt.start_chunk()
    if first is not None:
        yield _sse_line(fmt.with_usage(first, include_usage))
    while True:
        event = await events.get()
        if isinstance(event, Delta):
            yield _sse_line(fmt.with_usage(fmt.delta_chunk(event), include_usage))
        elif isinstance(event, Finished):
            yield _sse_line(fmt.with_usage(fmt.finish_chunk(event.reason), include_usage))
            if include_usage:
                yield _sse_line(fmt.usage_chunk(event.usage))
            break
        else:
            yield _sse_line(pr.APIError(500, event.message, kind="server_error").body())
            break
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events that cancel their job when the client goes away (noticed while waiting for
    the next event, not only at the next write) or when the stream ends for any other reason."""

    def __init__(self, content, engine: Engine, job: Job):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.engine, self.job = engine, job

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as group:

                async def stream():
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client closed the connection during a write
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self.engine.cancel(self.job)


async def _collect(request: Request, engine: Engine, job: Job, events: asyncio.Queue, fmt):
    """The whole answer of a non-streaming request; a client that disconnects first cancels the job."""

    async def gather():
        deltas = []
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                deltas.append(event)
            else:
                return deltas, event

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answer, gone = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answer.done():
            answer.cancel()
            engine.cancel(job)
    if not answer.done() or answer.cancelled():
        return JSONResponse(pr.APIError(499, "the client disconnected").body(), status_code=499)
    deltas, end = answer.result()
    if isinstance(end, Failed):
        status = 503 if "shutting down" in end.message else 500
        raise pr.APIError(status, end.message, kind="server_error")
    return fmt.response(deltas, end)


# ---- response objects -----------------------------------------------------------------------------
def _usage(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


class _Format:
    """Shared parts of the chat and text-completion objects (one id and timestamp per request)."""

    object_name = ""
    chunk_name = ""
    id_prefix = ""

    def __init__(self, model_name: str, model):
        self.model_name, self.model = model_name, model
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def envelope(self, name: str, choice: dict) -> dict:
        return {"id": self.id, "object": name, "created": self.created, "model": self.model_name,
                "system_fingerprint": f"bitnet-run-{__version__}", "choices": [choice]}

    def with_usage(self, chunk: dict, include_usage: bool) -> dict:
        if include_usage:  # OpenAI: every chunk carries "usage": null, the last one the totals
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, usage: Usage) -> dict:
        chunk = self.envelope(self.chunk_name, {})
        chunk["choices"] = []
        chunk["usage"] = _usage(usage)
        return chunk

    def response(self, deltas: list[Delta], end: Finished) -> dict:
        text = "".join(d.text for d in deltas)
        tokens = [t for d in deltas for t in d.logprobs]
        body = self.envelope(self.object_name, self.choice(text, tokens, end.reason))
        body["usage"] = _usage(end.usage)
        return body


class _ChatFormat(_Format):
    object_name, chunk_name, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    @staticmethod
    def _entry(token_text: str, logprob: float) -> dict:
        return {"token": token_text, "logprob": logprob, "bytes": list(token_text.encode())}

    def logprobs(self, tokens) -> dict | None:
        if not tokens:
            return None
        return {"content": [dict(self._entry(t.text, t.logprob),
                                 top_logprobs=[self._entry(text, lp) for _, text, lp in t.top]) for t in tokens]}

    def choice(self, text, tokens, reason) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": self.logprobs(tokens),
                "finish_reason": reason}

    def start_chunk(self):
        return self.envelope(self.chunk_name, {"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None})

    def delta_chunk(self, delta: Delta) -> dict:
        return self.envelope(self.chunk_name, {"index": 0, "delta": {"content": delta.text},
                                               "logprobs": self.logprobs(delta.logprobs), "finish_reason": None})

    def finish_chunk(self, reason: str) -> dict:
        return self.envelope(self.chunk_name, {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason})


class _CompletionFormat(_Format):
    object_name, chunk_name, id_prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, model_name: str, model):
        super().__init__(model_name, model)
        self.offset = 0  # characters of token text so far (text_offset of the legacy logprobs object)

    def logprobs(self, tokens) -> dict | None:
        if not tokens:
            return None
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t.text)
        return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{text: lp for _, text, lp in t.top} for t in tokens], "text_offset": offsets}

    def choice(self, text, tokens, reason) -> dict:
        return {"index": 0, "text": text, "logprobs": self.logprobs(tokens), "finish_reason": reason}

    def start_chunk(self):
        return None

    def delta_chunk(self, delta: Delta) -> dict:
        return self.envelope(self.chunk_name, self.choice(delta.text, delta.logprobs, None))

    def finish_chunk(self, reason: str) -> dict:
        return self.envelope(self.chunk_name, self.choice("", [], reason))
