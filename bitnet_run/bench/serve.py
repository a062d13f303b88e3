"""`bitnet-run bench-serve`: a load test of OpenAI-compatible servers.

N clients each send streaming /v1/completions requests back to back for a fixed time; every request
has the same prompt (token ids; for llama-cpp-python's server, which takes text only, a text of as
many tokens) and max_tokens, greedy. Reported per server and concurrency:
requests/s, aggregate output tokens/s (all tokens of the requests that started in the window over
the time until the last of them ended), time to first token and inter-token latency p50/p99, and
errors. Servers are measured interleaved (concurrency by concurrency), so a machine whose load
changes affects them alike.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import numpy as np

READY_TIMEOUT_S = 600  # loading a 2B model from a cold page cache on a busy machine
REQUEST_TIMEOUT_S = 600


class BenchServeError(Exception):
    """Bad arguments or a server that does not start; one line."""


@dataclass
class Target:
    label: str
    url: str  # base URL, without /v1
    api_key: str | None = None
    # llama-cpp-python's server: takes text prompts only (no token ids), and has /extras/tokenize
    text_prompts: bool = False


@dataclass
class RequestRecord:
    start: float
    end: float = 0.0
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


@dataclass
class Row:
    server: str
    concurrency: int
    seconds: float
    requests: int
    errors: int
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    first_error: str | None = None


# ---- servers started by the benchmark -----------------------------------------------------------------
class Launched:
    """A server subprocess with its output in a log file; `wait_ready` polls GET /health."""

    def __init__(self, cmd: list[str], port: int, log_path: Path, cwd: Path | None = None):
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S, health: str = "/health") -> "Launched":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchServeError(f"the server exited with status {self.proc.returncode}; its log "
                                      f"{self.log_path} ends: {self.log()[-400:]!r}")
            try:
                if httpx.get(self.url + health, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise BenchServeError(f"the server was not ready within {timeout:.0f} s (log: {self.log_path})")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ours(model: Path, threads: int, parallel: int, n_ctx: int, log_dir: Path) -> Launched:
    port = free_port()
    cmd = [sys.executable, "-m", "bitnet_run.cli", "serve", "-m", str(model), "--port", str(port),
           "-t", str(threads), "--parallel", str(parallel), "-c", str(n_ctx)]
    return Launched(cmd, port, log_dir / f"bitnet-run-serve-{port}.log")


def llamacpp_python() -> str:
    """An interpreter that has llama-cpp-python's server (this one, else python3 on PATH)."""
    for exe in (sys.executable, "python3"):
        probe = subprocess.run([exe, "-c", "import llama_cpp.server"], capture_output=True)
        if probe.returncode == 0:
            return exe
    raise BenchServeError("llama.cpp's server needs llama-cpp-python with its server extra: "
                          "pip install 'llama-cpp-python[server]'")


def launch_llamacpp(gguf: Path, threads: int, n_ctx: int, log_dir: Path) -> Launched:
    """llama-cpp-python's server. It evaluates one request at a time, and by default a new request
    interrupts the stream in progress (whose client then gets a cut-off completion):
    --interrupt_requests False makes concurrent requests wait their turn instead, so that every
    request is served whole, as with bitnet-run's server."""
    port = free_port()
    cmd = [llamacpp_python(), "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
           "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--n_ctx", str(n_ctx), "--interrupt_requests", "False"]
    return Launched(cmd, port, log_dir / f"llama-cpp-server-{port}.log")


# ---- the load -------------------------------------------------------------------------------------------
async def _one_request(http: httpx.AsyncClient, target: Target, body: dict) -> RequestRecord:
    record = RequestRecord(start=time.perf_counter())
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    usage_tokens = None
    try:
        async with http.stream("POST", f"{target.url}/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                record.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        record.error = str(chunk["error"].get("message", chunk["error"]))[:200]
                        break
                    if chunk.get("usage"):
                        usage_tokens = chunk["usage"].get("completion_tokens")
                    for choice in chunk.get("choices") or []:
                        # a token's chunk; a closing chunk (finish_reason, no text) is not one
                        if choice.get("finish_reason") is None or choice.get("text"):
                            record.token_times.append(time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:200]
    record.end = time.perf_counter()
    record.tokens = usage_tokens if usage_tokens is not None else len(record.token_times)
    return record


async def _load(target: Target, concurrency: int, seconds: float, body: dict) -> tuple[list[RequestRecord], float]:
    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
        start = time.perf_counter()
        deadline = start + seconds

        async def client():
            while time.perf_counter() < deadline:
                records.append(await _one_request(http, target, body))

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return records, time.perf_counter() - start


async def _warmup(target: Target, body: dict) -> RequestRecord:
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as http:
        return await _one_request(http, target, body)


def _percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1e3) if values else float("nan")


