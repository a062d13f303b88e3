"""The runtime against transformers (the reference) on tiny random checkpoints in both released formats.

Tolerances: the integer parts of every BitLinear are exact on both sides, so
logits differ only through float summation order and, rarely, an activation within ~1e-5 of a .5
rounding tie whose int8 value flips by one and perturbs later positions. Hence:
- one BitLinear given the same float input: relative error <= 1e-5 (measured ~1e-7), tight;
- whole model: the bulk tight (90th percentile of per-token max |dlogit| <= 2% of the logit scale,
  median <= 0.1%), the tail loose (no token beyond 10%), argmax agreement >= 97%;
- greedy generation of 32 tokens: the same ids, or, where a tie flipped a choice, >= 95% agreement
  teacher-forced on the reference's continuation.

The KV cache is f16 by default. Its rounding (relative 2^-11 per key/value) moves the logits of these
random checkpoints by ~1% of their scale (the int8 activation rounding of later layers amplifies it), so
against plain transformers the bulk bound would fail. The f16 runtime is therefore compared to
transformers whose attention sees its keys (after RoPE) and values rounded to f16 exactly as the
runtime stores them, and an f32 cache to plain transformers with the tolerances above. One change: for
f16 the median bound is 1e-2 instead of 1e-3. On packed-mha-d32-tied the f16 reference itself moves by a
median 0.55% of scale when 1e-6 of noise is added to its attention output (activations land near int8
rounding ties there), and ours sits at that distance (0.54%); the other cases agree to ~5e-7.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from bitnet_run import Model
from checkpoints import load_reference


def _f16_kv_attention(module, query, key, value, *args, **kwargs):
    """transformers' sdpa attention over keys and values rounded to f16, as the runtime's f16 cache holds them."""
    return sdpa_attention_forward(module, query, key.half().float(), value.half().float(), *args, **kwargs)


AttentionInterface.register("f16_kv", _f16_kv_attention)


@contextlib.contextmanager
def f16_kv(reference):
    """The reference with an f16 KV cache for the duration of the block."""
    saved = reference.config._attn_implementation
    reference.config._attn_implementation = "f16_kv"
    try:
        yield reference
    finally:
        reference.config._attn_implementation = saved

SEQ_LEN = 45  # odd on purpose
N_GENERATE = 32

# (format, GQA ratio 1 and >1, head_dim 32 and 64, tied and untied head), all with I2 weights; then
# each lookup-table encoding on two of the shapes (hidden 128 and 256: in % 3 == 2 and 1, so the TL2
# tail is covered both ways; intermediate 344 / 688 rows: partial 32-row tiles).
CASES = {
    "packed-mha-d32-tied": dict(fmt="packed", hidden=128, heads=4, kv_heads=4, tied=True, seed=1),
    "packed-gqa2-d64-untied": dict(fmt="packed", hidden=256, heads=4, kv_heads=2, tied=False, seed=2),
    "master-gqa4-d32-tied": dict(fmt="master", hidden=256, heads=8, kv_heads=2, tied=True, seed=3),
    "master-mha-d64-untied": dict(fmt="master", hidden=128, heads=2, kv_heads=2, tied=False, seed=4),
    "tl1-packed-mha-d32-tied": dict(fmt="packed", hidden=128, heads=4, kv_heads=4, tied=True, seed=1, weights="tl1"),
    "tl1-master-gqa4-d32-tied": dict(fmt="master", hidden=256, heads=8, kv_heads=2, tied=True, seed=3, weights="tl1"),
    "tl2-packed-gqa2-d64-untied": dict(fmt="packed", hidden=256, heads=4, kv_heads=2, tied=False, seed=2, weights="tl2"),
    "tl2-master-mha-d64-untied": dict(fmt="master", hidden=128, heads=2, kv_heads=2, tied=False, seed=4, weights="tl2"),
    # LlamaForCausalLM with BitLinears (Falcon3 / Llama3-8B-1.58 / Falcon-E): SiLU, no sub-norms, packed
    # with an inverted weight_scale or bf16 master weights, use_rms_norm on and off, GQA 4:1, head_dim
    # from the config (48 and 40: n_heads * head_dim != hidden), every ternary encoding and the q8 head
    "llama-packed-gqa4-d48-untied-rms": dict(arch="llama", fmt="packed", hidden=128, heads=4, kv_heads=1, head_dim=48,
                                             tied=False, use_rms_norm=True, seed=11),
    "llama-packed-gqa4-tied-tl1": dict(arch="llama", fmt="packed", hidden=256, heads=4, kv_heads=1, tied=True, seed=12,
                                       weights="tl1"),
    "llama-master-gqa4-d40-untied-rms-tl2": dict(arch="llama", fmt="master", hidden=128, heads=8, kv_heads=2,
                                                 head_dim=40, tied=False, use_rms_norm=True, seed=13, weights="tl2"),
    "llama-master-gqa4-tied-i2": dict(arch="llama", fmt="master", hidden=256, heads=4, kv_heads=1, tied=True, seed=14),
    # the integer heads: the reference then computes the same Q8_R / Q6_B / Q4_B head (checkpoints.QuantHead);
    # 8-bit untied; 6-bit untied over 8 blocks per row and 4-bit tied (the embedding lookup reads the 4-bit
    # rows), on the checkpoints of packed-gqa2-d64-untied and tl1-master-gqa4-d32-tied
    "llama-master-d48-untied-tl2-q8": dict(arch="llama", fmt="master", hidden=128, heads=4, kv_heads=1, head_dim=48,
                                           tied=False, seed=17, weights="tl2", head="q8"),
    "packed-gqa2-d64-untied-q6": dict(fmt="packed", hidden=256, heads=4, kv_heads=2, tied=False, seed=2, head="q6"),
    "master-gqa4-d32-tied-tl1-q4": dict(fmt="master", hidden=256, heads=8, kv_heads=2, tied=True, seed=3,
                                        weights="tl1", head="q4"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tiny_model_factory):
    return tiny_model_factory(**CASES[request.param])


def _prompt_ids(model, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    # random ordinary tokens (no specials) after the BOS
    specials = model.stop_ids | {model.codec.bos_id}
    pool = np.array([i for i in range(model.n_vocab) if i not in specials])
    return [model.codec.bos_id] + rng.choice(pool, size=n - 1).tolist()


def _reference_logits(reference, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = reference(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out.logits[0].float().numpy()


def test_bitlinear_matches_transformers_tightly(case):
    model, reference = case.model, case.reference
    rng = np.random.default_rng(0)
    for name, module in reference.named_modules():
        if not name.endswith(("q_proj", "k_proj", "o_proj", "down_proj", "gate_proj")):
            continue
        x = (rng.standard_normal((7, module.in_features)) * rng.uniform(0.1, 5.0)).astype(np.float32)
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy()
        got = model.bitlinear(name + ".weight", x)
        rel = np.abs(got - expected).max() / np.abs(expected).max()
        assert rel <= 1e-5, f"{name}: relative error {rel:.2e}"


def _assert_logits_match(ours: np.ndarray, ref: np.ndarray, n_vocab: int, median: float = 1e-3) -> None:
    assert ours.shape == ref.shape == (SEQ_LEN, n_vocab)
    scale = np.abs(ref).max()
    per_token = np.abs(ours - ref).max(axis=1) / scale
    assert np.median(per_token) <= median, f"median per-token max |dlogit| {np.median(per_token):.2e} of scale"
    assert np.percentile(per_token, 90) <= 0.02, f"p90 {np.percentile(per_token, 90):.2e} of scale"
    assert per_token.max() <= 0.10, f"worst token {per_token.max():.2e} of scale"
    agreement = np.mean(ours.argmax(axis=1) == ref.argmax(axis=1))
    assert agreement >= 0.97, f"argmax agreement {agreement:.3f}"


def test_logits_match_transformers(case):
    """The default f16 cache against transformers with f16-rounded keys and values."""
    model, reference = case.model, case.reference
    assert model.context.kv_type == "f16"
    ids = _prompt_ids(model, SEQ_LEN, seed=case.seed)
    with f16_kv(reference):
        ref = _reference_logits(reference, ids)
    _assert_logits_match(model.logits(ids), ref, model.n_vocab, median=1e-2)


def test_f32_cache_logits_match_transformers(case):
    """The f32 cache against transformers. The median bound is the f16 test's: one int8 rounding tie
    of the activations decided the other way by torch's float order and ours moves every later
    token's logits (seen on an Intel Xeon with torch 2.13 in case llama-master-gqa4-d40-untied-rms-tl2:
    one flip at position 5, then ~5e-3 of scale on most later tokens, 1e-7 before it), so a tighter
    median depends on the CPU torch runs on; test_bitlinear_matches_transformers_tightly checks each
    BitLinear to 1e-5, and the p90, worst-token and argmax bounds still hold here."""
    model = Model(case.path, n_threads=2, kv_type="f32")
    ids = _prompt_ids(model, SEQ_LEN, seed=case.seed)
    _assert_logits_match(model.logits(ids), _reference_logits(case.reference, ids), model.n_vocab, median=1e-2)


def test_greedy_generation_matches_transformers(case):
    model, reference = case.model, case.reference
    prompt = _prompt_ids(model, 9, seed=case.seed + 100)
    # a pad id that is not in the prompt, so generate() masks nothing
    pad = next(i for i in range(model.n_vocab) if i not in prompt)
    with torch.no_grad(), f16_kv(reference):
        out = reference.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=N_GENERATE, min_new_tokens=N_GENERATE, do_sample=False, pad_token_id=pad,
            eos_token_id=None,
        )
    expected = out[0, len(prompt):].tolist()

    greedy = dict(temperature=0.0, repeat_penalty=1.0)
    saved_stops = model.stop_ids
    model.stop_ids = set()  # generate all 32 tokens, as the reference does
    try:
        from bitnet_run.sampling import SamplingParams

        got = [t for t, _ in model.stream_ids(prompt, N_GENERATE, SamplingParams(**greedy))]
    finally:
        model.stop_ids = saved_stops
    if got != expected:
        # a rounding tie flipped one choice: compare teacher-forced on the reference's continuation
        full = prompt + expected
        predicted = model.logits(full)[len(prompt) - 1 : -1].argmax(axis=1)
        agreement = np.mean(predicted == np.array(expected))
        assert agreement >= 0.95, f"teacher-forced agreement {agreement:.3f}; ours {got} vs {expected}"
