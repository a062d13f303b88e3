"""The C sampler (bn_sampler, runtime/src/sampler.c) against a numpy statement of the same rules
(bitnet.h, "sampling"): penalties over the last N tokens -> logit bias -> top-k -> top-p -> min-p ->
temperature, the filtered distribution compared for every parameter combination; greedy picks; the
documented RNG reproduced in Python; seeded draws reproducible across processes; draw frequencies
against the distribution; bad parameters rejected with one-line messages."""
from __future__ import annotations

import itertools
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bitnet_run._bitnet import ffi, lib
from bitnet_run.sampling import Sampler, SamplingParams, top_logprobs

F32 = np.float32
FLT_MAX = np.finfo(np.float32).max
BORDER = 1e-6  # a filter decision this close (relative) to its threshold may go either way in float


def sanitize(v: np.ndarray) -> np.ndarray:
    v = np.where(np.isnan(v), F32(-np.inf), v)
    return np.where(v == np.inf, FLT_MAX, v).astype(F32)


def reference(logits: np.ndarray, p: SamplingParams, history: list[int]) -> tuple[dict[int, float], bool]:
    """The distribution the rules define, as {token: prob} (nonzero ones), and whether some filter
    decision was within BORDER of its threshold (then float rounding may decide either way)."""
    v = sanitize(np.asarray(logits, dtype=F32).copy())
    recent = history[-p.penalty_last_n:] if p.penalty_last_n else []
    for token, count in Counter(recent).items():
        x = v[token]
        x = x * F32(p.repeat_penalty) if x <= 0 else x / F32(p.repeat_penalty)
        v[token] = sanitize(np.array([x - (F32(count) * F32(p.frequency_penalty) + F32(1) * F32(p.presence_penalty))],
                                     dtype=F32))[0]
    for token, bias in (p.logit_bias or {}).items():
        v[token] = sanitize(np.array([v[token] + F32(bias)], dtype=F32))[0]
    if p.temperature == 0 or v.max() == -np.inf:
        return {int(np.argmax(v)): 1.0}, False
    order = np.lexsort((np.arange(v.size), -v))  # value desc, then id asc
    if 0 < p.top_k < v.size:
        order = order[: p.top_k]
    m = v[order[0]]
    e = np.exp(v[order] - m).astype(F32)
    border = False
    n_keep = order.size
    if p.top_p < 1:
        cum = np.cumsum(e.astype(np.float64))
        target = float(F32(p.top_p)) * cum[-1]
        n_keep = min(int(np.searchsorted(cum, target)) + 1, order.size)
        # the cut moves only if the crossing partial sum, or the one before it, is within the rounding
        # of the exponentials in it (exp(0) = 1 is exact on both sides)
        inexact = np.cumsum(np.where(e == 1, 0, e).astype(np.float64)) * BORDER + 1e-12 * cum[-1]
        near = slice(max(n_keep - 2, 0), n_keep)
        border |= bool(np.any(np.abs(cum[near] - target) <= inexact[near]))
    if p.min_p > 0:
        keep = e >= F32(p.min_p)
        n_keep = min(n_keep, int(keep.sum()))
        border |= bool(np.any((np.abs(e - F32(p.min_p)) <= BORDER * F32(p.min_p)) & (e != 1)))
    order = order[:n_keep]
    w = e[:n_keep] if p.temperature == 1 else np.exp((v[order] - m) / F32(p.temperature)).astype(F32)
    probs = w.astype(np.float64) / w.astype(np.float64).sum()
    return {int(t): float(q) for t, q in zip(order, probs) if q > 0}, border


def c_probs(sampler: Sampler, logits: np.ndarray, history: list[int]) -> dict[int, float]:
    sampler.reset()
    for token in history:
        sampler.accept(token)
    ids, probs = sampler.probs(logits)
    assert np.all(np.diff(probs) <= 0), "probs must come most likely first"
    assert len(set(ids.tolist())) == len(ids)
    return dict(zip(ids.tolist(), probs.astype(np.float64).tolist()))


