"""bitnet_run/peers.py: the GGUF of a synthetic shape for llama.cpp (read back with gguf.GGUFReader),
and, only where llama-cpp-python is installed (CI does not install it), one llama.cpp timing run and
`bench --peers llamacpp` rows. Nothing here asserts a speed."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from bitnet_run import peers  # noqa: E402
from bitnet_run import synthetic as syn  # noqa: E402

# The tiny shape with an FFN width that is a whole number of 256-weight TQ blocks (688 is not).
TINY256 = dataclasses.replace(syn.SHAPES["tiny"], name="tiny256", intermediate_size=768)


@pytest.mark.parametrize("linear_type", peers.LINEAR_TYPES)
@pytest.mark.parametrize("head", peers.GGUF_HEADS)
def test_gguf_reads_back(tmp_path, linear_type, head):
    path = peers.ensure_gguf(TINY256, linear_type, head, tmp_path)
    assert path.name == f"tiny256-{linear_type.lower()}-{head}.gguf"
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "bitnet"
    assert reader.fields["bitnet.block_count"].contents() == TINY256.n_layers
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == TINY256.vocab_size
    got = {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in reader.tensors}
    H, I, V, kv = 256, 768, 1024, TINY256.n_kv_heads * TINY256.head_dim
    want = {"token_embd.weight": (head.upper(), (H, V)), "output_norm.weight": ("F32", (H,))}
    for i in range(TINY256.n_layers):
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
    assert peers.ensure_gguf(TINY256, linear_type, head, tmp_path).stat().st_mtime_ns == mtime


def test_gguf_facts_and_shape_check():
    facts = peers.gguf_facts("2b-4t", "TQ2_0", "q8_0")
    assert facts["n_params"] == 2_412_820_480
    assert facts["linear_bpw"] == pytest.approx(2.0625)
    assert peers.gguf_facts("2b-4t", "TQ1_0", "f16")["linear_bpw"] == pytest.approx(1.6875)
    peers.check_shape("2b-4t")
    with pytest.raises(ValueError, match="not a multiple of the 256"):
        peers.check_shape("tiny")


def test_llamacpp_runs_the_gguf(tmp_path):
    """Only where llama-cpp-python is installed (skipped otherwise; CI does not install it)."""
    pytest.importorskip("llama_cpp")
    path = peers.ensure_gguf(TINY256, "TQ2_0", "q8_0", tmp_path)
    samples = peers.time_llamacpp(path, n_prompt=8, n_gen=4, n_threads=1, repetitions=2)
    assert set(samples) == {"pp8", "tg4"}
    assert all(len(v) == 2 and all(math.isfinite(x) and x > 0 for x in v) for v in samples.values())


def test_bench_run_with_llamacpp_peers(tmp_path):
    """bench.run with peers: ours and both TQ types per test, interleaved, with ratio_vs (llama-cpp-python only)."""
    pytest.importorskip("llama_cpp")
    from bitnet_run import bench

    ours = syn.write_synthetic(TINY256, tmp_path / "tiny256.bnr")
    spec = bench.BenchSpec(models=[("t256", ours)], n_prompt=[8], n_gen=[4], threads=[1], repetitions=2,
                           membw_bytes=4 << 20)
    spec.peers["t256"] = [(f"llama.cpp {lt}", peers.ensure_gguf(TINY256, lt, "q8_0", tmp_path),
                           peers.gguf_facts(TINY256, lt, "q8_0")) for lt in peers.LINEAR_TYPES]
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
