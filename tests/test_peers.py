"""bitnet_run/peers.py: the GGUF of a synthetic shape for llama.cpp (read back with gguf.GGUFReader),
and, only where llama-cpp-python is installed (CI does not install it), one llama.cpp timing run and
`bench --peers llamacpp` rows, from bench.run and from the command line. Nothing here asserts a speed."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from bitnet_run.bench import peers  # noqa: E402
from bitnet_run.bench import synthetic as syn  # noqa: E402

# The tiny shape whose rows are whole 256-weight TQ blocks (tiny's 688-wide FFN rows are not).
TINY_TQ = syn.SHAPES["tiny-tq"]
# tiny-tq widened to the shortest rows ik_llama.cpp's IQ2_BN multiplies (peers.ROW_MIN)
TINY_IK = syn.make_shape("tiny-ik", 1024, 512, 768, 2, 4, 2, True, 512, 500000.0, "tiny-tq with 512-wide rows")


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


# --------------------------------------------------------------------------- the same weights, I2_S


def _our_ternary(path, name):
    """(int8 [rows, cols], scale) of one linear of our synthetic .bnr."""
    from bitnet_run import fileformat as ff

    header = ff.read_header(path)
    t = header.tensor(name)
    return ff.unpack_i2(ff.read_tensor(header, name), t.dims[1]), t.scale


def _bnr_name(i, gguf_suffix):
    """Our name of the GGUF tensor blk.<i>.<gguf_suffix>.weight (the inverse of arch.gguf_name)."""
    from bitnet_run.convert import arch

    names = {arch.gguf_name(t.name): t.name for t in syn.tensor_plan(TINY_TQ)}
    return names[f"blk.{i}.{gguf_suffix}.weight"]


LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def test_encode_i2s_layout():
    """The I2_S byte layout spelled out weight by weight (bitnet.cpp's x86 layout: byte j of a
    128-weight block holds weights j, j+32, j+64, j+96 in bits 7:6, 5:4, 3:2, 1:0, code = w + 1),
    then the f32 scale and zeros to 32 bytes."""
    rng = np.random.default_rng(3)
    w = rng.integers(-1, 2, size=(2, 256), dtype=np.int8)
    got = peers.encode_i2s(w, 0.25)
    flat = w.reshape(-1)
    want = bytearray(len(flat) // 4)
    for i, v in enumerate(flat):
        block, j = divmod(i, 128)
        group, pos = divmod(j, 32)
        want[block * 32 + pos] |= int(v + 1) << (6 - 2 * group)
    assert bytes(got[: len(want)]) == bytes(want)
    assert bytes(got[len(want):]) == np.float32(0.25).tobytes() + bytes(28)
    back, scale = peers.decode_i2s(got, flat.size)
    assert np.array_equal(back, flat) and scale == 0.25
    with pytest.raises(ValueError, match="whole blocks of 128"):
        peers.encode_i2s(w[:, :100], 1.0)
    with pytest.raises(ValueError, match="ternary"):
        peers.encode_i2s(w * 2, 1.0)
    bad = got.copy()
    bad[0] = 0xFF
    with pytest.raises(ValueError, match="invalid code 3"):
        peers.decode_i2s(bad, flat.size)


@pytest.mark.parametrize("arch", ["bitnet", "bitnet-b1.58"])
@pytest.mark.parametrize("head", peers.GGUF_HEADS)
def test_i2s_gguf_holds_our_weights(tmp_path, arch, head):
    """The I2_S GGUF (ggml type 36, read back with our own header reader: gguf.GGUFReader rejects
    type 36) decodes to exactly the ternary weights and scales of our .bnr of the same seed."""
    path = peers.ensure_gguf(TINY_TQ, peers.I2S, head, tmp_path, architecture=arch)
    assert path.name == f"tiny-tq-i2_s-{head}{'' if arch == 'bitnet' else '-' + arch}.gguf"
    header = peers.read_gguf_header(path)
    assert header.fields["general.architecture"] == arch
    assert header.fields[f"{arch}.block_count"] == TINY_TQ.n_layers
    assert header.fields[f"{arch}.vocab_size"] == TINY_TQ.vocab_size
    assert len(header.fields["tokenizer.ggml.tokens"]) == TINY_TQ.vocab_size
    types = {t.name: t.ggml_type for t in header.tensors}
    assert types["token_embd.weight"] == (1 if head == "f16" else 8)  # F16 / Q8_0
    ours = syn.write_synthetic(TINY_TQ, tmp_path / "ours.bnr", head="bf16" if head == "f16" else "q8")
    for i in range(TINY_TQ.n_layers):
        for suffix in LINEARS:
            name = f"blk.{i}.{suffix}.weight"
            info = next(t for t in header.tensors if t.name == name)
            want, want_scale = _our_ternary(ours, _bnr_name(i, suffix))
            assert types[name] == 36 and info.dims == (want.shape[1], want.shape[0])
            got, scale = peers.decode_i2s(header.tensor_data(path, name, want.size // 4 + 32), want.size)
            assert np.array_equal(got.reshape(want.shape), want), name
            assert scale == pytest.approx(want_scale, rel=1e-7)
    # cached: a second call returns the same file without rewriting it; another arch is another file
    mtime = path.stat().st_mtime_ns
    assert peers.ensure_gguf(TINY_TQ, peers.I2S, head, tmp_path, architecture=arch).stat().st_mtime_ns == mtime


def test_tq_gguf_holds_our_weights(tmp_path):
    """The llama.cpp TQ2_0 GGUF holds our .bnr's ternary weights too (signs of the dequantized values)."""
    path = peers.ensure_gguf(TINY_TQ, "TQ2_0", "f16", tmp_path)
    ours = syn.write_synthetic(TINY_TQ, tmp_path / "ours.bnr")
    reader = gguf.GGUFReader(path)
    for i in range(TINY_TQ.n_layers):
        for suffix in LINEARS:
            q = next(t for t in reader.tensors if t.name == f"blk.{i}.{suffix}.weight")
            want, scale = _our_ternary(ours, _bnr_name(i, suffix))
            w = gguf.quants.dequantize(q.data, q.tensor_type).reshape(want.shape)
            assert np.array_equal(np.sign(w).astype(np.int8), want)
            assert np.allclose(np.abs(w)[want != 0], scale, rtol=1e-3)