# A weight exp((v - max) / T) below float32's normal range (~1e-38) may round to zero on one side and
# not the other (numpy's exp keeps subnormals, the runtime's polynomial exp flushes them): such a token
# can never be drawn either way, so it may be missing from one side.
UNDERFLOW = 1e-30


def assert_same_distribution(got: dict[int, float], want: dict[int, float]) -> None:
    only_c = {t for t in set(got) - set(want) if got[t] >= UNDERFLOW}
    only_np = {t for t in set(want) - set(got) if want[t] >= UNDERFLOW}
    assert not only_c and not only_np, f"tokens differ: only C {sorted(only_c)[:10]}, only numpy {sorted(only_np)[:10]}"
    ids = sorted(set(want) | set(got))
    np.testing.assert_allclose([got.get(i, 0.0) for i in ids], [want.get(i, 0.0) for i in ids], rtol=1e-5, atol=1e-6)


def logits_of(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "normal":
        return (rng.standard_normal(n) * rng.uniform(0.1, 8)).astype(F32)
    if kind == "peaked":  # an LLM-like row: a few large logits over a flat bulk
        x = rng.standard_normal(n).astype(F32)
        x[rng.integers(0, n, 5)] += F32(15)
        return x
    if kind == "ties":  # few distinct values: top-k / top-p boundaries inside groups of equal values
        return rng.integers(-3, 3, n).astype(F32)
    if kind == "nonfinite":
        x = rng.standard_normal(n).astype(F32) * F32(3)
        x[rng.integers(0, n, max(1, n // 5))] = rng.choice([np.nan, -np.inf])
        return x
    raise ValueError(kind)


params_strategy = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.25, 0.8, 1.0, 1.7]),
    top_k=st.sampled_from([0, 1, 2, 5, 40, 1000]),
    top_p=st.sampled_from([1.0, 0.95, 0.5, 0.1]),
    min_p=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    repeat_penalty=st.sampled_from([1.0, 1.1, 2.0, 0.7]),
    seed=st.just(0),
    frequency_penalty=st.sampled_from([0.0, 0.5, -0.3]),
    presence_penalty=st.sampled_from([0.0, 0.8]),
    penalty_last_n=st.sampled_from([0, 3, 64]),
    logit_bias=st.sampled_from([None, {0: 5.0}, {1: -np.inf, 2: 2.5}]),
)


@settings(max_examples=400, deadline=None)
@given(params=params_strategy, n_vocab=st.sampled_from([3, 17, 300, 5000]),
       kind=st.sampled_from(["normal", "peaked", "ties", "nonfinite"]), seed=st.integers(0, 2**32 - 1))
def test_distribution_matches_numpy(params, n_vocab, kind, seed):
    rng = np.random.default_rng(seed)
    logits = logits_of(kind, n_vocab, rng)
    history = rng.integers(0, n_vocab, rng.integers(0, 80)).tolist()
    want, border = reference(logits, params, history)
    assume(not border)
    assert_same_distribution(c_probs(Sampler(params, n_vocab), logits, history), want)


GRID = list(itertools.product([0.0, 0.7, 1.0], [0, 1, 40], [1.0, 0.9, 0.3], [0.0, 0.05], [1.0, 1.3],
                              [0.0, 0.4], [0.0, 0.6]))


@pytest.mark.parametrize("temperature,top_k,top_p,min_p,repeat,frequency,presence", GRID)
def test_distribution_grid(temperature, top_k, top_p, min_p, repeat, frequency, presence):
    """Every combination of the filters and penalties on one peaked row (no decision near a border)."""
    params = SamplingParams(temperature, top_k, top_p, min_p, repeat, 0, frequency, presence, 64, {3: 4.0, 4: -2.0})
    rng = np.random.default_rng(5)
    logits = logits_of("peaked", 2000, rng)
    history = rng.integers(0, 2000, 100).tolist() + [int(np.argmax(logits))] * 3
    want, border = reference(logits, params, history)
    assert not border
    assert_same_distribution(c_probs(Sampler(params, 2000), logits, history), want)


@pytest.mark.parametrize("kind", ["normal", "peaked", "ties"])
@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 0.95, 0.0), (0, 0.5, 0.0), (0, 0.95, 0.05), (40, 0.95, 0.05),
                                               (5000, 0.99, 0.0), (0, 1.0, 0.0)])
