"""The Python API: tokenizer, generation loop, sampling, chat template."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from bitnet_run.sampling import Sampler, SamplingParams

TEXTS = ["Hello world", "  leading spaces and numbers 12345", "unicode: café naïve 日本語 🙂", "", "a\nb\tc"]


def test_tokenize_equals_tokenizers_library(tiny_model):
    model = tiny_model.model
    reference = Tokenizer.from_file(str(tiny_model.checkpoint / "tokenizer.json"))
    for text in TEXTS:
        plain = reference.encode(text, add_special_tokens=False).ids
        assert model.tokenize(text, add_bos=False) == plain
        assert model.tokenize(text) == [model.codec.bos_id] + plain
        assert model.detokenize(model.tokenize(text)) == text


def test_chat_template_matches_transformers(tiny_model):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tiny_model.checkpoint)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 plus 4?"},
    ]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tiny_model.model.apply_chat_template(messages) == expected


def test_logits_from_fresh_cache_each_call(tiny_model):
    model = tiny_model.model
    ids = model.tokenize("the same text twice")
    first = model.logits(ids)
    model.generate("something else entirely", max_tokens=5, seed=1)
    assert np.array_equal(model.logits(ids), first)
    # a prefix gives the same rows: position i depends only on tokens <= i
    assert np.allclose(model.logits(ids[:3]), first[:3], rtol=0, atol=1e-5)


def test_generate_is_the_stream_joined_and_seeded(tiny_model):
    model = tiny_model.model
    kwargs = dict(max_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=123)
    pieces = list(model.stream("Once upon", **kwargs))
    assert "".join(pieces) == model.generate("Once upon", **kwargs)
    assert model.generate("Once upon", **kwargs) == model.generate("Once upon", **kwargs)
    stats = model.last_stats
    assert stats.prompt_tokens == len(model.tokenize("Once upon"))
    assert stats.generated_tokens <= 20 and stats.prompt_tps > 0


def test_greedy_generation_follows_argmax(tiny_model):
    model = tiny_model.model
    prompt = model.tokenize("The")
    greedy = SamplingParams(temperature=0.0, repeat_penalty=1.0)
    ids = [t for t, _ in model.stream_ids(prompt, 8, greedy)]
    full = prompt + ids
    logits = model.logits(full)
    for i, token in enumerate(ids):
        row = logits[len(prompt) - 1 + i]
        if token in model.stop_ids:
            break
        assert token == int(np.argmax(row))


def test_chat_renders_template_and_stops_on_stop_ids(tiny_model):
    model = tiny_model.model
    reply = model.chat([{"role": "user", "content": "hi"}], max_tokens=16, temperature=0.0)
    assert isinstance(reply, str)
    prompt = model.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt.count(model.codec.token_text(model.codec.bos_id)) == 1  # the template writes the only BOS


def test_sampler_filters():
    logits = np.array([5.0, 4.0, 3.0, 0.0, -1.0], dtype=np.float32)
    always_first = Sampler(SamplingParams(temperature=1.0, top_k=1, seed=0))
    assert {always_first(logits, []) for _ in range(20)} == {0}
    top2 = Sampler(SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=0))
    assert {top2(logits, []) for _ in range(200)} == {0, 1}
    # min_p 0.5 of the top probability keeps only tokens within ln 2 of the best
    minp = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5, seed=0))
    assert {minp(logits, []) for _ in range(100)} == {0}
    # a strong repeat penalty moves greedy away from a repeated token
    penalised = Sampler(SamplingParams(temperature=0.0, repeat_penalty=10.0))
    assert penalised(logits, [0]) == 1


def test_model_metadata(tiny_model):
    model = tiny_model.model
    config = json.loads((tiny_model.checkpoint / "config.json").read_text())
    assert model.hparams["hidden_size"] == config["hidden_size"]
    assert model.hparams["n_layers"] == config["num_hidden_layers"]
    assert model.n_vocab == config["vocab_size"]
    assert model.n_threads == 2
    assert model.metadata_str("general.architecture") == "bitnet"
