"""`bitnet-run bench-serve` against a running demo server: its counts agree with the server's metrics."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bitnet_run.cli import app
from serving import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("bench-serve"), "--parallel", "2").wait_ready()
    yield srv
    srv.stop()


def test_bench_serve_counts_what_the_server_generated(server):
    before = {name: server.metric(name) for name in ("requests_total", "generated_tokens_total")}
    result = CliRunner().invoke(app, ["bench-serve", "--url", f"demo={server.url}", "--concurrency", "1,2",
                                      "--duration", "1", "-p", "8", "-n", "12", "--no-warmup", "-o", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [(r["server"], r["concurrency"]) for r in rows] == [("demo", 1), ("demo", 2)]
    assert sum(r["requests"] for r in rows) == server.metric("requests_total") - before["requests_total"]
    assert sum(r["output_tokens"] for r in rows) == (server.metric("generated_tokens_total")
                                                      - before["generated_tokens_total"])
    for r in rows:
        assert r["errors"] == 0 and r["requests"] >= 1
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and 0 < r["itl_p50_ms"] <= r["itl_p99_ms"]
        assert r["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / r["seconds"])


def test_bench_serve_reports_errors_instead_of_failing(server):
    result = CliRunner().invoke(app, ["bench-serve", "--url", f"{server.url}/nothing", "--concurrency", "1",
                                      "--duration", "0.5", "--no-warmup", "-o", "json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["rows"]
    assert row["errors"] >= 1 and row["requests"] == 0 and "404" in row["first_error"]


def test_bench_serve_needs_a_target():
    result = CliRunner().invoke(app, ["bench-serve"])
    assert result.exit_code == 1 and "--url" in result.stderr


class _FakeTokenizeEndpoint:
    """llama-cpp-python's POST /extras/tokenize for a vocabulary where `prefix` tokens (BOS, the
    SentencePiece space prefix) come before `per_char` tokens per character."""

    def __init__(self, prefix: int, per_char: int = 1):
        self.prefix, self.per_char, self.calls = prefix, per_char, 0

    def __call__(self, url, json, timeout):
        import httpx

        assert url.endswith("/extras/tokenize")
        self.calls += 1
        n = self.prefix + self.per_char * len(json["input"])
        return httpx.Response(200, json={"tokens": list(range(n))})


@pytest.mark.parametrize("prefix", [1, 4])
@pytest.mark.parametrize("n_tokens", [5, 8, 32])
def test_text_prompt_has_exactly_the_token_count(monkeypatch, prefix, n_tokens):
    from bitnet_run.bench import serve as bs

    fake = _FakeTokenizeEndpoint(prefix)
    monkeypatch.setattr("httpx.post", fake)
    target = bs.Target("peer", "http://127.0.0.1:1", text_prompts=True)
    body = bs.target_body(target, bs.prompt_tokens(n_tokens), 16)
    assert len(body["prompt"]) + prefix == n_tokens and body["min_tokens"] == body["max_tokens"] == 16
    assert fake.calls <= 3


def test_text_prompt_that_cannot_be_matched_is_one_error(monkeypatch):
    from bitnet_run.bench import serve as bs

    monkeypatch.setattr("httpx.post", _FakeTokenizeEndpoint(prefix=1, per_char=2))  # even counts unreachable
    with pytest.raises(bs.BenchServeError, match="exactly 8 tokens"):
        bs.text_prompt_of_length(bs.Target("peer", "http://127.0.0.1:1"), 8)


def test_token_id_targets_get_the_ids(monkeypatch):
    from bitnet_run.bench import serve as bs

    ids = bs.prompt_tokens(6)
    body = bs.target_body(bs.Target("ours", "http://127.0.0.1:1"), ids, 4)
    assert body["prompt"] == ids and "min_tokens" not in body