def summarize(label: str, concurrency: int, records: list[RequestRecord], wall: float) -> Row:
    ok = [r for r in records if r.error is None]
    ttft = [r.token_times[0] - r.start for r in ok if r.token_times]
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    tokens = sum(r.tokens for r in ok)
    errors = [r.error for r in records if r.error is not None]
    return Row(label, concurrency, wall, len(ok), len(errors), len(ok) / wall, tokens, tokens / wall,
               _percentile_ms(ttft, 50), _percentile_ms(ttft, 99), _percentile_ms(itl, 50), _percentile_ms(itl, 99),
               errors[0] if errors else None)


def request_body(prompt_ids: list[int], max_tokens: int) -> dict:
    return {"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}


MAX_TOKENIZE_PROBES = 64


def text_prompt_of_length(target: Target, n_tokens: int) -> str:
    """A text that the target's /extras/tokenize (llama-cpp-python's server) turns into exactly n_tokens
    tokens, its BOS included: "a" repeated, one byte token per "a" in the benchmark's dummy GGUF
    vocabulary, the count found by probing (at most MAX_TOKENIZE_PROBES requests)."""
    def count(k: int) -> int:
        r = httpx.post(f"{target.url}/extras/tokenize", json={"input": "a" * k}, timeout=60)
        if r.status_code != 200:
            raise BenchServeError(f"{target.label} ({target.url}): POST /extras/tokenize gave HTTP {r.status_code}")
        return len(r.json()["tokens"])

    k = n_tokens
    for _ in range(MAX_TOKENIZE_PROBES):
        got = count(k)
        if got == n_tokens:
            return "a" * k
        if k == 0 and got > n_tokens:
            break
        k = max(k - (got - n_tokens), 0) if got > n_tokens else k + (n_tokens - got)
    raise BenchServeError(f"{target.label}: no text prompt of exactly {n_tokens} tokens found "
                          f"(\"a\" * {k} gives {got})")


def target_body(target: Target, prompt_ids: list[int], max_tokens: int) -> dict:
    """The request every client of this target sends: the prompt token ids, or for a server that takes
    only text, a text of as many tokens with `min_tokens` = max_tokens (no early end-of-text: every
    server generates the same number of tokens)."""
    body = request_body(prompt_ids, max_tokens)
    if target.text_prompts:
        body.update(prompt=text_prompt_of_length(target, len(prompt_ids)), min_tokens=max_tokens)
    return body


def run(targets: list[Target], concurrency: list[int], seconds: float, prompt_ids: list[int], max_tokens: int,
        warmup: bool = True, log: Callable[[str], None] = lambda _: None) -> list[Row]:
    """Every target at every concurrency, interleaved; one untimed request per target first."""
    bodies = [target_body(target, prompt_ids, max_tokens) for target in targets]
    if warmup:
        for target, body in zip(targets, bodies):
            record = asyncio.run(_warmup(target, body))
            if record.error:
                raise BenchServeError(f"{target.label} ({target.url}): the warm-up request failed: {record.error}")
    rows = []
    for c in concurrency:
        for target, body in zip(targets, bodies):
            log(f"{target.label}: {c} concurrent stream(s) for {seconds:g} s")
            records, wall = asyncio.run(_load(target, c, seconds, body))
            rows.append(summarize(target.label, c, records, wall))
    return rows


# ---- reports ---------------------------------------------------------------------------------------------
COLUMNS = [("server", "server"), ("concurrency", "streams"), ("requests", "requests"), ("errors", "errors"),
           ("requests_per_s", "req/s"), ("output_tokens_per_s", "out tok/s"), ("ttft_p50_ms", "TTFT p50 ms"),
           ("ttft_p99_ms", "TTFT p99 ms"), ("itl_p50_ms", "ITL p50 ms"), ("itl_p99_ms", "ITL p99 ms")]


def format_rows(rows: list[Row], output: str, meta: dict | None = None) -> str:
    if output == "json":
        return json.dumps({"meta": meta or {}, "rows": [asdict(r) for r in rows]}, indent=2) + "\n"
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"]
    for row in rows:
        cells = []
        for name, _ in COLUMNS:
            value = getattr(row, name)
            cells.append(f"{value:.2f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    base = {r.server: r.output_tokens_per_s for r in rows if r.concurrency == 1}
    notes = [f"{r.server}: {r.concurrency} streams = {r.output_tokens_per_s / base[r.server]:.2f}x its 1-stream "
             f"aggregate tokens/s" for r in rows if r.concurrency > 1 and base.get(r.server)]
    errors = [f"{r.server} at {r.concurrency}: {r.errors} errors, first: {r.first_error}" for r in rows if r.errors]
    return "\n".join(lines + [""] + notes + errors) + "\n"


def prompt_tokens(n: int, low: int = 3, high: int = 256, seed: int = 0) -> list[int]:
    """n token ids valid in every vocabulary the benchmark uses (synthetic word-level and GGUF)."""
    return [int(t) for t in np.random.default_rng(seed).integers(low, high, size=n)]


def machine_facts() -> dict:
    from .runner import cpu_name, kernels_name

    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "kernels": kernels_name()}
