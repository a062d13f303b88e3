"""The checkpoint converter against transformers' own quantization and packing code."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from checkpoints import (
    EOT,
    make_config,
    packed_from_master,
    quantize_like_transformers,
    shard_checkpoint,
    special_ids,
    write_master_checkpoint,
    write_packed_checkpoint,
)
from safetensors.torch import load_file, save_file

from bitnet_run import fileformat as ff
from bitnet_run.convert import ConversionError, convert_checkpoint
from bitnet_run.convert.quantize import absmean_ternary


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def master_dir(root):
    # untied, GQA, in-features not a multiple of 8: covers lm_head and uneven I2 rows
    config = make_config(hidden=96, intermediate=172, heads=3, kv_heads=1, tied=False, layers=2)
    return write_master_checkpoint(root / "master", config, seed=5)


@pytest.fixture(scope="module")
def packed_f32_dir(root, master_dir):
    return packed_from_master(master_dir, root / "packed-f32", scale_dtype=torch.float32)


@pytest.fixture(scope="module")
def master_bnr(root, master_dir):
    return convert_checkpoint(master_dir, root / "master.bnr")


def _linear_names(header):
    return [t.name for t in header.tensors if t.encoding == ff.ENCODING_I2]


def _ternary(header, name):
    info = header.tensor(name)
    return ff.unpack_i2(ff.read_tensor(header, name), info.dims[1])


def _assert_scale_close(ours: float, theirs: float):
    # torch sums |W| in an order of its own (it depends on SIMD width, threads and torch.compile),
    # so the float32 mean may differ in the last bit, and 1/(1/mean) may round that to a few ulps.
    assert abs(np.float32(ours) - np.float32(theirs)) <= 4 * np.spacing(np.float32(theirs))


def test_tensor_table_follows_the_spec(master_bnr):
    header = ff.read_header(master_bnr)
    by_name = {t.name: t for t in header.tensors}
    assert by_name["model.embed_tokens.weight"].encoding == ff.ENCODING_BF16
    assert by_name["lm_head.weight"].dims == (384, 96)
    assert by_name["model.layers.0.mlp.ffn_sub_norm.weight"].encoding == ff.ENCODING_F32
    assert by_name["model.layers.0.self_attn.k_proj.weight"].dims == (32, 96)
    assert by_name["model.layers.1.mlp.down_proj.weight"].dims == (96, 172)
    assert len(header.tensors) == 3 + 2 * 11
    assert all(t.scale == 1.0 for t in header.tensors if t.encoding != ff.ENCODING_I2)


def test_master_weights_quantize_like_transformers(master_dir, master_bnr):
    header = ff.read_header(master_bnr)
    master = load_file(master_dir / "model.safetensors")
    for name in _linear_names(header):
        ternary, scale = quantize_like_transformers(master[name])
        assert np.array_equal(_ternary(header, name), ternary.numpy()), name
        _assert_scale_close(header.tensor(name).scale, scale.item())


def test_float_tensors_are_kept_exactly(master_dir, master_bnr):
    header = ff.read_header(master_bnr)
    master = load_file(master_dir / "model.safetensors")
    embedding = ff.read_tensor(header, "model.embed_tokens.weight")
    assert np.array_equal(embedding, master["model.embed_tokens.weight"].view(torch.uint16).numpy())
    norm = ff.read_tensor(header, "model.layers.1.self_attn.attn_sub_norm.weight")
    assert np.array_equal(norm, master["model.layers.1.self_attn.attn_sub_norm.weight"].float().numpy())


def test_packed_weights_unpack_like_transformers(packed_f32_dir, root):
    from transformers.integrations.bitnet import unpack_weights

    header = ff.read_header(convert_checkpoint(packed_f32_dir, root / "packed.bnr"))
    packed = load_file(packed_f32_dir / "model.safetensors")
    with torch.compiler.set_stance("force_eager"):
        for name in _linear_names(header):
            expected = unpack_weights(packed[name], dtype=torch.float32).to(torch.int8)
            assert np.array_equal(_ternary(header, name), expected.numpy()), name
            assert header.tensor(name).scale == packed[name.removesuffix("weight") + "weight_scale"].item()


def test_master_and_packed_convert_to_the_same_model(master_bnr, packed_f32_dir, root):
    master = ff.read_header(master_bnr)
    packed = ff.read_header(convert_checkpoint(packed_f32_dir, root / "packed-again.bnr"))
    general = {"general.name", "general.source"}
    assert {k: v for k, v in master.metadata.items() if k not in general} == {
        k: v for k, v in packed.metadata.items() if k not in general
    }
    assert [(t.name, t.encoding, t.dims) for t in master.tensors] == [(t.name, t.encoding, t.dims) for t in packed.tensors]
    for a, b in zip(master.tensors, packed.tensors):
        assert np.array_equal(ff.read_tensor(master, a.name), ff.read_tensor(packed, b.name)), a.name
        _assert_scale_close(a.scale, b.scale)


def test_bf16_weight_scale_is_widened_exactly(root):
    src = write_packed_checkpoint(root / "packed-bf16", make_config(), seed=2)
    header = ff.read_header(convert_checkpoint(src, root / "packed-bf16.bnr"))
    stored = load_file(src / "model.safetensors")
    for name in _linear_names(header):
        assert header.tensor(name).scale == stored[name.removesuffix("weight") + "weight_scale"].float().item()


@pytest.mark.parametrize(
    "weight",
    [
        [[0.5, 1.5], [-0.5, -1.5]],  # mean 1, all ties: round half to even, then clamp
        [[0.0, 0.0], [0.0, 0.0]],  # mean below 1e-5
        [[1e-7, -3e-7], [2e-7, 0.0]],
    ],
)
def test_absmean_matches_weight_quant_on_edge_cases(weight):
    w = np.array(weight, dtype=np.float32)
    ternary, scale = absmean_ternary(w)
    expected, expected_scale = quantize_like_transformers(torch.from_numpy(w))
    assert np.array_equal(ternary, expected.numpy())
    if expected.any():
        assert scale == expected_scale.item()
    assert scale == float(np.float32(1) / (np.float32(1) / max(np.float32(np.abs(w).mean()), np.float32(1e-5))))


@pytest.mark.parametrize("shape", [(64, 64), (256, 96), (344, 128), (128, 688), (512, 512)])
def test_absmean_ternary_matches_torch(shape):
    rng = np.random.default_rng(sum(shape))
    w = torch.from_numpy(rng.normal(0, 0.02, shape).astype(np.float32)).bfloat16().float()
    ternary, scale = absmean_ternary(w.numpy())
    expected, expected_scale = quantize_like_transformers(w)
    assert np.array_equal(ternary, expected.numpy())
    _assert_scale_close(scale, expected_scale.item())


def test_sharded_checkpoint_converts_like_unsharded(master_dir, master_bnr, root):
    sharded = shard_checkpoint(master_dir, root / "sharded" / master_dir.name, shards=3)
    assert len(list(sharded.glob("*.safetensors"))) == 3
    a, b = ff.read_header(master_bnr), ff.read_header(convert_checkpoint(sharded, root / "sharded.bnr"))
    a.metadata.pop("general.source"), b.metadata.pop("general.source")
    assert a.metadata == b.metadata
    assert a.tensors == b.tensors
    for info in a.tensors:
        assert np.array_equal(ff.read_tensor(a, info.name), ff.read_tensor(b, info.name)), info.name


def test_conversion_is_deterministic(master_dir, root):
    first = convert_checkpoint(master_dir, root / "first.bnr").read_bytes()
    second = convert_checkpoint(master_dir, root / "second.bnr").read_bytes()
    assert first == second


def test_hub_repo_id_downloads_then_converts(master_dir, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(master_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = convert_checkpoint("someone/tiny-bitnet", tmp_path)
    assert out == tmp_path / "tiny-bitnet.bnr"
    assert calls[0][0] == "someone/tiny-bitnet"
    assert {"*.json", "*.safetensors"} <= set(calls[0][1])
    metadata = ff.read_header(out).metadata
    assert metadata["general.source"] == "someone/tiny-bitnet" and metadata["general.name"] == "tiny-bitnet"


def test_not_a_directory_nor_repo_id(tmp_path):
    with pytest.raises(ConversionError, match="no such directory"):
        convert_checkpoint(tmp_path / "missing" / "deep" / "path", tmp_path / "x.bnr")


def test_metadata(master_dir, master_bnr):
    config = json.loads((master_dir / "config.json").read_text())
    metadata = ff.read_header(master_bnr).metadata
    ids = special_ids()
    assert metadata["general.architecture"] == "bitnet"
    assert metadata["general.converter"].startswith("bitnet-run ")
    assert metadata["bitnet.vocab_size"] == config["vocab_size"]
    assert metadata["bitnet.n_layers"] == config["num_hidden_layers"]
    assert (metadata["bitnet.n_heads"], metadata["bitnet.n_kv_heads"], metadata["bitnet.head_dim"]) == (3, 1, 32)
    assert metadata["bitnet.context_length"] == config["max_position_embeddings"]
    assert metadata["bitnet.rope_theta"] == 500000.0
    assert metadata["bitnet.rms_norm_eps"] == float(np.float32(1e-5))
    assert metadata["bitnet.hidden_act"] == "relu2" and metadata["bitnet.tied_embeddings"] == 0
    assert metadata["tokenizer.json"] == (master_dir / "tokenizer.json").read_text()
    assert "Assistant: " in metadata["tokenizer.chat_template"]
    assert metadata["tokenizer.bos_id"] == config["bos_token_id"]
    assert metadata["tokenizer.eos_id"] == config["eos_token_id"]
    assert metadata["tokenizer.stop_ids"] == [config["eos_token_id"], ids[EOT]]
    assert metadata["tokenizer.add_bos"] == 1


def test_metadata_from_side_files(master_dir, tmp_path):
    """Legacy rope_theta key, generation_config eos ids, a separate chat_template.jinja, add_bos_token."""
    src = shutil.copytree(master_dir, tmp_path / "src")
    _edit_json(src / "config.json", lambda c: (c.pop("rope_parameters"), c.update(rope_theta=10000.0)))
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    (src / "chat_template.jinja").write_text("{{ messages }}")
    _edit_json(src / "tokenizer_config.json", lambda c: c.update(add_bos_token=False))
    metadata = ff.read_header(convert_checkpoint(src, tmp_path / "x.bnr")).metadata
    ids = special_ids()
    assert metadata["bitnet.rope_theta"] == 10000.0
    assert metadata["tokenizer.stop_ids"] == [ids["<|end_of_text|>"], 5, 7, ids[EOT]]
    assert metadata["tokenizer.chat_template"] == "{{ messages }}"
    assert metadata["tokenizer.add_bos"] == 0


def test_progress_reports_every_tensor(master_dir, tmp_path):
    seen = []
    convert_checkpoint(master_dir, tmp_path / "x.bnr", progress=lambda done, total, name: seen.append((done, total, name)))
    assert [s[0] for s in seen] == list(range(1, 26)) and {s[1] for s in seen} == {25}
    assert seen[0][2] == "model.embed_tokens.weight"


# --------------------------------------------------------------------------- refusals


def _edit_json(path, edit):
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


def _edit_tensors(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _config(edit):
    return lambda src: _edit_json(src / "config.json", edit)


def _quant(key, value):
    return _config(lambda c: c["quantization_config"].update({key: value}))


def _tensors(edit):
    return lambda src: _edit_tensors(src / "model.safetensors", edit)


UP = "model.layers.1.mlp.up_proj.weight"
REFUSALS = {
    "model_type": (_config(lambda c: c.update(model_type="llama")), "model_type 'llama' is not supported (expected 'bitnet')"),
    "architectures": (_config(lambda c: c.update(architectures=["LlamaForCausalLM"])), "architectures"),
    "no quantization_config": (_config(lambda c: c.pop("quantization_config")), "quantization_config is None"),
    "quant_method": (_quant("quant_method", "gptq"), "quantization_config.quant_method is 'gptq'"),
    "linear_class": (_quant("linear_class", "fancylinear"), "quantization_config.linear_class is 'fancylinear'"),
    # transformers' default linear_class is bitlinear, which holds packed weights only
    "linear_class missing": (_config(lambda c: c["quantization_config"].pop("linear_class")),
                             "quantization_mode is 'online' with linear_class 'bitlinear'"),
    "quantization_mode": (_quant("quantization_mode", "dynamic"), "quantization_config.quantization_mode is 'dynamic'"),
    "use_rms_norm": (_quant("use_rms_norm", True), "tensor 'model.layers.0.self_attn.q_proj.rms_norm.weight' is missing"),
    "modules_to_not_convert": (_quant("modules_to_not_convert", ["model.layers.0.mlp.up_proj"]), "modules_to_not_convert"),
    "hidden_act": (_config(lambda c: c.update(hidden_act="gelu")), "hidden_act 'gelu' is not supported"),
    "rope_type": (_config(lambda c: c["rope_parameters"].update(rope_type="llama3")), "rope_type"),
    "rope_scaling": (_config(lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0})),
                     "rope_scaling.rope_type is 'yarn' (expected 'default' or no rope_scaling)"),
    "attention_bias": (_config(lambda c: c.update(attention_bias=True)), "attention_bias is True (expected false"),
    "mlp_bias": (_config(lambda c: c.update(mlp_bias=True)), "mlp_bias is True (expected false"),
    "bias tensor": (_tensors(lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(128)})),
                    "unexpected tensor 'model.layers.0.self_attn.q_proj.bias' (biases are not supported)"),
    "unknown architecture": (_config(lambda c: c.update(architectures=["MistralForCausalLM"])),
                             "architectures ['MistralForCausalLM'] is not supported (expected one of"),
    "head_dim": (_config(lambda c: c.update(head_dim=40)), "head_dim"),
    "kv heads": (_config(lambda c: c.update(num_key_value_heads=2)), "num_key_value_heads"),
    "vocab_size": (_config(lambda c: c.pop("vocab_size")), "vocab_size is missing"),
    "missing tensor": (_tensors(lambda t: t.pop(UP)), f"tensor '{UP}' is missing"),
    "mis-shaped tensor": (_tensors(lambda t: t.update({UP: t[UP][:8]})), f"tensor '{UP}' has shape [8, 96] (expected [172, 96])"),
    "wrong dtype": (_tensors(lambda t: t.update({UP: t[UP].to(torch.int8)})), f"tensor '{UP}' has dtype I8"),
    "unexpected tensor": (_tensors(lambda t: t.update({"model.extra.weight": torch.zeros(2)})), "unexpected tensor 'model.extra.weight'"),
    "missing tokenizer.json": (lambda src: (src / "tokenizer.json").unlink(), "tokenizer.json: not found"),
    "no safetensors": (lambda src: (src / "model.safetensors").unlink(), "model.safetensors"),
    "broken safetensors": (lambda src: (src / "model.safetensors").write_bytes(b"\x10" * 20), "not a safetensors file"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(master_dir, tmp_path, case):
    mutate, message = REFUSALS[case]
    src = shutil.copytree(master_dir, tmp_path / "src")
    mutate(src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ConversionError) as excinfo:
        convert_checkpoint(src, out_dir / "x.bnr")
    assert message in str(excinfo.value)
    assert "\n" not in str(excinfo.value)
    assert list(out_dir.iterdir()) == []


PACKED_REFUSALS = {
    "missing weight_scale": (
        lambda t: t.pop("model.layers.0.self_attn.q_proj.weight_scale"),
        "tensor 'model.layers.0.self_attn.q_proj.weight_scale' is missing",
    ),
    "master weight in packed checkpoint": (
        lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(344, 128, dtype=torch.bfloat16)}),
        "has shape [344, 128] (expected [86, 128])",
    ),
    # found only while writing: the half-written file must disappear too
    "invalid code 3": (
        lambda t: t["model.layers.1.mlp.down_proj.weight"].__setitem__((0, 0), 0xFF),
        "tensor 'model.layers.1.mlp.down_proj.weight': packed weight holds the invalid code 3",
    ),
}


@pytest.mark.parametrize("case", list(PACKED_REFUSALS))
def test_packed_refusals(tmp_path, case):
    edit, message = PACKED_REFUSALS[case]
    src = write_packed_checkpoint(tmp_path / "src", make_config(), seed=1)
    _edit_tensors(src / "model.safetensors", edit)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ConversionError) as excinfo:
        convert_checkpoint(src, out_dir / "x.bnr")
    assert message in str(excinfo.value)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("weights,encoding,unpack", [
    ("tl1", ff.ENCODING_TL1, ff.unpack_tl1),
    ("tl2", ff.ENCODING_TL2, ff.unpack_tl2),
])
def test_lookup_table_weights_hold_the_same_ternary_values(master_dir, master_bnr, root, weights, encoding, unpack):
    """--weights tl1/tl2: the same tensors, shapes, scales and ternary values as I2, in the other layout."""
    i2 = ff.read_header(master_bnr)
    tl = ff.read_header(convert_checkpoint(master_dir, root / f"master-{weights}.bnr", weights=weights))
    assert [(t.name, t.dims) for t in tl.tensors] == [(t.name, t.dims) for t in i2.tensors]
    names = _linear_names(i2)
    assert names and all(tl.tensor(n).encoding == encoding for n in names)
    for name in names:
        rows, cols = tl.tensor(name).dims
        assert np.array_equal(unpack(ff.read_tensor(tl, name), rows, cols), _ternary(i2, name)), name
        assert tl.tensor(name).scale == i2.tensor(name).scale


def test_unknown_weights_encoding_is_refused(master_dir, tmp_path):
    with pytest.raises(ValueError, match="weights"):
        convert_checkpoint(master_dir, tmp_path / "x.bnr", weights="tl3")
    assert not list(tmp_path.iterdir())
