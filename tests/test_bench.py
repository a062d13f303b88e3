"""`bitnet-run bench` and the synthetic models: a smoke run on the tiny shape in every output format
(format, fields, positive finite numbers, the cross product), the shape tables, and bad arguments.
Nothing here asserts a speed."""
from __future__ import annotations

import csv
import io
import json
import math
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from bitnet_run.bench import runner as bench
from bitnet_run import fileformat as ff
from bitnet_run.bench import synthetic as syn
from bitnet_run._bitnet import lib
from bitnet_run.cli import app
from bitnet_run.model import Model

runner = CliRunner()
SMOKE = ["-p", "8", "-n", "4", "-r", "2", "-t", "1,2", "--membw-mib", "64"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic-cache")


@pytest.fixture(scope="module")
def tiny_path(cache_dir):
    return syn.ensure_synthetic("tiny", cache_dir)


# --------------------------------------------------------------------------- shapes


def test_2b_4t_plan_matches_the_released_model():
    """The exact 2B-4T dimensions (microsoft/bitnet-b1.58-2B-4T config.json) and parameter counts (no file written)."""
    s = syn.SHAPES["2b-4t"]
    assert (s.vocab_size, s.hidden_size, s.intermediate_size, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim) == (
        128256, 2560, 6912, 30, 20, 5, 128)
    assert s.tied_embeddings
    summary = syn.plan_summary("2b-4t")
    assert summary["linear_params"] == 30 * (2 * 2560 * 2560 + 2 * 640 * 2560 + 3 * 2560 * 6912)
    assert summary["embedding_params"] == 128256 * 2560
    # microsoft/bitnet-b1.58-2B-4T-bf16 has 2,412,820,480 parameters (no lm_head stored)
    assert summary["params"] == 2_412_820_480
    assert summary["linear_bytes"] == summary["linear_params"] // 4  # 2.0 bits per weight: ~521 MB
    names = [t.name for t in syn.tensor_plan("2b-4t")]
    assert "lm_head.weight" not in names and len(names) == 2 + 30 * 11


@pytest.mark.parametrize("name, dims", [
    ("large-700m", (32002, 1536, 4096, 24, 16, 16, True)),
    ("3b", (32002, 3200, 8640, 26, 32, 32, True)),
    ("8b", (128256, 4096, 14336, 32, 32, 8, False)),
])
def test_other_shapes(name, dims):
    s = syn.SHAPES[name]
    assert (s.vocab_size, s.hidden_size, s.intermediate_size, s.n_layers, s.n_heads, s.n_kv_heads,
            s.tied_embeddings) == dims
    plan = {t.name: t for t in syn.tensor_plan(name)}
    assert ("lm_head.weight" in plan) == (not s.tied_embeddings)
    kv = s.n_kv_heads * s.head_dim
    assert plan["model.layers.0.self_attn.k_proj.weight"].dims == (kv, s.hidden_size)
    assert plan[f"model.layers.{s.n_layers - 1}.mlp.down_proj.weight"].dims == (s.hidden_size, s.intermediate_size)


def test_unknown_shape():
    with pytest.raises(ValueError, match="unknown synthetic shape 'nope'"):
        syn.get_shape("nope")


def test_tiny_file_loads_and_matches_the_plan(tiny_path):
    header = ff.read_header(tiny_path)
    plan = syn.tensor_plan("tiny")
    assert [(t.name, t.encoding, t.dims) for t in header.tensors] == [(t.name, t.encoding, t.dims) for t in plan]
    linear = ff.read_tensor(header, "model.layers.1.mlp.down_proj.weight")
    w = ff.unpack_i2(linear, syn.SHAPES["tiny"].intermediate_size)  # raises on an invalid code
    assert set(np.unique(w).tolist()) == {-1, 0, 1}
    assert header.tensor("model.layers.1.mlp.down_proj.weight").scale > 0
    emb = ff.read_tensor(header, "model.embed_tokens.weight").astype(np.uint32) << 16
    emb = emb.view(np.float32)
    assert np.all(np.isfinite(emb)) and 0.01 < emb.std() < 0.04

    model = Model(tiny_path, n_threads=1, n_ctx=16)
    assert model.n_params == syn.plan_summary("tiny")["params"]
    assert model.tensor_shape("model.layers.0.self_attn.k_proj.weight") == (128, 256)
    logits = model._eval(np.arange(8), 0, all_logits=False)
    assert logits.shape == (1024,) and np.all(np.isfinite(logits))
    model.generate("w1 w2", max_tokens=3, temperature=0)  # the stored tokenizer works


def test_written_once_and_reused(cache_dir, tiny_path):
    mtime = tiny_path.stat().st_mtime_ns
    assert syn.ensure_synthetic("tiny", cache_dir) == tiny_path
    assert tiny_path.stat().st_mtime_ns == mtime
    assert [p.name for p in cache_dir.iterdir()] == ["tiny.bnr"]  # no temporary file left behind


def test_untied_bytes_per_token(tmp_path):
    """An untied model reads its lm_head whole but only one embedding row per generated token."""
    shape = syn.make_shape("untied", 512, 128, 344, 1, 4, 2, False, 64, 10000.0, "test")
    path = syn.write_synthetic(shape, tmp_path / "untied.bnr")
    facts = bench.model_facts(path, "untied")
    total = sum(t.nbytes for t in syn.tensor_plan(shape))
    assert facts.bytes_per_token == total - 512 * 128 * 2 + 128 * 2
    assert facts.linear_bpw == 2.0
    assert facts.n_params == syn.plan_summary(shape)["params"]
    Model(path, n_threads=1, n_ctx=8)  # loads


# --------------------------------------------------------------------------- bandwidth probe


def test_membw_probe():
    for threads in (1, 2):
        gbps = lib.bn_membw_read_gbps(32 << 20, threads, 2)
        assert math.isfinite(gbps) and gbps > 0
    assert lib.bn_membw_read_gbps(8, 4, 1) < 0  # too small for the threads
    assert lib.bn_membw_read_gbps(1 << 20, 5000, 1) < 0
    assert lib.bn_membw_read_gbps(1 << 62, 1, 1) == -1.0  # allocation failure is a value, not a crash


# --------------------------------------------------------------------------- argument lists


@pytest.mark.parametrize("text, expected", [
    ("512", [512]), ("128,512", [128, 512]), ("1-4", [1, 2, 3, 4]), ("0-256+64", [0, 64, 128, 192, 256]),
    ("64-512*2", [64, 128, 256, 512]), ("1,1-2", [1, 2]), (" 8 , 16 ", [8, 16]),
])
def test_parse_int_list(text, expected):
    assert bench.parse_int_list(text, "-p") == expected


@pytest.mark.parametrize("text", ["", "a", "1,,2", "4-1", "1-4*1", "0-4*2", "-3", "1.5"])
def test_parse_int_list_errors(text):
    with pytest.raises(bench.BenchError):
        bench.parse_int_list(text, "-p")


# --------------------------------------------------------------------------- the smoke run


def _invoke(cache_dir, *args):
    return runner.invoke(app, ["bench", "--synthetic", "tiny", "--cache-dir", str(cache_dir), *args])


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_rows(rows: list[dict]):
    assert [(r["n_threads"], r["test"]) for r in rows] == [(1, "pp8"), (1, "tg4"), (2, "pp8"), (2, "tg4")]
    for r in rows:
        assert set(bench.FIELDS) <= set(r)
        assert r["runtime"] == "bitnet-run" and r["model"] == "synthetic tiny" and r["weights"] == "I2"
        assert r["kernels"] == bench.kernels_name()  # the variant the runtime reports, or None
        assert r["model_n_params"] == syn.plan_summary("tiny")["params"]
        assert r["linear_bpw"] == 2.0 and r["repetitions"] == 2 and len(r["samples_ts"]) == 2
        for key in ("avg_ts", "membw_gbps", "decode_ceiling_ts", "peak_rss_mib", "model_size", "bytes_per_token"):
            assert _positive(r[key]), (key, r[key])
        assert all(_positive(s) for s in r["samples_ts"]) and r["stddev_ts"] >= 0
        assert r["avg_ts"] == pytest.approx(sum(r["samples_ts"]) / 2)
        assert r["decode_ceiling_ts"] == pytest.approx(r["membw_gbps"] * 1e9 / r["bytes_per_token"])
        if r["test"].startswith("tg"):
            assert (r["n_prompt"], r["n_gen"]) == (0, 4)
            assert r["pct_of_ceiling"] == pytest.approx(100 * r["avg_ts"] / r["decode_ceiling_ts"])
        else:
            assert (r["n_prompt"], r["n_gen"]) == (8, 0) and r["pct_of_ceiling"] is None


def test_bench_json(cache_dir, tiny_path):
    result = _invoke(cache_dir, *SMOKE, "-o", "json")
    assert result.exit_code == 0, result.output
    _check_rows(json.loads(result.stdout))


def test_bench_csv(cache_dir, tiny_path):
    result = _invoke(cache_dir, *SMOKE, "-o", "csv")
    assert result.exit_code == 0, result.output
    reader = csv.DictReader(io.StringIO(result.stdout))
    assert tuple(reader.fieldnames) == bench.FIELDS
    rows = []
    for raw in reader:
        r = dict(raw)
        for key in ("model_size", "model_n_params", "bytes_per_token", "n_threads", "n_prompt", "n_gen", "repetitions"):
            r[key] = int(r[key])
        for key in ("linear_bpw", "avg_ts", "stddev_ts", "membw_gbps", "decode_ceiling_ts", "peak_rss_mib"):
            r[key] = float(r[key])
        r["pct_of_ceiling"] = float(r["pct_of_ceiling"]) if r["pct_of_ceiling"] else None
        r["samples_ts"] = [float(s) for s in r["samples_ts"].split(";")]
        rows.append(r)
    _check_rows(rows)


def test_bench_markdown(cache_dir, tiny_path):
    result = _invoke(cache_dir, *SMOKE)  # md is the default
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert tuple(cells[0]) == bench.MD_COLUMNS
    assert all(re.fullmatch(r":?-+:?", c) for c in cells[1])
    body = [dict(zip(bench.MD_COLUMNS, row)) for row in cells[2:]]
    assert [(r["threads"], r["test"]) for r in body] == [("1", "pp8"), ("1", "tg4"), ("2", "pp8"), ("2", "tg4")]
    for r in body:
        mean, std = re.fullmatch(r"(\S+) ± (\S+)", r["t/s"]).groups()
        assert _positive(float(mean)) and float(std) >= 0
        assert _positive(float(r["read GB/s"]))
        assert r["bpw"] == "2.00" and r["model"] == "synthetic tiny" and r["weights"] == "I2"
        if r["test"] == "tg4":
            assert _positive(float(r["ceiling t/s"])) and _positive(float(r["% of ceiling"].rstrip("%")))
        else:
            assert r["ceiling t/s"] == "" and r["% of ceiling"] == ""
    assert "ceiling = read bandwidth" in result.stdout


def test_bench_cross_product_of_models_and_lists(cache_dir, tiny_path):
    """Two models (a -m file and a synthetic shape) x two prompt lengths x one thread count, -n 0 = no tg."""
    result = _invoke(cache_dir, "-m", str(tiny_path), "-p", "4,8", "-n", "0", "-r", "1", "-t", "1",
                     "--membw-mib", "16", "--no-warmup", "-o", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["model"], r["test"]) for r in rows] == [
        ("tiny", "pp4"), ("tiny", "pp8"), ("synthetic tiny", "pp4"), ("synthetic tiny", "pp8")]
    assert all(r["stddev_ts"] == 0 for r in rows)


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("args, message", [
    (["-o", "xml"], "unknown output format 'xml'"),
    (["-p", "abc"], "-p: 'abc' is not an integer"),
    (["-t", "0"], "-t: 0 is below the minimum 1"),
    (["-r", "0"], "repetitions must be >= 1"),
    (["-p", "0", "-n", "0"], "nothing to run"),
    (["--synthetic", "nope"], "unknown synthetic shape 'nope'"),
    (["-m", "/nonexistent/model.bnr"], "no such model file"),
    (["--peers", "vllm"], "unknown peer 'vllm'"),
    (["--weights", "i2,tl3"], "--weights: unknown encoding 'tl3' (expected a comma list of i2, tl1, tl2)"),
    (["--weights", "i2,"], "--weights: unknown encoding ''"),
    (["-m", "models/demo/demo.bnr", "--weights", "tl1"], "--weights applies to --synthetic shapes"),
    (["-p", "100000", "-n", "0"], "pp100000 needs 100000 positions but the model's context length is 512"),
])
def test_bad_arguments_are_one_line(cache_dir, args, message):
    if "--synthetic" not in args and "-m" not in args:
        args = ["--synthetic", "tiny", "--cache-dir", str(cache_dir), *args]
    result = runner.invoke(app, ["bench", "-r", "1", "--membw-mib", "16", *args] if "-r" not in args
                           else ["bench", "--membw-mib", "16", *args])
    assert result.exit_code == 1, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_peers_llamacpp_is_not_faked(cache_dir):
    result = _invoke(cache_dir, "--peers", "llamacpp", "-r", "1")
    assert result.exit_code == 1 and result.stdout == ""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert "llama-cpp-python is not installed: pip install 'bitnet-run[peers]'" in result.stderr
    else:  # installed: the tiny shape's 688-wide FFN rows are not whole TQ2_0/TQ1_0 blocks
        assert "not a multiple of the 256" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bench_kernels_hook(cache_dir, tiny_path):
    """--kernels times each kernel variant on the model's ternary shapes (when the runtime has them)."""
    pytest.importorskip("bitnet_run.bench.kernels")
    result = _invoke(cache_dir, "--kernels", "-p", "4", "-r", "2", "-t", "1", "--membw-mib", "4", "-o", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    shapes = {(r["rows"], r["cols"]) for r in rows}
    assert shapes == {(256, 256), (128, 256), (688, 256), (256, 688)}
    assert {r["n_tok"] for r in rows} == {1, 4} and "ref" in {r["variant"] for r in rows}
    assert all(_positive(r["seconds"]) and _positive(r["gmacs"]) for r in rows)
    assert all(_positive(r["membw_gbps"]) and _positive(r["pct_of_membw"]) for r in rows)
    assert all(r["pct_of_membw"] == pytest.approx(100 * r["weight_gbps"] / r["membw_gbps"]) for r in rows)


@pytest.mark.parametrize("head", ["q8", "q6", "q4"])
def test_bench_quant_head(cache_dir, head):
    """--head q8|q6|q4: the synthetic file with a Q8_R / Q6_B / Q4_B head (its own cache file), labelled as such."""
    result = _invoke(cache_dir, "--head", head, "-p", "4", "-n", "2", "-r", "1", "-t", "1", "--membw-mib", "4",
                     "-o", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {r["model"] for r in rows} == {f"synthetic tiny {head} head"}
    assert all(r["model_path"].endswith(f"tiny-{head}.bnr") and r["ratio_vs"] is None for r in rows)
    header = ff.read_header(rows[0]["model_path"])
    assert header.metadata.get("synthetic.head") == head
    assert header.tensor("model.embed_tokens.weight").encoding == ff.HEAD_ENCODINGS[head]
    bad = _invoke(cache_dir, "--head", "q3", "-r", "1")
    assert bad.exit_code == 1 and "--head must be one of" in bad.stderr
    if head != "q8":  # the peers' GGUF files have an F16 or Q8_0 head only
        bad = _invoke(cache_dir, "--head", head, "--peers", "llamacpp", "-r", "1")
        assert bad.exit_code == 1 and "--peers needs --head bf16 or q8" in bad.stderr


# --------------------------------------------------------------------------- ternary encodings (--weights)


@pytest.fixture(scope="module")
def encodings_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic-encodings")


def test_cache_file_names():
    """i2 and bf16 are left out of the name, so the files written before --weights keep their names."""
    assert [syn.file_name("2b-4t", head, weights) for weights in syn.WEIGHTS for head in syn.HEADS] == [
        "2b-4t.bnr", "2b-4t-q8.bnr", "2b-4t-q6.bnr", "2b-4t-q4.bnr", "2b-4t-tl1.bnr", "2b-4t-tl1-q8.bnr",
        "2b-4t-tl1-q6.bnr", "2b-4t-tl1-q4.bnr", "2b-4t-tl2.bnr", "2b-4t-tl2-q8.bnr", "2b-4t-tl2-q6.bnr",
        "2b-4t-tl2-q4.bnr"]


def test_every_encoding_holds_the_same_model(encodings_cache):
    """For one seed the I2, TL1 and TL2 files hold the same ternary weights, scales and embedding, and
    the runtime's exact integer accumulation gives the same logits from each."""
    paths = {w: syn.ensure_synthetic("tiny", encodings_cache, weights=w) for w in syn.WEIGHTS}
    assert {w: p.name for w, p in paths.items()} == {"i2": "tiny.bnr", "tl1": "tiny-tl1.bnr", "tl2": "tiny-tl2.bnr"}
    headers = {w: ff.read_header(p) for w, p in paths.items()}
    assert "synthetic.weights" not in headers["i2"].metadata  # an i2 file is the one written before --weights
    assert headers["tl1"].metadata["synthetic.weights"] == "tl1"
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        info = headers["i2"].tensor(name)
        rows, cols = info.dims
        w_i2 = ff.unpack_i2(ff.read_tensor(headers["i2"], name), cols)
        assert np.array_equal(ff.unpack_tl1(ff.read_tensor(headers["tl1"], name), rows, cols), w_i2)
        assert np.array_equal(ff.unpack_tl2(ff.read_tensor(headers["tl2"], name), rows, cols), w_i2)
        assert headers["tl1"].tensor(name).encoding == ff.ENCODING_TL1
        assert headers["tl2"].tensor(name).scale == headers["tl1"].tensor(name).scale == info.scale
    embedding = {w: ff.read_tensor(h, "model.embed_tokens.weight") for w, h in headers.items()}
    assert np.array_equal(embedding["i2"], embedding["tl1"]) and np.array_equal(embedding["i2"], embedding["tl2"])
    tokens = np.arange(12)
    logits = {w: Model(p, n_threads=1, n_ctx=16)._eval(tokens, 0, all_logits=True) for w, p in paths.items()}
    np.testing.assert_array_equal(logits["tl1"], logits["i2"])
    np.testing.assert_array_equal(logits["tl2"], logits["i2"])


def test_tl_reencoding_in_row_chunks_matches_whole_matrix_packing(monkeypatch):
    """Large matrices are re-encoded a few tiles of rows at a time; the bytes are those of packing
    the whole matrix at once (row counts that are and are not multiples of the 32-row tile)."""
    monkeypatch.setattr(syn, "TERNARY_CHUNK_ROWS", 64)
    for dims in ((200, 100), (128, 257)):
        i2 = syn._random_i2(np.random.default_rng(1), dims)
        weights = ff.unpack_i2(i2, dims[1])
        for encoding in (ff.ENCODING_TL1, ff.ENCODING_TL2):
            packed = syn._reencode_i2(i2, dims, encoding)
            assert np.array_equal(packed, ff.TERNARY_PACKERS[encoding](weights)), (dims, encoding)


def test_tl_reencoding_memory_is_the_output_and_one_chunk(monkeypatch):
    """What keeps writing the 8b shape in TL1/TL2 from holding GBs: the peak is the encoded matrix plus
    one chunk's temporaries (packing the whole int8 matrix at once takes ~20x the encoded size)."""
    import tracemalloc

    monkeypatch.setattr(syn, "TERNARY_CHUNK_ROWS", 64)
    dims = (2048, 1024)
    i2 = syn._random_i2(np.random.default_rng(1), dims)
    for encoding in (ff.ENCODING_TL1, ff.ENCODING_TL2):
        tracemalloc.start()
        try:
            syn._reencode_i2(i2, dims, encoding)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 3 * ff.encoded_nbytes(encoding, dims), (encoding, peak)


def test_bench_weights_smoke(encodings_cache):
    """--weights tl1,tl2,i2: the three files of one shape run side by side, test by test, in that
    order, each row naming its encoding; no peers, so no ratios."""
    result = runner.invoke(app, ["bench", "--synthetic", "tiny", "--cache-dir", str(encodings_cache),
                                 "--weights", "tl1,tl2,i2", "-p", "8", "-n", "4", "-r", "1", "-t", "1,2",
                                 "--membw-mib", "16", "-o", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["n_threads"], r["test"], r["weights"]) for r in rows] == [
        (t, test, w) for t in (1, 2) for test in ("pp8", "tg4") for w in ("TL1", "TL2", "I2")]
    by_weights = {}
    for r in rows:
        assert tuple(r) == bench.FIELDS and r["model"] == "synthetic tiny" and r["runtime"] == "bitnet-run"
        assert r["model_path"].endswith({"TL1": "tiny-tl1.bnr", "TL2": "tiny-tl2.bnr", "I2": "tiny.bnr"}[r["weights"]])
        for key in ("avg_ts", "membw_gbps", "decode_ceiling_ts", "peak_rss_mib", "model_size", "bytes_per_token",
                    "linear_bpw", "model_n_params"):
            assert _positive(r[key]), (key, r[key])
        assert all(_positive(x) for x in r["samples_ts"]) and r["stddev_ts"] == 0
        assert r["ratio_vs"] is None and all(r[key] is None for key in bench.RATIO_FIELDS.values())
        by_weights.setdefault(r["weights"], r)
    facts = {w: bench.model_facts(r["model_path"], w) for w, r in by_weights.items()}
    assert {w: f.weights for w, f in facts.items()} == {"TL1": "TL1", "TL2": "TL2", "I2": "I2"}
    assert {w: r["linear_bpw"] for w, r in by_weights.items()} == {w: f.linear_bpw for w, f in facts.items()}
    assert by_weights["TL2"]["linear_bpw"] < by_weights["I2"]["linear_bpw"] == 2.0  # 1.67 bits + tile padding

    md = runner.invoke(app, ["bench", "--synthetic", "tiny", "--cache-dir", str(encodings_cache), "--weights",
                             "tl2,i2", "-p", "8", "-n", "0", "-r", "1", "-t", "1", "--membw-mib", "16"])
    assert md.exit_code == 0, md.output
    table = [[c.strip() for c in line.strip("|").split("|")] for line in md.stdout.splitlines() if line.startswith("|")]
    assert tuple(table[0]) == bench.MD_COLUMNS
    assert [dict(zip(table[0], row))["weights"] for row in table[2:]] == ["TL2", "I2"]


def test_bench_model_file_shows_its_encoding(encodings_cache):
    """A -m file of any encoding: the report names the encoding read from the file's tensors."""
    path = syn.ensure_synthetic("tiny", encodings_cache, weights="tl2")
    result = runner.invoke(app, ["bench", "-m", str(path), "-p", "4", "-n", "0", "-r", "1", "-t", "1",
                                 "--membw-mib", "16", "--no-warmup", "-o", "json"])
    assert result.exit_code == 0, result.output
    assert [(r["model"], r["weights"]) for r in json.loads(result.stdout)] == [("tiny-tl2", "TL2")]


def test_ratio_columns():
    """One encoding of ours: the `ours/peer` column of before; several: one column per encoding."""
    ours = [{"runtime": "bitnet-run", "weights": w} for w in ("I2", "TL1")]
    peer = [{"runtime": "llama.cpp TQ2_0", "weights": "TQ2_0"}]
    assert bench.ratio_columns(ours[:1] + peer) == [("ours/peer", "ratio_vs")]
    assert bench.ratio_columns(ours + peer) == [("I2/peer", "ratio_vs_i2"), ("TL1/peer", "ratio_vs_tl1")]


def test_bench_e2e_and_parallel_rows(cache_dir, tiny_path):
    """--e2e and --parallel add rows of ours next to each tg test, timed inside it."""
    result = _invoke(cache_dir, "-p", "0", "-n", "4", "-r", "2", "-t", "1", "--membw-mib", "4", "--e2e",
                     "--parallel", "1,3", "-o", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["test"], r["n_parallel"]) for r in rows] == [("tg4", None), ("e2e4", None), ("tg4 x1", 1), ("tg4 x3", 3)]
    single = rows[0]["decode_ceiling_ts"]
    for r in rows:
        assert _positive(r["avg_ts"]) and r["n_gen"] == 4
        assert r["decode_ceiling_ts"] == pytest.approx(single * (r["n_parallel"] or 1))
    bad = _invoke(cache_dir, "-p", "8", "-n", "0", "-r", "1", "-t", "1", "--e2e")
    assert bad.exit_code == 1 and "-n" in bad.stderr


def test_e2e_and_parallel_timers_do_the_work(tiny_path):
    """e2eN generates N tokens with N evaluations; tgN xS evaluates S*N tokens, N per sequence."""
    from bitnet_run.context import Context

    model = Model(tiny_path, n_threads=1, n_ctx=16)
    tokens = np.arange(5, dtype=np.int32)
    before = model.n_evaluated
    bench._time_e2e(model, tokens)
    assert model.last_stats.generated_tokens == 5 and model.n_evaluated - before == 5
    context = Context(model, n_ctx=16, n_seq=3, n_threads=1)
    bench._time_parallel(context, tokens, 3, model.n_vocab)
    assert context.n_evaluated == 15 and [context.n_past(s) for s in range(3)] == [5, 5, 5]


def test_synthetic_shapes_of_every_family(tmp_path):
    """The released layouts: Llama-architecture shapes have no sub-norms, SiLU, a dividing weight scale
    and their own head_dim; bitnet-3b is SiLU with sub-norms; and such a file loads and runs."""
    from bitnet_run import Model

    for name in ("falcon3-1b", "falcon3-3b", "falcon3-10b", "falcon-e-3b", "llama3-8b-1.58"):
        hp = syn.get_shape(name).hp
        assert (hp.hidden_act, hp.sub_norms, hp.weight_scale) == ("silu", False, "divide"), name
        names = {t.name for t in syn.tensor_plan(name)}
        assert "model.layers.0.self_attn.attn_sub_norm.weight" not in names and "lm_head.weight" in names, name
    assert syn.get_shape("falcon3-1b").head_dim == 256 and syn.get_shape("bitnet-3b").head_dim == 100
    assert syn.get_shape("bitnet-3b").hp.hidden_act == "silu" and syn.get_shape("bitnet-3b").hp.sub_norms
    shape = syn.make_llama_shape("tiny-llama", 512, 128, 344, 2, 4, 1, False, 64, 10000.0, "test", head_dim=48)
    for weights in syn.WEIGHTS:
        path = syn.write_synthetic(shape, tmp_path / f"tiny-llama-{weights}.bnr", weights=weights)
        model = Model(path, n_threads=1)
        assert model.hparams["hidden_act"] == 1 and model.hparams["sub_norms"] == 0
        assert np.all(np.isfinite(model.logits([0, 5, 9])))
