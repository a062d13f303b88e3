"""Progress bars and errors on stderr: no bar when stderr is not a terminal; an error that happens
while a bar is live gets a line of its own after the bar has stopped."""
from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from bitnet_run import cli
from bitnet_run.cli import app
from bitnet_run.convert.checkpoint import Checkpoint

runner = CliRunner()
DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "demo"


def test_no_bar_when_stderr_is_not_a_terminal(tmp_path):
    result = runner.invoke(app, ["convert", str(DEMO_CHECKPOINT), "-o", str(tmp_path / "a.bnr")])
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("wrote ") and "converting" not in result.stderr


def test_error_after_the_bar_on_its_own_line(tmp_path, monkeypatch):
    src = tmp_path / "bad"
    shutil.copytree(DEMO_CHECKPOINT, src)
    entry = Checkpoint(src).tensors["model.layers.5.mlp.down_proj.weight"]  # late in the file: the bar is live
    with open(entry.file, "r+b") as f:
        f.seek(entry.start)
        f.write(b"\xff")  # code 3: not a ternary value
    terminal = io.StringIO()
    monkeypatch.setattr(cli, "err_console", Console(file=terminal, force_terminal=True, width=120))
    result = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "b.bnr")])
    assert result.exit_code == 1
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.getvalue())
    lines = [line for line in re.split(r"[\r\n]", text) if line.strip()]
    assert "converting" in text  # the bar was drawn
    assert lines[-1].startswith("error: ") and "down_proj" in lines[-1]
    assert not any("converting" in line and "error" in line for line in lines)