def test_full_vocabulary(kind, top_k, top_p, min_p):
    """A 128,256-token row: the selection's several rounds and its small-bucket and equal-value ends."""
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=1.1)
    for seed in range(11, 31):  # the first row with no decision near a border (few are near one)
        rng = np.random.default_rng(seed)
        logits = logits_of(kind, 128256, rng)
        history = rng.integers(0, 128256, 64).tolist()
        want, border = reference(logits, params, history)
        if not border:
            break
    assert not border
    assert_same_distribution(c_probs(Sampler(params, 128256), logits, history), want)


@settings(max_examples=200, deadline=None)
@given(params=params_strategy, kind=st.sampled_from(["normal", "ties", "nonfinite"]), seed=st.integers(0, 2**32 - 1))
def test_greedy_is_argmax_after_penalties_and_bias(params, kind, seed):
    rng = np.random.default_rng(seed)
    logits = logits_of(kind, 400, rng)
    history = rng.integers(0, 400, 70).tolist()
    greedy = SamplingParams(**{**params.__dict__, "temperature": 0.0})
    (want,), _ = reference(logits, greedy, history)
    sampler = Sampler(greedy, 400)
    assert sampler(logits, history) == want
    assert c_probs(sampler, logits, history[-greedy.penalty_last_n:] if greedy.penalty_last_n else []) == {want: 1.0}


def _xoshiro_uniforms(seed: int, n: int) -> list[float]:
    """The documented RNG: splitmix64 seeds xoshiro256**; u = (next >> 11) * 2^-53."""
    mask = 2**64 - 1

    def splitmix(x):
        x = (x + 0x9E3779B97F4A7C15) & mask
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return x, z ^ (z >> 31)

    def rotl(x, k):
        return ((x << k) | (x >> (64 - k))) & mask

    s, x = [], seed
    for _ in range(4):
        x, z = splitmix(x)
        s.append(z)
    out = []
    for _ in range(n):
        result = (rotl((s[1] * 5) & mask, 7) * 9) & mask
        t = (s[1] << 17) & mask
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 45)
        out.append((result >> 11) * 2.0**-53)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2**63 + 12345])
def test_rng_is_the_documented_one(seed):
    """Two equal logits, no filters: token 0 exactly when the uniform draw is below 1/2."""
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=seed)
    sampler = Sampler(params, 2)
    got = [sampler.sample(np.zeros(2, dtype=F32)) for _ in range(200)]
    assert got == [0 if u < 0.5 else 1 for u in _xoshiro_uniforms(seed, 200)]


_DRAWS = """
import numpy as np
from bitnet_run.sampling import Sampler, SamplingParams
logits = (np.random.default_rng(3).standard_normal(5000) * 2).astype(np.float32)
s = Sampler(SamplingParams(temperature=1.2, top_k=0, top_p=0.97, min_p=0.0, seed={seed}), 5000)
print([s.sample(logits) for _ in range(300)])
"""


