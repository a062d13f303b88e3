"""Perplexity over a text file, as llama.cpp's llama-perplexity computes it.

The text is tokenized once (without BOS) and cut into non-overlapping windows of n_ctx tokens; the
tail that does not fill a window is dropped. Each window is evaluated from a fresh cache with its first
token replaced by BOS (when the model adds one), and only its second half is scored: the predictions of
window positions n_ctx//2 + 1 .. n_ctx - 1, so every scored token sees at least n_ctx//2 tokens of
context. perplexity = exp(mean negative log-likelihood of the scored tokens).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class PerplexityResult:
    perplexity: float
    n_chunks: int
    n_ctx: int
    n_scored: int  # tokens scored over all chunks
    chunk_perplexities: list[float]  # running perplexity after each chunk (llama-perplexity's [1]..[N] line)


def windows(ids: list[int], n_ctx: int, n_chunks: int | None, bos_id: int | None) -> list[list[int]]:
    """The evaluated windows: consecutive n_ctx-token slices of ids, the first token of each replaced
    by bos_id (None: kept), at most n_chunks of them (None: all)."""
    count = len(ids) // n_ctx
    if n_chunks is not None:
        count = min(count, n_chunks)
    out = []
    for i in range(count):
        window = list(ids[i * n_ctx : (i + 1) * n_ctx])
        if bos_id is not None:
            window[0] = bos_id
        out.append(window)
    return out


def window_nll(logits: np.ndarray, window: list[int]) -> tuple[float, int]:
    """Sum of -log p(window[j + 1] | window[..j]) over the scored positions j = n//2 .. n-2, and their count."""
    first = len(window) // 2
    rows = logits[first : len(window) - 1].astype(np.float64)  # [n_scored, vocab]
    targets = np.asarray(window[first + 1 :])
    peak = rows.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
    return float((log_z - rows[np.arange(targets.size), targets]).sum()), int(targets.size)


def perplexity(model, text: str, n_ctx: int = 512, n_chunks: int | None = None,
               progress: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    """llama-perplexity's number for `text` on `model` (a bitnet_run.Model); progress(done, total,
    running perplexity) after each window. Raises ValueError when the text is shorter than one window
    or n_ctx / n_chunks are out of range."""
    if n_ctx < 4:
        raise ValueError(f"the window size (-c) must be >= 4 tokens, got {n_ctx}")
    if n_ctx > model.n_ctx:
        raise ValueError(f"the window size (-c) {n_ctx} exceeds the context of {model.n_ctx} tokens")
    if n_chunks is not None and n_chunks < 1:
        raise ValueError(f"--chunks must be >= 1, got {n_chunks}")
    ids = model.tokenize(text, add_bos=False)
    bos = model.codec.bos_id if model.codec.add_bos and model.codec.bos_id >= 0 else None
    chunks = windows(ids, n_ctx, n_chunks, bos)
    if not chunks:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {n_ctx} (use a smaller -c)")
    total_nll, total_n, running = 0.0, 0, []
    for i, window in enumerate(chunks):
        nll, n = window_nll(model.logits(window), window)
        total_nll += nll
        total_n += n
        running.append(math.exp(total_nll / total_n))
        if progress is not None:
            progress(i + 1, len(chunks), running[-1])
    return PerplexityResult(perplexity=running[-1], n_chunks=len(chunks), n_ctx=n_ctx, n_scored=total_n,
                            chunk_perplexities=running)
