"""The bitnet-run command line, driven as a user would."""
from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from bitnet_run import __version__
from bitnet_run.cli import app

runner = CliRunner()


def test_version_from_the_installed_script():
    result = subprocess.run(["bitnet-run", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"bitnet-run {__version__}"


def test_run_prints_text_and_tokens_per_second(tiny_model):
    result = runner.invoke(app, ["run", "-m", str(tiny_model.path), "-p", "Hello", "-n", "8", "-t", "1",
                                 "--temp", "0", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Hello")
    assert "tokens/s" in result.stderr and "prompt eval" in result.stderr


def test_generate_alias_and_prompt_file(tiny_model, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once")
    args = ["-m", str(tiny_model.path), "-n", "6", "--temp", "0", "--no-display-prompt"]
    a = runner.invoke(app, ["generate", "-f", str(prompt), *args])
    b = runner.invoke(app, ["run", "-p", "Once", *args])
    assert a.exit_code == 0 and b.exit_code == 0
    assert a.stdout == b.stdout


def test_bad_sampling_parameter_is_one_line(tiny_model):
    result = runner.invoke(app, ["run", "-m", str(tiny_model.path), "-p", "x", "--top-p", "1.5"])
    assert result.exit_code == 1
    assert "top_p" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_model_is_one_line(tmp_path):
    result = runner.invoke(app, ["run", "-m", str(tmp_path / "nope.bnr"), "-p", "x"])
    assert result.exit_code == 1 and "nope.bnr" in result.stderr


def test_prompt_too_long_is_one_line(tiny_model):
    result = runner.invoke(app, ["run", "-m", str(tiny_model.path), "-p", "word " * 100, "-c", "32"])
    assert result.exit_code == 1 and "context" in result.stderr


def test_show_lists_metadata_and_tensors(tiny_model):
    result = runner.invoke(app, ["show", str(tiny_model.path)])
    assert result.exit_code == 0, result.output
    assert "bitnet.hidden_size" in result.stdout and "q_proj" in result.stdout and "I2" in result.stdout


def test_convert_command(tiny_model, tmp_path):
    out = tmp_path / "again.bnr"
    result = runner.invoke(app, ["convert", str(tiny_model.checkpoint), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == tiny_model.path.read_bytes()


def test_convert_command_weights_encoding(tiny_model, tmp_path):
    from bitnet_run import fileformat as ff

    out = tmp_path / "tl2.bnr"
    result = runner.invoke(app, ["convert", str(tiny_model.checkpoint), "-o", str(out), "--weights", "tl2"])
    assert result.exit_code == 0, result.output
    encodings = {t.encoding for t in ff.read_header(out).tensors if t.name.endswith("proj.weight")}
    assert encodings == {ff.ENCODING_TL2}
    result = runner.invoke(app, ["convert", str(tiny_model.checkpoint), "-o", str(tmp_path / "x.bnr"), "--weights", "q4"])
    assert result.exit_code != 0 and not (tmp_path / "x.bnr").exists()


def test_convert_refuses_unknown_architecture(tiny_model, tmp_path):
    import json
    import shutil

    src = tmp_path / "llama"
    shutil.copytree(tiny_model.checkpoint, src)
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "x.bnr")])
    assert result.exit_code == 1 and "llama" in result.stderr
    assert not (tmp_path / "x.bnr").exists()


def test_chat_session(tiny_model):
    script = "hello\n/reset\nagain\n/exit\n"
    result = runner.invoke(app, ["chat", "-m", str(tiny_model.path), "-n", "4", "--temp", "0"], input=script)
    assert result.exit_code == 0, result.output
    assert "conversation cleared" in result.stderr


def test_convert_command_head_q8(tiny_model, tmp_path):
    from bitnet_run import Model
    from bitnet_run import fileformat as ff

    out = tmp_path / "q8.bnr"
    result = runner.invoke(app, ["convert", str(tiny_model.checkpoint), "-o", str(out), "--head", "q8"])
    assert result.exit_code == 0, result.output
    assert ff.read_header(out).tensor("model.embed_tokens.weight").encoding == ff.ENCODING_Q8R
    assert Model(out, n_threads=1) is not None
    result = runner.invoke(app, ["convert", str(tiny_model.checkpoint), "-o", str(tmp_path / "x.bnr"), "--head", "q4"])
    assert result.exit_code != 0 and not (tmp_path / "x.bnr").exists()
