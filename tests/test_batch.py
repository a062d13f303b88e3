"""Many sequences in one context (bn_decode, bitnet_run.context.Context): the logits of every token are
bit-identical whatever else shares its batch, in whatever order, however the batch is chunked, after
prefix copies between slots and after truncation; bad batches are one-line errors that change no cache."""
from __future__ import annotations

import numpy as np
import pytest

from bitnet_run.context import Context
from bitnet_run.errors import ContextOverflowError

N_SEQ = 4
N_CTX = 96


@pytest.fixture(scope="module", params=["f16", "f32"])
def kv_type(request):
    return request.param


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    # GQA (2 query heads per kv head), untied head: every part of attention and the head in play
    return tiny_model_factory(fmt="packed", hidden=256, heads=4, kv_heads=2, tied=False, seed=2).model


class Alone:
    """Logits of token sequences each evaluated alone, from position 0, in one bn_eval call."""

    def __init__(self, model, kv_type):
        self.ctx = Context(model, n_ctx=N_CTX, n_seq=1, n_threads=2, kv_type=kv_type)

    def __call__(self, ids: list[int]) -> np.ndarray:
        return self.ctx.eval(ids, 0, all_logits=True)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def random_tokens(rng, n: int, n_vocab: int) -> list[int]:
    return rng.integers(0, n_vocab, n).tolist()


@pytest.mark.parametrize("seed", range(6))
def test_interleaved_sequences_equal_each_alone(model, kv_type, seed):
    """Random sequences fed in random interleaved batches (some over the 64-token chunk) and slots."""
    rng = np.random.default_rng(seed)
    ctx = Context(model, n_ctx=N_CTX, n_seq=N_SEQ, n_threads=2, kv_type=kv_type)
    alone = Alone(model, kv_type)
    slots = rng.permutation(N_SEQ)[: rng.integers(2, N_SEQ + 1)]
    seqs = {int(s): random_tokens(rng, int(rng.integers(1, 90)), model.n_vocab) for s in slots}
    fed = {s: 0 for s in seqs}
    got = {s: [] for s in seqs}
    while any(fed[s] < len(seqs[s]) for s in seqs):
        # each pending sequence contributes its next 0..70 tokens; the batch interleaves them randomly
        # while keeping every sequence's own order
        parts = []
        for s in seqs:
            take = min(len(seqs[s]) - fed[s], int(rng.integers(0, 71)))
            parts += [s] * take
        if not parts:
            continue
        rng.shuffle(parts)
        tokens, seq_ids, positions = [], [], []
        for s in parts:
            tokens.append(seqs[s][fed[s]])
            seq_ids.append(s)
            positions.append(fed[s])
            fed[s] += 1
        want = rng.random(len(parts)) < 0.7
        want[-1] = True
        logits = ctx.decode(tokens, seq_ids, positions, want)
        assert logits.shape == (int(want.sum()), model.n_vocab)
        rows = iter(logits)
        for s, p, w in zip(seq_ids, positions, want):
            if w:
                got[s].append((p, next(rows)))
    for s, ids in seqs.items():
        assert ctx.n_past(s) == len(ids)
        reference = alone(ids)
        for p, row in got[s]:
            assert same_bits(row, reference[p]), f"slot {s}, position {p}"
    assert ctx.n_evaluated == sum(len(ids) for ids in seqs.values())


def test_only_last_logits_by_default(model, kv_type):
    ctx = Context(model, n_ctx=N_CTX, n_seq=2, n_threads=2, kv_type=kv_type)
    a, b = [5, 6, 7], [8, 9]
    out = ctx.decode(a + b, [0, 0, 0, 1, 1], [0, 1, 2, 0, 1])
    assert out.shape == (1, model.n_vocab)
    assert same_bits(out[0], Alone(model, kv_type)(b)[-1])


def test_prefix_copy_then_continue(model, kv_type):
    """A shared prompt evaluated once, copied into other slots, continued differently in each."""
    rng = np.random.default_rng(1)
    ctx = Context(model, n_ctx=N_CTX, n_seq=N_SEQ, n_threads=2, kv_type=kv_type)
    alone = Alone(model, kv_type)
    prompt = random_tokens(rng, 30, model.n_vocab)
    ctx.eval(prompt, 0, seq=2)
    tails = {s: random_tokens(rng, 5 + s, model.n_vocab) for s in (0, 1, 3)}
    for s in tails:
        ctx.copy(2, s, 20 if s == 3 else 30)  # slot 3 shares only the first 20 tokens
    tokens, seq_ids, positions = [], [], []
    for i in range(max(map(len, tails.values()))):  # one token of each tail in turn
        for s, tail in tails.items():
            if i < len(tail):
                start = 20 if s == 3 else 30
                tokens.append(tail[i]), seq_ids.append(s), positions.append(start + i)
    logits = ctx.decode(tokens, seq_ids, positions, np.ones(len(tokens), bool))
    for s, tail in tails.items():
        start = 20 if s == 3 else 30
        want = alone(prompt[:start] + tail)[start:]
        rows = logits[[i for i, q in enumerate(seq_ids) if q == s]]
        assert same_bits(rows, want), f"slot {s}"
    assert ctx.n_past(2) == 30  # the source is untouched


