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
