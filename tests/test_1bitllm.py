"""1bitLLM bitnet_b1_58 (BitnetForCausalLM, model_type llama): conversion and logits against an independent
float reference (tests/checkpoints.py OneBitReference: transformers has no class for this family), with
the tolerances of tests/test_parity.py, on every ternary encoding and on K that is neither a multiple of
3 nor of 256 (hidden 200, head_dim 50, intermediate 540: the 3B's 3200 / 100 / 8640 scaled down); and
its sentencepiece tokenizer, converted to a tokenizers one, against the sentencepiece package."""
from __future__ import annotations

import numpy as np
import pytest

from checkpoints import OneBitReference, _training_text, write_1bitllm_checkpoint

CASES = {
    "d50-mha-tied-i2": dict(hidden=200, intermediate=540, heads=4, kv_heads=4, tied=True, seed=21, weights="i2"),
    "d50-mha-tied-tl2": dict(hidden=200, intermediate=540, heads=4, kv_heads=4, tied=True, seed=21, weights="tl2"),
    "d32-gqa2-untied-tl1": dict(hidden=128, intermediate=344, heads=4, kv_heads=2, tied=False, seed=22, weights="tl1"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    from bitnet_run import Model
    from bitnet_run.convert import convert_checkpoint

    args = dict(CASES[request.param])
    weights = args.pop("weights")
    root = tmp_path_factory.mktemp(request.param)
    src = write_1bitllm_checkpoint(root / "hf", **args)
    path = convert_checkpoint(src, root / "model.bnr", weights=weights)
    return Model(path, n_threads=2, kv_type="f32"), OneBitReference(src), src, path


def test_bitlinear_matches_the_reference_tightly(case):
    model, reference, *_ = case
    rng = np.random.default_rng(0)
    for name, w in reference.w.items():
        if not name.endswith("proj.weight"):
            continue
        x = (rng.standard_normal((5, w.shape[1])) * rng.uniform(0.1, 5.0)).astype(np.float32)
        expected = reference.bitlinear(name, x)
        rel = np.abs(model.bitlinear(name, x) - expected).max() / np.abs(expected).max()
        assert rel <= 1e-5, f"{name}: relative error {rel:.2e}"


def test_logits_match_the_reference(case):
    model, reference, *_ = case
    rng = np.random.default_rng(5)
    ids = [1] + rng.integers(3, 400, size=44).tolist()
    ours, ref = model.logits(ids), reference.logits(ids)
    scale = np.abs(ref).max()
    per_token = np.abs(ours - ref).max(axis=1) / scale
    assert np.median(per_token) <= 1e-3, f"median {np.median(per_token):.2e} of scale"
    assert np.percentile(per_token, 90) <= 0.02, f"p90 {np.percentile(per_token, 90):.2e}"
    assert per_token.max() <= 0.10, f"worst {per_token.max():.2e}"
    assert np.mean(ours.argmax(axis=1) == ref.argmax(axis=1)) >= 0.97


def test_tokenizer_matches_sentencepiece(case):
    import sentencepiece as spm

    model, _, src, _ = case
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    texts = _training_text()[:40] + ["Hello  world \u00fcn\u00efc\u00f6d\u00e9 1234 \u2603\ttabs\nnew lines", " lead", "a", ""]
    for text in texts:
        assert model.tokenize(text, add_bos=False) == sp.encode(text), text
        assert model.tokenize(text) == [sp.bos_id()] + sp.encode(text), text
        assert model.detokenize(sp.encode(text)) == sp.decode(sp.encode(text)), text


def test_metadata_describes_the_family(case):
    from bitnet_run import fileformat as ff

    model, _, _, path = case
    hp = model.hparams
    assert hp["hidden_act"] == 1 and hp["sub_norms"] == 1 and hp["weight_scale_divides"] == 0
    assert hp["linear_norm_eps"] == 0.0
    names = [t.name for t in ff.read_header(path).tensors]
    # the checkpoint's sub-norm names become the file's (docs/format.md)
    assert "model.layers.0.self_attn.attn_sub_norm.weight" in names and "model.layers.1.mlp.ffn_sub_norm.weight" in names
    assert not any("inner_attn_ln" in n or "ffn_layernorm" in n for n in names)
