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
    model = tiny_model.model.new_context()  # a fresh cache: the counts below start from nothing
    kwargs = dict(max_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=123, stop_ids=())
    responses = list(model.stream_generate("Once upon", **kwargs))
    # the incremental text is the full decode of the generated ids (nothing split, lost or repeated)
    assert "".join(r.text for r in responses) == model.detokenize([r.token for r in responses])
    assert [r.generation_tokens for r in responses] == list(range(1, 21))
    assert [r.finish_reason for r in responses] == [None] * 19 + ["length"]
    n_prompt = len(model.tokenize("Once upon"))
    assert {(r.prompt_tokens, r.cached_tokens) for r in responses} == {(n_prompt, 0)}
    stats = model.last_stats
    assert (stats.prompt_tokens, stats.generated_tokens, stats.eval_tokens) == (n_prompt, 20, 19)
    assert stats.prompt_tps > 0 and stats.generation_tps > 0 and stats.end_to_end_tps > 0
    # seeded: the same text again (now from the cache: only the last prompt token is evaluated) ...
    text = model.generate("Once upon", **kwargs)
    assert text == "".join(r.text for r in responses)
    assert (model.last_stats.prompt_tokens, model.last_stats.cached_tokens) == (1, n_prompt - 1)
    # ... and another seed gives another text
    assert model.generate("Once upon", **{**kwargs, "seed": 124}) != text


def _greedy(model, prompt, n, **kwargs):
    return list(model.stream_generate(prompt, max_tokens=n, temperature=0.0, repeat_penalty=1.0, **kwargs))


def test_greedy_generation_follows_argmax(tiny_model):
    model = tiny_model.model
    prompt = model.tokenize("The")
    greedy = SamplingParams(temperature=0.0, repeat_penalty=1.0)
    ids = [t for t, _ in model.stream_ids(prompt, 8, greedy)]
    assert ids
    full = prompt + ids
    logits = model.logits(full)
    for i, token in enumerate(ids):
        assert token == int(np.argmax(logits[len(prompt) - 1 + i]))


def test_generation_stops_on_stop_ids(tiny_model):
    model = tiny_model.model
    sampled = dict(max_tokens=12, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5)
    free = [r.token for r in model.stream_generate("The", stop_ids=(), **sampled)]
    # make the first token that is not a repeat (after the first) a stop id: generation ends there and
    # that token's text is not emitted
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    got = list(model.stream_generate("The", stop_ids={free[k]}, **sampled))
    assert [r.token for r in got] == free[: k + 1]
    assert got[-1].finish_reason == "stop" and got[-1].text == ""
    assert "".join(r.text for r in got) == model.detokenize(free[:k])
    # the model's own stop ids: a logit bias that makes end-of-turn certain ends the reply at once
    eot = model.codec.tokenizer.token_to_id("<|eot_id|>")
    assert eot in model.stop_ids
    got = _greedy(model, "The", 8, logit_bias={eot: 100.0})
    assert [(r.token, r.finish_reason, r.text) for r in got] == [(eot, "stop", "")]


def test_chat_renders_template_and_replies_greedily(tiny_model):
    model = tiny_model.model
    messages = [{"role": "user", "content": "hi"}]
    prompt = model.apply_chat_template(messages)
    assert prompt.count(model.codec.token_text(model.codec.bos_id)) == 1  # the template writes the only BOS
    ids = model.tokenize_chat(messages)
    assert ids == model.tokenize(prompt, add_bos=False)  # no special-token text in the message
    expected = [t for t, _ in model.stream_ids(ids, 16, SamplingParams(temperature=0.0, repeat_penalty=1.0))]
    reply = model.chat(messages, max_tokens=16, temperature=0.0, repeat_penalty=1.0)
    assert reply == model.detokenize(expected)


def test_special_token_text_in_a_message_stays_text(tiny_model):
    model = tiny_model.model
    eot = model.codec.tokenizer.token_to_id("<|eot_id|>")
    plain = model.tokenize_chat([{"role": "user", "content": "a b"}])
    typed = model.tokenize_chat([{"role": "user", "content": "a <|eot_id|> b"}])
    assert typed.count(eot) == plain.count(eot) == 1  # only the template's own end of turn
    assert model.detokenize(typed) == model.detokenize(plain).replace("a b", "a <|eot_id|> b")
    assert model.tokenize("<|eot_id|>", add_bos=False, parse_special=False) != [eot]
    assert model.tokenize("<|eot_id|>", add_bos=False) == [eot]