def test_truncate_then_reevaluate(model, kv_type):
    rng = np.random.default_rng(2)
    ctx = Context(model, n_ctx=N_CTX, n_seq=2, n_threads=2, kv_type=kv_type)
    alone = Alone(model, kv_type)
    first, second = random_tokens(rng, 40, model.n_vocab), random_tokens(rng, 12, model.n_vocab)
    ctx.eval(first, 0, seq=1)
    ctx.truncate(1, 25)
    assert ctx.n_past(1) == 25
    got = ctx.decode(second, [1] * 12, range(25, 37), np.ones(12, bool))
    assert same_bits(got, alone(first[:25] + second)[25:])
    ctx.clear(1)
    assert ctx.n_past(1) == 0
    assert same_bits(ctx.eval(second, 0, seq=1, all_logits=True), alone(second))
    # eval on slot 0 keeps bn_eval's meaning: a smaller position drops the cache beyond it
    ctx.eval(first, 0)
    assert same_bits(ctx.eval(second, 10, all_logits=True), alone(first[:10] + second)[10:])
    assert ctx.n_past(0) == 22


BAD_BATCHES = [
    # (tokens, seq_ids, positions, error, message) on a context whose slot 0 holds 3 tokens, slot 1 none
    ([1, 2], [0, 4], [3, 0], ValueError, r"sequence id 4 at index 1 is out of range \[0, 4\)"),
    ([1], [0], [2], ValueError, "token at index 0 of sequence 0 is at position 2, expected 3"),
    ([1, 2], [1, 1], [0, 2], ValueError, "token at index 1 of sequence 1 is at position 2, expected 1"),
    ([1, 2], [1, 1], [0, 0], ValueError, "token at index 1 of sequence 1 is at position 0, expected 1"),
    ([1, 2], [1, 0], [1, 3], ValueError, "token at index 0 of sequence 1 is at position 1, expected 0"),
    ([1, -1], [1, 1], [0, 1], ValueError, r"token id -1 at index 1 is out of range \[0, "),
    ([1, 10**6], [0, 1], [3, 0], ValueError, "token id 1000000 at index 1"),
    ([7] * (N_CTX - 2), [0] * (N_CTX - 2), list(range(3, N_CTX + 1)), ContextOverflowError,
     f"token at index {N_CTX - 3} of sequence 0 at position {N_CTX} does not fit in the context of {N_CTX}"),
]


@pytest.mark.parametrize("tokens,seq_ids,positions,error,message", BAD_BATCHES)
def test_bad_batches_are_errors_that_change_nothing(model, kv_type, tokens, seq_ids, positions, error, message):
    rng = np.random.default_rng(3)
    ctx = Context(model, n_ctx=N_CTX, n_seq=N_SEQ, n_threads=2, kv_type=kv_type)
    alone = Alone(model, kv_type)
    prefix = random_tokens(rng, 3, model.n_vocab)
    ctx.eval(prefix, 0)
    evaluated = ctx.n_evaluated
    with pytest.raises(error, match=message) as info:
        ctx.decode(tokens, seq_ids, positions)
    assert "\n" not in str(info.value)
    assert [ctx.n_past(s) for s in range(N_SEQ)] == [3, 0, 0, 0]
    assert ctx.n_evaluated == evaluated
    # the caches below every sequence's length are intact: continuing gives the single-sequence logits
    more = random_tokens(rng, 4, model.n_vocab)
    got = ctx.decode(more + more, [0] * 4 + [1] * 4, [3, 4, 5, 6, 0, 1, 2, 3], np.ones(8, bool))
    assert same_bits(got[:4], alone(prefix + more)[3:])
    assert same_bits(got[4:], alone(more))


def test_bad_sequence_operations(model):
    ctx = Context(model, n_ctx=N_CTX, n_seq=2, n_threads=2)
    ctx.eval([1, 2, 3], 0)
    cases = [
        (lambda: ctx.truncate(0, 4), "bn_seq_truncate: n_keep 4 is beyond the 3 positions of sequence 0"),
        (lambda: ctx.copy(0, 1, 5), "bn_seq_copy: n 5 is beyond the 3 positions of sequence 0"),
        (lambda: ctx.copy(0, 2, 1), r"sequence 2 is out of range \[0, 2\)"),
        (lambda: ctx.clear(-1), r"sequence -1 is out of range \[0, 2\)"),
        (lambda: ctx.n_past(5), r"sequence 5 is out of range \[0, 2\)"),
        (lambda: ctx.decode([1, 2], [0], [3, 4]), "seq_ids and positions must have one entry per token"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert ctx.n_past(0) == 3 and ctx.n_past(1) == 0


def test_bad_context_parameters(model):
    with pytest.raises(ValueError, match="kv_type must be one of f16, f32, got 'q8'"):
        Context(model, kv_type="q8")
    with pytest.raises(ValueError, match="n_seq must be >= 1, got 0"):
        Context(model, n_seq=0)


def test_default_context_length_is_capped(model):
    ctx = Context(model, n_seq=1)
    assert ctx.n_ctx == min(model.hparams["context_length"], 4096)
    assert ctx.kv_type == "f16"
