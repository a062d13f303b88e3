"""bitnet_run/peers.py: the GGUF of a synthetic shape for llama.cpp (read back with gguf.GGUFReader),
and, only where llama-cpp-python is installed (CI does not install it), one llama.cpp timing run and
`bench --peers llamacpp` rows, from bench.run and from the command line. Nothing here asserts a speed."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from bitnet_run.bench import peers  # noqa: E402
from bitnet_run.bench import synthetic as syn  # noqa: E402

# The tiny shape whose rows are whole 256-weight TQ blocks (tiny's 688-wide FFN rows are not).
TINY_TQ = syn.SHAPES["tiny-tq"]


@pytest.mark.parametrize("linear_type", peers.LINEAR_TYPES)
@pytest.mark.parametrize("head", peers.GGUF_HEADS)
def test_gguf_reads_back(tmp_path, linear_type, head):
    path = peers.ensure_gguf(TINY_TQ, linear_type, head, tmp_path)
    assert path.name == f"tiny-tq-{linear_type.lower()}-{head}.gguf"
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "bitnet"
    assert reader.fields["bitnet.block_count"].contents() == TINY_TQ.n_layers
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == TINY_TQ.vocab_size
    got = {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in reader.tensors}
    H, I, V, kv = 256, 768, 1024, TINY_TQ.n_kv_heads * TINY_TQ.head_dim
    want = {"token_embd.weight": (head.upper(), (H, V)), "output_norm.weight": ("F32", (H,))}
    for i in range(TINY_TQ.n_layers):
        for n, d in (("attn_norm", H), ("ffn_norm", H), ("attn_sub_norm", H), ("ffn_sub_norm", I)):
            want[f"blk.{i}.{n}.weight"] = ("F32", (d,))
        for n, dims in (("attn_q", (H, H)), ("attn_k", (H, kv)), ("attn_v", (H, kv)), ("attn_output", (H, H)),
                        ("ffn_gate", (H, I)), ("ffn_up", (H, I)), ("ffn_down", (I, H))):
            want[f"blk.{i}.{n}.weight"] = (linear_type, dims)  # ggml order: (cols, rows)
    assert got == want
    # the linears dequantize to one scale times ternary values
    q = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    w = gguf.quants.dequantize(q.data, q.tensor_type)
    scale = np.abs(w).max()
    assert scale > 0 and np.allclose(np.abs(w)[w != 0], scale, rtol=1e-3)
    # cached: a second call returns the same file without rewriting it
    mtime = path.stat().st_mtime_ns
    assert peers.ensure_gguf(TINY_TQ, linear_type, head, tmp_path).stat().st_mtime_ns == mtime


def test_gguf_facts_and_shape_check():
    facts = peers.gguf_facts("2b-4t", "TQ2_0", "q8_0")
    assert facts["n_params"] == 2_412_820_480
    assert facts["linear_bpw"] == pytest.approx(2.0625)
    assert peers.gguf_facts("2b-4t", "TQ1_0", "f16")["linear_bpw"] == pytest.approx(1.6875)
    peers.check_shape("2b-4t")
    peers.check_shape("tiny-tq")
    with pytest.raises(ValueError, match="not a multiple of the 256"):
        peers.check_shape("tiny")


def test_llamacpp_runs_the_gguf(tmp_path):
    """Only where llama-cpp-python is installed (skipped otherwise; CI does not install it)."""
    pytest.importorskip("llama_cpp")
    path = peers.ensure_gguf(TINY_TQ, "TQ2_0", "q8_0", tmp_path)
    samples = peers.time_llamacpp(path, n_prompt=8, n_gen=4, n_threads=1, repetitions=2)
    assert set(samples) == {"pp8", "tg4"}
    assert all(len(v) == 2 and all(math.isfinite(x) and x > 0 for x in v) for v in samples.values())


def test_bench_run_with_llamacpp_peers(tmp_path):
    """bench.run with peers: ours and both TQ types per test, interleaved, with ratio_vs (llama-cpp-python only)."""
    pytest.importorskip("llama_cpp")
    from bitnet_run.bench import runner as bench

    ours = syn.write_synthetic(TINY_TQ, tmp_path / "tiny-tq.bnr")
    spec = bench.BenchSpec(models=[("t256", ours)], n_prompt=[8], n_gen=[4], threads=[1], repetitions=2,
                           membw_bytes=4 << 20)
    spec.peers["t256"] = [(f"llama.cpp {lt}", peers.ensure_gguf(TINY_TQ, lt, "q8_0", tmp_path),
                           peers.gguf_facts(TINY_TQ, lt, "q8_0")) for lt in peers.LINEAR_TYPES]
    rows = bench.run(spec)
    assert [(r["runtime"], r["test"]) for r in rows] == [
        (rt, test) for test in ("pp8", "tg4") for rt in ("bitnet-run", "llama.cpp TQ2_0", "llama.cpp TQ1_0")]
    for r in rows:
        assert len(r["samples_ts"]) == 2 and all(math.isfinite(x) and x > 0 for x in r["samples_ts"])
        if r["runtime"] == "bitnet-run":
            assert r["ratio_vs"] is None
        else:
            ours_row = next(o for o in rows if o["runtime"] == "bitnet-run" and o["test"] == r["test"])
            assert r["ratio_vs"] == pytest.approx(ours_row["avg_ts"] / r["avg_ts"])
            assert r["model_path"].endswith(".gguf") and r["linear_bpw"] in (2.0625, 1.6875)
    md = bench.format_md(rows)
    assert "ours/peer" in md and "llama.cpp TQ1_0" in md
    json.loads(bench.format_json(rows))


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("weights", [None, "tl1,tl2,i2"])
def test_bench_cli_with_llamacpp_peers(tmp_path, weights):
    """`bench --synthetic tiny-tq --peers llamacpp` end to end (llama-cpp-python only): the peers run
    once per test, whatever the number of encodings of ours, with a ratio against each of them."""
    pytest.importorskip("llama_cpp")
    from typer.testing import CliRunner

    from bitnet_run.bench import runner as bench
    from bitnet_run.cli import app

    args = ["bench", "--synthetic", "tiny-tq", "--peers", "llamacpp", "-p", "8", "-n", "4", "-r", "1", "-t", "1",
            "--membw-mib", "16", "--cache-dir", str(tmp_path), "-o", "json"]
    result = CliRunner().invoke(app, args + (["--weights", weights] if weights else []))
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    ours = ["TL1", "TL2", "I2"] if weights else ["I2"]
    assert [(r["runtime"], r["weights"], r["test"]) for r in rows] == [
        (runtime, w, test) for test in ("pp8", "tg4")
        for runtime, w in [("bitnet-run", w) for w in ours] + [("llama.cpp TQ2_0", "TQ2_0"), ("llama.cpp TQ1_0", "TQ1_0")]]
    for r in rows:
        assert tuple(r) == bench.FIELDS and r["model"] == "synthetic tiny-tq"
        for key in ("avg_ts", "membw_gbps", "decode_ceiling_ts", "peak_rss_mib", "model_size", "model_n_params",
                    "linear_bpw", "bytes_per_token", "n_threads", "repetitions"):
            assert _positive(r[key]), (key, r[key])
        assert all(_positive(x) for x in r["samples_ts"])
        assert r["stddev_ts"] == 0 and _positive(r["n_prompt"] + r["n_gen"])
        if r["test"].startswith("tg"):
            assert _positive(r["pct_of_ceiling"])
        ratios = [r["ratio_vs"]] + [r[bench.RATIO_FIELDS[w.lower()]] for w in ours]
        if r["runtime"] == "bitnet-run":
            assert all(x is None for x in ratios) and r["model_path"].endswith(".bnr")
        else:
            assert all(_positive(x) for x in ratios) and r["model_path"].endswith(".gguf")
            mine = {o["weights"]: o["avg_ts"] for o in rows if o["runtime"] == "bitnet-run" and o["test"] == r["test"]}
            assert r["ratio_vs"] == pytest.approx(mine[ours[0]] / r["avg_ts"])
            for w in ours:
                assert r[bench.RATIO_FIELDS[w.lower()]] == pytest.approx(mine[w] / r["avg_ts"])
    header = bench.format_md(rows).splitlines()[0]
    ratio_columns = [f"{w}/peer" for w in ours] if weights else ["ours/peer"]
    assert [c.strip() for c in header.strip("|").split("|")][-len(ratio_columns):] == ratio_columns