def test_tokenize_chat_is_transformers_and_prefix_stable(tiny_model):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tiny_model.checkpoint)
    model = tiny_model.model
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"}]
    expected = reference.apply_chat_template(first, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert model.tokenize_chat(first) == list(expected)
    # the next turn's ids start with this turn's, the reply tokenized on its own after the prompt, also
    # where tokenizing it together with the template text before it would merge across the boundary
    def plain(text):
        return model.tokenize(text, add_bos=False)

    reply = next(r for r in ["the end.", "and then", "of the", "in it"]
                 if plain("Assistant: " + r) != plain("Assistant: ") + plain(r))
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Sure?"}]
    ids = model.tokenize_chat(second)
    n = len(model.tokenize_chat(first))
    assert ids[:n] == model.tokenize_chat(first)
    assert ids[n : n + len(plain(reply))] == plain(reply)


def test_stop_strings_are_never_emitted(tiny_model):
    model = tiny_model.model
    free = _greedy(model, "Once upon", 24, stop_ids=())
    text = "".join(r.text for r in free)
    # a stop string made of the end of one token's text and the start of the next one's
    k = next(i for i in range(4, len(free) - 1) if len(free[i].text) >= 1 and len(free[i + 1].text) >= 2)
    stop = free[k].text[-1:] + free[k + 1].text[:2]
    cut = text.index(stop)
    got = _greedy(model, "Once upon", 24, stop_ids=(), stop=[stop, "\x00never"])
    emitted = "".join(r.text for r in got)
    assert emitted == text[:cut] and stop not in emitted
    assert got[-1].finish_reason == "stop" and len(got) <= k + 2
    # a stop string whose start appears but that never completes: everything held back comes out at the end
    got = _greedy(model, "Once upon", 24, stop_ids=(), stop=stop + "\x00")
    assert "".join(r.text for r in got) == text and got[-1].finish_reason == "length"


def test_logprobs(tiny_model):
    model = tiny_model.model
    got = _greedy(model, "The", 4, stop_ids=(), logprobs=True, top_logprobs=3)
    logits = model.logits(model.tokenize("The") + [r.token for r in got])
    for i, r in enumerate(got):
        row = logits[len(model.tokenize("The")) - 1 + i].astype(np.float64)
        log_p = row - (np.log(np.exp(row - row.max()).sum()) + row.max())
        order = np.argsort(-log_p)[:3]
        assert r.logprobs.token == r.token
        assert abs(r.logprobs.logprob - log_p[r.token]) <= 1e-4
        assert [t for t, _ in r.logprobs.top] == order.tolist()
        assert np.allclose([lp for _, lp in r.logprobs.top], log_p[order], atol=1e-4)
    assert all(r.logprobs is None for r in _greedy(model, "The", 2))


def test_generation_reports_a_full_context(tiny_model):
    small = tiny_model.model.new_context(n_ctx=12)
    prompt = small.tokenize("Once upon")
    got = _greedy(small, prompt, 50, stop_ids=())
    # the prompt fills len(prompt) positions; every token after it but the last is evaluated
    assert len(got) == 12 - len(prompt) + 1
    assert got[-1].finish_reason == "context" and small.last_stats.eval_tokens == len(got) - 1


def test_logits_do_not_disturb_the_generation_cache(tiny_model):
    model = tiny_model.model.new_context()
    first = model.generate("Once upon a time", max_tokens=6, temperature=0.0)
    n = len(model.tokenize("Once upon a time"))
    model.logits(model.tokenize("something else entirely"))
    assert model.generate("Once upon a time", max_tokens=6, temperature=0.0) == first
    assert (model.last_stats.cached_tokens, model.last_stats.prompt_tokens) == (n - 1, 1)


def test_two_threads_on_two_contexts_match_running_alone(tiny_model):
    import threading

    model = tiny_model.model
    jobs = [("Once upon", 11), ("The cat sat", 12)]
    contexts = [model.new_context() for _ in jobs]
    kwargs = dict(max_tokens=24, temperature=0.9, stop_ids=())
    alone = [ctx.generate(p, seed=s, **kwargs) for ctx, (p, s) in zip(contexts, jobs)]
    for ctx in contexts:
        ctx.reset()
    results = [[] for _ in jobs]

    def work(i):
        for _ in range(3):
            contexts[i].reset()
            results[i].append(contexts[i].generate(jobs[i][0], seed=jobs[i][1], **kwargs))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [[text] * 3 for text in alone]


def test_interleaved_generators_on_one_context_are_refused(tiny_model):
    model = tiny_model.model.new_context()
    first = model.stream("Once upon", max_tokens=8)
    next(first)
    with pytest.raises(RuntimeError, match="new_context"):
        next(model.stream("The", max_tokens=8))
    first.close()
    assert model.generate("The", max_tokens=2)  # the context is free again


def test_close_and_with(tiny_model):
    with tiny_model.model.new_context() as model:
        assert model.generate("The", max_tokens=2, stop_ids=())
    with pytest.raises(ValueError, match="closed"):
        model.generate("The", max_tokens=2)
    assert tiny_model.model.generate("The", max_tokens=2, stop_ids=())  # the weights are still shared


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
    assert model.n_ctx == min(config["max_position_embeddings"], 4096)
    assert model.metadata_str("general.architecture") == "bitnet"
