"""The bitnet-run command line, driven as a user would."""
from __future__ import annotations

import subprocess
import sys

import pytest
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
    import numpy as np
    import torch

    from bitnet_run import Model
    from bitnet_run import fileformat as ff
    from checkpoints import load_reference

    out = tmp_path / "q8.bnr"
    result = runner.invoke(app, ["convert", str(tiny_model.checkpoint), "-o", str(out), "--head", "q8"])
    assert result.exit_code == 0, result.output
    assert ff.read_header(out).tensor("model.embed_tokens.weight").encoding == ff.ENCODING_Q8R
    # the q8 file computes with the q8 head: its logits are transformers' with the embedding replaced by
    # the dequantized Q8_R rows, within test_parity's whole-model bounds for the bulk (p90) and argmax (the
    # tight median bound does not apply: the q8 head also rounds the final hidden state to int8)
    header = ff.read_header(out)
    embed = header.tensor("model.embed_tokens.weight")
    q, scale = ff.unpack_q8r(ff.read_tensor(header, embed.name), *embed.dims)
    reference = load_reference(tiny_model.checkpoint)
    with torch.no_grad():
        reference.get_input_embeddings().weight.copy_(torch.from_numpy(q.astype(np.float32) * scale[:, None]))
    ids = tiny_model.model.tokenize("Once upon a time there was a model")
    ours = Model(out, n_threads=1).logits(ids)
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0].float().numpy()
    per_token = np.abs(ours - ref).max(axis=1) / np.abs(ref).max()
    assert np.percentile(per_token, 90) <= 0.02 and per_token.max() <= 0.10
    result = runner.invoke(app, ["convert", str(tiny_model.checkpoint), "-o", str(tmp_path / "x.bnr"), "--head", "q3"])
    assert result.exit_code != 0 and not (tmp_path / "x.bnr").exists()


@pytest.mark.parametrize("head", ["q6", "q4"])
def test_convert_command_head_q6_q4(tiny_model, tmp_path, head):
    """--head q6 / q4 write a Q6_B / Q4_B head (the kernels and logits: tests/test_quant_heads.py) that runs."""
    from bitnet_run import fileformat as ff

    out = tmp_path / f"{head}.bnr"
    result = runner.invoke(app, ["convert", str(tiny_model.checkpoint), "-o", str(out), "--head", head])
    assert result.exit_code == 0, result.output
    assert ff.read_header(out).tensor("model.embed_tokens.weight").encoding == ff.HEAD_ENCODINGS[head]
    result = runner.invoke(app, ["run", "-m", str(out), "-p", "Once", "-n", "4", "--temp", "0"])
    assert result.exit_code == 0, result.output


def test_run_stop_string_and_cache_type(tiny_model):
    args = ["run", "-m", str(tiny_model.path), "-p", "Once", "-n", "16", "--temp", "0", "--no-display-prompt"]
    full = runner.invoke(app, args)
    assert full.exit_code == 0, full.output
    text = full.stdout.rstrip("\n")
    stop = text[3:5]
    assert len(stop) == 2 and text.index(stop) >= 1
    cut = runner.invoke(app, [*args, "--stop", "\x00never", "--stop", stop])
    assert cut.exit_code == 0, cut.output
    assert cut.stdout == text[: text.index(stop)] + "\n"
    f32 = runner.invoke(app, [*args, "--cache-type", "f32"])
    assert f32.exit_code == 0, f32.output
    bad = runner.invoke(app, [*args, "--cache-type", "q4"])
    assert bad.exit_code == 1 and "--cache-type" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_speed_line_reports_end_to_end_and_eval(tiny_model):
    result = runner.invoke(app, ["run", "-m", str(tiny_model.path), "-p", "Hello", "-n", "8", "--temp", "0"])
    assert result.exit_code == 0, result.output
    assert "tokens/s end-to-end" in result.stderr and "eval " in result.stderr


def _interrupt_after(monkeypatch, n_tokens: int):
    """Makes Model.stream_generate raise KeyboardInterrupt (as Ctrl-C does) after n_tokens responses."""
    from bitnet_run.model import Model

    real = Model.stream_generate

    def interrupted(self, *args, **kwargs):
        def gen():
            for i, response in enumerate(real(self, *args, **kwargs)):
                if i == n_tokens:
                    raise KeyboardInterrupt
                yield response

        return gen()

    monkeypatch.setattr(Model, "stream_generate", interrupted)


def test_ctrl_c_ends_run_with_the_text_so_far(tiny_model, monkeypatch):
    args = ["run", "-m", str(tiny_model.path), "-p", "Once", "-n", "12", "--temp", "0", "--no-display-prompt"]
    full = runner.invoke(app, args).stdout
    _interrupt_after(monkeypatch, 5)
    result = runner.invoke(app, args)
    assert result.exit_code == 130 and result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert full.startswith(result.stdout.rstrip("\n")) and len(result.stdout) < len(full)
    assert "tokens/s end-to-end" in result.stderr


def test_ctrl_c_in_chat_returns_to_the_prompt(tiny_model, monkeypatch):
    _interrupt_after(monkeypatch, 2)
    result = runner.invoke(app, ["chat", "-m", str(tiny_model.path), "-n", "8", "--temp", "0"],
                           input="hello\nagain\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("interrupted") == 2 and result.stdout.count("> ") == 3


def test_perplexity_command_equals_transformers(tiny_model, tmp_path):
    """llama-perplexity's chunking (bitnet_run.perplexity) computed independently here with transformers."""
    import math

    import numpy as np
    import torch

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and {i * 7 % 11} more" for i in range(300)))
    model = tiny_model.model
    ids = model.tokenize(text.read_text(), add_bos=False)
    n_ctx, n_chunks = 64, 3
    assert len(ids) >= n_ctx * n_chunks
    nll = count = 0
    for c in range(n_chunks):
        window = [model.codec.bos_id] + ids[c * n_ctx + 1 : (c + 1) * n_ctx]
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model.reference(torch.tensor([window])).logits[0].double(), dim=-1)
        for j in range(n_ctx // 2, n_ctx - 1):
            nll -= float(logp[j, window[j + 1]])
            count += 1
    expected = math.exp(nll / count)
    result = runner.invoke(app, ["perplexity", "-m", str(tiny_model.path), "-f", str(text), "-c", str(n_ctx),
                                 "--chunks", str(n_chunks)])
    assert result.exit_code == 0, result.output
    got = float(result.stdout.split("perplexity:")[1].split()[0])
    assert abs(got / expected - 1) <= 0.005, (got, expected)
    assert f"{n_chunks} chunks of {n_ctx} tokens" in result.stdout


def test_perplexity_bad_input_is_one_line(tiny_model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    for args, word in [(["-f", str(short)], "window"), (["-f", str(tmp_path / "none.txt")], "none.txt"),
                       (["-f", str(short), "-c", "2"], "-c"), (["-f", str(short), "--chunks", "0"], "--chunks")]:
        result = runner.invoke(app, ["perplexity", "-m", str(tiny_model.path), *args])
        assert result.exit_code == 1 and word in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1
