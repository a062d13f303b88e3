"""bitnet_run/bench/plot.py on the JSON of a real (tiny) `bitnet-run bench` run: it writes a PNG, and refuses
input that is not bench output or that would draw one point twice. Nothing here looks at the pixels."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bitnet_run.cli import app

PLOT = Path(__file__).resolve().parents[1] / "bitnet_run" / "bench" / "plot.py"


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    """Two encodings x two thread counts x pp and tg, so that every panel has lines to draw."""
    root = tmp_path_factory.mktemp("plot")
    result = CliRunner().invoke(app, ["bench", "--synthetic", "tiny", "--weights", "i2,tl2", "--cache-dir", str(root),
                                      "-p", "8", "-n", "4", "-r", "1", "-t", "1,2", "--membw-mib", "16", "-o", "json"])
    assert result.exit_code == 0, result.output
    path = root / "tiny.json"
    path.write_text(result.stdout)
    return path


def _plot(*args):
    return subprocess.run([sys.executable, str(PLOT), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_plot_writes_a_png(bench_json, tmp_path):
    out = tmp_path / "bench.png"
    result = _plot(bench_json, "-o", out, "--threads", "1", "--size", "bytes", "--threads-model", "synthetic tiny")
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


@pytest.mark.parametrize("case, message", [
    ("not_bench", "not the output of `bitnet-run bench -o json`"),
    ("twice", "appears twice"),
    ("threads", "--threads 3: no rows at that thread count (the data has 1, 2)"),
    ("model", "--threads-model 'nope': no rows of that model (the data has synthetic tiny)"),
])
def test_plot_errors_are_one_line(bench_json, tmp_path, case, message):
    inputs = {"not_bench": [tmp_path / "other.json"], "twice": [bench_json, bench_json], "threads": [bench_json],
              "model": [bench_json]}[case]
    (tmp_path / "other.json").write_text('{"runtime": "x"}')
    extra = {"threads": ["--threads", "3"], "model": ["--threads-model", "nope"]}.get(case, [])
    result = _plot(*inputs, "-o", tmp_path / "out.png", *extra)
    assert result.returncode == 1 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out.png").exists()