def test_gguf_header_reader_matches_gguf_py(tmp_path):
    path = peers.ensure_gguf(TINY_TQ, "TQ1_0", "q8_0", tmp_path)
    ours, theirs = peers.read_gguf_header(path), gguf.GGUFReader(path)
    assert [(t.name, t.dims, t.ggml_type, t.offset) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset) - ours.data_offset)
        for t in theirs.tensors]
    for key in ("general.architecture", "bitnet.block_count", "bitnet.rope.freq_base", "tokenizer.ggml.tokens"):
        assert ours.fields[key] == theirs.fields[key].contents()
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(8))
    with pytest.raises(ValueError, match="truncated"):
        peers.read_gguf_header(tmp_path / "bad.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + bytes(20))
    with pytest.raises(ValueError, match="not a GGUF"):
        peers.read_gguf_header(tmp_path / "bad.gguf")


def test_peer_gguf_facts_and_shape_checks():
    assert peers.gguf_facts("2b-4t", peers.I2S, "f16")["linear_bpw"] == pytest.approx(2.0, rel=1e-4)
    bn = peers.gguf_facts("2b-4t", "IQ2_BN", "q8_0", architecture=peers.ik_architecture(syn.get_shape("2b-4t")))
    # 64 weights in 16 bytes and an f32 scale per row: rows of 2560 and 6912 weights
    assert 2.0 < bn["linear_bpw"] < 2.0 + 32 / 2560 and "relu2" in bn["model_type"]
    peers.check_shape("2b-4t", (peers.I2S,) + peers.IK_TYPES)
    peers.check_shape("3b", peers.IK_TYPES)  # 3200- and 8640-wide rows: whole 64-weight IQ2_BN blocks
    peers.check_shape(TINY_TQ, ("IQ2_BN_R4",))
    peers.check_shape(TINY_IK, (peers.I2S,) + peers.IK_TYPES)
    with pytest.raises(ValueError, match="--peers ikllama: shape tiny-tq has blk.0.attn_q.weight rows of 256 weights; "
                                         "IQ2_BN needs rows of at least 512"):
        peers.check_shape(TINY_TQ, peers.IK_TYPES, "--peers ikllama")
    with pytest.raises(ValueError, match="--peers bitnetcpp: shape 3b has blk.0.ffn_down.weight rows of 8640 weights, "
                                         "not a multiple of the 128 of I2_S blocks"):
        peers.check_shape("3b", (peers.I2S,), "--peers bitnetcpp")


# --------------------------------------------------------------------------- a peer's own llama-bench

# One line of `llama-bench -o jsonl`, recorded from bitnet.cpp's (built from a source tree, so
# build_commit "unknown") on the tiny-tq I2_S GGUF, pp8 at 1 thread, on the development machine; the
# fake binaries below print it, as a `-o json` array, with the n_prompt, n_gen and n_threads they
# are asked for.
RECORDED_JSONL = (
    '{"build_commit": "unknown", "build_number": 0, "cuda": false, "vulkan": false, "kompute": false,'
    ' "metal": false, "sycl": false, "rpc": "0", "gpu_blas": false, "blas": false, "cpu_info": "AMD E'
    'PYC", "gpu_info": "", "model_filename": "/work/peers-cache/tiny-tq-i2_s-f16.gguf", "model_type":'
    ' "bitnet ?B I2_S - 2 bpw ternary (guessed)", "model_size": 931264, "model_n_params": 1838336, "n'
    '_batch": 2048, "n_ubatch": 512, "n_threads": 1, "cpu_mask": "0x0", "cpu_strict": false, "poll": '
    '50, "type_k": "f16", "type_v": "f16", "n_gpu_layers": 99, "split_mode": "layer", "main_gpu": 0, '
    '"no_kv_offload": false, "flash_attn": false, "tensor_split": "0.00", "use_mmap": true, "embeddin'
    'gs": false, "n_prompt": 8, "n_gen": 0, "test_time": "2026-12-01T23:37:06Z", "avg_ns": 2670435, "'
    'stddev_ns": 0, "avg_ts": 2995.766607, "stddev_ts": 0.000000, "samples_ns": [ 2670435 ],"samples_'
    'ts": [ 2995.77 ]}'
)


def _fake_llama_bench(tmp_path, line: str, exit_status: int = 0, name: str = "llama-bench"):
    """An executable that logs its argv to <name>.argv and prints, after a log line, `line` with
    n_prompt, n_gen and n_threads taken from its -p / -n / -t arguments as a `-o json` array (as
    llama-bench does); any other -o is refused, as ik_llama.cpp's llama-bench refuses jsonl."""
    fake = tmp_path / name
    fake.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
with open({str(fake) + '.argv'!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
if {exit_status}:
    print("llama-bench: error: failed to load model", file=sys.stderr)
    sys.exit({exit_status})
rec = json.loads({line!r})
rec["n_prompt"], rec["n_gen"] = int(args[args.index("-p") + 1]), int(args[args.index("-n") + 1])
rec["n_threads"] = int(args[args.index("-t") + 1])
if args[args.index("-o") + 1] != "json":
    print("error: invalid parameter for argument: -o", file=sys.stderr)
    sys.exit(1)
print("main: some log line")
print(json.dumps([rec], indent=2))
""")
    fake.chmod(0o755)
    return fake


def test_parse_llama_bench_output():
    rec = json.loads(RECORDED_JSONL)
    n = rec["n_prompt"] + rec["n_gen"]
    got = peers.parse_llama_bench_output("log line\n" + RECORDED_JSONL + "\n", rec["n_prompt"], rec["n_gen"])
    assert got["seconds"] == rec["avg_ns"] / 1e9
    assert got["tokens_per_second"] == pytest.approx(rec["avg_ts"], rel=1e-3)  # llama-bench's own t/s
    assert got["tokens_per_second"] == pytest.approx(n * 1e9 / rec["avg_ns"])
    assert got["version"] == f"build {rec['build_commit']} ({rec['build_number']})"
    for array in (json.dumps([rec]), "log line\n" + json.dumps([rec, {**rec, "n_prompt": 99}], indent=2)):  # -o json
        assert peers.parse_llama_bench_output(array, rec["n_prompt"], rec["n_gen"]) == got
    with pytest.raises(ValueError, match="no result for p=7 n=0"):
        peers.parse_llama_bench_output(RECORDED_JSONL, 7, 0)
    with pytest.raises(ValueError, match="not JSON"):
        peers.parse_llama_bench_output("{oops", 1, 0)
    with pytest.raises(ValueError, match="no positive avg_ns"):
        peers.parse_llama_bench_output(json.dumps({**rec, "avg_ns": 0}), rec["n_prompt"], rec["n_gen"])


def test_llama_bench_runner_with_a_fake_binary(tmp_path):
    path = peers.ensure_gguf(TINY_TQ, peers.I2S, "f16", tmp_path)
    fake = _fake_llama_bench(tmp_path, RECORDED_JSONL)
    runner = peers.LlamaBenchRunner(fake, path, 2)
    assert runner.n_vocab == TINY_TQ.vocab_size
    rec = json.loads(RECORDED_JSONL)
    assert runner.time_pp(np.zeros(16, dtype=np.int32)) == rec["avg_ns"] / 1e9
    assert runner.time_tg(np.zeros(5, dtype=np.int32)) == rec["avg_ns"] / 1e9
    assert runner.version == f"llama-bench build {rec['build_commit']} ({rec['build_number']}) at {fake}"
    argv = [json.loads(line) for line in (tmp_path / "llama-bench.argv").read_text().splitlines()]
    assert argv == [["-m", str(path), "-p", "16", "-n", "0", "-t", "2", "-r", "1", "-o", "json"],
                    ["-m", str(path), "-p", "0", "-n", "5", "-t", "2", "-r", "1", "-o", "json"]]
    broken = peers.LlamaBenchRunner(_fake_llama_bench(tmp_path, RECORDED_JSONL, 1, "broken"), path, 1)
    with pytest.raises(RuntimeError, match="failed \\(exit status 1\\): llama-bench: error: failed to load model"):
        broken.time_pp([1, 2])


def test_failure_line_names_the_failure():
    import subprocess

    def failed(stdout: str, stderr: str) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(["peer"], -6, stdout, stderr)

    # an abort: the assertion, then a debugger's stack dump whose last line says nothing
    dump = ("iqk_quantize.cpp:588: GGML_ASSERT(k >= 8*QK_IQ1BN) failed\n"
            "#1  0x00007f in ggml_abort () from libggml.so\n"
            "#2  0x00007f in ggml_compute_forward_mul_mat () from libggml.so\n"
            "30\t../sysdeps/unix/sysv/linux/wait4.c: No such file or directory.\n")
    assert peers.failure_line(failed("", dump)) == "iqk_quantize.cpp:588: GGML_ASSERT(k >= 8*QK_IQ1BN) failed"
    assert peers.failure_line(failed("usage: ...\n", "error: invalid parameter for argument: -o\n")) == \
        "error: invalid parameter for argument: -o"
    assert peers.failure_line(failed("only stdout\n", "")) == "only stdout"
    assert peers.failure_line(failed("", "")) == "no output"


def test_peer_bin_arguments(tmp_path):
    from bitnet_run.bench import runner as bench

    fake = _fake_llama_bench(tmp_path, RECORDED_JSONL)
    assert bench.parse_peer_bins([f"bitnetcpp={fake}"]) == {"bitnetcpp": fake}
    (tmp_path / "not-executable").write_text("")
    bad = [
        ([f"bitnetcpp={tmp_path / 'not-executable'}"], "is not an executable file"),
        (["bitnetcpp"], "expected NAME=PATH"),
        ([f"={fake}"], "expected NAME=PATH"),
        (["vllm=/bin/true"], "unknown peer 'vllm'"),
        ([f"bitnetcpp={tmp_path / 'nope'}"], "is not an executable file"),
        ([f"ikllama={fake}"], "no executable llama-quantize next to"),
        ([f"bitnetcpp={fake}", "bitnetcpp=/bin/true"], "bitnetcpp given twice"),
    ]
    for items, message in bad:
        with pytest.raises(bench.BenchError, match=message):
            bench.parse_peer_bins(items)
    with pytest.raises(bench.BenchError, match="--peers bitnetcpp needs --peer-bin bitnetcpp=PATH"):
        bench.check_peers("bitnetcpp")
    with pytest.raises(bench.BenchError, match="--peer-bin bitnetcpp: bitnetcpp is not in --peers llamacpp"):
        bench.check_peers("llamacpp", {"bitnetcpp": fake})
    assert bench.check_peers("bitnetcpp,llamacpp", {"bitnetcpp": fake, "llamacpp": fake}) == ["bitnetcpp", "llamacpp"]


def test_bench_cli_with_a_fake_peer_binary(tmp_path):
    """`bench --peers bitnetcpp --peer-bin bitnetcpp=FAKE` end to end: the I2_S GGUF is written, the
    fake runs once per warm-up and timed run, interleaved with ours, and its t/s and version land in
    the rows with the ratios."""
    from typer.testing import CliRunner

    from bitnet_run.bench import runner as bench
    from bitnet_run.cli import app

    fake = _fake_llama_bench(tmp_path, RECORDED_JSONL)
    args = ["bench", "--synthetic", "tiny-tq", "--peers", "bitnetcpp", "--peer-bin", f"bitnetcpp={fake}",
            "-p", "8", "-n", "4", "-r", "2", "-t", "1", "--membw-mib", "16", "--cache-dir", str(tmp_path), "-o", "json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["runtime"], r["weights"], r["test"]) for r in rows] == [
        (rt, w, test) for test in ("pp8", "tg4") for rt, w in (("bitnet-run", "I2"), ("bitnet.cpp I2_S", "I2_S"))]
    rec = json.loads(RECORDED_JSONL)
    for r in rows:
        if r["runtime"] == "bitnet-run":
            continue
        n = r["n_prompt"] + r["n_gen"]
        assert r["samples_ts"] == [pytest.approx(n * 1e9 / rec["avg_ns"])] * 2
        ours = next(o for o in rows if o["runtime"] == "bitnet-run" and o["test"] == r["test"])
        assert r["ratio_vs"] == pytest.approx(ours["avg_ts"] / r["avg_ts"])
        assert r["model_path"] == str(tmp_path / "tiny-tq-i2_s-f16.gguf")
        assert r["runtime_version"].startswith(f"llama-bench build {rec['build_commit']}")
    argv = [json.loads(line) for line in (tmp_path / "llama-bench.argv").read_text().splitlines()]
    assert [(a[3], a[5]) for a in argv] == [("8", "0")] * 3 + [("0", "4"), ("0", "4"), ("0", "4")]
    assert "own llama-bench" in bench.format_md(rows)


# --------------------------------------------------------------------------- the real peers

PEER_BIN_ENV = {"bitnetcpp": "BITNET_RUN_PEER_BIN_BITNETCPP", "ikllama": "BITNET_RUN_PEER_BIN_IKLLAMA"}


@pytest.mark.parametrize("peer", sorted(PEER_BIN_ENV))
def test_real_peer_loads_its_gguf(tmp_path, peer):
    """Only where a peer's llama-bench is given in $BITNET_RUN_PEER_BIN_BITNETCPP /
    $BITNET_RUN_PEER_BIN_IKLLAMA (skipped otherwise: CI builds no peer): that binary loads the GGUF
    written for it (ik_llama.cpp: made by its own llama-quantize, on 512-wide rows) and reports a
    positive t/s."""
    import os
    from pathlib import Path

    binary = os.environ.get(PEER_BIN_ENV[peer])
    if not binary:
        pytest.skip(f"no {peer} llama-bench given (set {PEER_BIN_ENV[peer]})")
    if peer == "bitnetcpp":
        paths = [peers.ensure_gguf(TINY_TQ, peers.I2S, "f16", tmp_path)]
    else:
        quantize = Path(binary).parent / "llama-quantize"
        paths = [peers.ensure_ik_gguf(TINY_IK, t, "q8_0", quantize, tmp_path) for t in peers.IK_TYPES]
        for path, t in zip(paths, peers.IK_TYPES):
            types = {i.name: i.ggml_type for i in peers.read_gguf_header(path).tensors}
            assert types["blk.0.ffn_down.weight"] == peers.GGML_TYPES[t] and types["token_embd.weight"] == 8
    for path in paths:
        runner = peers.LlamaBenchRunner(binary, path, 1)
        assert 0 < runner.time_pp(np.zeros(8, dtype=np.int32)) < 60
        assert 0 < runner.time_tg(np.zeros(4, dtype=np.int32)) < 60
