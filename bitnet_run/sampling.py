"""Token sampling: llama.cpp's parameters and order (repeat penalty, top-k, top-p, min-p, temperature)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# How many of the most recent tokens the repeat penalty looks at (llama.cpp's --repeat-last-n).
REPEAT_LAST_N = 64


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: int | None = None

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repeat_penalty > 0, f"repeat_penalty must be > 0 (1 = off), got {self.repeat_penalty}"),
            (self.seed is None or self.seed >= 0, f"seed must be >= 0 or None, got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class Sampler:
    """Picks the next token from a row of logits; seeded for reproducible runs."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        p = self.params
        logits = np.array(logits, dtype=np.float32, copy=True)  # shape [vocab]
        if p.repeat_penalty != 1.0 and history:
            recent = np.unique(np.asarray(history[-REPEAT_LAST_N:], dtype=np.int64))
            values = logits[recent]
            logits[recent] = np.where(values > 0, values / p.repeat_penalty, values * p.repeat_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))

        order = np.argsort(-logits, kind="stable")
        if p.top_k > 0:
            order = order[: p.top_k]
        kept = logits[order].astype(np.float64)
        probs = np.exp(kept - kept[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            n_keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            order, kept = order[:n_keep], kept[:n_keep]
            probs = probs[:n_keep]
        if p.min_p > 0:
            keep = probs >= p.min_p * probs[0]
            order, kept = order[keep], kept[keep]
        scaled = (kept - kept[0]) / p.temperature
        weights = np.exp(scaled)
        weights /= weights.sum()
        return int(order[self.rng.choice(len(order), p=weights)])