def _draws_in_subprocess(seed: int) -> str:
    done = subprocess.run([sys.executable, "-c", _DRAWS.format(seed=seed)], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_seeded_draws_reproducible_across_processes():
    first, second, other = _draws_in_subprocess(42), _draws_in_subprocess(42), _draws_in_subprocess(43)
    assert first == second
    assert first != other
    assert len(set(eval(first))) > 20  # really sampling, not stuck on one token


def test_draw_frequencies_match_the_distribution():
    """Pearson's chi-square of 40,000 seeded draws against bn_sampler_probs, bounded far above its
    expectation (df) so that only a wrong draw fails: df + 8 sqrt(2 df)."""
    rng = np.random.default_rng(8)
    logits = (rng.standard_normal(300) * 2).astype(F32)
    params = SamplingParams(temperature=0.7, top_k=60, top_p=0.9, min_p=0.01, repeat_penalty=1.0, seed=9)
    sampler = Sampler(params, 300)
    ids, probs = sampler.probs(logits)
    n = 40_000
    counts = Counter(sampler.sample(logits) for _ in range(n))
    assert set(counts) <= set(ids.tolist())
    expected = probs.astype(np.float64) * n
    observed = np.array([counts.get(int(i), 0) for i in ids])
    big = expected >= 5
    chi2 = (((observed[big] - expected[big]) ** 2) / expected[big]).sum()
    df = int(big.sum()) - 1
    assert df > 10
    assert chi2 < df + 8 * np.sqrt(2 * df), f"chi-square {chi2:.1f} with {df} degrees of freedom"


def test_top_logprobs_matches_numpy():
    rng = np.random.default_rng(2)
    for logits in (logits_of("normal", 1000, rng), logits_of("ties", 50, rng), logits_of("nonfinite", 200, rng)):
        ids, logprobs = top_logprobs(logits, 7)
        finite = ~np.isnan(logits)
        x = np.where(finite, logits, -np.inf).astype(np.float64)
        log_z = x.max() + np.log(np.exp(x - x.max()).sum())
        order = np.lexsort((np.arange(x.size), -x))[:7]
        assert ids.tolist() == order.tolist()
        np.testing.assert_allclose(logprobs, x[order] - log_z, rtol=1e-5, atol=1e-5)


def test_call_keeps_its_old_meaning():
    """sampler(logits, history) penalizes the last penalty_last_n ids of `history` only."""
    logits = np.array([5.0, 4.9, 0.0], dtype=F32)
    sampler = Sampler(SamplingParams(temperature=0.0, repeat_penalty=2.0, penalty_last_n=2))
    assert sampler(logits, []) == 0
    assert sampler(logits, [0]) == 1  # 5 / 2 < 4.9
    assert sampler(logits, [0, 2, 2]) == 0  # token 0 is 3 back: outside the last 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(top_k=-2), "top_k must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(repeat_penalty=0), "repeat_penalty must be > 0"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty must be finite"),
    (dict(presence_penalty=float("inf")), "presence_penalty must be finite"),
    (dict(penalty_last_n=-1), "penalty_last_n must be >= 0"),
    (dict(seed=-1), "seed must be in"),
    (dict(logit_bias={-1: 1.0}), "logit_bias keys must be token ids"),
    (dict(logit_bias={3: float("nan")}), "logit_bias for token 3 must not be NaN"),
])
def test_bad_parameters_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        SamplingParams(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match=r"logit_bias token 10 is out of range \[0, 10\)"):
        Sampler(SamplingParams(logit_bias={10: 1.0}), 10)
    sampler = Sampler(SamplingParams(), 10)
    with pytest.raises(ValueError, match="expected 10 logits, got 11"):
        sampler.sample(np.zeros(11, dtype=F32))
    with pytest.raises(ValueError, match=r"n must be in \[0, 4\]"):
        top_logprobs(np.zeros(4, dtype=F32), 5)


def test_c_rejects_bad_parameters_itself():
    """The C checks behind the Python ones: a NaN temperature, which no comparison lets through."""
    params = lib.bn_sampler_default_params()
    params.temperature = float("nan")
    out = ffi.new("bn_sampler **")
    err = ffi.new("char[]", 256)
    assert lib.bn_sampler_new(ffi.new("bn_sampler_params *", params), 10, out, err, 256) == lib.BN_ERR_ARG
    assert ffi.string(err).decode() == "temperature must be >= 0 (0 = greedy), got nan"
    assert out[0] == ffi.NULL
