"""The shipped demo model (models/demo/): its packed file, perplexity and chat accuracy against transformers."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from bitnet_run import Model
from bitnet_run.convert import convert_checkpoint
from bitnet_run.sampling import SamplingParams
from checkpoints import load_reference

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo"
PACKED = DEMO / "demo.bnr"
HELDOUT = DEMO / "heldout"
WINDOW = 256  # tokens per perplexity window (the model's context is 512)
N_WINDOWS = 4
ANSWER_TOKENS = 12


@pytest.fixture(scope="module")
def demo():
    return Model(PACKED, n_threads=2)


@pytest.fixture(scope="module")
def reference():
    return load_reference(DEMO)


def test_shipped_checkpoint_converts_to_the_shipped_file(tmp_path):
    converted = convert_checkpoint(DEMO, tmp_path / "demo.bnr")
    assert converted.read_bytes() == PACKED.read_bytes()


def _heldout_windows(model) -> list[list[int]]:
    text = (HELDOUT / "prose.txt").read_text()
    ids = model.tokenize(text, add_bos=False)
    size = WINDOW - 1
    assert len(ids) >= N_WINDOWS * size, "held-out prose slice too short"
    return [[model.codec.bos_id] + ids[i * size : (i + 1) * size] for i in range(N_WINDOWS)]


def _nll(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    logits = logits[:-1].astype(np.float64)
    targets = np.array(ids[1:])
    logz = np.log(np.exp(logits - logits.max(axis=1, keepdims=True)).sum(axis=1)) + logits.max(axis=1)
    return float((logz - logits[np.arange(len(targets)), targets]).sum()), len(targets)


def test_perplexity_matches_transformers(demo, reference):
    ours = theirs = 0.0
    count = 0
    for ids in _heldout_windows(demo):
        nll, n = _nll(demo.logits(ids), ids)
        ours += nll
        with torch.no_grad():
            ref_logits = reference(torch.tensor([ids])).logits[0].numpy()
        theirs += _nll(ref_logits, ids)[0]
        count += n
    ppl_ours, ppl_ref = math.exp(ours / count), math.exp(theirs / count)
    print(f"held-out perplexity: runtime {ppl_ours:.4f}, transformers {ppl_ref:.4f}")
    assert abs(ppl_ours / ppl_ref - 1) <= 0.005


def _answer(text: str) -> int | None:
    numbers = re.findall(r"-?\d+", text)
    return int(numbers[-1]) if numbers else None


def _reference_reply(model, reference, prompt_ids: list[int]) -> list[int]:
    stop = sorted(model.stop_ids)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=ANSWER_TOKENS, do_sample=False, eos_token_id=stop, pad_token_id=stop[0],
        )
    return [t for t in out[0, len(prompt_ids) :].tolist() if t not in model.stop_ids]


def test_chat_arithmetic_accuracy_matches_transformers(demo, reference):
    questions = [json.loads(line) for line in (HELDOUT / "arith.jsonl").read_text().splitlines()]
    assert len(questions) == 200
    greedy = SamplingParams(temperature=0.0, repeat_penalty=1.0)
    ours = theirs = 0
    for q in questions:
        prompt = demo.apply_chat_template([{"role": "user", "content": q["question"]}])
        prompt_ids = demo.tokenize(prompt, add_bos=False)
        reply = [t for t, _ in demo.stream_ids(prompt_ids, ANSWER_TOKENS, greedy)]
        ours += _answer(demo.detokenize(reply)) == q["answer"]
        theirs += _answer(demo.detokenize(_reference_reply(demo, reference, prompt_ids))) == q["answer"]
    print(f"held-out arithmetic accuracy: runtime {ours / 2:.1f}%, transformers {theirs / 2:.1f}%")
    assert abs(ours - theirs) <= 4  # 2 points of 200 questions


def test_ten_turn_chat_evaluates_each_token_once(demo):
    """Each turn evaluates only what follows the cached conversation; the replies are those of a fresh
    evaluation of the whole conversation every turn."""
    questions = [json.loads(line) for line in (HELDOUT / "arith.jsonl").read_text().splitlines()][:10]
    chat, fresh = demo.new_context(), demo.new_context()
    messages = []
    for i, q in enumerate(questions):
        messages.append({"role": "user", "content": q["question"]})
        before = chat.n_evaluated
        responses = list(chat.stream_chat_generate(messages, max_tokens=ANSWER_TOKENS, temperature=0.0))
        reply = "".join(r.text for r in responses)
        stats = chat.last_stats
        assert chat.n_evaluated - before == stats.prompt_tokens + stats.eval_tokens
        if i > 0:
            assert stats.cached_tokens > 0
        fresh.reset()
        assert fresh.chat(messages, max_tokens=ANSWER_TOKENS, temperature=0.0) == reply
        assert fresh.last_stats.cached_tokens == 0
        messages.append({"role": "assistant", "content": reply})
    # the final transcript: the last prompt and the reply tokens after it that were evaluated (all but
    # the last one sampled, a stop token or the max_tokens-th)
    transcript = chat.tokenize_chat(messages[:-1]) + [r.token for r in responses[:-1]]
    assert chat.n_evaluated == len(transcript)


def test_readme_main_command_uses_the_demo_model():
    env = {k: v for k, v in os.environ.items() if k != "BITNET_RUN_MODEL"}
    result = subprocess.run(
        ["bitnet-run", "run", "-p", "The", "-n", "16", "--seed", "1"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The") and len(result.stdout.strip()) > len("The")
    assert "tokens/s" in result.stderr


def test_chat_command_with_the_demo_model():
    env = {k: v for k, v in os.environ.items() if k != "BITNET_RUN_MODEL"}
    result = subprocess.run(
        ["bitnet-run", "chat", "--temp", "0", "-n", "12"], cwd=REPO, env=env, input="What is 12 plus 30?\n/exit\n",
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # the reply is the greedy answer of the API (the prompt marker "> " comes first on stdout)
    expected = Model(PACKED, n_threads=1).chat([{"role": "user", "content": "What is 12 plus 30?"}],
                                               max_tokens=12, temperature=0.0)
    assert _answer(expected) == 42
    assert result.stdout.startswith("> " + expected + "\n"), result.stdout
